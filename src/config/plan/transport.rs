//! How each spoke reaches its hub: plain UDP, TCP through `kiln-relay`,
//! or UDP falling back to TCP. A node's `hub-transport` wins over its
//! site's (`[wireguard.sites.<name>]`), which wins over `[wireguard]`'s.

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, HubTransport, Topology};

use super::{HubRef, NodePlan, RELAY_LOCAL_PORT, SitePlan};

/// Each node's transport to the hub (UDP for the hub itself and in a
/// mesh); reports settings that cannot take effect.
pub(super) fn resolve(
    w: &profile::WireGuard,
    hub: Option<HubRef>,
    sites: &mut [SitePlan],
    nodes: &[NodePlan],
    raw_nodes: &[profile::Node],
    hub_address_known: bool,
    d: &mut Diagnostics,
) -> Vec<HubTransport> {
    let given = w
        .hub_transport
        .iter()
        .chain(w.sites.iter().filter_map(|s| s.hub_transport.as_ref()))
        .chain(raw_nodes.iter().filter_map(|n| n.hub_transport.as_ref()))
        .find(|a| a.v != HubTransport::Udp);
    if w.topology.as_ref().is_none_or(|a| a.v == Topology::Mesh)
        && !d.is_broken("wireguard.topology")
    {
        if let Some(a) = given {
            d.error(
                a.span.clone(),
                &a.key,
                "`hub-transport` is set but the topology is mesh (there is no hub)",
                "use `topology = \"hub\"` with a `hub`, or remove `hub-transport`",
            );
        }
        return vec![HubTransport::Udp; nodes.len()];
    }
    for s in &w.sites {
        match sites.iter_mut().find(|p| p.name == s.name.v) {
            Some(p) => p.hub_transport = s.hub_transport.as_ref().map(|a| a.v),
            None => {
                let known: Vec<&str> = sites.iter().map(|p| p.name.as_str()).collect();
                d.error(
                    s.name.span.clone(),
                    &s.name.key,
                    format!("no node is in site `{}`", s.name.v),
                    if known.is_empty() {
                        "give nodes `site = \"…\"`, or remove this table".to_string()
                    } else {
                        format!("name one of the sites nodes are in: {}", known.join(", "))
                    },
                );
            }
        }
    }
    if let Some(p) = &w.listen_port
        && p.v == RELAY_LOCAL_PORT
        && given.is_some()
    {
        {
            d.error(p.span.clone(), &p.key, format!("port {RELAY_LOCAL_PORT} is where kiln-relay takes WireGuard's packets on each node"), "use another port, like 51830 (the default)");
        }
    }
    let auto = w
        .hub_transport
        .iter()
        .chain(w.sites.iter().filter_map(|s| s.hub_transport.as_ref()))
        .chain(raw_nodes.iter().filter_map(|n| n.hub_transport.as_ref()))
        .find(|a| a.v == HubTransport::Auto);
    if let (Some(a), false) = (auto, hub_address_known) {
        d.error(a.span.clone(), &a.key, "\"auto\" pings the hub's tunnel address to see whether UDP gets through, and the hub has no `address`", "add `address = \"…\"` (its address in the tunnel network) to the hub's `[[wireguard.peers]]` entry, or use \"tcp\"");
    }
    let cluster = w.hub_transport.as_ref().map_or(HubTransport::Udp, |a| a.v);
    (0..nodes.len()).map(|i| {
        let own = raw_nodes.get(i).and_then(|n| n.hub_transport.as_ref());
        if hub == Some(HubRef::Node(i)) {
            if let Some(a) = own.filter(|a| a.v != HubTransport::Udp) {
                d.error(a.span.clone(), &a.key, format!("node `{}` is the hub: it does not dial itself", nodes[i].name), "remove `hub-transport` from the hub node (its relay server is set up for the nodes that use TCP)");
            }
            return HubTransport::Udp;
        }
        let site = nodes[i].site.as_ref().and_then(|s| sites.iter().find(|p| &p.name == s)).and_then(|p| p.hub_transport);
        own.map(|a| a.v).or(site).unwrap_or(cluster)
    }).collect()
}
