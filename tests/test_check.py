"""--check: a good image tree passes; each common mistake fails (or warns) with
the exact line and fix; exit codes are observed on the real command."""

import os
import shutil
import sys
import tempfile
import unittest

from tests.support import SCRIPT, run_command
from tests.test_install import make_image, run as run_install, symlink, write

INSTALL_SH = os.path.join(os.path.dirname(SCRIPT), 'install.sh')
WANTS = 'etc/systemd/system/%s.target.wants/%s'


def good_image(root):
    make_image(root)
    for module in ('json/__init__.py', 'xml/parsers/expat.py', 'base64.py', 'shutil.py'):
        write(os.path.join(root, 'usr/lib/python3.11', module), '')
    write(os.path.join(root, 'etc/systemd/network/20-dhcp.network'),
          '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n')
    for target, unit in (('multi-user', 'systemd-networkd.service'),
                         ('network-online', 'systemd-networkd-wait-online.service')):
        symlink('/lib/systemd/system/' + unit, os.path.join(root, WANTS % (target, unit)))
    write(os.path.join(root, 'usr/bin/hostnamectl'), '#!/bin/sh\n', 0o755)
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

    def assert_blocked(self, root, *lines):
        run = self.check(root)
        self.assertEqual(run.code, 1, run)
        for line in lines:
            self.assertIn(line, run.stdout)
        self.assertRegex(run.stdout, r'image NOT ready: \d+ blocking, \d+ warnings \(%s\)\n$' % root)
        return run

    def test_good_image_passes(self):
        run = self.check(self.good)
        self.assertEqual(run.code, 0, run)
        self.assertEqual(run.stdout, (
            'ok    unit installed: /etc/systemd/system/azure-provisioning.service\n'
            'ok    unit enabled\n'
            'ok    ExecStart: /usr/bin/python3 -I -S /usr/local/sbin/azure-provisioning\n'
            'ok    module /usr/local/lib/azure-provisioning/azure_provisioning.py, byte-compiled\n'
            'ok    /usr/bin/python3 is Python 3.11 with json, xml.parsers.expat, base64, '
            'shutil\n'
            'ok    walinuxagent not installed\n'
            'ok    cloud-init not installed\n'
            'ok    DHCP: systemd-networkd (/etc/systemd/network/20-dhcp.network)\n'
            'ok    network-online.target waits for systemd-networkd-wait-online.service\n'
            'ok    hostnamectl present\n'
            'info  /etc/hosts line "127.0.1.1 image-template" will get the new name at first boot\n'
            'image ready: 0 blocking, 0 warnings (%s)\n' % self.good))

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
        self.assert_blocked(root, 'FAIL  ExecStart interpreter /usr/bin/python3 does not exist')

    def test_python_minimal_without_json_and_xml(self):
        root = self.copy()
        for package in ('json', 'xml'):
            shutil.rmtree(os.path.join(root, 'usr/lib/python3.11', package))
        self.assert_blocked(root, 'FAIL  /usr/bin/python3 lacks json, xml.parsers.expat '
                                  '(python3-minimal is not enough)\n      fix: apt-get install python3')

    def test_python_too_old(self):
        root = self.copy()
        os.rename(os.path.join(root, 'usr/bin/python3.11'), os.path.join(root, 'usr/bin/python3.5'))
        os.unlink(os.path.join(root, 'usr/bin/python3'))
        os.symlink('python3.5', os.path.join(root, 'usr/bin/python3'))
        self.assert_blocked(root, 'FAIL  /usr/bin/python3 is Python 3.5; 3.6 or newer is needed')

    def test_walinuxagent_installed(self):
        root = self.copy()
        write(os.path.join(root, 'usr/sbin/waagent'), '#!/bin/sh\n', 0o755)
        self.assert_blocked(root, 'FAIL  walinuxagent is present (/usr/sbin/waagent): it would '
                                  'report to Azure too\n      fix: apt-get purge walinuxagent')

    def test_cloud_init_enabled(self):
        root = self.copy()
        symlink('/lib/systemd/system/cloud-init.service',
                os.path.join(root, WANTS % ('multi-user', 'cloud-init.service')))
        self.assert_blocked(root, 'FAIL  cloud-init is present (cloud-init.service enabled)')

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

    def test_no_wait_online_warns(self):
        root = self.copy()
        os.unlink(os.path.join(root, WANTS % ('network-online',
                                               'systemd-networkd-wait-online.service')))
        run = self.check(root)
        self.assertEqual(run.code, 0, run)
        self.assertIn('warn  no wait-online service enabled', run.stdout)

    def test_root_without_check_is_a_usage_error(self):
        run = run_command([sys.executable, '-I', SCRIPT, '--root', self.good])
        self.assertEqual(run.code, 2)
        self.assertIn('--root goes with --check', run.stderr)


if __name__ == '__main__':
    unittest.main()
