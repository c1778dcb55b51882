"""WireServer section: goal-state parsing on real payloads, the health report."""

import os
import re
import unittest
from xml.etree import ElementTree

import azure_provisioning as ap
from tests.support import DATA


def sample(name):
    with open(os.path.join(DATA, name), encoding='utf-8') as f:
        return f.read()


# (file, incarnation, container id, instance id): read off the documents by hand
GOAL_STATES = [
    ('walinuxagent__goal_state.xml', '1', 'c6d5526c-5ac2-4200-b6e2-56f2b70c5ab2',
     'b61f93d0-e1ed-40b2-b067-22c243233448.MachineRole_IN_0'),
    ('walinuxagent__goal_state_remote_access.xml', '1', 'c6d5526c-5ac2-4200-b6e2-56f2b70c5ab2',
     'b61f93d0-e1ed-40b2-b067-22c243233448.MachineRole_IN_0'),
    ('walinuxagent__GoalState-incarnation-3.xml', '3', '7db6fcb6-9911-4da4-8687',
     '00abac54-f426-4653-bcc6-0ed70cddda87._kvm03'),
    ('walinuxagent__hibernate-goal_state_2-GoalState.xml', '1',
     '6d8baa24-9f00-4f00-8aea-56fbaafee17e', 'baa0a165-f009-4e19-8baa-1d14f00c4b15._test-vm'),
    # the URLs inside still say incarnation=1: only <Incarnation> counts
    ('afterburn__mock_tests-GOALSTATE_BODY.xml', '42', 'a511aa6d-29e7-4f53-8788-55655dfe848f',
     'f6cd1d7ef1644557b9059345e5ba890c.lars-test-1'),
    ('guestproxyagent__goal_state-goal_state_test.xml', '16',
     '374188df-b0a2-456a-a7b2-83f28b18d36f',
     '7d2798bb72a0413d9a60b355277df726.TenantAdminApi.Worker_IN_0'),
    ('cloud-init__test_azure_helper-GOAL_STATE_TEMPLATE-rendered.xml', '1', 'MyContainerId',
     'MyInstanceId'),
]

BILLION_LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
                  '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>\n'
                  '<GoalState><Incarnation>&lol2;</Incarnation></GoalState>')


class GoalStateParsing(unittest.TestCase):
    def test_real_documents(self):
        for name, incarnation, container_id, instance_id in GOAL_STATES:
            with self.subTest(sample=name):
                goal_state = ap.parse_goal_state(sample(name))
                self.assertEqual((goal_state.incarnation, goal_state.container_id,
                                  goal_state.instance_id),
                                 (incarnation, container_id, instance_id))

    def test_no_role_instance_list_means_not_ready_yet(self):
        self.assertIsNone(ap.parse_goal_state(sample('walinuxagent__goal_state_noop.xml')))

    def test_padding_is_trimmed(self):
        text = ('\n\n  <?xml version="1.0"?>\n<GoalState>\n <Incarnation>\n  7 \n</Incarnation>'
                '<Container><ContainerId>\n c-1 </ContainerId><RoleInstanceList>'
                '<RoleInstance><InstanceId> i-1\n</InstanceId></RoleInstance>'
                '</RoleInstanceList></Container></GoalState>  \n')
        goal_state = ap.parse_goal_state(text)
        self.assertEqual((goal_state.incarnation, goal_state.container_id,
                          goal_state.instance_id), ('7', 'c-1', 'i-1'))

    def test_entities_and_doctype_are_refused(self):
        with self.assertRaisesRegex(ValueError, 'DOCTYPE'):
            ap.parse_goal_state(BILLION_LAUGHS)
        with self.assertRaisesRegex(ValueError, 'DOCTYPE'):
            ap.parse_goal_state('<!DOCTYPE x SYSTEM "file:///etc/passwd"><GoalState/>')
        with self.assertRaisesRegex(ValueError, 'undefined entity'):
            ap.parse_goal_state('<GoalState><Incarnation>&xxe;</Incarnation></GoalState>')

    def test_deep_nesting_is_refused_at_once(self):
        # found by tests/fuzz.py: every element cost the whole path, quadratic in depth
        import time
        started = time.monotonic()
        with self.assertRaisesRegex(ValueError, 'nested deeper than'):
            ap.parse_goal_state('<GoalState>' + '<a>' * 100000 + '</a>' * 100000
                                + '</GoalState>')
        self.assertLess(time.monotonic() - started, 0.5)
        for name in ('walinuxagent__goal_state.xml', 'walinuxagent__GoalState-incarnation-3.xml'):
            self.assertIsNotNone(ap.parse_goal_state(sample(name)))

    def test_incarnation_of_other_digits_is_refused(self):
        for incarnation in ('\xb2', '\u0663', '-1', '1.0', ''):
            with self.subTest(incarnation=incarnation):
                with self.assertRaisesRegex(ValueError, 'Incarnation'):
                    ap.parse_goal_state('<GoalState><Incarnation>%s</Incarnation></GoalState>'
                                        % incarnation)

    def test_unknown_encoding_is_a_value_error(self):
        with self.assertRaisesRegex(ValueError, 'LookupError'):
            ap.parse_goal_state('<?xml version="1.0" encoding="utf-Z"?><GoalState/>')

    def test_garbage_and_wrong_documents(self):
        for text, message in [('<html>502 Bad Gateway', 'well-formed'),
                              ('', 'well-formed'),
                              ('\x00\xff<<', 'well-formed'),
                              (sample('azure-init__goalstate-GOALSTATE_STR.xml'), 'Goalstate'),
                              ('<GoalState><Incarnation>x</Incarnation></GoalState>', 'number')]:
            with self.subTest(text=text[:30]):
                with self.assertRaisesRegex(ValueError, message):
                    ap.parse_goal_state(text)


def health_fields(xml):
    root = ElementTree.fromstring(xml)
    role = 'Container/RoleInstanceList/Role/'
    return {
        'incarnation': root.findtext('GoalStateIncarnation'),
        'container_id': root.findtext('Container/ContainerId'),
        'instance_id': root.findtext(role + 'InstanceId'),
        'state': root.findtext(role + 'Health/State'),
        'substatus': root.findtext(role + 'Health/Details/SubStatus'),
        'description': root.findtext(role + 'Health/Details/Description'),
    }


class HealthReport(unittest.TestCase):
    # not '1': the article's sample hard-codes 1, so 1 would not show a report that ignores
    # the goal state's incarnation
    goal_state = ap.GoalState('17', 'c6d5526c-5ac2-4200-b6e2-56f2b70c5ab2',
                              'b61f93d0-e1ed-40b2-b067-22c243233448.MachineRole_IN_0')

    def test_ready_matches_what_walinuxagent_sends(self):
        ours = health_fields(ap.build_health_report(self.goal_state))
        theirs = health_fields(sample('walinuxagent__wire-health_ready-rendered.xml'))
        self.assertEqual(ours.pop('incarnation'), '17')
        self.assertEqual(theirs.pop('incarnation'), '1')
        self.assertEqual(ours, theirs)
        self.assertEqual(ours['state'], 'Ready')

    def test_failure_has_the_shape_walinuxagent_sends(self):
        xml = ap.build_health_report(self.goal_state, 'NotReady', 'ProvisioningFailed', 'x')
        ours = health_fields(xml)
        theirs = health_fields(sample(
            'walinuxagent__wire-health_notready_provisioningfailed-rendered.xml'))
        self.assertEqual(set(k for k in ours if ours[k]), set(k for k in theirs if theirs[k]))
        self.assertEqual((ours['state'], ours['substatus'], ours['description']),
                         ('NotReady', 'ProvisioningFailed', 'x'))

    def test_every_field_is_escaped(self):
        nasty = ap.GoalState('23', 'c<&>"', "i'</InstanceId>")
        description = 'reason=<b>&amp; "quoted" ]]> </Description>'
        fields = health_fields(ap.build_health_report(nasty, 'NotReady', 'ProvisioningFailed',
                                                      description))
        self.assertEqual((fields['incarnation'], fields['container_id'], fields['instance_id'],
                          fields['description']), ('23', 'c<&>"', "i'</InstanceId>", description))

    def test_text_xml_forbids_is_cleaned(self):
        # C0 controls (a hook's colours, a NUL), U+FFFE/U+FFFF and lone surrogates would
        # make the report invalid XML: the WireServer answers 400 and the VM times out
        description = ('\x1b[31mERROR\x1b[0m: disk \x00\x07\x08\x0b\x0c\x1f missing '
                       '\ufffe \uffff \ud800 \udfff tab\tend \U0001F600')
        xml = ap.build_health_report(ap.GoalState('5', 'c\x01', 'i\udc80'), 'NotReady',
                                     'ProvisioningFailed', description)
        fields = health_fields(xml.encode('utf-8'))
        self.assertEqual(fields['description'],
                         'ERROR: disk \ufffd\ufffd\ufffd\ufffd\ufffd\ufffd missing '
                         '\ufffd \ufffd \ufffd \ufffd tab\tend \U0001F600')
        self.assertEqual((fields['container_id'], fields['instance_id']), ('c\ufffd', 'i\ufffd'))
        # and the pipe-separated report (KVP's too) carries the same clean text
        text = ap.report_description('error', 'v\x00m', 'hooks', description)
        self.assertIsNone(ap.NOT_XML_TEXT.search(text))
        self.assertIn('reason=ERROR: disk', text)
        self.assertIn('vm_id=v\ufffdm', text)
        ap.kvp_record('PROVISIONING_REPORT', text)     # encodes: no lone surrogate left


    def test_the_pattern_is_xml_1_0s_char_production_negated(self):
        # Char ::= #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]
        def allowed(point):
            return (point in (0x9, 0xA, 0xD) or 0x20 <= point <= 0xD7FF
                    or 0xE000 <= point <= 0xFFFD or 0x10000 <= point <= 0x10FFFF)
        every = ''.join(map(chr, range(0x110000)))
        found = [m.start() for m in ap.NOT_XML_TEXT.finditer(every)]
        self.assertEqual(found, [point for point in range(0x110000) if not allowed(point)])


class FailureDescription(unittest.TestCase):
    def test_azure_format(self):
        text = ap.report_description('error', 'vm-1', 'hostname', 'invalid hostname')
        self.assertRegex(text, r'^result=error\|reason=invalid hostname\|agent=azure-provisioning/'
                               + re.escape(ap.VERSION) + r'\|step=hostname\|vm_id=vm-1\|'
                               r'timestamp=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\|'
                               r'documentation_url=https://aka\.ms/linuxprovisioningerror$')

    def test_long_reason_is_cut_to_512_and_keeps_the_tail_fields(self):
        text = ap.report_description('error', '', 'imds', 'x' * 5000)
        self.assertEqual(len(text), ap.MAX_DESCRIPTION)
        self.assertIn('...|agent=', text)
        self.assertTrue(text.endswith('documentation_url=https://aka.ms/linuxprovisioningerror'))
        self.assertIn('vm_id=unknown', text)

    def test_pipes_and_newlines_cannot_forge_fields(self):
        text = ap.report_description('error', 'v|x', 'imds', 'a|vm_id=evil\nb')
        self.assertEqual(text.count('|'), 6)
        self.assertNotIn('\n', text)


if __name__ == '__main__':
    unittest.main()
