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

Exit codes: 0 provisioned, 1 provisioning failed, 2 usage error.
Standard library only; Python 3.6 or newer.

The file reads top-down: system helpers (log and deadline, text, files under one
Root, tools), transport (HTTP/1.1 and the retry policy), WireServer, IMDS, the
provisioning media, KVP, hostname and its DHCP publishing, admin user, per-VM
identity, hooks (and the data kept for them), then provision(): a Run context
walks STEPS; each step decides a plan of Actions and Run.carry_out does them, or
prints them with --dry-run.  Then --deprovision, --status, --check and the
command line.
"""

import itertools
import os
import re
import socket
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
TERMINAL_ESCAPE = re.compile(r'\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\\\)?|.?)')
NOT_XML_TEXT = re.compile('[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]')


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
    import binascii
    try:
        return base64.b64decode(''.join(text.split()), validate=True)
    except (binascii.Error, ValueError):
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
    import errno
    return errno_ in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP)


def read_opened(opener, shown, limit):
    """The bytes of the file `opener` opens (a descriptor), or None when there is no
    such file (or it is a directory).  Anything but a regular file (a FIFO, a device,
    a socket) is an OSError before a byte is read, and so is more than `limit` bytes:
    the size is checked first and the reading stops at limit + 1 (a file that grows,
    /proc's that say 0)."""
    import errno
    import stat
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
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, 'not a regular file', shown)
        chunks, size = [], 0
        while size <= limit and st.st_size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                return b''.join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise OSError(errno.EFBIG, 'larger than %d bytes' % limit, shown)
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
        import errno
        import stat
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
        path = '/'.join(parts)
        limit = how.get('limit', READ_MAX)
        try:
            return self.at(path, lambda fd, name: read_opened(
                lambda: os.open(name, OPEN_READ, dir_fd=fd), path, limit))
        except ValueError:      # a NUL in the path (read from an image's config)
            return None
        except OSError as exc:
            if not_a_file(exc.errno):
                return None
            raise

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
        import stat
        found = self.stat(*parts)
        return found is not None and stat.S_ISREG(found.st_mode)

    def is_dir(self, *parts):
        import stat
        found = self.stat(*parts)
        return found is not None and stat.S_ISDIR(found.st_mode)

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
    import stat
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
    import binascii
    import errno
    import stat
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
            tmp = '.%s.%s.tmp' % (name, binascii.hexlify(os.urandom(8)).decode())
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
    import errno
    try:
        label = os.getxattr(source, SELINUX_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    os.setxattr(target, SELINUX_XATTR, label)


# A step's plan is a list of actions: what it would do, in words, and the doing.
# Run.carry_out performs them, or with --dry-run prints them.
Action = namedtuple('Action', 'says do')


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


def restore_labels(run, paths, what):
    """The SELinux policy's labels for files we made, where SELinux is on."""
    restorecon = find_tool('restorecon')
    if restorecon and os.path.isdir(SELINUX_FS):
        run_tool([restorecon, '-R'] + list(paths), run.deadline, what)


# --------------------------------------------------------------------------
# Transport: HTTP/1.1 straight on a socket (never a proxy), one deadline, one
# retry policy.  Not http.client: its imports (email, ssl) cost more than this
# whole run does once started (tests/bench.py), for two link-local servers that
# speak plain HTTP.
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


class Response(object):
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def text(self):
        return self.body.decode('utf-8', 'replace')


def backoff_delay(attempt, retry_after=None):
    """Capped exponential backoff with jitter.  A server's Retry-After can only make
    the wait longer: "Retry-After: 0" from a busy server must not become a flood."""
    delay = min(BACKOFF_CAP, BACKOFF_FIRST * (2 ** (attempt - 1)))
    jitter = int.from_bytes(os.urandom(2), 'big') / 65535.0
    delay *= 0.5 + jitter / 2
    return max(delay, retry_after or 0.0)


def with_retries(what, attempt, deadline, log):
    """Call attempt() until it returns; TryAgain is retried with capped backoff
    and jitter until the deadline, any other exception goes to the caller."""
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
            delay = backoff_delay(tries)
            remaining = deadline.remaining()
            if delay >= remaining:
                raise ProvisioningError(
                    '%s: %s; gave up after %d attempts in %.1f s (deadline)'
                    % (what, problem, tries, time.monotonic() - started))
            if again.retry_after is not None:
                # a Retry-After past the deadline is cut so that one more try fits
                delay = max(delay, min(again.retry_after, remaining - delay))
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
    """One HTTP exchange.  Connection errors, timeouts, 5xx, 429 and the caller's
    retry_statuses raise TryAgain, an answer that is not HTTP raises Malformed;
    every other answer is returned."""
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
    except NotHttp as exc:
        log.debug('%s %s -> %s (%s)' % (method, url, exc, elapsed_ms(started)))
        raise Malformed(str(exc))
    except (OSError, ValueError) as exc:
        log.debug('%s %s -> %s (%s)' % (method, url, describe_error(exc), elapsed_ms(started)))
        raise TryAgain(describe_error(exc))
    log.debug('%s %s -> %d %s, %d bytes (%s)' % (method, url, response.status, response.reason,
                                                  len(response.body), elapsed_ms(started)))
    status = response.status
    if status >= 500 or status == 429 or status in retry_statuses:
        raise TryAgain('HTTP %d %s' % (status, response.reason),
                       retry_after_seconds(response.headers.get('retry-after')))
    return response


class NotHttp(ValueError):
    """The peer answered, but not in HTTP/1.x, or beyond MAX_RESPONSE_BYTES: asking
    again will not help (a cut-short answer is a plain ValueError: it may)."""


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
                raise ValueError('connection closed mid-answer' if self.total
                                 else 'connection closed without an answer')
        line, _, self.buffer = self.buffer.partition(b'\r\n')
        return line

    def exactly(self, size):
        while len(self.buffer) < size:
            if not self.fill():
                raise ValueError('connection closed mid-answer')
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
    """Read one answer, skipping interim 1xx ones (RFC 9110 15.2).  ValueError when it
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
            raise TryAgain('api-version refused', retry_after=0)
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


def cdrom_devices(run):
    """/dev/sr0, then the other CD-ROM devices (as waagent looks)."""
    dev = run.root.path('/dev')
    names = sorted(glob_names(dev, MEDIA_DEVICE_NAME.pattern),
                   key=lambda n: (n != 'sr0', not n.startswith('sr'), n))
    return unique_devices([os.path.join(dev, n) for n in names])


def formatted_devices(run):
    """Block devices holding a UDF or ISO 9660 file system (as cloud-init looks, with
    blkid): the last resort.  Their volume recognition area, 32 KiB in, is read
    here; a blkid process would cost more than the whole probe (0.5 s under TCG)."""
    found = []
    for name in sorted(glob_names(run.root.path('/sys/class/block'), r'[\w.-]+$')):
        device = run.root.path('/dev', name)
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


def read_media(run, device):
    """ovf-env.xml's bytes from the media in `device` (None when the media has no
    such file), mounted read-only and always unmounted, also on SIGTERM.  The
    mountpoint is inside a directory of its own (0700): the disc's root may let
    anyone in, and ovf-env.xml holds the password in plain text."""
    import tempfile
    private = tempfile.mkdtemp(prefix='azure-provisioning-media.',
                               dir=run.root.path(MEDIA_MOUNT_DIR))
    mountpoint = os.path.join(private, 'media')
    os.mkdir(mountpoint, 0o700)
    try:
        if os.path.isdir(SELINUX_FS):
            # new directories get our domain's runtime type, on which the confined
            # mount may not mount; /run's own type is a mountpoint
            try:
                for directory in (private, mountpoint):
                    copy_selinux_label(run.root.path(MEDIA_MOUNT_DIR), directory)
            except OSError as exc:      # the mount may still be allowed: it says if not
                run.log.warning('media: cannot label %s: %s' % (mountpoint,
                                                                describe_error(exc)))
        try:
            # nodev, nosuid, noexec: the disc is anyone's; what it holds is data only
            run_tool([find_tool('mount') or 'mount', '-o', 'ro,nodev,nosuid,noexec', '-t',
                      ','.join(MEDIA_FILESYSTEMS), device, mountpoint], run.deadline, 'media')
        except BaseException as exc:
            if os.path.ismount(mountpoint):     # timed out after the kernel mounted it
                unmount(run, mountpoint)
            if isinstance(exc, ProvisioningError):
                raise ProvisioningError('%s%s' % (exc, udf_missing_hint(run)))
            raise
        try:
            return Root(mountpoint).read(OVF_ENV, limit=OVF_ENV_MAX)
        except OSError as exc:      # a FIFO, a device, too large
            raise ProvisioningError('media: %s on %s: %s' % (OVF_ENV, device, exc.strerror))
        finally:
            unmount(run, mountpoint)
    finally:
        for directory in (mountpoint, private):
            try:
                os.rmdir(directory)
            except OSError as exc:
                run.log.warning('media: %s left behind: %s' % (directory, describe_error(exc)))


def unmount(run, mountpoint):
    """umount, also after the deadline (a mount must not outlive us); lazily when busy."""
    umount = find_tool('umount') or 'umount'
    grace = Deadline(TOOL_TIMEOUT)
    try:
        run_tool([umount, mountpoint], grace, 'media')
    except ProvisioningError as exc:
        run.log.warning('media: %s; detaching it lazily' % exc)
        run_tool([umount, '-l', mountpoint], grace, 'media')


def kernel_has_udf(root, modules):
    """Whether the kernel whose modules are in `modules` mounts UDF: built in, or a
    udf.ko (compressed or not)."""
    return ('kernel/fs/udf/udf.ko' in (root.read_text(modules, 'modules.builtin') or '')
            or bool(root.names(modules + '/kernel/fs/udf', r'udf\.ko')))


def udf_missing_hint(run):
    """' (this kernel cannot mount UDF: ...)' when that is so, else ''."""
    release = os.uname().release
    if ('udf' in (read_text('/proc/filesystems') or '')
            or kernel_has_udf(run.root, '/lib/modules/' + release)):
        return ''
    return (' (kernel %s cannot mount UDF, the format Azure uses: no udf module in '
            '/lib/modules/%s; install it, e.g. linux-modules-extra)' % (release, release))


def find_media(run):
    """The first media holding ovf-env.xml, parsed: OvfEnv, or None.  Problems are
    warnings here; whether the media was needed is for the caller to say."""
    choice = run.options.media
    if choice == 'none':
        run.log.info('media: not looked for (--media none)')
        return None
    problems = []
    if choice:
        media = read_first_media(run, [choice], problems)
    else:
        media = search_media(run, problems)
        if media is None and settle_devices(run):
            problems = []
            media = search_media(run, problems)
    if media is not None:
        return media
    if not problems:
        run.log.info('media: no provisioning media found (IMDS alone)')
        return None
    for problem in problems:
        run.log.warning(problem)
    run.media_problem = problems[-1]
    return None


def search_media(run, problems):
    """The CD-ROMs, then the last resort: any other disc formatted as one."""
    cdroms = cdrom_devices(run)
    media = read_first_media(run, cdroms, problems)
    if media is None:
        tried = [os.path.realpath(d) for d in cdroms]
        media = read_first_media(run, [d for d in formatted_devices(run)
                                       if os.path.realpath(d) not in tried], problems)
    return media


MEDIA_SETTLE_TIMEOUT = 30       # s at most for udev's queue, when nothing was found
UDEV_CONTROL = '/run/udev/control'      # systemd-udevd's socket: udev is running


def settle_devices(run):
    """Wait until udev has handled every device the kernel announced (bounded by
    the deadline): True when a second look may find more.  Where the initramfs lacks
    the CD-ROM driver (ata_piix, sr_mod), udev loads it from the root file system and
    sr0 comes seconds after boot, possibly after this unit started.  Without udev
    nothing loads a driver later: no wait."""
    udevadm = find_tool('udevadm')
    if not udevadm or not os.path.exists(run.root.path(UDEV_CONTROL)):
        run.log.debug('media: udev is not running; no device can still appear')
        return False
    seconds = int(min(MEDIA_SETTLE_TIMEOUT, run.deadline.remaining()))
    if seconds < 1:
        return False
    t = time.monotonic()
    try:
        run_tool([udevadm, 'settle', '--timeout=%d' % seconds], run.deadline, 'media')
    except ProvisioningError as exc:    # still busy: what is there now is looked at
        run.log.warning('media: udev did not settle: %s' % exc)
    run.log.info('media: none found at first; waited for udev to settle (%s); '
                 'looking again' % elapsed_ms(t))
    return True


def read_first_media(run, devices, problems):
    """The first of `devices` whose media holds ovf-env.xml, parsed; what went wrong
    with the others is added to `problems`."""
    for device in devices:
        try:
            data = read_media(run, device)
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
        run.log.info('media: %s: %s read (%s)' % (device, OVF_ENV, describe_media(media)))
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
    import errno
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
    import errno
    import stat
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


def report_to_kvp(run, description):
    """The WireServer report again, into KVP when this is a Hyper-V guest; never
    fails.  Its lock wait ends before the run's reserve: that is the WireServer
    report's."""
    pool = run.root.path(KVP_POOL)
    try:
        hyperv = run.root.is_dir(os.path.dirname(KVP_POOL))
    except OSError as exc:
        run.log.warning('KVP report not written: %s' % describe_error(exc))
        return
    if not hyperv:
        run.log.debug('KVP: %s does not exist; no KVP report' % os.path.dirname(pool))
        return
    wait = min(KVP_LOCK_WAIT, run.deadline.remaining())
    run.carry_out(Action('append to %s: %s=%s' % (pool, KVP_REPORT_KEY, description),
                         lambda: append_kvp_report(run.root, description, run.log, wait)))


def append_kvp_report(root, description, log, wait=KVP_LOCK_WAIT):
    pool = KVP_POOL
    try:
        write_kvp(KVP_REPORT_KEY, description, pool, wait=wait, root=root)
        log.debug('KVP: %s written to %s' % (KVP_REPORT_KEY, root.path(pool)))
    except OSError as exc:
        log.warning('KVP report not written: %s' % describe_error(exc))


def report_description(result, facts, step=None, reason=None, warnings=()):
    """Azure agents' pipe-separated report, at most MAX_DESCRIPTION characters:
    `result=error|reason=...|agent=...|step=...|vm_id=...|timestamp=...|documentation_url=...`"""
    clean = lambda text: ' '.join(clean_text(text).replace('|', '/').split())
    head = 'result=%s' % result + ('|reason=' if reason is not None else '')
    tail = ['', 'agent=%s/%s' % (AGENT_NAME, VERSION)]
    if step:
        tail.append('step=' + step)
    tail += ['warning=' + clean(w) for w in warnings]
    tail += ['vm_id=' + clean(facts.get('AZURE_VM_ID') or 'unknown'),
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


def hostname_step(run):
    """Set the name IMDS gives (when it differs), then announce it to DHCP."""
    t = time.monotonic()
    name = validate_hostname(desired_hostname(run.metadata))
    current = socket.gethostname()
    if name == current:
        # live already (set by hand, or the image's own): the next boots need the file
        if (run.root.read_text('/etc/hostname') or '').strip() == name:
            run.log.info('hostname: already %s, nothing to change (%s)' % (name, elapsed_ms(t)))
            return
        try:
            run.carry_out(Action('write /etc/hostname: %s' % name,
                                 lambda: write_etc_hostname(run, name)))
        except (ProvisioningError, OSError) as exc:
            # the VM has its name now: a failed VM would be the wrong report
            run.warn('/etc/hostname not written: %s' % describe_error(exc))
            return
        run.log.info('hostname: already %s; /etc/hostname written (%s)' % (name, elapsed_ms(t)))
        return
    run.carry_out(Action('set hostname: %s (now %s)' % (name, current),
                         lambda: rename_host(run, current, name, t)))
    if not run.options.publish_hostname:
        return
    if not in_system_uts_namespace():
        # a name set in a private namespace is not the one DHCP should send
        run.log.info('hostname: not published to DHCP (not the system\'s UTS namespace)')
        return
    warning = publish_hostname(run, name)
    if warning:
        run.warn(warning)


def rename_host(run, old, new, started):
    method = set_hostname(run, new)
    hosts = update_etc_hosts(run, old, new)
    run.log.info('hostname set to %s via %s%s (%s)'
                 % (new, method, ', /etc/hosts updated' if hosts else '', elapsed_ms(started)))


def set_hostname(run, name):
    """The name for the next boots (/etc/hostname), then the live one (sethostname(2)):
    what systemd-hostnamed does for `hostnamectl set-hostname`, without asking it over
    D-Bus, which would first start it (0.5-1.5 s of the boot under TCG; minimal images
    lack it).  A running hostnamed or NetworkManager learns no new static name until
    it reads the file again.  The file first: a failed write leaves the old name live,
    and the next run tries again.  Returns how."""
    write_etc_hostname(run, name)
    try:
        socket.sethostname(name)
    except OSError as exc:
        raise ProvisioningError('cannot set hostname %s: %s' % (name, describe_error(exc)))
    return 'sethostname'


def write_etc_hostname(run, name):
    new_file = not run.root.exists('/etc/hostname')
    run.root.write('/etc/hostname', (name + '\n').encode(), deadline=run.deadline)
    if new_file:    # made by us, not replaced: the policy's label, not /etc's
        try:
            restore_labels(run, [run.root.path('/etc/hostname')], 'hostname')
        except ProvisioningError as exc:    # the name is right; only the label is not
            run.warn(str(exc))


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


def update_etc_hosts(run, old, new):
    """True when /etc/hosts carried the old name and was rewritten.  A localhost*
    name (RHEL's template is localhost.localdomain) is never the name to replace."""
    if not old or old.lower().startswith('localhost'):
        return False
    data = run.root.read('/etc/hosts')
    if data is None:
        return False
    text = data.decode('utf-8', 'surrogateescape')
    changed = rename_in_hosts(text, old, new)
    if changed == text:
        return False
    run.root.write('/etc/hosts', changed.encode('utf-8', 'surrogateescape'),
                   deadline=run.deadline)
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


def primary_interface(root):
    """The interface of the IPv4 default route with the lowest metric; without a
    default route, the one networkd holds a DHCP lease for, else the first routed
    interface (a single-NIC VM on a network that hands out no router)."""
    routes = []
    try:
        with open(root.path('/proc/net/route')) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 6:
                    routes.append((fields[0], fields[1], int(fields[3], 16), int(fields[6])))
    except (OSError, ValueError):
        return None
    defaults = sorted((metric, name) for name, destination, flags, metric in routes
                      if destination == '00000000' and flags & 1)
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


def nm_version(deadline):
    """nmcli's (major, minor), or None when it does not say."""
    try:
        match = re.search(r'(\d+)\.(\d+)', run_tool(['nmcli', '--version'], deadline, 'nmcli'))
    except ProvisioningError:
        return None
    return (int(match.group(1)), int(match.group(2))) if match else None


def networkmanager_plan(interface, name, deadline, root):
    """`nmcli device modify` re-applies the active profile with a new dhcp-hostname,
    changing nothing on disk and restarting only the DHCP client.  Before 1.42 a
    reapply asks for no lease: the connection is activated again (the interface goes
    down and up) with the name set in memory only (--temporary), and the name is
    taken out again, so that no profile, saved later or not, keeps this VM's name."""
    if not os.path.isdir(root.path('/run/NetworkManager')) or not find_tool('nmcli'):
        return None
    try:
        uuid = run_tool(['nmcli', '-g', 'GENERAL.CON-UUID', 'device', 'show', interface],
                        deadline, 'nmcli').strip()
    except ProvisioningError:
        return None
    if not uuid:
        return None
    send = run_tool(['nmcli', '-g', 'ipv4.dhcp-send-hostname', 'connection', 'show', uuid],
                    deadline, 'nmcli').strip()
    if send == 'no':
        return DhcpPlan('NetworkManager', None, 'connection %s has ipv4.dhcp-send-hostname no'
                        % uuid)
    version = nm_version(deadline)
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
    import errno
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


def publish_hostname(run, name):
    """Make the DHCP client send `name`; returns a warning or None.  Never raises:
    a name missing from DNS is worth a warning, not a failed VM."""
    interface = primary_interface(run.root)
    if interface is None:
        return 'no routed interface; hostname not published to DHCP'
    try:
        plan = (networkd_plan(interface, name, run.root)
                or networkmanager_plan(interface, name, run.deadline, run.root)
                or dhclient_plan(interface, name, run.root))
        if plan is None:
            return 'no known DHCP client manages %s; hostname not published' % interface
        if plan.why_not:
            return '%s on %s will not send the new name: %s' % (plan.client, interface,
                                                                plan.why_not)
        run.carry_out(Action('run: %s' % ' && '.join(' '.join(c) for c in plan.commands
                                                      + list(plan.undo)),
                             lambda: send_to_dhcp(run, interface, plan, name)))
    except ProvisioningError as exc:
        return 'hostname not published: %s' % exc
    return None


def send_to_dhcp(run, interface, plan, name):
    t = time.monotonic()
    limited = Deadline(min(PUBLISH_TIMEOUT, run.deadline.remaining()))
    before = interface_address(interface, limited, run.log)
    try:
        for command in plan.commands:
            run_tool(command, limited, 'publish hostname')
    finally:
        undo_deadline = Deadline(min(UNDO_TIMEOUT, run.deadline.remaining()))
        for command in plan.undo:
            run_tool(command, undo_deadline, 'publish hostname (undo)')
    # networkd lets the lease go for a moment before it asks again: expected
    after = interface_address(interface, limited, run.log.quieter())
    run.log.info('hostname %s sent to DHCP by %s on %s (%s); address %s%s (%s)'
                 % (name, plan.client, interface, ' && '.join(' '.join(c) for c in plan.commands
                                                             + list(plan.undo)),
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
    import binascii
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
    except (binascii.Error, ValueError, struct.error, UnicodeError):
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
    """The path IMDS gives when it lies inside the home, else ~/.ssh/authorized_keys."""
    default = os.path.join(home, '.ssh', 'authorized_keys')
    for path in sorted(set(p for p in imds_paths if p), key=imds_paths.index):
        normal = os.path.normpath(path)
        if (os.path.isabs(path) and normal.startswith(home.rstrip('/') + '/')
                and '..' not in path.split('/')):
            return normal
        log.info('user: key path %r is outside %s; using %s' % (one_line(path, 80), home, default))
    return default


def user_plan(run, request):
    """What makes the admin user as IMDS asks (account, locked password, sudo, keys,
    sshd), leaving out what is so already.  Users are the system's (pwd, useradd)."""
    import pwd
    name = request.name
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        account = None
    why = account and not_a_person(account.pw_uid, run.root)
    if why:
        raise ProvisioningError('admin user %s exists as a system account (uid %d); refused: %s'
                                % (name, account.pw_uid, why))
    plan = []
    left = unfinished_user(run, name)
    if account is None and not left:
        refuse_useradd(run, name)
    if left:
        plan.append(Action('remove what a cut useradd left of %s (its entries in %s): userdel '
                           '-r, then groupdel of its group if left' % (name, ', '.join(left)),
                           lambda: remove_unfinished_user(run, name)))
        account = None
    if account is None:
        shell = '/bin/bash' if os.access('/bin/bash', os.X_OK) else '/bin/sh'
        home = os.path.join('/home', name)
        plan.append(Action('create user %s (useradd -m -s %s), password locked' % (name, shell),
                           lambda: create_user(run, name, shell)))
    else:
        home = account.pw_dir
        if not request.password and not password_locked(run, name):
            plan.append(Action('lock the password of %s (usermod -L)' % name,
                               lambda: lock_password(run, name)))
    if request.password:
        plan.append(Action('set the password of %s from the provisioning media: (set), '
                           'with chpasswd' % name,
                           lambda: set_password(run, name, request.password)))
    plan += sudo_plan(run, name, request.password is not None)
    plan += keys_plan(run, request, home, account is None)
    if request.password_logins:
        plan += sshd_plan(run, request.password_logins)
    else:
        run.log.info('user: disablePasswordAuthentication is not "true"; sshd left alone')
    return plan


ACCOUNT_FILES = ('/etc/passwd', '/etc/shadow', '/etc/group', '/etc/gshadow')


def account_entry(root, path, name):
    """The fields of `name`'s entry in the account file `path` of the root (None
    when it has none)."""
    for line in (root.read_text(path) or '').splitlines():
        fields = line.split(':')
        if fields[0] == name:
            return fields
    return None


def account_files_naming(run, name):
    """The account files of the root that hold an entry for `name`."""
    return [path for path in ACCOUNT_FILES if account_entry(run.root, path, name) is not None]


def refuse_useradd(run, name):
    """The image's own group or home of `name` (no account of that name, no cut
    useradd of ours left them): useradd would fail on the group, or keep the home
    (the admin's keys in a directory it does not own, which userdel -r then refuses
    to remove).  Refused before anything is made or claimed."""
    fields = account_entry(run.root, '/etc/group', name)
    if fields is not None:
        gid = printable(fields[2])[:20] if len(fields) > 2 else '?'
        raise ProvisioningError('user: the image has a group %s (gid %s) and no user %s: '
                                'remove the group from the image or choose another '
                                'admin name' % (name, gid, name))
    home = os.path.join('/home', name)
    found = run.root.lstat(home)
    if found is not None:
        raise ProvisioningError('user: %s exists in the image, owned by uid %d: remove it '
                                'from the image or choose another admin name'
                                % (home, found.st_uid))


def unfinished_user(run, name):
    """The account files holding a part of `name` that a run on this VM began making
    with useradd and never recorded as made: a power cut in useradd leaves any subset
    of its four entries and its home ([] when none is left, or the record says no
    such thing).  Nobody could log in as it yet (no key, no sudo rule: they come
    after useradd), so all of it is made again."""
    state = read_state(run.root) or {}
    vm_id = run.facts.get('AZURE_VM_ID', '')
    if not vm_id or state.get('vm_id') != vm_id or state.get('admin_user_creating') != name:
        return []
    return account_files_naming(run, name)


# userdel(8): 6 the user does not exist (only a group or shadow entry was made);
# 12 the home could not be removed (none was made; or it is not the user's: kept)
USERDEL_GONE = (0, 6, 12)


def remove_unfinished_user(run, name):
    """userdel -r (not -f: a home that is not the account's stays, e.g. one that was
    there before useradd ran), then groupdel of a group of that name userdel left,
    when nobody is in it, and the home when it is an empty directory.  Shadow or
    gshadow lines left alone are useradd's to replace."""
    run_tool([find_tool('userdel') or 'userdel', '-r', name], run.deadline, 'user',
             accept=USERDEL_GONE)
    fields = account_entry(run.root, '/etc/group', name)
    if fields is not None:
        if len(fields) > 3 and fields[3].strip():
            raise ProvisioningError('user: the group %s a cut useradd left has members (%s); '
                                    'refused to remove it' % (name, one_line(fields[3], 80)))
        run_tool([find_tool('groupdel') or 'groupdel', name], run.deadline, 'user')
    try:    # cut between useradd's mkdir and chown: still root's, so userdel kept it
        run.root.at(os.path.join('/home', name),
                    lambda fd, entry: os.rmdir(entry, dir_fd=fd), follow=False)
    except OSError:     # none, not empty (then refused, its owner named), not a directory
        pass
    run.log.info('user: removed what a cut useradd left of %s' % name)


def create_user(run, name, shell):
    """useradd, between two records on the disk: before it, that we are making `name`
    (a power cut in useradd leaves a part of the account, the next run must make it
    again); after it, that we made it (--deprovision --user removes it, whenever the
    power goes later).  Neither claims the host keys (ssh_host_keys_for is carried)."""
    import pwd
    refuse_useradd(run, name)       # at the moment of the action: what the plan saw may differ
    run.user_creating = name
    write_state(run, 'provisioning', 'user', 'the run stopped while making the admin user %s'
                % name)
    before = account_files_naming(run, name)
    try:
        run_tool([find_tool('useradd') or 'useradd', '-m', '-s', shell, name], run.deadline,
                 'user')
    except ProvisioningError:
        # useradd ran to its end: when it made nothing, what is there of `name` was
        # there before it, and no later run may take it for a cut useradd's
        if account_files_naming(run, name) == before:
            run.user_creating, run.user_claim_dropped = None, True
            write_state(run, 'provisioning', 'user', 'useradd of %s failed, making nothing'
                        % name)
        raise
    run.user_created, run.user_creating = name, None
    write_state(run, 'provisioning', 'user', 'the run stopped after making the admin user %s'
                % name)
    account = pwd.getpwnam(name)
    run.log.info('user: created %s (uid %d, shell %s)' % (name, account.pw_uid, shell))
    if not password_locked(run, name):
        lock_password(run, name)


def password_locked(run, name):
    """IMDS carries no password: none may work ('!' or '*' in /etc/shadow)."""
    for line in (run.root.read_text('/etc/shadow') or '').splitlines():
        fields = line.split(':')
        if fields[0] == name:
            return fields[1:2] != [] and fields[1][:1] in ('!', '*')
    return False


def lock_password(run, name):
    run_tool([find_tool('usermod') or 'usermod', '-L', name], run.deadline, 'user')


def set_password(run, name, password):
    """chpasswd, the password on its stdin only: never in argv (ps shows it), a log
    line, a temporary file or an error message.  It replaces a locked hash, so the
    account is unlocked by it."""
    if any(c in password for c in '\n\r\0'):
        raise ProvisioningError('user: the password on the provisioning media holds a line '
                                'break or NUL; chpasswd cannot take it')
    run_tool([find_tool('chpasswd') or 'chpasswd'], run.deadline, 'user',
             stdin='%s:%s\n' % (name, password), secret=password)
    run.log.info('user: password of %s set (chpasswd)' % name)


def sudo_plan(run, name, has_password):
    """sudo asks for the password when the user has one (as waagent does), not when
    the account's password is locked."""
    if not run.root.is_dir(os.path.dirname(SUDOERS_DROP_IN)):
        run.log.info('user: /etc/sudoers.d does not exist (sudo not installed); no sudo rule')
        return []
    if has_password:
        rule = ('# written by azure-provisioning: the admin user, with the password from\n'
                '# the provisioning media\n%s ALL=(ALL) ALL\n' % name).encode()
    else:
        rule = ('# written by azure-provisioning: the admin user from IMDS, whose password\n'
                '# is locked (IMDS carries none)\n%s ALL=(ALL) NOPASSWD:ALL\n' % name).encode()
    if run.root.read(SUDOERS_DROP_IN) == rule:
        return []

    def write_rule():
        visudo = find_tool('visudo')
        run.root.write(SUDOERS_DROP_IN, rule, mode=0o440,
                       check=[visudo, '-cf'] if visudo else None, deadline=run.deadline)
        # the policy's label (etc_t), not the type our domain gives new files in /etc
        restore_labels(run, [run.root.path(SUDOERS_DROP_IN)], 'user')
        run.log.info('user: sudo rule %s written%s'
                     % (SUDOERS_DROP_IN, ' (visudo -cf ok)' if visudo else ''))
    return [Action('write %s granting %s sudo' % (SUDOERS_DROP_IN, name), write_rule)]


def keys_plan(run, request, home, new_account):
    """The keys IMDS gives that authorized_keys lacks.  For an account useradd has yet
    to make, what it holds (its home, /etc/skel's keys) is read after useradd ran."""
    name, keys = request.name, request.keys
    if not keys:
        run.log.info('user: IMDS has no public keys for %s' % name)
        return []
    if new_account:
        path = authorized_keys_path(home, request.key_paths, Log(quiet=True))
        return [Action('add %d key(s) to %s (0600, owner %s)' % (len(keys), path, name),
                       lambda: add_keys(run, request))]
    addition = keys_to_add(run, request, home)
    if addition is None:
        return []
    path, text, added = addition
    return [Action('add %d key(s) to %s (0600, owner %s)' % (added, path, name),
                   lambda: install_keys(run, name, path, text, added))]


def keys_to_add(run, request, home):
    """(path, the whole new text, how many keys are new), None when none is."""
    path = authorized_keys_path(home, request.key_paths, run.log)
    present = run.root.read(path)
    lines = present.decode('utf-8', 'replace').splitlines() if present else []
    known = set(' '.join(line.split()[:2]) for line in lines)
    new = [key for key in request.keys if ' '.join(key.split()[:2]) not in known]
    if not new:
        run.log.info('user: %d key(s) already in %s' % (len(request.keys), path))
        return None
    return path, ''.join(line + '\n' for line in lines + new).encode('utf-8'), len(new)


def add_keys(run, request):
    import pwd
    addition = keys_to_add(run, request, pwd.getpwnam(request.name).pw_dir)
    if addition is not None:
        install_keys(run, request.name, *addition)


def install_keys(run, name, path, text, added):
    """Write authorized_keys (0600) and the directories to it (0700), all owned by the
    user, never through a symbolic link."""
    import pwd
    account = pwd.getpwnam(name)
    path = run.root.path(path)
    directory = os.path.dirname(path)
    for link in (directory, path):
        if os.path.islink(link):
            raise ProvisioningError('%s is a symbolic link; refusing to write keys through it'
                                    % link)
    made = []
    parent = directory
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    for missing in reversed(made):
        os.mkdir(missing, 0o700)
        os.chown(missing, account.pw_uid, account.pw_gid)
    if directory == run.root.path(account.pw_dir, '.ssh'):
        os.chmod(directory, 0o700)
    write_file_atomically(path, text, mode=0o600, owner=(account.pw_uid, account.pw_gid),
                          deadline=run.deadline)
    restore_labels(run, [directory], 'user')      # ssh_home_t, or sshd may not read them
    run.log.info('user: %d key(s) added to %s' % (added, path))


def sshd_plan(run, logins):
    config = run.root.read_text('/etc/ssh/sshd_config')
    if config is None:
        run.log.info('user: no /etc/ssh/sshd_config; PasswordAuthentication left alone')
        return []
    if not re.search(r'^\s*Include\s+/etc/ssh/sshd_config\.d/\*\.conf\s*$', config, re.M | re.I):
        run.log.info('user: sshd_config does not include sshd_config.d/*.conf; '
                     'PasswordAuthentication left alone')
        return []
    setting = ('# written by azure-provisioning (DisableSshPasswordAuthentication)\n'
               'PasswordAuthentication %s\n' % logins).encode()
    if run.root.read(SSHD_DROP_IN) == setting:
        return []
    # sshd starts with an Include that matches nothing; the drop-in needs its directory
    directory = os.path.dirname(SSHD_DROP_IN)
    make_directory = not run.root.is_dir(directory)
    if make_directory and run.root.lstat(directory) is not None:
        # a file, or a link to nothing or out of the directories: not ours to replace
        run.warn('PasswordAuthentication left alone: %s is not a directory' % directory)
        return []

    def write_setting():
        if make_directory:
            run.root.make_dirs(directory, 0o755)
            run.log.info('user: made %s (0755)' % directory)
        run.root.write(SSHD_DROP_IN, setting, deadline=run.deadline)
        # the policy's labels (etc_t), not the type our domain gives new files in /etc:
        # the directory, when made, and the drop-in in it; sshd must read both
        restore_labels(run, [run.root.path(directory if make_directory else SSHD_DROP_IN)],
                       'user')
        run.log.info('user: PasswordAuthentication %s (%s)' % (logins, SSHD_DROP_IN))
        restart_sshd(run, required=False)
    return [Action('write %s%s: PasswordAuthentication %s' % (
        SSHD_DROP_IN, ' (making %s, 0755)' % os.path.dirname(SSHD_DROP_IN)
        if make_directory else '', logins), write_setting)]


def restart_sshd(run, required=True):
    """sshd must serve what we changed (keys, PasswordAuthentication): a running one
    re-reads it on reload; one that failed to start for lack of keys (Debian's does)
    is started.  Only the system's sshd, never from a test namespace.  Not required
    (a setting): a failure is a warning; the setting applies from its next start."""
    if not system_systemd():
        return
    try:
        shown = run_tool(['systemctl', 'show', '-p', 'Id', '-p', 'ActiveState', 'ssh.service',
                          'sshd.service'], run.deadline, 'sshd')
        units = {}
        for block in shown.strip().split('\n\n'):
            fields = dict(line.split('=', 1) for line in block.splitlines() if '=' in line)
            units[fields.get('Id')] = fields.get('ActiveState')
        for unit, state in sorted(units.items()):
            if not unit or state == 'inactive':     # not started (yet): it reads them then
                continue
            verb = 'reload-or-restart' if state == 'active' else 'restart'
            if verb == 'restart':   # it may have hit its start limit while it had no keys
                run_tool(['systemctl', 'reset-failed', unit], run.deadline, 'sshd')
            run_tool(['systemctl', verb, unit], run.deadline, 'sshd')
            run.log.info('sshd: %s %s' % (verb, unit))
    except ProvisioningError as exc:
        if required:
            raise
        run.log.warning('sshd not reloaded, the setting applies from its next start: %s' % exc)


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
    import errno
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


def write_private(run, path, data):
    """A file of DATA_DIR (`path` as from here): ours alone (custom data and the
    record may hold secrets), whoever owned the directory or the file before, never
    through a symbolic link."""
    import stat
    inside = '/' + os.path.relpath(path, run.root.top)
    directory = os.path.dirname(inside)
    found = run.root.lstat(directory)
    if found is not None and stat.S_ISLNK(found.st_mode):
        raise ProvisioningError('%s is a symbolic link; refusing to write through it'
                                % os.path.dirname(path))
    run.root.make_dirs(directory, 0o700)

    def make_ours(fd, name):
        opened = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=fd)
        try:
            os.fchown(opened, os.geteuid(), os.getegid())
            os.fchmod(opened, 0o700)
        finally:
            os.close(opened)
    run.root.at(directory, make_ours, follow=False)
    run.root.write(inside, data, mode=0o600, owner=(os.geteuid(), os.getegid()),
                   deadline=run.deadline.without_reserve())


def write_state(run, result, step=None, reason=None):
    """Record this run (not in a dry run): which VM, what was done and how long it took."""
    if run.options.dry_run:
        return
    previous = read_state(run.root) or {}
    vm_id = run.facts.get('AZURE_VM_ID') or ''
    if not vm_id and isinstance(previous.get('vm_id'), str):
        # a run that failed before IMDS named the VM: the last record's VM, and what
        # it says we made there, stand (else a user of ours would become the image's)
        vm_id = previous['vm_id']
    state = {'result': result, 'vm_id': vm_id,
             'incarnation': run.incarnation, 'hostname': run.facts.get('AZURE_HOSTNAME'),
             'admin_user': run.facts.get('AZURE_ADMIN_USERNAME') or None,
             'ssh_host_keys': run.host_keys,
             'steps': [{'step': name, 'seconds': round(seconds, 3)} for name, seconds in run.steps],
             'timestamp': utc_timestamp(),
             'agent': '%s/%s' % (AGENT_NAME, VERSION)}
    # which admin user we made (--deprovision --user removes it), kept across runs;
    # and the one a run began making and never recorded as made (useradd cut short:
    # any part of it may exist), which the next run makes again
    same_vm = previous.get('vm_id') == state['vm_id']
    made = previous.get('admin_user_created') if same_vm else None
    state['admin_user_created'] = run.user_created or made
    creating = (previous.get('admin_user_creating')
                if same_vm and not run.user_created and not run.user_claim_dropped else None)
    state['admin_user_creating'] = run.user_creating or creating
    # the VM the host keys on disk were made for: this run's when it made them, else
    # the last record's (a run that failed before the identity step left them as
    # they were).  The only proof host_keys_plan trusts.
    made_for = run.host_keys_for or previous.get('ssh_host_keys_for')
    state['ssh_host_keys_for'] = made_for if isinstance(made_for, str) and made_for else None
    if result != 'provisioned':
        state.update(step=step, reason=reason)
    try:
        write_private(run, run.root.path(STATE_FILE),
                      (json.dumps(state, indent=2, sort_keys=True) + '\n').encode())
    except (OSError, ProvisioningError) as exc:    # the report is what matters
        run.log.warning('could not write %s: %s' % (STATE_FILE, exc if isinstance(
            exc, ProvisioningError) else describe_error(exc)))


def host_key_names(root):
    return sorted(root.names('/etc/ssh', SSH_HOST_KEY.pattern))


HOST_KEY_MAX = 1 << 16      # bytes of one host key file: a 16384-bit RSA key is < 13 KiB


def host_keys_complete(run):
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
    root = run.root
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
        derived = run_tool([keygen, '-y', '-P', '', '-f', '/dev/stdin'], run.deadline,
                           'ssh host keys: checking /etc/ssh/%s' % printable(name),
                           stdin=key.decode('utf-8', 'replace'), accept=(0, 255))
        if derived.split()[:2] != fields:
            return False
    return True


def host_keys_plan(run):
    """New SSH host keys when this VM is not the one that made the keys it has: at
    the first boot of an image, and of an image captured again from a provisioned VM.
    Tied to the vmId (cloud-init #3910: regenerating on a mere guess surprised users),
    and to the record's ssh_host_keys_for alone: its vm_id is written after a failure
    too, one that may have come before the keys were replaced.  A record without the
    field (an older version's) proves nothing: the keys are replaced once more."""
    if run.options.keep_host_keys:
        run.host_keys = 'kept (--keep-ssh-host-keys)'
        return []
    if not any(os.path.exists(run.root.path(d, 'sshd')) for d in ('/usr/sbin', '/sbin')):
        run.host_keys = 'none (no sshd)'
        run.log.info('ssh host keys: no sshd in this image; nothing to do')
        return []
    vm_id = run.facts.get('AZURE_VM_ID', '')
    state = read_state(run.root) or {}
    made_for = state.get('ssh_host_keys_for')
    recorded = made_for or state.get('vm_id')
    if vm_id and made_for == vm_id:
        if host_keys_complete(run):
            run.host_keys = 'kept (made for this VM)'
            run.host_keys_for = vm_id
            run.log.info('ssh host keys: kept (made at this VM\'s first boot)')
            return []
        why = ('the keys made for this VM are not all there, or not whole (--deprovision '
               'removed them, a power cut emptied them, or someone did)')
    elif vm_id and recorded == vm_id:
        why = 'the record does not say they were made for this VM'
    elif recorded:
        why = 'the disk was provisioned as VM %s before' % one_line(str(recorded), 60)
    else:
        why = 'first boot of this image'
    old = host_key_names(run.root)
    return [Action('replace the SSH host keys (%s): remove %d file(s) in /etc/ssh, '
                   'ssh-keygen -A, print the fingerprints, restart sshd' % (why, len(old)),
                   lambda: replace_host_keys(run, old))]


KEYS_ASIDE = '.azure-provisioning-keys.'     # where new host keys are made, beside /etc/ssh


def remove_keys_left_aside(run, directory):
    """A power cut while keys were being made aside leaves their directory, private
    keys in it, which nothing else would ever remove.  Only real directories of that
    name: a link is not ours to follow."""
    import shutil
    import stat
    for name in glob_names(directory, re.escape(KEYS_ASIDE)):
        path = os.path.join(directory, name)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
            run.log.info('ssh host keys: removed %s, left by an interrupted run' % path)


def replace_host_keys(run, old):
    """New keys are made aside, then renamed over the old ones: at no moment is
    /etc/ssh without keys, since an sshd that re-executes itself then (a reload of an
    earlier step lands asynchronously) exits for good ("no hostkeys available")."""
    import shutil
    import tempfile
    keygen = find_tool('ssh-keygen') or 'ssh-keygen'
    ssh = run.root.path('/etc/ssh')
    remove_keys_left_aside(run, os.path.dirname(ssh))
    aside = tempfile.mkdtemp(prefix=KEYS_ASIDE, dir=os.path.dirname(ssh))
    try:
        os.makedirs(os.path.join(aside, 'etc/ssh'))
        run_tool([keygen, '-A', '-f', aside], run.deadline, 'ssh host keys')
        if not host_key_names(Root(aside)):     # OpenSSH before 7.8: -A ignores -f
            for kind in sorted(set(re.findall(r'ssh_host_(\w+)_key', ' '.join(old)))
                               or ('rsa', 'ecdsa', 'ed25519')):
                run_tool([keygen, '-q', '-t', kind, '-N', '', '-f',
                          os.path.join(aside, 'etc/ssh', 'ssh_host_%s_key' % kind)],
                         run.deadline, 'ssh host keys')
        made = host_key_names(Root(aside))
        public = [n for n in made if n.endswith('.pub')]
        if not public:
            raise ProvisioningError('ssh host keys: ssh-keygen -A made none')
        fingerprints = [run_tool([keygen, '-l', '-f', os.path.join(aside, 'etc/ssh', n)],
                                 run.deadline, 'ssh host keys').strip() for n in public]
        # their bytes on the disk before their names are: the record that follows
        # calls the keys this VM's, and a power cut must not leave them empty
        for name in made:
            sync_file(os.path.join(aside, 'etc/ssh', name))
        for name in sorted(made, key=lambda n: n.endswith('.pub')):     # private ones first
            run.root.at('/etc/ssh/' + name, lambda fd, key, name=name: os.replace(
                os.path.join(aside, 'etc/ssh', name), key, dst_dir_fd=fd), follow=False)
        for name in set(old) - set(made):   # a type ssh-keygen -A no longer makes (dsa)
            run.root.remove('/etc/ssh/' + name)
        # the new names on the disk: /etc/ssh as the renames found it
        run.root.at('/etc/ssh/' + made[0], lambda fd, _: sync_directory(fd), follow=False)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    # from here on the keys on disk are this VM's, whatever fails next
    run.host_keys_for = run.facts.get('AZURE_VM_ID') or None
    # sshd_key_t, not the etc_t of the directory they were made in
    restore_labels(run, [os.path.join(ssh, n) for n in made], 'ssh host keys')
    # unprefixed, for people and tools that read the serial console (boot diagnostics)
    run.log.block([FINGERPRINTS[0]] + fingerprints + [FINGERPRINTS[1]])
    run.host_keys = 'replaced'
    run.log.info('ssh host keys: %d new (%s)' % (len(public), ', '.join(
        n[len('ssh_host_'):-len('_key.pub')] for n in public)))
    restart_sshd(run)


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


def data_plan(run):
    """Custom data (media) and user data (IMDS), kept for the image's hooks in
    DATA_DIR.  Never run by us: what they mean (a cloud-config, a script, a blob) is
    the image's business, and a hook can run them knowingly."""
    plan = []
    for name, variable, data in (
            ('custom-data', 'AZURE_CUSTOM_DATA', run.media and run.media.custom_data),
            ('user-data', 'AZURE_USER_DATA', imds_user_data(run.metadata))):
        if data is None:
            continue
        path = run.root.path(DATA_DIR, name)
        run.facts[variable] = path
        plan.append(Action('write %s (%d bytes, 0600; %s for the hooks)'
                           % (path, len(data), variable),
                           lambda path=path, data=data: keep_data(run, path, data)))
    return plan


def keep_data(run, path, data):
    write_private(run, path, data)
    run.log.info('data: %s written (%d bytes)' % (path, len(data)))


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


def run_hooks(run, hooks):
    """Run each hook with the VM facts in its environment and the time left as its
    limit; the first failure stops provisioning with the hook's last stderr line."""
    import shutil
    import tempfile
    # /run: a tmpfs, so even a SIGKILL leaves no copy of the metadata behind a reboot
    run_dir = run.root.path('/run')
    scratch = tempfile.mkdtemp(prefix='azure-provisioning-hooks.',
                               dir=run_dir if os.path.isdir(run_dir) else None)
    try:
        imds_copy = os.path.join(scratch, 'imds.json')
        write_file_atomically(imds_copy, json.dumps(run.metadata, indent=2).encode('utf-8'),
                              mode=0o600, deadline=run.deadline)
        env = dict((k, v) for k, v in os.environ.items()
                   if k not in ('AZURE_CUSTOM_DATA', 'AZURE_USER_DATA'))
        env.update(AZURE_IMDS_JSON=imds_copy, **run.facts)
        for hook in hooks:
            run_hook(hook, env, run.deadline, run.log)
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
# Provisioning: one run context, a table of steps, one executor
# --------------------------------------------------------------------------

class Options(object):
    """What a run is asked to do; main() fills it from the command line."""

    def __init__(self, wireserver=(DEFAULT_WIRESERVER, 80), imds=(DEFAULT_IMDS, 80),
                 timeout=DEFAULT_TIMEOUT, set_hostname=True, publish_hostname=True,
                 provision_user=False, dry_run=False, root='/', media=None,
                 keep_host_keys=False, remove_user=False):
        self.wireserver = wireserver
        self.imds = imds
        self.timeout = timeout
        self.set_hostname = set_hostname
        self.publish_hostname = publish_hostname
        self.provision_user = provision_user
        self.dry_run = dry_run
        self.root = root
        self.media = media      # a device or image file to read, 'none', or None: search
        self.keep_host_keys = keep_host_keys
        self.remove_user = remove_user      # --deprovision --user


class Run(object):
    """One provisioning run: the options, the shared deadline, the log and output,
    the filesystem root, and what the steps learn on the way (the IMDS document,
    the facts hooks and reports get, warnings)."""

    def __init__(self, options, log, out):
        self.options = options
        self.log = log
        self.out = out
        self.root = Root(options.root)
        # time kept back so that a failure can still be told to Azure before the deadline
        self.deadline = Deadline(options.timeout, reserve=min(60.0, options.timeout / 4.0))
        self.started = time.monotonic()
        self.metadata = None
        self.media = None           # OvfEnv, when the provisioning media was read
        self.media_problem = None   # why it could not be, when it was there
        self.user_created = None    # the admin user this run made
        self.user_creating = None   # the admin user this run began making with useradd
        self.user_claim_dropped = False  # useradd returned having made nothing: no claim stands
        self.host_keys = None       # what became of the SSH host keys, for the record
        self.host_keys_for = None   # the vmId, once this run made the keys on disk
        self.incarnation = None     # of the goal state the last report went to
        self.steps = []             # (step, seconds) in order
        self.facts = {}
        self.warnings = []

    def warn(self, warning):
        """Logged now, and in the KVP report at the end."""
        self.log.warning(warning)
        self.warnings.append(warning)

    def carry_out(self, *actions, **how):
        """The one place --dry-run is decided: print what each action would do, or do
        it (saying so first with announce=True).  Returns what the actions returned
        (None for each, in a dry run)."""
        # one line each: a name in it (an image's file) may hold a line break
        if self.options.dry_run:
            for action in actions:
                self.out.write('would %s\n' % printable(action.says))
            return [None] * len(actions)
        done = []
        for action in actions:
            if how.get('announce'):
                self.out.write('%s\n' % printable(action.says))
            done.append(action.do())
        return done


def step_imds(run):
    t = time.monotonic()
    run.metadata = fetch_instance_metadata(run.options.imds, run.deadline, run.log)
    run.facts['AZURE_VM_ID'] = compute_field(run.metadata, 'vmId')
    run.log.info('IMDS: vm %s, computerName %s (%s)' % (
        run.facts['AZURE_VM_ID'] or '?', desired_hostname(run.metadata) or '-', elapsed_ms(t)))


def step_media(run):
    run.media = find_media(run)
    media, wants_user = run.media, run.options.provision_user
    imds_user = compute_field(run.metadata, 'osProfile', 'adminUsername')
    if media is None:
        # IMDS says the VM was created with a password: without it, nobody can log in
        if wants_user and compute_field(run.metadata, 'osProfile',
                                        'disablePasswordAuthentication') == 'false':
            raise ProvisioningError(
                'the VM was created with a password (IMDS disablePasswordAuthentication is '
                'false), but %s' % (run.media_problem or 'no provisioning media was found'))
        return
    if wants_user and media.username and imds_user and media.username != imds_user:
        raise ProvisioningError('the provisioning media names the admin user %s, IMDS %s'
                                % (media.username, imds_user))
    if media.password and not wants_user:
        warning = ('the provisioning media holds a password for %s; not set: this image '
                   'does not manage users (no --provision-user)' % (media.username or '?'))
        run.warn(warning)


def step_hostname(run):
    if run.options.set_hostname:
        hostname_step(run)
    else:
        run.log.info('hostname: left alone (--no-hostname)')
    run.facts['AZURE_HOSTNAME'] = socket.gethostname()


def step_user(run):
    if not run.options.provision_user:
        run.facts['AZURE_ADMIN_USERNAME'] = compute_field(run.metadata, 'osProfile',
                                                          'adminUsername')
        return
    t = time.monotonic()
    request = user_with_media(user_from_metadata(run.metadata), run.media)
    run.carry_out(*user_plan(run, request))
    run.facts['AZURE_ADMIN_USERNAME'] = request.name
    run.log.info('user: %s ready (%s)' % (request.name, elapsed_ms(t)))


def step_identity(run):
    run.carry_out(*host_keys_plan(run))


def step_data(run):
    run.carry_out(*data_plan(run))


def step_hooks(run):
    hooks = list_hooks(run.root.path(HOOKS_DIR), run.log)
    if hooks:
        run.carry_out(Action('run hooks: %s' % ' '.join(hooks), lambda: run_hooks(run, hooks)))


# In order; the first that fails is named in the report (step=...), and no later one runs.
STEPS = (('imds', step_imds), ('media', step_media), ('hostname', step_hostname),
         ('user', step_user), ('identity', step_identity), ('data', step_data),
         ('hooks', step_hooks))


def provision(options, log, out=None):
    """Run every step, then report Ready; returns the exit code (0 or 1)."""
    run = Run(options, log, out or sys.stdout)
    for step, do in STEPS:
        t = time.monotonic()
        try:
            do(run)
        except Exception as exc:    # whatever the type: Azure must hear why, not time out
            run.steps.append((step, time.monotonic() - t))
            return report_failure(run, step, failure_reason(exc, step))
        run.steps.append((step, time.monotonic() - t))
    t = time.monotonic()
    try:
        goal_state = send_health(run, 'Ready')
    except Exception as exc:
        reason = 'could not report Ready: %s' % failure_reason(exc, 'ready')
        run.log.error(reason)
        report_to_kvp(run, report_description('error', run.facts, 'ready', reason))
        write_state(run, 'failed', 'ready', reason)
        return 1
    run.steps.append(('ready', time.monotonic() - t))
    run.incarnation = goal_state.incarnation
    write_state(run, 'provisioned')     # only now: Ready was accepted (waagent #1511)
    report_to_kvp(run, report_description('success', run.facts, warnings=run.warnings))
    if options.dry_run:
        log.info('dry run: nothing changed, nothing posted (%s)' % elapsed_ms(run.started))
    else:
        log.info('Ready accepted for incarnation %s (%s; %s since start)'
                 % (goal_state.incarnation, elapsed_ms(t), elapsed_ms(run.started)))
    return 0


def send_health(run, state, substatus=None, description=None):
    """Post a health report for the current goal state (printed in a dry run)."""
    deadline = run.deadline.without_reserve()
    goal_state = fetch_goal_state(run.options.wireserver, deadline, run.log)
    report = build_health_report(goal_state, state, substatus, description)
    posted, = run.carry_out(Action(
        'POST to http://%s/machine?comp=health:\n%s' % (host_header(run.options.wireserver),
                                                        report.rstrip('\n')),
        lambda: report_health(run.options.wireserver, deadline, run.log, state, substatus,
                              description, goal_state)))
    return posted or goal_state


def failure_reason(exc, step):
    """One line for the report: a ProvisioningError says it all; anything else is
    named with its step and type (e.g. a read-only /etc, or a bug)."""
    if isinstance(exc, ProvisioningError):
        return str(exc)
    if isinstance(exc, OSError):
        return '%s: %s' % (step, describe_error(exc))
    return '%s: unexpected %s: %s' % (step, exc.__class__.__name__,
                                      one_line(str(exc), 200) or 'no message')


def report_failure(run, step, reason):
    run.log.error(reason)
    description = report_description('error', run.facts, step, reason)
    # KVP first: it needs no network, so the host learns the reason even when the
    # WireServer is what failed.  Its lock wait stops short of the reserve, which
    # this report has to itself.
    report_to_kvp(run, description)
    try:
        goal_state = send_health(run, 'NotReady', 'ProvisioningFailed', description)
        run.incarnation = goal_state.incarnation
    except Exception as exc:
        run.log.error('could not report the failure to Azure: %s'
                      % failure_reason(exc, 'report'))
        write_state(run, 'failed', step, reason)
        return 1
    write_state(run, 'failed', step, reason)
    if not run.options.dry_run:
        run.log.info('reported ProvisioningFailed for incarnation %s; the unit stays enabled'
                     % goal_state.incarnation)
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


def deprovision_plan(run, remove_user):
    """Everything that makes this disk one VM rather than an image, to undo: what
    `waagent -deprovision+user` and `cloud-init clean --machine-id` do for theirs.
    Decided before anything is removed: a target that cannot be removed (a directory
    where a file should be, a FIFO for the machine id) stops it here, so that what
    --dry-run lists is what the run does."""
    import stat
    root = run.root
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
        plan += user_removal_plan(run, state, problems)
    # last: an action that fails stops the run before it, and the record left says
    # which admin user a second run still has to remove (userdel fails while it is
    # logged in, the usual case over its own SSH session)
    plan += removal(root, STATE_FILE, 'this VM\'s provisioning record', problems)
    if problems:
        raise ProvisioningError('%s; nothing removed' % '; '.join(problems))
    if not remove_user:
        user_staying(run, state)
    return plan


def removal(root, path, why, problems):
    """[the action that removes the file or link `path`], or [] when there is none.
    A directory there is added to `problems`.  The action removes what is at `path`
    then, in the directory it finds then, inside the root (Root.remove)."""
    import stat
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
    import stat
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
        writable = root.at(existing, lambda fd, name: os.access(name, os.W_OK, dir_fd=fd))
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
    import stat
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
    import errno
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


def passwd_uids(root):
    """{user name: its uid field, as text} of the root's /etc/passwd."""
    return dict((fields[0], fields[2]) for fields in (
        line.split(':') for line in (root.read_text('/etc/passwd') or '').splitlines())
        if len(fields) > 2)


def user_staying(run, state):
    """Plain --deprovision removes the record, the only place that says which admin
    user we made: keeping it in the image is the user's choice, made now or never,
    so they are told while --user can still remove it."""
    name = state.get('admin_user_created')
    if isinstance(name, str) and USER_NAME.fullmatch(name) and name in passwd_uids(run.root):
        run.log.warning('deprovision: the admin user %s (made by azure-provisioning) stays in '
                        'the image, with its home, keys and sudo rule: --deprovision --user '
                        'removes it, but not after this run, which removes the record '
                        'naming it'
                        % name)


def user_removal_plan(run, state, problems):
    """The admin user --provision-user made (the record says which), with its home,
    and its sudo rule: what waagent's -deprovision+user does."""
    name = state.get('admin_user_created')
    if not name:
        run.log.info('deprovision: no admin user made by azure-provisioning on record; '
                     'no user removed')
        return []
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise ProvisioningError('the record names the admin user %s, not a user name'
                                % printable(repr(name))[:80])
    uids = passwd_uids(run.root)
    uid = uids.get(name)
    if uid is not None:
        why = (not_a_person(int(uid), run.root) if re.fullmatch(r'[0-9]{1,10}', uid)
               else 'not a number')
        if why:
            raise ProvisioningError('the record names %s, a system account (uid %s); '
                                    'refused: %s' % (name, printable(uid)[:20], why))
    plan = []
    home = os.path.join('/home', name)      # useradd -m's, as user_plan made it
    found = run.root.lstat(home)
    if uid is None and found is not None and str(found.st_uid) not in uids.values():
        # userdel -r removed the account and failed at the home (exit 12: an immutable
        # file, a mount point): no run of userdel can remove it now, and it is the user's
        # (a home of a user still in /etc/passwd is that user's: provisioning refuses
        # to make the admin user in a home that is there already)
        problems.append('the admin user %s is gone, but its home %s is still there (userdel '
                        '-r could not remove it): remove it yourself, then run this again'
                        % (name, home))
    # userdel rewrites /etc/passwd and its siblings (lock files beside them)
    if uid is not None and changeable(run.root, '/etc/passwd', problems):
        argv = [find_tool('userdel') or 'userdel', '-r', name]
        if not run.root.is_machine():
            argv[1:1] = ['--root', run.root.top]
        plan.append(Action('remove the admin user %s and its home (userdel -r)' % name,
                           lambda: run_tool(argv, run.deadline, 'deprovision')))
    return plan + removal(run.root, SUDOERS_DROP_IN, 'its sudo rule', problems)


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
    run = Run(options, log, out)
    try:
        plan = deprovision_plan(run, options.remove_user)
        run.carry_out(*plan, announce=True)
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

    def path(self, *parts):
        return self.root.path(*parts)

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
            return None

    def exists(self, *parts):
        return self.root.exists(*parts)

    def say(self, status, text, fix=None):
        self.results.append((status, text, fix))

    def enabled_units(self):
        """Unit names with a symlink in some *.wants directory of /etc/systemd/system
        (read once: every check asks)."""
        if self._enabled is None:
            self._enabled = set()
            base = 'etc/systemd/system'
            for wants in self.root.names(base, r'.*\.(wants|requires)$'):
                self._enabled.update(self.root.names(base + '/' + wants, r'.'))
        return self._enabled

    def resolve(self, path):
        """`path` inside the image, its links resolved inside the image."""
        return self.root.resolve(path)

    def shown_path(self, path):
        """`path` of the image as one shell word of a fix, where the reader finds it:
        its directories' links resolved inside the image (an image's absolute link
        means the image's own directory, not this machine's), the last component
        itself not followed (rm -rf removes a link, not what it points to)."""
        inside = os.path.join(self.resolve(os.path.dirname('/' + path.strip('/'))),
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
            c.say('FAIL', 'ExecStart %s %s does not exist' % (what, path),
                  'sh install.sh%s --python PATH' % c.root_flag)
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
    real = c.resolve(python)
    if c.root.is_machine() and os.path.realpath(real) == os.path.realpath(sys.executable):
        missing = []
        for name in NEEDED_MODULES:
            try:
                __import__(name)
            except ImportError as exc:
                missing.append('%s (%s)' % (name, exc))
        version = 'Python %d.%d' % sys.version_info[:2]
        if missing:
            c.say('FAIL', 'python: %s (%s) has no %s' % (python, version, and_list(missing)),
                  FULL_PYTHON)
        else:
            c.say('ok', 'python: %s is %s with %s (checked by running it)'
                  % (python, version, and_list(NEEDED_MODULES)))
        return
    version, libraries, how = python_from_files(c, real)
    if version is None:
        c.say('FAIL', 'python: %s: %s' % (python, how),
              'sh install.sh%s --python /usr/bin/python3.X (the versioned name)' % c.root_flag)
        return
    if version < (3, 6):
        c.say('FAIL', 'python: %s is Python %d.%d (%s); 3.6 or newer is needed'
              % ((python,) + version + (how,)), 'sh install.sh%s --python PATH' % c.root_flag)
        return
    if not libraries:
        c.say('FAIL', 'python: %s: no standard library at %s/lib/python%d.%d or lib64'
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
        c.say('FAIL', 'python: %s (Python %d.%d) has no %s: not in %s'
              % ((python,) + version + (and_list(missing), and_list(libraries))), FULL_PYTHON)
    elif not os.access(c.path(real), os.X_OK):
        c.say('FAIL', 'python: %s is not executable' % real)
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


def check_media(c):
    """Can the image read the provisioning media (the password, the custom data)?
    Azure formats it UDF: without the udf module, only key-only VMs without custom
    data provision."""
    kernels = sorted(set(k for d in ('lib/modules', 'usr/lib/modules')
                         for k in c.root.names(d, r'\d')))
    if not kernels:
        c.say('warn', 'media: no kernel in /lib/modules: cannot tell whether the kernel '
                      'mounts UDF (the provisioning media: passwords, custom data)')
    for kernel in kernels:
        base = next('/%s/%s' % (d, kernel) for d in ('lib/modules', 'usr/lib/modules')
                    if c.root.is_dir(d, kernel))
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


def dhcp_configurations(c):
    """Where the image asks for DHCP: (kind, file) pairs."""
    found = []
    enabled = c.enabled_units()
    networkd = 'systemd-networkd.service' in enabled
    seen = set()
    for directory in ('etc/systemd/network', 'usr/lib/systemd/network', 'lib/systemd/network'):
        if c.root.resolve(directory) in seen:
            continue    # /lib is /usr/lib on merged-/usr systems
        seen.add(c.root.resolve(directory))
        for name in sorted(c.root.names(directory, r'.*\.network$')):
            text = c.read(directory, name) or ''
            if ini_values(text, ('Match',), 'Virtualization') == ['container']:
                continue    # systemd's 80-container-*.network: never in a VM
            dhcp = ini_values(text, ('Network',), 'DHCP')
            if dhcp and dhcp[-1].lower() in ('yes', 'true', 'ipv4', 'both', '1'):
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
    """Print one line per check; returns 1 when anything blocks, else 0."""
    c = Check(Root(root), shown)
    python = c.run(check_unit)
    if python:
        c.run(check_python, python)
    for check in (check_agents, check_media, check_network, check_identity, check_hostname):
        c.run(check)
    for status, text, fix in c.results:     # texts quote the image's files: printable
        out.write('%-5s %s\n' % (status, printable(text)))
        if fix and status in ('FAIL', 'warn'):
            out.write('      fix: %s\n' % printable(fix))
    failed = sum(1 for r in c.results if r[0] == 'FAIL')
    warned = sum(1 for r in c.results if r[0] == 'warn')
    out.write(printable('%s: %d blocking, %d warnings (%s)' % (
        'image NOT ready' if failed else 'image ready', failed, warned, c.shown)) + '\n')
    return 1 if failed else 0


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


# One table for both parsers below; metavar None: a switch.
Option = namedtuple('Option', 'flag dest metavar convert default help')
OPTIONS = [Option(*fields) for fields in (
    ('--wireserver', 'wireserver', 'ADDR', parse_address, (DEFAULT_WIRESERVER, 80),
     'WireServer IP or IP:PORT (default %s)' % DEFAULT_WIRESERVER),
    ('--imds', 'imds', 'ADDR', parse_address, (DEFAULT_IMDS, 80),
     'IMDS IP or IP:PORT (default %s)' % DEFAULT_IMDS),
    ('--timeout', 'timeout', 'SECONDS', positive_seconds, DEFAULT_TIMEOUT,
     'overall deadline for all steps, including the failure report (default %d)'
     % DEFAULT_TIMEOUT),
    ('--no-hostname', 'no_hostname', None, None, False, 'do not change the hostname'),
    ('--no-publish-hostname', 'no_publish_hostname', None, None, False,
     'do not make the DHCP client send the new hostname (which is how Azure DNS learns it)'),
    ('--provision-user', 'provision_user', None, None, False,
     'create the admin user from IMDS, give it sudo and install its SSH keys'),
    ('--keep-ssh-host-keys', 'keep_host_keys', None, None, False,
     'keep the SSH host keys the image has (default: new ones when this VM did not make '
     'them: its first boot, an image captured again)'),
    ('--check', 'check', None, None, False,
     'check the image before generalizing it (unit enabled, no other agent, DHCP '
     'configured, ...); read-only and offline'),
    ('--deprovision', 'deprovision', None, None, False,
     'make this VM an image again before capturing it: remove the SSH host keys, the '
     'machine id, DHCP leases, the KVP pool and our record; enable the unit again'),
    ('--user', 'remove_user', None, None, False,
     'with --deprovision: also remove the admin user --provision-user made'),
    ('--status', 'status', None, None, False,
     'say whether and how this VM was provisioned (read-only, offline); exit 1 if not'),
    ('--json', 'json', None, None, False, 'with --status: print the record itself'),
    ('--root', 'root', 'DIR', absolute_directory, '/',
     'with --check, --deprovision or --status: the mounted image tree (default /)'),
    ('--shown-root', 'shown_root', 'DIR', str, None, None),  # install.sh: see check_image
    ('--media', 'media', 'DEVICE', str, None,
     'read the provisioning media (ovf-env.xml) from DEVICE, a device or an image file, '
     'instead of looking for it; "none": do not look'),
    ('--dry-run', 'dry_run', None, None, False,
     'fetch everything, print the hostname and the health report it would send; change '
     'nothing, post nothing'),
    ('--verbose', 'verbose', None, None, False, 'log every HTTP exchange'),
)]
SHORT_FLAGS = {'-v': '--verbose'}


class Namespace(object):
    pass


def parse_args(args):
    """The unit's plain command lines are parsed here; --help, --version and every
    mistake go to argparse, which says it well but costs milliseconds to import."""
    table = dict((option.flag, option) for option in OPTIONS)
    options = Namespace()
    for option in OPTIONS:
        setattr(options, option.dest, option.default)
    pending = list(args)
    while pending:
        flag, equals, value = SHORT_FLAGS.get(pending[0], pending[0]).partition('=')
        option = table.get(flag)
        if option is None or (equals and not option.metavar) or (
                option.metavar and not equals and len(pending) < 2):
            return build_parser().parse_args(args)
        pending.pop(0)
        if not option.metavar:
            setattr(options, option.dest, True)
            continue
        text = value if equals else pending.pop(0)
        try:
            setattr(options, option.dest, option.convert(text))
        except ValueError:
            return build_parser().parse_args(args)
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
               'when possible), 2 usage error.')
    for option in OPTIONS:
        flags = [short for short, flag in SHORT_FLAGS.items() if flag == option.flag]
        flags.append(option.flag)
        if option.metavar:
            parser.add_argument(*flags, dest=option.dest, metavar=option.metavar,
                                type=checked(option.convert), default=option.default,
                                help=option.help or argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=option.dest, action='store_true', help=option.help)
    parser.add_argument('--version', action='version', version='%(prog)s ' + VERSION)
    parser.error = usage_error
    return parser


def usage_error(message):
    """One line and exit 2, as for every other mistake (argparse would add its usage)."""
    sys.stderr.write('azure-provisioning: error: %s (see --help)\n' % printable(message))
    sys.exit(2)


# What only a provisioning run uses, and the modes that do something else.
PROVISIONING_ONLY = ('wireserver', 'imds', 'timeout', 'no_hostname', 'no_publish_hostname',
                     'provision_user', 'media', 'keep_host_keys', 'verbose')
MODES = (('--check', 'check'), ('--deprovision', 'deprovision'), ('--status', 'status'))


def check_usage(options):
    modes = [flag for flag, dest in MODES if getattr(options, dest)]
    if len(modes) > 1:
        usage_error('%s and %s do not go together' % tuple(modes[:2]))
    mode = modes[0] if modes else None
    defaults = dict((option.dest, option.default) for option in OPTIONS)
    if mode:
        wrong = [option.flag for option in OPTIONS if option.dest in PROVISIONING_ONLY
                 and getattr(options, option.dest) != defaults[option.dest]]
        if options.dry_run and mode != '--deprovision':
            wrong.append('--dry-run')
        if wrong:
            usage_error('%s does not go with %s' % (wrong[0], mode))
    elif options.root != '/':
        usage_error('--root goes with --check, --deprovision or --status')
    if options.remove_user and mode != '--deprovision':
        usage_error('--user goes with --deprovision')
    if options.json and mode != '--status':
        usage_error('--json goes with --status')
    if options.shown_root and mode != '--check':
        usage_error('--shown-root goes with --check')
    if options.root != '/' and not os.path.isdir(options.root):
        usage_error('--root %s: not a directory' % options.root)


def main(args=None):
    options = parse_args(sys.argv[1:] if args is None else args)
    check_usage(options)
    import signal
    signal.signal(signal.SIGTERM, raise_terminated)
    log = Log(options.verbose)
    out = Output(sys.stdout)
    run = Options(wireserver=options.wireserver, imds=options.imds, timeout=options.timeout,
                  set_hostname=not options.no_hostname,
                  publish_hostname=not options.no_publish_hostname,
                  provision_user=options.provision_user, dry_run=options.dry_run,
                  root=options.root, media=options.media,
                  keep_host_keys=options.keep_host_keys, remove_user=options.remove_user)
    try:
        if options.check:
            return check_image(options.root, out, options.shown_root)
        if options.status:
            return status(options, out)
        if options.deprovision:
            return deprovision(run, log, out)
        return provision(run, log, out)
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
        return 1


if __name__ == '__main__':
    sys.exit(main())
