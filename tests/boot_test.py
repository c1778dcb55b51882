#!/usr/bin/env python3
"""Real-boot test: a Debian VM under QEMU runs the installed azure-provisioning unit.

    python3 tests/boot_test.py [--keep] [--cache-dir DIR] [--only NAME[,NAME]] [--list]
                               [--suite SUITE[,SUITE]]... [--repo DIR]

Issue 15, the boot matrix: every scenario below runs on the Debian suites chosen with
--suite (repeatable or a comma list; default all of bullseye, bookworm, trixie, which
CI runs), each suite's boots after one another; what runs where is each Boot's
`suites` (see BOOTS: first, second, failure and media everywhere; slow-network and
no-dbus only on bookworm, as they test the provisioner's own retry and fallback;
networkmanager, capture-a and capture-b on trixie).  The end prints a table suite x
scenario (result, QEMU start -> Ready accepted, checks passed/run) and writes it as
markdown to WORKDIR/summary.md (kept, alone, without --keep; its path is printed).

Builds a Debian root filesystem per suite and network stack from Debian's packages
(mmdebstrap minbase with SUITE, SUITE-updates and SUITE-security, systemd-networkd
with DHCP, a kernel; cached in --cache-dir while its recipe is unchanged, up to
BASE_BUILDS_AT_ONCE built at a time), installs OUR files into a fresh copy with the real `install.sh --root`
(the unit stays exactly as a user gets it) plus a test-only checker unit from
tests/boot/, and boots it under QEMU.  The guest's network is slirp with
`restrict=on`, moved to 168.0.0.0/7 so that 168.63.129.16:80 and 169.254.169.254:80
exist inside it and are forwarded (guestfwd, `nc`) to tests/fake_azure.py on this
machine's loopback: the unit runs with its default addresses and no packet leaves the
machine.

Tests (one result line each):
  preflight     (issue 7) while the images are built: `azure-provisioning --check` on
                each tree, inside it (chroot, the image's own python3) and from this
                machine (--root): exit 0, "image ready", the same checklist both ways;
                on a broken hard-linked copy of the default tree (enable symlink
                removed, a fake /usr/sbin/waagent, a machine id, a state.json):
                exit 1 naming all four, with fixes.  Issue 14: every image is a
                generalized one: empty /etc/machine-id, no state.json, and its kernel
                command line (/etc/kernel/cmdline, which QEMU boots with) has
                console=ttyS0: --check has no finding about them.
Boots (each one a test; the names work with --only):
  first         fresh disk: Ready accepted for the current incarnation, IMDS asked with
                Metadata: true, hostname and /etc/hostname = computerName (not the
                scale-set style compute.name), /etc/hosts updated, the unit started
                after network-online.target (with a DHCP lease), it disabled itself,
                its step lines are on the serial console.  Issue 6 with
                systemd-networkd, from the packet capture: option 12 was the image
                name at boot; after the unit's IMDS connection a REQUEST carries the
                new name, the last name sent is the new one, the same address is asked
                for and ACKed; "sent to DHCP by systemd-networkd" on the console.
  second        the same disk again: the unit does not run, the emulator sees no
                request from it (the checker's own marked probe proves that the guest
                could have reached it); DHCP carries the new name from the start.
  failure       invalid computerName: ProvisioningFailed reported with a readable
                description, the unit stays enabled, the hostname is untouched.
  slow-network  the WireServer refuses connections for the first seconds of the boot
                (until SLOW_MARGIN s after the unit's first request was seen in earlier
                boots of this run, else SLOW_WIRESERVER_UP s): the guest did hit the
                closed port (seen in the packet capture) and Ready is still accepted.
  no-dbus       dbus masked (no systemd-hostnamed, no networkctl): the hostname is still
                set (sethostname(2) and /etc/hostname, as on every image).
  networkmanager  an image with NetworkManager (instead of systemd-networkd), sudo and
                openssh-server, installed with `install.sh --provision-user`; the
                emulator serves adminUsername alice and two keys (one ending in CR LF,
                one with runs of blanks).  `first`'s checks with NetworkManager
                (issue 6), and (issue 5) from inside the guest: alice exists with her
                home, password locked, ~/.ssh 0700 and authorized_keys 0600 owned by
                her holding both keys normalized, the sudoers drop-in 0440 passing
                visudo, the sshd drop-in read by `sshd -T`; an ssh login to
                127.0.0.1 as alice with the served key (made by the image's ssh-keygen)
                runs `sudo -n`; the running sshd offers no password login.
  media         (issue 13) provisioning media attached the way Azure does (ovf-env.xml
                on a UDF/ISO 9660 disc made by tests/fake_azure.py's build_media, an
                IDE cdrom: /dev/sr0): UserName = the emulator's adminUsername, a fresh
                random 20-character password full of shell/XML metacharacters,
                DisableSshPasswordAuthentication false, CustomData (a script, every
                byte value, random bytes); the emulator serves compute.userData.  The
                `networkmanager` base, `install.sh --provision-user`, and a ready.d
                hook (tests/boot/azp-ready-hook) recording what it is handed.  From
                inside the guest (tests/boot/azp-media-check): the password verifies
                against /etc/shadow (perl crypt(), password on stdin) and a wrong one
                does not, the account is unlocked, sudoers says ALL=(ALL) ALL,
                the sshd drop-in says PasswordAuthentication yes (sshd -T too), an ssh
                login with the password works and sudo -S with it gives uid 0;
                custom-data and user-data hold the exact bytes, 0600 in a 0700
                directory, root's; the hook got both paths and complete files; the
                disc is unmounted; the password (as typed or XML-escaped) is in no
                journal field, nor under /var/lib/azure-provisioning, /run, /tmp,
                /etc, /var, /root, /home (grep -F -f from a file deleted afterwards),
                nor on the serial console, the facts port, the emulator's requests
                or the packet capture.  `first` checks that without a disc the log
                says no media was found.  Without genisoimage this boot is SKIPPED
                (said in the summary, never counted as passed).  Issue 20 (17): the
                initramfs has no CD-ROM driver (checked in the guest with
                lsinitramfs) and sr_mod is held back until the unit has searched
                (tests/boot/azp-late-cdrom): the kernel attaches sr0 after the unit's
                first search (console and journal times), the unit says it found no
                media at first and waited for udev, then reads it from /dev/sr0.
  capture-a     (issue 14) VM A (vmId A, computerName A, QEMU -uuid = vmId A in Gen1
                byte order) boots an image with sshd and the host keys its package
                made at build time, --provision-user: Ready, hostname A, NEW host keys
                (none of the image's), the console's fingerprint block = ssh-keygen -l
                of the keys on disk = what ssh-keyscan gets from the running sshd,
                state.json (vmId A, admin user made by us, 0600) and --status exit 0
                "the record is this VM's"; then the checker runs `azure-provisioning
                --deprovision --user` in the guest: exit 0, no host keys, empty
                machine-id, alice gone, --status exit 1; after poweroff the disk (the
                captured image) is read with debugfs: no keys, empty machine-id, no
                alice/home/sudoers drop-in, no record or data, the unit enabled again.
  capture-b     a copy of that disk as VM B (vmId B, computerName B, -uuid B): Ready,
                hostname B, host keys new again (none of A's nor the image's), the
                console block = the keys on disk = the keys served: an image whose
                sshd had no host keys ends with ssh.service active on the new keys;
                a machine-id of its own (not A's), --status exit 0 for B, state.json
                of B, alice made again with her sudoers drop-in.
  powercut      (issue 20) bookworm only; --cut NAME[,NAME] runs some of the cuts.  A
                media + --provision-user + sshd image (the `media` image plus
                tests/boot/azp-powercut) whose first boot loses its power (SIGKILL to
                QEMU's process group: what the guest had not written to its disk is
                lost) at one moment per cut, then the SAME disk boots again: imds (the
                emulator holds the IMDS answer; cut as the request arrives), useradd
                (useradd frozen once /etc/passwd names alice, its locks held), keygen
                (ssh-keygen -A frozen after its first key), hook (a ready.d hook
                holds the run), ready (cut as the emulator receives the Ready POST,
                which it accepts).  The frozen moments are announced on the serial
                console by azp-powercut (a line AZP-POWERCUT-POINT, on the cut boot's
                kernel command line azp.cut=NAME only; useradd and ssh-keygen are
                wrapped through a test-only drop-in's PATH, the unit file stays as
                installed) and cut COMMIT_WAIT s later, once ext4 has committed what
                the step made.  What the cut left: the disk read from this machine
                (a copy, journal replayed) and, at the second boot before the unit,
                azp-powercut-look.service.  After the second boot: Ready accepted,
                the unit disabled (also on the disk), exactly one admin user in
                passwd/shadow/group/gshadow, the media's password verifies, the key
                in authorized_keys, pwck -r / grpck -r say nothing beyond what they
                say of the image, no lock or temporary file where the provisioner
                writes, every host key a complete pair, new, served by sshd, custom
                data exact (in the guest and read with debugfs), state.json valid
                with this vmId and alice as made by us.  One summary line per cut.
  selinux       (issue 23) bookworm only.  The media boot's everything-at-once first boot
                (password and custom data on the media, an SSH key in IMDS, the ready.d
                hook, new host keys, hostname + DHCP, --provision-user) on an image with
                Debian's reference policy (selinux-policy-default), booted with
                `security=selinux selinux=1 enforcing=1` and SELINUX=enforcing, its tree
                labelled at build time (the image's own setfiles with its file_contexts;
                mke2fs -d copies the security.selinux attributes).  Three boots of the
                same image: baseline (a fresh copy, the media attached, our unit masked
                with systemd.mask= on the kernel command line), first (a fresh copy),
                second (the first's disk again).  From inside the guest
                (tests/boot/azp-selinux-check): getenforce Enforcing, sestatus policy
                `default` loaded; the domain the provisioner ran in (the ready.d hook's
                parent, among journald's _SELINUX_CONTEXT of the unit) is not permissive;
                `restorecon -n -v -R` over every path we write prints nothing and
                matchpathcon agrees file by file, ~/.ssh and authorized_keys are
                ssh_home_t, host keys sshd_key_t; ssh logins as alice with the key and
                with the password, sudo -S; Ready, hostname, the unit disabled, state.json.
                Every AVC/USER_AVC/SELINUX_ERR record of each boot (journal, audit and
                kernel transports, one per audit serial) is reduced to its kind
                (permissions, command, source domain, target type, class): the first and
                second boots may have no kind the baseline lacks; each is listed.
Every boot boots with -uuid (its vmId, Gen1 byte order), and first, second and failure
check state.json and --status (second: still this VM's record; failure: "failed",
exit 1).  Option 12 on the wire: first (issue 6), second (the new name from the start),
failure (only the image name), slow-network (the new name last).

The image has dbus, as Azure's images do: `first` checks that the unit did not start
systemd-hostnamed and that hostnamed, asked afterwards, has the new static name;
`no-dbus` covers minimal images without a bus.

Variants: a base recipe (RECIPES: packages + network stack, cached), a per-run image
(IMAGES: install.sh options, tweaks of the tree, extra guest facts for the checker) and
a boot (BOOTS: emulator keywords, check function) are each one entry below.

Times: per boot "QEMU start -> Ready accepted" (the emulator's clock), at the end all
of them, the VMs' total and the run's total.  Packet times come from filter-dump,
whose clock lags by up to ~1 s: they are aligned on the unit's IMDS connection
(capture_offset), and the issue-6 order is decided on the capture's own clock.

Guest facts come from tests/boot/azp-boot-check (a test-only unit ordered after ours)
over the second serial port; it powers the VM off.  Pass/fail is decided from what
the host saw (emulator record, facts, console, packet capture); QEMU's exit status
says nothing.  Each boot has a hard time limit and QEMU is stopped by its PID.

Hangs in early boot (issue 11): under TCG a guest now and then stops in early kernel
boot and never goes on.  Until userspace starts (systemd's first line on the serial
console), a boot whose console gets no new byte for EARLY_BOOT_QUIET s is stopped at
once and that boot is run again ONCE from scratch (its own run directory, a fresh
copy of its disk, a fresh emulator); its result line then begins "retried after a
hang in early boot at N s" (N: the last kernel timestamp on the console, else the s
after QEMU start when it went quiet), and the hung attempt's logs stay in
boot-NAME-hung-1/ (with --keep).  A second hang fails that boot ("hung in early boot
twice").  After userspace only the time limit applies.  tests/boot_hangs.py measures
the hang rate per QEMU configuration.

Time: each boot has its time limit; no boot starts once the boots have used
BOOT_BUDGET s x the number planned.

Needs root (mmdebstrap, image files owned by root), qemu-system-x86, mmdebstrap,
netcat-openbsd and e2fsprogs (debugfs; installed with apt-get when missing), and Debian's
package mirror for the first build.  Anything missing is a failure with a clear
message, never a skip -- except genisoimage, which only the `media` boot needs: that
boot is then skipped with the reason.  Ends with one line `N passed, M failed` (plus
`, K skipped` when a boot was skipped); exit status 0 only when no boot failed.
"""

import argparse
import base64
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BOOT_DIR = os.path.join(HERE, 'boot')
DEFAULT_REPO = os.path.dirname(HERE)

# ---------------------------------------------------------------------------
# What is built and booted
# ---------------------------------------------------------------------------

SUITE = 'bookworm'                  # the default suite of the names kept from before the matrix
# Issue 15: the boot matrix.  Each suite's bases come from SUITE, SUITE-updates and
# SUITE-security (mmdebstrap's default mirrors for a stable release).  They differ in
# what the provisioner meets: bullseye python 3.9 / systemd 247 / NetworkManager 1.30,
# bookworm 3.11 / 252 / 1.42, trixie 3.13 / 257 / 1.52.
SUITES = ('bullseye', 'bookworm', 'trixie')
# The image's kernel command line, as a real image carries it (/etc/kernel/cmdline,
# which --check reads), and what QEMU boots with (-append): one source for both.
KERNEL_CMDLINE = 'root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1'
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
                 'nc': 'netcat-openbsd', 'mke2fs': 'e2fsprogs', 'debugfs': 'e2fsprogs',
                 'timeout': 'coreutils'}
HOST_PACKAGES_WITH_RECOMMENDS = ['mmdebstrap']   # its recommends (distro-info, gpg) help it

IMAGE_HOSTNAME = 'azp-image'        # what rootfs-hook.sh names the image
COMPUTER_NAME = 'vm-boot-7'         # osProfile.computerName served by the emulator
VM_NAME = 'azp-vmss_3'              # compute.name, scale-set style: not a valid hostname
BAD_COMPUTER_NAME = 'bad_name!'
VM_ID = '7c1e4b52-93d0-4f6a-b1c2-5a3d9e8f0a11'      # the vmId the emulator serves
# Issue 14, capture-again: VM A provisions, is deprovisioned and captured; VM B boots
# the copy.  Their vmIds, computer names (QEMU gets each vmId as its SMBIOS UUID).
VM_ID_A = 'a1b2c3d4-0a0b-4c0d-8e0f-102132435465'
VM_ID_B = 'b6c7d8e9-1f2e-4d3c-9b4a-566778899aab'
COMPUTER_NAME_A = 'vm-capture-a'
COMPUTER_NAME_B = 'vm-capture-b'
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
CHECKER_STATE = '/var/lib/azp-boot-test'    # the checker's boot counter and facts copies
ADMIN_USER = 'alice'                # osProfile.adminUsername in the --provision-user boot
LOGIN_KEY = GUEST_LIB + '/login_key'    # private key of the checker's ssh login as ADMIN_USER
SUDOERS_FILE = '/etc/sudoers.d/azure-provisioning'
SSHD_DROP_IN = '/etc/ssh/sshd_config.d/50-azure-provisioning.conf'
# Issue 13: the provisioning media (ovf-env.xml on a UDF disc) and the data files.
MEDIA_TOOL = 'genisoimage'          # tests/fake_azure.py's build_media needs it
MEDIA_DEVICE = '/dev/sr0'           # what the IDE cdrom below is in the guest
DATA_DIR = '/var/lib/azure-provisioning'
CUSTOM_DATA_FILE = DATA_DIR + '/custom-data'
USER_DATA_FILE = DATA_DIR + '/user-data'
READY_HOOK = '/etc/azure-provisioning/ready.d/50-azp-boot-test'    # a run-parts name
HOOK_RECORD = '/var/lib/azp-boot-test/ready-hook.txt'   # what tests/boot/azp-ready-hook saw
MEDIA_CHECK = GUEST_LIB + '/azp-media-check'    # tests/boot/azp-media-check in the guest
MEDIA_SECRET = GUEST_LIB + '/media-password'    # the media's password, root only; the
MEDIA_ASKPASS = GUEST_LIB + '/media-askpass'    # checker deletes both when done
PASSWORD_SPECIALS = '<&\'"$;:>`\\!%#'          # shell and XML metacharacters

BOOT_TIME_LIMIT = 240.0             # s per boot (a TCG boot takes 40-70 s here; 100-150 s
                                    # with two other QEMUs on the 2 cores)
# Issue 11: under TCG a guest now and then hangs in early kernel boot (the console stops,
# CI once at 0.89 s after "IP idents hash table entries") and would sit there until the
# time limit.  Before userspace starts (USERSPACE_MARKERS on the console) a boot that
# adds no console byte for EARLY_BOOT_QUIET s is stopped and booted again once, from
# scratch.  Measured with tests/boot_hangs.py (2 cores, TCG, another job on one core):
# the longest console silence before userspace in a good boot was 4.0-4.4 s (median)
# and 7.2 s at most in 232 boots, mostly the stretch from QEMU start to the kernel's
# first line (~4 s); 20 s is about 3 times the worst seen.
EARLY_BOOT_QUIET = 20.0             # s without a new console byte before userspace = hang
USERSPACE_MARKERS = (b'systemd[1]', b'Welcome to')    # the real root's systemd runs
POWEROFF_GRACE = 30.0               # s from the facts to QEMU's exit before we stop it
RUN_BUDGET = 510.0                  # s: before the matrix, the run's budget (now BOOT_BUDGET)


class BaseRecipe(object):
    """A cached base root filesystem: packages + rootfs-hook.sh with a network stack,
    of one Debian suite.  name: the network kind ('networkd', 'networkmanager');
    cache_name: what its cache directory is called (SUITE-name)."""

    def __init__(self, name, packages, network='networkd', lease_pattern=r'DHCPv4 address',
                 suite=SUITE):
        self.name = name
        self.packages = list(packages)
        self.network = network
        self.lease_pattern = lease_pattern   # journal line of the DHCP lease
        self.suite = suite
        self.cache_name = '%s-%s' % (suite, name)

    def for_suite(self, suite):
        """The same recipe on another suite."""
        return BaseRecipe(self.name, self.packages, self.network, self.lease_pattern, suite)

    def mmdebstrap_args(self, hook):
        args = ['mmdebstrap', '--variant=minbase', '--include=' + ','.join(self.packages)]
        args += ['--dpkgopt=path-exclude=' + p for p in DPKG_EXCLUDES]
        args += ['--essential-hook=sh %s essential "$1" %s' % (shlex.quote(hook), self.network),
                 '--customize-hook=sh %s customize "$1" %s' % (shlex.quote(hook), self.network)]
        return args + [self.suite]

    def key(self):
        with open(os.path.join(BOOT_DIR, 'rootfs-hook.sh'), 'rb') as f:
            hook = f.read()
        recipe = json.dumps([RECIPE_VERSION, self.mmdebstrap_args('HOOK'),
                             hashlib.sha256(hook).hexdigest()], sort_keys=True)
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]


_NETWORKD = BaseRecipe('networkd', BASE_PACKAGES)
# NetworkManager instead of systemd-networkd (issue 6), sudo and sshd (issue 5).
_NETWORKMANAGER = BaseRecipe('networkmanager',
                             BASE_PACKAGES + ['network-manager', 'sudo', 'openssh-server'],
                             network='networkmanager',
                             # 1.42/1.52: "state changed new lease, address=...";
                             # 1.30 (bullseye): "state changed unknown -> bound, address="
                             lease_pattern=r'dhcp4 \(.*\).*(state changed (.* )?bound|'
                                           r'new lease|address[ =])')
# RECIPES['networkd'] and ['networkmanager'] are SUITE's (bookworm); every suite's are
# RECIPES['SUITE-networkd'] etc. (recipe_for).
# Issue 23: the NetworkManager base plus Debian's reference policy (SELinux enforcing)
# and the tools the guest checks use (getenforce, restorecon, matchpathcon).
SELINUX_PACKAGES = ['selinux-policy-default', 'selinux-utils', 'policycoreutils']
_SELINUX = BaseRecipe('selinux', _NETWORKMANAGER.packages + SELINUX_PACKAGES,
                      network='networkmanager', lease_pattern=_NETWORKMANAGER.lease_pattern)
RECIPES = {'networkd': _NETWORKD, 'networkmanager': _NETWORKMANAGER, 'selinux': _SELINUX}
for _suite in SUITES:
    for _recipe in (_NETWORKD, _NETWORKMANAGER, _SELINUX):
        RECIPES['%s-%s' % (_suite, _recipe.name)] = (
            _recipe if _suite == SUITE else _recipe.for_suite(_suite))


def recipe_for(name, suite=None):
    """The base recipe `name` ('networkd', 'networkmanager') of suite (default SUITE)."""
    return RECIPES['%s-%s' % (suite or SUITE, name)]


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
    (facts['files'][path], facts['commands'][name]); see tests/boot/azp-boot-check.
    login_key: make an SSH key pair with the image's own ssh-keygen, the private half
    at LOGIN_KEY in the image (for the checker's ssh login), the public half in the
    built image's 'login_key' (for the emulator's compute.publicKeys).
    broken_check: also run --check on a deliberately broken copy of the tree.
    media: make this run's provisioning-media secrets (make_media_secrets: a password,
    custom data, IMDS user data), put the password into the image for the guest-side
    checks (MEDIA_SECRET, with tests/boot/azp-media-check and an askpass helper), and
    keep them in the built image's 'media' for the boot that attaches the disc.
    kernel_args: added to KERNEL_CMDLINE (the image's /etc/kernel/cmdline and QEMU's
    -append).  selinux_labels: label the finished tree with its policy's file contexts
    (label_tree), as an image builder does before capture."""

    def __init__(self, name, recipe='networkd', install_args=(), tweaks=(),
                 checker_config=None, login_key=False, broken_check=False, media=False,
                 kernel_args='', selinux_labels=False):
        self.name = name
        self.recipe = RECIPES[recipe]
        self.install_args = list(install_args)
        self.tweaks = list(tweaks)
        self.checker_config = checker_config or {}
        self.login_key = login_key
        self.broken_check = broken_check
        self.media = media
        self.cmdline = ' '.join([KERNEL_CMDLINE] + ([kernel_args] if kernel_args else []))
        self.selinux_labels = selinux_labels


SSH_OPTIONS = ('-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null '
               '-o LogLevel=ERROR -o ConnectTimeout=30')
USER_CHECKER = {
    'files': ['/home/' + ADMIN_USER, '/home/%s/.ssh' % ADMIN_USER,
              '/home/%s/.ssh/authorized_keys' % ADMIN_USER, SUDOERS_FILE, SSHD_DROP_IN],
    'commands': {
        'user_passwd': ['getent', 'passwd', ADMIN_USER],
        'user_status': ['passwd', '-S', ADMIN_USER],
        # the name reached DHCP without being written into a profile on disk
        'nm_profiles_naming_a_host': ['sh', '-c', 'nmcli --version; grep -rl dhcp-hostname '
                                      '/etc/NetworkManager/system-connections/ 2>/dev/null; true'],
        'sudoers_valid': ['visudo', '-cf', SUDOERS_FILE],
        'sshd_config': ['sshd', '-T'],
        # sshd may still be starting: wait for it (bounded), then log in with the key
        'ssh_login': ['sh', '-c',
                      'i=0; while [ $i -lt 60 ] && ! systemctl -q is-active ssh.service; do '
                      'i=$((i+1)); sleep 0.5; done; '
                      'ssh -i %s -o IdentitiesOnly=yes %s %s@127.0.0.1 '
                      '\'echo "user=$(id -un) home=$HOME"; echo "sudo=$(sudo -n id -u)"\''
                      % (LOGIN_KEY, SSH_OPTIONS, ADMIN_USER)],
        # which methods the running sshd offers: "Permission denied (publickey)."
        'ssh_methods': ['sh', '-c', 'ssh -o PubkeyAuthentication=no %s %s@127.0.0.1 true'
                        % (SSH_OPTIONS, ADMIN_USER)],
        # evidence when the running sshd disagrees with sshd -T: when did it start,
        # and what does it offer once reloaded (the commands run in this order)
        'ssh_service': ['systemctl', 'show', '-p', 'ActiveEnterTimestampMonotonic',
                        'ssh.service'],
        'ssh_zz_methods_after_reload': [
            'sh', '-c', 'systemctl reload ssh.service; i=0; while [ $i -lt 20 ]; do '
            'out=$(ssh -o PubkeyAuthentication=no %s %s@127.0.0.1 true 2>&1); '
            'case "$out" in *"Permission denied"*) break ;; esac; '
            'i=$((i+1)); sleep 0.5; done; echo "$out"' % (SSH_OPTIONS, ADMIN_USER)],
    }}


# Issue 14: what every boot reports: the record and --status (exit 0 provisioned).
LAUNCHER = '/usr/local/sbin/azure-provisioning'
STATE_FILE = DATA_DIR + '/state.json'
BASE_CHECKER = {
    'files': [STATE_FILE],
    'commands': {'status': [LAUNCHER, '--status']}}
# ... and in an image with sshd: the host keys on disk (ssh-keygen -l of each .pub) and
# the ones the running sshd serves (ssh-keyscan), once ssh.service is active (bounded).
SSH_WAIT = ('i=0; while [ $i -lt 60 ] && ! systemctl -q is-active ssh.service; do '
            'i=$((i+1)); sleep 0.5; done; ')
SSH_CHECKER = {
    'commands': {
        'host_keys_disk': ['sh', '-c', 'for k in /etc/ssh/ssh_host_*_key.pub; do '
                           'ssh-keygen -l -f "$k"; done'],
        # through a pipe: under SELinux a file the checker makes in /run gets its
        # domain's runtime type, which the confined ssh-keygen may not read
        'host_keys_served': ['sh', '-c', SSH_WAIT + 'echo "ssh.service $(systemctl '
                             'is-active ssh.service) after $((i/2)) s"; ssh-keyscan -T 10 '
                             '127.0.0.1 2>/dev/null | ssh-keygen -l -f -'],
    }}
# Issue 14, capture-again: after Ready (and the facts above), VM A makes itself an image
# again (--deprovision --user), and the checker says what is left; the VM powers off
# and its disk is the captured image that VM B boots.
CAPTURE_CHECKER = {
    'files': [SUDOERS_FILE],
    'commands': {
        'user_passwd': ['getent', 'passwd', ADMIN_USER],
        # the captured disk keeps this config: VM B (boot 2 of the disk) must not
        # deprovision itself
        'zz_deprovision': ['sh', '-c', 'if [ "$(cat %s/boots)" = 1 ]; then exec %s '
                           '--deprovision --user; fi; echo "boot $(cat %s/boots) of this '
                           'disk: not deprovisioned"' % (CHECKER_STATE, LAUNCHER,
                                                         CHECKER_STATE)],
        'zzz_after_keys': ['sh', '-c', 'ls /etc/ssh | grep "^ssh_host_" ; true'],
        'zzz_after_machine_id': ['sh', '-c', 'wc -c < /etc/machine-id'],
        'zzz_after_user': ['getent', 'passwd', ADMIN_USER],
        'zzz_after_files': ['sh', '-c', 'ls -A %s; ls %s; readlink /%s; true'
                            % (DATA_DIR, SUDOERS_FILE, 'etc/systemd/system/multi-user.'
                               'target.wants/' + UNIT)],
        'zzzz_status_after': [LAUNCHER, '--status'],
    }}


# Issue 13: what the guest reports in the media boot (besides USER_CHECKER's kind of
# facts).  The commands run in name order: media_zz_leaks after everything that uses the
# password, media_zzz_forget last of the media ones.
MEDIA_CHECKER = {
    'files': [DATA_DIR, CUSTOM_DATA_FILE, USER_DATA_FILE, HOOK_RECORD, SUDOERS_FILE,
              SSHD_DROP_IN, '/home/' + ADMIN_USER],
    'commands': {
        'media_data_sha256': ['sha256sum', CUSTOM_DATA_FILE, USER_DATA_FILE],
        'media_devices': ['sh', '-c', 'ls -l /dev/sr* /dev/cdrom* 2>&1; blkid %s; '
                          'grep -E "^(udf|isofs|sr_mod|cdrom) " /proc/modules' % MEDIA_DEVICE],
        'media_mounts': ['sh', '-c', 'grep -E " (udf|iso9660) |^/dev/sr" /proc/mounts; true'],
        # issue 20 (17): the CD-ROM drivers in the initramfs booted: none
        'media_initramfs': ['sh', '-c', 'echo "$(lsinitramfs /boot/initrd.img-$(uname -r) | '
                            'wc -l) files"; lsinitramfs /boot/initrd.img-$(uname -r) | '
                            'grep -E "/(ata_piix|sr_mod|ata_generic)\\.ko"; true'],
        'media_password': [MEDIA_CHECK, 'password', ADMIN_USER],
        'media_ssh_password': [MEDIA_CHECK, 'ssh', ADMIN_USER],
        'media_zz_leaks': [MEDIA_CHECK, 'leaks'],
        'media_zzz_forget': [MEDIA_CHECK, 'forget'],
        'user_passwd': ['getent', 'passwd', ADMIN_USER],
        'user_status': ['passwd', '-S', ADMIN_USER],
        'sudoers_valid': ['visudo', '-cf', SUDOERS_FILE],
        'sshd_config': ['sshd', '-T'],
    }}


def install_ready_hook(tree):
    """install the ready.d hook that records AZURE_CUSTOM_DATA/AZURE_USER_DATA"""
    path = os.path.join(tree, READY_HOOK.lstrip('/'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copyfile(os.path.join(BOOT_DIR, 'azp-ready-hook'), path)
    os.chmod(path, 0o755)


# Issue 20: the power-cut scenario's image -- the media image (password, SSH key,
# custom data, the ready.d hook) plus tests/boot/azp-powercut: the cut wrappers of
# useradd and ssh-keygen (first on the unit's PATH through a test-only drop-in; the unit
# file stays as installed), a second ready.d hook that can hold the run, and a unit that
# records what the disk holds before the provisioner runs (what a cut left).
POWERCUT_TOOL = GUEST_LIB + '/azp-powercut'
POWERCUT_LOOK = '/run/azp-powercut-look.json'       # written before the unit runs
POWERCUT_BASELINE = GUEST_LIB + '/pwck-baseline.json'   # pwck -r, grpck -r of the image
POWERCUT_UNIT = 'azp-powercut-look.service'
CUT_BIN = GUEST_LIB + '/cut-bin'
CUT_HOOK = '/etc/azure-provisioning/ready.d/60-azp-powercut'
CUT_DROP_IN = '/etc/systemd/system/%s.d/50-azp-powercut.conf' % UNIT
POWERCUT_CHECKER = {
    'files': [POWERCUT_LOOK, POWERCUT_BASELINE, SUDOERS_FILE, SSHD_DROP_IN],
    'commands': {
        'media_password': [MEDIA_CHECK, 'password', ADMIN_USER],
        'powercut_look': [POWERCUT_TOOL, 'look'],
        'user_passwd': ['getent', 'passwd', ADMIN_USER],
    }}


def write_guest_file(tree, path, text, mode):
    path = os.path.join(tree, path.lstrip('/'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def install_powercut(tree):
    """install the power-cut helpers (azp-powercut, its wrappers, hook and look unit)"""
    shutil.copyfile(os.path.join(BOOT_DIR, 'azp-powercut'),
                    os.path.join(tree, POWERCUT_TOOL.lstrip('/')))
    os.chmod(os.path.join(tree, POWERCUT_TOOL.lstrip('/')), 0o755)
    os.makedirs(os.path.join(tree, CUT_BIN.lstrip('/')), exist_ok=True)
    for tool in ('useradd', 'ssh-keygen'):
        os.symlink(POWERCUT_TOOL, os.path.join(tree, CUT_BIN.lstrip('/'), tool))
    write_guest_file(tree, CUT_DROP_IN,
                     '# test-only (tests/boot_test.py powercut): the cut wrappers first\n'
                     '[Service]\nEnvironment=PATH=%s:/usr/local/sbin:/usr/local/bin:'
                     '/usr/sbin:/usr/bin:/sbin:/bin\n' % CUT_BIN, 0o644)
    write_guest_file(tree, CUT_HOOK, '#!/bin/sh\nexec /usr/bin/python3 %s hook\n'
                     % POWERCUT_TOOL, 0o755)
    write_guest_file(tree, '/etc/systemd/system/' + POWERCUT_UNIT,
                     '# test-only (tests/boot_test.py powercut)\n[Unit]\n'
                     'Description=azure-provisioning boot test: what the disk holds before '
                     'the unit runs\nBefore=%s\n\n[Service]\nType=oneshot\n'
                     'ExecStart=/usr/bin/python3 %s look --out %s\nStandardOutput=null\n\n'
                     '[Install]\nWantedBy=multi-user.target\n'
                     % (UNIT, POWERCUT_TOOL, POWERCUT_LOOK), 0o644)
    os.symlink('/etc/systemd/system/' + POWERCUT_UNIT,
               os.path.join(tree, 'etc/systemd/system/multi-user.target.wants', POWERCUT_UNIT))
    baseline = dict((tool, dict(zip(('rc', 'output'), run_status(['chroot', tree, tool, '-r']))))
                    for tool in ('pwck', 'grpck'))
    write_guest_file(tree, POWERCUT_BASELINE, json.dumps(baseline), 0o644)
# Issue 20 (17): the CD-ROM comes after the unit's first search for the media.  The
# initramfs has no ata_piix/sr_mod (rootfs-hook.sh: MODULES=list), so udev loads them
# from the root file system; tests/boot/azp-late-cdrom, run by modprobe in place of
# sr_mod, makes the late order certain (see the script).
LATE_CDROM = GUEST_LIB + '/azp-late-cdrom'
LATE_CDROM_RULE = '/etc/modprobe.d/azp-late-cdrom.conf'
LATE_CDROM_AFTER = 2        # s after the unit's IMDS line (its first search follows it)


def hold_back_cdrom_driver(tree):
    """hold sr_mod back until the unit searched (modprobe.d install rule)"""
    script = os.path.join(tree, LATE_CDROM.lstrip('/'))
    os.makedirs(os.path.dirname(script), exist_ok=True)
    shutil.copyfile(os.path.join(BOOT_DIR, 'azp-late-cdrom'), script)
    os.chmod(script, 0o755)
    with open(os.path.join(tree, LATE_CDROM_RULE.lstrip('/')), 'w') as f:
        f.write('# tests/boot_test.py only: the CD-ROM driver loads after the unit searched\n'
                'install sr_mod /bin/sh %s %d && /sbin/modprobe --ignore-install sr_mod '
                '$CMDLINE_OPTS\n' % (LATE_CDROM, LATE_CDROM_AFTER))


# Issue 23: SELinux enforcing.  The media image's first boot (password, custom data, the
# ready.d hook, an SSH key, new host keys, hostname + DHCP) on the `selinux` base
# (Debian's reference policy), booted with SELINUX_ARGS and labelled at build time.
SELINUX_ARGS = 'security=selinux selinux=1 enforcing=1'
SELINUX_CHECK = GUEST_LIB + '/azp-selinux-check'
SELINUX_POLICY = 'default'          # SELINUXTYPE of Debian's selinux-policy-default
FILE_CONTEXTS = '/etc/selinux/%s/contexts/files/file_contexts' % SELINUX_POLICY
# every path the provisioner writes or makes (directories: with what is under them)
SELINUX_WRITTEN = ['/etc/hostname', '/etc/hosts', '/etc/passwd', '/etc/group', '/etc/shadow',
                   '/etc/gshadow', '/etc/sudoers.d', SUDOERS_FILE, '/etc/ssh/sshd_config.d',
                   SSHD_DROP_IN, '/home/' + ADMIN_USER, DATA_DIR]
# the baseline boot: the same disk and media, our unit masked for that boot only
BASELINE_ARG = 'systemd.mask=' + UNIT
SELINUX_CHECKER = {
    # Debian's policy never lets hostnamed answer the checker (its domain, initrc_t)
    'ask_hostnamed': False,
    'files': [DATA_DIR, CUSTOM_DATA_FILE, USER_DATA_FILE, HOOK_RECORD, SUDOERS_FILE,
              SSHD_DROP_IN, '/home/' + ADMIN_USER],
    'commands': {
        'media_data_sha256': ['sha256sum', CUSTOM_DATA_FILE, USER_DATA_FILE],
        'media_password': [MEDIA_CHECK, 'password', ADMIN_USER],
        'media_ssh_password': [MEDIA_CHECK, 'ssh', ADMIN_USER],
        'media_zzz_forget': [MEDIA_CHECK, 'forget'],
        'user_passwd': ['getent', 'passwd', ADMIN_USER],
        'user_status': ['passwd', '-S', ADMIN_USER],
        'sudoers_valid': ['visudo', '-cf', SUDOERS_FILE],
        'sshd_config': ['sshd', '-T'],
        # a login with the key; the login's context and the key file's label
        'se_key_login': ['sh', '-c', SSH_WAIT + 'ssh -i %s -o IdentitiesOnly=yes %s %s@127.0.0.1 '
                         '\'echo "user=$(id -un) home=$HOME"; echo "context=$(id -Z)"; '
                         'echo "keys=$(stat -c %%C ~/.ssh/authorized_keys)"\''
                         % (LOGIN_KEY, SSH_OPTIONS, ADMIN_USER)],
        'se_labels': ['sh', '-c', 'exec "$0" labels "$@" /etc/ssh/ssh_host_*', SELINUX_CHECK]
        + SELINUX_WRITTEN,
        'se_state': [SELINUX_CHECK, 'state'],
        'se_domain': [SELINUX_CHECK, 'domain', UNIT],
        # last: every denial of the boot, the checks' own logins included
        'zz_se_denials': [SELINUX_CHECK, 'denials'],
    }}


def install_selinux_check(tree):
    """install azp-selinux-check; SELINUX=enforcing in /etc/selinux/config"""
    write_guest_file(tree, SELINUX_CHECK, read_bytes(os.path.join(BOOT_DIR, 'azp-selinux-check'))
                     .decode(), 0o755)
    config = os.path.join(tree, 'etc/selinux/config')
    with open(config) as f:
        text = f.read()
    text, changed = re.subn(r'(?m)^SELINUX=.*$', 'SELINUX=enforcing', text)
    if not changed or not re.search(r'(?m)^SELINUXTYPE=%s$' % SELINUX_POLICY, text):
        raise TestFailure('%s: no SELINUX= line or not SELINUXTYPE=%s' % (config, SELINUX_POLICY))
    with open(config, 'w') as f:
        f.write(text)


# what label_tree must have given (the policy's own file contexts say so)
LABEL_SAMPLES = {'etc/shadow': ':shadow_t:', 'etc/hostname': ':net_conf_t:',
                 'usr/sbin/sshd': ':sshd_exec_t:', 'etc/sudoers.d': ':etc_t:'}


def label_tree(tree):
    """Every file of the finished tree labelled as its policy says (setfiles, the
    image's own, with the image's file_contexts: what an image builder runs before
    capture); mke2fs -d copies the security.selinux attributes into the disk."""
    # setfiles sets each label through /proc/self/fd: a /proc of its own in the tree, in
    # a mount namespace of its own (gone with it; this machine's mounts stay as they are)
    _, took = run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                   'mount -t proc proc "$0/proc" && exec chroot "$0" setfiles -F "$1" /',
                   tree, FILE_CONTEXTS], 'setfiles in the image', 300)
    wrong = []
    for path, want in sorted(LABEL_SAMPLES.items()):
        try:
            label = os.getxattr(os.path.join(tree, path), 'security.selinux',
                                follow_symlinks=False).decode('utf-8', 'replace')
        except OSError as exc:
            label = str(exc)
        if want not in label:
            wrong.append('%s: %s, not %s' % (path, label.rstrip('\0'), want))
    if wrong:
        raise TestFailure('labelling the tree failed: ' + '; '.join(wrong))
    return 'labelled by setfiles (%s) in %.1f s' % (FILE_CONTEXTS, took)


IMAGES = {
    'default': GuestImage('default', broken_check=True),
    'no-dbus': GuestImage('no-dbus', tweaks=[mask_units('dbus.service', 'dbus.socket')]),
    # NetworkManager, sudo and sshd, installed with --provision-user (issues 5 and 6)
    'networkmanager': GuestImage('networkmanager', recipe='networkmanager',
                                 install_args=['--provision-user'],
                                 checker_config=USER_CHECKER, login_key=True),
    # Issue 13: the same base (sudo, sshd), --provision-user, a ready.d hook that records
    # the data files it is handed; the boot attaches the provisioning media
    # Issue 20 (17): and its CD-ROM driver loads only after the unit's first search
    'media': GuestImage('media', recipe='networkmanager', install_args=['--provision-user'],
                        tweaks=[install_ready_hook, hold_back_cdrom_driver],
                        checker_config=MEDIA_CHECKER, media=True),
    # Issue 20: the media image and the power-cut helpers
    'powercut': GuestImage('powercut', recipe='networkmanager',
                           install_args=['--provision-user'],
                           tweaks=[install_ready_hook, install_powercut],
                           checker_config=POWERCUT_CHECKER, media=True),
    # Issue 14: the image of capture-a: sshd (with the host keys its package made at
    # build time, as every Debian image has) and --provision-user
    'capture': GuestImage('capture', recipe='networkmanager', install_args=['--provision-user'],
                          checker_config=CAPTURE_CHECKER),
    # Issue 23: the media image's everything-at-once first boot, SELinux enforcing
    'selinux': GuestImage('selinux', recipe='selinux', install_args=['--provision-user'],
                          tweaks=[install_ready_hook, install_selinux_check],
                          checker_config=SELINUX_CHECKER, login_key=True, media=True,
                          kernel_args=SELINUX_ARGS, selinux_labels=True),
}


class Boot(object):
    """One boot of a VM.  emulator: FakeAzure keywords, or a function (VmRuns of the
    boots before it, the built image's dict) returning them.  disk_from: boot the disk
    another boot left behind (that boot runs first).  check(ctx, c) judges the boot.
    media: attach provisioning media built from the image's media secrets as an IDE
    cdrom (/dev/sr0 in the guest); skipped, not failed, without genisoimage."""

    def __init__(self, name, check, image='default', emulator=None, disk_from=None,
                 time_limit=BOOT_TIME_LIMIT, optional=False, media=False, suites=None,
                 runner=None, vm_boots=1):
        self.name = name
        # a scenario of several VM boots (powercut) has its own runner, called as
        # run_boot is, and counts vm_boots in the time budget
        self.runner = runner
        self.vm_boots = vm_boots
        self.suites = tuple(suites or SUITES)   # issue 15: the suites it runs on
        self.media = media
        self.optional = optional        # run only when named with --only
        self.check = check
        self.image = image
        self.emulator = emulator or {}
        self.disk_from = disk_from
        self.time_limit = time_limit

    def emulator_kwargs(self, history, image):
        if callable(self.emulator):
            return self.emulator(history, image)
        return dict(self.emulator)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def say(text=''):
    sys.stdout.write(text + '\n')
    sys.stdout.flush()


class TestFailure(Exception):
    """The test could not be carried out (host setup, image build): fails every boot."""


class BootSkipped(Exception):
    """A boot that cannot be run here for a stated reason (no genisoimage for the
    media): reported as SKIP, never as a pass."""


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
    """The cached base tree for recipe (built when missing).  Returns (tree, how).
    One lock per recipe (suite + network): the bases of several recipes can be built
    at the same time (build_bases), by this run or by another user of the cache."""
    os.makedirs(cache_dir, exist_ok=True)
    key = recipe.key()
    final = os.path.join(cache_dir, 'base-%s-%s' % (recipe.cache_name, key))
    with open(os.path.join(cache_dir, '.lock-' + recipe.cache_name), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = os.path.join(cache_dir, 'base-%s-%s' % (recipe.name, key))
        if recipe.suite == SUITE and os.path.isfile(os.path.join(before, 'complete')) \
                and not os.path.exists(final):
            os.rename(before, final)    # the same recipe, named before the matrix
        if os.path.isfile(os.path.join(final, 'complete')):
            return os.path.join(final, 'rootfs'), 'cached (%s)' % final
        # this recipe's other keys and half builds; before the matrix, bookworm's
        # bases were called base-NAME-KEY
        stale = re.compile(r'(base-(%s)-[0-9a-f]{16}|\.build-%s-.*)$' % (
            '|'.join(re.escape(n) for n in [recipe.cache_name] + (
                [recipe.name] if recipe.suite == SUITE else [])),
            re.escape(recipe.cache_name)))
        for old in os.listdir(cache_dir):
            if stale.match(old):
                shutil.rmtree(os.path.join(cache_dir, old), ignore_errors=True)
        building = tempfile.mkdtemp(prefix='.build-%s-' % recipe.cache_name, dir=cache_dir)
        hook = os.path.join(BOOT_DIR, 'rootfs-hook.sh')
        cmd = recipe.mmdebstrap_args(hook) + [os.path.join(building, 'rootfs')]
        say('building base root filesystem %r with mmdebstrap (log: %s)'
            % (recipe.cache_name, log))
        _, took = run(cmd, 'mmdebstrap (%s)' % recipe.cache_name, 900, log=log)
        with open(os.path.join(building, 'recipe.json'), 'w') as f:
            json.dump({'cmd': cmd, 'key': key}, f, indent=1)
        with open(os.path.join(building, 'complete'), 'w') as f:
            f.write('%s\n' % time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
        os.rename(building, final)
        return os.path.join(final, 'rootfs'), 'built in %.0f s (%s)' % (took, final)


BASE_BUILDS_AT_ONCE = 3     # mmdebstrap runs at a time: downloads overlap with dpkg work


def build_bases(recipes, cache_dir, workdir):
    """Build (or find cached) the bases of recipes, several at a time, each with its
    own log.  Returns {cache_name: (tree, how)}; raises TestFailure naming every base
    that failed."""
    import concurrent.futures
    recipes = dict((r.cache_name, r) for r in recipes)
    done, failed = {}, []
    with concurrent.futures.ThreadPoolExecutor(max_workers=BASE_BUILDS_AT_ONCE) as pool:
        jobs = dict((pool.submit(base_rootfs, r, cache_dir,
                                 os.path.join(workdir, 'mmdebstrap-%s.log' % name)), name)
                    for name, r in sorted(recipes.items()))
        for job in concurrent.futures.as_completed(jobs):
            try:
                done[jobs[job]] = job.result()
            except TestFailure as exc:
                failed.append('%s: %s' % (jobs[job], exc))
    if failed:
        raise TestFailure('; '.join(failed))
    return done


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


def checker_config_for(tree, config):
    """config plus what every boot reports (BASE_CHECKER: the record, --status) and,
    in an image with sshd, SSH_CHECKER (host keys on disk and served)."""
    merged = {'files': list(BASE_CHECKER['files']), 'commands': dict(BASE_CHECKER['commands'])}
    extra = [SSH_CHECKER] if os.path.exists(os.path.join(tree, 'usr/sbin/sshd')) else []
    for part in extra + [config]:
        merged['files'] += [f for f in part.get('files', []) if f not in merged['files']]
        merged['commands'].update(part.get('commands', {}))
        merged.update((k, v) for k, v in part.items() if k not in ('files', 'commands'))
    return merged


def install_checker(tree, config):
    lib = os.path.join(tree, GUEST_LIB.lstrip('/'))
    os.makedirs(lib, exist_ok=True)
    shutil.copyfile(os.path.join(BOOT_DIR, 'azp-boot-check'), os.path.join(lib, 'azp-boot-check'))
    os.chmod(os.path.join(lib, 'azp-boot-check'), 0o755)
    with open(os.path.join(lib, 'config.json'), 'w') as f:
        json.dump(checker_config_for(tree, config), f, indent=1)
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
    module = os.path.join(tree, 'usr/local/lib/azure-provisioning/azure_provisioning.py')
    launcher = os.path.join(tree, 'usr/local/sbin/azure-provisioning')
    if read_bytes(module) != read_bytes(os.path.join(repo, 'azure_provisioning.py')):
        problems.append('/usr/local/lib/azure-provisioning/azure_provisioning.py differs from '
                        'azure_provisioning.py')
    elif not glob.glob(os.path.join(os.path.dirname(module), '__pycache__',
                                    'azure_provisioning.cpython-*.pyc')):
        problems.append('the module was not byte-compiled at install time')
    if b'from azure_provisioning import main' not in read_bytes(launcher):
        problems.append('/usr/local/sbin/azure-provisioning is not the launcher')
    elif os.stat(launcher).st_mode & 0o777 != 0o755:
        problems.append('/usr/local/sbin/azure-provisioning mode %o, not 755'
                        % (os.stat(launcher).st_mode & 0o777))
    unit = os.path.join(tree, 'etc/systemd/system', UNIT)
    if not os.path.isfile(unit):
        problems.append('/etc/systemd/system/%s missing' % UNIT)
    links = [os.path.join(d, UNIT) for d in os.listdir(os.path.join(tree, 'etc/systemd/system'))
             if d.endswith('.wants') and
             os.path.lexists(os.path.join(tree, 'etc/systemd/system', d, UNIT))]
    if not links:
        problems.append('%s is not enabled (no .wants symlink)' % UNIT)
    return problems


def build_image(image, workdir, cache_dir, repo, log, suite=None):
    """Make the pristine disk image of `image` (on suite: default the recipe's own,
    SUITE).  Returns dict(disk, kernel, initrd, login_key, preflight, media, suite,
    cmdline, host_keys: the fingerprints of the SSH host keys the image ships)."""
    recipe = recipe_for(image.recipe.name, suite) if suite else image.recipe
    base, how = base_rootfs(recipe, cache_dir, log)
    say('base root filesystem %s: %s' % (recipe.cache_name, how))
    out = os.path.join(workdir, 'image-%s%s' % (suite + '-' if suite else '', image.name))
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
    # The kernel command line the image declares (where a real image's boot loader
    # config says it; --check reads it) is the one QEMU boots with (qemu_command).
    os.makedirs(os.path.join(tree, 'etc/kernel'), exist_ok=True)
    with open(os.path.join(tree, 'etc/kernel/cmdline'), 'w') as f:
        f.write(image.cmdline + '\n')
    for tweak in image.tweaks:
        tweak(tree)
    login_key = make_login_key(tree) if image.login_key else None
    media = None
    if image.media:
        media = make_media_secrets(load_fake_module(repo))
        install_media_secret(tree, media)
    labelled = label_tree(tree) if image.selinux_labels else ''
    preflight = preflight_checks(image, tree, repo, out)
    host_keys = image_host_keys(tree)
    kernel, initrd = find_boot_files(tree)
    for src in (kernel, initrd):
        shutil.copyfile(src, os.path.join(out, os.path.basename(src)))
    disk = os.path.join(out, 'pristine.ext4')
    run(['mke2fs', '-q', '-t', 'ext4', '-L', 'root', '-d', tree, '-F', disk, '2G'],
        'mke2fs', 300)
    shutil.rmtree(tree)
    say('image %r: install.sh --root ok, %s; disk made in %.1f s%s%s'
        % (image.name, install_summary(text), time.monotonic() - started,
           ''.join('; ' + (t.__doc__ or t.__name__) for t in image.tweaks),
           '; ' + labelled if labelled else ''))
    return {'disk': disk, 'kernel': os.path.join(out, os.path.basename(kernel)),
            'initrd': os.path.join(out, os.path.basename(initrd)),
            'login_key': login_key, 'preflight': preflight, 'media': media,
            'suite': recipe.suite, 'cmdline': image.cmdline, 'host_keys': host_keys,
            'name': image.name}


def image_host_keys(tree):
    """Fingerprints (`ssh-keygen -l` lines) of the SSH host keys in the tree, made by
    the image's own ssh-keygen ([] without keys or without ssh-keygen)."""
    pubs = sorted(glob.glob(os.path.join(tree, 'etc/ssh/ssh_host_*_key.pub')))
    if not pubs or not os.path.exists(os.path.join(tree, 'usr/bin/ssh-keygen')):
        return []
    out, _ = run(['chroot', tree, 'sh', '-c', 'for k in /etc/ssh/ssh_host_*_key.pub; do '
                  'ssh-keygen -l -f "$k"; done'], 'ssh-keygen -l in the image', 60)
    return fingerprint_set(out)


FINGERPRINT = re.compile(r'\b(\d+) (SHA256:[A-Za-z0-9+/=]+) .*\((\w+)\)\s*$')


def fingerprint_set(text):
    """The `BITS SHA256:... (TYPE)` of each ssh-keygen -l line in text, sorted (the
    comment in between names the host or file: not part of the key)."""
    found = set()
    for line in (text or '').splitlines():
        m = FINGERPRINT.search(line.strip())
        if m:
            found.add('%s %s (%s)' % m.groups())
    return sorted(found)


def make_login_key(tree):
    """A fresh ed25519 key pair made by the image's own ssh-keygen: the private half
    stays in the image (LOGIN_KEY, root only) for the checker's ssh login; returns the
    public half, which the emulator serves in compute.publicKeys."""
    key = os.path.join(tree, LOGIN_KEY.lstrip('/'))
    for old in (key, key + '.pub'):
        if os.path.lexists(old):
            os.unlink(old)
    run(['chroot', tree, 'ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'azp-boot-test',
         '-f', LOGIN_KEY], 'ssh-keygen in the image', 60)
    with open(key + '.pub') as f:
        return f.read().strip()


# Issue 13: the provisioning media's secrets ---------------------------------

CUSTOM_DATA_SCRIPT = (b'#!/bin/sh\n# azp-boot-test custom data: a script, then binary bytes\n'
                      b'echo "custom data <&\'\\"$;:> ran" >&2\nexit 0\n')


def make_password(rng):
    """20 characters: every PASSWORD_SPECIALS character inside, letters and digits
    around them (no blank at either end: nothing to be stripped)."""
    alnum = string.ascii_letters + string.digits
    middle = list(PASSWORD_SPECIALS) + [rng.choice(alnum) for _ in range(3)]
    rng.shuffle(middle)
    return ''.join([rng.choice(alnum) for _ in range(2)] + middle
                   + [rng.choice(alnum) for _ in range(2)])


def make_media_secrets(fake):
    """This run's media content (fake: tests/fake_azure.py as a module): a fresh random
    password with shell/XML metacharacters, custom data (a small script, every byte
    value, random bytes), IMDS user data (CR LF, NUL, random bytes), the ovf-env.xml
    text for the disc (user ADMIN_USER, DisableSshPasswordAuthentication false) and the
    IMDS document that matches it (adminUsername ADMIN_USER, disablePasswordAuthentication
    "false", compute.userData).  The password is never printed."""
    rng = secrets.SystemRandom()
    password = make_password(rng)
    custom_data = CUSTOM_DATA_SCRIPT + bytes(range(256)) + os.urandom(16)
    user_data = (b'#cloud-config\n# azp-boot-test IMDS user data\r\n' + os.urandom(24)
                 + b'\x00\xff end\n')
    keys = fake.make_public_keys(None, ADMIN_USER)
    doc = fake.with_user_data(fake.make_instance_document(
        VM_NAME, COMPUTER_NAME, fake.DEFAULT_VM_ID, ADMIN_USER, keys, True), user_data)
    doc['compute']['osProfile']['disablePasswordAuthentication'] = 'false'
    ovf_env = fake.make_ovf_env(COMPUTER_NAME, ADMIN_USER, password=password,
                                disable_ssh_password_auth=False,
                                public_keys=[keys[0]['keyData'].strip()],
                                custom_data=custom_data)
    return {'password': password, 'escaped': fake.ovf_text(password, 'password'),
            'custom_data': custom_data, 'user_data': user_data, 'public_keys': keys,
            'imds_body': json.dumps(doc, separators=(',', ':')), 'ovf_env': ovf_env}


def secret_forms(media):
    """The password as typed and as the media's XML carries it (bytes)."""
    forms = [media['password'].encode('utf-8'), media['escaped'].encode('utf-8')]
    return [f for i, f in enumerate(forms) if f not in forms[:i]]


def install_media_secret(tree, media):
    """The guest-side media checks: MEDIA_SECRET (root only: the password, then its
    XML-escaped form, one a line: grep -F -f patterns), MEDIA_ASKPASS for ssh, and
    tests/boot/azp-media-check.  The checker deletes the first two when done."""
    lib = os.path.join(tree, GUEST_LIB.lstrip('/'))
    os.makedirs(lib, exist_ok=True)
    fd = os.open(os.path.join(tree, MEDIA_SECRET.lstrip('/')),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'wb') as f:
        f.write(b''.join(form + b'\n' for form in secret_forms(media)))
    fd = os.open(os.path.join(tree, MEDIA_ASKPASS.lstrip('/')),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, 'w') as f:
        f.write('#!/bin/sh\n# SSH_ASKPASS of azp-media-check: the password, line 1\n'
                'exec head -n 1 %s\n' % MEDIA_SECRET)
    shutil.copyfile(os.path.join(BOOT_DIR, 'azp-media-check'),
                    os.path.join(tree, MEDIA_CHECK.lstrip('/')))
    os.chmod(os.path.join(tree, MEDIA_CHECK.lstrip('/')), 0o755)


# ---------------------------------------------------------------------------
# Image preflight (issue 7): azure-provisioning --check on the built tree
# ---------------------------------------------------------------------------

# The image's own interpreter runs the installed script (chroot), the way a user runs
# it inside the image before generalizing; -B: write no .pyc into the image.
CHECK_IN_IMAGE = ['/usr/bin/python3', '-I', '-B', '/usr/local/sbin/azure-provisioning',
                  '--check']
ENABLE_LINK = 'etc/systemd/system/multi-user.target.wants/' + UNIT
FAKE_WAAGENT = 'usr/sbin/waagent'
CHECK_ENV = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LANG': 'C.UTF-8'}


def run_status(cmd, timeout=60):
    """(exit status, output); status None when the time limit stopped it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, universal_newlines=True, env=CHECK_ENV,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        return None, (proc.communicate()[0] or '') + '\n[stopped after %d s]' % timeout


def check_runs(tree, repo):
    """--check on tree twice: inside (chroot, the image's python) and from outside
    (this machine's python with --root).  Returns {'chroot'|'root': (status, output)}."""
    return {'chroot': run_status(['chroot', tree] + CHECK_IN_IMAGE),
            'root': run_status([sys.executable, '-B', os.path.join(repo, 'azure_provisioning.py'),
                                '--check', '--root', tree])}


def checklist(output):
    """The status lines of --check output without the fixes and the verdict line.  The
    python line keeps only its status and interpreter: inside the image the check asks
    the interpreter itself, with --root it judges its files, and says so."""
    lines = [l for l in output.splitlines() if re.match(r'(ok|warn|FAIL|info)\s', l)]
    return [re.sub(r'^(\S+\s+python: \S+) .*$', r'\1', l) for l in lines]


def flagged(output, status, *words):
    """The first `status` line naming all words, and whether a fix line follows it."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(status) and all(w in line for w in words):
            return line, i + 1 < len(lines) and lines[i + 1].startswith('      fix: ')
    return None, False


def preflight_checks(image, tree, repo, workdir):
    """[(ok, what, detail, output)]: the built tree must pass --check; a broken copy
    (enable symlink removed, a fake waagent) must fail naming both problems."""
    results = []
    runs = check_runs(tree, repo)
    for how, (status, output) in sorted(runs.items()):
        where = ('inside the image (chroot, its own python3)' if how == 'chroot'
                 else 'from this machine with --root')
        last = (output.strip().splitlines() or [''])[-1]
        results.append((status == 0 and last.startswith('image ready: 0 blocking')
                        and not flagged(output, 'FAIL')[0],
                        'image %s: --check %s exits 0, "image ready"' % (image.name, where),
                        'exit %s; %s' % (status, last), output))
        # issue 14: the image is a generalized one (empty machine-id, no record) whose
        # kernel command line has the serial console (/etc/kernel/cmdline here)
        identity = [l for l in output.splitlines() if re.match(r'(FAIL|warn)\s', l)
                    and re.search(r'machine.id|state\.json|console=ttyS0', l)]
        results.append((not identity,
                        'image %s: --check %s: no identity or console finding' % (image.name,
                                                                                 where),
                        '; '.join(identity) or 'machine-id empty, no record, console=ttyS0',
                        None))
    same = checklist(runs['chroot'][1]) == checklist(runs['root'][1])
    results.append((same, 'image %s: the same checklist inside and with --root' % image.name,
                    '' if same else 'differs: %s' % sorted(set(checklist(runs['chroot'][1]))
                                                           ^ set(checklist(runs['root'][1]))),
                    None))
    if not image.broken_check:
        return results
    broken = os.path.join(workdir, 'broken-rootfs')
    # hard links: 0.5 s instead of 7; only unlink and create new files in the copy
    run(['cp', '-al', tree, broken], 'cp -al (broken copy for --check)', 120)
    try:
        os.unlink(os.path.join(broken, ENABLE_LINK))
        fd = os.open(os.path.join(broken, FAKE_WAAGENT), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o755)
        os.write(fd, b'#!/bin/sh\n# fake walinuxagent for the --check test\nexit 0\n')
        os.close(fd)
        # issue 14: captured without --deprovision: a machine id and our record (new
        # files: the copy's machine-id is a hard link to the tree's)
        os.unlink(os.path.join(broken, 'etc/machine-id'))
        with open(os.path.join(broken, 'etc/machine-id'), 'w') as f:
            f.write('0123456789abcdef0123456789abcdef\n')
        os.makedirs(os.path.join(broken, DATA_DIR.lstrip('/')), exist_ok=True)
        with open(os.path.join(broken, DATA_DIR.lstrip('/'), 'state.json'), 'w') as f:
            f.write('{"result": "provisioned", "vm_id": "%s"}\n' % VM_ID_A)
        runs = check_runs(broken, repo)
    finally:
        shutil.rmtree(broken, ignore_errors=True)
    if not os.path.lexists(os.path.join(tree, ENABLE_LINK)) or \
            os.path.lexists(os.path.join(tree, FAKE_WAAGENT)) or \
            read_bytes(os.path.join(tree, 'etc/machine-id')).strip() or \
            os.path.lexists(os.path.join(tree, DATA_DIR.lstrip('/'), 'state.json')):
        raise TestFailure('breaking the copy of %s changed the tree itself' % tree)
    for how, (status, output) in sorted(runs.items()):
        where = 'inside (chroot)' if how == 'chroot' else 'with --root'
        last = (output.strip().splitlines() or [''])[-1]
        found = [flagged(output, 'FAIL', 'unit not enabled'),
                 flagged(output, 'FAIL', 'walinuxagent', '/' + FAKE_WAAGENT),
                 flagged(output, 'FAIL', '/etc/machine-id'),
                 flagged(output, 'FAIL', 'state.json')]
        results.append((status == 1 and last.startswith('image NOT ready: 4 blocking')
                        and all(line and fix for line, fix in found),
                        'broken copy of %s (unit not enabled, a /%s, a machine id, a '
                        'state.json): --check %s exits 1 naming all four, each with a fix'
                        % (image.name, FAKE_WAAGENT, where),
                        'exit %s; %s | %s' % (status, ' | '.join(str(l) for l, _ in found),
                                              last), output))
    return results


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
        self.wall_started = None    # time.time() when QEMU was started
        self.first_request_after = None   # s from QEMU start to the unit's first request
        self.duration = None        # s QEMU ran
        self.outcome = None         # 'powered off', 'timeout', 'no poweroff', 'qemu exit N',
                                    # 'hang in early boot ...'
        self.early_hang = None      # early_boot_hang()'s dict: this attempt hung, was stopped
        self.hung_before = []       # VmRuns of this boot's earlier attempts that hung
        self.userspace_after = None     # s from QEMU start to USERSPACE_MARKERS on the console
        self.longest_early_quiet = 0.0  # s: the longest console silence before that
        self.facts = None
        self.console = ''
        self.qemu_log = ''
        self.packets = []
        self.cut_after = None       # s from QEMU start to a PowerCut's SIGKILL


def load_fake_module(repo):
    """tests/fake_azure.py of repo as a module (FakeAzure, make_ovf_env, build_media...)."""
    path = os.path.join(repo, 'tests', 'fake_azure.py')
    if not os.path.isfile(path):
        raise TestFailure('%s not found' % path)
    spec = importlib.util.spec_from_file_location('azp_boot_fake_azure', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_fake_azure(repo):
    return load_fake_module(repo).FakeAzure


def gen1_uuid(vm_id):
    """The SMBIOS UUID of a Gen1 (BIOS) Azure VM whose vmId is vm_id: the first three
    fields byte-swapped.  QEMU boots the kernel without EFI, so the guest is Gen1-like
    and the provisioner swaps them back (--status)."""
    fields = vm_id.lower().split('-')
    fields[:3] = [''.join(reversed([f[i:i + 2] for i in range(0, len(f), 2)]))
                  for f in fields[:3]]
    return '-'.join(fields)


HOSTGAPLUGIN_PORT = 32526          # the HostGAPlugin, at the WireServer's address


def slirp_netdev(wport, iport, ssh_port=None, hostgaplugin=False):
    """-netdev for a guest that reaches nothing but the WireServer and IMDS at their
    real addresses, forwarded to the emulator's ports on this machine's loopback
    (ssh_port: also this machine's 127.0.0.1:ssh_port to the guest's port 22;
    hostgaplugin: 168.63.129.16:32526 to the emulator's WireServer port too)."""
    fwd = ('guestfwd=tcp:%s:80-cmd:nc 127.0.0.1 %d,guestfwd=tcp:%s:80-cmd:nc 127.0.0.1 %d'
           % (WIRESERVER_IP, wport, IMDS_IP, iport))
    if hostgaplugin:
        fwd += ',guestfwd=tcp:%s:%d-cmd:nc 127.0.0.1 %d' % (WIRESERVER_IP, HOSTGAPLUGIN_PORT,
                                                            wport)
    if ssh_port:
        fwd += ',hostfwd=tcp:127.0.0.1:%d-:22' % ssh_port
    return 'user,id=n0,restrict=on,%s,%s' % (
        ','.join('%s=%s' % (k, SLIRP[k]) for k in ('net', 'host', 'dns', 'dhcpstart')), fwd)


def qemu_command(files, disk, accel, wport, iport, rundir, media=None, uuid=None):
    # Issue 11 (a hang in early kernel boot under TCG): tests/boot_hangs.py found no
    # configuration that does better than this one: 0 hangs in 50 boots (to the
    # kernel's "Run /init") each with -accel tcg (multi-threaded) -smp 2, tcg,thread=
    # single, -smp 1 and clocksource=acpi_pm (the guest picks hpet itself: the TSC is
    # "unsynchronized" with 2 vCPUs), medians 7.0-7.5 s; so it stays, and boot_vm /
    # run_boot stop and retry a boot that hangs before userspace instead.
    netdev = slirp_netdev(wport, iport)
    return ['qemu-system-x86_64', '-name', 'azp-boot-test', '-nodefaults', '-no-user-config',
            '-display', 'none', '-no-reboot', '-accel', accel, '-m', '1024', '-smp', '2',
            '-kernel', files['kernel'], '-initrd', files['initrd'],
            '-append', files.get('cmdline') or KERNEL_CMDLINE,
            '-drive', 'file=%s,format=raw,if=virtio,cache=unsafe' % disk,
            '-netdev', netdev,
            '-device', 'virtio-net-pci,netdev=n0,mac=' + GUEST_MAC,
            '-object', 'filter-dump,id=d0,netdev=n0,file=' + os.path.join(rundir, 'net.pcap'),
            '-device', 'virtio-rng-pci',
            '-serial', 'file:' + os.path.join(rundir, 'console.log'),
            '-serial', 'file:' + os.path.join(rundir, 'facts.log')] + (
        # issue 13: the provisioning media the way Azure attaches it, a read-only cdrom
        # on the board's IDE controller: /dev/sr0 in the guest (ata_piix, sr_mod)
        ['-drive', 'file=%s,format=raw,if=ide,index=1,media=cdrom,readonly=on' % media]
        if media else []) + (
        # issue 14: every Azure VM has an SMBIOS product UUID (its vmId, Gen1 byte order)
        ['-uuid', uuid] if uuid else [])


KERNEL_TIME = re.compile(rb'\[\s*(\d+\.\d+)\]')


def early_boot_hang(console, quiet_since, now, limit=EARLY_BOOT_QUIET):
    """Issue 11: has the guest hung before userspace?  Pure: console is the console's
    bytes so far, quiet_since the time (s after QEMU start) when they last grew (0 when
    there are none yet), now the time it is (same clock).  None when userspace has
    started (a USERSPACE_MARKERS line is there: no judgement after that) or the console
    has been quiet for less than limit s; else a dict: 'kernel_time' (the last kernel
    timestamp on the console, s, or None), 'quiet_since', 'quiet_for' and 'last_line'."""
    if any(marker in console for marker in USERSPACE_MARKERS):
        return None
    if now - quiet_since < limit:
        return None
    times = KERNEL_TIME.findall(console)
    lines = [l for l in console.replace(b'\r', b'').split(b'\n') if l.strip()]
    return {'kernel_time': float(times[-1]) if times else None,
            'quiet_since': quiet_since, 'quiet_for': now - quiet_since,
            'last_line': lines[-1].decode('utf-8', 'replace').strip() if lines else ''}


def hang_point(hang):
    """Where an early_boot_hang() stopped: '0.89 s' on the guest kernel's clock, or the
    s after QEMU start when the console has no kernel timestamp."""
    if hang['kernel_time'] is not None:
        return '%.2f s' % hang['kernel_time']
    return '%.1f s after QEMU start' % hang['quiet_since']


def describe_hang(hang):
    if not hang['last_line']:
        return 'no console output at all for %.0f s after QEMU start' % hang['quiet_for']
    return ('console silent for %.0f s from %.1f s after QEMU start, the last line at %s: %s'
            % (hang['quiet_for'], hang['quiet_since'], hang_point(hang),
               hang['last_line'][:120]))


def boot_vm(files, disk, accel, az, rundir, time_limit, hang_after=EARLY_BOOT_QUIET,
            media=None, uuid=None, cut=None):
    """Boot once; returns a VmRun.  Never waits longer than time_limit (+ a few s).
    Before userspace, a console silent for hang_after s (see early_boot_hang) stops
    the VM at once: vm.early_hang says where.  media: a disc image to attach as cdrom.
    cut: a PowerCut, armed with QEMU's process and shown the console as it grows;
    once it has cut the power, vm.outcome says so and vm.cut_after when."""
    vm = VmRun()
    wport = int(az.wireserver_addr.rsplit(':', 1)[1])
    iport = int(az.imds_addr.rsplit(':', 1)[1])
    cmd = qemu_command(files, disk, accel, wport, iport, rundir, media, uuid)
    with open(os.path.join(rundir, 'qemu.cmd'), 'w') as f:
        f.write(' '.join("'%s'" % a if ' ' in a else a for a in cmd) + '\n')
    facts_path = os.path.join(rundir, 'facts.log')
    console_path = os.path.join(rundir, 'console.log')
    console, grew_at, userspace = b'', 0.0, not hang_after
    qemu_log = open(os.path.join(rundir, 'qemu.log'), 'wb')
    started = time.monotonic()
    wall_started = vm.wall_started = time.time()
    # timeout(1) as a backstop: QEMU ends even if this script is killed outright.
    proc = subprocess.Popen(['timeout', '-k', '5', '%d' % (time_limit + 15)] + cmd,
                            stdin=subprocess.DEVNULL, stdout=qemu_log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if cut is not None:
        cut.arm(proc, started)
    facts_at = None
    try:
        while True:
            now = time.monotonic()
            if cut is not None and cut.watch(read_bytes(console_path), now):
                proc.wait()
                break
            if vm.ready_after is None and az.ready_accepted():
                vm.ready_after = now - started
            rc = proc.poll()
            if rc is not None:
                vm.outcome = 'powered off' if rc == 0 else 'qemu exit status %d' % rc
                if rc == 124:
                    vm.outcome = 'stopped by timeout(1)'
                break
            if not userspace:
                try:
                    grown = os.path.getsize(console_path) != len(console)
                except OSError:
                    grown = False
                if grown:
                    vm.longest_early_quiet = max(vm.longest_early_quiet,
                                                 now - started - grew_at)
                    console, grew_at = read_bytes(console_path), now - started
                    userspace = any(m in console for m in USERSPACE_MARKERS)
                    if userspace:
                        vm.userspace_after = grew_at
                hang = None if userspace else early_boot_hang(console, grew_at, now - started,
                                                              hang_after)
                if hang:
                    vm.early_hang = hang
                    vm.outcome = 'hang in early boot at %s: stopped' % hang_point(hang)
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
    vm.cut_after = cut.cut_after() if cut is not None else None
    if vm.cut_after is not None:
        vm.outcome = 'power cut (SIGKILL to QEMU) at %.1f s' % vm.cut_after
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
    vm.console = read_bytes(console_path).decode('utf-8', 'replace')
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
    """Times (capture clock, see capture_offset) of the guest's TCP connection attempts
    to dst:dport."""
    times = []
    for ts, frame in packets:
        p = decode_frame(frame)
        if p and p['proto'] == 6 and p['src_mac'] == GUEST_MAC and p['dst'] == dst \
                and p.get('dport') == dport and p.get('flags', 0) & 0x12 == 0x02:
            times.append(ts)
    return times


def guest_payload_times(packets, dst, dport, start):
    """Capture times of the guest's TCP segments to dst:dport whose payload starts
    with `start` (bytes), e.g. b'POST /machine?comp=health'."""
    times = []
    for ts, frame in packets:
        p = decode_frame(frame)
        if p and p['proto'] == 6 and p['src_mac'] == GUEST_MAC and p['dst'] == dst \
                and p.get('dport') == dport and p.get('payload', b'').startswith(start):
            times.append(ts)
    return times


def capture_offset(ctx):
    """Seconds to add to a capture time to get this machine's clock.  filter-dump
    stamps packets with the seconds of time(NULL) when it was set up plus QEMU's
    virtual clock, so the capture runs up to ~1 s behind: aligned here on the unit's
    first IMDS connection (its SYN in the capture, its request at the emulator; the
    request comes a few ms after the SYN, so the aligned times are, if anything, late).
    0.0 when the unit never reached IMDS."""
    syns = tcp_syns_from_guest(ctx.vm.packets, IMDS_IP, 80)
    imds = [r['time'] for r in ctx.unit_requests if r['server'] == 'imds']
    if not syns or not imds:
        return 0.0
    return min(imds) - min(syns)


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
        self.rundir = None              # run_boot sets these
        self.media = None               # the image's media secrets (media boots)
        self.media_path = None          # the disc attached (media boots)
        self.image = None               # the built image's dict
        self.disk = None                # the disk booted (what the VM left on it)
        self.suite = None
        self.history = []               # VmRuns of this run so far (.name, .suite, .facts)

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


def check_hostnamed_not_needed(ctx, c, name, ask_hostnamed=True):
    """The unit sets the name without starting systemd-hostnamed (0.5-1.5 s of the
    boot under TCG), and hostnamed, asked afterwards, reports the same static name
    (ask_hostnamed False: where the checker does not ask, see SELINUX_CHECKER)."""
    begin = ctx.mono(UNIT, 'InactiveExitTimestampMonotonic')
    end = ctx.mono(UNIT, 'InactiveEnterTimestampMonotonic')
    # it exits when idle (and may be unloaded) before the checker asks: its journal too
    started = [e.get('monotonic') for e in ctx.facts.get('hostnamed_journal', [])
               if re.search(r'^Start(ed|ing)\b', e.get('message') or '')]
    during = [m for m in started if m and begin <= m <= end]
    c.expect(begin > 0 and end > 0 and not during,
             'systemd-hostnamed was not started while the unit ran',
             'unit %.3f-%.3f s, hostnamed starts at %s'
             % (begin / 1e6, end / 1e6, ', '.join('%.3f s' % (m / 1e6) for m in started if m)))
    if not ask_hostnamed:
        return
    answer = ctx.facts.get('hostnamed_static') or {}
    c.expect(answer.get('rc') == 0 and answer.get('output', '').strip() == 's "%s"' % name,
             'systemd-hostnamed, asked after the unit, says StaticHostname %s' % name,
             'busctl: %r' % answer)


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
    recipe = recipe_for(IMAGES[ctx.boot.image].recipe.name, ctx.suite)
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


def check_provisioned(ctx, c, ask_hostnamed=True):
    """A fresh image provisioned: what `first` and `networkmanager` share."""
    check_common(ctx, c)
    check_ready(ctx, c)
    check_imds_requests(ctx, c)
    check_hostname(ctx, c, COMPUTER_NAME)
    check_hostnamed_not_needed(ctx, c, COMPUTER_NAME, ask_hostnamed)
    check_ran_after_network(ctx, c)
    check_unit_succeeded_and_disabled(ctx, c)
    check_unit_file_unmodified(ctx, c)
    check_console(ctx, c, [
        (r'Ready accepted.*\b%d\b' % INCARNATION, 'Ready accepted line with the incarnation'),
        (r'hostname\b.*\b%s\b' % re.escape(COMPUTER_NAME), 'the hostname line')])


def check_first(ctx, c):
    check_provisioned(ctx, c)
    check_publish(ctx, c, 'systemd-networkd')
    check_record(ctx, c, VM_ID)       # issue 14
    # issue 13: no disc attached: the media step looked and said so, and went on
    check_console(ctx, c, [(r'\bmedia: no\b', 'no provisioning media found (none attached)')])


def check_networkmanager(ctx, c):
    check_provisioned(ctx, c)
    check_publish(ctx, c, 'NetworkManager')
    shown = command(ctx, 'nm_profiles_naming_a_host')[1].strip().splitlines()
    c.expect(len(shown) == 1 and shown[0].startswith('nmcli tool, version'),
             'no NetworkManager profile on disk names a DHCP hostname', ' | '.join(shown))
    sent = [l for l in ctx.step_lines() if 'sent to DHCP by' in l]
    say('    info: %s; %s' % (shown[0] if shown else 'nmcli: ?',
                             'connection activated again' if any('connection up' in l
                                                                 for l in sent) else
                             'the reapply alone'))
    check_user(ctx, c)
    check_host_keys(ctx, c, [("the image's", (ctx.image or {}).get('host_keys') or [])])


# Issue 6 -------------------------------------------------------------------

def dhcp_timeline(ctx, msgs, change, health_posts):
    """Print the DHCP messages of the capture with the unit's first IMDS connection
    and its health POSTs, in s after QEMU start (capture clock aligned)."""
    t0 = (ctx.vm.wall_started or 0.0) - capture_offset(ctx)
    events = []
    for m in msgs:
        if m['from_guest']:
            text = 'guest %-8s option 12 %-12s' % (m['type'], repr(m['hostname'])
                                                    if m['hostname'] else '-')
            if m['requested']:
                text += ' requested %s' % m['requested']
            if m['ciaddr'] != '0.0.0.0':
                text += ' ciaddr %s' % m['ciaddr']
        else:
            text = 'slirp %-8s yiaddr %s' % (m['type'], m['yiaddr'])
        events.append((m['time'], text))
    if change is not None:
        events.append((change, "unit connects to IMDS (the new name is known only after this)"))
    for t in health_posts:
        events.append((t, 'unit POSTs its health report (Ready)'))
    say('    info: on the wire (s after QEMU start; capture clock aligned on the unit\'s '
        'IMDS connection, %+.3f s):' % capture_offset(ctx))
    for t, text in sorted(events, key=lambda e: e[0]):
        say('      %7.3f  %s' % (t - t0, text))


def check_publish(ctx, c, client):
    """Issue 6 on the wire: after the hostname change the DHCP client sent a request
    carrying option 12 = the new name and got the same address back; Ready still
    accepted (check_ready); the unit's log line names the client."""
    msgs = dhcp_messages(ctx.vm.packets)
    # Everything on the capture's own clock: the new name is known only after the
    # unit's first IMDS connection (the checker's probe comes after the unit).
    syns = tcp_syns_from_guest(ctx.vm.packets, IMDS_IP, 80)
    change = min(syns) if syns else None
    posts = guest_payload_times(ctx.vm.packets, WIRESERVER_IP, 80, b'POST /machine?comp=health')
    dhcp_timeline(ctx, msgs, change, posts)
    asks = [m for m in msgs if m['from_guest'] and m['type'] in ('DISCOVER', 'REQUEST')]
    before = [m for m in msgs if change is not None and m['time'] < change]
    after = [m for m in msgs if change is not None and m['time'] >= change]
    say('    info: option 12 sent by the guest, in order: %s'
        % ', '.join('%s %s' % (m['type'], m['hostname']) for m in asks))
    boot_names = [m['hostname'] for m in before if m in asks]
    c.expect(bool(boot_names) and set(boot_names) == set([IMAGE_HOSTNAME]),
             'at boot %s announced the image name %s in option 12 (what issue 6 fixes)'
             % (client, IMAGE_HOSTNAME), 'option 12 before the change: %s' % boot_names)
    acks_before = [m['yiaddr'] for m in before if m['type'] == 'ACK' and not m['from_guest']]
    address = acks_before[-1] if acks_before else None
    c.expect(address is not None, 'a DHCP lease before the hostname change',
             'ACK yiaddr %s' % ', '.join(acks_before))
    new = [m for m in after if m in asks and m['type'] == 'REQUEST'
           and m['hostname'] == COMPUTER_NAME]
    t0 = (ctx.vm.wall_started or 0.0) - capture_offset(ctx)
    c.expect(bool(new), 'a DHCP REQUEST after the hostname change carries option 12 = %s'
             % COMPUTER_NAME,
             '%s at %.3f s, %.3f s after the unit connected to IMDS'
             % (new[0]['type'], new[0]['time'] - t0, new[0]['time'] - change) if new else
             'requests after the change: %s' % ['%s %s' % (m['type'], m['hostname'])
                                                 for m in after if m in asks])
    c.expect(bool(asks) and asks[-1]['hostname'] == COMPUTER_NAME,
             'the last name the guest sent to DHCP is %s' % COMPUTER_NAME,
             '%s %r' % (asks[-1]['type'], asks[-1]['hostname']) if asks else 'no request')
    if new:
        asked = new[0]['requested'] or new[0]['ciaddr']
        acks = [m for m in after if m['type'] in ('ACK', 'NAK') and not m['from_guest']
                and m['time'] >= new[0]['time']]
        c.expect(address is not None and asked == address and bool(acks)
                 and acks[0]['type'] == 'ACK' and acks[0]['yiaddr'] == address,
                 'the same address before and after: %s' % address,
                 'before: ACK %s; the new REQUEST asked for %s; answer %s %s'
                 % (address, asked, acks[0]['type'] if acks else 'none',
                    acks[0]['yiaddr'] if acks else ''))
        releases = [m for m in after if m['type'] == 'RELEASE' and m['from_guest']
                    and m['time'] < new[0]['time']]
        if releases and acks:
            say('    info: %s released the lease first: no lease for %.0f ms '
                '(RELEASE at %.3f s, ACK at %.3f s)'
                % (client, (acks[0]['time'] - releases[0]['time']) * 1000,
                   releases[0]['time'] - t0, acks[0]['time'] - t0))
        elif acks:
            say('    info: %s sent no RELEASE: it asked for its address again (REQUEST at '
                '%.3f s, ACK at %.3f s)' % (client, new[0]['time'] - t0, acks[0]['time'] - t0))
        if posts:
            say('    info: the new-name REQUEST went out %.3f s %s the Ready POST'
                % (abs(posts[0] - new[0]['time']), 'before' if new[0]['time'] <= posts[0]
                   else 'AFTER'))
    addresses = re.findall(r'\binet (\d+\.\d+\.\d+\.\d+)/',
                           (ctx.facts.get('ip_addr') or {}).get('output', ''))
    c.expect(address is not None and address in addresses,
             'the guest still has %s when the checker runs' % address,
             'IPv4 addresses: %s' % ' '.join(addresses))
    # NetworkManager before 1.42 is named with its version (its commands differ)
    pattern = (r'hostname %s sent to DHCP by %s(?: [\d.]+)? on (\S+) \((.*)\); address '
               r'([\d.]+)(, was ([\d.]+))? \(' % (re.escape(COMPUTER_NAME), re.escape(client)))
    line = next((l for l in ctx.step_lines() if re.search(pattern, l)), None)
    match = re.search(pattern, line or '')
    c.expect(bool(match) and match.group(3) == address and not match.group(4),
             'serial console: "sent to DHCP by %s", same address' % client,
             line or 'no such line; publish lines: %s' % [
                 l for l in ctx.step_lines() if 'DHCP' in l or 'publish' in l])
    say('    info: option 12 captured: %s; address before %s, after %s'
        % (' -> '.join(m['hostname'] or '-' for m in asks), address,
           acks[0]['yiaddr'] if new and acks else '-'))


# Issue 5 -------------------------------------------------------------------

def ssh_string(data):
    return struct.pack('>I', len(data)) + data


def rsa_shaped_key(comment):
    """A well-formed ssh-rsa public key line (its modulus is no one's key)."""
    modulus = b'\x00' + b''.join(hashlib.sha256(b'azp-boot-test %d' % i).digest()
                                 for i in range(8))
    blob = ssh_string(b'ssh-rsa') + ssh_string(b'\x01\x00\x01') + ssh_string(modulus)
    return 'ssh-rsa %s %s' % (base64.b64encode(blob).decode('ascii'), comment)


SECOND_KEY = rsa_shaped_key('alice@laptop  second   key')     # runs of spaces: normalized


def user_emulator(history, image):
    """osProfile.adminUsername alice with two keys: the image's login key with a
    trailing CR LF (as in real IMDS documents), and an rsa key with extra blanks."""
    if not image.get('login_key'):
        raise TestFailure('the image has no login key for the --provision-user boot')
    return dict(EMULATOR, admin_username=ADMIN_USER, public_keys=[
        {'keyData': image['login_key'] + '\r\n',
         'path': '/home/%s/.ssh/authorized_keys' % ADMIN_USER},
        '  ' + SECOND_KEY + ' \n'])


def command(ctx, name):
    result = (ctx.facts.get('commands') or {}).get(name) or {}
    return result.get('rc'), result.get('output') or ''


def check_user(ctx, c):
    """Issue 5: --provision-user created alice with her keys, sudo and the sshd drop-in,
    seen from inside the guest; an ssh login with the served key works."""
    entries = ctx.emulator.get('public_keys') or []
    expected = [' '.join((e['keyData'] if isinstance(e, dict) else e).split())
                for e in entries]
    rc, out = command(ctx, 'user_passwd')
    fields = out.strip().split(':')
    ok = rc == 0 and len(fields) == 7 and fields[0] == ADMIN_USER
    uid, gid = (int(fields[2]), int(fields[3])) if ok else (None, None)
    home = fields[5] if ok else None
    c.expect(ok and uid >= 1000 and home == '/home/' + ADMIN_USER,
             'user %s exists (uid >= 1000, home /home/%s)' % (ADMIN_USER, ADMIN_USER),
             out.strip() or 'getent exit %s' % rc)
    info = ctx.facts.get('files', {})
    home_dir = info.get('/home/' + ADMIN_USER) or {}
    c.expect(home_dir.get('exists') and 'entries' in home_dir and home_dir.get('uid') == uid,
             'the home directory exists, owned by %s' % ADMIN_USER,
             'mode %s uid %s gid %s' % (home_dir.get('mode'), home_dir.get('uid'),
                                        home_dir.get('gid')))
    ssh_dir = info.get('/home/%s/.ssh' % ADMIN_USER) or {}
    c.expect(ssh_dir.get('mode') == '700' and ssh_dir.get('uid') == uid
             and ssh_dir.get('gid') == gid,
             '~/.ssh mode 0700, owner %s:%s' % (ADMIN_USER, gid),
             'mode %s uid %s gid %s' % (ssh_dir.get('mode'), ssh_dir.get('uid'),
                                        ssh_dir.get('gid')))
    keys = info.get('/home/%s/.ssh/authorized_keys' % ADMIN_USER) or {}
    c.expect(keys.get('mode') == '600' and keys.get('uid') == uid and keys.get('gid') == gid,
             '~/.ssh/authorized_keys mode 0600, owner %s:%s' % (ADMIN_USER, gid),
             'mode %s uid %s gid %s' % (keys.get('mode'), keys.get('uid'), keys.get('gid')))
    content = keys.get('content')
    c.expect(len(expected) == 2 and content == ''.join(k + '\n' for k in expected),
             'authorized_keys holds both keys, normalized (no CR, single blanks), once each',
             repr(content)[:300] if content != ''.join(k + '\n' for k in expected) else
             '%d lines' % len(expected))
    rc, out = command(ctx, 'user_status')
    c.expect(rc == 0 and out.split()[1:2] == ['L'], "%s's password is locked" % ADMIN_USER,
             out.strip())
    sudoers = info.get(SUDOERS_FILE) or {}
    rule = '%s ALL=(ALL) NOPASSWD:ALL' % ADMIN_USER
    c.expect(sudoers.get('mode') == '440' and sudoers.get('uid') == 0
             and rule in (sudoers.get('content') or '').splitlines(),
             '%s mode 0440, owner root, with "%s"' % (SUDOERS_FILE, rule),
             'mode %s uid %s content %r' % (sudoers.get('mode'), sudoers.get('uid'),
                                            sudoers.get('content')))
    rc, out = command(ctx, 'sudoers_valid')
    c.expect(rc == 0, 'visudo -cf accepts it', out.strip())
    drop_in = info.get(SSHD_DROP_IN) or {}
    rc, out = command(ctx, 'sshd_config')
    c.expect(bool(re.search(r'(?m)^\s*PasswordAuthentication\s+no\s*$',
                            drop_in.get('content') or ''))
             and 'passwordauthentication no' in out.splitlines(),
             '%s says PasswordAuthentication no, and sshd -T reads it' % SSHD_DROP_IN,
             'drop-in %r; sshd -T: %s' % (drop_in.get('content'), ', '.join(
                 l for l in out.splitlines() if l.startswith('passwordauth')) or out[-200:]))
    rc, out = command(ctx, 'ssh_login')
    c.expect(rc == 0 and 'user=%s home=/home/%s' % (ADMIN_USER, ADMIN_USER) in out
             and 'sudo=0' in out,
             'ssh %s@127.0.0.1 with the served key logs in, and sudo -n works' % ADMIN_USER,
             ' | '.join(out.strip().splitlines()) or 'exit %s' % rc)
    rc, out = command(ctx, 'ssh_methods')
    methods = re.search(r'Permission denied \(([^)]*)\)', out)
    written = [e['monotonic'] for e in ctx.journal_this_boot()
               if 'PasswordAuthentication no' in (e.get('message') or '')]
    started = command(ctx, 'ssh_service')[1].strip().partition('=')[2]
    c.expect(bool(methods) and 'password' not in methods.group(1).split(','),
             'the running sshd offers no password login',
             '%s; ssh.service active at %.3f s, drop-in written at %s s (monotonic)'
             % (methods.group(0) if methods else out.strip()[-200:],
                int(started or 0) / 1e6, '%.3f' % (written[0] / 1e6) if written else '-'))
    reloaded = re.search(r'Permission denied \(([^)]*)\)',
                         command(ctx, 'ssh_zz_methods_after_reload')[1])
    say('    info: after `systemctl reload ssh.service` the running sshd says: %s'
        % (reloaded.group(0) if reloaded else
           command(ctx, 'ssh_zz_methods_after_reload')[1].strip()[-200:]))
    check_console(ctx, c, [(r'user: %s ready' % ADMIN_USER, 'the user line')])


# Issue 13 ------------------------------------------------------------------

def media_emulator(history, image):
    """The IMDS side of the media boot: adminUsername ADMIN_USER (the media's UserName),
    disablePasswordAuthentication "false" (as for a VM made with a password) and
    compute.userData, served as the whole instance document."""
    media = image.get('media')
    if not media:
        raise TestFailure('the image has no media secrets for the media boot')
    return dict(EMULATOR, admin_username=ADMIN_USER, public_keys=media['public_keys'],
                user_data=media['user_data'], imds_body=media['imds_body'])


def file_info(ctx, path):
    return (ctx.facts.get('files') or {}).get(path) or {}


def mode_owner(info):
    return 'mode %s uid %s gid %s' % (info.get('mode'), info.get('uid'), info.get('gid'))


def hook_record(text):
    """tests/boot/azp-ready-hook's record: {VAR: {'path', 'sha256', 'stat'} or None}."""
    seen = {}
    for line in (text or '').splitlines():
        m = re.match(r'(AZURE_\w+) unset$', line)
        if m:
            seen[m.group(1)] = None
            continue
        m = re.match(r'(AZURE_\w+)=(.*)$', line)
        if m:
            seen[m.group(1)] = {'path': m.group(2)}
            continue
        m = re.match(r'(AZURE_\w+) (sha256|stat) (.*)$', line)
        if m and seen.get(m.group(1)) is not None:
            seen[m.group(1)][m.group(2)] = m.group(3).strip()
    return seen


def check_media_data(ctx, c):
    """custom-data and user-data: exact bytes, modes 0600 in a 0700 directory, root's;
    the ready.d hook was handed both paths (and saw the complete files)."""
    media = ctx.media
    directory = file_info(ctx, DATA_DIR)
    c.expect(directory.get('mode') == '700' and directory.get('uid') == 0
             and directory.get('gid') == 0 and 'entries' in directory,
             '%s is a directory, mode 0700, owner root' % DATA_DIR,
             '%s; entries %s' % (mode_owner(directory), directory.get('entries')))
    sums = {}
    for line in command(ctx, 'media_data_sha256')[1].splitlines():
        words = line.split()
        if len(words) == 2:
            sums[words[1]] = words[0]
    for path, data, what in ((CUSTOM_DATA_FILE, media['custom_data'], 'the media\'s CustomData'),
                             (USER_DATA_FILE, media['user_data'], 'IMDS compute.userData')):
        info = file_info(ctx, path)
        want = hashlib.sha256(data).hexdigest()
        c.expect(sums.get(path) == want,
                 '%s holds exactly %s, decoded (%d bytes, sha256 %s...)'
                 % (path, what, len(data), want[:12]),
                 'sha256 in the guest: %s' % (sums.get(path) or
                                              command(ctx, 'media_data_sha256')[1][-200:]))
        c.expect(info.get('mode') == '600' and info.get('uid') == 0 and info.get('gid') == 0
                 and 'link' not in info,
                 '%s mode 0600, owner root' % path, mode_owner(info))
    record = file_info(ctx, HOOK_RECORD)
    seen = hook_record(record.get('content'))
    for var, path, data in (('AZURE_CUSTOM_DATA', CUSTOM_DATA_FILE, media['custom_data']),
                            ('AZURE_USER_DATA', USER_DATA_FILE, media['user_data'])):
        got = seen.get(var) or {}
        c.expect(got.get('path') == path
                 and got.get('sha256') == hashlib.sha256(data).hexdigest()
                 and got.get('stat') == '600 0 0 %d' % len(data),
                 'the ready.d hook got %s=%s, the complete file (sha256, 0600 root, %d bytes)'
                 % (var, path, len(data)),
                 repr(record.get('content'))[:300] if record.get('exists') else
                 '%s not written: did the hook run?' % HOOK_RECORD)


def check_media_user(ctx, c):
    """The media's password: set (verifies against /etc/shadow), account usable, sudo
    with the password, sshd allows passwords (drop-in, sshd -T, a real ssh login)."""
    rc, out = command(ctx, 'user_passwd')
    c.expect(rc == 0 and out.startswith(ADMIN_USER + ':'),
             'user %s exists (IMDS adminUsername = the media\'s UserName)' % ADMIN_USER,
             out.strip() or 'getent exit %s' % rc)
    rc, out = command(ctx, 'media_password')
    right = re.search(r'(?m)^right password: (.*)$', out)
    wrong = re.search(r'(?m)^wrong password: (.*)$', out)
    c.expect(bool(right) and right.group(1).startswith('match'),
             "the media's password verifies against %s's /etc/shadow hash (perl crypt(), "
             "the password on stdin)" % ADMIN_USER, right.group(1) if right else out[-300:])
    c.expect(bool(wrong) and wrong.group(1).startswith('no match'),
             'and a wrong one does not (the check can fail)',
             wrong.group(1) if wrong else out[-300:])
    rc, out = command(ctx, 'user_status')
    c.expect(rc == 0 and out.split()[1:2] == ['P'],
             "%s's account is unlocked with a usable password (passwd -S: P)" % ADMIN_USER,
             out.strip())
    sudoers = file_info(ctx, SUDOERS_FILE)
    rule = '%s ALL=(ALL) ALL' % ADMIN_USER
    lines = [l.strip() for l in (sudoers.get('content') or '').splitlines()]
    c.expect(sudoers.get('mode') == '440' and sudoers.get('uid') == 0 and rule in lines
             and not [l for l in lines if 'NOPASSWD' in l],
             '%s mode 0440, owner root, "%s" (a password: no NOPASSWD)' % (SUDOERS_FILE, rule),
             '%s content %r' % (mode_owner(sudoers), sudoers.get('content')))
    rc, out = command(ctx, 'sudoers_valid')
    c.expect(rc == 0, 'visudo -cf accepts it', out.strip())
    drop_in = file_info(ctx, SSHD_DROP_IN)
    rc, out = command(ctx, 'sshd_config')
    c.expect(bool(re.search(r'(?m)^\s*PasswordAuthentication\s+yes\s*$',
                            drop_in.get('content') or ''))
             and not re.search(r'(?mi)^\s*PasswordAuthentication\s+no\b',
                               drop_in.get('content') or '')
             and 'passwordauthentication yes' in out.splitlines(),
             '%s says PasswordAuthentication yes (DisableSshPasswordAuthentication false), '
             'and sshd -T reads it' % SSHD_DROP_IN,
             'drop-in %r; sshd -T: %s' % (drop_in.get('content'), ', '.join(
                 l for l in out.splitlines() if l.startswith('passwordauth')) or out[-200:]))
    rc, out = command(ctx, 'media_ssh_password')
    c.expect(rc == 0 and 'user=%s home=/home/%s' % (ADMIN_USER, ADMIN_USER) in out,
             'ssh %s@127.0.0.1 with the password (no key) logs in' % ADMIN_USER,
             masked(ctx, ' | '.join(out.strip().splitlines()))[-300:])
    c.expect('sudo -n=refused' in out and 'sudo -S=0' in out,
             'there, sudo -n is refused and sudo -S with the password gives uid 0',
             masked(ctx, ' | '.join(l for l in out.splitlines() if l.startswith('sudo'))))


def strings_in(value):
    """Every string in a JSON value (keys too), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            for text in strings_in(item):
                yield text
    elif isinstance(value, list):
        for item in value:
            for text in strings_in(item):
                yield text


def check_media_secrecy(ctx, c):
    """The password is nowhere it should not be: guest (journal, data directory, /run,
    /tmp, more broadly /etc /var /root /home) and host (serial console, the facts
    port, what the emulator received, the packet capture)."""
    forms = secret_forms(ctx.media)
    c.expect(bool(ctx.media_path) and forms[-1] in read_bytes(ctx.media_path),
             'the attached disc carries the password (XML-escaped) in ovf-env.xml '
             '(so it had something to leak)')
    rc, out = command(ctx, 'media_zz_leaks')
    say('    info: guest leak scan: %s' % ' | '.join(out.strip().splitlines()))
    control = re.search(r'control: grep finds (\d+) of (\d+)', out)
    c.expect(bool(control) and control.group(1) == control.group(2) != '0',
             'guest scan control: grep -F -f finds the password in its own file',
             control.group(0) if control else out[-200:])
    journal = re.search(r'journal control: (\d+) entries', out)
    c.expect(bool(journal) and int(journal.group(1)) > 0,
             'guest scan control: the journal scan finds the unit\'s Ready line',
             journal.group(0) if journal else out[-200:])
    for place in ('journal', DATA_DIR, '/run', '/tmp', 'elsewhere'):
        m = re.search(r'(?m)^%s: (\d+) (entries|files)(.*)$' % re.escape(place), out)
        c.expect(bool(m) and m.group(1) == '0',
                 'the password is not in %s' % {
                     'journal': 'the journal (all fields of all entries)',
                     'elsewhere': '/etc, /var, /root or /home'}.get(place, place),
                 m.group(0) if m else out[-300:])
    export = re.search(r'(?m)^journal export: (\S+) matching lines', out)
    c.expect(bool(export) and export.group(1) == '0',
             'journalctl -o export | grep -F -f: no line', export.group(0) if export else '')
    rc, out = command(ctx, 'media_zzz_forget')
    c.expect(rc == 0 and out.strip() == 'removed',
             'the guest deleted its copy of the password afterwards', out.strip())
    console = read_bytes(os.path.join(ctx.rundir, 'console.log'))
    c.expect(bool(console) and not [f for f in forms if f in console],
             'the password is not on the serial console (%d bytes)' % len(console))
    places = {'the facts port': read_bytes(os.path.join(ctx.rundir, 'facts.log')),
              'the QEMU log': read_bytes(os.path.join(ctx.rundir, 'qemu.log')),
              'the packet capture': read_bytes(os.path.join(ctx.rundir, 'net.pcap'))}
    sent = []
    for r in ctx.requests:
        sent += [r.get('path') or '', r.get('body') or ''] + list(r['headers'].values())
    places['the requests the emulator received'] = '\n'.join(sent).encode('utf-8', 'replace')
    # the facts port carries JSON: " and \ of the password are escaped there
    places['the facts port'] += '\n'.join(strings_in(ctx.facts)).encode('utf-8', 'replace')
    places['the health reports'] = '\n'.join(str(r.get('description') or '')
                                             for r in ctx.reports).encode('utf-8', 'replace')
    leaked = [name for name, data in sorted(places.items()) if [f for f in forms if f in data]]
    c.expect(not leaked, 'nor in the facts port, the QEMU log, the emulator\'s requests or '
             'health reports, the packet capture', 'found in: %s' % ', '.join(leaked))


def check_media(ctx, c):
    """Issue 13: provisioning from the media (ovf-env.xml on a UDF cdrom) and IMDS."""
    check_provisioned(ctx, c)
    media = ctx.media
    devices = command(ctx, 'media_devices')[1]
    say('    info: in the guest: %s' % ' | '.join(devices.strip().splitlines()))
    line = next((l for l in ctx.step_lines()
                 if 'media: %s' % MEDIA_DEVICE in l and 'password (set)' in l), None)
    c.expect(bool(line), 'serial console: the media was read from %s, with a password'
             % MEDIA_DEVICE, masked(ctx, line) if line else 'media lines: %s' % masked(
                 ctx, '; '.join(l for l in ctx.step_lines() if 'media' in l))[:400])
    size = re.search(r'custom data (\d+) bytes', line or '')
    if size:
        c.expect(int(size.group(1)) == len(media['custom_data']),
                 'the media line counts the custom data: %d bytes' % len(media['custom_data']),
                 size.group(0))
    mounts = command(ctx, 'media_mounts')[1].strip()
    c.expect(not mounts, 'the media is unmounted afterwards (no udf/iso9660/sr mount)',
             mounts)
    check_media_data(ctx, c)
    check_media_user(ctx, c)
    check_media_secrecy(ctx, c)
    check_console(ctx, c, [(r'user: %s ready' % ADMIN_USER, 'the user line')])
    check_host_keys(ctx, c, [("the image's", (ctx.image or {}).get('host_keys') or [])])
    check_media_late(ctx, c)


def console_time(ctx, pattern):
    """The kernel timestamp (s) of the first console line matching pattern, or None."""
    found = re.search(r'\[\s*(\d+\.\d+)\] (?:%s)' % pattern, ctx.vm.console)
    return float(found.group(1)) if found else None


def journal_time(ctx, text):
    """The monotonic time (s) of the unit's first journal line of this boot holding
    text, or None."""
    times = [e['monotonic'] / 1e6 for e in ctx.journal_this_boot()
             if text in (e.get('message') or '')]
    return min(times) if times else None


def check_media_late(ctx, c):
    """Issue 20 (17): the initramfs had no CD-ROM driver, the kernel attached sr0 after
    the unit's first search (the driver held back: hold_back_cdrom_driver), and the
    unit waited for udev and read the media."""
    rc, initramfs = command(ctx, 'media_initramfs')
    c.expect(rc == 0 and re.match(r'[1-9]\d* files$', initramfs.strip()),
             'the initramfs booted has no CD-ROM driver (ata_piix, sr_mod)',
             ' | '.join(initramfs.strip().splitlines()))
    started = ctx.mono(UNIT, 'InactiveExitTimestampMonotonic') / 1e6 or None
    searched = journal_time(ctx, 'IMDS: vm')       # the media step starts right after it
    released = console_time(ctx, 'azp-boot-test: sr_mod held back')
    attached = console_time(ctx, r'sr \d+:\d+:\d+:\d+: \[sr0\]|.*Attached scsi CD-ROM sr0')
    waited = journal_time(ctx, 'waited for udev to settle')
    read = journal_time(ctx, 'media: %s: ovf-env.xml read' % MEDIA_DEVICE)
    shown = lambda t: '-' if t is None else '%.2f s' % t
    say('    info: unit started %s, its IMDS line (then the search) %s, sr_mod let go %s, '
        'sr0 attached %s, "waited for udev" %s, media read %s (guest clock)'
        % tuple(shown(t) for t in (started, searched, released, attached, waited, read)))
    c.expect(None not in (searched, attached) and attached > searched,
             'the kernel attached sr0 after the unit began its search',
             'search at %s, sr0 at %s' % (shown(searched), shown(attached)))
    c.expect(None not in (waited, attached) and attached <= waited,
             'the unit found no media at first and waited for udev until sr0 was there',
             'waited line at %s, sr0 at %s' % (shown(waited), shown(attached)))
    c.expect(None not in (read, attached) and read >= attached,
             'then it read the media from %s' % MEDIA_DEVICE, 'at %s' % shown(read))


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
    check_record(ctx, c, VM_ID)       # issue 14: the same VM (SMBIOS UUID) as the record
    names = [m['hostname'] for m in dhcp_messages(ctx.vm.packets)
             if m['from_guest'] and m['type'] in ('DISCOVER', 'REQUEST')]
    c.expect(bool(names) and set(names) == set([COMPUTER_NAME]),
             'from the start of this boot DHCP option 12 carries %s' % COMPUTER_NAME,
             'option 12: %s' % names)


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
    check_record(ctx, c, VM_ID, result='failed')      # issue 14
    names = [m['hostname'] for m in dhcp_messages(ctx.vm.packets)
             if m['from_guest'] and m['type'] in ('DISCOVER', 'REQUEST')]
    c.expect(bool(names) and set(names) == set([IMAGE_HOSTNAME]),
             'DHCP option 12 carried only the image name %s (nothing published)'
             % IMAGE_HOSTNAME, 'option 12: %s' % names)


def check_slow(ctx, c):
    check_common(ctx, c)
    check_ready(ctx, c)
    up = ctx.emulator['wireserver_up_after']
    wire = [r for r in ctx.unit_requests if r['server'] == 'wireserver']
    offset = capture_offset(ctx)
    syns = [t + offset for t in tcp_syns_from_guest(ctx.vm.packets, WIRESERVER_IP, 80)]
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
    asks = [m for m in dhcp_messages(ctx.vm.packets)
            if m['from_guest'] and m['type'] in ('DISCOVER', 'REQUEST')]
    c.expect(bool(asks) and asks[-1]['hostname'] == COMPUTER_NAME,
             'the last name the guest sent to DHCP is %s' % COMPUTER_NAME,
             'option 12: %s' % [m['hostname'] for m in asks])


def check_no_dbus(ctx, c):
    check_common(ctx, c)
    dbus = ctx.unit('dbus.service')
    c.expect(dbus.get('LoadState') == 'masked' and dbus.get('ActiveState') != 'active',
             'dbus is masked and not running',
             'LoadState=%s ActiveState=%s' % (dbus.get('LoadState'), dbus.get('ActiveState')))
    check_ready(ctx, c)
    check_hostname(ctx, c, COMPUTER_NAME)
    c.expect(ctx.mono('systemd-hostnamed.service', 'ActiveEnterTimestampMonotonic') == 0,
             'systemd-hostnamed never ran')
    check_unit_succeeded_and_disabled(ctx, c)
    check_console(ctx, c, [(r'hostname\b.*\b%s\b' % re.escape(COMPUTER_NAME),
                            'the hostname line')])
    # networkctl needs the bus: publishing may fail here, but only as a warning
    sent = [l for l in ctx.step_lines() if 'sent to DHCP by' in l]
    asks = [m for m in dhcp_messages(ctx.vm.packets)
            if m['from_guest'] and m['type'] in ('DISCOVER', 'REQUEST')]
    if sent:
        c.expect(bool(asks) and asks[-1]['hostname'] == COMPUTER_NAME,
                 'published without dbus: the last name on the wire is %s' % COMPUTER_NAME,
                 '%s; option 12: %s' % (sent[0], [m['hostname'] for m in asks]))
    else:
        warned = [l for l in ctx.step_lines() if re.search(r'warning: .*not published', l)]
        c.expect(bool(warned), 'not published without dbus: a warning, and still Ready',
                 (warned or ['no publish line: %s' % ctx.step_lines()])[0])
        say('    info: option 12 on the wire: %s' % [m['hostname'] for m in asks])


# Issue 14 ------------------------------------------------------------------

FINGERPRINT_BLOCK = re.compile(r'-----BEGIN SSH HOST KEY FINGERPRINTS-----\n(.*?)'
                               r'-----END SSH HOST KEY FINGERPRINTS-----', re.S)


def console_fingerprint_blocks(ctx):
    """The fingerprint blocks the provisioner printed on the serial console, each as
    fingerprint_set() of its lines."""
    return [fingerprint_set(b) for b in
            FINGERPRINT_BLOCK.findall(ctx.vm.console.replace('\r', ''))]


def hashes(fingerprints):
    return set(f.split()[1] for f in fingerprints)


def check_host_keys(ctx, c, others):
    """SSH host keys: new ones, printed on the console exactly as on disk, served by a
    running sshd.  others: [(what, fingerprints)] that must share no key with them."""
    disk = fingerprint_set(command(ctx, 'host_keys_disk')[1])
    rc, served_out = command(ctx, 'host_keys_served')
    served = fingerprint_set(served_out)
    blocks = console_fingerprint_blocks(ctx)
    c.expect(len(blocks) == 1 and bool(disk) and blocks[0] == disk,
             'serial console: one fingerprint block, the same keys as /etc/ssh/*.pub on disk',
             'console %s; disk %s' % (blocks, disk))
    active = re.search(r'ssh\.service (\S+) after (\d+) s', served_out)
    # OpenSSH's default HostKey list has no DSA: a DSA key file (bullseye's ssh-keygen
    # -A still makes one) is on disk and on the console, but never served
    unserved = sorted(set(disk) - set(served))
    c.expect(bool(active) and active.group(1) == 'active' and bool(served)
             and set(served) <= set(disk) and all(k.endswith('(DSA)') for k in unserved),
             'ssh.service is active and serves the keys on disk (ssh-keyscan 127.0.0.1)',
             '%s; served %s%s' % (active.group(0) if active else served_out.strip()[-200:],
                                  served, '; on disk, not served (no DSA in sshd\'s default '
                                  'HostKey list): %s' % unserved if unserved else ''))
    for what, keys in others:
        c.expect(bool(disk) and not hashes(disk) & hashes(keys),
                 'the host keys are not %s' % what,
                 '%d keys, %d of them %s' % (len(disk), len(hashes(disk) & hashes(keys)), what))
    say('    info: host keys %s' % ', '.join(disk))
    return disk


def state_record(ctx):
    try:
        return json.loads(ctx.file_text(STATE_FILE) or 'null')
    except ValueError:
        return None


def check_record(ctx, c, vm_id, result='provisioned', user=None):
    """The record (state.json) and --status on this VM (-uuid = its vmId, Gen1 order)."""
    state = state_record(ctx) or {}
    info = file_info(ctx, STATE_FILE)
    c.expect(state.get('result') == result and state.get('vm_id') == vm_id
             and info.get('mode') == '600' and info.get('uid') == 0
             and (user is None or state.get('admin_user_created') == user),
             '%s: result %s, vmId %s%s, mode 0600 root' % (
                 STATE_FILE, result, vm_id, ', admin user %s made by us' % user if user else ''),
             '%s; %s' % (mode_owner(info), dict((k, state.get(k)) for k in (
                 'result', 'vm_id', 'hostname', 'admin_user_created', 'ssh_host_keys')))
             if state else 'no record: %s' % info)
    rc, out = command(ctx, 'status')
    lines = out.strip().splitlines()
    if result == 'provisioned':
        ok = rc == 0 and bool(lines) and lines[0].startswith('provisioned: VM %s' % vm_id) \
            and "this VM: %s: the record is this VM's" % vm_id in out
        what = '--status exits 0: provisioned, VM %s, the record is this VM\'s (DMI)' % vm_id
    else:
        ok = rc == 1 and bool(lines) and lines[0].startswith('FAILED: VM %s' % vm_id)
        what = '--status exits 1: FAILED, VM %s' % vm_id
    c.expect(ok, what, 'exit %s: %s' % (rc, ' | '.join(lines)[:400]))


def debugfs(disk, request):
    """One read-only debugfs request on an ext4 image (no mount): its output."""
    status, out = run_status(['debugfs', '-R', request, disk])
    return '\n'.join(l for l in out.splitlines() if not l.startswith('debugfs '))


def debugfs_names(disk, directory):
    """Names in directory of the image (ls -p: /inode/mode/uid/gid/name/size/)."""
    names = []
    for line in debugfs(disk, 'ls -p ' + directory).splitlines():
        fields = line.strip().split('/')
        if len(fields) >= 7 and fields[5] not in ('.', '..'):
            names.append(fields[5])
    return sorted(names)


def captured_disk(disk):
    """What the captured disk holds, read from this machine without booting it."""
    wants = 'etc/systemd/system/multi-user.target.wants'
    return {'ssh': [n for n in debugfs_names(disk, '/etc/ssh') if n.startswith('ssh_host_')],
            'sshd': bool(debugfs_names(disk, '/etc/ssh')),
            'machine_id': debugfs(disk, 'cat /etc/machine-id'),
            'users': [l.split(':')[0] for l in debugfs(disk, 'cat /etc/passwd').splitlines()
                      if ':' in l],
            'data': debugfs_names(disk, DATA_DIR),
            'sudoers': debugfs_names(disk, '/etc/sudoers.d'),
            'wants': debugfs_names(disk, '/' + wants),
            'home': debugfs_names(disk, '/home')}


def capture_emulator(name, vm_id):
    def emulator(history, image):
        return dict(EMULATOR, computer_name=name, vm_name=name, vm_id=vm_id,
                    admin_username=ADMIN_USER, public_keys=[SECOND_KEY])
    emulator.__doc__ = 'vmId %s, computerName %s, adminUsername %s' % (vm_id, name, ADMIN_USER)
    return emulator


def check_capture_a(ctx, c):
    """Boot 1 of capture-again: VM A provisions (new host keys: the image's are the
    ones every VM of it would share), then --deprovision --user makes it an image."""
    check_common(ctx, c)
    check_ready(ctx, c)
    check_hostname(ctx, c, COMPUTER_NAME_A)
    check_unit_succeeded_and_disabled(ctx, c)
    image_keys = (ctx.image or {}).get('host_keys') or []
    c.expect(bool(image_keys), 'the image ships SSH host keys (made when openssh-server '
             'was installed)', ', '.join(image_keys))
    check_host_keys(ctx, c, [("the image's", image_keys)])
    check_record(ctx, c, VM_ID_A, user=ADMIN_USER)
    rc, out = command(ctx, 'user_passwd')
    c.expect(rc == 0 and out.startswith(ADMIN_USER + ':'),
             'VM A: %s was made (--provision-user)' % ADMIN_USER, out.strip())
    machine_id = (ctx.file_text('/etc/machine-id') or '').strip()
    c.expect(bool(re.match(r'^[0-9a-f]{32}$', machine_id)), 'VM A has a machine id', machine_id)
    # --deprovision --user inside the guest, after all of the above was collected
    rc, out = command(ctx, 'zz_deprovision')
    for line in out.strip().splitlines():
        say('    | ' + line)
    c.expect(rc == 0 and 'deprovisioned' in out,
             'azure-provisioning --deprovision --user exits 0 in VM A', 'exit %s' % rc)
    keys = command(ctx, 'zzz_after_keys')[1].split()
    c.expect(not keys, 'after it: no SSH host key in /etc/ssh', ' '.join(keys))
    size = command(ctx, 'zzz_after_machine_id')[1].strip()
    c.expect(size == '0', 'after it: /etc/machine-id is empty', '%s bytes' % size)
    rc, out = command(ctx, 'zzz_after_user')
    c.expect(rc == 2 and not out.strip(), 'after it: %s is gone' % ADMIN_USER,
             'getent exit %s %s' % (rc, out.strip()))
    rc, out = command(ctx, 'zzzz_status_after')
    c.expect(rc == 1 and out.startswith('not provisioned'),
             'after it: --status exits 1, not provisioned', 'exit %s: %s'
             % (rc, ' | '.join(out.strip().splitlines())[:300]))
    # the captured disk, read from this machine
    disk = captured_disk(ctx.disk)
    say('    info: the captured disk (debugfs): %s' % json.dumps(disk, sort_keys=True)[:600])
    c.expect(disk['sshd'] and not disk['ssh'], 'captured disk: /etc/ssh without host keys',
             ' '.join(disk['ssh']))
    c.expect(disk['machine_id'].strip() == '', 'captured disk: /etc/machine-id empty',
             repr(disk['machine_id'][:40]))
    c.expect(ADMIN_USER not in disk['users'] and ADMIN_USER not in disk['home']
             and 'azure-provisioning' not in disk['sudoers'],
             'captured disk: no %s in /etc/passwd, no /home/%s, no sudoers drop-in'
             % (ADMIN_USER, ADMIN_USER), 'home %s sudoers.d %s' % (disk['home'],
                                                                   disk['sudoers']))
    c.expect(not set(disk['data']) & set(['state.json', 'custom-data', 'user-data']),
             'captured disk: no record or data in %s' % DATA_DIR, ' '.join(disk['data']))
    c.expect(UNIT in disk['wants'], 'captured disk: the unit is enabled again',
             'multi-user.target.wants: %s' % ' '.join(disk['wants']))


def earlier_facts(ctx, name):
    """The facts of an earlier boot of this suite (a VmRun's)."""
    for vm in ctx.history:
        if getattr(vm, 'name', None) == name and getattr(vm, 'suite', None) == ctx.suite:
            return vm.facts or {}
    return {}


def check_capture_b(ctx, c):
    """Boot 2 of capture-again: the captured disk as VM B (another vmId, name, UUID)."""
    check_common(ctx, c)
    check_ready(ctx, c)
    check_hostname(ctx, c, COMPUTER_NAME_B)
    check_unit_succeeded_and_disabled(ctx, c)
    a = earlier_facts(ctx, 'capture-a')
    a_keys = fingerprint_set(((a.get('commands') or {}).get('host_keys_disk') or {})
                             .get('output'))
    c.expect(bool(a_keys), "VM A's host keys are known (capture-a's facts)")
    # (b): the image as captured has no host keys: sshd could not start at boot
    check_host_keys(ctx, c, [("VM A's", a_keys),
                             ("the image's", (ctx.image or {}).get('host_keys') or [])])
    a_id = ((a.get('files') or {}).get('/etc/machine-id') or {}).get('content', '').strip()
    b_id = (ctx.file_text('/etc/machine-id') or '').strip()
    c.expect(bool(re.match(r'^[0-9a-f]{32}$', b_id)) and b_id != a_id,
             "VM B has a machine id of its own, not VM A's", 'A %s, B %s' % (a_id, b_id))
    check_record(ctx, c, VM_ID_B, user=ADMIN_USER)
    rc, out = command(ctx, 'user_passwd')
    c.expect(rc == 0 and out.startswith(ADMIN_USER + ':')
             and file_info(ctx, SUDOERS_FILE).get('exists'),
             '%s made again by VM B, with its sudoers drop-in' % ADMIN_USER, out.strip())
    check_console(ctx, c, [(r'user: %s ready' % ADMIN_USER, 'the user line'),
                           (r'ssh host keys: \d+ new', 'new host keys line')])
    rc, out = command(ctx, 'zz_deprovision')
    c.expect('not deprovisioned' in out, 'VM B was not deprovisioned (the checker\'s guard)',
             out.strip()[-200:])


def slow_emulator(history, image):
    """The WireServer comes up SLOW_MARGIN s after the unit's first request was seen in
    the boots before (so it surely refuses the unit's first attempts however fast or
    slow this machine boots), or after SLOW_WIRESERVER_UP s when there were none."""
    seen = [vm.first_request_after for vm in history if vm.first_request_after]
    up = max(seen) + SLOW_MARGIN if seen else SLOW_WIRESERVER_UP
    return dict(EMULATOR, wireserver_up_after=round(up, 1))


# Issue 20: power cuts -------------------------------------------------------

COMMIT_WAIT = 6.0       # s from a frozen moment to the cut: ext4 commits its journal every
                        # 5 s, so what the frozen step had made is on the disk then
CUT_POINT = re.compile(rb'AZP-POWERCUT-POINT (\S+) ([^\r\n]*)')


class Cut(object):
    """A moment of the first boot to cut the power at.  request: (kind, method, path,
    headers) -> True for the emulator request that is the moment (the cut is made as
    it arrives); point: the name azp-powercut announces on the console when a step is
    frozen at the moment (the cut is made wait s later); emulator: extra FakeAzure
    keywords of the first boot (an IMDS answer held back)."""

    def __init__(self, name, what, request=None, point=None, wait=0.0, emulator=None):
        self.name = name
        self.what = what
        self.request = request
        self.point = point
        self.wait = wait
        self.emulator = emulator or {}


def unit_imds_request(kind, method, path, headers):
    return kind == 'imds' and headers.get('user-agent') != PROBE_AGENT


def health_post(kind, method, path, headers):
    return kind == 'wireserver' and method == 'POST' and 'comp=health' in path


CUTS = [
    Cut('imds', 'while the unit waits for IMDS (the emulator holds its answer)',
        request=unit_imds_request, emulator={'imds_faults': [('delay', BOOT_TIME_LIMIT)]}),
    Cut('useradd', 'during user creation: useradd frozen once /etc/passwd names %s, its '
        'locks held' % ADMIN_USER, point='useradd', wait=COMMIT_WAIT),
    Cut('keygen', 'during host-key generation: ssh-keygen -A frozen after its first key',
        point='keygen', wait=COMMIT_WAIT),
    Cut('hook', 'during a ready.d hook (it announces itself and sleeps)', point='hook',
        wait=COMMIT_WAIT),
    Cut('ready', 'as the emulator receives the Ready POST (it accepts it; the guest never '
        'hears back, the unit has not disabled itself)', request=health_post),
]


def select_cuts(names):
    by_name = dict((c.name, c) for c in CUTS)
    if not names:
        return list(CUTS)
    for name in names.split(','):
        if name.strip() not in by_name:
            raise SystemExit('boot_test.py: unknown cut %r (known: %s)'
                             % (name, ', '.join(by_name)))
    wanted = set(n.strip() for n in names.split(','))
    return [c for c in CUTS if c.name in wanted]


class PowerCut(object):
    """SIGKILL to QEMU (its whole process group, at once) at a Cut's moment: the guest
    loses what it had not written to its disk, as in a power cut.  on_request is the
    emulator's hook (request cuts); watch() is shown the console (point cuts)."""

    def __init__(self, cut):
        self.cut = cut
        self.proc = None
        self.started = None
        self.at = None              # time.monotonic() of the SIGKILL
        self.why = None
        self.point_at = None        # when the point line was seen on the console
        self.point = None           # its text
        self.missed = None          # azp-powercut said the moment went by
        self.lock = threading.Lock()

    def arm(self, proc, started):
        self.proc, self.started = proc, started

    def pull(self, why):
        with self.lock:
            if self.at is not None or self.proc is None or self.proc.poll() is not None:
                return
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.at, self.why = time.monotonic(), why

    def on_request(self, kind, method, path, headers):
        if self.cut.request is not None and self.cut.request(kind, method, path, headers):
            self.pull('%s %s %s arrived' % (kind, method, path.split('?')[0]))

    def watch(self, console, now):
        """True once the power has been cut."""
        if self.cut.point is not None and self.point_at is None:
            for name, text in CUT_POINT.findall(console):
                if name.decode() == self.cut.point:
                    text = text.decode('utf-8', 'replace').strip()
                    if text.startswith('MISSED'):
                        self.missed = text
                    else:
                        self.point_at, self.point = now, text
        if self.point_at is not None and now - self.point_at >= self.cut.wait:
            self.pull('%.1f s after the console said: %s' % (now - self.point_at, self.point))
        return self.at is not None

    def cut_after(self):
        return None if self.at is None else self.at - self.started


def cut_emulator(fake, kwargs, power_cut):
    az = fake.FakeAzure(**dict(kwargs, on_request=power_cut.on_request if power_cut else None))
    return az


def look_facts(ctx, before):
    """azp-powercut look: before the unit ran (its unit's file) or after (the checker)."""
    if before:
        text = ctx.file_text(POWERCUT_LOOK)
    else:
        text = command(ctx, 'powercut_look')[1]
    try:
        return json.loads(text or '')
    except ValueError:
        return None


def look_host_keys(look, image_keys):
    """'image's 3' / 'new 3' / 'broken ...' of a look's host keys."""
    keys = look.get('host_keys') or {}
    fps = fingerprint_set('\n'.join(k.get('fingerprint') or '' for k in keys.values()))
    broken = sorted(n for n, k in keys.items() if not k.get('pair'))
    ours = 'the image\'s' if fps and hashes(fps) <= hashes(image_keys) else (
        'new' if fps and not hashes(fps) & hashes(image_keys) else 'mixed')
    return '%d %s%s' % (len(keys), ours, ', not a pair: %s' % ' '.join(
        '%s (%s)' % (n, 'private' if keys[n].get('private') else 'public only')
        for n in broken) if broken else '')


def describe_left(look, image_keys):
    """One line: what the disk held when the second boot began."""
    if not look:
        return 'unknown (no record of the look before the unit)'
    users = look.get('user_lines') or {}
    rec = look.get('record') or {}
    return '; '.join([
        'alice in passwd/shadow/group/gshadow: %s' % '/'.join(
            str(users.get(f, '?')) for f in ('passwd', 'shadow', 'group', 'gshadow')),
        'home %s' % ('none' if look.get('home') is None else
                     '[%s] .ssh [%s]' % (' '.join(look['home']),
                                         ' '.join(look.get('ssh_dir') or []))),
        'left-overs: %s' % (' '.join(look.get('left_over') or []) or 'none'),
        'host keys: %s' % look_host_keys(look, image_keys),
        'sudoers %s, sshd drop-in %s' % ('yes' if look.get('sudoers') else 'no',
                                        'yes' if look.get('sshd_drop_in') else 'no'),
        '%s: %s' % (DATA_DIR, ' '.join(look.get('data_dir') or []) or 'none'),
        'record: %s' % ('none' if not rec.get('exists') else 'INVALID' if 'invalid' in rec
                        else '%s vm %s' % (rec['json'].get('result'), rec['json'].get('vm_id'))),
        'unit %s' % ('enabled' if look.get('unit_enabled') else 'DISABLED')])


def describe_dealt(ctx, image_keys):
    lines = ctx.step_lines()
    user = ('useradd %s' % ADMIN_USER if any('user: created' in l for l in lines)
            else 'no useradd (%s was there)' % ADMIN_USER)
    keys = [re.sub(r'.*ssh host keys: ', '', l) for l in lines
            if re.search(r'ssh host keys: (\d+ new|kept|removed)', l)]
    return 'user: %s; host keys: %s; Ready: %s' % (
        user, '; '.join(keys) or 'no host key line',
        'accepted' if ctx.az.ready_accepted() else 'NOT accepted')


def powercut_names():
    """tests/boot/azp-powercut's LEFT_OVER names and WRITTEN_DIRS (its globals)."""
    import runpy
    return runpy.run_path(os.path.join(BOOT_DIR, 'azp-powercut'), run_name='azp_powercut')


def disk_after_cut(disk, scratch):
    """What the cut left on the disk, as the next boot's kernel finds it (before
    systemd-tmpfiles and the rest of the boot): a throwaway copy, its journal replayed
    (e2fsck -E journal_only), read with debugfs.  Returns (left-over paths, the admin
    user's line in /etc/passwd or None)."""
    copy = os.path.join(scratch, 'after-cut.ext4')
    copy_disk(disk, copy)
    try:
        run_status(['e2fsck', '-E', 'journal_only', '-y', copy])
        guest = powercut_names()
        left = ['%s/%s' % (d, n) for d in guest['WRITTEN_DIRS'] for n in debugfs_names(copy, d)
                if guest['LEFT_OVER'].match(n)]
        passwd = [l for l in debugfs(copy, 'cat /etc/passwd').splitlines()
                  if l.startswith(ADMIN_USER + ':')]
    finally:
        os.unlink(copy)
    return left, passwd[0] if passwd else None


def debugfs_dump(disk, path, scratch):
    """The bytes of path in an ext4 image (debugfs, no mount), None when missing."""
    out = os.path.join(scratch, 'debugfs-dump')
    if os.path.exists(out):
        os.unlink(out)
    debugfs(disk, 'dump %s %s' % (path, out))
    data = read_bytes(out) if os.path.exists(out) else None
    if os.path.exists(out):
        os.unlink(out)
    return data


def new_lines(output, baseline):
    known = set((baseline or {}).get('output', '').splitlines())
    return [l for l in (output or '').splitlines() if l not in known]


def check_powercut(ctx, c, cut, first, first_az, vm_id):
    """After the second boot of a disk whose first boot lost its power at cut."""
    media = ctx.media
    image_keys = (ctx.image or {}).get('host_keys') or []
    c.expect(first.cut_after is not None,
             'the power was cut %s' % cut.what,
             'at %.1f s: %s' % (first.cut_after, first.why) if first.cut_after is not None
             else 'not cut: %s%s' % (first.outcome, '; ' + first.missed if first.missed else ''))
    if cut.name == 'ready':
        c.expect(first_az.ready_accepted(), 'the emulator accepted that first Ready',
                 '%d health reports' % len(first_az.health_reports))
    else:
        c.expect(not first_az.health_reports, 'no health report before the cut',
                 '%d health reports' % len(first_az.health_reports))
    check_common(ctx, c)
    check_ready(ctx, c)
    check_unit_succeeded_and_disabled(ctx, c)
    after = look_facts(ctx, False) or {}
    c.expect(bool(after), 'the look after the unit (azp-powercut look) reported',
             '' if after else command(ctx, 'powercut_look')[1][-300:])
    users = after.get('user_lines') or {}
    c.expect(after.get('admin_users') == [ADMIN_USER]
             and all(users.get(f) == 1 for f in ('passwd', 'shadow', 'group', 'gshadow')),
             'exactly one admin user, %s, once in passwd, shadow, group and gshadow'
             % ADMIN_USER, 'users uid 1000-59999: %s; lines: %s' % (after.get('admin_users'),
                                                                   users))
    rc, out = command(ctx, 'media_password')
    right = re.search(r'(?m)^right password: (.*)$', out)
    wrong = re.search(r'(?m)^wrong password: (.*)$', out)
    c.expect(bool(right) and right.group(1).startswith('match') and bool(wrong)
             and wrong.group(1).startswith('no match'),
             "the media's password verifies against %s's /etc/shadow hash (a wrong one "
             "does not)" % ADMIN_USER, out.strip()[-200:])
    key = ' '.join(media['public_keys'][0]['keyData'].split()[:2])
    present = [' '.join(l.split()[:2]) for l in (after.get('authorized_keys') or '').splitlines()]
    c.expect(present.count(key) == 1, "~/.ssh/authorized_keys holds the served key, once",
             '%d key lines' % len(present))
    baseline = json.loads(ctx.file_text(POWERCUT_BASELINE) or '{}')
    for tool in ('pwck', 'grpck'):
        result = after.get(tool) or {}
        extra = new_lines(result.get('output'), baseline.get(tool))
        c.expect(bool(result) and result.get('rc') == (baseline.get(tool) or {}).get('rc')
                 and not extra,
                 '%s -r: nothing beyond what it says of the image itself' % tool,
                 'exit %s (image: %s); new: %s' % (result.get('rc'), (baseline.get(tool) or {})
                                                   .get('rc'), ' | '.join(extra)[:300]))
    c.expect(not after.get('left_over') and 'left_over' in after,
             'no lock or temporary file left in %s' % ', '.join(
                 ['/etc', '/etc/ssh', '/etc/sudoers.d', '/etc/ssh/sshd_config.d', DATA_DIR,
                  '~' + ADMIN_USER, '~%s/.ssh' % ADMIN_USER]),
             ' '.join(after.get('left_over') or []))
    keys = after.get('host_keys') or {}
    c.expect(bool(keys) and all(k.get('pair') for k in keys.values()),
             'every host key is a complete pair (ssh-keygen -y of the private = the .pub)',
             '; '.join('%s: %s' % (n, 'pair' if k.get('pair') else 'derived %r, .pub %r'
                                   % (k.get('derived'), k.get('public_words')))
                       for n, k in sorted(keys.items()))[:400])
    disk_keys = fingerprint_set(command(ctx, 'host_keys_disk')[1])
    rc, served_out = command(ctx, 'host_keys_served')
    served = fingerprint_set(served_out)
    active = re.search(r'ssh\.service (\S+) after (\d+) s', served_out)
    c.expect(bool(active) and active.group(1) == 'active' and bool(served)
             and set(served) <= set(disk_keys),
             'ssh.service is active and serves the keys on disk',
             '%s; served %d of %d' % (active.group(0) if active else served_out[-200:],
                                      len(served), len(disk_keys)))
    c.expect(bool(disk_keys) and not hashes(disk_keys) & hashes(image_keys),
             "the host keys are not the image's", '%d keys' % len(disk_keys))
    want = hashlib.sha256(media['custom_data']).hexdigest()
    got = after.get('custom_data') or {}
    c.expect(got.get('sha256') == want and got.get('size') == len(media['custom_data'])
             and got.get('mode') == '600',
             'custom-data holds exactly the media\'s CustomData (%d bytes), 0600'
             % len(media['custom_data']), str(got)[:200])
    record = (after.get('record') or {}).get('json') or {}
    c.expect(record.get('result') == 'provisioned' and record.get('vm_id') == vm_id,
             'state.json is valid JSON: provisioned, vmId %s' % vm_id,
             str(after.get('record'))[:300])
    c.expect(record.get('admin_user_created') == ADMIN_USER,
             'state.json says %s was made by us (what --deprovision --user removes)'
             % ADMIN_USER, 'admin_user_created %r' % record.get('admin_user_created'))
    # the disk itself, read from this machine after the second boot powered off
    wants = debugfs_names(ctx.disk, '/etc/systemd/system/multi-user.target.wants')
    c.expect(bool(wants) and UNIT not in wants,
             'on the disk (debugfs): the unit\'s enable link is gone', ' '.join(wants))
    data = debugfs_dump(ctx.disk, CUSTOM_DATA_FILE, ctx.rundir)
    c.expect(data == media['custom_data'], 'on the disk (debugfs): custom-data, byte for byte',
             '%s bytes' % (len(data) if data is not None else 'no file'))
    try:
        state = json.loads((debugfs_dump(ctx.disk, STATE_FILE, ctx.rundir) or b'').decode())
    except ValueError as exc:
        state = {'error': str(exc)}
    c.expect(isinstance(state, dict) and state.get('vm_id') == vm_id,
             'on the disk (debugfs): state.json parses and names vmId %s' % vm_id,
             str(state)[:200])


def boot_until_userspace(files, disk, accel, kwargs, fake, rundir, time_limit, media, uuid,
                         cut=None, fresh_from=None):
    """boot_vm, once more after a hang in early boot (issue 11).  fresh_from: copy the
    disk afresh from there for the second attempt (a first boot); else the same disk
    boots again (a hang before userspace left it as it was).  Returns (vm, az)."""
    hung = []
    for attempt in (1, 2):
        os.makedirs(rundir, exist_ok=True)
        if fresh_from:
            copy_disk(fresh_from, disk)
        power_cut = PowerCut(cut) if cut else None
        with cut_emulator(fake, kwargs, power_cut) as az:
            vm = boot_vm(files, disk, accel, az, rundir, time_limit, media=media, uuid=uuid,
                         cut=power_cut)
        vm.why = power_cut.why if power_cut else None
        vm.missed = power_cut.missed if power_cut else None
        vm.hung_before = list(hung)
        if vm.early_hang is None:
            return vm, az
        hung.append(vm)
        say('    HANG in early boot (attempt %d): %s' % (attempt, describe_hang(vm.early_hang)))
        if attempt == 1:
            os.rename(rundir, rundir + '-hung')
    return vm, az


def run_powercut(boot, images, disks, history, fake, accel, workdir, suite=None):
    """Issue 20: for each cut, a fresh copy of the image boots with the provisioning
    media until the power is cut at that moment; the SAME disk (no copy) then boots
    again, and check_powercut judges it.  Returns (Checks of all cuts, a VmRun summing
    the boots)."""
    image = images[(suite, boot.image) if suite else boot.image]
    scenario = os.path.join(workdir, 'boot-%s%s' % (suite + '-' if suite else '', boot.name))
    os.makedirs(scenario)
    media = build_boot_media(fake, image, scenario)
    vm_id = json.loads(image['media']['imds_body'])['compute']['vmId']
    kwargs = dict(media_emulator(history, image), vm_id=vm_id)
    uuid = gen1_uuid(vm_id)
    total, summary, c = VmRun(), [], Checks()
    total.duration, seconds = 0.0, []
    for cut in _CUTS or CUTS:
        say('')
        say('  -- cut %s: %s' % (cut.name, cut.what))
        rundir = os.path.join(scenario, cut.name)
        disk = os.path.join(scenario, cut.name + '-disk.ext4')
        files = dict(image, cmdline=KERNEL_CMDLINE + ' azp.cut=' + cut.name)
        first, first_az = boot_until_userspace(
            files, disk, accel, dict(kwargs, **cut.emulator), fake, rundir + '-1',
            boot.time_limit, media, uuid, cut=cut, fresh_from=image['disk'])
        say('    first boot: %s; VM ran %.1f s%s' % (first.outcome, first.duration,
                                                    '; ' + first.why if first.why else ''))
        on_disk, passwd_line = disk_after_cut(disk, scratch=scenario)
        say('    on the disk after the cut (journal replayed, debugfs): left-overs: %s; %s'
            % (' '.join(on_disk) or 'none', 'passwd: ' + passwd_line if passwd_line
               else 'no %s in /etc/passwd' % ADMIN_USER))
        second, az = boot_until_userspace(image, disk, accel, kwargs, fake, rundir + '-2',
                                          boot.time_limit, media, uuid)
        say('    second boot (the same disk): %s; Ready after %s; VM ran %.1f s'
            % (second.outcome, '%.1f s' % second.ready_after if second.ready_after
               is not None else 'never', second.duration))
        ctx = Context(boot, az, second, kwargs, second.wall_started)
        ctx.rundir, ctx.media, ctx.media_path = rundir + '-2', image['media'], media
        ctx.image, ctx.disk, ctx.suite, ctx.history = image, disk, suite, history
        mine = Checks()
        if second.early_hang is not None:
            mine.expect(False, 'the second boot reached userspace',
                        'hung twice, at %s' % hang_point(second.early_hang))
        else:
            try:
                check_powercut(ctx, mine, cut, first, first_az, vm_id)
            except Exception as exc:        # a broken check must fail, not crash the run
                mine.expect(False, 'checks ran', '%s: %s' % (exc.__class__.__name__, exc))
        left = describe_left(look_facts(ctx, True), image['host_keys'])
        dealt = describe_dealt(ctx, image['host_keys'])
        line = ('cut %s: %s at %s; on disk: %s; left at boot, before the unit: %s | second '
                'boot: %s, Ready after %s | %d/%d checks | boots %.1f s + %.1f s' % (
                    cut.name, 'PASS' if not mine.failures else 'FAIL',
                    '%.1f s' % first.cut_after if first.cut_after is not None else 'NO CUT',
                    ' '.join(on_disk) or 'no left-over', left, dealt, '%.1f s' % second.ready_after if second.ready_after
                    is not None else '-', mine.count - len(mine.failures), mine.count,
                    first.duration, second.duration))
        say('    ' + line)
        if mine.failures:
            say('    step lines of the second boot:')
            for text in ctx.step_lines()[:30]:
                say('      ' + masked(ctx, text))
        summary.append(line)
        c.count += mine.count
        c.failures += ['%s: %s' % (cut.name, f) for f in mine.failures]
        for vm in (first, second):
            total.duration += vm.duration + sum(h.duration for h in vm.hung_before)
        seconds.append(second.ready_after)
        if not _KEEP[0] and os.path.exists(disk):
            os.unlink(disk)
    say('')
    say('  power cuts, one line each:')
    for line in summary:
        say('    ' + line)
    known = [t for t in seconds if t is not None]
    total.ready_after = max(known) if len(known) == len(seconds) and known else None
    total.outcome = 'power cuts: %s' % ', '.join(cut.name for cut in _CUTS or CUTS)
    total.name, total.suite = boot.name, suite
    return c, total


# Issue 23: SELinux enforcing ----------------------------------------------------

AVC_DENIED = re.compile(r'avc:\s+denied\s+\{\s*([^}]*)\}\s+for\s+(.*)')


def context_type(context):
    """'system_u:system_r:init_t:s0' -> 'init_t' (the part the policy's rules name)."""
    parts = (context or '').strip('"').split(':')
    return parts[2] if len(parts) >= 3 else context


def denial_signature(text):
    """What a denial is about, without pids, inodes and times: permissions, command,
    source domain, target type and class (the terms audit2allow groups by)."""
    m = AVC_DENIED.search(text)
    if not m:
        return re.sub(r'\d+', 'N', text.split('): ', 1)[-1]).strip()
    fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', m.group(2)))
    return 'denied { %s } comm=%s %s -> %s:%s' % (
        ' '.join(sorted(m.group(1).split())), fields.get('comm', '?'),
        context_type(fields.get('scontext')), context_type(fields.get('tcontext')),
        fields.get('tclass', '?'))


def selinux_json(ctx, name):
    """A JSON answer of azp-selinux-check in the facts, or {} (rc and output in it)."""
    rc, out = command(ctx, name)
    try:
        return json.loads(out)
    except ValueError:
        return {'rc': rc, 'unparsed': out[-500:]}


CONSOLE_AVC = re.compile(r'audit: type=(?:1400|1107|1401) audit\(\d+\.\d+:(\d+)\): (.*)')


def denials_of(ctx):
    """{signature: [records]} of the boot, the problems that make "none" unprovable
    (lost records, a journal the checker could not read), and whether the guest
    answered.  The serial console's kernel audit lines count too (one per audit
    serial with the journal's): they need no permission to be seen."""
    answer = selinux_json(ctx, 'zz_se_denials')
    records = list(answer.get('records', []))
    serials = set(m.group(1) for m in (re.search(r'audit\(\d+\.\d+:(\d+)\)', r['text'])
                                       for r in records) if m)
    serials.update(str(r.get('serial')) for r in records if r.get('serial'))
    for serial, text in CONSOLE_AVC.findall(ctx.vm.console.replace('\r', '')):
        if serial not in serials and re.search(r'avc:\s+denied|SELINUX_ERR', text):
            serials.add(serial)
            records.append({'text': text, 'transport': 'console'})
    found = {}
    for record in records:
        found.setdefault(denial_signature(record['text']), []).append(record)
    problems = list(answer.get('lost_lines', [])) + list(answer.get('journal_errors', []))
    if 'records' in answer and not answer.get('entries_read'):
        problems.append('no audit or kernel entry read from the journal')
    return found, problems, 'records' in answer


def check_enforcing(ctx, c):
    state = selinux_json(ctx, 'se_state')
    status = state.get('sestatus', '')
    c.expect(state.get('getenforce') == 'Enforcing' and state.get('enforce') == '1',
             'getenforce says Enforcing (/sys/fs/selinux/enforce 1)',
             '%r, enforce %r' % (state.get('getenforce'), state.get('enforce')))
    loaded = re.search(r'(?m)^Loaded policy name:\s+(\S+)', status)
    c.expect(bool(loaded) and loaded.group(1) == SELINUX_POLICY
             and re.search(r'(?m)^Current mode:\s+enforcing', status)
             and re.search(r'(?m)^Mode from config file:\s+enforcing', status),
             'sestatus: policy %s loaded, current mode and config enforcing' % SELINUX_POLICY,
             ' | '.join(l.strip() for l in status.splitlines() if l.strip())[:300])
    return state


def print_denials(title, found):
    say('    info: %s: %d denial record(s), %d kind(s)%s' % (
        title, sum(len(v) for v in found.values()), len(found), ':' if found else ''))
    for signature, records in sorted(found.items()):
        say('      %3d x %s' % (len(records), signature))
        say('            e.g. %s' % records[0]['text'][:400])


def check_new_denials(ctx, c, baseline, what):
    """No denial in this boot that the baseline boot (no unit) did not have."""
    found, lost, answered = denials_of(ctx)
    print_denials('%s boot' % ctx.boot_label, found)
    new = dict((k, v) for k, v in found.items() if k not in baseline)
    c.expect(answered and not new, 'no AVC denial %s beyond the baseline boot\'s (%d kinds '
             'there, %d here)' % (what, len(baseline), len(found)),
             '; '.join('%d x %s' % (len(v), k) for k, v in sorted(new.items()))[:1500]
             if answered else 'no answer from azp-selinux-check denials')
    c.expect(answered and not lost, 'the journal was read, no audit record lost or '
             'suppressed', ' | '.join(lost)[:300])
    return found


def check_unit_domain(ctx, c):
    """The domain our unit ran in: the context of the ready.d hook's parent, which is
    the provisioner itself (/proc/PPID/attr/current), one of those journald recorded
    for the unit (_SELINUX_CONTEXT: also the tools it ran, and init_t for the stdout
    stream that systemd opened before the exec); the kernel says it is not
    permissive."""
    contexts = selinux_json(ctx, 'se_domain').get('contexts') or {}
    this_boot = dict((k, v) for k, v in contexts.items() if v.get('this_boot'))
    parent = re.search(r'(?m)^context parent (\S+)', file_info(ctx, HOOK_RECORD)
                       .get('content') or '')
    domains = sorted(set(context_type(k) for k in this_boot))
    say('    info: the unit\'s journal contexts: %s; the hook\'s parent: %s' % (
        ', '.join('%s (%d entries, %s, permissive %s)' % (k, v['entries'],
                                                         '/'.join(v['commands']),
                                                         v.get('permissive'))
                  for k, v in sorted(this_boot.items())) or 'none',
        parent.group(1) if parent else '-'))
    domain = parent.group(1) if parent else None
    c.expect(domain in this_boot, 'the provisioner ran in %s (the hook\'s parent; the '
             'journal has it among the unit\'s contexts %s)' % (context_type(domain),
                                                               '/'.join(domains)),
             'hook parent %s' % domain)
    c.expect(domain in this_boot and this_boot[domain].get('permissive') is False,
             'that domain is not permissive (security_compute_av_flags)',
             ', '.join('%s: %s' % (k, v.get('permissive')) for k, v in this_boot.items()))
    return [context_type(domain)] if domain else []


def check_labels(ctx, c):
    """restorecon -n -v over every path we wrote: nothing to change."""
    labels = selinux_json(ctx, 'se_labels')
    out = labels.get('restorecon', '')
    files = labels.get('files', [])
    keys = [f for f in files if re.match(r'/etc/ssh/ssh_host_', f['path'])]
    say('    info: restorecon -n -v -R over %d paths (%d files): %s' % (
        len(SELINUX_WRITTEN) + len(keys), len(files), out.strip() or '(nothing printed)'))
    for f in files:
        if f['path'] in SELINUX_WRITTEN or f['path'].startswith('/home/%s/.ssh' % ADMIN_USER) \
                or f['path'].startswith(DATA_DIR) or f['path'] in [k['path'] for k in keys]:
            say('      %-48s %s' % (f['path'], f['label']))
    c.expect('restorecon' in labels and labels.get('restorecon_rc') == 0 and not out.strip()
             and not labels.get('missing') and len(keys) >= 4,
             'restorecon -n -v -R over every path we wrote (%s, the host keys): '
             'nothing to relabel' % ', '.join(SELINUX_WRITTEN),
             'exit %s, missing %s, %d host key files: %s' % (
                 labels.get('restorecon_rc'), labels.get('missing'), len(keys),
                 out.strip()[-800:] or labels.get('unparsed', '')))
    differs = [f for f in files if context_type(f['expected'].split()[-1])
               != context_type(f['label']) and not f['expected'].startswith('matchpathcon')]
    c.expect(bool(files) and not differs,
             'and matchpathcon agrees for each of the %d files' % len(files),
             '; '.join('%s is %s, policy %s' % (f['path'], f['label'], f['expected'])
                       for f in differs)[:800])
    wanted = {'/home/%s/.ssh/authorized_keys' % ADMIN_USER: 'ssh_home_t',
              '/home/%s/.ssh' % ADMIN_USER: 'ssh_home_t', '/etc/shadow': 'shadow_t',
              '/etc/hostname': 'net_conf_t', '/etc/hosts': 'net_conf_t'}
    wanted.update((k['path'], 'sshd_key_t') for k in keys)
    by_path = dict((f['path'], f['label']) for f in files)
    wrong = ['%s: %s' % (p, by_path.get(p)) for p, t in sorted(wanted.items())
             if context_type(by_path.get(p)) != t]
    c.expect(not wrong, 'the types sshd and the system need: ssh_home_t on ~/.ssh and '
             'authorized_keys, sshd_key_t on the host keys, shadow_t, net_conf_t',
             '; '.join(wrong))


def check_selinux_logins(ctx, c):
    rc, out = command(ctx, 'se_key_login')
    c.expect(rc == 0 and 'user=%s home=/home/%s' % (ADMIN_USER, ADMIN_USER) in out,
             'ssh %s@127.0.0.1 with the served key logs in (sshd confined, enforcing)'
             % ADMIN_USER, ' | '.join(out.strip().splitlines())[-300:])
    say('    info: the key login: %s' % ' | '.join(out.strip().splitlines())[-300:])


def check_selinux_baseline(ctx, c):
    check_common(ctx, c)
    check_enforcing(ctx, c)
    c.expect(ctx.mono(UNIT, 'ExecMainStartTimestampMonotonic') == 0 and not ctx.unit_requests,
             'the unit did not run (masked for this boot): no request from it',
             '%d requests' % len(ctx.unit_requests))
    found, lost, answered = denials_of(ctx)
    print_denials('baseline boot (no unit)', found)
    c.expect(answered and not lost, 'the baseline\'s journal was read, no record lost',
             ' | '.join(lost)[:300] if answered else 'no answer from azp-selinux-check')
    return found


def check_selinux_first(ctx, c, baseline, vm_id):
    check_provisioned(ctx, c, ask_hostnamed=False)     # SELINUX_CHECKER: not asked
    check_publish(ctx, c, 'NetworkManager')
    check_enforcing(ctx, c)
    domains = check_unit_domain(ctx, c)
    check_media_data(ctx, c)
    check_media_user(ctx, c)
    check_selinux_logins(ctx, c)
    check_host_keys(ctx, c, [("the image's", (ctx.image or {}).get('host_keys') or [])])
    check_record(ctx, c, vm_id, user=ADMIN_USER)
    check_labels(ctx, c)
    found = check_new_denials(ctx, c, baseline, 'while provisioning and logging in')
    return domains, found


def check_selinux_second(ctx, c, baseline, vm_id):
    check_common(ctx, c)
    check_enforcing(ctx, c)
    c.expect(ctx.facts.get('boot_number') == 2, 'the same disk booted a second time',
             'checker counts boot %s' % ctx.facts.get('boot_number'))
    c.expect(not ctx.unit_requests and ctx.mono(UNIT, 'ExecMainStartTimestampMonotonic') == 0
             and not ctx.journal_this_boot(),
             'the unit did not run: no request from it, no journal line this boot',
             '%d requests, %d journal lines' % (len(ctx.unit_requests),
                                                len(ctx.journal_this_boot())))
    c.expect(ctx.is_enabled() == 'disabled', 'the unit is still disabled', ctx.is_enabled())
    c.expect(ctx.facts.get('hostname') == COMPUTER_NAME, 'the hostname survived the reboot',
             repr(ctx.facts.get('hostname')))
    check_record(ctx, c, vm_id, user=ADMIN_USER)
    check_selinux_logins(ctx, c)
    return check_new_denials(ctx, c, baseline, 'in the second boot')


def selinux_emulator(history, image):
    """media_emulator, and the image's login key in compute.publicKeys as well."""
    kwargs = media_emulator(history, image)
    entry = {'keyData': image['login_key'] + '\n',
             'path': '/home/%s/.ssh/authorized_keys' % ADMIN_USER}
    doc = json.loads(kwargs['imds_body'])
    doc['compute']['publicKeys'].append(entry)
    return dict(kwargs, public_keys=kwargs['public_keys'] + [entry], vm_id=doc['compute']['vmId'],
                imds_body=json.dumps(doc, separators=(',', ':')))


def run_selinux(boot, images, disks, history, fake, accel, workdir, suite=None):
    """Issue 23: three boots of the SELinux image, each with its own checks: baseline (a
    fresh copy, the media attached, our unit masked on the kernel command line),
    first (a fresh copy: everything at once) and second (the first's disk again, no
    media).  Denials of first and second are judged against the baseline's.
    Returns (Checks of all three, a VmRun summing them)."""
    image = images[(suite, boot.image) if suite else boot.image]
    scenario = os.path.join(workdir, 'boot-%s%s' % (suite + '-' if suite else '', boot.name))
    os.makedirs(scenario)
    media = build_boot_media(fake, image, scenario)
    kwargs = selinux_emulator(history, image)
    vm_id = kwargs['vm_id']
    total, c, baseline, lines = VmRun(), Checks(), {}, []
    total.duration = 0.0
    disk = os.path.join(scenario, 'disk.ext4')
    for name in ('baseline', 'first', 'second'):
        say('')
        say('  -- %s boot' % name)
        files = dict(image, cmdline=image['cmdline'] + (' ' + BASELINE_ARG
                                                       if name == 'baseline' else ''))
        vm, az = boot_until_userspace(
            files, disk, accel, kwargs, fake, os.path.join(scenario, name), boot.time_limit,
            media if name != 'second' else None, gen1_uuid(vm_id),
            fresh_from=image['disk'] if name != 'second' else None)
        ctx = Context(boot, az, vm, kwargs, vm.wall_started)
        ctx.rundir, ctx.media, ctx.media_path = os.path.join(scenario, name), image['media'], media
        ctx.image, ctx.disk, ctx.suite, ctx.history = image, disk, suite, history
        ctx.boot_label = name
        slowest = sorted(((r.get('seconds') or 0, n) for n, r in
                          ((vm.facts or {}).get('commands') or {}).items()), reverse=True)
        say('    %s; QEMU start -> Ready accepted %s; VM ran %.1f s; the slowest checks: %s' % (
            vm.outcome, '%.1f s' % vm.ready_after if vm.ready_after is not None else '-',
            vm.duration, ', '.join('%s %.1f s' % (n, t) for t, n in slowest[:4])))
        mine = Checks()
        try:
            if vm.early_hang is not None:
                mine.expect(False, 'the guest reached userspace', 'hung twice, at %s'
                            % hang_point(vm.early_hang))
            elif name == 'baseline':
                baseline = check_selinux_baseline(ctx, mine)
            elif name == 'first':
                domains, found = check_selinux_first(ctx, mine, baseline, vm_id)
                total.ready_after = vm.ready_after
                lines.append('unit domain %s; denials: baseline %d (%d kinds), with the unit '
                             '%d (%d kinds)' % ('/'.join(domains) or '?',
                                                sum(len(v) for v in baseline.values()),
                                                len(baseline),
                                                sum(len(v) for v in found.values()), len(found)))
            else:
                found = check_selinux_second(ctx, mine, baseline, vm_id)
                lines.append('second boot: %d denials (%d kinds)'
                             % (sum(len(v) for v in found.values()), len(found)))
        except Exception as exc:        # a broken check must fail, not crash the run
            mine.expect(False, 'checks ran', '%s: %s' % (exc.__class__.__name__, exc))
        if mine.failures:
            say('    step lines:')
            for text in ctx.step_lines()[:40]:
                say('      ' + masked(ctx, text))
            say('    console tail:')
            for text in vm.console.replace('\r', '').splitlines()[-15:]:
                say('      | ' + masked(ctx, text))
        c.count += mine.count
        c.failures += ['%s: %s' % (name, f) for f in mine.failures]
        total.duration += vm.duration       # main() adds the hung attempts' time
        total.hung_before += vm.hung_before
        lines.append('%s boot: %s, %d/%d checks, VM %.1f s' % (
            name, 'PASS' if not mine.failures else 'FAIL', mine.count - len(mine.failures),
            mine.count, vm.duration))
    if not _KEEP[0] and os.path.exists(disk):
        os.unlink(disk)
    say('')
    for line in lines:
        say('  ' + line)
    total.outcome = 'baseline, first and second boot'
    total.name, total.suite = boot.name, suite
    return c, total


EMULATOR = dict(computer_name=COMPUTER_NAME, vm_name=VM_NAME, incarnation=INCARNATION,
                vm_id=VM_ID)

# Issue 15: what runs on which suite.  Every suite: first, second, failure, media (the
# NetworkManager base, --provision-user).  slow-network and no-dbus test the
# provisioner's own retry and fallback, the same code on every suite: bookworm only.
# networkmanager (ssh login with a key): bullseye (NetworkManager 1.30 asks for no lease
# after a reapply: the reactivation path) and trixie (1.52: the reapply path).
# capture-again: trixie, the newest.
ONE_SUITE = ('bookworm',)
NEWEST = ('trixie',)
BOOTS = [
    Boot('first', check_first, emulator=EMULATOR),
    Boot('second', check_second, disk_from='first', emulator=EMULATOR),
    Boot('failure', check_failure, emulator=dict(EMULATOR, computer_name=BAD_COMPUTER_NAME)),
    Boot('slow-network', check_slow, emulator=slow_emulator,
         time_limit=BOOT_TIME_LIMIT + SLOW_WIRESERVER_UP, suites=ONE_SUITE),
    Boot('no-dbus', check_no_dbus, image='no-dbus', emulator=EMULATOR, suites=ONE_SUITE),
    Boot('networkmanager', check_networkmanager, image='networkmanager',
         emulator=user_emulator, suites=('bullseye',) + NEWEST),
    Boot('media', check_media, image='media', emulator=media_emulator, media=True),
    # issue 14: an image captured again
    Boot('capture-a', check_capture_a, image='capture',
         emulator=capture_emulator(COMPUTER_NAME_A, VM_ID_A), suites=NEWEST),
    Boot('capture-b', check_capture_b, image='capture', disk_from='capture-a',
         emulator=capture_emulator(COMPUTER_NAME_B, VM_ID_B), suites=NEWEST),
    # issue 20: power cuts in the first boot, each disk booted again (bookworm only:
    # the same provisioner code on every suite; 2 boots per cut)
    Boot('powercut', None, image='powercut', media=True, suites=ONE_SUITE,
         runner=run_powercut, vm_boots=2 * len(CUTS)),
    # issue 23: SELinux enforcing (Debian's reference policy): a baseline boot without
    # the unit, the everything-at-once first boot, the second boot
    Boot('selinux', None, image='selinux', media=True, suites=ONE_SUITE,
         runner=run_selinux, vm_boots=3),
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


def report_preflight(images, suite=None):
    """Issue 7: the --check runs made while building the images, as one test.
    Returns (name, passed, summary, checks passed, checks)."""
    say('')
    say('== preflight%s: azure-provisioning --check on the built image trees'
        % (' (%s)' % suite if suite else ''))
    c = Checks()
    for name in sorted(images):
        for ok, what, detail, output in images[name]['preflight']:
            c.expect(ok, what, detail)
            if output and (not ok or ('broken' in what and 'inside' in what)
                           or (name == 'default' and 'inside the image' in what)):
                for line in output.rstrip().splitlines():
                    say('      | ' + line)
    return ('preflight', not c.failures, '%d checks, %d failed' % (c.count, len(c.failures)),
            c.count - len(c.failures), c.count)


def describe_requests(ctx):
    for r in ctx.requests[:30]:
        say('      %-10s %s %s -> %s%s' % (r['server'], r['method'], r['path'], r['status'],
                                           ' (probe)' if r['headers'].get('user-agent')
                                           == PROBE_AGENT else ''))


def run_boot(boot, images, disks, history, fake, accel, workdir, suite=None):
    """Run one boot and its checks; returns (Checks, the VmRun judged).
    Every attempt gets what a boot always gets: its own run directory, a fresh copy of
    its disk (the built image's, or the disk that boot.disk_from left: that one is
    never booted in place, so it stays as that boot left it) and a fresh emulator.
    Issue 11: an attempt stopped by a hang in early boot (boot_vm, early_boot_hang) is
    kept in boot-NAME-hung-1/ (without its disk) and the boot runs again ONCE; the
    VmRun judged lists it in hung_before.  A second hang fails the boot.
    fake: tests/fake_azure.py as a module.  A media boot gets its disc built afresh in
    the run directory (BootSkipped when genisoimage is missing)."""
    # suite (issue 15): images and disks are keyed (suite, name), else by name
    key = (lambda name: (suite, name)) if suite else (lambda name: name)
    image = images[key(boot.image)]
    rundir = os.path.join(workdir, 'boot-%s%s' % (suite + '-' if suite else '', boot.name))
    if boot.disk_from:
        if key(boot.disk_from) not in disks:
            raise TestFailure('boot %r did not leave a disk' % boot.disk_from)
        source = disks[key(boot.disk_from)]
    else:
        source = image['disk']
    emulator = boot.emulator_kwargs(history, image)
    uuid = gen1_uuid(emulator['vm_id']) if emulator.get('vm_id') else None
    if emulator.get('wireserver_up_after'):
        say('  the WireServer refuses connections for the first %.1f s'
            % emulator['wireserver_up_after'])
    hung = []
    for attempt in (1, 2):
        if hung:                    # keep the hung attempt's logs, not its 2 GB disk
            kept = '%s-hung-%d' % (rundir, len(hung))
            os.rename(rundir, kept)
            if os.path.exists(os.path.join(kept, 'disk.ext4')):
                os.unlink(os.path.join(kept, 'disk.ext4'))
        os.makedirs(rundir)
        disk = os.path.join(rundir, 'disk.ext4')
        copy_disk(source, disk)
        media = build_boot_media(fake, image, rundir) if boot.media else None
        emulator_started = time.time()
        with fake.FakeAzure(**emulator) as az:
            vm = boot_vm(image, disk, accel, az, rundir, boot.time_limit, media=media,
                         uuid=uuid)
            ctx = Context(boot, az, vm, emulator, emulator_started)
            ctx.rundir, ctx.media, ctx.media_path = rundir, image['media'], media
            ctx.image, ctx.disk, ctx.suite, ctx.history = image, disk, suite, history
        vm.hung_before = list(hung)
        vm.name, vm.suite = boot.name, suite
        if vm.early_hang is None:
            break
        hung.append(vm)
        say('  HANG in early boot (attempt %d): %s; stopped after %.1f s'
            % (attempt, describe_hang(vm.early_hang), vm.duration))
        if attempt == 1:
            say('  booting again once, with a fresh copy of the disk and a fresh emulator')
    disks[key(boot.name)] = disk
    history.append(vm)
    say('  QEMU start -> Ready accepted: %s; VM ran %.1f s (%s); userspace after %s, '
        'the console silent %.1f s at most before it'
        % ('%.1f s' % vm.ready_after if vm.ready_after is not None else 'never',
           vm.duration, vm.outcome,
           '%.1f s' % vm.userspace_after if vm.userspace_after is not None else '-',
           vm.longest_early_quiet))
    c = Checks()
    if vm.early_hang is not None:   # twice: no point in checking what never booted
        c.expect(False, 'the guest reached userspace (retried once after a hang in early '
                 'boot)', 'hung again at %s' % hang_point(vm.early_hang))
    else:
        try:
            boot.check(ctx, c)
        except Exception as exc:    # a broken check must fail, not crash the run
            c.expect(False, 'checks ran', '%s: %s' % (exc.__class__.__name__, exc))
    if c.failures:
        say('  emulator saw %d requests:' % len(ctx.requests))
        describe_requests(ctx)
        say('  step lines on the console:')
        for line in ctx.step_lines()[:30]:
            say('      ' + masked(ctx, line))
        say('  console tail (%s):' % os.path.join(rundir, 'console.log'))
        for line in vm.console.replace('\r', '').splitlines()[-25:]:
            say('      | ' + masked(ctx, line))
        if vm.qemu_log.strip():
            say('  qemu said: ' + vm.qemu_log.strip()[-500:])
    return c, vm


def build_boot_media(fake, image, rundir):
    """Issue 13: the provisioning disc (ovf-env.xml on UDF/ISO 9660) of image's media
    secrets, written into rundir; BootSkipped without genisoimage."""
    if not image.get('media'):
        raise TestFailure('the image has no media secrets for a media boot')
    path = os.path.join(rundir, 'media.iso')
    try:
        fake.build_media(path, image['media']['ovf_env'])
    except fake.MissingTool as exc:
        raise BootSkipped(str(exc))
    except (OSError, RuntimeError, ValueError) as exc:
        raise TestFailure('building the provisioning media failed: %s' % exc)
    say('  provisioning media: %s (%d bytes, UDF/ISO 9660) as an IDE cdrom'
        % (path, os.path.getsize(path)))
    return path


def masked(ctx, text):
    """text with the media password (both forms) replaced: never printed by us."""
    for form in secret_forms(ctx.media) if getattr(ctx, 'media', None) else []:
        text = text.replace(form.decode('utf-8'), '<the password>')
    return text


def retry_note(vm):
    """The start of a boot's summary line: never a silent retry (issue 11)."""
    if not vm.hung_before:
        return ''
    first = hang_point(vm.hung_before[0].early_hang)
    if vm.early_hang is not None:
        return 'hung in early boot twice, at %s and at %s; ' % (first, hang_point(vm.early_hang))
    return 'retried after a hang in early boot at %s; ' % first


def parse_suites(values):
    """--suite values (repeatable, comma lists) -> suites in SUITES order."""
    wanted = []
    for value in values or []:
        for name in value.split(','):
            name = name.strip()
            if name and name not in SUITES:
                raise SystemExit('boot_test.py: unknown suite %r (known: %s)'
                                 % (name, ', '.join(SUITES)))
            if name and name not in wanted:
                wanted.append(name)
    return [s for s in SUITES if s in wanted] if wanted else list(SUITES)


def plan_boots(boots, suites, explicit):
    """[(suite, Boot)] in run order: suite by suite, BOOTS order.  A boot runs on its
    own suites; named with --only on suites named with --suite, it runs there too."""
    return [(suite, b) for suite in suites for b in boots
            if suite in b.suites or explicit]


def cell(result):
    if result is None:
        return '-'
    passed, ready, ok, total, summary = result
    if passed is None:
        return 'SKIP'
    if ok is None:
        return '%s (%s)' % ('PASS' if passed else 'FAIL', summary)
    if ready is False:              # no boot: the preflight
        return '%s %d/%d' % ('PASS' if passed else 'FAIL', ok, total)
    return '%s %s, %d/%d' % ('PASS' if passed else 'FAIL',
                             '%.1f s' % ready if ready is not None else 'no Ready', ok, total)


def summary_table(rows, suites, columns, markdown):
    """rows: {(suite, column): (passed, ready s, checks ok, checks, summary)}."""
    head = ['suite'] + columns
    table = [[suite] + [cell(rows.get((suite, col))) for col in columns] for suite in suites]
    if markdown:
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
        lines += ['| ' + ' | '.join(r) + ' |' for r in table]
        return '\n'.join(lines) + '\n'
    widths = [max(len(r[i]) for r in [head] + table) for i in range(len(head))]
    return '\n'.join('  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                     for r in [head] + table)


# Time budget: setup has its own limits (mmdebstrap 900 s each, ...); the boots get
# BOOT_BUDGET s each on average: no boot starts once they have used up
# BOOT_BUDGET x (boots planned) (a TCG boot here takes 40-70 s, slow-network ~70 s).
BOOT_BUDGET = 110.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--keep', action='store_true', help='keep the work directory')
    parser.add_argument('--cache-dir', default=os.environ.get('AZP_BOOT_CACHE') or
                        os.path.join(os.path.expanduser('~'), '.cache', 'azp-boot-test'),
                        help='where the base root filesystems are cached '
                             '(default $AZP_BOOT_CACHE or ~/.cache/azp-boot-test)')
    parser.add_argument('--only', metavar='NAME[,NAME]',
                        help='run only these boots (and the boots they depend on)')
    parser.add_argument('--suite', action='append', metavar='SUITE[,SUITE]',
                        help='Debian suites to boot (repeatable; default all: %s)'
                             % ', '.join(SUITES))
    parser.add_argument('--cut', metavar='NAME[,NAME]',
                        help='powercut: only these cuts (default all: %s)'
                             % ', '.join(c.name for c in CUTS))
    parser.add_argument('--list', action='store_true', help='list the boots and exit')
    parser.add_argument('--repo', default=DEFAULT_REPO,
                        help='source tree whose install.sh and tests/fake_azure.py are used '
                             '(default: the one this file is in)')
    args = parser.parse_args(argv)
    suites = parse_suites(args.suite)
    _CUTS[:] = select_cuts(args.cut)
    _KEEP[:] = [args.keep]
    if args.list:
        for b in BOOTS:
            say('%-15s image %s%s; suites %s%s' % (
                b.name, b.image, ', disk of ' + b.disk_from if b.disk_from else '',
                ','.join(b.suites), ' (only with --only)' if b.optional else ''))
        return 0
    selected = select_boots(args.only)
    plan = plan_boots(selected, suites, bool(args.only and args.suite))
    repo = os.path.abspath(args.repo)

    def terminated(signum, frame):
        raise SystemExit('boot_test.py: stopped by signal %d' % signum)
    signal.signal(signal.SIGTERM, terminated)     # so that QEMU is stopped, the work dir removed
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix='azp-boot-test-')
    say('boot test: %s; work directory %s' % (', '.join('%s/%s' % (s_, b.name)
                                                       for s_, b in plan), workdir))
    results = []                    # (name, passed (None: skipped), summary)
    rows = {}                       # (suite, column) -> cell data of the summary table
    skipped = {}                    # boot name -> why it cannot run here
    ready_times = []                # (boot name, VmRun)
    boots_started = None
    try:
        try:
            if os.geteuid() != 0:
                raise TestFailure('must run as root (mmdebstrap, root-owned image files)')
            ensure_host_tools()
            accel, why = choose_accelerator()
            _ACCEL[:] = [accel]
            say('accelerator: %s (%s)' % (accel, why))
            fake = load_fake_module(repo)
            if not shutil.which(fake.MEDIA_TOOL):
                for b in [b for _, b in plan if b.media]:
                    skipped[b.name] = ('%s not found (Debian package %s): no provisioning '
                                       'media can be built' % (fake.MEDIA_TOOL, fake.MEDIA_TOOL))
                    say('SKIP boot %s: %s' % (b.name, skipped[b.name]))
            wanted = sorted(set((s_, b.image) for s_, b in plan if b.name not in skipped))
            build_bases([recipe_for(IMAGES[name].recipe.name, s_) for s_, name in wanted],
                        args.cache_dir, workdir)
            say('bases ready after %.1f s' % (time.monotonic() - started))
            images = {}
            for s_, name in wanted:
                images[(s_, name)] = build_image(
                    IMAGES[name], workdir, args.cache_dir, repo,
                    os.path.join(workdir, 'mmdebstrap.log'), suite=s_)
        except TestFailure as exc:
            say('FAIL: the boot test could not be set up: %s' % exc)
            for s_, b in plan:
                results.append(('%s/%s' % (s_, b.name), False, 'not run: setup failed'))
            plan = []
        else:
            say('setup done after %.1f s' % (time.monotonic() - started))
            for s_ in suites:       # none when every boot selected is skipped
                mine = dict((name, images[(s_, name)]) for s2, name in images if s2 == s_)
                if mine:
                    name, passed, summary, ok, total = report_preflight(mine, s_)
                    results.append(('%s/%s' % (s_, name), passed, summary))
                    rows[(s_, 'preflight')] = (passed, False, ok, total, summary)
        disks, history = {}, []
        boots_started = time.monotonic()
        for index, (suite, boot) in enumerate(plan):
            label = '%s/%s' % (suite, boot.name)
            say('')
            say('== boot %s' % label)
            if boot.name in skipped:
                say('  SKIP %s' % skipped[boot.name])
                results.append((label, None, 'skipped: ' + skipped[boot.name]))
                rows[(suite, boot.name)] = (None, None, 0, 0, 'skipped')
                continue
            vm_boots = sum(b.vm_boots for _, b in plan)
            budget = BOOT_BUDGET * vm_boots
            if time.monotonic() - boots_started > budget:
                say('  FAIL not run: the boots\' time budget of %d s (%d x %d s) is used up'
                    % (budget, vm_boots, BOOT_BUDGET))
                results.append((label, False, 'not run: time budget'))
                rows[(suite, boot.name)] = (False, None, None, None, 'not run: time budget')
                continue
            if boot.disk_from and not dict((n, p) for n, p, _ in results).get(
                    '%s/%s' % (suite, boot.disk_from)):
                say('  note: boot %s failed; this boot still uses its disk' % boot.disk_from)
            try:
                c, vm = (boot.runner or run_boot)(boot, images, disks, history, fake, accel,
                                                  workdir, suite=suite)
            except BootSkipped as exc:
                say('  SKIP %s' % exc)
                results.append((label, None, 'skipped: %s' % exc))
                rows[(suite, boot.name)] = (None, None, 0, 0, 'skipped')
                continue
            except TestFailure as exc:
                say('  FAIL %s' % exc)
                results.append((label, False, str(exc).splitlines()[0]))
                rows[(suite, boot.name)] = (False, None, None, None, 'error')
                continue
            ready_times.append((label, vm))
            summary = retry_note(vm) + '%d checks, %d failed; Ready after %s; VM %.1f s' % (
                c.count, len(c.failures),
                '%.1f s' % vm.ready_after if vm.ready_after is not None else '-', vm.duration)
            results.append((label, not c.failures, summary))
            rows[(suite, boot.name)] = (not c.failures, vm.ready_after,
                                        c.count - len(c.failures), c.count, summary)
            if not args.keep:           # 2 GB sparse each: drop disks no later boot needs
                later = set((s_, b.disk_from) for s_, b in plan[index + 1:])
                for name in [n for n in disks if n not in later]:
                    path = disks.pop(name)
                    if path not in disks.values() and os.path.exists(path):
                        os.unlink(path)
    finally:
        total = time.monotonic() - started
        columns = ['preflight'] + [b.name for b in BOOTS
                                   if any(b is b2 for _, b2 in plan)]
        table_path = os.path.join(workdir, 'summary.md')
        try:
            with open(table_path, 'w') as f:
                f.write('Boot test (tests/boot_test.py), %s, %s: each cell is the result, '
                        'QEMU start -> Ready accepted, checks passed/run.  Total run time '
                        '%.0f s.\n\n' % (time.strftime('%Y-%m-%d', time.gmtime()),
                                          accel_name(), total))
                f.write(summary_table(rows, suites, columns, markdown=True))
        except OSError as exc:
            say('cannot write %s: %s' % (table_path, exc))
        if args.keep:
            say('kept the work directory %s' % workdir)
        else:                       # all but the summary table
            for name in os.listdir(workdir):
                if name != 'summary.md':
                    path = os.path.join(workdir, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
    say('')
    say('boot test summary:')
    for name, passed, summary in results:
        say('  %-24s %s  %s' % (name, {True: 'PASS', False: 'FAIL', None: 'SKIP'}[passed],
                                summary))
    say('')
    say('suite x scenario (result, QEMU start -> Ready accepted, checks passed/run):')
    say(summary_table(rows, suites, columns, markdown=False))
    say('markdown table: %s' % table_path)
    ready = [(vm_name, vm.ready_after) for vm_name, vm in ready_times]
    say('QEMU start -> Ready accepted: %s' % ', '.join(
        '%s %s' % (n, '%.1f s' % t if t is not None else '-') for n, t in ready))
    say('VMs ran %.1f s in total; total run time %.1f s'
        % (sum((vm.duration or 0) + sum(h.duration or 0 for h in vm.hung_before)
               for _, vm in ready_times), total))
    passed = sum(1 for _, p, _ in results if p)
    failed = sum(1 for _, p, _ in results if p is False)
    skips = len(results) - passed - failed     # not passed, not failed: said so
    say('%d passed, %d failed%s' % (passed, failed, ', %d skipped' % skips if skips else ''))
    return 0 if failed == 0 and passed > 0 else 1


_ACCEL = []
_CUTS = []          # the power cuts chosen (--cut)
_KEEP = [False]     # --keep: the power-cut scenario keeps its disks too


def accel_name():
    return _ACCEL[0] if _ACCEL else 'accelerator not chosen'


if __name__ == '__main__':
    sys.exit(main())
