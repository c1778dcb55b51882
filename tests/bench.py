#!/usr/bin/env python3
"""Benchmark: azure_provisioning.py against the article's sample, and its start-up budget.

    python3 tests/bench.py [--rounds N] [--latency-rounds K] [--python PATH] [--check-targets]

Everything runs against tests/fake_azure.py (in this process, on 127.0.0.1); nothing
leaves the machine.  Each round starts these fresh processes, in rotating order:

  (a) python3 -I -S azure_provisioning.py --wireserver W --imds I (our full run, with the
      interpreter flags of the unit's ExecStart=, read from azure-provisioning.service)
  (b) python3 -I tests/seed_sample.py W                          (the article's sample)
  (c) python3 -I -S -c pass          (the interpreter alone, started as the unit starts it)

As root, (a) is what the unit really runs: the real install.sh installs into a private
/usr/local (module byte-compiled with --python, launcher at /usr/local/sbin), and (a) is
`python3 -I -S /usr/local/sbin/azure-provisioning ...`, the unit's ExecStart=, inside
`unshare --uts --mount` with that /usr/local, a private copy of /etc and a private /var/lib
bind-mounted (the host's hostname, /etc, /usr/local and /var/lib stay as they are; the
record and the KVP reports go to the private /var/lib, emptied before each run: every
run is a first boot); it really sets the hostname.
(b) and (c) get the very same wrapper; for information (d) times the wrapper alone
(`true`) and (e) is (a) with --no-hostname in the wrapper, so the wrapper's and the hostname
step's costs are shown.  Not root: (a) runs with --no-hostname, and every run has a
private /var/lib (tests/support.py's user-namespace wrapper, when this user can make one).
The ratios and targets always compare (a), (b), (c) run the same way.  (c)'s flags and
interpreter are those of the ExecStart= that install.sh installed (as root), else of
azure-provisioning.service.

Printed: median/min/max wall time of each, the ratios a/b and a/c (median of the per-round
ratios; a/c is a figure, not a target), peak RSS (wait4 ru_maxrss), the Ready latency
(WireServer refusing connections until T s after start; time from "up" to the accepted
Ready POST, as the emulator saw it), where (a)'s time above the floor (c) goes (each
step's own time from the record of the runs, and the top imports by self time of (a)
run with -X importtime), and the targets with PASS/MISS.

Exit status: 0, or 1 when a run failed (no valid figures), or with --check-targets when a
target is missed; 2 on a usage error.  Standard library only; Python 3.6+.
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(REPO, 'azure_provisioning.py')
SEED = os.path.join(HERE, 'seed_sample.py')


def unit_flags():
    """The interpreter flags of the unit's ExecStart= (['-I', '-S']): (a) runs the
    script the way the unit does."""
    with open(os.path.join(REPO, 'azure-provisioning.service')) as f:
        for line in f:
            if line.startswith('ExecStart='):
                words = line.split('=', 1)[1].split()
                return [word for word in words[1:] if word.startswith('-')]
    raise SystemExit('bench: no ExecStart= in azure-provisioning.service')


UNIT_FLAGS = unit_flags()

if REPO not in sys.path:
    sys.path.insert(0, REPO)

TARGETS = (
    # key, label, limit, unit
    ('a/b', 'a/b (ours / article sample)', 1.10, ''),
    ('latency', 'Ready latency after WireServer up', 0.5, 's'),
    ('rss', 'peak RSS of (a)', 15.0, 'MB'),
)


class RunFailed(Exception):
    pass


# --------------------------------------------------------------------------
# One timed child process
# --------------------------------------------------------------------------

class Result(object):
    def __init__(self, argv, seconds, status, maxrss_kb, stdout, stderr, timed_out):
        self.argv = argv
        self.seconds = seconds
        self.status = status            # exit code, or -signal
        self.maxrss_mb = maxrss_kb / 1024.0
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    def describe(self):
        how = 'timed out' if self.timed_out else 'exit status %s' % self.status
        return '%s: %s\n  stdout: %s\n  stderr: %s' % (
            ' '.join(self.argv), how, self.stdout.strip()[-600:], self.stderr.strip()[-600:])


# The children are started by a small launcher process, not by this one: a child's
# ru_maxrss also counts the memory of the process it was forked from (the kernel keeps
# the pre-exec peak), and this process carries the emulator, so every child would report
# this process's size.  The launcher is `python -I -S` with only built-in modules, so the
# floor it adds is small (printed as "floor"); it times fork -> exit with
# perf_counter and reaps the child with wait4.  Outputs go to files, never pipes.
LAUNCHER = r"""
import os, signal, sys, time

def serve():
    devnull = os.open(os.devnull, os.O_RDONLY)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    replies.write(b'ready\n')
    replies.flush()
    while True:
        line = requests.readline()
        if not line:
            return
        fields = line.rstrip(b'\n').split(b'\0')
        timeout, argv = float(fields[0]), fields[3:]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out, err = os.open(fields[1], flags, 0o600), os.open(fields[2], flags, 0o600)
        killed = []
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(devnull, 0)
                os.dup2(out, 1)
                os.dup2(err, 2)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        def on_alarm(signum, frame):
            killed.append(1)
            os.kill(pid, signal.SIGKILL)   # not reaped yet (WNOWAIT): pid still ours
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        ended = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 0)
        _, status, usage = os.wait4(pid, 0)
        os.close(out)
        os.close(err)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        replies.write(b'%d %.9f %d %d\n' % (code, ended - started, usage.ru_maxrss, len(killed)))
        replies.flush()
serve()
"""


_launcher = None     # the Launcher of this run (set by main)


def run_timed(argv, timeout):
    return _launcher.run(argv, timeout)


class Launcher(object):
    """One long-lived launcher process; run() starts a child through it."""

    def __init__(self, workdir, python=None):
        self.out_path = os.path.join(workdir, 'child.out')
        self.err_path = os.path.join(workdir, 'child.err')
        self.process = subprocess.Popen([python or sys.executable, '-I', '-S', '-c', LAUNCHER],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        close_fds=True)
        if self._reply(30) != b'ready\n':
            self.close()
            raise RunFailed('the launcher process did not start')

    def _reply(self, timeout):
        guard = threading.Timer(timeout, self.process.kill)
        guard.daemon = True
        guard.start()
        try:
            return self.process.stdout.readline()
        finally:
            guard.cancel()

    def floor_mb(self, timeout):
        """ru_maxrss of `true` started through the launcher: the least any child can show
        (the kernel counts the forked copy of the launcher before exec)."""
        try:
            return self.run(['true'], timeout).maxrss_mb
        except (OSError, RunFailed):
            return None

    def run(self, argv, timeout):
        fields = ['%.3f' % timeout, self.out_path, self.err_path] + list(argv)
        if any('\0' in f or '\n' in f for f in fields):
            raise ValueError('NUL or newline in %r' % (argv,))
        self.process.stdin.write(('\0'.join(fields) + '\n').encode())
        self.process.stdin.flush()
        reply = self._reply(timeout + 30).split()
        if len(reply) != 4:
            raise RunFailed('the launcher process died while running %s' % ' '.join(argv))
        with open(self.out_path, 'rb') as f:
            stdout = f.read().decode('utf-8', 'replace')
        with open(self.err_path, 'rb') as f:
            stderr = f.read().decode('utf-8', 'replace')
        return Result(argv, float(reply[1]), int(reply[0]), int(reply[2]), stdout, stderr,
                      reply[3] != b'0')

    def close(self):
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# --------------------------------------------------------------------------
# The namespace wrapper (root only)
# --------------------------------------------------------------------------

INSTALL_SH = os.path.join(REPO, 'install.sh')
INSTALLED = '/usr/local/sbin/azure-provisioning'    # the unit's ExecStart= script


class NoWrapper(object):
    """Runs argv as it is; the interpreter and flags of (a) and (c) are the repository
    unit's."""

    def __init__(self, python):
        self.interpreter = [python] + UNIT_FLAGS

    def wrap(self, argv):
        return list(argv)

    def reset(self):
        pass

    def steps(self):
        return None


class PrivateVarLib(NoWrapper):
    """Each run with a private /var/lib (tests/support.py's wrapper: a mount namespace,
    through a user namespace for an ordinary user), emptied before each run: the
    provisioner's record and KVP reports go there, never to the machine's."""

    def __init__(self, workdir, python):
        NoWrapper.__init__(self, python)
        from tests.support import private_var_lib
        self.var_lib = os.path.join(workdir, 'var-lib')
        os.mkdir(self.var_lib)
        self.private = private_var_lib

    def available(self):
        return self.private(['true'], self.var_lib) is not None

    def wrap(self, argv):
        return self.private(argv, self.var_lib) or list(argv)

    def reset(self):
        for name in os.listdir(self.var_lib):
            path = os.path.join(self.var_lib, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

    def steps(self):
        """[(step, seconds)] of the record the last run wrote, or None."""
        try:
            with open(os.path.join(self.var_lib, 'azure-provisioning', 'state.json')) as f:
                record = json.load(f)
            return [(item['step'], float(item['seconds'])) for item in record['steps']]
        except (OSError, ValueError, KeyError, TypeError):
            return None


def installed_exec_start(etc):
    """The words of ExecStart= in the unit install.sh wrote into `etc`."""
    with open(os.path.join(etc, 'systemd/system/azure-provisioning.service')) as f:
        for line in f:
            if line.startswith('ExecStart='):
                return line.split('=', 1)[1].split()
    raise RunFailed('the installed azure-provisioning.service has no ExecStart=')


class Namespace(PrivateVarLib):
    """`unshare --uts --mount` + a private copy of /etc bind-mounted over /etc, a
    private /usr/local over /usr/local, into which the real install.sh installed (and
    byte-compiled) the provisioner, and a private /var/lib: (a) runs the unit's very
    ExecStart= command as installed.  The copy is made once; hostname/hosts in it are
    restored, and the private /var/lib emptied, before every run."""

    RESET = ('hostname', 'hosts')

    def __init__(self, workdir, timeout, python):
        NoWrapper.__init__(self, python)
        self.var_lib = os.path.join(workdir, 'var-lib')
        os.mkdir(self.var_lib)
        self.etc = os.path.join(workdir, 'etc')
        copy = subprocess.Popen(['cp', '-a', '/etc', self.etc], stdin=subprocess.DEVNULL)
        try:
            status = copy.wait(timeout)
        except subprocess.TimeoutExpired:
            copy.kill()
            copy.wait()
            raise RunFailed('copying /etc took longer than %d s' % timeout)
        if status != 0:
            raise RunFailed('cp -a /etc %s failed (exit status %d)' % (self.etc, status))
        self.original = {}
        for name in self.RESET:
            try:
                with open(os.path.join('/etc', name), 'rb') as f:
                    self.original[name] = f.read()
            except FileNotFoundError:
                self.original[name] = None
        self.local = os.path.join(workdir, 'local')
        for sub in ('bin', 'sbin', 'lib', 'share'):
            os.makedirs(os.path.join(self.local, sub))
        self.prefix = ['unshare', '--uts', '--mount', '--propagation', 'private', 'sh', '-c',
                       'mount --bind "$0" /etc && mount --bind "$1" /usr/local && '
                       'mount --bind "$2" /var/lib && shift 2 && exec "$@"',
                       self.etc, self.local, self.var_lib]
        if os.path.isdir('/run/systemd/system'):
            # install.sh would ask this machine's systemd to reload and enable
            raise RunFailed('systemd runs here: the benchmark installs only where it does not')
        install = run_timed(self.wrap(['sh', INSTALL_SH, '--python', python]), timeout)
        if install.status != 0 or not os.path.isfile(os.path.join(self.local,
                                                                  'sbin/azure-provisioning')):
            raise RunFailed('install.sh into the private /usr/local failed\n'
                            + install.describe())
        self.compiled = sorted(os.listdir(os.path.join(self.local,
                                                       'lib/azure-provisioning/__pycache__')))
        exec_start = installed_exec_start(self.etc)
        if exec_start[-1] != INSTALLED:
            raise RunFailed('the installed ExecStart= does not run %s: %s'
                            % (INSTALLED, ' '.join(exec_start)))
        self.interpreter = exec_start[:-1]

    def wrap(self, argv):
        return self.prefix + list(argv)

    def reset(self):
        PrivateVarLib.reset(self)
        for name, data in self.original.items():
            path = os.path.join(self.etc, name)
            if data is None:
                if os.path.exists(path):
                    os.unlink(path)
            else:
                with open(path, 'wb') as f:
                    f.write(data)

    def hostname_file(self):
        try:
            with open(os.path.join(self.etc, 'hostname')) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None


# --------------------------------------------------------------------------
# Statistics and formatting
# --------------------------------------------------------------------------

def median(values):
    return statistics.median(values) if values else float('nan')


def ms(seconds):
    return '%8.1f' % (seconds * 1000.0)


def verdict(value, limit):
    return 'PASS' if value == value and value <= limit else 'MISS'


def machine_description(python):
    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    version = subprocess.Popen([python, '-I', '-c', 'import sys; print(sys.version.split()[0])'],
                               stdout=subprocess.PIPE, universal_newlines=True)
    try:
        text = version.communicate(timeout=30)[0].strip()
    except subprocess.TimeoutExpired:
        version.kill()
        version.communicate()
        text = '?'
    return ('%s, %d CPUs, Linux %s; %s (Python %s)'
            % (cpu or platform.machine(), os.cpu_count() or 0, platform.release(), python, text))


# --------------------------------------------------------------------------
# Parts of the benchmark
# --------------------------------------------------------------------------

def check_ours(result, az_ready_before, az, computer_name, ns):
    """(a) must have exited 0, logged Ready accepted, the emulator must have
    accepted one more Ready, and as root the private /etc must carry the new name."""
    problems = []
    if result.status != 0:
        problems.append('exit status %s' % result.status)
    if 'Ready accepted' not in result.stderr:
        problems.append('no "Ready accepted" line')
    if accepted_ready_count(az) != az_ready_before + 1:
        problems.append('the emulator did not accept exactly one more Ready')
    if isinstance(ns, Namespace):
        if 'hostname set to %s' % computer_name not in result.stderr:
            problems.append('no "hostname set to %s" line' % computer_name)
        if ns.hostname_file() != computer_name:
            problems.append('private /etc/hostname is %r, not %r'
                            % (ns.hostname_file(), computer_name))
    if problems:
        raise RunFailed('(a) failed: %s\n%s' % ('; '.join(problems), result.describe()))


def check_seed(result, az_ready_before, az):
    if result.status != 0 or 'Response: 200' not in result.stdout \
            or accepted_ready_count(az) != az_ready_before + 1:
        raise RunFailed('(b) the seed sample failed\n' + result.describe())


def check_plain(result, what):
    if result.status != 0:
        raise RunFailed('%s failed\n%s' % (what, result.describe()))


def accepted_ready_count(az):
    return sum(1 for report in az.health_reports
               if report.get('state') == 'Ready' and 200 <= int(report.get('status') or 0) < 300)


def our_command(args, ns, az, python_options=()):
    """(a): in the namespace, the unit's ExecStart= as installed; else the script with
    the unit's interpreter flags.  python_options go right after the interpreter."""
    interpreter = ns.interpreter[:1] + list(python_options) + ns.interpreter[1:]
    if isinstance(ns, Namespace):
        return interpreter + [INSTALLED, '--wireserver', az.wireserver_addr,
                              '--imds', az.imds_addr]
    return interpreter + [SCRIPT, '--wireserver', az.wireserver_addr, '--imds', az.imds_addr,
                          '--no-hostname']


def floor_command(ns, python_options=()):
    """(c): the interpreter alone, started as the unit starts it."""
    return ns.interpreter[:1] + list(python_options) + ns.interpreter[1:] + ['-c', 'pass']


def timed_rounds(args, az, ns, computer_name):
    ours = our_command(args, ns, az)
    commands = [
        ('a', ns.wrap(ours)),
        ('b', ns.wrap([args.python, '-I', SEED, az.wireserver_addr])),
        ('c', ns.wrap(floor_command(ns))),
    ]
    if isinstance(ns, Namespace):
        commands.append(('d', ns.wrap(['true'])))
        commands.append(('e', ns.wrap(ours + ['--no-hostname'])))
    samples = dict((key, []) for key, _ in commands)

    def one(key, argv):
        ns.reset()
        before = accepted_ready_count(az)
        result = run_timed(argv, args.timeout)
        if key == 'a':
            check_ours(result, before, az, computer_name, ns)
            result.steps = ns.steps()
        elif key == 'e':
            check_ours(result, before, az, computer_name, NoWrapper(args.python))
        elif key == 'b':
            check_seed(result, before, az)
        else:
            check_plain(result, '(%s) %s' % (key, ' '.join(argv)))
        return result

    for _ in range(args.warmup):
        for key, argv in commands:
            one(key, argv)
    for round_no in range(args.rounds):
        shift = round_no % len(commands)        # rotate the order: no position bias
        for key, argv in commands[shift:] + commands[:shift]:
            samples[key].append(one(key, argv))
    ns.reset()
    return samples, commands


def ready_latency(args, ns, computer_name):
    """WireServer refuses connections for T s; time from its coming up to the
    accepted Ready POST, both taken from the emulator's clock."""
    from tests.fake_azure import FakeAzure
    latencies = []
    for _ in range(args.latency_rounds):
        ns.reset()
        with FakeAzure(computer_name=computer_name, incarnation=1,
                      wireserver_up_after=args.up_after) as az:
            ours = our_command(args, ns, az)
            result = run_timed(ns.wrap(ours), args.timeout + args.up_after)
            if result.status != 0 or not az.ready_accepted():
                raise RunFailed('Ready-latency run failed\n' + result.describe())
            up = az.wireserver_up_at
            accepted = [r['time'] for r in az.health_reports
                        if r.get('state') == 'Ready' and 200 <= int(r.get('status') or 0) < 300]
            if up is None or not accepted:
                raise RunFailed('Ready-latency run: emulator has no up time or no accepted '
                                'Ready\n' + result.describe())
            early = [r for r in az.requests if r.get('server') == 'wireserver'
                     and r['time'] < up]
            if early:
                raise RunFailed('Ready-latency run: the WireServer answered before it was up')
            imds_done = [r['time'] for r in az.requests if r.get('server') == 'imds']
            if not imds_done or max(imds_done) >= up:
                raise RunFailed('Ready-latency run: the script reached the WireServer step '
                                'only after it was up (raise --up-after)\n' + result.describe())
            latencies.append(min(accepted) - up)
    ns.reset()
    return latencies


IMPORT_LINE = re.compile(r'^import time:\s+(\d+)\s*\|\s*(\d+)\s*\|(\s*)(\S+)\s*$')


def parse_importtime(stderr):
    """-X importtime lines -> list of (top_level_name, depth, name, self_us, cumulative_us).
    A module's imports are printed before it, one level deeper; a depth-0 line closes
    the tree of everything printed since the previous depth-0 line."""
    rows, pending = [], []
    for line in stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if not match:
            continue
        depth = (len(match.group(3)) - 1) // 2
        pending.append((depth, match.group(4), int(match.group(1)), int(match.group(2))))
        if depth == 0:
            top = match.group(4)
            rows.extend((top,) + item for item in pending)
            pending = []
    return rows


def import_profile(args, argv, runs, startup, ns):
    """Imports that argv makes beyond interpreter start-up (trees rooted at a
    top-level module that the floor (c) does not import), the median of `runs` runs
    per module.  Returns (rows sorted by self time, total_ms of those trees)."""
    per_module, totals = {}, []
    for _ in range(runs):
        ns.reset()
        result = run_timed(argv, args.timeout)
        if result.status != 0:
            raise RunFailed('-X importtime run failed\n' + result.describe())
        total = 0
        for top, depth, name, self_us, cumulative in parse_importtime(result.stderr):
            if top in startup:
                continue
            per_module.setdefault((depth, name), []).append((cumulative, self_us))
            if depth == 0:
                total += cumulative
        totals.append(total)
    rows = [(median([v[1] for v in values]), median([v[0] for v in values]), depth, name)
            for (depth, name), values in per_module.items()]
    rows.sort(key=lambda row: (-row[0], row[3]))
    return rows, median(totals) / 1000.0


def import_times(args, az, ns, runs=3):
    """-X importtime of (a) as it is run (the unit's interpreter flags, in the same
    wrapper: a real run against the emulator) and, for comparison, of the article's
    sample; start-up is the floor (c)'s.  Returns (ours, seed, (a)'s argv)."""
    base = run_timed(ns.wrap(floor_command(ns, ['-X', 'importtime'])), args.timeout)
    startup = set(top for top, _, _, _, _ in parse_importtime(base.stderr))
    argv = ns.wrap(our_command(args, ns, az, ['-X', 'importtime']))
    ours = import_profile(args, argv, runs, startup, ns)
    seed = import_profile(args, ns.wrap([args.python, '-X', 'importtime', '-I', SEED,
                                         az.wireserver_addr]), runs, startup, ns)
    ns.reset()
    return ours, seed, argv


def python_importtime_supported(python, timeout):
    probe = subprocess.Popen([python, '-I', '-c', 'import sys; print(sys.version_info >= (3, 7))'],
                             stdout=subprocess.PIPE, universal_newlines=True)
    try:
        return probe.communicate(timeout=timeout)[0].strip() == 'True'
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.communicate()
        return False


def site_cost_us(args):
    """Cumulative import time of `site` in `python -I -c pass` (the article's sample
    starts so)."""
    result = run_timed([args.python, '-X', 'importtime', '-I', '-c', 'pass'], args.timeout)
    for line in result.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match and match.group(4) == 'site' and len(match.group(3)) == 1:
            return int(match.group(2))
    return None


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def count(text, low, high):
    value = int(text)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError('expected %d..%d, got %s' % (low, high, text))
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='tests/bench.py',
        description='Benchmark azure_provisioning.py against the article\'s sample on the '
                    'loopback emulator (tests/fake_azure.py).')
    parser.add_argument('--rounds', type=lambda t: count(t, 1, 1000), default=20,
                        help='timed rounds of (a), (b), (c) (default 20)')
    parser.add_argument('--latency-rounds', type=lambda t: count(t, 1, 100), default=5,
                        help='Ready-latency runs (default 5)')
    parser.add_argument('--warmup', type=lambda t: count(t, 0, 100), default=2,
                        help='untimed warm-up rounds (default 2)')
    parser.add_argument('--up-after', type=float, default=1.0, metavar='T',
                        help='seconds the WireServer refuses connections in the latency '
                             'runs (default 1.0)')
    parser.add_argument('--python', default=sys.executable, metavar='PATH',
                        help='interpreter for (a), (b), (c) (default: this one, %s)'
                             % sys.executable)
    parser.add_argument('--timeout', type=float, default=60.0, metavar='SECONDS',
                        help='limit for each child process (default 60)')
    parser.add_argument('--no-namespace', action='store_true',
                        help='even as root, run (a) with --no-hostname: the script, not the '
                             'installed copy, with no private /etc or /usr/local (a private '
                             '/var/lib still)')
    parser.add_argument('--check-targets', action='store_true',
                        help='exit 1 when a target is missed')
    args = parser.parse_args(argv)
    if not 0 < args.up_after <= 30 or not 0 < args.timeout <= 3600:
        parser.error('--up-after must be in (0, 30], --timeout in (0, 3600]')
    return args


def main(argv=None):
    args = parse_args(argv)
    from tests.fake_azure import FakeAzure

    current = socket.gethostname()
    computer_name = 'web-7' if current != 'web-7' else 'web-8'
    host_etc_hostname = read_or_none('/etc/hostname')

    root = os.geteuid() == 0 and not args.no_namespace and shutil.which('unshare')
    workdir = tempfile.mkdtemp(prefix='azure-provisioning-bench.')
    out = sys.stdout
    global _launcher
    try:
        _launcher = Launcher(workdir)
        why_not = None
        if root:
            ns = Namespace(workdir, args.timeout, args.python)
            probe = run_timed(ns.wrap(['true']), args.timeout)
            if probe.status != 0:
                why_not = 'unshare/mount failed: %s' % (probe.stderr.strip() or probe.status)
                shutil.rmtree(ns.var_lib)
                root = False
        if not root:
            ns = PrivateVarLib(workdir, args.python)
        out.write('== azure-provisioning benchmark ==\n')
        out.write('machine: %s\n' % machine_description(args.python))
        site_us = site_cost_us(args)
        if site_us is not None and site_us > 5000:
            out.write('note: this interpreter spends %.1f ms importing `site` at start-up '
                      '(.pth files in its site-packages); that cost is in (b), which starts '
                      'with -I; (a) and (c) start without `site`, as the unit does\n'
                      % (site_us / 1000.0))
        if root:
            out.write('mode: root: (a) is the unit\'s ExecStart= %s %s as install.sh '
                      'installed it into a private /usr/local (module byte-compiled: %s), run in '
                      '`unshare --uts --mount` with a private copy of /etc and a private /var/lib '
                      'bind-mounted; it really sets the hostname %r (host: %r); (b) and (c) run '
                      'in the same wrapper; (d) is the wrapper alone, (e) is (a) with '
                      '--no-hostname in it (both for information)\n'
                      % (' '.join(ns.interpreter), INSTALLED, ', '.join(ns.compiled) or 'no',
                         computer_name, current))
        else:
            out.write('mode: %s: (a) runs with --no-hostname, %s\n'
                      % (why_not or ('--no-namespace given' if os.geteuid() == 0
                                     else 'not root'),
                         'each run with a private /var/lib (a, b, c alike)' if ns.available()
                         else 'NOT with a private /var/lib (no user namespaces for this user: '
                              'the machine\'s is left to its permissions)'))
        out.write('rounds: %d timed (+%d warm-up), order rotated each round; '
                  'child timeout %.0f s\n' % (args.rounds, args.warmup, args.timeout))
        out.flush()

        with FakeAzure(computer_name=computer_name, incarnation=1) as az:
            samples, commands = timed_rounds(args, az, ns, computer_name)
            if importtime_ok(args):
                imports = import_times(args, az, ns)
            else:
                imports = None
        latencies = ready_latency(args, ns, computer_name)
        floor = _launcher.floor_mb(args.timeout)
    except RunFailed as exc:
        out.write('\nBENCHMARK FAILED: %s\n' % exc)
        return 1
    finally:
        if _launcher:
            _launcher.close()
        shutil.rmtree(workdir, ignore_errors=True)

    if socket.gethostname() != current or read_or_none('/etc/hostname') != host_etc_hostname:
        out.write('\nBENCHMARK FAILED: the host\'s hostname or /etc/hostname changed while '
                  'the benchmark ran (by it or by another process)\n')
        return 1

    labels = {
        'a': '(a) ours (ExecStart=)',
        'b': '(b) article sample',
        'c': '(c) python3 %s -c pass' % ' '.join(ns.interpreter[1:]),
        'd': '(d) wrapper alone (true)',
        'e': '(e) = (a) with --no-hostname',
    }
    out.write('\n== wall time per fresh process (ms, perf_counter around the child) ==\n')
    out.write('%-30s %8s %8s %8s\n' % ('', 'median', 'min', 'max'))
    for key, _ in commands:
        secs = [r.seconds for r in samples[key]]
        out.write('%-30s %s %s %s\n' % (labels[key], ms(median(secs)), ms(min(secs)),
                                        ms(max(secs))))
    for key, argv in commands:
        out.write('  %s = %s\n' % (key, ' '.join(argv)))

    a = [r.seconds for r in samples['a']]
    b = [r.seconds for r in samples['b']]
    c = [r.seconds for r in samples['c']]
    ratio_ab = median([x / y for x, y in zip(a, b)])
    ratio_ac = median([x / y for x, y in zip(a, c)])
    out.write('\n== ratios (median of the per-round ratios) ==\n')
    out.write('a/b %6.3f\n' % ratio_ab)
    out.write('a/c %6.3f\n' % ratio_ac)
    out.write('note: (c), the floor, is Python started as the unit starts it; a/c is a figure, '
              'not a target; where the time above the floor goes is shown below\n')
    if 'd' in samples:
        d = [r.seconds for r in samples['d']]
        net = lambda xs, ys: median([(x - w) / (y - w) for x, y, w in zip(xs, ys, d)
                                     if y - w > 0])
        out.write('without the wrapper (d subtracted per round, for information): '
                  'a/b %.3f, a/c %.3f\n' % (net(a, b), net(a, c)))

    rss = dict((key, [r.maxrss_mb for r in samples[key]]) for key, _ in commands)
    out.write('\n== peak RSS (MB, ru_maxrss from wait4; includes the wrapper processes) ==\n')
    if floor is not None:
        out.write('floor: %.1f MB (`true` started the same way: the kernel counts the forked '
                  'launcher before exec, so no child shows less)\n' % floor)
    out.write('%-30s %8s %8s\n' % ('', 'median', 'max'))
    for key, _ in commands:
        out.write('%-30s %8.1f %8.1f\n' % (labels[key], median(rss[key]), max(rss[key])))
    peak_a = max(rss['a'])

    out.write('\n== Ready latency (WireServer refusing, up after %.1f s; up -> accepted '
              'Ready POST, emulator clock) ==\n' % args.up_after)
    out.write('runs: %d  median %.3f s  min %.3f s  max %.3f s\n'
              % (len(latencies), median(latencies), min(latencies), max(latencies)))
    latency = median(latencies)

    out.write('\n== import time of azure_provisioning.py and its steps: where (a)\'s time above '
              'the floor (c) goes ==\n')
    write_steps(out, samples, median(a), median(c))
    if imports is None:
        out.write('imports skipped: %s has no -X importtime (Python 3.7+)\n' % args.python)
    else:
        (rows, ours_ms), (_, seed_ms), argv = imports
        out.write('imports of (a) as run: %s\n' % ' '.join(argv))
        out.write('(-X importtime, median of 3 runs; imports beyond the floor\'s start-up, '
                  'top 10 by self time)\n')
        out.write('%10s %10s  %s\n' % ('self(us)', 'cumul(us)', 'module'))
        for self_us, cumulative, depth, name in rows[:10]:
            out.write('%10d %10d  %s\n' % (self_us, cumulative, name))
        out.write('imports beyond start-up: azure_provisioning.py %.1f ms, article sample %.1f ms '
                  '(-X importtime adds its own overhead)\n' % (ours_ms, seed_ms))

    values = {'a/b': ratio_ab, 'a/c': ratio_ac, 'latency': latency, 'rss': peak_a}
    out.write('\n== targets ==\n')
    missed = 0
    for key, label, limit, unit in TARGETS:
        value = values[key]
        mark = verdict(value, limit)
        missed += mark == 'MISS'
        shown = ('%.3f' % value) + (' ' + unit if unit else '')
        limit_shown = ('%.2f' % limit) + (' ' + unit if unit else '')
        out.write('%-38s %12s  <= %-9s %s\n' % (label, shown, limit_shown, mark))
    out.write('%d of %d targets met\n' % (len(TARGETS) - missed, len(TARGETS)))
    out.flush()
    return 1 if missed and args.check_targets else 0


def write_steps(out, samples, a_ms, c_ms):
    """Each step's own time (median over the timed (a) runs, from the record each
    wrote), their sum, and (a)'s time above the floor; what the steps do not account
    for is the module's import and set-up, and the exit."""
    per_step = {}
    for result in samples['a']:
        for step, seconds in getattr(result, 'steps', None) or ():
            per_step.setdefault(step, []).append(seconds)
    if not per_step:
        out.write('steps: no record from the (a) runs to read them from\n')
        return
    order = [step for step, _ in samples['a'][0].steps or ()] or sorted(per_step)
    together = 0.0
    for step in order:
        value = median(per_step[step]) * 1000.0
        together += value
        out.write('step %-12s %8.1f ms\n' % (step, value))
    out.write('steps together %8.1f ms; (a) %.1f ms, floor (c) %.1f ms, above the floor %.1f ms\n'
              % (together, a_ms * 1000.0, c_ms * 1000.0, (a_ms - c_ms) * 1000.0))
    out.write('(the rest above the floor: reading and running the module before its first '
              'step, the exit; the imports below are part of it)\n')


def importtime_ok(args):
    return python_importtime_supported(args.python, args.timeout)


def read_or_none(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return None


if __name__ == '__main__':
    sys.exit(main())
