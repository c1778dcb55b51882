#!/usr/bin/env python3
"""azure-provisioning: first-boot provisioning for Azure images without an agent.

Runs once at first boot of a VM made from a generalized image that has neither
walinuxagent nor cloud-init.  In order:

  1. reads the instance metadata (IMDS), and the provisioning media when Azure
     attached one (ovf-env.xml: the admin password and the custom data),
  2. sets the hostname the user asked for (compute.osProfile.computerName) and
     makes the DHCP client announce it (that is how Azure DNS learns it),
  3. with --provision-user, creates the admin user with its SSH keys (and the
     password, when the media has one),
  4. gives this VM SSH host keys of its own (new ones when the image's were made
     for another VM, or for none),
  5. keeps the custom data and IMDS user data in /var/lib/azure-provisioning/,
  6. runs the image's own hooks in /etc/azure-provisioning/ready.d/,
  7. tells the WireServer "Ready" for the current goal-state incarnation, and
     records the run in /var/lib/azure-provisioning/state.json,

and when a step fails it reports NotReady/ProvisioningFailed with a short reason
instead (also to Hyper-V KVP), so that `az vm create` fails fast with that reason.
`--check` looks at an image before it is captured, `--deprovision` makes a VM an
image again, `--status` says what the record says.

Exit codes: 0 provisioned, 1 provisioning failed, 2 usage error.  --check: 0 the
image is ready, 1 it is not (a FAIL row), 3 the unit's Python cannot run this
program (a FAIL row saying why, and the last line on stderr: "error: the unit
cannot run: WHY (fix: FIX)"), 4 the check itself failed (an internal error,
said on stderr; no verdict); install.sh acts on these statuses alone.
Standard library only; Python 3.6 or newer.

The file reads top-down: system helpers (log and deadline, text, files under one
Root, tools, and System, the only way a run reaches the machine), transport
(HTTP/1.1 and the retry policy), WireServer, IMDS, the provisioning media, KVP,
hostname and its DHCP publishing, admin user, per-VM identity, hooks (and the
data kept for them), provisioning, then --deprovision, --status, --check and the
command line.

How provisioning is built, and where each part lives:
  Action, Facts   (after the error classes) what a step plans: what it says, its
                  doing, whether its failure fails the VM; and what the run has
                  learned, replaced step by step (hook_environment derives the
                  hooks' variables from it, in the hooks section)
  System          (after the tools) the files under the root (Root), the root's
                  own accounts, the hostname, the tools, the kernel, SELinux
  STEPS           (provisioning) the steps in order, each one or more planners
                  plan_X(facts, system) -> (facts, [Action]) that only read:
                  plan_imds, plan_media and plan_ready (provisioning),
                  plan_hostname then plan_publish (hostname), plan_user (admin
                  user), plan_identity (per-VM identity), plan_data and
                  plan_hooks (hooks)
  execute()       (provisioning) asks each planner and performs its actions in
                  order, timing the step; carry_out() is the one place --dry-run
                  is decided (it prints "would <says>" instead), and fail() the
                  one failure path: the reason logged, KVP, NotReady/
                  ProvisioningFailed to the WireServer, the record

Imports follow one rule: a module that every run to Ready uses is imported at the
top; any other is imported in the function that needs it (argparse for --help and
usage errors, subprocess for a tool, tempfile, shutil and threading for the media,
host keys and hooks, fcntl and struct for KVP and an interface's address, base64
for custom data and keys, traceback for -v), so that a run pays at start-up only
for what it does.  tests/test_startup.py holds the path to Ready to this rule.
"""

import errno
import itertools
import os
import re
import signal
import socket
import stat
import sys
import time
from collections import namedtuple

try:
    import json
    import xml.parsers.expat as expat
except ImportError as exc:      # Debian's python3-minimal has neither
    sys.exit('azure-provisioning: this Python (%d.%d) has no %s module: install the full '
             'python3 package, not python3-minimal' % (sys.version_info[:2] + (exc.name,)))

__all__ = ['ProvisioningError', 'main', 'provision']

VERSION = '0.1.0'
AGENT_NAME = 'azure-provisioning'

DEFAULT_WIRESERVER = '168.63.129.16'
DEFAULT_IMDS = '169.254.169.254'
DEFAULT_TIMEOUT = 1200          # seconds, like waagent's and cloud-init's waits
DOCUMENTATION_URL = 'https://aka.ms/linuxprovisioningerror'
MAX_DESCRIPTION = 512           # cloud-init's cut; the WireServer 500s on long ones
HOST_NAME_MAX = 64              # Linux; hostnamectl refuses longer names


class ProvisioningError(Exception):
    """Provisioning cannot go on; the message is one line, fit for Azure and the user."""


class Terminated(BaseException):
    """SIGTERM (systemd stopping the unit): unwinds like Ctrl-C, so that what is half
    done is cleaned up (temporary files), and is no provisioning failure to report."""


def raise_terminated(signum, frame):
    raise Terminated()


# --------------------------------------------------------------------------
# The shapes of a provisioning run: what a step plans (Action) and what the run
# has learned (Facts).  The machine is reached through System; STEPS and the
# executor that walks them are in the provisioning section (index: the docstring).
# --------------------------------------------------------------------------

# One thing a step does.  `says` is its line (--dry-run prints "would <says>");
# do() takes no argument and returns None or a dict of the facts it established
# (e.g. {'user_created': 'azureuser'}; 'warnings': a tuple to add), merged into
# the run's Facts.  fatal: its failure, of any type, fails the step; else the
# failure is a warning.  What a failing do() had made before it failed rides on
# the exception (with_facts), so that the record still says so.
Action = namedtuple('Action', 'says do fatal')
Action.__new__.__defaults__ = (True,)      # Python 3.6 has no namedtuple(defaults=)

# What a run has learned, replaced step by step (facts._replace), never changed in
# place: what was asked (options), read (metadata, media and why it could not be
# read, vm_id), set (hostname, renamed_to: the name this run gives the host,
# admin_user), made (user_created, user_creating: a
# useradd begun, user_claim_dropped: one that made nothing, host_keys and the VM
# they were made for, the custom_data and user_data files), the incarnation Azure
# accepted a report for, the warnings, and (step, seconds) of each step.  The
# hooks' environment (hook_environment) and the reports are derived from it.
Facts = namedtuple('Facts', 'options metadata media media_problem vm_id hostname renamed_to '
                            'admin_user user_created user_creating user_claim_dropped host_keys '
                            'host_keys_for custom_data user_data incarnation warnings steps')


def first_facts(options):
    """What a run knows before its first step: what it was asked."""
    return Facts(options=options, metadata=None, media=None, media_problem=None, vm_id='',
                 hostname=None, renamed_to=None, admin_user='', user_created=None,
                 user_creating=None, user_claim_dropped=False, host_keys=None, host_keys_for=None,
                 custom_data=None, user_data=None, incarnation=None, warnings=(), steps=())


def with_warning(facts, warning):
    return facts._replace(warnings=facts.warnings + (warning,))


def with_facts(exc, facts):
    """`exc`, carrying `facts` (a dict): what an action made before it failed, which
    the executor keeps for the record."""
    exc.facts = dict(getattr(exc, 'facts', None) or {}, **facts)
    return exc


# --------------------------------------------------------------------------
# Logging and time: one line per step on stderr (the unit sends it to
# journal+console), one deadline that every step shares
# --------------------------------------------------------------------------

class Log(object):
    def __init__(self, verbose=False, stream=None, quiet=False):
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def write(self, message):
        # one line each, no raw controls: a hook's colours, a CR or a newline from IMDS
        # must neither reach the console nor forge a line of ours
        self.stream.write('%s: %s\n' % (AGENT_NAME, printable(message)))
        self.stream.flush()

    def info(self, message):
        if self.verbose or not self.quiet:
            self.write(message)

    def debug(self, message):
        if self.verbose:
            self.write(message)

    def warning(self, message):
        self.write('warning: ' + message)

    def block(self, lines):
        """Lines without our prefix, for whoever parses the console (fingerprints)."""
        for line in lines:
            self.stream.write(printable(line) + '\n')
        self.stream.flush()

    def error(self, message):
        self.write('error: ' + message)

    def quieter(self):
        """The same log with info lines only under -v: for waits that are expected."""
        return Log(self.verbose, self.stream, quiet=True)


class Output(object):
    """Standard output that no line can break nor forge: each line made printable (a
    file name from an image may hold escape sequences or bytes no encoding has), and
    what the stream's encoding cannot carry written as a \\x escape, so that a strict
    ASCII stdout (Python 3.6 under LANG=C) never ends a run half-way."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = '\n'.join(printable(line) for line in text.split('\n'))
        encoding = getattr(self.stream, 'encoding', None)
        if encoding:
            try:
                text = text.encode(encoding, 'backslashreplace').decode(encoding)
            except LookupError:
                pass
        self.stream.write(text)

    def flush(self):
        self.stream.flush()


def elapsed_ms(started):
    return '%d ms' % round((time.monotonic() - started) * 1000)


class Deadline(object):
    """A point in time every step shares; `reserve` keeps time back for a failure report."""

    def __init__(self, seconds, reserve=0.0):
        self.end = time.monotonic() + seconds
        self.reserve = reserve

    def remaining(self):
        return max(0.0, self.end - self.reserve - time.monotonic())

    def without_reserve(self):
        whole = Deadline(0)
        whole.end = self.end
        return whole


# --------------------------------------------------------------------------
# Text: one line for logs and reports, and only what XML 1.0 allows
# --------------------------------------------------------------------------

def one_line(text, limit):
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


# Terminal escape sequences (colours, cursor moves) and every character XML 1.0
# forbids (C0 controls but tab/LF/CR, U+FFFE/U+FFFF, lone surrogates): a report that
# carried one would be refused with 400 and the VM would time out instead of failing.
# The forbidden ones listed, not the allowed ranges negated: the same set, and its
# pattern compiles in 0.1 ms instead of 4 at every start.
TERMINAL_ESCAPE = re.compile(r'\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\\\)?|.?)')
NOT_XML_TEXT = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]')


# what must not reach a terminal: controls (C0 but tab, C1) and bidi overrides, which
# could forge or hide a line of ours; and every line break of a terminal or of
# str.splitlines(): \n \r \v \f \x1c-\x1e \x85 (controls) and U+2028, U+2029
LOG_CONTROL = re.compile('[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e'
                         '\u2066-\u2069]')


def clean_text(text):
    """Text fit for XML 1.0 and KVP: escape sequences dropped, forbidden characters
    replaced by U+FFFD."""
    return NOT_XML_TEXT.sub('\ufffd', TERMINAL_ESCAPE.sub('', text))


def printable(text):
    """One line fit for a terminal or the console, whatever the text came from."""
    return LOG_CONTROL.sub('\ufffd', clean_text(text))


def decode_base64(text, field):
    """Strict base64 (line breaks allowed); ValueError naming the field, never the value."""
    import base64
    try:
        return base64.b64decode(''.join(text.split()), validate=True)
    except ValueError:      # binascii.Error is one
        raise ValueError('%s is not valid base64' % field)


def utc_timestamp():
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())


def xml_escape(text):
    return (clean_text(text).replace('&', '&amp;').replace('<', '&lt;')
            .replace('>', '&gt;'))


# --------------------------------------------------------------------------
# Files: one root for every path, walked without leaving it; reads bounded,
# writes atomic, every change made through the directory opened at that moment
# --------------------------------------------------------------------------

SELINUX_FS = '/sys/fs/selinux'     # mounted when SELinux is enabled
SELINUX_XATTR = 'security.selinux'
READ_MAX = 16 << 20     # bytes of one file we read: the largest (grub.cfg) are < 1 MiB
SYMLINKS_MAX = 40       # links followed in one path, as the kernel allows
PATH_MAX = 4096         # bytes of one path (and of a link's target), as the kernel allows
TEMPORARY_TRIES = 8     # random temporary names tried before a write gives up
# A directory of the walk: opened for lookups only, never through a link (O_NOFOLLOW)
OPEN_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A file to read: a FIFO must not block the open, a tty must not become ours
OPEN_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


def not_a_file(errno_):
    """Errors that say a path names no file: missing, a path no file can have (too
    long, a loop), a file where a directory is on the way."""
    return errno_ in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP)


def read_opened(opener, shown, limit):
    """The bytes of the file `opener` opens (a descriptor), or None when there is no
    such file (or it is a directory).  Anything but a regular file (a FIFO, a device,
    a socket) is an OSError before a byte is read, and so is more than `limit` bytes:
    the size is checked first and the reading stops at limit + 1 (a file that grows,
    /proc's that say 0)."""
    fd = open_regular(opener, shown, limit)
    return None if fd is None else b''.join(read_pieces(fd, shown, limit))


def open_regular(opener, shown, limit):
    """The descriptor `opener` opens when it is a regular file of at most `limit`
    bytes, None when there is no such file (or it is a directory); anything else is
    an OSError (see read_opened), the descriptor closed."""
    try:
        fd = opener()
    except ValueError:      # a NUL in the path (read from an image's config)
        return None
    except OSError as exc:
        if not_a_file(exc.errno) or exc.errno == errno.EISDIR:
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EINVAL, 'not a regular file', shown)
        if stat.S_ISREG(st.st_mode) and st.st_size > limit:
            raise OSError(errno.EFBIG, 'larger than %d bytes' % limit, shown)
    except BaseException:
        os.close(fd)
        raise
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        return None
    return fd


def read_pieces(fd, shown, limit):
    """The bytes of the regular file open as `fd`, in pieces as read, the descriptor
    closed when they end or are dropped part way (a generator never started closes
    nothing: callers start reading at once); an OSError past `limit` bytes."""
    try:
        size = 0
        while True:
            piece = os.read(fd, min(1 << 16, limit + 1 - size))
            if not piece:
                return
            size += len(piece)
            if size > limit:
                raise OSError(errno.EFBIG, 'larger than %d bytes' % limit, shown)
            yield piece
    finally:
        os.close(fd)


def read_bytes(path, limit=READ_MAX):
    """A file of this machine (/proc, /sys): its bytes, None when the path names no
    file; see read_opened.  An image's files are read with Root.read."""
    return read_opened(lambda: os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
                                       | os.O_CLOEXEC), path, limit)


def read_text(path):
    data = read_bytes(path)
    return data.decode('utf-8', 'replace') if data is not None else None


def kernel_filesystems():
    """The filesystem types the running kernel mounts now (/proc/filesystems: built
    in or loaded; a module not loaded yet is not among them).  Empty when unreadable."""
    try:
        text = (read_bytes('/proc/filesystems', limit=1 << 16) or b'').decode('ascii', 'replace')
    except OSError:
        return frozenset()
    return frozenset(line.split()[-1] for line in text.splitlines() if line.split())


def write_file_atomically(path, data, mode=None, owner=None, check=None, deadline=None):
    """A file of this machine written atomically (see Root.write)."""
    Root('/').write(os.path.abspath(path), data, mode=mode, owner=owner, check=check,
                    deadline=deadline)


class Root(object):
    """The filesystem every step reads and writes: '/' on a VM; a mounted image with
    --check, --deprovision, --status --root; a temporary tree in the tests.  Paths are
    given as on the VM.  Every read and change walks the path from the root itself:
    each directory is opened from its parent without following a link (O_NOFOLLOW);
    a link on the way is read and resolved as the image sees it (a relative one from
    where it is, an absolute one from the root, '..' never above the root), so that no
    link leads out of the root.  The change acts on the directory opened then
    (unlinkat, renameat, symlinkat): a directory swapped for a link after a plan was
    made cannot redirect it."""

    def __init__(self, top='/'):
        # resolved: '/.', '//' and a link to '/' are this machine, for every guard
        self.top = os.path.realpath(top)

    def path(self, *parts):
        """The path from here (for messages, tools, and this machine's files)."""
        return os.path.join(self.top, *[part.lstrip('/') for part in parts])

    def is_machine(self):
        """Whether this root is this machine's '/': by the directory itself, not its
        path, as a bind mount of '/' (a container's /host) has another path."""
        try:
            here = os.stat(self.top)
        except OSError:
            return self.top == '/'
        machine = os.stat('/')
        return (here.st_dev, here.st_ino) == (machine.st_dev, machine.st_ino)

    def __repr__(self):
        return 'Root(%r)' % self.top

    def locate(self, path, follow=True):
        """(descriptor of the directory that holds `path`'s last component, that
        component, the path as resolved inside the root); the caller closes the
        descriptor.  follow: a link as last component is resolved too.  One descriptor
        is open at a time, whatever the depth (a parent is closed once its child is
        open; '..' reopens the parent and checks it is the one walked through), and the
        kernel's bounds hold: PATH_MAX bytes of path, SYMLINKS_MAX links."""
        if len(path.encode('utf-8', 'surrogateescape')) >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
        pending = [p for p in path.split('/') if p not in ('', '.')][::-1]   # a stack
        fd = os.open(self.top, OPEN_DIRECTORY & ~os.O_NOFOLLOW)   # self.top is resolved
        names = []
        walked = [os.fstat(fd)[1:3]]     # (st_ino, st_dev) of each directory walked
        links = 0

        def enter(name):
            nonlocal fd
            opened = os.open(name, OPEN_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = opened
        try:
            while pending:
                name = pending.pop()
                if name == '..':
                    if names:
                        enter('..')
                        names.pop()
                        walked.pop()
                        if os.fstat(fd)[1:3] != walked[-1]:     # moved while walked
                            raise OSError(errno.ESTALE, 'a directory moved while walked', path)
                    continue
                if pending:
                    try:
                        enter(name)
                        names.append(name)
                        walked.append(os.fstat(fd)[1:3])
                        continue
                    except OSError as exc:
                        # a link, or a file where a directory should be
                        if exc.errno != errno.ENOTDIR:
                            raise
                try:
                    is_link = stat.S_ISLNK(os.stat(name, dir_fd=fd,
                                                   follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    is_link = False
                if not is_link and pending:
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                if not is_link or not follow and not pending:
                    found, fd = fd, None
                    return found, name, '/' + '/'.join(names + [name])
                links += 1
                if links > SYMLINKS_MAX:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(name, dir_fd=fd)
                if target.startswith('/'):
                    os.close(fd)
                    fd = None
                    fd = os.open(self.top, OPEN_DIRECTORY & ~os.O_NOFOLLOW)
                    del names[:], walked[1:]
                pending += [p for p in target.split('/') if p not in ('', '.')][::-1]
            found, fd = fd, None
            return found, '.', '/' + '/'.join(names)
        finally:
            if fd is not None:
                os.close(fd)

    def at(self, path, act, follow=True):
        """act(directory descriptor, name) for `path`, inside the root; an OSError
        names the path as on the VM."""
        try:
            fd, name, _ = self.locate(path, follow)
            try:
                return act(fd, name)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.filename == path:
                raise
            raise OSError(exc.errno, exc.strerror or str(exc), path)

    def read(self, *parts, **how):
        """The bytes of a regular file inside the root, None when there is no such
        file; limit= (default READ_MAX).  See read_opened."""
        pieces = self.pieces('/'.join(parts), how.get('limit', READ_MAX))
        return None if pieces is None else b''.join(pieces)

    def pieces(self, path, limit):
        """The bytes of the regular file `path` inside the root, in pieces as they are
        read (read_pieces: for a file too large to hold, an initramfs), None when there
        is no such file; opened and checked as Root.read does, before it returns."""
        try:
            fd = self.at(path, lambda fd, name: open_regular(
                lambda: os.open(name, OPEN_READ, dir_fd=fd), path, limit))
        except ValueError:      # a NUL in the path (read from an image's config)
            return None
        except OSError as exc:
            if not_a_file(exc.errno):
                return None
            raise
        return None if fd is None else read_pieces(fd, path, limit)

    def read_text(self, *parts):
        data = self.read(*parts)
        return data.decode('utf-8', 'replace') if data is not None else None

    def lstat(self, *parts):
        """The path's own stat (a link's, not its target's), None when it names nothing."""
        return self.stat(*parts, follow=False)

    def stat(self, *parts, **how):
        """The stat of what the path leads to inside the root (follow=False: of the
        path itself), None when it names nothing."""
        try:
            return self.at('/'.join(parts), lambda fd, name: os.stat(
                name, dir_fd=fd, follow_symlinks=False), follow=how.get('follow', True))
        except ValueError:
            return None
        except OSError as exc:
            if not_a_file(exc.errno):
                return None
            raise

    def exists(self, *parts):
        return self.lstat(*parts) is not None

    def is_file(self, *parts):
        found = self.stat(*parts)
        return found is not None and stat.S_ISREG(found.st_mode)

    def is_dir(self, *parts):
        found = self.stat(*parts)
        return found is not None and stat.S_ISDIR(found.st_mode)

    def access(self, path, mode):
        """os.access of what `path` leads to inside the root (os.W_OK: whether a name
        can be made in a directory; os.X_OK: whether a file can be run)."""
        return self.at(path, lambda fd, name: os.access(name, mode, dir_fd=fd))

    def resolve(self, path):
        """`path` with its links resolved inside the root (as far as it exists)."""
        try:
            fd, name, resolved = self.locate(path)
            os.close(fd)
            return resolved
        except (OSError, ValueError):
            return os.path.normpath('/' + path)

    def names(self, directory, pattern):
        """Names in `directory` matching the regular expression (see name_matches):
        none when there is no
        such directory; an OSError when it cannot be listed (unreadable, too many open
        files...), since "none" would mean "nothing to do" to a caller."""
        def listing(fd, name):
            opened = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=fd)
            try:
                return os.listdir(opened)
            finally:
                os.close(opened)
        try:
            return [n for n in self.at(directory, listing) if name_matches(pattern, n)]
        except ValueError:      # a NUL in the path (read from an image's config)
            return []
        except OSError as exc:
            if not_a_file(exc.errno):
                return []
            raise

    def remove(self, path):
        """Remove the file (or link) `path`, never a directory, in the directory that
        holds it now."""
        self.at(path, lambda fd, name: os.unlink(name, dir_fd=fd), follow=False)

    def make_dirs(self, path, mode=0o755):
        """The directories of `path` that are missing, made with `mode` whatever the
        umask (sshd and others refuse or ignore what a umask of 077 would make)."""
        def make(fd, name):
            try:
                os.mkdir(name, mode, dir_fd=fd)
            except FileExistsError:
                return
            os.chmod(name, mode, dir_fd=fd)
            sync_directory(fd)     # its name survives a power cut with what is written in it
        parts = [p for p in path.split('/') if p not in ('', '.')]
        for end in range(1, len(parts) + 1):
            self.at('/'.join(parts[:end]), make, follow=False)

    def symlink(self, target, path):
        """A link at `path` (its directories made) pointing to `target`."""
        self.make_dirs(os.path.dirname(path))
        self.at(path, lambda fd, name: os.symlink(target, name, dir_fd=fd), follow=False)

    def write(self, path, data, mode=None, owner=None, check=None, deadline=None):
        """Write via a temporary file and rename: a crash or SIGTERM leaves the old
        file or the new one, never half of one nor the temporary file.  The mode and
        owner asked for are enforced (an existing 0666 authorized_keys becomes 0600);
        not given, an existing file's are kept (new files: 0644, ours).  `check` is a
        command run on the temporary file first (e.g. visudo -cf), bounded by
        `deadline`; on SELinux the new file gets the old one's label.  A link at
        `path` is replaced, not followed."""
        self.at(path, lambda fd, name: write_at(fd, name, data, mode, owner, check,
                                                deadline or Deadline(TOOL_TIMEOUT)),
                follow=False)


def clear_temporary_files(directory, name):
    """Remove the temporary files of `name` that a power cut left (.NAME.HEX.tmp, and
    an older version's .NAME.PID.tmp) in the directory open as `directory`: regular
    files only; anything else of such a name (a directory an image holds) is not ours
    and stays.  Best effort: a directory that cannot be listed keeps them."""
    left = re.compile(re.escape('.%s.' % name) + r'[0-9a-f]{1,32}\.tmp\Z')
    try:
        opened = os.open('.', os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory)
        try:
            found = [n for n in os.listdir(opened) if left.match(n)]
        finally:
            os.close(opened)
        for tmp in found:
            if stat.S_ISREG(os.stat(tmp, dir_fd=directory, follow_symlinks=False).st_mode):
                os.unlink(tmp, dir_fd=directory)
    except OSError:
        pass


def write_at(directory, name, data, mode, owner, check, deadline):
    """Root.write's work, in the directory open as `directory`."""
    try:
        st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        existing = stat.S_ISREG(st.st_mode)
    except FileNotFoundError:
        existing = False
    if existing:
        mode = st.st_mode & 0o7777 if mode is None else mode
        owner = owner or (st.st_uid, st.st_gid)
    elif mode is None:
        mode = 0o644
    clear_temporary_files(directory, name)
    tmp = fd = None
    try:
        # a name no one can have made ready for us (a hostile image's directory of a
        # predictable name would stop the write), made with O_EXCL; opened inside the
        # try: a SIGTERM handled right after open() returns must still remove it
        for _ in range(TEMPORARY_TRIES):
            tmp = '.%s.%s.tmp' % (name, os.urandom(8).hex())
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=directory)
                break
            except FileExistsError:
                tmp = None
        if fd is None:
            raise OSError(errno.EEXIST, 'no free temporary name', name)
        # what a tool (visudo) is given: this very directory, whatever happens to its path
        tmp_path = '/proc/%d/fd/%d/%s' % (os.getpid(), directory, tmp)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if owner is not None:
                try:
                    os.fchown(f.fileno(), *owner)
                except PermissionError:
                    pass    # not root (tests): the file stays ours
            os.fchmod(f.fileno(), mode)
        if check:
            run_tool(check + [tmp_path], deadline, 'checking %s' % name)
        if existing and os.path.isdir(SELINUX_FS):
            old = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            try:
                copy_selinux_label('/proc/self/fd/%d' % old, tmp_path)
            finally:
                os.close(old)
        os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp, dir_fd=directory)
            except OSError:
                pass
        raise
    sync_directory(directory)


def sync_directory(directory):
    """The names in the directory open as `directory` (an O_PATH descriptor will
    do) on the disk: a power cut keeps a file renamed or made in it."""
    opened = os.open('.', os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory)
    try:
        os.fsync(opened)
    finally:
        os.close(opened)


def sync_file(path):
    """The data of the regular file `path` (one of ours) on the disk."""
    fd = os.open(path, OPEN_READ)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_selinux_label(source, target):
    """The old file's SELinux context onto its replacement: a renamed-in file keeps
    the label of where it was made (net_conf_t on /etc/hosts would become etc_t).
    Nothing to copy when the old file has none (no policy loaded)."""
    try:
        label = os.getxattr(source, SELINUX_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    os.setxattr(target, SELINUX_XATTR, label)


def name_matches(pattern, name):
    """re.match of a file name, where a pattern's final `$` is the end of the name:
    re's `$` also matches before a final newline, which a file name may hold."""
    if pattern.endswith('$') and not pattern.endswith('\\$'):
        pattern = pattern[:-1] + r'\Z'
    return re.match(pattern, name) is not None


def glob_names(directory, pattern):
    """Names in this machine's `directory` matching the regular expression (none when
    unreadable; see name_matches); an image's: Root.names."""
    try:
        return [n for n in os.listdir(directory) if name_matches(pattern, n)]
    except OSError:
        return []


# --------------------------------------------------------------------------
# Running tools: bounded by the deadline, never through a shell
# --------------------------------------------------------------------------

def describe_error(exc):
    if isinstance(exc, socket.timeout):
        return 'timed out'
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename:
            return '%s: %s' % (exc.filename, exc.strerror)
        return exc.strerror
    return str(exc) or exc.__class__.__name__


TOOL_TIMEOUT = 60.0     # seconds for one command, at most: the deadline may cut it shorter
TOOL_KILL_GRACE = 2.0   # seconds for a killed command's pipes to close


def run_tool(argv, deadline, what, stdin=None, secret=None, accept=(0,)):
    """Run a command (never through a shell) within the deadline; its stdout, or
    ProvisioningError naming the command and its last words (an exit status not in
    `accept`).  It runs in a session of its own, so that at the deadline all of it
    goes: a child it left behind holding our pipes must not keep us waiting."""
    import subprocess
    limit = min(TOOL_TIMEOUT, deadline.remaining())
    if limit <= 0:
        raise ProvisioningError('%s: no time left to run %s' % (what, argv[0]))
    try:
        # UTF-8 whatever the locale (Python 3.6 under LANG=C would take ASCII)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None
                                   else subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, encoding='utf-8',
                                   errors='replace', start_new_session=True)
    except (OSError, ValueError) as exc:    # ValueError: a NUL in an argument
        raise ProvisioningError('%s: %s: %s' % (what, argv[0], describe_error(exc)))
    try:
        stdout, stderr = process.communicate(stdin, timeout=limit)
    except BaseException as exc:    # the time limit, or SIGTERM: the command goes too
        kill_session(process)
        process.stdout.close()
        process.stderr.close()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise ProvisioningError('%s: %s: timed out after %.1f s' % (what, argv[0], limit))
        raise
    if process.returncode not in accept:
        if secret:      # a tool may echo its input: no trace of it, before the text is cut
            stderr = stderr.replace(secret, '(secret)')
        raise ProvisioningError('%s: %s failed: %s' % (
            what, argv[0], one_line(stderr, 200) or 'exit status %d' % process.returncode))
    return stdout


def kill_session(process, grace=TOOL_KILL_GRACE):
    """SIGKILL to the session a command of ours leads (its children too), then wait
    for it, `grace` seconds at most: a process stuck in the kernel cannot be waited for."""
    import subprocess
    try:
        os.killpg(process.pid, 9)
    except OSError:
        pass    # already gone
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return False
    return True


def find_tool(name):
    """A command's path: PATH first, then the sbin directories PATH may lack."""
    directories = os.environ.get('PATH', '').split(os.pathsep) + ['/usr/sbin', '/sbin',
                                                                   '/usr/bin', '/bin']
    for directory in directories:
        path = os.path.join(directory, name)
        if directory and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


# --------------------------------------------------------------------------
# System: the only way a provisioning run reaches the machine
# --------------------------------------------------------------------------

# An entry of the root's /etc/passwd: what useradd made, or the image holds
Account = namedtuple('Account', 'name uid gid home shell')
ACCOUNT_TOOLS_WITH_ROOT = ('useradd', 'usermod', 'userdel', 'groupdel', 'chpasswd')
USERADD_DEFAULTS = '/etc/default/useradd'
HOME_BASE = '/home'         # useradd's HOME where /etc/default/useradd does not say


class System(object):
    """The machine one run looks at and changes: its files under the root (Root:
    every path contained in it, checked at the action), its accounts as the root's
    own /etc/passwd and login.defs say (never this process's NSS), its hostname,
    its tools (bounded by the run's deadline; the account tools act on the root),
    the live kernel's file systems and the SELinux labels.  `deadline` and `log`
    are the run's."""

    def __init__(self, root, deadline, log):
        self.files = root if isinstance(root, Root) else Root(root)
        self.deadline = deadline
        self.log = log

    def is_machine(self):
        return self.files.is_machine()

    def run(self, argv, what, stdin=None, secret=None, accept=(0,), deadline=None):
        """run_tool within the run's deadline (or a shorter one given)."""
        return run_tool(argv, deadline or self.deadline, what, stdin=stdin, secret=secret,
                        accept=accept)

    def account_tool(self, name, *arguments):
        """The argv of a shadow tool (useradd, usermod...) acting on the root's account
        files: --root ROOT where the root is not this machine."""
        argv = [find_tool(name) or name]
        if name in ACCOUNT_TOOLS_WITH_ROOT and not self.is_machine():
            argv += ['--root', self.files.top]
        return argv + list(arguments)

    def account(self, name):
        """`name`'s Account in the root's /etc/passwd, None when it has no (well-formed)
        entry: a line glibc would skip is none to it either."""
        fields = account_entry(self.files, '/etc/passwd', name)
        if fields is None or len(fields) < 7 or not all(DECIMAL.fullmatch(f) for f in fields[2:4]):
            return None
        return Account(name, int(fields[2]), int(fields[3]), fields[5], fields[6])

    def user_uids(self):
        return user_uids(self.files)

    def login_shell(self):
        """/bin/bash when the root has it (a regular file anyone may run), else /bin/sh."""
        found = self.files.stat('/bin/bash')
        if found is not None and stat.S_ISREG(found.st_mode) and found.st_mode & 0o111:
            return '/bin/bash'
        return '/bin/sh'

    def home_base(self):
        """Where useradd makes homes in this root: HOME= of its /etc/default/useradd
        (the last, as useradd reads it), else /home."""
        try:
            text = self.files.read_text(USERADD_DEFAULTS) or ''
        except OSError:     # a FIFO, a device, too large: useradd's default
            text = ''
        found = re.findall(r'^HOME=(/[^\s]*)$', text, re.M)
        return os.path.normpath(found[-1]) if found else HOME_BASE

    def hostname(self):
        return socket.gethostname()

    def set_hostname(self, name):
        """sethostname(2): the live name, in our UTS namespace."""
        try:
            socket.sethostname(name)
        except OSError as exc:
            raise ProvisioningError('cannot set hostname %s: %s' % (name, describe_error(exc)))

    def kernel_filesystems(self):
        """The file systems the running kernel mounts: this machine's, whatever the root."""
        return kernel_filesystems()

    def restore_labels(self, paths, what):
        """The SELinux policy's labels for files we made, where SELinux is on."""
        restorecon = find_tool('restorecon')
        if restorecon and os.path.isdir(SELINUX_FS):
            self.run([restorecon, '-R'] + list(paths), what)


# --------------------------------------------------------------------------
# Transport: HTTP/1.1 straight on a socket (never a proxy), one deadline, one
# retry policy.  Not http.client: its imports (email, ssl) cost more than this
# whole run does once started (tests/bench.py), for two link-local servers that
# speak plain HTTP.
#
# Retry or fail is decided by the exception's type, and only by it (with_retries):
#   TryAgain     a passing condition: refused, timed out, cut short, 5xx, 429, the
#                caller's retry statuses; retried with backoff until the deadline
#   Malformed    a TryAgain for an answer that cannot be read (not HTTP, too large,
#                a document that does not parse); retried MALFORMED_ANSWERS_ALLOWED times
#   any other    (ProvisioningError: an answer that will not change) fails at once
# --------------------------------------------------------------------------

REQUEST_TIMEOUT = 15.0          # per connect and per read
MAX_RESPONSE_BYTES = 1 << 20    # goal state and IMDS documents are a few KiB
BACKOFF_FIRST = 0.05            # seconds
BACKOFF_CAP = 0.3               # short: Ready must go out soon after the WireServer is up
STILL_WAITING_EVERY = 30.0      # seconds between "still retrying" lines
MALFORMED_ANSWERS_ALLOWED = 3   # a truncated answer may pass; a broken server won't


class TryAgain(Exception):
    """A passing condition: the attempt may succeed if made again later."""

    def __init__(self, problem, retry_after=None):
        Exception.__init__(self, problem)
        self.retry_after = retry_after


class Malformed(TryAgain):
    """An answer that cannot be read: retried, but only MALFORMED_ANSWERS_ALLOWED times."""


class NotHttp(Malformed):
    """The peer answered, but not in HTTP/1.x, or beyond MAX_RESPONSE_BYTES."""


class Response(object):
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def text(self):
        return self.body.decode('utf-8', 'replace')


def backoff_delay(attempt, retry_after=None, remaining=float('inf')):
    """The wait before attempt number `attempt` + 1, or None when none fits in the
    `remaining` seconds: capped exponential backoff with jitter.  A server's
    Retry-After can only make the wait longer ("Retry-After: 0" from a busy server
    must not become a flood), and one past the deadline is cut so that one more
    attempt fits."""
    delay = min(BACKOFF_CAP, BACKOFF_FIRST * (2 ** (attempt - 1)))
    jitter = int.from_bytes(os.urandom(2), 'big') / 65535.0
    delay *= 0.5 + jitter / 2
    if delay >= remaining:
        return None
    if retry_after is not None:
        delay = max(delay, min(retry_after, remaining - delay))
    return delay


def with_retries(what, attempt, deadline, log):
    """Call attempt() until it returns; TryAgain is retried (see the top of this
    section), any other exception goes to the caller."""
    started = time.monotonic()
    said = {}       # problem -> when it was last logged: a flapping error is said once
    tries = malformed = 0
    while True:
        tries += 1
        try:
            return attempt()
        except TryAgain as again:
            problem = str(again)
            malformed += isinstance(again, Malformed)
            if malformed >= MALFORMED_ANSWERS_ALLOWED:
                raise ProvisioningError('%s: %s (%d times)' % (what, problem, malformed))
            remaining = deadline.remaining()
            delay = backoff_delay(tries, again.retry_after, remaining)
            if delay is None:
                raise ProvisioningError(
                    '%s: %s; gave up after %d attempts in %.1f s (deadline)'
                    % (what, problem, tries, time.monotonic() - started))
            now = time.monotonic()
            if now - said.get(problem, -STILL_WAITING_EVERY) >= STILL_WAITING_EVERY:
                log.info('%s: %s; retrying (attempt %d, %.1f s left)'
                         % (what, problem, tries, remaining))
                said[problem] = now
            else:
                log.debug('%s: %s; retry in %.2f s' % (what, problem, delay))
            time.sleep(delay)


def parse_address(text, default_port=80):
    """'IP' or 'IP:PORT' or '[IPv6]' or '[IPv6]:PORT' -> (host, port).  Only IP
    addresses: a name would be a DNS lookup, retried until the deadline."""
    match = re.fullmatch(r'(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+))(?::([0-9]{1,5}))?', text.strip())
    if not match:
        raise ValueError('expected IP, IP:PORT or [IPv6]:PORT, got %r' % text)
    ipv6, ipv4, port = match.groups()
    try:
        socket.inet_pton(socket.AF_INET6 if ipv6 else socket.AF_INET, ipv6 or ipv4)
    except OSError:
        raise ValueError('not an IP address: %r' % text)
    port = int(port) if port else default_port
    if not 0 < port < 65536:
        raise ValueError('port out of range in %r' % text)
    return ipv6 or ipv4, port


def host_header(target):
    """The Host: value: the port unless it is 80, an IPv6 address in brackets."""
    host, port = target
    host = '[%s]' % host if ':' in host else host
    return host if port == 80 else '%s:%d' % (host, port)


def http_exchange(target, method, path, headers, deadline, log,
                  body=None, retry_statuses=()):
    """One HTTP exchange.  Connection errors, timeouts, an answer cut short, 5xx, 429
    and the caller's retry_statuses raise TryAgain, an answer that is not HTTP raises
    Malformed; every other answer is returned."""
    host, port = target
    timeout = min(REQUEST_TIMEOUT, deadline.remaining())
    if timeout <= 0:
        raise TryAgain('no time left for a request')
    started = time.monotonic()
    url = 'http://%s%s' % (host_header(target), path)
    lines = ['%s %s HTTP/1.1' % (method, path), 'Host: ' + host_header(target),
             'Connection: close', 'User-Agent: %s/%s' % (AGENT_NAME, VERSION)]
    lines += ['%s: %s' % item for item in headers.items()]
    if body is not None:
        lines.append('Content-Length: %d' % len(body))
    request = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + (body or b'')
    try:
        # not create_connection: addresses are IPs already, no getaddrinfo needed
        connection = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET,
                                   socket.SOCK_STREAM)
        try:
            connection.settimeout(timeout)
            connection.connect((host, port))
            connection.sendall(request)
            response = read_response(connection, deadline, method)
        finally:
            connection.close()
    except (OSError, TryAgain) as exc:
        log.debug('%s %s -> %s (%s)' % (method, url, describe_error(exc), elapsed_ms(started)))
        raise exc if isinstance(exc, TryAgain) else TryAgain(describe_error(exc))
    log.debug('%s %s -> %d %s, %d bytes (%s)' % (method, url, response.status, response.reason,
                                                  len(response.body), elapsed_ms(started)))
    status = response.status
    if status >= 500 or status == 429 or status in retry_statuses:
        raise TryAgain('HTTP %d %s' % (status, response.reason),
                       retry_after_seconds(response.headers.get('retry-after')))
    return response


class Reader(object):
    """Buffered reads from a socket, each bounded by the deadline and all of them by
    MAX_RESPONSE_BYTES."""

    def __init__(self, connection, deadline):
        self.connection = connection
        self.deadline = deadline
        self.buffer = b''
        self.total = 0

    def fill(self):
        self.connection.settimeout(max(0.001, min(REQUEST_TIMEOUT, self.deadline.remaining())))
        chunk = self.connection.recv(65536)
        self.total += len(chunk)
        if self.total > MAX_RESPONSE_BYTES + 65536:
            raise NotHttp('response larger than %d bytes' % MAX_RESPONSE_BYTES)
        self.buffer += chunk
        return bool(chunk)

    def line(self, limit=8192):
        """One CRLF-terminated line without its CRLF."""
        while b'\r\n' not in self.buffer:
            if len(self.buffer) > limit:
                raise NotHttp('line longer than %d bytes' % limit)
            if not self.fill():
                raise TryAgain('connection closed mid-answer' if self.total
                               else 'connection closed without an answer')
        line, _, self.buffer = self.buffer.partition(b'\r\n')
        return line

    def exactly(self, size):
        while len(self.buffer) < size:
            if not self.fill():
                raise TryAgain('connection closed mid-answer')
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def until_closed(self):
        while self.fill():
            pass
        data, self.buffer = self.buffer, b''
        return data


DECIMAL = re.compile(r'[0-9]{1,12}')    # str.isdigit() also takes '²' and '٣'
STATUS_LINE = re.compile(r'HTTP/1\.[01] ([1-5][0-9]{2})(?: (.*))?', re.S)
CHUNK_SIZE = re.compile(rb'([0-9A-Fa-f]{1,8})[ \t]*(?:;.*)?', re.S)


def read_head(reader):
    """(status, reason, headers) of one answer head."""
    status_line = reader.line().decode('latin-1')
    match = STATUS_LINE.fullmatch(status_line)
    if not match:
        raise NotHttp('not an HTTP answer: %r' % status_line[:40])
    headers = read_fields(reader)
    return int(match.group(1)), match.group(2) or '', headers


def read_fields(reader):
    """Header (or trailer) lines up to the empty line -> {lower-case name: value}."""
    fields = {}
    for _ in range(200):
        line = reader.line().decode('latin-1')
        if not line:
            return fields
        name, colon, value = line.partition(':')
        if not colon or not name.strip() or name != name.strip():
            raise NotHttp('malformed HTTP header %r' % line[:40])
        fields[name.lower()] = value.strip()
    raise NotHttp('more than 200 header lines')


def read_response(connection, deadline, method='GET'):
    """Read one answer, skipping interim 1xx ones (RFC 9110 15.2).  TryAgain when it
    is cut short, NotHttp when it is not HTTP/1.x or is larger than MAX_RESPONSE_BYTES."""
    reader = Reader(connection, deadline)
    for _ in range(10):
        status, reason, headers = read_head(reader)
        if not 100 <= status < 200:
            break
    else:
        raise NotHttp('more than 10 interim answers')
    length = headers.get('content-length')
    if method == 'HEAD' or status in (204, 304):
        body = b''
    elif 'chunked' in headers.get('transfer-encoding', '').lower():
        body = read_chunked(reader)
    elif length is not None:
        if not DECIMAL.fullmatch(length):
            raise NotHttp('bad Content-Length %r' % length[:40])
        if int(length) > MAX_RESPONSE_BYTES:
            raise NotHttp('response larger than %d bytes' % MAX_RESPONSE_BYTES)
        body = reader.exactly(int(length))
    else:
        body = reader.until_closed()    # no length given: the body ends with the connection
    if len(body) > MAX_RESPONSE_BYTES:
        raise NotHttp('response larger than %d bytes' % MAX_RESPONSE_BYTES)
    return Response(status, reason, headers, body)


def read_chunked(reader):
    """A chunked body (RFC 9112 7.1): size line, data, CRLF, ..., 0, trailers, CRLF."""
    parts, total = [], 0
    while True:
        match = CHUNK_SIZE.fullmatch(reader.line())
        if not match:
            raise NotHttp('bad chunk size line')
        size = int(match.group(1), 16)
        if size == 0:
            read_fields(reader)             # trailers: read, not used
            return b''.join(parts)
        total += size
        if total > MAX_RESPONSE_BYTES:
            raise NotHttp('response larger than %d bytes' % MAX_RESPONSE_BYTES)
        parts.append(reader.exactly(size))
        if reader.exactly(2) != b'\r\n':
            raise NotHttp('chunk data not followed by CRLF')


def retry_after_seconds(value):
    """Retry-After in seconds (the HTTP-date form is rare here; backoff covers it)."""
    if value and DECIMAL.fullmatch(value.strip()):
        return float(value.strip())
    return None


# --------------------------------------------------------------------------
# WireServer: goal state and health report
# --------------------------------------------------------------------------

WIRESERVER_HEADERS = {'x-ms-version': '2012-11-30', 'x-ms-agent-name': AGENT_NAME}


class GoalState(object):
    def __init__(self, incarnation, container_id, instance_id):
        self.incarnation = incarnation
        self.container_id = container_id
        self.instance_id = instance_id


INCARNATION = 'GoalState/Incarnation'
CONTAINER_ID = 'GoalState/Container/ContainerId'
INSTANCE_ID = 'GoalState/Container/RoleInstanceList/RoleInstance/InstanceId'


XML_DEPTH_MAX = 32      # a goal state nests 6 deep


def xml_texts(text, paths):
    """(root tag, [(path, text), ...]) for every element at one of the slash paths
    (like 'GoalState/Incarnation'), in the order the elements end.  Names are local:
    a namespace prefix (wa:, ns1:) is dropped.  Plain expat, not ElementTree (a
    megabyte and two milliseconds less at start-up); a DOCTYPE or entity declaration
    is refused, since expat would expand entities (there is no defusedxml)."""

    def refuse(*_):
        raise ValueError('document declares a DOCTYPE or entities; refused')

    stack, root, found, texts = [], [], [], {}

    def start(name, _attributes):
        name = name.rpartition(':')[2]
        root[:] = root or [name]
        stack.append(name)
        if len(stack) > XML_DEPTH_MAX:      # each level costs the whole path: refuse early
            raise ValueError('elements nested deeper than %d' % XML_DEPTH_MAX)
        path = '/'.join(stack)
        if path in paths:
            texts[path] = []

    def end(_name):
        path = '/'.join(stack)
        if path in texts:
            found.append((path, ''.join(texts.pop(path))))
        stack.pop()

    def data(chunk):
        path = '/'.join(stack)
        if path in texts:
            texts[path].append(chunk)

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = parser.EntityDeclHandler = refuse
    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = data
    try:
        parser.Parse(text.strip().encode('utf-8', 'surrogateescape'), True)
    except expat.ExpatError as exc:
        raise ValueError('not well-formed XML (%s)' % exc)
    except (LookupError, UnicodeError) as exc:     # e.g. encoding="utf-Z" in the declaration
        raise ValueError('unreadable XML (%s: %s)' % (exc.__class__.__name__, exc))
    return (root[0] if root else None), found


def first_texts(elements):
    """{path: text of the first element at that path}."""
    found = {}
    for path, text in elements:
        found.setdefault(path, text)
    return found


def parse_goal_state(text):
    """Goal-state XML -> GoalState.  ValueError when malformed; None when the
    container has no role instance yet (the host is still preparing the VM)."""
    root, elements = xml_texts(text, (INCARNATION, CONTAINER_ID, INSTANCE_ID))
    found = first_texts(elements)
    if root != 'GoalState':
        raise ValueError('root element is <%s>, not <GoalState>' % root)
    incarnation = found.get(INCARNATION, '').strip()
    if not DECIMAL.fullmatch(incarnation):
        raise ValueError('Incarnation %r is not a number' % incarnation)
    container_id = found.get(CONTAINER_ID, '').strip()
    instance_id = found.get(INSTANCE_ID, '').strip()
    if not container_id or not instance_id:
        return None
    return GoalState(incarnation, container_id, instance_id)


def fetch_goal_state(wireserver, deadline, log):
    def attempt():
        response = http_exchange(wireserver, 'GET', '/machine/?comp=goalstate',
                                 WIRESERVER_HEADERS, deadline, log)
        if response.status != 200:
            raise ProvisioningError('goal state: WireServer answered HTTP %d %s'
                                    % (response.status, response.reason))
        try:
            goal_state = parse_goal_state(response.text())
        except ValueError as exc:
            raise Malformed(str(exc))
        if goal_state is None:
            raise TryAgain('goal state has no role instance yet')
        return goal_state

    return with_retries('goal state', attempt, deadline, log)


def build_health_report(goal_state, state='Ready', substatus=None, description=None):
    details = ''
    if substatus:
        details = ('\n          <Details>\n            <SubStatus>%s</SubStatus>'
                   '\n            <Description>%s</Description>\n          </Details>'
                   % (xml_escape(substatus), xml_escape(description or '')))
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        ' xmlns:xsd="http://www.w3.org/2001/XMLSchema">\n'
        '  <GoalStateIncarnation>%s</GoalStateIncarnation>\n'
        '  <Container>\n'
        '    <ContainerId>%s</ContainerId>\n'
        '    <RoleInstanceList>\n'
        '      <Role>\n'
        '        <InstanceId>%s</InstanceId>\n'
        '        <Health>\n'
        '          <State>%s</State>%s\n'
        '        </Health>\n'
        '      </Role>\n'
        '    </RoleInstanceList>\n'
        '  </Container>\n'
        '</Health>\n'
    ) % (xml_escape(goal_state.incarnation), xml_escape(goal_state.container_id),
         xml_escape(goal_state.instance_id), xml_escape(state), details)


HEALTH_HEADERS = dict(WIRESERVER_HEADERS, **{'Content-Type': 'text/xml;charset=utf-8'})
STALE_INCARNATIONS_ALLOWED = 5


def report_health(wireserver, deadline, log, state='Ready', substatus=None, description=None,
                  goal_state=None):
    """POST a health report for the goal state (fetched unless given); on 410 Gone the
    incarnation moved on, so fetch the goal state again and re-post."""
    for _ in range(STALE_INCARNATIONS_ALLOWED):
        goal_state = goal_state or fetch_goal_state(wireserver, deadline, log)
        body = build_health_report(goal_state, state, substatus, description).encode('utf-8')

        def attempt():
            return http_exchange(wireserver, 'POST', '/machine?comp=health',
                                 HEALTH_HEADERS, deadline, log, body=body)

        response = with_retries('health report', attempt, deadline, log)
        if 200 <= response.status < 300:
            return goal_state
        if response.status != 410:
            raise ProvisioningError('health report: WireServer answered HTTP %d %s: %s'
                                    % (response.status, response.reason,
                                       one_line(response.text(), 200)))
        log.info('health report: incarnation %s is stale (410 Gone); fetching the goal state again'
                 % goal_state.incarnation)
        goal_state = None
    raise ProvisioningError('health report: incarnation kept changing (%d times 410 Gone)'
                            % STALE_INCARNATIONS_ALLOWED)


# --------------------------------------------------------------------------
# IMDS: the instance document
# --------------------------------------------------------------------------

IMDS_API_VERSION = '2021-02-01'
IMDS_FALLBACK_API_VERSION = '2019-06-01'  # what cloud-init falls back to on 400
IMDS_HEADERS = {'Metadata': 'true'}
IMDS_RETRY_STATUSES = (404, 410)          # IMDS warming up; 5xx and 429 retry anyway


def fetch_instance_metadata(imds, deadline, log):
    """GET the instance document; dict with at least a 'compute' object."""
    versions = [IMDS_API_VERSION, IMDS_FALLBACK_API_VERSION]

    def attempt():
        path = '/metadata/instance?api-version=' + versions[0]
        response = http_exchange(imds, 'GET', path, IMDS_HEADERS, deadline, log,
                                 retry_statuses=IMDS_RETRY_STATUSES)
        if response.status == 400 and len(versions) > 1:
            log.info('IMDS: api-version %s refused (HTTP 400); trying %s'
                     % (versions.pop(0), versions[0]))
            raise TryAgain('api-version refused')
        if response.status != 200:
            raise ProvisioningError('IMDS answered HTTP %d %s: %s'
                                    % (response.status, response.reason,
                                       one_line(response.text(), 200)))
        try:
            return parse_instance_document(response.text())
        except ValueError as exc:
            raise Malformed('instance document is not valid (%s)' % exc)

    return with_retries('IMDS', attempt, deadline, log)


def parse_json(text):
    """json.loads, with every way it can fail as ValueError: deeply nested input
    raises RecursionError, and some Python versions have raised other types."""
    try:
        return json.loads(text)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError('%s: %s' % (exc.__class__.__name__, one_line(str(exc), 80)))


def parse_instance_document(text):
    """IMDS's JSON -> dict with a 'compute' object; ValueError otherwise."""
    document = parse_json(text)
    if not isinstance(document, dict) or not isinstance(document.get('compute'), dict):
        raise ValueError('no "compute" object')
    return document


def compute_field(metadata, *path):
    """A string from metadata['compute'][...], '' when absent."""
    node = metadata.get('compute', {})
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node.strip() if isinstance(node, str) else ''


# --------------------------------------------------------------------------
# Provisioning media: the disc Azure attaches at first boot.  Its ovf-env.xml is
# the only source of the admin password and the custom data (IMDS has neither).
# --------------------------------------------------------------------------

OVF_ENV = 'ovf-env.xml'
OVF_ENV_MAX = 1 << 20       # bytes; custom data is at most 64 KiB of base64
MEDIA_DEVICE_NAME = re.compile(r'(sr\d+|cdrom\d*|hd[c-z])\Z')    # as waagent looks
MEDIA_FILESYSTEMS = ('udf', 'iso9660')
MEDIA_MOUNT_DIR = '/run'    # a tmpfs: nothing of the media outlives the boot
_LINUX_SET = 'Environment/ProvisioningSection/LinuxProvisioningConfigurationSet/'
_PUBLIC_KEY = _LINUX_SET + 'SSH/PublicKeys/PublicKey'
OVF_FIELDS = {
    'hostname': _LINUX_SET + 'HostName',
    'username': _LINUX_SET + 'UserName',
    'password': _LINUX_SET + 'UserPassword',
    'disable_password_auth': _LINUX_SET + 'DisableSshPasswordAuthentication',
    'custom_data': _LINUX_SET + 'CustomData',
    'provision_agent': 'Environment/PlatformSettingsSection/PlatformSettings/ProvisionGuestAgent',
}

# What ovf-env.xml asks for.  password is None when there is none; repr() never
# shows it (it would otherwise reach a traceback or a debugging print).
OvfEnv = namedtuple('OvfEnv', 'device hostname username password disable_password_auth '
                              'public_keys custom_data provision_agent')
OvfEnv.__repr__ = lambda self: 'OvfEnv(%s)' % describe_media(self)


def parse_ovf_env(data, device=''):
    """ovf-env.xml's bytes -> OvfEnv; ValueError naming what is wrong (never a value)."""
    if len(data) > OVF_ENV_MAX:
        raise ValueError('%s is %d bytes, more than %d' % (OVF_ENV, len(data), OVF_ENV_MAX))
    paths = set(OVF_FIELDS.values()) | {_PUBLIC_KEY + '/Path', _PUBLIC_KEY + '/Value',
                                         _PUBLIC_KEY}
    root, elements = xml_texts(data.decode('utf-8', 'surrogateescape'), paths)
    if root != 'Environment':
        raise ValueError('root element is <%s>, not <Environment>' % root)
    found = first_texts(elements)
    fields = dict((name, found.get(path)) for name, path in OVF_FIELDS.items())
    for name in ('hostname', 'username', 'disable_password_auth', 'provision_agent'):
        fields[name] = (fields[name] or '').strip()
    if not fields['password']:
        fields['password'] = None       # <UserPassword></UserPassword>: none given
    custom = fields['custom_data']
    custom = decode_base64(custom, 'CustomData') if custom and custom.strip() else None
    keys, key = [], {}
    for path, text in elements:
        if path == _PUBLIC_KEY:
            keys.append((key.get('Path', '').strip(), key.get('Value', '').strip()))
            key = {}
        elif path.startswith(_PUBLIC_KEY + '/'):
            key[path.rpartition('/')[2]] = text
    fields['public_keys'] = keys
    fields['custom_data'] = custom
    return OvfEnv(device=device, **fields)


def describe_media(media):
    """What the media asks for, fit for a log line: the password only as (set)."""
    return ', '.join([
        'host %s' % (media.hostname or '-'), 'user %s' % (media.username or '-'),
        'password %s' % ('(set)' if media.password else '(none)'),
        'DisableSshPasswordAuthentication %s' % (media.disable_password_auth or '-'),
        '%d public key(s)' % len(media.public_keys),
        'custom data %s' % ('%d bytes' % len(media.custom_data)
                            if media.custom_data is not None else '(none)')])


def cdrom_devices(system):
    """/dev/sr0, then the other CD-ROM devices (as waagent looks)."""
    dev = system.files.path('/dev')
    names = sorted(glob_names(dev, MEDIA_DEVICE_NAME.pattern),
                   key=lambda n: (n != 'sr0', not n.startswith('sr'), n))
    return unique_devices([os.path.join(dev, n) for n in names])


def formatted_devices(system):
    """Block devices holding a UDF or ISO 9660 file system (as cloud-init looks, with
    blkid): the last resort.  Their volume recognition area, 32 KiB in, is read
    here; a blkid process would cost more than the whole probe (0.5 s under TCG)."""
    found = []
    for name in sorted(glob_names(system.files.path('/sys/class/block'), r'[\w.-]+$')):
        device = system.files.path('/dev', name)
        if filesystem_signature(device) in MEDIA_FILESYSTEMS:
            found.append(device)
    return found


# ISO 9660 and UDF (ECMA-167) both start with 2 KiB descriptors from byte 32768 on,
# each with a 5-letter identifier at its offset 1: CD001 for ISO 9660, NSR02/NSR03
# for UDF (a UDF disc made by genisoimage -udf has both: it is udf).
VOLUME_AREA = 32768
VOLUME_DESCRIPTORS = 16


def filesystem_signature(device):
    """'udf', 'iso9660' or None, from the volume descriptors of `device`."""
    try:
        with open(device, 'rb') as f:
            f.seek(VOLUME_AREA)
            area = f.read(2048 * VOLUME_DESCRIPTORS)
    except (OSError, ValueError):   # no medium, not a device we may read, a NUL
        return None
    names = set(area[offset + 1:offset + 6] for offset in range(0, len(area), 2048))
    if names & {b'NSR02', b'NSR03'}:
        return 'udf'
    return 'iso9660' if b'CD001' in names else None


def unique_devices(devices):
    unique = []
    for device in devices:
        if os.path.realpath(device) not in [os.path.realpath(d) for d in unique]:
            unique.append(device)
    return unique


def read_media(system, device):
    """ovf-env.xml's bytes from the media in `device` (None when the media has no
    such file), mounted read-only and always unmounted, also on SIGTERM.  The
    mountpoint is inside a directory of its own (0700): the disc's root may let
    anyone in, and ovf-env.xml holds the password in plain text."""
    import tempfile
    private = tempfile.mkdtemp(prefix='azure-provisioning-media.',
                               dir=system.files.path(MEDIA_MOUNT_DIR))
    mountpoint = os.path.join(private, 'media')
    os.mkdir(mountpoint, 0o700)
    try:
        if os.path.isdir(SELINUX_FS):
            # new directories get our domain's runtime type, on which the confined
            # mount may not mount; /run's own type is a mountpoint
            try:
                for directory in (private, mountpoint):
                    copy_selinux_label(system.files.path(MEDIA_MOUNT_DIR), directory)
            except OSError as exc:      # the mount may still be allowed: it says if not
                system.log.warning('media: cannot label %s: %s'
                                   % (mountpoint, describe_error(exc)))
        try:
            # nodev, nosuid, noexec: the disc is anyone's; what it holds is data only
            system.run([find_tool('mount') or 'mount', '-o', 'ro,nodev,nosuid,noexec', '-t',
                        ','.join(MEDIA_FILESYSTEMS), device, mountpoint], 'media')
        except BaseException as exc:
            if os.path.ismount(mountpoint):     # timed out after the kernel mounted it
                unmount(system, mountpoint)
            if isinstance(exc, ProvisioningError):
                raise ProvisioningError('%s%s' % (exc, udf_missing_hint(system)))
            raise
        try:
            return Root(mountpoint).read(OVF_ENV, limit=OVF_ENV_MAX)
        except OSError as exc:      # a FIFO, a device, too large
            raise ProvisioningError('media: %s on %s: %s' % (OVF_ENV, device, exc.strerror))
        finally:
            unmount(system, mountpoint)
    finally:
        for directory in (mountpoint, private):
            try:
                os.rmdir(directory)
            except OSError as exc:
                system.log.warning('media: %s left behind: %s' % (directory, describe_error(exc)))


def unmount(system, mountpoint):
    """umount, also after the deadline (a mount must not outlive us); lazily when busy."""
    umount = find_tool('umount') or 'umount'
    grace = Deadline(TOOL_TIMEOUT)
    try:
        system.run([umount, mountpoint], 'media', deadline=grace)
    except ProvisioningError as exc:
        system.log.warning('media: %s; detaching it lazily' % exc)
        system.run([umount, '-l', mountpoint], 'media', deadline=grace)


def kernel_has_udf(root, modules):
    """Whether the kernel whose modules are in `modules` mounts UDF: built in, or a
    udf.ko (compressed or not)."""
    return ('kernel/fs/udf/udf.ko' in (root.read_text(modules, 'modules.builtin') or '')
            or bool(root.names(modules + '/kernel/fs/udf', r'udf\.ko')))


def udf_missing_hint(system):
    """' (this kernel cannot mount UDF: ...)' when that is so, else ''."""
    release = os.uname().release
    if ('udf' in system.kernel_filesystems()
            or kernel_has_udf(system.files, '/lib/modules/' + release)):
        return ''
    return (' (kernel %s cannot mount UDF, the format Azure uses: no udf module in '
            '/lib/modules/%s; install it, e.g. linux-modules-extra)' % (release, release))


def find_media(system, choice):
    """(the first media holding ovf-env.xml, parsed: OvfEnv, or None; why none
    could be read, or None).  `choice`: --media.  Problems are logged here; whether
    the media was needed is for the caller to say."""
    if choice == 'none':
        system.log.info('media: not looked for (--media none)')
        return None, None
    problems = []
    if choice:
        media = read_first_media(system, [choice], problems)
    else:
        media = search_media(system, problems)
        if media is None and settle_devices(system):
            problems = []
            media = search_media(system, problems)
    if media is not None:
        return media, None
    if not problems:
        system.log.info('media: no provisioning media found (IMDS alone)')
        return None, None
    for problem in problems:
        system.log.warning(problem)
    return None, problems[-1]


def search_media(system, problems):
    """The CD-ROMs, then the last resort: any other disc formatted as one."""
    cdroms = cdrom_devices(system)
    media = read_first_media(system, cdroms, problems)
    if media is None:
        tried = [os.path.realpath(d) for d in cdroms]
        media = read_first_media(system, [d for d in formatted_devices(system)
                                       if os.path.realpath(d) not in tried], problems)
    return media


MEDIA_SETTLE_TIMEOUT = 30       # s at most for udev's queue, when nothing was found
UDEV_CONTROL = '/run/udev/control'      # systemd-udevd's socket: udev is running


def settle_devices(system):
    """Wait until udev has handled every device the kernel announced (bounded by
    the deadline): True when a second look may find more.  Where the initramfs lacks
    the CD-ROM driver (ata_piix, sr_mod), udev loads it from the root file system and
    sr0 comes seconds after boot, possibly after this unit started.  Without udev
    nothing loads a driver later: no wait."""
    udevadm = find_tool('udevadm')
    if not udevadm or not os.path.exists(system.files.path(UDEV_CONTROL)):
        system.log.debug('media: udev is not running; no device can still appear')
        return False
    seconds = int(min(MEDIA_SETTLE_TIMEOUT, system.deadline.remaining()))
    if seconds < 1:
        return False
    t = time.monotonic()
    try:
        system.run([udevadm, 'settle', '--timeout=%d' % seconds], 'media')
    except ProvisioningError as exc:    # still busy: what is there now is looked at
        system.log.warning('media: udev did not settle: %s' % exc)
    system.log.info('media: none found at first; waited for udev to settle (%s); '
                 'looking again' % elapsed_ms(t))
    return True


def read_first_media(system, devices, problems):
    """The first of `devices` whose media holds ovf-env.xml, parsed; what went wrong
    with the others is added to `problems`."""
    for device in devices:
        try:
            data = read_media(system, device)
        except ProvisioningError as exc:
            problems.append(str(exc))
            continue
        if data is None:
            problems.append('media: %s has no %s' % (device, OVF_ENV))
            continue
        try:
            media = parse_ovf_env(data, device)
        except ValueError as exc:
            raise ProvisioningError('media: %s on %s: %s' % (OVF_ENV, device, exc))
        system.log.info('media: %s: %s read (%s)' % (device, OVF_ENV, describe_media(media)))
        return media
    return None


# --------------------------------------------------------------------------
# Hyper-V KVP: the report where the host can read it without the WireServer
# --------------------------------------------------------------------------

KVP_POOL = '/var/lib/hyperv/.kvp_pool_1'   # pool 1 is the guest's; hv_kvp_daemon sends it up
KVP_KEY_SIZE = 512
KVP_VALUE_SIZE = 2048
KVP_VALUE_MAX = 1024                        # what Azure keeps of a value
KVP_REPORT_KEY = 'PROVISIONING_REPORT'


def boot_time():
    with open('/proc/stat') as f:
        for line in f:
            if line.startswith('btime '):
                return int(line.split()[1])
    raise OSError('no btime in /proc/stat')


def kvp_record(key, value):
    """One fixed-size record: NUL-padded key and value, the value cut (on a
    character boundary) to what Azure keeps."""
    data = value.encode('utf-8')[:KVP_VALUE_MAX].decode('utf-8', 'ignore').encode('utf-8')
    return (key.encode('utf-8')[:KVP_KEY_SIZE - 1].ljust(KVP_KEY_SIZE, b'\0')
            + data.ljust(KVP_VALUE_SIZE, b'\0'))


# hv_kvp_daemon holds the lock while it reads the pool, a few milliseconds: a lock
# held longer is a writer that is stuck, and Azure's report must not wait for it
KVP_LOCK_WAIT = 2.0         # s at most per write (less when the deadline is nearer)
KVP_LOCK_POLL = 0.05        # s between tries: a blocking flock cannot be bounded


def lock_within(fd, seconds):
    """flock(LOCK_EX) on fd within `seconds` (one try when 0): True, or False when
    another process still holds the lock."""
    import fcntl
    give_up = time.monotonic() + seconds
    for _ in range(int(seconds / KVP_LOCK_POLL) + 2):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
        left = give_up - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(KVP_LOCK_POLL, left))
    return False


# The pool is opened without blocking (a FIFO there would stop the run before its
# WireServer report), never through a link (on a VM a link there is not ours to
# follow; in an image it may lead out of the root), and must be a regular file
OPEN_KVP_POOL = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW
                 | os.O_NOCTTY | os.O_CLOEXEC)


def open_kvp_pool(directory, name, shown):
    """The pool `name` in the directory open as `directory`, opened for appending:
    OSError when it is anything but a regular file (checked before the open, so that
    no device or FIFO is opened, and again on what was opened)."""
    try:
        found = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        found = None
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise OSError(errno.EINVAL, 'not a regular file', shown)
    fd = os.open(name, OPEN_KVP_POOL, 0o644, dir_fd=directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, 'not a regular file', shown)
    return fd


def write_kvp(key, value, pool=KVP_POOL, booted=None, wait=KVP_LOCK_WAIT, root=None):
    """Append a record under flock to the pool at `pool` in `root` (this machine's
    '/' when not given), emptying a pool left from an earlier boot first (the first
    writer of each boot does, as the Azure agents do).  OSError when the pool is not
    a regular file, or the lock is not ours within `wait` seconds."""
    fd = (root or Root('/')).at(pool, lambda directory, name: open_kvp_pool(
        directory, name, pool), follow=False)
    try:
        if not lock_within(fd, wait):
            raise OSError('%s is locked by another process (waited %.1f s)' % (pool, wait))
        booted = boot_time() if booted is None else booted
        if os.fstat(fd).st_mtime < booted:
            os.ftruncate(fd, 0)
        record = kvp_record(key, value)
        if os.write(fd, record) != len(record):
            raise OSError('short write to %s' % pool)
    finally:
        os.close(fd)     # closing releases the lock


def kvp_report_plan(system, description):
    """[the action that appends the report to KVP] when this is a Hyper-V guest, else
    []; it never fails (a pool it cannot write is a warning).  Its lock wait ends
    before the run's reserve: that is the WireServer report's."""
    pool = system.files.path(KVP_POOL)
    try:
        hyperv = system.files.is_dir(os.path.dirname(KVP_POOL))
    except OSError as exc:
        system.log.warning('KVP report not written: %s' % describe_error(exc))
        return []
    if not hyperv:
        system.log.debug('KVP: %s does not exist; no KVP report' % os.path.dirname(pool))
        return []
    wait = min(KVP_LOCK_WAIT, system.deadline.remaining())
    return [Action('append to %s: %s=%s' % (pool, KVP_REPORT_KEY, description),
                   lambda: append_kvp_report(system.files, description, system.log, wait),
                   fatal=False)]


def append_kvp_report(root, description, log, wait=KVP_LOCK_WAIT):
    pool = KVP_POOL
    try:
        write_kvp(KVP_REPORT_KEY, description, pool, wait=wait, root=root)
        log.debug('KVP: %s written to %s' % (KVP_REPORT_KEY, root.path(pool)))
    except OSError as exc:
        log.warning('KVP report not written: %s' % describe_error(exc))


def report_description(result, vm_id, step=None, reason=None, warnings=()):
    """Azure agents' pipe-separated report, at most MAX_DESCRIPTION characters:
    `result=error|reason=...|agent=...|step=...|vm_id=...|timestamp=...|documentation_url=...`"""
    clean = lambda text: ' '.join(clean_text(text).replace('|', '/').split())
    head = 'result=%s' % result + ('|reason=' if reason is not None else '')
    tail = ['', 'agent=%s/%s' % (AGENT_NAME, VERSION)]
    if step:
        tail.append('step=' + step)
    tail += ['warning=' + clean(w) for w in warnings]
    tail += ['vm_id=' + clean(vm_id or 'unknown'),
             'timestamp=' + utc_timestamp()]
    if result == 'error':
        tail.append('documentation_url=' + DOCUMENTATION_URL)
    tail = '|'.join(tail)
    reason = one_line(clean(reason or ''), max(3, MAX_DESCRIPTION - len(head) - len(tail)))
    return (head + reason + tail)[:MAX_DESCRIPTION]


# --------------------------------------------------------------------------
# Hostname
# --------------------------------------------------------------------------

def desired_hostname(metadata):
    """The name the user asked for; compute.name only when the api-version has no osProfile."""
    return (compute_field(metadata, 'osProfile', 'computerName')
            or compute_field(metadata, 'name'))


HOSTNAME_LABEL = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?')


def validate_hostname(name):
    if not name:
        raise ProvisioningError('IMDS has neither osProfile.computerName nor name')
    shown = name if len(name) <= 80 else name[:77] + '...'
    if len(name) > HOST_NAME_MAX:
        raise ProvisioningError('invalid hostname %r: %d characters, Linux allows %d'
                                % (shown, len(name), HOST_NAME_MAX))
    for label in name.split('.'):
        if not HOSTNAME_LABEL.fullmatch(label):
            raise ProvisioningError(
                'invalid hostname %r: labels must be letters, digits and inner hyphens'
                % shown)
    return name


def in_system_uts_namespace():
    """True when our hostname is the system's: we share PID 1's UTS namespace.
    Unknown (unreadable /proc/1) counts as no."""
    try:
        return os.readlink('/proc/self/ns/uts') == os.readlink('/proc/1/ns/uts')
    except OSError:
        return False


def system_systemd():
    """systemd runs and we share its UTS namespace: asking it (systemctl)
    acts on this system, never on the host of a test namespace."""
    return os.path.isdir('/run/systemd/system') and in_system_uts_namespace()


def plan_hostname(facts, system):
    """Set the name IMDS gives (when it differs); plan_publish then announces it."""
    current = system.hostname()
    facts = facts._replace(hostname=current)
    if not facts.options.set_hostname:
        system.log.info('hostname: left alone (--no-hostname)')
        return facts, []
    t = time.monotonic()
    name = validate_hostname(desired_hostname(facts.metadata))
    if name != current:
        return facts._replace(renamed_to=name), [
            Action('set hostname: %s (now %s)' % (name, current),
                   lambda: rename_host(system, current, name, t))]
    # live already (set by hand, or the image's own): the next boots need the file
    if (system.files.read_text('/etc/hostname') or '').strip() == name:
        system.log.info('hostname: already %s, nothing to change (%s)' % (name, elapsed_ms(t)))
        return facts, []

    def write_file():
        try:
            learned = write_etc_hostname(system, name)
        except (ProvisioningError, OSError) as exc:
            raise ProvisioningError('/etc/hostname not written: %s' % describe_error(exc))
        system.log.info('hostname: already %s; /etc/hostname written (%s)'
                        % (name, elapsed_ms(t)))
        return learned
    # the VM has its name now: a failed VM would be the wrong report
    return facts, [Action('write /etc/hostname: %s' % name, write_file, fatal=False)]


def rename_host(system, old, new, started):
    learned = set_hostname(system, new)
    hosts = update_etc_hosts(system, old, new)
    system.log.info('hostname set to %s via sethostname%s (%s)'
                    % (new, ', /etc/hosts updated' if hosts else '', elapsed_ms(started)))
    return dict(learned or {}, hostname=new)


def set_hostname(system, name):
    """The name for the next boots (/etc/hostname), then the live one (sethostname(2)):
    what systemd-hostnamed does for `hostnamectl set-hostname`, without asking it over
    D-Bus, which would first start it (0.5-1.5 s of the boot under TCG; minimal images
    lack it).  A running hostnamed or NetworkManager learns no new static name until
    it reads the file again.  The file first: a failed write leaves the old name live,
    and the next run tries again.  Returns the facts write_etc_hostname established."""
    learned = write_etc_hostname(system, name)
    system.set_hostname(name)
    return learned


def write_etc_hostname(system, name):
    """/etc/hostname holds `name`; returns {'warnings': ...} when only its label
    could not be set (the name is right)."""
    new_file = not system.files.exists('/etc/hostname')
    system.files.write('/etc/hostname', (name + '\n').encode(), deadline=system.deadline)
    if new_file:    # made by us, not replaced: the policy's label, not /etc's
        try:
            system.restore_labels([system.files.path('/etc/hostname')], 'hostname')
        except ProvisioningError as exc:
            return {'warnings': (str(exc),)}
    return None


def split_keeping_spaces(text):
    """'a  b c' -> ['a', '  ', 'b', ' ', 'c']: words and the whitespace between them."""
    return [''.join(run) for _, run in itertools.groupby(text, key=str.isspace)]


def is_loopback_address(text):
    """127.0.0.1 or ::1, however spelled (127.0.1.1, Debian's line for the host's
    own name, is not one of them)."""
    try:    # inet_aton reads IPv4 as glibc's hosts parser does (127.000.000.001)
        if '.' in text and socket.inet_aton(text) == socket.inet_aton('127.0.0.1'):
            return True
    except (OSError, ValueError):
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, text) == socket.inet_pton(socket.AF_INET6, '::1')
    except (OSError, ValueError):
        return False


def rename_in_hosts(text, old, new):
    """Replace `old` (and `old.domain`) by `new` on the lines that carry it,
    outside comments and never on the 127.0.0.1 and ::1 lines (the VM's name must
    not resolve to loopback); every other byte stays as it was."""
    out = []
    for line in text.splitlines(True):
        content, hash_, comment = line.partition('#')
        if old not in content:      # most lines: nothing to rename, nothing to split
            out.append(line)
            continue
        fields = split_keeping_spaces(content)
        words = [i for i, field in enumerate(fields) if not field.isspace()]
        if words and is_loopback_address(fields[words[0]]):
            words = []
        for i in words[1:]:     # the first word is the address
            if fields[i] == old:
                fields[i] = new
            elif fields[i].startswith(old + '.'):
                fields[i] = new + fields[i][len(old):]
        out.append(''.join(fields) + hash_ + comment)
    return ''.join(out)


def update_etc_hosts(system, old, new):
    """True when /etc/hosts carried the old name and was rewritten.  A localhost*
    name (RHEL's template is localhost.localdomain) is never the name to replace."""
    if not old or old.lower().startswith('localhost'):
        return False
    data = system.files.read('/etc/hosts')
    if data is None:
        return False
    text = data.decode('utf-8', 'surrogateescape')
    changed = rename_in_hosts(text, old, new)
    if changed == text:
        return False
    system.files.write('/etc/hosts', changed.encode('utf-8', 'surrogateescape'),
                       deadline=system.deadline)
    return True


# --------------------------------------------------------------------------
# Publishing the new hostname to Azure DNS (DHCP option 12)
# --------------------------------------------------------------------------
# Azure's internal DNS learns the name from the DHCP request.  Ours comes after
# the network is up, so the DHCP client has announced the image's old name; it
# must send a request carrying the new one, without ifdown/ifup (missing on
# RHEL 9) or a NetworkManager restart (drops the IP now and then).

PUBLISH_TIMEOUT = 30.0      # seconds for the DHCP client to get its lease back


UNDO_TIMEOUT = 10.0         # seconds for a plan's undo, even after the commands used theirs

# `undo`: commands run after `commands` whether they worked or not
DhcpPlan = namedtuple('DhcpPlan', 'client commands why_not undo')
DhcpPlan.__new__.__defaults__ = ((),)      # Python 3.6 has no namedtuple(defaults=)


def interface_index(interface, root):
    return (root.read_text('/sys/class/net', interface, 'ifindex') or '').strip()


def ipv4_routes(root):
    """(interface, destination, flags, metric) of each IPv4 route, or None when the
    kernel's table cannot be read."""
    routes = []
    try:
        with open(root.path('/proc/net/route')) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 6:
                    routes.append((fields[0], fields[1], int(fields[3], 16), int(fields[6])))
    except (OSError, ValueError):
        return None
    return routes


def default_routes(routes):
    """(metric, interface) of each usable default route, the lowest metric first."""
    return sorted((metric, name) for name, destination, flags, metric in routes or ()
                  if destination == '00000000' and flags & 1)


def primary_interface(root):
    """The interface of the IPv4 default route with the lowest metric; without a
    default route, the one networkd holds a DHCP lease for, else the first routed
    interface (a single-NIC VM on a network that hands out no router)."""
    routes = ipv4_routes(root)
    if routes is None:
        return None
    defaults = default_routes(routes)
    if defaults:
        return defaults[0][1]
    for index in sorted(root.names('/run/systemd/netif/leases', r'^\d+$')):
        for name in root.names('/sys/class/net', r'.'):
            if interface_index(name, root) == index:
                return name
    routed = [name for name, _, flags, _ in routes if name != 'lo' and flags & 1]
    return routed[0] if routed else None


def ini_values(text, sections, key):
    """Every value of `key` inside the given [sections] of a systemd-style file."""
    values, section = [], None
    for line in (text or '').splitlines():
        line = line.strip()
        if line.startswith('[') and line.endswith(']'):
            section = line[1:-1]
        elif section in sections and '=' in line and not line.startswith(('#', ';')):
            name, _, value = line.partition('=')
            if name.strip() == key:
                values.append(value.strip())
    return values


def networkd_plan(interface, name, root):
    """networkd keeps the name it had when it configured the link (systemd #23244):
    `renew` re-sends the old one, `reconfigure` starts the DHCP client again."""
    index = interface_index(interface, root)
    state = index and root.read_text('/run/systemd/netif/links', index)
    if not state or 'NETWORK_FILE=' not in state:
        return None
    fields = dict(line.partition('=')[::2] for line in state.splitlines() if '=' in line)
    files = [fields.get('NETWORK_FILE', '')] + fields.get('NETWORK_FILE_DROPINS', '') \
        .strip('"').split()
    text = '\n'.join(root.read_text(p) or '' for p in files if p)
    sections = ('DHCPv4', 'DHCP')
    send = ini_values(text, sections, 'SendHostname')
    if send and send[-1].lower() in ('no', 'false', '0', 'off'):
        return DhcpPlan('systemd-networkd', None, '%s sets SendHostname=%s' % (files[0], send[-1]))
    fixed = ini_values(text, sections, 'Hostname')
    if fixed:
        return DhcpPlan('systemd-networkd', None, '%s sends the fixed name Hostname=%s'
                        % (files[0], fixed[-1]))
    return DhcpPlan('systemd-networkd', [['networkctl', 'reconfigure', interface]], None)


# Measured: NetworkManager 1.42 and 1.52 restart the DHCP client when a reapply changes
# ipv4.dhcp-hostname; 1.30 (Debian 11) takes it and sends nothing.
NM_REAPPLY_SENDS = (1, 42)


def nm_version(system):
    """nmcli's (major, minor), or None when it does not say."""
    try:
        match = re.search(r'(\d+)\.(\d+)', system.run(['nmcli', '--version'], 'nmcli'))
    except ProvisioningError:
        return None
    return (int(match.group(1)), int(match.group(2))) if match else None


def networkmanager_plan(interface, name, system):
    """`nmcli device modify` re-applies the active profile with a new dhcp-hostname,
    changing nothing on disk and restarting only the DHCP client.  Before 1.42 a
    reapply asks for no lease: the connection is activated again (the interface goes
    down and up) with the name set in memory only (--temporary), and the name is
    taken out again, so that no profile, saved later or not, keeps this VM's name."""
    if not system.files.is_dir('/run/NetworkManager') or not find_tool('nmcli'):
        return None
    try:
        uuid = system.run(['nmcli', '-g', 'GENERAL.CON-UUID', 'device', 'show', interface],
                          'nmcli').strip()
    except ProvisioningError:
        return None
    if not uuid:
        return None
    send = system.run(['nmcli', '-g', 'ipv4.dhcp-send-hostname', 'connection', 'show', uuid],
                      'nmcli').strip()
    if send == 'no':
        return DhcpPlan('NetworkManager', None, 'connection %s has ipv4.dhcp-send-hostname no'
                        % uuid)
    version = nm_version(system)
    if version is None or version >= NM_REAPPLY_SENDS:
        return DhcpPlan('NetworkManager', [['nmcli', 'device', 'modify', interface,
                                            'ipv4.dhcp-hostname', name]], None)
    in_memory = ['nmcli', 'connection', 'modify', '--temporary', uuid, 'ipv4.dhcp-hostname']
    return DhcpPlan('NetworkManager %d.%d' % version, [
        in_memory + [name], ['nmcli', 'connection', 'up', uuid]], None,
        undo=[in_memory + ['']])


def dhclient_plan(interface, name, root):
    """ISC dhclient evaluates `send host-name = gethostname();` per packet, but only a
    new client sends a fresh request: stop it keeping its lease (-x), start it again
    with the same arguments; it asks for the same address (INIT-REBOOT)."""
    for pid in root.names('/proc', r'^\d+$'):
        data = root.read('/proc', pid, 'cmdline') or b''
        argv = [a.decode('utf-8', 'replace') for a in data.split(b'\0') if a]
        if not argv or os.path.basename(argv[0]) != 'dhclient' or interface not in argv[1:]:
            continue
        config = argv[argv.index('-cf') + 1] if '-cf' in argv[:-1] else '/etc/dhcp/dhclient.conf'
        text = root.read_text(config) or ''
        # [ \t], not \s: \s* spans lines, and a long run of them takes quadratic time
        sends = re.findall(r'^[ \t]*send[ \t]+host-name[ \t]+(\S[^;\n]*);', text, re.M)
        if not sends:
            return DhcpPlan('dhclient', None, '%s has no "send host-name"' % config)
        if 'gethostname()' not in sends[-1]:
            return DhcpPlan('dhclient', None, '%s sends the fixed name %s' % (config, sends[-1]))
        arguments = [a for a in argv[1:] if a not in ('-x', '-r')]
        return DhcpPlan('dhclient', [['dhclient', '-x'] + arguments, ['dhclient'] + arguments],
                        None)
    return None


SIOCGIFADDR = 0x8915     # <linux/sockios.h>: an interface's (first) IPv4 address


def ipv4_address(interface):
    """The interface's IPv4 address as the kernel has it, or None: one ioctl where
    `ip addr` would be a process (tens of ms each under TCG)."""
    import fcntl
    import struct
    try:
        name = os.fsencode(interface)
    except UnicodeError:    # Python 3.6 under LANG=C: not a name an interface can have
        return None
    if not name or len(name) > 15 or b'\0' in name:   # IFNAMSIZ: the kernel would cut it
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            answer = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack('256s', name))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:    # no address (yet): worth waiting for
            return None
        raise ProvisioningError('address of %s: %s' % (interface, describe_error(exc)))
    return socket.inet_ntoa(answer[20:24])


def interface_address(interface, deadline, log):
    """The interface's IPv4 address, waiting for one until the deadline."""

    def attempt():
        address = ipv4_address(interface)
        if address is None:
            raise TryAgain('%s has no IPv4 address yet' % interface)
        return address
    return with_retries('publish hostname', attempt, deadline, log)


def has_default_route(interface, root):
    return any(name == interface for _, name in default_routes(ipv4_routes(root)))


def default_route_back(interface, root, deadline, log):
    """Wait until the interface's default route is back: the kernel adds it after the
    address, and a request sent before then fails with 'Network is unreachable'."""

    def attempt():
        if not has_default_route(interface, root):
            raise TryAgain('%s has no default route yet' % interface)
    with_retries('publish hostname', attempt, deadline, log)


def plan_publish(facts, system):
    """Once the host has its new name (plan_hostname's action): DHCP is to send it."""
    if facts.renamed_to is None or not facts.options.publish_hostname:
        return facts, []
    if not in_system_uts_namespace():
        # a name set in a private namespace is not the one DHCP should send
        system.log.info('hostname: not published to DHCP (not the system\'s UTS namespace)')
        return facts, []
    return publish_plan(facts, system, facts.renamed_to)


def publish_plan(facts, system, name):
    """(facts, [the action that makes the DHCP client send `name`]).  What stands in
    its way is a warning, and so is its failure: a name missing from DNS is worth a
    warning, not a failed VM."""
    interface = primary_interface(system.files)
    if interface is None:
        return with_warning(facts, 'no routed interface; hostname not published to DHCP'), []
    try:
        plan = (networkd_plan(interface, name, system.files)
                or networkmanager_plan(interface, name, system)
                or dhclient_plan(interface, name, system.files))
    except ProvisioningError as exc:
        return with_warning(facts, 'hostname not published: %s' % exc), []
    if plan is None:
        return with_warning(facts, 'no known DHCP client manages %s; hostname not published'
                            % interface), []
    if plan.why_not:
        return with_warning(facts, '%s on %s will not send the new name: %s'
                            % (plan.client, interface, plan.why_not)), []
    return facts, [Action('run: %s' % ' && '.join(' '.join(c) for c in plan.commands
                                                 + list(plan.undo)),
                          lambda: send_to_dhcp(system, interface, plan, name), fatal=False)]


def send_to_dhcp(system, interface, plan, name):
    t = time.monotonic()
    limited = Deadline(min(PUBLISH_TIMEOUT, system.deadline.remaining()))
    try:
        before = interface_address(interface, limited, system.log)
        routed = has_default_route(interface, system.files)
        try:
            for command in plan.commands:
                system.run(command, 'publish hostname', deadline=limited)
        finally:
            undo_deadline = Deadline(min(UNDO_TIMEOUT, system.deadline.remaining()))
            for command in plan.undo:
                system.run(command, 'publish hostname (undo)', deadline=undo_deadline)
        # networkd lets the lease go for a moment before it asks again: expected
        after = interface_address(interface, limited, system.log.quieter())
        if routed:      # the requests after this one (Ready) need it
            default_route_back(interface, system.files, limited, system.log.quieter())
    except ProvisioningError as exc:
        raise ProvisioningError('hostname not published: %s' % exc)
    system.log.info('hostname %s sent to DHCP by %s on %s (%s); address %s%s (%s)'
                    % (name, plan.client, interface, ' && '.join(
                        ' '.join(c) for c in plan.commands + list(plan.undo)),
                       after, '' if after == before else ', was %s' % before, elapsed_ms(t)))


# --------------------------------------------------------------------------
# Admin user and SSH keys (--provision-user)
# --------------------------------------------------------------------------

KEY_TYPES = ('ssh-rsa', 'ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384',
             'ecdsa-sha2-nistp521', 'sk-ssh-ed25519@openssh.com',
             'sk-ecdsa-sha2-nistp256@openssh.com')
SUDOERS_DROP_IN = '/etc/sudoers.d/azure-provisioning'   # no dot: sudo skips names with one
SSHD_DROP_IN = '/etc/ssh/sshd_config.d/50-azure-provisioning.conf'


USER_NAME = re.compile(r'[a-z_][a-z0-9_-]{0,31}')     # what useradd takes everywhere
LOGIN_DEFS = '/etc/login.defs'
LOGIN_DEFS_MAX = 1 << 20    # bytes of it read: distributions ship 10-20 KiB
USER_UIDS = (1000, 60000)   # UID_MIN, UID_MAX where login.defs does not say (useradd's)
# never an admin user, whatever login.defs says
NOT_PEOPLE = {0: 'root', 65534: 'nobody (the kernel\'s overflow uid)'}


def validate_user_name(name):
    if not USER_NAME.fullmatch(name):
        raise ProvisioningError('invalid admin user name %r: use 1-32 of a-z, 0-9, _ and -, '
                                'starting with a letter or _' % one_line(name or '', 40))
    return name


# A number in login.defs as shadow's getdef reads it (strtoul, base 0): 0x/0X and
# hex digits, a leading 0 and octal digits, else decimal; an optional '+'
LOGIN_DEFS_NUMBER = re.compile(r'\+?(?:0[xX]([0-9a-fA-F]{1,8})|(0[0-7]{0,11})|([1-9][0-9]{0,9}))')
UID_LIMIT = (1 << 32) - 1


def login_defs_number(value):
    """The number `value` says for useradd, None when it says none (useradd then
    takes its default): uids are 32 bits."""
    found = LOGIN_DEFS_NUMBER.fullmatch(value)
    if not found:
        return None
    hexadecimal, octal, decimal = found.groups()
    number = (int(hexadecimal, 16) if hexadecimal else int(octal, 8) if octal
              else int(decimal))
    return number if number <= UID_LIMIT else None


# A login.defs line as getdef splits it: the name, then the rest of the line with
# trailing blanks dropped, leading blanks and quotes skipped, cut at the next quote
LOGIN_DEFS_LINE = re.compile(r'[ \t]*([^ \t#][^ \t]*)[ \t][ \t"]*([^"]*)')


def user_uids(root):
    """(UID_MIN, UID_MAX) of the root's login.defs, the uids useradd gives people;
    its defaults for a value missing or not a number useradd reads (see
    login_defs_number), and when the two make no range.  A name given twice: the
    last counts, as for useradd."""
    try:
        data = root.read(LOGIN_DEFS, limit=LOGIN_DEFS_MAX) or b''
    except OSError:     # a FIFO, a device, larger than any login.defs: the defaults
        data = b''
    found = dict(zip(('UID_MIN', 'UID_MAX'), USER_UIDS))
    for line in data.decode('utf-8', 'replace').split('\n'):
        setting = LOGIN_DEFS_LINE.match(line.rstrip())
        if setting and setting.group(1) in found:
            name, number = setting.group(1), login_defs_number(setting.group(2))
            found[name] = USER_UIDS[name == 'UID_MAX'] if number is None else number
    low, high = found['UID_MIN'], found['UID_MAX']
    return (low, high) if low <= high else USER_UIDS


def not_a_person(uid, root):
    """Why the account of `uid` can be no admin user (None when it can): a system
    account, outside the uids useradd gives people (nobody's 65534 is inside
    Debian's default range of 1000..60000 for useradd, but not for us)."""
    low, high = user_uids(root)
    if not low <= uid <= high:
        return 'user accounts are uids %d..%d (UID_MIN..UID_MAX of %s)' % (low, high, LOGIN_DEFS)
    if uid in NOT_PEOPLE:
        return 'uid %d is %s' % (uid, NOT_PEOPLE[uid])
    return None


def validate_public_key(text):
    """'type base64 [comment]' -> the normalized line; the blob must name its type."""
    import base64
    import struct
    line = ' '.join(text.split()) if isinstance(text, str) else ''
    parts = line.split(' ', 2)
    shown = one_line(line, 40)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise ProvisioningError('invalid SSH public key %r: expected "TYPE BASE64 [COMMENT]" '
                                'with TYPE one of %s' % (shown, ', '.join(KEY_TYPES[:3])))
    try:
        blob = base64.b64decode(parts[1].encode('ascii'), validate=True)
        (size,) = struct.unpack('>I', blob[:4])
        named = blob[4:4 + size].decode('ascii')
    except (ValueError, struct.error, UnicodeError):     # binascii.Error is a ValueError
        named = None
    if named != parts[0]:
        raise ProvisioningError('invalid SSH public key %r: the base64 body is not a %s key'
                                % (shown, parts[0]))
    return line


# password_logins: 'no' or 'yes' for sshd, None to leave sshd alone.  password: from
# the provisioning media, None when there is none; repr() never shows it.
UserRequest = namedtuple('UserRequest', 'name keys key_paths password_logins password')
UserRequest.__repr__ = lambda self: 'UserRequest(%s, %d key(s), password %s)' % (
    self.name, len(self.keys), '(set)' if self.password else '(none)')


def user_from_metadata(metadata):
    """The admin user IMDS asks for: its name, key lines and their IMDS paths; password
    logins off when IMDS says disablePasswordAuthentication (it has no password)."""
    name = validate_user_name(compute_field(metadata, 'osProfile', 'adminUsername'))
    keys, paths = [], []
    entries = metadata.get('compute', {}).get('publicKeys') or []
    if not isinstance(entries, list):
        raise ProvisioningError('IMDS publicKeys is not a list')
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProvisioningError('IMDS publicKeys holds a %s, not an object'
                                    % type(entry).__name__)
        key = validate_public_key(entry.get('keyData'))
        if key not in keys:
            keys.append(key)
        paths.append(entry.get('path') if isinstance(entry.get('path'), str) else '')
    disable = compute_field(metadata, 'osProfile', 'disablePasswordAuthentication') == 'true'
    return UserRequest(name, keys, paths, 'no' if disable else None, None)


def user_with_media(request, media):
    """The media adds the password, and its DisableSshPasswordAuthentication decides
    sshd's PasswordAuthentication (IMDS still names the user and gives the keys)."""
    if media is None:
        return request
    logins = {'true': 'no', 'false': 'yes'}.get(media.disable_password_auth.lower(),
                                                request.password_logins)
    return request._replace(password=media.password, password_logins=logins)


def authorized_keys_path(home, imds_paths, log):
    """The path IMDS gives when it lies inside the home, else ~/.ssh/authorized_keys
    (a path left aside is logged, when `log` is given)."""
    default = os.path.join(home, '.ssh', 'authorized_keys')
    for path in sorted(set(p for p in imds_paths if p), key=imds_paths.index):
        normal = os.path.normpath(path)
        if (os.path.isabs(path) and normal.startswith(home.rstrip('/') + '/')
                and '..' not in path.split('/')):
            return normal
        if log:
            log.info('user: key path %r is outside %s; using %s'
                     % (one_line(path, 80), home, default))
    return default


def plan_user(facts, system):
    """With --provision-user, the admin user as IMDS (and the media) ask for it."""
    if not facts.options.provision_user:
        return facts, []
    request = user_with_media(user_from_metadata(facts.metadata), facts.media)
    return user_plan(facts, system, request)


def user_ready(facts):
    """Once the user step's actions are done: (facts with the admin user the hooks
    get, the line said then or None)."""
    name = compute_field(facts.metadata, 'osProfile', 'adminUsername')
    return (facts._replace(admin_user=name),
            'user: %s ready' % name if facts.options.provision_user else None)


def user_plan(facts, system, request):
    """(facts, the actions that make the admin user as asked: account, locked password,
    sudo, keys, sshd), leaving out what is so already.  Accounts are the root's own
    (its /etc/passwd; the account tools act on it)."""
    name = request.name
    account = system.account(name)
    why = account and not_a_person(account.uid, system.files)
    if why:
        raise ProvisioningError('admin user %s exists as a system account (uid %d); refused: %s'
                                % (name, account.uid, why))
    actions = []
    left = unfinished_user(facts, system, name)
    if account is None and not left:
        refuse_useradd(system, name)
    if left:
        actions.append(Action('remove what a cut useradd left of %s (its entries in %s): '
                              'userdel -r, then groupdel of its group if left'
                              % (name, ', '.join(left)),
                              lambda: remove_unfinished_user(system, name)))
        account = None
    home = None     # a new account's: where useradd makes it, read when the keys go in
    if account is None:
        shell = system.login_shell()
        actions.append(Action('create user %s (useradd -m -s %s), password locked'
                              % (name, shell), lambda: create_user(facts, system, name, shell)))
    else:
        home = account.home
        if not request.password and not password_locked(system, name):
            actions.append(Action('lock the password of %s (usermod -L)' % name,
                                  lambda: lock_password(system, name)))
    if request.password:
        refuse_password(request.password)   # here, or a dry run promises what fails
        actions.append(Action('set the password of %s from the provisioning media: (set), '
                              'with chpasswd' % name,
                              lambda: set_password(system, name, request.password)))
    actions += sudo_plan(system, name, request.password is not None)
    actions += keys_plan(system, request, home)
    if request.password_logins:
        facts, setting = sshd_plan(facts, system, request.password_logins)
        actions += setting
    else:
        system.log.info('user: disablePasswordAuthentication is not "true"; sshd left alone')
    return facts, actions


ACCOUNT_FILES = ('/etc/passwd', '/etc/shadow', '/etc/group', '/etc/gshadow')


def account_entries(root, path):
    """The entries of the account file `path` of the root (/etc/passwd, /etc/group...),
    each its list of fields, read through the root (see Root.read).  Lines end at
    '\\n' only, as glibc and the shadow tools split them: a field may hold U+0085 or
    U+2028, which str.splitlines would take for the start of another entry."""
    return [line.split(':') for line in (root.read_text(path) or '').split('\n')]


def account_entry(root, path, name):
    """The fields of `name`'s entry in the account file `path` of the root (None
    when it has none)."""
    return next((fields for fields in account_entries(root, path) if fields[0] == name), None)


def account_files_naming(system, name):
    """The account files of the root that hold an entry for `name`."""
    return [path for path in ACCOUNT_FILES if account_entry(system.files, path, name) is not None]


def refuse_useradd(system, name):
    """The image's own group or home of `name` (no account of that name, no cut
    useradd of ours left them): useradd would fail on the group, or keep the home
    (the admin's keys in a directory it does not own, which userdel -r then refuses
    to remove).  Refused before anything is made or claimed."""
    fields = account_entry(system.files, '/etc/group', name)
    if fields is not None:
        gid = printable(fields[2])[:20] if len(fields) > 2 else '?'
        raise ProvisioningError('user: the image has a group %s (gid %s) and no user %s: '
                                'remove the group from the image or choose another '
                                'admin name' % (name, gid, name))
    home = os.path.join(system.home_base(), name)
    found = system.files.lstat(home)
    if found is not None:
        raise ProvisioningError('user: %s exists in the image, owned by uid %d: remove it '
                                'from the image or choose another admin name'
                                % (home, found.st_uid))


def unfinished_user(facts, system, name):
    """The account files holding a part of `name` that a run on this VM began making
    with useradd and never recorded as made: a power cut in useradd leaves any subset
    of its four entries and its home ([] when none is left, or the record says no
    such thing).  Nobody could log in as it yet (no key, no sudo rule: they come
    after useradd), so all of it is made again."""
    state = read_state(system.files) or {}
    if (not facts.vm_id or state.get('vm_id') != facts.vm_id
            or state.get('admin_user_creating') != name):
        return []
    return account_files_naming(system, name)


# userdel(8): 6 the user does not exist (only a group or shadow entry was made);
# 12 the home could not be removed (none was made; or it is not the user's: kept)
USERDEL_GONE = (0, 6, 12)


def remove_unfinished_user(system, name):
    """userdel -r (not -f: a home that is not the account's stays, e.g. one that was
    there before useradd ran), then groupdel of a group of that name userdel left,
    when nobody is in it, and the home when it is an empty directory.  Shadow or
    gshadow lines left alone are useradd's to replace."""
    system.run(system.account_tool('userdel', '-r', name), 'user', accept=USERDEL_GONE)
    fields = account_entry(system.files, '/etc/group', name)
    if fields is not None:
        if len(fields) > 3 and fields[3].strip():
            raise ProvisioningError('user: the group %s a cut useradd left has members (%s); '
                                    'refused to remove it' % (name, one_line(fields[3], 80)))
        system.run(system.account_tool('groupdel', name), 'user')
    try:    # cut between useradd's mkdir and chown: still root's, so userdel kept it
        system.files.at(os.path.join(system.home_base(), name),
                        lambda fd, entry: os.rmdir(entry, dir_fd=fd), follow=False)
    except OSError:     # none, not empty (then refused, its owner named), not a directory
        pass
    system.log.info('user: removed what a cut useradd left of %s' % name)


def create_user(facts, system, name, shell):
    """useradd, between two records on the disk: before it, that we are making `name`
    (a power cut in useradd leaves a part of the account, the next run must make it
    again); after it, that we made it (--deprovision --user removes it, whenever the
    power goes later).  Neither claims the host keys (ssh_host_keys_for is carried).
    Returns the facts it established; a failure carries them."""
    refuse_useradd(system, name)    # at the moment of the action: what the plan saw may differ
    write_state(system, facts._replace(user_creating=name), 'provisioning', 'user',
                'the run stopped while making the admin user %s' % name)
    before = account_files_naming(system, name)
    try:
        system.run(system.account_tool('useradd', '-m', '-s', shell, name), 'user')
    except ProvisioningError as exc:
        # useradd ran to its end: when it made nothing, what is there of `name` was
        # there before it, and no later run may take it for a cut useradd's
        if account_files_naming(system, name) != before:
            raise with_facts(exc, {'user_creating': name})
        dropped = {'user_creating': None, 'user_claim_dropped': True}
        write_state(system, facts._replace(**dropped), 'provisioning', 'user',
                    'useradd of %s failed, making nothing' % name)
        raise with_facts(exc, dropped)
    made = {'user_created': name, 'user_creating': None}
    try:
        write_state(system, facts._replace(**made), 'provisioning', 'user',
                    'the run stopped after making the admin user %s' % name)
        account = system.account(name)
        if account is None:
            raise ProvisioningError('user: useradd made no entry for %s in /etc/passwd' % name)
        system.log.info('user: created %s (uid %d, shell %s)' % (name, account.uid, shell))
        if not password_locked(system, name):
            lock_password(system, name)
    except Exception as exc:
        raise with_facts(exc, made)
    return made


def password_locked(system, name):
    """IMDS carries no password: none may work ('!' or '*' in /etc/shadow)."""
    fields = account_entry(system.files, '/etc/shadow', name)
    return fields is not None and fields[1:2] != [] and fields[1][:1] in ('!', '*')


def lock_password(system, name):
    system.run(system.account_tool('usermod', '-L', name), 'user')


def refuse_password(password):
    """A password chpasswd cannot take is refused (never shown): a line break would
    start another name:password line of its stdin."""
    if any(c in password for c in '\n\r\0'):
        raise ProvisioningError('user: the password on the provisioning media holds a line '
                                'break or NUL; chpasswd cannot take it')


def set_password(system, name, password):
    """chpasswd, the password on its stdin only: never in argv (ps shows it), a log
    line, a temporary file or an error message.  It replaces a locked hash, so the
    account is unlocked by it."""
    refuse_password(password)
    system.run(system.account_tool('chpasswd'), 'user', stdin='%s:%s\n' % (name, password),
               secret=password)
    system.log.info('user: password of %s set (chpasswd)' % name)


def sudo_plan(system, name, has_password):
    """sudo asks for the password when the user has one (as waagent does), not when
    the account's password is locked."""
    if not system.files.is_dir(os.path.dirname(SUDOERS_DROP_IN)):
        system.log.info('user: /etc/sudoers.d does not exist (sudo not installed); no sudo rule')
        return []
    if has_password:
        rule = ('# written by azure-provisioning: the admin user, with the password from\n'
                '# the provisioning media\n%s ALL=(ALL) ALL\n' % name).encode()
    else:
        rule = ('# written by azure-provisioning: the admin user from IMDS, whose password\n'
                '# is locked (IMDS carries none)\n%s ALL=(ALL) NOPASSWD:ALL\n' % name).encode()
    if system.files.read(SUDOERS_DROP_IN) == rule:
        return []

    def write_rule():
        visudo = find_tool('visudo')
        system.files.write(SUDOERS_DROP_IN, rule, mode=0o440,
                           check=[visudo, '-cf'] if visudo else None, deadline=system.deadline)
        # the policy's label (etc_t), not the type our domain gives new files in /etc
        system.restore_labels([system.files.path(SUDOERS_DROP_IN)], 'user')
        system.log.info('user: sudo rule %s written%s'
                        % (SUDOERS_DROP_IN, ' (visudo -cf ok)' if visudo else ''))
    return [Action('write %s granting %s sudo' % (SUDOERS_DROP_IN, name), write_rule)]


def keys_plan(system, request, home):
    """The keys IMDS gives that authorized_keys in `home` lacks (for an account useradd
    has yet to make, home None: all of them, in the home useradd makes).  The action
    adds what is missing then, in the home /etc/passwd gives the account then: useradd
    alone knows where it makes a home, and what /etc/skel gave it is there after."""
    name, keys = request.name, request.keys
    if not keys:
        system.log.info('user: IMDS has no public keys for %s' % name)
        return []
    if home is None:
        says = 'authorized_keys in the home useradd makes for %s' % name
        missing = keys
    else:
        says = authorized_keys_path(home, request.key_paths, system.log)
        missing = keys_to_add(system, keys, says)[1]
    if not missing:
        system.log.info('user: %d key(s) already in %s' % (len(keys), says))
        return []
    return [Action('add %d key(s) to %s (0600, owner %s)' % (len(missing), says, name),
                   lambda: install_keys_at_home(system, request, home))]


def install_keys_at_home(system, request, planned_home):
    """install_keys in the home the root's /etc/passwd gives the account now (a key
    path IMDS gives outside it is logged here unless the plan logged it already)."""
    account = system.account(request.name)
    if account is None:
        raise ProvisioningError('user: %s has no entry in /etc/passwd; no keys written'
                                % request.name)
    path = authorized_keys_path(account.home, request.key_paths,
                                system.log if account.home != planned_home else None)
    install_keys(system, request.name, path, request.keys)


def keys_to_add(system, keys, path):
    """(the lines authorized_keys at `path` holds, the keys it lacks).  Lines end at
    '\\n' only, as sshd reads them: a form feed or U+0085 in a comment is comment."""
    present = system.files.read(path)
    lines = present.decode('utf-8', 'replace').split('\n') if present else []
    if lines and not lines[-1]:     # the newline ending the last line
        lines.pop()
    known = set(' '.join(line.split()[:2]) for line in lines)
    return lines, [key for key in keys if ' '.join(key.split()[:2]) not in known]


def install_keys(system, name, path, keys):
    """Add the keys authorized_keys lacks now, writing it (0600) and the directories
    to it (0700), all owned by the user, inside the root and never through a
    symbolic link."""
    account = system.account(name)
    if account is None:
        raise ProvisioningError('user: %s has no entry in /etc/passwd; no keys written' % name)
    lines, new = keys_to_add(system, keys, path)
    if not new:
        system.log.info('user: %d key(s) already in %s' % (len(keys), path))
        return
    files, directory = system.files, os.path.dirname(path)
    for link in (directory, path):
        found = files.lstat(link)
        if found is not None and stat.S_ISLNK(found.st_mode):
            raise ProvisioningError('%s is a symbolic link; refusing to write keys through it'
                                    % files.path(link))
    made = []
    parent = directory
    while not files.is_dir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    for missing in reversed(made):
        files.make_dirs(missing, 0o700)
        files.at(missing, lambda fd, entry: os.chown(entry, account.uid, account.gid, dir_fd=fd,
                                                     follow_symlinks=False), follow=False)
    if directory == os.path.normpath(os.path.join(account.home, '.ssh')):
        files.at(directory, lambda fd, entry: os.chmod(entry, 0o700, dir_fd=fd), follow=False)
    files.write(path, ''.join(line + '\n' for line in lines + new).encode('utf-8'), mode=0o600,
                owner=(account.uid, account.gid), deadline=system.deadline)
    system.restore_labels([files.path(directory)], 'user')  # ssh_home_t, or sshd may not read them
    system.log.info('user: %d key(s) added to %s' % (len(new), files.path(path)))


def sshd_plan(facts, system, logins):
    """(facts, [the action that sets sshd's PasswordAuthentication]) when sshd reads
    a drop-in; what stands in the way is a warning."""
    config = system.files.read_text('/etc/ssh/sshd_config')
    if config is None:
        system.log.info('user: no /etc/ssh/sshd_config; PasswordAuthentication left alone')
        return facts, []
    if not re.search(r'^\s*Include\s+/etc/ssh/sshd_config\.d/\*\.conf\s*$', config, re.M | re.I):
        system.log.info('user: sshd_config does not include sshd_config.d/*.conf; '
                        'PasswordAuthentication left alone')
        return facts, []
    setting = ('# written by azure-provisioning (DisableSshPasswordAuthentication)\n'
               'PasswordAuthentication %s\n' % logins).encode()
    if system.files.read(SSHD_DROP_IN) == setting:
        return facts, []
    # sshd starts with an Include that matches nothing; the drop-in needs its directory
    directory = os.path.dirname(SSHD_DROP_IN)
    make_directory = not system.files.is_dir(directory)
    if make_directory and system.files.lstat(directory) is not None:
        # a file, or a link to nothing or out of the directories: not ours to replace
        return with_warning(facts, 'PasswordAuthentication left alone: %s is not a directory'
                            % directory), []

    def write_setting():
        if make_directory:
            system.files.make_dirs(directory, 0o755)
            system.log.info('user: made %s (0755)' % directory)
        system.files.write(SSHD_DROP_IN, setting, deadline=system.deadline)
        # the policy's labels (etc_t), not the type our domain gives new files in /etc:
        # the directory, when made, and the drop-in in it; sshd must read both
        system.restore_labels(
            [system.files.path(directory if make_directory else SSHD_DROP_IN)], 'user')
        system.log.info('user: PasswordAuthentication %s (%s)' % (logins, SSHD_DROP_IN))
        restart_sshd(system, required=False)
    return facts, [Action('write %s%s: PasswordAuthentication %s' % (
        SSHD_DROP_IN, ' (making %s, 0755)' % os.path.dirname(SSHD_DROP_IN)
        if make_directory else '', logins), write_setting)]


def restart_sshd(system, required=True):
    """sshd must serve what we changed (keys, PasswordAuthentication): a running one
    re-reads it on reload; one that failed to start for lack of keys (Debian's does)
    is started.  Only the system's sshd, for a root that is this machine's, never
    from a test namespace: the sshd of an image mounted elsewhere is not this
    machine's.  Not required (a setting): a failure is a warning; the setting
    applies from its next start."""
    if not system.is_machine() or not system_systemd():
        return
    try:
        shown = system.run(['systemctl', 'show', '-p', 'Id', '-p', 'ActiveState',
                            'ssh.service', 'sshd.service'], 'sshd')
        units = {}
        for block in shown.strip().split('\n\n'):
            fields = dict(line.split('=', 1) for line in block.splitlines() if '=' in line)
            units[fields.get('Id')] = fields.get('ActiveState')
        for unit, state in sorted(units.items()):
            if not unit or state == 'inactive':     # not started (yet): it reads them then
                continue
            verb = 'reload-or-restart' if state == 'active' else 'restart'
            if verb == 'restart':   # it may have hit its start limit while it had no keys
                system.run(['systemctl', 'reset-failed', unit], 'sshd')
            system.run(['systemctl', verb, unit], 'sshd')
            system.log.info('sshd: %s %s' % (verb, unit))
    except ProvisioningError as exc:
        if required:
            raise
        system.log.warning('sshd not reloaded, the setting applies from its next start: %s'
                           % exc)


# --------------------------------------------------------------------------
# Per-VM identity: what the VMs of one image must not share (SSH host keys), and
# the record of this VM's provisioning that tells a later run which VM it is on
# --------------------------------------------------------------------------

DATA_DIR = '/var/lib/azure-provisioning'     # the record, custom-data and user-data
STATE_FILE = DATA_DIR + '/state.json'
SSH_HOST_KEY = re.compile(r'ssh_host_.*key(\.pub)?\Z')
FINGERPRINTS = ('-----BEGIN SSH HOST KEY FINGERPRINTS-----',    # as cloud-init prints them
                '-----END SSH HOST KEY FINGERPRINTS-----')


STATE_MAX = 1 << 20         # bytes: ours are a few hundred


def parse_state(data):
    """The record from its bytes (a dict); ValueError saying what they are instead."""
    if len(data) > STATE_MAX:
        raise ValueError('larger than %d bytes' % STATE_MAX)
    try:
        state = parse_json(data.decode('utf-8'))
    except UnicodeDecodeError:
        raise ValueError('not UTF-8')
    except ValueError:
        raise ValueError('not JSON')
    if not isinstance(state, dict):
        raise ValueError('not a JSON object')
    return state


def read_state(root, strict=False):
    """The record of the last run on this disk (a dict), or None: missing, unreadable
    or broken (a broken record must not stop provisioning; it costs the host keys).
    strict (--status): a file that is there but cannot be read (permissions) is an
    OSError, one that holds no record a ValueError saying what it holds."""
    try:
        data = root.read(STATE_FILE, limit=STATE_MAX)
    except OSError as exc:      # a FIFO, a device, larger than STATE_MAX, permissions
        if not strict:
            return None
        if exc.errno == errno.EFBIG:    # no record of ours is that large: not one
            raise ValueError(exc.strerror)
        raise
    if data is None:
        return None
    try:
        return parse_state(data)
    except ValueError:
        if strict:
            raise
        return None


def write_private(system, path, data):
    """A file of DATA_DIR (`path` as on the VM): ours alone (custom data and the
    record may hold secrets), whoever owned the directory or the file before, never
    through a symbolic link."""
    directory = os.path.dirname(path)
    found = system.files.lstat(directory)
    if found is not None and stat.S_ISLNK(found.st_mode):
        raise ProvisioningError('%s is a symbolic link; refusing to write through it'
                                % system.files.path(directory))
    system.files.make_dirs(directory, 0o700)

    def make_ours(fd, name):
        opened = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=fd)
        try:
            os.fchown(opened, os.geteuid(), os.getegid())
            os.fchmod(opened, 0o700)
        finally:
            os.close(opened)
    system.files.at(directory, make_ours, follow=False)
    system.files.write(path, data, mode=0o600, owner=(os.geteuid(), os.getegid()),
                       deadline=system.deadline.without_reserve())


def write_state(system, facts, result, step=None, reason=None):
    """Record this run: which VM, what was done and how long it took (the executor
    writes it, never in a dry run; create_user around useradd)."""
    previous = read_state(system.files) or {}
    vm_id = facts.vm_id or ''
    if not vm_id and isinstance(previous.get('vm_id'), str):
        # a run that failed before IMDS named the VM: the last record's VM, and what
        # it says we made there, stand (else a user of ours would become the image's)
        vm_id = previous['vm_id']
    state = {'result': result, 'vm_id': vm_id,
             'incarnation': facts.incarnation, 'hostname': facts.hostname,
             'admin_user': facts.admin_user or None,
             'ssh_host_keys': facts.host_keys,
             'steps': [{'step': name, 'seconds': round(seconds, 3)}
                       for name, seconds in facts.steps],
             'timestamp': utc_timestamp(),
             'agent': '%s/%s' % (AGENT_NAME, VERSION)}
    # which admin user we made (--deprovision --user removes it), kept across runs;
    # and the one a run began making and never recorded as made (useradd cut short:
    # any part of it may exist), which the next run makes again
    same_vm = previous.get('vm_id') == state['vm_id']
    made = previous.get('admin_user_created') if same_vm else None
    state['admin_user_created'] = facts.user_created or made
    creating = (previous.get('admin_user_creating')
                if same_vm and not facts.user_created and not facts.user_claim_dropped
                else None)
    state['admin_user_creating'] = facts.user_creating or creating
    # the VM the host keys on disk were made for: this run's when it made them, else
    # the last record's (a run that failed before the identity step left them as
    # they were).  The only proof plan_identity trusts.
    made_for = facts.host_keys_for or previous.get('ssh_host_keys_for')
    state['ssh_host_keys_for'] = made_for if isinstance(made_for, str) and made_for else None
    if result != 'provisioned':
        state.update(step=step, reason=reason)
    try:
        write_private(system, STATE_FILE,
                      (json.dumps(state, indent=2, sort_keys=True) + '\n').encode())
    except (OSError, ProvisioningError) as exc:    # the report is what matters
        system.log.warning('could not write %s: %s' % (STATE_FILE, describe_error(exc)))


def host_key_names(root):
    return sorted(root.names('/etc/ssh', SSH_HOST_KEY.pattern))


HOST_KEY_MAX = 1 << 16      # bytes of one host key file: a 16384-bit RSA key is < 13 KiB


def host_keys_complete(system):
    """Whether /etc/ssh holds host keys sshd can start on: at least one private key,
    each a non-empty regular file whose public key (ssh-keygen -y) is the one in the
    .pub beside it.  A record saying the keys were made for this VM is worth nothing
    without them: a --deprovision that removed them, then failed at userdel, keeps
    the record, and a power cut can leave them empty or cut short (a file's data
    reaches the disk after its name on XFS, on ext4 without auto_da_alloc).  Each
    key is read here, inside the root and bounded, and given to ssh-keygen on its
    stdin (a pipe: 0600 for ssh-keygen's permission check; a path could lead it out
    of the root).  A key it cannot load (exit 255) is not whole; ssh-keygen that
    cannot run is an error, as it could not make new keys either."""
    root = system.files
    names = host_key_names(root)
    private = [n for n in names if not n.endswith('.pub')]
    if not private:
        return False
    keygen = find_tool('ssh-keygen') or 'ssh-keygen'
    for name in private:
        try:
            key = root.read('/etc/ssh', name, limit=HOST_KEY_MAX)
            public = root.read('/etc/ssh', name + '.pub', limit=HOST_KEY_MAX)
        except OSError:     # not a regular file, too large, unreadable
            return False
        fields = (public or b'').decode('utf-8', 'replace').split()[:2]
        if not key or len(fields) != 2:
            return False
        derived = system.run([keygen, '-y', '-P', '', '-f', '/dev/stdin'],
                             'ssh host keys: checking /etc/ssh/%s' % printable(name),
                             stdin=key.decode('utf-8', 'replace'), accept=(0, 255))
        if derived.split()[:2] != fields:
            return False
    return True


def plan_identity(facts, system):
    """New SSH host keys when this VM is not the one that made the keys it has: at
    the first boot of an image, and of an image captured again from a provisioned VM.
    Tied to the vmId (cloud-init #3910: regenerating on a mere guess surprised users),
    and to the record's ssh_host_keys_for alone: its vm_id is written after a failure
    too, one that may have come before the keys were replaced.  A record without the
    field (an older version's) proves nothing: the keys are replaced once more."""
    if facts.options.keep_host_keys:
        return facts._replace(host_keys='kept (--keep-ssh-host-keys)'), []
    if not any(system.files.stat(d, 'sshd') is not None for d in ('/usr/sbin', '/sbin')):
        system.log.info('ssh host keys: no sshd in this image; nothing to do')
        return facts._replace(host_keys='none (no sshd)'), []
    vm_id = facts.vm_id
    state = read_state(system.files) or {}
    made_for = state.get('ssh_host_keys_for')
    recorded = made_for or state.get('vm_id')
    if vm_id and made_for == vm_id:
        if host_keys_complete(system):
            system.log.info('ssh host keys: kept (made at this VM\'s first boot)')
            return facts._replace(host_keys='kept (made for this VM)', host_keys_for=vm_id), []
        why = ('the keys made for this VM are not all there, or not whole (--deprovision '
               'removed them, a power cut emptied them, or someone did)')
    elif vm_id and recorded == vm_id:
        why = 'the record does not say they were made for this VM'
    elif recorded:
        why = 'the disk was provisioned as VM %s before' % one_line(str(recorded), 60)
    else:
        why = 'first boot of this image'
    old = host_key_names(system.files)
    return facts, [Action('replace the SSH host keys (%s): remove %d file(s) in /etc/ssh, '
                          'ssh-keygen -A, print the fingerprints, restart sshd' % (why, len(old)),
                          lambda: replace_host_keys(system, vm_id, old))]


KEYS_ASIDE = '.azure-provisioning-keys.'     # where new host keys are made, beside /etc/ssh


def remove_keys_left_aside(system, directory):
    """A power cut while keys were being made aside leaves their directory, private
    keys in it, which nothing else would ever remove.  Only real directories of that
    name: a link is not ours to follow."""
    import shutil
    for name in glob_names(directory, re.escape(KEYS_ASIDE)):
        path = os.path.join(directory, name)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
            system.log.info('ssh host keys: removed %s, left by an interrupted run' % path)


def replace_host_keys(system, vm_id, old):
    """New keys are made aside, then renamed over the old ones: at no moment is
    /etc/ssh without keys, since an sshd that re-executes itself then (a reload of an
    earlier step lands asynchronously) exits for good ("no hostkeys available").
    Returns the facts it established; a failure after the renames carries them."""
    import shutil
    import tempfile
    keygen = find_tool('ssh-keygen') or 'ssh-keygen'
    ssh = system.files.path('/etc/ssh')
    remove_keys_left_aside(system, os.path.dirname(ssh))
    aside = tempfile.mkdtemp(prefix=KEYS_ASIDE, dir=os.path.dirname(ssh))
    try:
        os.makedirs(os.path.join(aside, 'etc/ssh'))
        system.run([keygen, '-A', '-f', aside], 'ssh host keys')
        if not host_key_names(Root(aside)):     # OpenSSH before 7.8: -A ignores -f
            for kind in sorted(set(re.findall(r'ssh_host_(\w+)_key', ' '.join(old)))
                               or ('rsa', 'ecdsa', 'ed25519')):
                system.run([keygen, '-q', '-t', kind, '-N', '', '-f',
                            os.path.join(aside, 'etc/ssh', 'ssh_host_%s_key' % kind)],
                           'ssh host keys')
        made = host_key_names(Root(aside))
        public = [n for n in made if n.endswith('.pub')]
        if not public:
            raise ProvisioningError('ssh host keys: ssh-keygen -A made none')
        fingerprints = [system.run([keygen, '-l', '-f', os.path.join(aside, 'etc/ssh', n)],
                                   'ssh host keys').strip() for n in public]
        # their bytes on the disk before their names are: the record that follows
        # calls the keys this VM's, and a power cut must not leave them empty
        for name in made:
            sync_file(os.path.join(aside, 'etc/ssh', name))
        for name in sorted(made, key=lambda n: n.endswith('.pub')):     # private ones first
            system.files.at('/etc/ssh/' + name, lambda fd, key, name=name: os.replace(
                os.path.join(aside, 'etc/ssh', name), key, dst_dir_fd=fd), follow=False)
        for name in set(old) - set(made):   # a type ssh-keygen -A no longer makes (dsa)
            system.files.remove('/etc/ssh/' + name)
        # the new names on the disk: /etc/ssh as the renames found it
        system.files.at('/etc/ssh/' + made[0], lambda fd, _: sync_directory(fd), follow=False)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    # from here on the keys on disk are this VM's, whatever fails next
    learned = {'host_keys_for': vm_id or None}
    try:
        # sshd_key_t, not the etc_t of the directory they were made in
        system.restore_labels([os.path.join(ssh, n) for n in made], 'ssh host keys')
        # unprefixed, for people and tools that read the serial console (boot diagnostics)
        system.log.block([FINGERPRINTS[0]] + fingerprints + [FINGERPRINTS[1]])
        learned['host_keys'] = 'replaced'
        system.log.info('ssh host keys: %d new (%s)' % (len(public), ', '.join(
            n[len('ssh_host_'):-len('_key.pub')] for n in public)))
        restart_sshd(system)
    except Exception as exc:
        raise with_facts(exc, learned)
    return learned


# --------------------------------------------------------------------------
# ready.d hooks: the image's own steps that must succeed before Ready
# --------------------------------------------------------------------------

HOOKS_DIR = '/etc/azure-provisioning/ready.d'
HOOK_KILL_GRACE = 5         # seconds to wait for a killed hook to be gone
HOOK_OUTPUT_GRACE = 0.5     # seconds to read what a finished hook still had in the pipe
HOOK_LINE_MAX = 8192        # bytes of one line of a hook's output


RUN_PARTS_NAME = re.compile(r'[A-Za-z0-9_-]+')


def imds_user_data(metadata):
    """IMDS compute.userData decoded (api-version 2021-01-01 on); None when empty."""
    text = compute_field(metadata, 'userData')
    try:
        return decode_base64(text, 'IMDS compute.userData') if text else None
    except ValueError as exc:
        raise ProvisioningError(str(exc))


# the files plan_data keeps: (name in DATA_DIR, its Facts field, the hooks' variable)
KEPT_DATA = (('custom-data', 'custom_data', 'AZURE_CUSTOM_DATA'),
             ('user-data', 'user_data', 'AZURE_USER_DATA'))


def plan_data(facts, system):
    """Custom data (media) and user data (IMDS), kept for the image's hooks in
    DATA_DIR.  Never run by us: what they mean (a cloud-config, a script, a blob) is
    the image's business, and a hook can run them knowingly."""
    found = {'custom_data': facts.media and facts.media.custom_data,
             'user_data': imds_user_data(facts.metadata)}
    actions, kept = [], {}
    for name, field, variable in KEPT_DATA:
        data = found[field]
        if data is None:
            continue
        kept[field] = path = system.files.path(DATA_DIR, name)
        actions.append(Action('write %s (%d bytes, 0600; %s for the hooks)'
                              % (path, len(data), variable),
                              lambda name=name, data=data: keep_data(system, name, data)))
    return facts._replace(**kept), actions


def keep_data(system, name, data):
    write_private(system, '%s/%s' % (DATA_DIR, name), data)
    system.log.info('data: %s written (%d bytes)' % (system.files.path(DATA_DIR, name),
                                                      len(data)))


# the facts a hook finds in its environment, by variable
HOOK_FACTS = (('AZURE_VM_ID', 'vm_id'), ('AZURE_HOSTNAME', 'hostname'),
              ('AZURE_ADMIN_USERNAME', 'admin_user')) + tuple(
                  (variable, field) for _, field, variable in KEPT_DATA)


def hook_environment(facts):
    """The hooks' variables (AZURE_VM_ID...), from the facts that are known."""
    return dict((variable, getattr(facts, field)) for variable, field in HOOK_FACTS
                if getattr(facts, field) is not None)


def plan_hooks(facts, system):
    hooks = list_hooks(system.files.path(HOOKS_DIR), system.log)
    if not hooks:
        return facts, []
    return facts, [Action('run hooks: %s' % ' '.join(hooks),
                          lambda: run_hooks(system, facts, hooks))]


def list_hooks(directory, log):
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    hooks = []
    for name in names:
        path = os.path.join(directory, name)
        # run-parts names: *.dpkg-old, *~ and *.rpmnew are skipped
        if not RUN_PARTS_NAME.fullmatch(name) or not os.path.isfile(path):
            log.debug('hooks: skipping %s (not a run-parts name or not a file)' % name)
        elif not os.access(path, os.X_OK):
            log.info('hooks: skipping %s: not executable' % name)
        else:
            hooks.append(path)
    return hooks


def run_hooks(system, facts, hooks):
    """Run each hook with the VM facts in its environment and the time left as its
    limit; the first failure stops provisioning with the hook's last stderr line."""
    import shutil
    import tempfile
    # /run: a tmpfs, so even a SIGKILL leaves no copy of the metadata behind a reboot
    run_dir = system.files.path('/run')
    scratch = tempfile.mkdtemp(prefix='azure-provisioning-hooks.',
                               dir=run_dir if os.path.isdir(run_dir) else None)
    try:
        imds_copy = os.path.join(scratch, 'imds.json')
        write_file_atomically(imds_copy, json.dumps(facts.metadata, indent=2).encode('utf-8'),
                              mode=0o600, deadline=system.deadline)
        env = dict((k, v) for k, v in os.environ.items()
                   if k not in [variable for variable, _ in HOOK_FACTS])
        env.update(AZURE_IMDS_JSON=imds_copy, **hook_environment(facts))
        for hook in hooks:
            run_hook(hook, env, system.deadline, system.log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_hook(path, env, deadline, log):
    import subprocess
    import threading
    name = os.path.basename(path)
    limit = deadline.remaining()
    env = dict(env, AZURE_PROVISIONING_SECONDS_LEFT='%d' % limit)
    t = time.monotonic()
    try:
        process = subprocess.Popen([path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, cwd='/',
                                   start_new_session=True)
    except (OSError, ValueError) as exc:    # ValueError: a NUL in an IMDS fact
        raise ProvisioningError('hook %s could not start: %s' % (name, describe_error(exc)))
    last_error = ['']
    finished = threading.Event()

    def forward(stream, keep_last):
        # bounded lines: a child writing without newlines must not fill our memory
        for raw in iter(lambda: stream.readline(HOOK_LINE_MAX), b''):
            line = raw.decode('utf-8', 'replace').rstrip()
            if line and not finished.is_set():
                log.info('hook %s: %s' % (name, line))
                if keep_last:
                    last_error[0] = line
        stream.close()

    # Daemon threads, joined for a moment only: a hook may leave a child running
    # (a daemon started with &) that holds our pipes open long after the hook exits.
    readers = [threading.Thread(target=forward, args=(process.stdout, False), daemon=True),
               threading.Thread(target=forward, args=(process.stderr, True), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        code = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        code = None
        if not kill_session(process, HOOK_KILL_GRACE):
            log.warning('hook %s: still not gone %d s after SIGKILL' % (name, HOOK_KILL_GRACE))
    except BaseException:           # SIGTERM (Terminated) or Ctrl-C: the hook goes too
        kill_session(process, HOOK_KILL_GRACE)
        raise
    drained = time.monotonic() + HOOK_OUTPUT_GRACE
    for reader in readers:
        reader.join(max(0.0, drained - time.monotonic()))
    finished.set()      # what a left-over child prints from now on is read and dropped
    if code is None:
        raise ProvisioningError('hook %s timed out after %d s: %s'
                                % (name, limit, last_error[0] or 'no output on stderr'))
    if code != 0:
        raise ProvisioningError('hook %s failed with exit status %d: %s'
                                % (name, code, last_error[0] or 'no output on stderr'))
    log.info('hook %s done (%s)' % (name, elapsed_ms(t)))


# --------------------------------------------------------------------------
# Provisioning: the steps' table, one executor, one failure path
# --------------------------------------------------------------------------

def plan_imds(facts, system):
    t = time.monotonic()
    metadata = fetch_instance_metadata(facts.options.imds, system.deadline, system.log)
    vm_id = compute_field(metadata, 'vmId')
    system.log.info('IMDS: vm %s, computerName %s (%s)' % (
        vm_id or '?', desired_hostname(metadata) or '-', elapsed_ms(t)))
    return facts._replace(metadata=metadata, vm_id=vm_id), []


def plan_media(facts, system):
    wants_user, metadata = facts.options.provision_user, facts.metadata
    media, problem = find_media(system, facts.options.media)
    facts = facts._replace(media=media, media_problem=problem)
    imds_user = compute_field(metadata, 'osProfile', 'adminUsername')
    if media is None:
        # IMDS says the VM was created with a password: without it, nobody can log in
        if wants_user and compute_field(metadata, 'osProfile',
                                        'disablePasswordAuthentication') == 'false':
            raise ProvisioningError(
                'the VM was created with a password (IMDS disablePasswordAuthentication is '
                'false), but %s' % (problem or 'no provisioning media was found'))
        return facts, []
    if wants_user and media.username and imds_user and media.username != imds_user:
        raise ProvisioningError('the provisioning media names the admin user %s, IMDS %s'
                                % (media.username, imds_user))
    if media.password and not wants_user:
        facts = with_warning(facts, 'the provisioning media holds a password for %s; not set: '
                             'this image does not manage users (no --provision-user)'
                             % (media.username or '?'))
    return facts, []


def plan_ready(facts, system):
    """Ready for the current goal state: what every step before led to."""
    return facts, [health_post(facts, system, 'Ready')]


def health_post(facts, system, state, substatus=None, description=None):
    """The action that posts a health report for the current goal state (fetched now:
    a read); it establishes the incarnation Azure accepted it for."""
    wireserver = facts.options.wireserver
    deadline = system.deadline.without_reserve()
    goal_state = fetch_goal_state(wireserver, deadline, system.log)
    report = build_health_report(goal_state, state, substatus, description)

    def post():
        posted = report_health(wireserver, deadline, system.log, state, substatus, description,
                               goal_state)
        return {'incarnation': posted.incarnation}
    return Action('POST to http://%s/machine?comp=health:\n%s'
                  % (host_header(wireserver), report.rstrip('\n')), post)


# In order: each step's name, its planners `plan_X(facts, system) -> (facts,
# [Action])` (each asked once the actions of the one before it are done: what
# is published is the name just set), and what (if anything) it establishes once
# its actions are done: `done(facts) -> (facts, the line said then or None)`.
# The first step that fails is named in the report (step=...); no later one runs.
STEPS = (('imds', (plan_imds,), None), ('media', (plan_media,), None),
         ('hostname', (plan_hostname, plan_publish), None),
         ('user', (plan_user,), user_ready),
         ('identity', (plan_identity,), None), ('data', (plan_data,), None),
         ('hooks', (plan_hooks,), None), ('ready', (plan_ready,), None))


def provision(options, log, out=None):
    """Run every step, then report Ready; returns the exit code (0 or 1)."""
    # time kept back so that a failure can still be told to Azure before the deadline
    deadline = Deadline(options.timeout, reserve=min(60.0, options.timeout / 4.0))
    system = System(options.root, deadline, log)
    return execute(STEPS, first_facts(options), system, out or sys.stdout)


def execute(steps, facts, system, out):
    """The executor: ask each step's planners, each followed by its actions in order
    (carry_out: or print them), timing each step.  A non-fatal action's failure is a
    warning; the first fatal error of any type, from a planner or an action, goes to
    fail(), the one failure path.  Returns the exit code."""
    started = time.monotonic()
    for step, planners, done in steps:
        t = time.monotonic()
        try:
            for plan in planners:
                before = len(facts.warnings)
                facts, actions = plan(facts, system)
                for warning in facts.warnings[before:]:
                    system.log.warning(warning)
                facts = perform_all(actions, facts, system, out)
        except Exception as exc:    # whatever the type: Azure must hear why, not time out
            facts = learned(facts, getattr(exc, 'facts', None), system.log)
            return fail(step, exc, took(facts, step, t), system, out)
        facts = took(facts, step, t)
        if done:
            facts, said = done(facts)
            if said:
                system.log.info('%s (%s)' % (said, elapsed_ms(t)))
    record(facts, system, 'provisioned')    # only now: Ready was accepted (waagent #1511)
    facts = perform_all(kvp_report_plan(system, report_description(
        'success', facts.vm_id, warnings=facts.warnings)), facts, system, out)
    if facts.options.dry_run:
        system.log.info('dry run: nothing changed, nothing posted (%s)' % elapsed_ms(started))
    else:
        system.log.info('Ready accepted for incarnation %s (%d ms; %s since start)'
                        % (facts.incarnation, round(facts.steps[-1][1] * 1000),
                           elapsed_ms(started)))
    return 0


def carry_out(action, dry_run, out, announce=False):
    """The one place --dry-run is decided: print what the action would do, or do it
    (saying so first with announce=True); returns what it returned (None when printed)."""
    # one line each: a name in it (an image's file) may hold a line break
    if dry_run:
        out.write('would %s\n' % printable(action.says))
        return None
    if announce:
        out.write('%s\n' % printable(action.says))
    return action.do()


def perform(action, facts, system, out):
    """Facts after the action (carry_out): with what it established, or, when it is not
    fatal and failed, with the failure as a warning."""
    try:
        return learned(facts, carry_out(action, facts.options.dry_run, out), system.log)
    except Exception as exc:
        if action.fatal:
            raise
        found = dict(getattr(exc, 'facts', None) or {}, warnings=(describe_error(exc),))
        return learned(facts, found, system.log)


def perform_all(actions, facts, system, out):
    for action in actions:
        facts = perform(action, facts, system, out)
    return facts


def learned(facts, established, log):
    """`facts` with what an action established; its warnings are added, and logged."""
    established = dict(established or {})
    warnings = tuple(established.pop('warnings', ()))
    for warning in warnings:
        log.warning(warning)
    return facts._replace(warnings=facts.warnings + warnings, **established)


def took(facts, step, started):
    return facts._replace(steps=facts.steps + ((step, time.monotonic() - started),))


def record(facts, system, result, step=None, reason=None):
    """The record of this run (none in a dry run: nothing was done)."""
    if not facts.options.dry_run:
        write_state(system, facts, result, step, reason)


def failure_reason(exc, step):
    """One line for the report: a ProvisioningError says it all; anything else is
    named with its step and type (e.g. a read-only /etc, or a bug)."""
    if isinstance(exc, ProvisioningError):
        return str(exc)
    if isinstance(exc, OSError):
        return '%s: %s' % (step, describe_error(exc))
    return '%s: unexpected %s: %s' % (step, exc.__class__.__name__,
                                      one_line(str(exc), 200) or 'no message')


def fail(step, exc, facts, system, out):
    """The one failure path: the reason logged, told to KVP first (it needs no
    network, so the host learns it even when the WireServer is what failed; its lock
    wait stops short of the reserve, which this report has to itself), then to the
    WireServer as NotReady/ProvisioningFailed unless posting to it is what failed,
    and recorded.  Returns the exit code."""
    reason = failure_reason(exc, step)
    if step == 'ready':
        reason = 'could not report Ready: %s' % reason
    system.log.error(reason)
    description = report_description('error', facts.vm_id, step, reason)
    facts = perform_all(kvp_report_plan(system, description), facts, system, out)
    reported = False
    if step != 'ready':
        try:
            report = health_post(facts, system, 'NotReady', 'ProvisioningFailed', description)
            facts = learned(facts, carry_out(report, facts.options.dry_run, out), system.log)
            reported = True
        except Exception as exc:
            system.log.error('could not report the failure to Azure: %s'
                             % failure_reason(exc, 'report'))
    record(facts, system, 'failed', step, reason)
    if reported and facts.incarnation is not None:
        system.log.info('reported ProvisioningFailed for incarnation %s; the unit stays enabled'
                        % facts.incarnation)
    return 1


# --------------------------------------------------------------------------
# --deprovision: make a provisioned VM an image again (before az vm deallocate)
# --------------------------------------------------------------------------

DHCP_LEASES = (('/var/lib/dhcp', r'dhclient.*\.leases?\Z'),            # Debian's dhclient
               ('/var/lib/dhclient', r'.*\.leases?\Z'),                # RHEL's dhclient
               ('/var/lib/NetworkManager', r'.*\.lease\Z'),
               ('/var/lib/systemd/network', r'.*\.lease\Z'),
               ('/var/lib/dhcpcd', r'.*\.lease6?\Z'))
MACHINE_ID = '/etc/machine-id'
DBUS_MACHINE_ID = '/var/lib/dbus/machine-id'
UNIT_NAME = 'azure-provisioning.service'
UNIT_DIRS = ('etc/systemd/system', 'usr/lib/systemd/system', 'lib/systemd/system')
WANTS_LINK = '/etc/systemd/system/multi-user.target.wants/' + UNIT_NAME


def deprovision_plan(system, remove_user):
    """Everything that makes this disk one VM rather than an image, to undo: what
    `waagent -deprovision+user` and `cloud-init clean --machine-id` do for theirs.
    Decided before anything is removed: a target that cannot be removed (a directory
    where a file should be, a FIFO for the machine id) stops it here, so that what
    --dry-run lists is what the run does."""
    root = system.files
    plan = []
    problems = []
    for name in host_key_names(root):
        plan += removal(root, '/etc/ssh/' + name, 'SSH host key: every VM makes its own',
                        problems)
    try:
        machine_id = root.read(MACHINE_ID)
    except OSError as exc:
        problems.append(describe_error(exc))
        machine_id = None
    if (machine_id or b'').strip() and changeable(root, MACHINE_ID, problems):
        # empty, not absent: systemd then makes a new one at first boot
        plan.append(Action('empty %s (systemd makes a new one at first boot)' % MACHINE_ID,
                           lambda: root.write(MACHINE_ID, b'')))
    dbus = root.lstat(DBUS_MACHINE_ID)
    if dbus is not None and stat.S_ISREG(dbus.st_mode):
        plan += removal(root, DBUS_MACHINE_ID, 'a copy of the machine id', problems)
    for directory, pattern in DHCP_LEASES:
        for name in sorted(root.names(directory, pattern)):
            plan += removal(root, '%s/%s' % (directory, name), 'DHCP lease', problems)
    for name in sorted(root.names(os.path.dirname(KVP_POOL), r'\.kvp_pool_\d+$')):
        plan += removal(root, '%s/%s' % (os.path.dirname(KVP_POOL), name), 'Hyper-V KVP pool',
                        problems)
    try:
        state = read_state(root, strict=True) or {}
    except OSError as exc:      # a FIFO, a device, too large: whose user would it name?
        problems.append(describe_error(exc))
        state = {}
    except ValueError as exc:
        if remove_user:     # the user it names would go into the image
            raise ProvisioningError('the record %s is %s: which admin user --user should '
                                    'remove is unknown; remove it yourself (userdel -r NAME), '
                                    'then run --deprovision without --user' % (STATE_FILE, exc))
        state = {}
    for name in ('custom-data', 'user-data'):
        plan += removal(root, '%s/%s' % (DATA_DIR, name), 'this VM\'s %s' % name, problems)
    unit = next(('/%s/%s' % (d, UNIT_NAME) for d in UNIT_DIRS
                 if root.stat(d, UNIT_NAME) is not None), None)
    if unit and not root.exists(WANTS_LINK) and changeable(root, WANTS_LINK, problems):
        plan.append(Action('enable %s (%s -> %s): the next VM provisions itself'
                           % (UNIT_NAME, WANTS_LINK, unit),
                           lambda: root.symlink(unit, WANTS_LINK)))
    if remove_user:
        plan += user_removal_plan(system, state, problems)
    # last: an action that fails stops the run before it, and the record left says
    # which admin user a second run still has to remove (userdel fails while it is
    # logged in, the usual case over its own SSH session)
    plan += removal(root, STATE_FILE, 'this VM\'s provisioning record', problems)
    if problems:
        raise ProvisioningError('%s; nothing removed' % '; '.join(problems))
    if not remove_user:
        user_staying(system, state)
    return plan


def removal(root, path, why, problems):
    """[the action that removes the file or link `path`], or [] when there is none.
    A directory there is added to `problems`.  The action removes what is at `path`
    then, in the directory it finds then, inside the root (Root.remove)."""
    try:
        found = root.lstat(path)
    except OSError as exc:
        problems.append(describe_error(exc))
        return []
    if found is None:
        return []
    if stat.S_ISDIR(found.st_mode):
        problems.append('%s is a directory, not a file' % path)
        return []
    if not changeable(root, path, problems):
        return []
    return [Action('remove %s (%s)' % (printable(path), why), lambda: root.remove(path))]


def changeable(root, path, problems):
    """Whether a file can be made, replaced or removed at `path` (a VM path): every
    directory on its way is a directory, or missing (Root.make_dirs makes it; a
    dangling link or a file there cannot be made into one), and the nearest that
    exists can be written in (not a read-only or immutable one).  What is not goes
    to `problems`: found at plan time, before anything is removed; the action meets
    the same test again when it walks the path."""
    parts = [p for p in path.split('/') if p not in ('', '.')][:-1]
    existing = '/'
    for end in range(1, len(parts) + 1):
        directory = '/' + '/'.join(parts[:end])
        try:
            found = root.stat(directory)
            if found is None and root.lstat(directory) is None:
                break       # missing: made, with what follows, by the action
        except OSError as exc:
            problems.append(describe_error(exc))
            return False
        if found is None or not stat.S_ISDIR(found.st_mode):
            problems.append('%s is %s, not a directory: %s cannot be made there' % (
                directory, 'a link to nothing' if found is None else 'a file', path))
            return False
        existing = directory
    try:
        writable = root.access(existing, os.W_OK)
    except OSError as exc:
        problems.append(describe_error(exc))
        return False
    if not writable:
        problems.append('%s cannot be written in (read-only, immutable, or not ours): %s '
                        'cannot be changed' % (existing, path))
        return False
    try:
        refused = root.at(path, unchangeable, follow=False)
    except OSError as exc:
        if not_a_file(exc.errno):
            return True     # nothing there yet: the directory takes a new name
        problems.append(describe_error(exc))
        return False
    if refused:
        problems.append('%s cannot be changed: %s' % (path, refused))
    return not refused


FS_IMMUTABLE_FL = 0x10      # chattr +i: no change at all, by root too
FS_APPEND_FL = 0x20         # chattr +a: appended to only; in a directory, no name removed


def unchangeable(directory, name):
    """Why the file `name` in the directory open as `directory` cannot be removed or
    replaced (a rename over it) though the directory can be written in, or None: the
    file, or its directory, immutable or append-only (the kernel's EPERM, which
    os.access does not foresee).  Only a regular file is opened, and never so that
    it could block (a FIFO) or become our terminal; a link cannot have flags."""
    os.stat(name, dir_fd=directory, follow_symlinks=False)     # none there: OSError
    opened = os.open('.', os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory)
    try:
        flags = inode_flags(opened)
    finally:
        os.close(opened)
    if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
        return 'its directory is %s' % flag_words(flags)
    if not stat.S_ISREG(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode):
        return None
    opened = os.open(name, OPEN_READ, dir_fd=directory)
    try:
        if not stat.S_ISREG(os.fstat(opened).st_mode):    # swapped since the lstat
            return None
        flags = inode_flags(opened)
    finally:
        os.close(opened)
    if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
        return 'it is %s' % flag_words(flags)
    return None


def flag_words(flags):
    return 'immutable (chattr +i)' if flags & FS_IMMUTABLE_FL else 'append-only (chattr +a)'


def inode_flags(fd):
    """The chattr flags of the file open as `fd` (FS_IOC_GETFLAGS); 0 where the
    filesystem keeps none (tmpfs before Linux 6.0, NFS, overlayfs on some)."""
    import fcntl
    import struct
    # _IOR('f', 1, long) in the generic encoding, x86_64's and arm64's; the kernel
    # writes an int at the start of the buffer
    request = 0x80006601 | struct.calcsize('l') << 16
    try:
        answer = fcntl.ioctl(fd, request, bytes(struct.calcsize('l')))
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return 0
        raise
    return struct.unpack('i', answer[:4])[0]


def user_staying(system, state):
    """Plain --deprovision removes the record, the only place that says which admin
    user we made: keeping it in the image is the user's choice, made now or never,
    so they are told while --user can still remove it."""
    name = state.get('admin_user_created')
    if (isinstance(name, str) and USER_NAME.fullmatch(name)
            and account_entry(system.files, '/etc/passwd', name) is not None):
        system.log.warning('deprovision: the admin user %s (made by azure-provisioning) stays in '
                        'the image, with its home, keys and sudo rule: --deprovision --user '
                        'removes it, but not after this run, which removes the record '
                        'naming it'
                        % name)


def user_removal_plan(system, state, problems):
    """The admin user --provision-user made (the record says which), with its home,
    and its sudo rule: what waagent's -deprovision+user does."""
    name = state.get('admin_user_created')
    if not name:
        system.log.info('deprovision: no admin user made by azure-provisioning on record; '
                     'no user removed')
        return []
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise ProvisioningError('the record names the admin user %s, not a user name'
                                % printable(repr(name))[:80])
    entry = account_entry(system.files, '/etc/passwd', name)
    uid = entry[2] if entry and len(entry) > 2 else None
    if uid is not None:
        why = (not_a_person(int(uid), system.files) if re.fullmatch(r'[0-9]{1,10}', uid)
               else 'not a number')
        if why:
            raise ProvisioningError('the record names %s, a system account (uid %s); '
                                    'refused: %s' % (name, printable(uid)[:20], why))
    plan = []
    # the account's home; once it is gone, where useradd -m made it
    home = (entry[5] if entry and len(entry) > 5 and entry[5].startswith('/')
            else os.path.join(system.home_base(), name))
    found = system.files.lstat(home)
    if uid is None and found is not None and not any(
            fields[2:3] == [str(found.st_uid)]
            for fields in account_entries(system.files, '/etc/passwd')):
        # userdel -r removed the account and failed at the home (exit 12: an immutable
        # file, a mount point): no run of userdel can remove it now, and it is the user's
        # (a home of a user still in /etc/passwd is that user's: provisioning refuses
        # to make the admin user in a home that is there already)
        problems.append('the admin user %s is gone, but its home %s is still there (userdel '
                        '-r could not remove it): remove it yourself, then run this again'
                        % (name, home))
    # userdel rewrites /etc/passwd and its siblings (lock files beside them)
    if uid is not None and changeable(system.files, '/etc/passwd', problems):
        argv = system.account_tool('userdel', '-r', name)
        plan.append(Action('remove the admin user %s and its home (userdel -r)' % name,
                           lambda: system.run(argv, 'deprovision')))
    return plan + removal(system.files, SUDOERS_DROP_IN, 'its sudo rule', problems)


def running_on_a_vm():
    """A hypervisor under us: --deprovision without --root wipes this machine's
    identity, which only makes sense on a VM about to be captured."""
    detect = find_tool('systemd-detect-virt')
    if detect:
        try:
            run_tool([detect, '--vm', '--quiet'], Deadline(TOOL_TIMEOUT), 'deprovision')
            return True
        except ProvisioningError:       # exit status 1: none
            return False
    return ' hypervisor' in (read_text('/proc/cpuinfo') or '')


def deprovision(options, log, out):
    """--deprovision: returns the exit code."""
    if Root(options.root).is_machine() and not options.dry_run:
        if os.geteuid() != 0:
            log.error('--deprovision changes this machine: run it as root (or --root DIR '
                      'for a mounted image, or --dry-run to see what it would do)')
            return 1
        if not running_on_a_vm():
            log.error('--deprovision: this machine is no VM (no hypervisor found); refused, '
                      'as it would remove its SSH host keys and machine id (--root DIR for '
                      'an image)')
            return 1
    system = System(options.root, Deadline(options.timeout), log)
    try:
        plan = deprovision_plan(system, options.remove_user)
        for action in plan:
            carry_out(action, options.dry_run, out, announce=True)
    except (ProvisioningError, OSError) as exc:
        log.error('deprovision: %s' % (exc if isinstance(exc, ProvisioningError)
                                       else describe_error(exc)))
        return 1
    if not plan:
        out.write('nothing to remove: this is an image already\n')
    elif not options.dry_run:
        out.write('deprovisioned: capture the image now (az vm deallocate, az vm generalize); '
                  'booting this disk again provisions it again\n')
    return 0


# --------------------------------------------------------------------------
# --status: what the record says about this VM, offline and read-only
# --------------------------------------------------------------------------

DMI_UUID = '/sys/class/dmi/id/product_uuid'


def dmi_vm_id(root):
    """This VM's vmId without the network: SMBIOS product_uuid (root-only), whose
    first three fields are byte-swapped on Gen1 VMs (BIOS, no /sys/firmware/efi), as
    cloud-init and azure-init read it.  None when there is none; OSError when it
    cannot be read (by a user who is not root; not a regular file)."""
    text = (root.read_text(DMI_UUID) or '').strip().lower()
    if not re.fullmatch(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', text):
        return None
    fields = text.split('-')
    if not root.is_dir('/sys/firmware/efi'):
        swap = lambda hex_: ''.join(reversed([hex_[i:i + 2] for i in range(0, len(hex_), 2)]))
        fields[:3] = [swap(f) for f in fields[:3]]
    return '-'.join(fields)


def status(options, out):
    """--status: 0 when this VM was provisioned, else 1."""
    root = Root(options.root)
    corrupt = None
    try:
        state = read_state(root, strict=True)
    except OSError as exc:      # 0600 in a 0700 directory: root's alone; a FIFO, too large
        raise ProvisioningError('cannot read %s: %s%s' % (
            STATE_FILE, exc.strerror or exc.__class__.__name__,
            ' (run as root)' if isinstance(exc, PermissionError) else ''))
    except ValueError as exc:
        state, corrupt = None, str(exc)
    if options.json:
        if corrupt:
            raise ProvisioningError('the record %s is %s' % (STATE_FILE, corrupt))
        out.write(json.dumps(state, indent=2, sort_keys=True) + '\n')
        return 0 if state and state.get('result') == 'provisioned' else 1
    code = 0 if state and state.get('result') == 'provisioned' else 1
    vm, another = this_vm(root, state)
    for line in status_lines(root, state, corrupt) + [vm]:
        # a name in it (the root's path, the record's fields) may hold anything
        out.write(printable(line) + '\n')
    return 1 if another else code


def this_vm(root, state):
    """(what --status says of the VM it runs on and of the record, whether the
    record is another VM's)."""
    try:
        current = dmi_vm_id(root)
    except OSError as exc:      # root-only (0400) on a VM; a FIFO or a huge file in an image
        return 'this VM: unknown (%s unreadable: %s)' % (DMI_UUID, 'run as root' if (
            isinstance(exc, PermissionError) and os.geteuid() != 0)
            else exc.strerror or 'error'), False
    recorded = str((state or {}).get('vm_id', '')).lower()
    missing = current is None and root.lstat(DMI_UUID) is None
    if missing and not root.is_machine():
        # an image's tree: the DMI of the machine we run on is not its VM's
        return ('this VM: not looked up: %s holds no %s (an image, not the running '
                'system)' % (root.top, DMI_UUID)), False
    if current is None:
        return 'this VM: unknown (%s)' % (('no %s: no DMI here' if missing
                                           else '%s holds no UUID') % DMI_UUID), False
    if state is None:
        return 'this VM: %s' % current, False
    if current == recorded:
        return 'this VM: %s: the record is this VM\'s' % current, False
    return ('this VM: %s: the record is of another VM (this disk was captured from it '
            'without --deprovision): this VM is not provisioned' % current), True


def status_lines(root, state, corrupt=None):
    """The record in words; whatever its fields hold (it is a file anyone with root
    may have edited), one line each.  corrupt: what the file holds instead of one."""
    if root.exists(WANTS_LINK):
        unit = 'unit: enabled (provisions at the next boot)'
    elif state and state.get('result') == 'provisioned':
        unit = 'unit: disabled (it disabled itself after Ready)'
    elif state:     # a failed run leaves it enabled, to try again at the next boot
        unit = ('unit: disabled: the next boot does not try again (it stays enabled after a '
                'failure: someone disabled it)')
    else:
        unit = 'unit: disabled (the next boot does not provision)'
    if corrupt:
        return ['record corrupt: %s is %s: whether and how this disk was provisioned is '
                'unknown' % (STATE_FILE, corrupt), unit]
    if state is None:
        return ['not provisioned: no record (%s)' % STATE_FILE, unit]

    def show(key):
        value = state.get(key)
        return one_line(str(value), 200) if value is not None else '-'

    def milliseconds(seconds):
        if isinstance(seconds, (int, float)) and 0 <= seconds < 1e6:
            return '%d ms' % round(seconds * 1000)
        return '?'
    failed = state.get('result') != 'provisioned'
    lines = ['%s: VM %s, incarnation %s, %s, by %s' % (
        'FAILED' if failed else 'provisioned', show('vm_id'), show('incarnation'),
        show('timestamp'), show('agent'))]
    if failed:
        lines.append('failed step: %s: %s' % (show('step'), show('reason')))
    lines.append('hostname: %s; admin user: %s%s; SSH host keys: %s' % (
        show('hostname'), show('admin_user'),
        ' (made by us)' if state.get('admin_user_created') else '', show('ssh_host_keys')))
    steps = state.get('steps') if isinstance(state.get('steps'), list) else []
    lines.append('steps: %s' % (', '.join(
        '%s %s' % (one_line(str(step.get('step')), 40), milliseconds(step.get('seconds')))
        for step in steps if isinstance(step, dict)) or '-'))
    return lines + [unit]


# --------------------------------------------------------------------------
# Image preflight (--check): the mistakes that otherwise show up 20-40 minutes
# later as OSProvisioningTimedOut.  Read-only and offline.
# --------------------------------------------------------------------------

MODULE_DIR = '/usr/local/lib/azure-provisioning'            # install.sh's layout
LAUNCHER_MARK = 'from azure_provisioning import main'
# What each agent leaves in an image, and the package that brings it.
Agent = namedtuple('Agent', 'name binaries units deb rpm suse')
AGENTS = (
    Agent('walinuxagent', ('usr/sbin/waagent', 'usr/bin/waagent'),
          ('walinuxagent.service', 'waagent.service'), 'walinuxagent', 'WALinuxAgent',
          'python3-azure-agent'),
    Agent('cloud-init', ('usr/bin/cloud-init', 'usr/local/bin/cloud-init'),
          ('cloud-init-local.service', 'cloud-init.service', 'cloud-init-main.service',
           'cloud-init-network.service', 'cloud-config.service', 'cloud-final.service',
           'cloud-init.target'), 'cloud-init', 'cloud-init', 'cloud-init'),
)
CLOUD_INIT_DISABLED = 'etc/cloud/cloud-init.disabled'   # cloud-init's own off switch
NEEDED_MODULES = ('json', 'xml.parsers.expat', 'base64', 'shutil')  # not in python3-minimal
FULL_PYTHON = 'install the full python3 package, not python3-minimal'
# --check's exit statuses: what install.sh decides by (never by the rows' wording)
CHECK_READY, CHECK_NOT_READY, CHECK_CANNOT_RUN, CHECK_CRASHED = 0, 1, 3, 4


class Check(object):
    """The checks' shared view of the image, and their results.  `shown` is where the
    image is for the person reading the fixes: install.sh runs the check inside the
    image (chroot, so root is /) and passes the image's real place with --shown-root."""

    def __init__(self, root, shown=None):
        self.root = root
        self.results = []
        self._enabled = None
        top = shell_word(shown or root.top)
        self.shown = shown or root.top
        self.root_flag = '' if top == '/' else ' --root %s' % top
        self.systemctl = 'systemctl' + ('' if top == '/' else ' --root=%s' % top)
        self.chroot = '' if top == '/' else 'chroot %s ' % top
        self.unit_args = []     # the unit's ExecStart= arguments, once read
        self.unreadable = set()     # files said to be unreadable, each once
        self.unrunnable = None      # (why, fix) the unit's Python cannot run us, if so

    def read(self, *parts):
        """A file's text, None when there is none.  One that cannot be read (a 0600
        grub.cfg, as Fedora ships it, for a user who is not root) is a row of its
        own, and None: what it would have said is not checked."""
        try:
            return self.root.read_text(*parts)
        except OSError as exc:      # also a FIFO, a device, too large: never read
            shown = os.path.join('/', *[part.strip('/') for part in parts])
            if shown not in self.unreadable:
                self.unreadable.add(shown)
                self.say('warn', '%s: unreadable (%s): not checked'
                         % (shown, exc.strerror or exc.__class__.__name__),
                         'run --check as root' if isinstance(exc, PermissionError) else None)
            return None

    def run(self, check, *args):
        """One check; an error reading the image ends that check with a row saying
        so, never --check itself."""
        try:
            return check(self, *args)
        except OSError as exc:
            self.say('warn', '%s: %s: not checked' % (check.__name__[len('check_'):],
                                                     describe_error(exc)),
                     'run --check as root')
        except MemoryError:     # what an image's file asked for: the other checks go on
            self.say('warn', '%s: out of memory: not checked' % check.__name__[len('check_'):],
                     'run --check where it has more memory')
        return None

    def exists(self, *parts):
        return self.root.exists(*parts)

    def say(self, status, text, fix=None):
        self.results.append((status, text, fix))

    def cannot_run(self, row, why, fix=None):
        """A FAIL row (`row` + `why`) saying the unit's interpreter cannot run this
        program: the image is not merely unready, the unit fails at every boot
        (CHECK_CANNOT_RUN; install.sh then fails the install)."""
        self.say('FAIL', row + why, fix)
        self.unrunnable = self.unrunnable or (why, fix)

    def enabled_units(self):
        """Unit names with a symlink in some *.wants directory of /etc/systemd/system
        (read once: every check asks)."""
        if self._enabled is None:
            self._enabled = set()
            base = 'etc/systemd/system'
            for wants in self.root.names(base, r'.*\.(wants|requires)$'):
                self._enabled.update(self.root.names(base + '/' + wants, r'.'))
        return self._enabled

    def shown_path(self, path):
        """`path` of the image as one shell word of a fix, where the reader finds it:
        its directories' links resolved inside the image (an image's absolute link
        means the image's own directory, not this machine's), the last component
        itself not followed (rm -rf removes a link, not what it points to)."""
        inside = os.path.join(self.root.resolve(os.path.dirname('/' + path.strip('/'))),
                              os.path.basename(path.strip('/')))
        return shell_word(os.path.join(self.shown, inside.lstrip('/')))


def check_unit(c):
    unit = next((d for d in UNIT_DIRS if c.exists(d, UNIT_NAME)), None)
    if unit is None:
        c.say('FAIL', '%s is not installed' % UNIT_NAME, 'sh install.sh%s' % c.root_flag)
        return None
    c.say('ok', 'unit installed: /%s/%s' % (unit, UNIT_NAME))
    if UNIT_NAME in c.enabled_units():
        c.say('ok', 'unit enabled')
    else:
        c.say('FAIL', 'unit not enabled (it disables itself after a run: an image captured '
                      'from a provisioned VM never provisions again)',
              '%s enable %s' % (c.systemctl, UNIT_NAME))
    text = c.read(unit, UNIT_NAME)
    if text is None:
        return None
    match = re.search(r'^ExecStart=[-@:+!]*(\S+)(.*)$', text, re.M)
    if not match:
        c.say('FAIL', 'the unit has no ExecStart=', 'sh install.sh%s' % c.root_flag)
        return None
    if '\x00' in match.group(0):
        c.say('FAIL', 'the unit\'s ExecStart= holds a NUL byte', 'sh install.sh%s' % c.root_flag)
        return None
    python, args = match.group(1), match.group(2).split()
    c.unit_args = args
    script = next((a for a in args if a.startswith('/')), None)
    for what, path in (('interpreter', python), ('script', script)):
        if path is None or c.root.stat(path) is None:
            why = 'ExecStart %s %s does not exist' % (what, path)
            fix = 'sh install.sh%s --python PATH' % c.root_flag
            if what == 'interpreter':
                c.cannot_run('', why, fix)
            else:
                c.say('FAIL', why, fix)
            return None
    c.say('ok', 'ExecStart: %s %s' % (python, ' '.join(args)))
    if LAUNCHER_MARK in (c.read(script) or ''):
        check_module(c)
    return python


def check_module(c):
    """install.sh's launcher needs the module beside its bytecode."""
    if not c.root.is_file(MODULE_DIR, 'azure_provisioning.py'):
        c.say('FAIL', 'the launcher\'s module %s/azure_provisioning.py does not exist'
              % MODULE_DIR, 'sh install.sh%s' % c.root_flag)
    elif c.root.names(MODULE_DIR + '/__pycache__', r'azure_provisioning\..*\.pyc$'):
        c.say('ok', 'module %s/azure_provisioning.py, byte-compiled' % MODULE_DIR)
    else:
        c.say('warn', 'module %s/azure_provisioning.py is not byte-compiled: every boot '
                      'compiles it (slower start, still correct)' % MODULE_DIR,
              'sh install.sh%s (run as root, so that it can run the image\'s python3)'
              % c.root_flag)


def and_list(words):
    """'a', 'a and b', 'a, b and c'."""
    words = list(words)
    return ' and '.join([', '.join(words[:-1])] + words[-1:]) if len(words) > 1 else ''.join(words)


def check_python(c, python):
    """Can `python` run the unit?  Asked of the interpreter itself when it is the one
    running this check (install.sh runs the check so, through chroot for an image);
    otherwise judged from the image's files: a binary of another root cannot always
    be run here (another architecture, no chroot, not root)."""
    real = c.root.resolve(python)
    if c.root.is_machine() and os.path.realpath(real) == os.path.realpath(sys.executable):
        missing = []
        for name in NEEDED_MODULES:
            try:
                __import__(name)
            except ImportError as exc:
                missing.append('%s (%s)' % (name, exc))
        version = 'Python %d.%d' % sys.version_info[:2]
        if missing:
            c.cannot_run('python: ', '%s (%s) has no %s' % (python, version, and_list(missing)),
                         FULL_PYTHON)
        else:
            c.say('ok', 'python: %s is %s with %s (checked by running it)'
                  % (python, version, and_list(NEEDED_MODULES)))
        return
    version, libraries, how = python_from_files(c, real)
    if version is None:
        c.cannot_run('python: ', '%s: %s' % (python, how),
                     'sh install.sh%s --python /usr/bin/python3.X (the versioned name)'
                     % c.root_flag)
        return
    if version < (3, 6):
        c.cannot_run('python: ', '%s is Python %d.%d (%s); 3.6 or newer is needed'
                     % ((python,) + version + (how,)),
                     'sh install.sh%s --python PATH' % c.root_flag)
        return
    if not libraries:
        c.cannot_run('python: ', '%s: no standard library at %s/lib/python%d.%d or lib64'
                     % ((python, os.path.dirname(os.path.dirname(real)).rstrip('/')) + version),
                     FULL_PYTHON)
        return
    found, missing = [], []
    for name in NEEDED_MODULES:
        where = next((lib for lib in libraries if module_in_library(c, lib, name)), None)
        if where is None:
            missing.append(name)
        elif where not in found:
            found.append(where)
    if missing:
        c.cannot_run('python: ', '%s (Python %d.%d) has no %s: not in %s'
                     % ((python,) + version + (and_list(missing), and_list(libraries))),
                     FULL_PYTHON)
    elif not c.root.access(real, os.X_OK):
        c.cannot_run('python: ', '%s is not executable' % real)
    else:
        c.say('ok', 'python: %s is Python %d.%d (%s) with %s in %s (judged from the files)'
              % ((python,) + version + (how, and_list(NEEDED_MODULES), and_list(found))))


def python_from_files(c, real):
    """(version, its standard library directories that exist, how that was found)
    of the interpreter at `real`, or (None, [], why not)."""
    prefix = os.path.dirname(os.path.dirname(real))        # /usr/bin/python3.11 -> /usr
    match = re.search(r'python(\d+)\.(\d+)[a-z]*$', real)
    if match:
        version = (int(match.group(1)), int(match.group(2)))
        libraries = [os.path.join(prefix, lib, 'python%d.%d' % version)
                     for lib in ('lib', 'lib64')]
        libraries = [lib for lib in libraries if c.root.is_dir(lib)]
        return version, libraries, 'from the file name %s' % real
    # not named pythonX.Y (/usr/libexec/platform-python): one standard library only
    libraries = [os.path.join(prefix, lib, name) for lib in ('lib', 'lib64')
                 for name in sorted(c.root.names(prefix + '/' + lib, r'python\d+\.\d+$'))
                 if c.root.is_file(prefix, lib, name, 'os.py')]
    if len(libraries) != 1:
        return None, [], ('cannot tell which Python it is: not named pythonX.Y, and %d '
                          'standard libraries under %s/lib*' % (len(libraries), prefix.rstrip('/')))
    version = tuple(int(n) for n in re.search(r'(\d+)\.(\d+)$', libraries[0]).groups())
    return version, libraries, 'from its standard library %s' % libraries[0]


def module_in_library(c, library, name):
    """Whether module `name` is in `library`: as source, as a sourceless .pyc, or
    compiled in __pycache__ (a package as its __init__)."""
    parts = name.split('.')
    for stem in (parts, parts + ['__init__']):
        directory = '/'.join([library] + stem[:-1])
        if (c.root.is_file(directory, stem[-1] + '.py')
                or c.root.is_file(directory, stem[-1] + '.pyc')
                or c.root.names(directory + '/__pycache__',
                                re.escape(stem[-1]) + r'\..*\.pyc$')):
            return True
    return False


def check_agents(c):
    enabled = c.enabled_units()
    for agent in AGENTS:
        found = ['/' + b for b in agent.binaries if c.exists(b)]
        found += [u for u in agent.units if any(c.exists(d, u) for d in UNIT_DIRS)]
        running = [u for u in agent.units if u in enabled]
        if not found and not running:
            c.say('ok', '%s not installed' % agent.name)
        elif agent.name == 'cloud-init' and c.exists(CLOUD_INIT_DISABLED):
            c.say('ok', 'cloud-init is installed but /%s keeps it from running'
                  % CLOUD_INIT_DISABLED)
        else:
            c.say('FAIL', '%s is installed (%s)%s: it answers Azure too, and two agents '
                          'racing at first boot is not supported'
                  % (agent.name, ', '.join(found) or 'units only',
                     ', enabled: ' + ', '.join(running) if running else ''),
                  '; '.join(['%s disable %s' % (c.systemctl, u) for u in running]
                            + [remove_package(c, agent)]))
    leftovers = [p for p in ('var/lib/waagent', 'etc/waagent.conf') if c.exists(p)]
    if leftovers:
        c.say('warn', 'waagent leftovers: %s' % ', '.join('/' + p for p in leftovers),
              'rm -rf %s' % ' '.join(c.shown_path(p) for p in leftovers))


def remove_package(c, agent):
    """The command that removes the agent's package with the image's own tool."""
    for tool, command, package in (('usr/bin/apt-get', 'apt-get purge -y', agent.deb),
                                   ('usr/bin/dnf', 'dnf remove -y', agent.rpm),
                                   ('usr/bin/yum', 'yum remove -y', agent.rpm),
                                   ('usr/bin/zypper', 'zypper remove -y', agent.suse)):
        if c.exists(tool):
            return '%s%s %s' % (c.chroot, command, package)
    return ('remove the package that owns it (%srpm -qf PATH or %sdpkg -S PATH tells which)'
            % (c.chroot, c.chroot))


def installed_kernels(c):
    """[(release, its modules directory)] of the kernels the image has: a name there
    that is no directory (a removed kernel's dangling link, a stray file) is none."""
    kernels = []
    for release in sorted(set(k for d in ('lib/modules', 'usr/lib/modules')
                              for k in c.root.names(d, r'\d'))):
        modules = next(('/%s/%s' % (d, release) for d in ('lib/modules', 'usr/lib/modules')
                        if c.root.is_dir(d, release)), None)
        if modules is not None:
            kernels.append((release, modules))
    return kernels


def check_media(c):
    """Can the image read the provisioning media (the password, the custom data)?
    Azure formats it UDF: without the udf module, only key-only VMs without custom
    data provision."""
    kernels = installed_kernels(c)
    if not kernels:
        c.say('warn', 'media: no kernel in /lib/modules: cannot tell whether the kernel '
                      'mounts UDF (the provisioning media: passwords, custom data)')
    for kernel, base in kernels:
        if kernel_has_udf(c.root, base):
            c.say('ok', 'media: kernel %s mounts UDF' % kernel)
        else:
            c.say('warn', 'media: kernel %s has no udf module: VMs created with a password or '
                          'custom data fail to provision' % kernel,
                  'install the kernel\'s extra modules (e.g. linux-modules-extra-%s)' % kernel)
    if not any(c.exists(d, 'mount') for d in ('usr/bin', 'bin')):
        c.say('warn', 'media: no mount command: the provisioning media cannot be read',
              'install util-linux (or: mount)')
    if not any(c.exists(d, 'chpasswd') for d in ('usr/sbin', 'sbin')):
        if '--provision-user' in c.unit_args:
            c.say('FAIL', 'media: no chpasswd: the password on the media cannot be set',
                  'install passwd (or: shadow-utils)')
        else:
            c.say('info', 'media: no chpasswd (needed only with --provision-user)')


# A configuration matching one NIC's MAC address (cloud-init's netplan file left
# behind does): a VM made from the image has another MAC and gets no address.
MAC_BOUND = ' (bound to the template\'s MAC address)'


def each_directory(c, directories):
    """The directories, each once: /lib is /usr/lib on merged-/usr systems."""
    seen = set()
    for directory in directories:
        if c.root.resolve(directory) not in seen:
            seen.add(c.root.resolve(directory))
            yield directory


def networkd_files(c):
    """(directory, name, text) of the image's .network files, directory by directory
    (/etc's first)."""
    for directory in each_directory(c, ('etc/systemd/network', 'usr/lib/systemd/network',
                                        'lib/systemd/network')):
        for name in sorted(c.root.names(directory, r'.*\.network$')):
            yield directory, name, c.read(directory, name) or ''


def dhcp_on(text):
    """Whether a .network file asks for DHCPv4."""
    dhcp = ini_values(text, ('Network',), 'DHCP')
    return bool(dhcp) and dhcp[-1].lower() in ('yes', 'true', 'ipv4', 'both', '1')


def dhcp_configurations(c):
    """Where the image asks for DHCP: (kind, file) pairs."""
    found = []
    enabled = c.enabled_units()
    networkd = 'systemd-networkd.service' in enabled
    for directory, name, text in networkd_files(c):
        if ini_values(text, ('Match',), 'Virtualization') == ['container']:
            continue    # systemd's 80-container-*.network: never in a VM
        if dhcp_on(text):
            found.append(('systemd-networkd%s%s' % (
                '' if networkd else ' (NOT enabled)',
                MAC_BOUND if ini_values(text, ('Match',), 'MACAddress') else ''),
                '/%s/%s' % (directory, name)))
    if 'NetworkManager.service' in enabled:
        found.append(('NetworkManager', 'NetworkManager.service enabled (DHCP by default)'))
    for path in ['etc/network/interfaces'] + ['etc/network/interfaces.d/' + n for n in
                                             sorted(c.root.names('etc/network/interfaces.d',
                                                               r'^[\w.-]+$'))]:
        if re.search(r'^\s*iface\s+\S+\s+inet\s+dhcp', c.read(path) or '', re.M):
            found.append(('ifupdown', '/' + path))
    for name in sorted(c.root.names('etc/netplan', r'.*\.yaml$')):
        text = c.read('etc/netplan', name) or ''
        if re.search(r'dhcp4:\s*(true|yes)', text):
            found.append(('netplan' + (MAC_BOUND if re.search(r'^\s*macaddress:', text, re.M)
                                       else ''), '/etc/netplan/' + name))
    for name in sorted(c.root.names('etc/sysconfig/network-scripts', r'^ifcfg-')):
        text = c.read('etc/sysconfig/network-scripts', name) or ''
        if re.search(r'^\s*BOOTPROTO=["\']?dhcp', text, re.M):
            found.append(('ifcfg' + (MAC_BOUND if re.search(r'^\s*HWADDR=\S', text, re.M)
                                     else ''), '/etc/sysconfig/network-scripts/' + name))
    if 'dhcpcd.service' in enabled:
        found.append(('dhcpcd', 'dhcpcd.service enabled'))
    return found


def check_network(c):
    found = dhcp_configurations(c)
    for kind, where in found:
        if MAC_BOUND in kind:
            c.say('warn', 'DHCP: %s (%s): it does not apply on a VM made from this image'
                  % (kind, where), 'match by name instead (e.g. en* eth*), or remove it')
        elif 'NOT enabled' in kind:
            c.say('warn', 'DHCP: %s (%s)' % (kind, where),
                  '%s enable systemd-networkd.service' % c.systemctl)
        else:
            c.say('ok', 'DHCP: %s (%s)' % (kind, where))
    if not [kind for kind, _ in found if 'NOT enabled' not in kind and MAC_BOUND not in kind]:
        c.say('FAIL', 'no DHCP configuration found: the VM gets no address, so it can reach '
                      'neither IMDS nor the WireServer',
              'e.g. /etc/systemd/network/20-dhcp.network with [Match] Name=en* eth* and '
              '[Network] DHCP=ipv4, then %s enable systemd-networkd' % c.systemctl)
    waiters = [u for u in ('systemd-networkd-wait-online.service',
                           'NetworkManager-wait-online.service', 'ifupdown-wait-online.service')
               if u in c.enabled_units()]
    if waiters:
        c.say('ok', 'network-online.target waits for %s' % ', '.join(waiters))
    else:
        c.say('warn', 'no wait-online service enabled: network-online.target does not wait for '
                      'the network (the script retries, but starts early)',
              '%s enable systemd-networkd-wait-online.service (or '
              'NetworkManager-wait-online.service)' % c.systemctl)


# Azure's image requirements beyond provisioning ("Prepare a Linux image for
# Azure"): each found from the image's files, never from this machine's.
# The Hyper-V drivers: (module, its CONFIG_ option, its path under kernel/, whether
# a VM without it fails (no disk, no network), whether it is needed before the
# root filesystem is mounted: the OS disk is reached through vmbus and storvsc).
HyperV = namedtuple('HyperV', 'name option path required early')
HYPERV_DRIVERS = (
    HyperV('hv_vmbus', 'CONFIG_HYPERV', 'drivers/hv/hv_vmbus.ko', True, True),
    HyperV('hv_storvsc', 'CONFIG_HYPERV_STORAGE', 'drivers/scsi/hv_storvsc.ko', True, True),
    HyperV('hv_netvsc', 'CONFIG_HYPERV_NET', 'drivers/net/hyperv/hv_netvsc.ko', True, False),
    HyperV('hv_utils', 'CONFIG_HYPERV_UTILS', 'drivers/hv/hv_utils.ko', False, False),
)
MODULE_FILE = r'(\.(xz|zst|gz))?$'      # a module's file: NAME.ko, compressed or not
INITRAMFS_NAMES = ('/boot/initrd.img-%s', '/boot/initramfs-%s.img', '/boot/initrd-%s')
INITRAMFS_MAX = 1 << 30         # bytes of an initramfs file read, and of what it unpacks to
INITRAMFS_SECONDS = 60          # for reading one, at most: then it is "not checked"
UNPACK_MEMORY = 256 << 20       # bytes an xz/lzma decompressor may take (xz -9e: 674 MiB
                                # to pack, 65 MiB to unpack)
CPIO_HEADER = 110               # bytes of a cpio "newc" header (070701, 070702)
# What the first bytes of an initramfs segment say it is, and whether it can be read
# with the standard library (zstd, lz4 and lzo: not checked).
COMPRESSIONS = ((b'\x1f\x8b', 'gzip'), (b'\xfd7zXZ', 'xz'), (b'\x5d\x00\x00', 'lzma'),
                (b'\x28\xb5\x2f\xfd', 'zstd'), (b'\x02\x21\x4c\x18', 'lz4'),
                (b'BZh', 'bzip2'), (b'\x89LZO', 'lzo'))


class Unpacking(object):
    """Bytes read in order from an iterator of pieces, within a byte count and a
    deadline (an initramfs that unpacks without end is an OSError, not a hang)."""

    def __init__(self, pieces, deadline):
        self.pieces = iter(pieces)
        self.buffer = b''
        self.at = 0         # where in the buffer reading goes on (no copy per read)
        self.taken = 0
        self.deadline = deadline

    def fill(self, size):
        """At least `size` bytes buffered from where reading is, or all that is left."""
        while len(self.buffer) - self.at < size:
            if not self.deadline.remaining():
                raise OSError(errno.ETIMEDOUT, 'took longer than %d s' % INITRAMFS_SECONDS)
            piece = next(self.pieces, None)
            if piece is None:
                break
            self.buffer, self.at = self.buffer[self.at:] + piece, 0

    def count(self, size):
        """`size` more bytes unpacked (data or the zeros between archives)."""
        self.taken += size
        if self.taken > INITRAMFS_MAX:
            raise OSError(errno.EFBIG, 'unpacks to more than %d bytes' % INITRAMFS_MAX)

    def read(self, size):
        self.fill(size)
        data = self.buffer[self.at:self.at + size]
        self.at += len(data)
        self.count(len(data))
        return data

    def skip(self, size):
        while size > 0:
            data = self.read(min(size, 1 << 16))
            if not data:
                return
            size -= len(data)

    def next_segment(self):
        """The first bytes of what follows the zeros after an archive (b'' at the end)."""
        while True:
            self.fill(1)
            rest = self.buffer[self.at:]
            if not rest:
                return b''
            stripped = rest.lstrip(b'\0')
            self.count(len(rest) - len(stripped))
            self.buffer, self.at = stripped, 0
            if stripped:
                self.fill(8)
                return self.buffer[:8]

    def rest(self):
        """The pieces not read yet (for a decompressor)."""
        if self.buffer[self.at:]:
            yield self.buffer[self.at:]
        self.buffer, self.at = b'', 0
        for piece in self.pieces:
            yield piece


def cpio_names(stream):
    """The names in one cpio "newc" archive read from `stream`, to its trailer."""
    while True:
        head = stream.read(CPIO_HEADER)
        if len(head) < CPIO_HEADER or head[:6] not in (b'070701', b'070702'):
            raise ValueError('not a cpio archive where one should be')
        fields = [int(head[i:i + 8], 16) for i in range(6, CPIO_HEADER, 8)]
        size, name_size = fields[6], fields[11]
        if not 0 < name_size <= PATH_MAX:
            raise ValueError('a cpio name of %d bytes' % name_size)
        name = stream.read(name_size + (-(CPIO_HEADER + name_size)) % 4)[:name_size - 1]
        if name == b'TRAILER!!!':
            return
        yield name.decode('utf-8', 'replace')
        stream.skip(size + (-size) % 4)


def inflated(pieces, kind):
    """The decompressed bytes of `pieces` (gzip, xz, lzma or bzip2), in pieces of at
    most 1 MiB; ImportError now when this Python has no lzma (bz2), ValueError when the
    data is not what it says."""
    import zlib
    if kind == 'gzip':
        unpack, broken = zlib.decompressobj(16 + zlib.MAX_WBITS), zlib.error
    elif kind == 'bzip2':       # its memory is bounded by its format (900 kB blocks)
        import bz2
        unpack, broken = bz2.BZ2Decompressor(), OSError
    else:
        import lzma
        # the header's dictionary size is the image's: a limit, not an allocation
        unpack, broken = lzma.LZMADecompressor(memlimit=UNPACK_MEMORY), lzma.LZMAError

    def pieces_out():
        try:
            for piece in pieces:
                while piece and not unpack.eof:
                    yield unpack.decompress(piece, 1 << 20)
                    # zlib keeps the input it did not use there; lzma keeps it itself
                    piece = getattr(unpack, 'unconsumed_tail', b'')
                while kind != 'gzip' and not unpack.eof and not unpack.needs_input:
                    yield unpack.decompress(b'', 1 << 20)
                if unpack.eof:
                    return
        except (broken, EOFError) as exc:
            raise ValueError('%s: %s' % (kind, exc))
        raise ValueError('%s: the data ends before the end of the stream' % kind)
    return pieces_out()


def initramfs_names(pieces, wanted):
    """({key: the first name in the initramfs read from `pieces` matching the regular
    expression wanted[key]}, None, or what kept the rest from being read: 'zstd-
    compressed, which this check cannot read', ...).  An initramfs is cpio archives, the first ones plain (CPU microcode),
    the last one compressed; reading stops once every key is found.  ValueError
    when it is none."""
    found = {}
    stream = Unpacking(pieces, Deadline(INITRAMFS_SECONDS))
    while len(found) < len(wanted):
        magic = stream.next_segment()
        if not magic:
            break
        if magic.startswith(b'0707'):
            for name in cpio_names(stream):
                found.update((key, name) for key, pattern in wanted.items()
                             if key not in found and re.search(pattern, name))
                if len(found) == len(wanted):
                    break
            continue
        kind = next((k for m, k in COMPRESSIONS if magic.startswith(m)), None)
        if kind is None:
            return found, 'in a format this check does not know'
        if kind not in ('gzip', 'xz', 'lzma', 'bzip2'):
            return found, '%s-compressed, which this check cannot read' % kind
        try:
            stream = Unpacking(inflated(stream.rest(), kind), stream.deadline)
        except ImportError as exc:  # a Python built without lzma (or zlib)
            return found, '%s-compressed, and this Python has no %s module' % (kind, exc.name)
    return found, None


def kernel_config(c, release, modules):
    """{CONFIG_X: 'y' or 'm' ...} of the kernel's build configuration ({} when the
    image has none): /boot/config-RELEASE, or the modules directory's config (Fedora)."""
    text = c.read('/boot/config-' + release)
    if text is None:
        text = c.read(modules, 'config') or ''
    return dict(line.split('=', 1) for line in text.splitlines()
                if line.startswith('CONFIG_') and '=' in line)


def hyperv_drivers(c, release, modules):
    """{'built in'|'module'|'absent'|'unknown': [drivers]} of one kernel."""
    config = kernel_config(c, release, modules)
    builtin = c.read(modules, 'modules.builtin')
    found = {}
    for driver in HYPERV_DRIVERS:
        directory, name = os.path.split('kernel/' + driver.path)
        if config.get(driver.option) == 'y' or 'kernel/' + driver.path in (builtin or '').split():
            how = 'built in'
        elif config.get(driver.option) == 'm' or c.root.names(modules + '/' + directory,
                                                                re.escape(name) + MODULE_FILE):
            how = 'module'
        elif config or builtin is not None:     # what it has is known: not this
            how = 'absent'
        else:
            how = 'unknown'
        found.setdefault(how, []).append(driver)
    return found


def names_of(drivers):
    return and_list(d.name for d in drivers)


def initramfs_fix(c, release, drivers):
    names = ' '.join(d.name for d in drivers)
    if any(c.exists(d, 'update-initramfs') for d in ('usr/sbin', 'sbin')):
        return ('add %s to %s/etc/initramfs-tools/modules (one a line), then '
                '%supdate-initramfs -u -k %s' % (names, c.shown.rstrip('/'), c.chroot, release))
    if any(c.exists(d, 'dracut') for d in ('usr/bin', 'usr/sbin', 'sbin')):
        return ('add_drivers+=" %s " in %s/etc/dracut.conf.d/azure.conf, then '
                '%sdracut -f --kver %s' % (names, c.shown.rstrip('/'), c.chroot, release))
    return 'build the initramfs of %s with %s in it' % (release, names)


def check_hyperv(c):
    """The Hyper-V drivers of each kernel: built in, or modules in its initramfs
    (vmbus and storvsc reach the OS disk: without them the VM never boots)."""
    for release, modules in installed_kernels(c):
        found = hyperv_drivers(c, release, modules)
        what = 'Hyper-V drivers: kernel %s' % release
        absent = found.get('absent', [])
        for severity, drivers in (('FAIL', [d for d in absent if d.required]),
                                  ('warn', [d for d in absent if not d.required])):
            if drivers:
                c.say(severity, '%s has no %s (%s not set): %s' % (
                    what, names_of(drivers), and_list(d.option for d in drivers),
                    'on Azure it cannot reach its disk or network' if severity == 'FAIL'
                    else 'no KVP, time sync nor shutdown from Azure'),
                    'install a kernel built for Azure or with the Hyper-V drivers (e.g. '
                    'linux-image-cloud-amd64, linux-azure, kernel-azure)')
        if found.get('unknown'):
            c.say('warn', '%s: no /boot/config-%s nor modules.builtin: whether it has %s is '
                          'not checked' % (what, release, names_of(found['unknown'])),
                  'keep the kernel\'s /boot/config-%s and %s/modules.builtin in the image'
                  % (release, modules))
        modules_found = found.get('module', [])
        built_in = ('%s built in' % names_of(found['built in'])) if found.get('built in') else ''
        if not modules_found:
            if built_in and not absent and not found.get('unknown'):
                c.say('ok', '%s: %s' % (what, built_in))
            continue
        check_initramfs(c, release, modules_found, what, built_in)


def check_initramfs(c, release, drivers, what, built_in):
    """Whether the modules `drivers` are in the kernel's initramfs."""
    path = next((p % release for p in INITRAMFS_NAMES if c.root.stat(p % release)), None)
    fix = initramfs_fix(c, release, drivers)
    if path is None:
        c.say('warn', '%s: %s are modules and it has no initramfs (%s): not checked'
                      % (what, names_of(drivers), ', '.join(p % release for p in INITRAMFS_NAMES)),
              fix)
        return
    wanted = dict((d.name, r'(^|/)%s\.ko%s' % (re.escape(d.name), MODULE_FILE)) for d in drivers)
    try:
        pieces = c.root.pieces(path, INITRAMFS_MAX)
        if pieces is None:      # a directory, or gone since: nothing read, nothing known
            raise OSError(errno.EINVAL, 'not a regular file')
        found, unread = initramfs_names(pieces, wanted)
    except (OSError, ValueError) as exc:    # a FIFO, too large, not an initramfs
        # an OSError's own text without its file name: the row names it already
        c.say('warn', '%s: %s: %s: not checked' % (
            what, path, getattr(exc, 'strerror', None) or describe_error(exc)),
              'lsinitramfs %s | grep hv_ (lsinitrd on dracut systems) shows what it holds' % path)
        return
    missing = [d for d in drivers if d.name not in found]
    if unread and missing:
        c.say('warn', '%s: %s are modules; %s is %s: whether they are in it is not checked' % (
                          what, names_of(missing), path, unread),
              '%slsinitramfs %s | grep hv_ (lsinitrd on dracut systems) shows it; if they are '
              'missing: %s' % (c.chroot, path, fix))
        return
    inside = [d for d in drivers if d.name in found]
    if inside:
        c.say('ok', '%s: %s' % (what, '; '.join(
            [w for w in (built_in, '%s in %s' % (names_of(inside), path)) if w])))
    for severity, group in (('FAIL', [d for d in missing if d.early]),
                            ('warn', [d for d in missing if not d.early])):
        if group:
            c.say(severity, '%s: %s %s not in %s: %s' % (
                what, names_of(group), 'is a module' if len(group) == 1 else 'are modules',
                path, 'on Azure the kernel cannot reach the OS disk' if severity == 'FAIL'
                else 'loaded later from the disk, where Azure asks for them in the '
                     'initramfs'), initramfs_fix(c, release, group))


SSH_UNITS = ('ssh.service', 'sshd.service', 'ssh.socket', 'sshd.socket')


def check_sshd(c):
    enabled = [u for u in SSH_UNITS if u in c.enabled_units()]
    if not any(c.exists(d, 'sshd') for d in ('usr/sbin', 'sbin')):
        c.say('warn', 'no SSH server (/usr/sbin/sshd): nobody can log in to a VM made from '
                      'this image (only the serial console)',
              'install openssh-server (or: openssh)')
    elif not enabled:
        unit = next((u for u in SSH_UNITS if any(c.exists(d, u) for d in UNIT_DIRS)),
                    'sshd.service')
        c.say('warn', 'sshd is installed but not enabled: nobody can log in to a VM made from '
                      'this image', '%s enable %s' % (c.systemctl, unit))
    else:
        c.say('ok', 'sshd: %s enabled' % ', '.join(enabled))


# How an fstab names the temporary (resource) disk: azure-vm-utils' and waagent's links
RESOURCE_DISK = r'disk/(azure/resource|cloud/azure_resource)'


def on_the_temporary_disk(path, entries):
    """Whether an fstab entry's device is the temporary disk, or a file where the
    fstab mounts it (a swap file in /mnt/resource)."""
    mounts = [f[1].rstrip('/') for f in entries
              if re.search(RESOURCE_DISK, f[0]) and f[1].startswith('/')]
    return bool(re.search(RESOURCE_DISK, path)) or any(
        path.startswith(m + '/') for m in mounts if m)


def check_swap(c):
    entries = fstab_entries(c)
    swaps = [' '.join(f[:3]) for f in entries
             if f[2] == 'swap' and not on_the_temporary_disk(f[0], entries)]
    swaps += ['%s enabled' % u for u in sorted(c.enabled_units()) if u.endswith('.swap')]
    if swaps:
        c.say('warn', 'swap on the OS disk (%s): Azure advises against it (the OS disk is '
                      'remote storage, its I/O counts against the VM\'s limits)'
              % '; '.join(swaps),
              'remove it from /etc/fstab (or disable the unit); put swap on the temporary '
              'disk, from a hook in %s' % HOOKS_DIR)
    else:
        c.say('ok', 'no swap on the OS disk')


KVP_DAEMONS = ('usr/sbin/hv_kvp_daemon', 'usr/sbin/hypervkvpd', 'sbin/hv_kvp_daemon')


def check_kvp_daemon(c):
    found = next(('/' + p for p in KVP_DAEMONS if c.exists(p)), None)
    if found:
        c.say('ok', 'Hyper-V KVP daemon: %s' % found)
    else:
        c.say('warn', 'no Hyper-V KVP daemon (hv_kvp_daemon, hypervkvpd): the report written '
                      'to the KVP pool (%s) does not reach Azure' % KVP_POOL,
              'install hyperv-daemons (Debian, RHEL; hyper-v on SUSE)')


# An accelerated-networking VF (Mellanox mlx4/mlx5, Microsoft MANA) has the MAC of
# the synthetic NIC it is bonded to: a configuration matching it too runs DHCP on
# both.  How Azure names them: enP<domain>s<slot> (predictable names), ethN without.
VF_DRIVERS = ('mlx4_en', 'mlx4_core', 'mlx5_core', 'mana')
VF_NAMES = ('enP30832s1', 'eth1')
UDEV_RULES = ('etc/udev/rules.d', 'usr/lib/udev/rules.d', 'lib/udev/rules.d')
VF_FIX = ('install azure-vm-utils: its 10-azure-unmanaged-sriov.rules and '
          '01-azure-unmanaged-sriov.network leave the VF to hv_netvsc (or match '
          'Driver=hv_netvsc only)')


def glob_tokens(pattern):
    """A shell pattern as fnmatch reads it: '*', or a pattern of one character (a
    character, '?', '[...]'; a '[' never closed is itself)."""
    tokens, i = [], 0
    while i < len(pattern):
        end = i + 1
        if pattern[i] == '[':
            end += pattern.startswith('!', end)
            end += pattern.startswith(']', end)
            end = pattern.find(']', end) + 1 or i + 1
        tokens.append(pattern[i:end])
        i = end
    return tokens


def one_character_matches(token, char):
    """fnmatch of one character; a class with a range ending before it starts
    ('[b-a]') matches nothing, as from Python 3.9 (before: re.error)."""
    import fnmatch
    try:
        return fnmatch.fnmatchcase(char, token)
    except re.error:
        return False


def glob_matches(pattern, name):
    """fnmatch.fnmatchcase(name, pattern) in time len(pattern) x len(name): before
    Python 3.9 fnmatch's regular expression backtracks exponentially on many stars,
    and the pattern is an image's (a .network file's Name=)."""
    tokens = glob_tokens(pattern)
    at = t = 0
    star = None     # (the token after the last '*', where in the name it took over)
    while at < len(name):
        if t < len(tokens) and tokens[t] == '*':
            star, t = (t + 1, at), t + 1
        elif t < len(tokens) and one_character_matches(tokens[t], name[at]):
            at, t = at + 1, t + 1
        elif star is not None:      # the last '*' takes one more character
            t, at = star[0], star[1] + 1
            star = (t, at)
        else:
            return False
    return all(token == '*' for token in tokens[t:])


def matches_a_vf(text):
    """Whether a .network file's [Match] could take an accelerated-networking VF."""
    def words(key):
        return ' '.join(ini_values(text, ('Match',), key)).split()
    if words('MACAddress') or words('Virtualization') == ['container']:
        return False    # another MAC (reported as such) / never in a VM
    names, drivers = words('Name'), words('Driver')
    return ((not names or any(glob_matches(n, vf) for vf in VF_NAMES for n in names))
            and (not drivers or any(glob_matches(d, vf) for vf in VF_DRIVERS for d in drivers)))


def leaves_vfs_alone(text):
    """Whether a .network file makes the VFs unmanaged (azure-vm-utils' matches the
    property its udev rule sets)."""
    return (ini_values(text, ('Link',), 'Unmanaged')[-1:] == ['yes'] and (
        'AZURE_UNMANAGED_SRIOV' in ' '.join(ini_values(text, ('Match',), 'Property'))
        or any(d in VF_DRIVERS for d in ' '.join(ini_values(text, ('Match',),
                                                             'Driver')).split())))


def vf_udev_rules(c, setting):
    """The udev rules files naming a VF driver and setting `setting` (NM_UNMANAGED,
    ID_NET_MANAGED_BY)."""
    found = []
    for directory in each_directory(c, UDEV_RULES):
        for name in sorted(c.root.names(directory, r'.*\.rules$')):
            text = c.read(directory, name) or ''
            if re.search(r'mlx[45]|mana', text) and setting in text:
                found.append('/%s/%s' % (directory, name))
    return found


def check_accelerated_networking(c):
    """Would the DHCP configuration also configure a VF?  Files by name, as
    systemd-networkd reads them: the first file matching an interface applies."""
    files = {}
    for directory, name, text in networkd_files(c):
        files.setdefault(name, ('/%s/%s' % (directory, name), text))
    alone = vf_udev_rules(c, 'ID_NET_MANAGED_BY')   # systemd-networkd 255 and later
    catching = []
    for name in sorted(files):
        path, text = files[name]
        if leaves_vfs_alone(text):
            alone.append(path)
        elif dhcp_on(text) and matches_a_vf(text) and not alone:
            catching.append(path)
    for name in sorted(c.root.names('etc/netplan', r'.*\.yaml$')):
        text = c.read('etc/netplan', name) or ''
        if (re.search(r'dhcp4:\s*(true|yes)', text) and not re.search(r'^\s*(driver|macaddress):',
                                                                      text, re.M)
                and not alone):     # rendered as 10-netplan-*.network: after 01-azure-*
            catching.append('/etc/netplan/' + name)
    if 'NetworkManager.service' in c.enabled_units():
        managed_alone = vf_udev_rules(c, 'NM_UNMANAGED')
        alone += managed_alone
        if not managed_alone:
            catching.append('NetworkManager (manages every NIC)')
    if catching:
        c.say('warn', 'accelerated networking: %s would also configure the VF (mlx4, mlx5 or '
                      'mana: the same MAC as the synthetic NIC), and DHCP on both breaks the '
                      'network of VMs with accelerated networking' % ', '.join(catching), VF_FIX)
    else:
        c.say('ok', 'accelerated networking: no configuration takes the VF%s' % (
            ' (left to hv_netvsc by %s)' % ', '.join(sorted(set(alone))) if alone else ''))


def fstab_entries(c):
    """The fields of each entry of the image's /etc/fstab."""
    return [fields for fields in (line.split('#', 1)[0].split()
                                  for line in (c.read('etc/fstab') or '').splitlines())
            if len(fields) > 2]


def check_temporary_disk(c):
    """Who formats and mounts the temporary (resource) disk, which waagent and
    cloud-init did: information, as an image may need none."""
    setup = [p for p in ('usr/sbin/azure-ephemeral-disk-setup',
                         'usr/bin/azure-ephemeral-disk-setup') if c.exists(p)]
    mounted = [' '.join(f[:2]) for f in fstab_entries(c)
               if re.search(RESOURCE_DISK, f[0])]
    if setup:
        c.say('info', 'temporary disk: azure-vm-utils\' /%s formats and mounts it' % setup[0])
    elif mounted:
        c.say('info', 'temporary disk: /etc/fstab mounts it (%s)' % '; '.join(mounted))
    else:
        c.say('info', 'temporary disk: nothing in the image formats or mounts it (waagent and '
                      'cloud-init did, on /mnt): azure-vm-utils\' azure-ephemeral-disk-setup, '
                      'or a hook in %s, can' % HOOKS_DIR)


def check_identity(c):
    """What every VM of the image would share."""
    if (c.read(MACHINE_ID) or '').strip():
        c.say('FAIL', '%s is not empty: every VM would share this machine id' % MACHINE_ID,
              'azure-provisioning --deprovision%s' % c.root_flag)
    if c.exists(STATE_FILE):
        c.say('FAIL', '%s exists: the image was captured from a provisioned VM without '
                      'deprovisioning' % STATE_FILE,
              'azure-provisioning --deprovision%s' % c.root_flag)
    keys = host_key_names(c.root)
    if keys:
        c.say('info', '%d SSH host key file(s) in /etc/ssh: replaced at each VM\'s first boot'
              % len(keys))
    cmdlines = [c.read(p) or '' for p in ('/etc/default/grub', '/etc/kernel/cmdline',
                                          '/boot/grub/grub.cfg', '/boot/grub2/grub.cfg')]
    cmdlines += [c.read('/boot/loader/entries', n) or ''
                 for n in c.root.names('/boot/loader/entries', r'.*\.conf$')]
    if c.root.is_machine():
        cmdlines.append(c.read('/proc/cmdline') or '')
    if not any(re.search(r'\bconsole=ttyS0\b', text) for text in cmdlines):
        c.say('warn', 'no console=ttyS0 on the kernel command line: Azure boot diagnostics '
                      '(the serial console) will not show the boot or our report',
              'add console=ttyS0 to GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub')


def check_hostname(c):
    name = (c.read('etc/hostname') or '').strip()
    for line in (c.read('etc/hosts') or '').splitlines():
        fields = line.split('#', 1)[0].split()
        if fields[:1] == ['127.0.1.1'] and name not in fields[1:]:
            c.say('info', '/etc/hosts has "%s" but /etc/hostname is %r: that line is left as it is'
                  % (' '.join(fields), name))
        elif fields[:1] == ['127.0.1.1']:
            c.say('info', '/etc/hosts line "%s" will get the new name at first boot'
                  % ' '.join(fields))


def shell_word(text):
    """`text` as one word of a shell command line that a fix suggests."""
    if re.fullmatch(r'[\w./+:=@%-]+', text):
        return text
    return "'%s'" % text.replace("'", "'\\''")


def check_image(root, out, shown=None):
    """Print one line per check; returns CHECK_READY, CHECK_NOT_READY when anything
    blocks, CHECK_CANNOT_RUN when the unit's Python cannot run this program (said
    last, on stderr, in one line)."""
    c = Check(Root(root), shown)
    python = c.run(check_unit)
    if python:
        c.run(check_python, python)
    for check in (check_agents, check_media, check_hyperv, check_network,
                  check_accelerated_networking, check_sshd, check_kvp_daemon, check_swap,
                  check_temporary_disk, check_identity, check_hostname):
        c.run(check)
    for status, text, fix in c.results:     # texts quote the image's files: printable
        out.write('%-5s %s\n' % (status, printable(text)))
        if fix and status in ('FAIL', 'warn'):
            out.write('      fix: %s\n' % printable(fix))
    failed = sum(1 for r in c.results if r[0] == 'FAIL')
    warned = sum(1 for r in c.results if r[0] == 'warn')
    out.write(printable('%s: %d blocking, %d warnings (%s)' % (
        'image NOT ready' if failed else 'image ready', failed, warned, c.shown)) + '\n')
    if c.unrunnable:
        why, fix = c.unrunnable
        out.flush()     # the error follows the report, on a shared pipe too
        Log().error('the unit cannot run: %s%s' % (why, ' (fix: %s)' % fix if fix else ''))
        return CHECK_CANNOT_RUN
    return CHECK_NOT_READY if failed else CHECK_READY


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 < value < 1e7:
        raise ValueError('expected a positive number of seconds, got %r' % text)
    return value


def absolute_directory(text):
    """A directory argument, absolute from the start: userdel --root refuses a
    relative one, and every message then names one place."""
    if not text:
        raise ValueError('expected a directory, got an empty string')
    if text.startswith('/'):
        return text
    try:
        return os.path.join(os.getcwd(), text)
    except OSError:     # the working directory was removed
        raise ValueError('%r is relative, and the working directory is gone' % text)


# One table for the command line: both parsers below, the record they fill
# (Options: a field per row, named by `dest`), --help, and which modes take which
# option (check_usage).  metavar None: a switch, which turns its field from its
# default to the opposite (--no-hostname turns set_hostname, True by default, off).
# `modes`: where the option is taken; RUN is a provisioning run (no mode switch);
# a row whose only mode is its own flag is a mode switch.
RUN, CHECK, DEPROVISION, STATUS = 'provisioning', '--check', '--deprovision', '--status'
Option = namedtuple('Option', 'flag dest metavar convert default modes help')
OPTIONS = [Option(*fields) for fields in (
    ('--wireserver', 'wireserver', 'ADDR', parse_address, (DEFAULT_WIRESERVER, 80), (RUN,),
     'WireServer IP or IP:PORT (default %s)' % DEFAULT_WIRESERVER),
    ('--imds', 'imds', 'ADDR', parse_address, (DEFAULT_IMDS, 80), (RUN,),
     'IMDS IP or IP:PORT (default %s)' % DEFAULT_IMDS),
    ('--timeout', 'timeout', 'SECONDS', positive_seconds, DEFAULT_TIMEOUT, (RUN,),
     'overall deadline for all steps, including the failure report (default %d)'
     % DEFAULT_TIMEOUT),
    ('--no-hostname', 'set_hostname', None, None, True, (RUN,), 'do not change the hostname'),
    ('--no-publish-hostname', 'publish_hostname', None, None, True, (RUN,),
     'do not make the DHCP client send the new hostname (which is how Azure DNS learns it)'),
    ('--provision-user', 'provision_user', None, None, False, (RUN,),
     'create the admin user from IMDS, give it sudo and install its SSH keys'),
    ('--keep-ssh-host-keys', 'keep_host_keys', None, None, False, (RUN,),
     'keep the SSH host keys the image has (default: new ones when this VM did not make '
     'them: its first boot, an image captured again)'),
    ('--check', 'check', None, None, False, (CHECK,),
     'check the image before generalizing it (unit enabled, no other agent, DHCP '
     'configured, ...); read-only and offline'),
    ('--deprovision', 'deprovision', None, None, False, (DEPROVISION,),
     'make this VM an image again before capturing it: remove the SSH host keys, the '
     'machine id, DHCP leases, the KVP pool and our record; enable the unit again'),
    ('--user', 'remove_user', None, None, False, (DEPROVISION,),
     'with --deprovision: also remove the admin user --provision-user made'),
    ('--status', 'status', None, None, False, (STATUS,),
     'say whether and how this VM was provisioned (read-only, offline); exit 1 if not'),
    ('--json', 'json', None, None, False, (STATUS,), 'with --status: print the record itself'),
    ('--root', 'root', 'DIR', absolute_directory, '/', (CHECK, DEPROVISION, STATUS),
     'with --check, --deprovision or --status: the mounted image tree (default /)'),
    ('--shown-root', 'shown_root', 'DIR', str, None, (CHECK,), None),  # install.sh: see check_image
    ('--media', 'media', 'DEVICE', str, None, (RUN,),
     'read the provisioning media (ovf-env.xml) from DEVICE, a device or an image file, '
     'instead of looking for it; "none": do not look'),
    ('--dry-run', 'dry_run', None, None, False, (RUN, DEPROVISION),
     'fetch everything, print the hostname and the health report it would send; change '
     'nothing, post nothing'),
    ('--verbose', 'verbose', None, None, False, (RUN,), 'log every HTTP exchange'),
)]
SHORT_FLAGS = {'-v': '--verbose'}


class Options(object):
    """What a run is asked to do: a field for each row of OPTIONS, its default from
    there.  Both parsers fill one; a test makes one with the fields it changes."""

    def __init__(self, **fields):
        for option in OPTIONS:
            setattr(self, option.dest, fields.pop(option.dest, option.default))
        if fields:
            raise TypeError('Options has no field %s' % ', '.join(sorted(fields)))


def parse_args(args):
    """The unit's plain command lines are parsed here; --help, --version and every
    mistake go to argparse, which says it well but costs milliseconds to import."""
    table = dict((option.flag, option) for option in OPTIONS)
    options = Options()
    pending = list(args)
    while pending:
        flag, equals, value = SHORT_FLAGS.get(pending[0], pending[0]).partition('=')
        option = table.get(flag)
        if option is None or (equals and not option.metavar) or (
                option.metavar and not equals and len(pending) < 2):
            return build_parser().parse_args(args, Options())
        pending.pop(0)
        if not option.metavar:
            setattr(options, option.dest, not option.default)
            continue
        text = value if equals else pending.pop(0)
        try:
            setattr(options, option.dest, option.convert(text))
        except ValueError:
            return build_parser().parse_args(args, Options())
    return options


def build_parser():
    import argparse

    def checked(convert):
        def argument(text):
            try:
                return convert(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc))
        return argument

    parser = argparse.ArgumentParser(
        prog='azure-provisioning',
        description='First-boot provisioning for Azure images without walinuxagent or '
                    'cloud-init: sets the hostname from IMDS and reports Ready to the '
                    'WireServer (or ProvisioningFailed with the reason).',
        epilog='Exit status: 0 provisioned, 1 provisioning failed (reported to Azure '
               'when possible), 2 usage error.  --check: 0 the image is ready, 1 it is '
               'not (a FAIL line), 3 the unit\'s Python cannot run azure-provisioning '
               '(the last line, on stderr, says why), 4 the check itself failed (an '
               'internal error, on stderr).')
    for option in OPTIONS:
        flags = [short for short, flag in SHORT_FLAGS.items() if flag == option.flag]
        flags.append(option.flag)
        if option.metavar:
            parser.add_argument(*flags, dest=option.dest, metavar=option.metavar,
                                type=checked(option.convert), default=option.default,
                                help=option.help or argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=option.dest, action='store_const',
                                const=not option.default, default=option.default,
                                help=option.help)
    parser.add_argument('--version', action='version', version='%(prog)s ' + VERSION)
    parser.error = usage_error
    return parser


def usage_error(message):
    """One line and exit 2, as for every other mistake (argparse would add its usage)."""
    sys.stderr.write('azure-provisioning: error: %s (see --help)\n' % printable(message))
    sys.exit(2)


def check_usage(options):
    """Each option given (not at its default) must be one the mode chosen takes (a
    provisioning run when no mode is chosen): its row says which; the first row
    that is not is named."""
    given = [option for option in OPTIONS if getattr(options, option.dest) != option.default]
    modes = [option.flag for option in given if option.modes == (option.flag,)]
    if len(modes) > 1:
        usage_error('%s and %s do not go together' % tuple(modes[:2]))
    mode = modes[0] if modes else RUN
    for option in given:
        if mode in option.modes:
            continue
        if RUN in option.modes:
            usage_error('%s does not go with %s' % (option.flag, mode))
        usage_error('%s goes with %s' % (option.flag, or_list(option.modes)))
    if options.root != '/' and not os.path.isdir(options.root):
        usage_error('--root %s: not a directory' % options.root)


def or_list(words):
    return ' or '.join(filter(None, (', '.join(words[:-1]), words[-1])))


def main(args=None):
    options = parse_args(sys.argv[1:] if args is None else args)
    check_usage(options)
    signal.signal(signal.SIGTERM, raise_terminated)
    log = Log(options.verbose)
    out = Output(sys.stdout)
    try:
        if options.check:
            return check_image(options.root, out, options.shown_root)
        if options.status:
            return status(options, out)
        if options.deprovision:
            return deprovision(options, log, out)
        return provision(options, log, out)
    except ProvisioningError as exc:
        log.error(str(exc))
        return 1
    except KeyboardInterrupt:
        log.error('interrupted')
        return 1
    except Terminated:
        log.error('stopped by SIGTERM')
        return 1
    except Exception as exc:    # a bug: say it in one line, the traceback only with -v
        if options.verbose:
            import traceback
            traceback.print_exc()
        log.error('internal error: %s: %s' % (exc.__class__.__name__, exc))
        # not "not ready": a check that ended gave no verdict (install.sh fails)
        return CHECK_CRASHED if options.check else 1


if __name__ == '__main__':
    sys.exit(main())
