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

use std::net::IpAddr;

use crate::config::profile::{HubTransport, Topology};
use crate::config::types::{Endpoint, Host};

use super::{HubRef, NodePlan, Plan, RELAY_LOCAL_PORT, WgPlan};

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
    /// A spoke's link to its hub over TCP (`hub-transport` "tcp" or
    /// "auto"): where the hub's `kiln-relay` listens. With "tcp" the
    /// `endpoint` is then the node's own relay client.
    pub relay: Option<Endpoint>,
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

/// A node's own tunnel address as a one-host network (its AllowedIPs
/// entry on the other side of a link).
pub fn host_net(n: &NodePlan) -> IpNet {
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
            let mut l = node_link(plan, wg, node, m, kind, vec![host_net(&plan.nodes[m])]);
            // A spoke on TCP always dials in: the hub's UDP would not reach
            // it, and where it does, WireGuard would move the spoke off its relay.
            if kind == LinkKind::Spoke && wg.hub_transport.get(m) == Some(&HubTransport::Tcp) {
                l.endpoint = None;
            }
            l
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
        relay: None,
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
    let mut out: Vec<Link> = direct
        .iter()
        .map(|&m| {
            let own = vec![host_net(&plan.nodes[m])];
            node_link(plan, wg, node, m, LinkKind::Site, own)
        })
        .collect();
    // The node's own address too, once it has direct peers: then every
    // node of a site gives the hub the same share, the network minus the site.
    let mut holes: Vec<IpNet> = out.iter().flat_map(|l| l.allowed_ips.clone()).collect();
    if !holes.is_empty() {
        holes.push(host_net(&plan.nodes[node]));
    }
    let rest = exclude(wg.network, &holes);
    let hub_link = match hub {
        HubRef::Node(h) => node_link(plan, wg, node, h, LinkKind::Hub, rest),
        HubRef::External(i) => {
            let mut allowed = rest;
            let outside = wg.peers[i].allowed_ips.iter();
            allowed.extend(outside.filter(|a| !wg.network.contains(*a)));
            external_link(wg, i, LinkKind::Hub, allowed)
        }
    };
    out.push(over_relay(wg, node, hub_link));
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
        relay: None,
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
        relay: None,
    }
}

/// A hub link carried over TCP when the node's transport says so.
fn over_relay(wg: &WgPlan, node: usize, mut link: Link) -> Link {
    let transport = wg.hub_transport.get(node).copied().unwrap_or_default();
    let Some(hub) = link.endpoint.clone() else {
        return link;
    };
    if transport == HubTransport::Udp {
        return link;
    }
    link.relay = Some(Endpoint {
        host: hub.host,
        port: wg.hub_tcp_port,
    });
    if transport == HubTransport::Tcp {
        link.endpoint = Some(Endpoint {
            host: Host::Ip(IpAddr::from([127, 0, 0, 1])),
            port: RELAY_LOCAL_PORT,
        });
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(l: &[IpNet]) -> Vec<String> {
        l.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn exclude_leaves_the_rest_of_the_network_without_overlap() {
        let holes = [net("10.0.0.12/32"), net("10.0.0.13/32")];
        let rest = exclude(net("10.0.0.0/24"), &holes);
        assert_eq!(
            nets(&rest),
            [
                "10.0.0.0/29",
                "10.0.0.8/30",
                "10.0.0.14/31",
                "10.0.0.16/28",
                "10.0.0.32/27",
                "10.0.0.64/26",
                "10.0.0.128/25"
            ]
        );
        // Every address but the holes, each exactly once.
        let covered: u32 = rest.iter().map(|n| 1 << (32 - n.prefix_len())).sum();
        assert_eq!(covered, 256 - 2);
        assert!(rest.iter().all(|r| holes.iter().all(|h| !r.contains(h))));
    }

    #[test]
    fn exclude_without_holes_is_the_network_and_of_everything_is_nothing() {
        let n = net("fd00:10::/64");
        assert_eq!(exclude(n, &[]), [n]);
        assert_eq!(exclude(n, &[net("fd00:11::1/128")]), [n]);
        assert!(exclude(net("10.0.0.8/31"), &[net("10.0.0.0/24")]).is_empty());
    }

    /// Two sites behind an external hub, a node on its own, an operator.
    const SITES: &str = r#"
[cluster]
name = "lab"
[k3s]
version = "v1.31.1+k3s1"
[wireguard]
network = "10.0.0.0/24"
topology = "hub"
hub = "vps"
[[wireguard.peers]]
name = "vps"
public-key = "in8aLqpdujLG8XAFqR8Hys5zP2Uu4hNoUkomX1oX1X4="
endpoint = "hub.example.org:51820"
address = "10.0.0.1"
[[operators]]
name = "alice"
wireguard-address = "10.0.0.200"
[[nodes]]
name = "a1"
role = "server"
site = "campus"
lan-address = "192.168.1.11"
wireguard-address = "10.0.0.11"
[[nodes]]
name = "a2"
role = "agent"
site = "campus"
endpoint = "a2.campus.example:51830"
wireguard-address = "10.0.0.12"
[[nodes]]
name = "h1"
role = "agent"
site = "home"
wireguard-address = "10.0.0.21"
[[nodes]]
name = "x1"
role = "agent"
wireguard-address = "10.0.0.31"
"#;

    fn plan(text: &str) -> Plan {
        crate::config::plan::plan_profile(std::path::Path::new("lab.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// One line per link: peer, kind, endpoint, AllowedIPs.
    fn table(plan: &Plan, node: usize) -> Vec<String> {
        let wg = plan.wireguard.as_ref().unwrap();
        node_links(plan, wg, node)
            .iter()
            .map(|l| {
                let to = match l.to {
                    PeerRef::Node(m) => plan.nodes[m].name.clone(),
                    PeerRef::External(p) => wg.peers[p].name.clone(),
                    PeerRef::Operator(o) => plan.operators[o].name.clone(),
                };
                let at = l.endpoint.as_ref().map_or("-".into(), ToString::to_string);
                format!("{to} {:?} {at} {}", l.kind, nets(&l.allowed_ips).join(","))
            })
            .collect()
    }

    #[test]
    fn a_site_peers_directly_and_sends_the_rest_to_the_hub() {
        let p = plan(SITES);
        let campus = [net("10.0.0.11/32"), net("10.0.0.12/32")];
        let rest_a1 = nets(&exclude(net("10.0.0.0/24"), &campus)).join(",");
        assert_eq!(
            table(&p, 0),
            [
                "a2 Site a2.campus.example:51830 10.0.0.12/32".to_string(),
                format!("vps Hub hub.example.org:51820 {rest_a1}"),
            ]
        );
        // a1 is dialled on its LAN address, at the tunnel port.
        assert_eq!(table(&p, 1)[0], "a1 Site 192.168.1.11:51830 10.0.0.11/32");
        // Alone in its site, or in none: the hub carries the whole network.
        for node in [2, 3] {
            assert_eq!(
                table(&p, node),
                ["vps Hub hub.example.org:51820 10.0.0.0/24"]
            );
        }
    }

    #[test]
    fn a_hub_node_in_a_site_is_dialled_on_the_lan_and_routes_for_everyone() {
        let text = SITES
            .replace("hub = \"vps\"", "hub = \"a1\"")
            .replace("endpoint = \"hub.example.org:51820\"\n", "")
            .replace(
                "lan-address = \"192.168.1.11\"\n",
                "lan-address = \"192.168.1.11\"\nendpoint = \"campus.example.org:51830\"\n",
            );
        let p = plan(&text);
        // a2 reaches a1 over the LAN, and everything else through it.
        assert_eq!(table(&p, 1), ["a1 Hub 192.168.1.11:51830 10.0.0.0/24"]);
        // h1 is in another site: it dials a1's endpoint.
        assert_eq!(
            table(&p, 2),
            ["a1 Hub campus.example.org:51830 10.0.0.0/24"]
        );
        assert_eq!(
            table(&p, 0),
            [
                "a2 Site a2.campus.example:51830 10.0.0.12/32",
                "h1 Spoke - 10.0.0.21/32",
                "x1 Spoke - 10.0.0.31/32",
                "vps Spoke - 10.0.0.1/32",
                "alice Spoke - 10.0.0.200/32",
            ]
        );
    }

    #[test]
    fn without_sites_a_mesh_peers_everyone_and_a_spoke_only_the_hub() {
        let mesh = SITES
            .replace("site = \"campus\"\n", "")
            .replace("site = \"home\"\n", "")
            .replace("topology = \"hub\"\nhub = \"vps\"\n", "");
        let p = plan(&mesh);
        let kinds: Vec<LinkKind> = node_links(&p, p.wireguard.as_ref().unwrap(), 0)
            .iter()
            .map(|l| l.kind)
            .collect();
        assert_eq!(kinds, [LinkKind::Mesh; 5]);
        let hub = SITES
            .replace("site = \"campus\"\n", "")
            .replace("site = \"home\"\n", "");
        assert_eq!(
            table(&plan(&hub), 1),
            ["vps Hub hub.example.org:51820 10.0.0.0/24"]
        );
    }
}
