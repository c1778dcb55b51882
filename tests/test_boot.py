"""unittest wrapper of the real-boot test (tests/boot_test.py).

The boot test needs root, QEMU, mmdebstrap and Debian's package mirror, and takes
minutes, so `python3 -m unittest` runs it only when AZP_BOOT_TEST=1 is set; otherwise
this test is skipped with the reason printed (a skip, never a pass).  .ci/run runs
tests/boot_test.py itself as well (or sets AZP_BOOT_TEST=1), so CI never counts this
skip as the boot test passing.
"""

import os
import subprocess
import sys
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
BOOT_TEST = os.path.join(HERE, 'boot_test.py')
TIME_LIMIT = 1200       # s; the boot test aims at well under 10 minutes


class BootTest(unittest.TestCase):

    def test_boot_test_script_lists_its_boots(self):
        """Cheap and always run: the script loads and knows its boots."""
        proc = subprocess.Popen([sys.executable, BOOT_TEST, '--list'], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)
        out = proc.communicate(timeout=60)[0]
        self.assertEqual(proc.returncode, 0, out)
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        for name in ('first', 'second', 'failure', 'slow-network'):
            self.assertIn(name, names)

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
