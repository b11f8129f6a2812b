//! Checks of the cluster CA kiln holds, on a booted node: the server that
//! starts the cluster has kiln's set where k3s reads it (same bytes, k3s's
//! modes) and its token pins that CA; no other node carries a CA key.

use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::config::cluster_ca;
use crate::render::k3s_ca::{K3S_TLS_DIR, SEED_DIR, k3s_mode};
use crate::verify::report::{Check, Expect};
use crate::verify::vm::Vm;

/// `name sha256 mode` per file of the set, as the node has it in
/// `server/tls` (`missing` for an absent file).
pub fn ca_listing(vm: &Vm, key: &Path) -> anyhow::Result<String> {
    let names = cluster_ca::file_names().join(" ");
    vm.sh(
        key,
        &format!("cd {K3S_TLS_DIR} 2>/dev/null; for f in {names}; do if [ -f $f ]; then echo \"$f $(sha256sum < $f | cut -c1-64) $(stat -c %a $f)\"; else echo \"$f missing\"; fi; done"),
    )
}

/// The listing the node should have: kiln's set from its seed.
fn expected_listing(e: &Expect) -> String {
    cluster_ca::file_names()
        .iter()
        .map(|n| {
            let text = e.files.tree.text(&format!("{SEED_DIR}/{n}")).unwrap_or("");
            format!(
                "{n} {} {:o}\n",
                hex::encode(Sha256::digest(text)),
                k3s_mode(n)
            )
        })
        .collect()
}

pub fn check_cluster_ca(
    vm: &Vm,
    key: &Path,
    e: &Expect,
    out: &mut Vec<Check>,
) -> anyhow::Result<()> {
    if !cluster_ca::seeds_ca(e.plan, e.node) {
        let seen = vm.sh(key, &format!("ls -A {SEED_DIR} 2>/dev/null | wc -l"))?;
        out.push(Check::eq("no cluster CA in this node's seed", "0", &seen));
        if e.node.role == crate::config::profile::Role::Agent {
            let keys = vm.sh(
                key,
                &format!("ls {K3S_TLS_DIR}/*.key {K3S_TLS_DIR}/etcd/*.key 2>/dev/null | wc -l"),
            )?;
            out.push(Check::eq("no CA key on an agent", "0", &keys));
        }
        return Ok(());
    }
    let want = expected_listing(e);
    out.push(Check::eq(
        &format!("kiln's cluster CA is in {K3S_TLS_DIR} (sha256, mode)"),
        &want,
        &ca_listing(vm, key)?,
    ));
    let server_ca = e
        .files
        .tree
        .text(&format!("{SEED_DIR}/{}", cluster_ca::SERVER_CA_CRT))
        .unwrap_or("");
    let hash = cluster_ca::ca_hash(server_ca.as_bytes());
    // Only the hash part is read back: the table is printed.
    let pinned = vm.sh(
        key,
        "sed -n 's/^K10\\([0-9a-f]*\\)::.*/\\1/p' /etc/rancher/k3s/cluster-token",
    )?;
    out.push(Check::eq(
        "the token pins the server CA (K10<sha256>)",
        &hash,
        &pinned,
    ));
    if !e.real_k3s {
        let rec = vm.sh(
            key,
            "cat /var/lib/rancher/k3s/double/server 2>/dev/null || true",
        )?;
        let get = |k: &str| {
            rec.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        out.push(Check::eq(
            "k3s (test double) found every CA and made none",
            &format!("found=server-ca,client-ca,request-header-ca,etcd/server-ca,etcd/peer-ca made= server CA {hash}"),
            &format!("{} server CA {}", get("ca"), get("server_ca_sha256")),
        ));
    }
    Ok(())
}
