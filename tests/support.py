"""Shared helpers for the tests: run the provisioner as a process, and run it
inside a private UTS + mount namespace with a private copy of /etc."""

import os
import shutil
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


def shielded(command):
    """command, run where the machine's KVP pool cannot be written: with
    /var/lib/hyperv present, inside `unshare --mount` with an empty tmpfs over it.
    Every process a test starts goes through here (tests/test_machine_untouched.py
    proves it)."""
    if not os.path.isdir(HYPERV_DIR):
        return list(command)
    if not is_root():
        if os.access(HYPERV_DIR, os.W_OK):
            raise AssertionError('%s is writable and only root can hide it: run the tests as '
                                 'root or as a user who cannot write it' % HYPERV_DIR)
        return list(command)
    # absolute paths: some tests run commands with a PATH of their own
    return [UNSHARE, '--mount', '/bin/sh', '-c', '"$0" -t tmpfs azp-test-kvp "$1" && shift '
            '&& exec "$@"', MOUNT, HYPERV_DIR] + list(command)


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
                   'set +e; "$@"; code=$?; echo "%s$(hostname)"; exit $code' % self.MARK)
        run = run_command(['unshare', '--uts', '--mount', 'sh', '-c', wrapper, 'sh', self.etc,
                           self.home, self.root_home, self.hostname, self.keep, self.var_lib]
                          + list(argv), env=env, timeout=timeout)
        lines = run.stdout.splitlines()
        run.hostname_after = None
        if lines and lines[-1].startswith(self.MARK):
            run.hostname_after = lines[-1][len(self.MARK):]
            run.stdout = '\n'.join(lines[:-1]) + ('\n' if len(lines) > 1 else '')
        return run

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def skip(test, reason):
    """Skip with the reason printed, also when unittest runs without -v."""
    sys.stderr.write('\nSKIP %s: %s\n' % (test.id(), reason))
    raise unittest.SkipTest(reason)


def require_root(test):
    if not is_root():
        skip(test, 'needs root for unshare --uts --mount (run the suite as root to check it)')
