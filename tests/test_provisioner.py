"""Black-box: the script as a process (`python3 -I`, as the unit runs it)
against the emulator on 127.0.0.1.  Runs under whichever Python runs the
suite, so tests/matrix.py covers 3.6 to 3.13."""

import os
import sys
import unittest

from tests.fake_azure import FakeAzure
from tests.support import (DEAD_PROXY_ENV, SCRIPT, PrivateHost, TemporaryRoot, is_root,
                           require_root, run_provisioner, tree_snapshot)

BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  '<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
                  '<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">]>'
                  '<GoalState><Incarnation>1</Incarnation><Container><ContainerId>&lol2;'
                  '</ContainerId></Container></GoalState>')


class Case(unittest.TestCase):
    """Each test gets a fresh emulator; `provision()` runs the script against it,
    with --no-hostname; `on_a_temporary_root()` on a tree of its own (no root
    needed), and `in_private_host()` as root in a private UTS+mount namespace with a
    private /etc (so the hostname step really renames)."""

    emulator = {}

    def setUp(self):
        self.az = FakeAzure(**self.emulator)
        self.az.start()
        self.addCleanup(self.az.stop)

    def provision(self, *args, **kwargs):
        """Outside a private namespace the hostname step is always off: never
        rename the machine the tests run on."""
        if '--no-hostname' not in args:
            args = args + ('--no-hostname',)
        run = run_provisioner(self.az, *args, **kwargs)
        self.assertNotIn('Traceback', run.stderr, run)
        return run

    def on_a_temporary_root(self, *args, **kwargs):
        """(the TemporaryRoot, the script's run on it): as root its run starts with
        the hostname `hostname`, otherwise with this machine's."""
        host = TemporaryRoot(kwargs.pop('hostname', 'image-template'))
        self.addCleanup(host.cleanup)
        run = host.run('--wireserver', self.az.wireserver_addr, '--imds', self.az.imds_addr,
                       *args, **kwargs)
        self.assertNotIn('Traceback', run.stderr, run)
        return host, run

    def in_private_host(self, *args, **kwargs):
        require_root(self)
        host = PrivateHost(kwargs.pop('hostname', 'image-template'))
        self.addCleanup(host.cleanup)
        argv = [sys.executable, '-I', SCRIPT, '--wireserver', self.az.wireserver_addr,
                '--imds', self.az.imds_addr] + list(args)
        run = host.run(argv, **kwargs)
        self.assertNotIn('Traceback', run.stderr, run)
        return host, run

    def requests(self, server, path_part=''):
        return [r for r in self.az.requests if r['server'] == server and path_part in r['path']]

    def assert_ready(self, run, incarnation='1'):
        self.assertEqual(run.code, 0, run)
        ready = [h for h in self.az.health_reports if h['state'] == 'Ready']
        self.assertTrue(ready, self.az.health_reports)
        self.assertEqual(str(ready[-1]['incarnation']), incarnation)
        self.assertEqual(ready[-1]['status'], 200)
        self.assertRegex(run.stderr, r'azure-provisioning: Ready accepted for incarnation %s '
                         % incarnation)

    def assert_failure_reported(self, run, *description_parts):
        self.assertEqual(run.code, 1, run)
        failed = [h for h in self.az.health_reports if h['state'] == 'NotReady']
        self.assertEqual(len(failed), 1, self.az.health_reports)
        self.assertEqual(failed[0]['substatus'], 'ProvisioningFailed')
        self.assertEqual(failed[0]['status'], 200)
        description = failed[0]['description']
        self.assertRegex(description, r'^result=error\|reason=.+\|agent=azure-provisioning/')
        self.assertLessEqual(len(description), 512)
        for part in description_parts:
            self.assertIn(part, description)
        self.assertFalse([h for h in self.az.health_reports if h['state'] == 'Ready'])
        self.assertIn('reported ProvisioningFailed', run.stderr)
        return description


class HappyPath(Case):
    def test_imds_then_goal_state_then_ready(self):
        run = self.provision()
        self.assert_ready(run)
        imds, = self.requests('imds')
        self.assertEqual(imds['method'], 'GET')
        self.assertEqual(imds['path'], '/metadata/instance?api-version=2021-02-01')
        self.assertEqual(imds['headers'].get('metadata'), 'true')
        self.assertNotIn('x-forwarded-for', imds['headers'])
        goal_state, = self.requests('wireserver', 'goalstate')
        health, = self.requests('wireserver', 'health')
        for request in (goal_state, health):
            self.assertEqual(request['headers'].get('x-ms-version'), '2012-11-30')
            self.assertEqual(request['headers'].get('x-ms-agent-name'), 'azure-provisioning')
        self.assertEqual(health['method'], 'POST')
        self.assertEqual(health['headers'].get('content-type'), 'text/xml;charset=utf-8')
        self.assertLess(self.az.requests.index(imds), self.az.requests.index(goal_state))
        self.assertEqual(run.stdout, '')
        for line in run.stderr.splitlines():
            self.assertTrue(line.startswith('azure-provisioning: '), line)
        self.assertRegex(run.stderr, r'IMDS: vm \S+, computerName web-7 \(\d+ ms\)')

    def test_verbose_logs_every_exchange(self):
        run = self.provision('-v')
        self.assert_ready(run)
        self.assertRegex(run.stderr, r'GET http://127\.0\.0\.1:\d+/metadata/instance\?api-version='
                                     r'2021-02-01 -> 200 OK')
        self.assertRegex(run.stderr, r'POST http://127\.0\.0\.1:\d+/machine\?comp=health -> 200')

    def test_dead_proxy_in_the_environment_is_not_used(self):
        run = self.provision(env=DEAD_PROXY_ENV)
        self.assert_ready(run)
        self.assertEqual(len(self.requests('imds')), 1)


class Flaky(Case):
    emulator = dict(wire_faults=[503, 'reset', 500],
                    imds_faults=[500, ('status', 429, {'Retry-After': '1'}), 404, 410, 'reset'])

    def test_retries_through_errors(self):
        run = self.provision()
        self.assert_ready(run)
        statuses = [r['status'] for r in self.requests('imds')]
        self.assertEqual(statuses[-1], 200)
        self.assertGreaterEqual(len(statuses), 5)
        self.assertGreaterEqual(run.seconds, 1.0, 'Retry-After: 1 not honoured')
        self.assertNotIn('warning', run.stderr.lower())


class StaleIncarnation(Case):
    emulator = dict(bump_incarnation_after=1)

    def test_410_refetches_and_reposts(self):
        run = self.provision()
        self.assert_ready(run, incarnation='2')
        self.assertEqual([h['status'] for h in self.az.health_reports], [410, 200])
        self.assertEqual(len(self.requests('wireserver', 'goalstate')), 2)
        self.assertIn('410', run.stderr)


class NotReadyYet(Case):
    emulator = dict(no_role_instance_for=2)

    def test_goal_state_without_role_instance_is_retried(self):
        run = self.provision()
        self.assert_ready(run)
        self.assertEqual(len(self.requests('wireserver', 'goalstate')), 3)


class LateWireServer(Case):
    emulator = dict(wireserver_up_after=2.0)

    def test_ready_once_it_comes_up(self):
        run = self.provision()
        self.assert_ready(run)
        self.assertGreaterEqual(run.seconds, 2.0)
        self.assertEqual(len(run.stderr.splitlines()), len(set(run.stderr.splitlines())),
                         'a repeated retry line: ' + run.stderr)


class ApiVersionFallback(Case):
    emulator = dict(imds_api_versions=['2019-06-01'])

    def test_400_falls_back_to_2019_06_01(self):
        run = self.provision()
        self.assert_ready(run)
        self.assertEqual([r['path'] for r in self.requests('imds')],
                         ['/metadata/instance?api-version=2021-02-01',
                          '/metadata/instance?api-version=2019-06-01'])


class ImdsDown(Case):
    emulator = dict(imds_down=True)

    def test_failure_reported_inside_the_deadline(self):
        run = self.provision('--timeout', '4')
        self.assert_failure_reported(run, 'step=imds', 'IMDS', 'vm_id=unknown')
        self.assertLess(run.seconds, 4 + 1.5)     # the deadline plus interpreter start-up
        self.assertRegex(run.stderr, r'error: IMDS: .*gave up after \d+ attempts')


class ImdsRefuses(Case):
    emulator = dict(imds_faults=[403])

    def test_403_is_final_and_reported(self):
        run = self.provision('--timeout', '30')
        self.assert_failure_reported(run, 'HTTP 403')
        self.assertEqual(len(self.requests('imds')), 1)
        self.assertLess(run.seconds, 5)


class NoOsProfile(Case):
    emulator = dict(os_profile=False, computer_name='ignored', vm_name='from-name-7')

    def test_falls_back_to_compute_name(self):
        if is_root():
            host, run = self.in_private_host()
            self.assertEqual(run.hostname_after, 'from-name-7', run)
        else:
            run = self.provision('--dry-run', '--no-hostname')
        self.assertIn('computerName from-name-7', run.stderr)


class ScaleSetNameWithoutOsProfile(Case):
    emulator = dict(os_profile=False, vm_name='vmss_3')

    def test_invalid_resource_name_is_a_failure_not_a_guess(self):
        host, run = self.on_a_temporary_root('--timeout', '30')
        self.assertEqual(run.hostname_after, host.hostname)
        self.assertEqual(host.read('hostname'), host.hostname + '\n')
        self.assert_failure_reported(run, "invalid hostname 'vmss_3'", 'step=hostname')


class InvalidHostname(Case):
    emulator = dict(computer_name='bad_name!;$(reboot)')

    def test_reported_and_hostname_untouched(self):
        host, run = self.on_a_temporary_root('--timeout', '30')
        description = self.assert_failure_reported(run, 'invalid hostname', 'step=hostname')
        self.assertIn('bad_name!;$(reboot)', description)
        self.assertEqual(run.hostname_after, host.hostname)
        self.assertEqual(host.read('hostname'), host.hostname + '\n')
        self.assertIn('127.0.1.1\t%s\n' % host.hostname, host.read('hosts'))
        self.assertRegex(run.stderr, r"error: invalid hostname 'bad_name!;\$\(reboot\)'")


class HostnameChange(Case):
    emulator = dict(computer_name='web-7')

    def test_set_live_and_in_etc(self):
        host, run = self.in_private_host()
        self.assert_ready(run)
        self.assertEqual(run.hostname_after, 'web-7')
        self.assertEqual(host.read('hostname'), 'web-7\n')
        self.assertEqual(host.read('hosts'),
                         '127.0.0.1\tlocalhost\n127.0.1.1\tweb-7\n\n'
                         '# The following lines are desirable for IPv6 capable hosts\n'
                         '::1     localhost ip6-localhost ip6-loopback\n')
        self.assertRegex(run.stderr, r'hostname set to web-7 via sethostname, /etc/hosts '
                                     r'updated \(\d+ ms\)')
        # never touch the host's DHCP client from a test namespace
        self.assertIn("hostname: not published to DHCP (not the system's UTS namespace)",
                      run.stderr)
        # what was done first, then why it goes no further
        self.assertLess(run.stderr.index('hostname set to web-7'),
                        run.stderr.index('hostname: not published to DHCP'))
        leftovers = [n for n in os.listdir(host.etc) if n.endswith('.tmp')]
        self.assertEqual(leftovers, [])

    def test_read_only_etc_is_a_reported_failure(self):
        require_root(self)
        host = PrivateHost()
        self.addCleanup(host.cleanup)
        argv = ['sh', '-c', 'mount -o remount,bind,ro /etc && exec "$@"', 'sh', sys.executable,
                '-I', SCRIPT, '--wireserver', self.az.wireserver_addr, '--imds',
                self.az.imds_addr, '--timeout', '30']
        run = host.run(argv)
        self.assertNotIn('Traceback', run.stderr)
        self.assert_failure_reported(run, 'step=hostname', 'Read-only file system')

    def test_no_hostname_leaves_it_alone(self):
        host, run = self.on_a_temporary_root('--no-hostname')
        self.assert_ready(run)
        self.assertIn('hostname: left alone (--no-hostname)', run.stderr)
        self.assertEqual(run.hostname_after, host.hostname)
        self.assertEqual(host.read('hostname'), host.hostname + '\n')


class SameHostname(Case):
    """IMDS names the VM as it is named already: on a temporary root (no root needed)
    whose run starts with that name, and whose /etc/hostname says it."""

    def setUp(self):
        self.host = TemporaryRoot('web-7')
        self.addCleanup(self.host.cleanup)
        self.emulator = dict(computer_name=self.host.hostname)
        Case.setUp(self)

    def test_same_name_changes_nothing(self):
        files = [os.path.join(self.host.etc, n) for n in ('hostname', 'hosts')]
        before = tree_snapshot(self.host.etc), [os.stat(f).st_mtime_ns for f in files]
        run = self.host.run('--wireserver', self.az.wireserver_addr, '--imds', self.az.imds_addr)
        self.assert_ready(run)
        self.assertIn('hostname: already %s, nothing to change' % self.host.hostname, run.stderr)
        self.assertEqual(run.hostname_after, self.host.hostname)
        self.assertEqual((tree_snapshot(self.host.etc), [os.stat(f).st_mtime_ns for f in files]),
                         before)


class DryRun(Case):
    emulator = dict(computer_name='web-7', incarnation=5)

    def test_prints_and_changes_nothing(self):
        if is_root():
            host, run = self.in_private_host('--dry-run')
            self.assertEqual(run.hostname_after, 'image-template')
            self.assertEqual(host.read('hostname'), 'image-template\n')
            self.assertIn('would set hostname: web-7 (now image-template)', run.stdout)
        else:
            run = self.provision('--dry-run')
        self.assertEqual(run.code, 0, run)
        self.assertEqual(self.az.health_reports, [])
        self.assertFalse([r for r in self.az.requests if r['method'] != 'GET'])
        self.assertIn('<GoalStateIncarnation>5</GoalStateIncarnation>', run.stdout)
        self.assertIn('<State>Ready</State>', run.stdout)
        self.assertIn('would POST to http://%s/machine?comp=health:' % self.az.wireserver_addr,
                      run.stdout)


class DryRunOfAFailure(Case):
    emulator = dict(computer_name='-bad-')

    def test_prints_the_failure_report_it_would_send(self):
        host = TemporaryRoot('image-template')
        self.addCleanup(host.cleanup)
        before = tree_snapshot(host.dir)
        run = host.run('--wireserver', self.az.wireserver_addr, '--imds', self.az.imds_addr,
                       '--dry-run')
        self.assertEqual(run.code, 1, run)
        self.assertNotIn('Traceback', run.stderr, run)
        self.assertEqual(self.az.health_reports, [])
        self.assertFalse([r for r in self.az.requests if r['method'] != 'GET'])
        self.assertIn('<SubStatus>ProvisioningFailed</SubStatus>', run.stdout)
        self.assertIn('reason=invalid hostname', run.stdout)
        self.assertEqual(run.hostname_after, host.hostname)
        self.assertEqual(tree_snapshot(host.dir), before)     # nor a record: nothing done


class BadGoalStates(unittest.TestCase):
    def check(self, body, message):
        with FakeAzure(goal_state_body=body) as az:
            run = run_provisioner(az, '--no-hostname', '--timeout', '20')
            self.assertEqual(run.code, 1, run)
            self.assertNotIn('Traceback', run.stderr)
            self.assertEqual(az.health_reports, [])
            self.assertRegex(run.stderr, message)
            self.assertLess(run.seconds, 10)
            errors = [l for l in run.stderr.splitlines() if 'error:' in l]
            self.assertEqual(len(errors), 1, run.stderr)

    def test_garbage(self):
        self.check('<html><body>502 Bad Gateway', r'error: could not report Ready: goal state: '
                                                   r'not well-formed XML')

    def test_binary_garbage(self):
        self.check('\x00\x01\xfe garbage', r'not well-formed XML')

    def test_entity_bomb(self):
        self.check(BILLION_LAUGHS, r'declares a DOCTYPE or entities; refused')

    def test_wrong_root(self):
        self.check('<Goalstate><Incarnation>1</Incarnation></Goalstate>', r'not <GoalState>')

    def test_unknown_encoding(self):
        # expat raised LookupError, which ended the run as an "internal error"
        self.check('<?xml version="1.0" encoding="utf-Z"?><GoalState/>',
                   r'goal state: unreadable XML \(LookupError: unknown encoding: utf-Z\)')


class BadInstanceDocuments(unittest.TestCase):
    """Whatever IMDS answers, the failure is reported, with the reason, in seconds."""

    def check(self, body, *reason_parts):
        with FakeAzure(imds_body=body) as az:
            run = run_provisioner(az, '--no-hostname', '--timeout', '30')
            self.assertEqual(run.code, 1, run)
            self.assertNotIn('Traceback', run.stderr)
            self.assertNotIn('internal error', run.stderr)
            self.assertLess(run.seconds, 10, run)
            failed, = az.health_reports
        self.assertEqual((failed['state'], failed['substatus'], failed['status']),
                         ('NotReady', 'ProvisioningFailed', 200))
        self.assertIn('step=imds', failed['description'])
        for part in reason_parts:
            self.assertIn(part, failed['description'])
        self.assertEqual(len([l for l in run.stderr.splitlines() if ' error: ' in l]), 1, run)

    def test_deeply_nested(self):
        # json raised RecursionError: "internal error", nothing reported
        self.check('[' * 100000, 'IMDS: instance document is not valid (RecursionError')

    def test_truncated(self):
        # json's C scanner without json.decoder loaded raised SystemError on 3.11
        self.check('{"compute": {"name": "web', 'IMDS: instance document is not valid (')

    def test_not_an_object(self):
        for body in ('[]', '"compute"', '{"compute": []}', 'null'):
            with self.subTest(body=body):
                self.check(body, 'no "compute" object) (3 times)')


class Deadline(unittest.TestCase):
    def test_wireserver_never_up(self):
        with FakeAzure(wireserver_up_after=600) as az:
            # 4 s: under a loaded CI (two interpreters' suites side by side) 2 s left
            # IMDS too little of the deadline to reach the Ready step
            run = run_provisioner(az, '--no-hostname', '--timeout', '4')
            self.assertEqual(run.code, 1, run)
            self.assertLess(run.seconds, 4 + 1.5)
            self.assertRegex(run.stderr, r'error: could not report Ready: goal state: '
                                         r'Connection refused; gave up after \d+ attempts in '
                                         r'[\d.]+ s \(deadline\)')
            self.assertEqual(az.health_reports, [])


class Usage(unittest.TestCase):
    def test_bad_arguments_exit_2(self):
        for args in (['--wireserver', 'a:b:c'], ['--timeout', '-1'], ['--timeout', 'x'],
                     ['--bogus'], ['--imds', '1.2.3.4:99999']):
            with self.subTest(args=args):
                run = run_provisioner(None, *args)
                self.assertEqual(run.code, 2, run)
                self.assertNotIn('Traceback', run.stderr)
                self.assertRegex(run.stderr, r'azure-provisioning: error: ')

    def test_version_and_help(self):
        run = run_provisioner(None, '--version')
        self.assertEqual(run.code, 0)
        self.assertRegex(run.stdout, r'^azure-provisioning \d+\.\d+\.\d+$')
        run = run_provisioner(None, '--help')
        self.assertEqual(run.code, 0)
        for option in ('--wireserver', '--imds', '--timeout', '--no-hostname', '--dry-run',
                       '--verbose', 'Exit status'):
            self.assertIn(option, run.stdout)


if __name__ == '__main__':
    unittest.main()
