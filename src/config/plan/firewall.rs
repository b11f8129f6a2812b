//! Resolves `[firewall]`: open ports (with what k3s needs when traffic
//! crosses the LAN), trusted interfaces and networks, and extra rules.

use ipnet::IpNet;

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, Role};

use super::{
    DEFAULT_ALLOW_TCP, ETCD_PORTS, FLANNEL_VXLAN_PORT, FLANNEL_WG_PORTS, FirewallPlan,
    FirewallRulePlan, K3S_API_PORT, KUBELET_PORT, NodePlan, OPERATOR_TCP_PORTS, OperatorAccess,
    OperatorPlan, WgPlan,
};

pub(super) fn resolve_firewall(
    f: &profile::Firewall,
    nodes: &[NodePlan],
    wireguard: Option<&WgPlan>,
    flannel_backend: &str,
    wg_enabled: bool,
    (cluster_cidr, service_cidr): (IpNet, IpNet),
    d: &mut Diagnostics,
) -> FirewallPlan {
    let wg_iface = wireguard.map(|w| w.interface.clone());
    let mut allow_udp: Vec<u16> = f
        .allow_udp
        .as_ref()
        .map_or_else(Vec::new, |l| l.iter().map(|a| a.v).collect());
    let mut allow_tcp: Vec<u16> = f.allow_tcp.as_ref().map_or_else(
        || DEFAULT_ALLOW_TCP.to_vec(),
        |l| l.iter().map(|a| a.v).collect(),
    );
    if !wg_enabled {
        // Without kiln's tunnel, cluster traffic crosses the LAN: open what k3s needs.
        let mut tcp = vec![K3S_API_PORT, KUBELET_PORT];
        if nodes.iter().filter(|n| n.role == Role::Server).count() > 1 {
            tcp.extend(ETCD_PORTS);
        }
        let udp: Vec<u16> = match flannel_backend {
            "wireguard-native" => FLANNEL_WG_PORTS.to_vec(),
            "vxlan" => vec![FLANNEL_VXLAN_PORT],
            _ => vec![],
        };
        for p in tcp {
            if !allow_tcp.contains(&p) {
                allow_tcp.push(p);
            }
        }
        for p in udp {
            if !allow_udp.contains(&p) {
                allow_udp.push(p);
            }
        }
    }
    if let Some(w) = wireguard
        && !allow_udp.contains(&w.listen_port)
    {
        allow_udp.push(w.listen_port);
    }
    // A hub node's kiln-relay server, for spokes that reach it over TCP.
    if let Some(w) = wireguard
        && matches!(w.hub, Some(super::HubRef::Node(_)))
        && w.uses_relay()
        && !allow_tcp.contains(&w.hub_tcp_port)
    {
        allow_tcp.push(w.hub_tcp_port);
    }
    FirewallPlan {
        allow_tcp,
        allow_udp,
        accept_interfaces: f.accept_interfaces.as_ref().map_or_else(
            || wg_iface.iter().cloned().collect(),
            |l| l.iter().map(|a| a.v.clone()).collect(),
        ),
        accept_cidrs: f.accept_cidrs.as_ref().map_or_else(
            || {
                let mut v = vec![cluster_cidr, service_cidr];
                v.extend(wireguard.map(|w| w.network));
                v
            },
            |l| l.iter().map(|a| a.v).collect(),
        ),
        icmp: f.icmp.unwrap_or(true),
        operators: None,
        rules: f
            .rules
            .iter()
            .map(|r| {
                if r.tcp.is_empty() && r.udp.is_empty() {
                    d.error(
                        r.span.clone(),
                        &r.key,
                        "a firewall rule with no ports",
                        "add `tcp = [..]` or `udp = [..]`, or remove the rule",
                    );
                }
                FirewallRulePlan {
                    interface: r.interface.as_ref().map(|a| a.v.clone()),
                    from: r.from.iter().map(|a| a.v).collect(),
                    tcp: r.tcp.iter().map(|a| a.v).collect(),
                    udp: r.udp.iter().map(|a| a.v).collect(),
                }
            })
            .collect(),
    }
}

/// With operators, what they may reach: SSH and the API of every node,
/// over the tunnel only.
pub(super) fn operator_access(
    wireguard: Option<&WgPlan>,
    nodes: &[NodePlan],
    operators: &[OperatorPlan],
) -> Option<OperatorAccess> {
    let wg = wireguard?;
    if operators.is_empty() {
        return None;
    }
    Some(OperatorAccess {
        interface: wg.interface.clone(),
        sources: operators.iter().map(|o| o.wireguard_address).collect(),
        tcp: OPERATOR_TCP_PORTS.to_vec(),
        nodes: nodes.iter().filter_map(|n| n.wireguard_address).collect(),
    })
}
