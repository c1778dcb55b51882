#!/usr/bin/env python3
"""The real agents' WireServer client code, run against tests/fake_azure.py.

Debian's cloud-init and waagent packages, and the Debian packages of the Python
modules that their WireServer code imports, are fetched with `apt-get download`
into a cache directory (reused when present), unpacked with `dpkg-deb -x` into a
private tree per agent (never installed), and run in a subprocess whose
PYTHONPATH is that tree:

    python3 -B -S tests/agents.py drive --agent cloud-init --scenario ready \\
        --wireserver 127.0.0.1:PORT --workdir DIR

The driver (the `drive` command, the second half of this file) calls the agents'
own functions: cloud-init's cloudinit.sources.helpers.azure
(get_metadata_from_fabric: goal state + send_ready_signal; report_failure_to_fabric)
and waagent's azurelinuxagent.common.protocol.wire (WireProtocol.detect: versions
+ full goal state; report_provision_status -> WireClient.report_health).  It prints
one JSON line, prefixed RESULT_MARK, saying what the agent parsed, built and
connected to.

The agents hard-code 168.63.129.16.  Nothing of theirs is edited: the driver
redirects 168.63.129.16:80 to the emulator inside socket.socket.connect, and an
audit hook (sys.addaudithook: it sees every connect, sendto, name lookup, process
start and file write the interpreter makes, also from C) refuses any connection or
datagram to an address outside 127.0.0.0/8 and ::1, any host-name lookup, any
program but openssl, uname and lsb_release (waagent's transport certificate and
its look at the system) and any write outside the driver's work directory.
Every wait is bounded: the agents' retry sleeps and counts are cut, and an alarm
ends the driver after DRIVER_TIMEOUT seconds.

Standard library only (the driver runs with -S: no site-packages but the tree).
"""

import argparse
import glob
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

WIRESERVER_IP = '168.63.129.16'
WIRESERVER_PORT = 80
RESULT_MARK = '@@agent-result@@ '
DRIVER_TIMEOUT = 45             # seconds: the alarm inside the driver
DOWNLOAD_TIMEOUT = 180          # seconds for one `apt-get download`
UNPACK_TIMEOUT = 120            # seconds for unpacking and compiling one tree

# Each agent with the Debian packages its WireServer path imports, found by trying:
# import the module and run the scenarios under the driver, add the package named
# by the ModuleNotFoundError, until all pass; tests/test_agents.py checks that each
# one is really imported.  cloud-init's package depends on more (jinja2, jsonpatch,
# jsonschema, netifaces, serial, oauthlib...): nothing on this path imports them.
PACKAGES = {
    'cloud-init': [
        'cloud-init',
        'python3-yaml',                 # cloudinit.util, cloudinit.safeyaml
        'python3-configobj',            # cloudinit.util (load of ConfigObj files)
        'python3-requests',             # cloudinit.url_helper.readurl
        'python3-urllib3',              # requests
        'python3-six',                  # Debian's urllib3 1.26 (its six is unvendored)
        'python3-idna',                 # requests
        'python3-certifi',              # requests
        'python3-chardet',              # requests (Debian's prefers it)
        'python3-charset-normalizer',   # requests (imported too, for its version check)
    ],
    'waagent': [
        'waagent',
        'python3-distro',               # azurelinuxagent.common.version
    ],
}

SCENARIOS = {
    'cloud-init': ('ready', 'failure'),
    'waagent': ('ready', 'failure', 'provisioning'),
    'guard': ('selftest',),     # no agent: the guard refusing what it must
}


class Unavailable(Exception):
    """The agents cannot be had here (no apt-get, no network, no package lists)."""


# ---------------------------------------------------------------------------
# Fetching and unpacking (runs in the test process)
# ---------------------------------------------------------------------------

def cache_dir():
    """AZP_AGENTS_CACHE, else $XDG_CACHE_HOME or ~/.cache, /azure-provisioning-tests/agents."""
    if os.environ.get('AZP_AGENTS_CACHE'):
        return os.environ['AZP_AGENTS_CACHE']
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'azure-provisioning-tests', 'agents')


def agent_python():
    """Debian's python3, the one these packages are built for, if there is one."""
    for candidate in ('/usr/bin/python3',):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def _tool_run(argv, timeout, cwd=None, what=None):
    try:
        run = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=timeout,
                             env=dict(os.environ, LC_ALL='C', DEBIAN_FRONTEND='noninteractive'))
    except subprocess.TimeoutExpired:
        raise Unavailable('%s: no answer in %d s' % (what or argv[0], timeout))
    except OSError as exc:
        raise Unavailable('%s: %s' % (what or argv[0], exc))
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.startswith('E:')]
        raise Unavailable('%s failed (exit %d): %s' % (
            what or ' '.join(argv[:2]), run.returncode,
            ' / '.join(lines or run.stderr.strip().splitlines()[-2:])[:400]))
    return run


def _deb_name(path):
    return os.path.basename(path).split('_', 1)[0]


def fetch_debs(names, cache):
    """{package name: .deb path}, downloading into cache/debs only what is missing."""
    for tool in ('apt-get', 'dpkg-deb'):
        if shutil.which(tool) is None:
            raise Unavailable('%s is not installed (needs a Debian-like system)' % tool)
    debs = os.path.join(cache, 'debs')
    os.makedirs(debs, exist_ok=True)
    have = {}
    for path in glob.glob(os.path.join(debs, '*.deb')):
        have.setdefault(_deb_name(path), path)
    missing = [name for name in names if name not in have]
    if missing:
        # a private directory, then a rename: an interrupted download leaves no half file
        incoming = tempfile.mkdtemp(prefix='download-', dir=cache)
        try:
            # _apt cannot write here: apt says so ("unsandboxed") and downloads as root
            _tool_run(['apt-get', 'download', '-q'] + missing, DOWNLOAD_TIMEOUT, cwd=incoming,
                      what='apt-get download %s' % ' '.join(missing))
            for path in glob.glob(os.path.join(incoming, '*.deb')):
                target = os.path.join(debs, os.path.basename(path))
                os.replace(path, target)
                have.setdefault(_deb_name(target), target)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
    lost = [name for name in names if name not in have]
    if lost:
        raise Unavailable('apt-get download brought no package for %s' % ', '.join(lost))
    return dict((name, have[name]) for name in names)


def unpack(debs, cache, python):
    """The dist-packages directory of a tree holding these .debs unpacked (and byte-
    compiled by `python`, so that the driver needs no write there), made once."""
    key = hashlib.sha256(('\n'.join(sorted(os.path.basename(p) for p in debs)) + '\n' +
                          python).encode()).hexdigest()[:16]
    tree = os.path.join(cache, 'tree-' + key)
    stamp = os.path.join(tree, '.complete')
    if not os.path.exists(stamp):
        building = tempfile.mkdtemp(prefix='unpack-', dir=cache)
        try:
            for deb in debs:
                _tool_run(['dpkg-deb', '-x', deb, building], UNPACK_TIMEOUT,
                          what='dpkg-deb -x %s' % os.path.basename(deb))
            # byte-compiled now, so that the driver (python -B) starts fast and writes
            # nothing there; a file this Python cannot compile only stays uncompiled
            subprocess.call([python, '-S', '-m', 'compileall', '-q', '-j', '0',
                             os.path.join(building, 'usr/lib/python3/dist-packages')],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=UNPACK_TIMEOUT)
            with open(os.path.join(building, '.complete'), 'w') as f:
                f.write('\n'.join(os.path.basename(p) for p in debs) + '\n')
            try:
                os.rename(building, tree)
            except OSError:     # a concurrent run made it first
                if not os.path.exists(stamp):
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return os.path.join(tree, 'usr/lib/python3/dist-packages')


class AgentTree(object):
    def __init__(self, agent, dist_packages, debs, python):
        self.agent = agent
        self.dist_packages = dist_packages
        self.debs = debs            # {package name: .deb path}
        self.python = python

    def version(self, package):
        return os.path.basename(self.debs[package]).split('_')[1].replace('%3a', ':')

    def command(self, scenario, wireserver, workdir, description=None, agent=None):
        argv = [self.python, '-B', '-S', os.path.abspath(__file__), 'drive',
                '--agent', agent or self.agent, '--scenario', scenario, '--wireserver', wireserver,
                '--workdir', workdir]
        if description is not None:
            argv += ['--description', description]
        return argv

    def environment(self, workdir):
        # no proxy variables (requests would use them), nothing of the caller's Python
        return {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'PYTHONPATH': self.dist_packages,
                'HOME': workdir, 'TMPDIR': workdir, 'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8',
                'PYTHONHASHSEED': '0'}


_fetched = {}    # cache directory -> {package: .deb} or Unavailable


def prepare(agent, cache=None):
    """AgentTree for 'cloud-init' or 'waagent'; raises Unavailable."""
    cache = cache or cache_dir()
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as exc:
        raise Unavailable('cannot make the cache directory %s: %s' % (cache, exc))
    python = agent_python()
    # both agents' packages in one `apt-get download`, tried once per process: one
    # wait, not two, where there is no network
    if cache not in _fetched:
        try:
            _fetched[cache] = fetch_debs(sorted(set(sum(PACKAGES.values(), []))), cache)
        except Unavailable as exc:
            _fetched[cache] = exc
    if isinstance(_fetched[cache], Unavailable):
        raise _fetched[cache]
    debs = dict((name, _fetched[cache][name]) for name in PACKAGES[agent])
    dist_packages = unpack([debs[name] for name in PACKAGES[agent]], cache, python)
    return AgentTree(agent, dist_packages, debs, python)


def deb_modules(deb):
    """Top-level Python modules and packages a .deb ships in dist-packages."""
    listing = _tool_run(['dpkg-deb', '-c', deb], UNPACK_TIMEOUT).stdout
    names = set()
    for line in listing.splitlines():
        match = re.search(r'\./usr/lib/python3/dist-packages/([^/\s]+)', line)
        if match and not re.search(r'\.(egg|dist)-info$', match.group(1)):
            names.add(re.sub(r'(\.cpython-[^.]+)?\.(py|so)$', '', match.group(1)))
    return names


def parse_result(stdout):
    """The driver's JSON result, or None when it printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return None


# ---------------------------------------------------------------------------
# The driver (runs in the subprocess, with the agent's tree on PYTHONPATH)
# ---------------------------------------------------------------------------

class Refused(PermissionError):
    pass


class Guard(object):
    """Redirects the WireServer to the emulator; refuses everything that could
    leave this machine or change it.  Installed before any agent module loads."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # audit events that change a path: event -> indexes of the path arguments
    PATH_EVENTS = {'os.mkdir': (0,), 'os.remove': (0,), 'os.rmdir': (0,), 'os.rename': (0, 1),
                   'os.chmod': (0,), 'os.chown': (0,), 'os.symlink': (1,), 'os.link': (1,),
                   'os.utime': (0,), 'os.truncate': (0,), 'os.chflags': (0,),
                   'os.mkfifo': (0,), 'os.mknod': (0,), 'os.setxattr': (0,),
                   'os.removexattr': (0,), 'shutil.rmtree': (0,), 'shutil.copyfile': (1,),
                   'shutil.copytree': (1,), 'shutil.move': (1,), 'shutil.chown': (0,)}
    # waagent makes its transport certificate with openssl; it asks uname and
    # lsb_release what system this is (azurelinuxagent.common.version)
    PROGRAMS = ('openssl', 'uname', 'lsb_release')

    def __init__(self, emulator, workdir):
        self.emulator = emulator            # (host, port)
        self.workdir = os.path.abspath(workdir)
        self.connections = []               # [asked, went to]
        self.refused = []                   # what the guard stopped
        self.programs = []                  # argv of the programs run
        self.inside = False

    # -- what is allowed --

    @staticmethod
    def loopback(host):
        try:
            return ipaddress.ip_address(host.split('%', 1)[0]).is_loopback
        except ValueError:
            return False

    def refuse(self, what):
        self.refused.append(what)
        raise Refused('guard: refused %s' % what)

    def check_address(self, family, address, what):
        if family == socket.AF_UNIX:
            return
        if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
            self.refuse('%s to %r (family %s)' % (what, address, family))
        if not self.loopback(str(address[0])):
            self.refuse('%s to %s:%s (not loopback)' % (what, address[0], address[1]))

    def check_name(self, host, what):
        if host is None:
            return
        if isinstance(host, bytes):
            host = host.decode('ascii', 'replace')
        host = str(host)
        if host in ('localhost', '') or self.numeric(host):
            return
        self.refuse('%s of the name %r (a DNS query)' % (what, host))

    @staticmethod
    def numeric(host):
        try:
            ipaddress.ip_address(host.split('%', 1)[0])
            return True
        except ValueError:
            return False

    def check_path(self, path, what):
        if isinstance(path, int) or path is None:
            return      # a descriptor: its open was checked
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        path = os.path.normpath(os.path.join(os.getcwd(), os.fspath(path)))
        if path == '/dev/null' or path == self.workdir or path.startswith(self.workdir + os.sep):
            return
        self.refuse('%s %s (outside the work directory)' % (what, path))

    # -- the hooks --

    def audit(self, event, args):
        if self.inside:
            return
        self.inside = True
        try:
            self._audit(event, args)
        finally:
            self.inside = False

    def _audit(self, event, args):
        if event == 'open':
            path, _mode, flags = args
            if flags is not None and flags & self.WRITE_FLAGS:
                self.check_path(path, 'writing')
        elif event in self.PATH_EVENTS:
            for index in self.PATH_EVENTS[event]:
                if index < len(args):
                    self.check_path(args[index], event)
        elif event in ('socket.connect', 'socket.sendto', 'socket.sendmsg'):
            sock, address = args
            if address is not None:
                self.check_address(sock.family, address, event)
        elif event == 'socket.getaddrinfo':
            self.check_name(args[0], event)
        elif event in ('socket.gethostbyname', 'socket.gethostbyaddr'):
            self.check_name(args[0], event)
        elif event == 'socket.getnameinfo':
            self.check_name(args[0][0], event)
        elif event == 'subprocess.Popen':
            executable, argv = args[0], list(args[1] or [])
            name = os.path.basename(os.fsdecode(executable or (argv[0] if argv else '')))
            if name not in self.PROGRAMS:
                self.refuse('running %r' % ([os.fsdecode(a) for a in argv],))
            self.programs.append([os.fsdecode(a) for a in argv])
        elif event in ('os.system', 'os.exec', 'os.spawn', 'os.posix_spawn', 'os.fork',
                       'os.forkpty', 'pty.spawn', 'ctypes.dlopen', 'os.kill', 'os.killpg',
                       'socket.sethostname'):
            self.refuse('%s %r' % (event, args))

    def install(self):
        guard = self
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex

        def redirect(sock, address):
            if (sock.family == socket.AF_INET and isinstance(address, tuple)
                    and address == (WIRESERVER_IP, WIRESERVER_PORT)):
                guard.connections.append(['%s:%d' % address, '%s:%d' % guard.emulator])
                return guard.emulator
            if isinstance(address, tuple):
                guard.connections.append(['%s:%s' % address[:2]] * 2)
            return address

        def connect(sock, address):
            return real_connect(sock, redirect(sock, address))

        def connect_ex(sock, address):
            return real_connect_ex(sock, redirect(sock, address))

        def getfqdn(name=''):
            # the stdlib's asks DNS (gethostbyaddr); no agent needs the answer here
            return name or socket.gethostname()

        socket.socket.connect = connect
        socket.socket.connect_ex = connect_ex
        socket.getfqdn = getfqdn
        sys.addaudithook(self.audit)


def _log_to_stderr():
    import logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(name)s %(levelname)s: %(message)s'))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG)


def _parameters(function):
    import inspect
    return inspect.signature(function).parameters


def _short_retries_cloud_init(azure):
    """cloud-init retries every 5 s for 20 minutes: here every 0.2 s for 3 s."""
    original = azure.http_with_retries

    def http_with_retries(url, **kwargs):
        kwargs['retry_sleep'] = 0.2
        kwargs['timeout_minutes'] = 0.05
        return original(url, **kwargs)

    azure.http_with_retries = http_with_retries


def _short_retries_waagent(restutil):
    """waagent retries up to 30 times, 15 s apart, for health: here 3 times, 0.1 s apart."""
    original = restutil.http_request

    def http_request(*args, **kwargs):
        kwargs['max_retry'] = min(kwargs.get('max_retry') or restutil.DEFAULT_RETRIES, 3)
        return original(*args, **kwargs)

    restutil.http_request = http_request
    restutil._compute_delay = lambda retry_attempt=1, delay=1: 0.1
    restutil.THROTTLE_DELAY_IN_SECONDS = 0.1
    restutil.THROTTLE_RETRIES = 3


def drive_cloud_init(scenario, description, result):
    from cloudinit.sources.helpers import azure
    from cloudinit import version
    result['version'] = version.version_string()
    _log_to_stderr()    # after the import: cloudinit.log resets the root logger
    _short_retries_cloud_init(azure)
    # Not WireServer: before each report cloud-init copies its log and dmesg into
    # the Hyper-V KVP pool.  Stubbed (it would read /var/log and run dmesg).
    azure.push_log_to_kvp = lambda *args, **kwargs: result['stubbed'].append('push_log_to_kvp')

    parse = azure.WALinuxAgentShim._parse_raw_goal_state_xml

    def parse_goal_state(self, xml, need_certificate):
        goal_state = parse(self, xml, need_certificate)
        result['goal_states'].append({'incarnation': goal_state.incarnation,
                                      'container_id': goal_state.container_id,
                                      'instance_id': goal_state.instance_id})
        return goal_state

    azure.WALinuxAgentShim._parse_raw_goal_state_xml = parse_goal_state
    build = azure.GoalStateHealthReporter.build_report

    def build_report(self, *args, **kwargs):
        document = build(self, *args, **kwargs)
        result['documents'].append(document)
        return document

    azure.GoalStateHealthReporter.build_report = build_report
    endpoint = azure.DEFAULT_WIRESERVER_ENDPOINT    # what DataSourceAzure uses without DHCP 245
    if scenario == 'ready':
        # DataSourceAzure._report_ready: goal state, then send_ready_signal.  Newer
        # cloud-init also takes the distro (only to eject a provisioning disc).
        extra = {'distro': None} if 'distro' in _parameters(azure.get_metadata_from_fabric) else {}
        result['returned'] = azure.get_metadata_from_fabric(endpoint=endpoint, **extra)
    elif 'description' in _parameters(azure.report_failure_to_fabric):
        # DataSourceAzure._report_failure: goal state, then send_failure_signal
        azure.report_failure_to_fabric(endpoint=endpoint, description=description)
    else:
        # newer cloud-init passes an error object that it encodes into the
        # description; below that, the same shim call as report_failure_to_fabric's
        shim = azure.WALinuxAgentShim(endpoint=endpoint)
        try:
            shim.register_with_azure_and_report_failure(description=description)
        finally:
            shim.clean_up()


def drive_waagent(scenario, description, result, workdir):
    import azurelinuxagent.common.conf as conf
    import azurelinuxagent.common.logger as logger
    from azurelinuxagent.common.utils import restutil
    from azurelinuxagent.common.protocol import wire
    from azurelinuxagent.common.protocol.restapi import ProvisionStatus
    from azurelinuxagent.common.version import AGENT_VERSION as version
    result['version'] = version
    lib = os.path.join(workdir, 'waagent')
    os.mkdir(lib)
    conf.__conf__.values.update({
        'Lib.Dir': lib,                     # /var/lib/waagent otherwise
        # FastTrack asks the HostGAPlugin (168.63.129.16:32526) for vmSettings: not the
        # WireServer, not emulated; waagent goes on without it when it is off
        'Debug.EnableFastTrack': 'n',
    })
    logger.add_logger_appender(logger.AppenderType.STDOUT, logger.LogLevel.VERBOSE)
    _short_retries_waagent(restutil)

    real_goal_state = wire.GoalState.__init__

    def goal_state_init(self, wire_client):
        real_goal_state(self, wire_client)
        result['goal_states'].append({'incarnation': self.incarnation,
                                      'container_id': self.container_id,
                                      'instance_id': self.role_instance_id})

    wire.GoalState.__init__ = goal_state_init
    build = wire._build_health_report

    def build_health_report(*args, **kwargs):
        document = build(*args, **kwargs)
        result['documents'].append(document)
        return document

    wire._build_health_report = build_health_report
    # what ProtocolUtil uses when no DHCP lease names another endpoint
    protocol = wire.WireProtocol(restutil.KNOWN_WIRESERVER_IP)
    # ProtocolUtil.get_protocol(): versions, transport certificate, full goal state
    protocol.detect()
    # pa/provision/default.py: report_ready / report_not_ready
    if scenario == 'ready':
        status = ProvisionStatus(status='Ready')
    elif scenario == 'failure':
        status = ProvisionStatus(status='NotReady', subStatus='ProvisioningFailed',
                                 description=description)
    elif scenario == 'provisioning':
        status = ProvisionStatus(status='NotReady', subStatus='Provisioning',
                                 description='Starting')
    else:
        raise ValueError('no waagent scenario %r' % scenario)
    protocol.report_provision_status(status)


def drive_guard_selftest(result, workdir):
    """Each of these must be refused by the guard, before any packet or write.
    tests/test_agents.py runs it where no packet can leave (a new network
    namespace), so a broken guard fails the test without sending anything."""
    import _socket
    outside = os.path.join(os.path.dirname(workdir), 'outside')   # the test's own dir

    def tcp(host, port):
        return lambda: socket.create_connection((host, port), timeout=1).close()

    def udp():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.sendto(b'guard', ('192.0.2.1', 53))
        finally:
            sock.close()

    def raw_connect():
        sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)   # bypasses the redirect
        try:
            sock.settimeout(1)
            sock.connect(('192.0.2.1', 80))
        finally:
            sock.close()

    def write():
        with open(os.path.join(outside, 'written'), 'w') as f:
            f.write('guard')

    attempts = [
        ('imds', tcp('169.254.169.254', 80)),
        ('wireserver other port', tcp(WIRESERVER_IP, 32526)),
        ('private address', tcp('10.0.0.1', 80)),
        ('ipv6 address', tcp('2001:db8::1', 80)),
        ('udp datagram', udp),
        ('connect on a C socket', raw_connect),
        ('name lookup', lambda: socket.getaddrinfo('example.com', 80)),
        ('write outside', write),
        ('program', lambda: subprocess.call(['true'])),
    ]
    result['attempts'] = {}
    for name, attempt in attempts:
        try:
            attempt()
            outcome = 'ALLOWED'
        except Refused:
            outcome = 'refused'
        except BaseException as exc:
            outcome = 'ALLOWED, then %s: %s' % (exc.__class__.__name__, exc)
        result['attempts'][name] = outcome


def drive(args):
    if args.scenario not in SCENARIOS[args.agent]:
        sys.exit('agents.py: %s has no scenario %r (%s)' % (
            args.agent, args.scenario, ', '.join(SCENARIOS[args.agent])))
    result = {'agent': args.agent, 'scenario': args.scenario, 'ok': False, 'error': None,
              'goal_states': [], 'documents': [], 'stubbed': [], 'returned': None}
    host, _, port = args.wireserver.rpartition(':')
    workdir = os.path.abspath(args.workdir)
    guard = Guard((host, int(port)), workdir)
    if not guard.loopback(host):
        sys.exit('agents.py: the emulator must be on a loopback address, not %s' % host)
    os.chdir(workdir)
    guard.install()

    def timed_out(signum, frame):
        raise TimeoutError('the driver ran out of its %d s' % DRIVER_TIMEOUT)

    signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(DRIVER_TIMEOUT)
    started = time.monotonic()
    try:
        if args.agent == 'cloud-init':
            drive_cloud_init(args.scenario, args.description, result)
        elif args.agent == 'waagent':
            drive_waagent(args.scenario, args.description, result, workdir)
        elif args.agent == 'guard':
            drive_guard_selftest(result, workdir)
        else:
            raise ValueError('no agent %r' % args.agent)
        result['ok'] = True
    except BaseException as exc:    # the result line must go out in every case
        result['error'] = '%s: %s' % (exc.__class__.__name__, exc)
        traceback.print_exc()
    finally:
        signal.alarm(0)
    result['seconds'] = round(time.monotonic() - started, 3)
    result['connections'] = guard.connections
    result['refused'] = guard.refused
    result['programs'] = guard.programs
    tree = os.path.abspath(os.environ.get('PYTHONPATH', '/nonexistent')) + os.sep
    result['modules'] = sorted(set(
        name.split('.')[0] for name, module in list(sys.modules.items())
        if (getattr(module, '__file__', None) or '').startswith(tree)))
    sys.stdout.flush()
    sys.stdout.write('\n' + RESULT_MARK + json.dumps(result, sort_keys=True, default=repr) + '\n')
    sys.stdout.flush()
    return 0 if result['ok'] else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command')
    command = commands.add_parser('drive', help='run one agent scenario (in the agent tree)')
    command.add_argument('--agent', required=True, choices=sorted(SCENARIOS))
    command.add_argument('--scenario', required=True)
    command.add_argument('--wireserver', required=True, help='the emulator, 127.0.0.1:PORT')
    command.add_argument('--workdir', required=True, help='the only place it may write')
    command.add_argument('--description', default='provisioning failed (agents.py)')
    command = commands.add_parser('fetch', help='fetch and unpack both agents, print the trees')
    args = parser.parse_args(argv)
    if args.command == 'drive':
        return drive(args)
    if args.command == 'fetch':
        for agent in sorted(PACKAGES):
            try:
                tree = prepare(agent)
            except Unavailable as exc:
                print('%s: unavailable: %s' % (agent, exc))
                return 1
            print('%s %s: %s' % (agent, tree.version(agent), tree.dist_packages))
        return 0
    parser.print_help()
    return 2


if __name__ == '__main__':
    sys.exit(main())
