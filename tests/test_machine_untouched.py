"""The suite never writes outside its temporary directories and namespaces: every
process a test starts sees a private, empty /var/lib (the product's record and the
KVP pool live there) and, as root, a read-only /etc; and the whole suite, run with a
/var/lib and an /etc of its own bound over the machine's, leaves both as it found
them (tests/untouched.py compares them)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

from tests import untouched
from tests.fake_azure import FakeAzure
from tests.support import REPO, SCRIPT, TemporaryRoot, is_root, require_root, run_command, skip

INNER = 'AZP_SUITE_UNDER_GUARD'
# what a process started by a test sees of /var/lib and /etc
PROBE = ('import json, os; s = os.stat("/var/lib"); print(json.dumps([s.st_dev, s.st_ino, '
         'sorted(os.listdir("/var/lib")), os.access("/etc", os.W_OK)]))')


class EveryProcessIsShielded(unittest.TestCase):
    """run_command (and so run_provisioner) gives each process a private /var/lib,
    whoever runs the suite, whether or not the machine has a /var/lib/hyperv; a run
    on a temporary root (TemporaryRoot) keeps this machine's hostname."""

    def probe(self):
        run = run_command([sys.executable, '-c', PROBE])
        self.assertEqual(run.code, 0, run)
        return json.loads(run.stdout)

    def assert_private(self, seen):
        here = os.stat('/var/lib')
        self.assertNotEqual(seen[:2], [here.st_dev, here.st_ino],
                            'a test process sees the machine\'s /var/lib')
        self.assertEqual(seen[2], [], 'its /var/lib is not empty')
        self.assertFalse(seen[3], 'a test process can write the machine\'s /etc')

    def test_a_test_process_has_a_private_var_lib_and_cannot_write_etc(self):
        self.assert_private(self.probe())

    def test_also_when_the_suite_runs_as_an_ordinary_user(self):
        if not is_root():
            skip(self, 'this run is an ordinary user\'s: the test above is that case')
        setpriv, python = shutil.which('setpriv'), '/usr/bin/python3'
        if not setpriv or not os.access(python, os.X_OK):
            skip(self, 'no setpriv or no %s to run the suite\'s helper as nobody' % python)
        # nobody imports tests.support from this clone and starts a process with it;
        # started directly: under run_command's own shield the probe would see a private
        # /var/lib whatever tests.support did.  As nobody it can change nothing of ours.
        nobody = [setpriv, '--reuid=65534', '--regid=65534', '--clear-groups', 'env',
                     'HOME=/nonexistent', python, '-c']
        prelude = 'import sys; sys.path.insert(0, %r); sys.dont_write_bytecode = True; ' % REPO
        if self.as_nobody(nobody + [prelude + 'import tests.support']).returncode != 0:
            skip(self, 'nobody cannot read this clone (%s)' % REPO)
        run = self.as_nobody(nobody + [
            prelude + 'from tests.support import run_command; run = run_command([sys.executable, '
            '"-c", %r]); sys.stdout.write(run.stdout + run.stderr); sys.exit(run.code)' % PROBE])
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assert_private(json.loads(run.stdout))

    def test_a_run_on_a_temporary_root_never_renames_this_machine(self):
        # IMDS names the VM otherwise: as root the run renames its own UTS namespace
        # only; an ordinary user's may not rename at all (the step fails)
        name = socket.gethostname()
        host = TemporaryRoot('image-template')
        self.addCleanup(host.cleanup)
        with FakeAzure(computer_name='azp-other-7') as az:
            run = host.run('--wireserver', az.wireserver_addr, '--imds', az.imds_addr,
                           '--timeout', '20')
        self.assertEqual(socket.gethostname(), name)
        if is_root():
            self.assertEqual((run.code, run.hostname_after), (0, 'azp-other-7'), run)
            self.assertIn("not published to DHCP (not the system's UTS namespace)", run.stderr)
        else:
            self.assertEqual((run.code, run.hostname_after), (1, name), run)
            self.assertIn('cannot set hostname azp-other-7', run.stderr)

    @staticmethod
    def as_nobody(argv):
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd='/',
                              universal_newlines=True, timeout=60)


# Runs argv with private directories bound over /var/lib ($0) and /etc ($1).
GUARD = 'mount --bind "$0" /var/lib && mount --bind "$1" /etc && shift && exec "$@"'


class SuiteLeavesVarLibAndEtcAlone(unittest.TestCase):
    """The suite as a whole (also what its test processes do in-process) on a machine
    that looks like an Azure VM (a /var/lib/hyperv the host reads): the /var/lib and
    /etc it is given are, entry for entry, as they were."""

    def setUp(self):
        if os.environ.get(INNER):
            skip(self, 'already running under the guard')
        require_root(self)
        self.dir = tempfile.mkdtemp(prefix='azp-guard-')
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.var_lib = os.path.join(self.dir, 'var-lib')
        self.hyperv = os.path.join(self.var_lib, 'hyperv')
        os.makedirs(self.hyperv)
        self.etc = os.path.join(self.dir, 'etc')
        shutil.copytree('/etc', self.etc, symlinks=True)
        self.before = untouched.snapshot([self.var_lib, self.etc])

    def under_guard(self, argv, timeout):
        return run_command(['unshare', '--mount', 'sh', '-c', GUARD, self.var_lib, self.etc]
                           + argv, env=dict(os.environ, **{INNER: '1'}), timeout=timeout)

    def changes(self):
        return untouched.differences(self.before, untouched.snapshot([self.var_lib, self.etc]))

    def test_the_guard_sees_a_write(self):
        # control: an unshielded run does write the pool and the record, and a write
        # into /etc is seen, so no difference below means the suite was shielded, not
        # that the guard was blind
        with FakeAzure(computer_name='web-7') as az:
            code = ('import subprocess, sys; open("/etc/azp-guard-control", "w").close(); '
                    'sys.exit(subprocess.call([sys.executable, "-I", "%s", "--no-hostname", '
                    '"--wireserver", "%s", "--imds", "%s"]))'
                    % (SCRIPT, az.wireserver_addr, az.imds_addr))
            run = self.under_guard([sys.executable, '-c', code], timeout=60)
        self.assertEqual(run.code, 0, run)
        added = [line.split()[1] for line in self.changes() if line.startswith('added')]
        for path in (self.hyperv + '/.kvp_pool_1', self.var_lib + '/azure-provisioning/state.json',
                     self.etc + '/azp-guard-control'):
            self.assertIn(path, added)

    def test_the_whole_suite_leaves_var_lib_and_etc_alone(self):
        run = self.under_guard([sys.executable, '-m', 'unittest', 'discover', '-s',
                                os.path.join(REPO, 'tests'), '-t', REPO], timeout=1200)
        self.assertEqual(run.code, 0, run.stderr[-3000:])
        self.assertEqual(self.changes(), [], 'the suite changed /var/lib or /etc (here its '
                         'copies %s, %s):\n%s' % (self.var_lib, self.etc, run.stderr[-3000:]))


if __name__ == '__main__':
    unittest.main()
