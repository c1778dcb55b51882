"""Hostname section: choosing, validating, /etc/hosts, atomic writes."""

import json
import os
import shutil
import stat
import tempfile
import unittest

import azure_provisioning as ap
from tests.support import DATA, SCRIPT, is_root, run_command, skip


def metadata(name):
    with open(os.path.join(DATA, name), encoding='utf-8') as f:
        return json.load(f)


class ChoosingTheName(unittest.TestCase):
    def test_computer_name_wins_over_resource_name(self):
        document = metadata('azure-docs__imds-full-instance-response-linux.json')
        document['compute']['name'] = 'vmss_3'
        self.assertEqual(ap.desired_hostname(document), 'examplevmname')

    def test_resource_name_when_there_is_no_os_profile(self):
        document = metadata('walinuxagent__valid.json')
        self.assertNotIn('osProfile', document['compute'])
        self.assertEqual(ap.desired_hostname(document), 'health')

    def test_real_document_with_padding_in_values(self):
        document = metadata('azure-init__two-bad-then-success-response200.json')
        self.assertEqual(ap.desired_hostname(document), 'temp-vm')
        self.assertEqual(ap.compute_field(document, 'vmId'), '12345678-90ab-cdef-1234-567890abcdef')

    def test_odd_shapes_give_empty_not_a_crash(self):
        for document in [{'compute': {}}, {'compute': {'osProfile': None, 'name': 5}},
                         {'compute': {'osProfile': {'computerName': ['x']}}}]:
            self.assertEqual(ap.desired_hostname(document), '')


class Validation(unittest.TestCase):
    def test_good_names(self):
        for name in ['web-7', 'a', 'A1', 'x' * 63, 'node-1.example.com', '0start',
                     'a' * 31 + '.' + 'b' * 32]:
            self.assertEqual(ap.validate_hostname(name), name)

    def test_bad_names(self):
        for name in ['', 'bad_name', '-lead', 'trail-', 'a..b', '.lead', 'sp ace', 'new\nline',
                     'x' * 65, 'a' * 64 + '.b', 'ünï', 'a;rm -rf /', '$(id)', 'x' * 64 + 'y']:
            with self.subTest(name=name):
                with self.assertRaises(ap.ProvisioningError) as caught:
                    ap.validate_hostname(name)
                self.assertNotIn('\n', str(caught.exception))

    def test_label_of_64_is_refused(self):
        with self.assertRaises(ap.ProvisioningError):
            ap.validate_hostname('a' * 64)


DEBIAN_HOSTS = ('127.0.0.1\tlocalhost\n127.0.1.1\told-name.example.com\told-name\n\n'
                '# old-name is the template; keep this comment\n'
                '::1     localhost ip6-localhost ip6-loopback\n'
                '10.0.0.5 old-names other old-name-2  # old-name\n')


class EtcHosts(unittest.TestCase):
    def test_only_the_old_name_changes(self):
        changed = ap.rename_in_hosts(DEBIAN_HOSTS, 'old-name', 'web-7')
        self.assertEqual(changed, DEBIAN_HOSTS.replace(
            '127.0.1.1\told-name.example.com\told-name',
            '127.0.1.1\tweb-7.example.com\tweb-7'))

    def test_no_trailing_newline_and_crlf_survive(self):
        self.assertEqual(ap.rename_in_hosts('127.0.1.1 a', 'a', 'b'), '127.0.1.1 b')
        self.assertEqual(ap.rename_in_hosts('127.0.1.1 a\r\n', 'a', 'b'), '127.0.1.1 b\r\n')

    def test_split_keeping_spaces(self):
        for text in ['127.0.1.1\told  old.x  ', '  ::1 a\t\tb\n', '', ' ', 'one', 'a\u00a0b']:
            with self.subTest(text=text):
                parts = ap.split_keeping_spaces(text)
                self.assertEqual(''.join(parts), text)
                self.assertEqual([p for p in parts if not p.isspace()], text.split())
                self.assertFalse(any(a.isspace() == b.isspace() for a, b in zip(parts, parts[1:])))

    def test_leading_whitespace_keeps_the_address_first(self):
        self.assertEqual(ap.rename_in_hosts('  127.0.1.1  a # a\n', 'a', 'b'),
                         '  127.0.1.1  b # a\n')
        self.assertEqual(ap.rename_in_hosts('\t10.0.0.1 x\n', '10.0.0.1', 'b'), '\t10.0.0.1 x\n')

    def test_address_column_is_never_renamed(self):
        self.assertEqual(ap.rename_in_hosts('a b\n', 'a', 'z'), 'a b\n')

    def test_file_rewritten_atomically_with_mode_kept(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, 'hosts')
        with open(path, 'w') as f:
            f.write(DEBIAN_HOSTS)
        os.chmod(path, 0o640)
        before = os.stat(path).st_ino
        self.assertTrue(ap.update_etc_hosts('old-name', 'web-7', tmp))
        with open(path) as f:
            self.assertIn('127.0.1.1\tweb-7.example.com\tweb-7\n', f.read())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertNotEqual(os.stat(path).st_ino, before, 'not replaced by rename')
        self.assertEqual(os.listdir(tmp), ['hosts'])
        # nothing carries the name any more: not rewritten again
        self.assertFalse(ap.update_etc_hosts('old-name', 'web-7', tmp))
        self.assertFalse(ap.update_etc_hosts('localhost', 'web-7', tmp))

    def test_missing_hosts_file_is_not_created(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        self.assertFalse(ap.update_etc_hosts('a', 'b', tmp))
        self.assertEqual(os.listdir(tmp), [])


class AtomicWrite(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.path = os.path.join(self.tmp, 'hostname')

    def test_new_file_gets_0644(self):
        ap.write_file_atomically(self.path, b'web-7\n')
        with open(self.path, 'rb') as f:
            self.assertEqual(f.read(), b'web-7\n')
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)

    def test_failed_write_leaves_the_old_file_and_no_temp(self):
        with open(self.path, 'w') as f:
            f.write('old\n')
        with self.assertRaises(TypeError):
            ap.write_file_atomically(self.path, 'not bytes')
        with open(self.path) as f:
            self.assertEqual(f.read(), 'old\n')
        self.assertEqual(os.listdir(self.tmp), ['hostname'])

    def test_unwritable_directory_is_an_oserror(self):
        if is_root():
            skip(self, 'root can write anywhere; read-only /etc is covered in the '
                          'black-box tests')
        os.chmod(self.tmp, 0o500)
        self.addCleanup(os.chmod, self.tmp, 0o700)
        with self.assertRaises(OSError):
            ap.write_file_atomically(self.path, b'x\n')


class HostnamectlChoice(unittest.TestCase):
    """With systemd running (faked by a private /run), hostnamectl is chosen only
    when the process shares PID 1's UTS namespace."""

    def usable(self, inner=''):
        if not is_root():
            skip(self, 'needs root for unshare')
        code = ('import sys; sys.path.insert(0, %r); import azure_provisioning as ap; '
                'print(ap.hostnamectl_usable())' % os.path.dirname(SCRIPT))
        # a private PID namespace makes the shell PID 1, so /proc/1 is readable
        shell = ('mount -t tmpfs none /run && mkdir -p /run/systemd/system && '
                 '%s python3 -c "$1"' % inner)
        run = run_command(['unshare', '--pid', '--fork', '--mount-proc', '--mount',
                           'sh', '-c', shell, 'sh', code])
        self.assertEqual(run.code, 0, run)
        return run.stdout.strip()

    def test_same_uts_namespace_as_pid_1(self):
        if not os.access('/usr/bin/hostnamectl', os.X_OK):
            skip(self, 'hostnamectl is not installed here')
        self.assertEqual(self.usable(), 'True')

    def test_never_hostnamectl_from_another_uts_namespace(self):
        self.assertEqual(self.usable('unshare --uts'), 'False')


if __name__ == '__main__':
    unittest.main()
