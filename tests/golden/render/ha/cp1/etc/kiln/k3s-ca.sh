#!/bin/sh
# Rendered by kiln from ha.toml (cluster ha). Do not edit: change the profile and rebuild.
# Copy the cluster CA kiln holds into k3s's tls directory, never over a file
# k3s already has.
set -eu
src=/etc/kiln/k3s-ca
dst=/var/lib/rancher/k3s/server/tls
files="server-ca.crt server-ca.key client-ca.crt client-ca.key request-header-ca.crt request-header-ca.key etcd/peer-ca.crt etcd/peer-ca.key etcd/server-ca.crt etcd/server-ca.key service.key"
say() { echo "kiln-k3s-ca: $*"; }

# Certificates decide: keys may differ in encoding (k3s writes SEC1 and
# PKCS#1, kiln keeps PKCS#8) and kiln checked each key against its
# certificate when it read the set.
differ=""
missing=""
for f in $files; do
    if [ ! -e "$dst/$f" ]; then
        missing="$missing $f"
    else
        case "$f" in
            *.crt) cmp -s "$src/$f" "$dst/$f" || differ="$differ $f" ;;
        esac
    fi
done

if [ -n "$differ" ]; then
    say "k3s already has a cluster CA in $dst that is not the one kiln holds (differs:$differ); keeping k3s's."
    say "Agents joining with kiln's token will refuse this server (CA hash mismatch)."
    say "fix: copy those files from $dst into the k3s-ca/ directory of the profile's state directory and rebuild the nodes (keys must be PKCS#8: openssl pkcs8 -topk8 -nocrypt)."
    exit 0
fi
if [ -z "$missing" ]; then
    say "the cluster CA kiln holds is in place in $dst"
    exit 0
fi

# k3s's own directories keep k3s's modes; only the two kiln fills are private.
mkdir -p "$(dirname "$dst")"
umask 077
mkdir -p "$dst/etcd"
for f in $missing; do
    case "$f" in
        *.key) mode=600 ;;
        *) mode=644 ;;
    esac
    install -m "$mode" "$src/$f" "$dst/$f.kiln-new"
    mv -f "$dst/$f.kiln-new" "$dst/$f"
done
sync
say "put the cluster CA kiln holds in $dst for k3s's first start:$missing"
