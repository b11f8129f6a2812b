//! `kiln keys`: each node's WireGuard public key, and the `[Peer]`
//! stanzas for an external hub (private keys are never printed).

use std::fmt::Write as _;
use std::path::Path;

use crate::config::plan::Plan;
use crate::config::secrets::ClusterSecrets;
use crate::render;

/// `kiln keys PROFILE`: load (creating keys on first use) and print them.
pub fn run(profile: &Path, state_dir: Option<&Path>) -> anyhow::Result<()> {
    let (plan, secrets) = crate::config::secrets::load_with_secrets(profile, state_dir)?;
    print!("{}", keys(&plan, &secrets));
    Ok(())
}

/// `kiln keys`: public keys, and the `[Peer]` stanzas for an external hub.
pub fn keys(plan: &Plan, secrets: &ClusterSecrets) -> String {
    let mut s = String::new();
    let public = secrets.public_keys();
    for n in &plan.nodes {
        let _ = writeln!(s, "{}\t{}", n.name, public[&n.name]);
    }
    if plan.wireguard.is_some() {
        s.push('\n');
        s.push_str(&render::hub_peer_stanzas(plan, &public));
    }
    s
}
