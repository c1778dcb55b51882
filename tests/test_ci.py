""".ci/run never changes its machine's /var/lib or /etc: every check runs with a
private /var/lib and a read-only /etc, a snapshot of both is taken after the package
installation and compared by the last check; and its summary gives each step's
duration.  Reads .ci/run and runs its own shell functions (never the checks)."""

import json
import os
import re
import subprocess
import sys
import unittest

from tests.support import REPO, require_root

CI_RUN = os.path.join(REPO, '.ci', 'run')
# what a process sees of /var/lib and /etc
PROBE = ('import json, os; s = os.stat("/var/lib"); print(json.dumps([s.st_dev, s.st_ino, '
         'sorted(os.listdir("/var/lib")), os.access("/etc", os.W_OK), '
         'os.access("/var/lib", os.W_OK), os.access("/var/lib/dpkg", os.W_OK)]))')


def ci_text():
    with open(CI_RUN) as f:
        return f.read()


def checks(text):
    """The check lines (run / run_here CMD...), continuation lines joined."""
    text = text.replace('\\\n', ' ')
    return [line.strip() for line in text.splitlines()
            if re.match(r'\s*(run|run_here) ', line)]


def readme_first_commands():
    """The commands of README.md's "Try it" block, comments removed."""
    with open(os.path.join(REPO, 'README.md')) as f:
        text = f.read()
    section = text[text.index('\n## Try it'):]
    block = re.search(r'^```sh\n(.*?)^```$', section, re.M | re.S).group(1)
    return [line.split('  #')[0].strip() for line in block.splitlines() if line.strip()]


def bash_with_functions(script):
    """bash running `script` after .ci/run's definitions from PRIVATE= to check()."""
    text = ci_text()
    start = text.index("PRIVATE='")
    end = text.index('\n}\n', text.index('check() {')) + 3
    return subprocess.run(['bash', '-c', 'set -euo pipefail\nstep() { :; }\n' + text[start:end]
                           + '\n' + script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


class CiRun(unittest.TestCase):
    def test_the_snapshot_follows_the_installation_the_comparison_is_last(self):
        text = ci_text()
        snapshot = text.index('tests/untouched.py snapshot')
        self.assertGreater(snapshot, text.index('apt-get install'))
        lines = checks(text)
        self.assertTrue(lines[-1].startswith('run_here python3 tests/untouched.py compare'),
                        lines[-1])
        self.assertLess(snapshot, text.index(lines[0]))
        for tree in ('/var/lib', '/etc'):
            self.assertRegex(text[snapshot:text.index('\n', snapshot)], ' %s( |$)' % tree)

    def test_every_other_check_runs_private(self):
        lines = checks(ci_text())
        self.assertGreater(len(lines), 8)
        for line in lines[:-1]:
            self.assertTrue(line.startswith('run '), line)
        for needed in ('python3 -m unittest', 'tests/matrix.py', 'tests/fuzz.py',
                       'tests/mutations.py', 'tests/bench.py', 'tests/vm_bench.py',
                       'tests/boot_test.py', 'setpriv --reuid=65534'):
            self.assertTrue([line for line in lines if needed in line], needed)
        self.assertRegex(ci_text(), r'(?m)^run\(\) \{ check private "\$@"; \}$')

    def test_the_readme_test_command_is_the_one_ci_runs(self):
        # the newcomer's two commands: the demo, then the tests exactly as CI runs them
        demo, tests = readme_first_commands()
        self.assertEqual(demo, 'python3 tests/fake_azure.py demo')
        self.assertIn('run ' + tests, checks(ci_text()))

    def test_the_private_wrapper_hides_var_lib_and_makes_etc_read_only(self):
        require_root(self)
        # started directly, not through run_command: under its shield any /var/lib seen
        # would be private already.  The probe only reads.
        done = bash_with_functions('private %s -c %s' % (sys.executable,
                                                         "'%s'" % PROBE.replace("'", '')))
        self.assertEqual(done.returncode, 0, done.stderr)
        dev, ino, listing, etc_writable, var_lib_writable, dpkg_writable = json.loads(done.stdout)
        here = os.stat('/var/lib')
        self.assertNotEqual([dev, ino], [here.st_dev, here.st_ino])
        self.assertEqual(listing, [d for d in ('apt', 'dpkg') if os.path.isdir('/var/lib/' + d)])
        self.assertFalse(etc_writable)
        self.assertTrue(var_lib_writable)        # the private tmpfs
        if 'dpkg' in listing:
            self.assertFalse(dpkg_writable)

    def test_the_summary_gives_each_steps_duration(self):
        done = bash_with_functions('run_here sleep 1; run_here sh -c "exit 3"; '
                                   'printf %s "$durations"; echo "$passes $failures"')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, r'(?m)^--- FAILED \(3\): sh -c exit 3$')
        self.assertRegex(done.stdout, r'(?m)^\s+[12] s  ok      sleep 1$')
        self.assertRegex(done.stdout, r'(?m)^\s+[01] s  FAILED  sh -c exit 3$')
        self.assertTrue(done.stdout.endswith('1 1\n'), done.stdout)


if __name__ == '__main__':
    unittest.main()
