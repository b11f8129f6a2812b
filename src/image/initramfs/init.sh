#!/bin/busybox sh
# shellcheck shell=dash # busybox ash; dash is the closest dialect shellcheck knows
# kiln's init: the first program of every kiln node (busybox, in the
# initramfs). It mounts the slot's read-only root, puts /etc in RAM over
# it, puts /var on the state partition (formatting and growing it when
# needed), copies the node seed into place and hands over to systemd.
#
# Kernel arguments it reads:
#   kiln.slot=a|b          which root partition (root-a / root-b) to boot
#   kiln.root=URL          netboot: fetch the root image over HTTP into RAM
#                          instead (kiln.slot is then ignored)
#   kiln.root.sha256=HEX   netboot: the root image's digest (required)
#   kiln.netif=MAC         netboot: the interface to use (default: every
#                          wired interface, first DHCP answer wins)
#   kiln.debug             open a shell instead of rebooting on failure
#
# Every step logs "kiln-init: ..." to the kernel log, so the boot
# timeline can be read from the console with kernel timestamps.

/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /run /sysroot
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev

log() { echo "kiln-init: $*" > /dev/kmsg 2>/dev/null || echo "kiln-init: $*"; }

fail() {
    log "FATAL: $*"
    echo "kiln-init: FATAL: $*" > /dev/console
    if [ -n "$debug" ]; then
        echo "kiln-init: kiln.debug is set: starting a shell (exit to reboot)" > /dev/console
        setsid cttyhack sh || sh
    else
        echo "kiln-init: rebooting in 10 s (add kiln.debug to the kernel command line for a shell)" > /dev/console
        sleep 10
    fi
    reboot -f
}

slot=a
debug=
root_url=
root_sha=
netif=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kiln.slot=*) slot="${arg#kiln.slot=}" ;;
        kiln.root=*) root_url="${arg#kiln.root=}" ;;
        kiln.root.sha256=*) root_sha="${arg#kiln.root.sha256=}" ;;
        kiln.netif=*) netif="${arg#kiln.netif=}" ;;
        kiln.debug) debug=1 ;;
    esac
done
if [ -n "$root_url" ]; then
    slot=net
    log "started (root from the network, kernel $(uname -r))"
else
    case "$slot" in a|b) ;; *) fail "kiln.slot=$slot: expected a or b" ;; esac
    log "started (slot $slot, kernel $(uname -r))"
fi

# Modules, in dependency order (resolved when the image was built).
kver=$(uname -r)
while read -r m; do
    [ -n "$m" ] && insmod "/lib/modules/$kver/$m" 2>/dev/null
done < /etc/kiln/modules
log "modules loaded"
mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null

# Disks and partitions. kiln takes its root slot and its state only from
# the disk it booted from, never from another disk that happens to carry
# partitions of the same names (a kiln stick on a machine with a kiln
# install, two copies of one image).
#
# GPT (UEFI 2.10 §5.3): the header is at LBA 1, with the disk GUID at byte
# 56, the entry array's LBA at 72, the entry count at 80 and the entry size
# at 84; an entry has its type GUID at byte 0 and its unique GUID at 16.

# Whole disks that are devices (not loop, RAM or device-mapper).
disks() {
    for d in /sys/block/*; do
        [ -e "$d/device" ] && basename "$d"
    done
}

# COUNT bytes at byte OFFSET of /dev/DISK through hexdump FORMAT.
bytes_at() { dd if="/dev/$1" bs=1 skip="$2" count="$3" 2>/dev/null | hexdump -v -e "$4"; }

# A GUID in its text form, from its 16 bytes on disk (the first three
# fields little-endian).
GUID_FORMAT='1/4 "%08x" "-" 1/2 "%04x" "-" 1/2 "%04x" "-" 2/1 "%02x" "-" 6/1 "%02x" "\n"'

# The GPT disk GUID of /dev/DISK; nothing if it has no GPT.
disk_guid() {
    lbs=$(cat "/sys/block/$1/queue/logical_block_size" 2>/dev/null || echo 512)
    [ "$(dd if="/dev/$1" bs=1 skip="$lbs" count=8 2>/dev/null)" = "EFI PART" ] || return 1
    bytes_at "$1" $((lbs + 56)) 16 "$GUID_FORMAT"
}

# "NUMBER GUID" for every used entry of /dev/DISK's GPT (unique GUIDs).
part_guids() {
    disk_guid "$1" >/dev/null || return 1
    lbs=$(cat "/sys/block/$1/queue/logical_block_size" 2>/dev/null || echo 512)
    lba=$(bytes_at "$1" $((lbs + 72)) 4 '1/4 "%u"')
    count=$(bytes_at "$1" $((lbs + 80)) 4 '1/4 "%u"')
    size=$(bytes_at "$1" $((lbs + 84)) 4 '1/4 "%u"')
    dd if="/dev/$1" bs="$lbs" skip="$lba" count=$(((count * size + lbs - 1) / lbs)) 2>/dev/null \
        | hexdump -v -e "$size/1 \"%02x\" \"\\n\"" \
        | awk -v count="$count" 'NR > count { exit }
            substr($0, 1, 32) ~ /^0+$/ { next }
            { h = substr($0, 33, 32)
              printf "%d %s%s%s%s-%s%s-%s%s-%s-%s\n", NR,
                substr(h, 7, 2), substr(h, 5, 2), substr(h, 3, 2), substr(h, 1, 2),
                substr(h, 11, 2), substr(h, 9, 2), substr(h, 15, 2), substr(h, 13, 2),
                substr(h, 17, 4), substr(h, 21, 12) }'
}

# The disks (space-separated) that carry a partition with unique GUID $1.
disks_with_part() {
    found=
    for d in $(disks); do
        part_guids "$d" 2>/dev/null | grep -q " $1\$" && found="${found:+$found }$d"
    done
    echo "$found"
}

# The disks that carry a partition named $1.
disks_with_name() {
    found=
    for d in $(disks); do
        grep -qx "PARTNAME=$1" /sys/block/"$d"/"$d"*/uevent 2>/dev/null && found="${found:+$found }$d"
    done
    echo "$found"
}

# The partition named $2 on disk $1; print its device name (e.g. nvme0n1p2).
part_on() {
    for u in /sys/block/"$1"/"$1"*/uevent; do
        if grep -qx "PARTNAME=$2" "$u" 2>/dev/null; then
            basename "$(dirname "$u")"
            return 0
        fi
    done
    return 1
}

# The partition systemd-boot was loaded from (its LoaderDevicePartUUID
# EFI variable: 4 bytes of attributes, then the GUID in UTF-16), lower case.
loader_part_uuid() {
    v=/sys/firmware/efi/efivars/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
    [ -r "$v" ] && tail -c +5 "$v" | tr -d '\000' | tr 'A-F' 'a-f'
}

# Wait up to 30 s (USB disks take seconds to appear) until command "$@"
# prints something; print it.
wait_for() {
    tries=0
    while :; do
        out=$("$@")
        [ -n "$out" ] && { echo "$out"; return 0; }
        tries=$((tries + 1))
        [ $tries -gt 300 ] && return 1
        sleep 0.1
    done
}

# Seconds since boot, to two decimals.
now() { cut -d' ' -f1 /proc/uptime; }

# Bring up the network for the root image: the interface with MAC
# $netif, or every wired interface; DHCP until one answers.
net_up() {
    ifaces=
    tries=0
    while [ -z "$ifaces" ]; do
        for d in /sys/class/net/*; do
            [ -e "$d/device" ] || continue
            n=$(basename "$d")
            if [ -z "$netif" ] || [ "$(cat "$d/address")" = "$netif" ]; then
                ifaces="$ifaces $n"
            fi
        done
        tries=$((tries + 1))
        if [ -z "$ifaces" ] && [ $tries -gt 200 ]; then
            fail "no network interface${netif:+ with MAC $netif} after 20 s (is its driver in the initramfs?)"
        fi
        [ -z "$ifaces" ] && sleep 0.1
    done
    for n in $ifaces; do ip link set "$n" up; done
    for n in $ifaces; do
        if udhcpc -i "$n" -n -q -t 10 -T 2 -s /etc/kiln/udhcpc.sh >/dev/null 2>&1; then
            log "network: $n has $(ip -o -4 addr show dev "$n" | awk '{print $4}')"
            return 0
        fi
    done
    fail "no DHCP answer on$ifaces"
}

# Wait until no partition or USB device has come or gone for 2 s (at
# most 15 s): disks appear one by one (a USB stick seconds after an
# NVMe disk, usb-storage waits a second before scanning), and every copy
# of the boot partition must be seen before one is trusted.
settle_disks() {
    seen='' same=0 tries=0
    while [ $same -lt 20 ] && [ $tries -lt 150 ]; do
        cur=$(cat /proc/partitions; ls /sys/bus/usb/devices 2>/dev/null)
        if [ "$cur" = "$seen" ]; then same=$((same + 1)); else same=0; seen=$cur; fi
        tries=$((tries + 1))
        sleep 0.1
    done
}

# Set boot_disk to the disk this boot came from: the one holding the
# partition systemd-boot was loaded from. Copies of one image carry the
# same GUIDs: if several disks hold that partition, touch none of them.
find_boot_disk() {
    esp_uuid=$(loader_part_uuid)
    if [ -n "$esp_uuid" ]; then
        wait_for disks_with_part "$esp_uuid" >/dev/null \
            || fail "no disk holds partition $esp_uuid, which systemd-boot was loaded from (waited 30 s; is the disk's driver in the initramfs?)"
        settle_disks
        boot_disk=$(disks_with_part "$esp_uuid")
        how="systemd-boot was loaded from its partition $esp_uuid"
        what="partition $esp_uuid, the one systemd-boot was loaded from"
    else
        wait_for disks_with_name "root-$slot" >/dev/null \
            || fail "no partition named root-$slot after 30 s"
        settle_disks
        boot_disk=$(disks_with_name "root-$slot")
        how="the only disk with a root-$slot partition; no LoaderDevicePartUUID, so not started by systemd-boot"
        what="a partition named root-$slot, and the boot loader did not say which one it was loaded from"
    fi
    case "$boot_disk" in
        *" "*) fail "disks $(echo "/dev/$boot_disk" | sed 's| | and /dev/|g') each hold $what: they are copies of one image and kiln cannot tell which one booted, so it uses none of them. Unplug all but one and boot again. To keep a node's image on two disks of one machine, install it with kiln-install: an installed disk gets partition GUIDs of its own." ;;
    esac
    log "booted from /dev/$boot_disk ($how)"
}

# Netboot: set boot_disk to this node's own kiln disk, if one is attached
# (its GPT disk GUID is the one in the node's seed); other kiln disks are
# left alone.
find_node_disk() {
    boot_disk=
    guid=$(cat /seed/etc/kiln/disk-guid 2>/dev/null)
    for d in $(disks_with_name state); do
        if [ -n "$guid" ] && [ "$(disk_guid "$d")" = "$guid" ]; then
            boot_disk="${boot_disk:+$boot_disk }$d"
        else
            log "/dev/$d is a kiln disk of another node or image (disk GUID $(disk_guid "$d")): not touching it"
        fi
    done
    case "$boot_disk" in
        *" "*) fail "disks $(echo "/dev/$boot_disk" | sed 's| | and /dev/|g') each carry this node's disk GUID $guid: kiln cannot tell which one holds its /var, so it uses none of them. Unplug all but one and boot again." ;;
        "") ;;
        *) log "this node's kiln disk is /dev/$boot_disk (disk GUID $guid)" ;;
    esac
}

if [ -n "$root_url" ]; then
    [ -n "$root_sha" ] || fail "kiln.root is set but kiln.root.sha256 is not: a root image that cannot be verified is not booted"
    net_up
    # A tmpfs of its own: switch_root empties the initramfs, and the
    # running system keeps the image at /run/kiln/netroot.
    mkdir -p /netroot
    mount -t tmpfs -o mode=0700 tmpfs /netroot
    log "fetching the root image from $root_url"
    t0=$(now)
    n=0
    until wget -q -O /netroot/root.sqfs "$root_url"; do
        n=$((n + 1))
        [ $n -ge 5 ] && fail "cannot fetch the root image from $root_url (5 tries; is kiln serve running and reachable?)"
        log "fetching $root_url failed; retrying in $n s"
        rm -f /netroot/root.sqfs
        sleep $n
    done
    size=$(wc -c < /netroot/root.sqfs)
    log "root image fetched: $size bytes in $(awk "BEGIN{print $(now) - $t0}") s"
    got=$(sha256sum /netroot/root.sqfs | cut -d' ' -f1)
    if [ "$got" != "$root_sha" ]; then
        rm -f /netroot/root.sqfs
        fail "root image from $root_url has sha256 $got but this boot expects $root_sha: refusing to boot it (a tampered or stale file on the server; rebuild with kiln build --format pxe and serve that tree)"
    fi
    log "root image sha256 verified"
    mount -t squashfs -o ro,loop /netroot/root.sqfs /sysroot || fail "cannot mount the root image from $root_url as squashfs"
    log "root mounted read-only (from the network, in RAM)"
    find_node_disk
else
    root_name="root-$slot"
    find_boot_disk
    part=$(part_on "$boot_disk" "$root_name") || fail "/dev/$boot_disk, the disk this boot came from, has no partition named $root_name"
    log "root $root_name is /dev/$part"
    mount -t squashfs -o ro "/dev/$part" /sysroot || fail "cannot mount /dev/$part ($root_name) as squashfs"
    log "root mounted read-only"
fi

# /run in RAM (systemd keeps it), and /etc writable in RAM over the image's.
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /sysroot/run
mkdir -p /sysroot/run/kiln/etc-upper /sysroot/run/kiln/etc-work
mount -t overlay overlay -o lowerdir=/sysroot/etc,upperdir=/sysroot/run/kiln/etc-upper,workdir=/sysroot/run/kiln/etc-work /sysroot/etc \
    || fail "cannot overlay /etc"
echo "$slot" > /sysroot/run/kiln/slot
# The disk kiln-update, kiln-install and the boot check work on.
[ -n "$boot_disk" ] && echo "$boot_disk" > /sysroot/run/kiln/disk
if [ -n "$root_url" ]; then
    mkdir -p /sysroot/run/kiln/netroot
    mount --move /netroot /sysroot/run/kiln/netroot
    echo "$root_url" > /sysroot/run/kiln/root-url
fi
# /tmp in RAM: systemd needs a writable /tmp to set up PrivateDevices=.
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /sysroot/tmp

# Run one of the image's own programs (mkfs, sfdisk, resize2fs) with the
# image's libraries.
in_root() {
    mount --bind /dev /sysroot/dev && mount --bind /proc /sysroot/proc && mount --bind /sys /sysroot/sys
    chroot /sysroot "$@"
    rc=$?
    umount /sysroot/sys /sysroot/proc /sysroot/dev
    return $rc
}

state_fs=
grown=
if [ -n "$boot_disk" ] && state=$(part_on "$boot_disk" state); then
    # Grow the state partition to the end of its disk (a 16 GB stick and a
    # 1 TB disk both get all their space). sfdisk moves the backup GPT to
    # the end first; the kernel learns the new size through BLKPG.
    disk=$(basename "$(readlink -f "/sys/class/block/$state/..")")
    disk_sectors=$(cat "/sys/class/block/$disk/size")
    start=$(cat "/sys/class/block/$state/start")
    size=$(cat "/sys/class/block/$state/size")
    partn=$(sed -n 's/^PARTN=//p' "/sys/class/block/$state/uevent")
    # 33 sectors of backup GPT + 1 MiB alignment slack
    if [ $((start + size + 2048 + 33)) -lt "$disk_sectors" ]; then
        log "growing /dev/$state to the end of /dev/$disk"
        in_root sfdisk --quiet --relocate gpt-bak-std "/dev/$disk" \
            && echo ",+" | in_root sfdisk --quiet --force --no-reread --no-tell-kernel -N "$partn" "/dev/$disk" \
            && newsize=$(in_root sfdisk --dump "/dev/$disk" | sed -n "s|^/dev/$state .*size= *\([0-9]*\),.*|\1|p") \
            && [ -n "$newsize" ] && in_root resizepart "/dev/$disk" "$partn" "$newsize" \
            && grown=1 || log "could not grow /dev/$state; continuing with its current size"
    fi
    # ext4 magic 0xEF53 at byte 1080 of the partition.
    magic=$(dd if="/dev/$state" bs=2 skip=540 count=1 2>/dev/null | hexdump -e '1/2 "%04x"')
    if [ "$magic" != "ef53" ]; then
        log "formatting /dev/$state (first boot)"
        uuid=$(cat /proc/sys/kernel/random/uuid)
        seed=$(cat /proc/sys/kernel/random/uuid)
        # -U and hash_seed from the kernel: mke2fs would otherwise wait for entropy.
        in_root mkfs.ext4 -q -F -L state -U "$uuid" -E "hash_seed=$seed" "/dev/$state" || fail "cannot format /dev/$state"
    fi
    mount -t ext4 -o noatime "/dev/$state" /sysroot/var || fail "cannot mount /dev/$state on /var"
    if [ -n "$grown" ]; then
        in_root resize2fs "/dev/$state" >/dev/null 2>&1 && log "grew the state file system" || log "could not grow the state file system"
    fi
    state_fs="/dev/$state"
    log "state /dev/$state mounted on /var"
else
    mount -t tmpfs -o mode=0755 tmpfs /sysroot/var
    log "no state partition: /var is in RAM and is lost at shutdown (diskless)"
fi

# journald keeps the journal on /var only if the directory exists when it
# flushes, which is before systemd-tmpfiles seeds /var on the first boot.
mkdir -p /sysroot/var/log/journal

# The machine id stays with the node (journals and DHCP leases use it).
mkdir -p /sysroot/var/lib/kiln
if [ ! -s /sysroot/var/lib/kiln/machine-id ]; then
    tr -d '-' < /proc/sys/kernel/random/uuid > /sysroot/var/lib/kiln/machine-id
fi
cp /sysroot/var/lib/kiln/machine-id /sysroot/etc/machine-id

# /var in fstab so systemd knows it is mounted (and unmounts it at shutdown).
if [ -n "$state_fs" ]; then
    echo "$state_fs /var ext4 noatime 0 0" > /sysroot/etc/fstab
else
    : > /sysroot/etc/fstab
fi

# The node seed: this node's rendered files, concatenated to the initramfs.
if [ -d /seed ]; then
    cp -a /seed/. /sysroot/ || fail "cannot copy the node seed into place"
    log "node seed in place ($(cat /seed/etc/hostname 2>/dev/null))"
else
    log "no node seed: booting the image without node configuration"
fi

umount /sys/firmware/efi/efivars 2>/dev/null
mount --move /dev /sysroot/dev
mount --move /proc /sysroot/proc
mount --move /sys /sysroot/sys
log "switch_root"
exec switch_root /sysroot /sbin/init
