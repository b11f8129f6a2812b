#!/bin/bash
# kiln-boot-check: bless this slot once k3s is active, or report a failed
# update. Runs once per boot (kiln-boot-check.service).
#
# - On a trial boot (this slot's entry still has a boot counter,
#   kiln-b+2-1.conf): wait for k3s to be active, then remove the counter
#   (what systemd-bless-boot does), which keeps this slot. If k3s does not
#   come up in time, reboot: systemd-boot counts the try, and after the
#   last one boots the other slot.
# - On any boot: if the other slot's entry has no tries left, the last
#   update failed and we are back on this slot: say so on the console and
#   in /var/lib/kiln/update-status.
set -uo pipefail

TIMEOUT=${KILN_BOOT_CHECK_TIMEOUT:-600}
ESP_MNT=/run/kiln/esp-check
STATUS=/var/lib/kiln/update-status

# The unit sends stdout to the journal and the console.
console() { echo "kiln-boot-check: $*"; }

slot=$(cat /run/kiln/slot 2>/dev/null || true)
case "$slot" in a) other=b ;; b) other=a ;; *) exit 0 ;; esac

# The ESP of the disk this node booted from (kiln's init records it).
disk=$(cat /run/kiln/disk 2>/dev/null || true)
esp=
for u in /sys/block/"$disk"/"$disk"*/uevent; do
    grep -qx PARTNAME=ESP "$u" 2>/dev/null && esp=$(basename "$(dirname "$u")")
done
if [ -z "$disk" ] || [ -z "$esp" ]; then
    console "no ESP found on the boot disk (/run/kiln/disk: '$disk')"
    exit 1
fi
mkdir -p "$ESP_MNT"
mount -t vfat -o umask=0077 "/dev/$esp" "$ESP_MNT" || { console "cannot mount the ESP"; exit 1; }
trap 'sync; umount "$ESP_MNT"' EXIT
entries="$ESP_MNT/loader/entries"

trial=
for f in "$entries/kiln-$slot+"*.conf; do [ -e "$f" ] && trial=$f; done
bad=
for f in "$entries/kiln-$other+0-"*.conf "$entries/kiln-$other+0.conf"; do [ -e "$f" ] && bad=$f; done

if [ -n "$bad" ]; then
    msg="update FAILED: slot $other ($(sed -n 's/^title //p' "$bad")) did not come up in its tries; running slot $slot again ($(sed -n 's/^k3s //p' /usr/lib/kiln/image))"
    console "$msg"
    echo "failed: $(date -u +%FT%TZ) $msg" > "$STATUS"
fi

[ -n "$trial" ] || exit 0
console "trial boot of slot $slot ($(basename "$trial")): waiting up to $TIMEOUT s for k3s"
waited=0
until [ "$(systemctl is-active k3s)" = active ]; do
    if [ "$waited" -ge "$TIMEOUT" ]; then
        console "k3s is not active after $TIMEOUT s: rebooting (systemd-boot counts this try)"
        echo "trial failed: $(date -u +%FT%TZ) slot $slot: k3s not active after $TIMEOUT s" > "$STATUS"
        sync
        systemctl reboot
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done
good="$entries/kiln-$slot.conf"
mv "$trial" "$good"
sync
console "slot $slot is good: k3s active, $(basename "$trial") blessed as $(basename "$good")"
echo "ok: $(date -u +%FT%TZ) slot $slot blessed ($(sed -n 's/^k3s //p' /usr/lib/kiln/image))" > "$STATUS"
