"""Publishing the hostname to DHCP: which client manages the primary interface,
whether it sends a hostname at all, and the commands run (recorded by stand-in
networkctl / nmcli / dhclient / ip on PATH, in a constructed /proc, /sys, /run)."""

import io
import os
import shutil
import tempfile
import unittest

import azure_provisioning as ap
from tests.test_transport import QuietLog

ROUTES = ('Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n'
          'eth1\t00000000\t0100A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n'
          'eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n'
          'eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n')

FAKE_TOOL = '''#!/bin/sh
echo "$(basename "$0") $*" >> "%(log)s"
case "$(basename "$0") $*" in
  "ip -4 -o addr show dev eth0") echo "2: eth0    inet 10.0.0.4/24 brd 10.0.0.255 scope global eth0";;
  "nmcli -g GENERAL.CONNECTION device show eth0") echo "Wired connection 1";;
  "nmcli -g ipv4.dhcp-send-hostname connection show Wired connection 1") echo "%(nm_send)s";;
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
        self.tools()

    def tools(self, nm_send='yes', networkctl_exit=0):
        for tool in ('networkctl', 'nmcli', 'dhclient', 'ip'):
            self.write('fakebin/' + tool, FAKE_TOOL % {'log': self.log_file, 'nm_send': nm_send,
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
            return [line for line in f.read().splitlines() if not line.startswith('ip ')]

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
        return ap.publish_hostname('web-7', ap.Deadline(10), self.log, dry_run, self.out,
                                   root=self.root)


class PrimaryInterface(FakeSystem):
    def test_default_route_with_the_lowest_metric(self):
        self.assertEqual(ap.primary_interface(self.root), 'eth0')

    def test_without_a_default_route_the_networkd_lease_then_any_routed_interface(self):
        header, eth1_default, eth0_net, _ = ROUTES.splitlines(True)
        self.write('proc/net/route', header + eth0_net.replace('eth0', 'ens2'))
        self.assertEqual(ap.primary_interface(self.root), 'ens2')    # routed, no lease
        self.write('sys/class/net/ens3/ifindex', '3\n')
        self.write('run/systemd/netif/leases/3', 'ADDRESS=10.0.0.9\n')
        self.assertEqual(ap.primary_interface(self.root), 'ens3')    # networkd's lease

    def test_no_route_at_all(self):
        self.write('proc/net/route', ROUTES.splitlines(True)[0])
        self.assertIsNone(ap.primary_interface(self.root))
        self.assertIn('no routed interface', self.publish())


class Networkd(FakeSystem):
    def test_reconfigure_not_renew(self):
        self.networkd('[Match]\nName=eth0\n[Network]\nDHCP=ipv4\n')
        self.assertIsNone(self.publish())
        self.assertEqual(self.commands(), ['networkctl reconfigure eth0'])
        self.assertRegex(self.log.lines[-1], r'hostname web-7 sent to DHCP by systemd-networkd on '
                                             r'eth0 \(networkctl reconfigure eth0\); address '
                                             r'10\.0\.0\.4 \(\d+ ms\)')

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


class NetworkManager(FakeSystem):
    def setUp(self):
        FakeSystem.setUp(self)
        os.makedirs(os.path.join(self.root, 'run/NetworkManager'))

    def test_device_modify_sets_the_dhcp_hostname(self):
        self.assertIsNone(self.publish())
        self.assertEqual(self.commands()[-1], 'nmcli device modify eth0 ipv4.dhcp-hostname web-7')
        self.assertIn('by NetworkManager on eth0', self.log.lines[-1])

    def test_send_hostname_off(self):
        self.tools(nm_send='no')
        self.assertIn('ipv4.dhcp-send-hostname no', self.publish())
        self.assertNotIn('modify', ' '.join(self.commands()))


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


if __name__ == '__main__':
    unittest.main()
