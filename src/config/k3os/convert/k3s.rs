//! `[k3s]` and the per-node k3s facts: the token, `k3s_args` split into
//! kiln's keys and `server-args`/`agent-args`, `cluster-init`, and a
//! server's LAN address when the agents' `server_url` names it.

use std::net::IpAddr;

use super::super::Note;
use super::super::k3s_args::{self, Flag, Kind};
use super::super::read::Val;
use super::{Input, Out, node_list, spread};
use crate::config::profile::Role;
use crate::config::types::{self, Host};

/// What k3s's `--disable` takes that kiln's `k3s.disable` accepts.
const DISABLE: &[&str] = &[
    "coredns",
    "servicelb",
    "traefik",
    "local-storage",
    "metrics-server",
    "runtimes",
];

pub(super) fn convert(inputs: &[Input], out: &mut Out, notes: &mut Vec<Note>) {
    token(inputs, out, notes);
    for role in [Role::Server, Role::Agent] {
        args(inputs, out, role, notes);
    }
    cluster_keys(inputs, out, notes);
    cluster_init(inputs, out, notes);
    server_lan_address(inputs, out);
}

/// The secret a k3os token carries: a plain token as it is; from
/// `K10<hash>::server:<secret>` the secret (kiln adds its own CA's
/// hash); an agent token (`::node:`) cannot be the cluster's.
fn secret(v: &Val, notes: &mut Vec<Note>) -> Option<String> {
    let Some(rest) = v.v.strip_prefix("K10") else {
        return Some(v.v.clone());
    };
    match rest.split_once("::").and_then(|(_, t)| t.split_once(':')) {
        Some(("server", s)) => {
            notes.push(Note::changed(&v.at, &v.key, "a secure token (K10<CA hash>::server:<secret>): kiln keeps the secret and puts the hash of the new cluster's CA in front"));
            Some(s.to_string())
        }
        _ => {
            notes.push(Note::dropped(&v.at, &v.key, "an agent or node token (K10…::node:…) is not the cluster's secret: kiln gives every node the cluster token"));
            None
        }
    }
}

/// `k3s.token`: the servers' secret (then the agents'), when it is one
/// kiln accepts; every other differing token is a note.
fn token(inputs: &[Input], out: &mut Out, notes: &mut Vec<Note>) {
    let mut found: Vec<(String, Val, usize)> = Vec::new();
    for (n, i) in inputs.iter().enumerate() {
        let flags = i.flags.iter().filter(|f| k3s_args::kind(f) == Kind::Token);
        let from_flags = flags.filter_map(|f| {
            f.value.as_ref().map(|v| Val {
                v: v.clone(),
                ..f.from.clone()
            })
        });
        for v in i.c.token.iter().cloned().chain(from_flags) {
            if let Some(s) = secret(&v, notes) {
                found.push((s, v, n));
            }
        }
    }
    found.sort_by_key(|(_, _, n)| out.nodes[*n].role != Role::Server);
    let Some((chosen, first, _)) = found.first().cloned() else {
        return;
    };
    for (s, v, _) in &found {
        if *s != chosen {
            notes.push(Note::dropped(
                &v.at,
                &v.key,
                &format!(
                    "differs from the token at {}: kiln's nodes share one token",
                    first.at
                ),
            ));
        }
    }
    if !types::is_valid_token(&chosen) {
        notes.push(Note::dropped(&first.at, &first.key, &format!("kiln needs a token of at least {} characters without spaces: it generates one in the state directory instead", types::MIN_TOKEN_CHARS)));
        return;
    }
    notes.push(Note::changed(&first.at, &first.key, "carried over as k3s.token: the profile now holds the cluster's secret (it is written 0600; keep it out of public repositories)"));
    out.k3s.token = Some(chosen);
}

/// `server-args` or `agent-args`: the flags kiln passes on, when every
/// node of the role has them (kiln gives one list to the whole role).
fn args(inputs: &[Input], out: &mut Out, role: Role, notes: &mut Vec<Note>) {
    let idx: Vec<usize> = (0..inputs.len())
        .filter(|&n| out.nodes[n].role == role)
        .collect();
    let names: Vec<String> = idx.iter().map(|&n| out.nodes[n].name.clone()).collect();
    let mut per_node = Vec::new();
    for &n in &idx {
        let mut items = Vec::new();
        for f in &inputs[n].flags {
            match k3s_args::kind(f) {
                Kind::Pass if f.arg().chars().any(char::is_control) => {
                    notes.push(Note::dropped(
                        &f.from.at,
                        &f.from.key,
                        "contains a control character: kiln refuses it in a k3s argument",
                    ));
                }
                Kind::Pass => items.push((f.arg(), (), f.from.clone())),
                Kind::Rendered(why) => notes.push(Note::dropped(
                    &f.from.at,
                    &f.from.key,
                    &format!("`{}`: {why}", f.arg()),
                )),
                _ => {}
            }
        }
        per_node.push(items);
    }
    let key = if role == Role::Server {
        "server-args"
    } else {
        "agent-args"
    };
    for s in spread(per_node) {
        if s.on.len() == names.len() {
            let list = if role == Role::Server {
                &mut out.k3s.server_args
            } else {
                &mut out.k3s.agent_args
            };
            list.push(s.key);
        } else {
            notes.push(Note::dropped(&s.from.at, &s.from.key, &format!(
                "`{}` only on {} of the {}s: kiln gives every {} the same k3s.{key}; add it there to pass it to all",
                s.key,
                node_list(&names, &s.on),
                role.as_str(),
                role.as_str()
            )));
        }
    }
}

/// The flags that are cluster-wide keys in kiln: CIDRs and flannel backend
/// (one value for all servers), `disable` and `tls-san` (all servers'
/// values). On an agent they are k3s errors, and notes here.
fn cluster_keys(inputs: &[Input], out: &mut Out, notes: &mut Vec<Note>) {
    let mut single: [(Kind, Option<(String, Val)>); 3] = [
        (Kind::ClusterCidr, None),
        (Kind::ServiceCidr, None),
        (Kind::FlannelBackend, None),
    ];
    for (n, i) in inputs.iter().enumerate() {
        for f in &i.flags {
            let kind = k3s_args::kind(f);
            if !matches!(
                kind,
                Kind::ClusterCidr
                    | Kind::ServiceCidr
                    | Kind::FlannelBackend
                    | Kind::Disable
                    | Kind::TlsSan
            ) {
                continue;
            }
            if out.nodes[n].role == Role::Agent {
                notes.push(Note::dropped(
                    &f.from.at,
                    &f.from.key,
                    &format!(
                        "`{}` is a server flag; k3s's agent does not take it",
                        f.arg()
                    ),
                ));
                continue;
            }
            let value = f.value.clone().unwrap_or_default();
            match kind {
                Kind::Disable => disable(&value, f, out, notes),
                Kind::TlsSan => tls_san(&value, f, out, notes),
                _ => {
                    let Some(v) = single_value(kind, &value, f, notes) else {
                        continue;
                    };
                    let slot = &mut single.iter_mut().find(|(k, _)| *k == kind).unwrap().1;
                    match slot {
                        Some((first, at)) if *first != v => notes.push(Note::dropped(
                            &f.from.at,
                            &f.from.key,
                            &format!(
                                "differs from {} ({}): kiln gives every server one value",
                                first, at.at
                            ),
                        )),
                        Some(_) => {}
                        None => *slot = Some((v, f.from.clone())),
                    }
                }
            }
        }
    }
    let [cidr, service, flannel] = single;
    out.k3s.cluster_cidr = cidr.1.map(|(v, _)| v);
    out.k3s.service_cidr = service.1.map(|(v, _)| v);
    out.k3s.flannel_backend = flannel.1.map(|(v, _)| v);
}

/// A CIDR or flannel backend as kiln's key takes it.
fn single_value(kind: Kind, value: &str, f: &Flag, notes: &mut Vec<Note>) -> Option<String> {
    if kind == Kind::FlannelBackend {
        return match value {
            "vxlan" | "host-gw" | "wireguard-native" | "none" => Some(value.to_string()),
            "wireguard" => {
                notes.push(Note::changed(
                    &f.from.at,
                    &f.from.key,
                    "flannel's old `wireguard` backend is `wireguard-native` in current k3s",
                ));
                Some("wireguard-native".to_string())
            }
            _ => {
                notes.push(Note::dropped(&f.from.at, &f.from.key, &format!("`{value}`: kiln's k3s.flannel-backend is vxlan, host-gw, wireguard-native or none")));
                None
            }
        };
    }
    match value.parse::<ipnet::IpNet>() {
        Ok(net) => Some(net.to_string()),
        Err(_) => {
            notes.push(Note::dropped(
                &f.from.at,
                &f.from.key,
                &format!("`{value}`: kiln takes one CIDR here (no dual-stack list)"),
            ));
            None
        }
    }
}

fn disable(value: &str, f: &Flag, out: &mut Out, notes: &mut Vec<Note>) {
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !DISABLE.contains(&item) {
            notes.push(Note::dropped(
                &f.from.at,
                &f.from.key,
                &format!("`{item}`: kiln's k3s.disable takes {}", DISABLE.join(", ")),
            ));
        } else if !out.k3s.disable.iter().any(|d| d == item) {
            out.k3s.disable.push(item.to_string());
        }
    }
}

fn tls_san(value: &str, f: &Flag, out: &mut Out, notes: &mut Vec<Note>) {
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match Host::parse(item) {
            Ok(_) if out.k3s.tls_san.iter().any(|s| s == item) => {}
            Ok(_) => out.k3s.tls_san.push(item.to_string()),
            Err(e) => notes.push(Note::dropped(&f.from.at, &f.from.key, &e.message)),
        }
    }
}

/// `--cluster-init` on a server; with several servers and none marked,
/// the one that joins nobody (else the first) starts the cluster.
fn cluster_init(inputs: &[Input], out: &mut Out, notes: &mut Vec<Note>) {
    for (n, i) in inputs.iter().enumerate() {
        for f in i
            .flags
            .iter()
            .filter(|f| k3s_args::kind(f) == Kind::ClusterInit)
        {
            if out.nodes[n].role == Role::Server {
                out.nodes[n].cluster_init = f.value.as_deref() != Some("false");
            } else {
                notes.push(Note::dropped(
                    &f.from.at,
                    &f.from.key,
                    "a server flag; k3s's agent does not take it",
                ));
            }
        }
    }
    let servers: Vec<usize> = (0..inputs.len())
        .filter(|&n| out.nodes[n].role == Role::Server)
        .collect();
    if servers.len() < 2 || servers.iter().any(|&n| out.nodes[n].cluster_init) {
        return;
    }
    let alone: Vec<usize> = servers
        .iter()
        .copied()
        .filter(|&n| inputs[n].c.server_url.is_none())
        .collect();
    let pick = if alone.len() == 1 {
        alone[0]
    } else {
        servers[0]
    };
    out.nodes[pick].cluster_init = true;
    let file = inputs[pick].c.file.clone();
    notes.push(Note {
        kind: super::super::NoteKind::Changed,
        at: None,
        key: format!("nodes.{}.cluster-init", out.nodes[pick].name),
        text: format!("kiln needs one server marked to start the cluster; none had --cluster-init, so {} ({file}) does: move it if another server started the k3os cluster", out.nodes[pick].name),
    });
}

/// With one server, the agents' `server_url` host, when it is an IP and
/// they agree on it, is that server's LAN address.
fn server_lan_address(inputs: &[Input], out: &mut Out) {
    let servers: Vec<usize> = (0..inputs.len())
        .filter(|&n| out.nodes[n].role == Role::Server)
        .collect();
    let [server] = servers[..] else { return };
    let hosts: Vec<(IpAddr, &Val)> = inputs
        .iter()
        .filter_map(|i| i.c.server_url.as_ref())
        .filter_map(|u| url_ip(&u.v).map(|ip| (ip, u)))
        .collect();
    if let Some((ip, u)) = hosts.first()
        && hosts.iter().all(|(x, _)| x == ip)
        && inputs.iter().all(|i| {
            i.c.server_url.is_none() || url_ip(&i.c.server_url.as_ref().unwrap().v).is_some()
        })
    {
        out.nodes[server].lan_address = Some((*ip, format!("k3os.server_url at {}", u.at)));
    }
}

/// The IP in `https://IP:6443`, if the host is one.
fn url_ip(url: &str) -> Option<IpAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_of_k3os_tokens() {
        let v = |t: &str| Val {
            v: t.to_string(),
            at: crate::config::k3os::yaml::Origin {
                file: "a1.yaml".into(),
                line: 4,
            },
            key: "k3os.token".into(),
        };
        let mut notes = Vec::new();
        assert_eq!(
            secret(&v("plain-secret"), &mut notes).as_deref(),
            Some("plain-secret")
        );
        assert!(notes.is_empty());
        let hash = "0".repeat(64);
        let server = format!("K10{hash}::server:the-secret");
        assert_eq!(
            secret(&v(&server), &mut notes).as_deref(),
            Some("the-secret")
        );
        assert_eq!(secret(&v(&format!("K10{hash}::node:pw")), &mut notes), None);
        assert_eq!(notes.len(), 2);
        assert!(!notes.iter().any(|n| n.text.contains("the-secret")));
    }

    #[test]
    fn ips_in_server_urls() {
        assert_eq!(
            url_ip("https://192.168.1.10:6443"),
            "192.168.1.10".parse().ok()
        );
        assert_eq!(url_ip("https://[fd00::1]:6443/"), "fd00::1".parse().ok());
        assert_eq!(url_ip("https://k3s.lan:6443"), None);
    }
}
