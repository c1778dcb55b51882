#!/usr/bin/env python3
"""A small mutation check: deliberate bugs in azure_provisioning.py, one at a time,
and the test modules that must notice each of them.

    python3 tests/mutations.py              # every mutation (as root: the suites need
                                            # it; about 10 minutes)
    python3 tests/mutations.py --list       # ids, descriptions and modules
    python3 tests/mutations.py --only ID    # one (repeatable)
    python3 tests/mutations.py --jobs 2     # mutants side by side

Each mutation replaces a snippet of code (a few tokens: azure_provisioning.py
changes, so the snippets are small) that must occur exactly once in the file's
code.  Comments are not code: the snippets are looked for in the file with its
comments taken out, so a comment may change, or repeat a snippet's words, without
making a mutation stale or moving it (tests/test_mutants.py checks every snippet on
every unittest run).

The repository (tracked and untracked, not ignored, files of the working tree) is
copied once to a snapshot; for each mutation the snapshot is copied to a temporary
directory, the snippet is replaced there, and the mutation's modules run there.  A
mutant is caught when a test that passes on the unmutated copy (the baseline, run
first) fails or errors; tests that already fail on the baseline count for nothing.
Prints caught/missed per mutation and "N of M mutations caught"; exits 1 when any
is missed, 2 when a snippet is stale.
"""

import argparse
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 'azure_provisioning.py'
RUN_TIMEOUT = 900       # seconds for one mutant's modules


class Mutation(object):
    def __init__(self, id, description, source, replacement, modules):
        self.id = id
        self.description = description
        self.source = source
        self.replacement = replacement
        self.modules = modules


M = Mutation
MUTATIONS = [
    # -- the bugs the suite was blind to (the issue) --------------------------------
    M('ready-4xx-is-success', 'a 4xx answer to the Ready POST taken as success',
      'if 200 <= response.status < 300:', 'if 200 <= response.status < 500:',
      ['tests.test_ready_post']),
    M('negations-ignored', '--no-hostname and --no-publish-hostname ignored (a switch sets True)',
      'setattr(options, option.dest, not option.default)', 'setattr(options, option.dest, True)',
      ['tests.test_publish', 'tests.test_cli']),
    M('keys-through-symlink', 'the refusal to write keys through a symbolic link removed',
      '        if found is not None and stat.S_ISLNK(found.st_mode):', '        if False:',
      ['tests.test_user']),
    M('catch-all-narrowed', 'the catch-all that turns a crash into a failure report narrowed',
      '                facts = perform_all(actions, facts, system, out)\n'
      '        except Exception as exc:',
      '                facts = perform_all(actions, facts, system, out)\n'
      '        except (ProvisioningError, OSError) as exc:',
      ['tests.test_ready_post']),
    M('modes-not-checked', 'a mode takes every option, whatever its row of OPTIONS says',
      'if mode in option.modes:', 'if True:',
      ['tests.test_cli']),
    M('default-timeout-changed', 'the default --timeout changed (the unit passes none)',
      'DEFAULT_TIMEOUT = 1200', 'DEFAULT_TIMEOUT = 600',
      ['tests.test_cli']),
    M('lock-password-noop', 'lock_password does nothing',
      "system.run(system.account_tool('usermod', '-L', name), 'user')", 'pass',
      ['tests.test_user']),
    M('hostname-not-kept', 'the new name is set live only, not in /etc/hostname',
      "    learned = write_etc_hostname(system, name)\n    system.set_hostname(name)",
      "    learned = None\n    system.set_hostname(name)",
      ['tests.test_publish']),
    M('nm-no-reactivation', 'NetworkManager before 1.42 gets the reapply, which sends nothing',
      'if version is None or version >= NM_REAPPLY_SENDS:', 'if True:',
      ['tests.test_publish']),
    M('route-not-awaited', 'after the DHCP reconfigure, Ready goes before the default route',
      '        if routed:', '        if False:',
      ['tests.test_publish']),
    # -- the provisioning media (#13) ----------------------------------------------------
    M('password-logged', 'the password written into the log line after chpasswd',
      "system.log.info('user: password of %s set (chpasswd)' % name)",
      "system.log.info('user: password of %s set to %s' % (name, password))",
      ['tests.test_media']),
    M('media-left-mounted', 'the media is never unmounted',
      "        finally:\n            unmount(system, mountpoint)", "        finally:\n            pass",
      ['tests.test_media']),
    M('private-files-world-readable', 'the custom data, user data and the record written 0644',
      'system.files.write(path, data, mode=0o600, owner=(os.geteuid(), os.getegid()),',
      'system.files.write(path, data, mode=0o644, owner=(os.geteuid(), os.getegid()),',
      ['tests.test_media', 'tests.test_identity']),
    M('media-user-mismatch-ignored', 'a media naming another admin user than IMDS is accepted',
      'if wants_user and media.username and imds_user and media.username != imds_user:',
      'if False:', ['tests.test_media']),
    M('password-logins-always-no', 'DisableSshPasswordAuthentication false still turns them off',
      "{'true': 'no', 'false': 'yes'}", "{'true': 'no', 'false': 'no'}", ['tests.test_media']),
    # -- the file-safety layer (issue 20) ----------------------------------------------
    M('walk-follows-links', 'the walk inside --root follows links as the kernel does',
      'OPEN_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC',
      'OPEN_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC', ['tests.test_files']),
    M('fifo-read', 'a FIFO or a device read like a regular file',
      'if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):', 'if False:',
      ['tests.test_files']),
    M('read-unbounded', 'the size limit checked after the whole read',
      'piece = os.read(fd, min(1 << 16, limit + 1 - size))', 'piece = os.read(fd, 1 << 40)',
      ['tests.test_files']),
    M('deprovision-half-way', 'a directory where a file should be found only when removing',
      "        raise ProvisioningError('%s; nothing removed' % '; '.join(problems))",
      '        pass', ['tests.test_files']),
    # -- core behaviour ---------------------------------------------------------------
    M('ready-never-posted', 'the goal state is fetched but Ready is never posted',
      "    return facts, [health_post(facts, system, 'Ready')]",
      "    health_post(facts, system, 'Ready')\n    return facts, []",
      ['tests.test_provisioner', 'tests.test_ready_post']),
    M('incarnation-hard-coded', "the health report says incarnation 1 whatever the goal state",
      ') % (xml_escape(goal_state.incarnation),', ") % (xml_escape('1'),",
      ['tests.test_provisioner', 'tests.test_wireserver', 'tests.test_ready_post']),
    M('metadata-header-dropped', 'the IMDS request without "Metadata: true"',
      "IMDS_HEADERS = {'Metadata': 'true'}", 'IMDS_HEADERS = {}',
      ['tests.test_imds', 'tests.test_provisioner']),
    M('hostname-not-validated', 'the name from IMDS is set without validation',
      'name = validate_hostname(desired_hostname(facts.metadata))',
      'name = desired_hostname(facts.metadata)',
      ['tests.test_provisioner', 'tests.test_hostname']),
    M('etc-hosts-not-updated', '/etc/hosts keeps the old name',
      'hosts = update_etc_hosts(system, old, new)',
      'hosts = False and update_etc_hosts(system, old, new)',
      ['tests.test_provisioner', 'tests.test_hostname']),
    M('hook-failure-ignored', 'a hook exiting non-zero does not stop provisioning',
      'if code != 0:', 'if False:',
      ['tests.test_hooks']),
    M('retries-removed', 'the first passing error is final (no retry)',
      'time.sleep(delay)', 'raise ProvisioningError(problem)',
      ['tests.test_transport', 'tests.test_provisioner']),
    M('kvp-not-written', 'no KVP report',
      'write_kvp(KVP_REPORT_KEY, description, pool, wait=wait, root=root)', 'pass',
      ['tests.test_kvp']),
    M('kvp-lock-waits-forever', 'the KVP flock blocks until the lock is free (issue 20)',
      'fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)', 'fcntl.flock(fd, fcntl.LOCK_EX)',
      ['tests.test_kvp']),
    M('media-not-looked-for-again', 'no second search after udev settled (issue 20)',
      'if media is None and settle_devices(system):', 'if False:',
      ['tests.test_media']),
    M('sshd-config-d-not-made', 'a missing sshd_config.d is not made (issue 20)',
      'make_directory = not system.files.is_dir(directory)', 'make_directory = False',
      ['tests.test_user']),
    M('media-mountpoint-not-labelled', 'the media mountpoint keeps our domain\'s type '
      '(issue 23)', 'copy_selinux_label(system.files.path(MEDIA_MOUNT_DIR), directory)', 'pass',
      ['tests.test_media']),
    M('sudoers-drop-in-not-labelled', 'a new sudoers drop-in keeps our domain\'s type '
      '(issue 23)', "system.restore_labels([system.files.path(SUDOERS_DROP_IN)], 'user')", 'pass',
      ['tests.test_user']),
    M('kvp-wait-eats-the-reserve', 'the KVP lock wait ignores the deadline (issue 20)',
      'wait = min(KVP_LOCK_WAIT, system.deadline.remaining())', 'wait = KVP_LOCK_WAIT',
      ['tests.test_kvp']),
    # -- the robustness defects of issue 11, each put back --------------------------
    M('interim-1xx-is-final', 'a 100 Continue taken as the final answer',
      'if not 100 <= status < 200:', 'if True:',
      ['tests.test_transport']),
    M('retry-after-overrides-backoff', 'Retry-After: 0 retries at once',
      'delay = max(delay, min(retry_after, remaining - delay))',
      'delay = min(retry_after, remaining - delay)',
      ['tests.test_transport']),
    M('cut-short-is-malformed', 'an answer cut short given up on after 3 tries, not retried',
      "raise TryAgain('connection closed mid-answer' if self.total",
      "raise Malformed('connection closed mid-answer' if self.total",
      ['tests.test_transport']),
    M('chunks-guessed', 'the chunk framing not checked (CRLF after the data)',
      "if reader.exactly(2) != b'\\r\\n':", 'if False:',
      ['tests.test_transport']),
    M('loopback-renamed', 'the VM name written on the 127.0.0.1 and ::1 lines',
      'if words and is_loopback_address(fields[words[0]]):', 'if False:',
      ['tests.test_hostname']),
    M('mode-not-enforced', 'an existing file keeps its mode although one is asked for',
      'mode = st.st_mode & 0o7777 if mode is None else mode', 'mode = st.st_mode & 0o7777',
      ['tests.test_hostname']),
    M('report-not-cleaned', 'control characters go into the health report',
      "return NOT_XML_TEXT.sub('\\ufffd', TERMINAL_ESCAPE.sub('', text))", 'return text',
      ['tests.test_wireserver', 'tests.test_hooks']),
    M('hook-output-awaited', "a hook's left-over child holds the run",
      'reader.join(max(0.0, drained - time.monotonic()))', 'reader.join()',
      ['tests.test_hooks']),
    # -- issue 20: what the record, --deprovision, --status and --check may be trusted to say
    M('host-keys-trust-vm-id', 'host keys kept on the record\'s vmId, written after failures too',
      "made_for = state.get('ssh_host_keys_for')", "made_for = state.get('vm_id')",
      ['tests.test_trust']),
    M('root-left-relative', '--root passed on as given: userdel --root refuses a relative one',
      "('--root', 'root', 'DIR', absolute_directory, '/',", "('--root', 'root', 'DIR', str, '/',",
      ['tests.test_trust']),
    M('uid-range-floor-only', 'an admin account only needs uid >= UID_MIN (nobody passes)',
      'if not low <= uid <= high:', 'if uid < low:',
      ['tests.test_trust']),
    M('nobody-in-range', 'root and nobody pass when login.defs puts them in range',
      'if uid in NOT_PEOPLE:', 'if False:',
      ['tests.test_trust']),
    M('output-encoding-strict', 'output written in the stream\'s encoding as it is',
      "text = text.encode(encoding, 'backslashreplace').decode(encoding)", 'pass',
      ['tests.test_trust']),
    M('check-error-ends-check', 'an error reading the image ends --check',
      'c.run(check)\n', 'check(c)\n',
      ['tests.test_trust']),
    M('corrupt-record-is-none', 'a corrupt record shown as no record',
      'state, corrupt = None, str(exc)', 'state, corrupt = None, None',
      ['tests.test_trust']),
]
del M


def read_target(root=REPO):
    with open(os.path.join(root, TARGET), encoding='utf-8') as f:
        return f.read()


@functools.lru_cache(maxsize=4)
def code_view(text):
    """(the code of text: text without its comments, for each character of it the
    offset of that character in text).  A line that is only a comment goes whole; a
    comment after code goes with the blanks before it."""
    lines = io.StringIO(text).readlines()
    comments = {}   # line number -> column where its comment starts
    try:
        for token in tokenize.generate_tokens(iter(lines).__next__):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.start[1]
    except (tokenize.TokenError, SyntaxError):
        pass        # not Python (a test's text): the comments found so far are out
    view, offsets, at = [], [], 0
    for number, line in enumerate(lines, 1):
        column = comments.get(number)
        body = len(line.rstrip('\r\n'))
        if column is None:
            kept = [(0, len(line))]
        elif line[:column].strip():
            kept = [(0, len(line[:column].rstrip())), (body, len(line))]
        else:
            kept = []
        for start, end in kept:
            view.append(line[start:end])
            offsets.extend(range(at + start, at + end))
        at += len(line)
    return ''.join(view), offsets


def stale(mutation, text):
    """None when the snippet occurs exactly once in text's code, else why not."""
    count = code_view(text)[0].count(mutation.source)
    if count == 1:
        return None
    return ('mutation %s is stale: its source snippet %r occurs %d times in the code of %s '
            '(must be exactly once; comments are not code); update it in tests/mutations.py'
            % (mutation.id, mutation.source, count, TARGET))


def mutate(text, mutation):
    """text with the mutation's snippet replaced where it occurs in the code."""
    problem = stale(mutation, text)
    if problem:
        raise ValueError(problem)
    view, offsets = code_view(text)
    found = view.index(mutation.source)
    start, end = offsets[found], offsets[found + len(mutation.source) - 1] + 1
    return text[:start] + mutation.replacement + text[end:]


def repo_files():
    out = subprocess.check_output(['git', 'ls-files', '-z', '--cached', '--others',
                                   '--exclude-standard'], cwd=REPO)
    return sorted(set(p for p in out.decode('utf-8', 'surrogateescape').split('\0') if p))


def copy_repo(destination):
    for path in repo_files():
        source = os.path.join(REPO, path)
        if not os.path.lexists(source) or '__pycache__' in path.split('/'):
            continue    # deleted in the working tree
        target = os.path.join(destination, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


# Runs inside the copy: the modules' tests with a result that records each test's
# outcome (a failing subTest fails its test), written as JSON to argv[1].
CHILD = r'''
import json, sys, unittest
out, names = sys.argv[1], sys.argv[2:]
outcomes = {}
class Result(unittest.TextTestResult):
    def _set(self, test, outcome):
        key = test.id()
        if outcomes.get(key) not in ('FAIL', 'ERROR'):
            outcomes[key] = outcome
    def addSuccess(self, test):
        super().addSuccess(test); self._set(test, 'ok')
    def addFailure(self, test, err):
        super().addFailure(test, err); self._set(test, 'FAIL')
    def addError(self, test, err):
        super().addError(test, err)
        self._set(test, 'ERROR')   # also setUpClass/module errors (their own ids)
    def addSkip(self, test, reason):
        super().addSkip(test, reason); self._set(test, 'skip')
    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err); self._set(test, 'ok')
    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test); self._set(test, 'FAIL')
    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            outcomes[test.id()] = 'ERROR' if not issubclass(err[0], test.failureException) \
                else 'FAIL'
suite = unittest.defaultTestLoader.loadTestsFromNames(names)
unittest.TextTestRunner(resultclass=Result, verbosity=0).run(suite)
with open(out, 'w') as f:
    json.dump(outcomes, f)
'''


def run_modules(root, modules, timeout=RUN_TIMEOUT):
    """({test id: 'ok'|'FAIL'|'ERROR'|'skip'}, None) or (None, why not)."""
    result = os.path.join(root, '.mutation-outcomes.json')
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, '-c', CHILD, result] + list(modules), cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, 'timed out after %d s' % timeout
    try:
        with open(result) as f:
            return json.load(f), None
    except (OSError, ValueError):
        tail = done.stdout.decode('utf-8', 'replace').strip().splitlines()[-5:]
        return None, 'no outcomes after %.0f s (exit %d): %s' % (
            time.monotonic() - started, done.returncode, ' / '.join(tail))


def copy_snapshot(snapshot):
    """A fresh copy of the snapshot in a temporary directory that every user may
    enter: tests run the script as nobody too."""
    scratch = tempfile.mkdtemp(prefix='azp-mutant-')
    shutil.rmtree(scratch)
    shutil.copytree(snapshot, scratch, symlinks=True)
    os.chmod(scratch, 0o755)    # copytree gave it the snapshot's 0700 (mkdtemp's)
    return scratch


def run_copy(snapshot, mutation, modules):
    """Copy the snapshot, apply the mutation (None: the baseline), run the modules."""
    scratch = copy_snapshot(snapshot)
    try:
        if mutation is not None:
            path = os.path.join(scratch, TARGET)
            with open(path, encoding='utf-8') as f:
                text = f.read()
            with open(path, 'w', encoding='utf-8') as f:
                f.write(mutate(text, mutation))
        return run_modules(scratch, modules)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def judge(mutation, baseline, outcomes, problem):
    """(caught?, what caught it)."""
    if outcomes is None:
        return True, ['(%s)' % problem]     # a mutant that hangs the suite is noticed too
    # a test new to the run (e.g. a module that no longer imports) counts too
    catchers = sorted(t for t, o in outcomes.items()
                      if o in ('FAIL', 'ERROR') and baseline.get(t, 'ok') == 'ok')
    return bool(catchers), catchers


def short(test_id):
    return test_id[len('tests.'):] if test_id.startswith('tests.') else test_id


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--list', action='store_true', help='list the mutations and exit')
    parser.add_argument('--only', action='append', metavar='ID', help='run only this one')
    parser.add_argument('--jobs', '-j', type=int, default=1, metavar='N',
                        help='mutants run side by side (default 1)')
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        known = dict((m.id, m) for m in MUTATIONS)
        unknown = [i for i in args.only if i not in known]
        if unknown:
            parser.error('unknown mutation(s): %s (see --list)' % ', '.join(unknown))
        chosen = [known[i] for i in args.only]
    if args.list:
        for m in chosen:
            print('%-28s %s  [%s]' % (m.id, m.description, ', '.join(short(x) for x in m.modules)))
        return 0

    # one snapshot of the working tree for the baseline and every mutant: the file
    # may change while the campaign runs
    snapshot = tempfile.mkdtemp(prefix='azp-mutation-snapshot-')
    try:
        copy_repo(snapshot)
        return campaign(args, chosen, snapshot)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def campaign(args, chosen, snapshot):
    text = read_target(snapshot)
    problems = [p for p in (stale(m, text) for m in chosen) if p]
    if problems:
        for problem in problems:
            print('STALE: ' + problem, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print('warning: not root: the namespace tests skip, so some mutants go unseen',
              file=sys.stderr)

    modules = sorted(set(x for m in chosen for x in m.modules))
    print('baseline: %s ...' % ' '.join(short(x) for x in modules), flush=True)
    started = time.monotonic()
    baseline, problem = run_copy(snapshot, None, modules)
    if baseline is None:
        print('baseline run failed: %s' % problem, file=sys.stderr)
        return 2
    broken = sorted(t for t, o in baseline.items() if o in ('FAIL', 'ERROR'))
    print('baseline: %d tests, %d failing already (ignored), %d skipped (%.0f s)'
          % (len(baseline), len(broken), sum(o == 'skip' for o in baseline.values()),
             time.monotonic() - started))
    for test in broken:
        print('  already failing: %s' % short(test))

    def one(mutation):
        t = time.monotonic()
        outcomes, why = run_copy(snapshot, mutation, mutation.modules)
        caught, catchers = judge(mutation, baseline, outcomes, why)
        return mutation, caught, catchers, time.monotonic() - t

    results = []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for mutation, caught, catchers, seconds in pool.map(one, chosen):
            results.append((mutation, caught))
            print('%-6s %-28s %s (%.0f s)' % ('caught' if caught else 'MISSED', mutation.id,
                                              mutation.description, seconds), flush=True)
            for test in catchers[:8]:
                print('         by %s' % short(test))
            if len(catchers) > 8:
                print('         and %d more' % (len(catchers) - 8))
    caught = sum(1 for _, c in results if c)
    print('%d of %d mutations caught' % (caught, len(results)))
    missed = [m.id for m, c in results if not c]
    if missed:
        print('missed: %s' % ', '.join(missed))
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
