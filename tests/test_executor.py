"""The executor, with steps of the tests' own against the emulator on 127.0.0.1 and
a temporary root (no root needed): actions in order, the facts they establish
merged, a non-fatal failure a warning, the first fatal error of any type the one
failure (KVP, NotReady, the record), facts a failing action carries kept, and a
dry run that prints every action and performs none."""

import io
import json
import os
import unittest

import azure_provisioning as ap
from tests.fake_azure import FakeAzure
from tests.support import root_with_kvp_pool
from tests.test_ready_post import health_posts, kvp_values
from tests.test_transport import QuietLog


class Executor(unittest.TestCase):
    def setUp(self):
        self.root, self.pool = root_with_kvp_pool(self, 'azp-executor-')
        self.done = []      # what the actions did, in order

    def act(self, name, result=None, error=None):
        """An action that notes it ran, then returns `result` or raises `error`."""
        def do():
            self.done.append(name)
            if error is not None:
                raise error
            return result
        return do

    def execute(self, steps, dry_run=False, **emulator):
        """(exit code, stdout, log lines, the record or None) of steps then Ready; a
        step's planner may be one function or a tuple of them."""
        steps = tuple((name, plan if isinstance(plan, tuple) else (plan,), done)
                      for name, plan, done in steps)
        with FakeAzure(**emulator) as az:
            options = ap.Options(root=self.root, dry_run=dry_run, timeout=20,
                                 wireserver=ap.parse_address(az.wireserver_addr))
            log, out = QuietLog(), io.StringIO()
            system = ap.System(self.root, ap.Deadline(20, reserve=5), log)
            code = ap.execute(steps + (('ready', (ap.plan_ready,), None),),
                              ap.first_facts(options)._replace(vm_id='vm-1'), system, out)
            self.posts = health_posts(az)
            self.reports = az.health_reports
        record = os.path.join(self.root, ap.STATE_FILE.lstrip('/'))
        state = None
        if os.path.exists(record):
            with open(record) as f:
                state = json.load(f)
        return code, out.getvalue(), log.lines, state

    def test_actions_in_order_their_facts_merged_a_non_fatal_failure_a_warning(self):
        def plan(facts, system):
            return ap.with_warning(facts, 'planned warning'), [
                ap.Action('first', self.act('first', {'hostname': 'web-7'})),
                ap.Action('second', self.act('second', error=OSError(5, 'I/O error')),
                          fatal=False),
                ap.Action('third', self.act('third', {'warnings': ('third warned',)}))]
        code, out, lines, state = self.execute([('a', plan, None)])
        self.assertEqual(code, 0, lines)
        self.assertEqual(self.done, ['first', 'second', 'third'])
        self.assertEqual([line for line in lines if line.startswith('warning:')],
                         ['warning: planned warning', 'warning: I/O error',
                          'warning: third warned'])
        self.assertEqual((state['result'], state['hostname']), ('provisioned', 'web-7'))
        self.assertEqual([step['step'] for step in state['steps']], ['a', 'ready'])
        self.assertEqual([report['state'] for report in self.reports], ['Ready'])
        report, = kvp_values(self.pool)
        self.assertRegex(report, r'^result=success\|agent=[^|]+\|warning=planned warning\|'
                                 r'warning=I/O error\|warning=third warned\|vm_id=vm-1\|')
        self.assertEqual(out, '')

    def test_the_first_fatal_error_of_any_type_is_the_failure(self):
        def failing(facts, system):
            return facts, [ap.Action('breaks', self.act('breaks', error=KeyError('boom'))),
                           ap.Action('never', self.act('never'))]

        def later(facts, system):
            self.done.append('later planned')
            return facts, []
        code, out, lines, state = self.execute([('b', failing, None), ('c', later, None)])
        self.assertEqual(code, 1)
        self.assertEqual(self.done, ['breaks'])
        self.assertEqual([line for line in lines if line.startswith('error:')],
                         ["error: b: unexpected KeyError: 'boom'"])
        report, = self.reports
        self.assertEqual((report['state'], report['substatus']),
                         ('NotReady', 'ProvisioningFailed'))
        self.assertRegex(report['description'], r"^result=error\|reason=b: unexpected "
                                                 r"KeyError: 'boom'\|agent=[^|]+\|step=b\|")
        self.assertEqual(kvp_values(self.pool), [report['description']])
        self.assertEqual((state['result'], state['step'], state['reason']),
                         ('failed', 'b', "b: unexpected KeyError: 'boom'"))
        self.assertEqual([step['step'] for step in state['steps']], ['b'])

    def test_a_planner_that_fails_is_the_failure_too(self):
        def refuses(facts, system):
            raise ap.ProvisioningError('refused at the plan')
        code, _, lines, state = self.execute([('d', refuses, None)])
        self.assertEqual(code, 1)
        self.assertEqual((state['step'], state['reason']), ('d', 'refused at the plan'))
        self.assertEqual([report['state'] for report in self.reports], ['NotReady'])

    def test_what_a_failing_action_made_is_recorded(self):
        def makes_then_fails(facts, system):
            failure = ap.with_facts(ap.ProvisioningError('user: locking failed'),
                                    {'user_created': 'alice', 'user_creating': None})
            return facts, [ap.Action('make alice', self.act('make alice', error=failure))]
        code, _, _, state = self.execute([('user', makes_then_fails, None)])
        self.assertEqual(code, 1)
        self.assertEqual((state['admin_user_created'], state['admin_user_creating']),
                         ('alice', None))

    def test_a_refused_ready_is_not_followed_by_not_ready(self):
        code, _, lines, state = self.execute([], health_faults=[400])
        self.assertEqual(code, 1)
        self.assertEqual([post['status'] for post in self.posts], [400])
        self.assertEqual((state['result'], state['step']), ('failed', 'ready'))
        self.assertRegex(state['reason'], r'^could not report Ready: health report: '
                                          r'WireServer answered HTTP 400')
        self.assertRegex(kvp_values(self.pool)[0], r'^result=error\|reason=could not report '
                                                   r'Ready: ')
        # timed like any step that failed
        self.assertEqual([step['step'] for step in state['steps']], ['ready'])

    def test_a_steps_second_planner_plans_after_the_first_ones_actions(self):
        def renames(facts, system):
            return facts, [ap.Action('rename', self.act('rename', {'hostname': 'web-7'}))]

        def publishes(facts, system):
            self.done.append('planned with %s' % facts.hostname)
            return ap.with_warning(facts, 'not published'), [
                ap.Action('publish', self.act('publish'))]
        code, _, lines, state = self.execute([('f', (renames, publishes), None)])
        self.assertEqual(code, 0, lines)
        self.assertEqual(self.done, ['rename', 'planned with web-7', 'publish'])
        self.assertEqual([step['step'] for step in state['steps']], ['f', 'ready'])
        self.assertEqual([line for line in lines if line.startswith('warning:')],
                         ['warning: not published'])

    def test_a_dry_run_prints_every_action_and_performs_none(self):
        def plan(facts, system):
            return facts, [ap.Action('change the\nmachine', self.act('change'))]
        code, out, lines, state = self.execute([('e', plan, None)], dry_run=True)
        self.assertEqual(code, 0)
        self.assertEqual(self.done, [])
        printed = out.splitlines()
        self.assertEqual(printed[0], 'would change the\ufffdmachine')
        self.assertTrue(printed[1].startswith('would POST to http://127.0.0.1:'), printed)
        self.assertIn('<State>Ready</State>', printed[1])
        self.assertTrue(printed[2].startswith('would append to %s: PROVISIONING_REPORT='
                                              'result=success|' % self.pool), printed)
        self.assertEqual(len(printed), 3, printed)
        self.assertEqual((self.posts, state, kvp_values(self.pool)), ([], None, []))
        self.assertIn('dry run: nothing changed, nothing posted', lines[-1])


if __name__ == '__main__':
    unittest.main()
