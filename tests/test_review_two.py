"""Second outside attack on issue 20's fixes (identity record, deprovision order, KVP,
login.defs): each test here reproduces a finding and fails on the code it was
written against.  Every run is on a temporary root; nothing of this machine is
touched (the fake WireServer and IMDS listen on 127.0.0.1)."""

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import SCRIPT, in_root, one_step, root_with_kvp_pool, run_command, skip
from tests.test_identity import VM_A, Capture, provisioned_tree, write
from tests.test_trust import STATE, fake_tool, read_record


def host_keys(root):
    ssh = os.path.join(root, 'etc/ssh')
    return dict((n, ap.read_bytes(os.path.join(ssh, n)))
                for n in os.listdir(ssh) if n.startswith('ssh_host_'))


class Provisioned(unittest.TestCase):
    """A temporary root with sshd, the template's host keys and a KVP pool directory;
    provision() runs the provisioner on it against the emulator, as VM_A."""

    def setUp(self):
        if not shutil.which('ssh-keygen'):
            skip(self, 'no ssh-keygen (apt-get install openssh-client)')
        self.root, self.pool = root_with_kvp_pool(self, 'azp-review-two-')
        write(os.path.join(self.root, 'usr/sbin/sshd'), b'', 0o755)
        os.makedirs(os.path.join(self.root, 'etc/ssh'))
        subprocess.check_call(['ssh-keygen', '-q', '-A', '-f', self.root],
                              stdout=subprocess.DEVNULL)
        self.template = host_keys(self.root)
        patch = mock.patch.object(ap, 'system_systemd', return_value=False)
        patch.start()
        self.addCleanup(patch.stop)

    def provision(self, timeout=20, **fake):
        log = Capture()
        with FakeAzure(vm_id=VM_A, **fake) as az:
            options = ap.Options(wireserver=ap.parse_address(az.wireserver_addr),
                                 imds=ap.parse_address(az.imds_addr), timeout=timeout,
                                 set_hostname=False, publish_hostname=False, root=self.root,
                                 media='none')
            code = ap.provision(options, log, io.StringIO())
            self.reports = list(az.health_reports)
        self.log = log.text
        return code


class NoHostKeysAfterAFailedDeprovision(Provisioned):
    """Finding 1: `--deprovision --user` whose userdel fails (the admin logged in, the
    usual case) has already removed the host keys, re-enabled the unit and kept the
    record, which says the keys were made for this VM.  The next boot of the same VM
    provisions again and trusts the record: "kept (made for this VM)", with no host
    key on disk at all; sshd cannot start (Debian's ssh.service makes none): the VM
    is unreachable over SSH."""

    def test_the_next_boot_makes_keys_when_there_are_none(self):
        self.assertEqual(self.provision(), 0, self.log)
        made = host_keys(self.root)
        self.assertNotEqual(made, self.template)
        # the admin user --provision-user made, as the record of such a VM says
        state = read_record(self.root)
        state['admin_user_created'] = 'alice'
        write(os.path.join(self.root, STATE), json.dumps(state).encode(), 0o600)
        write(os.path.join(self.root, 'etc/passwd'),
              b'root:x:0:0:root:/root:/bin/sh\nalice:x:1500:1500::/home/alice:/bin/sh\n')
        tools = fake_tool(self, 'userdel', 'echo "userdel: user alice is currently used by '
                                           'process 4242" >&2; exit 8\n')
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--user', '--root',
                           self.root], env=dict(os.environ, PATH=tools + os.pathsep
                                                + os.environ['PATH']))
        self.assertEqual(run.code, 1, run)
        self.assertEqual(host_keys(self.root), {}, run)     # removed before userdel
        self.assertEqual(read_record(self.root)['ssh_host_keys_for'], VM_A)
        # the admin reboots to log out; the unit, enabled again, provisions VM_A again
        self.assertEqual(self.provision(), 0, self.log)
        after = host_keys(self.root)
        self.assertIn('ssh_host_ed25519_key', after,
                      'no host keys on disk, and the run says: %s'
                      % read_record(self.root)['ssh_host_keys'])


class AdminUserForgottenAfterAnImdsFailure(Provisioned):
    """Finding 2: the run that created the admin user failed later (a hook, sshd...);
    the next boot's run fails at the IMDS step (IMDS unreachable for the whole
    deadline), and its record, with vm_id '', drops admin_user_created, because that
    is carried only from a record of the same vmId.  The third boot succeeds; the
    record never names alice again, and `--deprovision --user` puts her, her home and
    her keys into the image ("no admin user made by azure-provisioning on record")."""

    def test_the_user_made_stays_on_record(self):
        write(os.path.join(self.root, STATE), json.dumps({
            'result': 'failed', 'step': 'hooks', 'reason': 'hook 10-x failed', 'vm_id': VM_A,
            'admin_user_created': 'alice', 'ssh_host_keys_for': VM_A}).encode(), 0o600)
        self.assertEqual(self.provision(timeout=6, imds_down=True), 1, self.log)
        self.assertEqual(read_record(self.root)['step'], 'imds')
        self.assertEqual(self.provision(), 0, self.log)
        self.assertEqual(read_record(self.root).get('admin_user_created'), 'alice',
                         read_record(self.root))


class DeprovisionThenDeprovisionUser(unittest.TestCase):
    """Finding 3: `--deprovision` (without --user) removes the record, the only place
    that says which admin user we made; a later `--deprovision --user` (the admin
    changed their mind, or a build script runs both) says "nothing to remove: this is
    an image already", exit 0, and alice, her home, her keys and her sudo rule go into
    the image: defect 2's outcome by another order.

    Decided (not the reviewer's first expectation, that the second run still removes
    her): keeping the admin user is what plain --deprovision means (waagent's
    -deprovision does the same), and the image keeps no record (a record in an image
    would have every VM made from it claim a user it did not make).  So the choice
    is made at the first run, knowingly: it says, dry run and run alike, that alice
    stays and that --deprovision --user removes her; and --user run first does."""

    WARNING = ('warning: deprovision: the admin user alice (made by azure-provisioning) stays '
               'in the image')

    def setUp(self):
        base = tempfile.mkdtemp(prefix='azp-review-two-')
        self.addCleanup(shutil.rmtree, base)
        self.root = provisioned_tree(os.path.join(base, 'image'))
        self.calls = os.path.join(base, 'userdel-calls')
        tools = fake_tool(self, 'userdel', 'echo "$@" >> %s\n' % self.calls)
        self.env = dict(os.environ, PATH=tools + os.pathsep + os.environ['PATH'])

    def deprovision(self, *args):
        return run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--root', self.root]
                           + list(args), env=self.env)

    def test_plain_deprovision_says_the_user_stays(self):
        for args in (['--dry-run'], []):
            run = self.deprovision(*args)
            self.assertEqual(run.code, 0, run)
            self.assertIn(self.WARNING, run.stderr)
            self.assertIn('--deprovision --user removes it', run.stderr)
        self.assertFalse(os.path.exists(self.calls))
        self.assertIn('alice:', ap.read_bytes(os.path.join(self.root, 'etc/passwd')).decode())

    def test_no_word_of_a_user_that_is_not_there(self):
        write(os.path.join(self.root, 'etc/passwd'), b'root:x:0:0:root:/root:/bin/sh\n')
        run = self.deprovision('--dry-run')
        self.assertEqual(run.code, 0, run)
        self.assertNotIn('alice', run.stderr)

    def test_user_first_removes_it(self):
        run = self.deprovision('--user')
        self.assertEqual(run.code, 0, run)
        self.assertNotIn(self.WARNING, run.stderr)
        self.assertEqual(ap.read_bytes(self.calls).decode().split()[-2:], ['-r', 'alice'])
        self.assertEqual(self.deprovision().stdout, 'nothing to remove: this is an image '
                                                     'already\n')


class KvpPoolThatBlocks(Provisioned):
    """Finding 4: the pool is opened without O_NONBLOCK and written without checking
    it is a regular file.  A FIFO there whose pipe is full (a process holding it
    open) blocks the write forever; on the failure path KVP comes first, so
    ProvisioningFailed never reaches the WireServer and the run outlives --timeout
    (issue 20, defects 5 and 7: never block on a FIFO; the WireServer report must not
    depend on KVP)."""

    def test_a_full_fifo_does_not_stop_the_failure_report(self):
        os.mkfifo(self.pool)
        # what a process holding the FIFO open with its buffer full looks like
        holder = os.open(self.pool, os.O_RDWR | os.O_NONBLOCK)
        self.addCleanup(os.close, holder)
        try:
            while True:
                os.write(holder, b'x' * 4096)
        except BlockingIOError:
            pass
        done = []
        worker = threading.Thread(target=lambda: done.append(
            self.provision(timeout=6, imds_down=True)))
        worker.daemon = True
        started = time.monotonic()
        worker.start()
        worker.join(20)
        stuck = worker.is_alive()
        if stuck:   # let the blocked write finish, so that the thread and emulator end
            drain = os.open(self.pool, os.O_RDONLY | os.O_NONBLOCK)
            try:
                while os.read(drain, 65536):
                    pass
            except BlockingIOError:
                pass
            worker.join(10)
            os.close(drain)
        self.assertFalse(stuck, 'provisioning with --timeout 6 still running after %.0f s'
                         % (time.monotonic() - started))
        self.assertEqual(done, [1])
        self.assertEqual([r['substatus'] for r in self.reports], ['ProvisioningFailed'])


class LoginDefsAsUseraddReadsIt(unittest.TestCase):
    """Finding 5: shadow's useradd reads login.defs numbers with strtoul base 0: hex
    and octal count (useradd --root of shadow 4.13, Debian 12: `UID_MIN 0x5DC` and
    `UID_MIN 02734` both give the first user uid 1500).  user_uids takes a hex value
    for "not a number" (the defaults) and an octal one as decimal (2734): the range
    is then not the one useradd gave, and the admin user useradd made at uid 1500 is
    refused as "a system account" by --deprovision --user and by every later
    provisioning run."""

    def test_hex_and_octal(self):
        root = tempfile.mkdtemp(prefix='azp-review-two-')
        self.addCleanup(shutil.rmtree, root)
        for text in ('UID_MIN 0x5DC\n', 'UID_MIN 02734\n', 'UID_MIN 0X5dc\n'):
            with self.subTest(defs=text):
                write(os.path.join(root, 'etc/login.defs'), text.encode())
                self.assertEqual(ap.user_uids(ap.Root(root)), (1500, 60000))


if __name__ == '__main__':
    unittest.main()


class NamesThatBreakTheLine(unittest.TestCase):
    """Finding 6: Output.write splits its text at '\\n' *before* making each piece
    printable, so a newline inside a name is kept as a line break; and printable
    lets U+2028/U+2029 (line and paragraph separators) through.  The listing
    patterns end in `$`, which re.match lets match before a trailing newline: a lease
    or host key named 'a.lease\\n' is listed and its line is broken in two (defect 13:
    every name shown goes through printable, one line per action)."""

    def test_every_line_is_an_action(self):
        root = tempfile.mkdtemp(prefix='azp-review-two-')
        self.addCleanup(shutil.rmtree, root)
        write(os.path.join(root, 'var/lib/dhclient/a.lease\n'), b'x')
        write(os.path.join(root, 'etc/ssh/ssh_host_key\n'), b'x')
        # a lease of a name dhclient gives: without one, the names above (which no
        # pattern ending at the end of the name takes for a lease or host key) leave
        # nothing to remove, and the one line is "nothing to remove"
        write(os.path.join(root, 'var/lib/dhclient/b.lease'), b'x')
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--dry-run',
                           '--root', root])
        self.assertEqual(run.code, 0, run)
        self.assertIn('would remove /var/lib/dhclient/b.lease (DHCP lease)\n', run.stdout)
        for line in run.stdout.splitlines():
            self.assertTrue(line.startswith('would '), run.stdout)

    def test_a_line_separator_is_no_line_break(self):
        # U+2028: str.splitlines() (and so any Python reading our output) breaks there
        root = tempfile.mkdtemp(prefix='azp-review-two-')
        self.addCleanup(shutil.rmtree, root)
        write(os.path.join(root, 'var/lib/dhcp/dhclient\u2028forged.leases'), b'x')
        run = run_command([sys.executable, '-I', SCRIPT, '--deprovision', '--dry-run',
                           '--root', root])
        self.assertEqual(run.code, 0, run)
        for line in run.stdout.splitlines():
            self.assertTrue(line.startswith('would '), run.stdout)


@unittest.skipUnless(os.geteuid() == 0, 'says "run as root" only to a user who is not')
class StatusAsRootIsToldToRunAsRoot(unittest.TestCase):
    """Finding 7 (defect 15's class): as root, with --root IMAGE whose
    sys/class/dmi/id/product_uuid is a FIFO or larger than any UUID file, --status
    says "unreadable: run as root"."""

    def test_not_run_as_root(self):
        root = tempfile.mkdtemp(prefix='azp-review-two-')
        self.addCleanup(shutil.rmtree, root)
        write(os.path.join(root, STATE), b'{"result": "provisioned", "vm_id": "x"}')
        uuid = os.path.join(root, 'sys/class/dmi/id/product_uuid')
        os.makedirs(os.path.dirname(uuid))
        def large(path):
            with open(path, 'w') as f:
                f.truncate(100 << 20)
        for make in (os.mkfifo, large):
            with self.subTest(make=make):
                make(uuid)
                run = run_command([sys.executable, '-I', SCRIPT, '--status', '--root', root])
                os.remove(uuid)
                self.assertNotIn('run as root', run.stdout)


class KvpPoolThroughALink(Provisioned):
    """Finding 8: write_kvp opens the pool following links (O_CREAT, no O_NOFOLLOW,
    no regular-file check) and truncates what it finds when its mtime is older than
    the boot: a var/lib/hyperv/.kvp_pool_1 linking out of the root has the target
    emptied and overwritten with a KVP record (issue 20, defect 3's rule: nothing
    changed outside the root, every path checked at the action).  On a VM (root /)
    the same link would have any file of the machine truncated at first boot."""

    def test_a_file_outside_the_root_is_left_alone(self):
        outside = tempfile.mkdtemp(prefix='azp-review-two-outside-')
        self.addCleanup(shutil.rmtree, outside)
        precious = os.path.join(outside, 'precious')
        write(precious, b'precious data\n')
        os.utime(precious, (1000, 1000))      # older than this boot
        os.symlink(precious, self.pool)
        self.assertEqual(self.provision(), 0, self.log)
        self.assertEqual(ap.read_bytes(precious), b'precious data\n')


class SshdConfigDirectoryThatIsALink(unittest.TestCase):
    """Finding 9 (defect 8's class): sshd_config includes sshd_config.d/*.conf and
    sshd_config.d is a dangling symbolic link (or a file): sshd starts (the glob
    matches nothing), but the drop-in cannot be written, after the user was made, at
    every boot: ProvisioningFailed for good, with a message naming a file "not
    found"."""

    def test_the_setting_is_written_or_skipped(self):
        for kind in ('dangling link', 'file'):
            with self.subTest(kind=kind):
                root = tempfile.mkdtemp(prefix='azp-review-two-')
                self.addCleanup(shutil.rmtree, root)
                write(os.path.join(root, 'etc/ssh/sshd_config'),
                      b'Include /etc/ssh/sshd_config.d/*.conf\n')
                directory = os.path.join(root, 'etc/ssh/sshd_config.d')
                if kind == 'file':
                    write(directory, b'')
                else:
                    os.symlink('/nonexistent-azp-review-two', directory)
                system, facts = in_root(root)
                with mock.patch.object(ap, 'restart_sshd'):
                    try:
                        one_step(lambda facts, system: ap.sshd_plan(facts, system, 'yes'),
                                 system, facts)
                    except (OSError, ap.ProvisioningError) as exc:
                        self.fail('the user step fails: %s' % ap.describe_error(exc))
                self.assertFalse(os.path.lexists('/nonexistent-azp-review-two'))


class PowerCutAfterUseradd(unittest.TestCase):
    """Finding 10: the record is written only at the end of a run, so a power cut (or
    SIGKILL, or the unit's TimeoutStartSec) anywhere after useradd of the first boot
    and before that write -- user creation, host keys, a hook: the issue's power-cut
    moments -- leaves alice on disk and no admin_user_created.  The second boot finds
    the account there, takes it as not ours, and records admin_user_created null:
    `--deprovision --user` then leaves alice, her home and her keys in the image.
    Here the cut is a hook's SIGKILL of the provisioner; both boots and the
    deprovision run in one private namespace (/etc copy, tmpfs /var/lib)."""

    def test_the_user_made_before_the_cut_is_on_record(self):
        from tests.support import PrivateHost, require_root
        from tests.test_user import SSHD_CONFIG
        require_root(self)
        host = PrivateHost('web-7')
        self.addCleanup(host.cleanup)
        os.makedirs(os.path.join(host.etc, 'ssh', 'sshd_config.d'), exist_ok=True)
        host.write('ssh/sshd_config', SSHD_CONFIG)
        hooks = os.path.join(host.etc, 'azure-provisioning/ready.d')
        write(os.path.join(hooks, '10-power-cut'), b'#!/bin/sh\nkill -9 $PPID\n', 0o755)
        with FakeAzure(vm_id=VM_A, admin_username='alice') as az:
            provision = ' '.join([sys.executable, '-I', SCRIPT, '--wireserver',
                                  az.wireserver_addr, '--imds', az.imds_addr,
                                  '--provision-user', '--timeout', '30'])
            run = host.run(['sh', '-c', (
                '{0}; echo "first boot: exit $?"; rm /etc/azure-provisioning/ready.d/*; '
                '{0}; echo "second boot: exit $?"; '
                '{1} -I {2} --deprovision --user --dry-run; '
                'cat /var/lib/azure-provisioning/state.json').format(
                    provision, sys.executable, SCRIPT)])
        self.assertIn('first boot: exit 137', run.stdout, run)
        self.assertIn('second boot: exit 0', run.stdout, run)
        self.assertIn('would remove the admin user alice and its home', run.stdout, run)


class DeprovisionStopsAtTheUnitLink(unittest.TestCase):
    """Finding 11 (defects 10 and 2): etc/systemd/system/multi-user.target.wants is
    a regular file or a dangling link.  --dry-run lists every action and exits 0;
    the run removes the host keys, the machine id, leases, KVP pool and data, then
    fails at "enable azure-provisioning.service", before userdel: exit 1, the user
    still there, and every re-run stops at the same place, so it is never finished.

    Decided (not the reviewer's first expectation, that the run succeeds): the unit
    link cannot be made there, and neither way round it is sound: replacing the
    file or link removes a thing of the image that is not ours; skipping the link
    captures an image that never provisions (OSProvisioningTimedOut at every VM made
    from it).  So the dry run and the run both refuse, naming the path, with nothing
    removed; once the tree is fixed, a re-run does the whole job."""

    def test_what_the_dry_run_says_is_what_the_run_does(self):
        for kind in ('file', 'dangling link'):
            with self.subTest(kind=kind):
                base = tempfile.mkdtemp(prefix='azp-review-two-')
                self.addCleanup(shutil.rmtree, base)
                root = provisioned_tree(os.path.join(base, 'image'))
                wants = os.path.join(root, 'etc/systemd/system/multi-user.target.wants')
                if kind == 'file':
                    write(wants, b'')
                else:
                    os.symlink('/nonexistent-azp-review-two', wants)
                before = host_keys(root)
                calls = os.path.join(base, 'userdel-calls')
                tools = fake_tool(self, 'userdel', 'echo "$@" >> %s\n' % calls)
                env = dict(os.environ, PATH=tools + os.pathsep + os.environ['PATH'])
                argv = [sys.executable, '-I', SCRIPT, '--deprovision', '--user', '--root', root]
                for args in (['--dry-run'], []):
                    run = run_command(argv + args, env=env)
                    self.assertEqual((run.code, run.stdout), (1, ''), run)
                    self.assertIn('/etc/systemd/system/multi-user.target.wants is a', run.stderr)
                    self.assertIn('nothing removed', run.stderr)
                self.assertEqual(host_keys(root), before)
                self.assertFalse(os.path.exists(calls), 'userdel ran')
                self.assertEqual(read_record(root)['admin_user_created'], 'alice')
                os.remove(wants)    # the tree fixed: the re-run finishes the job
                dry = run_command(argv + ['--dry-run'], env=env)
                self.assertEqual(dry.code, 0, dry)
                self.assertIn('would enable azure-provisioning.service', dry.stdout)
                self.assertIn('would remove the admin user alice', dry.stdout)
                run = run_command(argv, env=env)
                self.assertEqual(run.code, 0, run)
                self.assertTrue(os.path.exists(calls), 'userdel never ran')
                self.assertEqual(os.readlink(os.path.join(wants, 'azure-provisioning.service')),
                                 '/etc/systemd/system/azure-provisioning.service')
                self.assertEqual(host_keys(root), {})
                self.assertFalse(os.path.lexists(os.path.join(root, STATE)))


class UserdelThatLeavesTheHome(unittest.TestCase):
    """Finding 12 (low): userdel -r removes the account, then fails to remove the
    home (exit 12: shadow 4.13 does so when a file in it cannot be removed, an
    immutable file, a mount point).  The run exits 1 and keeps the record, as it
    should; but the re-run finds no alice in /etc/passwd, skips userdel and says
    "deprovisioned", exit 0, with /home/alice (and whatever of .ssh is left) going
    into the image."""

    def test_the_rerun_does_not_call_it_done(self):
        base = tempfile.mkdtemp(prefix='azp-review-two-')
        self.addCleanup(shutil.rmtree, base)
        root = provisioned_tree(os.path.join(base, 'image'))
        home = os.path.join(root, 'home/alice')
        write(os.path.join(home, '.ssh/authorized_keys'), b'ssh-ed25519 AAAA alice\n', 0o600)
        # the home userdel -r fails at is alice's (uid 1500 in the tree, gone from its
        # passwd once userdel ran): deprovision does not count a home owned by a user
        # still in passwd (root's, as this test made it), which is that user's
        if os.geteuid() == 0:
            for where, dirs, files in os.walk(home):
                for name in [where] + [os.path.join(where, f) for f in dirs + files]:
                    os.lchown(name, 1500, 1500)
        # as shadow's userdel: the account goes, the home stays, exit 12
        tools = fake_tool(self, 'userdel', (
            'sed -i "/^alice:/d" "$2/etc/passwd" "$2/etc/shadow"\n'
            'echo "userdel: error removing directory /home/alice" >&2; exit 12\n'))
        env = dict(os.environ, PATH=tools + os.pathsep + os.environ['PATH'])
        argv = [sys.executable, '-I', SCRIPT, '--deprovision', '--user', '--root', root]
        first = run_command(argv, env=env)
        self.assertEqual(first.code, 1, first)
        second = run_command(argv, env=env)
        self.assertTrue(second.code != 0 or not os.path.exists(home),
                        '%r with %s still there' % (second.stdout, home))
