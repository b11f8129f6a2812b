//! The cluster CA kiln holds, on the server that starts the cluster (see
//! `config::cluster_ca` for why only that one): the set rides in the seed
//! under `/etc/kiln/k3s-ca` (the root's `/etc` is in RAM), and a unit
//! ordered before k3s copies it into `/var/lib/rancher/k3s/server/tls`
//! (the state partition) where k3s looks for it on its first start.
//!
//! It never overwrites: a file k3s already has is left alone. If k3s's
//! set differs from kiln's (a cluster first started without kiln's CA),
//! the unit says so on the console and keeps k3s's; a set the unit itself
//! left half-copied (power lost) is completed on the next boot.

use std::fmt::Write as _;

use crate::config::cluster_ca::{self, ClusterCa};
use crate::config::plan::Plan;
use crate::render::tree::FileTree;

use super::{SECRET_MODE, header};

/// Where the seed carries the set.
pub const SEED_DIR: &str = "/etc/kiln/k3s-ca";
/// Where k3s reads it (default data dir).
pub const K3S_TLS_DIR: &str = "/var/lib/rancher/k3s/server/tls";
const SCRIPT: &str = "/etc/kiln/k3s-ca.sh";
const UNIT: &str = "kiln-k3s-ca.service";

/// The mode k3s gives a file of the set: keys 0600, certificates 0644.
pub fn k3s_mode(name: &str) -> u32 {
    if cluster_ca::is_key(name) {
        0o600
    } else {
        0o644
    }
}

pub fn render(plan: &Plan, ca: &ClusterCa, tree: &mut FileTree) {
    tree.dir(SEED_DIR, 0o700);
    tree.dir(&format!("{SEED_DIR}/etcd"), 0o700);
    for (name, text) in ca.files() {
        tree.file(&format!("{SEED_DIR}/{name}"), SECRET_MODE, text);
    }
    tree.file(SCRIPT, 0o755, script(plan));
    tree.file(
        &format!("/etc/systemd/system/{UNIT}"),
        0o644,
        format!(
            "{}[Unit]\nDescription=kiln: the cluster CA kiln holds, in place before k3s first starts\nRequiresMountsFor=/var/lib/rancher\nBefore=k3s.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart={SCRIPT}\nStandardOutput=journal+console\n\n[Install]\nRequiredBy=k3s.service\n",
            header("#", plan)
        ),
    );
    // Required by k3s: if the set cannot be put in place, k3s must not
    // start and make a CA of its own.
    tree.symlink(
        &format!("/etc/systemd/system/k3s.service.requires/{UNIT}"),
        &format!("/etc/systemd/system/{UNIT}"),
    );
}

fn script(plan: &Plan) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&header("#", plan));
    let _ = writeln!(
        s,
        "# Copy the cluster CA kiln holds into k3s's tls directory, never over a file\n# k3s already has.\nset -eu\nsrc={SEED_DIR}\ndst={K3S_TLS_DIR}\nfiles=\"{}\"",
        cluster_ca::file_names().join(" ")
    );
    s.push_str(
        r#"say() { echo "kiln-k3s-ca: $*"; }

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
"#,
    );
    s
}
