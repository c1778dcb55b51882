"""tests/fuzz.py: a short campaign (300 cases per target, fixed seed) finds nothing, and
the harness itself tells a crash, a broken invariant and a hang from a pass."""

import io
import re
import time
import unittest

from tests import fuzz

SEED = 20240701
CASES = 300


class Campaign(unittest.TestCase):

    def test_no_failure_in_300_cases_per_target(self):
        out = io.StringIO()
        code = fuzz.main(['--cases', str(CASES), '--seed', str(SEED),
                          '--time-limit-per-case', '2', '--max-seconds', '60'], out=out)
        report = out.getvalue()
        self.assertIn('fuzz: seed %d, %d cases per target' % (SEED, CASES), report)
        for target in fuzz.TARGETS:
            self.assertRegex(report, r'\n%s +%d ' % (re.escape(target.name), CASES), report)
        self.assertEqual(code, 0, report)


class Harness(unittest.TestCase):

    def setUp(self):
        fuzz.load_script()

    def outcome(self, call, allowed=(), limit=2.0):
        target = fuzz.Target('fake', lambda: [b'x'], fuzz.bytes_case([]), call, allowed)
        return fuzz.run_case(target, fuzz.Case(b'x'), limit)

    def test_outcomes(self):
        def raise_(exc):
            def call(case):
                raise exc
            return call

        self.assertEqual(self.outcome(lambda case: 42).status, 'returned')
        self.assertEqual(self.outcome(raise_(ValueError('x')), ['ValueError']).status, 'rejected')
        self.assertEqual(self.outcome(raise_(ValueError('x')), ['ap.ProvisioningError']).status,
                         'FAIL')
        crash = self.outcome(raise_(RecursionError('deep')), ['ValueError'])
        self.assertEqual((crash.status, crash.key.split(' ')[0]), ('FAIL', 'RecursionError'))
        self.assertIn('deep', crash.message)
        broken = self.outcome(lambda case: fuzz.check(False, 'lines lost'))
        self.assertEqual((broken.status, broken.key), ('FAIL', 'broken invariant: lines lost'))

    def test_a_hang_is_a_failure_and_stops_in_time(self):
        started = time.monotonic()
        hang = self.outcome(lambda case: time.sleep(30), limit=0.3)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(hang.status, 'FAIL')
        self.assertTrue(hang.key.startswith('hang at'), hang.key)

    def test_a_case_is_a_function_of_seed_target_and_number(self):
        for target in fuzz.TARGETS:
            for n in (0, 57, 1234):
                one, two = fuzz.make_case(target, SEED, n), fuzz.make_case(target, SEED, n)
                self.assertEqual((one.data, one.params), (two.data, two.params), target.name)
            self.assertEqual(fuzz.make_case(target, SEED, 0).notes, [], target.name)  # a sample
            self.assertNotEqual(fuzz.make_case(target, SEED, 57).notes, [], target.name)


if __name__ == '__main__':
    unittest.main()
