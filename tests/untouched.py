#!/usr/bin/env python3
"""Prove that a run left directory trees as it found them: snapshot them before,
compare after.  Standard library only; Python 3.6+.

    python3 tests/untouched.py snapshot FILE [--exclude PATH ...] TREE ...
    python3 tests/untouched.py compare FILE

`snapshot` records every entry under each TREE (symbolic links are not followed;
a file system mounted under a TREE is walked too): its type, mode, owner, size,
modification time, a symbolic link's target and a SHA-256 of each regular file up
to HASH_MAX bytes.  `compare` walks the same trees
with the same exclusions again, prints every entry added, removed or changed (and
which of its fields), and exits 1 when there is any.  The exclusions are printed by
both: an excluded path and everything under it is not looked at.

.ci/run snapshots /var/lib and /etc after installing its packages and compares at
the end: no step may leave anything new, changed or missing there."""

import argparse
import hashlib
import json
import os
import stat
import sys

HASH_MAX = 1 << 20      # bytes: larger files are compared by size and time only
FIELDS = ('type', 'mode', 'uid', 'gid', 'size', 'mtime_ns', 'target', 'sha256')
TYPES = ((stat.S_ISREG, 'file'), (stat.S_ISDIR, 'dir'), (stat.S_ISLNK, 'symlink'),
         (stat.S_ISFIFO, 'fifo'), (stat.S_ISSOCK, 'socket'), (stat.S_ISCHR, 'char'),
         (stat.S_ISBLK, 'block'))

# What the operating system itself changes while a run goes on, whoever runs it:
# systemd's timer stamps and clock file, logrotate's status, apt's daily stamps.
DEFAULT_EXCLUDES = ('/var/lib/systemd/timers', '/var/lib/systemd/timesync',
                    '/var/lib/private/systemd/timesync', '/var/lib/logrotate',
                    '/var/lib/apt/periodic')


def file_type(mode):
    for test, name in TYPES:
        if test(mode):
            return name
    return 'other'


def digest(path, size):
    """SHA-256 of a regular file, read without following a link and without blocking
    (the file may have been swapped for a FIFO since lstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return 'unreadable: %s' % (exc.strerror or exc)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 'not a regular file when read'
        sha = hashlib.sha256()
        left = size + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
        return sha.hexdigest()
    finally:
        os.close(fd)


def entry(path):
    st = os.lstat(path)
    kind = file_type(st.st_mode)
    record = {'type': kind, 'mode': '%04o' % stat.S_IMODE(st.st_mode), 'uid': st.st_uid,
              'gid': st.st_gid, 'mtime_ns': st.st_mtime_ns}
    if kind != 'dir':       # a directory's size says nothing its entries do not
        record['size'] = st.st_size
    if kind == 'symlink':
        record['target'] = os.readlink(path)
    elif kind == 'file' and st.st_size <= HASH_MAX:
        record['sha256'] = digest(path, st.st_size)
    return record


def excluded(path, excludes):
    return any(path == e or path.startswith(e.rstrip('/') + '/') for e in excludes)


def snapshot(trees, excludes=()):
    """{path: record} of every entry under the trees (the trees themselves included)."""
    found = {}
    for tree in trees:
        if excluded(tree, excludes):
            continue
        try:
            found[tree] = entry(tree)
        except FileNotFoundError:
            found[tree] = {'type': 'missing'}
            continue

        def unreadable(exc):
            found[exc.filename] = dict(found.get(exc.filename, {}),
                                       listing='unreadable: %s' % exc.strerror)

        for directory, dirs, files in os.walk(tree, onerror=unreadable):
            dirs[:] = [d for d in dirs if not excluded(os.path.join(directory, d), excludes)]
            for name in dirs + files:
                path = os.path.join(directory, name)
                if excluded(path, excludes):
                    continue
                try:
                    found[path] = entry(path)
                except FileNotFoundError:     # gone while we walked: absent
                    pass
    return found


def differences(before, after):
    """Lines saying what was added, removed or changed, sorted by path."""
    lines = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is None:
            lines.append('added    %s (%s)' % (path, new.get('type')))
        elif new is None:
            lines.append('removed  %s (%s)' % (path, old.get('type')))
        else:
            changed = ['%s %s -> %s' % (field, old.get(field), new.get(field))
                       for field in FIELDS + ('listing',) if old.get(field) != new.get(field)]
            lines.append('changed  %s: %s' % (path, '; '.join(changed)))
    return lines


def printable(path):
    return path.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command')
    take = commands.add_parser('snapshot', help='record the trees into FILE')
    take.add_argument('file')
    take.add_argument('trees', nargs='+')
    take.add_argument('--exclude', action='append', default=[], metavar='PATH',
                      help='also leave out PATH and what is under it (added to %s)'
                      % ', '.join(DEFAULT_EXCLUDES))
    take.add_argument('--no-default-excludes', action='store_true')
    check = commands.add_parser('compare', help='walk the trees of FILE again; exit 1 on '
                                                'any difference')
    check.add_argument('file')
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error('snapshot or compare?')

    if args.command == 'snapshot':
        trees = [os.path.abspath(t) for t in args.trees]
        excludes = [os.path.abspath(e) for e in
                    ([] if args.no_default_excludes else list(DEFAULT_EXCLUDES)) + args.exclude]
        taken = snapshot(trees, excludes)
        # 0600: it holds hashes of files only root may read (/etc/shadow)
        with os.fdopen(os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                       'w') as f:
            json.dump({'trees': trees, 'excludes': excludes,
                       'entries': dict((printable(p), r) for p, r in taken.items())}, f)
        print('untouched: %d entries under %s recorded; not looked at: %s'
              % (len(taken), ' '.join(trees), ', '.join(excludes) or 'nothing'))
        return 0

    with open(args.file) as f:
        before = json.load(f)
    after = snapshot(before['trees'], before['excludes'])
    lines = differences(before['entries'], dict((printable(p), r) for p, r in after.items()))
    print('untouched: %s compared with the snapshot (not looked at: %s)'
          % (' '.join(before['trees']), ', '.join(before['excludes']) or 'nothing'))
    for line in lines:
        print('  ' + line)
    print('untouched: %s' % ('%d differences' % len(lines) if lines else 'no difference'))
    return 1 if lines else 0


if __name__ == '__main__':
    sys.exit(main())
