"""The planners are pure: the user and hostname steps' plans are computed on a
temporary root by a process that is not root (nobody, when the tests run as root),
from that root's own files (its /etc/passwd, login.defs, /etc/default/useradd,
/bin/bash), and the tree is the same byte for byte afterwards.  No test here
needs root, and none is skipped without it."""

import json
import os
import shutil
import signal
import socket
import tempfile
import unittest

import azure_provisioning as ap
from tests.support import in_root, tree_snapshot as snapshot
from tests.test_user import PASSWORD_HASH, key

NOBODY = 65534
CHILD_SECONDS = 20      # a planner that hangs fails its test instead of the suite

BOB_KEY = key(comment='bob@laptop', filler=b'\x01')
ALICE_OLD_KEY = key(comment='alice@old', filler=b'\x02')
ALICE_NEW_KEY = key(comment='alice@new', filler=b'\x03')

TREE = {
    'etc/passwd': 'root:x:0:0:root:/root:/bin/bash\n'
                  'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n'
                  'alice:x:1500:1500::/srv/people/alice:/bin/bash\n',
    'etc/shadow': 'root:*:19000:0:99999:7:::\nalice:%s:19000:0:99999:7:::\n' % PASSWORD_HASH,
    'etc/group': 'root:x:0:\nalice:x:1500:\n',
    'etc/login.defs': 'UID_MIN 1000\nUID_MAX 60000\n',
    'etc/default/useradd': 'SHELL=/bin/sh\nHOME=/srv/people\n',
    'etc/ssh/sshd_config': 'Include /etc/ssh/sshd_config.d/*.conf\n',
    'etc/sudoers.d/README': '',
    'etc/hostname': 'image-template\n',
    'etc/hosts': '127.0.0.1 localhost\n10.0.0.4 image-template\n',
    'bin/bash': '',
    'srv/people/alice/.ssh/authorized_keys': ALICE_OLD_KEY + '\n',
    # networkd manages eth0 (the default route): the DHCP publish plan
    'proc/net/route': 'Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n'
                      'eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\n',
    'sys/class/net/eth0/ifindex': '2\n',
    'run/systemd/netif/links/2': 'NETWORK_FILE=/etc/systemd/network/20-wired.network\n',
    'etc/systemd/network/20-wired.network': '[Match]\nName=eth0\n[Network]\nDHCP=yes\n',
}


def make_tree(test, files=TREE):
    """A root anyone may read (as an image mounted for --check is), removed after."""
    root = tempfile.mkdtemp(prefix='azp-plans-')
    test.addCleanup(shutil.rmtree, root)
    os.chmod(root, 0o755)
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, 0o755 if name == 'bin/bash' else 0o644)
    for directory, _, _ in os.walk(root):
        os.chmod(directory, 0o755)
    return root


def unprivileged(function):
    """function()'s result (JSON), computed in a forked child that is not root: as
    nobody, without groups, when the tests run as root.  A planner that tried to
    change the tree (root's) would fail there; one that read this machine's
    accounts instead of the root's would plan for the wrong users."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:    # the child: never returns into the test runner
        code = 1
        try:
            os.close(read)
            signal.alarm(CHILD_SECONDS)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                result = {'euid': os.geteuid(), 'result': function()}
            except Exception as exc:
                result = {'euid': os.geteuid(), 'error': '%s: %s' % (type(exc).__name__, exc)}
            with os.fdopen(write, 'w') as f:
                json.dump(result, f)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise AssertionError('the unprivileged planner exited with status %#x' % status)
    answer = json.loads(data)
    if answer['euid'] == 0:
        raise AssertionError('the planner ran as root')
    return answer


def plan_of(planner, root, metadata, **options):
    """A function for unprivileged(): the step's plan on `root` as [says, fatal]
    pairs, and the facts it established that the tests look at."""
    def plan():
        system, facts = in_root(root, **options)
        facts, actions = planner(facts._replace(metadata=metadata, vm_id='vm-1'), system)
        return {'plan': [[action.says, action.fatal] for action in actions],
                'admin_user': facts.admin_user, 'hostname': facts.hostname,
                'warnings': list(facts.warnings)}
    return plan


def user_metadata(name, *keys, **profile):
    compute = {'vmId': 'vm-1', 'osProfile': dict({'adminUsername': name,
                                                  'disablePasswordAuthentication': 'true'},
                                                 **profile),
               'publicKeys': [{'keyData': k, 'path': ''} for k in keys]}
    return {'compute': compute}


class UserPlan(unittest.TestCase):
    def setUp(self):
        self.root = make_tree(self)
        self.before = snapshot(self.root)

    def plan(self, metadata):
        answer = unprivileged(plan_of(ap.plan_user, self.root, metadata, provision_user=True))
        self.assertEqual(snapshot(self.root), self.before, 'the plan changed the tree')
        return answer

    def test_a_new_user_from_the_roots_own_files(self):
        answer = self.plan(user_metadata('bob', BOB_KEY))
        self.assertNotIn('error', answer)
        # the root's /bin/bash and HOME=/srv/people, never this machine's
        self.assertEqual(answer['result']['plan'], [
            ['create user bob (useradd -m -s /bin/bash), password locked', True],
            ['write /etc/sudoers.d/azure-provisioning granting bob sudo', True],
            ['add 1 key(s) to authorized_keys in the home useradd makes for bob (0600, owner bob)',
             True],
            ['write /etc/ssh/sshd_config.d/50-azure-provisioning.conf (making '
             '/etc/ssh/sshd_config.d, 0755): PasswordAuthentication no', True]])
        # the admin user is a fact once the step's actions are done, not before
        self.assertEqual(answer['result']['admin_user'], '')
        facts = ap.first_facts(ap.Options(provision_user=True))._replace(
            metadata=user_metadata('bob', BOB_KEY))
        facts, said = ap.user_ready(facts)
        self.assertEqual((facts.admin_user, said), ('bob', 'user: bob ready'))

    def test_an_account_of_the_root_is_taken_as_it_is(self):
        # alice exists in the root's /etc/passwd only: her home, her unlocked password,
        # and the one key of two her authorized_keys lacks
        answer = self.plan(user_metadata('alice', ALICE_OLD_KEY, ALICE_NEW_KEY))
        self.assertNotIn('error', answer)
        self.assertEqual(answer['result']['plan'], [
            ['lock the password of alice (usermod -L)', True],
            ['write /etc/sudoers.d/azure-provisioning granting alice sudo', True],
            ['add 1 key(s) to /srv/people/alice/.ssh/authorized_keys (0600, owner alice)',
             True],
            ['write /etc/ssh/sshd_config.d/50-azure-provisioning.conf (making '
             '/etc/ssh/sshd_config.d, 0755): PasswordAuthentication no', True]])

    def test_without_bash_and_useradd_defaults(self):
        os.remove(os.path.join(self.root, 'bin/bash'))
        os.remove(os.path.join(self.root, 'etc/default/useradd'))
        self.before = snapshot(self.root)
        answer = self.plan(user_metadata('bob', BOB_KEY))
        self.assertEqual(answer['result']['plan'][0],
                         ['create user bob (useradd -m -s /bin/sh), password locked', True])
        self.assertIn(['add 1 key(s) to authorized_keys in the home useradd makes for bob '
                       '(0600, owner bob)', True], answer['result']['plan'])

    def test_the_roots_system_account_is_refused(self):
        answer = self.plan(user_metadata('nobody', BOB_KEY))
        self.assertEqual(answer['error'], 'ProvisioningError: admin user nobody exists as a '
                                          'system account (uid 65534); refused: user accounts '
                                          'are uids 1000..60000 (UID_MIN..UID_MAX of '
                                          '/etc/login.defs)')

    def test_the_account_tools_act_on_the_root(self):
        system, _ = in_root(self.root)
        self.assertEqual(system.account_tool('useradd', '-m', 'bob')[1:],
                         ['--root', os.path.realpath(self.root), '-m', 'bob'])
        self.assertEqual(ap.System('/', ap.Deadline(1), None).account_tool('useradd')[1:], [])
        self.assertEqual(system.account('alice'),
                         ('alice', 1500, 1500, '/srv/people/alice', '/bin/bash'))
        self.assertIsNone(system.account('daemon'))


class HostnamePlan(unittest.TestCase):
    def setUp(self):
        self.root = make_tree(self)
        self.before = snapshot(self.root)

    def plan(self, name, **options):
        metadata = {'compute': {'vmId': 'vm-1', 'osProfile': {'computerName': name}}}
        answer = unprivileged(plan_of(ap.plan_hostname, self.root, metadata, **options))
        self.assertEqual(snapshot(self.root), self.before, 'the plan changed the tree')
        self.assertNotIn('error', answer)
        return answer['result']

    def test_a_new_name_is_set_and_not_published_when_not_asked(self):
        current = socket.gethostname()
        name = 'web-7' if current != 'web-7' else 'web-8'
        planned = self.plan(name, publish_hostname=False)
        self.assertEqual(planned['plan'], [['set hostname: %s (now %s)' % (name, current), True]])
        self.assertEqual(planned['hostname'], current)      # the action sets it, not the plan

    def test_the_dhcp_publish_plan_is_a_warning_when_it_fails(self):
        system, facts = in_root(self.root)
        plan = unprivileged(lambda: [[a.says, a.fatal] for a in ap.publish_plan(
            facts, system, 'web-7')[1]])
        self.assertEqual(plan['result'], [['run: networkctl reconfigure eth0', False]])
        self.assertEqual(snapshot(self.root), self.before)

    def test_a_live_name_needs_only_its_file_and_a_failure_is_a_warning(self):
        planned = self.plan(socket.gethostname())
        self.assertEqual(planned['plan'], [['write /etc/hostname: %s' % socket.gethostname(),
                                            False]])

    def test_an_invalid_name_fails_the_plan(self):
        answer = unprivileged(plan_of(ap.plan_hostname, self.root, {
            'compute': {'osProfile': {'computerName': 'no_underscores'}}}))
        self.assertEqual(answer['error'], "ProvisioningError: invalid hostname "
                                          "'no_underscores': labels must be letters, digits "
                                          "and inner hyphens")

    def test_left_alone(self):
        planned = self.plan('web-7', set_hostname=False)
        self.assertEqual(planned['plan'], [])


if __name__ == '__main__':
    unittest.main()
