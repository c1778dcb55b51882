"""tests/matrix.py: --jobs N runs N versions at a time and still prints them in
version order; a failing version fails the matrix; absent ones are not passes.
Stand-in interpreters (shell scripts) keep it fast."""

import contextlib
import io
import os
import shutil
import tempfile
import time
import unittest

from tests import matrix

STAND_IN = '''#!/bin/sh
# a stand-in python3: "runs" one test in %(seconds)s s
sleep %(seconds)s
echo "Ran 1 test in %(seconds)ss"
echo "%(verdict)s"
exit %(code)d
'''


class Matrix(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='azp-matrix-')
        self.addCleanup(shutil.rmtree, self.dir)

    def stand_in(self, version, seconds=1.0, code=0):
        bin_dir = os.path.join(self.dir, version, 'bin')
        os.makedirs(bin_dir)
        path = os.path.join(bin_dir, 'python3')
        with open(path, 'w') as f:
            f.write(STAND_IN % {'seconds': seconds, 'code': code,
                                'verdict': 'OK' if code == 0 else 'FAILED (failures=1)'})
        os.chmod(path, 0o755)

    def run_matrix(self, *args):
        out = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(out):
            code = matrix.main(['--pythons', self.dir] + list(args) + ['tests.test_x'])
        return code, out.getvalue(), time.monotonic() - started

    def test_two_at_a_time_in_version_order(self):
        for version in ('3.6.15', '3.7.16', '3.12.1', '3.13.0'):
            self.stand_in(version, seconds=1.0)
        code, out, seconds = self.run_matrix('--jobs', '2')
        self.assertEqual(code, 0, out)
        self.assertLess(seconds, 3.5, out)          # 4 x 1 s, two at a time: about 2 s
        self.assertGreaterEqual(seconds, 2.0, out)
        shown = [line.split(':')[0] for line in out.splitlines() if line.startswith('3.')]
        self.assertEqual(shown, ['3.%d' % m for m in matrix.MINORS], out)
        self.assertIn('matrix: 4 passed, 0 failed, 4 skipped', out)
        self.assertIn('2 at a time', out)

    def test_one_at_a_time_by_default_and_a_failure_fails(self):
        self.stand_in('3.8.18', seconds=0.5)
        self.stand_in('3.9.18', seconds=0.5, code=1)
        code, out, seconds = self.run_matrix()
        self.assertEqual(code, 1, out)
        self.assertGreaterEqual(seconds, 1.0, out)
        self.assertRegex(out, r'(?m)^3\.9: FAIL')
        self.assertIn('matrix: 1 passed, 1 failed, 6 skipped', out)

    def test_only_the_versions_asked_for(self):
        self.stand_in('3.6.15', seconds=0.1)
        self.stand_in('3.13.0', seconds=0.1)
        code, out, _ = self.run_matrix('--only', '3.13')
        self.assertEqual(code, 0, out)
        self.assertEqual([line.split(':')[0] for line in out.splitlines()
                          if line.startswith('3.')], ['3.13'], out)
        self.assertIn('matrix: 1 passed, 0 failed, 0 skipped', out)


if __name__ == '__main__':
    unittest.main()
