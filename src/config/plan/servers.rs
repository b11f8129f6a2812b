//! Checks the servers and how nodes join them: one server to start the
//! cluster (`cluster-init`), and an address for the others to reach it.

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, Role};

use super::NodePlan;

pub(super) fn check_servers(
    p: &profile::Profile,
    nodes: &[NodePlan],
    wg_enabled: bool,
    d: &mut Diagnostics,
) {
    let servers: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].role == Role::Server)
        .collect();
    if !nodes.is_empty() && servers.is_empty() && p.nodes.iter().all(|n| n.role.is_some()) {
        d.error(
            p.nodes_span.clone(),
            "nodes",
            "no node has `role = \"server\"`",
            "make one node a server: k3s agents need a server to join",
        );
    }
    let inits: Vec<usize> = servers
        .iter()
        .copied()
        .filter(|&i| nodes[i].cluster_init)
        .collect();
    if inits.len() > 1 {
        let n = &p.nodes[inits[1]];
        d.error(
            n.cluster_init.as_ref().unwrap().span.clone(),
            &format!("{}.cluster-init", n.key),
            "more than one server has `cluster-init = true`",
            format!(
                "keep it on `{}` only; the other servers join it",
                nodes[inits[0]].name
            ),
        );
    }
    if servers.len() > 1 && inits.is_empty() {
        let n = &p.nodes[servers[0]];
        d.error(
            n.span.clone(),
            &format!("{}.cluster-init", n.key),
            format!(
                "{} servers, but none has `cluster-init = true`",
                servers.len()
            ),
            format!(
                "set `cluster-init = true` on `{}` so the others join its embedded etcd",
                nodes[servers[0]].name
            ),
        );
    }
    if !servers.is_empty() && p.k3s.registration_address.is_none() {
        let first = &nodes[servers[0]];
        let reachable = if wg_enabled {
            first.wireguard_address.is_some()
        } else {
            first.lan_address.is_some()
        };
        if !reachable && !wg_enabled {
            for (i, n) in nodes.iter().enumerate() {
                if n.role == Role::Agent || (i != servers[0] && !n.cluster_init) {
                    d.error(
                        p.nodes[i].span.clone(),
                        &p.nodes[i].key,
                        format!(
                            "{} `{}` has no server to join: server `{}` has no known address",
                            n.role.as_str(),
                            n.name,
                            first.name
                        ),
                        format!(
                            "set `lan-address` on `{}`, or `k3s.registration-address`",
                            first.name
                        ),
                    );
                }
            }
        }
    }
}
