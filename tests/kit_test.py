#!/usr/bin/env python3
"""Whole bootable disk images through `fake_azure.py boot` (issue 22).

    python3 tests/kit_test.py [--only NAME[,NAME]] [--repeat N] [--list] [--keep]
                              [--cache-dir DIR] [--repo DIR]

Builds Debian 12 disk images the way image builders make them -- an MBR partition
table, one ext4 partition, GRUB for BIOS in the MBR and the gap behind it, the
kernel command line in /boot/grub/grub.cfg -- from Debian's packages: the boot
test's cached mmdebstrap base (NetworkManager, sudo, openssh-server; see
tests/boot_test.py), its tree written into the partition by `mke2fs -d` and GRUB's
images by `grub-mkimage` from grub-pc-bin: no loop device, no mount.  Disks are
cached in --cache-dir (kit-disks/) while their recipe, install.sh and the
provisioner are unchanged.

Then each boot runs the kit exactly as a user does (`python3 tests/fake_azure.py
boot DISK ...`, a child process) and judges its verdict, its exit status and the
image's bytes (sha256 before and after: the kit must never write the image):

  ours        (CI) install.sh --provision-user in the image; a password and the
              kit's own key: exit 0, "Ready after N s", ssh logins with the key and
              the password print the computer name.
  gen2        (--only) the same as a Gen2 VM (--uefi, OVMF): a GPT disk with an EFI
              system partition (FAT made by mkfs.vfat and mtools, no mount) holding
              GRUB for UEFI at \\EFI\\BOOT\\BOOTX64.EFI: exit 0, Ready, ssh login.
  vhd         (--only) the ours disk converted to a fixed VHD (what Azure takes):
              exit 0, Ready, ssh login.
  cloud-init  (--only) Debian 12's cloud-init (22.4.2) instead of our unit, on the
              boot test's networkd recipe plus cloud-init, isc-dhcp-client, eject,
              openssh-server, sudo: its Azure datasource (found through the asset
              tag) reaches Ready; ssh logins with the key and the password.
  waagent     (--only) Debian 12's waagent (2.7.3.0) provisioning itself, as an image
              builder sets it up (Provisioning.Agent=waagent, eject installed), plus
              two stand-ins for what QEMU under TCG cannot give: routes to
              168.63.129.16 and 169.254.169.254 in the image's networkd file (Azure's
              DHCP sends them, option 121; waagent finds the WireServer by that route
              or by DHCP option 245, neither of which QEMU's DHCP sends) and a drop-in
              emptying walinuxagent.service's ConditionVirtualization=microsoft
              (systemd reads "qemu" from TCG's CPUID).  Ready; ssh with key and
              password.
  no-network  (--only) the same image with NetworkManager disabled: exit 3, "no
              DHCP" (the system started, no address was asked for).
  no-agent    (--only) the base without our unit: exit 3, "no request at all"
              (DHCP seen, nothing asked the WireServer or IMDS).

Needs root (the base tree is root's), qemu-system-x86, qemu-utils, grub-pc-bin,
fdisk, e2fsprogs, genisoimage, netcat-openbsd, openssh-client (gen2 also ovmf,
grub-efi-amd64-bin, dosfstools, mtools): missing ones are a failure naming the
package.  Ends with `N passed, M failed` and the boot times.

Issue 22's time-to-Ready comparison: `--only ours,cloud-init,waagent --repeat 3` prints the
medians of QEMU start -> Ready accepted and -> the first ssh login with the key, their
ratios to ours, and where each agent spent its time (its systemd units' start and
end, s of guest uptime, read in the guest with the kit's --ssh-run).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import boot_test as bt      # noqa: E402

DEFAULT_REPO = os.path.dirname(HERE)
KIT_RECIPE_VERSION = 1      # bump to rebuild every cached disk
DISK_SIZE = 2 * 1024        # MiB
PART_START = 2048           # sectors: the first partition at 1 MiB, GRUB's core.img before
GRUB_DIR = '/usr/lib/grub/i386-pc'
GRUB_MODULES = ['biosdisk', 'part_msdos', 'ext2', 'normal', 'linux', 'boot', 'configfile',
                'serial', 'terminal', 'echo', 'test', 'search', 'search_fs_uuid', 'gzio']
# root by file-system UUID, as Debian's grub-mkconfig writes it; the console on the
# first serial port, as Azure's boot diagnostics read it
GRUB_CFG = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry 'Debian GNU/Linux' {
    search --no-floppy --fs-uuid --set=root %(uuid)s
    linux /boot/%(kernel)s root=UUID=%(uuid)s ro console=tty0 console=ttyS0,115200 panic=-1
    initrd /boot/%(initrd)s
}
"""
FSTAB = 'UUID=%s / ext4 errors=remount-ro 0 1\n'
KIT_TOOLS = {'qemu-system-x86_64': 'qemu-system-x86', 'qemu-img': 'qemu-utils',
             'grub-mkimage': 'grub-pc-bin', 'sfdisk': 'fdisk', 'mke2fs': 'e2fsprogs',
             'genisoimage': 'genisoimage', 'ssh': 'openssh-client', 'nc': 'netcat-openbsd'}
# only for the Gen2 disk and boot
UEFI_TOOLS = {'mkfs.vfat': 'dosfstools', 'mcopy': 'mtools', 'mmd': 'mtools'}
UEFI_FILES = {'/usr/lib/grub/x86_64-efi/linux.mod': 'grub-efi-amd64-bin',
              '/usr/share/OVMF/OVMF_CODE_4M.fd': 'ovmf'}
COMPUTER_NAME = 'kit-vm-7'
ADMIN = 'alice'
PASSWORD = 'Kit-pass<&>"1'      # a test's throwaway password, in a 0600 file only
BOOT_LIMIT = 300.0              # s: the kit's deadline for a boot that must reach Ready
FAIL_LIMIT = 100.0              # s: for the boots that must not (then diagnosed)


def say(text=''):
    sys.stdout.write(text + '\n')
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Disk images
# ---------------------------------------------------------------------------

def disable_network_manager(tree):
    """no network configuration: nothing asks for an address"""
    for link in ('etc/systemd/system/multi-user.target.wants/NetworkManager.service',
                 'etc/systemd/system/network-online.target.wants/'
                 'NetworkManager-wait-online.service'):
        if os.path.lexists(os.path.join(tree, link)):
            os.unlink(os.path.join(tree, link))
    bt.mask_units('NetworkManager.service')(tree)


class DiskRecipe(object):
    def __init__(self, name, install_args=None, tweaks=(), firmware='bios',
                 base=bt.recipe_for('networkmanager', 'bookworm')):
        self.name = name
        self.base = base                    # a boot_test.BaseRecipe (cached mmdebstrap tree)
        self.firmware = firmware            # 'bios' (Gen1) or 'uefi' (Gen2)
        self.install_args = install_args    # None: our unit is not installed
        self.tweaks = list(tweaks)

    def key(self, base_key, repo):
        # this file (the recipes, their tweaks, the boot loader set-up) as it is
        parts = [KIT_RECIPE_VERSION, self.name, base_key, self.install_args, self.firmware,
                 hashlib.sha256(bt.read_bytes(os.path.abspath(__file__))).hexdigest()]
        if self.install_args is not None:
            for name in ('install.sh', 'azure_provisioning.py', 'azure-provisioning.service'):
                parts.append(hashlib.sha256(bt.read_bytes(os.path.join(repo, name)))
                             .hexdigest())
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# Issue 22's other agents, from Debian 12's own packages, on the boot test's networkd
# recipe (systemd-networkd with DHCP on en*, as rootfs-hook.sh makes it): cloud-init
# with its Azure datasource (found through the SMBIOS asset tag); its DHCP client
# (dhclient) and eject are what its Azure code runs.
CLOUD_INIT_BASE = bt.BaseRecipe('cloud-init', bt.BASE_PACKAGES + [
    'cloud-init', 'isc-dhcp-client', 'eject', 'openssh-server', 'sudo'], suite='bookworm')

# waagent 2.7.3.0 from Debian 12 doing its own provisioning, as an image builder sets
# it up (Debian's waagent.conf hands provisioning to cloud-init; its media code runs
# eject).  Its unit has ConditionVirtualization=microsoft, which systemd derives from
# Hyper-V's CPUID: QEMU under TCG shows "TCGTCGTCGTCG" there, so systemd says "qemu"
# whatever the SMBIOS says.  The drop-in below stands in for that CPU, test-only.
WAAGENT_BASE = bt.BaseRecipe('waagent', bt.BASE_PACKAGES + [
    'waagent', 'eject', 'openssh-server', 'sudo'], suite='bookworm')
WAAGENT_DROP_IN = ('[Unit]\n# kit_test.py: QEMU under TCG cannot show Hyper-V\'s CPUID\n'
                   'ConditionVirtualization=\n')


WAAGENT_ROUTES = ''.join('\n[Route]\nDestination=%s/32\nGateway=%s\n' % (ip, bt.SLIRP['host'])
                         for ip in (bt.WIRESERVER_IP, bt.IMDS_IP))


def waagent_provisions(tree):
    """waagent provisions (Provisioning.Agent=waagent), its unit runs under QEMU"""
    conf = os.path.join(tree, 'etc/waagent.conf')
    with open(conf) as f:
        text = f.read()
    text = re.sub(r'(?m)^Provisioning\.Agent=.*$', 'Provisioning.Agent=waagent', text)
    with open(conf, 'w') as f:
        f.write(text)
    # Azure's DHCP gives the routes to the WireServer and IMDS (option 121), which
    # waagent looks for in the route table; QEMU's DHCP cannot: the image's network
    # configuration stands in for it, test-only
    with open(os.path.join(tree, 'etc/systemd/network/50-dhcp.network'), 'a') as f:
        f.write(WAAGENT_ROUTES)
    drop_in = os.path.join(tree, 'etc/systemd/system/walinuxagent.service.d')
    os.makedirs(drop_in, exist_ok=True)
    with open(os.path.join(drop_in, '50-kit-test.conf'), 'w') as f:
        f.write(WAAGENT_DROP_IN)


DISKS = {
    'ours': DiskRecipe('ours', ['--provision-user']),
    'no-network': DiskRecipe('no-network', ['--provision-user'], [disable_network_manager]),
    'no-agent': DiskRecipe('no-agent'),
    'ours-uefi': DiskRecipe('ours-uefi', ['--provision-user'], firmware='uefi'),
    'cloud-init': DiskRecipe('cloud-init', base=CLOUD_INIT_BASE),
    'waagent': DiskRecipe('waagent', tweaks=[waagent_provisions], base=WAAGENT_BASE),
}


def boot_files(tree):
    kernel, initrd = bt.find_boot_files(tree)
    return os.path.basename(kernel), os.path.basename(initrd)


def install_grub_bios(disk, workdir):
    """GRUB for BIOS without grub-install's device probing: boot.img's code in the
    MBR, core.img (diskboot + the kernel with the modules) in the gap before the
    first partition, its blocklist told how many sectors follow."""
    core = os.path.join(workdir, 'core.img')
    bt.run(['grub-mkimage', '-O', 'i386-pc', '-o', core, '-p', '(hd0,msdos1)/boot/grub']
           + GRUB_MODULES, 'grub-mkimage', 120)
    data = bytearray(bt.read_bytes(core))
    sectors = (len(data) + 511) // 512
    if sectors + 1 > PART_START:
        raise bt.TestFailure('core.img (%d sectors) does not fit before the partition'
                             % sectors)
    struct.pack_into('<H', data, 0x1fc, sectors - 1)    # diskboot's first blocklist
    boot = bt.read_bytes(os.path.join(GRUB_DIR, 'boot.img'))
    with open(disk, 'r+b') as f:
        f.seek(0)
        f.write(boot[:440])
        f.seek(512)
        f.write(bytes(data))


ESP_SIZE = 32                # MiB
GRUB_EFI_MODULES = ['part_gpt', 'fat', 'ext2', 'normal', 'linux', 'boot', 'configfile',
                    'serial', 'terminal', 'echo', 'test', 'search', 'search_fs_uuid', 'gzio']
# the boot loader's own first words: find the root file system, read its grub.cfg
GRUB_EARLY_CFG = 'search --no-floppy --fs-uuid --set=root %s\nset prefix=($root)/boot/grub\n'
# sfdisk scripts: Gen1 an MBR with the root partition; Gen2 a GPT with an EFI system
# partition and the root partition
LAYOUTS = {
    'bios': 'label: dos\nstart=%d, type=83, bootable\n' % PART_START,
    'uefi': 'label: gpt\nstart=%d, size=%dMiB, type=U, name=ESP\ntype=L, name=root\n'
            % (PART_START, ESP_SIZE),
}


def partitions(disk):
    """[(start sector, sectors)] of the disk's partitions, as sfdisk reads them."""
    text, _ = bt.run(['sfdisk', '-J', disk], 'sfdisk -J', 60)
    table = json.loads(text[text.index('{'):])['partitiontable']['partitions']
    return [(p['start'], p['size']) for p in table]


def install_grub_efi(disk, esp, fs_uuid, workdir):
    """GRUB for UEFI at the removable-media path OVMF (and Hyper-V Gen2) boots without
    NVRAM entries, \\EFI\\BOOT\\BOOTX64.EFI, on a FAT ESP made without mounting."""
    early = os.path.join(workdir, 'early.cfg')
    with open(early, 'w') as f:
        f.write(GRUB_EARLY_CFG % fs_uuid)
    loader = os.path.join(workdir, 'BOOTX64.EFI')
    bt.run(['grub-mkimage', '-O', 'x86_64-efi', '-o', loader, '-c', early, '-p', '/boot/grub']
           + GRUB_EFI_MODULES, 'grub-mkimage (x86_64-efi)', 120)
    fat = os.path.join(workdir, 'esp.img')
    bt.run(['mkfs.vfat', '-n', 'ESP', '-C', fat, str(esp[1] // 2)], 'mkfs.vfat', 60)
    bt.run(['mmd', '-i', fat, '::/EFI', '::/EFI/BOOT'], 'mmd', 60)
    bt.run(['mcopy', '-i', fat, loader, '::/EFI/BOOT/BOOTX64.EFI'], 'mcopy', 60)
    with open(disk, 'r+b') as f:
        f.seek(esp[0] * 512)
        f.write(bt.read_bytes(fat))


def build_disk(recipe, base, disk, repo, workdir):
    tree = os.path.join(workdir, 'rootfs')
    bt.run(['cp', '-a', '--reflink=auto', base, tree], 'copying the base tree', 300)
    try:
        if recipe.install_args is not None:
            bt.run(['sh', os.path.join(repo, 'install.sh'), '--root', tree]
                   + recipe.install_args, 'install.sh --root', 120, cwd=repo)
        for tweak in recipe.tweaks:
            tweak(tree)
        fs_uuid = str(__import__('uuid').uuid4())
        kernel, initrd = boot_files(tree)
        os.makedirs(os.path.join(tree, 'boot/grub'), exist_ok=True)
        with open(os.path.join(tree, 'boot/grub/grub.cfg'), 'w') as f:
            f.write(GRUB_CFG % {'uuid': fs_uuid, 'kernel': kernel, 'initrd': initrd})
        with open(os.path.join(tree, 'etc/fstab'), 'w') as f:
            f.write(FSTAB % fs_uuid)
        building = disk + '.building'
        with open(building, 'wb') as f:
            f.truncate(DISK_SIZE * 1024 * 1024)
        bt.run(['sh', '-c', 'printf "$1" | sfdisk -q "$0"', building,
                LAYOUTS[recipe.firmware]], 'sfdisk', 60)
        parts = partitions(building)
        root = parts[-1]
        bt.run(['mke2fs', '-q', '-t', 'ext4', '-L', 'root', '-U', fs_uuid, '-d', tree,
                '-E', 'offset=%d' % (root[0] * 512), '-F', building,
                '%dk' % (root[1] // 2)], 'mke2fs -d', 300)
        if recipe.firmware == 'uefi':
            install_grub_efi(building, parts[0], fs_uuid, workdir)
        else:
            install_grub_bios(building, workdir)
        os.rename(building, disk)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def cached_disk(recipe, cache_dir, repo, workdir, log):
    """The disk of recipe, from the cache or built (the base from the boot test's
    cache).  Returns (path, how)."""
    base, how = bt.base_rootfs(recipe.base, cache_dir, log)
    key = recipe.key(recipe.base.key(), repo)
    disks = os.path.join(cache_dir, 'kit-disks')
    os.makedirs(disks, exist_ok=True)
    disk = os.path.join(disks, '%s-%s.raw' % (recipe.name, key))
    if os.path.isfile(disk):
        return disk, 'cached'
    for old in os.listdir(disks):
        if re.match(r'%s-[0-9a-f]{16}\.raw(\.building)?$' % re.escape(recipe.name), old):
            os.unlink(os.path.join(disks, old))
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix='kit-%s-' % recipe.name, dir=workdir)
    build_disk(recipe, base, disk, repo, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return disk, 'built in %.0f s (base %s)' % (time.monotonic() - started, how)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Boots through the kit
# ---------------------------------------------------------------------------

# Where an agent spends its time: systemd's own clock (s of uptime) for these units,
# read in the guest after the key login (--ssh-run)
TIMED_UNITS = {
    'ours': ['azure-provisioning.service'],
    'cloud-init': ['cloud-init-local.service', 'cloud-init.service', 'cloud-config.service',
                   'cloud-final.service'],
    'waagent': ['walinuxagent.service'],
}
COMMON_UNITS = ['network-online.target', 'ssh.service']
UNIT_PROPERTIES = ['Id', 'InactiveExitTimestampMonotonic', 'ActiveEnterTimestampMonotonic',
                   'InactiveEnterTimestampMonotonic']


def unit_timing_command(units):
    return 'systemctl show -p %s %s' % (','.join(UNIT_PROPERTIES), ' '.join(units))


def unit_timings(output):
    """{unit: (start s, end s)} of uptime from the `  > ` lines of unit_timing_command's
    output in the kit's report: start = left inactive, end = became active, or
    inactive again for a oneshot unit that does not stay active."""
    found, current = {}, {}
    for line in output.splitlines() + ['']:
        line = line.strip()
        if line.startswith('> '):
            line = line[2:]
        if '=' in line:
            key, _, value = line.partition('=')
            current[key] = value
            continue
        if current.get('Id'):
            micro = [int(current.get(p, '0') or 0) for p in UNIT_PROPERTIES[1:]]
            found[current['Id']] = (micro[0] / 1e6, max(micro[1:]) / 1e6)
            current = {}
    return found


def as_fixed_vhd(disk, workdir):
    """A copy of the raw disk as a fixed VHD, the format Azure takes (`qemu-img convert
    -O vpc -o subformat=fixed,force_size=on`, as Azure's docs convert images)."""
    vhd = os.path.join(workdir, os.path.basename(disk)[:-len('.raw')] + '.vhd')
    if not os.path.exists(vhd):
        bt.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'vpc', '-o',
                'subformat=fixed,force_size=on', disk, vhd], 'qemu-img convert to VHD', 600)
    return vhd


class KitBoot(object):
    def __init__(self, name, disk, expect_code, expect_text, args=(), limit=BOOT_LIMIT,
                 ci=False, doc='', convert=None):
        self.name = name
        self.convert = convert      # f(raw disk, workdir) -> the image to boot
        self.disk = disk
        self.expect_code = expect_code
        self.expect_text = expect_text      # regexes the kit's output must match
        self.args = list(args)
        self.limit = limit
        self.ci = ci
        self.doc = doc


BOOTS = [
    KitBoot('ours', 'ours', 0, [r'Ready after \d+ s',
                                r'ssh %s@127\.0\.0\.1 -p PORT with the key: hostname -> %s '
                                % (ADMIN, COMPUTER_NAME),
                                r'with the password: hostname -> %s ' % COMPUTER_NAME,
                                r'timings from QEMU start: first DHCP [\d.]+ s, first '
                                r'request [\d.]+ s \(imds\), Ready [\d.]+ s'],
            ['--ssh', '--password-file', '{password}'], ci=True,
            doc='install.sh --provision-user: Ready, ssh with key and password'),
    KitBoot('gen2', 'ours-uefi', 0, [r'Ready after \d+ s', r'Gen2 \(UEFI, OVMF\)',
                                     r'with the key: hostname -> %s ' % COMPUTER_NAME],
            ['--uefi', '--ssh'], doc='the same, as a Gen2 VM: GPT, ESP, GRUB for UEFI, OVMF'),
    KitBoot('vhd', 'ours', 0, [r'\(VHD\) as Azure Gen1', r'Ready after \d+ s',
                               r'with the key: hostname -> %s ' % COMPUTER_NAME],
            ['--ssh'], convert=as_fixed_vhd,
            doc='the ours disk as a fixed VHD (what Azure takes): Ready, ssh'),
    KitBoot('cloud-init', 'cloud-init', 0, [r'Ready after \d+ s',
                                           r'with the key: hostname -> %s ' % COMPUTER_NAME,
                                           r'with the password: hostname -> %s '
                                           % COMPUTER_NAME],
            ['--ssh', '--password-file', '{password}'],
            doc="Debian's cloud-init (no unit of ours): Ready, ssh with key and password"),
    KitBoot('waagent', 'waagent', 0, [r'Ready after \d+ s',
                                     r'with the key: hostname -> %s ' % COMPUTER_NAME,
                                     r'with the password: hostname -> %s ' % COMPUTER_NAME],
            ['--ssh', '--password-file', '{password}'],
            doc="Debian's waagent provisioning itself: Ready, ssh with key and password"),
    KitBoot('no-network', 'no-network', 3, [r'nothing reported by the deadline .*: no DHCP: '
                                            r'the system started', r'console, last \d+ lines'],
            limit=FAIL_LIMIT, doc='NetworkManager disabled: exit 3, "no DHCP"'),
    KitBoot('no-agent', 'no-agent', 3, [r'nothing reported by the deadline .*: no request '
                                        r'at all: the guest got a DHCP lease'],
            limit=FAIL_LIMIT, doc='no provisioning agent: exit 3, "no request at all"'),
]


def run_kit_boot(boot, disk, repo, workdir):
    """(failures, seconds, output) of one `fake_azure.py boot` run."""
    password_file = os.path.join(workdir, 'password')
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(PASSWORD + '\n')
    args = [a.replace('{password}', password_file) for a in boot.args]
    if '--ssh' in args and boot.name in TIMED_UNITS:
        args += ['--ssh-run', unit_timing_command(TIMED_UNITS[boot.name] + COMMON_UNITS)]
    cmd = [sys.executable, os.path.join(repo, 'tests', 'fake_azure.py'), 'boot', disk,
           '--computer-name', COMPUTER_NAME, '--admin-username', ADMIN,
           '--timeout', '%d' % boot.limit] + args
    before = file_sha256(disk)
    stat_before = os.stat(disk)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=boot.limit + 300)[0]
    except subprocess.TimeoutExpired:
        bt.stop_process_group(proc)
        out = proc.communicate()[0] + '\n(kit stopped after %d s)' % (boot.limit + 300)
    took = time.monotonic() - started
    failures = []
    if proc.returncode != boot.expect_code:
        failures.append('exit status %s, expected %d' % (proc.returncode, boot.expect_code))
    for pattern in boot.expect_text:
        if not re.search(pattern, out):
            failures.append('output does not match %r' % pattern)
    if PASSWORD in out:
        failures.append('the password is in the kit\'s output')
    after = os.stat(disk)
    if file_sha256(disk) != before or after.st_mtime != stat_before.st_mtime:
        failures.append('the image changed (sha256 or mtime): the kit wrote it')
    return failures, took, out


def boot_figures(out):
    """{'ready': s, 'login': s, 'units': {unit: (start, end)}} from a kit report that
    says Ready (None otherwise); login: QEMU start -> the first key login."""
    ready = re.search(r'timings from QEMU start: .*Ready ([\d.]+) s', out)
    if not ready:
        return None
    login = re.search(r'with the key: hostname -> \S+ .*\(([\d.]+) s after Ready\)', out)
    return {'ready': float(ready.group(1)),
            'login': float(ready.group(1)) + float(login.group(1)) if login else None,
            'units': unit_timings(out)}


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def comparison(measured):
    """The time-to-Ready table (medians, ratios to ours) and where the time went."""
    if not measured:
        return []
    rows = dict((name, (median(f['ready'] for f in runs), median(f['login'] for f in runs),
                        len(runs))) for name, runs in measured.items())
    base = rows.get('ours')
    lines = ['time to Ready, medians (QEMU start -> Ready accepted; -> first ssh login '
             'with the key):',
             '  %-11s %8s %8s %11s %11s %6s' % ('agent', 'Ready', 'login', 'Ready/ours',
                                                'login/ours', 'boots')]

    def ratio(value, reference):
        return '%.2f' % (value / reference) if value and reference else '-'
    for name in sorted(rows, key=lambda n: (n != 'ours', n)):
        ready, login, count = rows[name]
        lines.append('  %-11s %7.1fs %8s %11s %11s %6d' % (
            name, ready, '%.1fs' % login if login else '-',
            ratio(ready, base and base[0]), ratio(login, base and base[1]), count))
    lines.append('where the time goes (systemd in the guest, s of uptime, medians: unit '
                 'start -> end):')
    for name, runs in sorted(measured.items()):
        units = sorted(set(u for f in runs for u in f['units']))
        parts = []
        for unit in units:
            # 0: systemd has no such moment (not started; still running)
            start = median(f['units'][unit][0] or None for f in runs if unit in f['units'])
            end = median(f['units'][unit][1] or None for f in runs if unit in f['units'])
            if start is None and end is None:
                parts.append('%s not started' % unit)
            else:
                parts.append('%s %s -> %s' % (unit, '%.1f' % start if start else '?',
                                              '%.1f' % end if end else 'running'))
        lines.append('  %s: %s' % (name, '; '.join(parts) or 'no unit timings'))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', metavar='NAME[,NAME]',
                        help='run these boots (default: the CI ones: %s)'
                             % ', '.join(b.name for b in BOOTS if b.ci))
    parser.add_argument('--repeat', type=int, default=1, metavar='N',
                        help='boot each N times; the boots that reach Ready are then '
                             'compared in a table of medians (issue 22, item 4)')
    parser.add_argument('--list', action='store_true')
    parser.add_argument('--keep', action='store_true', help='keep the work directory')
    parser.add_argument('--cache-dir', default=os.environ.get('AZP_BOOT_CACHE') or
                        os.path.join(os.path.expanduser('~'), '.cache', 'azp-boot-test'))
    parser.add_argument('--repo', default=DEFAULT_REPO)
    args = parser.parse_args(argv)
    if args.list:
        for b in BOOTS:
            say('%-11s %s%s' % (b.name, b.doc, ' (CI)' if b.ci else ''))
        return 0
    names = args.only.split(',') if args.only else [b.name for b in BOOTS if b.ci]
    unknown = [n for n in names if n not in [b.name for b in BOOTS]]
    if unknown:
        parser.error('unknown boot(s): %s' % ', '.join(unknown))
    tools = dict(KIT_TOOLS)
    files = {}
    if any(DISKS[b.disk].firmware == 'uefi' for b in BOOTS if b.name in names):
        tools.update(UEFI_TOOLS)
        files = UEFI_FILES
    missing = sorted(set([p for t, p in tools.items() if not shutil.which(t)] +
                         [p for f, p in files.items() if not os.path.exists(f)]))
    if missing:
        say('FAIL: missing tools: apt-get install %s' % ' '.join(missing))
        say('0 passed, %d failed' % len(names))
        return 1
    workdir = tempfile.mkdtemp(prefix='azp-kit-test-')
    passed, failed, times, measured = 0, 0, [], {}
    try:
        for boot in [b for b in BOOTS if b.name in names for _ in range(args.repeat)]:
            say('=== %s: %s' % (boot.name, boot.doc))
            try:
                disk, how = cached_disk(DISKS[boot.disk], args.cache_dir, args.repo,
                                        workdir, os.path.join(workdir, 'mmdebstrap.log'))
            except bt.TestFailure as e:
                say('FAIL %s: the disk: %s' % (boot.name, e))
                failed += 1
                continue
            if boot.convert:
                disk = boot.convert(disk, workdir)
                how += ', converted to %s' % os.path.basename(disk)
            say('disk %s: %s' % (disk, how))
            failures, took, out = run_kit_boot(boot, disk, args.repo, workdir)
            kept = re.search(r'(?m)^boot: kept (\S+)', out)
            if kept and not args.keep:
                # the kit keeps a boot's work directory when it was not Ready: for
                # the boots meant to fail, and the others' failures, once shown
                shutil.rmtree(kept.group(1), ignore_errors=True)
            for line in out.splitlines():
                say('    ' + line)
            ready = re.search(r'Ready after (\d+) s', out)
            times.append('%-11s exit %s in %.0f s%s' % (
                boot.name, 'ok' if not failures else 'FAILED', took,
                ', Ready after %s s' % ready.group(1) if ready else ''))
            if failures:
                failed += 1
                say('FAIL %s: %s' % (boot.name, '; '.join(failures)))
            else:
                passed += 1
                say('ok   %s (%.0f s)' % (boot.name, took))
                figures = boot_figures(out)
                if figures:
                    measured.setdefault(boot.name, []).append(figures)
    finally:
        if args.keep:
            say('kept %s' % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say('times: ' + ('; '.join(times) or 'none'))
    # a table once two agents (or two boots of one) reached Ready; its last column
    # says how many boots each median is of
    for line in comparison(measured) if len(measured) > 1 or args.repeat > 1 else []:
        say(line)
    say('%d passed, %d failed' % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
