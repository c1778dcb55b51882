"""Hyper-V KVP report: record layout byte for byte, locking, the per-boot
truncation, and the report a real run leaves (success and failure)."""

import io
import os
import subprocess
import sys
import time
import unittest

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import REPO, root_with_kvp_pool
from tests.test_transport import QuietLog


def records(path):
    with open(path, 'rb') as f:
        data = f.read()
    assert len(data) % 2560 == 0, len(data)
    out = []
    for i in range(0, len(data), 2560):
        key, value = data[i:i + 512], data[i + 512:i + 2560]
        out.append((key.rstrip(b'\0').decode(), value.rstrip(b'\0').decode()))
    return out


class PoolDir(unittest.TestCase):
    """A temporary root with the Hyper-V pool directory: self.pool is its pool file."""

    def setUp(self):
        self.dir, self.pool = root_with_kvp_pool(self, 'azp-kvp-')

    def run_context(self, root=None, dry_run=False):
        self.out = io.StringIO()
        return ap.Run(ap.Options(root=root or self.dir, dry_run=dry_run), QuietLog(), self.out)


class Pool(PoolDir):
    def test_record_layout_byte_for_byte(self):
        ap.write_kvp('PROVISIONING_REPORT', 'result=success|agent=x', self.pool)
        with open(self.pool, 'rb') as f:
            data = f.read()
        self.assertEqual(data, b'PROVISIONING_REPORT' + b'\0' * (512 - 19)
                         + b'result=success|agent=x' + b'\0' * (2048 - 22))

    def test_value_capped_at_1024_bytes_on_a_character_boundary(self):
        ap.write_kvp('K', 'x' * 1023 + '\u00e9' + 'y' * 3000, self.pool)
        (key, value), = records(self.pool)
        self.assertEqual(value, 'x' * 1023)
        ap.write_kvp('K', 'z' * 5000, self.pool)
        self.assertEqual(len(records(self.pool)[1][1]), 1024)

    def test_appends_within_a_boot_and_truncates_a_pool_from_an_earlier_boot(self):
        booted = ap.boot_time()
        ap.write_kvp('A', '1', self.pool)
        ap.write_kvp('B', '2', self.pool)
        self.assertEqual(records(self.pool), [('A', '1'), ('B', '2')])
        os.utime(self.pool, (booted - 60, booted - 60))     # left over from the last boot
        ap.write_kvp('C', '3', self.pool)
        self.assertEqual(records(self.pool), [('C', '3')])

    def test_two_writers_at_once_never_interleave(self):
        writer = ('import sys; sys.path.insert(0, %r); import azure_provisioning as ap\n'
                  'for i in range(200): ap.write_kvp("W%%s-%%d" %% (sys.argv[1], i), '
                  'sys.argv[1] * (1 + i %% 900), %r)' % (REPO, self.pool))
        processes = [subprocess.Popen([sys.executable, '-c', writer, name]) for name in 'ab']
        for process in processes:
            self.assertEqual(process.wait(timeout=60), 0)
        got = records(self.pool)
        self.assertEqual(len(got), 400)
        for key, value in got:
            name, i = key[1], int(key.split('-')[1])
            self.assertEqual(value, name * (1 + i % 900))
        for name in 'ab':   # each writer's records in its own order
            self.assertEqual([int(k.split('-')[1]) for k, _ in got if k[1] == name],
                             list(range(200)))

    def test_report_never_fails_and_skips_non_hyperv(self):
        not_hyperv = os.path.join(self.dir, 'not-hyperv')
        os.mkdir(not_hyperv)
        ap.report_to_kvp(self.run_context(not_hyperv), 'x')
        self.assertEqual(os.listdir(not_hyperv), [])
        os.mkdir(self.pool)         # the pool is a directory: a warning, not an exception
        run = self.run_context()
        ap.report_to_kvp(run, 'x')
        self.assertRegex(run.log.lines[-1], r'^warning: KVP report not written: ')

    def test_dry_run_prints_the_record(self):
        ap.report_to_kvp(self.run_context(dry_run=True), 'result=success')
        self.assertEqual(self.out.getvalue(),
                         'would append to %s: PROVISIONING_REPORT=result=success\n' % self.pool)
        self.assertFalse(os.path.exists(self.pool))


class RunLeavesAReport(PoolDir):
    def run_provision(self, **emulator):
        with FakeAzure(**emulator) as az:
            options = ap.Options(wireserver=ap.parse_address(az.wireserver_addr),
                                 imds=ap.parse_address(az.imds_addr), timeout=4,
                                 set_hostname=False, root=self.dir)
            code = ap.provision(options, QuietLog(), io.StringIO())
            return code, list(az.health_reports)

    def test_success(self):
        code, reports = self.run_provision(vm_id='0a0b0c0d-0000-1111-2222-333344445555')
        self.assertEqual(code, 0)
        (key, value), = records(self.pool)
        self.assertEqual(key, 'PROVISIONING_REPORT')
        self.assertRegex(value, r'^result=success\|agent=azure-provisioning/[\d.]+\|'
                                r'vm_id=0a0b0c0d-0000-1111-2222-333344445555\|timestamp=\S+Z$')

    def test_failure_with_the_same_description_as_the_wireserver(self):
        code, reports = self.run_provision(imds_down=True)
        self.assertEqual(code, 1)
        (key, value), = records(self.pool)
        self.assertEqual(value, reports[0]['description'])
        self.assertRegex(value, r'^result=error\|reason=IMDS: ')

    def test_failure_reaches_kvp_when_the_wireserver_is_dead(self):
        started = time.monotonic()
        code, reports = self.run_provision(imds_down=True, wireserver_up_after=600)
        self.assertEqual(code, 1)
        self.assertEqual(reports, [])
        (key, value), = records(self.pool)
        self.assertIn('step=imds', value)
        self.assertLess(time.monotonic() - started, 5)


if __name__ == '__main__':
    unittest.main()
