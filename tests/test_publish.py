"""Publishing the hostname to DHCP: which client manages the primary interface,
whether it sends a hostname at all, and the commands run (recorded by stand-in
networkctl / nmcli / dhclient on PATH, in a constructed /proc, /sys, /run)."""

import io
import json
import os
import shutil
import sys
import tempfile
import unittest

import azure_provisioning as ap
from tests.support import (REPO, SCRIPT, PrivateHost, in_root, one_step, require_root,
                           run_command, skip)
from tests.test_transport import QuietLog

ROUTES = ('Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n'
          'eth1\t00000000\t0100A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n'
          'eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n'
          'eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n')

FAKE_TOOL = '''#!/bin/sh
echo "$(basename "$0") $*" >> "%(log)s"
case "$(basename "$0") $*" in
  networkctl*) exit %(networkctl_exit)s;;
esac
'''


class FakeSystem(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='azp-root-')
        self.addCleanup(shutil.rmtree, self.root)
        self.bin = os.path.join(self.root, 'fakebin')
        self.log_file = os.path.join(self.root, 'commands.log')
        self.write('proc/net/route', ROUTES)
        self.write('sys/class/net/eth0/ifindex', '2\n')
        old_path = os.environ.get('PATH', '')
        os.environ['PATH'] = self.bin + os.pathsep + old_path
        self.addCleanup(os.environ.__setitem__, 'PATH', old_path)
        # the kernel's answer for this tree's eth0 (the real ioctl: IPv4Address, SystemdHost)
        real_ipv4_address = ap.ipv4_address
        ap.ipv4_address = {'eth0': '10.0.0.4'}.get
        self.addCleanup(setattr, ap, 'ipv4_address', real_ipv4_address)
        self.tools()

    def tools(self, networkctl_exit=0):
        for tool in ('networkctl', 'dhclient'):
            self.write('fakebin/' + tool, FAKE_TOOL % {'log': self.log_file,
                                                       'networkctl_exit': networkctl_exit}, 0o755)

    def write(self, relative, text, mode=0o644):
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, mode)

    def commands(self):
        if not os.path.exists(self.log_file):
            return []
        with open(self.log_file) as f:
            return f.read().splitlines()

    def networkd(self, network_text, dropin_text=None):
        dropins = ''
        self.write('etc/systemd/network/20-wired.network', network_text)
        if dropin_text is not None:
            self.write('etc/systemd/network/20-wired.network.d/10-x.conf', dropin_text)
            dropins = 'NETWORK_FILE_DROPINS="/etc/systemd/network/20-wired.network.d/10-x.conf"\n'
        self.write('run/systemd/netif/links/2', 'ADMIN_STATE=configured\nOPER_STATE=routable\n'
                   'NETWORK_FILE=/etc/systemd/network/20-wired.network\n' + dropins)

    def publish(self, dry_run=False):
        self.out = io.StringIO()
        self.log = QuietLog()
        system, facts = in_root(self.root, self.log, timeout=40, dry_run=dry_run)
        facts, self.plan = one_step(lambda facts, system: ap.publish_plan(facts, system, 'web-7'),
                                    system, facts, self.out)
        # at most one: what stopped the plan, or the failure of its one action
        self.assertLessEqual(len(facts.warnings), 1, facts.warnings)
        self.assertTrue(all(not action.fatal for action in self.plan), self.plan)
        return facts.warnings[0] if facts.warnings else None


class IPv4Address(unittest.TestCase):
    """One ioctl (SIOCGIFADDR) reads what `ip -4 addr` would show; nothing is sent.
    Each case runs in a network namespace of its own with the interfaces it needs."""

    def addresses(self, setup, names, expect_code=0):
        require_root(self)
        code = ('import sys; sys.path.insert(0, %r); import azure_provisioning as ap; '
                'print([ap.ipv4_address(n) for n in %r])' % (REPO, names))
        done = run_command(['unshare', '--net', 'sh', '-c', setup + '\nexec "$0" -c "$1"',
                            sys.executable, code], timeout=20)
        self.assertEqual(done.code, expect_code, done)
        return (done.stdout + done.stderr).strip()

    # a 15-byte name (the longest the kernel takes) with an address, its peer without
    SETUP = ('set -e; ip link add abcdefghijklmno type veth peer name p0\n'
             'ip addr add 10.9.9.9/24 dev abcdefghijklmno')

    def test_an_address_none_and_no_such_interface(self):
        self.assertEqual(self.addresses(self.SETUP, ['abcdefghijklmno', 'p0']),
                         "['10.9.9.9', None]")

    def test_an_interface_that_is_gone_is_an_error_not_a_wait(self):
        # no address yet is worth waiting for; no interface at all is not (30 s of boot)
        output = self.addresses('true', ['azp-none0'], expect_code=1)
        self.assertRegex(output, r'ProvisioningError.*azp-none0')

    def test_names_the_kernel_would_cut_or_cannot_hold(self):
        # the kernel reads 15 bytes and stops at a NUL: these would name abcdefghijklmno
        self.assertEqual(self.addresses(self.SETUP, ['abcdefghijklmnoXYZ', 'abcdefghijklmno\0x',
                                                     '']),
                         "[None, None, None]")
        # names as os.listdir gives undecodable bytes, and non-ASCII: asked, and absent
        for name in ('lo\udcff', 'lo\u00e9'):
            self.assertRegex(self.addresses(self.SETUP, [name], expect_code=1),
                             r'ProvisioningError: address of lo')


class PrimaryInterface(FakeSystem):
    def test_default_route_with_the_lowest_metric(self):
        self.assertEqual(ap.primary_interface(ap.Root(self.root)), 'eth0')

    def test_without_a_default_route_the_networkd_lease_then_any_routed_interface(self):
        header, eth1_default, eth0_net, _ = ROUTES.splitlines(True)
        self.write('proc/net/route', header + eth0_net.replace('eth0', 'ens2'))
        self.assertEqual(ap.primary_interface(ap.Root(self.root)), 'ens2')    # routed, no lease
        self.write('sys/class/net/ens3/ifindex', '3\n')
        self.write('run/systemd/netif/leases/3', 'ADDRESS=10.0.0.9\n')
        self.assertEqual(ap.primary_interface(ap.Root(self.root)), 'ens3')    # networkd's lease

    def test_no_route_at_all(self):
        self.write('proc/net/route', ROUTES.splitlines(True)[0])
        self.assertIsNone(ap.primary_interface(ap.Root(self.root)))
        self.assertIn('no routed interface', self.publish())


class Networkd(FakeSystem):
    def test_reconfigure_not_renew(self):
        self.networkd('[Match]\nName=eth0\n[Network]\nDHCP=ipv4\n')
        self.assertIsNone(self.publish())
        self.assertEqual(self.commands(), ['networkctl reconfigure eth0'])
        self.assertRegex(self.log.lines[-1], r'hostname web-7 sent to DHCP by systemd-networkd on '
                                             r'eth0 \(networkctl reconfigure eth0\); address '
                                             r'10\.0\.0\.4 \(\d+ ms\)')

    def test_ready_waits_for_the_default_route_the_reconfigure_took_away(self):
        # networkd drops the lease, and its routes, before it asks again: a Ready posted
        # before the route is back fails with 'Network is unreachable' and waits to retry
        routes = os.path.join(self.root, 'proc/net/route')
        without = ''.join(line for line in ROUTES.splitlines(True)
                          if not line.startswith('eth0\t00000000'))
        self.write('proc/net/route.without', without)
        self.write('proc/net/route.with', ROUTES)
        self.write('fakebin/networkctl', '#!/bin/sh\necho "networkctl $*" >> "%s"\n'
                   'cp "%s.without" "%s"\n(sleep 0.5; cp "%s.with" "%s.new" && '
                   'mv "%s.new" "%s") >/dev/null 2>&1 &\n'
                   % ((self.log_file,) + (routes,) * 6), 0o755)
        self.networkd('[Network]\nDHCP=yes\n')
        self.assertIsNone(self.publish())
        self.assertEqual(self.commands(), ['networkctl reconfigure eth0'])
        self.assertEqual(ap.primary_interface(ap.Root(self.root)), 'eth0')
        with open(routes) as f:
            self.assertEqual(f.read(), ROUTES)

    def test_send_hostname_off_is_a_warning_and_nothing_runs(self):
        self.networkd('[Network]\nDHCP=yes\n[DHCPv4]\nSendHostname=no\n')
        self.assertIn('SendHostname=no', self.publish())
        self.assertEqual(self.commands(), [])

    def test_drop_in_wins(self):
        self.networkd('[Network]\nDHCP=yes\n[DHCPv4]\nSendHostname=no\n',
                      '[DHCPv4]\nSendHostname=yes\n')
        self.assertIsNone(self.publish())
        self.assertEqual(self.commands(), ['networkctl reconfigure eth0'])

    def test_fixed_hostname_is_a_warning(self):
        self.networkd('[DHCP]\nHostname=template\n')
        self.assertIn('fixed name Hostname=template', self.publish())

    def test_failed_command_is_a_warning_not_an_exception(self):
        self.networkd('[Network]\nDHCP=yes\n')
        self.tools(networkctl_exit=1)
        warning = self.publish()
        self.assertIn('hostname not published: publish hostname: networkctl failed', warning)

    def test_dry_run_only_says(self):
        self.networkd('[Network]\nDHCP=yes\n')
        self.assertIsNone(self.publish(dry_run=True))
        self.assertEqual(self.out.getvalue(), 'would run: networkctl reconfigure eth0\n')
        self.assertEqual(self.commands(), [])


# nmcli as NetworkManager's own would answer; anything else is a test failure.
FAKE_NMCLI = '''#!/bin/sh
echo "nmcli $*" >> "%(log)s"
case "$*" in
  "--version") echo "%(version)s"; exit %(version_exit)s;;
  "-g GENERAL.CON-UUID device show eth0") echo "%(uuid)s";;
  "-g ipv4.dhcp-send-hostname connection show %(uuid)s") echo "%(send)s";;
  "device modify eth0 ipv4.dhcp-hostname web-7") ;;
  "connection modify --temporary %(uuid)s ipv4.dhcp-hostname web-7") ;;
  "connection up %(uuid)s") exit %(up_exit)s;;
  "connection modify --temporary %(uuid)s ipv4.dhcp-hostname ") ;;
  *) echo "nmcli stand-in: unexpected $*" >&2; exit 2;;
esac
'''
UUID = '83f2d939-d6b1-3480-8e7b-a83daf64a61a'


class NetworkManager(FakeSystem):
    def setUp(self):
        FakeSystem.setUp(self)
        os.makedirs(os.path.join(self.root, 'run/NetworkManager'))
        self.nmcli()

    def nmcli(self, send='yes', version='nmcli tool, version 1.42.4', version_exit=0,
              up_exit=0):
        self.write('fakebin/nmcli', FAKE_NMCLI % {
            'log': self.log_file, 'uuid': UUID, 'send': send, 'version': version,
            'version_exit': version_exit, 'up_exit': up_exit}, 0o755)

    def changes(self):
        return [c for c in self.commands() if ' show ' not in c and '--version' not in c]

    def test_device_modify_sets_the_dhcp_hostname(self):
        self.assertIsNone(self.publish())
        self.assertEqual(self.changes(), ['nmcli device modify eth0 ipv4.dhcp-hostname web-7'])
        self.assertRegex(self.log.lines[-1], r'hostname web-7 sent to DHCP by NetworkManager on '
                                             r'eth0 \(nmcli device modify eth0 ipv4.dhcp-hostname '
                                             r'web-7\); address 10\.0\.0\.4')

    def test_before_1_42_the_connection_is_activated_again_the_name_in_memory_only(self):
        # NetworkManager 1.30 takes a reapply and asks for no lease (boot-tested)
        self.nmcli(version='nmcli tool, version 1.30.6')
        self.assertIsNone(self.publish())
        self.assertEqual(self.changes(), [
            'nmcli connection modify --temporary %s ipv4.dhcp-hostname web-7' % UUID,
            'nmcli connection up %s' % UUID,
            'nmcli connection modify --temporary %s ipv4.dhcp-hostname ' % UUID])
        self.assertIn('sent to DHCP by NetworkManager 1.30 on eth0', self.log.lines[-1])

    def test_the_name_is_taken_out_of_memory_even_when_the_activation_fails(self):
        self.nmcli(version='nmcli tool, version 1.30.6', up_exit=4)
        self.assertRegex(self.publish() or '', r'hostname not published: .*nmcli failed')
        self.assertEqual(self.changes(), [
            'nmcli connection modify --temporary %s ipv4.dhcp-hostname web-7' % UUID,
            'nmcli connection up %s' % UUID,
            'nmcli connection modify --temporary %s ipv4.dhcp-hostname ' % UUID])

    def test_a_failing_version_query_means_the_reapply(self):
        self.nmcli(version_exit=8)
        self.assertIsNone(self.publish())
        self.assertEqual(self.changes(), ['nmcli device modify eth0 ipv4.dhcp-hostname web-7'])

    def test_a_version_nmcli_does_not_say_means_the_reapply(self):
        self.nmcli(version='nmcli tool')
        self.assertIsNone(self.publish())
        self.assertEqual(self.changes(), ['nmcli device modify eth0 ipv4.dhcp-hostname web-7'])

    def test_send_hostname_off(self):
        self.nmcli(send='no')
        self.assertIn('ipv4.dhcp-send-hostname no', self.publish())
        self.assertEqual(self.changes(), [])

    def test_dry_run_changes_nothing(self):
        self.nmcli(version='nmcli tool, version 1.30.6')
        self.assertIsNone(self.publish(dry_run=True))
        self.assertEqual(self.changes(), [])
        self.assertIn('nmcli connection up %s' % UUID, self.out.getvalue())


class Dhclient(FakeSystem):
    ARGV = ['/sbin/dhclient', '-4', '-v', '-i', '-pf', '/run/dhclient.eth0.pid', '-lf',
            '/var/lib/dhcp/dhclient.eth0.leases', '-I', '-df', '/var/lib/dhcp/dhclient6.eth0.leases',
            'eth0']

    def process(self, argv, pid='4242'):
        self.write('proc/%s/cmdline' % pid, '\0'.join(argv) + '\0')

    def test_stop_keeping_the_lease_then_start_with_the_same_arguments(self):
        self.process(['/usr/sbin/sshd', '-D'], pid='100')
        self.process(self.ARGV)
        self.write('etc/dhcp/dhclient.conf', 'option rfc3442-classless-static-routes code 121 = '
                   'array of unsigned integer 8;\nsend host-name = gethostname();\n')
        self.assertIsNone(self.publish())
        arguments = ' '.join(self.ARGV[1:])
        self.assertEqual(self.commands(), ['dhclient -x ' + arguments, 'dhclient ' + arguments])

    def test_config_without_send_host_name(self):
        self.process(self.ARGV[:1] + ['-cf', '/etc/dhcp/custom.conf', 'eth0'])
        self.write('etc/dhcp/custom.conf', '#send host-name = gethostname();\n')
        self.assertIn('/etc/dhcp/custom.conf has no "send host-name"', self.publish())
        self.assertEqual(self.commands(), [])

    def test_fixed_name(self):
        self.process(self.ARGV)
        self.write('etc/dhcp/dhclient.conf', 'send host-name "template";\n')
        self.assertIn('sends the fixed name "template"', self.publish())

    def test_no_client_at_all(self):
        self.assertIn('no known DHCP client manages eth0', self.publish())

    def test_a_config_of_blank_lines_is_read_in_linear_time(self):
        # found by tests/fuzz.py: `^\s*send` spanned lines, quadratic in their number
        import time
        self.process(self.ARGV)
        self.write('etc/dhcp/dhclient.conf', 'option x = \n' + '\n' * 60000
                   + 'send host-name = gethostname();\n')
        started = time.monotonic()
        plan = ap.dhclient_plan('eth0', 'web-7', ap.Root(self.root))
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(plan.client, 'dhclient')
        self.assertIsNone(plan.why_not)


# --------------------------------------------------------------------------
# The hostname step as a systemd VM runs it: the script as a process, in its own
# PID, UTS, mount and network namespaces (so it shares PID 1's UTS namespace and
# /run/systemd/system exists: systemd's tools and publishing are used, as in
# production), with a private /etc, a veth "eth0" with a default route inside the
# private network namespace, networkd's link state in a private /run, and
# stand-in hostnamectl / networkctl / ip / nmcli / dhclient / systemctl first on
# PATH that record what they are asked (hostnamectl and ip must never be).  The
# emulator runs inside the namespace too: it is the only thing the script can reach.
# --------------------------------------------------------------------------

STAND_IN = '''#!/bin/sh
echo "$(basename "$0") $*" >> "%(log)s"
case "$(basename "$0") $*" in
  networkctl*) echo "networkctl saw hostname $(%(hostname)s)" >> "%(log)s";;
esac
'''

NAMESPACE_SETUP = r"""set -e
ip=$1; shift
$ip link set lo up
$ip link add eth0 type veth peer name eth0-peer
$ip link set eth0-peer up
$ip link set eth0 up
$ip addr add 10.0.0.4/24 dev eth0
$ip route add default via 10.0.0.1 dev eth0
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system /run/systemd/netif/links
index=$(cat /sys/class/net/eth0/ifindex)
printf 'ADMIN_STATE=configured\nOPER_STATE=routable\nNETWORK_FILE=%s\n' \
    /etc/systemd/network/20-wired.network > /run/systemd/netif/links/$index
exec "$@"
"""

DRIVER = r"""
import json, os, subprocess, sys
config = json.loads(sys.argv[1])
sys.path.insert(0, config['repo'])
from tests.fake_azure import FakeAzure
with FakeAzure(computer_name=config['computer_name']) as az:
    done = subprocess.run([sys.executable, '-I', '-S', config['script'], '--wireserver',
                           az.wireserver_addr, '--imds', az.imds_addr] + config['args'],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60,
                          env=dict(os.environ, PATH=config['path']))
    result = dict(code=done.returncode, stdout=done.stdout, stderr=done.stderr,
                  health_reports=az.health_reports, ready_accepted=az.ready_accepted())
print('@@result=' + json.dumps(result))
"""

NETWORK_FILE = '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n'


class SystemdHost(unittest.TestCase):
    probed = None

    def setUp(self):
        require_root(self)
        self.real = dict((tool, shutil.which(tool)) for tool in ('ip', 'hostname'))
        if None in self.real.values():
            skip(self, 'needs ip and hostname here: %r' % self.real)
        if SystemdHost.probed is None:
            probe = run_command(['unshare', '--net', '--pid', '--fork', '--mount-proc', 'sh',
                                 '-c', '"$1" link add probe0 type veth peer name probe1', 'sh',
                                 self.real['ip']], timeout=20)
            SystemdHost.probed = probe.code == 0 or probe.stderr.strip() or 'failed'
        if SystemdHost.probed is not True:
            skip(self, 'no network namespace with a veth pair here: %s' % SystemdHost.probed)
        self.host = PrivateHost('image-template')
        self.addCleanup(self.host.cleanup)
        os.makedirs(os.path.join(self.host.etc, 'systemd', 'network'), exist_ok=True)
        self.host.write('systemd/network/20-wired.network', NETWORK_FILE)
        self.bin = os.path.join(self.host.dir, 'fakebin')
        os.mkdir(self.bin)
        self.log_file = os.path.join(self.host.dir, 'commands.log')
        values = {'log': self.log_file, 'hostname': self.real['hostname']}
        for tool in ('networkctl', 'ip', 'nmcli', 'dhclient', 'systemctl', 'hostnamectl'):
            path = os.path.join(self.bin, tool)
            with open(path, 'w') as f:
                f.write(STAND_IN % values)
            os.chmod(path, 0o755)

    def provision(self, *args):
        config = {'repo': REPO, 'script': SCRIPT, 'computer_name': 'web-7',
                  'args': ['--timeout', '30'] + list(args),
                  'path': self.bin + os.pathsep + os.environ.get('PATH', '/usr/bin:/bin')}
        run = self.host.run(['unshare', '--net', '--pid', '--fork', '--mount-proc', 'sh', '-c',
                             NAMESPACE_SETUP, 'sh', self.real['ip'], sys.executable, '-c', DRIVER,
                             json.dumps(config)])
        lines = [l for l in run.stdout.splitlines() if l.startswith('@@result=')]
        self.assertEqual(len(lines), 1, run)
        result = json.loads(lines[0][len('@@result='):])
        self.assertNotIn('Traceback', result['stderr'], result['stderr'])
        self.assertEqual(result['code'], 0, result['stderr'])
        self.assertTrue(result['ready_accepted'], result['health_reports'])
        self.assertEqual(run.hostname_after, 'web-7', result['stderr'])
        self.assertNotIn("not the system's UTS namespace", result['stderr'])
        return result['stderr']

    def commands(self):
        if not os.path.exists(self.log_file):
            return []
        with open(self.log_file) as f:
            return f.read().splitlines()

    def test_the_name_is_set_without_hostnamectl(self):
        # sethostname(2) and /etc/hostname, what systemd-hostnamed itself would do:
        # asking it over D-Bus first starts it, 0.5-1.5 s of a boot under TCG
        path = os.path.join(self.host.etc, 'hostname')
        os.chmod(path, 0o644)
        stderr = self.provision()
        self.assertEqual([c for c in self.commands() if c.startswith('hostnamectl')], [])
        self.assertEqual(self.host.read('hostname'), 'web-7\n')    # the next boots
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)
        self.assertIn('127.0.1.1\tweb-7\n', self.host.read('hosts'))
        self.assertRegex(stderr, r'hostname set to web-7 via sethostname, /etc/hosts updated')

    def test_publishing_runs_the_dhcp_client_after_the_rename(self):
        stderr = self.provision()
        commands = self.commands()
        self.assertIn('networkctl reconfigure eth0', commands)
        self.assertIn('networkctl saw hostname web-7', commands)
        self.assertEqual([c for c in commands if c.split()[0] in ('nmcli', 'dhclient')], [])
        self.assertRegex(stderr, r'hostname web-7 sent to DHCP by systemd-networkd on eth0 '
                                 r'\(networkctl reconfigure eth0\); address 10\.0\.0\.4')
        self.assertNotIn('warning', stderr)
        # the address is the kernel's answer (SIOCGIFADDR), not an `ip` process
        self.assertEqual([c for c in commands if c.split()[0] == 'ip'], [])

    def test_no_publish_hostname_renames_but_runs_no_dhcp_client(self):
        stderr = self.provision('--no-publish-hostname')
        commands = self.commands()
        self.assertEqual(commands, [])
        self.assertNotIn('sent to DHCP', stderr)
        self.assertEqual(self.host.read('hostname'), 'web-7\n')


if __name__ == '__main__':
    unittest.main()
