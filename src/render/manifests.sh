#!/bin/sh
# deploy-manifests: put this slot's k3s manifests into k3s's server/manifests
# as real files, before k3s starts (k3s does not follow symlinks there,
# k3s-io/k3s#9288).
#
# The root image carries every manifest of the profile in SRC; the node's
# seed lists the ones this server deploys, with their sha256, in LIST
# (sha256sum's format). Only files named kiln-*.yaml in DST are kiln's:
# each listed one is written when it differs, each unlisted one is removed
# (an update that drops a manifest drops its file; k3s keeps what it had
# created from it), and every other file is left alone.
#
# Usage: deploy-manifests [SRC LIST DST] (defaults: the node's paths).
set -eu
src=${1:-/usr/lib/kiln/manifests}
list=${2:-/etc/kiln/manifests.sha256}
dst=${3:-/var/lib/rancher/k3s/server/manifests}

say() { echo "kiln-manifests: $*"; }

# The files must be the ones the seed names: a seed and a root image of
# different builds would deploy a set nobody wrote.
if [ -s "$list" ] && ! bad=$( (cd "$src" && sha256sum --check --quiet --strict) < "$list" 2>&1); then
    say "FAILED: the manifests in $src are not the ones $list names; k3s is not started:"
    echo "$bad" | sed 's/^/  /'
    exit 1
fi

mkdir -p "$dst"
# A copy cut short (power lost) is never a .yaml file k3s would read.
rm -f "$dst"/.kiln-*.kiln-new
written=""
same=""
while read -r _ name; do
    [ -n "$name" ] || continue
    if [ -f "$dst/$name" ] && [ ! -L "$dst/$name" ] && cmp -s "$src/$name" "$dst/$name"; then
        same="$same $name"
        continue
    fi
    # A new file, then a rename: k3s never reads half a manifest, and a
    # symlink in its place is replaced, not followed.
    install -m 600 "$src/$name" "$dst/.$name.kiln-new"
    mv -f "$dst/.$name.kiln-new" "$dst/$name"
    written="$written $name"
done < "$list"

removed=""
for f in "$dst"/kiln-*.yaml; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    name=${f##*/}
    if ! awk -v n="$name" '$2 == n { found = 1 } END { exit !found }' "$list"; then
        rm -f "$f"
        removed="$removed $name"
    fi
done
sync
say "in $dst: written:${written:- none}; unchanged:${same:- none}; removed:${removed:- none}"
