#!/bin/bash
# kiln-update: put a new kiln image into this node's inactive A/B slot.
#
#   kiln-update [--server URL | --bundle URL] [--reboot]
#   kiln-update --rollback [--reboot]
#   kiln-update --status
#
# The bundle (written by `kiln build --format pxe`, served by `kiln serve`
# at URL/update/<node>.txt) names the root image, kernel, initramfs and
# node seed with their sha256. kiln-update checks the bundle is for this
# node and that the root image fits the slot before writing anything,
# writes the root image into the inactive slot's partition and reads it
# back, copies the boot files to the ESP, and adds a Boot Loader Spec
# entry with boot counting (kiln-<slot>+3.conf) that sorts first. The new
# slot is blessed (its counter removed) only once k3s is active
# (kiln-boot-check.service); after 3 failed tries systemd-boot returns to
# the old slot and the failure is recorded in /var/lib/kiln/update-status.
#
# On a server, before the slot is written, it snapshots k3s's datastore
# into /var (see take_snapshot), because k3s does not support downgrades:
# a rollback to the old slot needs the datastore as it was before the new
# k3s touched it. If the snapshot fails, nothing is written.
# The state partition (/var) is never written otherwise, except the status
# files.
set -euo pipefail

TRIES=3
ESP_MNT=/run/kiln/esp
WORK=/run/kiln/update
STATUS=/var/lib/kiln/update-status
# The path of the snapshot taken before the last update (kept when
# kiln-boot-check rewrites the status).
SNAPSHOT_STATUS=/var/lib/kiln/update-snapshot
K3S=/usr/local/bin/k3s
K3S_DATA=/var/lib/rancher/k3s
K3S_CONFIG=/etc/rancher/k3s/config.yaml
# Where the SQLite copies go; k3s puts etcd snapshots in
# $K3S_DATA/server/db/snapshots (its --etcd-snapshot-dir default).
SQLITE_SNAPSHOTS=/var/lib/kiln/snapshots

say() { echo "kiln-update: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

server='' bundle='' reboot='' mode=update
while [ $# -gt 0 ]; do
    case "$1" in
        --server) server="${2:?--server needs a URL}"; shift 2 ;;
        --bundle) bundle="${2:?--bundle needs a URL}"; shift 2 ;;
        --reboot) reboot=1; shift ;;
        --rollback) mode=rollback; shift ;;
        --status) mode=status; shift ;;
        -h|--help) usage 0 ;;
        *) say "unknown argument: $1"; usage 2 ;;
    esac
done

slot=$(cat /run/kiln/slot 2>/dev/null || true)
case "$slot" in
    a) other=b ;;
    b) other=a ;;
    net) die "this node booted from the network: it updates by netbooting the new tree (reboot it)" ;;
    *) die "cannot tell which slot is running (/run/kiln/slot: '$slot')" ;;
esac

# Partitions by GPT name, only on the disk this node booted from (kiln's
# init records it in /run/kiln/disk): never another disk's slots.
DISK=$(cat /run/kiln/disk 2>/dev/null || true)
[ -n "$DISK" ] || die "cannot tell which disk this node booted from (/run/kiln/disk is missing; an image older than kiln-update?)"
find_part() {
    local u
    for u in /sys/block/"$DISK"/"$DISK"*/uevent; do
        if grep -qx "PARTNAME=$1" "$u" 2>/dev/null; then
            basename "$(dirname "$u")"
            return 0
        fi
    done
    return 1
}

mount_esp() {
    local esp
    esp=$(find_part ESP) || die "no partition named ESP on /dev/$DISK"
    mkdir -p "$ESP_MNT"
    if ! mountpoint -q "$ESP_MNT"; then
        mount -t vfat -o umask=0077 "/dev/$esp" "$ESP_MNT" || die "cannot mount /dev/$esp (ESP)"
        trap 'sync; umount "$ESP_MNT" 2>/dev/null || true' EXIT
    fi
}

ENTRIES="$ESP_MNT/loader/entries"

# The entry file of a slot (kiln-b.conf, kiln-b+2-1.conf, ...), if any.
entry_of() {
    local f
    for f in "$ENTRIES/kiln-$1.conf" "$ENTRIES/kiln-$1+"*.conf; do
        [ -e "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

version_of() { sed -n 's/^version //p' "$1" | head -1; }

# The highest generation among the entries (each entry's `version`).
top_generation() {
    local f v top=0
    for f in "$ENTRIES"/kiln-*.conf; do
        [ -e "$f" ] || continue
        v=$(version_of "$f")
        case "$v" in ''|*[!0-9]*) continue ;; esac
        [ "$v" -gt "$top" ] && top=$v
    done
    echo "$top"
}

# kiln-b+0-3.conf: no tries left.
is_bad() { case "$(basename "$1")" in *+0-*.conf|*+0.conf) return 0 ;; esac; return 1; }

fetch() { # URL FILE
    busybox wget -q -O "$2" "$1" || die "cannot fetch $1"
}

check_sha() { # FILE SHA WHAT
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [ "$got" = "$2" ] || die "$3 has sha256 $got, the bundle says $2: not installing it"
}

field() { sed -n "s/^$1=//p" "$WORK/bundle.txt" | head -1; }

# This node's role, from /etc/kiln/node: kiln writes `role=` there from
# the profile's typed role, in every seed, and nothing else decides it. (The
# k3s config only implies the role: a joining server and an agent both
# have `server:`.)
node_role() { sed -n 's/^role=//p' /etc/kiln/node 2>/dev/null | head -1; }

# The datastore of this server: `etcd` or `sqlite`. Embedded etcd when the
# rendered config starts the cluster (`cluster-init: true`) or joins
# another server (`server:`, which kiln writes only on a server that joins
# an HA cluster), or when etcd's data already exists: k3s keeps using etcd
# once it has it, even without cluster-init. Otherwise k3s's default,
# kine on SQLite.
datastore() {
    if grep -Eq '^cluster-init:[[:space:]]*true' "$K3S_CONFIG" 2>/dev/null \
        || grep -q '^server:' "$K3S_CONFIG" 2>/dev/null \
        || [ -d "$K3S_DATA/server/db/etcd" ]; then
        echo etcd
    else
        echo sqlite
    fi
}

# A snapshot name: letters, digits, dots and dashes only (k3s uses it in
# file names and in the names of its ETCDSnapshotFile objects, which must
# be DNS subdomains): v1.31.1+k3s1 becomes v1.31.1-k3s1.
snapshot_name() { # FROM TO
    echo "kiln-pre-update-$1-to-$2" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9.\n-' '-'
}

# Snapshot the datastore of this server into /var; print the snapshot's
# path. Dies (before anything is written to the other slot) if it cannot.
take_snapshot() { # NAME NODE
    local name="$1" node="$2" path
    case "$(datastore)" in
        etcd)
            # k3s asks the running server to save a snapshot of etcd; the
            # file is NAME-NODE-UNIXTIME in server/db/snapshots.
            say "snapshotting etcd: k3s etcd-snapshot save --name $name"
            "$K3S" etcd-snapshot save --name "$name" >&2 \
                || die "k3s etcd-snapshot save failed (above): not updating without a snapshot of the datastore; nothing was written to slot $other. Fix k3s (systemctl status k3s) and try again"
            # shellcheck disable=SC2012 # names are ours: no newlines
            path=$(ls -t "$K3S_DATA/server/db/snapshots/$name-"* 2>/dev/null | head -1)
            [ -n "$path" ] || path="$name (k3s etcd-snapshot ls)"
            echo "$path"
            ;;
        sqlite)
            snapshot_sqlite "$name-$node-$(date +%s)"
            ;;
    esac
}

# A consistent copy of k3s's SQLite datastore. kine opens state.db inside
# the k3s server process and nothing else writes it. With k3s stopped
# (KillMode=process stops just that process; pods keep running) no
# transaction is open, so state.db together with its -wal and -shm files
# as they are on disk is a committed state of the database: SQLite
# replays the WAL when the copy is opened, as after a clean shutdown. The
# copy is compared with the source before k3s starts again, goes into a
# temporary directory first and is renamed into place, so a snapshot
# directory is always complete. k3s is down for the copy only.
snapshot_sqlite() { # NAME
    local db="$K3S_DATA/server/db/state.db" dir="$SQLITE_SNAPSHOTS/$1" tmp active=''
    tmp="$dir.tmp"
    [ -s "$db" ] || die "no SQLite datastore at $db to snapshot (has k3s ever started here?): not updating without one; nothing was written to slot $other"
    # The datastore holds the cluster's secrets: root only, as k3s keeps it.
    if ! { mkdir -p "$SQLITE_SNAPSHOTS" && chmod 0700 "$SQLITE_SNAPSHOTS" && rm -rf "$tmp" && mkdir -m 0700 "$tmp"; }; then
        die "cannot create $tmp for the datastore snapshot: nothing was written to slot $other"
    fi
    [ "$(systemctl is-active k3s)" = active ] && active=1
    say "snapshotting SQLite: stopping k3s to copy $db"
    systemctl stop k3s || die "cannot stop k3s to snapshot its datastore: nothing was written to slot $other"
    local f ok=1
    for f in "$db" "$db-wal" "$db-shm"; do
        [ -e "$f" ] || continue
        if ! { cp --preserve=mode,timestamps "$f" "$tmp/" && cmp -s "$f" "$tmp/$(basename "$f")"; }; then
            ok=''
            break
        fi
    done
    if [ -n "$ok" ] && ! { sync -f "$tmp" && mv "$tmp" "$dir" && sync -f "$SQLITE_SNAPSHOTS"; }; then
        ok=''
    fi
    if [ -n "$active" ]; then
        systemctl start k3s || say "warning: k3s did not start again after the snapshot (systemctl status k3s)"
    fi
    if [ -z "$ok" ]; then
        rm -rf "$tmp"
        die "copying $db to $dir failed (is /var full?): not updating without a snapshot of the datastore; nothing was written to slot $other"
    fi
    echo "$dir"
}

do_status() {
    mount_esp
    echo "running slot: $slot ($(sed -n 's/^k3s //p' /usr/lib/kiln/image))"
    for s in a b; do
        if f=$(entry_of $s); then
            state=good
            is_bad "$f" && state="failed (no tries left)"
            case "$(basename "$f")" in *+*) is_bad "$f" || state="on trial ($(basename "$f"))" ;; esac
            echo "slot $s: generation $(version_of "$f"), $state: $(sed -n 's/^title //p' "$f")"
        else
            echo "slot $s: empty"
        fi
    done
    [ -f "$STATUS" ] && echo "last update: $(cat "$STATUS")"
    [ -f "$SNAPSHOT_STATUS" ] && echo "datastore snapshot before the last update: $(cat "$SNAPSHOT_STATUS")"
    return 0
}

do_rollback() {
    mount_esp
    local f
    f=$(entry_of "$other") || die "slot $other has no boot entry: nothing to roll back to"
    is_bad "$f" && die "slot $other failed its boot tries ($(basename "$f")): not rolling back to it"
    local gen=$(( $(top_generation) + 1 ))
    sed -i "s/^version .*/version $gen/" "$f"
    sync
    say "slot $other (generation $gen) boots next; slot $slot stays as the fallback"
    echo "rollback: $(date -u +%FT%TZ) from slot $slot to slot $other by hand" > "$STATUS"
    if [ "$(node_role)" = server ] && [ -s "$SNAPSHOT_STATUS" ]; then
        say "k3s does not support downgrades: restore the datastore from $(cat "$SNAPSHOT_STATUS") after the reboot (README, Upgrades)"
    fi
}

do_update() {
    local node cluster
    # The node's name in the profile (its host name may differ).
    node=$(sed -n 's/^name=//p' /etc/kiln/node 2>/dev/null || true)
    [ -n "$node" ] || node=$(hostname)
    cluster=$(sed -n 's/^cluster=//p' /etc/kiln/node 2>/dev/null || true)
    if [ -z "$bundle" ]; then
        [ -z "$server" ] && [ -s /etc/kiln/update-server ] && server=$(cat /etc/kiln/update-server)
        [ -n "$server" ] || die "no update server: pass --server URL (kiln serve's address) or --bundle URL, or put the URL in /etc/kiln/update-server"
        bundle="${server%/}/update/$node.txt"
    fi
    local base="${bundle%/update/*}"
    rm -rf "$WORK"; mkdir -p "$WORK"; chmod 0700 "$WORK"
    say "fetching $bundle"
    fetch "$bundle" "$WORK/bundle.txt"
    [ "$(field format)" = 1 ] || die "$bundle is not a kiln update bundle (format 1)"
    [ "$(field node)" = "$node" ] || die "the bundle is for node $(field node), this is $node"
    if [ -n "$cluster" ] && [ "$(field cluster)" != "$cluster" ]; then
        die "the bundle is for cluster $(field cluster), this node is in $cluster"
    fi

    local part size slot_bytes
    part=$(find_part "root-$other") || die "no partition root-$other on /dev/$DISK"
    size=$(field root_size)
    slot_bytes=$(( $(cat "/sys/class/block/$part/size") * 512 ))
    [ "$size" -le "$slot_bytes" ] || die "the root image ($size bytes) does not fit slot $other (/dev/$part, $slot_bytes bytes): nothing was written; rebuild the disk image with a larger slot"
    local k3s_new
    k3s_new=$(field k3s_version)
    say "installing k3s $k3s_new (kiln $(field kiln_version)) into slot $other"

    # Boot files first, into RAM, checked before anything is written.
    for f in vmlinuz initrd seed; do
        local url
        url="$base/$(field "$f")"
        [ "$f" = seed ] && url="$url?key=$(cat /etc/kiln/update-key)"
        fetch "$url" "$WORK/$f"
        check_sha "$WORK/$f" "$(field "${f}_sha256")" "$f"
    done

    # On a server, the datastore snapshot: before anything is written.
    local snapshot='' role
    role=$(node_role)
    case "$role" in
        server)
            snapshot=$(take_snapshot "$(snapshot_name "$(sed -n 's/^k3s //p' /usr/lib/kiln/image)" "$k3s_new")" "$node") || exit 1
            echo "$snapshot" > "$SNAPSHOT_STATUS.new" && mv "$SNAPSHOT_STATUS.new" "$SNAPSHOT_STATUS"
            say "datastore snapshot: $snapshot"
            ;;
        agent) ;;
        *) die "cannot tell this node's role (/etc/kiln/node: role='$role'): not updating, a server needs a datastore snapshot first" ;;
    esac

    # The root image straight into the slot, then read back from the disk.
    say "writing $(field root) ($size bytes) to /dev/$part"
    local got
    got=$(busybox wget -q -O - "$base/$(field root)" | tee "/dev/$part" | sha256sum | cut -d' ' -f1)
    [ "$got" = "$(field root_sha256)" ] || die "the root image arrived with sha256 $got, the bundle says $(field root_sha256); slot $other is left unbootable (no entry points to it)"
    sync
    blockdev --flushbufs "/dev/$part"
    got=$(head -c "$size" "/dev/$part" | sha256sum | cut -d' ' -f1)
    [ "$got" = "$(field root_sha256)" ] || die "reading slot $other back gave sha256 $got: the disk did not keep what was written"
    say "slot $other verified (sha256 $got)"

    mount_esp
    # Remove the old entry of that slot first: from here on it is not bootable.
    local f
    for f in "$ENTRIES/kiln-$other.conf" "$ENTRIES/kiln-$other+"*.conf; do
        [ -e "$f" ] && rm -f "$f"
    done
    mkdir -p "$ESP_MNT/kiln/$other"
    cp "$WORK/vmlinuz" "$ESP_MNT/kiln/$other/vmlinuz"
    cp "$WORK/initrd" "$ESP_MNT/kiln/$other/initrd.img"
    cp "$WORK/seed" "$ESP_MNT/kiln/$other/seed.img"
    local gen=$(( $(top_generation) + 1 ))
    local opts
    opts=$(field options | sed "s/@SLOT@/$other/g")
    cat > "$ENTRIES/kiln-$other+$TRIES.conf.new" <<ENTRY
title kiln $(field cluster)/$node (slot $other, k3s $k3s_new, kernel $(field kernel_version))
version $gen
sort-key kiln
linux /kiln/$other/vmlinuz
initrd /kiln/$other/initrd.img
initrd /kiln/$other/seed.img
options $opts
ENTRY
    sync
    mv "$ENTRIES/kiln-$other+$TRIES.conf.new" "$ENTRIES/kiln-$other+$TRIES.conf"
    sync
    rm -rf "$WORK"
    echo "installed: $(date -u +%FT%TZ) slot $other, k3s $k3s_new, generation $gen, on trial ($TRIES tries)${snapshot:+, datastore snapshot $snapshot}" > "$STATUS"
    say "slot $other boots next (generation $gen, $TRIES tries); it is kept once k3s is active, else slot $slot comes back"
}

case "$mode" in
    status) do_status; exit 0 ;;
    rollback) do_rollback ;;
    update) do_update ;;
esac
if [ -n "$reboot" ]; then
    say "rebooting"
    sync
    systemctl reboot
fi
