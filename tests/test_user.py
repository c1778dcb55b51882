"""Admin user and SSH keys (--provision-user): validation, plans on temporary roots,
runs on a temporary root up to the first account tool (no root needed), then real
runs in a private /etc, /home and /root (root only)."""

import base64
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import azure_provisioning as ap
from tests.fake_azure import DEFAULT_VM_ID, FakeAzure
from tests.support import (SCRIPT, PrivateHost, TemporaryRoot, in_root, one_step, require_root,
                           run_command, skip, tree_snapshot)
from tests.test_transport import QuietLog


def key(kind='ssh-ed25519', comment='alice@laptop', filler=b'\x07'):
    blob = struct.pack('>I', len(kind)) + kind.encode() + struct.pack('>I', 32) + filler * 32
    return ('%s %s %s' % (kind, base64.b64encode(blob).decode(), comment)).strip()


class Validation(unittest.TestCase):
    def test_user_names(self):
        for good in ['alice', 'a', '_svc', 'ops-1', 'x' * 32]:
            self.assertEqual(ap.validate_user_name(good), good)
        for bad in ['', 'Alice', '1abc', '-x', 'a b', 'x' * 33, 'al:ice', 'a/b', '../x', 'é']:
            with self.subTest(name=bad):
                with self.assertRaisesRegex(ap.ProvisioningError, 'invalid admin user name'):
                    ap.validate_user_name(bad)

    def test_keys_are_normalized(self):
        line = key()
        for raw in [line + '\n', line + '\r\n', '  ' + line + '  ', line.replace(' ', '\t')]:
            self.assertEqual(ap.validate_public_key(raw), line)
        self.assertEqual(ap.validate_public_key(key(comment='')), key(comment=''))
        self.assertEqual(ap.validate_public_key(key('ssh-rsa')), key('ssh-rsa'))

    def test_bad_keys(self):
        good_body = key().split()[1]
        for bad in ['', 'ssh-rsa', 'ssh-rsa 0', 'ssh-ed25519 !!!notbase64', 'nope ' + good_body,
                    'ssh-rsa ' + good_body,            # blob says ssh-ed25519
                    'command="rm -rf /" ' + key(), None, 42]:
            with self.subTest(key=bad):
                with self.assertRaisesRegex(ap.ProvisioningError, 'invalid SSH public key'):
                    ap.validate_public_key(bad)

    def test_user_from_metadata(self):
        metadata = {'compute': {'osProfile': {'adminUsername': 'alice',
                                              'disablePasswordAuthentication': 'true'},
                                'publicKeys': [{'keyData': key() + '\r\n', 'path': '/p'},
                                               {'keyData': key(), 'path': '/q'}]}}
        self.assertEqual(ap.user_from_metadata(metadata),
                         ('alice', [key()], ['/p', '/q'], 'no', None))
        metadata['compute']['publicKeys'] = 'x'
        with self.assertRaises(ap.ProvisioningError):
            ap.user_from_metadata(metadata)

    def test_key_path_must_stay_in_the_home(self):
        log = QuietLog()
        default = '/home/alice/.ssh/authorized_keys'
        for path, expected in [('/home/alice/.ssh/authorized_keys', default),
                               ('/home/alice/.ssh/keys2', '/home/alice/.ssh/keys2'),
                               ('/root/.ssh/authorized_keys', default),
                               ('/home/alice/../root/.ssh/authorized_keys', default),
                               ('/home/alicex/.ssh/authorized_keys', default),
                               ('relative/keys', default), ('', default)]:
            with self.subTest(path=path):
                self.assertEqual(ap.authorized_keys_path('/home/alice', [path], log), expected)
        inside = ['/home/alice/.ssh/z_keys', '/home/alice/.ssh/a_keys']
        for _ in range(5):      # IMDS's order, whatever the hash seed
            self.assertEqual(ap.authorized_keys_path('/home/alice', inside, log), inside[0])


SSHD_CONFIG = 'Include /etc/ssh/sshd_config.d/*.conf\n\nKbdInteractiveAuthentication no\n'

# A real SHA-512 crypt hash (openssl passwd -6 -salt Qx7bL2mN 'correct horse battery staple'):
# an account that was made with a password, unlike the one useradd makes ('!').
PASSWORD_HASH = ('$6$Qx7bL2mN$Iw5CTyRQ6oDFaq.T0mJqyeSPT3c41VBdrN85uFtd4NYz5Fjuj.nonVzTHqoRFTl'
                 'bKbtFnAszvnXW5I.RYfcVN/')


def sshd_plan(logins):
    """The sshd part of the user step, as a step's planner."""
    return lambda facts, system: ap.sshd_plan(facts, system, logins)


class SshdDirectory(unittest.TestCase):
    """Issue 20 (8), in a temporary root: the sshd_config.d made for the drop-in is
    0755 whatever the umask, and gets its SELinux label with the drop-in (a stand-in
    restorecon on PATH, SELinux said to be on)."""

    def test_made_and_labelled(self):
        root = tempfile.mkdtemp(prefix='azp-sshd-')
        self.addCleanup(shutil.rmtree, root)
        os.makedirs(os.path.join(root, 'etc', 'ssh'))
        with open(os.path.join(root, 'etc', 'ssh', 'sshd_config'), 'w') as f:
            f.write(SSHD_CONFIG)
        tools = os.path.join(root, 'tools')
        os.mkdir(tools)
        with open(os.path.join(tools, 'restorecon'), 'w') as f:
            f.write('#!/bin/sh\necho "$*" >> "%s/restorecon.log"\n' % tools)
        os.chmod(os.path.join(tools, 'restorecon'), 0o755)
        system, facts = in_root(root)
        old_umask = os.umask(0o077)
        self.addCleanup(os.umask, old_umask)
        with mock.patch.object(ap, 'SELINUX_FS', tools), \
                mock.patch.object(ap, 'restart_sshd') as restart, \
                mock.patch.dict(os.environ, {'PATH': tools + os.pathsep + os.environ['PATH']}):
            one_step(sshd_plan('yes'), system, facts)
        directory = os.path.join(root, 'etc', 'ssh', 'sshd_config.d')
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o755)
        with open(os.path.join(directory, '50-azure-provisioning.conf')) as f:
            self.assertEqual(f.read().splitlines()[-1], 'PasswordAuthentication yes')
        with open(os.path.join(tools, 'restorecon.log')) as f:
            self.assertEqual(f.read(), '-R %s\n' % directory)
        self.assertEqual(restart.call_count, 1)
        self.assertIn('user: made /etc/ssh/sshd_config.d (0755)', system.log.lines)

    def test_what_cannot_hold_the_drop_in_is_left_alone(self):
        """A file, a dangling link, a link out of the root where sshd_config.d should
        be: a warning (in the KVP report too), nothing written, nothing made; a link
        to a directory of the image is the directory."""
        outside = tempfile.mkdtemp(prefix='azp-sshd-outside-')
        self.addCleanup(shutil.rmtree, outside)
        for kind in ('file', 'dangling link', 'link out', 'link in'):
            with self.subTest(kind=kind):
                root = tempfile.mkdtemp(prefix='azp-sshd-')
                self.addCleanup(shutil.rmtree, root)
                os.makedirs(os.path.join(root, 'etc', 'ssh', 'real.d'))
                with open(os.path.join(root, 'etc', 'ssh', 'sshd_config'), 'w') as f:
                    f.write(SSHD_CONFIG)
                directory = os.path.join(root, 'etc', 'ssh', 'sshd_config.d')
                if kind == 'file':
                    open(directory, 'w').close()
                else:
                    os.symlink({'dangling link': 'nothing', 'link out': '../../../' * 20
                                + outside.lstrip('/'), 'link in': 'real.d'}[kind], directory)
                system, facts = in_root(root)
                with mock.patch.object(ap, 'restart_sshd') as restart:
                    facts, _ = one_step(sshd_plan('no'), system, facts)
                self.assertEqual(os.listdir(outside), [])
                if kind == 'link in':
                    with open(os.path.join(root, 'etc/ssh/real.d/50-azure-provisioning.conf')) as f:
                        self.assertEqual(f.read().splitlines()[-1], 'PasswordAuthentication no')
                    self.assertEqual(facts.warnings, ())
                    continue
                self.assertEqual(facts.warnings, ('PasswordAuthentication left alone: '
                                                  '/etc/ssh/sshd_config.d is not a directory',))
                self.assertEqual(restart.call_count, 0)
                self.assertEqual(sorted(os.listdir(os.path.join(root, 'etc', 'ssh'))),
                                 ['real.d', 'sshd_config', 'sshd_config.d'])
                self.assertEqual(os.listdir(os.path.join(root, 'etc', 'ssh', 'real.d')), [])


class SshdOfThisMachineOnly(unittest.TestCase):
    """sshd is reloaded where the run's root is this machine: a run on a temporary
    root (a mounted image, a test's tree) never asks this machine's systemd for it,
    even where that systemd runs (said so here; systemctl is a stand-in that logs)."""

    def setUp(self):
        self.tools = tempfile.mkdtemp(prefix='azp-sshd-tools-')
        self.addCleanup(shutil.rmtree, self.tools)
        self.log_file = os.path.join(self.tools, 'systemctl.log')
        with open(os.path.join(self.tools, 'systemctl'), 'w') as f:
            f.write('#!/bin/sh\necho "$*" >> "%s"\nprintf "Id=ssh.service\\nActiveState=active\\n"\n'
                    % self.log_file)
        os.chmod(os.path.join(self.tools, 'systemctl'), 0o755)
        for patch in (mock.patch.object(ap, 'system_systemd', lambda: True),
                      mock.patch.dict(os.environ, {'PATH': self.tools + os.pathsep
                                                   + os.environ['PATH']})):
            patch.start()
            self.addCleanup(patch.stop)

    def asked(self):
        try:
            with open(self.log_file) as f:
                return f.read().splitlines()
        except IOError:
            return []

    def test_a_temporary_roots_drop_in_reloads_nothing_here(self):
        root = tempfile.mkdtemp(prefix='azp-sshd-')
        self.addCleanup(shutil.rmtree, root)
        os.makedirs(os.path.join(root, 'etc', 'ssh', 'sshd_config.d'))
        with open(os.path.join(root, 'etc', 'ssh', 'sshd_config'), 'w') as f:
            f.write(SSHD_CONFIG)
        system, facts = in_root(root)
        facts, _ = one_step(sshd_plan('no'), system, facts)
        with open(os.path.join(root, ap.SSHD_DROP_IN.lstrip('/'))) as f:
            self.assertEqual(f.read().splitlines()[-1], 'PasswordAuthentication no')
        self.assertEqual((self.asked(), facts.warnings), ([], ()))

    def test_this_machines_root_is_asked(self):
        # the control: the stand-in is found, and asked, when the root is '/'
        ap.restart_sshd(ap.System('/', ap.Deadline(10), QuietLog()))
        self.assertEqual(self.asked(), ['show -p Id -p ActiveState ssh.service sshd.service',
                                        'reload-or-restart ssh.service'])


class NewDropInsLabelled(unittest.TestCase):
    """Issue 23: a file we make in /etc gets the type our domain gives new files there
    (Debian's policy: etc_runtime_t for initrc_t), not the policy's etc_t: each new
    drop-in (sudoers.d, sshd_config.d that already exists) goes through restorecon
    (a stand-in on PATH, SELinux said to be on)."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='azp-dropins-')
        self.addCleanup(shutil.rmtree, self.root)
        os.makedirs(os.path.join(self.root, 'etc', 'ssh', 'sshd_config.d'))
        os.makedirs(os.path.join(self.root, 'etc', 'sudoers.d'))
        with open(os.path.join(self.root, 'etc', 'ssh', 'sshd_config'), 'w') as f:
            f.write(SSHD_CONFIG)
        self.tools = os.path.join(self.root, 'tools')
        os.mkdir(self.tools)
        with open(os.path.join(self.tools, 'restorecon'), 'w') as f:
            f.write('#!/bin/sh\necho "$*" >> "%s/restorecon.log"\n' % self.tools)
        os.chmod(os.path.join(self.tools, 'restorecon'), 0o755)
        self.system, self.facts = in_root(self.root)
        for patch in (mock.patch.object(ap, 'SELINUX_FS', self.tools),
                      mock.patch.object(ap, 'restart_sshd'),
                      mock.patch.object(ap, 'find_tool', lambda name: (
                          os.path.join(self.tools, name) if name == 'restorecon' else None)),
                      mock.patch.dict(os.environ, {'PATH': self.tools + os.pathsep
                                                   + os.environ['PATH']})):
            patch.start()
            self.addCleanup(patch.stop)

    def restorecon_calls(self):
        try:
            with open(os.path.join(self.tools, 'restorecon.log')) as f:
                return f.read().splitlines()
        except IOError:
            return []

    def test_the_sshd_drop_in(self):
        one_step(lambda facts, system: ap.sshd_plan(facts, system, 'yes'),
                 self.system, self.facts)
        path = os.path.join(self.root, 'etc', 'ssh', 'sshd_config.d',
                            '50-azure-provisioning.conf')
        self.assertTrue(os.path.isfile(path))
        self.assertEqual(self.restorecon_calls(), ['-R %s' % path])

    def test_the_sudoers_drop_in(self):
        one_step(lambda facts, system: (facts, ap.sudo_plan(system, 'alice', True)),
                 self.system, self.facts)
        path = os.path.join(self.root, 'etc', 'sudoers.d', 'azure-provisioning')
        self.assertTrue(os.path.isfile(path))
        self.assertEqual(self.restorecon_calls(), ['-R %s' % path])


class ProvisionUser(unittest.TestCase):
    """Runs the script with --provision-user in a private host and looks at the files
    (root only: useradd, usermod and the chown of the keys are real; what is decided
    before any of them runs is UserOnATemporaryRoot's)."""

    def setUp(self):
        require_root(self)
        self.host = PrivateHost('web-7')    # same name as IMDS: the hostname step is a no-op
        self.addCleanup(self.host.cleanup)
        os.makedirs(os.path.join(self.host.etc, 'ssh', 'sshd_config.d'), exist_ok=True)
        self.host.write('ssh/sshd_config', SSHD_CONFIG)

    def provision(self, az, *extra):
        argv = [sys.executable, '-I', SCRIPT, '--wireserver', az.wireserver_addr,
                '--imds', az.imds_addr, '--provision-user', '--timeout', '30'] + list(extra)
        run = self.host.run(argv)
        self.assertNotIn('Traceback', run.stderr)
        return run

    def passwd_entry(self, name):
        for line in self.host.read('passwd').splitlines():
            fields = line.split(':')
            if fields[0] == name:
                return fields
        return None

    def shadow_field(self, name):
        for line in self.host.read('shadow').splitlines():
            fields = line.split(':')
            if fields[0] == name:
                return fields[1]
        return None

    def precreate(self, name='alice', uid=1500, password=PASSWORD_HASH):
        """An account that exists before the first boot (made in the image, or by a
        hook of an earlier attempt), with a usable password.  Written straight into
        the private /etc: no useradd, so nothing outside it is touched."""
        for file, line in [('passwd', '%s:x:%d:%d::/home/%s:/bin/sh' % (name, uid, uid, name)),
                           ('group', '%s:x:%d:' % (name, uid)),
                           ('shadow', '%s:%s:19000:0:99999:7:::' % (name, password)),
                           ('gshadow', '%s:!::' % name)]:
            if os.path.exists(os.path.join(self.host.etc, file)):
                text = self.host.read(file)
                self.host.write(file, text + ('' if text.endswith('\n') else '\n') + line + '\n')
        home = os.path.join(self.host.home, name)
        os.mkdir(home, 0o755)
        os.chown(home, uid, uid)
        return home

    def assert_failed(self, az, run, text):
        self.assertEqual(run.code, 1, run)
        report, = az.health_reports
        self.assertEqual(report['substatus'], 'ProvisioningFailed')
        self.assertIn(text, report['description'])
        self.assertIn('step=user', report['description'])

    def test_user_sudo_keys_and_sshd(self):
        keys = [key() + '\r\n', key('ssh-rsa', 'bob@desk', b'\x09')]
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=keys) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        entry = self.passwd_entry('alice')
        self.assertIsNotNone(entry, self.host.read('passwd'))
        uid, gid, home, shell = int(entry[2]), int(entry[3]), entry[5], entry[6]
        self.assertEqual(home, '/home/alice')
        self.assertTrue(os.access(shell, os.X_OK))
        shadow = [l for l in self.host.read('shadow').splitlines() if l.startswith('alice:')]
        self.assertTrue(shadow[0].split(':')[1].startswith('!'), shadow)

        ssh_dir = os.path.join(self.host.home, 'alice', '.ssh')
        keys_file = os.path.join(ssh_dir, 'authorized_keys')
        with open(keys_file) as f:
            self.assertEqual(f.read(), key() + '\n' + key('ssh-rsa', 'bob@desk', b'\x09') + '\n')
        for path, mode in [(ssh_dir, 0o700), (keys_file, 0o600)]:
            st = os.stat(path)
            self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), (mode, uid, gid))

        sudoers = os.path.join(self.host.etc, 'sudoers.d', 'azure-provisioning')
        if os.path.isdir(os.path.dirname(sudoers)):
            self.assertEqual(stat.S_IMODE(os.stat(sudoers).st_mode), 0o440)
            with open(sudoers) as f:
                self.assertIn('alice ALL=(ALL) NOPASSWD:ALL\n', f.read())
            if os.access('/usr/sbin/visudo', os.X_OK):
                check = subprocess.call(['/usr/sbin/visudo', '-cf', sudoers],
                                        stdout=subprocess.DEVNULL)
                self.assertEqual(check, 0)
        else:
            self.assertIn('sudo not installed', run.stderr)
        self.assertEqual(self.host.read('ssh/sshd_config.d/50-azure-provisioning.conf').splitlines()[-1],
                         'PasswordAuthentication no')
        self.assertEqual(self.host.read('ssh/sshd_config'), SSHD_CONFIG)

    def test_a_missing_sshd_config_d_is_made(self):
        """Issue 20 (8): sshd_config includes sshd_config.d/*.conf, the directory is
        missing (sshd does not mind an Include matching nothing): it is made, 0755."""
        directory = os.path.join(self.host.etc, 'ssh', 'sshd_config.d')
        shutil.rmtree(directory)
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
            self.assertEqual([r['state'] for r in az.health_reports], ['Ready'])
        st = os.stat(directory)
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid), (0o755, 0, 0))
        self.assertEqual(self.host.read('ssh/sshd_config.d/50-azure-provisioning.conf')
                         .splitlines()[-1], 'PasswordAuthentication no')
        self.assertEqual(os.listdir(directory), ['50-azure-provisioning.conf'])

    def test_a_new_users_home_and_skeleton_keys_are_useradds(self):
        # useradd decides the home (HOME= in /etc/default/useradd) and copies /etc/skel:
        # the keys go where the account really lives, next to the skeleton's
        self.host.write('default/useradd', 'HOME=/root\nSHELL=/bin/sh\n')
        os.makedirs(os.path.join(self.host.etc, 'skel', '.ssh'))
        self.host.write('skel/.ssh/authorized_keys', key(comment='breakglass', filler=b'\x05') + '\n')
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
        self.assertEqual(self.passwd_entry('alice')[5], '/root/alice')
        with open(os.path.join(self.host.root_home, 'alice', '.ssh', 'authorized_keys')) as f:
            self.assertEqual(f.read(), key(comment='breakglass', filler=b'\x05') + '\n' + key() + '\n')
        self.assertFalse(os.path.exists(os.path.join(self.host.home, 'alice')))
        self.assertIn('user: 1 key(s) added to /root/alice/.ssh/authorized_keys', run.stderr)

    def test_second_run_changes_nothing_and_keeps_other_keys(self):
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            self.assertEqual(self.provision(az).code, 0)
            keys_file = os.path.join(self.host.home, 'alice', '.ssh', 'authorized_keys')
            with open(keys_file, 'a') as f:
                f.write('ssh-ed25519 AAAAmine user-added\n')
            watched = [os.path.join(self.host.etc, n) for n in
                       ('passwd', 'shadow', 'group', 'sudoers.d', 'ssh/sshd_config.d')] + [keys_file]
            before = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in watched
                      if os.path.exists(p)]
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
            after = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in watched
                     if os.path.exists(p)]
            self.assertEqual(before, after)
            self.assertIn('1 key(s) already in /home/alice/.ssh/authorized_keys', run.stderr)
            with open(keys_file) as f:
                self.assertEqual(f.read(), key() + '\nssh-ed25519 AAAAmine user-added\n')

    def test_hostile_paths_go_to_the_default(self):
        keys = [{'keyData': key(), 'path': '/root/.ssh/authorized_keys'},
                {'keyData': key('ssh-ed25519', 'b', b'\x01'),
                 'path': '/home/alice/../../root/.ssh/authorized_keys'}]
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=keys) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
        self.assertEqual(os.listdir(self.host.root_home), ['.pyenv'] if self.host.keep else [])
        with open(os.path.join(self.host.home, 'alice', '.ssh', 'authorized_keys')) as f:
            self.assertEqual(len(f.read().splitlines()), 2)
        self.assertIn('is outside /home/alice', run.stderr)

    def test_existing_user_with_a_password_ends_locked(self):
        home = self.precreate()
        self.assertEqual(self.shadow_field('alice'), PASSWORD_HASH)
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        locked = self.shadow_field('alice')
        self.assertTrue(locked.startswith('!'), locked)     # what usermod -L / passwd -l do
        self.assertEqual(self.passwd_entry('alice')[2], '1500')     # the same account
        with open(os.path.join(home, '.ssh', 'authorized_keys')) as f:
            self.assertEqual(f.read(), key() + '\n')



class UserOnATemporaryRoot(unittest.TestCase):
    """--provision-user runs that refuse, fail or only print before an account tool
    or a chown would run: the script on a temporary root (no root needed) against
    the emulator; the report Azure got, what was printed, and the tree's files."""

    def setUp(self):
        self.host = TemporaryRoot('web-7')
        self.addCleanup(self.host.cleanup)
        os.makedirs(os.path.join(self.host.etc, 'ssh', 'sshd_config.d'))
        os.makedirs(os.path.join(self.host.etc, 'sudoers.d'))
        self.host.write('ssh/sshd_config', SSHD_CONFIG)

    def emulator(self, **fields):
        """The emulator, naming the VM as the run's host is named: no rename."""
        return FakeAzure(computer_name=self.host.hostname, **fields)

    def provision(self, az, *extra):
        run = self.host.run('--wireserver', az.wireserver_addr, '--imds', az.imds_addr,
                            '--provision-user', '--timeout', '30', *extra)
        self.assertNotIn('Traceback', run.stderr)
        self.assertEqual(run.hostname_after, self.host.hostname, run)
        return run

    passwd_entry = ProvisionUser.passwd_entry
    assert_failed = ProvisionUser.assert_failed

    def accounts_and_homes(self):
        """The tree's /etc and /home, as tree_snapshot sees them."""
        return [tree_snapshot(os.path.join(self.host.dir, part)) for part in ('etc', 'home')]

    def test_bad_key_is_reported_and_no_user_made(self):
        before = self.accounts_and_homes()
        with self.emulator(admin_username='alice', public_keys=['ssh-rsa AAAA-not-a-key']) as az:
            run = self.provision(az)
            self.assert_failed(az, run, 'invalid SSH public key')
        self.assertIsNone(self.passwd_entry('alice'))
        self.assertEqual(self.accounts_and_homes(), before)

    def test_bad_user_name_is_reported(self):
        before = self.accounts_and_homes()
        with self.emulator(admin_username='Root;id') as az:
            run = self.provision(az)
            self.assert_failed(az, run, "invalid admin user name 'Root;id'")
        self.assertEqual(self.accounts_and_homes(), before)

    def test_system_account_is_refused(self):
        before = self.accounts_and_homes()
        with self.emulator(admin_username='daemon') as az:
            run = self.provision(az)
            self.assert_failed(az, run, 'daemon exists as a system account (uid 1)')
        self.assertEqual(self.accounts_and_homes(), before)

    def test_dry_run_says_what_it_would_do(self):
        before = tree_snapshot(self.host.dir)
        with self.emulator(admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az, '--dry-run')
            self.assertEqual(run.code, 0, run)
            self.assertEqual(az.health_reports, [])
        self.assertIn('would create user alice', run.stdout)
        self.assertIn('would add 1 key(s) to authorized_keys in the home useradd makes for alice',
                      run.stdout)
        self.assertIn('would write /etc/ssh/sshd_config.d/50-azure-provisioning.conf', run.stdout)
        self.assertIsNone(self.passwd_entry('alice'))
        self.assertEqual(tree_snapshot(self.host.dir), before)     # no record either

    def test_a_missing_sshd_config_d_in_a_dry_run(self):
        directory = os.path.join(self.host.etc, 'ssh', 'sshd_config.d')
        shutil.rmtree(directory)
        with self.emulator(admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az, '--dry-run')
            self.assertEqual(run.code, 0, run)
        self.assertIn('would write /etc/ssh/sshd_config.d/50-azure-provisioning.conf (making '
                      '/etc/ssh/sshd_config.d, 0755): PasswordAuthentication no\n', run.stdout)
        self.assertFalse(os.path.exists(directory))

    def test_keys_are_not_written_through_a_symlinked_ssh_directory(self):
        # an account of the image, its password locked: no usermod; the keys are next
        home = self.host.add_account('alice', 1500, '!' + PASSWORD_HASH)
        elsewhere = os.path.join(self.host.root_home, '.ssh')      # /root/.ssh inside
        os.mkdir(elsewhere, 0o700)
        os.symlink('/root/.ssh', os.path.join(home, '.ssh'))
        before = tree_snapshot(self.host.root_home)
        with self.emulator(admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assert_failed(az, run, '/home/alice/.ssh is a symbolic link; refusing')
        self.assertEqual(os.listdir(elsewhere), [])
        self.assertEqual(tree_snapshot(self.host.root_home), before)   # modes and owners too

    def test_keys_are_not_written_through_a_symlinked_keys_file(self):
        home = self.host.add_account('alice', 1500, '!' + PASSWORD_HASH)
        target = os.path.join(self.host.root_home, 'keys')
        with open(target, 'w') as f:
            f.write('root only\n')
        os.chmod(target, 0o600)
        os.mkdir(os.path.join(home, '.ssh'), 0o700)
        link = os.path.join(home, '.ssh', 'authorized_keys')
        os.symlink('/root/keys', link)
        before = tree_snapshot(self.host.root_home)
        with self.emulator(admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assert_failed(az, run, 'authorized_keys is a symbolic link; refusing')
        self.assertTrue(os.path.islink(link))
        with open(target) as f:
            self.assertEqual(f.read(), 'root only\n')
        self.assertEqual(tree_snapshot(self.host.root_home), before)   # its mode and owner


# What a power cut during useradd left (seen in boots: the account in /etc/passwd and
# /etc/shadow, not in /etc/group nor /etc/gshadow, no home), written by a fake useradd
# that then kills the provisioner (SIGKILL: no handler runs, as in a power cut).  It
# first keeps a copy of the record as useradd finds it: what the cut leaves on disk.
CUT_USERADD = """#!/bin/sh
cp /var/lib/azure-provisioning/state.json /var/lib/record-at-useradd.json
echo "$NAME:x:$ID:$ID::/home/$NAME:/bin/sh" >> /etc/passwd
echo "$NAME:!:20000:0:99999:7:::" >> /etc/shadow
kill -9 $PPID
exit 1
"""


class AdminAccountHost(unittest.TestCase):
    """A PrivateHost with real useradd, userdel, pwck and grpck, and the helpers that
    set up and read its account files and the record (no tests of its own)."""

    def setUp(self):
        require_root(self)
        for tool in ('useradd', 'userdel', 'pwck', 'grpck'):
            if not ap.find_tool(tool):
                skip(self, 'no %s (apt-get install passwd)' % tool)
        self.host = PrivateHost('web-7')
        self.addCleanup(self.host.cleanup)
        os.makedirs(os.path.join(self.host.etc, 'skel'), exist_ok=True)
        self.host.write('skel/.azp-skeleton', 'from /etc/skel\n')
        self.state = os.path.join(self.host.var_lib, 'azure-provisioning', 'state.json')
        self.baseline = self.account_checks()

    def provision(self, az, *extra, **how):
        argv = [sys.executable, '-I', SCRIPT, '--wireserver', az.wireserver_addr,
                '--imds', az.imds_addr, '--provision-user', '--timeout', '30'] + list(extra)
        run = self.host.run(argv, env=how.get('env'))
        self.assertNotIn('Traceback', run.stderr)
        return run

    def account_checks(self):
        """pwck -r and grpck -r of the private /etc: exit statuses, and what they say
        of alice (the copy of this machine's /etc may hold complaints of its own)."""
        found = []
        for tool in ('pwck', 'grpck'):
            run = self.host.run([ap.find_tool(tool), '-r'])
            found.append((tool, run.code, [line for line in (run.stdout + run.stderr).splitlines()
                                           if 'alice' in line]))
        return found

    def entries(self, name='alice'):
        """{file: [its lines for `name`]} of the private /etc's four account files."""
        return dict((file, [line for line in self.host.read(file).splitlines()
                            if line.split(':')[0] == name])
                    for file in ('passwd', 'shadow', 'group', 'gshadow'))

    def free_id(self):
        """The uid useradd would give next, as the cut account has it."""
        used = set()
        for file in ('passwd', 'group'):
            used.update(int(line.split(':')[2]) for line in self.host.read(file).splitlines()
                        if line.count(':') >= 3 and line.split(':')[2].isdigit())
        return min(i for i in range(1000, 60000) if i not in used)

    def append(self, file, line):
        text = self.host.read(file)
        self.host.write(file, text + ('' if text.endswith('\n') else '\n') + line + '\n')

    def record(self, **fields):
        os.makedirs(os.path.dirname(self.state), 0o700, exist_ok=True)
        with open(self.state, 'w') as f:
            json.dump(fields, f)
        os.chmod(self.state, 0o600)

    def read_record(self, path=None):
        with open(path or self.state) as f:
            return json.load(f)

    def deprovision_user(self):
        """--deprovision --user of the private tree (etc, home, var/lib of the host)."""
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--user',
                           '--root', self.host.dir])
        self.assertNotIn('Traceback', run.stderr)
        return run

    def assert_one_complete_alice(self):
        entries = self.entries()
        self.assertEqual([len(lines) for lines in entries.values()], [1, 1, 1, 1], entries)
        passwd = entries['passwd'][0].split(':')
        self.assertEqual(entries['group'][0].split(':')[2], passwd[3], entries)
        self.assertEqual(self.account_checks(), self.baseline)
        home = os.path.join(self.host.home, 'alice')
        self.assertEqual(passwd[5], '/home/alice')
        st = os.stat(home)
        self.assertEqual((st.st_uid, st.st_gid), (int(passwd[2]), int(passwd[3])))
        with open(os.path.join(home, '.azp-skeleton')) as f:       # useradd -m made it
            self.assertEqual(f.read(), 'from /etc/skel\n')
        with open(os.path.join(home, '.ssh', 'authorized_keys')) as f:
            self.assertEqual(f.read(), key() + '\n')
        self.assertTrue(entries['shadow'][0].split(':')[1].startswith('!'), entries)

    def complete_alice(self, uid):
        """alice in the four files and her home, as a finished useradd leaves her."""
        for file, line in [('passwd', 'alice:x:%d:%d::/home/alice:/bin/sh' % (uid, uid)),
                           ('shadow', 'alice:!:20000:0:99999:7:::'),
                           ('group', 'alice:x:%d:' % uid), ('gshadow', 'alice:!::')]:
            self.append(file, line)
        os.mkdir(os.path.join(self.host.home, 'alice'), 0o750)
        os.chown(os.path.join(self.host.home, 'alice'), uid, uid)


class CutDuringUseradd(AdminAccountHost):
    """A power cut while useradd made the admin user: the next run must end with one
    complete account, and know it is ours (--deprovision --user removes it)."""

    def test_a_half_made_user_is_made_again_and_ours(self):
        uid = self.free_id()
        self.append('passwd', 'alice:x:%d:%d::/home/alice:/bin/sh' % (uid, uid))
        self.append('shadow', 'alice:!:20000:0:99999:7:::')
        self.record(result='provisioning', vm_id=DEFAULT_VM_ID, step='user',
                    admin_user_creating='alice')
        left = self.entries()
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az, '--dry-run')
            self.assertEqual(run.code, 0, run)
            self.assertIn('would remove what a cut useradd left of alice (its entries in '
                          '/etc/passwd, /etc/shadow): userdel -r', run.stdout)
            self.assertIn('would create user alice', run.stdout)
            self.assertEqual(self.entries(), left)
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        self.assert_one_complete_alice()
        state = self.read_record()
        self.assertEqual((state['result'], state['admin_user_created'],
                          state.get('admin_user_creating')), ('provisioned', 'alice', None))

    def test_an_empty_home_the_cut_left_unowned_is_made_again(self):
        # the cut between useradd's mkdir of the home and its chown: userdel -r keeps
        # a home the account does not own (exit 12), the next useradd must not find it
        uid = self.free_id()
        self.append('passwd', 'alice:x:%d:%d::/home/alice:/bin/sh' % (uid, uid))
        self.append('shadow', 'alice:!:20000:0:99999:7:::')
        self.append('group', 'alice:x:%d:' % uid)
        self.append('gshadow', 'alice:!::')
        os.mkdir(os.path.join(self.host.home, 'alice'), 0o700)
        self.record(result='provisioning', vm_id=DEFAULT_VM_ID, step='user',
                    admin_user_creating='alice')
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        self.assert_one_complete_alice()

    def test_leftovers_in_group_files_alone_are_removed_with_the_tools(self):
        # another moment of the cut: the group made, the account not (no passwd line)
        gid = self.free_id()
        self.append('group', 'alice:x:%d:' % gid)
        self.append('gshadow', 'alice:!::')
        self.append('shadow', 'alice:!:20000:0:99999:7:::')
        self.record(result='provisioning', vm_id=DEFAULT_VM_ID, step='user',
                    admin_user_creating='alice')
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
        self.assert_one_complete_alice()
        self.assertEqual(self.read_record()['admin_user_created'], 'alice')

    def test_a_left_group_with_members_is_not_removed(self):
        gid = self.free_id()
        self.append('group', 'alice:x:%d:daemon' % gid)
        self.record(result='provisioning', vm_id=DEFAULT_VM_ID, step='user',
                    admin_user_creating='alice')
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
            self.assertIn('the group alice a cut useradd left has members (daemon); refused',
                          report['description'])
        self.assertEqual(self.entries()['group'], ['alice:x:%d:daemon' % gid])
        self.assertEqual(self.read_record()['admin_user_creating'], 'alice')

    def test_a_user_we_made_whose_success_was_never_recorded_is_ours(self):
        uid = self.free_id()
        self.complete_alice(uid)
        self.record(result='provisioning', vm_id=DEFAULT_VM_ID, step='user',
                    admin_user_creating='alice')
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
        self.assert_one_complete_alice()
        self.assertEqual(self.read_record()['admin_user_created'], 'alice')
        run = self.deprovision_user()
        self.assertEqual(run.code, 0, run)
        self.assertIn('remove the admin user alice', run.stdout)
        self.assertEqual(self.entries(), {'passwd': [], 'shadow': [], 'group': [], 'gshadow': []})
        self.assertFalse(os.path.exists(os.path.join(self.host.home, 'alice')))

    def test_the_images_own_user_stays_not_ours(self):
        uid = self.free_id()
        self.complete_alice(uid)
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
        self.assertEqual(self.entries()['passwd'],
                         ['alice:x:%d:%d::/home/alice:/bin/sh' % (uid, uid)])
        self.assertIsNone(self.read_record()['admin_user_created'])
        run = self.deprovision_user()
        self.assertEqual(run.code, 0, run)
        self.assertIn('no admin user made by azure-provisioning on record', run.stderr)
        self.assertEqual(len(self.entries()['passwd']), 1)

    def test_the_intent_is_on_disk_before_useradd_runs(self):
        # the record of an earlier run that failed before the identity step: it must
        # not become a proof that this VM's host keys were made
        self.record(result='failed', vm_id=DEFAULT_VM_ID, step='media', reason='no media')
        tools = os.path.join(self.host.dir, 'cut-tools')
        os.mkdir(tools)
        with open(os.path.join(tools, 'useradd'), 'w') as f:
            f.write(CUT_USERADD)
        os.chmod(os.path.join(tools, 'useradd'), 0o755)
        env = dict(os.environ, PATH=tools + ':' + os.environ.get('PATH', '/usr/bin:/bin'),
                   NAME='alice', ID=str(self.free_id()))
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az, env=env)
            self.assertEqual(run.code, 137, run)     # the shell saw python killed
            self.assertEqual(az.health_reports, [])
        at_useradd = self.read_record(os.path.join(self.host.var_lib, 'record-at-useradd.json'))
        self.assertEqual(self.read_record(), at_useradd)   # the cut left this record
        self.assertEqual((at_useradd['result'], at_useradd['vm_id'],
                          at_useradd['admin_user_creating'], at_useradd['admin_user_created'],
                          at_useradd['ssh_host_keys_for']),
                         ('provisioning', DEFAULT_VM_ID, 'alice', None, None))
        self.assertEqual(self.entries()['group'], [])
        # with that record, the host keys are replaced, not kept
        root = os.path.join(self.host.dir, 'image')
        os.makedirs(os.path.join(root, 'usr/sbin'))
        open(os.path.join(root, 'usr/sbin/sshd'), 'w').close()
        os.makedirs(os.path.join(root, 'var/lib/azure-provisioning'))
        with open(os.path.join(root, 'var/lib/azure-provisioning/state.json'), 'w') as f:
            json.dump(at_useradd, f)
        system, facts = in_root(root)
        _, plan = ap.plan_identity(facts._replace(vm_id=DEFAULT_VM_ID), system)
        self.assertEqual(len(plan), 1)
        self.assertIn('replace the SSH host keys', plan[0].says)
        # the boot after the cut
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
        self.assert_one_complete_alice()
        self.assertEqual(self.read_record()['admin_user_created'], 'alice')


if __name__ == '__main__':
    unittest.main()


class PasswdLines(unittest.TestCase):
    """Review finding 3: System.account reads the root's /etc/passwd with
    str.splitlines, which also breaks lines at U+0085, U+2028, \\x1c-\\x1e, \\x0b,
    \\x0c; glibc (what pwd.getpwnam read at c4af033, and what useradd, sshd and
    login see) breaks at '\\n' only.  A GECOS field holding U+0085 (chfn lets a user
    put the bytes c2 85 in their own) followed by the admin's name makes a
    one-field "entry" for it that shadows the real one: the existing admin is taken
    for absent (useradd then refused, provisioning failed)."""

    def test_a_gecos_with_a_unicode_line_break_does_not_hide_the_next_account(self):
        root = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, 'etc'))
        with open(os.path.join(root, 'etc/passwd'), 'wb') as f:
            f.write('root:x:0:0:root:/root:/bin/bash\n'
                    'eve:x:1001:1001:Eve\u0085azureuser:/home/eve:/bin/sh\n'
                    'azureuser:x:1000:1000::/home/azureuser:/bin/bash\n'.encode('utf-8'))
        system, facts = in_root(root)
        account = system.account('azureuser')
        self.assertIsNotNone(account)
        self.assertEqual((account.uid, account.home), (1000, '/home/azureuser'))
        self.assertIsNone(system.account('Eve\u0085azureuser'))


class KeysWhereUseraddMadeTheHome(unittest.TestCase):
    """Review finding 8: for a new account the keys' path is decided at plan time
    from System.home_base(), a regex of its own over /etc/default/useradd
    (^HOME=(/[^\\s]*)$), not from where useradd then made the home; c4af033 read the
    home from the account useradd made (pwd.getpwnam after useradd).  Where the two
    parse the file differently (a trailing blank after HOME=, which useradd keeps),
    the keys go to /home/NAME, a directory that is not the user's home: the admin
    cannot log in."""

    setUp = ProvisionUser.setUp
    provision = ProvisionUser.provision
    passwd_entry = ProvisionUser.passwd_entry

    def test_keys_go_to_the_home_useradd_made(self):
        self.host.write('default/useradd', 'HOME=/home/staff \nSHELL=/bin/sh\n')
        os.mkdir(os.path.join(self.host.home, 'staff '))
        with FakeAzure(computer_name='web-7', admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
        home = self.passwd_entry('alice')[5]
        self.assertEqual(home, '/home/staff /alice')
        keys = os.path.join(self.host.home, 'staff ', 'alice', '.ssh', 'authorized_keys')
        self.assertTrue(os.path.isfile(keys), run.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.host.home, 'alice')), run.stderr)


class PasswordRefusedAtThePlan(unittest.TestCase):
    """Review: a media password chpasswd cannot take (a line break would start
    another name:password line of its stdin) was refused by the action only, so
    --dry-run printed "would set the password" for a run that then fails."""

    def plan(self, password):
        root = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, 'etc'))
        with open(os.path.join(root, 'etc/passwd'), 'w') as f:
            f.write('root:x:0:0:root:/root:/bin/bash\n')
        system, facts = in_root(root, provision_user=True)
        media = ap.OvfEnv('/dev/sr0', 'web-7', 'alice', password, 'false', [], None, None)
        metadata = {'compute': {'vmId': 'vm-1', 'osProfile': {'adminUsername': 'alice'},
                                'publicKeys': []}}
        return ap.plan_user(facts._replace(metadata=metadata, media=media, vm_id='vm-1'),
                            system)

    def test_a_password_chpasswd_takes_is_planned(self):
        _, actions = self.plan('Correct-Horse-7')
        self.assertIn('set the password of alice from the provisioning media: (set), '
                      'with chpasswd', [action.says for action in actions])

    def test_a_line_break_or_nul_is_refused_by_the_plan(self):
        for password in ('Correct\nroot:x', 'Correct\rHorse', 'Correct\0Horse'):
            with self.assertRaises(ap.ProvisioningError) as caught:
                self.plan(password)
            self.assertIn('holds a line break or NUL', str(caught.exception))
            self.assertNotIn('Correct', str(caught.exception))


class AuthorizedKeysLines(unittest.TestCase):
    """sshd reads authorized_keys a line at a time, lines ending at '\\n' only: a
    comment holding a form feed (or U+0085...) is a comment to it.  Split with
    str.splitlines, the key after it was taken for present (and never added) and a
    rewrite broke the line in two."""

    def test_a_key_in_another_keys_comment_is_added(self):
        root = tempfile.mkdtemp(prefix='azp-review-')
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, 'etc'))
        os.makedirs(os.path.join(root, 'home/alice/.ssh'))
        with open(os.path.join(root, 'etc/passwd'), 'w') as f:
            f.write('root:x:0:0:root:/root:/bin/bash\n'
                    'alice:x:1000:1000::/home/alice:/bin/bash\n')
        wanted = key(comment='alice@new', filler=b'\x05')
        old = (key(comment='alice@old', filler=b'\x06') + ' \x0c' + wanted + '\u0085x\r')
        path = os.path.join(root, 'home/alice/.ssh/authorized_keys')
        with open(path, 'wb') as f:
            f.write(old.encode('utf-8') + b'\n')
        system, facts = in_root(root)
        request = ap.user_from_metadata({'compute': {
            'vmId': 'vm-1', 'osProfile': {'adminUsername': 'alice'},
            'publicKeys': [{'keyData': wanted, 'path': ''}]}})
        actions = ap.keys_plan(system, request, '/home/alice')
        self.assertEqual([a.says for a in actions],
                         ['add 1 key(s) to /home/alice/.ssh/authorized_keys (0600, owner alice)'])
        actions[0].do()
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), old.encode('utf-8') + b'\n' + wanted.encode() + b'\n')
