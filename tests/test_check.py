"""--check: a good image tree passes; each common mistake fails (or warns) with
the exact line and fix; exit codes are observed on the real command."""

import gzip
import lzma
import os
import shutil
import sys
import tempfile
import unittest

from tests.support import SCRIPT, run_command
from tests.test_install import make_image, run as run_install, symlink, write

INSTALL_SH = os.path.join(os.path.dirname(SCRIPT), 'install.sh')
WANTS = 'etc/systemd/system/%s.target.wants/%s'
KERNEL = '6.1.0-27-cloud-amd64'
HYPERV = ('drivers/hv/hv_vmbus.ko', 'drivers/scsi/hv_storvsc.ko',
          'drivers/net/hyperv/hv_netvsc.ko', 'drivers/hv/hv_utils.ko')
HYPERV_CONFIG = ('CONFIG_HYPERV', 'CONFIG_HYPERV_STORAGE', 'CONFIG_HYPERV_NET',
                 'CONFIG_HYPERV_UTILS')
# azure-vm-utils' files that leave an accelerated-networking VF to hv_netvsc
UNMANAGED_RULES = ('SUBSYSTEM=="net", ACTION!="remove", DRIVERS=="mana|mlx4_core|mlx5_core", '
                   'ATTR{flags}=="0x?[89ABCDEF]??", ENV{AZURE_UNMANAGED_SRIOV}="1", '
                   'ENV{ID_NET_MANAGED_BY}="unmanaged", ENV{NM_UNMANAGED}="1"\n')
UNMANAGED_NETWORK = '[Match]\nProperty=AZURE_UNMANAGED_SRIOV=1\n\n[Link]\nUnmanaged=yes\n'


def cpio(*names):
    """A cpio "newc" archive of empty-ish files of these names, with its trailer and
    the zeros cpio pads it with (to 512 bytes)."""
    data = b''
    for ino, name in enumerate(names + ('TRAILER!!!',), 1):
        body = b'' if name == 'TRAILER!!!' else b'\x7fELF module ' + name.encode()
        encoded = name.encode() + b'\0'
        head = b'070701' + b''.join(b'%08x' % v for v in (
            ino, 0o100644, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(encoded), 0))
        data += head + encoded + b'\0' * (-(len(head) + len(encoded)) % 4)
        data += body + b'\0' * (-len(body) % 4)
    return data + b'\0' * (-len(data) % 512)


def initramfs(compress, *modules):
    """An initramfs as initramfs-tools and dracut make them: CPU microcode in a
    plain cpio archive, then the modules (and more) in a compressed one."""
    early = cpio('kernel', 'kernel/x86', 'kernel/x86/microcode/GenuineIntel.bin')
    main = cpio('usr/lib/modules/%s/kernel/fs/ext4/ext4.ko' % KERNEL, *[
        'usr/lib/modules/%s/kernel/%s' % (KERNEL, m) for m in modules] + ['init'])
    return early + compress(main)


def hyperv_modules(root, initrd=gzip.compress, modules=HYPERV):
    """The kernel's Hyper-V drivers as modules, `modules` in its initramfs."""
    write(os.path.join(root, 'boot/config-' + KERNEL),
          '# Linux/x86 6.1.0 Kernel Configuration\nCONFIG_EXT4_FS=y\n'
          + ''.join('%s=m\n' % c for c in HYPERV_CONFIG))
    for module in HYPERV:
        write(os.path.join(root, 'usr/lib/modules', KERNEL, 'kernel', module + '.xz'), '')
    with open(os.path.join(root, 'boot/initrd.img-' + KERNEL), 'wb') as f:
        f.write(initramfs(initrd, *[m + '.xz' for m in modules]))


def good_image(root):
    make_image(root)
    for module in ('json/__init__.py', 'xml/parsers/expat.py', 'base64.py', 'shutil.py'):
        write(os.path.join(root, 'usr/lib/python3.11', module), '')
    write(os.path.join(root, 'etc/systemd/network/20-dhcp.network'),
          '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n')
    for target, unit in (('multi-user', 'systemd-networkd.service'),
                         ('network-online', 'systemd-networkd-wait-online.service')):
        symlink('/lib/systemd/system/' + unit, os.path.join(root, WANTS % (target, unit)))
    write(os.path.join(root, 'usr/bin/mount'), '', 0o755)
    write(os.path.join(root, 'etc/default/grub'),
          'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 earlyprintk=ttyS0"\n')
    write(os.path.join(root, 'usr/sbin/chpasswd'), '', 0o755)
    write(os.path.join(root, 'usr/lib/modules', KERNEL, 'kernel/fs/udf/udf.ko.xz'), '')
    hyperv_modules(root)
    write(os.path.join(root, 'usr/sbin/sshd'), '', 0o755)
    write(os.path.join(root, 'usr/sbin/hv_kvp_daemon'), '', 0o755)
    write(os.path.join(root, 'usr/lib/udev/rules.d/10-azure-unmanaged-sriov.rules'),
          UNMANAGED_RULES)
    write(os.path.join(root, 'usr/lib/systemd/network/01-azure-unmanaged-sriov.network'),
          UNMANAGED_NETWORK)
    write(os.path.join(root, 'usr/sbin/azure-ephemeral-disk-setup'), '', 0o755)
    write(os.path.join(root, 'etc/fstab'), 'UUID=0a1b2c3d / ext4 defaults 0 1\n')
    result = run_install(['sh', INSTALL_SH, '--root', root])
    assert result.code == 0, result
    # the image's python3 here is files only: install.sh could not compile with it
    write(os.path.join(root, 'usr/local/lib/azure-provisioning/__pycache__/'
                             'azure_provisioning.cpython-311.pyc'), '')
    return root


class Check(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix='azp-check-')
        cls.good = good_image(os.path.join(cls.base, 'good'))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, ignore_errors=True)

    def copy(self):
        root = tempfile.mkdtemp(prefix='img-', dir=self.base)
        os.rmdir(root)
        shutil.copytree(self.good, root, symlinks=True)
        return root

    def check(self, root):
        run = run_command([sys.executable, '-I', SCRIPT, '--check', '--root', root])
        self.assertNotIn('Traceback', run.stderr)
        return run

    def assert_ready(self, root, *lines):
        """Exit status 0 (warnings allowed), each line in the report."""
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        for line in lines:
            self.assertIn(line, run.stdout)
        return run

    def assert_blocked(self, root, *lines, **how):
        """Exit status 1 (a FAIL row), or with cannot_run=WHY 3: the unit's Python
        cannot run the provisioner, WHY said again on stderr's one line, which
        install.sh shows (it decides by the status alone)."""
        run = self.check(root)
        why = how.get('cannot_run')
        self.assertEqual(run.code, 3 if why else 1, run)
        for line in lines:
            self.assertIn(line, run.stdout)
        self.assertRegex(run.stdout, r'image NOT ready: \d+ blocking, \d+ warnings \(%s\)\n$' % root)
        if why:
            self.assertEqual(len(run.stderr.splitlines()), 1, run)
            self.assertTrue(run.stderr.startswith('azure-provisioning: error: the unit cannot '
                                                  'run: '), run)
            self.assertIn(why, run.stderr)
        else:
            self.assertEqual(run.stderr, '', run)
        return run

    def test_good_image_passes(self):
        run = self.check(self.good)
        self.assertEqual(run.code, 0, run)
        self.assertEqual(run.stdout, (
            'ok    unit installed: /etc/systemd/system/azure-provisioning.service\n'
            'ok    unit enabled\n'
            'ok    ExecStart: /usr/bin/python3 -I -S /usr/local/sbin/azure-provisioning\n'
            'ok    module /usr/local/lib/azure-provisioning/azure_provisioning.py, byte-compiled\n'
            'ok    python: /usr/bin/python3 is Python 3.11 (from the file name '
            '/usr/bin/python3.11) with json, xml.parsers.expat, base64 and shutil in '
            '/usr/lib/python3.11 (judged from the files)\n'
            'ok    walinuxagent not installed\n'
            'ok    cloud-init not installed\n'
            'ok    media: kernel %s mounts UDF\n'
            'ok    Hyper-V drivers: kernel %s: hv_vmbus, hv_storvsc, hv_netvsc and hv_utils in '
            '/boot/initrd.img-%s\n'
            'ok    DHCP: systemd-networkd (/etc/systemd/network/20-dhcp.network)\n'
            'ok    network-online.target waits for systemd-networkd-wait-online.service\n'
            'ok    accelerated networking: no configuration takes the VF (left to hv_netvsc by '
            '/usr/lib/systemd/network/01-azure-unmanaged-sriov.network, '
            '/usr/lib/udev/rules.d/10-azure-unmanaged-sriov.rules)\n'
            'ok    sshd: ssh.service enabled\n'
            'ok    Hyper-V KVP daemon: /usr/sbin/hv_kvp_daemon\n'
            'ok    no swap on the OS disk\n'
            'info  temporary disk: azure-vm-utils\' /usr/sbin/azure-ephemeral-disk-setup formats '
            'and mounts it\n'
            'info  /etc/hosts line "127.0.1.1 image-template" will get the new name at first boot\n'
            'image ready: 0 blocking, 0 warnings (%s)\n' % (KERNEL, KERNEL, KERNEL, self.good)))

    def test_the_launchers_module_missing_or_not_compiled(self):
        root = self.copy()
        shutil.rmtree(os.path.join(root, 'usr/local/lib/azure-provisioning/__pycache__'))
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('warn  module /usr/local/lib/azure-provisioning/azure_provisioning.py is '
                      'not byte-compiled: every boot compiles it', run.stdout)
        os.unlink(os.path.join(root, 'usr/local/lib/azure-provisioning/azure_provisioning.py'))
        self.assert_blocked(root, "FAIL  the launcher's module /usr/local/lib/azure-provisioning/"
                                  'azure_provisioning.py does not exist')

    def test_unit_not_installed(self):
        root = self.copy()
        os.unlink(os.path.join(root, 'etc/systemd/system/azure-provisioning.service'))
        self.assert_blocked(root, 'FAIL  azure-provisioning.service is not installed\n'
                                  '      fix: sh install.sh --root %s\n' % root)

    def test_unit_not_enabled(self):
        root = self.copy()
        os.unlink(os.path.join(root, WANTS % ('multi-user', 'azure-provisioning.service')))
        self.assert_blocked(root, 'FAIL  unit not enabled (it disables itself after a run',
                            'fix: systemctl --root=%s enable azure-provisioning.service' % root)

    def test_interpreter_missing(self):
        root = self.copy()
        os.unlink(os.path.join(root, 'usr/bin/python3.11'))
        why = 'ExecStart interpreter /usr/bin/python3 does not exist'
        self.assert_blocked(root, 'FAIL  ' + why, cannot_run=why)

    def test_python_minimal_without_json_and_xml(self):
        root = self.copy()
        for package in ('json', 'xml'):
            shutil.rmtree(os.path.join(root, 'usr/lib/python3.11', package))
        self.assert_blocked(root, 'FAIL  python: /usr/bin/python3 (Python 3.11) has no json and '
                                  'xml.parsers.expat: not in /usr/lib/python3.11\n      fix: '
                                  'install the full python3 package, not python3-minimal\n',
                            cannot_run='/usr/bin/python3 (Python 3.11) has no json and '
                                       'xml.parsers.expat: not in /usr/lib/python3.11 (fix: '
                                       'install the full python3 package, not '
                                       'python3-minimal)\n')

    def test_only_the_missing_module_is_named(self):
        root = self.copy()
        os.remove(os.path.join(root, 'usr/lib/python3.11/shutil.py'))
        run = self.assert_blocked(root, 'FAIL  python: /usr/bin/python3 (Python 3.11) has no '
                                        'shutil: not in /usr/lib/python3.11\n',
                                  cannot_run='has no shutil')
        self.assertNotIn('json', run.stdout.split('FAIL')[1].split('\n')[0])

    def test_compiled_modules_count(self):
        # a sourceless .pyc beside the missing .py, or one only in __pycache__
        root = self.copy()
        stdlib = os.path.join(root, 'usr/lib/python3.11')
        os.rename(stdlib + '/json/__init__.py', stdlib + '/json/__init__.pyc')
        os.remove(stdlib + '/xml/parsers/expat.py')
        write(stdlib + '/xml/parsers/__pycache__/expat.cpython-311.pyc', '')
        os.remove(stdlib + '/shutil.py')
        write(stdlib + '/__pycache__/shutil.cpython-311.pyc', '')
        self.assertEqual(self.check(root).code, 0)
        # a pyc of another module does not count
        os.rename(stdlib + '/xml/parsers/__pycache__/expat.cpython-311.pyc',
                  stdlib + '/xml/parsers/__pycache__/expatbuilder.cpython-311.pyc')
        self.assert_blocked(root, 'has no xml.parsers.expat: not in /usr/lib/python3.11\n',
                            cannot_run='has no xml.parsers.expat')

    def test_modules_split_between_lib_and_lib64(self):
        root = self.copy()
        stdlib = os.path.join(root, 'usr/lib/python3.11')
        os.makedirs(os.path.join(root, 'usr/lib64/python3.11'))
        os.rename(stdlib + '/json', os.path.join(root, 'usr/lib64/python3.11/json'))
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('shutil in /usr/lib64/python3.11 and /usr/lib/python3.11 (judged from the '
                      'files)', run.stdout)

    def test_python_too_old(self):
        root = self.copy()
        os.rename(os.path.join(root, 'usr/bin/python3.11'), os.path.join(root, 'usr/bin/python3.5'))
        os.unlink(os.path.join(root, 'usr/bin/python3'))
        os.symlink('python3.5', os.path.join(root, 'usr/bin/python3'))
        self.assert_blocked(root, 'FAIL  python: /usr/bin/python3 is Python 3.5 (from the file '
                                  'name /usr/bin/python3.5); 3.6 or newer is needed\n'
                                  '      fix: sh install.sh --root %s --python PATH\n' % root,
                            cannot_run='/usr/bin/python3 is Python 3.5 (from the file name '
                                       '/usr/bin/python3.5); 3.6 or newer is needed (fix: sh '
                                       'install.sh --root %s --python PATH)\n' % root)

    def test_unversioned_name_needs_one_standard_library(self):
        # /usr/libexec/platform-python on RHEL 8 is not named pythonX.Y
        root = self.copy()
        os.unlink(os.path.join(root, 'usr/bin/python3'))
        shutil.copy2(os.path.join(root, 'usr/bin/python3.11'), os.path.join(root, 'usr/bin/python3'))
        write(os.path.join(root, 'usr/lib/python3.11/os.py'), '')
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('Python 3.11 (from its standard library /usr/lib/python3.11)', run.stdout)
        write(os.path.join(root, 'usr/lib/python3.12/os.py'), '')
        self.assert_blocked(root, 'FAIL  python: /usr/bin/python3: cannot tell which Python it '
                                  'is: not named pythonX.Y, and 2 standard libraries under /usr/lib*',
                            cannot_run='cannot tell which Python')

    def test_walinuxagent_installed(self):
        root = self.copy()
        write(os.path.join(root, 'usr/sbin/waagent'), '#!/bin/sh\n', 0o755)
        self.assert_blocked(root, 'FAIL  walinuxagent is installed (/usr/sbin/waagent): it '
                                  'answers Azure too, and two agents racing at first boot is not '
                                  'supported\n      fix: remove the package that owns it (chroot '
                                  '%s rpm -qf PATH or chroot %s dpkg -S PATH tells which)\n'
                                  % (root, root))

    def test_agents_enabled_get_their_own_fix_commands(self):
        root = self.copy()
        write(os.path.join(root, 'usr/bin/apt-get'), '', 0o755)
        write(os.path.join(root, 'usr/sbin/waagent'), '', 0o755)
        write(os.path.join(root, 'usr/lib/systemd/system/walinuxagent.service'), '[Service]\n')
        symlink('/lib/systemd/system/walinuxagent.service',
                os.path.join(root, WANTS % ('multi-user', 'walinuxagent.service')))
        write(os.path.join(root, 'usr/local/bin/cloud-init'), '', 0o755)
        for unit in ('cloud-init-main.service', 'cloud-init-network.service', 'cloud-init.target'):
            write(os.path.join(root, 'usr/lib/systemd/system', unit), '[Unit]\n')
        symlink('/lib/systemd/system/cloud-init-main.service',
                os.path.join(root, WANTS % ('cloud-init', 'cloud-init-main.service')))
        symlink('/lib/systemd/system/cloud-init.target',
                os.path.join(root, WANTS % ('multi-user', 'cloud-init.target')))
        sysctl = 'systemctl --root=%s' % root
        self.assert_blocked(
            root,
            'FAIL  walinuxagent is installed (/usr/sbin/waagent, walinuxagent.service), enabled: '
            'walinuxagent.service: it answers Azure too',
            '      fix: %s disable walinuxagent.service; chroot %s apt-get purge -y walinuxagent\n'
            % (sysctl, root),
            'FAIL  cloud-init is installed (/usr/local/bin/cloud-init, cloud-init-main.service, '
            'cloud-init-network.service, cloud-init.target), enabled: cloud-init-main.service, '
            'cloud-init.target: it answers',
            '      fix: %s disable cloud-init-main.service; %s disable cloud-init.target; '
            'chroot %s apt-get purge -y cloud-init\n' % (sysctl, sysctl, root))

    def test_dnf_and_zypper_commands(self):
        root = self.copy()
        write(os.path.join(root, 'usr/sbin/waagent'), '', 0o755)
        write(os.path.join(root, 'usr/bin/dnf'), '', 0o755)
        self.assert_blocked(root, 'fix: chroot %s dnf remove -y WALinuxAgent\n' % root)
        os.remove(os.path.join(root, 'usr/bin/dnf'))
        write(os.path.join(root, 'usr/bin/zypper'), '', 0o755)
        self.assert_blocked(root, 'fix: chroot %s zypper remove -y python3-azure-agent\n' % root)

    def test_cloud_init_enabled(self):
        root = self.copy()
        symlink('/lib/systemd/system/cloud-init.service',
                os.path.join(root, WANTS % ('multi-user', 'cloud-init.service')))
        self.assert_blocked(root, 'FAIL  cloud-init is installed (units only), enabled: '
                                  'cloud-init.service')

    def test_cloud_init_disabled_by_its_marker(self):
        root = self.copy()
        write(os.path.join(root, 'usr/bin/cloud-init'), '', 0o755)
        symlink('/lib/systemd/system/cloud-init.service',
                os.path.join(root, WANTS % ('multi-user', 'cloud-init.service')))
        write(os.path.join(root, 'etc/cloud/cloud-init.disabled'), '')
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('ok    cloud-init is installed but /etc/cloud/cloud-init.disabled keeps it '
                      'from running\n', run.stdout)

    def test_waagent_leftovers_only_warn(self):
        root = self.copy()
        write(os.path.join(root, 'etc/waagent.conf'), 'Provisioning.Agent=auto\n')
        os.makedirs(os.path.join(root, 'var/lib/waagent'))
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('warn  waagent leftovers: /var/lib/waagent, /etc/waagent.conf\n'
                      '      fix: rm -rf %s/var/lib/waagent %s/etc/waagent.conf' % (root, root),
                      run.stdout)
        self.assertIn('image ready: 0 blocking, 1 warnings', run.stdout)

    def test_media_readiness(self):
        root = self.copy()
        modules = os.path.join(root, 'usr/lib/modules')
        shutil.rmtree(os.path.join(modules, KERNEL, 'kernel/fs/udf'))
        write(os.path.join(modules, '6.12.0-1-amd64/modules.builtin'),
              'kernel/fs/ext4/ext4.ko\nkernel/fs/udf/udf.ko\n'
              + ''.join('kernel/%s\n' % m for m in HYPERV))
        os.remove(os.path.join(root, 'usr/bin/mount'))
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('warn  media: kernel %s has no udf module: VMs created with a password or '
                      'custom data fail to provision\n      fix: install the kernel\'s extra '
                      'modules (e.g. linux-modules-extra-%s)\n' % (KERNEL, KERNEL), run.stdout)
        self.assertIn('ok    media: kernel 6.12.0-1-amd64 mounts UDF\n', run.stdout)
        self.assertIn('warn  media: no mount command', run.stdout)
        shutil.rmtree(modules)
        self.assertIn('warn  media: no kernel in /lib/modules', self.check(root).stdout)

    def test_chpasswd_is_needed_with_provision_user(self):
        root = self.copy()
        os.remove(os.path.join(root, 'usr/sbin/chpasswd'))
        self.assertIn('info  media: no chpasswd (needed only with --provision-user)\n',
                      self.check(root).stdout)
        unit = os.path.join(root, 'etc/systemd/system/azure-provisioning.service')
        with open(unit) as f:
            text = f.read()
        write(unit, text.replace('/usr/local/sbin/azure-provisioning\n',
                                 '/usr/local/sbin/azure-provisioning --provision-user\n'))
        self.assert_blocked(root, 'FAIL  media: no chpasswd: the password on the media cannot '
                                  'be set\n      fix: install passwd (or: shadow-utils)\n')

    def test_a_provisioned_tree_not_deprovisioned(self):
        root = self.copy()
        write(os.path.join(root, 'etc/machine-id'), '0123456789abcdef0123456789abcdef\n')
        write(os.path.join(root, 'var/lib/azure-provisioning/state.json'), '{}')
        for name in ('ssh_host_ed25519_key', 'ssh_host_ed25519_key.pub'):
            write(os.path.join(root, 'etc/ssh', name), 'k')
        self.assert_blocked(
            root,
            'FAIL  /etc/machine-id is not empty: every VM would share this machine id\n'
            '      fix: azure-provisioning --deprovision --root %s\n' % root,
            'FAIL  /var/lib/azure-provisioning/state.json exists: the image was captured from '
            'a provisioned VM without deprovisioning\n'
            '      fix: azure-provisioning --deprovision --root %s\n' % root,
            "info  2 SSH host key file(s) in /etc/ssh: replaced at each VM's first boot\n",
            'image NOT ready: 2 blocking')
        # what --deprovision leaves passes again
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', root])
        self.assertEqual(run.code, 0, run)
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertNotIn('machine-id', run.stdout)
        self.assertNotIn('SSH host key', run.stdout)

    def test_an_empty_machine_id_is_right(self):
        root = self.copy()
        write(os.path.join(root, 'etc/machine-id'), '')
        self.assertEqual(self.check(root).code, 0)

    def test_no_serial_console_warns(self):
        root = self.copy()
        write(os.path.join(root, 'etc/default/grub'), 'GRUB_CMDLINE_LINUX="quiet"\n')
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('warn  no console=ttyS0 on the kernel command line: Azure boot '
                      'diagnostics (the serial console) will not show the boot or our report\n'
                      '      fix: add console=ttyS0 to GRUB_CMDLINE_LINUX', run.stdout)
        write(os.path.join(root, 'boot/loader/entries/debian.conf'),
              'options root=/dev/sda1 console=ttyS0,115200\n')
        self.assertNotIn('console=ttyS0 on', self.check(root).stdout)

    def test_no_dhcp_configuration(self):
        root = self.copy()
        os.unlink(os.path.join(root, 'etc/systemd/network/20-dhcp.network'))
        self.assert_blocked(root, 'FAIL  no DHCP configuration found: the VM gets no address')

    def test_container_only_network_files_do_not_count(self):
        root = self.copy()
        os.unlink(os.path.join(root, 'etc/systemd/network/20-dhcp.network'))
        write(os.path.join(root, 'usr/lib/systemd/network/80-container-host0.network'),
              '[Match]\nVirtualization=container\nName=host0\n\n[Network]\nDHCP=yes\n')
        run = self.assert_blocked(root, 'FAIL  no DHCP configuration found')
        self.assertNotIn('80-container-host0', run.stdout)

    def test_networkd_file_but_networkd_disabled(self):
        root = self.copy()
        os.unlink(os.path.join(root, WANTS % ('multi-user', 'systemd-networkd.service')))
        self.assert_blocked(root, 'warn  DHCP: systemd-networkd (NOT enabled) '
                                  '(/etc/systemd/network/20-dhcp.network)',
                            'FAIL  no DHCP configuration found')

    def test_ifupdown_and_networkmanager_count(self):
        root = self.copy()
        os.unlink(os.path.join(root, 'etc/systemd/network/20-dhcp.network'))
        write(os.path.join(root, 'etc/network/interfaces'),
              'auto lo\niface lo inet loopback\nallow-hotplug eth0\niface eth0 inet dhcp\n')
        symlink('/lib/systemd/system/NetworkManager.service',
                os.path.join(root, WANTS % ('multi-user', 'NetworkManager.service')))
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('ok    DHCP: NetworkManager (NetworkManager.service enabled', run.stdout)
        self.assertIn('ok    DHCP: ifupdown (/etc/network/interfaces)', run.stdout)

    def test_a_configuration_bound_to_the_templates_mac_does_not_count(self):
        # cloud-init's netplan file, left behind when cloud-init is purged
        root = self.copy()
        os.unlink(os.path.join(root, 'etc/systemd/network/20-dhcp.network'))
        write(os.path.join(root, 'etc/netplan/50-cloud-init.yaml'),
              'network:\n  ethernets:\n    eth0:\n      dhcp4: true\n      match:\n'
              '        driver: hv_netvsc\n        macaddress: 00:0d:3a:12:34:56\n'
              '      set-name: eth0\n  version: 2\n')
        self.assert_blocked(root, "warn  DHCP: netplan (bound to the template's MAC address) "
                                  '(/etc/netplan/50-cloud-init.yaml): it does not apply on a VM '
                                  'made from this image\n',
                            'FAIL  no DHCP configuration found')
        write(os.path.join(root, 'etc/systemd/network/20-dhcp.network'),
              '[Match]\nMACAddress=00:0d:3a:12:34:56\n\n[Network]\nDHCP=yes\n')
        self.assert_blocked(root, "warn  DHCP: systemd-networkd (bound to the template's MAC "
                                  'address) (/etc/systemd/network/20-dhcp.network)')

    def test_no_wait_online_warns(self):
        root = self.copy()
        os.unlink(os.path.join(root, WANTS % ('network-online',
                                               'systemd-networkd-wait-online.service')))
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('warn  no wait-online service enabled', run.stdout)

    # Azure's image requirements beyond provisioning (issue 22, item 5)

    def initrd(self, root):
        return os.path.join(root, 'boot/initrd.img-' + KERNEL)

    def test_hyperv_drivers_built_in(self):
        root = self.copy()
        os.remove(self.initrd(root))
        write(os.path.join(root, 'boot/config-' + KERNEL),
              ''.join('%s=y\n' % c for c in HYPERV_CONFIG))
        shutil.rmtree(os.path.join(root, 'usr/lib/modules', KERNEL, 'kernel/drivers'))
        self.assert_ready(root, 'ok    Hyper-V drivers: kernel %s: hv_vmbus, hv_storvsc, '
                                'hv_netvsc and hv_utils built in\n' % KERNEL)
        # no configuration kept: modules.builtin says the same
        os.remove(os.path.join(root, 'boot/config-' + KERNEL))
        write(os.path.join(root, 'usr/lib/modules', KERNEL, 'modules.builtin'),
              ''.join('kernel/%s\n' % m for m in HYPERV))
        self.assertIn('built in\n', self.check(root).stdout)

    def test_hyperv_modules_in_an_xz_initramfs_named_as_dracut_names_it(self):
        root = self.copy()
        hyperv_modules(root, initrd=lzma.compress)
        os.rename(self.initrd(root), os.path.join(root, 'boot/initramfs-%s.img' % KERNEL))
        self.assert_ready(root, 'ok    Hyper-V drivers: kernel %s: hv_vmbus, hv_storvsc, '
                                'hv_netvsc and hv_utils in /boot/initramfs-%s.img\n'
                          % (KERNEL, KERNEL))

    def test_hyperv_modules_in_a_bzip2_initramfs(self):
        import bz2
        root = self.copy()
        hyperv_modules(root, initrd=bz2.compress)
        self.assert_ready(root, 'ok    Hyper-V drivers: kernel %s: hv_vmbus, hv_storvsc, '
                                'hv_netvsc and hv_utils in /boot/initrd.img-%s\n'
                          % (KERNEL, KERNEL))

    def test_the_initramfs_through_links_inside_the_image(self):
        root = self.copy()
        initrd = self.initrd(root)
        os.rename(initrd, os.path.join(root, 'boot/real-initrd'))
        os.symlink('/boot/real-initrd', initrd)         # the image's /boot, not ours
        self.assert_ready(root, 'ok    Hyper-V drivers: kernel %s: hv_vmbus, hv_storvsc, '
                                'hv_netvsc and hv_utils in /boot/initrd.img-%s\n'
                          % (KERNEL, KERNEL))
        os.remove(os.path.join(root, 'boot/real-initrd'))
        self.assert_ready(root, 'warn  Hyper-V drivers: kernel %s: hv_vmbus, hv_storvsc, '
                                'hv_netvsc and hv_utils are modules and it has no initramfs '
                                '(/boot/initrd.img-%s, ' % (KERNEL, KERNEL))

    def test_hyperv_modules_missing_from_the_initramfs(self):
        root = self.copy()
        write(os.path.join(root, 'usr/sbin/update-initramfs'), '', 0o755)
        hyperv_modules(root, modules=HYPERV[2:3])       # hv_netvsc only
        self.assert_blocked(root, (
            'ok    Hyper-V drivers: kernel {k}: hv_netvsc in /boot/initrd.img-{k}\n'
            'FAIL  Hyper-V drivers: kernel {k}: hv_vmbus and hv_storvsc are modules not in '
            '/boot/initrd.img-{k}: on Azure the kernel cannot reach the OS disk\n'
            '      fix: add hv_vmbus hv_storvsc to {r}/etc/initramfs-tools/modules (one a line), '
            'then chroot {r} update-initramfs -u -k {k}\n'
            'warn  Hyper-V drivers: kernel {k}: hv_utils is a module not in /boot/initrd.img-{k}'
            ': loaded later from the disk, where Azure asks for them in the initramfs\n'
            '      fix: add hv_utils to').format(k=KERNEL, r=root))

    def test_a_zstd_initramfs_is_not_checked_and_says_so(self):
        root = self.copy()
        hyperv_modules(root, initrd=lambda data: b'\x28\xb5\x2f\xfd' + data)
        run = self.assert_ready(root, (
            'warn  Hyper-V drivers: kernel {k}: hv_vmbus, hv_storvsc, hv_netvsc and hv_utils are '
            'modules; /boot/initrd.img-{k} is zstd-compressed, which this check cannot read: '
            'whether they are in it is not checked\n'
            '      fix: chroot {r} lsinitramfs /boot/initrd.img-{k} | grep hv_ ').format(
                k=KERNEL, r=root))
        self.assertNotIn('ok    Hyper-V drivers', run.stdout)

    def test_an_initramfs_that_is_no_regular_file_or_no_archive(self):
        root = self.copy()
        initrd = self.initrd(root)
        for kind, make in (('fifo', os.mkfifo),
                           ('garbage', lambda p: write(p, '070701' + 'zz' * 60)),
                           ('cut gzip', lambda p: write(p, '')),
                           ('huge name', lambda p: write(
                               p, '070701' + '0' * 88 + '7fffffff' + '0' * 8))):
            with self.subTest(kind=kind):
                os.remove(initrd)
                make(initrd)
                if kind == 'cut gzip':
                    with open(initrd, 'wb') as f:
                        f.write(gzip.compress(cpio('a', 'b') * 50)[:200])
                run = self.check(root)
                self.assertEqual(run.code, 0, run)      # nothing proven missing
                self.assertNotIn('Traceback', run.stderr)
                self.assertRegex(run.stdout, r'warn  Hyper-V drivers: kernel %s: /boot/initrd'
                                             r'\.img-%s: .+: not checked\n      fix: lsinitramfs'
                                 % (KERNEL, KERNEL))

    def test_hyperv_drivers_not_in_the_kernel(self):
        root = self.copy()
        os.remove(self.initrd(root))
        shutil.rmtree(os.path.join(root, 'usr/lib/modules', KERNEL, 'kernel/drivers'))
        write(os.path.join(root, 'boot/config-' + KERNEL),
              'CONFIG_HYPERV=y\nCONFIG_HYPERV_NET=y\nCONFIG_HYPERV_UTILS=y\n'
              '# CONFIG_HYPERV_STORAGE is not set\n')
        self.assert_blocked(root, 'FAIL  Hyper-V drivers: kernel %s has no hv_storvsc '
                                  '(CONFIG_HYPERV_STORAGE not set): on Azure it cannot reach its '
                                  'disk or network\n      fix: install a kernel built for Azure'
                                  % KERNEL)

    def test_sshd_missing_or_not_enabled(self):
        root = self.copy()
        os.remove(os.path.join(root, WANTS % ('multi-user', 'ssh.service')))
        self.assert_ready(root, 'warn  sshd is installed but not enabled: nobody can log in to a '
                                'VM made from this image\n      fix: systemctl --root=%s enable '
                                'ssh.service\n' % root)
        symlink('/lib/systemd/system/ssh.socket', os.path.join(root, WANTS % ('sockets',
                                                                              'ssh.socket')))
        self.assertIn('ok    sshd: ssh.socket enabled\n', self.check(root).stdout)
        os.remove(os.path.join(root, 'usr/sbin/sshd'))
        self.assertIn('warn  no SSH server (/usr/sbin/sshd): nobody can log in to a VM made '
                      'from this image (only the serial console)\n      fix: install '
                      'openssh-server', self.check(root).stdout)

    def test_swap_on_the_os_disk(self):
        root = self.copy()
        write(os.path.join(root, 'etc/fstab'), 'UUID=0a1b / ext4 defaults 0 1\n'
                                               '# /swap.img none swap sw 0 0\n'
                                               '/swapfile none swap sw 0 0\n')
        symlink('/etc/systemd/system/dev-sda3.swap',
                os.path.join(root, WANTS % ('swap', 'dev-sda3.swap')))
        run = self.assert_ready(root, 'warn  swap on the OS disk (/swapfile none swap; '
                                      'dev-sda3.swap enabled): Azure advises against it')
        self.assertIn('      fix: remove it from /etc/fstab (or disable the unit); put swap on '
                      'the temporary disk, from a hook in /etc/azure-provisioning/ready.d\n',
                      run.stdout)

    def test_no_kvp_daemon(self):
        root = self.copy()
        os.remove(os.path.join(root, 'usr/sbin/hv_kvp_daemon'))
        self.assert_ready(root, 'warn  no Hyper-V KVP daemon (hv_kvp_daemon, hypervkvpd): the '
                                'report written to the KVP pool (/var/lib/hyperv/.kvp_pool_1) '
                                'does not reach Azure\n      fix: install hyperv-daemons')
        write(os.path.join(root, 'usr/sbin/hypervkvpd'), '', 0o755)      # RHEL's name
        self.assertIn('ok    Hyper-V KVP daemon: /usr/sbin/hypervkvpd\n', self.check(root).stdout)

    def test_a_dhcp_configuration_that_takes_the_vf(self):
        root = self.copy()
        for path in ('usr/lib/udev/rules.d/10-azure-unmanaged-sriov.rules',
                     'usr/lib/systemd/network/01-azure-unmanaged-sriov.network'):
            os.remove(os.path.join(root, path))
        warning = ('warn  accelerated networking: %s would also configure the VF (mlx4, mlx5 or '
                   'mana: the same MAC as the synthetic NIC), and DHCP on both breaks the '
                   'network of VMs with accelerated networking\n      fix: install '
                   'azure-vm-utils: its 10-azure-unmanaged-sriov.rules and '
                   '01-azure-unmanaged-sriov.network leave the VF to hv_netvsc')
        self.assert_ready(root, warning % '/etc/systemd/network/20-dhcp.network')
        # an unmanaged file read after the DHCP one comes too late
        write(os.path.join(root, 'etc/systemd/network/99-vf.network'),
              '[Match]\nDriver=mlx5_core mana\n\n[Link]\nUnmanaged=yes\n')
        self.assertIn(warning % '/etc/systemd/network/20-dhcp.network', self.check(root).stdout)
        os.rename(os.path.join(root, 'etc/systemd/network/99-vf.network'),
                  os.path.join(root, 'etc/systemd/network/10-vf.network'))
        self.assertIn('ok    accelerated networking: no configuration takes the VF (left to '
                      'hv_netvsc by /etc/systemd/network/10-vf.network)\n',
                      self.check(root).stdout)
        # matched by the synthetic NIC's driver, or by a name no VF has
        os.remove(os.path.join(root, 'etc/systemd/network/10-vf.network'))
        for match in ('Driver=hv_netvsc', 'Name=eth0'):
            write(os.path.join(root, 'etc/systemd/network/20-dhcp.network'),
                  '[Match]\n%s\n\n[Network]\nDHCP=yes\n' % match)
            self.assertIn('ok    accelerated networking: no configuration takes the VF\n',
                          self.check(root).stdout)
        # NetworkManager manages every NIC unless a udev rule says otherwise
        symlink('/lib/systemd/system/NetworkManager.service',
                os.path.join(root, WANTS % ('multi-user', 'NetworkManager.service')))
        self.assertIn(warning % 'NetworkManager (manages every NIC)', self.check(root).stdout)
        write(os.path.join(root, 'etc/udev/rules.d/10-azure-unmanaged-sriov.rules'),
              UNMANAGED_RULES)
        self.assertIn('ok    accelerated networking: no configuration takes the VF (left to '
                      'hv_netvsc by /etc/udev/rules.d/10-azure-unmanaged-sriov.rules)\n',
                      self.check(root).stdout)

    def test_who_formats_the_temporary_disk(self):
        root = self.copy()
        os.remove(os.path.join(root, 'usr/sbin/azure-ephemeral-disk-setup'))
        self.assertIn('info  temporary disk: nothing in the image formats or mounts it (waagent '
                      'and cloud-init did, on /mnt): azure-vm-utils\' azure-ephemeral-disk-setup, '
                      'or a hook in /etc/azure-provisioning/ready.d, can\n',
                      self.check(root).stdout)
        write(os.path.join(root, 'etc/fstab'),
              '/dev/disk/azure/resource-part1 /mnt ext4 defaults,nofail 0 2\n')
        self.assertIn('info  temporary disk: /etc/fstab mounts it (/dev/disk/azure/resource-part1 '
                      '/mnt)\n', self.check(root).stdout)

    def test_root_without_check_is_a_usage_error(self):
        run = run_command([sys.executable, '-I', SCRIPT, '--root', self.good])
        self.assertEqual(run.code, 2)
        self.assertIn('--root goes with --check', run.stderr)


if __name__ == '__main__':
    unittest.main()


class InitramfsBounds(unittest.TestCase):
    """Review finding 1: an .lzma initramfs whose header asks for a 2 GiB dictionary
    makes the decompressor allocate it up front: where memory is limited (a build VM,
    a container, ulimit -v) that is a MemoryError, which no check catches, so --check
    ends in "internal error: MemoryError" with exit 1 and prints none of its rows,
    where an untrusted initramfs must give one row and the rest of the report."""

    def test_an_lzma_initramfs_asking_for_a_huge_dictionary_is_one_row(self):
        import struct
        base = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, base, True)
        root = good_image(os.path.join(base, 'img'))
        packed = bytearray(lzma.compress(cpio('init'), format=lzma.FORMAT_ALONE))
        packed[1:5] = struct.pack('<I', 1 << 31)       # dictionary size in the header
        with open(os.path.join(root, 'boot/initrd.img-' + KERNEL), 'wb') as f:
            f.write(bytes(packed))
        run = run_command(['prlimit', '--as=%d' % (1 << 30), sys.executable, '-I', SCRIPT,
                           '--check', '--root', root])
        self.assertNotIn('internal error', run.stderr)
        self.assertEqual(run.code, 0, run)
        self.assertRegex(run.stdout, r'warn  Hyper-V drivers: kernel %s: .*/boot/initrd\.img-%s'
                         % (KERNEL, KERNEL))
        self.assertIn('image ready', run.stdout)


class InitramfsUnpackedLimit(unittest.TestCase):
    """Review finding 2: INITRAMFS_MAX bounds "what it unpacks to", but the zeros
    between archives (Unpacking.next_segment) are counted and never checked: an
    initramfs unpacking to endless zeros after its cpio trailer is read until the
    60 s deadline, not stopped at the byte limit like any other unpacked bytes."""

    def test_zeros_after_an_archive_count_against_the_unpacked_limit(self):
        import errno
        from unittest import mock
        import azure_provisioning as ap
        zeros = (b'\0' * (1 << 20) for _ in range(64))      # 64 MiB of padding
        pieces = [cpio('init')]
        with mock.patch.object(ap, 'INITRAMFS_MAX', 8 << 20):
            with self.assertRaises(OSError) as caught:
                ap.initramfs_names(iter(pieces + list(zeros)), {'hv_vmbus': r'hv_vmbus'})
        self.assertEqual(caught.exception.errno, errno.EFBIG)


class HostileNetworkMatch(unittest.TestCase):
    """Review finding 4: check_accelerated_networking matches the image's [Match]
    Name= patterns with fnmatch; before Python 3.9 fnmatch turns each '*' into '.*'
    and a pattern of many stars backtracks exponentially, so --check run by the
    image's own Python 3.6-3.8 (RHEL 8, Debian 10/11, Ubuntu 20.04) hangs on one
    line of an untrusted .network file instead of giving a row."""

    def test_a_name_pattern_of_many_stars_is_bounded_under_python_3_6(self):
        import glob
        pythons = sorted(glob.glob(os.path.expanduser('~/.pyenv/versions/3.6*/bin/python3')))
        if not pythons:
            self.skipTest('no Python 3.6 under ~/.pyenv')
        base = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, base, True)
        root = good_image(os.path.join(base, 'img'))
        write(os.path.join(root, 'etc/systemd/network/10-eth.network'),
              '[Match]\nName=%sX\n\n[Network]\nDHCP=yes\n' % ('*' * 40))
        run = run_command([pythons[-1], '-I', SCRIPT, '--check', '--root', root], timeout=30)
        self.assertNotIn('Traceback', run.stderr)
        self.assertIn('accelerated networking', run.stdout)


class KernelsThatAreNotDirectories(unittest.TestCase):
    """Review finding 5: installed_kernels takes every name starting with a digit in
    /lib/modules and /usr/lib/modules, then next() over the directories among them
    with no default: a dangling link or a plain file there (a removed kernel's
    leftover) raises StopIteration, which no check catches, so --check prints no row
    at all and ends "internal error: StopIteration" (exit 1)."""

    def test_a_dangling_link_in_lib_modules_is_one_row_not_the_end_of_check(self):
        base = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, base, True)
        root = good_image(os.path.join(base, 'img'))
        os.symlink('/nonexistent', os.path.join(root, 'usr/lib/modules/5.10.0-old-amd64'))
        run = run_command([sys.executable, '-I', SCRIPT, '--check', '--root', root])
        self.assertNotIn('internal error', run.stderr)
        self.assertIn('image ready', run.stdout)
        self.assertEqual(run.code, 0, run)


class CheckCrashStatus(unittest.TestCase):
    """Review finding 6: an internal error in --check (a bug, MemoryError, the
    StopIteration of finding 5) goes to main()'s catch-all, which returns 1:
    CHECK_NOT_READY.  install.sh decides by the status alone, so it says "installed,
    but the image is not ready to capture: fix the FAIL lines above" when no FAIL
    line (no row at all) was printed, and exits 0; at c4af033 install.sh failed the
    install when --check printed no verdict.  A crashed check needs a status of its
    own (not 0, 1 nor 3)."""

    def test_an_internal_error_in_check_is_not_the_not_ready_status(self):
        import io
        from unittest import mock
        import azure_provisioning as ap
        root = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, root, True)
        import signal
        self.addCleanup(signal.signal, signal.SIGTERM, signal.getsignal(signal.SIGTERM))
        stderr = io.StringIO()
        with mock.patch.object(ap, 'check_swap', side_effect=RuntimeError('a bug')), \
                mock.patch('sys.stdout', io.StringIO()) as stdout, \
                mock.patch('sys.stderr', stderr):
            code = ap.main(['--check', '--root', root])
        self.assertIn('internal error: RuntimeError: a bug', stderr.getvalue())
        self.assertNotIn('FAIL', stdout.getvalue())
        self.assertNotIn(code, (ap.CHECK_READY, ap.CHECK_NOT_READY, ap.CHECK_CANNOT_RUN))


class InitramfsThatIsADirectory(unittest.TestCase):
    """Review finding 7: check_initramfs picks the first INITRAMFS_NAMES path that
    stat() finds, whatever it is; Root.pieces gives None for a directory, read as
    `None or ()`: an empty archive.  So a directory at /boot/initrd.img-RELEASE
    (nothing read at all) becomes a blocking FAIL "hv_vmbus and hv_storvsc are
    modules not in /boot/initrd.img-...", a claim about contents never seen, where
    a FIFO at the same place is "not checked"."""

    def test_a_directory_where_the_initramfs_should_be_is_not_checked(self):
        base = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, base, True)
        root = good_image(os.path.join(base, 'img'))
        initrd = os.path.join(root, 'boot/initrd.img-' + KERNEL)
        os.remove(initrd)
        os.mkdir(initrd)
        run = run_command([sys.executable, '-I', SCRIPT, '--check', '--root', root])
        self.assertNotIn('are modules not in', run.stdout)
        self.assertRegex(run.stdout, r'warn  Hyper-V drivers: kernel %s: .*not checked' % KERNEL)
        self.assertEqual(run.code, 0, run)


class SwapOnTheTemporaryDisk(unittest.TestCase):
    """Review finding 9: check_swap calls every fstab swap entry "swap on the OS
    disk", also one on the temporary disk (/dev/disk/cloud/azure_resource-part2, the
    place the same row's fix recommends, and which check_temporary_disk recognises
    by that very name)."""

    def test_swap_on_the_resource_disk_is_not_swap_on_the_os_disk(self):
        base = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, base, True)
        root = good_image(os.path.join(base, 'img'))
        write(os.path.join(root, 'etc/fstab'),
              'UUID=0a1b2c3d / ext4 defaults 0 1\n'
              '/dev/disk/cloud/azure_resource-part2 none swap sw,nofail 0 0\n')
        run = run_command([sys.executable, '-I', SCRIPT, '--check', '--root', root])
        self.assertNotIn('warn  swap on the OS disk', run.stdout)
        self.assertIn('ok    no swap on the OS disk\n', run.stdout)


class GlobMatches(unittest.TestCase):
    """glob_matches answers as fnmatch.fnmatchcase does (classes, '!', a '[' never
    closed, ']' first in a class), in time bounded by the pattern's length; a range
    ending before it starts matches nothing, as from Python 3.9 (before, fnmatch
    raises re.error)."""

    @staticmethod
    def fnmatch(name, pattern):
        import fnmatch
        import re
        try:
            return fnmatch.fnmatchcase(name, pattern)
        except re.error:
            return False

    def test_it_answers_as_fnmatch_does(self):
        import itertools
        import random
        from azure_provisioning import glob_matches
        chance = random.Random(21)
        checked = 0
        for _ in range(20000):
            pattern = ''.join(chance.choice('ab*?[]!-c') for _ in range(chance.randint(0, 8)))
            for name in itertools.islice(('', 'a', 'ab-', ']b[', 'cab!', 'a*c?'), 6):
                self.assertEqual(glob_matches(pattern, name), self.fnmatch(name, pattern),
                                 (pattern, name))
                checked += 1
        self.assertEqual(checked, 120000)
        for pattern, name in (('enP*s1', 'enP30832s1'), ('e[nt]*', 'eth1'), ('[!e]*', 'eth1'),
                              ('mlx[45]_*', 'mlx5_core')):
            self.assertEqual(glob_matches(pattern, name), self.fnmatch(name, pattern))
        import time
        started = time.monotonic()      # fnmatch itself takes hours here before 3.9
        self.assertFalse(glob_matches('*?' * 4000 + 'X', 'enP30832s1'))
        self.assertTrue(glob_matches('*?' * 4 + '*1', 'enP30832s1'))
        self.assertLess(time.monotonic() - started, 2)


class SwapWhereTheTemporaryDiskIsMounted(unittest.TestCase):
    """A swap file where the fstab mounts the temporary disk is on it; one elsewhere
    is still swap on the OS disk."""

    def test_a_swap_file_in_the_resource_mount_is_not_on_the_os_disk(self):
        base = tempfile.mkdtemp(prefix='azp-swap-')
        self.addCleanup(shutil.rmtree, base, True)
        root = good_image(os.path.join(base, 'img'))
        fstab = ('UUID=0a1b2c3d / ext4 defaults 0 1\n'
                 '/dev/disk/azure/resource-part1 /mnt/resource ext4 nofail 0 2\n'
                 '/dev/disk/cloud/azure_resource-part2 none swap sw,nofail 0 0\n'
                 '/mnt/resource/swapfile none swap sw 0 0\n')
        write(os.path.join(root, 'etc/fstab'), fstab)
        run = run_command([sys.executable, '-I', SCRIPT, '--check', '--root', root])
        self.assertIn('ok    no swap on the OS disk\n', run.stdout)
        self.assertNotIn('warn  swap', run.stdout)
        write(os.path.join(root, 'etc/fstab'), fstab + '/mnt/resourcex/swap none swap sw 0 0\n')
        run = run_command([sys.executable, '-I', SCRIPT, '--check', '--root', root])
        self.assertIn('warn  swap on the OS disk (/mnt/resourcex/swap none swap)', run.stdout)


class MemoryErrorInACheck(unittest.TestCase):
    """A MemoryError in one check (what an image's file asked for) is that check's
    row; the others still run and the report has its verdict."""

    def test_a_memory_error_is_one_row(self):
        import io
        from unittest import mock
        import azure_provisioning as ap
        base = tempfile.mkdtemp(prefix='azp-memory-')
        self.addCleanup(shutil.rmtree, base, True)
        root = good_image(os.path.join(base, 'img'))
        out = io.StringIO()

        def check_swap(c):
            raise MemoryError()
        with mock.patch.object(ap, 'check_swap', check_swap):
            code = ap.check_image(root, out)
        self.assertEqual(code, ap.CHECK_READY, out.getvalue())
        self.assertIn('warn  swap: out of memory: not checked\n', out.getvalue())
        self.assertIn('ok    Hyper-V KVP daemon', out.getvalue())
        self.assertIn('image ready: 0 blocking, 1 warnings', out.getvalue())
