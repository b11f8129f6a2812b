//! Resolves `[wireguard]`: the tunnel network, its external peers and,
//! in a hub topology, the hub and the sites (nodes' `site`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, At, Topology};

use super::{
    DEFAULT_HUB_KEEPALIVE_S, DEFAULT_HUB_TCP_PORT, DEFAULT_WG_INTERFACE, DEFAULT_WG_PORT,
    ExternalPeerPlan, HubRef, NodePlan, SitePlan, WgPlan,
};

/// `wireguard.network` is required when WireGuard is on, and must not
/// overlap the k3s networks.
pub(super) fn check_network(
    p: &profile::Profile,
    wg_enabled: bool,
    (cluster_cidr, service_cidr): (IpNet, IpNet),
    d: &mut Diagnostics,
) {
    let wg_network = p.wireguard.as_ref().and_then(|w| w.network.as_ref());
    if wg_enabled && wg_network.is_none() {
        d.missing(
            p.wireguard_span.clone(),
            "wireguard.network",
            "missing required key `wireguard.network`",
            "add the tunnel network, like `network = \"10.0.0.0/24\"`, or set `enabled = false`",
        );
    }
    if let Some(net) = wg_network.filter(|_| wg_enabled) {
        for (what, other) in [
            ("cluster-cidr", cluster_cidr),
            ("service-cidr", service_cidr),
        ] {
            if net.v.contains(&other.network()) || other.contains(&net.v.network()) {
                d.error(
                    net.span.clone(),
                    &net.key,
                    format!("{} overlaps the k3s {what} {other}", net.v),
                    format!("choose a WireGuard network that does not overlap {other}"),
                );
            }
        }
    }
}

pub(super) fn seen_ips_for_peers(nodes: &[NodePlan]) -> BTreeMap<IpAddr, String> {
    nodes
        .iter()
        .filter_map(|n| {
            n.wireguard_address
                .map(|a| (a, format!("node `{}`", n.name)))
        })
        .collect()
}

pub(super) fn check_in_network(d: &mut Diagnostics, a: &At<IpAddr>, net: &IpNet) {
    if !net.contains(&a.v) {
        d.error(
            a.span.clone(),
            &a.key,
            format!("{} is outside the WireGuard network {net}", a.v),
            format!("pick an address inside {net}"),
        );
    } else if net.prefix_len() < 31
        && net.prefix_len() < net.max_prefix_len()
        && (a.v == net.network() || (net.addr().is_ipv4() && a.v == net.broadcast()))
    {
        let which = if a.v == net.network() {
            "network"
        } else {
            "broadcast"
        };
        d.error(
            a.span.clone(),
            &a.key,
            format!("{} is the {which} address of {net}", a.v),
            format!("pick a host address inside {net}"),
        );
    }
}

pub(super) fn resolve_wireguard(
    w: &profile::WireGuard,
    nodes: &[NodePlan],
    raw_nodes: &[profile::Node],
    d: &mut Diagnostics,
    seen: &mut BTreeMap<IpAddr, String>,
) -> Option<WgPlan> {
    let network = w.network.as_ref()?.v;
    let topology = w.topology.as_ref().map_or(Topology::Mesh, |a| a.v);
    let peers = resolve_peers(w, network, nodes, d, seen);
    let hub = resolve_hub(w, topology, &peers, nodes, raw_nodes, d);
    let sites = if topology == Topology::Mesh {
        if !d.is_broken("wireguard.topology") {
            refuse_sites(
                raw_nodes,
                "the topology is mesh (every node already peers with every other)",
                d,
            );
        }
        Vec::new()
    } else {
        resolve_sites(nodes, raw_nodes, d)
    };
    let mut sites = sites;
    let hub_address_known = match hub {
        Some(HubRef::External(i)) => peers[i].address.is_some(),
        _ => true,
    };
    let hub_transport =
        super::transport::resolve(w, hub, &mut sites, nodes, raw_nodes, hub_address_known, d);
    if let Some(HubRef::Node(h)) = hub {
        check_hub_node_reaches_other_sites(h, &sites, nodes, raw_nodes, d);
    }
    let persistent_keepalive =
        w.persistent_keepalive
            .as_ref()
            .map(|a| a.v)
            .or(if topology == Topology::Hub {
                Some(DEFAULT_HUB_KEEPALIVE_S)
            } else {
                None
            });
    Some(WgPlan {
        interface: w
            .interface
            .as_ref()
            .map_or(DEFAULT_WG_INTERFACE.to_string(), |a| a.v.clone()),
        network,
        listen_port: w.listen_port.as_ref().map_or(DEFAULT_WG_PORT, |a| a.v),
        topology,
        hub,
        persistent_keepalive,
        peers,
        sites,
        hub_transport,
        hub_tcp_port: w
            .hub_tcp_port
            .as_ref()
            .map_or(DEFAULT_HUB_TCP_PORT, |a| a.v),
    })
}

/// `site` only means something in a hub topology: report the first node
/// that sets one anyway, saying `why` not.
pub(super) fn refuse_sites(raw_nodes: &[profile::Node], why: &str, d: &mut Diagnostics) {
    if let Some(a) = raw_nodes.iter().find_map(|n| n.site.as_ref()) {
        d.error(
            a.span.clone(),
            &a.key,
            format!("`site` is set but {why}"),
            "use `[wireguard]` with `topology = \"hub\"` and a `hub` (it carries the traffic between sites), or remove `site`",
        );
    }
}

/// The sites, in the order their first node appears, each checked.
fn resolve_sites(
    nodes: &[NodePlan],
    raw_nodes: &[profile::Node],
    d: &mut Diagnostics,
) -> Vec<SitePlan> {
    let mut sites: Vec<SitePlan> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let Some(name) = &n.site else { continue };
        match sites.iter_mut().find(|s| &s.name == name) {
            Some(s) => s.nodes.push(i),
            None => sites.push(SitePlan {
                name: name.clone(),
                nodes: vec![i],
                hub_transport: None,
            }),
        }
    }
    for s in &sites {
        check_site_endpoints(s, nodes, raw_nodes, d);
    }
    sites
}

/// A hub node in a site, dialled from other sites: its LAN address is
/// no use there, it needs an `endpoint` they can reach.
fn check_hub_node_reaches_other_sites(
    hub: usize,
    sites: &[SitePlan],
    nodes: &[NodePlan],
    raw_nodes: &[profile::Node],
    d: &mut Diagnostics,
) {
    let raw = &raw_nodes[hub];
    let (Some(site), None) = (&raw.site, &raw.endpoint) else {
        return;
    };
    let outside: Vec<&str> = sites
        .iter()
        .filter(|s| s.name != site.v)
        .flat_map(|s| s.nodes.iter().map(|&i| nodes[i].name.as_str()))
        .collect();
    if outside.is_empty() || d.is_broken(&format!("{}.endpoint", raw.key)) {
        return;
    }
    d.error(
        site.span.clone(),
        &format!("{}.endpoint", raw.key),
        format!(
            "hub node `{}` is in site `{}`, but nodes of other sites ({}) cannot dial its LAN address",
            nodes[hub].name,
            site.v,
            outside.join(", ")
        ),
        format!(
            "give node `{}` an `endpoint = \"host:port\"` the other sites reach (a public name, a forwarded port); its own site still dials its LAN address",
            nodes[hub].name
        ),
    );
}

/// Nodes of a site dial each other on the LAN: with two or more, each
/// needs a LAN address (or an endpoint).
fn check_site_endpoints(
    site: &SitePlan,
    nodes: &[NodePlan],
    raw_nodes: &[profile::Node],
    d: &mut Diagnostics,
) {
    if site.nodes.len() < 2 {
        return;
    }
    for &i in &site.nodes {
        let (n, raw) = (&nodes[i], &raw_nodes[i]);
        let broken = ["lan-address", "endpoint", "network"]
            .iter()
            .any(|k| d.is_broken(&format!("{}.{k}", raw.key)));
        if n.lan_address.is_some() || n.endpoint.is_some() || broken {
            continue;
        }
        let others: Vec<&str> = site
            .nodes
            .iter()
            .filter(|&&m| m != i)
            .map(|&m| nodes[m].name.as_str())
            .collect();
        let at = raw.site.as_ref().expect("a node in a site has `site`");
        d.error(
            at.span.clone(),
            &format!("{}.lan-address", raw.key),
            format!(
                "node `{}` shares site `{}` with {} but has no LAN address for them to dial",
                n.name,
                site.name,
                others.join(", ")
            ),
            format!(
                "add `lan-address = \"192.168.1.12\"` (its address on the {} LAN, reserved in DHCP), a static `[nodes.network]` address, or an `endpoint`",
                site.name
            ),
        );
    }
}

/// `[[wireguard.peers]]`: hosts outside the cluster (a VPS, a laptop).
fn resolve_peers(
    w: &profile::WireGuard,
    network: IpNet,
    nodes: &[NodePlan],
    d: &mut Diagnostics,
    seen: &mut BTreeMap<IpAddr, String>,
) -> Vec<ExternalPeerPlan> {
    let mut peers = Vec::new();
    let mut names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    for p in &w.peers {
        let name = match &p.name {
            Some(a) => {
                if names.contains(&a.v) {
                    d.error(
                        a.span.clone(),
                        &a.key,
                        format!("peer name `{}` is already used by a node or peer", a.v),
                        "give the external peer its own name",
                    );
                }
                names.push(a.v.clone());
                a.v.clone()
            }
            None => {
                d.missing(
                    p.span.clone(),
                    &format!("{}.name", p.key),
                    "missing required key `name`",
                    "add `name = \"vps\"`",
                );
                String::new()
            }
        };
        if p.public_key.is_none() {
            d.missing(
                p.span.clone(),
                &format!("{}.public-key", p.key),
                "missing required key `public-key`",
                "paste the output of `wg pubkey` on that host",
            );
        }
        if let Some(a) = &p.address {
            check_in_network(d, a, &network);
            if let Some(first) = seen.get(&a.v) {
                d.error(
                    a.span.clone(),
                    &a.key,
                    format!("address {} is already used by {first}", a.v),
                    "give every node and peer its own address",
                );
            } else {
                seen.insert(a.v, format!("peer `{name}`"));
            }
        }
        let allowed_ips = match (&p.allowed_ips, &p.address) {
            (Some(l), _) => l.iter().map(|a| a.v).collect(),
            (None, Some(a)) => vec![IpNet::from(a.v)],
            (None, None) => {
                d.error(
                    p.span.clone(),
                    &format!("{}.allowed-ips", p.key),
                    format!("peer `{name}` has neither `address` nor `allowed-ips`"),
                    "add `address = \"10.0.0.1\"` (its tunnel address) or `allowed-ips`",
                );
                Vec::new()
            }
        };
        if let Some(pk) = &p.public_key {
            peers.push(ExternalPeerPlan {
                name,
                public_key: pk.v.clone(),
                endpoint: p.endpoint.as_ref().map(|a| a.v.clone()),
                address: p.address.as_ref().map(|a| a.v),
                allowed_ips,
                persistent_keepalive: p.persistent_keepalive.as_ref().map(|a| a.v),
            });
        }
    }
    peers
}

/// `wireguard.hub`: in a hub topology, the peer or node everyone dials.
fn resolve_hub(
    w: &profile::WireGuard,
    topology: Topology,
    peers: &[ExternalPeerPlan],
    nodes: &[NodePlan],
    raw_nodes: &[profile::Node],
    d: &mut Diagnostics,
) -> Option<HubRef> {
    match (topology, &w.hub) {
        // An unreadable topology or hub is reported already.
        _ if d.is_broken("wireguard.topology") || d.is_broken("wireguard.hub") => None,
        (Topology::Mesh, Some(h)) => {
            d.error(
                h.span.clone(),
                &h.key,
                "`hub` is set but the topology is mesh",
                "set `topology = \"hub\"`, or remove `hub`",
            );
            None
        }
        (Topology::Mesh, None) => None,
        (Topology::Hub, None) => {
            let span = w.topology.as_ref().map_or(0..0, |a| a.span.clone());
            d.error(
                span,
                "wireguard.hub",
                "topology is hub but no `hub` is named",
                "add `hub = \"vps\"`, naming an external peer or a node",
            );
            None
        }
        (Topology::Hub, Some(h)) => {
            if let Some(i) = peers.iter().position(|p| p.name == h.v) {
                let raw = w
                    .peers
                    .iter()
                    .find(|p| p.name.as_ref().is_some_and(|n| n.v == h.v));
                if peers[i].endpoint.is_none()
                    && !raw.is_some_and(|p| d.is_broken(&format!("{}.endpoint", p.key)))
                {
                    d.error(h.span.clone(), &h.key, format!("hub `{}` has no endpoint", h.v), format!("add `endpoint = \"host:port\"` to the peer `{}`: spokes must know where to reach it", h.v));
                }
                Some(HubRef::External(i))
            } else if let Some(i) = nodes.iter().position(|n| n.name == h.v) {
                let rk = &raw_nodes[i].key;
                if nodes[i].endpoint.is_none()
                    && !["endpoint", "lan-address", "network"]
                        .iter()
                        .any(|k| d.is_broken(&format!("{rk}.{k}")))
                {
                    d.error(
                        h.span.clone(),
                        &h.key,
                        format!("hub node `{}` has no endpoint", h.v),
                        format!("give node `{}` a `lan-address` or an `endpoint`", h.v),
                    );
                }
                Some(HubRef::Node(i))
            } else if w
                .peers
                .iter()
                .any(|p| p.name.is_none() || p.public_key.is_none())
                || raw_nodes.iter().any(|n| n.name.is_none())
            {
                // A peer or node with a broken name or key (already reported)
                // may be the hub: no second error for the same mistake.
                None
            } else {
                d.error(
                    h.span.clone(),
                    &h.key,
                    format!("hub `{}` is neither an external peer nor a node", h.v),
                    "name one of the `[[wireguard.peers]]` or a node",
                );
                None
            }
        }
    }
}
