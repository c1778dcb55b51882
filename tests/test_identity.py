"""Per-VM identity on temporary roots: SSH host keys replaced only when the vmId
changes (the fingerprints printed are the keys on disk), the record written after
Ready and after a failure, --deprovision removing exactly what it lists (a full
listing before and after), --status and its vmId from DMI."""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import (SCRIPT, in_root, is_root, one_step, root_with_kvp_pool, run_command,
                           skip, tree_snapshot)

VM_A = '11111111-2222-3333-4444-555555555555'
VM_B = '66666666-7777-8888-9999-000000000000'


def write(path, data=b'', mode=0o644):
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as f:
        f.write(data)
    os.chmod(path, mode)


def listing(root):
    """tree_snapshot's, with each path as on the VM (/etc/...)."""
    return dict(('/' + path, entry) for path, entry in tree_snapshot(root).items())


class Capture(ap.Log):
    def __init__(self):
        ap.Log.__init__(self, stream=io.StringIO())

    @property
    def text(self):
        return self.stream.getvalue()


class HostKeys(unittest.TestCase):

    def setUp(self):
        if not shutil.which('ssh-keygen'):
            skip(self, 'no ssh-keygen (apt-get install openssh-client)')
        self.root = tempfile.mkdtemp(prefix='azp-keys-')
        self.addCleanup(shutil.rmtree, self.root)
        write(os.path.join(self.root, 'usr/sbin/sshd'), b'', 0o755)
        os.makedirs(os.path.join(self.root, 'etc/ssh'))
        # the template's keys, as a captured image has them
        subprocess.check_call(['ssh-keygen', '-q', '-A', '-f', self.root], stdout=subprocess.DEVNULL)
        self.template = self.keys()

    def keys(self):
        ssh = os.path.join(self.root, 'etc/ssh')
        return dict((n, ap.read_bytes(os.path.join(ssh, n)))
                    for n in os.listdir(ssh) if n.startswith('ssh_host_'))

    def boot(self, vm_id, **options):
        """One provisioning of the identity step as VM vm_id, then its record."""
        log = Capture()
        system, facts = in_root(self.root, log, **options)
        facts, _ = one_step(ap.plan_identity, system, facts._replace(vm_id=vm_id))
        ap.write_state(system, facts, 'provisioned')
        return facts, log

    def test_replaced_at_first_boot_kept_after_then_replaced_for_another_vm(self):
        facts, log = self.boot(VM_A)
        first = self.keys()
        self.assertEqual(facts.host_keys, 'replaced')
        self.assertEqual(sorted(first), sorted(self.template))
        for name in first:
            self.assertNotEqual(first[name], self.template[name], name)
        private = [n for n in first if not n.endswith('.pub')]
        for name in private:
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.root, 'etc/ssh', name))
                                          .st_mode), 0o600)
        # the printed fingerprints are those of the keys on disk
        lines = log.text.splitlines()
        begin = lines.index('-----BEGIN SSH HOST KEY FINGERPRINTS-----')
        end = lines.index('-----END SSH HOST KEY FINGERPRINTS-----')
        printed = sorted(lines[begin + 1:end])
        on_disk = sorted(subprocess.check_output(
            ['ssh-keygen', '-l', '-f', os.path.join(self.root, 'etc/ssh', n)],
            universal_newlines=True).strip() for n in first if n.endswith('.pub'))
        self.assertEqual(printed, on_disk)
        self.assertEqual(len(printed), len(private))

        # the same VM again (a reboot before the unit disabled itself): kept
        facts, log = self.boot(VM_A)
        self.assertEqual(self.keys(), first)
        self.assertEqual(facts.host_keys, 'kept (made for this VM)')
        self.assertNotIn('FINGERPRINTS', log.text)

        # the disk captured again without --deprovision, booted as another VM: replaced
        facts, log = self.boot(VM_B)
        second = self.keys()
        for name in second:
            self.assertNotEqual(second[name], first[name], name)
        self.assertEqual(facts.host_keys, 'replaced')

    def test_etc_ssh_is_never_without_keys(self):
        # an sshd re-executing itself (an earlier reload lands late) exits for good
        # when it finds no key: the new ones are made aside, then renamed over
        tools = tempfile.mkdtemp(prefix='azp-keygen-')
        self.addCleanup(shutil.rmtree, tools)
        seen = os.path.join(tools, 'seen')
        write(os.path.join(tools, 'ssh-keygen'),
              ('#!/bin/sh\nls %s/etc/ssh | grep -c "^ssh_host_.*_key$" >> %s\nexec %s "$@"\n'
               % (self.root, seen, shutil.which('ssh-keygen'))).encode(), 0o755)
        path = os.environ['PATH']
        os.environ['PATH'] = tools + os.pathsep + path
        self.addCleanup(os.environ.__setitem__, 'PATH', path)
        self.boot(VM_A)
        with open(seen) as f:
            counts = [int(n) for n in f.read().split()]
        self.assertTrue(counts and min(counts) >= 1, counts)
        self.assertEqual(sorted(self.keys()), sorted(self.template))
        self.assertEqual([n for n in os.listdir(os.path.join(self.root, 'etc'))
                          if n.startswith('.')], [], 'the aside directory was left')

    def test_keys_a_power_cut_left_aside_are_removed(self):
        # a power cut during ssh-keygen -A leaves the directory the keys were made in,
        # with private keys in it; the next run replaces the keys and must not leave it
        aside = os.path.join(self.root, 'etc/.azure-provisioning-keys.k3x9_q')
        write(os.path.join(aside, 'etc/ssh/ssh_host_rsa_key'), b'PRIVATE', 0o600)
        write(os.path.join(aside, 'etc/ssh/ssh_host_ecdsa_key.Ab3dE5gH7j'), b'', 0o600)
        # not ours, though alike: a file, and a link to a directory elsewhere
        write(os.path.join(self.root, 'etc/.azure-provisioning-keys.file'), b'x')
        elsewhere = tempfile.mkdtemp(prefix='azp-elsewhere-')
        self.addCleanup(shutil.rmtree, elsewhere)
        write(os.path.join(elsewhere, 'keep'), b'keep')
        os.symlink(elsewhere, os.path.join(self.root, 'etc/.azure-provisioning-keys.link'))
        facts, log = self.boot(VM_A)
        self.assertEqual(facts.host_keys, 'replaced')
        self.assertEqual(sorted(n for n in os.listdir(os.path.join(self.root, 'etc'))
                                if n.startswith('.')),
                         ['.azure-provisioning-keys.file', '.azure-provisioning-keys.link'])
        self.assertEqual(os.listdir(elsewhere), ['keep'])
        self.assertIn('ssh host keys: removed %s, left by an interrupted run' % aside, log.text)

    def test_keys_reach_the_disk_before_the_record_names_them(self):
        # a power cut after the record is written must find the keys it names whole:
        # each key's data is fsynced before its rename, /etc/ssh after the renames,
        # both before the record's own fsync
        from unittest import mock
        ssh = os.path.join(self.root, 'etc/ssh')
        record = os.path.join(self.root, 'var/lib/azure-provisioning')
        synced = []
        fsync = os.fsync

        def recording(fd):
            st = os.fstat(fd)
            names = None
            if os.path.samestat(st, os.stat(ssh)):
                names = dict((n, os.lstat(os.path.join(ssh, n)).st_ino)
                             for n in os.listdir(ssh) if n.startswith('ssh_host_'))
            synced.append((st.st_ino, names))
            return fsync(fd)
        with mock.patch.object(os, 'fsync', recording):
            facts, _ = self.boot(VM_A)
        self.assertEqual(facts.host_keys, 'replaced')
        keys = dict((n, os.lstat(os.path.join(ssh, n)).st_ino) for n in self.keys())
        ssh_synced = [i for i, (_, names) in enumerate(synced) if names == keys]
        self.assertTrue(ssh_synced, '/etc/ssh not fsynced once all the new keys were in it')
        inodes = [ino for ino, _ in synced[:ssh_synced[0]]]
        self.assertEqual([n for n, ino in sorted(keys.items()) if ino not in inodes], [],
                         'keys whose data was not fsynced before /etc/ssh was')
        state = os.lstat(os.path.join(record, 'state.json')).st_ino
        self.assertGreater([ino for ino, _ in synced].index(state), ssh_synced[0])

    def test_keys_on_record_that_are_not_whole_are_replaced(self):
        self.boot(VM_A)
        ssh = os.path.join(self.root, 'etc/ssh')
        other = tempfile.mkdtemp(prefix='azp-other-key-')
        self.addCleanup(shutil.rmtree, other)
        subprocess.check_call(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f',
                               os.path.join(other, 'key')])
        for damage in ('another key\'s public half', 'a private key cut short'):
            made = self.keys()
            if damage == 'a private key cut short':
                write(os.path.join(ssh, 'ssh_host_rsa_key'), made['ssh_host_rsa_key'][:200],
                      0o600)
            else:
                shutil.copy(os.path.join(other, 'key.pub'),
                            os.path.join(ssh, 'ssh_host_ed25519_key.pub'))
            system, facts = in_root(self.root, Capture())
            _, plan = ap.plan_identity(facts._replace(vm_id=VM_A), system)
            self.assertEqual(len(plan), 1, damage)
            self.assertIn('are not all there, or not whole', plan[0].says, damage)
            facts, _ = self.boot(VM_A)
            self.assertEqual(facts.host_keys, 'replaced', damage)
            after = self.keys()
            self.assertTrue(all(after[n] != made[n] for n in made), damage)
        # whole again: kept
        facts, _ = self.boot(VM_A)
        self.assertEqual(facts.host_keys, 'kept (made for this VM)')

    def test_keep_option_and_no_sshd(self):
        facts, _ = self.boot(VM_A, keep_host_keys=True)
        self.assertEqual(self.keys(), self.template)
        self.assertEqual(facts.host_keys, 'kept (--keep-ssh-host-keys)')
        os.remove(os.path.join(self.root, 'usr/sbin/sshd'))
        facts, _ = self.boot(VM_B)
        self.assertEqual(self.keys(), self.template)
        self.assertEqual(facts.host_keys, 'none (no sshd)')

    def test_dry_run_says_and_keeps(self):
        out = io.StringIO()
        system, facts = in_root(self.root, Capture(), dry_run=True)
        one_step(ap.plan_identity, system, facts._replace(vm_id=VM_A), out)
        self.assertEqual(self.keys(), self.template)
        self.assertIn('would replace the SSH host keys (first boot of this image): remove %d '
                      'file(s) in /etc/ssh, ssh-keygen -A' % len(self.template), out.getvalue())

    def test_a_broken_record_costs_only_the_keys(self):
        write(os.path.join(self.root, 'var/lib/azure-provisioning/state.json'), b'{"vm_id": ')
        facts, _ = self.boot(VM_A)
        self.assertEqual(facts.host_keys, 'replaced')

    def test_keygen_failure_is_a_provisioning_failure(self):
        tools = tempfile.mkdtemp(prefix='azp-keygen-')
        self.addCleanup(shutil.rmtree, tools)
        write(os.path.join(tools, 'ssh-keygen'), b'#!/bin/sh\necho "no entropy" >&2\nexit 1\n',
              0o755)
        path = os.environ['PATH']
        os.environ['PATH'] = tools + os.pathsep + path
        self.addCleanup(os.environ.__setitem__, 'PATH', path)
        system, facts = in_root(self.root, Capture())
        with self.assertRaises(ap.ProvisioningError) as caught:
            one_step(ap.plan_identity, system, facts._replace(vm_id=VM_A))
        self.assertEqual(str(caught.exception), 'ssh host keys: %s/ssh-keygen failed: no entropy'
                         % tools)


class Record(unittest.TestCase):
    """provision() in this process on a temporary root against the emulator: no
    hostname change, no sshd, no media, the KVP pool under the root."""

    def provision(self, az, root):
        options = ap.Options(wireserver=ap.parse_address(az.wireserver_addr),
                             imds=ap.parse_address(az.imds_addr), timeout=20,
                             set_hostname=False, publish_hostname=False, root=root,
                             media='none')
        return ap.provision(options, Capture(), io.StringIO())

    def test_written_after_ready_and_after_a_failure(self):
        root, _ = root_with_kvp_pool(self, 'azp-record-')
        with FakeAzure(computer_name='web-7', vm_id=VM_A, incarnation=4) as az:
            self.assertEqual(self.provision(az, root), 0)
        path = os.path.join(root, 'var/lib/azure-provisioning/state.json')
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        with open(path) as f:
            state = json.load(f)
        self.assertEqual((state['result'], state['vm_id'], state['incarnation'],
                          state['agent']), ('provisioned', VM_A, '4',
                                            'azure-provisioning/%s' % ap.VERSION))
        self.assertEqual([s['step'] for s in state['steps']],
                         ['imds', 'media', 'hostname', 'user', 'identity', 'data', 'hooks',
                          'ready'])
        self.assertTrue(all(s['seconds'] >= 0 for s in state['steps']))
        self.assertNotIn('reason', state)
        # a failure: recorded with its step and reason
        hooks = os.path.join(root, 'etc/azure-provisioning/ready.d')
        write(os.path.join(hooks, '10-fail'), b'#!/bin/sh\necho broken >&2\nexit 3\n', 0o755)
        with FakeAzure(computer_name='web-7', vm_id=VM_A) as az:
            self.assertEqual(self.provision(az, root), 1)
        with open(path) as f:
            state = json.load(f)
        self.assertEqual((state['result'], state['step'], state['reason']),
                         ('failed', 'hooks', 'hook 10-fail failed with exit status 3: broken'))
        self.assertEqual(state['steps'][-1]['step'], 'hooks')

    def test_a_run_that_never_learned_its_vm_keeps_what_the_record_says(self):
        # a run cut after useradd, then one whose IMDS failed: the user stays ours
        root, _ = root_with_kvp_pool(self, 'azp-record-')
        path = os.path.join(root, 'var/lib/azure-provisioning/state.json')
        earlier = {'result': 'provisioning', 'vm_id': VM_A, 'step': 'user',
                   'admin_user_created': 'alice', 'admin_user_creating': 'bob',
                   'ssh_host_keys_for': VM_A}
        write(path, json.dumps(earlier).encode(), 0o600)
        with FakeAzure(computer_name='web-7', vm_id=VM_A, imds_faults=[403]) as az:
            self.assertEqual(self.provision(az, root), 1)
        with open(path) as f:
            state = json.load(f)
        self.assertEqual((state['result'], state['step']), ('failed', 'imds'))
        self.assertEqual(dict((k, state[k]) for k in earlier if k not in ('result', 'step')),
                         {'vm_id': VM_A, 'admin_user_created': 'alice',
                          'admin_user_creating': 'bob', 'ssh_host_keys_for': VM_A})
        # and the next run, on this VM, makes nothing of another VM's record
        with FakeAzure(computer_name='web-7', vm_id=VM_B) as az:
            self.assertEqual(self.provision(az, root), 0)
        with open(path) as f:
            state = json.load(f)
        self.assertEqual((state['vm_id'], state['admin_user_created'],
                          state['admin_user_creating']), (VM_B, None, None))

    def test_not_written_in_a_dry_run(self):
        root, _ = root_with_kvp_pool(self, 'azp-record-')
        with FakeAzure(computer_name='web-7') as az:
            options = ap.Options(wireserver=ap.parse_address(az.wireserver_addr),
                             imds=ap.parse_address(az.imds_addr), timeout=20,
                                 set_hostname=False, publish_hostname=False, root=root,
                                 media='none', dry_run=True)
            self.assertEqual(ap.provision(options, Capture(), io.StringIO()), 0)
        self.assertFalse(os.path.exists(os.path.join(root, 'var/lib/azure-provisioning')))


def as_nobody(test):
    """argv prefix that runs this interpreter as nobody ([] when not root); skips when
    nobody cannot run it (a pyenv build under /root)."""
    if not is_root():
        return []
    setpriv = shutil.which('setpriv')
    if not setpriv:
        skip(test, 'root and no setpriv to become nobody')
    prefix = [setpriv, '--reuid=65534', '--regid=65534', '--clear-groups']
    if run_command(prefix + [sys.executable, '-c', 'pass']).code != 0:
        skip(test, 'nobody cannot run %s' % sys.executable)
    return prefix


def provisioned_tree(root):
    """What a provisioned VM's disk holds, and things that must survive."""
    files = {
        'etc/ssh/ssh_host_ed25519_key': b'key', 'etc/ssh/ssh_host_ed25519_key.pub': b'pub',
        'etc/ssh/ssh_host_rsa_key': b'key', 'etc/ssh/ssh_host_rsa_key.pub': b'pub',
        'etc/ssh/sshd_config': b'Include /etc/ssh/sshd_config.d/*.conf\n',
        'etc/ssh/ssh_config': b'Host *\n', 'etc/ssh/moduli': b'moduli',
        'etc/machine-id': b'0123456789abcdef0123456789abcdef\n',
        'var/lib/dbus/machine-id': b'0123456789abcdef0123456789abcdef\n',
        'var/lib/dhcp/dhclient.eth0.leases': b'lease {}\n',
        'var/lib/dhcp/dhclient6.eth0.leases': b'lease6 {}\n',
        'var/lib/dhcp/keep-me.conf': b'x',
        'var/lib/dhclient/dhclient--eth0.lease': b'lease {}\n',
        'var/lib/NetworkManager/internal-0a1b-eth0.lease': b'ADDRESS=10.0.0.4\n',
        'var/lib/NetworkManager/NetworkManager.state': b'[main]\n',
        'var/lib/systemd/network/eth0.lease': b'x',
        'var/lib/hyperv/.kvp_pool_1': b'\0' * 2560, 'var/lib/hyperv/.kvp_pool_0': b'\0',
        'var/lib/azure-provisioning/state.json': json.dumps(
            {'result': 'provisioned', 'vm_id': VM_A, 'admin_user_created': 'alice'}).encode(),
        'var/lib/azure-provisioning/custom-data': b'#!/bin/sh\n',
        'var/lib/azure-provisioning/user-data': b'data',
        'etc/systemd/system/azure-provisioning.service': b'[Service]\n',
        'etc/sudoers.d/azure-provisioning': b'alice ALL=(ALL) ALL\n',
        'etc/sudoers.d/README': b'keep',
        'etc/passwd': b'root:x:0:0:root:/root:/bin/sh\nalice:x:1500:1500::/home/alice:/bin/sh\n',
        'etc/shadow': b'root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n',
        'etc/group': b'root:x:0:\nalice:x:1500:\n', 'etc/gshadow': b'root:*::\nalice:!::\n',
        'home/alice/.ssh/authorized_keys': b'ssh-ed25519 AAAA alice\n',
        'home/bob/notes': b'bob stays',
    }
    for name, data in files.items():
        write(os.path.join(root, name), data)
    return root


class Deprovision(unittest.TestCase):
    REMOVED = ['/etc/ssh/ssh_host_ed25519_key', '/etc/ssh/ssh_host_ed25519_key.pub',
               '/etc/ssh/ssh_host_rsa_key', '/etc/ssh/ssh_host_rsa_key.pub',
               '/var/lib/dbus/machine-id', '/var/lib/dhcp/dhclient.eth0.leases',
               '/var/lib/dhcp/dhclient6.eth0.leases', '/var/lib/dhclient/dhclient--eth0.lease',
               '/var/lib/NetworkManager/internal-0a1b-eth0.lease',
               '/var/lib/systemd/network/eth0.lease', '/var/lib/hyperv/.kvp_pool_0',
               '/var/lib/hyperv/.kvp_pool_1', '/var/lib/azure-provisioning/custom-data',
               '/var/lib/azure-provisioning/user-data', '/var/lib/azure-provisioning/state.json']

    def setUp(self):
        self.root = provisioned_tree(tempfile.mkdtemp(prefix='azp-deprov-'))
        self.addCleanup(shutil.rmtree, self.root)

    def deprovision(self, *args):
        return run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root]
                           + list(args))

    def test_removes_exactly_what_it_lists(self):
        before = listing(self.root)
        run = self.deprovision()
        self.assertEqual(run.code, 0, run)
        after = listing(self.root)
        gone = sorted(set(before) - set(after))
        self.assertEqual(gone, sorted(self.REMOVED))
        changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
        self.assertEqual(changed, ['/etc/machine-id'])
        self.assertEqual(after['/etc/machine-id'][:2], ('file', 0o644))
        self.assertEqual(os.path.getsize(os.path.join(self.root, 'etc', 'machine-id')), 0)
        added = sorted(set(after) - set(before))
        self.assertEqual(added, ['/etc/systemd/system/multi-user.target.wants',
                                 '/etc/systemd/system/multi-user.target.wants/'
                                 'azure-provisioning.service'])
        self.assertEqual(after[added[1]],
                         ('link', '/etc/systemd/system/azure-provisioning.service'))
        # each removal listed, one line each
        for path in self.REMOVED:
            self.assertIn('remove %s (' % path, run.stdout)
        self.assertIn('empty /etc/machine-id', run.stdout)
        self.assertIn('enable azure-provisioning.service', run.stdout)
        # one line: the admin user the record names stays (no --user), said while the
        # record that names it is still there
        warning, = run.stderr.splitlines()
        self.assertTrue(warning.startswith('azure-provisioning: warning: deprovision: the '
                                           'admin user alice (made by azure-provisioning) '
                                           'stays in the image'), run.stderr)
        # again: nothing left to do
        run = self.deprovision()
        self.assertEqual((run.code, run.stdout), (0, 'nothing to remove: this is an image '
                                                      'already\n'))

    def test_dry_run_changes_nothing(self):
        before = listing(self.root)
        run = self.deprovision('--dry-run', '--user')
        self.assertEqual(run.code, 0, run)
        self.assertEqual(listing(self.root), before)
        for path in self.REMOVED:
            self.assertIn('would remove %s (' % path, run.stdout)
        self.assertIn('would remove the admin user alice and its home (userdel -r)', run.stdout)

    def test_user_removes_the_admin_user_the_record_names(self):
        if not is_root():
            skip(self, 'userdel --root needs root')
        if not shutil.which('userdel'):
            skip(self, 'no userdel (apt-get install passwd)')
        os.chown(os.path.join(self.root, 'home/alice'), 1500, 1500)
        before = listing(self.root)
        run = self.deprovision('--user')
        self.assertEqual(run.code, 0, run)
        after = listing(self.root)
        for name in ('passwd', 'shadow'):
            with open(os.path.join(self.root, 'etc', name)) as f:
                self.assertNotIn('alice', f.read())
        self.assertFalse(os.path.exists(os.path.join(self.root, 'home/alice')))
        self.assertNotIn('/etc/sudoers.d/azure-provisioning', after)
        self.assertEqual(after['/home/bob/notes'], before['/home/bob/notes'])
        self.assertEqual(after['/etc/sudoers.d/README'], before['/etc/sudoers.d/README'])

    def test_without_a_record_no_user_is_removed(self):
        os.remove(os.path.join(self.root, 'var/lib/azure-provisioning/state.json'))
        run = self.deprovision('--user')
        self.assertEqual(run.code, 0, run)
        with open(os.path.join(self.root, 'etc', 'passwd')) as f:
            self.assertIn('alice', f.read())
        self.assertIn('no admin user made by azure-provisioning on record', run.stderr)

    def test_refusals(self):
        run = run_command(as_nobody(self) + [sys.executable, '-I', SCRIPT, '--deprovision'])
        self.assertEqual(run.code, 1, run)
        self.assertIn('--deprovision changes this machine: run it as root', run.stderr)
        for args, message in ((['--user'], '--user goes with --deprovision'),
                              (['--deprovision', '--status'], 'do not go together'),
                              (['--deprovision', '--root', '/nonexistent'], 'not a directory')):
            run = run_command([sys.executable, '-I', SCRIPT] + args)
            self.assertEqual(run.code, 2, run)
            self.assertIn(message, run.stderr)


class DeprovisionStaysInTheRoot(unittest.TestCase):
    """The review's findings: symbolic links out of --root, hostile records."""

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix='azp-deprov-links-')
        self.addCleanup(shutil.rmtree, self.base)
        self.root = os.path.join(self.base, 'image')
        self.outside = os.path.join(self.base, 'outside')
        for name in ('ssh/ssh_host_rsa_key', 'dhcp/dhclient.eth0.leases',
                     'hyperv/.kvp_pool_1', 'data/state.json'):
            write(os.path.join(self.outside, name), b'outside')
        os.makedirs(os.path.join(self.root, 'etc'))
        os.makedirs(os.path.join(self.root, 'var/lib'))
        # absolute links, as an image holds them: resolved naively they lead to this
        # machine's (here: the outside directory's) files
        os.symlink(os.path.join(self.outside, 'ssh'), os.path.join(self.root, 'etc/ssh'))
        os.symlink(os.path.join(self.outside, 'dhcp'), os.path.join(self.root, 'var/lib/dhcp'))
        os.symlink(os.path.join(self.outside, 'hyperv'),
                   os.path.join(self.root, 'var/lib/hyperv'))
        os.symlink(os.path.join(self.outside, 'data'),
                   os.path.join(self.root, 'var/lib/azure-provisioning'))

    def test_nothing_outside_is_removed(self):
        before = listing(self.outside)
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root])
        self.assertEqual(run.code, 0, run)
        self.assertEqual(listing(self.outside), before)
        # the links are the image's: resolved inside it, they lead to nothing there
        self.assertEqual(run.stdout, 'nothing to remove: this is an image already\n', run)

    def test_a_hostile_record_is_refused_in_one_line(self):
        os.remove(os.path.join(self.root, 'var/lib/azure-provisioning'))
        write(os.path.join(self.root, 'etc/passwd'), b'root:x:0:0::/root:/bin/sh\n'
                                                     b'bin:x:2:2::/bin:/usr/sbin/nologin\n')
        for name, message in (('root', 'a system account (uid 0); refused'),
                              ('bin', 'a system account (uid 2); refused'),
                              (['x'], "the record names the admin user ['x'], not a user name"),
                              ('../x', "the record names the admin user '../x', not a user name")):
            write(os.path.join(self.root, 'var/lib/azure-provisioning/state.json'),
                  json.dumps({'admin_user_created': name}).encode())
            run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--user',
                               '--root', self.root, '--dry-run'])
            self.assertEqual(run.code, 1, run)
            errors = [l for l in run.stderr.splitlines() if ' error: ' in l]
            self.assertEqual(len(errors), 1, run)
            self.assertIn(message, errors[0])
            self.assertNotIn('Traceback', run.stderr)


class PrivateFiles(unittest.TestCase):

    def test_a_previous_owner_and_mode_do_not_stay(self):
        root, _ = root_with_kvp_pool(self, 'azp-private-')
        directory = os.path.join(root, 'var/lib/azure-provisioning')
        write(os.path.join(directory, 'custom-data'), b'old', 0o666)
        os.chmod(directory, 0o777)
        if is_root():
            os.chown(directory, 65534, 65534)
            os.chown(os.path.join(directory, 'custom-data'), 65534, 65534)
        system, _ = in_root(root, Capture())
        ap.keep_data(system, 'custom-data', b'new')
        for path, mode in ((directory, 0o700), (os.path.join(directory, 'custom-data'), 0o600)):
            st = os.stat(path)
            self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid), (mode, os.geteuid()), path)

    def test_never_through_a_symlinked_directory(self):
        root, _ = root_with_kvp_pool(self, 'azp-private-')
        elsewhere = tempfile.mkdtemp(prefix='azp-elsewhere-')
        self.addCleanup(shutil.rmtree, elsewhere)
        os.symlink(elsewhere, os.path.join(root, 'var/lib/azure-provisioning'))
        system, facts = in_root(root, Capture())
        with self.assertRaisesRegex(ap.ProvisioningError, 'is a symbolic link; refusing'):
            ap.keep_data(system, 'custom-data', b'x')
        ap.write_state(system, facts, 'provisioned')    # the record: a warning, never a failure
        self.assertIn('could not write /var/lib/azure-provisioning/state.json',
                      system.log.text)
        self.assertEqual(os.listdir(elsewhere), [])


class Status(unittest.TestCase):

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='azp-status-')
        self.addCleanup(shutil.rmtree, self.root)

    def status(self, *args):
        return run_command([sys.executable, '-I', SCRIPT, '--status', '--root', self.root]
                           + list(args))

    def record(self, **fields):
        state = {'result': 'provisioned', 'vm_id': VM_A, 'incarnation': '2',
                 'timestamp': '2026-11-30T10:00:00Z', 'agent': 'azure-provisioning/0.1.0',
                 'hostname': 'web-7', 'admin_user': 'alice', 'admin_user_created': 'alice',
                 'ssh_host_keys': 'replaced',
                 'steps': [{'step': 'imds', 'seconds': 0.012}, {'step': 'ready', 'seconds': 0.2}]}
        state.update(fields)
        write(os.path.join(self.root, 'var/lib/azure-provisioning/state.json'),
              json.dumps(state).encode())
        return state

    def dmi(self, uuid, efi):
        write(os.path.join(self.root, 'sys/class/dmi/id/product_uuid'), uuid.encode() + b'\n')
        if efi:
            os.makedirs(os.path.join(self.root, 'sys/firmware/efi'))

    def test_not_provisioned(self):
        run = self.status()
        self.assertEqual(run.code, 1, run)
        self.assertEqual(run.stdout, 'not provisioned: no record '
                                     '(/var/lib/azure-provisioning/state.json)\n'
                                     'unit: disabled (the next boot does not provision)\n'
                                     'this VM: not looked up: %s holds no '
                                     '/sys/class/dmi/id/product_uuid (an image, not the '
                                     'running system)\n' % self.root)
        self.assertEqual(self.status('--json').stdout, 'null\n')

    def test_provisioned_on_this_gen2_vm(self):
        state = self.record()
        self.dmi(VM_A.upper(), efi=True)
        run = self.status()
        self.assertEqual(run.code, 0, run)
        self.assertEqual(run.stdout, (
            'provisioned: VM %s, incarnation 2, 2026-11-30T10:00:00Z, by '
            'azure-provisioning/0.1.0\n'
            'hostname: web-7; admin user: alice (made by us); SSH host keys: replaced\n'
            'steps: imds 12 ms, ready 200 ms\n'
            'unit: disabled (it disabled itself after Ready)\n'
            'this VM: %s: the record is this VM\'s\n' % (VM_A, VM_A)))
        run = self.status('--json')
        self.assertEqual((run.code, json.loads(run.stdout)), (0, state))

    def test_gen1_uuid_is_byte_swapped(self):
        self.record(vm_id='04030201-0605-0807-090a-0b0c0d0e0f10')
        self.dmi('01020304-0506-0708-090A-0B0C0D0E0F10', efi=False)
        run = self.status()
        self.assertEqual(run.code, 0, run)
        self.assertIn("this VM: 04030201-0605-0807-090a-0b0c0d0e0f10: the record is this VM's",
                      run.stdout)

    def test_captured_without_deprovision_and_failed(self):
        self.record()
        self.dmi(VM_B, efi=True)
        run = self.status()
        self.assertEqual(run.code, 1, run)
        self.assertIn('the record is of another VM', run.stdout)
        self.record(result='failed', step='hooks', reason='hook 10-x failed with exit status 1: '
                                                          'oops\x1b[31m')
        run = self.status()
        self.assertEqual(run.code, 1, run)
        self.assertIn('FAILED: VM %s' % VM_A, run.stdout)
        self.assertIn('failed step: hooks: hook 10-x failed with exit status 1: oops\n',
                      run.stdout)
        self.assertEqual(self.status('--json').code, 1)

    def test_a_hostile_record_is_shown_in_one_line_per_field(self):
        for steps in (5, [{'seconds': 'x'}], [{'seconds': 1e400}], [{'seconds': [1]}], [7]):
            self.record(steps=steps, vm_id='a\rprovisioned: VM fake\nhostname: evil',
                        reason='r\x9b2J\u202e', result='failed')
            run = self.status()
            self.assertEqual(run.code, 1, run)
            self.assertEqual(run.stderr, '')
            self.assertNotIn('\r', run.stdout)
            self.assertNotIn('\x9b', run.stdout)
            self.assertNotIn('\u202e', run.stdout)
            self.assertNotIn('\nhostname: evil', run.stdout)
        write(os.path.join(self.root, 'var/lib/azure-provisioning/state.json'),
              b'[' * 100000 + b']' * 100000)
        run = self.status()
        self.assertEqual((run.code, run.stderr), (1, ''), run)
        self.assertIn('record corrupt: /var/lib/azure-provisioning/state.json is not JSON',
                      run.stdout)

    def test_unreadable_record_is_one_line(self):
        if not is_root():
            skip(self, 'needs root to make a record only root can read, then become nobody')
        self.record()
        os.chmod(os.path.join(self.root, 'var/lib/azure-provisioning'), 0o700)
        run = run_command(as_nobody(self) + [sys.executable, '-I', SCRIPT, '--status',
                                             '--root', self.root])
        self.assertEqual(run.code, 1, run)
        self.assertEqual(run.stderr, 'azure-provisioning: error: cannot read '
                                     '/var/lib/azure-provisioning/state.json: Permission denied '
                                     '(run as root)\n')

    def test_unit_enabled_is_shown(self):
        self.record()
        os.makedirs(os.path.join(self.root, 'etc/systemd/system/multi-user.target.wants'))
        os.symlink('/etc/systemd/system/azure-provisioning.service', os.path.join(
            self.root, 'etc/systemd/system/multi-user.target.wants/azure-provisioning.service'))
        self.assertIn('unit: enabled (provisions at the next boot)\n', self.status().stdout)


if __name__ == '__main__':
    unittest.main()
