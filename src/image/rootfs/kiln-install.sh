#!/bin/bash
# kiln-install: write the image this node booted from onto another disk
# (a kiln USB stick installing itself onto the machine's NVMe or SATA
# disk), then give that disk partition GUIDs of its own and let its state
# partition fill it. The disk this node booted from is only read.
#
#   kiln-install [--yes] [--force] DEVICE
#   kiln-install --unattended      (kiln-install.service: /etc/kiln/install)
#
# What is written is the image as kiln built it: its partition table from
# the ESP (kiln/install/gpt-head, gpt-tail), the ESP and both root slots
# from the boot disk, zeros for the state partition. The sha256 of those
# bytes is printed, and the target is read back and must match; on a
# stick nothing has updated yet, it is the sha256 of the built NODE.img.
#
# Refuses, as `kiln flash` does: the boot disk, a partition, a disk that
# is mounted, in use or read-only, one smaller than the image, and one
# holding partitions that are not kiln's unless --force.
set -euo pipefail

CONFIG=/etc/kiln/install
ESP_MNT=/run/kiln/install-esp
WORK=/run/kiln/install-work
KILN_NAMES=" ESP root-a root-b state "

say() { echo "kiln-install: $*"; }
die() { say "error: $*" >&2; exit 1; }
# Every way out but success says so on the console, where an unattended
# install is watched.
on_exit() {
    local rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 2 ] || say "failed (exit $rc): the target disk does not hold a usable install"
}
trap on_exit EXIT

usage() {
    cat <<'EOF'
usage: kiln-install [--yes] [--force] DEVICE
       kiln-install --unattended

Writes the image this node booted from onto DEVICE (a whole disk, e.g.
/dev/nvme0n1 or /dev/disk/by-id/nvme-...), checks it by reading it back,
gives it partition GUIDs of its own and grows its state partition to the
end of the disk. The disk this node booted from is not written.

  --yes          do not ask before erasing DEVICE
  --force        erase DEVICE even if it holds partitions that are not kiln's
  --unattended   install as /etc/kiln/install says (from the profile's
                 install-device and after-install), then power off or
                 reboot; does nothing when that file is absent
EOF
    exit "${1:-0}"
}

yes='' force='' unattended='' target=''
while [ $# -gt 0 ]; do
    case "$1" in
        --yes) yes=1 ;;
        --force) force=1 ;;
        --unattended) unattended=1 ;;
        -h|--help) usage 0 ;;
        -*) say "unknown option: $1"; usage 2 ;;
        *) [ -z "$target" ] || { say "one DEVICE only"; usage 2; }; target=$1 ;;
    esac
    shift
done

boot=$(cat /run/kiln/disk 2>/dev/null || true)
[ -n "$boot" ] || die "this node did not boot from a kiln disk (/run/kiln/disk is missing): there is no image to install from"

after=
if [ -n "$unattended" ]; then
    [ -e "$CONFIG" ] || exit 0
    target=$(sed -n 's/^device=//p' "$CONFIG")
    after=$(sed -n 's/^after=//p' "$CONFIG")
    [ -n "$target" ] || die "$CONFIG names no device= (set install-device in the profile)"
    yes=1
fi
[ -n "$target" ] || usage 2

# The target by its kernel name; wait a little for it (NVMe and USB
# disks appear while the system starts).
for _ in $(seq 30); do [ -e "$target" ] && break; sleep 1; done
[ -b "$target" ] || die "$target is not a block device (ls /dev/disk/by-id lists this machine's disks)"
dev=$(basename "$(readlink -f "$target")")
if [ ! -d "/sys/block/$dev" ]; then
    [ "$target" = "/dev/$dev" ] || target="$target (/dev/$dev)"
    die "$target is a partition: give the whole disk"
fi

# Refusals.
if [ "$dev" = "$boot" ]; then
    [ -n "$unattended" ] && { say "this node runs from $target (/dev/$dev): already installed, nothing to do"; exit 0; }
    die "$target is the disk this node booted from"
fi
[ "$(cat "/sys/block/$dev/ro")" = 0 ] || die "/dev/$dev is read-only"
majmin() { cat "/sys/class/block/$1/dev"; }
in_use=
for p in "$dev" $(cd "/sys/block/$dev" && ls -d "$dev"* 2>/dev/null); do
    mm=$(majmin "$p")
    if awk -v mm="$mm" '$3 == mm { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        in_use="$in_use /dev/$p (mounted)"
    fi
    grep -q "^/dev/$p " /proc/swaps && in_use="$in_use /dev/$p (swap)"
    [ -n "$(ls "/sys/class/block/$p/holders" 2>/dev/null)" ] && in_use="$in_use /dev/$p (held by $(ls "/sys/class/block/$p/holders"))"
done
[ -z "$in_use" ] || die "/dev/$dev is in use:$in_use; unmount or stop what uses it first"
foreign=
for u in /sys/block/"$dev"/"$dev"*/uevent; do
    [ -e "$u" ] || continue
    name=$(sed -n 's/^PARTNAME=//p' "$u")
    case "$KILN_NAMES" in *" $name "*) ;; *) foreign="$foreign $(basename "$(dirname "$u")")${name:+ ($name)}" ;; esac
done
if [ -n "$foreign" ] && [ -z "$force" ]; then
    die "/dev/$dev holds partitions that are not kiln's:$foreign; kiln-install would erase them. Check it is the right disk (lsblk -o NAME,SIZE,MODEL,PARTLABEL), then add --force"
fi

# What to write: the layout kiln put on the boot disk's ESP.
esp=
for u in /sys/block/"$boot"/"$boot"*/uevent; do
    grep -qx PARTNAME=ESP "$u" && esp=$(basename "$(dirname "$u")")
done
[ -n "$esp" ] || die "no ESP on the boot disk /dev/$boot"
mkdir -p "$ESP_MNT" "$WORK"
mount -t vfat -o ro "/dev/$esp" "$ESP_MNT" || die "cannot mount /dev/$esp (the boot disk's ESP)"
trap 'umount "$ESP_MNT" 2>/dev/null || true; rm -rf "$WORK"' EXIT
install_dir="$ESP_MNT/kiln/install"
[ -r "$install_dir/layout" ] || die "the ESP of /dev/$boot has no kiln/install/layout: this image was built by a kiln without kiln-install; rebuild it"
cp "$install_dir/gpt-head" "$install_dir/gpt-tail" "$install_dir/layout" "$WORK/"
umount "$ESP_MNT"
field() { sed -n "s/^$1=//p" "$WORK/layout"; }
image=$(field image-bytes) head=$(field head-bytes) state=$(field state-start-bytes) tail=$(field tail-bytes)
disk_guid=$(field disk-guid)
for v in "$image" "$head" "$state" "$tail"; do
    case "$v" in ''|*[!0-9]*) die "kiln/install/layout on /dev/$esp is damaged (rebuild the image)" ;; esac
done
if [ "$(stat -c %s "$WORK/gpt-head")" != "$head" ] || [ "$(stat -c %s "$WORK/gpt-tail")" != "$tail" ]; then
    die "kiln/install/gpt-head or gpt-tail on /dev/$esp has the wrong size (rebuild the image)"
fi
size=$(($(cat "/sys/block/$dev/size") * 512))
[ "$size" -ge "$image" ] || die "/dev/$dev has $size bytes; the image needs $image"

if [ -n "$unattended" ] && [ "$(sfdisk --disk-id "/dev/$dev" 2>/dev/null | tr 'A-F' 'a-f')" = "$disk_guid" ]; then
    say "/dev/$dev already holds this node's install (disk GUID $disk_guid): nothing to do. Remove the boot stick to run from it."
    exit 0
fi
if [ -z "$yes" ]; then
    [ -t 0 ] || die "not asking on a non-terminal: add --yes to erase /dev/$dev"
    read -r -p "kiln-install: erase /dev/$dev ($((size / 1000000000)) GB, $(xargs < "/sys/block/$dev/device/model" 2>/dev/null)) and install this node onto it? Type its name ($dev): " answer
    [ "$answer" = "$dev" ] || die "not confirmed; nothing written"
fi

# The image, in order: its GPT head, the boot disk from there to the state
# partition (ESP, both root slots), zeros for the state partition, its
# GPT tail.
image_stream() {
    cat "$WORK/gpt-head"
    dd if="/dev/$boot" bs=4M skip="$head" count=$((state - head)) iflag=skip_bytes,count_bytes status=none
    head -c $((image - tail - state)) /dev/zero
    cat "$WORK/gpt-tail"
}

say "writing this node's image ($image bytes) from /dev/$boot onto /dev/$dev"
t0=$(date +%s)
mkfifo "$WORK/tee"
sha256sum < "$WORK/tee" > "$WORK/written.sha256" &
image_stream | tee "$WORK/tee" | dd of="/dev/$dev" bs=4M iflag=fullblock oflag=direct status=none
wait
written=$(cut -d' ' -f1 "$WORK/written.sha256")
sync
read_back=$(dd if="/dev/$dev" bs=4M count="$image" iflag=direct,count_bytes status=none | sha256sum | cut -d' ' -f1)
[ "$read_back" = "$written" ] || die "/dev/$dev reads back sha256 $read_back, but $written was written: the disk did not keep what was written (a failing disk or cable?)"
say "written and read back in $(($(date +%s) - t0)) s: image sha256 $written"

# A disk of its own: new partition GUIDs (the disk GUID stays the node's),
# so the boot stick and the install are never taken for one another.
for n in $(sfdisk --dump "/dev/$dev" | sed -n 's|^/dev/[^ ]*[^0-9]\([0-9][0-9]*\) :.*|\1|p'); do
    sfdisk --quiet --part-uuid "/dev/$dev" "$n" "$(cat /proc/sys/kernel/random/uuid)" >/dev/null
done
sfdisk --quiet --relocate gpt-bak-std "/dev/$dev"
echo ",+" | sfdisk --quiet -N 4 "/dev/$dev" >/dev/null
partx -u "/dev/$dev" 2>/dev/null || true
say "/dev/$dev has partition GUIDs of its own; its state partition fills the disk ($((size / 1000000)) MB)"
say "done: $target holds this node; it formats its state partition on its first boot"

case "$after" in
    "") ;;
    poweroff) say "powering off: remove the boot stick, then start the machine from $target"; sync; systemctl poweroff ;;
    reboot) say "rebooting from $target (the firmware must boot it before the stick)"; sync; systemctl reboot ;;
    *) die "$CONFIG: after=$after: expected poweroff or reboot" ;;
esac
