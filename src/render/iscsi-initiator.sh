#!/bin/sh
# kiln-iscsi-initiator: give this node its own iSCSI initiator name, made
# once and kept on the state partition, and show it where open-iscsi reads
# it. Runs before iscsid on every boot.
#
# /etc is rebuilt in RAM at each boot, so a name made there would change
# with every boot, and the one Debian's package wrote when the base was
# made would be every node's (kiln drops it from the root image). Storage
# systems (Longhorn) and iSCSI targets know a node by this name, so it is
# made once, in STATE on /var, and never made again while that file
# exists: a file there that holds no name stops iscsid rather than being
# replaced. ETC becomes a symlink to STATE.
#
# Usage: kiln-iscsi-initiator [STATE ETC] (defaults: the node's paths).
set -eu
state=${1:-/var/lib/kiln/iscsi/initiatorname.iscsi}
etc=${2:-/etc/iscsi/initiatorname.iscsi}

say() { echo "kiln-iscsi-initiator: $*"; }

if [ ! -e "$state" ]; then
    # iscsi-iname (open-iscsi 2.1) makes iqn.2016-04.com.open-iscsi:<12 hex
    # digits>; the same from the kernel's random numbers if it is missing.
    if command -v iscsi-iname >/dev/null 2>&1; then
        name=$(iscsi-iname)
    else
        name="iqn.2016-04.com.open-iscsi:$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
    fi
    dir=$(dirname "$state")
    mkdir -p "$dir"
    chmod 700 "$dir"
    # A new file, then a rename: a boot cut short never leaves half a name.
    umask 077
    printf '## kiln: the iSCSI initiator name of this node, made once; keep it.\nInitiatorName=%s\n' "$name" > "$state.new"
    mv -f "$state.new" "$state"
    sync
    say "made $name in $state"
fi

if ! grep -q '^InitiatorName=iqn\.[0-9][0-9][0-9][0-9]-[0-9][0-9]\.[^[:space:]]' "$state"; then
    say "FAILED: $state holds no InitiatorName=iqn.... line; iscsid is not started."
    say "Restore the node's name there (targets know it by that name), or remove the file to make a new one."
    exit 1
fi

mkdir -p "$(dirname "$etc")"
ln -sfn "$state" "$etc"
say "$etc -> $state ($(sed -n 's/^InitiatorName=//p' "$state"))"
