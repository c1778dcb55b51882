"""The suite never writes outside its temporary directories and namespaces: run as
if this machine were an Azure VM (a /var/lib/hyperv the host reads), it must leave
the KVP pool there untouched."""

import os
import shutil
import sys
import tempfile
import unittest

from tests.fake_azure import FakeAzure
from tests.support import REPO, SCRIPT, require_root, run_command, skip

INNER = 'AZP_SUITE_UNDER_GUARD'
# Runs argv with a private directory bound over /var/lib, holding an empty hyperv/.
GUARD = 'mount --bind "$0" /var/lib && exec "$@"'


def under_guard(var_lib, argv, timeout):
    return run_command(['unshare', '--mount', 'sh', '-c', GUARD, var_lib] + argv,
                       env=dict(os.environ, **{INNER: '1'}), timeout=timeout)


class KvpPoolUntouched(unittest.TestCase):
    def setUp(self):
        if os.environ.get(INNER):
            skip(self, 'already running under the guard')
        require_root(self)
        self.var_lib = tempfile.mkdtemp(prefix='azp-var-lib-')
        self.addCleanup(shutil.rmtree, self.var_lib, True)
        self.hyperv = os.path.join(self.var_lib, 'hyperv')
        os.mkdir(self.hyperv)

    def test_the_guard_sees_a_write(self):
        # control: an unshielded run does write the pool, so an empty pool below means
        # the suite was shielded, not that the guard was blind
        with FakeAzure(computer_name='web-7') as az:
            code = ('import subprocess, sys; sys.exit(subprocess.call([sys.executable, "-I", "%s",'
                    ' "--no-hostname", "--wireserver", "%s", "--imds", "%s"]))'
                    % (SCRIPT, az.wireserver_addr, az.imds_addr))
            run = under_guard(self.var_lib, [sys.executable, '-c', code], timeout=60)
        self.assertEqual(run.code, 0, run)
        self.assertEqual(os.listdir(self.hyperv), ['.kvp_pool_1'])

    def test_the_whole_suite_leaves_the_pool_alone(self):
        run = under_guard(self.var_lib, [sys.executable, '-m', 'unittest', 'discover', '-s',
                                         os.path.join(REPO, 'tests'), '-t', REPO], timeout=1200)
        self.assertEqual(run.code, 0, run.stderr[-3000:])
        self.assertEqual(os.listdir(self.hyperv), [],
                         'the suite wrote into /var/lib/hyperv:\n' + run.stderr[-3000:])


if __name__ == '__main__':
    unittest.main()
