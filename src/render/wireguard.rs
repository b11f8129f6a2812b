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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::plan::{
    HubRef, K3S_API_PORT, Link, LinkKind, NodePlan, OPERATOR_KEEPALIVE_S, OperatorPlan, PeerRef,
    Plan, SSH_PORT, TCP_TRANSPORT_MTU, WgPlan, host_net, node_links,
};
use crate::config::profile::{HubTransport, Role, Topology};
use crate::config::secrets::PrivateKey;
use crate::config::types::{Endpoint, Host, WgKey};
use crate::render::tree::FileTree;

use super::{NodeSecrets, SECRET_MODE, header, relay};

/// One `[Peer]` of a node's config.
struct Peer {
    comment: String,
    public_key: WgKey,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<Endpoint>,
    keepalive: Option<u16>,
    /// The plan's link, for a node's peers (operators' files have none).
    link: Option<Link>,
}

fn relay_of(p: &Peer) -> Option<&Endpoint> {
    p.link.as_ref().and_then(|l| l.relay.as_ref())
}

fn index_of(plan: &Plan, node: &NodePlan) -> usize {
    plan.index_of(&node.name)
        .expect("rendering a node of the plan")
}

/// The hub's tunnel address: what kiln-wg-transport pings.
pub fn hub_address(plan: &Plan, wg: &WgPlan) -> Option<IpAddr> {
    match wg.hub? {
        HubRef::External(i) => wg.peers[i].address,
        HubRef::Node(i) => plan.nodes[i].wireguard_address,
    }
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
    let i = index_of(plan, node);
    let transport = wg.hub_transport.get(i).copied().unwrap_or_default();
    if transport != HubTransport::Udp {
        let _ = writeln!(
            s,
            "# The hub is reached over TCP ({} transport): one packet per TCP segment.\nMTU = {TCP_TRANSPORT_MTU}",
            transport.as_str()
        );
    }
    let mut named = Vec::new();
    let mut over_tcp = None;
    for p in peers(plan, wg, node, secrets) {
        if let Some(e) = write_peer(&mut s, &p, false) {
            // With "auto", kiln-wg-transport owns the hub's endpoint.
            if !(relay_of(&p).is_some() && transport == HubTransport::Auto) {
                named.push((p.public_key.clone(), e));
            }
        }
        if relay_of(&p).is_some() {
            over_tcp = Some(p);
        }
    }
    if let Some(Peer {
        link: Some(link),
        public_key,
        ..
    }) = over_tcp
    {
        let probe = hub_address(plan, wg);
        relay::render_client(plan, wg, transport, &link, &public_key, probe, tree);
    }
    if wg.uses_relay() && wg.hub == Some(HubRef::Node(i)) {
        relay::render_server(plan, wg, tree);
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

/// Write one `[Peer]` stanza. An endpoint given by DNS name is written
/// as a comment and returned (for `kiln-wg-endpoints`), unless
/// `names_inline`: a laptop's wg-quick resolves it when brought up.
fn write_peer(s: &mut String, p: &Peer, names_inline: bool) -> Option<Endpoint> {
    let _ = write!(
        s,
        "\n# {}\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
        p.comment,
        p.public_key,
        join(&p.allowed_ips)
    );
    let mut named = None;
    match &p.endpoint {
        Some(e) if matches!(e.host, Host::Name(_)) && !names_inline => {
            let _ = writeln!(
                s,
                "# Endpoint = {e} (set by kiln-wg-endpoints.service once the name resolves)"
            );
            named = Some(e.clone());
        }
        Some(e) => {
            let _ = writeln!(s, "Endpoint = {e}");
        }
        None => {}
    }
    if let Some(k) = p.keepalive {
        let _ = writeln!(s, "PersistentKeepalive = {k}");
    }
    named
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

/// The peers of `node`, as the plan links it ([`node_links`]), with their
/// keys and a comment naming each.
fn peers(plan: &Plan, wg: &WgPlan, node: &NodePlan, secrets: &NodeSecrets) -> Vec<Peer> {
    let i = index_of(plan, node);
    let site = node.site.as_deref();
    node_links(plan, wg, i)
        .into_iter()
        .map(|l| {
            let (comment, public_key) = match l.to {
                PeerRef::Node(m) => {
                    let n = &plan.nodes[m];
                    let c = format!("node {} ({})", n.name, n.role.as_str());
                    (c, secrets.public_keys[&n.name].clone())
                }
                PeerRef::External(p) => {
                    let p = &wg.peers[p];
                    (format!("external peer {}", p.name), p.public_key.clone())
                }
                PeerRef::Operator(o) => {
                    let o = &plan.operators[o];
                    (
                        format!("operator {}", o.name),
                        secrets.operator_keys[&o.name].clone(),
                    )
                }
            };
            Peer {
                comment: comment + &link_note(&l, site, wg),
                public_key,
                allowed_ips: l.allowed_ips.clone(),
                endpoint: l.endpoint.clone(),
                keepalive: l.keepalive,
                link: Some(l),
            }
        })
        .collect()
}

/// What a link is for, when sites make it worth saying.
fn link_note(l: &Link, site: Option<&str>, wg: &WgPlan) -> String {
    match (l.kind, site) {
        (LinkKind::Site, Some(s)) => format!(": site {s}, directly over the LAN"),
        (LinkKind::Hub, Some(s)) if l.allowed_ips != [wg.network] => {
            format!(": the hub, for everything outside site {s}")
        }
        _ => String::new(),
    }
}

/// `[Peer]` stanzas for every node, to paste into an external hub's
/// WireGuard config (public keys only).
pub fn hub_peer_stanzas(
    plan: &Plan,
    public_keys: &BTreeMap<String, WgKey>,
    operator_keys: &BTreeMap<String, WgKey>,
) -> String {
    let mut s = String::new();
    let Some(wg) = &plan.wireguard else { return s };
    let forward = match wg.network {
        IpNet::V4(_) => "net.ipv4.ip_forward=1",
        IpNet::V6(_) => "net.ipv6.conf.all.forwarding=1",
    };
    let _ = writeln!(
        s,
        "# kiln cluster {}: one [Peer] per node and operator, for the hub's [Interface] on {}\n\
         # The hub forwards between them (set {forward}): nodes in different\n\
         # sites or none, and operators, reach each other only through it.",
        plan.cluster, wg.network
    );
    for n in &plan.nodes {
        let site = n
            .site
            .as_ref()
            .map_or(String::new(), |x| format!(", site {x}"));
        let _ = write!(
            s,
            "\n# {} ({}{site})\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            n.name,
            n.role.as_str(),
            public_keys[&n.name],
            host_net(n)
        );
        if let Some(e) = &n.endpoint {
            let _ = writeln!(
                s,
                "# Endpoint = {e}   (only if the hub can reach this address; nodes dial the hub otherwise)"
            );
        }
    }
    for o in &plan.operators {
        s.push_str(&operator_hub_stanza(o, &operator_keys[&o.name]));
    }
    s
}

/// The `[Peer]` an external hub needs for an operator's laptop (public
/// key only).
pub fn operator_hub_stanza(o: &OperatorPlan, public_key: &WgKey) -> String {
    format!(
        "\n# operator {} (a laptop: it dials the hub, so no endpoint)\n[Peer]\nPublicKey = {public_key}\nAllowedIPs = {}\n",
        o.name,
        IpNet::from(o.wireguard_address)
    )
}

/// An operator's peers: the hub alone (routing the whole tunnel network),
/// or in a mesh every node with an endpoint (its own address each).
fn operator_peers(plan: &Plan, wg: &WgPlan, node_keys: &BTreeMap<String, WgKey>) -> Vec<Peer> {
    let keepalive = Some(OPERATOR_KEEPALIVE_S);
    let node = |n: &NodePlan, allowed: Vec<IpNet>, comment: String| Peer {
        comment,
        public_key: node_keys[&n.name].clone(),
        allowed_ips: allowed,
        endpoint: n.endpoint.clone(),
        keepalive,
        link: None,
    };
    match (wg.topology, wg.hub) {
        (Topology::Hub, Some(HubRef::Node(h))) => {
            let n = &plan.nodes[h];
            let comment = format!("hub: node {} ({})", n.name, n.role.as_str());
            vec![node(n, vec![wg.network], comment)]
        }
        (Topology::Hub, Some(HubRef::External(i))) => {
            let p = &wg.peers[i];
            vec![Peer {
                comment: format!("hub: external peer {}", p.name),
                public_key: p.public_key.clone(),
                allowed_ips: vec![wg.network],
                endpoint: p.endpoint.clone(),
                keepalive,
                link: None,
            }]
        }
        _ => plan
            .nodes
            .iter()
            .filter(|n| n.endpoint.is_some())
            .map(|n| {
                let comment = format!("node {} ({})", n.name, n.role.as_str());
                node(n, vec![host_net(n)], comment)
            })
            .collect(),
    }
}

/// The nodes an operator reaches: through a hub every node, in a mesh
/// those with an endpoint.
pub fn operator_reaches<'p>(plan: &'p Plan, wg: &WgPlan) -> Vec<&'p NodePlan> {
    let mesh = wg.topology == Topology::Mesh;
    plan.nodes
        .iter()
        .filter(|n| !mesh || n.endpoint.is_some())
        .collect()
}

/// The operator's own `wg-quick` file: its key, its address, and the
/// peers that lead into the cluster. The comment header says what it
/// reaches. Holds the operator's private key: write it 0600.
pub fn render_operator(
    plan: &Plan,
    operator: &OperatorPlan,
    private_key: &PrivateKey,
    node_keys: &BTreeMap<String, WgKey>,
) -> String {
    let wg = plan
        .wireguard
        .as_ref()
        .expect("validated: operators need WireGuard");
    let mut s = operator_header(plan, wg, operator);
    s.push_str("\n[Interface]\n");
    let _ = writeln!(
        s,
        "Address = {}/{}",
        operator.wireguard_address,
        wg.network.prefix_len()
    );
    let _ = writeln!(s, "PrivateKey = {}", private_key.to_base64());
    for p in operator_peers(plan, wg, node_keys) {
        write_peer(&mut s, &p, true);
    }
    s
}

/// What the operator's file is, what it reaches and how.
fn operator_header(plan: &Plan, wg: &WgPlan, o: &OperatorPlan) -> String {
    let profile = plan
        .profile_path
        .file_name()
        .map_or(String::new(), |f| f.to_string_lossy().to_string());
    let mut s = format!(
        "# WireGuard for operator {} of kiln cluster {}, rendered from {profile}.\n\
         # Holds the operator's private key: keep it 0600 and on this machine only.\n\
         # Bring it up with `sudo wg-quick up ./FILE.conf` (a path: a bare name\n\
         # means /etc/wireguard/NAME.conf); FILE becomes the interface name.\n#\n",
        o.name, plan.cluster
    );
    let _ = writeln!(
        s,
        "# Over the tunnel {}, it reaches SSH ({SSH_PORT}) and the Kubernetes API ({K3S_API_PORT}) of:",
        wg.network
    );
    for n in operator_reaches(plan, wg) {
        let addr = n.wireguard_address.expect("validated");
        let api = if n.role == Role::Server {
            format!("  https://{}:{K3S_API_PORT}", Host::Ip(addr))
        } else {
            String::new()
        };
        let line = format!("#   {:<12} {addr:<15} {:<6}{api}", n.name, n.role.as_str());
        let _ = writeln!(s, "{}", line.trim_end());
    }
    let _ = writeln!(
        s,
        "# and nothing else: the nodes' firewalls refuse every other port."
    );
    match (wg.topology, wg.hub) {
        (Topology::Hub, Some(HubRef::Node(h))) => {
            let _ = writeln!(s, "# Through the hub, node {}.", plan.nodes[h].name);
        }
        (Topology::Hub, Some(HubRef::External(i))) => {
            let _ = writeln!(
                s,
                "# Through the hub {} (not built by kiln): its admin must add this laptop's\n\
                 # [Peer] (`kiln keys` prints it) before the tunnel carries anything.",
                wg.peers[i].name
            );
        }
        _ => {
            let unreachable: Vec<&str> = plan
                .nodes
                .iter()
                .filter(|n| n.endpoint.is_none())
                .map(|n| n.name.as_str())
                .collect();
            if !unreachable.is_empty() {
                let _ = writeln!(
                    s,
                    "# Not reachable (no endpoint to dial in a mesh): {}.",
                    unreachable.join(", ")
                );
            }
        }
    }
    s
}
