//! Resolves `[[nodes]]`: names, roles, host names, MACs, LAN and
//! WireGuard addresses, and where each node's WireGuard port is reached.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, At, Role};
use crate::config::types::{Endpoint, Host, MacAddr};

use super::wireguard::check_in_network;
use super::{
    DEFAULT_AFTER_INSTALL, DEFAULT_ALLOW_SUSPEND, DEFAULT_WG_PORT, IfaceMatch, InstallPlan,
    NetworkPlan, NodePlan,
};

/// What the nodes have used so far: names, host names, MACs and addresses
/// must each be unique.
#[derive(Default)]
struct Seen<'a> {
    names: BTreeMap<String, &'a At<String>>,
    hosts: BTreeMap<String, &'a At<String>>,
    macs: BTreeMap<MacAddr, &'a At<MacAddr>>,
    ips: BTreeMap<IpAddr, String>,
}

impl Seen<'_> {
    fn dup_ip(&mut self, d: &mut Diagnostics, a: &At<IpAddr>) {
        if let Some(first) = self.ips.get(&a.v) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("address {} is already used by {first}", a.v),
                "give every node and peer its own address",
            );
        } else {
            self.ips.insert(a.v, a.key.clone());
        }
    }
}

/// Sets `missing` when a node lacks a required key.
pub(super) fn resolve_nodes(
    p: &profile::Profile,
    wg_enabled: bool,
    d: &mut Diagnostics,
    missing: &mut bool,
) -> Vec<NodePlan> {
    let wg_network = p.wireguard.as_ref().and_then(|w| w.network.as_ref());
    let cluster_storage = super::storage::resolve_list(p.storage.as_deref().unwrap_or_default(), d);
    let mut seen = Seen::default();
    let mut nodes = Vec::new();
    for (i, n) in p.nodes.iter().enumerate() {
        let name = node_name(i, n, &mut seen, d, missing);
        let role = node_role(n, d, missing);
        let hostname = check_hostname(n, &name, &mut seen, d);
        if let Some(m) = &n.mac {
            if let Some(first) = seen.macs.get(&m.v) {
                d.error(
                    m.span.clone(),
                    &m.key,
                    format!("MAC address {} is already used by {}", m.v, first.key),
                    "copy each machine's own MAC from `ip link`",
                );
            } else {
                seen.macs.insert(m.v, m);
            }
        }
        if let Some(c) = &n.cluster_init
            && c.v
            && role == Role::Agent
        {
            d.error(
                c.span.clone(),
                &c.key,
                "`cluster-init` is set on an agent",
                "set it on the first server only, or remove it",
            );
        }
        let net = n.network.as_ref();
        let static_addr = net.and_then(|w| w.address.as_ref());
        let lan_address = resolve_lan(n, &mut seen, d);
        let matches = match (net.and_then(|w| w.interface.as_ref()), &n.mac) {
            (Some(i), _) => IfaceMatch::Name(i.v.clone()),
            (None, Some(m)) => IfaceMatch::Mac(m.v),
            (None, None) => IfaceMatch::AnyEthernet,
        };
        if wg_enabled {
            check_wg_address(n, &name, wg_network, &mut seen, d);
        }
        let endpoint = n.endpoint.as_ref().map(|a| a.v.clone()).or_else(|| {
            let port = p
                .wireguard
                .as_ref()
                .and_then(|w| w.listen_port.as_ref())
                .map_or(DEFAULT_WG_PORT, |a| a.v);
            lan_address.map(|ip| Endpoint {
                host: Host::Ip(ip),
                port,
            })
        });
        nodes.push(NodePlan {
            name,
            role,
            hostname,
            mac: n.mac.as_ref().map(|a| a.v),
            lan_address,
            wireguard_address: n.wireguard_address.as_ref().map(|a| a.v),
            endpoint,
            site: n.site.as_ref().map(|a| a.v.clone()),
            cluster_init: n.cluster_init.as_ref().is_some_and(|a| a.v),
            labels: n
                .labels
                .iter()
                .map(|(k, v)| (k.v.clone(), v.v.clone()))
                .collect(),
            taints: n.taints.iter().map(|a| a.v.clone()).collect(),
            cmdline: n.cmdline.iter().map(|a| a.v.clone()).collect(),
            network: NetworkPlan {
                matches,
                address: static_addr.map(|a| a.v),
                gateway: net.and_then(|w| w.gateway.as_ref()).map(|a| a.v),
            },
            allow_suspend: n
                .allow_suspend
                .as_ref()
                .map_or(DEFAULT_ALLOW_SUSPEND, |a| a.v),
            install: resolve_install(n, d),
            storage: super::storage::node_storage(&cluster_storage, n.storage.as_deref(), d),
        });
    }
    nodes
}

/// The node's name, unique; `node{i}` stands in when it is missing.
fn node_name<'a>(
    i: usize,
    n: &'a profile::Node,
    seen: &mut Seen<'a>,
    d: &mut Diagnostics,
    missing: &mut bool,
) -> String {
    match &n.name {
        Some(a) => {
            if let Some(first) = seen.names.get(&a.v) {
                d.error(
                    a.span.clone(),
                    &a.key,
                    format!(
                        "node name `{}` is already used by {}",
                        a.v,
                        first.key.trim_end_matches(".name")
                    ),
                    "give every node a unique name",
                );
            } else {
                seen.names.insert(a.v.clone(), a);
            }
            a.v.clone()
        }
        None => {
            d.missing(
                n.span.clone(),
                &format!("{}.name", n.key),
                "missing required key `name`",
                "add `name = \"rgb1\"` (a host-name label)",
            );
            *missing = true;
            format!("node{i}")
        }
    }
}

fn node_role(n: &profile::Node, d: &mut Diagnostics, missing: &mut bool) -> Role {
    match &n.role {
        Some(a) => a.v,
        None => {
            d.missing(
                n.span.clone(),
                &format!("{}.role", n.key),
                "missing required key `role`",
                "add `role = \"server\"` or `role = \"agent\"`",
            );
            *missing = true;
            Role::Agent
        }
    }
}

/// The host name (the node's name unless set), unique.
fn check_hostname<'a>(
    n: &'a profile::Node,
    name: &str,
    seen: &mut Seen<'a>,
    d: &mut Diagnostics,
) -> String {
    let hostname = n
        .hostname
        .as_ref()
        .map_or(name.to_string(), |a| a.v.clone());
    let host_at = n.hostname.clone().or_else(|| n.name.clone());
    if let Some(h) = &host_at {
        let h = At {
            v: hostname.clone(),
            ..h.clone()
        };
        if let Some(first) = seen.hosts.get(&hostname) {
            // Two nodes with the same name and no `hostname` are reported once, as a duplicate name.
            if n.hostname.is_some() || first.key.ends_with(".hostname") {
                d.error(
                    h.span.clone(),
                    &h.key,
                    format!("host name `{hostname}` is already used by {}", first.key),
                    "give every node its own host name",
                );
            }
        } else {
            seen.hosts.insert(
                hostname.clone(),
                n.hostname.as_ref().or(n.name.as_ref()).unwrap(),
            );
        }
    }
    hostname
}

/// The LAN address: from `lan-address`, or the static `network.address`
/// (with its gateway checked).
fn resolve_lan(n: &profile::Node, seen: &mut Seen<'_>, d: &mut Diagnostics) -> Option<IpAddr> {
    // LAN: from `lan-address`, or the static `network.address`.
    let net = n.network.as_ref();
    let static_addr = net.and_then(|w| w.address.as_ref());
    let mut lan_address = n.lan_address.as_ref().map(|a| a.v);
    if let (Some(l), Some(s)) = (&n.lan_address, static_addr)
        && l.v != s.v.addr()
    {
        d.error(
            l.span.clone(),
            &l.key,
            format!("lan-address {} differs from network.address {}", l.v, s.v),
            "remove `lan-address`; the static address is used",
        );
    }
    if let Some(s) = static_addr {
        lan_address = Some(s.v.addr());
        if s.v.prefix_len() < s.v.max_prefix_len()
            && (s.v.addr() == s.v.network() || s.v.addr() == s.v.broadcast())
            && s.v.prefix_len() < 31
        {
            d.error(
                s.span.clone(),
                &s.key,
                format!(
                    "{} is the network's {} address",
                    s.v.addr(),
                    if s.v.addr() == s.v.network() {
                        "network"
                    } else {
                        "broadcast"
                    }
                ),
                "pick a host address inside the subnet",
            );
        }
    }
    if let (Some(g), Some(s)) = (net.and_then(|w| w.gateway.as_ref()), static_addr)
        && !s.v.contains(&g.v)
    {
        d.error(
            g.span.clone(),
            &g.key,
            format!("gateway {} is outside {}", g.v, s.v.trunc()),
            "use a gateway on the node's LAN subnet",
        );
    }
    if let (Some(g), None) = (net.and_then(|w| w.gateway.as_ref()), static_addr) {
        d.error(
            g.span.clone(),
            &g.key,
            "a gateway without a static address",
            "add `address = \"192.168.1.11/24\"`, or remove `gateway` to use DHCP",
        );
    }
    if let Some(l) = n.lan_address.as_ref() {
        seen.dup_ip(d, l);
    } else if let Some(s) = static_addr {
        seen.dup_ip(
            d,
            &At {
                v: s.v.addr(),
                span: s.span.clone(),
                key: s.key.clone(),
            },
        );
    }
    lan_address
}

/// With WireGuard on, every node needs a unique address in the tunnel.
fn check_wg_address(
    n: &profile::Node,
    name: &str,
    wg_network: Option<&At<IpNet>>,
    seen: &mut Seen<'_>,
    d: &mut Diagnostics,
) {
    match &n.wireguard_address {
        None => d.missing(
            n.span.clone(),
            &format!("{}.wireguard-address", n.key),
            format!("node `{name}` has no WireGuard address"),
            "add `wireguard-address = \"10.0.0.11\"` inside the WireGuard network",
        ),
        Some(a) => {
            if let Some(net) = wg_network {
                check_in_network(d, a, &net.v);
            }
            seen.dup_ip(d, a);
        }
    }
}

/// `install-device` and `after-install`: the second only means something
/// with the first.
fn resolve_install(n: &profile::Node, d: &mut Diagnostics) -> Option<InstallPlan> {
    match (&n.install_device, &n.after_install) {
        (Some(dev), after) => Some(InstallPlan {
            device: dev.v.clone(),
            after: after.as_ref().map_or(DEFAULT_AFTER_INSTALL, |a| a.v),
            key: dev.key.clone(),
        }),
        (None, Some(after)) => {
            d.error(
                after.span.clone(),
                &after.key,
                "`after-install` is set but `install-device` is not",
                "add `install-device = \"/dev/disk/by-id/...\"` (the internal disk to install onto), or remove `after-install`",
            );
            None
        }
        (None, None) => None,
    }
}
