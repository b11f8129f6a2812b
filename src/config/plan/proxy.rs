//! Resolves `[k3s.proxy]`: the proxy URLs, and `NO_PROXY` derived from
//! what the cluster reaches directly. k3s adds its own pod and service
//! networks and cluster domain; kiln writes them too (the list is then
//! complete as read on the node), plus the tunnel, the nodes' LANs, the
//! nodes by name (registry mirrors like `rgb1:5000` name them) and the
//! registration address.

use ipnet::IpNet;

use crate::config::diag::Diagnostics;
use crate::config::profile;
use crate::config::types::{Host, ProxyUrl};

use super::{NodePlan, WgPlan};

/// Always direct: loopback and the cluster's DNS domains.
pub const NO_PROXY_ALWAYS: [&str; 5] =
    ["localhost", "127.0.0.0/8", "::1", ".svc", ".cluster.local"];

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyPlan {
    pub http: Option<ProxyUrl>,
    pub https: Option<ProxyUrl>,
    /// Every `NO_PROXY` entry: derived ones first, then the profile's,
    /// without repeats.
    pub no_proxy: Vec<String>,
}

pub(super) fn resolve_proxy(
    p: &profile::Profile,
    nodes: &[NodePlan],
    wg: Option<&WgPlan>,
    (cluster_cidr, service_cidr): (IpNet, IpNet),
    d: &mut Diagnostics,
) -> Option<ProxyPlan> {
    let x = p.k3s.proxy.as_ref()?;
    if x.http.is_none() && x.https.is_none() {
        if !d.is_broken(&format!("{}.http", x.key)) && !d.is_broken(&format!("{}.https", x.key)) {
            d.error(x.span.clone(), &x.key, "`[k3s.proxy]` names no proxy", "add `http = \"http://proxy.example.org:3128\"` and/or `https = …`, or remove the table");
        }
        return None;
    }
    let mut no_proxy: Vec<String> = NO_PROXY_ALWAYS.iter().map(|s| s.to_string()).collect();
    no_proxy.push(cluster_cidr.to_string());
    no_proxy.push(service_cidr.to_string());
    no_proxy.extend(wg.map(|w| w.network.to_string()));
    no_proxy.extend(nodes.iter().filter_map(lan_network));
    no_proxy.extend(p.k3s.registration_address.as_ref().map(|a| match &a.v {
        Host::Ip(ip) => ip.to_string(),
        Host::Name(n) => n.clone(),
    }));
    for n in nodes {
        no_proxy.push(n.name.clone());
        no_proxy.push(n.hostname.clone());
    }
    no_proxy.extend(x.no_proxy.iter().map(|a| a.v.clone()));
    let mut seen = std::collections::BTreeSet::new();
    no_proxy.retain(|e| seen.insert(e.clone()));
    Some(ProxyPlan {
        http: x.http.as_ref().map(|a| a.v.clone()),
        https: x.https.as_ref().map(|a| a.v.clone()),
        no_proxy,
    })
}

/// A node's LAN: its static network, else its (reserved) LAN address.
fn lan_network(n: &NodePlan) -> Option<String> {
    match (n.network.address, n.lan_address) {
        (Some(net), _) => Some(net.trunc().to_string()),
        (None, Some(ip)) => Some(ip.to_string()),
        (None, None) => None,
    }
}
