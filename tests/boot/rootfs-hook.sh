#!/bin/sh
# Build recipe of the boot test's base Debian root filesystem (tests/boot_test.py).
# Called by mmdebstrap as a hook:  sh rootfs-hook.sh essential|customize ROOTDIR [NETWORK]
# NETWORK: networkd (default: systemd-networkd and its wait-online service) or
# networkmanager (the image must include the network-manager package).
# This file is part of the cache key of the base image: edit it and the image is rebuilt.
# Nothing of the product is installed here; install.sh --root does that on a copy per run.
set -eu
phase="$1"
root="$2"
network="${3:-networkd}"

case "$phase" in
essential)
    # Before the kernel package is installed: make its initramfs small and quick to
    # build (MODULES=list), holding just what a QEMU virtio guest needs to mount /,
    # and what an Azure VM needs.
    mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/etc/initramfs-tools/hooks"
    echo 'MODULES=list' > "$root/etc/initramfs-tools/conf.d/azp-boot-test.conf"
    cat > "$root/etc/initramfs-tools/hooks/azp-boot-test" <<'END_HOOK'
#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for module in virtio_pci virtio_blk virtio_net ext4; do
    force_load "$module"
done
# Azure's VMBus drivers, in it as Azure needs them (--check requires them), and
# never loaded under QEMU, which has no VMBus
for module in hv_vmbus hv_storvsc hv_netvsc hv_utils; do
    manual_add_modules "$module"
done
END_HOOK
    chmod 0755 "$root/etc/initramfs-tools/hooks/azp-boot-test"
    ;;
customize)
    # The image's own name, which provisioning must replace (also in /etc/hosts,
    # the way Debian images carry it).
    echo 'azp-image' > "$root/etc/hostname"
    cat > "$root/etc/hosts" <<'END_HOSTS'
127.0.0.1	localhost
127.0.1.1	azp-image

::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
END_HOSTS
    # DHCP on whatever the NIC is called, and a wait-online service so that
    # network-online.target means "has a lease".
    case "$network" in
    networkd)
        mkdir -p "$root/etc/systemd/network"
        cat > "$root/etc/systemd/network/50-dhcp.network" <<'END_NETWORK'
[Match]
Name=en* eth*

[Link]
RequiredForOnline=routable

[Network]
DHCP=ipv4
END_NETWORK
        chroot "$root" systemctl enable systemd-networkd.service \
            systemd-networkd-wait-online.service
        ;;
    networkmanager)
        # NetworkManager's default: an automatic DHCP connection on every ethernet NIC.
        chroot "$root" systemctl disable systemd-networkd.service \
            systemd-networkd-wait-online.service 2>/dev/null || true
        chroot "$root" systemctl enable NetworkManager.service \
            NetworkManager-wait-online.service
        ;;
    *)
        echo "rootfs-hook.sh: unknown network stack: $network" >&2
        exit 2
        ;;
    esac
    # A persistent journal: the second boot can count the first boot's runs.
    mkdir -p "$root/var/log/journal"
    # No login prompt on the console: nobody logs in, and it keeps the log readable.
    chroot "$root" systemctl mask serial-getty@ttyS0.service getty@tty1.service
    # An empty machine-id, as a generalized image has (first boot creates one); the
    # interactive first-boot wizard that an empty one triggers would wait for a key press.
    : > "$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    chroot "$root" systemctl mask systemd-firstboot.service
    # The kernel and initramfs must be readable by whoever starts QEMU.
    chmod 0644 "$root"/boot/vmlinuz-* "$root"/boot/initrd.img-*
    ;;
*)
    echo "usage: rootfs-hook.sh essential|customize ROOTDIR [networkd|networkmanager]" >&2
    exit 2
    ;;
esac
