//! Resolves `[[operators]]`: machines outside the cluster (an operator's
//! laptop) that reach the nodes' SSH and API ports over the tunnel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, Topology};

use super::wireguard::check_in_network;
use super::{NodePlan, OperatorPlan, WgPlan};

/// Check every operator entry; returns the ones complete enough to plan.
/// `seen` holds the tunnel addresses of nodes and peers so far.
pub(super) fn resolve_operators(
    p: &profile::Profile,
    wg_enabled: bool,
    wireguard: Option<&WgPlan>,
    nodes: &[NodePlan],
    d: &mut Diagnostics,
    seen: &mut BTreeMap<IpAddr, String>,
) -> Vec<OperatorPlan> {
    let Some(first) = p.operators.first() else {
        return Vec::new();
    };
    if !wg_enabled {
        d.error(
            first.span.clone(),
            &first.key,
            "an operator is set but WireGuard is off: operators reach the cluster through the tunnel",
            "add `[wireguard]` with a `network` (and set `enabled = true`), or remove `[[operators]]`",
        );
        return Vec::new();
    }
    let mut names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let peer_names = p.wireguard.iter().flat_map(|w| &w.peers);
    names.extend(peer_names.filter_map(|pe| pe.name.as_ref().map(|a| a.v.clone())));
    let mut out = Vec::new();
    for o in &p.operators {
        let name = operator_name(o, &mut names, d);
        let address = operator_address(o, &name, wireguard, seen, d);
        if let (Some(name), Some(wireguard_address)) = (name, address) {
            out.push(OperatorPlan {
                name,
                wireguard_address,
            });
        }
    }
    if let (Some(wg), Some(o)) = (wireguard, p.operators.first()) {
        check_reachable(wg, nodes, o, d);
    }
    out
}

/// The operator's name: required, unique among nodes, peers and operators.
fn operator_name(
    o: &profile::Operator,
    names: &mut Vec<String>,
    d: &mut Diagnostics,
) -> Option<String> {
    let Some(a) = &o.name else {
        d.missing(
            o.span.clone(),
            &format!("{}.name", o.key),
            "missing required key `name`",
            "add `name = \"alice-laptop\"`: it names the operator's key and wg-quick file",
        );
        return None;
    };
    if names.contains(&a.v) {
        d.error(
            a.span.clone(),
            &a.key,
            format!(
                "operator name `{}` is already used by a node, peer or operator",
                a.v
            ),
            "give the operator its own name, like \"alice-laptop\"",
        );
        return None;
    }
    names.push(a.v.clone());
    Some(a.v.clone())
}

/// The operator's tunnel address: required, inside the network, used by
/// no node, peer or other operator.
fn operator_address(
    o: &profile::Operator,
    name: &Option<String>,
    wireguard: Option<&WgPlan>,
    seen: &mut BTreeMap<IpAddr, String>,
    d: &mut Diagnostics,
) -> Option<IpAddr> {
    let Some(a) = &o.wireguard_address else {
        d.missing(
            o.span.clone(),
            &format!("{}.wireguard-address", o.key),
            "missing required key `wireguard-address`",
            "add the laptop's tunnel address, like `wireguard-address = \"10.0.0.200\"`",
        );
        return None;
    };
    let wg = wireguard?;
    let before = d.is_broken(&a.key);
    check_in_network(d, a, &wg.network);
    if !before && d.is_broken(&a.key) {
        return None;
    }
    if let Some(first) = seen.get(&a.v) {
        d.error(
            a.span.clone(),
            &a.key,
            format!("address {} is already used by {first}", a.v),
            "give the operator an address no node or peer uses",
        );
        return None;
    }
    let who = name.as_deref().unwrap_or("?");
    seen.insert(a.v, format!("operator `{who}`"));
    Some(a.v)
}

/// In a mesh the operator dials every node that has an endpoint; with
/// none, its tunnel would lead nowhere.
fn check_reachable(wg: &WgPlan, nodes: &[NodePlan], o: &profile::Operator, d: &mut Diagnostics) {
    if wg.topology == Topology::Mesh && nodes.iter().all(|n| n.endpoint.is_none()) {
        d.error(
            o.span.clone(),
            &o.key,
            "no node has an endpoint, so an operator in a mesh can reach none",
            "give a node an `endpoint = \"host:port\"` the laptop can reach (or a `lan-address` on the laptop's LAN), or use `topology = \"hub\"`",
        );
    }
}
