//! `kiln keys`: each node's WireGuard public key, the `[Peer]` stanzas for
//! an external hub, and `known_hosts` lines for the nodes' SSH host keys
//! (private keys and node passwords are never printed), and the hash of
//! the cluster's server CA.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::plan::{NodePlan, Plan};
use crate::config::secrets::ClusterSecrets;
use crate::render;

/// `kiln keys PROFILE`: load (creating keys on first use) and print them;
/// with `known_hosts_only`, only the `known_hosts` lines.
pub fn run(profile: &Path, state_dir: Option<&Path>, known_hosts_only: bool) -> anyhow::Result<()> {
    let (plan, secrets) = crate::config::secrets::load_with_secrets(profile, state_dir)?;
    if known_hosts_only {
        print!("{}", known_hosts(&plan, &secrets));
    } else {
        print!("{}", keys(&plan, &secrets));
    }
    Ok(())
}

/// `kiln keys`: public keys, the `[Peer]` stanzas for an external hub, and
/// the `known_hosts` lines.
pub fn keys(plan: &Plan, secrets: &ClusterSecrets) -> String {
    let mut s = String::new();
    let public = secrets.public_keys();
    for n in &plan.nodes {
        let _ = writeln!(s, "{}\t{}", n.name, public[&n.name]);
    }
    if plan.wireguard.is_some() {
        s.push('\n');
        s.push_str(&render::hub_peer_stanzas(
            plan,
            &public,
            &secrets.operator_public_keys(),
        ));
    }
    let _ = write!(
        s,
        "\n# k3s server CA: the SHA-256 of server-ca.crt, as the join token (K10…) pins it\nserver-ca\tsha256:{}\n",
        secrets.cluster_ca.server_ca_hash()
    );
    s.push_str("\n# SSH host keys, for ~/.ssh/known_hosts (`kiln keys --known-hosts` prints only these lines)\n");
    s.push_str(&known_hosts(plan, secrets));
    s
}

/// One `known_hosts` line per node: its names and addresses, then its SSH
/// host public key.
pub fn known_hosts(plan: &Plan, secrets: &ClusterSecrets) -> String {
    let mut s = String::new();
    for n in &plan.nodes {
        let _ = writeln!(
            s,
            "{} {}",
            host_patterns(plan, n).join(","),
            secrets.ssh_host_keys[&n.name].public_key_text()
        );
    }
    s
}

/// The names and addresses an operator reaches a node by: node name,
/// host name (if different), static LAN address, WireGuard address.
fn host_patterns(plan: &Plan, n: &NodePlan) -> Vec<String> {
    let mut names = vec![n.name.clone()];
    let mut add = |s: String| {
        if !names.contains(&s) {
            names.push(s);
        }
    };
    add(n.hostname.clone());
    if let Some(ip) = n.lan_address {
        add(ip.to_string());
    }
    if plan.wireguard.is_some()
        && let Some(ip) = n.wireguard_address
    {
        add(ip.to_string());
    }
    names
}
