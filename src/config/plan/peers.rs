//! Who peers with whom: each node's WireGuard peers, the tunnel addresses
//! each one carries (`AllowedIPs`) and where it is dialled. Pure: the
//! renderer writes these links as `[Peer]` stanzas, `kiln check` prints
//! them.
//!
//! WireGuard sends a packet to the peer whose `AllowedIPs` hold its
//! destination, and accepts one only from the peer whose `AllowedIPs` hold
//! its source. So a node's peers never share an address: in a site each
//! other node of the site carries its own address, and the hub carries
//! the rest of the tunnel network (other sites, operators, external peers).

use ipnet::IpNet;

use crate::config::profile::Topology;
use crate::config::types::{Endpoint, Host};

use super::{HubRef, NodePlan, Plan, WgPlan};

/// The other end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRef {
    /// Index into `Plan::nodes`.
    Node(usize),
    /// Index into `WgPlan::peers`.
    External(usize),
    /// Index into `Plan::operators`.
    Operator(usize),
}

/// Why two hosts peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A mesh: every node peers with everyone.
    Mesh,
    /// Both nodes are in the same site: directly, over the LAN.
    Site,
    /// A spoke's link to its hub, carrying what no direct peer carries.
    Hub,
    /// The hub node's link to one of the hosts it routes for.
    Spoke,
}

/// One `[Peer]` of a node's WireGuard config.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub to: PeerRef,
    pub kind: LinkKind,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<Endpoint>,
    pub keepalive: Option<u16>,
}

/// The peers of node `node` (an index into `Plan::nodes`): in a mesh,
/// and for the hub node, every other node, external peer and operator; for
/// any other node in a hub topology, the other nodes of its site and the
/// hub.
pub fn node_links(plan: &Plan, wg: &WgPlan, node: usize) -> Vec<Link> {
    match (wg.topology, wg.hub) {
        (Topology::Hub, Some(HubRef::Node(h))) if h == node => {
            every_peer(plan, wg, node, LinkKind::Spoke)
        }
        (Topology::Hub, Some(hub)) => spoke_links(plan, wg, node, hub),
        _ => every_peer(plan, wg, node, LinkKind::Mesh),
    }
}

/// `net` without the addresses in `holes`, as the fewest CIDRs, in
/// address order.
pub fn exclude(net: IpNet, holes: &[IpNet]) -> Vec<IpNet> {
    if holes.iter().any(|h| h.contains(&net)) {
        return Vec::new();
    }
    if !holes.iter().any(|h| net.contains(h)) {
        return vec![net];
    }
    // A hole strictly inside `net`, so `net` is not a single address.
    net.subnets(net.prefix_len() + 1)
        .expect("a network wider than one address splits in two")
        .flat_map(|half| exclude(half, holes))
        .collect()
}

/// Where nodes of the same site dial `n`: its LAN address at the tunnel
/// port, else its `endpoint`.
pub fn site_endpoint(wg: &WgPlan, n: &NodePlan) -> Option<Endpoint> {
    n.lan_address
        .map(|ip| Endpoint {
            host: Host::Ip(ip),
            port: wg.listen_port,
        })
        .or_else(|| n.endpoint.clone())
}

fn same_site(plan: &Plan, a: usize, b: usize) -> bool {
    a != b && plan.nodes[a].site.is_some() && plan.nodes[a].site == plan.nodes[b].site
}

fn host_net(n: &NodePlan) -> IpNet {
    IpNet::from(
        n.wireguard_address
            .expect("validated: WireGuard nodes have an address"),
    )
}

fn every_peer(plan: &Plan, wg: &WgPlan, node: usize, kind: LinkKind) -> Vec<Link> {
    let mut out: Vec<Link> = (0..plan.nodes.len())
        .filter(|&m| m != node)
        .map(|m| {
            let kind = if same_site(plan, node, m) {
                LinkKind::Site
            } else {
                kind
            };
            node_link(plan, wg, node, m, kind, vec![host_net(&plan.nodes[m])])
        })
        .collect();
    out.extend(
        wg.peers
            .iter()
            .enumerate()
            .map(|(i, p)| external_link(wg, i, kind, p.allowed_ips.clone())),
    );
    out.extend(plan.operators.iter().enumerate().map(|(i, o)| Link {
        // A laptop dials in and roams, and keeps its tunnel open itself.
        to: PeerRef::Operator(i),
        kind,
        allowed_ips: vec![IpNet::from(o.wireguard_address)],
        endpoint: None,
        keepalive: None,
    }));
    out
}

/// A spoke: the other nodes of its site directly, each with its own
/// address, then the hub with the rest of the tunnel network.
fn spoke_links(plan: &Plan, wg: &WgPlan, node: usize, hub: HubRef) -> Vec<Link> {
    let hub_node = match hub {
        HubRef::Node(h) => Some(h),
        HubRef::External(_) => None,
    };
    let direct: Vec<usize> = (0..plan.nodes.len())
        .filter(|&m| Some(m) != hub_node && same_site(plan, node, m))
        .collect();
    let holes: Vec<IpNet> = direct.iter().map(|&m| host_net(&plan.nodes[m])).collect();
    let mut out: Vec<Link> = direct
        .iter()
        .zip(&holes)
        .map(|(&m, &h)| node_link(plan, wg, node, m, LinkKind::Site, vec![h]))
        .collect();
    let rest = exclude(wg.network, &holes);
    out.push(match hub {
        HubRef::Node(h) => node_link(plan, wg, node, h, LinkKind::Hub, rest),
        HubRef::External(i) => {
            let mut allowed = rest;
            let outside = wg.peers[i].allowed_ips.iter();
            allowed.extend(outside.filter(|a| !wg.network.contains(*a)));
            external_link(wg, i, LinkKind::Hub, allowed)
        }
    });
    out
}

fn node_link(
    plan: &Plan,
    wg: &WgPlan,
    from: usize,
    to: usize,
    kind: LinkKind,
    allowed_ips: Vec<IpNet>,
) -> Link {
    let n = &plan.nodes[to];
    let endpoint = if same_site(plan, from, to) {
        site_endpoint(wg, n)
    } else {
        n.endpoint.clone()
    };
    Link {
        to: PeerRef::Node(to),
        kind,
        allowed_ips,
        endpoint,
        keepalive: wg.persistent_keepalive,
    }
}

fn external_link(wg: &WgPlan, i: usize, kind: LinkKind, allowed_ips: Vec<IpNet>) -> Link {
    let p = &wg.peers[i];
    Link {
        to: PeerRef::External(i),
        kind,
        allowed_ips,
        endpoint: p.endpoint.clone(),
        keepalive: p.persistent_keepalive.or(wg.persistent_keepalive),
    }
}
