"""Tests of `fake_azure.py boot` (tests/boot_kit.py) without a real boot.

QEMU is played by tests/boot/fake-qemu (given with the hidden --qemu option): it
reads the command line the kit built and acts as a guest would -- writes the serial
console and the packet capture, asks the emulator over the forwarded ports, writes
the disk -- so the kit's argument handling, overlay, verdicts and diagnoses run for
real in a few seconds each.  Needs qemu-img (qemu-utils), genisoimage and OpenBSD's
nc; a test that cannot run without them is skipped with the reason."""

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

from tests import boot_kit
from tests.support import skip

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_QEMU = os.path.join(HERE, 'boot', 'fake-qemu')
SCRIPT = os.path.join(HERE, 'fake_azure.py')
VM_ID = '7c1e4b52-93d0-4f6a-b1c2-5a3d9e8f0a11'
GEN1_UUID = '524b1e7c-d093-6a4f-b1c2-5a3d9e8f0a11'   # its first three fields byte-swapped
PASSWORD = 'pw<&>"\'$;S3cret'
USERSPACE = ('[    0.000000] Linux version 6.1.0-28-amd64\n'
             '[    2.100000] Run /init as init process\n'
             '[    4.500000] systemd[1]: systemd 252.33-1~deb12u1 running in system mode\n'
             'Welcome to Debian GNU/Linux 12 (bookworm)!\n')


def bootable_disk(path, size=2 * 1024 * 1024):
    """A raw disk whose MBR has boot code and the 55 AA signature (all the kit
    checks before it boots)."""
    with open(path, 'wb') as f:
        f.truncate(size)
        f.seek(0)
        f.write(b'\xeb\x63\x90' + b'\x01' * 437)
        f.seek(510)
        f.write(b'\x55\xaa')
    return path


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def missing_tools():
    missing = [t for t in ('qemu-img', 'qemu-io', 'genisoimage', 'timeout')
               if not shutil.which(t)]
    if not boot_kit.bt.openbsd_nc():
        missing.append("OpenBSD's nc")
    return missing


class KitCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='test-kit-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.image = bootable_disk(os.path.join(self.tmp, 'disk.raw'))
        self.argv_file = os.path.join(self.tmp, 'argv.json')

    def need_tools(self):
        missing = missing_tools()
        if missing:
            skip(self, 'needs %s' % ', '.join(missing))

    def kit(self, play=(), *args, **kw):
        """Run the kit in this process with fake-qemu playing `play`; returns
        (exit status, stdout, stderr)."""
        image = kw.get('image', self.image)
        env = {'AZP_FAKE_QEMU_PLAY': json.dumps(list(play)),
               'AZP_FAKE_QEMU_ARGV': self.argv_file}
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = boot_kit.main([image, '--qemu', FAKE_QEMU, '--accel', 'tcg']
                                 + list(args))
        kept = self.kept_dir(out.getvalue(), required=False)
        if kept:
            self.addCleanup(shutil.rmtree, kept, True)
        return code, out.getvalue(), err.getvalue()

    def qemu_argv(self):
        with open(self.argv_file) as f:
            return json.load(f)

    def option_values(self, name):
        argv = self.qemu_argv()
        return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]

    def kept_dir(self, out, required=True):
        for line in out.splitlines():
            if line.startswith('boot: kept '):
                return line.split()[2]
        if required:
            self.fail('no kept work directory in:\n' + out)
        return None


class ArgumentTest(KitCase):
    """Errors a user meets: one line on stderr with the fix, exit 2."""

    def one_line_error(self, code, err, *words):
        self.assertEqual(code, 2, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertNotIn('Traceback', err)
        for word in words:
            self.assertIn(word, err)

    def test_no_image_argument_is_a_usage_error(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            boot_kit.main([])
        self.assertEqual(cm.exception.code, 2)
        self.assertIn('IMAGE', err.getvalue())

    def test_missing_image(self):
        code, _, err = self.kit((), image=os.path.join(self.tmp, 'nope.raw'))
        self.one_line_error(code, err, 'nope.raw: no such file')

    def test_qemu_missing_names_the_package(self):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = boot_kit.main([self.image, '--qemu', os.path.join(self.tmp, 'no-qemu')])
        self.one_line_error(code, err.getvalue(), 'not found', 'apt-get install qemu-system-x86')

    def test_ovmf_missing_names_the_package(self):
        self.need_tools()
        absent = ((os.path.join(self.tmp, 'CODE.fd'), os.path.join(self.tmp, 'VARS.fd')),)
        with mock.patch.object(boot_kit, 'OVMF_PAIRS', absent):
            code, _, err = self.kit((), '--uefi')
        self.one_line_error(code, err, 'OVMF not found', 'apt-get install ovmf')

    def test_a_compressed_image_says_how_to_unpack_it(self):
        packed = os.path.join(self.tmp, 'disk.raw.gz')
        with open(self.image, 'rb') as src, gzip.open(packed, 'wb') as dst:
            dst.write(src.read())
        code, _, err = self.kit((), image=packed)
        self.one_line_error(code, err, 'gzip-compressed', 'gunzip -k')

    def mib_with(self, name, offset, data):
        """A 1 MiB file of zeros but for `data` at `offset`."""
        path = os.path.join(self.tmp, name)
        with open(path, 'wb') as f:
            f.truncate(1024 * 1024)
            f.seek(offset)
            f.write(data)
        return path

    def test_a_filesystem_image_is_not_a_bootable_disk(self):
        self.need_tools()
        fs = self.mib_with('root.ext4', 1080, b'\x53\xef')     # ext4's magic
        code, _, err = self.kit((), image=fs)
        self.one_line_error(code, err, 'not bootable', 'ext2/3/4 file system',
                            'partition table')

    def test_an_mbr_without_boot_code(self):
        self.need_tools()
        blank = self.mib_with('blank.raw', 510, b'\x55\xaa')    # an MBR's signature
        code, _, err = self.kit((), image=blank)
        self.one_line_error(code, err, 'no boot code', 'grub-install --target=i386-pc')
        code, _, err = self.kit((), '--uefi', image=blank)
        self.one_line_error(code, err, 'GPT', 'without --uefi')

    def test_a_password_on_the_command_line_is_refused_without_echo(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            boot_kit.main([self.image, '--password', 'Hunter2-secret'])
        self.assertEqual(cm.exception.code, 2)
        self.assertIn('--password-file', err.getvalue())
        self.assertNotIn('Hunter2-secret', err.getvalue())

    def test_ssh_needs_the_private_half_of_the_given_key(self):
        self.need_tools()
        pub = os.path.join(self.tmp, 'key.pub')
        with open(pub, 'w') as f:
            f.write('ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake user@host\n')
        code, _, err = self.kit((), '--ssh-key', pub, '--ssh')
        self.one_line_error(code, err, 'private key', 'key.pub')

    def test_the_command_is_reached_through_fake_azure_py(self):
        proc = subprocess.Popen([sys.executable, SCRIPT, 'boot',
                                 os.path.join(self.tmp, 'nope.raw')],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(err.strip(), 'fake_azure.py boot: %s: no such file'
                         % os.path.join(self.tmp, 'nope.raw'))


class OverlayTest(KitCase):
    """The guest writes its disk; the image keeps every byte."""

    def setUp(self):
        super(OverlayTest, self).setUp()
        self.need_tools()

    def test_guest_writes_land_in_the_overlay_never_in_the_image(self):
        before, mtime = sha256(self.image), os.stat(self.image).st_mtime
        code, out, err = self.kit([['write-disk'], ['health', 'Ready']], '--keep')
        self.assertEqual(code, 0, out + err)
        self.assertEqual(sha256(self.image), before)
        self.assertEqual(os.stat(self.image).st_mtime, mtime)
        disks = [d for d in self.option_values('-drive') if 'if=virtio' in d]
        self.assertEqual(len(disks), 1)
        self.assertIn('format=qcow2', disks[0])
        self.assertNotIn(self.image, ' '.join(self.qemu_argv()))
        overlay = os.path.join(self.kept_dir(out), 'overlay.qcow2')
        self.assertIn('file=%s,' % overlay, disks[0])
        # the guest's 1 MiB of 0x5a is there, read through the overlay
        check = subprocess.Popen(['qemu-io', '-f', 'qcow2', '-c', 'read -P 0x5a 0 1M',
                                  overlay], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 universal_newlines=True)
        text = check.communicate(timeout=60)[0]
        self.assertEqual(check.returncode, 0, text)
        self.assertNotIn('Pattern verification failed', text)

    def test_each_format_is_read_by_its_driver(self):
        for fmt, options, driver in (('qcow2', [], 'qcow2'),
                                     ('vpc', ['-o', 'subformat=fixed'], 'vpc'),
                                     ('vpc', ['-o', 'subformat=dynamic'], 'vpc'),
                                     ('vhdx', [], 'vhdx')):
            converted = os.path.join(self.tmp, 'disk-%s-%d' % (fmt, len(options)))
            subprocess.check_call(['qemu-img', 'convert', '-f', 'raw', '-O', fmt] + options
                                  + [self.image, converted])
            before = sha256(converted)
            with self.subTest(fmt=fmt, options=options):
                self.assertEqual(boot_kit.image_format(converted), driver)
                code, out, err = self.kit([['write-disk'], ['health', 'Ready']],
                                          image=converted)
                self.assertEqual(code, 0, out + err)
                self.assertEqual(sha256(converted), before)


class VmShapeTest(KitCase):
    """What QEMU is told: an Azure-looking VM on a closed network."""

    def setUp(self):
        super(VmShapeTest, self).setUp()
        self.need_tools()

    def test_gen1_smbios_network_and_media(self):
        imds_doc = os.path.join(self.tmp, 'imds.json')
        media = os.path.join(self.tmp, 'media.iso')
        password = os.path.join(self.tmp, 'password')
        with open(password, 'w') as f:
            f.write(PASSWORD + '\n')
        goal_state_doc = os.path.join(self.tmp, 'goalstate.xml')
        code, out, err = self.kit(
            [['copy', 'media', media], ['imds', imds_doc], ['goalstate', goal_state_doc],
             ['health', 'Ready']],
            '--vm-id', VM_ID, '--computer-name', 'web-42', '--admin-username', 'alice',
            '--password-file', password)
        self.assertEqual(code, 0, out + err)
        argv = self.qemu_argv()
        self.assertIn('type=1,manufacturer=Microsoft Corporation,product=Virtual Machine',
                      self.option_values('-smbios'))
        self.assertIn('type=3,manufacturer=Microsoft Corporation,'
                      'asset=7783-7084-3265-9085-8269-3286-77', self.option_values('-smbios'))
        self.assertEqual(self.option_values('-uuid'), [GEN1_UUID])
        self.assertEqual(self.option_values('-accel'), ['tcg'])
        self.assertNotIn('pflash', ' '.join(argv))
        netdev = self.option_values('-netdev')
        self.assertEqual(len(netdev), 1)
        self.assertIn('restrict=on', netdev[0])
        # the WireServer, IMDS and the HostGAPlugin, each to the emulator on loopback
        forwards = re.findall(r'guestfwd=tcp:([0-9.]+):(\d+)-cmd:nc 127\.0\.0\.1 (\d+)',
                              netdev[0])
        self.assertEqual(netdev[0].count('guestfwd='), 3)
        self.assertEqual(sorted((ip, port) for ip, port, _ in forwards),
                         [('168.63.129.16', '32526'), ('168.63.129.16', '80'),
                          ('169.254.169.254', '80')])
        local = dict(((ip, port), port_here) for ip, port, port_here in forwards)
        self.assertEqual(local[('168.63.129.16', '32526')], local[('168.63.129.16', '80')])
        self.assertNotIn('hostfwd', netdev[0])
        for text in (out, err, ' '.join(argv)):
            self.assertNotIn(PASSWORD, text)
        # the media and IMDS tell the same story
        with open(imds_doc) as f:
            compute = json.load(f)['compute']
        self.assertEqual(compute['vmId'], VM_ID)
        self.assertEqual(compute['osProfile']['computerName'], 'web-42')
        self.assertEqual(compute['osProfile']['adminUsername'], 'alice')
        self.assertEqual(compute['osProfile']['disablePasswordAuthentication'], 'false')
        # the goal state's URLs name the WireServer as the guest reaches it
        with open(goal_state_doc) as f:
            goal = f.read()
        self.assertIn('<HostingEnvironmentConfig>http://168.63.129.16:80/machine/', goal)
        self.assertNotIn('127.0.0.1', goal)
        with open(imds_doc) as f:
            nic = json.load(f)['network']['interface'][0]
        self.assertEqual(nic['macAddress'], '525400A20001')     # QEMU's NIC, -device mac=
        self.assertIn('mac=52:54:00:a2:00:01', ' '.join(self.option_values('-device')))
        self.assertEqual(nic['ipv4']['ipAddress'][0]['privateIpAddress'], '168.0.0.15')
        if not shutil.which('isoinfo'):
            skip(self, 'needs isoinfo (genisoimage) to read the media back')
        ovf = subprocess.check_output(['isoinfo', '-i', media, '-R', '-x', '/ovf-env.xml'],
                                      universal_newlines=True)
        self.assertIn('<HostName>web-42</HostName>', ovf)
        self.assertIn('<UserName>alice</UserName>', ovf)
        self.assertIn('<DisableSshPasswordAuthentication>false<', ovf)
        self.assertIn('<UserPassword>pw&lt;&amp;&gt;"\'$;S3cret</UserPassword>', ovf)
        key = compute['publicKeys'][0]['keyData'].strip()
        self.assertIn('<Value>%s</Value>' % key, ovf)
        self.assertEqual(compute['publicKeys'][0]['path'], '/home/alice/.ssh/authorized_keys')

    def test_gen2_ovmf_and_the_vmid_as_it_is(self):
        code_fd, vars_fd = (os.path.join(self.tmp, n) for n in ('CODE.fd', 'VARS.fd'))
        for path in (code_fd, vars_fd):
            with open(path, 'wb') as f:
                f.write(b'\0' * 4096)
        gpt = bootable_disk(os.path.join(self.tmp, 'gpt.raw'))
        with open(gpt, 'r+b') as f:
            f.seek(512)
            f.write(b'EFI PART')
        with mock.patch.object(boot_kit, 'OVMF_PAIRS', ((code_fd, vars_fd),)):
            code, out, err = self.kit([['health', 'Ready']], '--uefi', '--vm-id', VM_ID,
                                      image=gpt)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(self.option_values('-uuid'), [VM_ID])
        flash = [d for d in self.option_values('-drive') if 'if=pflash' in d]
        self.assertEqual(len(flash), 2)
        self.assertIn('readonly=on,file=' + code_fd, flash[0])
        self.assertNotIn(vars_fd, flash[1])     # a copy: the template stays as it is
        self.assertIn('Gen2 (UEFI, OVMF)', out)

    def test_ssh_adds_one_forward_to_loopback_only(self):
        with mock.patch.object(boot_kit, 'ssh_login', return_value=(True, 'azp-kit-vm', 1.0)):
            code, out, err = self.kit([['health', 'Ready']], '--ssh')
        self.assertEqual(code, 0, out + err)
        netdev = self.option_values('-netdev')[0]
        self.assertEqual(netdev.count('hostfwd='), 1)
        self.assertRegex(netdev, r'hostfwd=tcp:127\.0\.0\.1:\d+-:22')
        self.assertIn('with the key: hostname -> azp-kit-vm', out)

    def test_ssh_run_prints_the_commands_output(self):
        answers = {'hostname': (True, 'azp-kit-vm', 1.0),
                   'systemd-detect-virt': (True, 'microsoft\nsecond line', 0.5)}
        with mock.patch.object(boot_kit, 'ssh_login',
                               side_effect=lambda *a, **kw: answers[kw.get('command',
                                                                           'hostname')]):
            code, out, err = self.kit([['health', 'Ready']], '--ssh',
                                      '--ssh-run', 'systemd-detect-virt')
        self.assertEqual(code, 0, out + err)
        self.assertIn('ssh-run (exit 0):\n  > microsoft\n  > second line\n', out)

    def test_a_failed_ssh_login_is_exit_4(self):
        with mock.patch.object(boot_kit, 'ssh_login',
                               return_value=(False, 'Permission denied (publickey).', 9.0)):
            code, out, err = self.kit([['health', 'Ready']], '--ssh')
        self.assertEqual(code, 4, out + err)
        self.assertIn('FAILED', out)
        self.assertIn('Permission denied (publickey).', out)


class VerdictTest(KitCase):
    """Ready, ProvisioningFailed, and each diagnosis of a boot that reported nothing."""

    def setUp(self):
        super(VerdictTest, self).setUp()
        self.need_tools()

    def test_ready_with_timings(self):
        code, out, err = self.kit([['console', USERSPACE], ['dhcp'], ['sleep', 0.3],
                                   ['imds'], ['health', 'Ready']])
        self.assertEqual(code, 0, out + err)
        self.assertRegex(out, r'(?m)^Ready after \d+ s$')
        self.assertRegex(out, r'timings from QEMU start: first DHCP [\d.]+ s( \(capture '
                              r'clock, \+-1 s\))?, first request [\d.]+ s \(imds\), '
                              r'Ready [\d.]+ s')
        self.assertNotIn('boot: kept', out)

    def test_console_follows_live(self):
        code, out, err = self.kit([['console', USERSPACE], ['sleep', 0.5],
                                   ['health', 'Ready']], '--console')
        self.assertEqual(code, 0, out + err)
        self.assertIn('Welcome to Debian GNU/Linux 12 (bookworm)!', out)
        code, out, err = self.kit([['console', USERSPACE], ['health', 'Ready']])
        self.assertNotIn('Welcome to Debian', out)

    def test_provisioning_failed(self):
        code, out, err = self.kit([['dhcp'], ['health', 'NotReady', 'ProvisioningFailed',
                                               'result=error|reason=bad hostname']])
        self.assertEqual(code, 1, out + err)
        self.assertIn('ProvisioningFailed: result=error|reason=bad hostname', out)

    def diagnosis(self, play, *words):
        code, out, err = self.kit(play, '--timeout', '2')
        self.assertEqual(code, 3, out + err)
        self.assertIn('nothing reported by the deadline (2 s): ', out)
        for word in words:
            self.assertIn(word, out)
        self.kept_dir(out)
        return out

    def test_no_console_no_traffic(self):
        out = self.diagnosis([], 'no console output and no network traffic', 'console: empty')

    def test_boot_loader_only(self):
        out = self.diagnosis([['console', 'GRUB loading.\nWelcome to GRUB!\n']],
                             'kernel never reached userspace, or it does not log to the '
                             'serial console', 'console=ttyS0', '  | Welcome to GRUB!')

    def test_kernel_never_reached_userspace(self):
        out = self.diagnosis([['console', '[    0.000000] Linux version 6.1\n'
                                          '[    1.900000] Kernel panic - not syncing\n']],
                             'kernel never reached userspace: the kernel logged',
                             '  | [    1.900000] Kernel panic - not syncing')

    def test_root_file_system_not_found(self):
        self.diagnosis([['console', '[    0.000000] Linux version 6.1\n'
                                    'Gave up waiting for root file system device.\n'
                                    'ALERT!  UUID=1234 does not exist.  Dropping to a shell!\n'
                                    '(initramfs) ']],
                       'the root file system was not found (Gave up waiting for root)',
                       'in the initramfs')

    def test_no_dhcp(self):
        self.diagnosis([['console', USERSPACE]], 'no DHCP: the system started',
                       'no network configuration')

    def test_no_request_at_all(self):
        self.diagnosis([['console', USERSPACE], ['dhcp']], 'no request at all',
                       'DHCP lease', 'is a provisioning agent installed')

    def test_imds_only(self):
        self.diagnosis([['dhcp'], ['imds']], 'IMDS only: the guest asked IMDS 1 time(s)')

    def test_goal_state_but_no_report(self):
        self.diagnosis([['dhcp'], ['imds'], ['goalstate']],
                       'goal state but no report: the guest fetched the goal state 1 time(s)')

    def test_reports_but_no_ready(self):
        self.diagnosis([['dhcp'], ['health', 'NotReady', 'Provisioning', 'working']],
                       'health reports but no accepted Ready', 'reported NotReady, answered 200')

    def test_qemu_exits_early(self):
        code, out, err = self.kit([['console', USERSPACE], ['exit', 0]], '--timeout', '30')
        self.assertEqual(code, 3, out + err)
        self.assertIn('QEMU exited (status 0)', out)
        self.assertIn('no DHCP', out)


    def test_qemu_failing_shows_its_own_words(self):
        code, out, err = self.kit([['stderr', 'qemu-system-x86_64: -drive if=pflash: '
                                              'Could not open CODE.fd: Permission denied\n'],
                                   ['exit', 1]], '--timeout', '30')
        self.assertEqual(code, 3, out + err)
        self.assertIn('QEMU exited (status 1)', out)
        self.assertIn('qemu: qemu-system-x86_64: -drive if=pflash: Could not open CODE.fd: '
                      'Permission denied', out)


class DiagnoseUnitTest(unittest.TestCase):
    """diagnose() alone, for the orders of evidence the runs above do not reach."""

    def test_wireserver_asked_but_not_for_the_goal_state(self):
        text = boot_kit.diagnose([{'server': 'wireserver', 'path': '/?comp=versions'}], [],
                                 [], '')
        self.assertIn('WireServer asked (/?comp=versions) but never for the goal state', text)

    def test_a_stale_incarnation_is_named(self):
        text = boot_kit.diagnose([], [{'state': 'Ready', 'status': 410}], [], '')
        self.assertIn('stale incarnation', text)


if __name__ == '__main__':
    unittest.main()


class BenchFiguresTest(unittest.TestCase):
    """tests/kit_test.py's reading of the kit's report and its time-to-Ready table."""

    REPORT = ('Ready after 55 s\n'
              'timings from QEMU start: first DHCP 40.9 s, first request 43.0 s (imds), '
              'Ready 54.6 s\n'
              'ssh alice@127.0.0.1 -p PORT with the key: hostname -> kit-vm-7 (5.2 s after '
              'Ready)\n'
              'ssh-run (exit 0):\n'
              '  > Id=azure-provisioning.service\n'
              '  > InactiveExitTimestampMonotonic=20100000\n'
              '  > ActiveEnterTimestampMonotonic=0\n'
              '  > InactiveEnterTimestampMonotonic=36000000\n'
              '  >\n'
              '  > Id=ssh.service\n'
              '  > InactiveExitTimestampMonotonic=30000000\n'
              '  > ActiveEnterTimestampMonotonic=31500000\n'
              '  > InactiveEnterTimestampMonotonic=0\n')

    def setUp(self):
        sys.path.insert(0, HERE)
        self.addCleanup(sys.path.remove, HERE)
        import kit_test
        self.kt = kit_test

    def test_figures_of_a_report(self):
        figures = self.kt.boot_figures(self.REPORT)
        self.assertEqual(figures['ready'], 54.6)
        self.assertAlmostEqual(figures['login'], 59.8)
        self.assertEqual(figures['units'], {'azure-provisioning.service': (20.1, 36.0),
                                            'ssh.service': (30.0, 31.5)})
        self.assertIsNone(self.kt.boot_figures('nothing reported by the deadline'))

    def test_table_of_medians_and_ratios(self):
        ours = self.kt.boot_figures(self.REPORT)
        other = [dict(ours, ready=r, login=l) for r, l in ((30.0, 90.0), (40.0, 70.0),
                                                            (35.0, 80.0))]
        lines = self.kt.comparison({'ours': [ours], 'cloud-init': other})
        table = '\n'.join(lines)
        self.assertRegex(table, r'ours +54\.6s +59\.8s +1\.00 +1\.00 +1')
        self.assertRegex(table, r'cloud-init +35\.0s +80\.0s +0\.64 +1\.34 +3')
        self.assertIn('ours: azure-provisioning.service 20.1 -> 36.0; ssh.service 30.0 -> 31.5',
                      table)

    def test_units_still_running_or_never_started(self):
        figures = {'ready': 40.0, 'login': 60.0,
                   'units': {'cloud-config.service': (52.2, 0.0),
                             'cloud-final.service': (0.0, 0.0)}}
        table = '\n'.join(self.kt.comparison({'cloud-init': [figures]}))
        self.assertIn('cloud-init: cloud-config.service 52.2 -> running; '
                      'cloud-final.service not started', table)
