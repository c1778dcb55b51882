"""`fake_azure.py boot IMAGE`: boot any disk image the way Azure would, against the
emulator, and say whether it provisions.

    python3 tests/fake_azure.py boot IMAGE [--uefi] [--computer-name NAME]
        [--admin-username USER] [--ssh-key FILE.pub] [--password-file FILE]
        [--custom-data FILE] [--user-data FILE] [--vm-id UUID] [--timeout SECONDS]
        [--console] [--ssh [--ssh-run COMMAND]] [--keep] [--memory MB]
        [--accel auto|kvm|tcg]

IMAGE is raw, qcow2, VHD (fixed or dynamic) or VHDX, booted through its own boot
loader: BIOS (Azure's Gen1, the default) or UEFI with OVMF (Gen2, --uefi).  The
image is never written: the guest runs on a temporary qcow2 overlay backed by it.
The VM looks like an Azure VM (Hyper-V's SMBIOS manufacturer and product, the
chassis asset tag cloud-init's ds-identify looks for, the vmId as SMBIOS UUID,
byte-swapped on Gen1 as Hyper-V shows it), gets the provisioning media as a CD-ROM
(ovf-env.xml from the options) and an IMDS consistent with it.  Its network is
QEMU's user network with restrict=on: the guest reaches nothing but 168.63.129.16:80
(and :32526, the HostGAPlugin) and 169.254.169.254:80, forwarded to the emulator on
this machine's loopback (and, with --ssh, this machine reaches its port 22 through
127.0.0.1).

Verdict and exit status:
  0  Ready after N s (and, with --ssh, the admin user logged in)
  1  ProvisioningFailed: the reason the guest reported
  3  nothing reported by the deadline: a diagnosis from what the emulator, the
     packet capture and the serial console saw, and the console's last lines
  4  Ready, but the --ssh login failed
  2  the boot could not be started (one line saying what to do)
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import boot_test as bt      # noqa: E402  (its QEMU, network and capture pieces)
import fake_azure as fa     # noqa: E402

SMBIOS_MANUFACTURER = 'Microsoft Corporation'
SMBIOS_PRODUCT = 'Virtual Machine'
# What cloud-init's ds-identify recognises an Azure VM by (dmi chassis_asset_tag).
AZURE_ASSET_TAG = '7783-7084-3265-9085-8269-3286-77'
# Debian's ovmf package: (code, variables template), the first pair found is used.
OVMF_PAIRS = (('/usr/share/OVMF/OVMF_CODE_4M.fd', '/usr/share/OVMF/OVMF_VARS_4M.fd'),
              ('/usr/share/OVMF/OVMF_CODE.fd', '/usr/share/OVMF/OVMF_VARS.fd'))
QEMU = 'qemu-system-x86_64'
QEMU_IMG = 'qemu-img'
DEFAULT_TIMEOUT = 300.0     # s from QEMU start: a TCG boot to Ready takes 40-150 s here
SSH_TIMEOUT = 120.0         # s after Ready for the --ssh login (sshd may start later)
READABLE_FORMATS = ('raw', 'qcow2', 'vpc', 'vhdx', 'vmdk', 'qed', 'vdi')
FORMAT_NAMES = {'vpc': 'VHD', 'vhdx': 'VHDX', 'raw': 'raw', 'qcow2': 'qcow2'}
# Signatures of files QEMU cannot boot as they are (a packed or archived disk).
PACKED = ((b'\x1f\x8b', 'gzip-compressed', 'gunzip -k IMAGE'),
          (b'\xfd7zXZ\x00', 'xz-compressed', 'unxz -k IMAGE'),
          (b'\x28\xb5\x2f\xfd', 'zstd-compressed', 'unzstd IMAGE'),
          (b'BZh', 'bzip2-compressed', 'bunzip2 -k IMAGE'),
          (b'PK\x03\x04', 'a zip archive', 'unzip IMAGE'))
CONSOLE_LINES = 15          # the console's last lines shown with a diagnosis
ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1bc')


class KitError(Exception):
    """The boot cannot be started: a one-line message saying what to do."""


def say(text=''):
    sys.stdout.write(text + '\n')
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# The image: format, boot sector, overlay
# ---------------------------------------------------------------------------

def run_tool(cmd, what, timeout=120):
    """(stdout text) of cmd; KitError with its message when it fails."""
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise KitError('%s took more than %d s' % (what, timeout))
    if proc.returncode != 0:
        message = ' '.join((err or out).strip().splitlines()[-1:]) or 'exit %d' % proc.returncode
        raise KitError('%s failed: %s' % (what, message))
    return out


def read_head(path, size=4096):
    with open(path, 'rb') as f:
        return f.read(size)


def has_vhd_footer(path):
    """A fixed VHD is a raw disk with a 512-byte footer: 'conectix' in the last sector."""
    with open(path, 'rb') as f:
        f.seek(0, 2)
        if f.tell() < 512:
            return False
        f.seek(-512, 2)
        return f.read(8) == b'conectix'


def image_format(image, qemu_img=QEMU_IMG):
    """The QEMU block driver that reads image ('raw', 'qcow2', 'vpc', 'vhdx'...);
    KitError for a file QEMU cannot boot as it is."""
    head = read_head(image, 512)
    for magic, what, fix in PACKED:
        if head.startswith(magic):
            raise KitError('%s is %s, not a disk image: unpack it first (%s)'
                           % (image, what, fix.replace('IMAGE', image)))
    if len(head) >= 262 and read_head(image, 263)[257:262] == b'ustar':
        raise KitError('%s is a tar archive (an OVA?), not a disk image: extract the '
                       'disk from it (tar -xf) and boot that' % image)
    info = json.loads(run_tool([qemu_img, 'info', '--output=json', image],
                               'qemu-img info %s' % image) or '{}')
    fmt = info.get('format', '')
    if fmt == 'raw' and has_vhd_footer(image):
        return 'vpc'     # a fixed VHD: QEMU's vpc driver leaves its footer out
    if fmt not in READABLE_FORMATS:
        raise KitError('%s: QEMU reads it as %r, which it cannot boot: convert it to '
                       'raw, qcow2 or a fixed VHD (qemu-img convert -O raw)' % (image, fmt))
    return fmt


def first_sectors(image, fmt, workdir, count=34, qemu_img=QEMU_IMG):
    """The guest-visible first `count` sectors of the disk (MBR + GPT header)."""
    if fmt in ('raw', 'vpc') and not read_head(image, 8) == b'conectix':
        return read_head(image, 512 * count)    # raw, or a fixed VHD (footer at the end)
    out = os.path.join(workdir, 'head.raw')
    run_tool([qemu_img, 'dd', '-f', fmt, '-O', 'raw', 'bs=512', 'count=%d' % count,
              'if=' + image, 'of=' + out], 'qemu-img dd (reading the boot sector)')
    data = read_head(out, 512 * count)
    os.unlink(out)
    return data


def boot_problem(sectors, uefi):
    """Why a disk whose first sectors are these cannot boot (None when it may).
    Gen1 needs boot code in the MBR; Gen2 a GPT or an MBR EFI system partition."""
    if len(sectors) < 512 or sectors[510:512] != b'\x55\xaa':
        if len(sectors) >= 1082 and sectors[1080:1082] == b'\x53\xef':
            return ('it is an ext2/3/4 file system, not a partitioned disk: Azure boots '
                    'whole disks (a partition table and a boot loader, e.g. GRUB)')
        return ('no partition table or boot sector at sector 0 (no 55 AA signature): '
                'build a partitioned disk with a boot loader')
    if uefi:
        gpt = sectors[512:520] == b'EFI PART'
        esp = any(sectors[446 + 16 * i + 4] == 0xef for i in range(4))
        if not gpt and not esp:
            return ('--uefi (Gen2) needs a GPT disk or an EFI system partition, this disk '
                    'has neither: boot it as Gen1 (without --uefi) or add an ESP with '
                    'a UEFI boot loader')
        return None
    if not any(bytearray(sectors[:440])):
        return ('the MBR holds no boot code (Gen1 boots through BIOS): install a BIOS boot '
                'loader (grub-install --target=i386-pc), or try --uefi if it is a Gen2 image')
    return None


def make_overlay(image, fmt, workdir, qemu_img=QEMU_IMG):
    """A qcow2 file backed by image: the guest's writes land there, never in image."""
    overlay = os.path.join(workdir, 'overlay.qcow2')
    run_tool([qemu_img, 'create', '-q', '-f', 'qcow2', '-F', fmt, '-b',
              os.path.abspath(image), overlay], 'qemu-img create (the overlay)')
    return overlay


# ---------------------------------------------------------------------------
# The VM
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def find_ovmf():
    for code, variables in OVMF_PAIRS:
        if os.path.isfile(code) and os.path.isfile(variables):
            return code, variables
    raise KitError('OVMF not found (%s): --uefi needs UEFI firmware, apt-get install ovmf'
                   % OVMF_PAIRS[0][0])


def smbios_uuid(vm_id, uefi):
    """What the guest reads as product_uuid: Hyper-V shows a Gen1 VM's vmId with its
    first three fields byte-swapped, a Gen2 VM's as it is."""
    return vm_id if uefi else bt.gen1_uuid(vm_id)


def qemu_command(qemu, accel, disk, netdev, rundir, media=None, uefi=None, uuid=None,
                 memory=1024):
    """uefi: (code, vars copy) of OVMF for Gen2, None for Gen1 (SeaBIOS)."""
    cmd = [qemu, '-name', 'azp-kit', '-nodefaults', '-no-user-config', '-display', 'none',
           '-no-reboot', '-machine', 'pc', '-accel', accel, '-m', str(memory), '-smp', '2',
           '-smbios', 'type=1,manufacturer=%s,product=%s' % (SMBIOS_MANUFACTURER,
                                                            SMBIOS_PRODUCT),
           '-smbios', 'type=3,manufacturer=%s,asset=%s' % (SMBIOS_MANUFACTURER,
                                                          AZURE_ASSET_TAG),
           # Hyper-V's SMBIOS makes ata_piix ignore IDE disks (storvsc serves them on
           # Azure): the disk is virtio, the CD-ROM stays on IDE as Azure attaches it
           '-drive', 'file=%s,format=qcow2,if=virtio,cache=unsafe' % disk,
           '-netdev', netdev,
           # romfile= : no iPXE, so a disk that does not boot fails at once
           '-device', 'virtio-net-pci,netdev=n0,romfile=,mac=' + bt.GUEST_MAC,
           '-object', 'filter-dump,id=d0,netdev=n0,file=' + os.path.join(rundir, 'net.pcap'),
           '-device', 'virtio-rng-pci',
           '-serial', 'file:' + os.path.join(rundir, 'console.log')]
    if uuid:
        cmd += ['-uuid', uuid]
    if media:
        cmd += ['-drive', 'file=%s,format=raw,if=ide,index=1,media=cdrom,readonly=on' % media]
    if uefi:
        cmd += ['-drive', 'if=pflash,format=raw,unit=0,readonly=on,file=' + uefi[0],
                '-drive', 'if=pflash,format=raw,unit=1,file=' + uefi[1]]
    return cmd


# ---------------------------------------------------------------------------
# What was seen: timings, verdict, diagnosis
# ---------------------------------------------------------------------------

def guest_dhcp(packets):
    return [m for m in bt.dhcp_messages(packets) if m['from_guest']]


def capture_offset(packets, requests):
    """Seconds to add to a capture time for this machine's clock: filter-dump's clock
    lags (see boot_test.capture_offset); aligned on the guest's first connection to
    the WireServer or IMDS.  0.0 without one."""
    syns = bt.tcp_syns_from_guest(packets, bt.WIRESERVER_IP, 80) + \
        bt.tcp_syns_from_guest(packets, bt.IMDS_IP, 80)
    if not syns or not requests:
        return 0.0
    return min(r['time'] for r in requests) - min(syns)


def failed_report(reports):
    for r in reports:
        if r.get('substatus') == 'ProvisioningFailed' and 200 <= r.get('status', 0) < 300:
            return r
    return None


def ready_time(reports):
    for r in reports:
        if r.get('state') == 'Ready' and 200 <= r.get('status', 0) < 300:
            return r['time']
    return None


def console_lines(console, limit=CONSOLE_LINES):
    text = ANSI.sub('', console.replace('\r\n', '\n').replace('\r', '\n'))
    lines = [l.rstrip() for l in text.split('\n') if l.strip()]
    return lines[-limit:]


# The real root's init has run: systemd's lines and banner (not GRUB's "Welcome to
# GRUB!"), a login prompt.
USERSPACE = re.compile(r'systemd\[1\]|Welcome to (?!GRUB)|\S login: ')
# Debian's initramfs giving up on the root file system (the disk driver is not in it,
# or root= names a disk that is not there).
NO_ROOT = re.compile(r'Gave up waiting for root|ALERT! .* does not exist|'
                     r'VFS: Unable to mount root fs')


def reached_userspace(console):
    return bool(USERSPACE.search(console))


def diagnose(requests, reports, dhcp, console, qemu_exit=None):
    """Why nothing was reported: one sentence from what the emulator (requests,
    health reports), the packet capture (the guest's DHCP messages) and the serial
    console saw.  qemu_exit: (status, s after start) when QEMU ended by itself."""
    wire = [r for r in requests if r['server'] == 'wireserver']
    imds = [r for r in requests if r['server'] == 'imds']
    goal = [r for r in wire if 'comp=goalstate' in r['path']]
    if reports:
        last = reports[-1]
        why = 'reported %s, answered %s' % (last.get('state'), last.get('status'))
        if last.get('status') == 410:
            why += ' (a stale incarnation: fetch the goal state again and re-post)'
        text = ('health reports but no accepted Ready: %d report(s), the last %s'
                % (len(reports), why))
    elif goal:
        text = ('goal state but no report: the guest fetched the goal state %d time(s) '
                'but never posted a health report (the agent stopped or failed before '
                'reporting: see its log on the console)' % len(goal))
    elif wire:
        text = ('WireServer asked (%s) but never for the goal state'
                % ', '.join(sorted(set(r['path'] for r in wire)))[:200])
    elif imds:
        text = ('IMDS only: the guest asked IMDS %d time(s) but never the WireServer '
                '(the agent stopped after reading the instance metadata)' % len(imds))
    elif dhcp:
        text = ('no request at all: the guest got %s but asked neither the WireServer '
                'nor IMDS: is a provisioning agent installed, enabled and started?'
                % ('a DHCP lease' if any(m['type'] == 'REQUEST' for m in dhcp)
                   else 'DHCP messages out'))
    elif reached_userspace(console):
        text = ('no DHCP: the system started (userspace on the console) but the guest '
                'never asked for an address: the image has no network configuration for '
                'its NIC (a systemd-networkd .network file with DHCP=ipv4, NetworkManager, '
                'ifupdown), or no driver for it')
    elif NO_ROOT.search(console):
        text = ('kernel never reached userspace: the root file system was not found (%s): '
                'is the disk driver (virtio_blk here; hv_storvsc on Azure) in the '
                'initramfs, and does root= name the disk?'
                % NO_ROOT.search(console).group(0))
    elif bt.KERNEL_TIME.search(console.encode('utf-8', 'replace')):
        text = ('kernel never reached userspace: the kernel logged but no init started '
                '(root file system not found? initramfs without the disk driver?)')
    elif console.strip():
        text = ('kernel never reached userspace, or it does not log to the serial '
                'console: only the boot loader spoke and there was no network traffic '
                '(add console=ttyS0 to the kernel command line to see more)')
    else:
        text = ('no console output and no network traffic: the boot loader or kernel '
                'never started, or nothing logs to the serial console (console=ttyS0)')
    if qemu_exit is not None:
        text = ('QEMU exited (status %d) %.0f s after its start: the guest powered off, '
                'rebooted or crashed; %s' % (qemu_exit[0], qemu_exit[1], text))
    return text


def timing_line(started, dhcp, requests, ready_at, offset):
    parts = []
    if dhcp:
        parts.append('first DHCP %.1f s%s' % (dhcp[0]['time'] + offset - started,
                                              '' if offset else ' (capture clock, +-1 s)'))
    else:
        parts.append('first DHCP: none seen')
    if requests:
        first = min(requests, key=lambda r: r['time'])
        parts.append('first request %.1f s (%s)' % (first['time'] - started, first['server']))
    else:
        parts.append('first request: none')
    parts.append('Ready %.1f s' % (ready_at - started) if ready_at else 'Ready: never')
    return 'timings from QEMU start: ' + ', '.join(parts)


# ---------------------------------------------------------------------------
# --ssh
# ---------------------------------------------------------------------------

SSH_BASE = ['-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
            '-o', 'LogLevel=ERROR', '-o', 'ConnectTimeout=10']


def ssh_login(port, user, workdir, key=None, password_file=None, limit=SSH_TIMEOUT,
              command='hostname'):
    """Log in to the guest through the forwarded port with key (a private key file) or
    the password in password_file (handed to ssh by an askpass helper that reads the
    file: the password is on no command line) and run command (`hostname`).
    Returns (ok, its output or the last error, seconds it took)."""
    cmd = ['ssh', '-p', str(port)] + SSH_BASE
    env = dict(os.environ)
    if key:
        cmd += ['-i', key, '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes',
                '-o', 'PasswordAuthentication=no']
    else:
        askpass = os.path.join(workdir, 'askpass')
        with open(askpass, 'w') as f:
            f.write('#!/bin/sh\nexec cat -- "$AZP_KIT_PASSWORD_FILE"\n')
        os.chmod(askpass, 0o700)
        env.update(SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE='force', DISPLAY='azp-kit:0',
                   AZP_KIT_PASSWORD_FILE=os.path.abspath(password_file))
        cmd += ['-o', 'PubkeyAuthentication=no', '-o', 'NumberOfPasswordPrompts=1',
                '-o', 'PreferredAuthentications=password,keyboard-interactive']
    cmd += ['%s@127.0.0.1' % user, command]
    started = time.monotonic()
    last = 'no attempt'
    while time.monotonic() - started < limit:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, universal_newlines=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            bt.stop_process_group(proc)
            out, err = '', 'ssh took more than 30 s'
        if proc.returncode == 0 and out.strip():
            return True, out.strip(), time.monotonic() - started
        last = (err or out).strip().splitlines()[-1:] or ['exit %s' % proc.returncode]
        last = last[0]
        time.sleep(2)
    return False, last, time.monotonic() - started


# ---------------------------------------------------------------------------
# The boot
# ---------------------------------------------------------------------------

def which_or_fail(program, package):
    path = shutil.which(program)
    if not path:
        raise KitError('%s not found: apt-get install %s' % (program, package))
    return path


def public_key_of(args, workdir):
    """(public key line, private key path or None): --ssh-key's, else a new key pair
    made for this boot (so --ssh works without one)."""
    if args.ssh_key:
        with open(args.ssh_key) as f:
            line = f.read().strip()
        private = args.ssh_key[:-4] if args.ssh_key.endswith('.pub') else None
        if args.ssh and not (private and os.path.isfile(private)) and not args.password_file:
            raise KitError('--ssh logs in with the private key next to %s (the same name '
                           'without .pub): not found' % args.ssh_key)
        return line, private if private and os.path.isfile(private) else None
    if not shutil.which('ssh-keygen'):
        if args.ssh:
            raise KitError('ssh-keygen not found (--ssh without --ssh-key makes a key): '
                           'apt-get install openssh-client')
        return fa._fake_ssh_key('azp-kit'), None
    key = os.path.join(workdir, 'id_ed25519')
    run_tool(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'azp-kit', '-f', key],
             'ssh-keygen')
    with open(key + '.pub') as f:
        return f.read().strip(), key


def prepare(args, workdir):
    """Everything before QEMU starts.  Returns a dict of what boot() needs."""
    which_or_fail(args.qemu, 'qemu-system-x86')
    qemu_img = which_or_fail(QEMU_IMG, 'qemu-utils')
    if not os.path.isfile(args.image):
        raise KitError('%s: no such file' % args.image)
    try:
        read_head(args.image, 1)
    except OSError as e:
        raise KitError('%s: cannot read it (%s)' % (args.image, e.strerror))
    uefi = find_ovmf() if args.uefi else None
    if not shutil.which('nc') or not bt.openbsd_nc():
        raise KitError("OpenBSD's nc not found (QEMU forwards the guest's connections "
                       "through it): apt-get install netcat-openbsd")
    fmt = image_format(args.image, qemu_img)
    problem = boot_problem(first_sectors(args.image, fmt, workdir, qemu_img=qemu_img),
                           args.uefi)
    if problem:
        raise KitError('%s is not bootable: %s' % (args.image, problem))
    overlay = make_overlay(args.image, fmt, workdir, qemu_img)
    if uefi:
        variables = os.path.join(workdir, 'OVMF_VARS.fd')
        shutil.copyfile(uefi[1], variables)
        uefi = (uefi[0], variables)
    key, private = public_key_of(args, workdir)
    password = fa.read_password(args.password_file) if args.password_file else None
    custom_data = None
    if args.custom_data:
        with open(args.custom_data, 'rb') as f:
            custom_data = f.read()
    user_data = None
    if args.user_data:
        with open(args.user_data, 'rb') as f:
            user_data = f.read()
    media = os.path.join(workdir, 'media.iso')
    fa.build_media(media, fa.make_ovf_env(
        args.computer_name, args.admin_username, password=password,
        disable_ssh_password_auth=password is None, public_keys=[key],
        custom_data=custom_data))
    del password
    return {'format': fmt, 'overlay': overlay, 'uefi': uefi, 'key': key,
            'private_key': private, 'media': media, 'user_data': user_data}


def watch(proc, az, console_path, started, deadline, follow):
    """Poll until Ready or ProvisioningFailed is accepted, QEMU ends or the deadline
    passes.  Returns (what ended it, QEMU's (status, s) when it exited)."""
    shown = 0
    while True:
        now = time.monotonic()
        if follow:
            data = bt.read_bytes(console_path)
            if len(data) > shown:
                sys.stdout.write(data[shown:].decode('utf-8', 'replace'))
                sys.stdout.flush()
                shown = len(data)
        reports = az.health_reports
        if ready_time(reports) is not None:
            return 'ready', None
        if failed_report(reports):
            return 'failed', None
        rc = proc.poll()
        if rc is not None:
            return 'exited', (rc, now - started)
        if now - started > deadline:
            return 'deadline', None
        time.sleep(0.2)


def boot(args, workdir):
    prep = prepare(args, workdir)
    accel, why = bt.choose_accelerator() if args.accel == 'auto' else (args.accel, 'asked')
    ssh_port = free_port() if args.ssh else None
    vm_id = args.vm_id or str(uuidlib.uuid4())
    console_path = os.path.join(workdir, 'console.log')
    with fa.FakeAzure(computer_name=args.computer_name, admin_username=args.admin_username,
                      public_keys=[prep['key']], vm_id=vm_id, user_data=prep['user_data'],
                      disable_password_authentication=not args.password_file,
                      # the NIC as the guest has it: QEMU's MAC, slirp's first lease
                      mac_address=bt.GUEST_MAC, private_ip=bt.SLIRP['dhcpstart'],
                      # the goal state's URLs as the guest reaches them
                      advertised_wireserver='%s:80' % bt.WIRESERVER_IP,
                      record_file=os.path.join(workdir, 'requests.jsonl')) as az:
        # waagent asks the HostGAPlugin for vmSettings (FastTrack) first; the emulator's
        # 404 is what a host without FastTrack answers (waagent: "the HostGAPlugin does
        # not support FastTrack"), where a refused connection stops its goal state
        netdev = bt.slirp_netdev(int(az.wireserver_addr.rsplit(':', 1)[1]),
                                 int(az.imds_addr.rsplit(':', 1)[1]), ssh_port,
                                 hostgaplugin=True)
        cmd = qemu_command(args.qemu, accel, prep['overlay'], netdev, workdir,
                           media=prep['media'], uefi=prep['uefi'],
                           uuid=smbios_uuid(vm_id, args.uefi), memory=args.memory)
        with open(os.path.join(workdir, 'qemu.cmd'), 'w') as f:
            f.write(' '.join("'%s'" % a if ' ' in a else a for a in cmd) + '\n')
        say('boot: %s (%s) as Azure %s, %s (%s), on a qcow2 overlay; vmId %s'
            % (args.image, FORMAT_NAMES.get(prep['format'], prep['format']),
               'Gen2 (UEFI, OVMF)' if args.uefi else 'Gen1 (BIOS)', accel.upper(), why,
               vm_id))
        say('boot: console: %s; deadline %.0f s' % (console_path, args.timeout))
        qemu_log = open(os.path.join(workdir, 'qemu.log'), 'wb')
        started_wall = time.time()
        started = time.monotonic()
        limit = args.timeout + (SSH_TIMEOUT + 30 if args.ssh else 0) + 15
        proc = subprocess.Popen(['timeout', '-k', '5', '%d' % limit] + cmd,
                                stdin=subprocess.DEVNULL, stdout=qemu_log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ended, qemu_exit = watch(proc, az, console_path, started, args.timeout,
                                     args.console)
            login = None
            if ended == 'ready' and args.ssh:
                login = ssh_logins(args, prep, ssh_port, workdir)
        finally:
            bt.stop_process_group(proc)
            qemu_log.close()
        requests, reports = az.requests, az.health_reports
    return report(args, workdir, ended, qemu_exit, login, requests, reports, started_wall)


def ssh_logins(args, prep, port, workdir):
    """([(how, ok, hostname or error, s after Ready when it worked or was given up)] for
    the key and, when given, the password; then (ok, output) of --ssh-run's command
    run with the key, or None)."""
    done, ran = [], None
    ready = time.monotonic()
    ways = [('key', {'key': prep['private_key']})] if prep['private_key'] else []
    if args.password_file:
        ways.append(('password', {'password_file': args.password_file}))
    for how, credential in ways:
        ok, seen, _ = ssh_login(port, args.admin_username, workdir, **credential)
        done.append((how, ok, seen, time.monotonic() - ready))
    if args.ssh_run and prep['private_key'] and done[0][1]:
        ok, out, _ = ssh_login(port, args.admin_username, workdir, key=prep['private_key'],
                               limit=30, command=args.ssh_run)
        ran = (ok, out)
    return done, ran


def report(args, workdir, ended, qemu_exit, login, requests, reports, started):
    console = bt.read_bytes(os.path.join(workdir, 'console.log')).decode('utf-8', 'replace')
    packets = bt.read_pcap(os.path.join(workdir, 'net.pcap'))
    dhcp = guest_dhcp(packets)
    offset = capture_offset(packets, requests)
    if ended == 'ready':
        ready_at = ready_time(reports)
        say('Ready after %.0f s' % (ready_at - started))
        say(timing_line(started, dhcp, requests, ready_at, offset))
        code = 0
        logins, ran = login or ([], None)
        for how, ok, seen, took in logins:
            if ok:
                note = '' if seen == args.computer_name else (
                    ' (not the computer name %s)' % args.computer_name)
                say('ssh %s@127.0.0.1 -p PORT with the %s: hostname -> %s%s (%.1f s after '
                    'Ready)' % (args.admin_username, how, seen, note, took))
            else:
                say('ssh login as %s with the %s FAILED for %.0f s after Ready: %s'
                    % (args.admin_username, how, took, seen))
                code = 4
        if ran:
            say('ssh-run (%s):' % ('exit 0' if ran[0] else 'FAILED'))
            for line in ran[1].splitlines():
                say('  > ' + line)
        return code
    say(timing_line(started, dhcp, requests, None, offset))
    if ended == 'failed':
        failed = failed_report(reports)
        say('ProvisioningFailed: %s' % (failed.get('description') or '(no description)')[:600])
        return 1
    say('nothing reported by the deadline (%.0f s): %s' % (
        args.timeout, diagnose(requests, reports, dhcp, console, qemu_exit)))
    if qemu_exit is not None and qemu_exit[0] != 0:
        said = console_lines(bt.read_bytes(os.path.join(workdir, 'qemu.log')).decode(
            'utf-8', 'replace'), 3)
        for line in said:
            say('qemu: ' + line[:300])
    lines = console_lines(console)
    say('console, last %d lines:' % len(lines) if lines else 'console: empty')
    for line in lines:
        say('  | ' + line[:200])
    return 3


def add_boot_arguments(parser):
    parser.add_argument('image', metavar='IMAGE',
                        help='the disk image: raw, qcow2, VHD or VHDX (never written)')
    parser.add_argument('--uefi', action='store_true',
                        help='boot as a Gen2 VM: UEFI with OVMF (default: Gen1, BIOS)')
    parser.add_argument('--computer-name', default='azp-kit-vm', metavar='NAME',
                        help='the VM\'s computer name (media HostName, IMDS '
                             'osProfile.computerName; default: %(default)s)')
    parser.add_argument('--admin-username', default='azureuser', metavar='USER',
                        help='the admin user to create (default: %(default)s)')
    parser.add_argument('--ssh-key', metavar='FILE.pub',
                        help='the admin\'s SSH public key (default: a new key pair made '
                             'for this boot)')
    parser.add_argument('--password-file', metavar='FILE',
                        help='the admin\'s password (the file less a final newline; '
                             'never on a command line): on the media, with '
                             'DisableSshPasswordAuthentication false')
    parser.add_argument('--password', nargs='?', action=fa._RefusePassword,
                        help=argparse.SUPPRESS)
    parser.add_argument('--custom-data', metavar='FILE', help='CustomData on the media')
    parser.add_argument('--user-data', metavar='FILE', help='IMDS compute.userData')
    parser.add_argument('--vm-id', metavar='UUID', help='the vmId (default: a random one)')
    parser.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT, metavar='SECONDS',
                        help='deadline from QEMU start (default: %(default).0f)')
    parser.add_argument('--console', action='store_true',
                        help='also print the serial console as it comes')
    parser.add_argument('--ssh', action='store_true',
                        help='after Ready, log in as the admin user (key, and password '
                             'when given) through a forwarded port and run hostname')
    parser.add_argument('--ssh-run', metavar='COMMAND',
                        help='with --ssh: also run COMMAND as the admin user (key login) '
                             'and print its output')
    parser.add_argument('--keep', action='store_true',
                        help='keep the work directory (overlay, console, capture, '
                             'requests); it is always kept when the verdict is not Ready')
    parser.add_argument('--memory', type=int, default=1024, metavar='MB',
                        help='guest memory (default: %(default)s)')
    parser.add_argument('--accel', choices=('auto', 'kvm', 'tcg'), default='auto',
                        help='KVM when usable, else TCG (default: auto)')
    parser.add_argument('--qemu', default=QEMU, metavar='PROGRAM', help=argparse.SUPPRESS)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='fake_azure.py boot',
        # no abbreviations: "--password X" must not become "--password-file X"
        allow_abbrev=False,
        description='Boot a disk image as an Azure VM would, against the emulator, and '
                    'say whether it provisions (exit 0 Ready, 1 ProvisioningFailed, 3 '
                    'nothing by the deadline, 4 Ready but --ssh failed, 2 cannot boot).')
    add_boot_arguments(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    workdir = tempfile.mkdtemp(prefix='azp-kit-')
    code = 2
    try:
        code = boot(args, workdir)
    except KitError as e:
        sys.stderr.write('fake_azure.py boot: %s\n' % e)
    except (OSError, ValueError) as e:
        sys.stderr.write('fake_azure.py boot: %s\n' % e)
    finally:
        media = os.path.join(workdir, 'media.iso')
        if os.path.exists(media):
            os.unlink(media)    # it holds the password, if one was given
        if args.keep or code not in (0, 2):
            say('boot: kept %s (console.log, net.pcap, requests.jsonl, qemu.log, '
                'qemu.cmd)' % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == '__main__':
    sys.exit(main())
