"""A second outside attack on the file-safety layer (issue 20, after the Root
walk landed): what it still does on hostile image trees.  Each test fails while
the defect it names is there."""

import io
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import azure_provisioning as ap
from tests.support import SCRIPT, is_root, run_command, skip
from tests.test_files import Base, assert_one_line_error, run_limited
from tests.test_identity import Capture, listing, write


def read_only_run(directory, args):
    """The script run with `args` where `directory` is a read-only bind mount of itself
    (a private mount namespace: nothing else sees it)."""
    return run_command(['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && '
                        'exec "$@"', 'sh', directory, sys.executable, '-I', SCRIPT] + args)


class DecidedBeforeRemovingTheUnitLink(Base):
    """The link that enables the unit is planned without asking whether it can be
    made: a file (or a dangling link) where multi-user.target.wants should be.  The
    dry run lists everything and exits 0; the run removes the host keys, the machine
    id and the record, then fails on the link, before userdel: the admin user, her
    home and her sudo rule stay, and a re-run no longer knows her."""

    def deprovision(self, *args):
        return run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root]
                           + list(args))

    def check(self, make):
        make(os.path.join(self.root, 'etc/systemd/system/multi-user.target.wants'))
        before = listing(self.root)
        dry = self.deprovision('--dry-run', '--user')
        run = self.deprovision('--user')
        # what the dry run says is what the run does: both refuse, or both succeed
        self.assertEqual(dry.code, run.code, (dry, run))
        if run.code != 0:
            assert_one_line_error(self, run, 'multi-user.target.wants')
            self.assertEqual(listing(self.root), before, run)   # nothing removed

    def test_a_file_where_the_wants_directory_should_be(self):
        self.check(lambda path: write(path, b'x'))

    def test_a_dangling_link_where_the_wants_directory_should_be(self):
        self.check(lambda path: os.symlink('/nonexistent/wants', path))


class DecidedBeforeRemovingOnAReadOnlyDirectory(Base):
    """Every action's precondition is checked at plan time, not only "is it a
    directory": a read-only directory (here a read-only bind mount of the KVP pools'
    directory, as an image mounted in parts can have) fails its removal with EROFS
    after the host keys and the machine id are gone.  Root and a mount namespace."""

    def test_a_read_only_pool_directory(self):
        if not is_root():
            skip(self, 'a read-only bind mount needs root')
        hyperv = os.path.join(self.root, 'var/lib/hyperv')
        before = listing(self.root)
        runs = [read_only_run(hyperv, ['--deprovision', '--root', self.root] + dry)
                for dry in (['--dry-run'], [])]
        dry, run = runs
        self.assertEqual((dry.code, run.code), (1, 1), runs)
        assert_one_line_error(self, run, '/var/lib/hyperv')
        self.assertEqual(listing(self.root), before, run)   # nothing removed

    def test_a_read_only_etc_for_userdel(self):
        # nothing else to change in /etc: only userdel would meet the read-only /etc,
        # after the leases, pools and data in /var were removed
        if not is_root():
            skip(self, 'a read-only bind mount needs root')
        etc = os.path.join(self.root, 'etc')
        for name in os.listdir(os.path.join(etc, 'ssh')):
            if name.startswith('ssh_host_'):
                os.remove(os.path.join(etc, 'ssh', name))
        os.remove(os.path.join(etc, 'sudoers.d/azure-provisioning'))
        write(os.path.join(etc, 'machine-id'), b'')
        os.makedirs(os.path.join(etc, 'systemd/system/multi-user.target.wants'))
        os.symlink('/etc/systemd/system/' + ap.UNIT_NAME,
                   os.path.join(etc, 'systemd/system/multi-user.target.wants', ap.UNIT_NAME))
        before = listing(self.root)
        runs = [read_only_run(etc, ['--deprovision', '--user', '--root', self.root] + dry)
                for dry in (['--dry-run'], [])]
        dry, run = runs
        self.assertEqual((dry.code, run.code), (1, 1), runs)
        assert_one_line_error(self, run, '/etc')
        self.assertEqual(listing(self.root), before, run)   # nothing removed


class AListingThatFails(Base):
    """A directory that exists but cannot be listed (EMFILE, EIO, EACCES) is an
    error, not an empty directory: an empty list of host keys, leases or pools
    means "nothing to remove", and --deprovision said "deprovisioned" with the
    template's host keys still there."""

    def test_deprovision_stops_before_removing_anything(self):
        import errno
        import unittest.mock
        real = os.listdir

        def listdir(where='.'):
            if isinstance(where, int):      # Root.names lists an opened directory
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real(where)
        before = listing(self.root)
        log = Capture()
        with unittest.mock.patch.object(ap.os, 'listdir', listdir):
            code = ap.deprovision(ap.Options(root=self.root), log, io.StringIO())
        self.assertEqual(code, 1, log.text)
        self.assertIn('Too many open files', log.text)
        self.assertEqual(listing(self.root), before, log.text)


class FixesThatStayInTheRoot(Base):
    """--check's fix for waagent leftovers is a command line an admin pastes: it
    names the path as this machine's shell sees it, unresolved and unquoted."""

    def fix(self, root):
        run = run_command([sys.executable, '-I', SCRIPT, '--check', '--root', root])
        lines = run.stdout.splitlines()
        at = next(i for i, l in enumerate(lines) if 'waagent leftovers' in l)
        self.assertTrue(lines[at + 1].strip().startswith('fix: '), run)
        return lines[at + 1].strip()[len('fix: '):]

    def test_the_rm_fix_does_not_follow_an_absolute_link_of_the_image(self):
        # the image's /var is a link to its own /data/var; this machine has a
        # directory of that name too
        host = os.path.join(self.outside, 'data/var')
        write(os.path.join(host, 'lib/waagent/keep'), b'outside')
        shutil.rmtree(os.path.join(self.root, 'var'))
        os.symlink(host, os.path.join(self.root, 'var'))
        write(os.path.join(self.root, host.lstrip('/'), 'lib/waagent/waagent.log'), b'x')
        before = listing(self.outside)
        subprocess.check_call(['sh', '-c', self.fix(self.root)], cwd=self.base)
        self.assertEqual(listing(self.outside), before)
        self.assertFalse(os.path.exists(os.path.join(self.root, host.lstrip('/'), 'lib/waagent')))

    def test_the_rm_fix_quotes_the_root(self):
        root = os.path.join(self.base, 'my image')
        os.rename(self.root, root)
        write(os.path.join(root, 'etc/waagent.conf'), b'x')
        write(os.path.join(self.base, 'my/keep'), b'outside the root')
        subprocess.check_call(['sh', '-c', self.fix(root)], cwd=self.base)
        self.assertTrue(os.path.exists(os.path.join(self.base, 'my/keep')))
        self.assertFalse(os.path.exists(os.path.join(root, 'etc/waagent.conf')))


class DeepTree(Base):
    """A directory the walk reaches only through more levels than it may hold
    descriptors: the image's /etc/ssh is a link to d/d/.../d/ssh (1100 levels; the
    kernel follows it).  names() takes EMFILE for an empty directory, and
    --deprovision says "deprovisioned" with the template's host keys still there."""

    DEPTH = 1100

    def setUp(self):
        super().setUp()
        fd = os.open(os.path.join(self.root, 'etc'), os.O_RDONLY)
        for _ in range(self.DEPTH):
            os.mkdir('d', dir_fd=fd)
            deeper = os.open('d', os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        try:
            os.rename(os.path.join(self.root, 'etc/ssh'), 'ssh', dst_dir_fd=fd)
        finally:
            os.close(fd)
        os.symlink('d/' * self.DEPTH + 'ssh', os.path.join(self.root, 'etc/ssh'))
        # rmtree recurses once a level: the deep part goes with rm
        self.addCleanup(subprocess.call, ['rm', '-rf', os.path.join(self.root, 'etc/d')])

    def test_host_keys_behind_a_deep_link(self):
        keys = sorted(n for n in os.listdir(os.path.join(self.root, 'etc/ssh'))
                      if n.startswith('ssh_host_'))
        self.assertEqual(len(keys), 4)
        run = run_command(['prlimit', '--nofile=1024', sys.executable, '-I', SCRIPT,
                           '--deprovision', '--root', self.root])
        left = sorted(n for n in os.listdir(os.path.join(self.root, 'etc/ssh'))
                      if n.startswith('ssh_host_'))
        # removed, or a one-line error and exit 1: never "deprovisioned" with keys left
        if run.code == 0:
            self.assertEqual(left, [], run)
        else:
            assert_one_line_error(self, run, '/etc/ssh')


class MachineRootByAnotherPath(unittest.TestCase):
    """The guards compare resolved paths: a bind mount of this machine's / (as a
    container's /host is, or `mount --bind / /mnt/x`) resolves to itself, not to
    '/', and --deprovision --root there passes "this machine is no VM" and "run it
    as root"; its dry run lists this machine's /etc/machine-id.  Run in a mount
    namespace of its own, the plan stubbed: nothing is removed."""

    PROBE = (
        'import io, sys, unittest.mock as m; sys.path[:0] = [%r]\n'
        'import azure_provisioning as ap\n'
        'from tests.test_identity import Capture\n'
        'planned = []\n'
        'with m.patch.object(ap, "running_on_a_vm", lambda: False), '
        'm.patch.object(ap, "deprovision_plan", lambda *a: planned.append(a) or []):\n'
        '    code = ap.deprovision(ap.Options(root=%r), Capture(), io.StringIO())\n'
        'print(code, len(planned))\n')

    def test_a_bind_mount_of_slash(self):
        if not is_root():
            skip(self, 'a bind mount needs root')
        where = tempfile.mkdtemp(prefix='azp-bind-')
        self.addCleanup(os.rmdir, where)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        run = run_command(['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                           'mount --bind / "$1" && exec "$2" -I -c "$3"', 'sh', where,
                           sys.executable, self.PROBE % (repo, where)])
        self.assertEqual(run.stdout, '1 0\n', run)     # refused, nothing planned


class LeftOverTemporaryName(Base):
    """Root.write clears a left-over temporary file of its name (.NAME.PID.tmp, a
    power cut's) with unlink only: a directory of that name, which a hostile image
    can hold for the PIDs a run will have (1, 2... in a PID namespace), stops the
    write.  --deprovision's dry run exits 0; the run removes the host keys and then
    fails on /etc/machine-id, which keeps the template's id."""

    def test_a_directory_named_as_the_temporary_file(self):
        os.makedirs(os.path.join(self.root, 'etc/.machine-id.%d.tmp/x' % os.getpid()))
        before = listing(self.root)
        dry = ap.deprovision(ap.Options(root=self.root, dry_run=True), Capture(), io.StringIO())
        log = Capture()
        code = ap.deprovision(ap.Options(root=self.root), log, io.StringIO())
        # what the dry run says is what the run does: both refuse (nothing removed),
        # or the run empties the machine id like the rest
        self.assertEqual(dry, code, log.text)
        if code:
            self.assertEqual(listing(self.root), before, log.text)
        else:
            with open(os.path.join(self.root, 'etc/machine-id'), 'rb') as f:
                self.assertEqual(f.read(), b'')
        # a directory someone put there is never ours to remove
        self.assertTrue(os.path.isdir(os.path.join(
            self.root, 'etc/.machine-id.%d.tmp/x' % os.getpid())), log.text)

    def test_left_overs_of_a_power_cut_files_only(self):
        etc = os.path.join(self.root, 'etc')
        write(os.path.join(etc, '.machine-id.0123456789abcdef.tmp'), b'half')   # ours
        write(os.path.join(etc, '.machine-id.77.tmp'), b'half')     # an older version's
        os.makedirs(os.path.join(etc, '.machine-id.fedcba9876543210.tmp/x'))    # not ours
        os.symlink('/nowhere', os.path.join(etc, '.machine-id.abc.tmp'))       # not ours
        ap.Root(self.root).write('/etc/machine-id', b'')
        self.assertEqual(sorted(n for n in os.listdir(etc) if n.startswith('.machine-id')),
                         ['.machine-id.abc.tmp', '.machine-id.fedcba9876543210.tmp'])
        self.assertTrue(os.path.isdir(os.path.join(etc, '.machine-id.fedcba9876543210.tmp/x')))


class CheckAsAnotherUser(Base):
    """--check as a user who cannot enter /var/lib/azure-provisioning (0700, as
    write_private makes it on every VM, so in every captured image, deprovisioned or
    not): Root.stat raises PermissionError where a missing file is None, and
    check_identity's exists(STATE_FILE) ends the whole check in "internal error:
    PermissionError" (f03ace8 printed the check)."""

    def test_a_0700_data_directory(self):
        data = os.path.join(self.root, 'var/lib/azure-provisioning')
        if is_root():
            python = '/usr/bin/python3'     # one that uid 65534 may run (not under /root)
            if not os.access(python, os.X_OK) or not shutil.which('setpriv'):
                skip(self, 'needs /usr/bin/python3 and setpriv to run as uid 65534')
            os.chmod(self.base, 0o755)
            subprocess.check_call(['chmod', '-R', 'a+rX', self.base])
            script = os.path.join(self.base, 'azure_provisioning.py')
            shutil.copy(SCRIPT, script)
            os.chmod(script, 0o644)
            command = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups',
                       python, '-I', script]
        else:
            command = [sys.executable, '-I', SCRIPT]
        os.chmod(data, 0o700 if is_root() else 0)
        self.addCleanup(os.chmod, data, 0o700)
        run = run_command(command + ['--check', '--root', self.root])
        self.assertNotIn('internal error', run.stderr, run)
        self.assertNotIn('Traceback', run.stderr, run)
        self.assertIn('image NOT ready', run.stdout, run)      # the rest of the check printed


class CheckReadsEveryFileSafely(Base):
    """--check reads the kernels' modules.builtin through kernel_has_udf, which
    calls Root.read_text itself instead of Check.read: a FIFO, a device, a link to
    /dev/zero or a sparse 8 GiB file there ends the check in "internal error:
    OSError" (the read is refused in time, but the refusal is not caught)."""

    def test_modules_builtin_that_is_no_regular_file(self):
        path = os.path.join(self.root, 'lib/modules/6.1.0/modules.builtin')
        os.makedirs(os.path.dirname(path))
        for kind in ('fifo', 'sparse'):
            with self.subTest(kind=kind):
                if os.path.lexists(path):
                    os.remove(path)
                if kind == 'fifo':
                    os.mkfifo(path)
                else:
                    with open(path, 'wb') as f:
                        f.truncate(8 << 30)
                run = run_limited(['--check', '--root', self.root])
                self.assertNotIn('internal error', run.stderr, run)
                self.assertIn('/lib/modules/6.1.0/modules.builtin: ', run.stdout, run)


if __name__ == '__main__':
    unittest.main()
