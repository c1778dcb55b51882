#!/usr/bin/env python3
"""Early-boot hang rate of the boot test's guest under QEMU (issue 11).

    python3 tests/boot_hangs.py --boots N --config NAME[,NAME] [--hang-after S]
                                [--budget S] [--cache-dir DIR] [--repo DIR]
                                [--base-only] [--keep] [--list]

Builds the boot test's `default` disk image with tests/boot_test.py's own code (the
base root filesystem is cached in --cache-dir, as for boot_test.py; --base-only
boots the cached base tree without install.sh), then boots its kernel N times per
configuration, ONE AT A TIME, each from a fresh copy of the pristine disk, only until
userspace starts: systemd's first console line ("systemd[1]" or "Welcome to"), or
with --until init the kernel's "Run /init" (it starts the initramfs: kernel-only
hangs, about 4 s less per boot).  A
boot whose console gets no new byte for --hang-after s before that is a hang.
Boots go round-robin over the configurations (boot 1 of each, then boot 2 of each,
...), so a change of this machine's load touches every configuration alike; no round
starts after --budget s, so the counts stay equal.  QEMU (under timeout(1), in its
own process group) is stopped by its PID and process group after each boot.

Configurations (--list): each sets the accelerator, -smp and extra kernel options
explicitly on top of boot_test.qemu_command(), so the names mean the same whatever
qemu_command() currently uses.  The network stays slirp with restrict=on (nothing
leaves the machine; the guest does not reach the network this early anyway).

Prints one line per boot and, per configuration: boots, hangs, hang rate, median
and max seconds from QEMU start to userspace, the longest console silence seen
before userspace in a boot that did not hang (what boot_test.py's hang limit must
stay clear of), and the console's last line at each hang.  Every boot is also
written as one JSON line to hangs.jsonl in the work directory (kept with --keep,
hung consoles always copied to it).  Stdlib only; needs root and what boot_test.py
needs.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import boot_test as bt      # noqa: E402  (the image recipe, build and QEMU command)

# name: (accelerator, -smp, extra kernel options, description)
CONFIGS = {
    'current': (None, None, (), 'boot_test.qemu_command() exactly as it is'),
    'mttcg': ('tcg,thread=multi', '2', (), '-accel tcg,thread=multi -smp 2 (what CI ran)'),
    'single': ('tcg,thread=single', '2', (), '-accel tcg,thread=single -smp 2 '
                                             '(one host thread for both vCPUs)'),
    'smp1': ('tcg', '1', (), '-accel tcg -smp 1'),
    'hpet': ('tcg,thread=multi', '2', ('clocksource=hpet',),
             'mttcg + clocksource=hpet (already the guest\'s own choice with -smp 2)'),
    'tsc-unstable': ('tcg,thread=multi', '2', ('tsc=unstable',), 'mttcg + tsc=unstable'),
    'no-timer-check': ('tcg,thread=multi', '2', ('no_timer_check',),
                       'mttcg + no_timer_check'),
    'acpi-pm': ('tcg,thread=multi', '2', ('clocksource=acpi_pm',),
                'mttcg + clocksource=acpi_pm (with -smp 2 the guest marks the TSC '
                'unstable and picks hpet by itself)'),
}

SYSTEMD = (b'systemd[1]', b'Welcome to')        # the real root's systemd has started
KERNEL_DONE = (b'Run /init', b'Run /sbin/init')  # the kernel starts the first process
UNTIL = {'systemd': SYSTEMD, 'init': KERNEL_DONE}
POLL = 0.05                                      # s between looks at the console
KERNEL_TIME = re.compile(rb'\[\s*(\d+\.\d+)\]')


def configure(cmd, config):
    """cmd (boot_test.qemu_command's list) with the configuration's -accel, -smp and
    extra kernel options."""
    accel, smp, extra, _ = CONFIGS[config]
    cmd = list(cmd)
    for flag, value in (('-accel', accel), ('-smp', smp)):
        if value is not None:
            cmd[cmd.index(flag) + 1] = value
    if extra:
        i = cmd.index('-append') + 1
        cmd[i] = cmd[i] + ' ' + ' '.join(extra)
    return cmd


def last_line(console):
    lines = [l for l in console.replace(b'\r', b'').split(b'\n') if l.strip()]
    return lines[-1].decode('utf-8', 'replace') if lines else '(no console output)'


def last_kernel_time(console):
    times = KERNEL_TIME.findall(console)
    return float(times[-1]) if times else None


def boot_once(files, pristine, rundir, config, hang_after, limit, accel, until=SYSTEMD):
    """One boot until userspace or a hang; returns a dict describing it."""
    disk = os.path.join(rundir, 'disk.ext4')
    console_path = os.path.join(rundir, 'console.log')
    for old in (disk, console_path, os.path.join(rundir, 'facts.log'),
                os.path.join(rundir, 'net.pcap')):
        if os.path.exists(old):
            os.unlink(old)
    bt.copy_disk(pristine, disk)
    # ports 9 (discard): the guest never connects this early; nc runs only if it does
    cmd = configure(bt.qemu_command(files, disk, accel, 9, 9, rundir), config)
    qemu_log = open(os.path.join(rundir, 'qemu.log'), 'wb')
    started = time.monotonic()
    proc = subprocess.Popen(['timeout', '-k', '5', '%d' % (limit + 10)] + cmd,
                            stdin=subprocess.DEVNULL, stdout=qemu_log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    size, grew_at, longest_gap = 0, 0.0, 0.0
    kernel_done = userspace = None
    outcome = None
    try:
        while True:
            now = time.monotonic() - started
            try:
                new_size = os.path.getsize(console_path)
            except OSError:
                new_size = 0
            if new_size != size:
                longest_gap = max(longest_gap, now - grew_at)
                size, grew_at = new_size, now
                console = bt.read_bytes(console_path)
                if kernel_done is None and any(m in console for m in KERNEL_DONE):
                    kernel_done = now
                if any(m in console for m in until):
                    userspace, outcome = now, 'userspace'
                    break
            if now - grew_at > hang_after:
                outcome = 'hang'
                break
            if proc.poll() is not None:
                outcome = 'qemu exited (status %s)' % proc.returncode
                break
            if now > limit:
                outcome = 'time limit'
                break
            time.sleep(POLL)
    finally:
        bt.stop_process_group(proc)
        qemu_log.close()
    console = bt.read_bytes(console_path)
    result = {'config': config, 'outcome': outcome, 'userspace': userspace,
              'kernel_done': kernel_done, 'longest_gap': round(longest_gap, 2),
              'quiet_since': round(grew_at, 2), 'kernel_time': last_kernel_time(console),
              'last_line': last_line(console), 'wall': round(time.monotonic() - started, 2),
              'qemu_log': bt.read_bytes(os.path.join(rundir, 'qemu.log'))
              .decode('utf-8', 'replace')[-300:]}
    if os.path.exists(disk):
        os.unlink(disk)
    return result


def summarize(config, rows):
    hangs = [r for r in rows if r['outcome'] == 'hang']
    other = [r for r in rows if r['outcome'] not in ('hang', 'userspace')]
    ok = [r for r in rows if r['outcome'] == 'userspace']
    times = [r['userspace'] for r in ok]
    gaps = [r['longest_gap'] for r in ok]
    return {
        'config': config, 'boots': len(rows), 'hangs': len(hangs), 'other': len(other),
        'rate': len(hangs) / len(rows) if rows else 0.0,
        'median': statistics.median(times) if times else None,
        'max': max(times) if times else None,
        'kernel_median': statistics.median([r['kernel_done'] for r in ok
                                            if r['kernel_done'] is not None] or [0]),
        'gap_median': statistics.median(gaps) if gaps else None,
        'gap_max': max(gaps) if gaps else None,
        'hang_lines': ['%.2f s: %s' % (r['kernel_time'] or 0, r['last_line']) for r in hangs],
        'other_lines': ['%s: %s' % (r['outcome'], r['last_line']) for r in other],
    }


def fmt(value):
    return '-' if value is None else '%.1f' % value


def print_table(rows, configs):
    """The per-configuration table (rows: {config: [boot dicts]})."""
    bt.say('')
    bt.say('%-15s %5s %5s %7s %9s %7s %12s %12s' % ('config', 'boots', 'hangs', 'rate',
                                                   'median s', 'max s', 'silence med',
                                                   'silence max'))
    for config in configs:
        s = summarize(config, rows[config])
        bt.say('%-15s %5d %5d %6.1f%% %9s %7s %12s %12s%s'
               % (config, s['boots'], s['hangs'], 100 * s['rate'], fmt(s['median']),
                  fmt(s['max']), fmt(s['gap_median']), fmt(s['gap_max']),
                  '  (+%d other)' % s['other'] if s['other'] else ''))
        for line in s['hang_lines']:
            bt.say('    hang, last line at %s' % line)
        for line in s['other_lines']:
            bt.say('    %s' % line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--boots', type=int, default=50, help='boots per configuration')
    parser.add_argument('--config', default='mttcg,single,smp1,acpi-pm',
                        help='comma-separated configuration names (see --list)')
    parser.add_argument('--until', choices=sorted(UNTIL), default='systemd',
                        help="userspace = systemd's first line (default), or the "
                             "kernel's 'Run /init' (initramfs; faster, kernel hangs only)")
    parser.add_argument('--hang-after', type=float, default=30.0,
                        help='s without new console output before userspace = a hang')
    parser.add_argument('--limit', type=float, default=90.0, help='s per boot at most')
    parser.add_argument('--budget', type=float, default=3600.0,
                        help='s: no round of boots starts after this')
    parser.add_argument('--cache-dir', default=os.environ.get('AZP_BOOT_CACHE') or
                        os.path.join(os.path.expanduser('~'), '.cache', 'azp-boot-test'))
    parser.add_argument('--repo', default=bt.DEFAULT_REPO)
    parser.add_argument('--base-only', action='store_true',
                        help='boot the cached base tree (no install.sh, no preflight)')
    parser.add_argument('--keep', action='store_true', help='keep the work directory')
    parser.add_argument('--list', action='store_true', help='list the configurations')
    parser.add_argument('--table', metavar='JSONL', nargs='+',
                        help="only print the table of earlier runs' hangs.jsonl files")
    args = parser.parse_args(argv)
    if args.list:
        for name in sorted(CONFIGS):
            print('%-15s %s' % (name, CONFIGS[name][3]))
        return 0
    if args.table:
        rows = {}
        for path in args.table:
            with open(path) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        rows.setdefault(r['config'], []).append(r)
        print_table(rows, list(rows))
        return 0
    configs = [c.strip() for c in args.config.split(',') if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs or args.boots < 1:
        parser.error('unknown configuration(s) %s; known: %s'
                     % (', '.join(unknown), ', '.join(sorted(CONFIGS))))
    if os.geteuid() != 0:
        parser.error('must run as root (as boot_test.py)')
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix='azp-boot-hangs-')
    bt.say('work directory %s' % workdir)
    rows = dict((c, []) for c in configs)
    try:
        bt.ensure_host_tools()
        accel, why = bt.choose_accelerator()
        bt.say('accelerator: %s (%s)' % (accel, why))
        if args.base_only:
            tree, how = bt.base_rootfs(bt.IMAGES['default'].recipe, args.cache_dir,
                                       os.path.join(workdir, 'mmdebstrap.log'))
            kernel, initrd = bt.find_boot_files(tree)
            disk = os.path.join(workdir, 'pristine.ext4')
            bt.run(['mke2fs', '-q', '-t', 'ext4', '-L', 'root', '-d', tree, '-F', disk, '2G'],
                   'mke2fs', 300)
            files = {'kernel': kernel, 'initrd': initrd, 'disk': disk}
            bt.say('base tree: %s' % how)
        else:
            files = bt.build_image(bt.IMAGES['default'], workdir, args.cache_dir,
                                   os.path.abspath(args.repo),
                                   os.path.join(workdir, 'mmdebstrap.log'))
        rundir = os.path.join(workdir, 'run')
        os.makedirs(rundir)
        bt.say('image ready after %.0f s; %d boots x %s, until %s; hang = %.0f s without '
               'console output before that' % (time.monotonic() - started, args.boots,
                                               ','.join(configs), args.until, args.hang_after))
        log = open(os.path.join(workdir, 'hangs.jsonl'), 'a')
        for n in range(1, args.boots + 1):
            if time.monotonic() - started > args.budget:
                bt.say('budget of %.0f s used up: stopped after %d rounds' % (args.budget, n - 1))
                break
            for config in configs:
                r = boot_once(files, files['disk'], rundir, config, args.hang_after,
                              args.limit, accel, UNTIL[args.until])
                r['round'] = n
                rows[config].append(r)
                log.write(json.dumps(r) + '\n')
                log.flush()
                if r['outcome'] != 'userspace':
                    keep = os.path.join(workdir, 'console-%s-%d-%s.log'
                                        % (config, n, r['outcome'].split()[0]))
                    shutil.copyfile(os.path.join(rundir, 'console.log'), keep)
                bt.say('%3d %-15s %-10s at %5s s  kernel done %5s s  longest silence '
                       '%4.1f s%s' % (n, config, r['outcome'], fmt(r['userspace']),
                                      fmt(r['kernel_done']), r['longest_gap'],
                                      '' if r['outcome'] == 'userspace' else
                                      '  last: [%s] %s' % (fmt(r['kernel_time']),
                                                           r['last_line'])))
        log.close()
    except bt.TestFailure as exc:
        bt.say('FAIL: %s' % exc)
        return 1
    finally:
        if args.keep or any(r['outcome'] != 'userspace' for rs in rows.values() for r in rs):
            bt.say('kept the work directory %s' % workdir)
            for path in ('run/disk.ext4', 'image-default/pristine.ext4', 'pristine.ext4'):
                if not args.keep and os.path.exists(os.path.join(workdir, path)):
                    os.unlink(os.path.join(workdir, path))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows, configs)
    bt.say('total %.0f s' % (time.monotonic() - started))
    return 0


if __name__ == '__main__':
    sys.exit(main())
