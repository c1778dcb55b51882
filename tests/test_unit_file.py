"""Tests for azure-provisioning.service: the keys it must have, and
`systemd-analyze verify` on it, both as it is in the repository and as
install.sh writes it into an image tree (verified offline with --root, so the
interpreter and systemctl are looked up inside the image)."""

import os
import re
import shutil
import sys
import tempfile
import unittest

from tests.test_install import REPO, make_image, make_source, run, skip, write

UNIT_NAME = 'azure-provisioning.service'
UNIT_FILE = os.path.join(REPO, UNIT_NAME)
SCRIPT_DEADLINE = 1200      # the script's --timeout default (SPEC)


def parse_unit(text):
    """systemd unit syntax: [Section], Key=Value, # and ; comments, trailing
    backslash continues a line. Returns {section: [(key, value), ...]}."""
    sections = {}
    current = None
    pending = ''
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ''
        if not line or line[0] in '#;':
            continue
        if line.endswith('\\'):
            pending = line[:-1] + ' '
            continue
        if line.startswith('['):
            if not line.endswith(']'):
                raise ValueError('bad section line %r' % line)
            current = line[1:-1]
            if current in sections:
                raise ValueError('section [%s] twice' % current)
            sections[current] = []
            continue
        if current is None or '=' not in line:
            raise ValueError('line outside a section or without "=": %r' % line)
        key, value = line.split('=', 1)
        sections[current].append((key.strip(), value.strip()))
    if pending:
        raise ValueError('file ends in a continuation line')
    return sections


def values(sections, section, key):
    """All values of key (space-separated lists split), in order."""
    found = []
    for k, v in sections.get(section, []):
        if k == key:
            found.extend(v.split())
    return found


def single(test, sections, section, key):
    found = [v for k, v in sections.get(section, []) if k == key]
    test.assertEqual(len(found), 1, '[%s] %s= must be set exactly once, got %r'
                     % (section, key, found))
    return found[0]


def seconds(value):
    units = {'': 1, 's': 1, 'sec': 1, 'min': 60, 'm': 60, 'h': 3600}
    total = 0
    for number, unit in re.findall(r'(\d+)\s*([a-z]*)', value):
        total += int(number) * units[unit]
    return total


def script_deadline():
    """The script's own default deadline, read from its source (no import: no
    __pycache__ in the repository), else the SPEC's 1200 s."""
    try:
        with open(os.path.join(REPO, 'azure_provisioning.py')) as f:
            found = re.search(r'^DEFAULT_TIMEOUT\s*=\s*(\d+)', f.read(), re.M)
    except (IOError, OSError):
        found = None
    return max(int(found.group(1)), SCRIPT_DEADLINE) if found else SCRIPT_DEADLINE


class TestUnitKeys(unittest.TestCase):

    def setUp(self):
        with open(UNIT_FILE) as f:
            self.text = f.read()
        self.unit = parse_unit(self.text)

    def test_sections(self):
        self.assertEqual(sorted(self.unit), ['Install', 'Service', 'Unit'])

    def test_unit_section(self):
        description = single(self, self.unit, 'Unit', 'Description')
        self.assertIn('Azure', description)
        docs = values(self.unit, 'Unit', 'Documentation')
        self.assertIn('man:hostname(5)', docs)
        self.assertIn('file:///usr/local/share/doc/azure-provisioning/README.md', docs)
        for doc in docs:
            self.assertRegex(doc, r'^(man:|file:///|https://)')
        self.assertIn('network-online.target', values(self.unit, 'Unit', 'Wants'))
        self.assertIn('network-online.target', values(self.unit, 'Unit', 'After'))
        # no ordering games: default dependencies on, not pulled before sysinit
        self.assertNotIn('no', values(self.unit, 'Unit', 'DefaultDependencies'))
        self.assertEqual(values(self.unit, 'Unit', 'Before'), [])
        self.assertEqual(values(self.unit, 'Unit', 'ConditionFirstBoot'), [],
                         'ConditionFirstBoot depends on an empty machine-id (PROTOCOL.md)')

    def test_service_section(self):
        s = self.unit
        self.assertEqual(single(self, s, 'Service', 'Type'), 'oneshot')
        self.assertEqual(single(self, s, 'Service', 'ExecStart'),
                         '/usr/bin/python3 -I -S /usr/local/sbin/azure-provisioning')
        post = single(self, s, 'Service', 'ExecStartPost').split()
        self.assertTrue(post[0].startswith('/') and post[0].endswith('/systemctl'),
                        'ExecStartPost must run systemctl by absolute path: %r' % post)
        self.assertEqual(post[-2:], ['disable', UNIT_NAME])
        self.assertNotIn('--now', post)
        # the default (no): after a run the unit is inactive, so a later start runs it again
        self.assertEqual(values(s, 'Service', 'RemainAfterExit'), [])
        self.assertEqual(single(self, s, 'Service', 'StandardOutput'), 'journal+console')
        self.assertEqual(single(self, s, 'Service', 'StandardError'), 'journal+console')
        timeout = seconds(single(self, s, 'Service', 'TimeoutStartSec'))
        self.assertGreater(timeout, script_deadline())
        self.assertLessEqual(timeout, script_deadline() + 600)
        # disabling must not be part of ExecStart (it would run after a failure
        # too) and no other Exec line may run after a failed ExecStart
        for key in ('ExecStopPost', 'ExecStop', 'Restart', 'SuccessExitStatus'):
            self.assertEqual(values(s, 'Service', key), [], key)

    def test_install_section(self):
        self.assertEqual(values(self.unit, 'Install', 'WantedBy'), ['multi-user.target'])

    def test_comments_say_why(self):
        comments = [l for l in self.text.splitlines() if l.startswith('#')]
        self.assertGreater(len(comments), 6)
        for word in ('ExecStartPost', 'network-online.target', '1200', 'console'):
            self.assertIn(word, '\n'.join(comments))


class TestSystemdAnalyzeVerify(unittest.TestCase):

    def setUp(self):
        self.analyze = shutil.which('systemd-analyze')
        if not self.analyze:
            skip(self, 'systemd-analyze is not installed (apt-get install systemd): '
                       'the unit was not verified')
        self.tmp = tempfile.mkdtemp(prefix='azp-unit-')

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def man_option(self):
        """verify runs `man` for each man: Documentation; without man pages
        here that check cannot be made, and the test says so."""
        if shutil.which('man') and run(['man', '-w', '5', 'hostname']).code == 0:
            return []
        sys.stderr.write('\nNOTE %s: no man page for hostname(5) on this machine: '
                         'verify runs with --man=no\n' % self.id())
        return ['--man=no']

    def verify(self, unit_path, root=None):
        argv = [self.analyze, 'verify'] + self.man_option()
        if root:
            argv.append('--root=' + root)
        argv.append(unit_path)
        result = run(argv, env=dict(os.environ, SYSTEMD_LOG_LEVEL='info', LC_ALL='C'))
        ours = [l for l in (result.stdout + result.stderr).splitlines()
                if UNIT_NAME in l or 'azure-provisioning' in l]
        return result, ours

    def assertVerifies(self, unit_path, root=None):
        result, ours = self.verify(unit_path, root)
        self.assertEqual(ours, [], 'systemd-analyze verify complains about the unit:\n%s'
                         % result)
        self.assertEqual(result.code, 0, str(result))
        if result.stdout.strip() or result.stderr.strip():
            sys.stderr.write('\nNOTE %s: verify printed (not about our unit):\n%s%s'
                             % (self.id(), result.stdout, result.stderr))

    def test_repository_unit(self):
        copy = os.path.join(self.tmp, UNIT_NAME)
        shutil.copy(UNIT_FILE, copy)
        self.assertVerifies(copy)

    def test_verify_catches_a_broken_unit(self):
        # the control: what the tests above rely on verify to report
        with open(UNIT_FILE) as f:
            text = f.read()
        broken = text.replace('[Service]\n', '[Service]\nExecStartPre=/nonexistent/tool\n'
                              'NoSuchKey=1\n', 1)
        self.assertNotEqual(broken, text)
        copy = os.path.join(self.tmp, UNIT_NAME)
        write(copy, broken)
        result, ours = self.verify(copy)
        self.assertNotEqual(result.code, 0, str(result))
        self.assertTrue(any('NoSuchKey' in l for l in ours), str(result))
        self.assertTrue(any('/nonexistent/tool' in l for l in ours), str(result))

    def image_with_systemd_units(self):
        """An image tree with install.sh's work in it, and this machine's
        systemd units (the targets the unit is ordered against)."""
        units = None
        for d in ('/usr/lib/systemd/system', '/lib/systemd/system'):
            if os.path.exists(os.path.join(d, 'multi-user.target')):
                units = os.path.realpath(d)
                break
        if units is None:
            skip(self, 'no systemd unit directory here to give the image its targets')
        root = make_image(os.path.join(self.tmp, 'img'))
        dest = os.path.join(root, 'usr/lib/systemd/system')
        for name in os.listdir(units):
            src = os.path.join(units, name)
            if not os.path.lexists(os.path.join(dest, name)):
                if os.path.islink(src):
                    os.symlink(os.readlink(src), os.path.join(dest, name))
                elif os.path.isdir(src):
                    shutil.copytree(src, os.path.join(dest, name), symlinks=True)
                else:
                    shutil.copy2(src, os.path.join(dest, name))
        src = make_source(os.path.join(self.tmp, 'src'))
        r = run(['sh', os.path.join(src, 'install.sh'), '--root', root])
        self.assertEqual(r.code, 0, str(r))
        return root

    def test_installed_unit_verified_inside_the_image(self):
        root = self.image_with_systemd_units()
        self.assertVerifies('/etc/systemd/system/' + UNIT_NAME, root=root)
        # and the check is real: without the image's interpreter it fails
        os.remove(os.path.join(root, 'usr/bin/python3.11'))
        result, ours = self.verify('/etc/systemd/system/' + UNIT_NAME, root=root)
        self.assertNotEqual(result.code, 0, str(result))
        self.assertTrue(any('/usr/bin/python3' in l and 'not executable' in l for l in ours),
                        str(result))


if __name__ == '__main__':
    unittest.main()
