"""What the record, --deprovision, --status and --check may be trusted to say (issue
20): host keys kept only when the record proves they were made for this VM; the
record removed last, so that a failed --deprovision --user can be finished; an
absolute --root for userdel; accounts outside login.defs' UID_MIN..UID_MAX never
reused nor removed; no output line that can crash on the stream's encoding or carry
an escape sequence; --check going on past an unreadable file; --status saying what
it does not know.  Every run is on a temporary root."""

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import (PROCESS_TIMEOUT, SCRIPT, in_root, is_root, root_with_kvp_pool,
                           run_command, shielded, skip)
from tests.test_check import KERNEL, good_image
from tests.test_identity import VM_A, VM_B, Capture, provisioned_tree, write

STATE = 'var/lib/azure-provisioning/state.json'
NOBODY = ['--reuid=65534', '--regid=65534', '--clear-groups']


def read_record(root):
    with open(os.path.join(root, STATE)) as f:
        return json.load(f)


def script(*args, **how):
    """The script as a process, as installed (-I) unless `flags` says otherwise; env:
    variables added; raw: (exit code, stdout bytes, stderr bytes), undecoded."""
    env = dict(os.environ, **how.get('env', {}))
    argv = (how.get('prefix', []) + [how.get('python', sys.executable)]
            + how.get('flags', ['-I']) + [how.get('script', SCRIPT)] + list(args))
    if not how.get('raw'):
        return run_command(argv, env=env)
    done = subprocess.run(shielded(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=PROCESS_TIMEOUT)
    return done.returncode, done.stdout, done.stderr


def fake_tool(test, name, body):
    """A directory holding an executable `name` running the shell `body`, for PATH."""
    tools = tempfile.mkdtemp(prefix='azp-tools-')
    test.addCleanup(shutil.rmtree, tools)
    write(os.path.join(tools, name), ('#!/bin/sh\n' + body).encode(), 0o755)
    return tools


def as_another_user(test, directory):
    """How script() runs as nobody: {prefix, python, script}, the script copied into
    `directory` (0755: the repository may be where nobody cannot read it, as in
    tests/mutations.py's copies).  Not root: as we are (the files made unreadable
    are then unreadable to us)."""
    if not is_root():
        return {}
    setpriv = shutil.which('setpriv')
    if not setpriv:
        skip(test, 'root and no setpriv to become nobody')
    os.chmod(directory, 0o755)
    copy = os.path.join(directory, 'azure_provisioning.py')
    shutil.copy(SCRIPT, copy)
    os.chmod(copy, 0o644)
    for python in (sys.executable, '/usr/bin/python3'):     # pyenv's may be under /root
        if run_command([setpriv] + NOBODY + [python, '-c', 'pass']).code == 0:
            return {'prefix': [setpriv] + NOBODY, 'python': python, 'script': copy}
    skip(test, 'nobody can run no python3 here')


class HostKeysAfterAFailedFirstBoot(unittest.TestCase):
    """Defect 1: a first boot that failed before the identity step recorded the vmId;
    the retry must still replace the template's keys."""

    def setUp(self):
        if not shutil.which('ssh-keygen'):
            skip(self, 'no ssh-keygen (apt-get install openssh-client)')
        self.root, _ = root_with_kvp_pool(self, 'azp-keys-retry-')
        write(os.path.join(self.root, 'usr/sbin/sshd'), b'', 0o755)
        os.makedirs(os.path.join(self.root, 'etc/ssh'))
        subprocess.check_call(['ssh-keygen', '-q', '-A', '-f', self.root],
                              stdout=subprocess.DEVNULL)
        self.template = self.keys()
        # no sshd of this machine is ever asked to reload
        patch = mock.patch.object(ap, 'system_systemd', return_value=False)
        patch.start()
        self.addCleanup(patch.stop)

    def keys(self):
        ssh = os.path.join(self.root, 'etc/ssh')
        return dict((n, ap.read_bytes(os.path.join(ssh, n)))
                    for n in os.listdir(ssh) if n.startswith('ssh_host_'))

    def provision(self, provision_user=False, **fake):
        with FakeAzure(vm_id=VM_A, **fake) as az:
            options = ap.Options(wireserver=ap.parse_address(az.wireserver_addr),
                                 imds=ap.parse_address(az.imds_addr), timeout=20,
                                 set_hostname=False, publish_hostname=False, root=self.root,
                                 media='none', provision_user=provision_user)
            return ap.provision(options, Capture(), io.StringIO())

    def test_the_retry_replaces_the_templates_keys(self):
        # the user step fails (before any change: the name is refused)
        self.assertEqual(self.provision(provision_user=True, admin_username='Root;id'), 1)
        state = read_record(self.root)
        self.assertEqual((state['result'], state['step'], state['vm_id']),
                         ('failed', 'user', VM_A))
        self.assertEqual(self.keys(), self.template)
        self.assertIsNone(state.get('ssh_host_keys_for'))
        # the retry, as the same VM
        self.assertEqual(self.provision(), 0)
        retried = self.keys()
        self.assertEqual(sorted(retried), sorted(self.template))
        for name in retried:
            self.assertNotEqual(retried[name], self.template[name], name)
        state = read_record(self.root)
        self.assertEqual((state['result'], state['ssh_host_keys'], state['ssh_host_keys_for']),
                         ('provisioned', 'replaced', VM_A))
        run = script('--status', '--root', self.root)
        self.assertIn('SSH host keys: replaced', run.stdout)
        self.assertNotIn('kept', run.stdout)
        # once made for this VM: kept, and the record still says for which VM
        self.assertEqual(self.provision(), 0)
        self.assertEqual(self.keys(), retried)
        state = read_record(self.root)
        self.assertEqual((state['ssh_host_keys'], state['ssh_host_keys_for']),
                         ('kept (made for this VM)', VM_A))

    def test_a_failure_after_the_keys_keeps_what_they_were_made_for(self):
        hooks = os.path.join(self.root, 'etc/azure-provisioning/ready.d')
        write(os.path.join(hooks, '10-fail'), b'#!/bin/sh\nexit 3\n', 0o755)
        self.assertEqual(self.provision(), 1)
        made = self.keys()
        self.assertNotEqual(made, self.template)
        self.assertEqual(read_record(self.root)['ssh_host_keys_for'], VM_A)
        # then a failure before the identity step: the keys on disk are still VM_A's
        self.assertEqual(self.provision(provision_user=True, admin_username='Root;id'), 1)
        self.assertEqual(read_record(self.root)['ssh_host_keys_for'], VM_A)
        os.remove(os.path.join(hooks, '10-fail'))
        self.assertEqual(self.provision(), 0)
        self.assertEqual(self.keys(), made)

    def test_a_record_without_the_field_proves_nothing(self):
        # written by a version that recorded the vmId after failures too
        write(os.path.join(self.root, STATE), json.dumps(
            {'result': 'provisioned', 'vm_id': VM_A,
             'ssh_host_keys': 'kept (made for this VM)'}).encode())
        self.assertEqual(self.provision(), 0)
        for name, data in self.keys().items():
            self.assertNotEqual(data, self.template[name], name)
        # nor does a field naming another VM, nor one that is not a string
        for made_for in (VM_B, ['x'], ''):
            keys = self.keys()
            state = read_record(self.root)
            state['ssh_host_keys_for'] = made_for
            write(os.path.join(self.root, STATE), json.dumps(state).encode())
            self.assertEqual(self.provision(), 0)
            self.assertNotEqual(self.keys(), keys, made_for)


class DeprovisionFinishesWhatFailed(unittest.TestCase):
    """Defect 2 and 11: userdel fails (the admin is logged in) or refuses a relative
    --root: the record stays, and a second run finishes the job."""

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix='azp-deprov-order-')
        self.addCleanup(shutil.rmtree, self.base)
        self.root = provisioned_tree(os.path.join(self.base, 'image'))
        self.calls = os.path.join(self.base, 'userdel-calls')
        self.busy = os.path.join(self.base, 'alice-logged-in')
        # as userdel does: a relative --root is refused; a logged-in user is kept
        self.tools = fake_tool(self, 'userdel', (
            'echo "$@" >> %s\n'
            'case "$2" in /*) ;; *) echo "userdel: invalid chroot path \'$2\', only absolute '
            'paths are supported." >&2; exit 3;; esac\n'
            'if [ -e %s ]; then echo "userdel: user alice is currently used by process 4242" '
            '>&2; exit 8; fi\n' % (self.calls, self.busy)))

    def deprovision(self, root):
        # from the directory above the image, so that "image" is a relative --root
        return run_command(['/bin/sh', '-c', 'cd "$0" && exec "$@"', self.base, sys.executable,
                            '-I', SCRIPT, '--deprovision', '--user', '--root', root],
                           env=dict(os.environ, PATH=self.tools + os.pathsep + os.environ['PATH']))

    def userdel_calls(self):
        with open(self.calls) as f:
            return f.read().splitlines()

    def test_the_record_stays_until_userdel_succeeds(self):
        open(self.busy, 'w').close()
        run = self.deprovision(self.root)
        self.assertEqual(run.code, 1, run)
        self.assertIn('currently used by process 4242', run.stderr)
        self.assertTrue(os.path.exists(os.path.join(self.root, STATE)), run)
        self.assertNotIn('remove /var/lib/azure-provisioning/state.json', run.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.root, 'etc/ssh/ssh_host_rsa_key')))
        # the user logged out: a second run removes it, then the record
        os.remove(self.busy)
        run = self.deprovision(self.root)
        self.assertEqual(run.code, 0, run)
        self.assertEqual(self.userdel_calls(), ['--root %s -r alice' % self.root] * 2)
        self.assertFalse(os.path.exists(os.path.join(self.root, STATE)))
        self.assertFalse(os.path.exists(os.path.join(self.root, 'etc/sudoers.d/azure-provisioning')))
        self.assertEqual(run.stdout.splitlines()[-2],
                         'remove /var/lib/azure-provisioning/state.json (this VM\'s '
                         'provisioning record)')
        run = self.deprovision(self.root)
        self.assertEqual((run.code, run.stdout), (0, 'nothing to remove: this is an image '
                                                      'already\n'), run)

    def test_a_corrupt_record_is_not_taken_for_no_user(self):
        write(os.path.join(self.root, STATE), b'{"admin_user_created": "alice\xff"}')
        run = self.deprovision(self.root)
        self.assertEqual(run.code, 1, run)
        self.assertEqual(run.stderr, 'azure-provisioning: error: deprovision: the record '
                                     '/var/lib/azure-provisioning/state.json is not UTF-8: which '
                                     'admin user --user should remove is unknown; remove it '
                                     'yourself (userdel -r NAME), then run --deprovision '
                                     'without --user\n')
        self.assertEqual(run.stdout, '')
        self.assertTrue(os.path.exists(os.path.join(self.root, STATE)))
        self.assertTrue(os.path.exists(os.path.join(self.root, 'etc/ssh/ssh_host_rsa_key')))
        # without --user the record goes like the rest
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root])
        self.assertEqual(run.code, 0, run)
        self.assertFalse(os.path.exists(os.path.join(self.root, STATE)))

    def test_a_relative_root_reaches_userdel_absolute(self):
        run = self.deprovision('image')
        self.assertEqual(run.code, 0, run)
        self.assertEqual(self.userdel_calls(), ['--root %s -r alice' % self.root])
        self.assertFalse(os.path.exists(os.path.join(self.root, STATE)))

    def test_the_parsers_make_root_absolute(self):
        here = os.getcwd()
        for parse in (ap.parse_args, ap.build_parser().parse_args):
            for text, absolute in (('img', os.path.join(here, 'img')), ('/mnt/x', '/mnt/x'),
                                   ('./a/b', os.path.join(here, './a/b'))):
                with self.subTest(parser=parse.__name__, root=text):
                    self.assertEqual(parse(['--check', '--root', text]).root, absolute)
                    self.assertEqual(parse(['--check', '--root=' + text]).root, absolute)


LOGIN_DEFS = ('# /etc/login.defs\n#\nMAIL_DIR /var/mail\n#UID_MIN 10\n'
              'UID_MIN\t\t\t %s\nUID_MAX %s\nSYS_UID_MIN 101\n')


class AccountsOutsideTheUserRange(unittest.TestCase):
    """Defect 12: nobody (65534), and whatever login.defs puts outside UID_MIN..UID_MAX,
    is neither removed by --deprovision --user nor made the admin user."""

    def setUp(self):
        self.root = provisioned_tree(tempfile.mkdtemp(prefix='azp-uid-range-'))
        self.addCleanup(shutil.rmtree, self.root)
        with open(os.path.join(self.root, 'etc/passwd'), 'a') as f:
            f.write('nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n')

    def dry_run(self, name):
        write(os.path.join(self.root, STATE), json.dumps(
            {'result': 'provisioned', 'vm_id': VM_A, 'admin_user_created': name}).encode())
        return script('--deprovision', '--user', '--dry-run', '--root', self.root)

    def test_nobody_is_not_removed(self):
        run = self.dry_run('nobody')
        self.assertEqual(run.code, 1, run)
        self.assertNotIn('would remove the admin user', run.stdout)
        self.assertEqual(run.stderr, 'azure-provisioning: error: deprovision: the record names '
                                     'nobody, a system account (uid 65534); refused: user '
                                     'accounts are uids 1000..60000 (UID_MIN..UID_MAX of '
                                     '/etc/login.defs)\n')

    def test_the_images_login_defs_decides(self):
        defs = os.path.join(self.root, 'etc/login.defs')
        for text, refused in ((LOGIN_DEFS % (2000, 60000), '2000..60000'),
                              (LOGIN_DEFS % (1000, 1400), '1000..1400'),
                              (LOGIN_DEFS % (500, 1600), None),
                              (LOGIN_DEFS % (0, 70000), None),      # root stays refused
                              # numbers as useradd reads them (strtoul, base 0):
                              # 0x10 = 16, 02733 = 1499
                              ('UID_MIN 0x10\nUID_MAX 02733\n', '16..1499'),
                              ('UID_MIN 0x\nUID_MAX lots\n\xff\n', None),       # defaults
                              ('UID_MIN 2000 # people\n', None),   # not a number: default
                              ('UID_MIN 1600\nUID_MAX 1200\n', None),   # no range: defaults
                              ('# ' + 'x' * (2 << 20) + '\nUID_MIN 2000\n', None)):
            with self.subTest(defs=text[:40]):
                with open(defs, 'w', encoding='utf-8', errors='surrogateescape') as f:
                    f.write(text)
                run = self.dry_run('alice')
                if refused:
                    self.assertEqual(run.code, 1, run)
                    self.assertIn('the record names alice, a system account (uid 1500); '
                                  'refused: user accounts are uids %s' % refused, run.stderr)
                else:
                    self.assertEqual(run.code, 0, run)
                    self.assertIn('would remove the admin user alice', run.stdout)
        with open(defs, 'w') as f:
            f.write(LOGIN_DEFS % (0, 70000))
        for name, why in (('root', 'uid 0 is root'),
                          ('nobody', 'uid 65534 is nobody (the kernel\'s overflow uid)')):
            run = self.dry_run(name)
            self.assertEqual(run.code, 1, run)
            self.assertIn('the record names %s, a system account (uid %s); refused: %s\n'
                          % (name, why.split()[1], why), run.stderr)

    def test_provisioning_does_not_make_nobody_the_admin(self):
        # the plan only (the root's own accounts are read, nothing is done): IMDS
        # naming an account that exists outside the range is refused
        with open(os.path.join(self.root, 'etc/passwd'), 'a') as f:
            f.write('daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n')
        system, facts = in_root(self.root, Capture())
        for name in ('nobody', 'root'):
            request = ap.UserRequest(name, [], [], None, None)
            with self.assertRaisesRegex(ap.ProvisioningError,
                                        'admin user %s exists as a system account' % name):
                ap.user_plan(facts, system, request)
        # the run's root's login.defs decides: with UID_MIN 1, daemon (uid 1) would do,
        # as the account it is (no useradd)
        write(os.path.join(self.root, 'etc/login.defs'), (LOGIN_DEFS % (1, 60000)).encode())
        _, plan = ap.user_plan(facts, system, ap.UserRequest('daemon', [], [], None, None))
        self.assertEqual([action.says for action in plan],
                         ['lock the password of daemon (usermod -L)',
                          'write /etc/sudoers.d/azure-provisioning granting daemon sudo'])


def strict_outputs():
    """(python, flags, environment) under which a stream refuses what it cannot encode,
    or passes undecodable bytes raw (-I ignores PYTHONIOENCODING; the unit uses -I)."""
    cases = [(sys.executable, [], {'PYTHONIOENCODING': 'ascii:strict'}),
             (sys.executable, [], {'PYTHONIOENCODING': 'utf-8:strict'}),
             (sys.executable, ['-I'], {})]
    for python in sorted(glob.glob(os.path.expanduser('~/.pyenv/versions/3.6*/bin/python3'))):
        cases.append((python, ['-I'], {'LC_ALL': 'C', 'LANG': 'C'}))    # ASCII there
    return cases


class OutputNeverCrashesNorEscapes(unittest.TestCase):
    """Defect 13: names from the image under a strict stdout encoding (ASCII, as
    Python 3.6 under LANG=C), escape sequences in them."""

    def assert_clean(self, stdout):
        for raw in (b'\x1b', b'\x07', b'\xff', b'\xc2\x9b'):
            self.assertNotIn(raw, stdout)
        return stdout.decode('utf-8')

    def test_deprovision_shows_a_non_utf8_lease_name(self):
        for python, flags, env in strict_outputs():
            with self.subTest(python=python, flags=flags, env=env):
                root = provisioned_tree(tempfile.mkdtemp(prefix='azp-names-'))
                self.addCleanup(shutil.rmtree, root)
                leases = os.path.join(root, 'var/lib/dhcp').encode()
                hostile = b'dhclient.\xff\x1b[2J\x1b]0;owned\x07\xc2\x9b1m.leases'
                with open(os.path.join(leases, hostile), 'wb') as f:
                    f.write(b'lease {}\n')
                code, stdout, stderr = script('--deprovision', '--root', root, python=python,
                                              flags=flags, env=env, raw=True)
                self.assertEqual(code, 0, stderr)
                text = self.assert_clean(stdout)
                self.assertIn('remove /var/lib/dhcp/dhclient.', text)
                self.assertNotIn(hostile, os.listdir(leases))
                self.assertTrue(text.endswith('booting this disk again provisions it again\n'),
                                text)

    def test_status_and_check_show_non_ascii_names(self):
        base = tempfile.mkdtemp(prefix='azp-names-')
        self.addCleanup(shutil.rmtree, base)
        image = good_image(os.path.join(base, 'image'))
        write(os.path.join(image, 'etc/systemd/network/30-caf\u00e9\x1b[31m.network'),
              b'[Network]\nDHCP=yes\n')
        write(os.path.join(image, STATE), json.dumps(
            {'result': 'provisioned', 'vm_id': VM_A, 'hostname': 'w\u00e9b-7\x1b[2J'}).encode())
        for python, flags, env in strict_outputs():
            with self.subTest(python=python, flags=flags, env=env):
                code, stdout, stderr = script('--check', '--root', image, python=python,
                                              flags=flags, env=env, raw=True)
                self.assertEqual((code, stderr), (1, b''))
                text = self.assert_clean(stdout)
                self.assertIn('DHCP: systemd-networkd (/etc/systemd/network/30-caf', text)
                self.assertIn('image NOT ready: 1 blocking', text)
                code, stdout, stderr = script('--status', '--root', image, python=python,
                                              flags=flags, env=env, raw=True)
                self.assertEqual((code, stderr), (0, b''))
                self.assertIn('hostname: w', self.assert_clean(stdout))
        code, stdout, _ = script('--status', '--root', image, flags=[],
                                 env={'PYTHONIOENCODING': 'ascii:strict'}, raw=True)
        self.assertIn(b'hostname: w\\xe9b-7;', stdout)

    def test_the_writer_itself(self):
        stream = io.TextIOWrapper(io.BytesIO(), encoding='ascii', errors='strict')
        out = ap.Output(stream)
        out.write('a\u00e9\udcff\x1b[31mb\r\n2\tc\x9b\n')
        stream.flush()
        self.assertEqual(stream.buffer.getvalue(), b'a\\xe9\\ufffdb\\ufffd\n2\tc\\ufffd\n')

    def test_no_line_break_inside_a_line(self):
        # every character a terminal or str.splitlines() breaks a line at
        for brk in '\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029':
            with self.subTest(brk=brk):
                self.assertEqual(len(ap.printable('a%sb' % brk).splitlines()), 1)
                out = io.StringIO()
                ap.carry_out(ap.Action('remove /x%sy' % brk, None), True, ap.Output(out))
                self.assertEqual(out.getvalue().splitlines(), ['would remove /x\ufffdy'])


class CheckUnreadableFiles(unittest.TestCase):
    """Defect 14: --check as a user who cannot read a file (a 0600 grub.cfg, as Fedora
    ships it): that file's row says so, and every other row is printed."""

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix='azp-check-unreadable-')
        self.addCleanup(shutil.rmtree, self.base)
        self.image = good_image(os.path.join(self.base, 'image'))
        self.nobody = as_another_user(self, self.base)

    def check(self):
        return script('--check', '--root', self.image, **self.nobody)

    def test_an_unreadable_grub_cfg_is_one_row(self):
        grub = os.path.join(self.image, 'boot/grub2/grub.cfg')
        write(grub, b'linux /vmlinuz console=ttyS0\n', 0o600 if is_root() else 0)
        run = self.check()
        self.assertEqual(run.code, 0, run)
        self.assertEqual(run.stderr, '')
        self.assertIn('warn  /boot/grub2/grub.cfg: unreadable (Permission denied): not '
                      'checked\n      fix: run --check as root\n', run.stdout)
        self.assertIn('ok    unit enabled\n', run.stdout)
        self.assertIn('ok    DHCP: systemd-networkd', run.stdout)
        self.assertTrue(run.stdout.endswith('image ready: 0 blocking, 1 warnings (%s)\n'
                                            % self.image), run)

    def test_an_unreadable_unit_is_not_a_unit_without_execstart(self):
        os.chmod(os.path.join(self.image, 'etc/systemd/system/azure-provisioning.service'),
                 0o600 if is_root() else 0)
        run = self.check()
        self.assertEqual(run.stderr, '')
        self.assertIn('warn  /etc/systemd/system/azure-provisioning.service: unreadable '
                      '(Permission denied): not checked\n', run.stdout)
        self.assertNotIn('no ExecStart', run.stdout)
        self.assertIn('ok    walinuxagent not installed\n', run.stdout)
        self.assertIn('image ready: 0 blocking', run.stdout)

    def test_any_other_unreadable_file_ends_only_its_own_check(self):
        builtin = os.path.join(self.image, 'usr/lib/modules', KERNEL, 'modules.builtin')
        write(builtin, b'kernel/fs/ext4/ext4.ko\n', 0o600 if is_root() else 0)
        run = self.check()
        self.assertEqual((run.code, run.stderr), (0, ''), run)
        # the kernel's directory as found first (lib/modules: usr/lib/modules through the link)
        self.assertRegex(run.stdout, '\nwarn  media: /(usr/)?lib/modules/%s/modules.builtin: '
                         'Permission denied: not checked\n      fix: run --check as root\n'
                         % KERNEL)
        self.assertIn('ok    DHCP: systemd-networkd', run.stdout)
        self.assertIn('ok    cloud-init not installed\n', run.stdout)


class StatusSaysWhatItDoesNotKnow(unittest.TestCase):
    """Defect 15."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='azp-status-truth-')
        self.addCleanup(shutil.rmtree, self.root)

    def record(self, data):
        write(os.path.join(self.root, STATE), data)

    def status(self, *args, **how):
        return script('--status', '--root', self.root, *args, **how)

    def test_an_image_tree_has_no_vm_to_compare_with(self):
        self.record(json.dumps({'result': 'provisioned', 'vm_id': VM_A}).encode())
        os.makedirs(os.path.join(self.root, 'sys'))    # a mount point, as images have
        run = self.status()
        self.assertEqual(run.code, 0, run)
        self.assertTrue(run.stdout.endswith(
            'this VM: not looked up: %s holds no /sys/class/dmi/id/product_uuid (an image, '
            'not the running system)\n' % self.root), run)
        self.assertNotIn('run as root', run.stdout)
        write(os.path.join(self.root, 'sys/class/dmi/id/product_uuid'), b'Not Settable\n')
        self.assertTrue(self.status().stdout.endswith(
            'this VM: unknown (/sys/class/dmi/id/product_uuid holds no UUID)\n'))

    def test_an_unreadable_product_uuid_needs_root(self):
        base = tempfile.mkdtemp(prefix='azp-status-nobody-')
        self.addCleanup(shutil.rmtree, base)
        nobody = as_another_user(self, base)
        os.chmod(self.root, 0o755)
        self.record(json.dumps({'result': 'provisioned', 'vm_id': VM_A}).encode())
        os.chmod(os.path.join(self.root, STATE), 0o644)
        write(os.path.join(self.root, 'sys/class/dmi/id/product_uuid'), VM_A.encode(),
              0o400 if is_root() else 0)
        run = self.status(**nobody)
        self.assertTrue(run.stdout.endswith('this VM: unknown (/sys/class/dmi/id/product_uuid '
                                            'unreadable: run as root)\n'), run)

    def test_a_corrupt_record_is_not_no_record(self):
        for data, why in ((b'{"result": "provisioned", "vm_id": "\xff"}', 'not UTF-8'),
                          (b'{"result": ', 'not JSON'), (b'[1, 2]', 'not a JSON object'),
                          (b'[' * 100000 + b']' * 100000, 'not JSON'),
                          (b' ' * (ap.STATE_MAX + 1), 'larger than 1048576 bytes')):
            with self.subTest(why=why):
                self.record(data)
                run = self.status()
                self.assertEqual(run.code, 1, run)
                self.assertNotIn('no record', run.stdout)
                self.assertEqual(run.stdout.splitlines()[0],
                                 'record corrupt: %s is %s: whether and how this disk was '
                                 'provisioned is unknown' % (ap.STATE_FILE, why))
                run = self.status('--json')
                self.assertEqual((run.code, run.stdout), (1, ''), run)
                self.assertEqual(run.stderr, 'azure-provisioning: error: the record %s is %s\n'
                                 % (ap.STATE_FILE, why))

    def test_the_unit_line_follows_the_record(self):
        for state, unit in (
                ({'result': 'failed', 'step': 'user', 'reason': 'x'},
                 'unit: disabled: the next boot does not try again (it stays enabled after a '
                 'failure: someone disabled it)'),
                ({'result': 'provisioned'}, 'unit: disabled (it disabled itself after Ready)'),
                (None, 'unit: disabled (the next boot does not provision)')):
            with self.subTest(state=state):
                if state is None:
                    os.remove(os.path.join(self.root, STATE))
                else:
                    self.record(json.dumps(dict(state, vm_id=VM_A)).encode())
                run = self.status()
                self.assertIn('\n%s\n' % unit, run.stdout)
                self.assertNotIn('after Ready', run.stdout.replace(unit, ''))


if __name__ == '__main__':
    unittest.main()
