//! k3s: `config.yaml`, the token file, `registries.yaml`, and the unit.

use crate::config::plan::{NodePlan, Plan};
use crate::config::profile::Role;
use crate::config::types::Host;
use crate::render::tree::FileTree;

use super::yaml::{self, Y};
use super::{NodeSecrets, SECRET_MODE, header, systemd_quote};

/// Where the k3s binary lives in the root image.
pub const K3S_BIN: &str = "/usr/local/bin/k3s";
pub const TOKEN_FILE: &str = "/etc/rancher/k3s/cluster-token";
/// Where k3s's agent (on servers too) reads its node password; it writes
/// one only if the file is missing, so the seeded one is used.
pub const NODE_PASSWORD_FILE: &str = "/etc/rancher/node/password";
/// The label kiln puts on every node: its role, for upgrade plans.
pub const ROLE_LABEL: &str = "kiln.dev/role";

fn kv(k: &str, v: Y) -> (String, Y) {
    (k.to_string(), v)
}

/// The `config.yaml` keys of a node.
pub fn config(plan: &Plan, node: &NodePlan) -> Vec<(String, Y)> {
    let k = &plan.k3s;
    let mut c = vec![
        kv("node-name", Y::str(&node.name)),
        kv("token-file", Y::str(TOKEN_FILE)),
    ];
    if let Some(url) = plan.join_url(node) {
        c.push(kv("server", Y::str(url)));
    }
    if node.role == Role::Server && node.cluster_init {
        c.push(kv("cluster-init", Y::Bool(true)));
    }
    if let Some(ip) = plan.cluster_address(node) {
        c.push(kv("node-ip", Y::str(ip.to_string())));
        if node.role == Role::Server {
            c.push(kv("advertise-address", Y::str(ip.to_string())));
        }
    }
    if let Some(wg) = &plan.wireguard {
        c.push(kv("flannel-iface", Y::str(&wg.interface)));
    }
    if node.role == Role::Server {
        c.push(kv("flannel-backend", Y::str(&k.flannel_backend)));
        c.push(kv("cluster-cidr", Y::str(k.cluster_cidr.to_string())));
        c.push(kv("service-cidr", Y::str(k.service_cidr.to_string())));
        let mut san: Vec<String> = Vec::new();
        // The address `kiln kubeconfig` points at, on the server it names.
        let api = plan.api_host().filter(|_| plan.join_url(node).is_none());
        for h in k
            .registration_address
            .iter()
            .chain(k.tls_san.iter())
            .chain(api.iter())
        {
            let s = match h {
                Host::Ip(ip) => ip.to_string(),
                Host::Name(n) => n.clone(),
            };
            if !san.contains(&s) {
                san.push(s);
            }
        }
        if !san.is_empty() {
            c.push(kv("tls-san", Y::strs(&san)));
        }
        if !k.disable.is_empty() {
            c.push(kv("disable", Y::strs(&k.disable)));
        }
    }
    let mut labels = vec![format!("{ROLE_LABEL}={}", node.role.as_str())];
    labels.extend(node.labels.iter().map(|(k, v)| format!("{k}={v}")));
    c.push(kv("node-label", Y::strs(&labels)));
    if !node.taints.is_empty() {
        c.push(kv("node-taint", Y::strs(&node.taints)));
    }
    c
}

/// `registries.yaml`, or `None` when the profile has no mirrors or configs.
pub fn registries(plan: &Plan) -> Option<String> {
    let k = &plan.k3s;
    if k.mirrors.is_empty() && k.registry_configs.is_empty() {
        return None;
    }
    let mut doc = Vec::new();
    if !k.mirrors.is_empty() {
        doc.push(kv(
            "mirrors",
            Y::Map(
                k.mirrors
                    .iter()
                    .map(|(h, e)| (h.clone(), Y::Map(vec![kv("endpoint", Y::strs(e))])))
                    .collect(),
            ),
        ));
    }
    if !k.registry_configs.is_empty() {
        let configs = k
            .registry_configs
            .iter()
            .map(|(h, c)| {
                let mut m = Vec::new();
                if c.username.is_some() || c.password.is_some() {
                    let mut auth = Vec::new();
                    auth.extend(c.username.as_ref().map(|u| kv("username", Y::str(u))));
                    auth.extend(c.password.as_ref().map(|p| kv("password", Y::str(p))));
                    m.push(kv("auth", Y::Map(auth)));
                }
                let mut tls = Vec::new();
                tls.extend(c.ca_file.as_ref().map(|f| kv("ca_file", Y::str(f))));
                if c.insecure_skip_verify {
                    tls.push(kv("insecure_skip_verify", Y::Bool(true)));
                }
                if !tls.is_empty() {
                    m.push(kv("tls", Y::Map(tls)));
                }
                (h.clone(), Y::Map(m))
            })
            .collect();
        doc.push(kv("configs", Y::Map(configs)));
    }
    Some(format!("{}{}", header("#", plan), yaml::to_string(&doc)))
}

fn unit(plan: &Plan, node: &NodePlan) -> String {
    let (verb, args) = match node.role {
        Role::Server => ("server", &plan.k3s.server_args),
        Role::Agent => ("agent", &plan.k3s.agent_args),
    };
    let mut exec = format!("{K3S_BIN} {verb}");
    for a in args {
        exec.push(' ');
        exec.push_str(&systemd_quote(a));
    }
    let wg = plan
        .wireguard
        .as_ref()
        .map(|w| format!(" wg-quick@{}.service", w.interface))
        .unwrap_or_default();
    // The proxy, after /etc/default/k3s: the profile's value wins.
    let proxy = plan
        .proxy
        .as_ref()
        .map(|_| format!("EnvironmentFile={}\n", super::proxy::ENV_FILE))
        .unwrap_or_default();
    format!(
        "{}[Unit]\nDescription=k3s {verb} (kiln)\nDocumentation=https://docs.k3s.io\nWants=network-online.target nftables.service{wg}\nAfter=network-online.target nftables.service{wg} kiln-firstboot.service\nRequiresMountsFor=/var/lib/rancher\n\n[Service]\nType=notify\nEnvironmentFile=-/etc/default/k3s\n{proxy}KillMode=process\nDelegate=yes\nLimitNOFILE=1048576\nLimitNPROC=infinity\nLimitCORE=infinity\nTasksMax=infinity\nTimeoutStartSec=0\nRestart=always\nRestartSec=5s\nExecStartPre=-/sbin/modprobe br_netfilter\nExecStartPre=-/sbin/modprobe overlay\nExecStart={exec}\n\n[Install]\nWantedBy=multi-user.target\n",
        header("#", plan)
    )
}

pub fn render(plan: &Plan, node: &NodePlan, secrets: &NodeSecrets, tree: &mut FileTree) {
    tree.file(
        "/etc/rancher/k3s/config.yaml",
        SECRET_MODE,
        format!(
            "{}{}",
            header("#", plan),
            yaml::to_string(&config(plan, node))
        ),
    );
    // The secure form (`K10<server CA hash>::server:<secret>`) on every
    // node: agents and joining servers check the CA the server presents;
    // the server that starts the cluster accepts it as its own token.
    tree.file(
        TOKEN_FILE,
        SECRET_MODE,
        format!("{}\n", secrets.token.expose()),
    );
    // As k3s writes it: the password and a newline, 0600.
    tree.dir("/etc/rancher/node", 0o700);
    tree.file(
        NODE_PASSWORD_FILE,
        SECRET_MODE,
        format!("{}\n", secrets.node_password.expose()),
    );
    if let Some(r) = registries(plan) {
        tree.file("/etc/rancher/k3s/registries.yaml", SECRET_MODE, r);
    }
    tree.file("/etc/systemd/system/k3s.service", 0o644, unit(plan, node));
    tree.symlink(
        "/etc/systemd/system/multi-user.target.wants/k3s.service",
        "/etc/systemd/system/k3s.service",
    );
    tree.symlink(
        "/etc/systemd/system/multi-user.target.wants/nftables.service",
        "/lib/systemd/system/nftables.service",
    );
}
