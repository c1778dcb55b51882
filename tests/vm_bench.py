#!/usr/bin/env python3
"""VM benchmark: our unit timed inside a booted Debian VM against the article's (issue 15).

    python3 tests/vm_bench.py [--suite S ...] [--boots N] [--quick] [--cache-dir DIR]
                              [--markdown PATH] [--keep] [--repo DIR]

One image per Debian suite (bullseye, bookworm, trixie; --suite picks, repeatable)
carries BOTH units, and each boot runs both against the same emulator
(tests/fake_azure.py on this machine's loopback, reached through boot_test's
guestfwd; nothing leaves the machine):

  ours       azure-provisioning.service, installed with the real `install.sh --root`
             (plain: no --provision-user; no provisioning media attached, so the media
             step finds no /dev/sr0).  IMDS + hostname + DHCP publish + Ready.
  article's  the unit of Microsoft's article "Creating generalized images without a
             provisioning agent" (/work/shared/seed; no-agent.md) and its Python sample
             (tests/seed_sample.py, called without arguments: the article's own
             168.63.129.16, which the guest's slirp forwards to the emulator).  The
             article names its unit azure-provisioning.service too, so here it is
             article-provisioning.service (its last ExecStart= disables that name);
             every other line is the article's.  A drop-in orders it
             After=azure-provisioning.service: it runs after ours, against the same
             emulator, which accepts a second Ready for the same incarnation (1: the
             article hard-codes it).  compute.name (what the article's curl asks) is a
             valid hostname different from osProfile.computerName (what ours sets), so
             the article's hostnamectl changes the name for real.

A test-only checker unit (vm-bench-check.service, ordered after both) reads each
unit's `systemctl show` timestamps, our /var/lib/azure-provisioning/state.json (each
step's seconds) and both units' journal lines, sends them as JSON over the second
serial port (boot_test's facts channel) and powers the VM off.

Active time of a unit: InactiveExitTimestampMonotonic -> InactiveEnterTimestampMonotonic
(Type=oneshot: start to back to inactive, ExecStartPost= / the self-disable included),
ExecMainStart/ExitTimestampMonotonic for any other type.  Reported per suite (median,
min, max over --boots boots, default 3):
  ours / article's active time and the ratio ours / article's (median of the per-boot
  ratios; target <= 0.6), on an image WITHOUT sshd (openssh-server purged: per-VM host
  keys are work the article never does); beside it the same on the image WITH sshd;
  network-online.target active -> our "Ready accepted" log line (guest clock);
  QEMU start -> our Ready POST accepted (the emulator's clock);
  where our unit's time goes: each step's seconds from state.json, as a share of the
  unit's active time ("outside the steps": interpreter start, imports, the record,
  KVP, ExecStartPost's systemctl disable).
--quick (what .ci/run runs, to keep CI short: these are figures, not a gate) is one
suite, QUICK_SUITE, and QUICK_BOOTS boots per image; --suite and --boots still choose.
Printed as a table per suite and a summary; the same in markdown, written to a file
whose path is printed (--markdown, default /tmp/vm-bench-DATE.md).

Bases: boot_test's base_rootfs builds and caches them in --cache-dir (the same default
as boot_test: $AZP_BOOT_CACHE or ~/.cache/azp-boot-test, with its lock) from its
rootfs-hook.sh, with curl (the article's unit needs it) and openssh-server added, one
per suite ("vmbench-SUITE"); bullseye with merged /usr (the usrmerge package;
mmdebstrap's merged-usr hook fails on bullseye),
as Debian 11 installs it and as the article's /usr/bin/systemctl needs.  Needs root,
like boot_test.  The timings are TCG's and this machine's: another job running QEMU or
mmdebstrap at the same time inflates both units (the count of other QEMU processes at
each boot's start is printed).

Exit status 0 when every boot ran and both units were timed in each (a report, not a
gate: whether the target is met is printed), 1 otherwise, 2 on a usage error.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import boot_test as bt      # noqa: E402  (tests/boot_test.py: its building blocks)

DEFAULT_REPO = os.path.dirname(HERE)
SUITES = ('bullseye', 'bookworm', 'trixie')
TARGET_RATIO = 0.6
RECIPE_VERSION = 1              # bump to rebuild the vmbench bases
EXTRA_PACKAGES = ['curl', 'openssh-server']
OURS = 'azure-provisioning.service'
ARTICLE = 'article-provisioning.service'
ARTICLE_SCRIPT = '/usr/local/azure-provisioning.py'     # the article's path, unchanged
ARTICLE_AGENT = 'custom-provisioning'                   # its x-ms-agent-name
OUR_AGENT = 'azure-provisioning'                        # ours
CHECKER = 'vm-bench-check.service'
CHECKER_DIR = '/usr/local/lib/vm-bench'
COMPUTER_NAME = 'vm-bench-7'    # osProfile.computerName: what ours sets
VM_NAME = 'vm-bench-7b'         # compute.name: what the article's curl reads (valid name)
INCARNATION = 1                 # the article hard-codes 1
BOOT_TIME_LIMIT = 200.0         # s per boot
IMAGES = ('nosshd', 'sshd')
# mmdebstrap makes bullseye without merged /usr, but a Debian 11 install has it (its
# default for new systems) and the article's unit calls /usr/bin/systemctl: merged here.
MERGE_USR = ('bullseye',)

# The article's unit file (no-agent.md, "Automating running the code at first boot"):
# only the unit's own name in the last line differs (the article calls it
# azure-provisioning.service, which is ours).
ARTICLE_UNIT_TEXT = """[Unit]
Description=Azure Provisioning

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /usr/local/azure-provisioning.py
ExecStart=/bin/bash -c "hostnamectl set-hostname $(curl \\
    -H 'metadata: true' \\
    'http://169.254.169.254/metadata/instance/compute/name?api-version=2019-06-01&format=text')"
ExecStart=/usr/bin/systemctl disable %s

[Install]
WantedBy=multi-user.target
""" % ARTICLE

ARTICLE_DROP_IN = """# vm_bench.py (test only): run after ours, against the same emulator
[Unit]
After=%s
""" % OURS

CHECKER_UNIT_TEXT = """# Test-only unit of tests/vm_bench.py; never part of the product.
[Unit]
Description=vm_bench: report both provisioning units' timestamps to the host, power off
After=%s %s
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 %s/vm-bench-check
StandardOutput=journal+console
TimeoutStartSec=300

[Install]
WantedBy=multi-user.target
""" % (OURS, ARTICLE, CHECKER_DIR)

SHOW_UNITS = [OURS, ARTICLE, 'network-online.target', 'systemd-networkd-wait-online.service',
              'ssh.service', 'systemd-hostnamed.service', CHECKER]
SHOW_PROPS = ['Id', 'Type', 'ActiveState', 'SubState', 'Result', 'ExecMainStatus',
              'InactiveExitTimestampMonotonic', 'ActiveEnterTimestampMonotonic',
              'ActiveExitTimestampMonotonic', 'InactiveEnterTimestampMonotonic',
              'ExecMainStartTimestampMonotonic', 'ExecMainExitTimestampMonotonic']

# Guest side (python3 of the image, standard library, 3.6+).
CHECKER_SCRIPT = r'''#!/usr/bin/python3
# Guest side of tests/vm_bench.py (test only): after both provisioning units, send
# their systemctl show output, our state.json and their journal lines to the host
# over /dev/ttyS1; the unit then powers the VM off.
import json, os, socket, subprocess, time

UNITS = %(units)r
PROPS = %(props)r
WAIT_FOR = %(wait)r
STATE = '/var/lib/azure-provisioning/state.json'


def out(cmd, timeout=60):
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=timeout).stdout
    except Exception as exc:
        return 'error: %%s' %% exc


def busy():
    for unit in WAIT_FOR:
        state = out(['systemctl', 'show', '-p', 'ActiveState', '--value', unit]).strip()
        if state in ('activating', 'deactivating', 'reloading'):
            return True
    return False


def journal():
    entries = []
    text = out(['journalctl', '-b', '0', '--no-pager', '-o', 'json'] +
               [a for u in WAIT_FOR for a in ('-u', u)])
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        m = e.get('MESSAGE')
        if isinstance(m, list):
            m = bytes(b for b in m if isinstance(b, int)).decode('utf-8', 'replace')
        entries.append({'monotonic': int(e.get('__MONOTONIC_TIMESTAMP', 0)),
                        'unit': e.get('_SYSTEMD_UNIT') or e.get('UNIT'),
                        'ident': e.get('SYSLOG_IDENTIFIER'), 'message': m})
    return entries


def main():
    facts = {'checker_started_us': int(time.monotonic() * 1e6)}
    try:
        waited = time.monotonic()
        while busy() and time.monotonic() - waited < 240:
            time.sleep(0.5)
        facts['waited'] = round(time.monotonic() - waited, 1)
        facts['show'] = dict((u, out(['systemctl', 'show', '-p', ','.join(PROPS), u]))
                             for u in UNITS)
        try:
            with open(STATE) as f:
                facts['state'] = f.read()
        except OSError as exc:
            facts['state'] = None
            facts['state_error'] = str(exc)
        facts['journal'] = journal()
        facts['hostname'] = socket.gethostname()
        facts['sshd'] = os.path.exists('/usr/sbin/sshd')
        facts['enabled'] = dict((u, out(['systemctl', 'is-enabled', u]).strip())
                                for u in WAIT_FOR)
        facts['analyze'] = out(['systemd-analyze'], timeout=30).strip()
    except Exception as exc:
        facts['checker_error'] = '%%s: %%s' %% (exc.__class__.__name__, exc)
    with open('/dev/ttyS1', 'w') as port:
        port.write('AZP-FACTS-BEGIN\n%%s\nAZP-FACTS-END\n' %% json.dumps(facts, sort_keys=True))
        port.flush()
    print('vm-bench-check: facts sent')


main()
''' % {'units': SHOW_UNITS, 'props': SHOW_PROPS, 'wait': [OURS, ARTICLE]}


def say(text=''):
    sys.stdout.write(text + '\n')
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Pure functions (tests/test_vm_bench.py)
# ---------------------------------------------------------------------------

def parse_show(text):
    """`systemctl show -p ...` output (KEY=VALUE lines) -> dict."""
    props = {}
    for line in (text or '').splitlines():
        key, sep, value = line.partition('=')
        if sep and key.strip():
            props[key.strip()] = value.strip()
    return props


def mono_us(props, key):
    """A *TimestampMonotonic property in microseconds; None when missing, 0 (never
    happened) or not a number."""
    try:
        value = int(props.get(key) or 0)
    except ValueError:
        return None
    return value or None


def active_seconds(props):
    """How long the unit was active (activating included): for Type=oneshot
    InactiveExit -> InactiveEnter (ExecStartPost= included: back to inactive), else
    ExecMainStart -> ExecMainExit; the other pair when the first is incomplete.  None
    when neither pair gives a start and a later end."""
    pairs = [('InactiveExitTimestampMonotonic', 'InactiveEnterTimestampMonotonic'),
             ('ExecMainStartTimestampMonotonic', 'ExecMainExitTimestampMonotonic')]
    if props.get('Type') not in (None, '', 'oneshot'):
        pairs.reverse()
    for start_key, end_key in pairs:
        start, end = mono_us(props, start_key), mono_us(props, end_key)
        if start is not None and end is not None and end >= start:
            return (end - start) / 1e6
    return None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours, article):
    if ours is None or not article:
        return None
    return ours / article


def ready_monotonic(journal, unit=OURS):
    """Guest monotonic time (us) of our 'Ready accepted' log line, or None."""
    for entry in journal or []:
        if entry.get('unit') == unit and 'Ready accepted' in (entry.get('message') or ''):
            return entry.get('monotonic') or None
    return None


def parse_state_steps(text):
    """[(step, seconds)] from state.json's "steps"; [] when unreadable."""
    try:
        state = json.loads(text or '')
    except ValueError:
        return []
    steps = []
    for item in (state.get('steps') if isinstance(state, dict) else None) or []:
        if isinstance(item, dict) and isinstance(item.get('seconds'), (int, float)):
            steps.append((str(item.get('step')), float(item['seconds'])))
    return steps


def step_shares(steps, active):
    """[(step, seconds, share of active)] in order, then ('outside the steps', rest,
    share); [] without an active time."""
    if not active:
        return []
    rows = [(name, seconds, seconds / active) for name, seconds in steps]
    rest = active - sum(seconds for _, seconds in steps)
    return rows + [('outside the steps', rest, rest / active)]


def median_shares(per_boot):
    """per_boot: step_shares() lists, one per boot -> [(step, median s, median share)],
    in the first boot's order, each step's median over the boots that have it."""
    order = []
    for rows in per_boot:
        for name, _, _ in rows:
            if name not in order:
                order.append(name)
    result = []
    for name in order:
        secs = [s for rows in per_boot for n, s, _ in rows if n == name]
        shares = [f for rows in per_boot for n, _, f in rows if n == name]
        result.append((name, median(secs), median(shares)))
    return result


def ready_after(requests, wall_started, agent):
    """s from QEMU start to the first accepted Ready POST whose x-ms-agent-name is
    agent (the emulator's clock), or None."""
    times = [r['time'] - wall_started for r in requests
             if r.get('server') == 'wireserver' and r.get('method') == 'POST'
             and 'comp=health' in (r.get('path') or '') and 200 <= (r.get('status') or 0) < 300
             and (r.get('headers') or {}).get('x-ms-agent-name') == agent
             and 'Ready' in (r.get('body') or '')]
    return min(times) if times else None


def fmt(value, unit=' s', digits=3):
    if value is None:
        return '-'
    return '%.*f%s' % (digits, value, unit)


def spread(values, unit=' s', digits=3):
    """'median (min-max)' of values."""
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    return '%s (%s-%s)' % (fmt(median(values), unit, digits), fmt(min(values), '', digits),
                           fmt(max(values), '', digits))


def verdict(value, limit=TARGET_RATIO):
    if value is None:
        return 'no figure'
    return 'MET' if value <= limit else 'MISSED'


# ---------------------------------------------------------------------------
# One boot's figures from the facts
# ---------------------------------------------------------------------------

def boot_figures(facts, requests, wall_started):
    """A dict of one boot's figures and the problems seen (pure: facts as parsed)."""
    facts = facts or {}
    shows = dict((u, parse_show(t)) for u, t in (facts.get('show') or {}).items())
    ours, article = shows.get(OURS, {}), shows.get(ARTICLE, {})
    fig = {'ours': active_seconds(ours), 'article': active_seconds(article), 'problems': []}
    fig['ratio'] = ratio(fig['ours'], fig['article'])
    online = mono_us(shows.get('network-online.target', {}), 'ActiveEnterTimestampMonotonic')
    ready = ready_monotonic(facts.get('journal'))
    fig['online_to_ready'] = (ready - online) / 1e6 if ready and online else None
    start = mono_us(ours, 'InactiveExitTimestampMonotonic')
    fig['online_to_start'] = (start - online) / 1e6 if start and online else None
    fig['qemu_to_ready'] = ready_after(requests, wall_started, OUR_AGENT)
    fig['qemu_to_article_ready'] = ready_after(requests, wall_started, ARTICLE_AGENT)
    fig['steps'] = parse_state_steps(facts.get('state'))
    fig['shares'] = step_shares(fig['steps'], fig['ours'])
    fig['sshd'] = facts.get('sshd')
    fig['hostname'] = facts.get('hostname')
    for name, props in ((OURS, ours), (ARTICLE, article)):
        if props.get('Result') != 'success':
            fig['problems'].append('%s: Result=%s ExecMainStatus=%s' % (
                name, props.get('Result'), props.get('ExecMainStatus')))
    if 'checker_error' in facts:
        fig['problems'].append('checker: ' + facts['checker_error'])
    if not facts.get('state'):
        fig['problems'].append('no state.json (%s)' % facts.get('state_error'))
    if fig['qemu_to_ready'] is None:
        fig['problems'].append('the emulator accepted no Ready from ours')
    if fig['qemu_to_article_ready'] is None:
        fig['problems'].append("the emulator accepted no Ready from the article's")
    return fig


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

class BenchRecipe(object):
    """boot_test's base recipe (rootfs-hook.sh, systemd-networkd) for one suite, with
    curl and openssh-server; what boot_test.base_rootfs needs: name, key(),
    mmdebstrap_args(hook)."""

    def __init__(self, suite):
        self.suite = suite
        self.name = self.cache_name = 'vmbench-' + suite    # base-vmbench-SUITE-KEY
        self.packages = list(bt.BASE_PACKAGES) + EXTRA_PACKAGES
        self.network = 'networkd'

    def mmdebstrap_args(self, hook):
        packages = self.packages + (['usrmerge'] if self.suite in MERGE_USR else [])
        args = ['mmdebstrap', '--variant=minbase', '--include=' + ','.join(packages)]
        args += ['--dpkgopt=path-exclude=' + p for p in bt.DPKG_EXCLUDES]
        args += ['--essential-hook=sh %s essential "$1" %s' % (shlex.quote(hook), self.network),
                 '--customize-hook=sh %s customize "$1" %s' % (shlex.quote(hook), self.network)]
        return args + [self.suite]

    def key(self):
        import hashlib
        with open(os.path.join(bt.BOOT_DIR, 'rootfs-hook.sh'), 'rb') as f:
            hook = f.read()
        recipe = json.dumps([RECIPE_VERSION, self.mmdebstrap_args('HOOK'),
                             hashlib.sha256(hook).hexdigest()], sort_keys=True)
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def enable(tree, unit):
    wants = os.path.join(tree, 'etc/systemd/system/multi-user.target.wants')
    os.makedirs(wants, exist_ok=True)
    link = os.path.join(wants, unit)
    if not os.path.lexists(link):
        os.symlink('/etc/systemd/system/' + unit, link)


def install_article(tree):
    """The article's script at its path and its unit (renamed), enabled."""
    shutil.copyfile(os.path.join(HERE, 'seed_sample.py'),
                    os.path.join(tree, ARTICLE_SCRIPT.lstrip('/')))
    os.chmod(os.path.join(tree, ARTICLE_SCRIPT.lstrip('/')), 0o644)
    units = os.path.join(tree, 'etc/systemd/system')
    write(os.path.join(units, ARTICLE), ARTICLE_UNIT_TEXT)
    write(os.path.join(units, ARTICLE + '.d', 'vm-bench.conf'), ARTICLE_DROP_IN)
    enable(tree, ARTICLE)


def install_bench_checker(tree):
    write(os.path.join(tree, CHECKER_DIR.lstrip('/'), 'vm-bench-check'), CHECKER_SCRIPT, 0o755)
    write(os.path.join(tree, 'etc/systemd/system', CHECKER), CHECKER_UNIT_TEXT)
    enable(tree, CHECKER)


def build_images(suite, workdir, cache_dir, repo, log):
    """Both disks of a suite from one tree: 'sshd' (the base as built), then 'nosshd'
    (openssh-server purged).  Returns {image: files dict for boot_test.boot_vm}."""
    recipe = BenchRecipe(suite)
    base, how = bt.base_rootfs(recipe, cache_dir, log)
    say('  base %s: %s' % (recipe.name, how))
    out = os.path.join(workdir, suite)
    tree = os.path.join(out, 'rootfs')
    os.makedirs(out)
    started = time.monotonic()
    bt.run(['cp', '-a', '--reflink=auto', base, tree], 'copying the base tree', 300)
    text, _ = bt.run(['sh', os.path.join(repo, 'install.sh'), '--root', tree],
                     'sh install.sh --root %s' % tree, 120, cwd=repo)
    with open(os.path.join(out, 'install.log'), 'w') as f:
        f.write(text)
    problems = bt.installed_unit_problems(tree, repo)
    if problems:
        raise bt.TestFailure('install.sh --root: ' + '; '.join(problems))
    install_article(tree)
    install_bench_checker(tree)
    for tool in ('usr/bin/systemctl', 'bin/bash', 'usr/bin/curl', 'usr/bin/hostnamectl'):
        if not os.path.exists(os.path.join(tree, tool)):
            say('  note: /%s missing in the %s image: the article\'s unit needs it'
                % (tool, suite))
    kernel, initrd = bt.find_boot_files(tree)
    files = {}
    for src in (kernel, initrd):
        shutil.copyfile(src, os.path.join(out, os.path.basename(src)))
    for image in ('sshd', 'nosshd'):
        if image == 'nosshd':
            bt.run(['chroot', tree, 'dpkg', '--purge', 'openssh-server'],
                   'dpkg --purge openssh-server in the %s tree' % suite, 120,
                   log=os.path.join(out, 'purge.log'))
        has_sshd = os.path.exists(os.path.join(tree, 'usr/sbin/sshd'))
        if has_sshd != (image == 'sshd'):
            raise bt.TestFailure('%s image of %s: /usr/sbin/sshd %s' % (
                image, suite, 'present' if has_sshd else 'missing'))
        disk = os.path.join(out, image + '.ext4')
        bt.run(['mke2fs', '-q', '-t', 'ext4', '-L', 'root', '-d', tree, '-F', disk, '2G'],
               'mke2fs', 300)
        files[image] = {'disk': disk, 'kernel': os.path.join(out, os.path.basename(kernel)),
                        'initrd': os.path.join(out, os.path.basename(initrd))}
    shutil.rmtree(tree)
    say('  images sshd, nosshd (%s): made in %.1f s' % (suite, time.monotonic() - started))
    return files


# ---------------------------------------------------------------------------
# Boots
# ---------------------------------------------------------------------------

def other_qemus():
    """How many other QEMU processes run now (another job slows TCG down)."""
    count = 0
    for pid in os.listdir('/proc'):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open('/proc/%s/comm' % pid) as f:
                    if f.read().startswith('qemu-system'):
                        count += 1
            except OSError:
                pass
    return count


def one_boot(files, fake, accel, rundir_base):
    """Boot a fresh copy of files['disk'] (once more after a hang in early boot).
    Returns (VmRun, requests, other QEMUs seen at the start)."""
    for attempt in (1, 2):
        rundir = '%s-%d' % (rundir_base, attempt)
        os.makedirs(rundir)
        disk = os.path.join(rundir, 'disk.ext4')
        bt.copy_disk(files['disk'], disk)
        others = other_qemus()
        with fake.FakeAzure(computer_name=COMPUTER_NAME, vm_name=VM_NAME,
                            incarnation=INCARNATION) as az:
            vm = bt.boot_vm(files, disk, accel, az, rundir, BOOT_TIME_LIMIT)
            requests = az.requests
        os.unlink(disk)
        if vm.early_hang is None:
            return vm, requests, others, attempt
        say('    hang in early boot (%s): booting again once' % bt.describe_hang(vm.early_hang))
    return vm, requests, others, attempt


def run_suite(suite, boots, workdir, cache_dir, repo, fake, accel):
    say('')
    say('== %s' % suite)
    images = build_images(suite, workdir, cache_dir, repo, os.path.join(workdir, 'mmdebstrap.log'))
    results = dict((image, []) for image in IMAGES)
    for index in range(boots):
        for image in IMAGES:
            rundir = os.path.join(workdir, suite, 'boot-%s-%d' % (image, index + 1))
            vm, requests, others, attempt = one_boot(images[image], fake, accel, rundir)
            fig = boot_figures(vm.facts, requests, vm.wall_started)
            fig.update(vm=vm.duration, outcome=vm.outcome, others=others, attempt=attempt,
                       facts=vm.facts is not None, rundir=rundir)
            if vm.facts is None:
                fig['problems'].insert(0, 'no facts from the guest (VM %s)' % vm.outcome)
            ok = fig['ours'] is not None and fig['article'] is not None
            fig['ok'] = ok
            results[image].append(fig)
            say('  boot %d %-6s ours %s, article %s, ratio %s; online->Ready %s, '
                'QEMU->Ready %s; VM %.1f s (%s)%s%s%s' % (
                    index + 1, image, fmt(fig['ours']), fmt(fig['article']),
                    fmt(fig['ratio'], '', 2), fmt(fig['online_to_ready'], ' s', 2),
                    fmt(fig['qemu_to_ready'], ' s', 1), vm.duration, vm.outcome,
                    '; %d other QEMU running' % others if others else '',
                    '; retried after a hang' if attempt > 1 else '',
                    ''.join('\n      problem: ' + p for p in fig['problems'])))
            if not ok and vm.console:
                for line in vm.console.replace('\r', '').splitlines()[-15:]:
                    say('      | ' + line)
    return results


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def summarize(results):
    """Per-suite figures from run_suite's results."""
    plain, sshd = results['nosshd'], results['sshd']

    def col(figs, key):
        return [f[key] for f in figs]
    return {
        'boots': len(plain), 'boots_sshd': len(sshd),
        'ours': col(plain, 'ours'), 'article': col(plain, 'article'),
        'ratio': col(plain, 'ratio'),
        'ours_sshd': col(sshd, 'ours'), 'article_sshd': col(sshd, 'article'),
        'ratio_sshd': col(sshd, 'ratio'),
        'online_to_ready': col(plain, 'online_to_ready'),
        'online_to_ready_sshd': col(sshd, 'online_to_ready'),
        'online_to_start': col(plain, 'online_to_start'),
        'qemu_to_ready': col(plain, 'qemu_to_ready'),
        'qemu_to_ready_sshd': col(sshd, 'qemu_to_ready'),
        'shares': median_shares([f['shares'] for f in plain]),
        'shares_sshd': median_shares([f['shares'] for f in sshd]),
        'problems': sorted(set(p for f in plain + sshd for p in f['problems'])),
        'others': max([f['others'] for f in plain + sshd] or [0]),
        'all_ok': all(f['ok'] for f in plain + sshd),
    }


def shares_text(shares):
    return ', '.join('%s %s %.0f%%' % (n, fmt(s * 1000, ' ms', 0), f * 100)
                     for n, s, f in shares if s is not None) or '-'


SUITE_ROWS = (
    # label, key, unit, digits
    ('ours, active (no sshd)', 'ours', ' s', 3),
    ("article's, active (no sshd)", 'article', ' s', 3),
    ("ratio ours / article's (no sshd)", 'ratio', '', 3),
    ('ours, active (with sshd)', 'ours_sshd', ' s', 3),
    ("article's, active (with sshd)", 'article_sshd', ' s', 3),
    ("ratio ours / article's (with sshd)", 'ratio_sshd', '', 3),
    ('network-online -> our unit starts', 'online_to_start', ' s', 3),
    ('network-online -> Ready accepted', 'online_to_ready', ' s', 3),
    ('network-online -> Ready (with sshd)', 'online_to_ready_sshd', ' s', 3),
    ('QEMU start -> Ready accepted', 'qemu_to_ready', ' s', 2),
    ('QEMU start -> Ready (with sshd)', 'qemu_to_ready_sshd', ' s', 2),
)


def suite_table(suite, s, markdown=False):
    lines = []
    head = ('figure', 'median', 'min', 'max', 'per boot')
    rows = []
    for label, key, unit, digits in SUITE_ROWS:
        values = [v for v in s[key] if v is not None]
        rows.append((label, fmt(median(values), unit, digits),
                     fmt(min(values) if values else None, '', digits),
                     fmt(max(values) if values else None, '', digits),
                     ' '.join(fmt(v, '', digits) for v in s[key])))
    if markdown:
        lines.append('### %s (%d boots without sshd, %d with)' % (suite, s['boots'],
                                                                 s['boots_sshd']))
        lines.append('')
        lines.append('| ' + ' | '.join(head) + ' |')
        lines.append('|' + '---|' * len(head))
        for r in rows:
            lines.append('| ' + ' | '.join(r) + ' |')
        lines.append('')
        lines.append('Target ratio <= %.1f (no sshd, median): **%s** (%s)'
                     % (TARGET_RATIO, verdict(median(s['ratio'])), fmt(median(s['ratio']), '', 3)))
        lines.append('')
        lines.append('Where our unit\'s time goes (state.json steps, median ms and share of '
                     'its active time):')
        lines.append('')
        lines.append('- no sshd: ' + shares_text(s['shares']))
        lines.append('- with sshd: ' + shares_text(s['shares_sshd']))
        if s['problems']:
            lines.append('')
            lines.append('Problems: ' + '; '.join(s['problems']))
        lines.append('')
        return lines
    lines.append('-- %s: %d boots without sshd, %d with' % (suite, s['boots'], s['boots_sshd']))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        lines.append('  ' + '  '.join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                      for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    lines.append('  target ratio <= %.1f (no sshd, median): %s (%s)'
                 % (TARGET_RATIO, verdict(median(s['ratio'])), fmt(median(s['ratio']), '', 3)))
    lines.append('  steps of ours, no sshd (median ms, share): ' + shares_text(s['shares']))
    lines.append('  steps of ours, with sshd:                  ' + shares_text(s['shares_sshd']))
    for p in s['problems']:
        lines.append('  problem: ' + p)
    return lines


SUMMARY_HEAD = ('suite', 'boots', 'ours (s)', "article's (s)", 'ratio', 'target <= 0.6',
                'ours with sshd (s)', 'net-online -> Ready (s)', 'QEMU start -> Ready (s)',
                'step shares (no sshd)')


def summary_rows(summaries):
    rows = []
    for suite, s in summaries:
        rows.append((suite, '%d+%d' % (s['boots'], s['boots_sshd']), fmt(median(s['ours']), ''),
                     fmt(median(s['article']), ''), fmt(median(s['ratio']), '', 3),
                     verdict(median(s['ratio'])), fmt(median(s['ours_sshd']), ''),
                     fmt(median(s['online_to_ready']), ''),
                     fmt(median(s['qemu_to_ready']), '', 2),
                     ', '.join('%s %.0f%%' % (n, f * 100) for n, _, f in s['shares']
                               if f is not None)))
    return rows


def markdown_report(summaries, context):
    lines = ['# azure-provisioning: our unit vs the article\'s, timed inside the VM', '']
    lines += ['%s' % c for c in context] + ['']
    lines.append('| ' + ' | '.join(SUMMARY_HEAD) + ' |')
    lines.append('|' + '---|' * len(SUMMARY_HEAD))
    for r in summary_rows(summaries):
        lines.append('| ' + ' | '.join(r) + ' |')
    lines.append('')
    lines.append('Medians over the boots (boots: without sshd + with sshd). Active time: '
                 'InactiveExit -> InactiveEnter (Type=oneshot). Ratio: median of the per-boot '
                 'ratios on the image without sshd.')
    lines.append('')
    for suite, s in summaries:
        lines += suite_table(suite, s, markdown=True)
    return '\n'.join(lines) + '\n'


QUICK_SUITE = 'bookworm'     # the Debian of the machines CI runs on
QUICK_BOOTS = 2
FULL_BOOTS = 3


def parse_args(argv):
    """The options, with args.suites (in SUITES order) and args.boots settled."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--suite', action='append', choices=SUITES,
                        help='Debian suite to run (repeatable; default: all three, or %s '
                             'with --quick)' % QUICK_SUITE)
    parser.add_argument('--boots', type=int,
                        help='boots per suite and image (default %d, or %d with --quick)'
                             % (FULL_BOOTS, QUICK_BOOTS))
    parser.add_argument('--quick', action='store_true',
                        help='one suite (%s) and %d boots per image: the figures in a '
                             'fraction of the time' % (QUICK_SUITE, QUICK_BOOTS))
    parser.add_argument('--cache-dir', default=os.environ.get('AZP_BOOT_CACHE') or
                        os.path.join(os.path.expanduser('~'), '.cache', 'azp-boot-test'),
                        help="boot_test's base cache (default $AZP_BOOT_CACHE or "
                             "~/.cache/azp-boot-test)")
    parser.add_argument('--markdown', metavar='PATH',
                        help='where to write the markdown report (default '
                             '/tmp/vm-bench-DATE.md)')
    parser.add_argument('--keep', action='store_true', help='keep the work directory')
    parser.add_argument('--repo', default=DEFAULT_REPO,
                        help='source tree whose install.sh and tests/fake_azure.py are used')
    args = parser.parse_args(argv)
    if args.boots is None:
        args.boots = QUICK_BOOTS if args.quick else FULL_BOOTS
    if args.boots < 1:
        parser.error('--boots must be at least 1')
    chosen = args.suite or ([QUICK_SUITE] if args.quick else SUITES)
    args.suites = [s for s in SUITES if s in chosen]
    return args


def main(argv=None):
    args = parse_args(argv)
    suites = args.suites
    repo = os.path.abspath(args.repo)

    def terminated(signum, frame):
        raise SystemExit('vm_bench.py: stopped by signal %d' % signum)
    signal.signal(signal.SIGTERM, terminated)
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix='azp-vm-bench-')
    say('== azure-provisioning VM benchmark: ours vs the article\'s unit, inside the VM ==')
    say('suites %s, %d boots each per image (no sshd, with sshd)%s; work directory %s'
        % (', '.join(suites), args.boots, ' (--quick)' if args.quick else '', workdir))
    summaries, failed = [], []
    accel = '?'
    try:
        if os.geteuid() != 0:
            raise bt.TestFailure('must run as root (mmdebstrap, root-owned image files)')
        bt.ensure_host_tools()
        accel, why = bt.choose_accelerator()
        say('accelerator: %s (%s)' % (accel, why))
        fake = bt.load_fake_module(repo)
        for suite in suites:
            try:
                results = run_suite(suite, args.boots, workdir, args.cache_dir, repo, fake,
                                    accel)
            except bt.TestFailure as exc:
                say('  FAILED: %s' % exc)
                failed.append(suite)
                continue
            s = summarize(results)
            summaries.append((suite, s))
            if not s['all_ok']:
                failed.append(suite)
            say('')
            for line in suite_table(suite, s):
                say(line)
    except bt.TestFailure as exc:
        say('FAILED: %s' % exc)
        failed.append('setup')
    finally:
        if args.keep:
            say('kept the work directory %s' % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    say('')
    say('== summary (medians) ==')
    widths = [max(len(str(r[i])) for r in summary_rows(summaries) + [SUMMARY_HEAD])
              for i in range(len(SUMMARY_HEAD))]
    for r in [SUMMARY_HEAD] + summary_rows(summaries):
        say('  ' + '  '.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    ratios = [median(s['ratio']) for _, s in summaries]
    met = bool(ratios) and all(r is not None and r <= TARGET_RATIO for r in ratios)
    say('target ours / article\'s <= %.1f (no sshd, median per suite): %s'
        % (TARGET_RATIO, 'MET on every suite' if met else
           'NOT met on: %s' % ', '.join(n for (n, s), r in zip(summaries, ratios)
                                        if r is None or r > TARGET_RATIO) if summaries
           else 'no figures'))
    context = ['Run %s; accelerator %s; %d boots per suite and image; total run time %.0f s.'
               % (time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), accel, args.boots, total),
               '',
               'Ours: azure-provisioning.service installed with `install.sh --root` (plain). '
               "Article's: its unit (renamed article-provisioning.service, ordered after ours) "
               'and its Python sample, against the same emulator (tests/fake_azure.py). '
               'Images without sshd: openssh-server purged.']
    path = args.markdown or os.path.join(
        tempfile.gettempdir(), 'vm-bench-%s.md' % time.strftime('%Y%m%d-%H%M%S'))
    with open(path, 'w') as f:
        f.write(markdown_report(summaries, context))
    say('markdown report: %s' % path)
    say('total run time %.0f s' % total)
    if failed:
        say('VM BENCHMARK INCOMPLETE: %s' % ', '.join(failed))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
