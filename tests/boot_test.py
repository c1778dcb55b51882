#!/usr/bin/env python3
"""Real-boot test: a Debian VM under QEMU runs the installed azure-provisioning unit.

    python3 tests/boot_test.py [--keep] [--cache-dir DIR] [--only NAME[,NAME]] [--list]
                               [--repo DIR]

Builds a Debian bookworm root filesystem from Debian's packages (mmdebstrap minbase,
systemd-networkd with DHCP, a kernel; cached in --cache-dir while its recipe is
unchanged), installs OUR files into a fresh copy with the real `install.sh --root`
(the unit stays exactly as a user gets it) plus a test-only checker unit from
tests/boot/, and boots it under QEMU.  The guest's network is slirp with
`restrict=on`, moved to 168.0.0.0/7 so that 168.63.129.16:80 and 169.254.169.254:80
exist inside it and are forwarded (guestfwd, `nc`) to tests/fake_azure.py on this
machine's loopback: the unit runs with its default addresses and no packet leaves the
machine.

Boots (each one a test; the names work with --only):
  first         fresh disk: Ready accepted for the current incarnation, IMDS asked with
                Metadata: true, hostname and /etc/hostname = computerName (not the
                scale-set style compute.name), /etc/hosts updated, the unit started
                after network-online.target (with a DHCP lease), it disabled itself,
                its step lines are on the serial console.
  second        the same disk again: the unit does not run, the emulator sees no
                request from it (the checker's own marked probe proves that the guest
                could have reached it).
  failure       invalid computerName: ProvisioningFailed reported with a readable
                description, the unit stays enabled, the hostname is untouched.
  slow-network  the WireServer refuses connections for the first seconds of the boot
                (until SLOW_MARGIN s after the unit's first request was seen in earlier
                boots of this run, else SLOW_WIRESERVER_UP s): the guest did hit the
                closed port (seen in the packet capture) and Ready is still accepted.
  no-dbus       dbus masked (hostnamectl cannot work): the hostname is still set,
                through the sethostname fallback.
  networkmanager  optional (only with --only): `first` on an image with NetworkManager
                instead of systemd-networkd.
The image has dbus, as Azure's images do, so `first` goes through hostnamectl and
systemd-hostnamed; `no-dbus` covers minimal images without it.

Variants: a base recipe (RECIPES: packages + network stack, cached), a per-run image
(IMAGES: install.sh options, tweaks of the tree, extra guest facts for the checker) and
a boot (BOOTS: emulator keywords, check function) are each one entry below.

Guest facts come from tests/boot/azp-boot-check (a test-only unit ordered after ours)
over the second serial port; it powers the VM off.  Pass/fail is decided from what
the host saw (emulator record, facts, console, packet capture); QEMU's exit status
says nothing.  Each boot has a hard time limit and QEMU is stopped by its PID.

Needs root (mmdebstrap, image files owned by root), qemu-system-x86, mmdebstrap,
netcat-openbsd and e2fsprogs (installed with apt-get when missing), and Debian's
package mirror for the first build.  Anything missing is a failure with a clear
message, never a skip.  Ends with one line `N passed, M failed`; exit status 0 only
when every boot passed.
"""

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BOOT_DIR = os.path.join(HERE, 'boot')
DEFAULT_REPO = os.path.dirname(HERE)

# ---------------------------------------------------------------------------
# What is built and booted
# ---------------------------------------------------------------------------

SUITE = 'bookworm'
BASE_PACKAGES = ['systemd', 'systemd-sysv', 'udev', 'dbus', 'python3', 'iproute2',
                 'linux-image-amd64']
# Not needed in a QEMU guest; leaving them out makes the tree ~40% smaller.
DPKG_EXCLUDES = ['/usr/share/man/*', '/usr/share/doc/*', '/usr/share/locale/*',
                 '/usr/share/info/*'] + [
    '/usr/lib/modules/*/kernel/' + d + '/*'
    for d in ('drivers/gpu', 'drivers/media', 'sound', 'drivers/net/wireless',
              'drivers/infiniband', 'drivers/staging', 'drivers/iio', 'drivers/bluetooth',
              'net/bluetooth', 'drivers/isdn')]
RECIPE_VERSION = 1          # bump to force a rebuild of every cached base
HOST_PACKAGES = {'qemu-system-x86_64': 'qemu-system-x86', 'mmdebstrap': 'mmdebstrap',
                 'nc': 'netcat-openbsd', 'mke2fs': 'e2fsprogs', 'timeout': 'coreutils'}
HOST_PACKAGES_WITH_RECOMMENDS = ['mmdebstrap']   # its recommends (distro-info, gpg) help it

IMAGE_HOSTNAME = 'azp-image'        # what rootfs-hook.sh names the image
COMPUTER_NAME = 'vm-boot-7'         # osProfile.computerName served by the emulator
VM_NAME = 'azp-vmss_3'              # compute.name, scale-set style: not a valid hostname
BAD_COMPUTER_NAME = 'bad_name!'
INCARNATION = 3                     # not 1: a hard-coded incarnation must fail
SLOW_WIRESERVER_UP = 40.0           # s after QEMU start, unless an earlier boot of this run
SLOW_MARGIN = 12.0                  # showed the unit's first request sooner: then that + this

WIRESERVER_IP = '168.63.129.16'
IMDS_IP = '169.254.169.254'
SLIRP = {'net': '168.0.0.0/7', 'host': '168.0.0.2', 'dns': '168.0.0.3',
         'dhcpstart': '168.0.0.15'}
GUEST_MAC = '52:54:00:a2:00:01'
PROBE_AGENT = 'azp-boot-check'      # User-Agent of the checker's own IMDS probe
UNIT = 'azure-provisioning.service'
CHECKER_UNIT = 'azp-boot-check.service'
GUEST_LIB = '/usr/local/lib/azp-boot-test'

BOOT_TIME_LIMIT = 150.0             # s per boot (a TCG boot takes ~20 s)
POWEROFF_GRACE = 30.0               # s from the facts to QEMU's exit before we stop it
RUN_BUDGET = 510.0                  # s: no boot starts after this (CI aim: < 10 min)


class BaseRecipe(object):
    """A cached base root filesystem: packages + rootfs-hook.sh with a network stack."""

    def __init__(self, name, packages, network='networkd', lease_pattern=r'DHCPv4 address'):
        self.name = name
        self.packages = list(packages)
        self.network = network
        self.lease_pattern = lease_pattern   # journal line of the DHCP lease

    def mmdebstrap_args(self, hook):
        args = ['mmdebstrap', '--variant=minbase', '--include=' + ','.join(self.packages)]
        args += ['--dpkgopt=path-exclude=' + p for p in DPKG_EXCLUDES]
        args += ['--essential-hook=sh %s essential "$1" %s' % (shlex.quote(hook), self.network),
                 '--customize-hook=sh %s customize "$1" %s' % (shlex.quote(hook), self.network)]
        return args + [SUITE]

    def key(self):
        with open(os.path.join(BOOT_DIR, 'rootfs-hook.sh'), 'rb') as f:
            hook = f.read()
        recipe = json.dumps([RECIPE_VERSION, self.mmdebstrap_args('HOOK'),
                             hashlib.sha256(hook).hexdigest()], sort_keys=True)
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]


RECIPES = {
    'networkd': BaseRecipe('networkd', BASE_PACKAGES),
    # For later variants (issue 6): NetworkManager instead of systemd-networkd.
    'networkmanager': BaseRecipe('networkmanager', BASE_PACKAGES + ['network-manager'],
                                 network='networkmanager',
                                 lease_pattern=r'dhcp4 \(.*\).*(state changed bound|'
                                               r'new lease|address )'),
}


def mask_units(*units):
    def tweak(tree):
        for unit in units:
            link = os.path.join(tree, 'etc/systemd/system', unit)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink('/dev/null', link)
    tweak.__doc__ = 'mask ' + ' '.join(units)
    return tweak


class GuestImage(object):
    """A disk image made per run: base recipe + install.sh --root (with install_args)
    + the checker + tweaks (functions of the tree, run after install.sh).
    checker_config: {'files': [guest paths to report (content, mode, owner)],
    'commands': {name: argv to run in the guest}}; both end up in the facts
    (facts['files'][path], facts['commands'][name]); see tests/boot/azp-boot-check."""

    def __init__(self, name, recipe='networkd', install_args=(), tweaks=(),
                 checker_config=None):
        self.name = name
        self.recipe = RECIPES[recipe]
        self.install_args = list(install_args)
        self.tweaks = list(tweaks)
        self.checker_config = checker_config or {}


IMAGES = {
    'default': GuestImage('default'),
    'no-dbus': GuestImage('no-dbus', tweaks=[mask_units('dbus.service', 'dbus.socket')]),
    'networkmanager': GuestImage('networkmanager', recipe='networkmanager'),
}


class Boot(object):
    """One boot of a VM.  emulator: FakeAzure keywords, or a function of the VmRuns of
    the boots before it returning them.  disk_from: boot the disk another boot left
    behind (that boot runs first).  check(ctx, c) judges the boot."""

    def __init__(self, name, check, image='default', emulator=None, disk_from=None,
                 time_limit=BOOT_TIME_LIMIT, optional=False):
        self.name = name
        self.optional = optional        # run only when named with --only
        self.check = check
        self.image = image
        self.emulator = emulator or {}
        self.disk_from = disk_from
        self.time_limit = time_limit

    def emulator_kwargs(self, history):
        if callable(self.emulator):
            return self.emulator(history)
        return dict(self.emulator)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def say(text=''):
    sys.stdout.write(text + '\n')
    sys.stdout.flush()


class TestFailure(Exception):
    """The test could not be carried out (host setup, image build): fails every boot."""


def run(cmd, what, timeout, log=None, cwd=None, env=None):
    """Run cmd with a time limit; returns (output, seconds).  With log, the output goes
    (appended) to that file instead.  Raises TestFailure with the output's tail."""
    started = time.monotonic()
    out = open(log, 'ab') if log else tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            why = 'exit status %d' % rc
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            rc, why = None, 'time limit of %d s' % timeout
        out.flush()
        if log:
            text = tail_of(log) if rc != 0 else ''
        else:
            out.seek(0)
            text = out.read().decode('utf-8', 'replace')
        if rc != 0:
            raise TestFailure('%s failed (%s):\n%s' % (what, why, text[-3000:]))
        return text, time.monotonic() - started
    finally:
        out.close()


def tail_of(path, limit=3000):
    try:
        with open(path, 'rb') as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode('utf-8', 'replace')
    except OSError:
        return ''


def stop_process_group(proc, grace=5.0):
    """Stop a child we started in its own session: SIGTERM to its PID, SIGKILL after
    grace, then whatever is left of its process group (QEMU's nc children)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def read_bytes(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return b''


# ---------------------------------------------------------------------------
# Host preparation
# ---------------------------------------------------------------------------

def openbsd_nc():
    """guestfwd's `cmd:nc` needs OpenBSD's nc, which exits when the server closes."""
    if not shutil.which('nc'):
        return False
    proc = subprocess.Popen(['nc', '-h'], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)
    try:
        return 'OpenBSD' in proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False


def ensure_host_tools():
    missing = sorted(set(pkg for tool, pkg in HOST_PACKAGES.items() if not shutil.which(tool)))
    if 'netcat-openbsd' not in missing and not openbsd_nc():
        missing.append('netcat-openbsd')
    if not missing:
        return
    if os.geteuid() != 0:
        raise TestFailure('missing host packages %s and not root to install them'
                          % ' '.join(missing))
    say('installing host packages: %s' % ' '.join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    try:
        run(['apt-get', 'update', '-q'], 'apt-get update', 600, env=env)
        plain = [p for p in missing if p not in HOST_PACKAGES_WITH_RECOMMENDS]
        if plain:
            run(['apt-get', 'install', '-y', '-q', '--no-install-recommends'] + plain,
                'apt-get install ' + ' '.join(plain), 900, env=env)
        rich = [p for p in missing if p in HOST_PACKAGES_WITH_RECOMMENDS]
        if rich:
            run(['apt-get', 'install', '-y', '-q'] + rich, 'apt-get install ' + ' '.join(rich),
                900, env=env)
    except (TestFailure, OSError) as exc:
        raise TestFailure('cannot install %s (QEMU/mmdebstrap are required): %s'
                          % (' '.join(missing), exc))
    still = [t for t in HOST_PACKAGES if not shutil.which(t)]
    if not openbsd_nc():
        still.append("nc (OpenBSD's; `nc -h` does not say OpenBSD)")
    if still:
        raise TestFailure('after apt-get install, still not found: %s' % ' '.join(still))


def choose_accelerator():
    """KVM only when the CPU has VMX/SVM and /dev/kvm is a real KVM: the PVM module
    (kvm_pvm) found on some of these machines cannot run a stock Debian kernel and
    hangs the guest silently.  AZP_BOOT_ACCEL=tcg|kvm overrides."""
    forced = os.environ.get('AZP_BOOT_ACCEL')
    if forced in ('tcg', 'kvm'):
        return forced, 'AZP_BOOT_ACCEL=%s' % forced
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(re.findall(r'\b(vmx|svm)\b', f.read()))
    except OSError:
        flags = set()
    if not flags:
        return 'tcg', 'no vmx/svm in /proc/cpuinfo'
    if os.path.exists('/sys/module/kvm_pvm'):
        return 'tcg', '/sys/module/kvm_pvm present (PVM cannot boot a stock kernel)'
    if not os.access('/dev/kvm', os.R_OK | os.W_OK):
        return 'tcg', '/dev/kvm not usable'
    return 'kvm', '%s and /dev/kvm' % '/'.join(sorted(flags))


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def base_rootfs(recipe, cache_dir, log):
    """The cached base tree for recipe (built when missing).  Returns (tree, how)."""
    os.makedirs(cache_dir, exist_ok=True)
    key = recipe.key()
    final = os.path.join(cache_dir, 'base-%s-%s' % (recipe.name, key))
    with open(os.path.join(cache_dir, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(final, 'complete')):
            return os.path.join(final, 'rootfs'), 'cached (%s)' % final
        for old in os.listdir(cache_dir):       # other keys of this recipe, half builds
            if old.startswith('base-%s-' % recipe.name) or old.startswith('.build-'):
                shutil.rmtree(os.path.join(cache_dir, old), ignore_errors=True)
        building = tempfile.mkdtemp(prefix='.build-', dir=cache_dir)
        hook = os.path.join(BOOT_DIR, 'rootfs-hook.sh')
        cmd = recipe.mmdebstrap_args(hook) + [os.path.join(building, 'rootfs')]
        say('building base root filesystem %r with mmdebstrap (log: %s)' % (recipe.name, log))
        _, took = run(cmd, 'mmdebstrap (%s)' % recipe.name, 900, log=log)
        with open(os.path.join(building, 'recipe.json'), 'w') as f:
            json.dump({'cmd': cmd, 'key': key}, f, indent=1)
        with open(os.path.join(building, 'complete'), 'w') as f:
            f.write('%s\n' % time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
        os.rename(building, final)
        return os.path.join(final, 'rootfs'), 'built in %.0f s (%s)' % (took, final)


def find_boot_files(tree):
    boot = os.path.join(tree, 'boot')
    kernels = sorted(n for n in os.listdir(boot) if n.startswith('vmlinuz-'))
    if len(kernels) != 1:
        raise TestFailure('expected one kernel in %s, found %s' % (boot, kernels))
    version = kernels[0][len('vmlinuz-'):]
    initrd = os.path.join(boot, 'initrd.img-' + version)
    if not os.path.isfile(initrd):
        raise TestFailure('no initrd for kernel %s in %s' % (version, boot))
    return os.path.join(boot, kernels[0]), initrd


def install_checker(tree, config):
    lib = os.path.join(tree, GUEST_LIB.lstrip('/'))
    os.makedirs(lib, exist_ok=True)
    shutil.copyfile(os.path.join(BOOT_DIR, 'azp-boot-check'), os.path.join(lib, 'azp-boot-check'))
    os.chmod(os.path.join(lib, 'azp-boot-check'), 0o755)
    with open(os.path.join(lib, 'config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    units = os.path.join(tree, 'etc/systemd/system')
    shutil.copyfile(os.path.join(BOOT_DIR, CHECKER_UNIT), os.path.join(units, CHECKER_UNIT))
    os.chmod(os.path.join(units, CHECKER_UNIT), 0o644)
    wants = os.path.join(units, 'multi-user.target.wants')
    os.makedirs(wants, exist_ok=True)
    link = os.path.join(wants, CHECKER_UNIT)
    if not os.path.lexists(link):
        os.symlink('/etc/systemd/system/' + CHECKER_UNIT, link)


def installed_unit_problems(tree, repo):
    """What install.sh left in the tree, compared with the repo's files."""
    problems = []
    script = os.path.join(tree, 'usr/local/sbin/azure-provisioning')
    if read_bytes(script) != read_bytes(os.path.join(repo, 'azure_provisioning.py')):
        problems.append('/usr/local/sbin/azure-provisioning differs from azure_provisioning.py')
    elif os.stat(script).st_mode & 0o777 != 0o755:
        problems.append('/usr/local/sbin/azure-provisioning mode %o, not 755'
                        % (os.stat(script).st_mode & 0o777))
    unit = os.path.join(tree, 'etc/systemd/system', UNIT)
    if not os.path.isfile(unit):
        problems.append('/etc/systemd/system/%s missing' % UNIT)
    links = [os.path.join(d, UNIT) for d in os.listdir(os.path.join(tree, 'etc/systemd/system'))
             if d.endswith('.wants') and
             os.path.lexists(os.path.join(tree, 'etc/systemd/system', d, UNIT))]
    if not links:
        problems.append('%s is not enabled (no .wants symlink)' % UNIT)
    return problems


def build_image(image, workdir, cache_dir, repo, log):
    """Make the pristine disk image of `image`.  Returns dict(disk, kernel, initrd, notes)."""
    base, how = base_rootfs(image.recipe, cache_dir, log)
    say('base root filesystem: %s' % how)
    out = os.path.join(workdir, 'image-' + image.name)
    tree = os.path.join(out, 'rootfs')
    os.makedirs(out)
    started = time.monotonic()
    run(['cp', '-a', '--reflink=auto', base, tree], 'copying the base tree', 300)
    text, _ = run(['sh', os.path.join(repo, 'install.sh'), '--root', tree] + image.install_args,
                  'sh install.sh --root %s %s' % (tree, ' '.join(image.install_args)), 120,
                  cwd=repo)
    with open(os.path.join(out, 'install.log'), 'w') as f:
        f.write(text)
    problems = installed_unit_problems(tree, repo)
    if problems:
        raise TestFailure('install.sh --root: ' + '; '.join(problems))
    install_checker(tree, image.checker_config)
    for tweak in image.tweaks:
        tweak(tree)
    kernel, initrd = find_boot_files(tree)
    for src in (kernel, initrd):
        shutil.copyfile(src, os.path.join(out, os.path.basename(src)))
    disk = os.path.join(out, 'pristine.ext4')
    run(['mke2fs', '-q', '-t', 'ext4', '-L', 'root', '-d', tree, '-F', disk, '2G'],
        'mke2fs', 300)
    shutil.rmtree(tree)
    say('image %r: install.sh --root ok, %s; disk made in %.1f s%s'
        % (image.name, install_summary(text), time.monotonic() - started,
           ''.join('; ' + (t.__doc__ or t.__name__) for t in image.tweaks)))
    return {'disk': disk, 'kernel': os.path.join(out, os.path.basename(kernel)),
            'initrd': os.path.join(out, os.path.basename(initrd))}


def install_summary(text):
    for line in text.splitlines():
        if 'unit runs:' in line:
            return line.split('unit runs:', 1)[1].strip()
    return 'unit installed'


def copy_disk(src, dest):
    run(['cp', '--sparse=always', '--reflink=auto', src, dest], 'copying the disk image', 120)


# ---------------------------------------------------------------------------
# QEMU
# ---------------------------------------------------------------------------

class VmRun(object):
    def __init__(self):
        self.ready_after = None     # s from QEMU start to the first accepted Ready
        self.first_request_after = None   # s from QEMU start to the unit's first request
        self.duration = None        # s QEMU ran
        self.outcome = None         # 'powered off', 'timeout', 'no poweroff', 'qemu exit N'
        self.facts = None
        self.console = ''
        self.qemu_log = ''
        self.packets = []


def load_fake_azure(repo):
    path = os.path.join(repo, 'tests', 'fake_azure.py')
    if not os.path.isfile(path):
        raise TestFailure('%s not found' % path)
    spec = importlib.util.spec_from_file_location('azp_boot_fake_azure', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeAzure


def qemu_command(files, disk, accel, wport, iport, rundir):
    fwd = ('guestfwd=tcp:%s:80-cmd:nc 127.0.0.1 %d,guestfwd=tcp:%s:80-cmd:nc 127.0.0.1 %d'
           % (WIRESERVER_IP, wport, IMDS_IP, iport))
    netdev = 'user,id=n0,restrict=on,%s,%s' % (
        ','.join('%s=%s' % (k, SLIRP[k]) for k in ('net', 'host', 'dns', 'dhcpstart')), fwd)
    return ['qemu-system-x86_64', '-name', 'azp-boot-test', '-nodefaults', '-no-user-config',
            '-display', 'none', '-no-reboot', '-accel', accel, '-m', '1024', '-smp', '2',
            '-kernel', files['kernel'], '-initrd', files['initrd'],
            '-append', 'root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1',
            '-drive', 'file=%s,format=raw,if=virtio,cache=unsafe' % disk,
            '-netdev', netdev,
            '-device', 'virtio-net-pci,netdev=n0,mac=' + GUEST_MAC,
            '-object', 'filter-dump,id=d0,netdev=n0,file=' + os.path.join(rundir, 'net.pcap'),
            '-device', 'virtio-rng-pci',
            '-serial', 'file:' + os.path.join(rundir, 'console.log'),
            '-serial', 'file:' + os.path.join(rundir, 'facts.log')]


def boot_vm(files, disk, accel, az, rundir, time_limit):
    """Boot once; returns a VmRun.  Never waits longer than time_limit (+ a few s)."""
    vm = VmRun()
    wport = int(az.wireserver_addr.rsplit(':', 1)[1])
    iport = int(az.imds_addr.rsplit(':', 1)[1])
    cmd = qemu_command(files, disk, accel, wport, iport, rundir)
    with open(os.path.join(rundir, 'qemu.cmd'), 'w') as f:
        f.write(' '.join("'%s'" % a if ' ' in a else a for a in cmd) + '\n')
    facts_path = os.path.join(rundir, 'facts.log')
    qemu_log = open(os.path.join(rundir, 'qemu.log'), 'wb')
    started = time.monotonic()
    wall_started = time.time()
    # timeout(1) as a backstop: QEMU ends even if this script is killed outright.
    proc = subprocess.Popen(['timeout', '-k', '5', '%d' % (time_limit + 15)] + cmd,
                            stdin=subprocess.DEVNULL, stdout=qemu_log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    facts_at = None
    try:
        while True:
            now = time.monotonic()
            if vm.ready_after is None and az.ready_accepted():
                vm.ready_after = now - started
            rc = proc.poll()
            if rc is not None:
                vm.outcome = 'powered off' if rc == 0 else 'qemu exit status %d' % rc
                if rc == 124:
                    vm.outcome = 'stopped by timeout(1)'
                break
            if facts_at is None and b'AZP-FACTS-END' in read_bytes(facts_path):
                facts_at = now
            if facts_at is not None and now - facts_at > POWEROFF_GRACE:
                vm.outcome = 'no poweroff %d s after the facts: stopped' % POWEROFF_GRACE
                break
            if now - started > time_limit:
                vm.outcome = 'time limit %d s reached: stopped' % time_limit
                break
            time.sleep(0.2)
    finally:
        stop_process_group(proc)
        qemu_log.close()
    vm.duration = time.monotonic() - started
    # The emulator's own clock for the Ready POST is more exact than our polling.
    for report in az.health_reports:
        if report.get('state') == 'Ready' and 200 <= report.get('status', 0) < 300 \
                and isinstance(report.get('time'), float):
            exact = report['time'] - wall_started
            if 0 <= exact <= vm.duration + 1:
                vm.ready_after = exact
            break
    unit_times = [r['time'] - wall_started for r in az.requests
                  if r['headers'].get('user-agent') != PROBE_AGENT]
    vm.first_request_after = min(unit_times) if unit_times else None
    vm.console = read_bytes(os.path.join(rundir, 'console.log')).decode('utf-8', 'replace')
    vm.qemu_log = read_bytes(os.path.join(rundir, 'qemu.log')).decode('utf-8', 'replace')
    vm.facts = parse_facts(read_bytes(facts_path))
    vm.packets = read_pcap(os.path.join(rundir, 'net.pcap'))
    return vm


def parse_facts(data):
    text = data.decode('utf-8', 'replace').replace('\r', '')
    match = re.search(r'AZP-FACTS-BEGIN\n(.*?)\nAZP-FACTS-END', text, re.S)
    if not match:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Packet capture (filter-dump writes classic pcap, Ethernet frames)
# ---------------------------------------------------------------------------

def read_pcap(path):
    """[(timestamp, frame bytes)]; [] when missing or unreadable."""
    data = read_bytes(path)
    if len(data) < 24:
        return []
    magic = struct.unpack('<I', data[:4])[0]
    if magic in (0xa1b2c3d4, 0xa1b23c4d):
        endian = '<'
    elif magic in (0xd4c3b2a1, 0x4d3cb2a1):
        endian = '>'
    else:
        return []
    nano = magic in (0xa1b23c4d, 0x4d3cb2a1)
    packets, offset = [], 24
    while offset + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + 'IIII', data[offset:offset + 16])
        offset += 16
        packets.append((sec + frac / (1e9 if nano else 1e6), data[offset:offset + incl]))
        offset += incl
    return packets


def ip_str(raw):
    return '.'.join(str(b) for b in bytearray(raw))


def decode_frame(frame):
    """Ethernet/IPv4 -> dict(src_mac, src, dst, proto, sport, dport, flags, payload) or None."""
    if len(frame) < 34 or frame[12:14] != b'\x08\x00':
        return None
    ip = frame[14:]
    ihl = (bytearray(ip)[0] & 0x0f) * 4
    proto = bytearray(ip)[9]
    total = struct.unpack('!H', ip[2:4])[0]
    packet = {'src_mac': ':'.join('%02x' % b for b in bytearray(frame[6:12])),
              'src': ip_str(ip[12:16]), 'dst': ip_str(ip[16:20]), 'proto': proto}
    body = ip[ihl:total]
    if proto in (6, 17) and len(body) >= 8:
        packet['sport'], packet['dport'] = struct.unpack('!HH', body[:4])
        if proto == 6 and len(body) >= 20:
            packet['flags'] = bytearray(body)[13]
            packet['payload'] = body[(bytearray(body)[12] >> 4) * 4:]
        else:
            packet['payload'] = body[8:]
    return packet


DHCP_TYPES = {1: 'DISCOVER', 2: 'OFFER', 3: 'REQUEST', 4: 'DECLINE', 5: 'ACK', 6: 'NAK',
              7: 'RELEASE', 8: 'INFORM'}


def dhcp_messages(packets):
    """DHCP messages in the capture: dicts with time, type, hostname (option 12),
    requested (option 50), ciaddr, yiaddr, from_guest."""
    found = []
    for ts, frame in packets:
        p = decode_frame(frame)
        if not p or p['proto'] != 17 or {p.get('sport'), p.get('dport')} != {67, 68}:
            continue
        body = p['payload']
        if len(body) < 240 or body[236:240] != b'\x63\x82\x53\x63':
            continue
        options, i = {}, 240
        while i < len(body):
            code = bytearray(body)[i]
            if code == 255:
                break
            if code == 0:
                i += 1
                continue
            length = bytearray(body)[i + 1] if i + 1 < len(body) else 0
            options[code] = body[i + 2:i + 2 + length]
            i += 2 + length
        kind = bytearray(options.get(53, b'\x00'))[0] if options.get(53) else 0
        found.append({'time': ts, 'type': DHCP_TYPES.get(kind, str(kind)),
                      'hostname': options[12].decode('ascii', 'replace') if 12 in options else None,
                      'requested': ip_str(options[50]) if len(options.get(50, b'')) == 4 else None,
                      'ciaddr': ip_str(body[12:16]), 'yiaddr': ip_str(body[16:20]),
                      'from_guest': p['src_mac'] == GUEST_MAC})
    return found


def tcp_syns_from_guest(packets, dst, dport):
    """Times (host clock: filter-dump stamps packets with the wall time) of the guest's
    TCP connection attempts to dst:dport."""
    times = []
    for ts, frame in packets:
        p = decode_frame(frame)
        if p and p['proto'] == 6 and p['src_mac'] == GUEST_MAC and p['dst'] == dst \
                and p.get('dport') == dport and p.get('flags', 0) & 0x12 == 0x02:
            times.append(ts)
    return times


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

class Checks(object):
    def __init__(self):
        self.failures = []
        self.count = 0

    def expect(self, ok, what, detail=''):
        self.count += 1
        if not ok:
            self.failures.append(what)
        say('    %s %s%s' % ('ok  ' if ok else 'FAIL', what, ' (%s)' % detail if detail else ''))
        return ok


class Context(object):
    """What one boot left for its checks."""

    def __init__(self, boot, az, vm, emulator, emulator_started):
        self.boot = boot
        self.emulator = emulator        # the FakeAzure keywords of this boot
        self.emulator_started = emulator_started    # its time.time() at start
        self.az = az
        self.vm = vm
        self.facts = vm.facts or {}
        self.requests = az.requests
        self.unit_requests = [r for r in self.requests
                              if r['headers'].get('user-agent') != PROBE_AGENT]
        self.reports = az.health_reports

    def unit(self, name=UNIT):
        return self.facts.get('units', {}).get(name, {})

    def mono(self, unit, prop):
        try:
            return int(self.unit(unit).get(prop) or 0)
        except ValueError:
            return 0

    def is_enabled(self):
        return (self.facts.get('is_enabled') or {}).get('output', '').strip()

    def file_text(self, path):
        return (self.facts.get('files', {}).get(path) or {}).get('content')

    def step_lines(self):
        """Our log lines on the serial console (azure-provisioning: ...)."""
        return [m.group(0).strip() for m in
                re.finditer(r'azure-provisioning: [^\r\n]*', self.vm.console)]

    def journal_this_boot(self):
        boot_id = self.facts.get('boot_id')
        return [e for e in self.facts.get('unit_journal_all_boots', [])
                if e.get('boot') == boot_id]


def hosts_names(text):
    names = set()
    for line in (text or '').splitlines():
        fields = line.split('#', 1)[0].split()
        names.update(fields[1:])
    return names


def check_common(ctx, c):
    """Every boot: the VM came up and the checker reported."""
    vm = ctx.vm
    c.expect(vm.facts is not None, 'guest facts received from the checker unit',
             'VM %s after %.1f s' % (vm.outcome, vm.duration))
    if vm.facts and 'checker_error' in vm.facts:
        c.expect(False, 'checker ran without error', vm.facts['checker_error'])
    c.expect(vm.outcome == 'powered off', 'VM powered itself off', vm.outcome)


def check_ready(ctx, c, incarnation=INCARNATION):
    ready = [r for r in ctx.reports if r.get('state') == 'Ready']
    accepted = [r for r in ready if 200 <= r.get('status', 0) < 300]
    c.expect(bool(accepted) and ctx.az.ready_accepted(),
             'Ready accepted by the WireServer',
             'after %.1f s' % ctx.vm.ready_after if ctx.vm.ready_after is not None else
             '%d Ready reports, statuses %s' % (len(ready), [r.get('status') for r in ready]))
    c.expect(bool(accepted) and all(str(r.get('incarnation')) == str(incarnation)
                                    for r in accepted),
             'Ready carries the current incarnation %s' % incarnation,
             'reported %s' % sorted(set(str(r.get('incarnation')) for r in ready)))
    c.expect(not [r for r in ctx.reports if r.get('state') != 'Ready'],
             'no NotReady report', str([r.get('description') for r in ctx.reports
                                        if r.get('state') != 'Ready'])[:300])


def check_imds_requests(ctx, c):
    imds = [r for r in ctx.unit_requests if r['server'] == 'imds']
    doc = [r for r in imds if r['path'].startswith('/metadata/instance?')]
    c.expect(bool(doc) and all(r['headers'].get('metadata') == 'true' for r in imds),
             'IMDS asked for /metadata/instance with Metadata: true',
             '%d IMDS requests: %s' % (len(imds), ', '.join(
                 '%s %s -> %s' % (r['method'], r['path'], r['status']) for r in imds[:4])))
    c.expect(not [r for r in imds if 'x-forwarded-for' in r['headers']],
             'no IMDS request through a proxy (X-Forwarded-For)')
    wire = [r for r in ctx.unit_requests if r['server'] == 'wireserver']
    c.expect(bool(wire) and all(r['headers'].get('x-ms-version') for r in wire),
             'WireServer requests carry x-ms-version',
             ', '.join('%s %s -> %s' % (r['method'], r['path'], r['status']) for r in wire[:6]))


def check_hostname(ctx, c, name):
    c.expect(ctx.facts.get('hostname') == name,
             'guest hostname is %s' % name, 'guest says %r' % ctx.facts.get('hostname'))
    etc = (ctx.file_text('/etc/hostname') or '').strip()
    c.expect(etc == name, '/etc/hostname is %s' % name, 'file has %r' % etc)
    names = hosts_names(ctx.file_text('/etc/hosts'))
    c.expect(name in names and IMAGE_HOSTNAME not in names,
             '/etc/hosts names %s instead of the image name %s' % (name, IMAGE_HOSTNAME),
             'names in /etc/hosts: %s' % ' '.join(sorted(names)))


def check_ran_after_network(ctx, c):
    unit_start = ctx.mono(UNIT, 'InactiveExitTimestampMonotonic')
    online = ctx.mono('network-online.target', 'ActiveEnterTimestampMonotonic')
    wait_online = [u for u in ('systemd-networkd-wait-online.service',
                               'NetworkManager-wait-online.service')
                   if ctx.unit(u).get('Result') == 'success'
                   and ctx.mono(u, 'ActiveEnterTimestampMonotonic')]
    c.expect(bool(wait_online), 'a wait-online service ran to success',
             ', '.join(wait_online) or 'none')
    c.expect(0 < online <= unit_start,
             'the unit started after network-online.target was reached',
             'network-online.target at %.3f s, unit started at %.3f s (monotonic)'
             % (online / 1e6, unit_start / 1e6))
    recipe = IMAGES[ctx.boot.image].recipe
    leases = [e['monotonic'] for e in ctx.facts.get('network_journal', [])
              if re.search(recipe.lease_pattern, e.get('message') or '')]
    c.expect(bool(leases) and min(leases) < unit_start,
             'the DHCP lease came before the unit started',
             'lease logged at %.3f s' % (min(leases) / 1e6) if leases else
             'no journal line matching %r' % recipe.lease_pattern)


def check_unit_succeeded_and_disabled(ctx, c):
    u = ctx.unit()
    c.expect(u.get('Result') == 'success' and u.get('ExecMainStatus') == '0'
             and ctx.mono(UNIT, 'ExecMainStartTimestampMonotonic') > 0,
             'the unit ran and exited 0',
             'Result=%s ExecMainStatus=%s' % (u.get('Result'), u.get('ExecMainStatus')))
    c.expect(ctx.is_enabled() == 'disabled', 'the unit is disabled afterwards',
             'systemctl is-enabled: %s' % ctx.is_enabled())


def check_unit_file_unmodified(ctx, c):
    text = (ctx.facts.get('unit_cat') or {}).get('output', '')
    sources = re.findall(r'^# (/\S+)$', text, re.M)
    c.expect(sources == ['/etc/systemd/system/' + UNIT],
             'the guest runs the unit as installed, without drop-ins',
             'systemctl cat shows %s' % ', '.join(sources))


def check_console(ctx, c, must_match):
    lines = ctx.step_lines()
    for pattern, what in must_match:
        hits = [l for l in lines if re.search(pattern, l)]
        c.expect(bool(hits), 'serial console: ' + what,
                 hits[0] if hits else '%d step lines, none matching %r' % (len(lines), pattern))


def check_first(ctx, c):
    check_common(ctx, c)
    check_ready(ctx, c)
    check_imds_requests(ctx, c)
    check_hostname(ctx, c, COMPUTER_NAME)
    hostnamed = ctx.mono('systemd-hostnamed.service', 'ActiveEnterTimestampMonotonic')
    c.expect(hostnamed > 0, 'systemd-hostnamed was used (hostnamectl path, dbus present)')
    check_ran_after_network(ctx, c)
    check_unit_succeeded_and_disabled(ctx, c)
    check_unit_file_unmodified(ctx, c)
    check_console(ctx, c, [
        (r'Ready accepted.*\b%d\b' % INCARNATION, 'Ready accepted line with the incarnation'),
        (r'hostname\b.*\b%s\b' % re.escape(COMPUTER_NAME), 'the hostname line')])
    say('    info: DHCP in the capture: %s' % '; '.join(
        '%s hostname=%s' % (m['type'], m['hostname']) for m in dhcp_messages(ctx.vm.packets)
        if m['from_guest']))


def check_second(ctx, c):
    check_common(ctx, c)
    c.expect(ctx.facts.get('boot_number') == 2, 'the same disk booted a second time',
             'checker counts boot %s' % ctx.facts.get('boot_number'))
    c.expect(not ctx.unit_requests, 'the emulator saw no request from the unit',
             '%d requests: %s' % (len(ctx.unit_requests), ', '.join(
                 '%s %s' % (r['method'], r['path']) for r in ctx.unit_requests[:5])))
    probe = ctx.facts.get('probe') or {}
    probes = [r for r in ctx.requests if r['headers'].get('user-agent') == PROBE_AGENT]
    c.expect(probe.get('status') == 200 and probe.get('body', '').strip() == VM_NAME
             and bool(probes),
             "the checker's own probe reached the emulator (so no request means none sent)",
             str(probe)[:200])
    c.expect(ctx.mono(UNIT, 'InactiveExitTimestampMonotonic') == 0
             and ctx.mono(UNIT, 'ExecMainStartTimestampMonotonic') == 0
             and not ctx.journal_this_boot(),
             'the unit did not start on this boot',
             'state %s, %d journal lines this boot' % (ctx.unit().get('ActiveState'),
                                                       len(ctx.journal_this_boot())))
    c.expect(not ctx.step_lines(), 'no step line on the serial console',
             '; '.join(ctx.step_lines())[:200])
    readys = [e for e in ctx.facts.get('unit_journal_all_boots', [])
              if 'Ready accepted' in (e.get('message') or '')]
    c.expect(len(readys) == 1, 'the journal of both boots holds exactly one Ready run',
             '%d' % len(readys))
    c.expect(ctx.is_enabled() == 'disabled', 'the unit is still disabled', ctx.is_enabled())
    c.expect(ctx.facts.get('hostname') == COMPUTER_NAME,
             'the hostname survived the reboot', repr(ctx.facts.get('hostname')))


def readable(text):
    return bool(text) and all(32 <= ord(ch) < 127 for ch in text) \
        and not re.search(r'&(amp|lt|gt|quot|apos|#\d+);', text)


def check_failure(ctx, c):
    check_common(ctx, c)
    failed = [r for r in ctx.reports if r.get('state') == 'NotReady'
              and r.get('substatus') == 'ProvisioningFailed']
    accepted = [r for r in failed if 200 <= r.get('status', 0) < 300]
    c.expect(bool(accepted), 'NotReady/ProvisioningFailed accepted by the WireServer',
             '%d such reports, statuses %s' % (len(failed), [r.get('status') for r in failed]))
    c.expect(bool(accepted) and all(str(r.get('incarnation')) == str(INCARNATION)
                                    for r in accepted),
             'with the current incarnation %s' % INCARNATION)
    description = accepted[0].get('description') if accepted else ''
    c.expect(readable(description) and description.startswith('result=error|reason=')
             and len(description) <= 512
             and (BAD_COMPUTER_NAME in description or 'hostname' in description.lower()),
             'the description is readable and names the problem', repr(description)[:520])
    c.expect(not [r for r in ctx.reports if r.get('state') == 'Ready'], 'no Ready report')
    u = ctx.unit()
    c.expect(u.get('Result') not in ('success', None) and u.get('ExecMainStatus') == '1',
             'the unit failed with exit status 1',
             'Result=%s ExecMainStatus=%s' % (u.get('Result'), u.get('ExecMainStatus')))
    c.expect(ctx.is_enabled() == 'enabled', 'the unit stays enabled',
             'systemctl is-enabled: %s' % ctx.is_enabled())
    c.expect(ctx.facts.get('hostname') == IMAGE_HOSTNAME
             and (ctx.file_text('/etc/hostname') or '').strip() == IMAGE_HOSTNAME,
             'the hostname was left alone', repr(ctx.facts.get('hostname')))
    check_console(ctx, c, [(r'(?i)error|fail', 'an error line')])


def check_slow(ctx, c):
    check_common(ctx, c)
    check_ready(ctx, c)
    up = ctx.emulator['wireserver_up_after']
    wire = [r for r in ctx.unit_requests if r['server'] == 'wireserver']
    syns = tcp_syns_from_guest(ctx.vm.packets, WIRESERVER_IP, 80)
    early = [t for t in syns if t < ctx.emulator_started + up - 0.5]
    c.expect(bool(early) and all(r['time'] >= ctx.emulator_started + up for r in wire),
             'the guest hit the WireServer while it was down',
             '%d of %d connection attempts to %s:80 in the capture came before it was up; '
             '%d requests reached the emulator, the first %.1f s after start'
             % (len(early), len(syns), WIRESERVER_IP, len(wire),
                min(r['time'] for r in wire) - ctx.emulator_started if wire else -1))
    c.expect(ctx.vm.ready_after is not None and ctx.vm.ready_after >= up - 1,
             'Ready only after the WireServer came up (%.1f s)' % up,
             'Ready after %s s' % ('%.1f' % ctx.vm.ready_after if ctx.vm.ready_after else '-'))
    check_hostname(ctx, c, COMPUTER_NAME)
    check_unit_succeeded_and_disabled(ctx, c)


def check_no_dbus(ctx, c):
    check_common(ctx, c)
    dbus = ctx.unit('dbus.service')
    c.expect(dbus.get('LoadState') == 'masked' and dbus.get('ActiveState') != 'active',
             'dbus is masked and not running',
             'LoadState=%s ActiveState=%s' % (dbus.get('LoadState'), dbus.get('ActiveState')))
    check_ready(ctx, c)
    check_hostname(ctx, c, COMPUTER_NAME)
    c.expect(ctx.mono('systemd-hostnamed.service', 'ActiveEnterTimestampMonotonic') == 0,
             'systemd-hostnamed never ran (so the fallback set the name)')
    check_unit_succeeded_and_disabled(ctx, c)
    check_console(ctx, c, [(r'hostname\b.*\b%s\b' % re.escape(COMPUTER_NAME),
                            'the hostname line')])


def slow_emulator(history):
    """The WireServer comes up SLOW_MARGIN s after the unit's first request was seen in
    the boots before (so it surely refuses the unit's first attempts however fast or
    slow this machine boots), or after SLOW_WIRESERVER_UP s when there were none."""
    seen = [vm.first_request_after for vm in history if vm.first_request_after]
    up = max(seen) + SLOW_MARGIN if seen else SLOW_WIRESERVER_UP
    return dict(EMULATOR, wireserver_up_after=round(up, 1))


EMULATOR = dict(computer_name=COMPUTER_NAME, vm_name=VM_NAME, incarnation=INCARNATION)

BOOTS = [
    Boot('first', check_first, emulator=EMULATOR),
    Boot('second', check_second, disk_from='first', emulator=EMULATOR),
    Boot('failure', check_failure, emulator=dict(EMULATOR, computer_name=BAD_COMPUTER_NAME)),
    Boot('slow-network', check_slow, emulator=slow_emulator,
         time_limit=BOOT_TIME_LIMIT + SLOW_WIRESERVER_UP),
    Boot('no-dbus', check_no_dbus, image='no-dbus', emulator=EMULATOR),
    # Variants for later work (issue 6), run with --only NAME:
    Boot('networkmanager', check_first, image='networkmanager', emulator=EMULATOR,
         optional=True),
]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def select_boots(only):
    by_name = dict((b.name, b) for b in BOOTS)
    if not only:
        return [b for b in BOOTS if not b.optional]
    wanted = set()
    for name in only.split(','):
        name = name.strip()
        if name not in by_name:
            raise SystemExit('boot_test.py: unknown boot %r (known: %s)'
                             % (name, ', '.join(by_name)))
        while name:                 # a boot that reuses a disk needs its predecessor
            wanted.add(name)
            name = by_name[name].disk_from
    return [b for b in BOOTS if b.name in wanted]


def describe_requests(ctx):
    for r in ctx.requests[:30]:
        say('      %-10s %s %s -> %s%s' % (r['server'], r['method'], r['path'], r['status'],
                                           ' (probe)' if r['headers'].get('user-agent')
                                           == PROBE_AGENT else ''))


def run_boot(boot, images, disks, history, FakeAzure, accel, workdir):
    rundir = os.path.join(workdir, 'boot-' + boot.name)
    os.makedirs(rundir)
    if boot.disk_from:
        if boot.disk_from not in disks:
            raise TestFailure('boot %r did not leave a disk' % boot.disk_from)
        disk = disks[boot.disk_from]
    else:
        disk = os.path.join(rundir, 'disk.ext4')
        copy_disk(images[boot.image]['disk'], disk)
    disks[boot.name] = disk
    emulator = boot.emulator_kwargs(history)
    if emulator.get('wireserver_up_after'):
        say('  the WireServer refuses connections for the first %.1f s'
            % emulator['wireserver_up_after'])
    emulator_started = time.time()
    with FakeAzure(**emulator) as az:
        vm = boot_vm(images[boot.image], disk, accel, az, rundir, boot.time_limit)
        ctx = Context(boot, az, vm, emulator, emulator_started)
    history.append(vm)
    say('  QEMU start -> Ready accepted: %s; VM ran %.1f s (%s)'
        % ('%.1f s' % vm.ready_after if vm.ready_after is not None else 'never',
           vm.duration, vm.outcome))
    c = Checks()
    try:
        boot.check(ctx, c)
    except Exception as exc:        # a broken check must fail, not crash the run
        c.expect(False, 'checks ran', '%s: %s' % (exc.__class__.__name__, exc))
    if c.failures:
        say('  emulator saw %d requests:' % len(ctx.requests))
        describe_requests(ctx)
        say('  step lines on the console:')
        for line in ctx.step_lines()[:30]:
            say('      ' + line)
        say('  console tail (%s):' % os.path.join(rundir, 'console.log'))
        for line in vm.console.replace('\r', '').splitlines()[-25:]:
            say('      | ' + line)
        if vm.qemu_log.strip():
            say('  qemu said: ' + vm.qemu_log.strip()[-500:])
    return c, vm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--keep', action='store_true', help='keep the work directory')
    parser.add_argument('--cache-dir', default=os.environ.get('AZP_BOOT_CACHE') or
                        os.path.join(os.path.expanduser('~'), '.cache', 'azp-boot-test'),
                        help='where the base root filesystem is cached '
                             '(default $AZP_BOOT_CACHE or ~/.cache/azp-boot-test)')
    parser.add_argument('--only', metavar='NAME[,NAME]',
                        help='run only these boots (and the boots they depend on)')
    parser.add_argument('--list', action='store_true', help='list the boots and exit')
    parser.add_argument('--repo', default=DEFAULT_REPO,
                        help='source tree whose install.sh and tests/fake_azure.py are used '
                             '(default: the one this file is in)')
    args = parser.parse_args(argv)
    if args.list:
        for b in BOOTS:
            say('%-13s image %s%s%s' % (b.name, b.image,
                                        ', disk of ' + b.disk_from if b.disk_from else '',
                                        ' (optional: only with --only)' if b.optional else ''))
        return 0
    boots = select_boots(args.only)
    repo = os.path.abspath(args.repo)

    def terminated(signum, frame):
        raise SystemExit('boot_test.py: stopped by signal %d' % signum)
    signal.signal(signal.SIGTERM, terminated)     # so that QEMU is stopped, the work dir removed
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix='azp-boot-test-')
    say('boot test: %s; work directory %s' % (', '.join(b.name for b in boots), workdir))
    results = []                    # (name, passed, summary)
    try:
        try:
            if os.geteuid() != 0:
                raise TestFailure('must run as root (mmdebstrap, root-owned image files)')
            ensure_host_tools()
            accel, why = choose_accelerator()
            say('accelerator: %s (%s)' % (accel, why))
            FakeAzure = load_fake_azure(repo)
            images = {}
            for name in sorted(set(b.image for b in boots)):
                images[name] = build_image(IMAGES[name], workdir, args.cache_dir, repo,
                                           os.path.join(workdir, 'mmdebstrap.log'))
        except TestFailure as exc:
            say('FAIL: the boot test could not be set up: %s' % exc)
            for b in boots:
                results.append((b.name, False, 'not run: setup failed'))
            boots = []
        else:
            say('setup done after %.1f s' % (time.monotonic() - started))
        disks, history = {}, []
        for index, boot in enumerate(boots):
            say('')
            say('== boot %s' % boot.name)
            if time.monotonic() - started > RUN_BUDGET:
                say('  FAIL not run: time budget of %d s used up' % RUN_BUDGET)
                results.append((boot.name, False, 'not run: time budget'))
                continue
            if boot.disk_from and not dict((n, p) for n, p, _ in results).get(boot.disk_from):
                say('  note: boot %s failed; this boot still uses its disk' % boot.disk_from)
            try:
                c, vm = run_boot(boot, images, disks, history, FakeAzure, accel, workdir)
            except TestFailure as exc:
                say('  FAIL %s' % exc)
                results.append((boot.name, False, str(exc).splitlines()[0]))
                continue
            summary = '%d checks, %d failed; Ready after %s; VM %.1f s' % (
                c.count, len(c.failures),
                '%.1f s' % vm.ready_after if vm.ready_after is not None else '-', vm.duration)
            results.append((boot.name, not c.failures, summary))
            if not args.keep:           # 700 MB each: drop disks no later boot needs
                later = set(b.disk_from for b in boots[index + 1:])
                for name in [n for n in disks if n not in later]:
                    path = disks.pop(name)
                    if path not in disks.values() and os.path.exists(path):
                        os.unlink(path)
    finally:
        if args.keep:
            say('kept the work directory %s' % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say('')
    say('boot test summary:')
    for name, passed, summary in results:
        say('  %-13s %s  %s' % (name, 'PASS' if passed else 'FAIL', summary))
    say('total run time %.1f s' % (time.monotonic() - started))
    passed = sum(1 for _, p, _ in results if p)
    failed = len(results) - passed
    say('%d passed, %d failed' % (passed, failed))
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == '__main__':
    sys.exit(main())
