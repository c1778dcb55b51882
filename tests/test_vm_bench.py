"""tests/vm_bench.py's pure functions (no QEMU, milliseconds): systemctl show parsing,
active times, medians and ratios, step shares, the Ready times, one boot's figures."""

import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import vm_bench as vb     # noqa: E402

ONESHOT_SHOW = """Id=azure-provisioning.service
Type=oneshot
ActiveState=inactive
SubState=dead
Result=success
ExecMainStatus=0
InactiveExitTimestampMonotonic=9000000
ActiveEnterTimestampMonotonic=0
ActiveExitTimestampMonotonic=0
InactiveEnterTimestampMonotonic=10750000
ExecMainStartTimestampMonotonic=9010000
ExecMainExitTimestampMonotonic=10600000
"""

ARTICLE_SHOW = ONESHOT_SHOW.replace('azure-provisioning', 'article-provisioning').replace(
    '9000000', '10800000').replace('10750000', '13800000')


class ParseShow(unittest.TestCase):

    def test_key_values(self):
        props = vb.parse_show(ONESHOT_SHOW)
        self.assertEqual(props['Type'], 'oneshot')
        self.assertEqual(props['InactiveEnterTimestampMonotonic'], '10750000')

    def test_value_with_equals_and_junk_lines(self):
        props = vb.parse_show('ExecStart={ path=/bin/x ; argv[]=/bin/x a=b }\nnoise\n\n')
        self.assertEqual(props, {'ExecStart': '{ path=/bin/x ; argv[]=/bin/x a=b }'})

    def test_empty(self):
        self.assertEqual(vb.parse_show(''), {})
        self.assertEqual(vb.parse_show(None), {})


class ActiveSeconds(unittest.TestCase):

    def test_oneshot_uses_inactive_exit_to_inactive_enter(self):
        self.assertAlmostEqual(vb.active_seconds(vb.parse_show(ONESHOT_SHOW)), 1.75)

    def test_other_type_uses_exec_main(self):
        props = vb.parse_show(ONESHOT_SHOW.replace('Type=oneshot', 'Type=simple'))
        self.assertAlmostEqual(vb.active_seconds(props), 1.59)

    def test_falls_back_to_the_other_pair(self):
        props = vb.parse_show(ONESHOT_SHOW.replace('InactiveEnterTimestampMonotonic=10750000',
                                                   'InactiveEnterTimestampMonotonic=0'))
        self.assertAlmostEqual(vb.active_seconds(props), 1.59)

    def test_never_ran_or_garbage(self):
        self.assertIsNone(vb.active_seconds({'Type': 'oneshot'}))
        self.assertIsNone(vb.active_seconds({'InactiveExitTimestampMonotonic': 'x',
                                             'InactiveEnterTimestampMonotonic': '5'}))
        # an end before the start (a later run's start, an earlier run's end)
        self.assertIsNone(vb.active_seconds({'InactiveExitTimestampMonotonic': '9',
                                             'InactiveEnterTimestampMonotonic': '5'}))


class MedianRatio(unittest.TestCase):

    def test_median_skips_none(self):
        self.assertEqual(vb.median([3.0, None, 1.0, 2.0]), 2.0)
        self.assertEqual(vb.median([1.0, 2.0]), 1.5)
        self.assertIsNone(vb.median([None]))
        self.assertIsNone(vb.median([]))

    def test_ratio(self):
        self.assertAlmostEqual(vb.ratio(1.75, 3.0), 1.75 / 3.0)
        self.assertIsNone(vb.ratio(None, 3.0))
        self.assertIsNone(vb.ratio(1.0, None))
        self.assertIsNone(vb.ratio(1.0, 0.0))

    def test_verdict(self):
        self.assertEqual(vb.verdict(0.58), 'MET')
        self.assertEqual(vb.verdict(0.6), 'MET')
        self.assertEqual(vb.verdict(0.61), 'MISSED')
        self.assertEqual(vb.verdict(None), 'no figure')

    def test_spread_and_fmt(self):
        self.assertEqual(vb.fmt(None), '-')
        self.assertEqual(vb.fmt(1.23456), '1.235 s')
        self.assertEqual(vb.spread([2.0, 1.0, 3.0], '', 1), '2.0 (1.0-3.0)')


class Steps(unittest.TestCase):
    STATE = json.dumps({'result': 'provisioned', 'steps': [
        {'step': 'imds', 'seconds': 0.06}, {'step': 'media', 'seconds': 0.01},
        {'step': 'hostname', 'seconds': 0.9}, {'step': 'bad', 'seconds': 'x'},
        {'step': 'ready', 'seconds': 0.03}]})

    def test_parse_state_steps(self):
        self.assertEqual(vb.parse_state_steps(self.STATE),
                         [('imds', 0.06), ('media', 0.01), ('hostname', 0.9), ('ready', 0.03)])
        self.assertEqual(vb.parse_state_steps('not json'), [])
        self.assertEqual(vb.parse_state_steps(None), [])
        self.assertEqual(vb.parse_state_steps('[1]'), [])

    def test_shares_add_up_with_the_rest(self):
        rows = vb.step_shares(vb.parse_state_steps(self.STATE), 2.0)
        self.assertEqual([r[0] for r in rows], ['imds', 'media', 'hostname', 'ready',
                                                'outside the steps'])
        self.assertAlmostEqual(rows[-1][1], 1.0)
        self.assertAlmostEqual(sum(r[2] for r in rows), 1.0)
        self.assertEqual(vb.step_shares([('imds', 1.0)], None), [])

    def test_median_shares(self):
        a = vb.step_shares([('imds', 0.1), ('ready', 0.1)], 1.0)
        b = vb.step_shares([('imds', 0.3), ('identity', 0.5), ('ready', 0.1)], 1.0)
        c = vb.step_shares([('imds', 0.2), ('ready', 0.1)], 2.0)
        got = dict((n, (s, f)) for n, s, f in vb.median_shares([a, b, c]))
        self.assertAlmostEqual(got['imds'][0], 0.2)
        self.assertAlmostEqual(got['imds'][1], 0.1)
        self.assertAlmostEqual(got['identity'][0], 0.5)     # only where it happened
        self.assertEqual([n for n, _, _ in vb.median_shares([a, b])],
                         ['imds', 'ready', 'outside the steps', 'identity'])


def request(agent, t, status=200, body='<Health><State>Ready</State></Health>'):
    return {'server': 'wireserver', 'method': 'POST', 'path': '/machine?comp=health',
            'status': status, 'time': t, 'headers': {'x-ms-agent-name': agent}, 'body': body}


class ReadyTimes(unittest.TestCase):

    def test_ready_after_per_agent(self):
        reqs = [{'server': 'wireserver', 'method': 'GET', 'path': '/machine?comp=goalstate',
                 'status': 200, 'time': 101.0, 'headers': {}, 'body': ''},
                request('azure-provisioning', 105.0, status=410),
                request('azure-provisioning', 106.5),
                request('custom-provisioning', 108.0)]
        self.assertAlmostEqual(vb.ready_after(reqs, 100.0, 'azure-provisioning'), 6.5)
        self.assertAlmostEqual(vb.ready_after(reqs, 100.0, 'custom-provisioning'), 8.0)
        self.assertIsNone(vb.ready_after(reqs, 100.0, 'nobody'))

    def test_ready_monotonic(self):
        journal = [{'unit': 'azure-provisioning.service', 'monotonic': 5,
                    'message': 'azure-provisioning: IMDS: ...'},
                   {'unit': 'article-provisioning.service', 'monotonic': 6,
                    'message': 'Ready accepted'},
                   {'unit': 'azure-provisioning.service', 'monotonic': 7,
                    'message': 'azure-provisioning: Ready accepted for incarnation 1'}]
        self.assertEqual(vb.ready_monotonic(journal), 7)
        self.assertIsNone(vb.ready_monotonic([]))


class BootFigures(unittest.TestCase):

    def facts(self):
        online = 'ActiveEnterTimestampMonotonic=8500000\n'
        return {'show': {vb.OURS: ONESHOT_SHOW, vb.ARTICLE: ARTICLE_SHOW,
                         'network-online.target': online},
                'state': Steps.STATE, 'sshd': False, 'hostname': 'vm-bench-7b',
                'journal': [{'unit': vb.OURS, 'monotonic': 10500000,
                             'message': 'azure-provisioning: Ready accepted for incarnation 1'}]}

    def test_figures(self):
        reqs = [request('azure-provisioning', 112.0), request('custom-provisioning', 115.0)]
        fig = vb.boot_figures(self.facts(), reqs, 100.0)
        self.assertAlmostEqual(fig['ours'], 1.75)
        self.assertAlmostEqual(fig['article'], 3.0)
        self.assertAlmostEqual(fig['ratio'], 1.75 / 3.0)
        self.assertAlmostEqual(fig['online_to_ready'], 2.0)
        self.assertAlmostEqual(fig['online_to_start'], 0.5)
        self.assertAlmostEqual(fig['qemu_to_ready'], 12.0)
        self.assertEqual(fig['problems'], [])
        self.assertEqual(fig['shares'][-1][0], 'outside the steps')

    def test_problems_named(self):
        facts = self.facts()
        facts['show'][vb.ARTICLE] = ARTICLE_SHOW.replace('Result=success', 'Result=exit-code')
        facts['state'] = None
        fig = vb.boot_figures(facts, [], 100.0)
        text = ' '.join(fig['problems'])
        self.assertIn('article-provisioning.service: Result=exit-code', text)
        self.assertIn('no state.json', text)
        self.assertIn('no Ready from ours', text)
        self.assertEqual(vb.boot_figures(None, [], 0.0)['ours'], None)

    def test_report_renders(self):
        fig = vb.boot_figures(self.facts(), [request('azure-provisioning', 112.0),
                                             request('custom-provisioning', 115.0)], 100.0)
        fig['ok'], fig['others'] = True, 0
        s = vb.summarize({'nosshd': [fig, fig, fig], 'sshd': [fig]})
        text = '\n'.join(vb.suite_table('bookworm', s))
        self.assertIn('target ratio <= 0.6 (no sshd, median): MET (0.583)', text)
        md = vb.markdown_report([('bookworm', s)], ['context'])
        self.assertIn('| bookworm | 3+1 | 1.750 | 3.000 | 0.583 | MET |', md)


class Options(unittest.TestCase):
    """--quick (what .ci/run runs) is one suite and fewer boots; the full set is the
    default, and --suite/--boots still choose."""

    def test_the_full_set_by_default(self):
        args = vb.parse_args([])
        self.assertEqual(args.suites, ['bullseye', 'bookworm', 'trixie'])
        self.assertEqual(args.boots, 3)

    def test_quick_is_one_suite_and_two_boots(self):
        args = vb.parse_args(['--quick'])
        self.assertEqual(args.suites, ['bookworm'])
        self.assertEqual(args.boots, 2)

    def test_quick_with_a_suite_and_boots_given(self):
        args = vb.parse_args(['--quick', '--suite', 'trixie', '--boots', '1'])
        self.assertEqual(args.suites, ['trixie'])
        self.assertEqual(args.boots, 1)


if __name__ == '__main__':
    unittest.main()
