"""unittest wrapper of the real-boot test (tests/boot_test.py).

The boot test needs root, QEMU, mmdebstrap and Debian's package mirror, and takes
minutes, so `python3 -m unittest` runs it only when AZP_BOOT_TEST=1 is set; otherwise
this test is skipped with the reason printed (a skip, never a pass).  .ci/run runs
tests/boot_test.py itself as well (or sets AZP_BOOT_TEST=1), so CI never counts this
skip as the boot test passing.
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
BOOT_TEST = os.path.join(HERE, 'boot_test.py')
TIME_LIMIT = 1200       # s; the boot test aims at well under 10 minutes


def dhcp_frame(mac, kind, hostname, requested=None, yiaddr='0.0.0.0'):
    """An Ethernet/IPv4/UDP DHCP message (checksums left 0: the parser ignores them)."""
    options = b'\x63\x82\x53\x63' + bytes([53, 1, kind])
    if hostname:
        options += bytes([12, len(hostname)]) + hostname
    if requested:
        options += bytes([50, 4]) + socket.inet_aton(requested)
    options += b'\xff'
    bootp = (bytes([1, 1, 6, 0]) + b'\x00' * 8 + b'\x00' * 4
             + socket.inet_aton(yiaddr) + b'\x00' * 8 + b'\x00' * 16 + b'\x00' * 192 + options)
    udp = struct.pack('!HHHH', 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton('0.0.0.0'), socket.inet_aton('255.255.255.255')) + udp
    src = bytes(int(b, 16) for b in mac.split(':'))
    return b'\xff' * 6 + src + b'\x08\x00' + ip


class BootTest(unittest.TestCase):

    def test_boot_test_script_lists_its_boots(self):
        """Cheap and always run: the script loads and knows its boots."""
        proc = subprocess.Popen([sys.executable, BOOT_TEST, '--list'], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)
        out = proc.communicate(timeout=60)[0]
        self.assertEqual(proc.returncode, 0, out)
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        for name in ('first', 'second', 'failure', 'slow-network', 'no-dbus',
                     'networkmanager'):
            self.assertIn(name, names)
        self.assertNotIn('optional', out)   # every boot runs by default

    def test_dhcp_parsing_of_a_capture(self):
        """Cheap and always run: the pcap reader finds option 12 and the addresses."""
        from tests import boot_test
        frames = [dhcp_frame(boot_test.GUEST_MAC, 3, b'vm-boot-7', requested='168.0.0.15'),
                  dhcp_frame('52:55:a8:00:00:02', 5, None, yiaddr='168.0.0.15')]
        data = struct.pack('<IHHiIII', 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1)
        for i, frame in enumerate(frames):
            data += struct.pack('<IIII', 1000 + i, 500000, len(frame), len(frame)) + frame
        with tempfile.NamedTemporaryFile(suffix='.pcap') as f:
            f.write(data)
            f.flush()
            packets = boot_test.read_pcap(f.name)
        found = boot_test.dhcp_messages(packets)
        self.assertEqual([(m['type'], m['hostname'], m['requested'], m['yiaddr'],
                           m['from_guest'], m['time']) for m in found],
                         [('REQUEST', 'vm-boot-7', '168.0.0.15', '0.0.0.0', True, 1000.5),
                          ('ACK', None, None, '168.0.0.15', False, 1001.5)])

    def test_served_keys_are_valid_for_the_product(self):
        """The boot test's second key passes the product's own validation, normalized."""
        from tests import boot_test
        import azure_provisioning
        key = boot_test.SECOND_KEY
        self.assertEqual(azure_provisioning.validate_public_key('  ' + key + ' \r\n'),
                         ' '.join(key.split()))
        self.assertIn('  ', key)            # the runs of blanks the boot checks are gone

    def test_real_boot(self):
        if os.environ.get('AZP_BOOT_TEST') != '1':
            reason = ('real-boot test not run: set AZP_BOOT_TEST=1 (needs root, QEMU, '
                      'mmdebstrap, minutes); or run python3 tests/boot_test.py')
            sys.stderr.write('\ntest_boot: SKIPPED: %s\n' % reason)
            self.skipTest(reason)
        args = [sys.executable, BOOT_TEST]
        if os.environ.get('AZP_BOOT_ARGS'):
            args += os.environ['AZP_BOOT_ARGS'].split()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        lines = []
        watchdog = threading.Timer(TIME_LIMIT, proc.terminate)  # boot_test.py stops QEMU
        watchdog.start()
        try:
            for line in proc.stdout:        # show progress as it comes
                sys.stderr.write(line)
                lines.append(line)
            proc.wait(timeout=60)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.terminate()            # boot_test.py stops QEMU on SIGTERM
                proc.wait(timeout=60)
            proc.stdout.close()
        out = ''.join(lines)
        self.assertEqual(proc.returncode, 0, 'boot test failed:\n' + out[-4000:])
        self.assertRegex(out, r'(?m)^\d+ passed, 0 failed$')


if __name__ == '__main__':
    unittest.main()
