"""The provisioning media: ovf-env.xml parsed from the real samples and hostile
variants; the search order and the mount/unmount sequence with stand-in mount and
umount commands (the mount step is the seam: this machine's kernel mounts neither
UDF nor ISO 9660, the boot test mounts the real disc in a guest); the password
set with chpasswd in a private host (root) and found nowhere else; runs with the
media on a temporary root (no root needed); custom data and user data kept for the
hooks."""

import ast
import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import unittest
import unittest.mock

import azure_provisioning as ap
from tests.fake_azure import DEFAULT_VM_ID, FakeAzure, make_instance_document, make_ovf_env
from tests.support import (SCRIPT, PrivateHost, TemporaryRoot, in_root, is_root, one_step,
                           require_root, root_with_kvp_pool, skip)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
PASSWORD = 'S3cret<&\'"$;:pw %s' % 'x'      # XML and shell specials, a space
SSHD_CONFIG = 'Include /etc/ssh/sshd_config.d/*.conf\nPort 22\n'


def sample(name):
    with open(os.path.join(DATA, name), 'rb') as f:
        return f.read()


class QuietLog(ap.Log):
    def __init__(self):
        ap.Log.__init__(self)
        self.lines = []

    def write(self, message):
        self.lines.append(message)


class ParseSamples(unittest.TestCase):

    def test_walinuxagent_sample_with_valid_custom_data(self):
        data = sample('walinuxagent__ovf-env.xml').replace(
            b'<CustomData>CustomData</CustomData>',
            b'<CustomData>' + base64.b64encode(b'#!/bin/sh\necho hi\n\x00\xff') + b'</CustomData>')
        media = ap.parse_ovf_env(data, '/dev/sr0')
        self.assertEqual((media.device, media.hostname, media.username, media.password,
                          media.disable_password_auth, media.provision_agent),
                         ('/dev/sr0', 'HostName', 'UserName', 'UserPassword', 'false', 'false'))
        self.assertEqual(media.public_keys, [('$HOME/UserName/.ssh/authorized_keys',
                                              'ssh-rsa AAAANOTAREALKEY== foo@bar.local')])
        self.assertEqual(media.custom_data, b'#!/bin/sh\necho hi\n\x00\xff')

    def test_the_placeholder_custom_data_is_not_base64(self):
        # the sample's literal "CustomData" (10 characters): a reported failure
        with self.assertRaisesRegex(ValueError, r'^CustomData is not valid base64$'):
            ap.parse_ovf_env(sample('walinuxagent__ovf-env.xml'))

    def test_every_sample(self):
        expected = {
            'walinuxagent__ovf-env-2.xml': ('HostName', 'UserName', 'true'),
            'walinuxagent__ovf-env-3.xml': ('HostName', 'UserName', ''),
            'walinuxagent__ovf-env-4.xml': ('HostName', 'UserName', 'bad data'),
            'azure-init__media-test_get_ovf_env_none_missing.xml': ('myhostname', 'myusername',
                                                                     'true'),
            'cloud-init__test_azure-construct_ovf_env-defaults.xml': ('test-host', 'test-user',
                                                                      'false'),
        }
        for name, (host, user, agent) in expected.items():
            with self.subTest(name=name):
                data = sample(name).replace(b'<CustomData>CustomData</CustomData>', b'')
                media = ap.parse_ovf_env(data)
                self.assertEqual((media.hostname, media.username, media.provision_agent),
                                 (host, user, agent))
        # <UserPassword></UserPassword> is no password
        media = ap.parse_ovf_env(sample('azure-init__media-test_get_ovf_env_none_missing.xml'))
        self.assertIsNone(media.password)
        self.assertEqual(media.disable_password_auth, 'false')
        # ns0:/ns1: prefixes: found by local name; no SSH section, no custom data
        media = ap.parse_ovf_env(sample('cloud-init__test_azure-construct_ovf_env-defaults.xml'))
        self.assertEqual((media.password, media.public_keys, media.custom_data), (None, [], None))

    def test_what_the_emulator_writes(self):
        text = make_ovf_env('web-7', 'alice', password=PASSWORD, disable_ssh_password_auth=False,
                            public_keys=['ssh-ed25519 AAAAC3Nza alice@x', 'ssh-rsa AAAAB3 b@y'],
                            custom_data=b'\x00\x01 custom')
        media = ap.parse_ovf_env(text.encode('utf-8'))
        self.assertEqual((media.hostname, media.username, media.password,
                          media.disable_password_auth, media.custom_data),
                         ('web-7', 'alice', PASSWORD, 'false', b'\x00\x01 custom'))
        self.assertEqual([v for _, v in media.public_keys],
                         ['ssh-ed25519 AAAAC3Nza alice@x', 'ssh-rsa AAAAB3 b@y'])
        self.assertEqual({p for p, _ in media.public_keys}, {'/home/alice/.ssh/authorized_keys'})

    def test_the_password_is_never_shown(self):
        media = ap.parse_ovf_env(make_ovf_env('h', 'alice', password=PASSWORD).encode())
        for text in (repr(media), str(media), ap.describe_media(media), '%r' % (media,)):
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn('S3cret', text)
        self.assertIn('password (set)', ap.describe_media(media))
        request = ap.user_with_media(ap.UserRequest('alice', [], [], None, None), media)
        self.assertEqual(request.password, PASSWORD)
        self.assertNotIn('S3cret', repr(request))


class HostileDocuments(unittest.TestCase):
    GOOD = make_ovf_env('h', 'alice').encode()

    def test_refused(self):
        cases = {
            'document declares a DOCTYPE': b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]>'
                                           b'<Environment>&a;</Environment>',
            'not <Environment>': b'<GoalState/>',
            'not well-formed': self.GOOD[:-20],
            'nested deeper than': b'<Environment>' + b'<a>' * 40 + b'</a>' * 40 + b'</Environment>',
            'more than 1048576': b'<Environment>' + b' ' * (1 << 20) + b'</Environment>',
            'CustomData is not valid base64': self.GOOD.replace(
                b'</UserName>', b'</UserName><CustomData>%%%not base64</CustomData>'),
        }
        for why, data in cases.items():
            with self.subTest(why=why):
                with self.assertRaises(ValueError) as caught:
                    ap.parse_ovf_env(data)
                self.assertIn(why, str(caught.exception))

    def test_missing_sections_are_empty_not_errors(self):
        media = ap.parse_ovf_env(b'<Environment/>')
        self.assertEqual((media.hostname, media.username, media.password, media.public_keys,
                          media.custom_data, media.disable_password_auth), ('', '', None, [], None, ''))

    def test_custom_data_with_line_breaks_and_a_huge_field(self):
        blob = os.urandom(48 * 1024)
        wrapped = base64.encodebytes(blob)          # 76-column lines, as some tools write
        data = self.GOOD.replace(b'</UserName>', b'</UserName><CustomData>' + wrapped +
                                 b'</CustomData>')
        self.assertEqual(ap.parse_ovf_env(data).custom_data, blob)

    def test_public_keys_stay_paired(self):
        data = self.GOOD.replace(b'</UserName>', b'</UserName><SSH><PublicKeys>'
                                 b'<PublicKey><Value>k1</Value></PublicKey>'
                                 b'<PublicKey><Path>/p2</Path><Value>k2</Value></PublicKey>'
                                 b'</PublicKeys></SSH>')
        self.assertEqual(ap.parse_ovf_env(data).public_keys, [('', 'k1'), ('/p2', 'k2')])


STAND_IN_MOUNT = '''#!/bin/sh
# stand-in: "mounts" a directory by copying its ovf-env.xml, and logs its argv; any
# other mount (the private host's bind mounts) is the real one's
case "$*" in *azure-provisioning-media.*) ;; *) exec %s "$@" ;; esac
echo "mount $*" >> "$AZP_TOOL_LOG"
for last; do :; done
device=$5
[ "$1 $2 $3 $4" = "-o ro,nodev,nosuid,noexec -t udf,iso9660" ] ||
    { echo "bad options: $*" >&2; exit 32; }
[ -d "$device" ] || { echo "mount: $device: unknown filesystem type" >&2; exit 32; }
cp -a "$device"/. "$last"/ 2>/dev/null
exit 0
''' % (shutil.which('mount') or '/bin/mount')
STAND_IN_UMOUNT = '''#!/bin/sh
case "$*" in *azure-provisioning-media.*) ;; *) exec %s "$@" ;; esac
echo "umount $*" >> "$AZP_TOOL_LOG"
for last; do :; done
find "$last" -mindepth 1 -delete
''' % (shutil.which('umount') or '/bin/umount')


class MediaRoot(unittest.TestCase):
    """A temporary root with stand-in mount/umount on PATH, for find_media."""

    def setUp(self):
        self.root, _ = root_with_kvp_pool(self, 'azp-media-')
        os.makedirs(os.path.join(self.root, 'run'))
        os.makedirs(os.path.join(self.root, 'dev'))
        self.tools = tempfile.mkdtemp(prefix='azp-media-tools-')
        self.addCleanup(shutil.rmtree, self.tools)
        for name, text in (('mount', STAND_IN_MOUNT), ('umount', STAND_IN_UMOUNT)):
            with open(os.path.join(self.tools, name), 'w') as f:
                f.write(text)
            os.chmod(os.path.join(self.tools, name), 0o755)
        self.log_file = os.path.join(self.tools, 'log')
        env = {'PATH': self.tools + os.pathsep + os.environ.get('PATH', ''),
               'AZP_TOOL_LOG': self.log_file, 'AZP_MOUNTED': os.path.join(self.tools, 'mounted')}
        old = dict((k, os.environ.get(k)) for k in env)
        os.environ.update(env)
        self.addCleanup(lambda: [os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                                 for k, v in old.items()])

    def device(self, name, ovf=None):
        """A stand-in device: a directory under root/dev, holding ovf-env.xml or not."""
        path = os.path.join(self.root, 'dev', name)
        os.mkdir(path)
        if ovf is not None:
            with open(os.path.join(path, 'ovf-env.xml'), 'wb') as f:
                f.write(ovf)
        return path

    def run_context(self, media=None, timeout=30):
        """(the System of the root, its log); `media` is --media, for self.find."""
        log = QuietLog()
        self.choice = media
        # the run's reserve, as provision() keeps it
        deadline = ap.Deadline(timeout, reserve=min(60.0, timeout / 4.0))
        return ap.System(self.root, deadline, log), log

    def find(self, system):
        """The media, as the media step finds it; self.problem: why none could be read."""
        media, self.problem = ap.find_media(system, self.choice)
        return media

    def tool_log(self):
        try:
            with open(self.log_file) as f:
                return f.read().splitlines()
        except IOError:
            return []


class MediaSearch(MediaRoot):
    def test_order_sr0_first_then_other_cdroms(self):
        for name in ('hdc', 'cdrom1', 'sr1', 'sr0', 'sda', 'hda', 'ttyS0'):
            open(os.path.join(self.root, 'dev', name), 'w').close()
        run, _ = self.run_context()
        self.assertEqual([os.path.basename(d) for d in ap.cdrom_devices(run)],
                         ['sr0', 'sr1', 'cdrom1', 'hdc'])

    def test_mounted_read_only_privately_read_and_unmounted(self):
        ovf = make_ovf_env('web-7', 'alice', custom_data=b'data').encode()
        self.device('sr1')                      # no ovf-env.xml: the next one is tried
        self.device('sr0', b'<Environment><bad')   # is tried first... and is broken
        run, log = self.run_context()
        with self.assertRaisesRegex(ap.ProvisioningError, r'ovf-env.xml on .*/dev/sr0: not '
                                                          r'well-formed'):
            self.find(run)
        with open(os.path.join(self.root, 'dev', 'sr0', 'ovf-env.xml'), 'wb') as f:
            f.write(ovf)
        media = self.find(run)
        self.assertEqual((media.username, media.custom_data), ('alice', b'data'))
        lines = self.tool_log()
        # each mount: read-only, udf or iso9660, on a fresh directory under the root's /run,
        # and followed by its umount
        self.assertEqual(len(lines), 4, lines)
        for mount, umount in (lines[0:2], lines[2:4]):
            words = mount.split()
            self.assertEqual(words[:6], ['mount', '-o', 'ro,nodev,nosuid,noexec', '-t',
                                         'udf,iso9660',
                                         os.path.join(self.root, 'dev', 'sr0')])
            self.assertTrue(words[6].startswith(os.path.join(self.root, 'run',
                                                             'azure-provisioning-media.')))
            self.assertEqual(umount, 'umount ' + words[6])
        self.assertEqual(os.listdir(os.path.join(self.root, 'run')), [], 'mountpoint left')
        self.assertIn('media: %s/dev/sr0: ovf-env.xml read (host web-7, user alice, password '
                      '(none), DisableSshPasswordAuthentication true, 0 public key(s), custom '
                      'data 4 bytes)' % self.root, log.lines)

    def test_a_media_without_ovf_env_and_a_failing_mount_are_warnings(self):
        self.device('sr0')
        open(os.path.join(self.root, 'dev', 'sr1'), 'w').close()   # not mountable
        run, log = self.run_context()
        self.assertIsNone(self.find(run))
        self.assertIn('warning: media: %s/dev/sr0 has no ovf-env.xml' % self.root, log.lines)
        self.assertTrue([l for l in log.lines if 'unknown filesystem type' in l], log.lines)
        self.assertIn('unknown filesystem type', self.problem)
        self.assertEqual(os.listdir(os.path.join(self.root, 'run')), [])

    def test_no_media_and_none(self):
        run, log = self.run_context()
        self.assertIsNone(self.find(run))
        self.assertIn('media: no provisioning media found (IMDS alone)', log.lines)
        self.device('sr0', make_ovf_env('h', 'u').encode())
        run, log = self.run_context(media='none')
        self.assertIsNone(self.find(run))
        self.assertEqual(self.tool_log(), [])

    def test_media_option_names_the_device(self):
        path = self.device('elsewhere', make_ovf_env('h', 'bob').encode())
        self.device('sr0', make_ovf_env('h', 'not-this-one').encode())
        run, _ = self.run_context(media=path)
        self.assertEqual(self.find(run).username, 'bob')

    def test_an_ovf_env_that_is_no_regular_file(self):
        """A FIFO, a device, a link to /dev/zero: refused at once, in one line, memory
        bounded (the media is anyone's).  In a child: a hang or a read without end
        there fails the test instead of taking the suite down."""
        sr0 = self.device('sr0')
        target = os.path.join(sr0, 'ovf-env.xml')
        dev_zero = os.path.join(sr0, 'dev/zero')
        for kind in ('fifo', 'device', 'link'):
            with self.subTest(kind=kind):
                for path in (target, dev_zero):
                    if os.path.lexists(path):
                        os.remove(path)
                if kind == 'fifo':
                    os.mkfifo(target)
                elif not is_root():
                    continue    # mknod: root only
                elif kind == 'device':
                    os.mknod(target, stat.S_IFCHR | 0o644, os.makedev(1, 5))     # /dev/zero's
                else:       # the disc's own /dev/zero (nodev keeps it from working, too)
                    os.symlink('/dev/zero', target)
                    os.makedirs(os.path.dirname(dev_zero), exist_ok=True)
                    os.mknod(dev_zero, stat.S_IFCHR | 0o644, os.makedev(1, 5))
                run, _ = self.run_context(media=sr0)
                self.assertEqual(in_child(lambda: ap.find_media(run, sr0)[1]),
                                 'media: ovf-env.xml on %s: not a regular file' % sr0)
                self.assertEqual([l.split()[0] for l in self.tool_log()][-2:],
                                 ['mount', 'umount'])
        if not is_root():
            skip(self, 'mknod needs root: only the FIFO was tried, not a device nor a link')

    def test_umount_runs_even_when_the_deadline_has_passed(self):
        self.device('sr0', make_ovf_env('h', 'u').encode())
        run, _ = self.run_context()
        real = ap.Root.read

        def slow_read(root, *parts, **how):
            run.deadline.end = 0            # the deadline passes while the media is mounted
            return real(root, *parts, **how)
        with unittest.mock.patch.object(ap.Root, 'read', slow_read):
            self.find(run)
        self.assertEqual([l.split()[0] for l in self.tool_log()], ['mount', 'umount'])


def in_child(function, seconds=20, memory=512 << 20):
    """function() run in a forked child with `memory` bytes of address space at most:
    its result (repr), or the test fails when the child hangs or dies."""
    import resource
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:    # the child: never back into unittest
        try:
            os.close(reader)
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            result = repr(function())
        except BaseException as exc:
            result = 'raised %r' % exc
        os.write(writer, result.encode('utf-8', 'replace'))
        os._exit(0)
    os.close(writer)
    end = time.monotonic() + seconds
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(reader)
            raise AssertionError('still running after %d s' % seconds)
        time.sleep(0.05)
    with os.fdopen(reader, 'rb') as f:
        text = f.read().decode()
    return text if text.startswith('raised') else ast.literal_eval(text)
# Issue 20 (17): the kernel attaches the CD-ROM while udev works through its queue
# (its driver loaded from the root file system, not the initramfs): this stand-in
# `udevadm settle` makes root/dev/sr0 appear, holding AZP_LATE_OVF, as it returns.
STAND_IN_UDEVADM = '''#!/bin/sh
echo "udevadm $*" >> "$AZP_TOOL_LOG"
if [ -n "$AZP_LATE_OVF" ]; then
    mkdir "$AZP_ROOT/dev/sr0" && cp "$AZP_LATE_OVF" "$AZP_ROOT/dev/sr0/ovf-env.xml"
fi
exit "${AZP_SETTLE_EXIT:-0}"
'''


# stand-in mount that records the SELinux label (LABEL_XATTR here) of the mountpoint
# and of its private parent at the moment of the mount, then "mounts" as STAND_IN_MOUNT
STAND_IN_MOUNT_LABELS = """#!%s
import os, subprocess, sys
target = sys.argv[-1]
with open(os.environ['AZP_TOOL_LOG'], 'a') as log:
    for path in (target, os.path.dirname(target)):
        try:
            label = os.getxattr(path, os.environ['AZP_LABEL_XATTR']).decode()
        except OSError:
            label = 'none'
        log.write('label %%s %%s\\n' %% (path, label.rstrip('\\0')))
os.execv(os.environ['AZP_MOUNT'], [os.environ['AZP_MOUNT']] + sys.argv[1:])
""" % sys.executable


class MediaLabel(MediaRoot):
    """Issue 23: under an enforcing policy the mount (its own domain, mount_t) may mount
    only on a mountpoint type.  A directory made in /run gets the type of whoever made
    it (init's runtime type for our unit): the mountpoint and its private parent carry
    the label of MEDIA_MOUNT_DIR itself.  A user.* attribute stands in for
    security.selinux (which needs SELinux itself)."""

    LABEL = b'system_u:object_r:var_run_t:s0\0'

    def setUp(self):
        MediaRoot.setUp(self)
        os.rename(os.path.join(self.tools, 'mount'), os.path.join(self.tools, 'mount.real'))
        with open(os.path.join(self.tools, 'mount'), 'w') as f:
            f.write(STAND_IN_MOUNT_LABELS)
        os.chmod(os.path.join(self.tools, 'mount'), 0o755)
        old = dict((k, os.environ.get(k)) for k in ('AZP_MOUNT', 'AZP_LABEL_XATTR'))
        os.environ.update(AZP_MOUNT=os.path.join(self.tools, 'mount.real'),
                          AZP_LABEL_XATTR='user.azp-label')
        self.addCleanup(lambda: [os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                                 for k, v in old.items()])
        for name, value in (('SELINUX_XATTR', 'user.azp-label'),
                            ('SELINUX_FS', self.tools)):      # "SELinux is on"
            self.addCleanup(setattr, ap, name, getattr(ap, name))
            setattr(ap, name, value)
        try:
            os.setxattr(os.path.join(self.root, 'run'), 'user.azp-label', self.LABEL)
        except OSError as exc:
            self.skipTest('no user.* extended attributes here: %s' % exc)

    def test_the_mountpoint_has_the_label_of_run(self):
        self.device('sr0', make_ovf_env('web-7', 'alice').encode())
        run, log = self.run_context()
        self.assertEqual(self.find(run).username, 'alice')
        labels = [l.split() for l in self.tool_log() if l.startswith('label ')]
        self.assertEqual(len(labels), 2, self.tool_log())
        self.assertTrue(labels[0][1].endswith('/media'), labels)
        self.assertEqual([l[2] for l in labels], [self.LABEL.decode().rstrip('\0')] * 2, labels)
        self.assertEqual(os.listdir(os.path.join(self.root, 'run')), [], 'mountpoint left')

    def test_a_label_that_cannot_be_copied_is_a_warning(self):
        self.device('sr0', make_ovf_env('web-7', 'alice').encode())
        run, log = self.run_context()
        with unittest.mock.patch.object(ap, 'copy_selinux_label', side_effect=PermissionError(
                1, 'Operation not permitted')):
            self.assertEqual(self.find(run).username, 'alice')
        self.assertTrue([l for l in log.lines if l.startswith('warning: media: cannot label')
                         and 'Operation not permitted' in l], log.lines)
        self.assertEqual(os.listdir(os.path.join(self.root, 'run')), [], 'mountpoint left')

    def test_without_selinux_no_label_is_copied(self):
        ap.SELINUX_FS = os.path.join(self.tools, 'no-selinux')
        self.device('sr0', make_ovf_env('web-7', 'alice').encode())
        run, log = self.run_context()
        self.assertEqual(self.find(run).username, 'alice')
        labels = [l.split() for l in self.tool_log() if l.startswith('label ')]
        self.assertEqual([l[2] for l in labels], ['none', 'none'], labels)


class MediaLate(MediaRoot):
    """No media at the first look: udev's queue is waited for (bounded by the
    deadline), then the search runs again."""

    def setUp(self):
        MediaRoot.setUp(self)
        with open(os.path.join(self.tools, 'udevadm'), 'w') as f:
            f.write(STAND_IN_UDEVADM)
        os.chmod(os.path.join(self.tools, 'udevadm'), 0o755)
        self.ovf = os.path.join(self.tools, 'late-ovf-env.xml')
        with open(self.ovf, 'wb') as f:
            f.write(make_ovf_env('web-7', 'alice', custom_data=b'late').encode())
        os.makedirs(os.path.join(self.root, 'run', 'udev'))
        open(os.path.join(self.root, 'run', 'udev', 'control'), 'w').close()  # udev runs
        self.environ(AZP_ROOT=self.root, AZP_LATE_OVF=self.ovf)

    def environ(self, **values):
        old = dict((k, os.environ.get(k)) for k in values)
        os.environ.update(values)
        self.addCleanup(lambda: [os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                                 for k, v in old.items()])

    def test_the_cdrom_attached_while_udev_settles_is_read(self):
        run, log = self.run_context(timeout=44)     # reserve 11 s: 33 s left; 30 at most
        media = self.find(run)
        self.assertIsNotNone(media, log.lines)
        self.assertEqual((media.username, media.custom_data), ('alice', b'late'))
        lines = self.tool_log()
        self.assertEqual(lines[0], 'udevadm settle --timeout=30', lines)
        self.assertEqual([l.split()[0] for l in lines[1:]], ['mount', 'umount'])
        self.assertIn(os.path.join(self.root, 'dev', 'sr0'), lines[1].split())
        self.assertTrue([l for l in log.lines if 'waited for udev' in l], log.lines)

    def test_the_wait_is_bounded_by_the_deadline(self):
        run, _ = self.run_context(timeout=8)    # 6 s left before the reserve
        self.find(run)
        settle = self.tool_log()[0].split()
        self.assertEqual(settle[:2], ['udevadm', 'settle'])
        self.assertLessEqual(int(settle[2][len('--timeout='):]), 6)
        self.assertGreaterEqual(int(settle[2][len('--timeout='):]), 5)

    def test_media_found_at_once_waits_for_nothing(self):
        self.device('sr0', make_ovf_env('web-7', 'bob').encode())
        run, _ = self.run_context()
        self.assertEqual(self.find(run).username, 'bob')
        self.assertEqual([l.split()[0] for l in self.tool_log()], ['mount', 'umount'])

    def test_without_udev_no_wait(self):
        """Nothing loads a driver later without udev: the search is final."""
        os.unlink(os.path.join(self.root, 'run', 'udev', 'control'))
        run, log = self.run_context()
        self.assertIsNone(self.find(run))
        self.assertEqual(self.tool_log(), [])
        self.assertIn('media: no provisioning media found (IMDS alone)', log.lines)

    def test_a_queue_that_does_not_settle_is_a_warning_and_the_search_goes_on(self):
        self.environ(AZP_SETTLE_EXIT='1')
        run, log = self.run_context()
        self.assertEqual(self.find(run).custom_data, b'late')
        self.assertTrue([l for l in log.lines if l.startswith('warning: media: udev')],
                        log.lines)

    def test_no_media_after_the_wait_either(self):
        self.environ(AZP_LATE_OVF='')
        run, log = self.run_context()
        self.assertIsNone(self.find(run))
        self.assertEqual(len(self.tool_log()), 1)
        self.assertIn('media: no provisioning media found (IMDS alone)', log.lines)


class SigtermWhileMounting(unittest.TestCase):
    def test_the_private_directories_go_and_terminated_goes_on(self):
        import signal
        root = tempfile.mkdtemp(prefix='azp-media-term-')
        self.addCleanup(shutil.rmtree, root)
        os.makedirs(os.path.join(root, 'run'))
        tools = tempfile.mkdtemp(prefix='azp-media-tools-')
        self.addCleanup(shutil.rmtree, tools)
        with open(os.path.join(tools, 'mount'), 'w') as f:
            f.write('#!/bin/sh\nkill -TERM %d\nsleep 10\n' % os.getpid())
        os.chmod(os.path.join(tools, 'mount'), 0o755)
        path = os.environ['PATH']
        os.environ['PATH'] = tools + os.pathsep + path
        self.addCleanup(os.environ.__setitem__, 'PATH', path)
        old = signal.signal(signal.SIGTERM, ap.raise_terminated)
        self.addCleanup(signal.signal, signal.SIGTERM, old)
        system = ap.System(root, ap.Deadline(30), QuietLog())
        with self.assertRaises(ap.Terminated):
            ap.find_media(system, '/dev/fake')
        self.assertEqual(os.listdir(os.path.join(root, 'run')), [])


class ToolInput(unittest.TestCase):
    def test_stdin_is_utf8_whatever_the_locale(self):
        out = tempfile.mkdtemp(prefix='azp-stdin-')
        self.addCleanup(shutil.rmtree, out)
        target = os.path.join(out, 'got')
        code = ('import sys; sys.path.insert(0, %r); import azure_provisioning as ap; '
                'ap.run_tool(["sh", "-c", "cat > %s"], ap.Deadline(10), "t", '
                'stdin="p\\u00e4ss\\u20ac:x")' % (os.path.dirname(SCRIPT), target))
        env = dict(os.environ, LC_ALL='C', LANG='C')
        env.pop('PYTHONUTF8', None)
        env.pop('PYTHONIOENCODING', None)
        done = subprocess.run([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(target, 'rb') as f:
            self.assertEqual(f.read(), 'p\u00e4ss\u20ac:x'.encode('utf-8'))

    def test_a_secret_echoed_with_odd_spacing_or_at_length_is_not_shown(self):
        for secret in ('two  spaces pw', 'x' * 260, 'tab\there'):
            with self.assertRaises(ap.ProvisioningError) as caught:
                ap.run_tool(['sh', '-c', 'read line; echo "no: $line" >&2; exit 1'],
                            ap.Deadline(10), 'user', stdin='alice:%s\n' % secret,
                            secret=secret)
            self.assertNotIn(secret[:8], str(caught.exception).replace('(secret)', ''))
            self.assertIn('alice:(secret)', str(caught.exception))


class FormattedDevices(unittest.TestCase):
    """The last resort: block devices whose volume descriptors say UDF or ISO 9660."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='azp-media-sig-')
        self.addCleanup(shutil.rmtree, self.root)

    def device(self, name, data):
        os.makedirs(os.path.join(self.root, 'sys/class/block', name))
        write_file(os.path.join(self.root, 'dev', name), data)
        return os.path.join(self.root, 'dev', name)

    def descriptors(self, *names):
        area = b''.join(b'\x00' + n + b'\x01' + b'\x00' * 2041 for n in names)
        return b'\x00' * ap.VOLUME_AREA + area

    def test_signatures(self):
        self.assertEqual(ap.filesystem_signature(self.device('iso', self.descriptors(
            b'CD001', b'CD001'))), 'iso9660')
        self.assertEqual(ap.filesystem_signature(self.device('udf', self.descriptors(
            b'BEA01', b'NSR03', b'TEA01'))), 'udf')
        self.assertEqual(ap.filesystem_signature(self.device('bridge', self.descriptors(
            b'CD001', b'CD001', b'BEA01', b'NSR02', b'TEA01'))), 'udf')
        self.assertIsNone(ap.filesystem_signature(self.device('ext4', b'\x00' * 70000)))
        self.assertIsNone(ap.filesystem_signature(self.device('short', b'CD001')))
        self.assertIsNone(ap.filesystem_signature(os.path.join(self.root, 'dev/absent')))
        system = ap.System(self.root, ap.Deadline(30), QuietLog())
        self.assertEqual([os.path.basename(d) for d in ap.formatted_devices(system)],
                         ['bridge', 'iso', 'udf'])

    def test_what_genisoimage_makes_is_udf(self):
        from tests.fake_azure import build_media
        if not shutil.which('genisoimage'):
            skip(self, 'no genisoimage (apt-get install genisoimage)')
        image = os.path.join(self.root, 'media.iso')
        build_media(image, make_ovf_env('h', 'u'))
        self.assertEqual(ap.filesystem_signature(image), 'udf')

    def test_tried_only_when_no_cdrom_held_the_media(self):
        system = ap.System(self.root, ap.Deadline(30), QuietLog())
        seen = []
        with unittest.mock.patch.object(ap, 'formatted_devices',
                                        lambda system: seen.append('probed') or []):
            with unittest.mock.patch.object(ap, 'read_first_media',
                                            lambda system, devices, problems: 'media' if devices else None):
                with unittest.mock.patch.object(ap, 'cdrom_devices', lambda system: ['/dev/sr0']):
                    self.assertEqual(ap.find_media(system, None), ('media', None))
                self.assertEqual(seen, [])
                with unittest.mock.patch.object(ap, 'cdrom_devices', lambda system: []):
                    self.assertEqual(ap.find_media(system, None), (None, None))
                self.assertEqual(seen, ['probed'])


def write_file(path, data):
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with open(path, 'wb') as f:
        f.write(data)


class UdfHint(unittest.TestCase):
    def test_names_the_missing_module(self):
        root = tempfile.mkdtemp(prefix='azp-udf-')
        self.addCleanup(shutil.rmtree, root)
        system = ap.System(root, ap.Deadline(30), QuietLog())
        hint = ap.udf_missing_hint(system)
        with open('/proc/filesystems') as f:
            if 'udf' in f.read():
                self.assertEqual(hint, '')
                return
        self.assertIn('cannot mount UDF', hint)
        self.assertIn('/lib/modules/%s' % os.uname().release, hint)
        module = os.path.join(root, 'lib/modules', os.uname().release, 'kernel/fs/udf')
        os.makedirs(module)
        open(os.path.join(module, 'udf.ko.xz'), 'w').close()
        self.assertEqual(ap.udf_missing_hint(system), '')


class KeptData(unittest.TestCase):

    def test_custom_and_user_data_files(self):
        root, _ = root_with_kvp_pool(self, 'azp-data-')
        system, facts = in_root(root)
        facts, plan = one_step(ap.plan_data, system, facts._replace(
            metadata={'compute': {'userData': base64.b64encode(b'user\x00data').decode()}},
            media=ap.parse_ovf_env(make_ovf_env('h', 'u', custom_data=b'#!/bin/sh\n').encode())),
            sys.stdout)
        self.assertEqual([action.fatal for action in plan], [True, True])
        directory = os.path.join(root, 'var/lib/azure-provisioning')
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        for name, data in (('custom-data', b'#!/bin/sh\n'), ('user-data', b'user\x00data')):
            path = os.path.join(directory, name)
            with open(path, 'rb') as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(ap.hook_environment(facts)['AZURE_CUSTOM_DATA'],
                         os.path.join(directory, 'custom-data'))
        self.assertEqual(ap.hook_environment(facts)['AZURE_USER_DATA'],
                         os.path.join(directory, 'user-data'))

    def test_none_means_no_file_and_no_variable(self):
        root, _ = root_with_kvp_pool(self, 'azp-data-')
        system, facts = in_root(root)
        facts, plan = one_step(ap.plan_data, system, facts._replace(
            metadata={'compute': {'userData': ''}}))
        self.assertEqual(plan, [])
        self.assertFalse(os.path.exists(os.path.join(root, 'var/lib/azure-provisioning')))
        self.assertNotIn('AZURE_CUSTOM_DATA', ap.hook_environment(facts))
        self.assertNotIn('AZURE_USER_DATA', ap.hook_environment(facts))

    def test_bad_user_data_names_the_field(self):
        with self.assertRaisesRegex(ap.ProvisioningError, r'^IMDS compute.userData is not '
                                                          r'valid base64$'):
            ap.imds_user_data({'compute': {'userData': 'not*base64'}})


def verify_password(shadow_hash, password):
    """Whether `password` matches the crypt(3) hash, by perl (no crypt module in 3.13)."""
    perl = shutil.which('perl')
    if not perl:
        return None
    check = subprocess.run([perl, '-e', 'my $p = <STDIN>; chomp $p; '
                            'print crypt($p, $ARGV[0]) eq $ARGV[0] ? "yes" : "no"', shadow_hash],
                           input=password + '\n', stdout=subprocess.PIPE, universal_newlines=True)
    return check.stdout == 'yes'


class MediaRun(unittest.TestCase):
    """Whole runs of the script with the media: mount/umount stand-ins and logging
    wrappers of chpasswd, useradd, usermod and visudo on PATH (self.tools), the
    disc a directory (self.media); the password is then looked for in every output.
    The host the runs act on is a subclass's (no tests of its own)."""

    def setUp(self):
        self.tools = tempfile.mkdtemp(prefix='azp-media-tools-')
        self.addCleanup(shutil.rmtree, self.tools)
        self.log_file = os.path.join(self.tools, 'argv.log')
        stand_ins = {'mount': STAND_IN_MOUNT, 'umount': STAND_IN_UMOUNT}
        for name in ('chpasswd', 'useradd', 'usermod', 'visudo'):
            real = ap.find_tool(name)
            if real:
                stand_ins[name] = ('#!/bin/sh\necho "%s $*" >> "$AZP_TOOL_LOG"\nexec %s "$@"\n'
                                   % (name, real))
        for name, text in stand_ins.items():
            with open(os.path.join(self.tools, name), 'w') as f:
                f.write(text)
            os.chmod(os.path.join(self.tools, name), 0o755)
        self.media = os.path.join(self.tools, 'sr0')
        os.mkdir(self.media)

    def ssh_and_sudo(self):
        os.makedirs(os.path.join(self.host.etc, 'ssh', 'sshd_config.d'), exist_ok=True)
        self.host.write('ssh/sshd_config', SSHD_CONFIG)

    def provision(self, az, ovf, *extra):
        if ovf is not None:
            with open(os.path.join(self.media, 'ovf-env.xml'), 'w') as f:
                f.write(ovf)
        env = dict(os.environ, PATH=self.tools + os.pathsep + os.environ['PATH'],
                   AZP_TOOL_LOG=self.log_file, AZURE_CUSTOM_DATA='/from/the/caller', AZP_MOUNTED=os.path.join(self.tools, 'mounted'))
        options = ['--wireserver', az.wireserver_addr, '--imds', az.imds_addr, '--timeout',
                   '30', '--media', self.media] + list(extra)
        run = self.run_on_host(options, env)
        self.assertNotIn('Traceback', run.stderr)
        return run

    def shadow_hash(self, name):
        for line in self.host.read('shadow').splitlines():
            if line.split(':')[0] == name:
                return line.split(':')[1]
        return None

    def assert_nowhere(self, az, run, *more):
        with open(self.log_file) as f:
            argv_log = f.read()
        self.assertIn('chpasswd', argv_log)
        outputs = [run.stdout, run.stderr, argv_log] + [repr(r) for r in az.health_reports]
        outputs += list(more)
        for text in outputs:
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn('S3cret', text)


class PasswordFromMedia(MediaRun):
    """The password really set, as root in a private host: useradd and chpasswd are
    the real ones (on the private /etc)."""

    def setUp(self):
        require_root(self)
        for tool in ('useradd', 'chpasswd', 'usermod'):
            if not ap.find_tool(tool):
                skip(self, 'no %s here (apt-get install passwd)' % tool)
        MediaRun.setUp(self)
        self.host = PrivateHost('web-7')
        self.addCleanup(self.host.cleanup)
        self.ssh_and_sudo()

    def run_on_host(self, options, env):
        return self.host.run([sys.executable, '-I', SCRIPT] + options, env=env)

    def test_password_set_unlocked_and_shown_nowhere(self):
        ovf = make_ovf_env('web-7', 'alice', password=PASSWORD, disable_ssh_password_auth=False)
        with FakeAzure(computer_name='web-7', admin_username='alice',
                       public_keys=[]) as az:
            run = self.provision(az, ovf, '--provision-user')
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        shadow = self.shadow_hash('alice')
        self.assertFalse(shadow.startswith('!'), 'account still locked')
        verified = verify_password(shadow, PASSWORD)
        if verified is None:
            skip(self, 'no perl to verify the crypt(3) hash with')
        self.assertTrue(verified, 'the password does not verify against /etc/shadow')
        self.assertEqual(self.host.read('ssh/sshd_config.d/50-azure-provisioning.conf')
                         .splitlines()[-1], 'PasswordAuthentication yes')
        sudoers = os.path.join(self.host.etc, 'sudoers.d', 'azure-provisioning')
        if os.path.isdir(os.path.dirname(sudoers)):
            with open(sudoers) as f:
                self.assertIn('alice ALL=(ALL) ALL\n', f.read())
        self.assertIn('media: %s: ovf-env.xml read (host web-7, user alice, password (set)'
                      % self.media, run.stderr)
        self.assert_nowhere(az, run)


class MediaOnATemporaryRoot(MediaRun):
    """Runs with the media that fail, warn or only print before an account tool
    would change an account, on a temporary root (no root needed); the hooks' data."""

    def setUp(self):
        MediaRun.setUp(self)
        self.host = TemporaryRoot('web-7')
        self.addCleanup(self.host.cleanup)
        self.ssh_and_sudo()

    def run_on_host(self, options, env):
        run = self.host.run(*options, env=env)
        self.assertEqual(run.hostname_after, self.host.hostname, run)
        return run

    def emulator(self, **fields):
        """The emulator, naming the VM as the run's host is named: no rename."""
        return FakeAzure(computer_name=self.host.hostname, **fields)

    def files_holding(self, text):
        """The files of the tree whose bytes hold `text`."""
        found = []
        for top, _, files in os.walk(self.host.dir):
            for name in files:
                with open(os.path.join(top, name), 'rb') as f:
                    if text.encode() in f.read():
                        found.append(os.path.join(top, name))
        return found

    def test_dry_run_shows_the_password_as_set_only(self):
        ovf = make_ovf_env('web-7', 'alice', password=PASSWORD, disable_ssh_password_auth=False)
        with self.emulator(admin_username='alice') as az:
            run = self.provision(az, ovf, '--provision-user', '--dry-run')
            self.assertEqual(run.code, 0, run)
        self.assertIn('would set the password of alice from the provisioning media: (set), '
                      'with chpasswd', run.stdout)
        self.assertIn('PasswordAuthentication yes', run.stdout)
        self.assertIsNone(self.shadow_hash('alice'))
        self.assertNotIn(PASSWORD, run.stdout + run.stderr)

    def test_without_provision_user_a_warning_and_ready(self):
        ovf = make_ovf_env('web-7', 'alice', password=PASSWORD)
        with self.emulator(admin_username='alice') as az:
            run = self.provision(az, ovf)
            self.assertEqual(run.code, 0, run)
            self.assertTrue(az.ready_accepted())
        self.assertIn('warning: the provisioning media holds a password for alice; not set: '
                      'this image does not manage users (no --provision-user)', run.stderr)
        self.assertIsNone(self.shadow_hash('alice'))
        self.assertNotIn(PASSWORD, run.stdout + run.stderr)
        self.assertEqual(self.files_holding(PASSWORD), [])     # the record, KVP, /etc...

    def test_different_user_names_are_a_reported_failure(self):
        ovf = make_ovf_env('web-7', 'mallory', password=PASSWORD)
        with self.emulator(admin_username='alice') as az:
            run = self.provision(az, ovf, '--provision-user')
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
        self.assertEqual(report['substatus'], 'ProvisioningFailed')
        self.assertIn('the provisioning media names the admin user mallory, IMDS alice',
                      report['description'])
        self.assertIn('step=media', report['description'])
        self.assertIsNone(self.shadow_hash('alice'))
        self.assertIsNone(self.shadow_hash('mallory'))

    def test_a_password_vm_without_readable_media_fails(self):
        document = make_instance_document('web-7', self.host.hostname, DEFAULT_VM_ID, 'alice',
                                          [], True)
        document['compute']['osProfile']['disablePasswordAuthentication'] = 'false'
        with self.emulator(admin_username='alice', imds_body=json.dumps(document)) as az:
            run = self.provision(az, None, '--provision-user')   # a disc without ovf-env.xml
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
        self.assertIn('the VM was created with a password (IMDS disablePasswordAuthentication '
                      'is false), but media: %s has no ovf-env.xml' % self.media,
                      report['description'])
        self.assertIn('step=media', report['description'])

    def test_hooks_get_the_custom_and_user_data_files(self):
        hooks = os.path.join(self.host.etc, 'azure-provisioning', 'ready.d')
        os.makedirs(hooks)
        seen = os.path.join(self.host.dir, 'seen')
        with open(os.path.join(hooks, '10-data'), 'w') as f:
            f.write('#!/bin/sh\nset -e\n{ echo "custom=$AZURE_CUSTOM_DATA user=$AZURE_USER_DATA"\n'
                    '  stat -c "%%a %%u %%n" "${AZURE_CUSTOM_DATA%%/*}" '
                    '"$AZURE_CUSTOM_DATA" "$AZURE_USER_DATA"\n'
                    '  cat "$AZURE_CUSTOM_DATA"; cat "$AZURE_USER_DATA"; } > %s\n' % seen)
        os.chmod(os.path.join(hooks, '10-data'), 0o755)
        ovf = make_ovf_env('web-7', 'alice', custom_data=b'#!/bin/sh\necho custom\n')
        with self.emulator(admin_username='alice', user_data=b'user data\n') as az:
            run = self.provision(az, ovf)
            self.assertEqual(run.code, 0, run)
        # in the root's /var/lib/azure-provisioning, the run's own (root's on a VM)
        kept = os.path.join(os.path.realpath(self.host.var_lib), 'azure-provisioning')
        with open(seen) as f:
            self.assertEqual(f.read(), 'custom={0}/custom-data user={0}/user-data\n'
                                       '700 {1} {0}\n'
                                       '600 {1} {0}/custom-data\n'
                                       '600 {1} {0}/user-data\n'
                                       '#!/bin/sh\necho custom\nuser data\n'
                                       .format(kept, os.geteuid()))
        # the data are kept, never run
        self.assertNotIn('custom', run.stdout)
        # none: the variables are unset, even when the caller's environment had them
        os.remove(os.path.join(self.media, 'ovf-env.xml'))
        with open(os.path.join(hooks, '10-data'), 'w') as f:
            f.write('#!/bin/sh\necho "custom=${AZURE_CUSTOM_DATA-unset} '
                    'user=${AZURE_USER_DATA-unset}" > %s\n' % seen)
        with self.emulator(admin_username='alice') as az:
            run = self.provision(az, make_ovf_env('web-7', 'alice'))
            self.assertEqual(run.code, 0, run)
        with open(seen) as f:
            self.assertEqual(f.read(), 'custom=unset user=unset\n')

    def test_chpasswd_failure_does_not_show_the_password(self):
        # a chpasswd that echoes its input in the error, as a hostile or broken one might
        with open(os.path.join(self.tools, 'chpasswd'), 'w') as f:
            f.write('#!/bin/sh\necho "chpasswd $*" >> "$AZP_TOOL_LOG"\nread line\n'
                    'echo "chpasswd: cannot set: $line" >&2\nexit 1\n')
        self.host.add_account('alice', 1500, '!')     # the image's: chpasswd is the first tool
        ovf = make_ovf_env('web-7', 'alice', password=PASSWORD)
        with self.emulator(admin_username='alice') as az:
            run = self.provision(az, ovf, '--provision-user')
            self.assertEqual(run.code, 1, run)
            report, = az.health_reports
        self.assertIn('chpasswd failed: chpasswd: cannot set: alice:(secret)',
                      report['description'])
        self.assert_nowhere(az, run)


if __name__ == '__main__':
    unittest.main()
