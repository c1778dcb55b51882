"""ready.d hooks: run-parts rules, environment, failures and time limits: the step
on a temporary root, and whole runs of the script on one against the emulator (no
root needed)."""

import json
import os
import shutil
import tempfile
import time
import unittest
from unittest import mock

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import TemporaryRoot, in_root, one_step

RECORDER = '''#!/bin/sh
# appends its name, the time and its environment facts to OUT
{
  echo "name=$(basename "$0") time=$(date +%%s.%%N)"
  echo "vm_id=$AZURE_VM_ID hostname=$AZURE_HOSTNAME admin=$AZURE_ADMIN_USERNAME left=$AZURE_PROVISIONING_SECONDS_LEFT"
  echo "imds_mode=$(stat -c %%a "$AZURE_IMDS_JSON")"
  cp "$AZURE_IMDS_JSON" %(out)s.imds.json
} >> %(out)s
echo "stdout of $(basename "$0")"
'''


def alive(pid):
    """Running, not a zombie (PID 1 in some sandboxes never reaps orphans)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


class HooksOnATemporaryRoot(unittest.TestCase):
    """The hooks step planned and carried out on a temporary root (no root needed):
    the plan names the hooks, their environment is derived from the run's facts (a
    stale variable of ours in our own environment does not reach them), the IMDS
    copy is private and gone afterwards, and a failing hook fails the step with its
    last stderr line."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='azp-hooks-')
        self.addCleanup(shutil.rmtree, self.root)
        self.hooks = os.path.join(self.root, 'etc/azure-provisioning/ready.d')
        os.makedirs(self.hooks)
        os.makedirs(os.path.join(self.root, 'run'))
        self.out = os.path.join(self.root, 'hooks.log')

    def hook(self, name, text):
        path = os.path.join(self.hooks, name)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, 0o755)
        return path

    def step(self):
        system, facts = in_root(self.root)
        facts = facts._replace(metadata={'compute': {'vmId': 'vm-1'}}, vm_id='vm-1',
                               hostname='web-7', admin_user='alice',
                               user_data=os.path.join(self.root, 'user-data'))
        with mock.patch.dict(os.environ, {'AZURE_CUSTOM_DATA': '/stale/custom-data'}):
            return one_step(ap.plan_hooks, system, facts)[1]

    def test_the_environment_comes_from_the_facts(self):
        first = self.hook('10-env', '#!/bin/sh\n{ env | grep ^AZURE_ | grep -v -e SECONDS_LEFT '
                          '-e IMDS_JSON | sort; stat -c %%a "$AZURE_IMDS_JSON"; } > %s\n'
                          % self.out)
        plan = self.step()
        self.assertEqual([(action.says, action.fatal) for action in plan],
                         [('run hooks: %s' % first, True)])
        with open(self.out) as f:
            self.assertEqual(f.read().splitlines(), [
                'AZURE_ADMIN_USERNAME=alice', 'AZURE_HOSTNAME=web-7',
                'AZURE_USER_DATA=%s' % os.path.join(self.root, 'user-data'),
                'AZURE_VM_ID=vm-1', '600'])
        self.assertEqual(os.listdir(os.path.join(self.root, 'run')), [])

    def test_a_failing_hook_fails_the_step(self):
        self.hook('10-bad', '#!/bin/sh\necho first >&2\necho broken >&2\nexit 3\n')
        with self.assertRaisesRegex(ap.ProvisioningError,
                                    r'^hook 10-bad failed with exit status 3: broken$'):
            self.step()

    def test_no_hooks_no_plan(self):
        self.assertEqual(self.step(), [])


class Hooks(unittest.TestCase):
    """Whole runs of the script on a temporary root whose /etc holds the hooks."""

    def setUp(self):
        self.host = TemporaryRoot('web-7')
        self.addCleanup(self.host.cleanup)
        self.hooks = os.path.join(self.host.etc, 'azure-provisioning', 'ready.d')
        os.makedirs(self.hooks)
        self.out = os.path.join(self.host.dir, 'hooks.log')

    def hook(self, name, text, mode=0o755):
        path = os.path.join(self.hooks, name)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, mode)

    def recorder(self, name, mode=0o755):
        self.hook(name, RECORDER % {'out': self.out}, mode)

    def emulator(self, **fields):
        """The emulator, naming the VM as the run's host is named: no rename."""
        return FakeAzure(computer_name=self.host.hostname, **fields)

    def provision(self, az, *extra):
        run = self.host.run('--wireserver', az.wireserver_addr, '--imds', az.imds_addr, *extra)
        self.assertNotIn('Traceback', run.stderr)
        return run

    def recorded(self):
        if not os.path.exists(self.out):
            return []
        with open(self.out) as f:
            return [line for line in f.read().splitlines() if line.startswith('name=')]

    def test_run_parts_order_environment_and_before_ready(self):
        self.recorder('20-second')
        self.recorder('10-first')
        self.recorder('30-disabled', mode=0o644)
        for leftover in ('40-x.dpkg-old', '41-x~', '42-x.rpmnew', '.hidden', '43-x.sh'):
            self.recorder(leftover)
        os.mkdir(os.path.join(self.hooks, '50-dir'))
        with self.emulator(admin_username='alice',
                           vm_id='0a0b0c0d-0000-1111-2222-333344445555') as az:
            run = self.provision(az)
            self.assertEqual(run.code, 0, run)
            ready, = az.health_reports
        names = [line.split()[0] for line in self.recorded()]
        self.assertEqual(names, ['name=10-first', 'name=20-second'])
        last_hook = float(self.recorded()[-1].split('time=')[1])
        self.assertLess(last_hook, ready['time'])
        with open(self.out) as f:
            text = f.read()
        self.assertIn('vm_id=0a0b0c0d-0000-1111-2222-333344445555 hostname=%s admin=alice left='
                      % self.host.hostname, text)
        self.assertIn('imds_mode=600', text)
        with open(self.out + '.imds.json') as f:
            self.assertEqual(json.load(f)['compute']['vmId'], '0a0b0c0d-0000-1111-2222-333344445555')
        self.assertIn('hooks: skipping 30-disabled: not executable', run.stderr)
        self.assertIn('hook 10-first: stdout of 10-first', run.stderr)
        self.assertRegex(run.stderr, r'hook 20-second done \(\d+ ms\)')

    def test_failing_hook_fails_provisioning_with_its_last_stderr_line(self):
        self.recorder('10-ok')
        self.hook('20-mount-data', '#!/bin/sh\necho "checking /dev/sdc" >&2\n'
                                   'echo "mount: /data: special device /dev/sdc does not exist" >&2\n'
                                   'exit 32\n')
        self.recorder('30-never')
        with self.emulator() as az:
            run = self.provision(az, '--timeout', '30')
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
        self.assertEqual((report['state'], report['substatus']), ('NotReady', 'ProvisioningFailed'))
        self.assertIn('reason=hook 20-mount-data failed with exit status 32: mount: /data: special '
                      'device /dev/sdc does not exist|', report['description'])
        self.assertIn('step=hooks', report['description'])
        self.assertEqual([l.split()[0] for l in self.recorded()], ['name=10-ok'])
        self.assertIn('hook 20-mount-data: checking /dev/sdc', run.stderr)

    def test_hanging_hook_is_killed_with_its_children_at_the_deadline(self):
        pid_file = os.path.join(self.host.dir, 'child.pid')
        self.hook('10-hang', '#!/bin/sh\necho "waiting for the data disk" >&2\n'
                             'sleep 600 &\necho $! > %s\nwait\n' % pid_file)
        with self.emulator() as az:
            started = time.monotonic()
            run = self.provision(az, '--timeout', '8')
            took = time.monotonic() - started
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
        self.assertIn('hook 10-hang timed out after', report['description'])
        self.assertIn('waiting for the data disk', report['description'])
        self.assertLess(took, 8 + 1.5)
        self.assertGreater(took, 5)     # 8 s less the 2 s kept back for the report
        with open(pid_file) as f:
            child = int(f.read())
        for _ in range(50):             # the kill is asynchronous: give it a second
            if not alive(child):
                break
            time.sleep(0.02)
        self.assertFalse(alive(child), 'the hook\'s child survived')

    def test_a_daemon_started_by_a_hook_does_not_hold_the_run(self):
        # the daemon keeps the hook's stdout and stderr (our pipes) open for 60 s
        pid_file = os.path.join(self.host.dir, 'daemon.pid')
        self.hook('10-start-daemon', '#!/bin/sh\necho starting\n'
                                     '(sleep 60; echo late) &\necho $! > %s\nexit 0\n' % pid_file)
        self.hook('20-second-daemon', '#!/bin/sh\nsleep 60 &\necho "second" >&2\n')
        with self.emulator() as az:
            started = time.monotonic()
            run = self.provision(az, '--timeout', '60')
            took = time.monotonic() - started
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        self.assertLess(took, 5, run)
        self.assertIn('hook 10-start-daemon: starting', run.stderr)
        self.assertRegex(run.stderr, r'hook 10-start-daemon done')
        with open(pid_file) as f:
            daemon = int(f.read())
        self.assertTrue(alive(daemon), 'a daemon started by a hook is left running')
        os.killpg(os.getpgid(daemon), 9)    # both hooks' children: the hooks' session

    def test_control_characters_in_a_hook_error_still_reach_azure(self):
        # terminal colours (ESC), a bell, a NUL, a form feed, U+FFFE and invalid UTF-8
        self.hook('10-colour', '#!/bin/sh\nprintf \'\\033[31mERROR\\033[0m: disk \\007\\000\\014 '
                               'missing \\357\\277\\276 \\377 end\\n\' >&2\nexit 3\n')
        with self.emulator() as az:
            run = self.provision(az, '--timeout', '30')
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
            self.assertEqual(report['status'], 200, report)
        self.assertEqual((report['state'], report['substatus']), ('NotReady', 'ProvisioningFailed'))
        self.assertIn('reason=hook 10-colour failed with exit status 3: ERROR: disk', report['description'])
        self.assertIn('missing', report['description'])
        self.assertNotIn('\x1b', report['description'])

    def test_a_nul_in_an_imds_fact_is_reported_not_a_crash(self):
        # subprocess refuses an environment with a NUL: ValueError, once an "internal error"
        self.recorder('10-first')
        with self.emulator(admin_username='alice\x00evil') as az:
            run = self.provision(az, '--timeout', '30')
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
        self.assertEqual((report['state'], report['substatus']), ('NotReady', 'ProvisioningFailed'))
        self.assertIn('step=hooks', report['description'])
        self.assertIn('reason=hook 10-first could not start: embedded null byte|',
                      report['description'])
        self.assertNotIn('internal error', run.stderr)

    def test_dry_run_lists_hooks_and_runs_none(self):
        self.recorder('10-first')
        self.recorder('20-second')
        with self.emulator() as az:
            run = self.provision(az, '--dry-run')
            self.assertEqual(run.code, 0, run)
        hooks = os.path.realpath(self.hooks)
        self.assertIn('would run hooks: %s/10-first %s/20-second' % (hooks, hooks), run.stdout)
        self.assertEqual(self.recorded(), [])


if __name__ == '__main__':
    unittest.main()
