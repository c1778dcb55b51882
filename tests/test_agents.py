"""The emulator, checked by the real agents (issue #15).

Debian's cloud-init and waagent run their own WireServer client code against
tests/fake_azure.py (tests/agents.py fetches, unpacks and drives them): the
emulator must serve their goal-state fetches and accept their health reports, and
our health report (azure_provisioning.report_health against the same emulator) is
compared with theirs element by element: local names, order, namespaces,
attributes and text.  Where the agents disagree with the emulator, the emulator
is taken to be wrong.

Skipped, with the reason printed, where `apt-get download` or dpkg-deb cannot be
had (no Debian tools, no network, no package lists).  The first run downloads
about 2 MB into the cache (tests/agents.py cache_dir()); later runs reuse it.
"""

import http.client
import io
import os
import re
import shutil
import tempfile
import unittest
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import azure_provisioning as ap
from tests import agents
from tests.fake_azure import FakeAzure
from tests.support import is_root, run_command, skip

RUN_TIMEOUT = 90        # seconds for one driver run (its own alarm is at 45)

# What our provisioner puts in a failure report: the pipe-separated form, with the
# characters XML must escape.  Shorter than cloud-init's 512-character cut.
DESCRIPTION = ('result=error|reason=IMDS: no <osProfile> & "no key"|'
               'agent=azure-provisioning/0.1.0|vm_id=02aab8a4-74ef-476e-8182-f6d2ba4166a6|'
               'timestamp=2024-05-01T10:00:00Z|'
               'documentation_url=https://aka.ms/linuxprovisioningerror')

# Every agent says the same of these; compared as text
XML_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>'
XSI = 'http://www.w3.org/2001/XMLSchema-instance'
XSD = 'http://www.w3.org/2001/XMLSchema'


def unpadded(goal_state):
    """The goal state with no whitespace around the text of its URL elements."""
    return re.sub(r'>\s*(http://[^<]*?)\s*<', r'>\1<', goal_state)


def padded(goal_state):
    """cloud-init's test template's shape: each URL on a line of its own."""
    return re.sub(r'>(http://[^<]*)<', r'>\n            \1\n          <', unpadded(goal_state))


def outline(raw):
    """A health report as [(path, namespace declarations, attributes, text)], one per
    element in document order; whitespace-only text is None (indentation)."""
    declared, rows, stack, open_rows = [], [], [], []
    for event, item in ElementTree.iterparse(io.BytesIO(raw), events=('start-ns', 'start', 'end')):
        if event == 'start-ns':
            declared.append(item)
        elif event == 'start':
            stack.append(item.tag)
            rows.append(['/'.join(stack), list(declared), sorted(item.attrib.items()), None])
            open_rows.append(rows[-1])
            declared = []
        else:
            open_rows.pop()[3] = (item.text or '').strip() or None
            stack.pop()
    return [tuple(row[:2]) + (tuple(row[2]), row[3]) for row in rows]


def health_bodies(az):
    return [r for r in az.requests if r['path'] == '/machine?comp=health']


class Agents(unittest.TestCase):
    trees = {}          # agent -> AgentTree, or Unavailable
    runs = {}           # (agent, scenario) -> (driver result, its stopped emulator)

    @classmethod
    def tree(cls, test, agent):
        if agent not in cls.trees:
            try:
                cls.trees[agent] = agents.prepare(agent)
            except agents.Unavailable as exc:
                cls.trees[agent] = exc
        tree = cls.trees[agent]
        if isinstance(tree, agents.Unavailable):
            skip(test, 'cannot have Debian\'s %s: %s' % (agent, tree))
        return tree

    def drive(self, agent, scenario, az, description=None):
        """The driver's result for one scenario against az; the driver's output is
        in the message of any assertion that fails on it."""
        tree = self.tree(self, agent)
        workdir = tempfile.mkdtemp(prefix='azp-agent-')
        self.addCleanup(shutil.rmtree, workdir, True)
        run = run_command(tree.command(scenario, az.wireserver_addr, workdir, description),
                          env=tree.environment(workdir), timeout=RUN_TIMEOUT)
        result = agents.parse_result(run.stdout)
        self.assertIsNotNone(result, 'the driver printed no result\n%r' % run)
        result['run'] = run
        return result

    def scenario(self, agent, scenario):
        """(driver result, emulator) for one scenario against an emulator of its
        own, run once for all the tests that look at it."""
        key = (agent, scenario)
        if key not in self.runs:
            az = FakeAzure(computer_name='web-7', incarnation=3)
            try:
                result = self.run_scenario(agent, scenario, az)
            finally:
                az.stop()
            self.runs[key] = (result, az)
        result, az = self.runs[key]
        self.assertTrue(result['ok'], '%s %s failed: %s\n%r' % (agent, scenario, result['error'],
                                                                result['run']))
        return result, az

    def run_scenario(self, agent, scenario, az):
        # the emulator serves its URLs unpadded, as Azure does (test_waagent_takes_urls_verbatim)
        self.assertEqual(unpadded(az.goal_state_document()), az.goal_state_document())
        return self.drive(agent, scenario, az, DESCRIPTION if scenario == 'failure' else None)

    def ours(self, state, substatus=None, description=None, goal_state_body=None):
        """Our health report as our provisioner posts it, and the emulator's record."""
        with FakeAzure(computer_name='web-7', incarnation=3) as az:
            if goal_state_body is not None:
                az.goal_state_body = goal_state_body
            ap.report_health(ap.parse_address(az.wireserver_addr), ap.Deadline(20),
                             ap.Log(stream=io.StringIO()), state=state, substatus=substatus,
                             description=description)
        bodies = health_bodies(az)
        self.assertEqual([r['status'] for r in bodies], [200])
        return bodies[0], az

    # -- what every agent run must show -------------------------------------

    def check_contained(self, result):
        """Every connection the agent made went to the emulator, nothing was refused
        (so nothing else was attempted), and it ran only the allowed programs."""
        self.assertEqual(result['refused'], [], 'the guard refused something')
        self.assertTrue(result['connections'])
        for asked, went in result['connections']:
            self.assertTrue(went.startswith('127.0.0.1:'), (asked, went))
            self.assertIn(asked, (went, '%s:%d' % (agents.WIRESERVER_IP, agents.WIRESERVER_PORT)))

    def check_goal_state(self, result, az):
        self.check_contained(result)
        # the agent found what the emulator serves
        self.assertEqual(result['goal_states'], [{'incarnation': '3',
                                                  'container_id': az.container_id,
                                                  'instance_id': az.instance_id}])
        fetches = [r for r in az.requests if 'comp=goalstate' in r['path']]
        self.assertEqual([(r['method'], r['path'], r['status']) for r in fetches],
                         [('GET', '/machine/?comp=goalstate', 200)])
        self.assertEqual(fetches[0]['headers']['x-ms-version'], '2012-11-30')
        # the agents ask for 168.63.129.16 (redirected underneath them)
        self.assertEqual(fetches[0]['headers']['host'], agents.WIRESERVER_IP)
        # nothing the agent asked for was refused or unknown to the emulator
        self.assertEqual([(r['method'], r['path'], r['status']) for r in az.requests
                          if r['status'] != 200], [])

    def check_report(self, result, az, state, substatus=None, description=None):
        self.check_goal_state(result, az)
        self.assertEqual(len(result['documents']), 1, result['documents'])
        reports = az.health_reports
        self.assertEqual(len(reports), 1, reports)
        report = reports[0]
        self.assertEqual(report['status'], 200, report)
        self.assertEqual((report['state'], report['substatus'], report['description']),
                         (state, substatus, description))
        self.assertEqual((report['incarnation'], report['container_id'], report['instance_id']),
                         (3, az.container_id, az.instance_id))
        # the emulator recorded the very document the agent built
        body = health_bodies(az)[0]['body']
        self.assertEqual(body, result['documents'][0])
        return health_bodies(az)[0]


class CloudInit(Agents):
    """cloudinit.sources.helpers.azure of Debian's cloud-init package."""

    def test_goal_state_fetch_served(self):
        result, az = self.scenario('cloud-init', 'ready')
        self.check_goal_state(result, az)
        # cloud-init fetches the goal state alone (no versions, no linked documents
        # when it has no certificate to ask for)
        self.assertEqual([r['path'] for r in az.requests],
                         ['/machine/?comp=goalstate', '/machine?comp=health'])

    def test_ready_accepted(self):
        result, az = self.scenario('cloud-init', 'ready')
        self.check_report(result, az, 'Ready')
        self.assertTrue(az.ready_accepted())

    def test_provisioning_failed_accepted(self):
        result, az = self.scenario('cloud-init', 'failure')
        self.check_report(result, az, 'NotReady', 'ProvisioningFailed', DESCRIPTION)
        self.assertFalse(az.ready_accepted())


class Waagent(Agents):
    """azurelinuxagent.common.protocol.wire of Debian's waagent package."""

    def test_goal_state_fetch_served(self):
        result, az = self.scenario('waagent', 'ready')
        self.check_goal_state(result, az)
        # WireProtocol.detect(): versions, the goal state, then every document it
        # links to but FullConfig, each answered by the emulator
        paths = [re.sub(r'^/machine/[^?]+\?', '/machine/ID?', r['path']) for r in az.requests]
        self.assertEqual(paths, [
            '/?comp=versions', '/machine/?comp=goalstate',
            '/machine/ID?comp=config&type=hostingEnvironmentConfig&incarnation=3',
            '/machine/ID?comp=config&type=sharedConfig&incarnation=3',
            '/machine/ID?comp=certificates&incarnation=3',
            '/machine/ID?comp=config&type=extensionsConfig&incarnation=3',
            '/machine?comp=health'])
        certificates = [r for r in az.requests if 'comp=certificates' in r['path']][0]
        self.assertIn('x-ms-guest-agent-public-x509-cert', certificates['headers'])
        # its transport certificate, made in the driver's directory
        self.assertEqual([argv[:2] for argv in result['programs'] if 'openssl' in argv[0]],
                         [['/usr/bin/openssl', 'req']])

    def test_ready_accepted(self):
        result, az = self.scenario('waagent', 'ready')
        self.check_report(result, az, 'Ready')
        self.assertTrue(az.ready_accepted())

    def test_provisioning_failed_accepted(self):
        result, az = self.scenario('waagent', 'failure')
        self.check_report(result, az, 'NotReady', 'ProvisioningFailed', DESCRIPTION)

    def test_in_progress_report_accepted(self):
        # what waagent's provisioning handler sends first: NotReady, Provisioning
        result, az = self.scenario('waagent', 'provisioning')
        self.check_report(result, az, 'NotReady', 'Provisioning', 'Starting')

    def test_waagent_takes_urls_verbatim(self):
        # Why the emulator serves its URLs unpadded (it padded them once): waagent (on
        # most Azure Linux VMs, and it does not trim) cannot fetch a URL element
        # padded with newlines, so real goal states have none; every real capture in
        # shared/samples (afterburn's "lars-test-1", WALinuxAgent's) has none either.
        # cloud-init's padded GOAL_STATE_TEMPLATE is a hand-wrapped test literal.
        az = FakeAzure(computer_name='web-7', incarnation=3)
        self.addCleanup(az.stop)
        az.goal_state_body = padded(az.goal_state_document())
        result = self.drive('waagent', 'ready', az)
        az.stop()
        self.assertFalse(result['ok'])
        self.assertIn("URL can't contain control characters", result['error'])
        self.assertEqual(az.health_reports, [])


class OurHealthReport(Agents):
    """Our report beside theirs, element by element.

    Found equal for every element: the same elements in the same order, the same
    two namespace declarations (xsi, xsd) on the root and none elsewhere, no
    attributes, the same text.  The differences, each asserted below:
    - whitespace between elements (cloud-init indents with its own odd layout,
      waagent sends one line, we indent): no element text, ignored by XML readers;
    - HTTP headers: x-ms-agent-name is "WALinuxAgent" for both agents (cloud-init
      impersonates waagent), ours names us; Content-Type has a space after the
      semicolon in cloud-init's, not in waagent's and ours.
    """

    def compare(self, agent, scenario, state, substatus=None, description=None):
        result, az = self.scenario(agent, scenario)
        theirs = self.check_report(result, az, state, substatus, description)
        goal_state_body = az.goal_state_body
        ours, _ = self.ours(state, substatus, description, goal_state_body)
        self.assertEqual(outline(ours['body'].encode('utf-8')),
                         outline(theirs['body'].encode('utf-8')))
        # the same declaration, first, as the agents write it
        for body in (ours['body'], theirs['body']):
            self.assertTrue(body.startswith(XML_DECLARATION + '\n') or
                            body.startswith(XML_DECLARATION + '<'), body[:80])
        self.assertEqual(outline(ours['body'].encode('utf-8'))[0][1],
                         [('xsi', XSI), ('xsd', XSD)])
        self.check_headers(agent, ours, theirs)
        return ours, theirs

    def check_headers(self, agent, ours, theirs):
        self.assertEqual(ours['path'], theirs['path'])
        self.assertEqual(ours['method'], theirs['method'])
        self.assertEqual(ours['headers']['x-ms-version'], theirs['headers']['x-ms-version'])
        # known difference: the agent name (the WireServer takes any, the emulator too)
        self.assertEqual(theirs['headers']['x-ms-agent-name'], 'WALinuxAgent')
        self.assertEqual(ours['headers']['x-ms-agent-name'], ap.AGENT_NAME)
        # known difference: cloud-init's Content-Type has a space; the same media type
        self.assertEqual(ours['headers']['content-type'], 'text/xml;charset=utf-8')
        self.assertEqual(theirs['headers']['content-type'],
                         {'cloud-init': 'text/xml; charset=utf-8',
                          'waagent': 'text/xml;charset=utf-8'}[agent])

    def test_ready_matches_cloud_init(self):
        ours, theirs = self.compare('cloud-init', 'ready', 'Ready')
        # known difference: cloud-init leaves an empty line where Details would be
        self.assertIn('<State>Ready</State>\n          \n', theirs['body'])

    def test_ready_matches_waagent(self):
        ours, theirs = self.compare('waagent', 'ready', 'Ready')
        # known difference: waagent writes no whitespace at all
        self.assertNotIn('\n', theirs['body'])
        self.assertIn('\n', ours['body'])

    def test_provisioning_failed_matches_cloud_init(self):
        self.compare('cloud-init', 'failure', 'NotReady', 'ProvisioningFailed', DESCRIPTION)

    def test_provisioning_failed_matches_waagent(self):
        self.compare('waagent', 'failure', 'NotReady', 'ProvisioningFailed', DESCRIPTION)

    def test_in_progress_matches_waagent(self):
        self.compare('waagent', 'provisioning', 'NotReady', 'Provisioning', 'Starting')

    def test_the_agents_agree(self):
        # the reference is what both agents send alike: they do, element by element
        for scenario in ('ready', 'failure'):
            with self.subTest(scenario=scenario):
                documents = [self.scenario(agent, scenario)[0]['documents'][0]
                             for agent in ('cloud-init', 'waagent')]
                self.assertEqual(*[outline(d.encode('utf-8')) for d in documents])

    def test_description_escaping(self):
        # & < > escaped by everyone; the quotes by nobody (text, not an attribute)
        for agent in ('cloud-init', 'waagent'):
            body = self.scenario(agent, 'failure')[0]['documents'][0]
            self.assertIn('no &lt;osProfile&gt; &amp; "no key"', body)
        ours, _ = self.ours('NotReady', 'ProvisioningFailed', DESCRIPTION)
        self.assertIn('no &lt;osProfile&gt; &amp; "no key"', ours['body'])


class Guard(Agents):
    """The driver's guard refuses, in a network namespace with nothing to reach
    (so that a broken guard fails this test without a packet leaving)."""

    def test_refuses_everything_off_this_machine(self):
        if not is_root() or shutil.which('unshare') is None:
            skip(self, 'needs root and unshare for a private network namespace')
        if run_command(['unshare', '--net', 'true'], timeout=RUN_TIMEOUT).code != 0:
            skip(self, 'unshare --net is not allowed here')
        tree = self.tree(self, 'waagent')       # any tree: the guard needs no agent
        top = tempfile.mkdtemp(prefix='azp-agent-guard-')
        self.addCleanup(shutil.rmtree, top, True)
        workdir, outside = os.path.join(top, 'work'), os.path.join(top, 'outside')
        os.mkdir(workdir)
        os.mkdir(outside)
        command = tree.command('selftest', '127.0.0.1:9', workdir, agent='guard')
        run = run_command(['unshare', '--net'] + command,
                          env=tree.environment(workdir), timeout=RUN_TIMEOUT)
        result = agents.parse_result(run.stdout)
        self.assertIsNotNone(result, run)
        self.assertTrue(result['ok'], run)
        self.assertEqual(set(result['attempts'].values()), {'refused'}, result['attempts'])
        self.assertEqual(os.listdir(outside), [])


class LinkedDocuments(unittest.TestCase):
    """The emulator serves what its goal state links to (found missing by waagent,
    which fetches them before it reports); no agent needed."""

    def get(self, az, url, headers):
        split = urlsplit(url.strip())
        self.assertEqual(split.netloc, az.wireserver_addr)
        connection = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
        try:
            connection.request('GET', split.path + '?' + split.query, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def test_each_link_is_served(self):
        headers = {'x-ms-version': '2012-11-30', 'x-ms-agent-name': 'WALinuxAgent'}
        cert = dict(headers, **{'x-ms-cipher-name': 'DES_EDE3_CBC',
                                'x-ms-guest-agent-public-x509-cert': 'MIIB'})
        with FakeAzure(computer_name='web-7', incarnation=4) as az:
            configuration = ElementTree.fromstring(az.goal_state_document()).find(
                'Container/RoleInstanceList/RoleInstance/Configuration')
            roots = {}
            for element in configuration:
                if element.tag in ('ConfigName', 'FullConfig'):
                    continue        # a name; a document no agent fetches (404)
                status, body = self.get(az, element.text, cert)
                self.assertEqual(status, 200, element.tag)
                roots[element.tag] = ElementTree.fromstring(body)
                self.assertEqual(roots[element.tag].get('goalStateIncarnation',
                                                        roots[element.tag].findtext('Incarnation')),
                                 '4', element.tag)
            self.assertEqual(sorted(roots), ['Certificates', 'ExtensionsConfig',
                                             'HostingEnvironmentConfig', 'SharedConfig'])
            # what waagent reads of them
            self.assertEqual(roots['HostingEnvironmentConfig'].find('Incarnation').get('instance'),
                             '_web-7')
            self.assertIsNone(roots['Certificates'].find('Data'))     # no certificates
            # certificates go to whoever sent a transport certificate, and only there
            self.assertEqual(self.get(az, configuration.findtext('Certificates'), headers)[0], 400)
            # another machine's documents are not served
            other = configuration.findtext('SharedConfig').replace(
                quote(az.container_id, safe=''), 'not-this-container')
            self.assertEqual(self.get(az, other, headers)[0], 404)


class Dependencies(Agents):
    """Only what the agents' WireServer path really imports is fetched."""

    def test_every_fetched_package_is_imported(self):
        for agent in ('cloud-init', 'waagent'):
            tree = self.tree(self, agent)
            imported = set()
            for scenario in agents.SCENARIOS[agent]:
                imported.update(self.scenario(agent, scenario)[0]['modules'])
            for package, deb in sorted(tree.debs.items()):
                with self.subTest(agent=agent, package=package):
                    self.assertTrue(agents.deb_modules(deb) & imported,
                                    '%s ships %s, none imported' % (package,
                                                                   agents.deb_modules(deb)))


if __name__ == '__main__':
    unittest.main()
