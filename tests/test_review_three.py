"""Third outside attack on issue 20's fixes (the admin user's records, host keys,
deprovision's plan, KVP, names): each test reproduces a finding and fails on the
code it was written against.  Root tests run in PrivateHost's namespaces; others on
temporary roots (whole runs of the script too: TemporaryRoot); the fake WireServer
and IMDS listen on 127.0.0.1."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import azure_provisioning as ap
from tests.fake_azure import DEFAULT_VM_ID, FakeAzure
from tests.support import SCRIPT, TemporaryRoot, in_root, is_root, require_root, run_command, skip
from tests import test_user
from tests.test_user import key


class AdminNameOnATemporaryRoot(unittest.TestCase):
    """Runs of the script with --provision-user on a temporary root (no root needed)
    and --deprovision --user of it, with test_user.AdminAccountHost's helpers for
    its account files and record (no tests of its own)."""

    def setUp(self):
        self.host = TemporaryRoot('web-7')
        self.addCleanup(self.host.cleanup)
        self.state = os.path.join(self.host.var_lib, 'azure-provisioning', 'state.json')

    entries = test_user.AdminAccountHost.entries
    free_id = test_user.AdminAccountHost.free_id
    append = test_user.AdminAccountHost.append
    record = test_user.AdminAccountHost.record
    read_record = test_user.AdminAccountHost.read_record
    deprovision_user = test_user.AdminAccountHost.deprovision_user

    def emulator(self, **fields):
        """The emulator, naming the VM as the run's host is named: no rename."""
        return FakeAzure(computer_name=self.host.hostname, **fields)

    def provision(self, az):
        run = self.host.run('--wireserver', az.wireserver_addr, '--imds', az.imds_addr,
                            '--provision-user', '--timeout', '30')
        self.assertNotIn('Traceback', run.stderr)
        return run


class ImagesGroupOfTheAdminName(test_user.AdminAccountHost):
    """Finding 1: the image has a group `alice` of its own (no members; it owns
    shared files) and no user alice; the VM's admin user is alice.  The first run's
    useradd fails ("group alice exists", exit 9), the failure record keeps
    admin_user_creating=alice.  The retry (next boot, or `systemctl restart`) takes
    the image's group for what a cut useradd left, and runs `groupdel alice`: the
    image's group is gone, its files' gid points at nothing (or at the next group
    to get that gid), and useradd then "succeeds".  Here the runs where useradd
    really fails (root); ImagesGroupRefusedByThePlan: the plan's refusal."""

    def test_a_useradd_that_made_nothing_leaves_no_claim(self):
        # useradd fails having made nothing (here: another tool holds /etc/passwd's
        # lock).  The run knows its outcome, so the record must not claim alice: a
        # later run would take the image's entries of that name for a cut useradd's
        self.host.write('passwd.lock', '1')
        with FakeAzure(computer_name='web-7', admin_username='alice',
                       public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 1, run)
            self.assertIn('useradd', az.health_reports[0]['description'])
        self.assertEqual(self.entries()['passwd'], [])
        state = self.read_record()
        self.assertEqual((state['result'], state.get('admin_user_creating')),
                         ('failed', None), state)

    def test_a_useradd_that_failed_after_writing_the_account_keeps_the_claim(self):
        # useradd writes the account, then cannot make the home (/home immutable):
        # exit 12 with alice in passwd.  That part is ours: the record keeps the claim
        # and the next run removes it and makes alice whole
        chattr = shutil.which('chattr')
        if not chattr or run_command([chattr, '+i', self.host.home]).code != 0:
            skip(self, 'chattr +i does not work on %s' % self.host.home)
        self.addCleanup(run_command, [chattr, '-i', self.host.home])
        with FakeAzure(computer_name='web-7', admin_username='alice',
                       public_keys=[key()]) as az:
            first = self.provision(az)
            self.assertEqual(first.code, 1, first)
            self.assertEqual(len(self.entries()['passwd']), 1, first)
            self.assertEqual(self.read_record()['admin_user_creating'], 'alice')
            run_command([chattr, '-i', self.host.home])
            second = self.provision(az)
            self.assertEqual(second.code, 0, second)
        self.assertIn('removed what a cut useradd left of alice', second.stderr)
        self.assertEqual(len(self.entries()['passwd']), 1)
        self.assertEqual(self.read_record()['admin_user_created'], 'alice')


class ImagesGroupRefusedByThePlan(AdminNameOnATemporaryRoot):
    """Finding 1 (ImagesGroupOfTheAdminName), on a temporary root: the image's group
    alice fails the plan, before useradd, in every run; nothing of it is removed."""

    def test_the_images_group_is_not_removed(self):
        gid = self.free_id() + 500     # the image's own gid, not the one useradd picks
        self.append('group', 'alice:x:%d:' % gid)
        self.append('gshadow', 'alice:!::')
        group = self.entries()['group']
        with self.emulator(admin_username='alice', public_keys=[key()]) as az:
            first = self.provision(az)
            self.assertEqual(first.code, 1, first)
            second = self.provision(az)
        # no useradd of ours was cut: nothing of alice is ours to remove, and the
        # image's group (its gid, owning its files) stays whatever the retry does
        self.assertNotIn('removed what a cut useradd left of alice', second.stderr)
        self.assertEqual(self.entries()['group'], group, (first.stderr, second.stderr))

    def test_the_images_group_fails_the_plan_and_nothing_is_made(self):
        gid = self.free_id() + 500
        self.append('group', 'alice:x:%d:' % gid)
        with self.emulator(admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
            self.assertEqual(report['substatus'], 'ProvisioningFailed')
            self.assertIn('the image has a group alice (gid %d) and no user alice' % gid,
                          report['description'])
        self.assertEqual(self.entries()['passwd'], [])
        self.assertIsNone(self.read_record().get('admin_user_creating'))


class EmptyHostKeysOnRecord(unittest.TestCase):
    """Finding 2: the keys made at the first boot are renamed into /etc/ssh without
    an fsync of their data (replace_host_keys), while the record that names them
    this VM's is fsynced (write_at).  A power cut after it (XFS, ext4 without
    auto_da_alloc) leaves zero-byte key files and a record saying "made for this
    VM": host_keys_complete takes any regular file for a key, the next boot keeps
    them, and sshd starts on none ("no hostkeys available"): the VM is unreachable
    over SSH."""

    VM = '11111111-2222-3333-4444-555555555555'

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='azp-review-three-')
        self.addCleanup(shutil.rmtree, self.root)
        os.makedirs(os.path.join(self.root, 'usr/sbin'))
        open(os.path.join(self.root, 'usr/sbin/sshd'), 'w').close()
        ssh = os.path.join(self.root, 'etc/ssh')
        os.makedirs(ssh)
        for kind in ('rsa', 'ecdsa', 'ed25519'):        # what the power cut left
            for name in ('ssh_host_%s_key' % kind, 'ssh_host_%s_key.pub' % kind):
                open(os.path.join(ssh, name), 'w').close()
        os.makedirs(os.path.join(self.root, 'var/lib/azure-provisioning'))
        with open(os.path.join(self.root, ap.STATE_FILE.lstrip('/')), 'w') as f:
            json.dump({'result': 'provisioned', 'vm_id': self.VM,
                       'ssh_host_keys_for': self.VM}, f)

    def test_empty_keys_are_replaced(self):
        system, facts = in_root(self.root)
        facts, plan = ap.plan_identity(facts._replace(vm_id=self.VM), system)
        self.assertEqual(len(plan), 1, facts.host_keys)
        self.assertIn('replace the SSH host keys', plan[0].says)


class ImmutableFileInThePlan(unittest.TestCase):
    """Finding 3: changeable() asks only whether the directory can be written in; a
    file that is immutable (chattr +i, as some images hold /etc/machine-id or
    resolv.conf) or append-only passes the plan.  The dry run lists every action and
    exits 0; the real run removes the host keys, then stops at the machine id
    ("Operation not permitted"), exit 1: half done, what defect 10's fix promised
    would not happen."""

    def setUp(self):
        require_root(self)
        if not shutil.which('chattr') or not shutil.which('ssh-keygen'):
            skip(self, 'no chattr or ssh-keygen')
        self.root = tempfile.mkdtemp(prefix='azp-review-three-')
        self.addCleanup(shutil.rmtree, self.root)
        os.makedirs(os.path.join(self.root, 'etc/ssh'))
        subprocess.check_call(['ssh-keygen', '-q', '-A', '-f', self.root],
                              stdout=subprocess.DEVNULL)
        self.machine_id = os.path.join(self.root, 'etc/machine-id')
        with open(self.machine_id, 'w') as f:
            f.write('0123456789abcdef0123456789abcdef\n')
        if subprocess.call(['chattr', '+i', self.machine_id], stderr=subprocess.DEVNULL):
            skip(self, 'the filesystem of %s has no immutable files' % self.root)
        self.addCleanup(subprocess.call, ['chattr', '-i', self.machine_id])
        self.keys = sorted(os.listdir(os.path.join(self.root, 'etc/ssh')))

    def deprovision(self, *extra):
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root]
                          + list(extra), timeout=60)
        self.assertNotIn('Traceback', run.stderr)
        return run

    def test_nothing_is_removed_when_the_machine_id_cannot_be_changed(self):
        dry = self.deprovision('--dry-run')
        real = self.deprovision()
        # the machine id cannot be emptied: the dry run says so, and nothing is removed
        self.assertEqual((dry.code, real.code, sorted(os.listdir(os.path.join(
            self.root, 'etc/ssh')))), (1, 1, self.keys), (dry.stdout, real.stdout, real.stderr))
        self.assertIn('/etc/machine-id cannot be changed: it is immutable (chattr +i)',
                      dry.stderr)

    def test_an_append_only_directory_keeps_its_files(self):
        # unlink and rename over a name fail in an append-only directory (EPERM),
        # though it can be written in: the keys of an append-only /etc/ssh stay
        subprocess.check_call(['chattr', '-i', self.machine_id])
        ssh = os.path.join(self.root, 'etc/ssh')
        if subprocess.call(['chattr', '+a', ssh], stderr=subprocess.DEVNULL):
            skip(self, 'the filesystem of %s has no append-only directories' % self.root)
        self.addCleanup(subprocess.call, ['chattr', '-a', ssh])
        dry = self.deprovision('--dry-run')
        real = self.deprovision()
        with open(self.machine_id) as f:
            machine_id = f.read()
        self.assertEqual((dry.code, real.code, sorted(os.listdir(ssh)), machine_id),
                         (1, 1, self.keys, '0123456789abcdef0123456789abcdef\n'),
                         (dry.stdout, real.stdout, real.stderr))
        self.assertIn('/etc/ssh/ssh_host_rsa_key cannot be changed: its directory is '
                      'append-only (chattr +a)', real.stderr)


class HomeThatWasTheImages(AdminNameOnATemporaryRoot):
    """Finding 4: the image holds /home/alice of its own (data, owned by uid 1500)
    and no user alice; the VM's admin user is alice.  useradd -m keeps the directory
    (a warning, exit 0) and the keys go into it.  --deprovision --user: userdel -r
    removes the account, refuses the home ("not owned by alice, not removing", exit
    12): exit 1.  Every re-run then says "the admin user alice is gone, but its home
    /home/alice is still there ... remove it yourself": deprovisioning cannot finish
    unless the image's own data is deleted, and meanwhile the admin's
    authorized_keys stays in the image's directory.

    The reviewer's test expected provisioning to succeed and deprovision to finish
    keeping the data.  It asserts instead that provisioning fails at plan time,
    naming the home, with nothing made: an admin user living in a home it does not
    own cannot log in by key (sshd StrictModes) and leaves the admin's keys in the
    image's directory, and refusing it keeps "a home left after userdel -r is the
    admin user's" true.  Deprovision of that tree finishes and keeps the data.  On a
    temporary root (no root needed): the image's home is another uid's as root
    (1500), else this user's own."""

    def images_home(self, uid):
        home = os.path.join(self.host.home, 'alice')
        os.mkdir(home, 0o755)
        if uid != os.geteuid():
            os.chown(home, uid, uid)
        with open(os.path.join(home, 'data.txt'), 'w') as f:
            f.write('the image\'s own\n')
        return home

    def assert_data_intact(self, home, uid):
        with open(os.path.join(home, 'data.txt')) as f:
            self.assertEqual(f.read(), 'the image\'s own\n')
        self.assertEqual(os.stat(home).st_uid, uid)

    def test_provisioning_fails_naming_the_home_and_deprovision_finishes(self):
        owner = 1500 if is_root() else os.geteuid()
        home = self.images_home(owner)
        with self.emulator(admin_username='alice', public_keys=[key()]) as az:
            run = self.provision(az)
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
            self.assertEqual(report['substatus'], 'ProvisioningFailed')
            self.assertIn('/home/alice exists in the image, owned by uid %d: remove it from '
                          'the image or choose another admin name' % owner,
                          report['description'])
        self.assertEqual(self.entries()['passwd'], [])
        self.assertEqual(sorted(os.listdir(home)), ['data.txt'])
        self.assert_data_intact(home, owner)
        run = self.deprovision_user()
        self.assertEqual(run.code, 0, run)
        self.assertEqual(self.entries()['passwd'], [])
        self.assert_data_intact(home, owner)

    def test_a_home_of_another_existing_user_does_not_block_deprovision(self):
        # the record's user is gone; /home/alice belongs to a user still in passwd
        # (root; nobody or another this user is): it is not what userdel -r failed to
        # remove, and not ours to name
        owner = os.geteuid()
        if ':%d:' % owner not in self.host.read('passwd'):
            self.host.add_account('runner', owner, '!', home='/nonexistent')
        home = self.images_home(owner)
        self.record(result='provisioned', vm_id=DEFAULT_VM_ID, admin_user_created='alice')
        run = self.deprovision_user()
        self.assertEqual(run.code, 0, run)
        self.assert_data_intact(home, owner)


class StatusRootWithALineBreak(unittest.TestCase):
    """Finding 5 (low): --status --root prints the root's path raw in "this VM: not
    looked up: ROOT holds no ..." (the only line not put through printable): a
    line break in the path (a mount point made by a script from an image's label)
    splits the line, and the next one reads as a line of its own."""

    def test_every_line_is_a_status_line(self):
        parent = tempfile.mkdtemp(prefix='azp-review-three-')
        self.addCleanup(shutil.rmtree, parent)
        root = os.path.join(parent, 'image\nunit: enabled')
        os.makedirs(os.path.join(root, 'var/lib/azure-provisioning'))
        with open(os.path.join(root, ap.STATE_FILE.lstrip('/')), 'w') as f:
            json.dump({'result': 'provisioned', 'vm_id': 'x'}, f)
        run = run_command([sys.executable, '-I', SCRIPT, '--status', '--root', root], timeout=60)
        self.assertNotIn('Traceback', run.stderr)
        lines = run.stdout.splitlines()
        self.assertTrue(lines[-1].startswith('this VM: not looked up: '), lines)
        self.assertFalse(any(line.startswith('unit: enabled') for line in lines), lines)
