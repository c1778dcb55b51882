"""Shared helpers for the tests: run the provisioner as a process, on a temporary
root (TemporaryRoot, no root needed), or as root inside a private UTS + mount
namespace with a private copy of /etc (PrivateHost)."""

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'azure_provisioning.py')
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
PROCESS_TIMEOUT = 60    # no single run of the script in the tests may take longer

# A proxy that is never listening: the provisioner must not use it.
DEAD_PROXY_ENV = {'http_proxy': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9',
                  'no_proxy': '', 'NO_PROXY': ''}


class Run(object):
    def __init__(self, code, stdout, stderr, seconds):
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds

    def __repr__(self):
        return 'exit %s after %.2f s\n--- stdout\n%s--- stderr\n%s' % (
            self.code, self.seconds, self.stdout, self.stderr)


# On an Azure or Hyper-V machine the host READS this pool: no test may add to it.
HYPERV_DIR = '/var/lib/hyperv'
UNSHARE = shutil.which('unshare') or '/usr/bin/unshare'
MOUNT = shutil.which('mount') or '/bin/mount'
SH = '/bin/sh'

# As root: an empty tmpfs over /var/lib (where the provisioner keeps its record and
# the KVP pool lives), or the directory $1 when given, and /etc made read-only, in a
# mount namespace of the process's own.  /var/lib always exists, so nothing is created
# on the machine to mount on.  ($0 is mount(8): some tests run commands with a PATH of
# their own.)
VAR_LIB = ('if [ -n "$1" ]; then "$0" --bind "$1" /var/lib; '
           'else "$0" -t tmpfs -o mode=0755 azp-test-var-lib /var/lib; fi')
ROOT_SHIELD = VAR_LIB + ' && "$0" -o bind,ro /etc /etc && shift && exec "$@"'
# An ordinary user: the same from a user namespace where the user is root, then a
# second one where it is itself again (uid and gid), mounts kept: the process behaves
# as this user.  /etc is not the user's to write anyway.
USER_SHIELD = VAR_LIB + (' && unshare="$2" user="$3" group="$4" && shift 4 && exec "$unshare" '
                         '--user --map-user="$user" --map-group="$group" -- "$@"')


def private_var_lib(command, directory=None):
    """command with a private /var/lib: an empty tmpfs, or `directory` bound over it
    (and, as root, a read-only /etc); None when this user cannot have one (no user
    namespaces)."""
    if is_root():
        return [UNSHARE, '--mount', '--propagation', 'private', SH, '-c', ROOT_SHIELD,
                MOUNT, directory or ''] + list(command)
    if not user_namespaces():
        return None
    return user_shield(command, directory)


def user_shield(command, directory=None):
    return ([UNSHARE, '--user', '--map-root-user', '--mount', SH, '-c', USER_SHIELD, MOUNT,
             directory or '', UNSHARE, str(os.getuid()), str(os.getgid())] + list(command))


def shielded(command):
    """command, run where the machine's /var/lib cannot be written (a private, empty
    one) and, as root, /etc is read-only.  Every process a test starts goes through
    here (tests/test_machine_untouched.py proves it).  For an ordinary user this
    needs user namespaces; without them the machine's /var/lib is left to its
    permissions, and a writable KVP pool or record directory is an error."""
    wrapped = private_var_lib(command)
    if wrapped is not None:
        return wrapped
    for directory in (HYPERV_DIR, '/var/lib/azure-provisioning', '/var/lib'):
        if os.path.isdir(directory) and os.access(directory, os.W_OK):
            raise AssertionError('%s is writable and user namespaces are not available to '
                                 'hide it: run the tests as root' % directory)
    return list(command)


_USER_NAMESPACES = []


def user_namespaces():
    """Whether this user can make the namespaces of USER_SHIELD (asked once)."""
    if not _USER_NAMESPACES:
        try:
            probe = subprocess.run(user_shield(['true']), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=PROCESS_TIMEOUT)
            _USER_NAMESPACES.append(probe.returncode == 0)
        except (OSError, subprocess.TimeoutExpired):
            _USER_NAMESPACES.append(False)
    return _USER_NAMESPACES[0]


def run_command(command, env=None, timeout=PROCESS_TIMEOUT):
    started = time.monotonic()
    # a session of its own: at the time limit all of it goes (a namespace wrapper's
    # children too, which would otherwise keep our pipes open)
    process = subprocess.Popen(shielded(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, stderr = process.communicate()
        raise AssertionError('%s did not finish in %d s\n%s\n%s'
                             % (command, timeout, stdout, stderr))
    return Run(process.returncode, stdout, stderr, time.monotonic() - started)


def run_provisioner(az, *args, **kwargs):
    """Run the script as `python3 -I -S` (as the unit does) against the emulator `az`."""
    env = dict(os.environ)
    env.update(kwargs.pop('env', {}))
    command = [sys.executable, '-I', '-S', SCRIPT]
    if az is not None:
        # outside PrivateHost a run must not rename this machine
        if '--no-hostname' not in args and '--dry-run' not in args:
            raise AssertionError('run_provisioner without --no-hostname: use PrivateHost')
        command += ['--wireserver', az.wireserver_addr, '--imds', az.imds_addr]
    return run_command(command + list(args), env=env, **kwargs)


def root_with_kvp_pool(test, prefix):
    """(a temporary root holding var/lib/hyperv/, its pool file's path), removed after
    the test: runs with Options(root=...) report there, never to the machine's pool."""
    root = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, root)
    os.makedirs(os.path.join(root, 'var/lib/hyperv'))
    return root, os.path.join(root, 'var/lib/hyperv/.kvp_pool_1')


def is_root():
    return os.geteuid() == 0


class PrivateHost(object):
    """A private copy of /etc, empty private /home, /root and /var/lib, and a private
    hostname, for root tests.  They lie in `dir` as in a root (etc, home, root,
    var/lib): what a run left there is a tree for --deprovision --root.

    `run(argv)` runs argv inside `unshare --uts --mount` after bind-mounting the
    copies over /etc, /home, /root and /var/lib and setting the namespace's hostname
    to `hostname`; it then prints the hostname the namespace ended with.  The real
    /etc, /home, /root, /var/lib and hostname are never touched."""

    MARK = '@@hostname-after='

    def __init__(self, hostname='image-template', hosts=None):
        self.dir = tempfile.mkdtemp(prefix='azp-etc-')
        self.etc = os.path.join(self.dir, 'etc')
        shutil.copytree('/etc', self.etc, symlinks=True)
        self.home = os.path.join(self.dir, 'home')
        self.root_home = os.path.join(self.dir, 'root')
        os.mkdir(self.home)
        os.mkdir(self.root_home, 0o700)
        self.var_lib = os.path.join(self.dir, 'var', 'lib')
        os.makedirs(self.var_lib)
        # pyenv's interpreters live under /root: keep the running one visible
        self.keep = ''
        if sys.base_prefix.startswith('/root/'):
            self.keep = sys.base_prefix
            os.makedirs(self.root_home + self.keep[len('/root'):])
        self.hostname = hostname
        self.write('hostname', hostname + '\n')
        self.write('hosts', hosts if hosts is not None else
                   '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n\n'
                   '# The following lines are desirable for IPv6 capable hosts\n'
                   '::1     localhost ip6-localhost ip6-loopback\n' % hostname)

    def write(self, name, text):
        with open(os.path.join(self.etc, name), 'w') as f:
            f.write(text)

    def read(self, name):
        with open(os.path.join(self.etc, name)) as f:
            return f.read()

    def run(self, argv, timeout=PROCESS_TIMEOUT, env=None):
        # /var/lib: a private directory (the script keeps its record, custom and user
        # data there; the machine's own, and its KVP pool, stay out of reach)
        wrapper = ('set -e; mount --bind "$1" /etc; mount --bind "$2" /home; '
                   'mount --bind "$6" /var/lib; '
                   'if [ -n "$5" ]; then mount --bind "$5" "$3${5#/root}"; fi; '
                   'mount --rbind "$3" /root; hostname "$4"; shift 6; '
                   'set +e; ' + HOSTNAME_AFTER % self.MARK)
        return with_hostname_after(run_command(
            ['unshare', '--uts', '--mount', 'sh', '-c', wrapper, 'sh', self.etc, self.home,
             self.root_home, self.hostname, self.keep, self.var_lib] + list(argv),
            env=env, timeout=timeout))

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# The script's main() (its options, exit codes, log lines and output), its provisioning
# run given the temporary root $2 (Options.root: what the run reads, writes and runs
# the account tools on).  $1 is this clone (the interpreter runs -I -S, as the unit).
IN_ROOT = ('import sys; sys.path.insert(0, sys.argv.pop(1)); import azure_provisioning as ap\n'
           'root, provision = sys.argv.pop(1), ap.provision\n'
           'def provision_in_root(options, log, out=None):\n'
           '    options.root = root\n'
           '    return provision(options, log, out)\n'
           'ap.provision = provision_in_root\n'
           'sys.exit(ap.main())\n')
# argv, then the hostname it ended with on a line of its own (MARK); as root in a UTS
# namespace of its own, named $1 first: a run on a temporary root never renames this
# machine (an ordinary user's cannot: sethostname(2) needs root)
HOSTNAME_AFTER = '"$@"; code=$?; echo "%s$(hostname)"; exit $code'


def run_in_root(root, options, hostname=None, env=None, timeout=PROCESS_TIMEOUT):
    """The script's provisioning run on the tree `root` with these options, as a
    process (run_command: a private /var/lib); run.hostname_after is the hostname it
    ended with.  As root it runs in a UTS namespace of its own named `hostname`
    (this machine's when None); otherwise as this user, on this machine's name."""
    command = [sys.executable, '-I', '-S', '-c', IN_ROOT, REPO, root] + list(options)
    script = HOSTNAME_AFTER % PrivateHost.MARK
    if is_root():
        command = [UNSHARE, '--uts', SH, '-c', 'hostname "$0" && ' + script,
                   hostname or socket.gethostname()] + command
    else:
        command = [SH, '-c', script, SH] + command
    return with_hostname_after(run_command(command, env=env, timeout=timeout))


def with_hostname_after(run):
    """`run` with run.hostname_after taken from its last line (HOSTNAME_AFTER's),
    which leaves its stdout."""
    lines = run.stdout.splitlines()
    run.hostname_after = None
    if lines and lines[-1].startswith(PrivateHost.MARK):
        run.hostname_after = lines[-1][len(PrivateHost.MARK):]
        run.stdout = '\n'.join(lines[:-1]) + ('\n' if len(lines) > 1 else '')
    return run


class TemporaryRoot(object):
    """A temporary tree that is the root of whole provisioning runs (run_in_root): no
    root needed.  Its /etc holds root, daemon and nobody (passwd, shadow, group,
    gshadow, login.defs), the hostname and /etc/hosts; /home, /root, /run and /var/lib
    are empty.  The run starts with the hostname `hostname` as root (a UTS namespace
    of its own); an ordinary user's starts with this machine's, which it cannot
    change: `self.hostname` is the one it starts with, and the tree's /etc/hostname
    says it too.  Paths as in PrivateHost: dir, etc, home, root_home, var_lib."""

    ACCOUNTS = (('root', 0, '/root', '/bin/sh'), ('daemon', 1, '/usr/sbin', '/usr/sbin/nologin'),
                ('nobody', 65534, '/nonexistent', '/usr/sbin/nologin'))

    def __init__(self, hostname='web-7'):
        import azure_provisioning as ap
        self.hostname = hostname if is_root() else socket.gethostname()
        try:
            ap.validate_hostname(self.hostname)
        except ap.ProvisioningError as exc:
            raise unittest.SkipTest('an ordinary user\'s run keeps this machine\'s hostname, '
                                    'and it is not valid: %s' % exc)
        self.dir = tempfile.mkdtemp(prefix='azp-root-')
        os.chmod(self.dir, 0o755)
        self.etc = os.path.join(self.dir, 'etc')
        self.home = os.path.join(self.dir, 'home')
        self.root_home = os.path.join(self.dir, 'root')
        self.var_lib = os.path.join(self.dir, 'var', 'lib')
        for directory in (self.etc, self.home, self.var_lib, os.path.join(self.dir, 'run')):
            os.makedirs(directory)
        os.mkdir(self.root_home, 0o700)
        for name, uid, home, shell in self.ACCOUNTS:
            self.add_account(name, uid, '*', home, shell)
        self.write('login.defs', 'UID_MIN 1000\nUID_MAX 60000\n')
        self.write('hostname', self.hostname + '\n')
        self.write('hosts', '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' % self.hostname)

    def write(self, name, text):
        path = os.path.join(self.etc, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(text)

    def read(self, name):
        with open(os.path.join(self.etc, name)) as f:
            return f.read()

    def append(self, name, line):
        path = os.path.join(self.etc, name)
        text = self.read(name) if os.path.exists(path) else ''
        self.write(name, text + ('' if text.endswith('\n') or not text else '\n') + line + '\n')

    def add_account(self, name, uid, password, home=None, shell='/bin/sh'):
        """`name` in the four account files (uid and gid `uid`), as an image holds it;
        a home under /home is made (owned by `uid` where this user may give it)."""
        home = home or '/home/' + name
        for file, line in [('passwd', '%s:x:%d:%d::%s:%s' % (name, uid, uid, home, shell)),
                           ('group', '%s:x:%d:' % (name, uid)),
                           ('shadow', '%s:%s:19000:0:99999:7:::' % (name, password)),
                           ('gshadow', '%s:!::' % name)]:
            self.append(file, line)
        if home.startswith('/home/'):
            path = os.path.join(self.dir, home.lstrip('/'))
            os.mkdir(path, 0o755)
            if is_root():
                os.chown(path, uid, uid)
            return path
        return None

    def run(self, *options, **how):
        """run_in_root of this tree (env=, timeout= as run_command takes them)."""
        return run_in_root(self.dir, options, self.hostname, **how)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def skip(test, reason):
    """Skip with the reason printed, also when unittest runs without -v."""
    sys.stderr.write('\nSKIP %s: %s\n' % (test.id(), reason))
    raise unittest.SkipTest(reason)


def require_root(test):
    if not is_root():
        skip(test, 'needs root for unshare --uts --mount (run the suite as root to check it)')


def in_root(root, log=None, timeout=30, **options):
    """(System of the tree `root`, the Facts a run there starts from): what a step's
    planner is given, with the options asked (Options(root=root, ...))."""
    import azure_provisioning as ap
    from tests.test_transport import QuietLog
    options = ap.Options(root=root, timeout=timeout, **options)
    return (ap.System(root, ap.Deadline(timeout), log or QuietLog()),
            ap.first_facts(options))


def one_step(planner, system, facts, out=None):
    """One step as the executor takes it: its plan, then its actions carried out
    (printed in a dry run, to `out`); (the facts after it, the plan)."""
    import io
    import azure_provisioning as ap
    facts, actions = planner(facts, system)
    return ap.perform_all(actions, facts, system, out or io.StringIO()), actions


def tree_snapshot(root):
    """Everything in the tree: path -> ('link', target), ('dir', mode, uid, gid) or
    ('file', mode, uid, gid, sha256 of the bytes); equal snapshots: nothing changed."""
    entries = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                entry = ('link', os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entry = ('dir', stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            else:
                with open(path, 'rb') as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                entry = ('file', stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, digest)
            entries[os.path.relpath(path, root)] = entry
    return entries
