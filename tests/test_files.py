"""The file-safety layer on hostile image trees: nothing outside --root is changed
through a symbolic link (at plan time or swapped in before the action), '/.' and
'//' are this machine's root for every guard, FIFOs, devices and huge sparse files
are refused in one line without hanging or exhausting memory, the media is mounted
nodev,nosuid,noexec, and --deprovision decides everything before removing anything."""

import io
import json
import os
import resource
import shutil
import stat
import sys
import tempfile
import unittest
import unittest.mock

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import SCRIPT, is_root, root_with_kvp_pool, run_command, skip
from tests.test_identity import Capture, VM_A, listing, provisioned_tree, write
from tests.test_media import in_child

QUICK = 20          # seconds: a hang is a failure, not a wait
MEMORY = 512 << 20  # bytes of address space a run may have: a read without limit dies


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run_limited(args):
    """The script with `args`, its memory bounded, under QUICK seconds."""
    command = ['prlimit', '--as=%d' % MEMORY, sys.executable, '-I', SCRIPT] + list(args)
    return run_command(command, timeout=QUICK)


def assert_one_line_error(test, run, *expected):
    test.assertNotIn('Traceback', run.stderr, run)
    test.assertNotIn('internal error', run.stderr, run)
    test.assertNotIn('MemoryError', run.stderr + run.stdout, run)
    errors = [l for l in run.stderr.splitlines() if ' error: ' in l]
    test.assertEqual(len(errors), 1, run)
    for text in expected:
        test.assertIn(text, errors[0], run)


class Base(unittest.TestCase):
    def setUp(self):
        self.base = tempfile.mkdtemp(prefix='azp-files-')
        self.addCleanup(shutil.rmtree, self.base)
        self.root = provisioned_tree(os.path.join(self.base, 'image'))
        self.outside = os.path.join(self.base, 'outside')
        os.makedirs(self.outside)

    def move_out(self, directory):
        """root/directory moved outside the root, an absolute link left in its place."""
        target = os.path.join(self.outside, directory.replace('/', '_'))
        shutil.move(os.path.join(self.root, directory), target)
        os.symlink(target, os.path.join(self.root, directory))
        return target


class NothingOutsideTheRoot(Base):
    """Defect 3: every change acts inside the root, whatever links the tree holds."""

    def deprovision(self, *args):
        return run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root]
                           + list(args))

    def test_etc_systemd_and_sudoers_linked_outside(self):
        # passwd without alice: no userdel, but her sudo rule is still to go
        write(os.path.join(self.root, 'etc/passwd'), b'root:x:0:0:root:/root:/bin/sh\n')
        for directory in ('etc/systemd', 'etc/sudoers.d'):
            with self.subTest(directory=directory):
                self.setUp()
                write(os.path.join(self.root, 'etc/passwd'), b'root:x:0:0:root:/root:/bin/sh\n')
                self.move_out(directory)
                before = listing(self.outside)
                run = self.deprovision('--user')
                self.assertEqual(listing(self.outside), before, run)
                self.assertNotIn('Traceback', run.stderr)

    def test_etc_linked_outside(self):
        self.move_out('etc')
        before = listing(self.outside)
        run = self.deprovision('--user')
        self.assertEqual(listing(self.outside), before, run)
        self.assertNotIn('Traceback', run.stderr)

    def test_absolute_links_are_resolved_inside_the_root(self):
        # an image's /etc/ssh -> /etc/ssh.real is the image's, not this machine's
        os.rename(os.path.join(self.root, 'etc/ssh'), os.path.join(self.root, 'etc/ssh.real'))
        os.symlink('/etc/ssh.real', os.path.join(self.root, 'etc/ssh'))
        run = self.deprovision()
        self.assertEqual(run.code, 0, run)
        self.assertEqual(sorted(n for n in os.listdir(os.path.join(self.root, 'etc/ssh.real'))
                                if n.startswith('ssh_host_')), [])
        self.assertIn('remove /etc/ssh/ssh_host_rsa_key (', run.stdout)


class SwappedBeforeTheAction(Base):
    """Defect 16: a directory swapped for a link between the plan and the action."""

    def test_swap_after_the_plan(self):
        system = ap.System(self.root, ap.Deadline(60), Capture())
        plan = ap.deprovision_plan(system, True)
        self.assertTrue(plan)
        # each directory the plan acts in becomes a link to an outside copy
        for directory in ('etc/ssh', 'var/lib/dhcp', 'var/lib/hyperv', 'etc/sudoers.d',
                          'var/lib/azure-provisioning', 'etc'):
            target = os.path.join(self.outside, directory.replace('/', '_'))
            shutil.copytree(os.path.join(self.root, directory), target, symlinks=True)
            shutil.rmtree(os.path.join(self.root, directory))
            os.symlink(target, os.path.join(self.root, directory))
        before = listing(self.outside)
        done = 0
        for action in plan:
            if 'userdel' in action.says:
                continue
            try:
                ap.carry_out(action, False, io.StringIO())
                done += 1
            except OSError:
                pass    # an action that finds no file of its own fails: never acts outside
        self.assertEqual(listing(self.outside), before)
        self.assertGreater(done, 0)     # the link to the unit, made inside the root


class MachineRoot(unittest.TestCase):
    """Defect 4: '/.', '//' and '/./' are this machine's root for every guard."""

    def test_spellings_of_slash(self):
        for spelling in ('/', '/.', '//', '/./', '///', '/../'):
            self.assertEqual(ap.Root(spelling).top, '/', spelling)

    def test_deprovision_guards(self):
        for spelling in ('/.', '//', '/./'):
            with self.subTest(root=spelling):
                planned = []
                log = Capture()
                # as root (whoever runs the tests): the guard after "run it as root"
                with unittest.mock.patch.object(ap, 'running_on_a_vm', lambda: False), \
                        unittest.mock.patch.object(os, 'geteuid', lambda: 0), \
                        unittest.mock.patch.object(ap, 'deprovision_plan',
                                                   lambda *a: planned.append(a) or []):
                    code = ap.deprovision(ap.Options(root=spelling), log, io.StringIO())
                self.assertEqual((code, planned), (1, []))
                self.assertIn('this machine is no VM', log.text)
                with unittest.mock.patch.object(os, 'geteuid', lambda: 1000), \
                        unittest.mock.patch.object(ap, 'deprovision_plan',
                                                   lambda *a: planned.append(a) or []):
                    code = ap.deprovision(ap.Options(root=spelling), log, io.StringIO())
                self.assertEqual((code, planned), (1, []))
                self.assertIn('run it as root', log.text)


def fifo(path):
    if os.path.lexists(path):
        os.remove(path)
    elif not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    os.mkfifo(path)


class NoHangNoExhaustion(Base):
    """Defects 5 and 9: FIFOs, devices, links to /dev/zero and sparse giants in the tree."""

    FILES = ('var/lib/azure-provisioning/state.json', 'etc/machine-id', 'etc/hostname',
             'etc/hosts', 'etc/default/grub')
    MODES = (('--status',), ('--check',), ('--deprovision', '--dry-run'))
    READ = {'--status': FILES[:1], '--check': FILES[1:], '--deprovision': FILES[:2]}

    def test_fifos(self):
        for name in self.FILES:
            for mode in self.MODES:
                with self.subTest(file=name, mode=mode):
                    self.setUp()
                    fifo(os.path.join(self.root, name))
                    run = run_limited(list(mode) + ['--root', self.root])
                    self.assertLess(run.seconds, QUICK)
                    self.assertNotIn('Traceback', run.stderr, run)
                    self.assertNotIn('internal error', run.stderr, run)
                    if name in self.READ[mode[0]] and mode[0] == '--check':
                        self.assertIn('warn  /%s: unreadable (not a regular file): not checked' % name,
                                      run.stdout, run)
                    elif name in self.READ[mode[0]]:
                        self.assertEqual(run.code, 1, run)
                        assert_one_line_error(self, run, 'not a regular file')
                    else:
                        self.assertNotIn('not a regular file', run.stdout + run.stderr, run)

    def test_a_device_and_links_to_dev_zero(self):
        if not is_root():
            skip(self, 'mknod needs root')
        for name in ('var/lib/azure-provisioning/state.json', 'etc/machine-id'):
            for kind in ('device', 'link'):
                with self.subTest(file=name, kind=kind):
                    self.setUp()
                    path = os.path.join(self.root, name)
                    os.remove(path)
                    if kind == 'device':
                        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's
                    else:
                        os.symlink('/dev/zero', path)   # /dev/zero of the image: none here
                        os.makedirs(os.path.join(self.root, 'dev'), exist_ok=True)
                        os.mknod(os.path.join(self.root, 'dev/zero'), stat.S_IFCHR | 0o666,
                                 os.makedev(1, 5))
                    for mode in self.MODES:
                        run = run_limited(list(mode) + ['--root', self.root])
                        self.assertNotIn('Traceback', run.stderr, run)
                        self.assertNotIn('MemoryError', run.stdout + run.stderr, run)
                        self.assertNotIn('internal error', run.stderr, run)
                        if name in self.READ[mode[0]] and mode[0] == '--check':
                            self.assertIn('/%s: unreadable (not a regular file)' % name, run.stdout, run)
                        elif name in self.READ[mode[0]]:
                            assert_one_line_error(self, run, 'not a regular file')

    def test_a_sparse_8_gib_record(self):
        path = os.path.join(self.root, 'var/lib/azure-provisioning/state.json')
        with open(path, 'r+b') as f:
            f.truncate(8 << 30)
        for mode in self.MODES:
            with self.subTest(mode=mode):
                run = run_limited(list(mode) + ['--root', self.root])
                self.assertLess(run.seconds, QUICK)
                self.assertNotIn('Traceback', run.stderr, run)
                self.assertNotIn('MemoryError', run.stdout + run.stderr, run)
                self.assertNotIn('internal error', run.stderr, run)
                if mode[0] == '--status':
                    self.assertEqual(run.code, 1, run)
                    self.assertIn('record corrupt: %s is larger than %d bytes'
                                  % (ap.STATE_FILE, ap.STATE_MAX), run.stdout, run)

    def test_provisioning_with_a_fifo_record_reports_ready(self):
        # the record is read before the host keys and after Ready: neither may block
        root, _ = root_with_kvp_pool(self, 'azp-files-record-')
        fifo(os.path.join(root, 'var/lib/azure-provisioning/state.json'))
        with FakeAzure(computer_name='web-7', vm_id=VM_A) as az:
            options = ap.Options(wireserver=ap.parse_address(az.wireserver_addr),
                                 imds=ap.parse_address(az.imds_addr), timeout=QUICK,
                                 set_hostname=False, publish_hostname=False, root=root,
                                 media='none')
            code = in_child(lambda: ap.provision(options, Capture(), io.StringIO()),
                            seconds=QUICK + 5)
            self.assertEqual(code, 0)
            self.assertTrue(az.ready_accepted())
        with open(os.path.join(root, 'var/lib/azure-provisioning/state.json')) as f:
            self.assertEqual(json.load(f)['result'], 'provisioned')

    def test_read_state_of_a_fifo_is_none_at_once(self):
        # provisioning (write_state after Ready, plan_identity) reads the record so
        fifo(os.path.join(self.root, 'var/lib/azure-provisioning/state.json'))
        run = run_command([sys.executable, '-I', '-c', 'import sys; sys.path[:0] = [%r]; '
                           'import azure_provisioning as ap; print(ap.read_state(ap.Root(%r)))'
                           % (os.path.dirname(SCRIPT), self.root)], timeout=QUICK)
        self.assertEqual((run.code, run.stdout), (0, 'None\n'), run)


class ReadInPieces(Base):
    """Root.pieces, what --check reads an initramfs with: the same refusals as
    Root.read, before a byte is read, and inside the root."""

    def test_pieces_are_the_file_and_refusals_come_first(self):
        root = ap.Root(self.root)
        data = os.urandom(200000)
        with open(os.path.join(self.root, 'boot-image'), 'wb') as f:
            f.write(data)
        os.symlink('/boot-image', os.path.join(self.root, 'etc/linked'))   # the image's /
        pieces = list(root.pieces('/etc/linked', 1 << 20))
        self.assertEqual(b''.join(pieces), data)
        self.assertLessEqual(max(len(p) for p in pieces), 1 << 16)
        with self.assertRaises(OSError):
            root.pieces('/boot-image', len(data) - 1)       # too large: refused at once
        fifo(os.path.join(self.root, 'etc/fifo'))
        with self.assertRaises(OSError):
            root.pieces('/etc/fifo', 1 << 20)
        self.assertIsNone(root.pieces('/etc/missing', 1 << 20))
        # a directory is no file, whatever its size says
        self.assertIsNone(root.read('/etc', limit=10))
        self.assertIsNone(root.pieces('/etc', 10))


class DecidedBeforeRemoving(Base):
    """Defect 10: a target that cannot be removed is found before anything is."""

    def test_a_directory_where_the_pool_should_be(self):
        pool = os.path.join(self.root, 'var/lib/hyperv/.kvp_pool_1')
        os.remove(pool)
        os.mkdir(pool)
        write(os.path.join(pool, 'inside'), b'x')
        before = listing(self.root)
        dry = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--dry-run',
                           '--root', self.root])
        self.assertEqual(dry.code, 1, dry)
        assert_one_line_error(self, dry, '/var/lib/hyperv/.kvp_pool_1', 'not a file')
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root])
        self.assertEqual(run.code, 1, run)
        assert_one_line_error(self, run, '/var/lib/hyperv/.kvp_pool_1', 'not a file')
        self.assertEqual(listing(self.root), before, run)
        self.assertEqual(run.stdout, '')


if __name__ == '__main__':
    unittest.main()
