#!/usr/bin/env python3
"""Run the provisioner's test suite under every Python 3.6 .. 3.13 found.

    python3 tests/matrix.py [--pythons DIR] [--jobs N] [--only 3.N ...] [MODULE ...]

Looks for DIR/3.N*/bin/python3 (DIR defaults to ~/.pyenv/versions) and runs
`PY -m unittest MODULES` from the repository root with each.  The black-box
tests start the script with the interpreter that runs them, so each version
runs the script too.  A version that is not installed is reported as absent,
never as passed.  Exit status 1 when any present version fails or none is found.
--jobs N runs N versions at a time (each its own process tree, temporary files,
namespaces and emulator ports, so they cannot meet); the results are printed in
version order.
"""

import argparse
import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINORS = range(6, 14)
DEFAULT_MODULES = ['tests.test_transport', 'tests.test_wireserver', 'tests.test_imds',
                   'tests.test_cli', 'tests.test_kvp', 'tests.test_publish', 'tests.test_user',
                   'tests.test_hooks', 'tests.test_check',
                   'tests.test_hostname', 'tests.test_fake_azure',
                   'tests.test_provisioner', 'tests.test_ready_post', 'tests.test_fuzz',
                   'tests.test_media', 'tests.test_fake_azure_media', 'tests.test_identity']
TIMEOUT = 600   # per version


def find_python(root, minor):
    found = sorted(glob.glob(os.path.join(root, '3.%d.*' % minor, 'bin', 'python3')))
    return found[-1] if found else None


def run_suite(python, modules):
    started = time.monotonic()
    try:
        done = subprocess.run([python, '-m', 'unittest'] + modules, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=TIMEOUT)
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as exc:
        partial = exc.output or ''
        if isinstance(partial, bytes):     # what was read before the timeout, undecoded
            partial = partial.decode('utf-8', 'replace')
        output, code = partial + '\n(timed out after %d s)' % TIMEOUT, 1
    ran = re.search(r'^Ran (\d+) tests?', output, re.M)
    skipped = re.search(r'skipped=(\d+)', output)
    return code, int(ran.group(1)) if ran else 0, int(skipped.group(1)) if skipped else 0, \
        output, time.monotonic() - started


def main(args=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pythons', default=os.path.expanduser('~/.pyenv/versions'),
                        help='directory holding 3.N.M/bin/python3 (default %(default)s)')
    parser.add_argument('--jobs', type=int, default=1, choices=range(1, 9), metavar='N',
                        help='versions run at a time (default 1)')
    parser.add_argument('--only', action='append', metavar='3.N',
                        choices=['3.%d' % minor for minor in MINORS],
                        help='run this version only (repeatable; default: every one)')
    parser.add_argument('modules', nargs='*', default=DEFAULT_MODULES)
    options = parser.parse_args(args)
    minors = [m for m in MINORS if not options.only or '3.%d' % m in options.only]

    started = time.monotonic()
    passed = failed = absent = 0
    pythons = [(minor, find_python(options.pythons, minor)) for minor in minors]
    with concurrent.futures.ThreadPoolExecutor(options.jobs) as pool:
        runs = dict((minor, pool.submit(run_suite, python, options.modules))
                    for minor, python in pythons if python is not None)
        for minor, python in pythons:
            if python is None:
                print('3.%d: absent (no %s/3.%d.*/bin/python3), not run'
                      % (minor, options.pythons, minor), flush=True)
                absent += 1
                continue
            code, ran, skipped, output, seconds = runs[minor].result()
            ok = code == 0 and ran > 0
            print('3.%d: %s  %d tests, %d skipped, %.1f s  (%s)'
                  % (minor, 'ok  ' if ok else 'FAIL', ran, skipped, seconds, python), flush=True)
            if ok:
                passed += 1
            else:
                failed += 1
                sys.stdout.write(output[-6000:] + '\n')
    print('%d at a time, %.1f s in all' % (options.jobs, time.monotonic() - started))
    print('python versions run; absent ones are counted as skipped:')
    print('matrix: %d passed, %d failed, %d skipped' % (passed, failed, absent))
    return 1 if failed or not passed else 0


if __name__ == '__main__':
    sys.exit(main())
