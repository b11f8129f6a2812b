//! Resolves `[k3s]`: version, flags, disabled components, registry
//! mirrors, token, networks and the flannel backend.

use ipnet::IpNet;

use crate::config::diag::Diagnostics;
use crate::config::profile;
use crate::config::types;

use super::{
    DEFAULT_CLUSTER_CIDR, DEFAULT_SERVICE_CIDR, DEFAULT_WG_PORT, FLANNEL_WG_PORTS, K3S_COMPONENTS,
    K3sPlan,
};

/// The pod and service networks, defaulted.
pub(super) fn cidrs(k: &profile::K3s) -> (IpNet, IpNet) {
    let cluster_cidr = k
        .cluster_cidr
        .as_ref()
        .map_or_else(|| DEFAULT_CLUSTER_CIDR.parse().unwrap(), |a| a.v);
    let service_cidr = k
        .service_cidr
        .as_ref()
        .map_or_else(|| DEFAULT_SERVICE_CIDR.parse().unwrap(), |a| a.v);
    (cluster_cidr, service_cidr)
}

/// Checks `[k3s]` and returns the flannel backend (wireguard-native with
/// kiln's tunnel, vxlan without, unless set).
pub(super) fn resolve_flannel(
    p: &profile::Profile,
    wg_enabled: bool,
    d: &mut Diagnostics,
) -> String {
    let k = &p.k3s;
    check_k3s_values(k, d);
    let flannel_backend_at = k.flannel_backend.as_ref();
    if let (Some(w), true) = (
        p.wireguard.as_ref().filter(|_| wg_enabled),
        flannel_backend_at.is_none_or(|a| a.v == "wireguard-native"),
    ) && let Some(lp) = w
        .listen_port
        .as_ref()
        .filter(|lp| FLANNEL_WG_PORTS.contains(&lp.v))
    {
        d.error(
            lp.span.clone(),
            &lp.key,
            format!(
                "port {} is used by flannel's wireguard-native backend inside the tunnel",
                lp.v
            ),
            format!("use another port, like {DEFAULT_WG_PORT} (the default)"),
        );
    }
    k.flannel_backend.as_ref().map_or_else(
        || {
            if wg_enabled {
                "wireguard-native"
            } else {
                "vxlan"
            }
            .to_string()
        },
        |a| a.v.clone(),
    )
}

/// Flags, disabled components, mirrors and token.
fn check_k3s_values(k: &profile::K3s, d: &mut Diagnostics) {
    for a in k.server_args.iter().chain(k.agent_args.iter()) {
        if !a.v.starts_with("--") || a.v.chars().any(|c| c.is_control()) {
            d.error(a.span.clone(), &a.key, format!("`{}` is not a k3s flag", a.v.escape_debug()), "write each flag as one string starting with --, like \"--kube-apiserver-arg=audit-log-maxage=7\"");
        }
    }
    for a in &k.disable {
        if !K3S_COMPONENTS.contains(&a.v.as_str()) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("k3s has no component `{}` to disable", a.v),
                format!("use one of: {}", K3S_COMPONENTS.join(", ")),
            );
        }
    }
    for (host, endpoints) in &k.mirrors {
        for e in endpoints {
            if !(e.v.starts_with("http://") || e.v.starts_with("https://"))
                || e.v.contains(char::is_whitespace)
            {
                d.error(
                    e.span.clone(),
                    &e.key,
                    format!("`{}` is not a registry URL", e.v),
                    "write a URL like \"http://rgb1:5000\"",
                );
            }
        }
        if endpoints.is_empty() {
            d.error(
                host.span.clone(),
                &host.key,
                format!("mirror `{}` has no endpoints", host.v),
                "add `endpoints = [\"http://rgb1:5000\"]`",
            );
        }
    }
    if let Some(t) = &k.token
        && !types::is_valid_token(t.v.expose())
    {
        d.error(t.span.clone(), &t.key, "the k3s token is too short or contains whitespace", "remove `token` to let kiln generate one in the state directory, or use at least 16 printable characters");
    }
    if let Some(t) = &k.token
        && t.v.expose().starts_with("K10")
        && !is_secure_token(t.v.expose())
    {
        d.error(t.span.clone(), &t.key, "the k3s token starts with K10 but is not a secure token (K10<64 hex digits>::server:<secret>)", "write only the secret; kiln adds the K10<CA hash>:: prefix for the CA it holds");
    }
}

/// Is `t` k3s's secure server token: `K10`, a SHA-256 in hex, `::server:`
/// and the secret? (A token for another user, such as an agent-only
/// `node:` token, cannot start or join a server.)
fn is_secure_token(t: &str) -> bool {
    crate::config::cluster_ca::split_secure(t).is_some_and(|(hash, creds)| {
        hash.len() == 64
            && hash.bytes().all(|c| c.is_ascii_hexdigit())
            && creds.strip_prefix("server:").is_some_and(|p| !p.is_empty())
    })
}

/// The k3s plan; `None` when the version is missing (reported already).
pub(super) fn k3s_plan(
    k: &profile::K3s,
    flannel_backend: String,
    (cluster_cidr, service_cidr): (IpNet, IpNet),
) -> Option<K3sPlan> {
    Some(K3sPlan {
        version: k.version.as_ref()?.v.clone(),
        token: k.token.as_ref().map(|a| a.v.clone()),
        server_args: k.server_args.iter().map(|a| a.v.clone()).collect(),
        agent_args: k.agent_args.iter().map(|a| a.v.clone()).collect(),
        disable: k.disable.iter().map(|a| a.v.clone()).collect(),
        flannel_backend,
        registration_address: k.registration_address.as_ref().map(|a| a.v.clone()),
        tls_san: k.tls_san.iter().map(|a| a.v.clone()).collect(),
        cluster_cidr,
        service_cidr,
        mirrors: k
            .mirrors
            .iter()
            .map(|(h, e)| (h.v.clone(), e.iter().map(|a| a.v.clone()).collect()))
            .collect(),
        registry_configs: k
            .registry_configs
            .iter()
            .map(|(h, c)| (h.v.clone(), c.clone()))
            .collect(),
    })
}
