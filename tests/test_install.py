"""Tests for install.sh.

Every install goes into a temporary image tree (--root) laid out like a real
Debian/RHEL root file system, or, for the runs without --root, into temporary
directories bind-mounted over /usr/local and /etc/systemd/system inside a
private mount namespace: this machine's files are never touched.
"""

import os
import re
import shutil
import stat
import sys
import tempfile
import unittest

from tests.support import run_command, skip, tree_snapshot as snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SH = os.path.join(REPO, 'install.sh')
UNIT_NAME = 'azure-provisioning.service'
UNIT_PATH = '/etc/systemd/system/' + UNIT_NAME
WANTS_LINK = '/etc/systemd/system/multi-user.target.wants/' + UNIT_NAME
SCRIPT_PATH = '/usr/local/sbin/azure-provisioning'        # the launcher the unit runs
MODULE_DIR = '/usr/local/lib/azure-provisioning'
MODULE_PATH = MODULE_DIR + '/azure_provisioning.py'
DOC_DIR = '/usr/local/share/doc/azure-provisioning'
TIMEOUT = 60            # seconds for one install.sh run
NOBODY = 65534          # uid and gid of nobody/nogroup (nobody on RHEL)
# The standard library files the provisioner needs beyond python3-minimal's, and
# how its --check names them.
FULL_STDLIB = ('json/__init__.py', 'xml/parsers/expat.py', 'shutil.py')
FULL_MODULES = 'json, xml.parsers.expat, base64 and shutil'
# The check's line for make_image's interpreter, judged by this machine's python3.
FILES_OK = ('check: ok    python: /usr/bin/python3 is Python 3.11 (from the file name '
            '/usr/bin/python3.11) with %s in /usr/lib/python3.11 (judged from the files)'
            % FULL_MODULES)

STAND_IN = '''#!/usr/bin/env python3
"""Stand-in for azure_provisioning.py (the real one was not in the repo)."""
import json
import xml.parsers.expat
print("stand-in")
'''

# The tools install.sh uses, for a PATH without systemctl.
TOOLS = ('sh awk sort cat chmod cut dirname basename grep id mkdir mktemp mv readlink rm '
         'rmdir sed tr ln cmp chroot env').split()


def run(argv, env=None, timeout=TIMEOUT):
    done = run_command(argv, env=env, timeout=timeout)
    return Result(argv, done.code, done.stdout, done.stderr)


class Result(object):
    def __init__(self, argv, code, stdout, stderr):
        self.argv, self.code, self.stdout, self.stderr = argv, code, stdout, stderr

    def __str__(self):
        return '%s\nexit %s\n--- stdout\n%s--- stderr\n%s' % (
            ' '.join(self.argv), self.code, self.stdout, self.stderr)


def write(path, text, mode=0o644):
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        os.makedirs(d)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def symlink(target, path):
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        os.makedirs(d)
    os.symlink(target, path)


def make_source(directory):
    """A copy of what install.sh installs from, as in a checkout."""
    os.makedirs(directory)
    for name in ('install.sh', UNIT_NAME, 'LICENSE', 'README.md'):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy2(os.path.join(REPO, name), directory)
    script = os.path.join(REPO, 'azure_provisioning.py')
    if os.path.exists(script):
        shutil.copy2(script, directory)
    else:
        write(os.path.join(directory, 'azure_provisioning.py'), STAND_IN)
    os.chmod(directory, 0o755)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o755 if name.endswith('.sh') else 0o644)
    return directory


def make_image(root, python='3.11', full_stdlib=True, layout='debian', systemctl=True):
    """A small but realistic root file system tree.

    layout 'debian': merged /usr (bin, sbin, lib, lib64 are symlinks into usr),
      /usr/bin/python3 -> python3.11, stdlib in /usr/lib/python3.11.
    layout 'rhel8': /usr/libexec/platform-python -> platform-python3.6, stdlib in
      /usr/lib64/python3.6, no /usr/bin/python3 unless python is given.
    layout 'unmerged': /bin and /usr/bin are separate (Debian 10 without
      usrmerge), systemctl in /bin.
    full_stdlib False: only the part of the standard library that Debian's
      python3-minimal has (no json, xml, shutil).
    The interpreter files are placeholders that cannot run in a chroot (there is
    no /bin/sh in the tree), so install.sh has to judge them by their files."""
    os.makedirs(root)
    if layout in ('debian', 'rhel8'):
        for top in ('bin', 'sbin', 'lib', 'lib64'):
            os.makedirs(os.path.join(root, 'usr', top))
            os.symlink('usr/' + top, os.path.join(root, top))
    else:
        for top in ('bin', 'sbin', 'lib', 'usr/bin', 'usr/sbin', 'usr/lib'):
            os.makedirs(os.path.join(root, top))
    for d in ('usr/local/bin', 'usr/local/sbin', 'usr/local/lib', 'usr/local/share',
              'usr/share/doc', 'var/lib', 'tmp', 'etc/default', 'home'):
        os.makedirs(os.path.join(root, d))
    write(os.path.join(root, 'etc/hostname'), 'image-template\n')
    write(os.path.join(root, 'etc/hosts'), '127.0.0.1\tlocalhost\n127.0.1.1\timage-template\n')
    write(os.path.join(root, 'etc/os-release'), 'ID=test\nNAME="test image"\n')
    # systemd: a few units, some of them enabled
    units = 'lib/systemd/system' if layout == 'unmerged' else 'usr/lib/systemd/system'
    for name in ('multi-user.target', 'network-online.target', 'getty.target'):
        write(os.path.join(root, units, name), '[Unit]\nDescription=%s\n' % name)
    write(os.path.join(root, units, 'ssh.service'),
          '[Service]\nExecStart=/usr/sbin/sshd -D\n[Install]\nWantedBy=multi-user.target\n')
    write(os.path.join(root, units, 'getty@.service'),
          '[Service]\nExecStart=-/sbin/agetty %I\n[Install]\nWantedBy=getty.target\n')
    symlink('/lib/systemd/system/ssh.service',
            os.path.join(root, 'etc/systemd/system/multi-user.target.wants/ssh.service'))
    symlink('/lib/systemd/system/getty@.service',
            os.path.join(root, 'etc/systemd/system/getty.target.wants/getty@tty1.service'))
    if systemctl:
        where = 'bin/systemctl' if layout == 'unmerged' else 'usr/bin/systemctl'
        write(os.path.join(root, where), '#!/bin/sh\nexit 1\n', 0o755)
    # python
    if python:
        placeholder = '#!/bin/sh\necho "placeholder interpreter" >&2\nexit 126\n'
        if layout == 'rhel8':
            stdlib = 'usr/lib64/python' + python
            write(os.path.join(root, 'usr/libexec/platform-python' + python), placeholder, 0o755)
            os.symlink('platform-python' + python,
                       os.path.join(root, 'usr/libexec/platform-python'))
        else:
            stdlib = 'usr/lib/python' + python
            write(os.path.join(root, 'usr/bin/python' + python), placeholder, 0o755)
            os.symlink('python' + python, os.path.join(root, 'usr/bin/python3'))
        write(os.path.join(root, stdlib, 'os.py'), '')
        write(os.path.join(root, stdlib, 'encodings/__init__.py'), '')
        write(os.path.join(root, stdlib, 'base64.py'), '')
        if full_stdlib:
            for name in FULL_STDLIB + ('xml/__init__.py', 'xml/parsers/__init__.py'):
                write(os.path.join(root, stdlib, name), '')
    return root


def read(path):
    with open(path) as f:
        return f.read()


def tree_diff(before, after):
    lines = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            lines.append('%s: %r -> %r' % (key, before.get(key), after.get(key)))
    return '\n'.join(lines)


def system_python():
    """The distribution's interpreter (not a pyenv build), and its stdlib dirs."""
    exe = '/usr/bin/python3'
    if not os.path.exists(exe):
        return None, None
    r = run([exe, '-E', '-S', '-c', 'import sysconfig; p = sysconfig.get_paths(); '
             'print(p["stdlib"]); print(p["platstdlib"])'])
    if r.code != 0:
        return None, None
    return os.path.realpath(exe), sorted(set(r.stdout.split()))


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def shared_libraries(binary):
    r = run(['ldd', binary])
    if r.code != 0:
        return None
    return sorted(set(re.findall(r'(/\S+)', r.stdout)))


class InstallTestCase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='azp-install-')
        os.chmod(self.tmp, 0o755)       # nobody must reach the source copy
        self.src = make_source(os.path.join(self.tmp, 'src'))
        self.install_sh = os.path.join(self.src, 'install.sh')

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def image(self, name='img', **kwargs):
        return make_image(os.path.join(self.tmp, name), **kwargs)

    def install(self, *args, **kwargs):
        prefix = kwargs.pop('prefix', [])
        return run(prefix + ['sh', self.install_sh] + list(args), **kwargs)

    def assertOK(self, result):
        self.assertEqual(result.code, 0, str(result))

    def assertFailed(self, result, code, *phrases):
        self.assertEqual(result.code, code, str(result))
        self.assertEqual(result.stdout.count('error'), 0, str(result))
        for phrase in phrases:
            self.assertIn(phrase, result.stderr, str(result))
        self.assertTrue(result.stderr.startswith('install.sh: error: '), str(result))

    def expected_launcher(self, python='/usr/bin/python3'):
        return ('#!%s -IS\n'
                '# azure-provisioning launcher, written by install.sh: runs the module '
                'installed (and\n# byte-compiled) in %s. The unit runs it as %s -I -S %s.\n'
                'import sys\nsys.path.insert(0, %r)\nfrom azure_provisioning import main\n'
                'sys.exit(main())\n' % (python, MODULE_DIR, python, SCRIPT_PATH, MODULE_DIR))

    def compiled(self, root):
        """The bytecode files of the installed module."""
        cache = root + MODULE_DIR + '/__pycache__'
        return sorted(os.listdir(cache)) if os.path.isdir(cache) else []

    def expected_unit(self, python='/usr/bin/python3', systemctl='/bin/systemctl'):
        text = read(os.path.join(self.src, UNIT_NAME))
        text = text.replace('\nExecStart=/usr/bin/python3 -I -S ', '\nExecStart=%s -I -S ' % python)
        return text.replace('\nExecStartPost=/bin/systemctl ', '\nExecStartPost=%s ' % systemctl)

    def assertInstalled(self, root, python='/usr/bin/python3', systemctl='/bin/systemctl'):
        script = root + SCRIPT_PATH
        module = root + MODULE_PATH
        unit = root + UNIT_PATH
        self.assertEqual(stat.S_IMODE(os.lstat(script).st_mode), 0o755)
        self.assertTrue(stat.S_ISREG(os.lstat(script).st_mode))
        self.assertEqual(read(script), self.expected_launcher(python))
        self.assertEqual(stat.S_IMODE(os.lstat(module).st_mode), 0o644)
        self.assertTrue(stat.S_ISREG(os.lstat(module).st_mode))
        self.assertEqual(read(module), read(os.path.join(self.src, 'azure_provisioning.py')))
        self.assertEqual(stat.S_IMODE(os.lstat(unit).st_mode), 0o644)
        self.assertTrue(stat.S_ISREG(os.lstat(unit).st_mode))
        text = read(unit)
        self.assertEqual(text, self.expected_unit(python, systemctl))
        self.assertIn('\nExecStart=%s -I -S %s\n' % (python, SCRIPT_PATH), text)
        self.assertIn('\nExecStartPost=%s --no-reload disable %s\n' % (systemctl, UNIT_NAME),
                      text)
        link = root + WANTS_LINK
        self.assertTrue(os.path.islink(link), '%s is not a symlink' % link)
        self.assertEqual(os.readlink(link), UNIT_PATH)
        self.assertEqual(stat.S_IMODE(os.lstat(root + DOC_DIR + '/LICENSE').st_mode), 0o644)
        self.assertEqual(read(root + DOC_DIR + '/LICENSE'), read(os.path.join(REPO, 'LICENSE')))
        if os.path.exists(os.path.join(self.src, 'README.md')):
            self.assertEqual(read(root + DOC_DIR + '/README.md'),
                             read(os.path.join(self.src, 'README.md')))
        leftovers = [os.path.join(top, n) for top, dirs, files in os.walk(root)
                     for n in files if n.startswith('.')]
        self.assertEqual(leftovers, [], 'temporary files left behind')


class TestOptions(InstallTestCase):

    def test_help(self):
        r = self.install('--help')
        self.assertOK(r)
        self.assertEqual(r.stderr, '')
        for option in ('--root DIR', '--python PATH', '--uninstall', '--help',
                       SCRIPT_PATH, UNIT_PATH, 'python3-minimal', '--check'):
            self.assertIn(option, r.stdout)
        self.assertEqual(self.install('-h').stdout, r.stdout)

    def test_usage_errors_exit_2_with_one_line(self):
        root = self.image()
        for args, phrase in ((['--bogus'], "unknown option '--bogus'"),
                             (['--root'], '--root needs a directory'),
                             (['--root='], '--root needs a directory'),
                             (['--root', root, '--python'], '--python needs a path'),
                             (['--root', root, '--python', 'python3'], 'absolute path'),
                             (['--root', root, '--provision-user=bob'], 'unknown option'),
                             (['--root', root, '--uninstall', '--provision-user'],
                              'makes no sense with --uninstall'),
                             (['--uninstall', '--root', root, '--python', '/usr/bin/python3'],
                              '--uninstall'),
                             (['install'], "unknown option 'install'")):
            r = self.install(*args)
            self.assertFailed(r, 2, phrase)
            self.assertEqual(len(r.stderr.splitlines()), 1, str(r))
            self.assertEqual(r.stdout, '', str(r))

    def test_root_must_exist(self):
        r = self.install('--root', os.path.join(self.tmp, 'missing'))
        self.assertFailed(r, 1, 'no such directory')

    def test_missing_source_file(self):
        os.remove(os.path.join(self.src, 'azure_provisioning.py'))
        root = self.image()
        before = snapshot(root)
        r = self.install('--root', root)
        self.assertFailed(r, 1, 'azure_provisioning.py not found next to install.sh')
        self.assertEqual(snapshot(root), before)

    def test_the_python_knowledge_is_the_provisioners_alone(self):
        """install.sh asks the installed script's --check; it keeps no list of modules
        or agents of its own (they drifted apart once)."""
        text = read(INSTALL_SH)
        for word in ('xml.parsers', 'json', 'shutil', 'waagent', 'cloud-init', 'lib64'):
            self.assertNotIn(word, text)

    def test_shellcheck(self):
        shellcheck = shutil.which('shellcheck')
        if not shellcheck:
            skip(self, 'shellcheck is not installed (apt-get install shellcheck); '
                       'install.sh was not linted')
        r = run([shellcheck, '--shell=sh', '--severity=style', INSTALL_SH])
        self.assertOK(r)
        with open(INSTALL_SH) as f:
            self.assertEqual(f.readline(), '#!/bin/sh\n')
        self.assertTrue(os.access(INSTALL_SH, os.X_OK), 'install.sh is not executable')


class TestInstallIntoRoot(InstallTestCase):

    def test_install_rerun_uninstall(self):
        root = self.image()
        before = snapshot(root)
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertInstalled(root)
        out = r.stdout
        for phrase in ('target: the image tree at %s' % root,
                       'installed %s (in %s) (mode 0755)' % (SCRIPT_PATH, root),
                       'installed %s (in %s) (mode 0644)' % (MODULE_PATH, root),
                       'not compiled: /usr/bin/python3 (in %s) cannot be run here' % root,
                       'installed %s (in %s) (mode 0644)' % (UNIT_PATH, root),
                       'ExecStart=/usr/bin/python3 -I -S %s' % SCRIPT_PATH,
                       'enabled %s: %s -> %s' % (UNIT_NAME, WANTS_LINK, UNIT_PATH),
                       "checked the image with this machine's %s, judging /usr/bin/python3 by "
                       "its files (not root, so it cannot be run with chroot)"
                       % shutil.which('python3') if os.geteuid() else
                       'judging /usr/bin/python3 by its files (it is older than Python 3.6 '
                       'or does not run here: ',
                       FILES_OK):
            self.assertIn(phrase, out)
        self.assertNotIn('WARNING', r.stderr)
        for line in out.splitlines():
            self.assertTrue(line.startswith('install.sh: '), line)
        manifest = read(root + DOC_DIR + '/install-manifest')
        self.assertEqual([l for l in manifest.splitlines() if not l.startswith('#')],
                         ['dir ' + MODULE_DIR, 'dir /usr/local/share/doc', 'dir ' + DOC_DIR])
        installed = snapshot(root)

        # a second run changes nothing and says so
        r2 = self.install('--root', root)
        self.assertOK(r2)
        self.assertEqual(snapshot(root), installed, tree_diff(installed, snapshot(root)))
        self.assertIn('unchanged %s' % SCRIPT_PATH, r2.stdout)
        self.assertIn('unchanged %s' % MODULE_PATH, r2.stdout)
        self.assertIn('unchanged %s' % UNIT_PATH, r2.stdout)
        self.assertNotIn('installed ', r2.stdout)

        # an upgrade replaces the files in place
        with open(os.path.join(self.src, 'azure_provisioning.py'), 'a') as f:
            f.write('\n# upgraded\n')
        r3 = self.install('--root', root)
        self.assertOK(r3)
        self.assertIn('updated %s' % MODULE_PATH, r3.stdout)
        self.assertIn('unchanged %s' % SCRIPT_PATH, r3.stdout)
        self.assertTrue(read(root + MODULE_PATH).endswith('# upgraded\n'))
        self.assertInstalled(root)

        r4 = self.install('--root', root, '--uninstall')
        self.assertOK(r4)
        for phrase in ('disabled ' + UNIT_NAME, 'removed ' + UNIT_PATH, 'removed ' + SCRIPT_PATH,
                       'removed ' + MODULE_PATH, 'removed directory ' + MODULE_DIR,
                       'removed directory ' + DOC_DIR):
            self.assertIn(phrase, r4.stdout)
        after = snapshot(root)
        self.assertEqual(after, before, 'uninstall left a trace:\n' + tree_diff(before, after))

        # uninstalling again is harmless
        r5 = self.install('--root', root, '--uninstall')
        self.assertOK(r5)
        self.assertEqual(snapshot(root), before)

    def test_without_systemctl_makes_the_link_itself(self):
        if not shutil.which('systemctl'):
            sys.stderr.write('\nNOTE %s: no systemctl on this machine, so every test '
                             'uses the fallback path\n' % self.id())
        bindir = os.path.join(self.tmp, 'bin')
        os.makedirs(bindir)
        for tool in TOOLS:
            found = shutil.which(tool)
            if found:
                os.symlink(found, os.path.join(bindir, tool))
        env = dict(os.environ, PATH=bindir)
        root = self.image()
        before = snapshot(root)
        r = self.install('--root', root, env=env)
        self.assertOK(r)
        self.assertIn('no systemctl here', r.stdout)
        self.assertInstalled(root)
        r = self.install('--root', root, env=env)
        self.assertOK(r)
        self.assertInstalled(root)
        # a stale link is replaced
        os.remove(root + WANTS_LINK)
        os.symlink('/lib/systemd/system/' + UNIT_NAME, root + WANTS_LINK)
        self.assertOK(self.install('--root', root, env=env))
        self.assertInstalled(root)
        r = self.install('--root', root, '--uninstall', env=env)
        self.assertOK(r)
        self.assertIn('removed ' + WANTS_LINK, r.stdout)
        self.assertEqual(snapshot(root), before, tree_diff(before, snapshot(root)))

    def test_existing_directories_are_kept(self):
        root = self.image()
        os.makedirs(root + '/usr/local/share/doc')
        before = snapshot(root)
        self.assertOK(self.install('--root', root))
        manifest = read(root + DOC_DIR + '/install-manifest')
        self.assertEqual([l for l in manifest.splitlines() if not l.startswith('#')],
                         ['dir ' + MODULE_DIR, 'dir ' + DOC_DIR])
        self.assertOK(self.install('--root', root, '--uninstall'))
        self.assertEqual(snapshot(root), before, tree_diff(before, snapshot(root)))

    def test_doc_directory_with_foreign_files_is_kept(self):
        root = self.image()
        self.assertOK(self.install('--root', root))
        write(root + DOC_DIR + '/notes.txt', 'mine\n')
        r = self.install('--root', root, '--uninstall')
        self.assertOK(r)
        self.assertIn('left %s (in %s) in place' % (DOC_DIR, root), r.stderr)
        self.assertEqual(os.listdir(root + DOC_DIR), ['notes.txt'])
        self.assertFalse(os.path.lexists(root + UNIT_PATH))

    def test_wants_directory_created_and_removed(self):
        root = self.image()
        shutil.rmtree(root + '/etc/systemd/system/multi-user.target.wants')
        before = snapshot(root)
        self.assertOK(self.install('--root', root))
        self.assertInstalled(root)
        self.assertOK(self.install('--root', root, '--uninstall'))
        self.assertEqual(snapshot(root), before, tree_diff(before, snapshot(root)))

    def test_root_path_with_spaces(self):
        root = self.image('my image')
        tmpdir = os.path.join(self.tmp, 'tmp dir')
        os.makedirs(tmpdir)
        env = dict(os.environ, TMPDIR=tmpdir)
        before = snapshot(root)
        self.assertOK(self.install('--root', root, env=env))
        self.assertInstalled(root)
        self.assertOK(self.install('--root', root, '--uninstall', env=env))
        self.assertEqual(snapshot(root), before, tree_diff(before, snapshot(root)))
        self.assertEqual(os.listdir(tmpdir), [], 'temporary files left in TMPDIR')

    def test_relative_root(self):
        self.image()
        # run from the temp directory: --root resolved against the cwd
        r = run(['sh', '-c', 'cd "$1" && sh "$2" --root img', 'sh', self.tmp, self.install_sh])
        self.assertOK(r)
        self.assertInstalled(os.path.join(self.tmp, 'img'))

    def test_rhel8_platform_python(self):
        root = self.image(python='3.6', layout='rhel8')
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertInstalled(root, python='/usr/libexec/platform-python')
        self.assertIn('check: ok    python: /usr/libexec/platform-python is Python 3.6 (from '
                      'the file name /usr/libexec/platform-python3.6) with %s in '
                      '/usr/lib64/python3.6' % FULL_MODULES, r.stdout)

    def test_absolute_links_resolved_inside_the_image(self):
        # RHEL: /usr/bin/python3 -> /etc/alternatives/python3 -> /usr/bin/python3.6
        root = self.image(python='3.6', layout='rhel8')
        write(root + '/usr/bin/python3.6', '#!/bin/sh\nexit 126\n', 0o755)
        symlink('/usr/bin/python3.6', root + '/etc/alternatives/python3')
        os.symlink('/etc/alternatives/python3', root + '/usr/bin/python3')
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertInstalled(root, python='/usr/bin/python3')
        self.assertIn('from the file name /usr/bin/python3.6', r.stdout)

    def test_directory_links_resolved_inside_the_image(self):
        # /opt/py -> /srv/py (absolute): the image's /srv, not this machine's, where
        # the name is missing; '..' stops at the image's /
        root = self.image()
        shutil.copytree(root + '/usr/lib/python3.11', root + '/srv/py/lib/python3.11')
        write(root + '/srv/py/bin/python3.11', '#!/bin/sh\nexit 126\n', 0o755)
        symlink('/srv/py', root + '/opt/py')
        self.assertFalse(os.path.lexists('/srv/py'), 'this machine has a /srv/py')
        python = '/opt/py/../../../opt/py/bin/python3.11'
        r = self.install('--root', root, '--python', python)
        self.assertOK(r)
        self.assertIn('python: %s is Python 3.11 (from the file name /srv/py/bin/python3.11) '
                      'with %s in /srv/py/lib/python3.11' % (python, FULL_MODULES), r.stdout)

    def test_unmerged_usr_systemctl_in_bin(self):
        root = self.image(layout='unmerged')
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertInstalled(root, systemctl='/bin/systemctl')

    def test_systemctl_only_in_usr_bin(self):
        root = self.image(layout='unmerged', systemctl=False)
        write(root + '/usr/bin/systemctl', '#!/bin/sh\n', 0o755)
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertInstalled(root, systemctl='/usr/bin/systemctl')

    def test_no_systemctl_in_image_warns(self):
        root = self.image(systemctl=False)
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertIn('is systemd installed in the target?', r.stderr)

    def test_python_option(self):
        root = self.image()
        r = self.install('--root', root, '--python', '/usr/bin/python3.11')
        self.assertOK(r)
        self.assertInstalled(root, python='/usr/bin/python3.11')
        r = self.install('--root=' + root, '--python=/usr/bin/python3')
        self.assertOK(r)
        self.assertInstalled(root, python='/usr/bin/python3')

    def test_provision_user_goes_into_execstart_and_rerun_drops_it(self):
        root = self.image()
        r = self.install('--root', root, '--provision-user')
        self.assertOK(r)
        unit = read(root + UNIT_PATH)
        self.assertIn('\nExecStart=/usr/bin/python3 -I -S %s --provision-user\n' % SCRIPT_PATH,
                      unit)
        self.assertEqual(unit.count('--provision-user'), 1)
        self.assertIn('unit runs: ExecStart=/usr/bin/python3 -I -S %s --provision-user'
                      % SCRIPT_PATH, r.stdout)
        r = self.install('--root', root)      # an upgrade without it takes it out again
        self.assertOK(r)
        self.assertInstalled(root)

    def test_python_option_missing_or_odd(self):
        root = self.image()
        before = snapshot(root)
        r = self.install('--root', root, '--python', '/usr/bin/python9')
        self.assertFailed(r, 1, '/usr/bin/python9 (in %s) does not exist' % root)
        r = self.install('--root', root, '--python', '/usr/bin/py thon3')
        self.assertFailed(r, 1, 'only letters, digits')
        self.assertEqual(snapshot(root), before)


class TestPythonRefused(InstallTestCase):
    """A target interpreter that cannot run the provisioner fails the install with
    the check's reason in one line; --uninstall takes back what was written.  (The
    rules themselves are the script's --check: tests/test_check.py.)"""

    def refused(self, root, *phrases, **kwargs):
        before = snapshot(root)
        r = self.install('--root', root, *kwargs.get('args', ()))
        self.assertFailed(r, 1, 'installed, but the unit cannot run: ', *phrases)
        self.assertEqual(len(r.stderr.splitlines()), 1, str(r))
        self.assertOK(self.install('--root', root, '--uninstall'))
        self.assertEqual(snapshot(root), before, tree_diff(before, snapshot(root)))
        return r

    def test_python3_minimal_without_full_stdlib(self):
        # Debian's python3-minimal: the interpreter, a part of the stdlib, no
        # json, xml or shutil
        root = self.image(full_stdlib=False)
        self.refused(root, '/usr/bin/python3 (Python 3.11) has no json, xml.parsers.expat and '
                           'shutil: not in /usr/lib/python3.11 (fix: install the full python3 '
                           'package, not python3-minimal); then run install.sh again')

    def test_old_python(self):
        root = self.image(python='3.5')
        self.refused(root, '/usr/bin/python3 is Python 3.5 (from the file name '
                           '/usr/bin/python3.5); 3.6 or newer is needed')

    def test_python2(self):
        root = self.image(python='2.7', full_stdlib=False)   # python3 -> python2.7
        self.refused(root, 'Python 2.7', '3.6 or newer is needed')

    def test_no_python(self):
        root = self.image(python=None)
        before = snapshot(root)
        r = self.install('--root', root)
        self.assertFailed(r, 1, 'no Python found', '/usr/bin/python3',
                          '/usr/libexec/platform-python', 'python3-minimal')
        self.assertEqual(snapshot(root), before)

    def test_unversioned_name_needs_one_stdlib(self):
        root = self.image()
        os.remove(root + '/usr/bin/python3')
        shutil.copy2(root + '/usr/bin/python3.11', root + '/usr/bin/python3')
        r = self.install('--root', root)      # one stdlib: its version is used
        self.assertOK(r)
        self.assertIn('Python 3.11 (from its standard library /usr/lib/python3.11)', r.stdout)
        self.assertOK(self.install('--root', root, '--uninstall'))
        write(root + '/usr/lib/python3.12/os.py', '')
        self.refused(root, 'cannot tell which Python', '2 standard libraries')


class TestCheckStatus(InstallTestCase):
    """install.sh decides by --check's exit status alone (0 ready, 1 not ready, 3 the
    unit's Python cannot run it), never by the wording of its lines: a stand-in
    provisioner whose words say one thing and whose status says another is
    believed for its status.  (The statuses themselves: tests/test_check.py.)"""

    def stand_in(self, stdout, stderr='', status=0, version_status=0):
        """A provisioner that answers --version with `version_status` and --check
        with these lines and this status."""
        write(os.path.join(self.src, 'azure_provisioning.py'), (
            'import sys\n'
            'if "--version" in sys.argv:\n'
            '    sys.stderr.write("azure-provisioning: stand-in cannot start\\n")\n'
            '    sys.exit(%d)\n'
            'sys.stdout.write(%r)\n'
            'sys.stdout.flush()\n'
            'sys.stderr.write(%r)\n'
            'sys.exit(%d)\n' % (version_status, stdout, stderr, status)))
        root = self.image('img%d' % len(os.listdir(self.tmp)))
        return self.install('--root', root), root

    def test_the_status_is_believed_not_the_words(self):
        fail_row = 'FAIL  python: /usr/bin/python3 is Python 2.7; 3.6 or newer is needed\n'
        r, _ = self.stand_in(fail_row + 'image NOT ready: 1 blocking, 0 warnings (x)\n')
        self.assertOK(r)
        self.assertIn('install.sh: check: ' + fail_row, r.stdout)
        self.assertEqual(r.stderr, '', r)

        r, _ = self.stand_in('image ready: 0 blocking, 0 warnings (x)\n', status=1)
        self.assertOK(r)
        self.assertEqual(r.stderr, 'install.sh: warning: installed, but the image is not '
                                   'ready to capture: fix the FAIL lines above\n', r)

    def test_status_3_fails_the_install_with_the_last_line(self):
        r, root = self.stand_in('ok    nothing to see\nimage ready: 0 blocking, 0 warnings\n',
                                'azure-provisioning: error: the unit cannot run: WHY (fix: '
                                'FIX)\n', status=3)
        self.assertFailed(r, 1)
        self.assertEqual(r.stderr, 'install.sh: error: installed, but the unit cannot run: WHY '
                                   '(fix: FIX); then run install.sh again (or --uninstall)\n')
        self.assertIn('install.sh: check: image ready: 0 blocking, 0 warnings\n', r.stdout)
        self.assertNotIn('WHY', r.stdout)       # said once, as the error
        self.assertTrue(os.path.isfile(root + MODULE_PATH))     # installed; --uninstall undoes

    def test_other_statuses_fail_the_install(self):
        r, _ = self.stand_in('image ready: 0 blocking, 0 warnings\n', 'Traceback: boom\n',
                             status=5)
        self.assertFailed(r, 1, 'installed, but azure-provisioning --check failed (exit '
                                'status 5): Traceback: boom')
        r, _ = self.stand_in('ok    unit installed\n', 'azure-provisioning: error: internal '
                             'error: MemoryError: \n', status=4)     # CHECK_CRASHED
        self.assertFailed(r, 1, 'installed, but azure-provisioning --check failed (exit '
                                'status 4): azure-provisioning: error: internal error: '
                                'MemoryError:')
        self.assertNotIn('not ready', r.stderr)
        r, root = self.stand_in('image ready: 0 blocking, 0 warnings\n', version_status=1)
        self.assertFailed(r, 1, 'installed, but /usr/bin/python3 (in %s) cannot run it (exit '
                                'status 1): azure-provisioning: stand-in cannot start' % root)
        self.assertNotIn('check:', r.stdout)


class TestOtherAgents(InstallTestCase):
    """Other agents are the check's to find (tests/test_check.py); install.sh shows
    its lines and warns, and installs all the same."""

    def test_walinuxagent_enabled(self):
        root = self.image()
        write(root + '/usr/bin/apt-get', '', 0o755)
        write(root + '/usr/sbin/waagent', '', 0o755)
        write(root + '/usr/lib/systemd/system/walinuxagent.service', '[Service]\n')
        symlink('/lib/systemd/system/walinuxagent.service',
                root + '/etc/systemd/system/multi-user.target.wants/walinuxagent.service')
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertInstalled(root)
        self.assertIn('install.sh: check: FAIL  walinuxagent is installed (/usr/sbin/waagent, '
                      'walinuxagent.service), enabled: walinuxagent.service: it answers Azure '
                      'too', r.stdout)
        self.assertIn('install.sh: check:       fix: systemctl --root=%s disable '
                      'walinuxagent.service; chroot %s apt-get purge -y walinuxagent\n'
                      % (root, root), r.stdout)
        self.assertEqual(r.stderr, 'install.sh: warning: installed, but the image is not ready '
                                   'to capture: fix the FAIL lines above\n')

    def test_cloud_init_disabled_by_marker(self):
        root = self.image()
        write(root + '/usr/bin/cloud-init', '', 0o755)
        write(root + '/etc/cloud/cloud-init.disabled', '')
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertIn('check: ok    cloud-init is installed but /etc/cloud/cloud-init.disabled '
                      'keeps it from running', r.stdout)


class TestAsRoot(InstallTestCase):
    """Runs that need root: chroot into an image whose interpreter really runs,
    installing on "this machine" inside a private mount namespace, and running
    as an unprivileged user."""

    def require_root(self):
        if os.geteuid() != 0:
            skip(self, 'needs root (chroot, mount namespace or setpriv); run the suite '
                       'as root to check it')

    def runnable_image(self, name='img'):
        """A tree with the distribution's python3 and the libraries it needs,
        so that `chroot ROOT /usr/bin/python3` really runs."""
        self.require_root()
        exe, stdlibs = system_python()
        if exe is None:
            skip(self, 'no /usr/bin/python3 on this machine to build a runnable image')
        libs = shared_libraries(exe)
        if libs is None:
            skip(self, 'ldd does not work here, cannot build a runnable image')
        root = make_image(os.path.join(self.tmp, name), python=None)
        shutil.copy2(exe, root + exe)
        version = re.search(r'python(\d+\.\d+)$', exe)
        if exe != '/usr/bin/python3':
            os.symlink(os.path.basename(exe), root + '/usr/bin/python3')
        for lib in libs:
            d = os.path.dirname(root + lib)
            if not os.path.isdir(d):
                os.makedirs(d)
            shutil.copy2(os.path.realpath(lib), root + lib)
        for stdlib in stdlibs:
            if not os.path.isdir(root + stdlib):
                shutil.copytree(stdlib, root + stdlib, symlinks=True,
                                copy_function=link_or_copy,
                                ignore=shutil.ignore_patterns('site-packages', 'dist-packages',
                                                              'test', 'idlelib', 'tkinter'))
        return root, (version.group(1) if version else None), stdlibs

    def test_chroot_runs_the_image_interpreter(self):
        root, version, _ = self.runnable_image()
        before = snapshot(root)
        r = self.install('--root', root)
        self.assertOK(r)
        self.assertIn('checked the image with /usr/bin/python3 (azure-provisioning --check)',
                      r.stdout)
        self.assertIn('check: ok    python: /usr/bin/python3 is Python %s with %s (checked by '
                      'running it)' % (version or '', FULL_MODULES), r.stdout)
        # run inside the image, the check still writes its fixes for the image out here
        self.assertIn('fix: e.g. /etc/systemd/network/20-dhcp.network', r.stdout)
        self.assertIn('then systemctl --root=%s enable systemd-networkd' % root, r.stdout)
        self.assertRegex(r.stdout, r'check: image NOT ready: \d+ blocking, \d+ warnings \(%s\)'
                         % re.escape(root))
        self.assertInstalled(root)
        self.assertOK(self.install('--root', root, '--uninstall'))
        self.assertEqual(snapshot(root), before, 'the probe or uninstall left files:\n'
                         + tree_diff(before, snapshot(root)))

    def test_chroot_python_without_expat(self):
        # only xml/parsers/expat.py gone: the probe names that module alone
        root, _, stdlibs = self.runnable_image()
        for stdlib in stdlibs:
            for name in ('expat.py', '__pycache__'):
                path = root + stdlib + '/xml/parsers/' + name     # unlinks our links
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        r = self.install('--root', root)
        self.assertFailed(r, 1, 'installed, but /usr/bin/python3 (in %s) cannot run it (exit '
                          'status 1): azure-provisioning: this Python (%s) has no '
                          'xml.parsers.expat module: install the full python3 package, not '
                          'python3-minimal' % (root, '.'.join(map(str, sys.version_info[:2])))
                          if os.path.realpath('/usr/bin/python3') == os.path.realpath(
                              sys.executable) else 'has no xml.parsers.expat module')
        self.assertNotIn('json', r.stderr)

    def test_chroot_refuses_a_script_that_does_not_compile(self):
        root, _, _ = self.runnable_image()
        write(os.path.join(self.src, 'azure_provisioning.py'), 'def broken(:\n    pass\n')
        r = self.install('--root', root)
        self.assertFailed(r, 1, 'byte-compiling %s (in %s) with /usr/bin/python3 failed'
                          % (MODULE_PATH, root), 'SyntaxError')

    def namespace_run(self, *args):
        """install.sh without --root, as root, with temporary directories bound
        over /usr/local and /etc/systemd/system in a private mount namespace."""
        self.require_root()
        if os.path.isdir('/run/systemd/system'):
            skip(self, 'systemd runs on this machine: install.sh would ask it to '
                       'reload and enable, outside the private namespace')
        for tool in ('unshare', 'mount'):
            if not shutil.which(tool):
                skip(self, 'no %s command' % tool)
        for d in ('/usr/local', '/etc/systemd/system'):
            if not os.path.isdir(d):
                skip(self, '%s does not exist here to bind over' % d)
        local = os.path.join(self.tmp, 'ns-local')
        etc = os.path.join(self.tmp, 'ns-etc-systemd-system')
        if not os.path.isdir(local):
            for d in ('bin', 'sbin', 'share', 'lib'):
                os.makedirs(os.path.join(local, d))
            shutil.copytree('/etc/systemd/system', etc, symlinks=True)
            write(os.path.join(local, '.azp-test'), '')
            write(os.path.join(etc, '.azp-test'), '')
        script = ('mount --bind "$1" /usr/local && mount --bind "$2" /etc/systemd/system && '
                  'test -e /usr/local/.azp-test && test -e /etc/systemd/system/.azp-test '
                  '|| exit 99; shift 2; exec sh "$@"')
        r = run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script, 'sh',
                 local, etc, self.install_sh] + list(args))
        self.assertNotEqual(r.code, 99, 'the private mounts failed:\n%s' % r)
        return r, local, etc

    def installed_version(self, local):
        """What the installed launcher says with --version, run as the unit runs it,
        in a namespace where `local` is /usr/local."""
        r = run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                 'mount --bind "$1" /usr/local && exec /usr/bin/python3 -I -S "$2" --version',
                 'sh', local, SCRIPT_PATH])
        self.assertEqual(r.code, 0, r)
        return r.stdout.strip()

    def test_the_launcher_runs_the_module_with_fresh_stale_or_no_bytecode(self):
        r, local, etc = self.namespace_run()
        self.assertOK(r)
        module = local + '/lib/azure-provisioning/azure_provisioning.py'
        cache = local + '/lib/azure-provisioning/__pycache__'
        self.assertRegex(self.installed_version(local), r'^azure-provisioning \d+\.\d+\.\d+$')
        # stale: the module changed after it was compiled (an upgrade by hand)
        text = read(module)
        write(module, re.sub(r"\nVERSION = '[^']*'", "\nVERSION = '9.8.7'", text))
        self.assertEqual(self.installed_version(local), 'azure-provisioning 9.8.7')
        # missing: only slower
        shutil.rmtree(cache)
        self.assertEqual(self.installed_version(local), 'azure-provisioning 9.8.7')

    def test_install_on_this_machine_in_a_namespace(self):
        r, local, etc = self.namespace_run()
        if r.code != 0 and 'unshare' in r.stderr and 'Operation not permitted' in r.stderr:
            skip(self, 'unshare --mount is not permitted here: %s' % r.stderr.strip())
        self.assertOK(r)
        self.assertIn('checked the image with /usr/bin/python3 (azure-provisioning --check)',
                      r.stdout)
        self.assertIn('check: ok    python: /usr/bin/python3 is Python', r.stdout)
        self.assertIn('(checked by running it)', r.stdout)
        self.assertEqual(stat.S_IMODE(os.stat(local + '/sbin/azure-provisioning').st_mode), 0o755)
        self.assertEqual(read(local + '/sbin/azure-provisioning'), self.expected_launcher())
        self.assertEqual(read(local + '/lib/azure-provisioning/azure_provisioning.py'),
                         read(os.path.join(self.src, 'azure_provisioning.py')))
        # compiled by the interpreter the unit runs, where the launcher imports it from
        version = run(['/usr/bin/python3', '-c', 'import sys; print(sys.implementation.cache_tag)'])
        self.assertEqual(os.listdir(local + '/lib/azure-provisioning/__pycache__'),
                         ['azure_provisioning.%s.pyc' % version.stdout.strip()])
        self.assertIn('compiled /usr/local/lib/azure-provisioning/azure_provisioning.py with '
                      '/usr/bin/python3', r.stdout)
        self.assertEqual(read(etc + '/' + UNIT_NAME), self.expected_unit())
        link = etc + '/multi-user.target.wants/' + UNIT_NAME
        self.assertEqual(os.readlink(link), UNIT_PATH)
        self.assertFalse(os.path.exists(SCRIPT_PATH), 'installed on the real machine!')
        r, local, etc = self.namespace_run('--uninstall')
        self.assertOK(r)
        self.assertFalse(os.path.lexists(link))
        self.assertFalse(os.path.lexists(local + '/sbin/azure-provisioning'))
        self.assertFalse(os.path.lexists(local + '/lib/azure-provisioning'))
        self.assertFalse(os.path.lexists(local + '/share/doc/azure-provisioning'))

    def test_python_without_full_stdlib_on_this_machine(self):
        # python3-minimal for real: the distribution's interpreter with a
        # standard library lacking json/ and xml/ (prefix found from the
        # binary's place).
        self.require_root()
        exe, stdlibs = system_python()
        if exe is None or not re.search(r'python\d+\.\d+$', exe):
            skip(self, 'no versioned /usr/bin/python3 here to build a python3-minimal copy')
        prefix = os.path.join(self.tmp, 'minimal')
        os.makedirs(prefix + '/bin')
        shutil.copy2(exe, prefix + '/bin/' + os.path.basename(exe))
        stdlib = prefix + '/lib/' + os.path.basename(exe)
        shutil.copytree(stdlibs[0], stdlib, symlinks=True, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns('json', 'xml', 'site-packages',
                                                      'dist-packages', 'test'))
        python = prefix + '/bin/' + os.path.basename(exe)
        check = run([python, '-E', '-S', '-c', 'import os'])
        if check.code != 0:
            skip(self, 'a relocated copy of %s does not start: %s' % (exe, check.stderr))
        r, local, etc = self.namespace_run('--python', python)
        self.assertFailed(r, 1, 'cannot run it (exit status 1): azure-provisioning: this Python '
                          '(%s) has no json module: install the full python3 package, not '
                          'python3-minimal' % '.'.join(map(str, sys.version_info[:2]))
                          if os.path.realpath(exe) == os.path.realpath(sys.executable)
                          else 'has no json module')
        self.assertNotIn('shutil', r.stderr)

    def test_old_python_on_this_machine(self):
        self.require_root()
        python = os.path.expanduser('~/.pyenv/versions/2.7.18/bin/python2.7')
        if not os.path.exists(python):
            skip(self, '%s not installed: no old interpreter to refuse' % python)
        r, local, etc = self.namespace_run('--python', python)
        self.assertFailed(r, 1, 'installed, but the unit cannot run: %s is Python 2.7 (from the '
                          'file name %s); 3.6 or newer is needed' % (python, python))
        self.assertIn('judging %s by its files (it is older than Python 3.6 or does not run '
                      'here: Unknown option: -I' % python, r.stdout)

    def as_nobody(self):
        """argv prefix that runs a command as nobody, or [] when not root."""
        if os.geteuid() != 0:
            return []
        setpriv = shutil.which('setpriv')
        if not setpriv:
            skip(self, 'running as root and no setpriv to become nobody')
        return [setpriv, '--reuid=%d' % NOBODY, '--regid=%d' % NOBODY, '--clear-groups']

    def test_refuses_non_root_without_root_option(self):
        prefix = self.as_nobody()
        r = self.install(prefix=prefix)
        self.assertFailed(r, 1, 'must be run as root', '--root DIR')
        self.assertEqual(len(r.stderr.splitlines()), 1, str(r))

    def test_non_root_may_install_into_its_own_tree(self):
        prefix = self.as_nobody()
        root = self.image()
        if prefix:
            for top, dirs, files in os.walk(self.tmp):
                for name in dirs + files:
                    os.lchown(os.path.join(top, name), NOBODY, NOBODY)
            os.lchown(self.tmp, NOBODY, NOBODY)
        before = snapshot(root)
        r = self.install('--root', root, prefix=prefix)
        self.assertOK(r)
        self.assertIn('judging /usr/bin/python3 by its files (not root, so it cannot be run '
                      'with chroot)', r.stdout)
        self.assertIn(FILES_OK, r.stdout)
        self.assertInstalled(root)
        self.assertOK(self.install('--root', root, '--uninstall', prefix=prefix))
        self.assertEqual(snapshot(root), before, tree_diff(before, snapshot(root)))


if __name__ == '__main__':
    unittest.main()
