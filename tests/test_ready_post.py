"""The Ready POST and the failure report, as the emulator receives them: a refused
Ready is a failed run (the unit disables itself only after exit 0), a stale
incarnation is fetched again a bounded number of times, the incarnation posted
is the goal state's, and a crash of any type in a step still reaches Azure as
ProvisioningFailed."""

import io
import os
import unittest
from unittest import mock

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import root_with_kvp_pool, run_provisioner
from tests.test_transport import QuietLog


def health_posts(az):
    return [r for r in az.requests if r['server'] == 'wireserver' and 'comp=health' in r['path']]


def goal_state_gets(az):
    return [r for r in az.requests if r['server'] == 'wireserver' and 'comp=goalstate' in r['path']]


def kvp_values(pool):
    if not os.path.exists(pool):
        return []
    with open(pool, 'rb') as f:
        data = f.read()
    return [data[i + 512:i + 2560].rstrip(b'\0').decode() for i in range(0, len(data), 2560)]


class EmulatorHealthFaults(unittest.TestCase):
    """What the tests below rely on: health_faults answer the health POSTs in order,
    before the report is judged (so a faulted POST is a request, not a report)."""

    def test_400_then_410_then_normal(self):
        with FakeAzure(health_faults=[400, 410]) as az:
            log = QuietLog()
            address = ap.parse_address(az.wireserver_addr)
            for expected in (400, 410, 200):
                goal_state = ap.fetch_goal_state(address, ap.Deadline(10), log)
                body = ap.build_health_report(goal_state).encode()
                response = ap.http_exchange(address, 'POST', '/machine?comp=health',
                                            ap.HEALTH_HEADERS, ap.Deadline(10), log, body=body)
                self.assertEqual(response.status, expected)
            self.assertEqual([(r['status'], r['fault']) for r in health_posts(az)],
                             [(400, 'status 400'), (410, 'status 410'), (200, None)])
            self.assertEqual([h['status'] for h in az.health_reports], [200])


class RefusedReady(unittest.TestCase):
    """The script as the unit runs it: whatever it prints, exit 0 is what makes
    ExecStartPost disable the unit."""

    def run_script(self, **emulator):
        with FakeAzure(**emulator) as az:
            run = run_provisioner(az, '--no-hostname', '--timeout', '20')
            self.assertNotIn('Traceback', run.stderr, run)
            return run, health_posts(az), goal_state_gets(az), az.ready_accepted()

    def test_400_to_ready_is_a_failed_run(self):
        run, posts, gets, accepted = self.run_script(health_faults=[400])
        self.assertEqual(run.code, 1, run)
        self.assertFalse(accepted)
        self.assertEqual([p['status'] for p in posts], [400])     # final, not retried
        self.assertRegex(run.stderr, r'error: could not report Ready: health report: '
                                     r'WireServer answered HTTP 400')
        self.assertNotIn('Ready accepted', run.stderr)

    def test_other_4xx_are_failures_too(self):
        for status in (401, 403, 404, 409):
            with self.subTest(status=status):
                run, posts, _, accepted = self.run_script(health_faults=[status])
                self.assertEqual(run.code, 1, run)
                self.assertEqual([p['status'] for p in posts], [status])
                self.assertIn('HTTP %d' % status, run.stderr)

    def test_410_refetches_the_goal_state_each_time_then_succeeds(self):
        stale = ap.STALE_INCARNATIONS_ALLOWED - 1
        run, posts, gets, accepted = self.run_script(health_faults=[410] * stale)
        self.assertEqual(run.code, 0, run)
        self.assertTrue(accepted)
        self.assertEqual([p['status'] for p in posts], [410] * stale + [200])
        self.assertEqual(len(gets), stale + 1)
        self.assertEqual(run.stderr.count('(410 Gone); fetching the goal state again'), stale)

    def test_410_every_time_is_a_failed_run(self):
        self.assertEqual(ap.STALE_INCARNATIONS_ALLOWED, 5)
        run, posts, gets, accepted = self.run_script(health_faults=[410] * 10)
        self.assertEqual(run.code, 1, run)
        self.assertFalse(accepted)
        self.assertEqual([p['status'] for p in posts], [410] * 5)
        self.assertEqual(len(gets), 5)
        self.assertIn('error: could not report Ready: health report: incarnation kept '
                      'changing (5 times 410 Gone)', run.stderr)


class InProcess(unittest.TestCase):
    def setUp(self):
        self.dir, self.pool = root_with_kvp_pool(self, 'azp-ready-')

    def provision(self, az, **options):
        options = ap.Options(wireserver=ap.parse_address(az.wireserver_addr),
                             imds=ap.parse_address(az.imds_addr), timeout=20,
                             set_hostname=False, root=self.dir, **options)
        self.log = QuietLog()
        return ap.provision(options, self.log, io.StringIO())


class RefusedReadyInProcess(InProcess):
    def test_kvp_says_error_not_success(self):
        with FakeAzure(health_faults=[400]) as az:
            self.assertEqual(self.provision(az), 1)
        value, = kvp_values(self.pool)
        self.assertRegex(value, r'^result=error\|reason=could not report Ready: .*HTTP 400')
        self.assertIn('|step=ready|', value)


class Incarnation(InProcess):
    """Not 1: the emulator's default and the value the health-report unit tests use."""

    def test_ready_carries_the_goal_states_incarnation(self):
        with FakeAzure(incarnation=37) as az:
            self.assertEqual(self.provision(az), 0)
            (report,) = az.health_reports
        self.assertEqual((report['state'], report['incarnation'], report['status']),
                         ('Ready', 37, 200))

    def test_failure_report_carries_it_too(self):
        with FakeAzure(incarnation=9, imds_faults=[403]) as az:
            self.assertEqual(self.provision(az), 1)
            (report,) = az.health_reports
        self.assertEqual((report['state'], report['substatus'], report['incarnation'],
                          report['status']), ('NotReady', 'ProvisioningFailed', 9, 200))


class CrashInAStep(InProcess):
    """Whatever a step raises (a bug included), Azure hears ProvisioningFailed with
    the step and the exception's type, instead of waiting out its 20-40 minutes."""

    CRASHES = [RuntimeError('boom'), KeyError('compute'), TypeError('bad operand'),
               AttributeError("'NoneType' object has no attribute 'get'"),
               ZeroDivisionError('division by zero'), UnicodeDecodeError('utf-8', b'\xff', 0, 1,
                                                                          'invalid start byte')]

    def check(self, az, code, step, exc):
        self.assertEqual(code, 1, self.log.lines)
        (report,) = az.health_reports
        self.assertEqual((report['state'], report['substatus'], report['status']),
                         ('NotReady', 'ProvisioningFailed', 200))
        self.assertIn('|step=%s|' % step, report['description'])
        self.assertIn(type(exc).__name__, report['description'])
        self.assertFalse(az.ready_accepted())
        self.assertEqual(kvp_values(self.pool), [report['description']])

    def test_crash_in_the_hooks_step(self):
        for exc in self.CRASHES:
            with self.subTest(exception=type(exc).__name__):
                os.path.exists(self.pool) and os.unlink(self.pool)
                with FakeAzure() as az, mock.patch.object(ap, 'list_hooks', side_effect=exc):
                    code = self.provision(az)
                    self.check(az, code, 'hooks', exc)

    def test_crash_in_the_user_step(self):
        exc = RuntimeError('useradd said something odd')
        with FakeAzure() as az, mock.patch.object(ap, 'user_plan', side_effect=exc):
            code = self.provision(az, provision_user=True)
            self.check(az, code, 'user', exc)
        self.assertIn('useradd said something odd', az.health_reports[0]['description'])


if __name__ == '__main__':
    unittest.main()
