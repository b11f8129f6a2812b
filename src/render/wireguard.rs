//! WireGuard, configured for `wg-quick`.
//!
//! Why wg-quick rather than systemd-networkd: it gives the tunnel its own
//! unit (`wg-quick@wg0.service`) that nftables and k3s can be ordered
//! against, the key stays in one root-only file (networkd would need it
//! readable by the `systemd-network` user, whose id only the image knows),
//! and the file is the one every WireGuard guide and an external hub's
//! operator already reads.
//!
//! An endpoint given by DNS name is not in the wg-quick file: `wg setconf`
//! fails the whole interface when a name does not resolve (DNS down after a
//! power cut, a restrictive network), and the node would lose its tunnel
//! address with it. The interface comes up with every IP endpoint, and
//! `kiln-wg-endpoints` sets the named ones once they resolve, retrying,
//! and again every few minutes so a hub on dynamic DNS is followed.

use std::fmt::Write as _;

use ipnet::IpNet;

use crate::config::plan::{ExternalPeerPlan, HubRef, NodePlan, Plan, WgPlan};
use crate::config::profile::Topology;
use crate::config::types::{Endpoint, Host, WgKey};
use crate::render::tree::FileTree;

use super::{NodeSecrets, SECRET_MODE, header};

/// One `[Peer]` of a node's config.
struct Peer {
    comment: String,
    public_key: WgKey,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<Endpoint>,
    keepalive: Option<u16>,
}

pub fn render(
    plan: &Plan,
    wg: &WgPlan,
    node: &NodePlan,
    secrets: &NodeSecrets,
    tree: &mut FileTree,
) {
    let iface = &wg.interface;
    let addr = node
        .wireguard_address
        .expect("validated: WireGuard nodes have an address");
    let mut s = header("#", plan);
    s.push_str("[Interface]\n");
    let _ = writeln!(s, "Address = {}/{}", addr, wg.network.prefix_len());
    let _ = writeln!(s, "ListenPort = {}", wg.listen_port);
    let _ = writeln!(s, "PrivateKey = {}", secrets.private_key.to_base64());
    let mut named = Vec::new();
    for p in peers(plan, wg, node, secrets) {
        let _ = write!(
            s,
            "\n# {}\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            p.comment,
            p.public_key,
            join(&p.allowed_ips)
        );
        match &p.endpoint {
            Some(e) if matches!(e.host, Host::Name(_)) => {
                let _ = writeln!(
                    s,
                    "# Endpoint = {e} (set by kiln-wg-endpoints.service once the name resolves)"
                );
                named.push((p.public_key.clone(), e.clone()));
            }
            Some(e) => {
                let _ = writeln!(s, "Endpoint = {e}");
            }
            None => {}
        }
        if let Some(k) = p.keepalive {
            let _ = writeln!(s, "PersistentKeepalive = {k}");
        }
    }
    tree.file(&format!("/etc/wireguard/{iface}.conf"), SECRET_MODE, s);
    tree.file(
        &format!("/etc/systemd/system/wg-quick@{iface}.service.d/kiln.conf"),
        0o644,
        format!("{}[Unit]\nAfter=nftables.service\nWants=nftables.service\n\n[Service]\n# Retry when an endpoint does not resolve yet.\nRestart=on-failure\nRestartSec=5s\n", header("#", plan)),
    );
    tree.symlink(
        &format!("/etc/systemd/system/multi-user.target.wants/wg-quick@{iface}.service"),
        "/lib/systemd/system/wg-quick@.service",
    );
    if !named.is_empty() {
        render_endpoint_units(plan, iface, &named, tree);
    }
}

/// Seconds between re-resolving named endpoints.
pub const RERESOLVE_INTERVAL_S: u32 = 300;

fn render_endpoint_units(
    plan: &Plan,
    iface: &str,
    named: &[(WgKey, Endpoint)],
    tree: &mut FileTree,
) {
    let mut sh = format!(
        "#!/bin/sh\n{}# Set WireGuard endpoints given by DNS name; exit 1 (retried) until all resolve.\nstatus=0\n",
        header("#", plan)
    );
    for (key, e) in named {
        let _ = writeln!(
            sh,
            "wg set {iface} peer {key} endpoint {e} || {{ echo \"kiln-wg-endpoints: {e} does not resolve yet\"; status=1; }}"
        );
    }
    sh.push_str("exit $status\n");
    tree.file("/etc/kiln/wg-endpoints.sh", 0o755, sh);
    tree.file(
        "/etc/systemd/system/kiln-wg-endpoints.service",
        0o644,
        format!("{}[Unit]\nDescription=kiln: WireGuard endpoints given by DNS name\nAfter=wg-quick@{iface}.service network-online.target\nRequires=wg-quick@{iface}.service\nWants=network-online.target\n\n[Service]\nType=oneshot\nExecStart=/etc/kiln/wg-endpoints.sh\nRestart=on-failure\nRestartSec=10s\n\n[Install]\nWantedBy=multi-user.target\n", header("#", plan)),
    );
    tree.file(
        "/etc/systemd/system/kiln-wg-endpoints.timer",
        0o644,
        format!("{}[Unit]\nDescription=kiln: re-resolve WireGuard endpoints (dynamic DNS)\n\n[Timer]\nOnUnitActiveSec={RERESOLVE_INTERVAL_S}s\n\n[Install]\nWantedBy=timers.target\n", header("#", plan)),
    );
    tree.symlink(
        "/etc/systemd/system/multi-user.target.wants/kiln-wg-endpoints.service",
        "/etc/systemd/system/kiln-wg-endpoints.service",
    );
    tree.symlink(
        "/etc/systemd/system/timers.target.wants/kiln-wg-endpoints.timer",
        "/etc/systemd/system/kiln-wg-endpoints.timer",
    );
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn node_peer(
    plan: &Plan,
    wg: &WgPlan,
    n: &NodePlan,
    secrets: &NodeSecrets,
    allowed: Vec<IpNet>,
) -> Peer {
    let _ = plan;
    Peer {
        comment: format!("node {} ({})", n.name, n.role.as_str()),
        public_key: secrets.public_keys[&n.name].clone(),
        allowed_ips: allowed,
        endpoint: n.endpoint.clone(),
        keepalive: wg.persistent_keepalive,
    }
}

fn external_peer(p: &ExternalPeerPlan, wg: &WgPlan, allowed: Vec<IpNet>) -> Peer {
    Peer {
        comment: format!("external peer {}", p.name),
        public_key: p.public_key.clone(),
        allowed_ips: allowed,
        endpoint: p.endpoint.clone(),
        keepalive: p.persistent_keepalive.or(wg.persistent_keepalive),
    }
}

fn host_net(n: &NodePlan) -> IpNet {
    IpNet::from(n.wireguard_address.expect("validated"))
}

/// The peers of `node`: in a mesh every other node and every external
/// peer; in a hub topology the hub only (routing the whole network), and
/// the hub node itself every other node and external peer.
fn peers(plan: &Plan, wg: &WgPlan, node: &NodePlan, secrets: &NodeSecrets) -> Vec<Peer> {
    let others = plan.nodes.iter().filter(|n| n.name != node.name);
    let all = |out: &mut Vec<Peer>| {
        for n in others.clone() {
            out.push(node_peer(plan, wg, n, secrets, vec![host_net(n)]));
        }
        for p in &wg.peers {
            out.push(external_peer(p, wg, p.allowed_ips.clone()));
        }
    };
    let mut out = Vec::new();
    match (wg.topology, wg.hub) {
        (Topology::Hub, Some(HubRef::Node(h))) if plan.nodes[h].name == node.name => all(&mut out),
        (Topology::Hub, Some(HubRef::Node(h))) => out.push(node_peer(
            plan,
            wg,
            &plan.nodes[h],
            secrets,
            vec![wg.network],
        )),
        (Topology::Hub, Some(HubRef::External(i))) => {
            let p = &wg.peers[i];
            let mut allowed = vec![wg.network];
            allowed.extend(p.allowed_ips.iter().filter(|a| !wg.network.contains(*a)));
            out.push(external_peer(p, wg, allowed));
        }
        _ => all(&mut out),
    }
    out
}

/// `[Peer]` stanzas for every node, to paste into an external hub's
/// WireGuard config (public keys only).
pub fn hub_peer_stanzas(
    plan: &Plan,
    public_keys: &std::collections::BTreeMap<String, WgKey>,
) -> String {
    let mut s = String::new();
    let Some(wg) = &plan.wireguard else { return s };
    let _ = writeln!(
        s,
        "# kiln cluster {}: one [Peer] per node, for the hub's [Interface] on {}",
        plan.cluster, wg.network
    );
    for n in &plan.nodes {
        let _ = write!(
            s,
            "\n# {} ({})\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            n.name,
            n.role.as_str(),
            public_keys[&n.name],
            n.wireguard_address.expect("validated")
        );
        if let Some(e) = &n.endpoint {
            let _ = writeln!(
                s,
                "# Endpoint = {e}   (only if the hub can reach this address; nodes dial the hub otherwise)"
            );
        }
    }
    s
}
