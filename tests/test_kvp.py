"""Hyper-V KVP report: record layout byte for byte, locking, the per-boot
truncation, and the report a real run leaves (success and failure)."""

import fcntl
import io
import os
import signal
import subprocess
import sys
import threading
import time
import unittest

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import REPO, in_root, root_with_kvp_pool, run_in_root
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

    def report(self, description, root=None, dry_run=False, deadline=None):
        """The KVP report as the executor makes it (planned, then carried out, or
        printed to self.out in a dry run); the System it was made in."""
        self.out = io.StringIO()
        system, facts = in_root(root or self.dir, dry_run=dry_run)
        system.deadline = deadline or system.deadline
        ap.perform_all(ap.kvp_report_plan(system, description), facts, system, self.out)
        return system


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
        self.assertEqual(ap.kvp_report_plan(in_root(not_hyperv)[0], 'x'), [])
        self.report('x', not_hyperv)
        self.assertEqual(os.listdir(not_hyperv), [])
        os.mkdir(self.pool)         # the pool is a directory: a warning, not an exception
        system = self.report('x')
        self.assertRegex(system.log.lines[-1], r'^warning: KVP report not written: ')

    def test_only_a_regular_file_is_written(self):
        """Issue 20 (5, 3): a FIFO (no reader: opening it to write would fail; a
        reader with a full pipe: writing would block), a link (even to a file of
        the same directory) or a directory as the pool is refused before a byte is
        written, and what it leads to is left as it was."""
        aside = os.path.join(self.dir, 'var/lib/hyperv/aside')
        with open(aside, 'wb') as f:
            f.write(b'kept')
        os.utime(aside, (1000, 1000))       # older than this boot: would be emptied
        for make in (os.mkfifo, lambda path: os.symlink('aside', path), os.mkdir):
            with self.subTest(make=make):
                make(self.pool)
                try:
                    with self.assertRaisesRegex(OSError, 'not a regular file'):
                        ap.write_kvp('K', 'v', self.pool, wait=0)
                finally:
                    (os.rmdir if os.path.isdir(self.pool) and not os.path.islink(self.pool)
                     else os.remove)(self.pool)
                with open(aside, 'rb') as f:
                    self.assertEqual(f.read(), b'kept')

    def test_dry_run_prints_the_record(self):
        self.report('result=success', dry_run=True)
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


class LockedPool(PoolDir):
    """Issue 20 (7): another process holds the pool's flock (a stuck hv_kvp_daemon, an
    agent's writer): KVP is best-effort, Azure's report is not.  Each test holds the
    lock on an open file of its own; the provisioner runs as a process, as the unit
    runs it (on the test's temporary root), and must still report within its
    --timeout."""

    TIMEOUT = 8         # the run's --timeout
    SLACK = 3           # s past it for starting Python and exiting

    def hold_lock(self):
        holder = open(self.pool, 'ab')
        self.addCleanup(holder.close)
        fcntl.flock(holder, fcntl.LOCK_EX)
        return holder

    def run_script(self, az, *args):
        """The script's run on this test's temporary root (the pool the test locks;
        the record), no root needed; --no-hostname, --media none and
        --keep-ssh-host-keys: nothing of this machine is looked at or changed.  The
        process time limit is generous: a provisioner stuck in flock is seen by the
        assertions, not by a hang of the test."""
        return run_in_root(self.dir, ['--wireserver', az.wireserver_addr, '--imds',
                                      az.imds_addr, '--no-hostname', '--media', 'none',
                                      '--keep-ssh-host-keys', '--timeout', str(self.TIMEOUT)]
                           + list(args), timeout=self.TIMEOUT + 15)

    def test_a_failing_run_still_reports_provisioning_failed(self):
        self.hold_lock()
        with FakeAzure(admin_username='Root;id') as az:     # the user step refuses it
            try:
                run = self.run_script(az, '--provision-user')
            except AssertionError as exc:   # stuck: killed at the process time limit
                self.fail('no exit while the pool was locked; reports %s; %s'
                          % (az.health_reports, exc))
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
        self.assertEqual((report['state'], report['substatus']), ('NotReady',
                                                                   'ProvisioningFailed'))
        self.assertIn("invalid admin user name 'Root;id'", report['description'])
        self.assertLess(run.seconds, self.TIMEOUT + self.SLACK, run)
        self.assertRegex(run.stderr, r'warning: KVP report not written: .*locked by another '
                                     r'process', run)
        self.assertEqual(os.path.getsize(self.pool), 0)     # nothing written past the lock

    def test_a_successful_run_still_reports_ready(self):
        self.hold_lock()
        with FakeAzure() as az:
            try:
                run = self.run_script(az)
            except AssertionError as exc:
                self.fail('no exit while the pool was locked; reports %s; %s'
                          % (az.health_reports, exc))
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        self.assertLess(run.seconds, self.TIMEOUT + self.SLACK, run)
        self.assertRegex(run.stderr, r'warning: KVP report not written: .*locked by another '
                                     r'process', run)
        self.assertEqual(os.path.getsize(self.pool), 0)

    def bounded(self, seconds):
        """A write that waits on the lock past `seconds` fails the test instead of
        hanging it (SIGALRM interrupts flock)."""
        def expired(signum, frame):
            raise AssertionError('still waiting for the KVP lock after %s s' % seconds)
        previous = signal.signal(signal.SIGALRM, expired)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def test_the_wait_is_bounded_and_a_lock_let_go_in_time_is_taken(self):
        holder = self.hold_lock()
        self.bounded(10)
        started = time.monotonic()
        with self.assertRaisesRegex(OSError, 'locked by another process'):
            ap.write_kvp('K', 'v', self.pool, wait=0.5)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertLess(time.monotonic() - started, 1.5)
        started = time.monotonic()
        with self.assertRaisesRegex(OSError, 'locked by another process'):
            ap.write_kvp('K', 'v', self.pool, wait=0)       # one try, no wait
        self.assertLess(time.monotonic() - started, 0.2)
        # released while the writer waits: it takes the lock and writes
        releaser = threading.Timer(0.3, holder.close)
        releaser.start()
        self.addCleanup(releaser.cancel)
        ap.write_kvp('K', 'v', self.pool, wait=5)
        self.assertEqual(records(self.pool), [('K', 'v')])

    def test_the_failure_report_keeps_its_reserve(self):
        """With no time left before the reserve, the KVP write gets one try: the
        reserve is the WireServer report's."""
        self.hold_lock()
        self.bounded(10)
        started = time.monotonic()
        # the reserve is all that is left
        system = self.report('result=error', deadline=ap.Deadline(0.5, reserve=0.5))
        self.assertLess(time.monotonic() - started, 0.2)
        self.assertRegex(system.log.lines[-1], r'^warning: KVP report not written: .*locked')


if __name__ == '__main__':
    unittest.main()
