"""Hostname section: choosing, validating, /etc/hosts, atomic writes."""

import json
import os
import shutil
import socket
import stat
import tempfile
import unittest

import azure_provisioning as ap
from tests.support import DATA, SCRIPT, in_root, is_root, one_step, run_command, skip


def run_in(tmp):
    """The System whose filesystem root is tmp: /etc/hosts is tmp/etc/hosts."""
    return in_root(tmp)[0]


def temporary_root(test):
    """(root, its etc directory), removed after the test."""
    root = tempfile.mkdtemp(prefix='azp-root-')
    test.addCleanup(shutil.rmtree, root)
    os.mkdir(os.path.join(root, 'etc'))
    return root, os.path.join(root, 'etc')


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


RHEL_HOSTS = ('127.0.0.1   localhost localhost.localdomain localhost4 localhost4.localdomain4\n'
              '::1         localhost localhost.localdomain localhost6 localhost6.localdomain6\n')


class EtcHosts(unittest.TestCase):
    def test_rhel_template_name_is_not_replaced(self):
        # RHEL, Alma and Rocky images are named localhost.localdomain: renaming it would
        # make the VM's own name resolve to ::1
        tmp, etc = temporary_root(self)
        with open(os.path.join(etc, 'hosts'), 'w') as f:
            f.write(RHEL_HOSTS)
        for old in ('localhost.localdomain', 'localhost', 'localhost4', 'LOCALHOST.localdomain',
                    'localhost6.localdomain6'):
            with self.subTest(old=old):
                self.assertFalse(ap.update_etc_hosts(run_in(tmp), old, 'web-7'))
        with open(os.path.join(etc, 'hosts')) as f:
            self.assertEqual(f.read(), RHEL_HOSTS)

    def test_loopback_lines_are_never_renamed(self):
        text = ('127.0.0.1 localhost old-name\n::1 localhost old-name\n'
                '0:0:0:0:0:0:0:1 old-name\n127.000.000.001 old-name\n127.0.1.1 old-name\n'
                '10.0.0.4 old-name.internal\n')
        self.assertEqual(ap.rename_in_hosts(text, 'old-name', 'web-7'), text.replace(
            '127.0.1.1 old-name', '127.0.1.1 web-7').replace('10.0.0.4 old-name.', '10.0.0.4 web-7.'))
        self.assertEqual(ap.rename_in_hosts(RHEL_HOSTS, 'localhost', 'web-7'), RHEL_HOSTS)


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
        tmp, etc = temporary_root(self)
        path = os.path.join(etc, 'hosts')
        with open(path, 'w') as f:
            f.write(DEBIAN_HOSTS)
        os.chmod(path, 0o640)
        before = os.stat(path).st_ino
        self.assertTrue(ap.update_etc_hosts(run_in(tmp), 'old-name', 'web-7'))
        with open(path) as f:
            self.assertIn('127.0.1.1\tweb-7.example.com\tweb-7\n', f.read())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertNotEqual(os.stat(path).st_ino, before, 'not replaced by rename')
        self.assertEqual(os.listdir(etc), ['hosts'])
        # nothing carries the name any more: not rewritten again
        self.assertFalse(ap.update_etc_hosts(run_in(tmp), 'old-name', 'web-7'))
        self.assertFalse(ap.update_etc_hosts(run_in(tmp), 'localhost', 'web-7'))

    def test_missing_hosts_file_is_not_created(self):
        tmp, etc = temporary_root(self)
        self.assertFalse(ap.update_etc_hosts(run_in(tmp), 'a', 'b'))
        self.assertEqual(os.listdir(etc), [])


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

    def test_the_mode_asked_for_is_enforced_on_an_existing_file(self):
        for asked, before in [(0o600, 0o666), (0o440, 0o644), (0o644, 0o600)]:
            with self.subTest(asked=oct(asked), before=oct(before)):
                # made afresh: the last round left it 0440, which only root could reopen
                if os.path.exists(self.path):
                    os.unlink(self.path)
                with open(self.path, 'w') as f:
                    f.write('old\n')
                os.chmod(self.path, before)
                ap.write_file_atomically(self.path, b'new\n', mode=asked)
                self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), asked)
        os.chmod(self.path, 0o640)      # not asked: kept
        ap.write_file_atomically(self.path, b'again\n')
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    def test_selinux_label_of_the_old_file_is_given_to_the_new_one(self):
        # the same code with a user.* attribute: security.selinux needs SELinux itself
        target = os.path.join(self.tmp, 'etc-hosts')
        with open(target, 'w') as f:
            f.write('old\n')
        os.setxattr(target, 'user.azp-label', b'system_u:object_r:net_conf_t:s0\0')
        for name, value in (('SELINUX_XATTR', 'user.azp-label'),
                            ('SELINUX_FS', os.path.join(self.tmp, 'no-selinux'))):
            self.addCleanup(setattr, ap, name, getattr(ap, name))
            setattr(ap, name, value)
        ap.write_file_atomically(target, b'one\n')
        with self.assertRaises(OSError):        # SELinux off: not copied
            os.getxattr(target, 'user.azp-label')
        os.setxattr(target, 'user.azp-label', b'system_u:object_r:net_conf_t:s0\0')
        ap.SELINUX_FS = self.tmp                # SELinux on
        ap.write_file_atomically(target, b'two\n')
        self.assertEqual(os.getxattr(target, 'user.azp-label'),
                         b'system_u:object_r:net_conf_t:s0\0')
        with open(target) as f:
            self.assertEqual(f.read(), 'two\n')
        # an old file without a label (no policy loaded): nothing to copy, no failure
        bare = os.path.join(self.tmp, 'bare')
        with open(bare, 'w') as f:
            f.write('x\n')
        ap.write_file_atomically(bare, b'y\n')
        with self.assertRaises(OSError):
            os.getxattr(bare, 'user.azp-label')

    def test_a_stale_temporary_file_of_the_same_pid_is_replaced(self):
        # a power cut left .NAME.PID.tmp; early-boot PIDs repeat, so ours may match
        with open(self.path, 'w') as f:
            f.write('old\n')
        stale = os.path.join(self.tmp, '.hostname.%d.tmp' % os.getpid())
        with open(stale, 'w') as f:
            f.write('half')
        ap.write_file_atomically(self.path, b'new\n')
        with open(self.path) as f:
            self.assertEqual(f.read(), 'new\n')
        self.assertEqual(os.listdir(self.tmp), ['hostname'])

    def test_sigterm_during_a_write_leaves_no_temporary_file(self):
        code = ('import signal, sys; sys.path.insert(0, %r); import azure_provisioning as ap; '
                'signal.signal(signal.SIGTERM, ap.raise_terminated); '
                'print("writing", flush=True); '
                'ap.write_file_atomically(%r, b"new", check=["sh", "-c", "sleep 30", "sh"])' % (
                    os.path.dirname(SCRIPT), self.path))
        with open(self.path, 'w') as f:
            f.write('old\n')
        import subprocess
        import sys
        child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        self.assertEqual(child.stdout.readline(), 'writing\n')
        for _ in range(100):    # the temporary file exists while the check runs
            if len(os.listdir(self.tmp)) == 2:
                break
            import time
            time.sleep(0.05)
        self.assertEqual(len(os.listdir(self.tmp)), 2, os.listdir(self.tmp))
        child.terminate()
        _, err = child.communicate(timeout=20)
        self.assertNotEqual(child.returncode, 0)
        self.assertIn('Terminated', err)
        self.assertEqual(os.listdir(self.tmp), ['hostname'])
        with open(self.path) as f:
            self.assertEqual(f.read(), 'old\n')

    def test_read_bytes_of_a_path_that_names_no_file_is_none(self):
        # paths come from an image's config files (NETWORK_FILE=, dhclient -cf): found by
        # tests/fuzz.py as OSError and ValueError escaping the DHCP step
        loop = os.path.join(self.tmp, 'loop')
        os.symlink(loop, loop)
        for path in (os.path.join(self.tmp, 'missing'), self.tmp, self.tmp + '/',
                     self.path + '/x', os.path.join(self.tmp, 'x' * 5000), loop,
                     os.path.join(self.tmp, 'nul\0byte')):
            with self.subTest(path=path[:60]):
                self.assertIsNone(ap.read_bytes(path))
        with open(self.path, 'wb') as f:
            f.write(b'web-7\n')
        self.assertEqual(ap.read_bytes(self.path), b'web-7\n')

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


class AlreadyLive(unittest.TestCase):
    """The live name is already the one asked for (a run stopped after sethostname):
    nothing is renamed, but /etc/hostname must say it too, or the next boot loses it."""

    def setUp(self):
        from tests.test_transport import QuietLog
        self.root = tempfile.mkdtemp(prefix='azp-root-')
        self.addCleanup(shutil.rmtree, self.root)
        os.makedirs(os.path.join(self.root, 'etc'))
        self.path = os.path.join(self.root, 'etc/hostname')
        self.system, facts = in_root(self.root, QuietLog())
        self.facts = facts._replace(metadata={
            'compute': {'osProfile': {'computerName': socket.gethostname()}}})

    def step(self):
        """The hostname step; (its warnings, its plan)."""
        facts, plan = one_step(ap.plan_hostname, self.system, self.facts)
        self.assertEqual(facts.hostname, socket.gethostname())
        return facts.warnings, plan

    def test_a_stale_etc_hostname_is_written(self):
        with open(self.path, 'w') as f:
            f.write('image-template\n')
        warnings, plan = self.step()
        # the live name is right: its file alone is written, and failing it fails no VM
        self.assertEqual([(a.says, a.fatal) for a in plan],
                         [('write /etc/hostname: %s' % socket.gethostname(), False)])
        with open(self.path) as f:
            self.assertEqual(f.read(), socket.gethostname() + '\n')
        self.assertRegex(self.system.log.lines[-1], r'already %s; /etc/hostname written'
                         % socket.gethostname())
        self.assertEqual(warnings, ())

    def test_a_file_that_cannot_be_written_is_a_warning_not_a_failure(self):
        # the live name is right: the VM is usable, and must not be reported failed
        os.mkdir(self.path)
        warnings, _ = self.step()
        self.assertEqual(len(warnings), 1, warnings)
        self.assertRegex(warnings[0], r'/etc/hostname not written: ')

    def test_a_new_files_label_that_cannot_be_set_is_a_warning(self):
        selinux = os.path.join(self.root, 'selinuxfs')
        os.mkdir(selinux)
        bin_dir = os.path.join(self.root, 'bin')
        os.mkdir(bin_dir)
        with open(os.path.join(bin_dir, 'restorecon'), 'w') as f:
            f.write('#!/bin/sh\necho "restorecon: no policy" >&2\nexit 1\n')
        os.chmod(os.path.join(bin_dir, 'restorecon'), 0o755)
        saved = ap.SELINUX_FS, os.environ['PATH']
        ap.SELINUX_FS, os.environ['PATH'] = selinux, bin_dir + os.pathsep + saved[1]
        try:
            warnings, _ = self.step()
        finally:
            ap.SELINUX_FS, os.environ['PATH'] = saved
        with open(self.path) as f:
            self.assertEqual(f.read(), socket.gethostname() + '\n')
        self.assertEqual(len(warnings), 1, warnings)
        self.assertRegex(warnings[0], r'restorecon failed: restorecon: no policy')


class SystemSystemd(unittest.TestCase):
    """With systemd running (faked by a private /run), systemd is asked (systemctl)
    only when the process shares PID 1's UTS namespace."""

    def system_systemd(self, inner=''):
        if not is_root():
            skip(self, 'needs root for unshare')
        code = ('import sys; sys.path.insert(0, %r); import azure_provisioning as ap; '
                'print(ap.system_systemd())' % os.path.dirname(SCRIPT))
        # a private PID namespace makes the shell PID 1, so /proc/1 is readable
        shell = ('mount -t tmpfs none /run && mkdir -p /run/systemd/system && '
                 '%s python3 -c "$1"' % inner)
        run = run_command(['unshare', '--pid', '--fork', '--mount-proc', '--mount',
                           'sh', '-c', shell, 'sh', code])
        self.assertEqual(run.code, 0, run)
        return run.stdout.strip()

    def test_same_uts_namespace_as_pid_1(self):
        self.assertEqual(self.system_systemd(), 'True')

    def test_never_from_another_uts_namespace(self):
        self.assertEqual(self.system_systemd('unshare --uts'), 'False')


if __name__ == '__main__':
    unittest.main()
