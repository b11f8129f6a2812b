#!/bin/sh
# Rendered by kiln from club.toml (cluster club). Do not edit: change the profile and rebuild.
# Make this node's SSH host keys once, on the state partition.
set -eu
dir=/var/lib/kiln/ssh
mkdir -p "$dir"
chmod 700 "$dir"
for t in ed25519 ecdsa rsa; do
  [ -s "$dir/ssh_host_${t}_key" ] || ssh-keygen -q -t "$t" -N '' -C "$(cat /etc/hostname)" -f "$dir/ssh_host_${t}_key"
done
