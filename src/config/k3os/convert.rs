//! k3os values to kiln's: per node where kiln's keys are per node
//! (`[[nodes]]`: name, role, labels, taints, install disk), cluster-wide
//! where they are cluster-wide (`[k3s]`, `[first-boot]`), following the
//! rules in the module doc of [`super`]. Every value either lands in
//! [`Out`] or leaves a [`Note`].

use std::net::IpAddr;

use anyhow::bail;

use super::Note;
use super::k3s_args::{self, Flag, Kind};
use super::read::{Config, Val};
use crate::config::profile::Role;
use crate::config::types::{self, Host};

mod files;
mod k3s;

/// The profile, as values; [`super::emit`] writes it.
#[derive(Debug, Default)]
pub struct Out {
    pub cluster: String,
    pub k3s: K3sOut,
    pub boot_cmd: Vec<String>,
    pub dns_nameservers: Vec<String>,
    pub ntp_servers: Vec<String>,
    pub modules: Vec<String>,
    pub sysctl: Vec<(String, String)>,
    pub users: Vec<UserOut>,
    pub files: Vec<FileOut>,
    pub nodes: Vec<NodeOut>,
}

#[derive(Debug, Default)]
pub struct K3sOut {
    pub token: Option<String>,
    pub server_args: Vec<String>,
    pub agent_args: Vec<String>,
    pub disable: Vec<String>,
    pub cluster_cidr: Option<String>,
    pub service_cidr: Option<String>,
    pub flannel_backend: Option<String>,
    pub tls_san: Vec<String>,
}

#[derive(Debug)]
pub struct UserOut {
    pub name: String,
    pub keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct FileOut {
    pub path: String,
    pub content: String,
    pub permissions: String,
    pub owner: Option<String>,
    /// Where it came from (the first node's, when several had it).
    pub from: Val,
}

#[derive(Debug)]
pub struct NodeOut {
    pub name: String,
    pub hostname: Option<String>,
    pub role: Role,
    pub file: String,
    pub cluster_init: bool,
    /// A LAN address k3os's configs name, and where from.
    pub lan_address: Option<(IpAddr, String)>,
    pub labels: Vec<(String, String)>,
    pub taints: Vec<String>,
    pub install_device: Option<String>,
    pub after_install: Option<&'static str>,
}

/// The k3os user SSH keys belonged to; kiln creates it.
pub const K3OS_USER: &str = "rancher";

/// One node's k3os config with its parsed `k3s_args`.
struct Input<'a> {
    c: &'a Config,
    verb: Option<Val>,
    flags: Vec<Flag>,
}

/// All nodes' configs to the profile's values.
pub fn convert(configs: &[Config], cluster: &str, notes: &mut Vec<Note>) -> anyhow::Result<Out> {
    let inputs: Vec<Input> = configs
        .iter()
        .map(|c| {
            let (verb, flags) = k3s_args::parse(&c.k3s_args, notes);
            Input { c, verb, flags }
        })
        .collect();
    let mut out = Out {
        cluster: cluster.to_string(),
        nodes: identify(&inputs, notes)?,
        ..Out::default()
    };
    let names: Vec<String> = out.nodes.iter().map(|n| n.name.clone()).collect();
    node_labels_taints_install(&inputs, &mut out.nodes, notes);
    k3s::convert(&inputs, &mut out, notes);
    commands(&inputs, &names, &mut out, notes);
    lists(&inputs, &names, &mut out, notes);
    files::convert(&inputs, &names, &mut out, notes);
    unsupported(&inputs, notes);
    general_notes(&out, notes);
    Ok(out)
}

/// Name, host name and role of each node. Two files naming one node, or
/// no server at all, are errors.
fn identify(inputs: &[Input], notes: &mut Vec<Note>) -> anyhow::Result<Vec<NodeOut>> {
    let mut nodes: Vec<NodeOut> = Vec::new();
    for i in inputs {
        let c = i.c;
        let stem = file_stem_label(&c.file);
        let (name, hostname) = match &c.hostname {
            Some(h) => match types::parse_hostname(&h.v) {
                Ok(host) => {
                    let name = host.split('.').next().unwrap_or(&host).to_string();
                    let hostname = (host != name).then_some(host);
                    (name, hostname)
                }
                Err(e) => {
                    notes.push(Note::dropped(
                        &h.at,
                        &h.key,
                        &format!("{}: the node is named `{stem}` after its file", e.message),
                    ));
                    (stem, None)
                }
            },
            None => {
                let at = super::yaml::Origin {
                    file: c.file.clone(),
                    line: 1,
                };
                notes.push(Note::changed(&at, "hostname", &format!("none given (k3os made up a k3os-NNNN name at boot): the node is named `{stem}` after its file")));
                (stem, None)
            }
        };
        if let Some(first) = nodes.iter().find(|n| n.name == name) {
            bail!(
                "{} and {} both describe node `{name}`\n    fix: give each node's file its own hostname (a file without one is shared, or names its node after the file)",
                first.file,
                c.file
            );
        }
        let role = match (i.verb.as_ref().map(|v| v.v.as_str()), &c.server_url) {
            (Some("agent"), _) | (None, Some(_)) => Role::Agent,
            _ => Role::Server,
        };
        nodes.push(NodeOut {
            name,
            hostname,
            role,
            file: c.file.to_string(),
            cluster_init: false,
            lan_address: None,
            labels: Vec::new(),
            taints: Vec::new(),
            install_device: None,
            after_install: None,
        });
    }
    if !nodes.iter().any(|n| n.role == Role::Server) {
        bail!(
            "no server among {}: each has k3os.server_url or starts k3s_args with `agent`\n    fix: import the server's config.yaml too: kiln builds every node of the cluster, servers included",
            inputs
                .iter()
                .map(|i| i.c.file.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(nodes)
}

/// `a1.yaml` → `a1`; anything else made into one lower-case label.
fn file_stem_label(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = base
        .strip_suffix(".yaml")
        .or_else(|| base.strip_suffix(".yml"))
        .unwrap_or(base);
    let mut s: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').chars().take(63).collect();
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() { "node".to_string() } else { s }
}

/// Labels and taints (from `k3os.labels`/`k3os.taints` and the k3s flags),
/// and the install disk.
fn node_labels_taints_install(inputs: &[Input], nodes: &mut [NodeOut], notes: &mut Vec<Note>) {
    for (i, n) in inputs.iter().zip(nodes.iter_mut()) {
        let mut labels: Vec<(String, String, &Val)> =
            i.c.labels
                .iter()
                .map(|(k, v)| (k.v.clone(), v.v.clone(), v))
                .collect();
        let mut taints: Vec<(String, &Val)> = i.c.taints.iter().map(|t| (t.v.clone(), t)).collect();
        for f in &i.flags {
            let value = f.value.clone().unwrap_or_default();
            match k3s_args::kind(f) {
                Kind::Label => {
                    let (k, v) = value.split_once('=').unwrap_or((&value, ""));
                    labels.push((k.to_string(), v.to_string(), &f.from));
                }
                Kind::Taint => {
                    let list = value
                        .strip_prefix("register-with-taints=")
                        .unwrap_or(&value);
                    taints.extend(list.split(',').map(|t| (t.to_string(), &f.from)));
                }
                _ => {}
            }
        }
        for (k, v, from) in labels {
            if !crate::config::profile::is_label_key(&k)
                || !crate::config::profile::is_label_value(&v)
            {
                notes.push(Note::dropped(&from.at, &from.key, &format!("`{k}={v}` is not a label kiln accepts (key: letters, digits, -_./; value: at most 63 letters, digits, -_.)")));
            } else if !n.labels.iter().any(|(x, _)| *x == k) {
                n.labels.push((k, v));
            }
        }
        for (t, from) in taints {
            match crate::config::profile::parse_taint(&t) {
                Ok(t) if !n.taints.contains(&t) => n.taints.push(t),
                Ok(_) => {}
                Err(e) => notes.push(Note::dropped(&from.at, &from.key, &e.message)),
            }
        }
        install(i.c, n, notes);
    }
}

/// `k3os.install`: the disk, and whether to power off after.
fn install(c: &Config, n: &mut NodeOut, notes: &mut Vec<Note>) {
    let mut power_off = None;
    for (id, v) in &c.install {
        match *id {
            "device" => match types::DevicePath::parse(&v.v) {
                Ok(d) => n.install_device = Some(d.as_str().to_string()),
                Err(e) => notes.push(Note::dropped(&v.at, &v.key, &e.message)),
            },
            "powerOff" => power_off = Some(v),
            "forceEfi" => notes.push(Note::dropped(&v.at, &v.key, "kiln's images boot by UEFI only")),
            "configUrl" | "isoUrl" => notes.push(Note::dropped(&v.at, &v.key, "kiln bakes each node's configuration into its own image: there is nothing to fetch")),
            _ => notes.push(Note::dropped(&v.at, &v.key, "an option of k3os's installer; kiln's install takes only install-device and after-install")),
        }
    }
    match (power_off, &n.install_device) {
        (Some(v), None) => notes.push(Note::dropped(
            &v.at,
            &v.key,
            "no install device: nothing to do after an install",
        )),
        (Some(v), Some(_)) if v.v == "true" => n.after_install = Some("poweroff"),
        (p, Some(_)) => {
            let at = p.map_or_else(|| c.install[0].1.at.clone(), |v| v.at.clone());
            notes.push(Note::changed(&at, "k3os.install", "k3os rebooted after installing; kiln powers off (after-install = \"poweroff\", its default) so the boot stick can be pulled; \"reboot\" when the firmware boots the disk first"));
        }
        (None, None) => {}
    }
}

/// A value found on some nodes, with the nodes that have it and those
/// that have it with another value.
struct Spread<T> {
    key: String,
    value: T,
    from: Val,
    on: Vec<usize>,
    differs: Vec<usize>,
}

/// Gather per-node `(key, value, origin)` items into one entry per key,
/// in order of first appearance.
fn spread<T: PartialEq + Clone>(per_node: Vec<Vec<(String, T, Val)>>) -> Vec<Spread<T>> {
    let mut out: Vec<Spread<T>> = Vec::new();
    for (n, items) in per_node.into_iter().enumerate() {
        for (key, value, from) in items {
            match out.iter_mut().find(|s| s.key == key) {
                Some(s) if s.value == value => s.on.push(n),
                Some(s) => s.differs.push(n),
                None => out.push(Spread {
                    key,
                    value,
                    from,
                    on: vec![n],
                    differs: Vec::new(),
                }),
            }
        }
    }
    out
}

fn node_list(names: &[String], idx: &[usize]) -> String {
    idx.iter()
        .map(|&i| names[i].as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A cluster-wide item: carried over unless nodes disagree on it (then a
/// note); one found on some nodes only is carried for all, with a note.
fn widen<T>(s: &Spread<T>, names: &[String], notes: &mut Vec<Note>) -> bool {
    if !s.differs.is_empty() {
        notes.push(Note::dropped(&s.from.at, &s.from.key, &format!(
            "differs between nodes ({} differ from {}): kiln's [first-boot] is the same on every node",
            node_list(names, &s.differs),
            node_list(names, &s.on)
        )));
        return false;
    }
    if s.on.len() < names.len() {
        notes.push(Note::changed(
            &s.from.at,
            &s.from.key,
            &format!(
                "only on {} in k3os: kiln's [first-boot] gives it to every node",
                node_list(names, &s.on)
            ),
        ));
    }
    true
}

/// `init_cmd`, `boot_cmd` and `run_cmd`, in that order, to `boot-cmd`;
/// commands some nodes lack keep to the nodes that had them.
fn commands(inputs: &[Input], names: &[String], out: &mut Out, notes: &mut Vec<Note>) {
    const PHASES: [(&str, &str); 3] = [
        (
            "init_cmd",
            "k3os ran it in the initrd, before the root was mounted; kiln runs it as a boot-cmd (every boot, once the network is up, before k3s): check that it still makes sense there",
        ),
        (
            "boot_cmd",
            "k3os ran it early in boot, before the network and services; kiln runs it as a boot-cmd, every boot, once the network is up and before k3s",
        ),
        (
            "run_cmd",
            "k3os ran it every boot once the network was up; kiln runs it as a boot-cmd, every boot, before k3s starts (kiln's run-once runs a command on the first boot only)",
        ),
    ];
    let mut per_node = Vec::new();
    for i in inputs {
        let mut items: Vec<(String, String, Val)> = Vec::new();
        for (phase, list) in [&i.c.init_cmd, &i.c.boot_cmd, &i.c.run_cmd]
            .into_iter()
            .enumerate()
        {
            if let Some(first) = list.first() {
                let key = first
                    .key
                    .rsplit_once('[')
                    .map_or(first.key.as_str(), |(k, _)| k);
                notes.push(Note::changed(&first.at, key, PHASES[phase].1));
            }
            for c in list {
                let n = items.iter().filter(|(_, v, _)| *v == c.v).count();
                items.push((format!("{}#{n}", c.v), c.v.clone(), c.clone()));
            }
        }
        per_node.push(items);
    }
    let order = merged_order(&per_node);
    let mut all = spread(per_node);
    all.sort_by_key(|s| order.iter().position(|k| *k == s.key));
    for s in all {
        let mut on = s.on.clone();
        on.extend(&s.differs);
        on.sort_unstable();
        if on.len() == names.len() {
            out.boot_cmd.push(s.value);
            continue;
        }
        let nodes: Vec<&str> = on.iter().map(|&i| names[i].as_str()).collect();
        let test = if nodes.len() == 1 {
            format!("grep -qx 'name={}' /etc/kiln/node || exit 0", nodes[0])
        } else {
            format!(
                "grep -qxE 'name=({})' /etc/kiln/node || exit 0",
                nodes.join("|")
            )
        };
        notes.push(Note::changed(&s.from.at, &s.from.key, &format!(
            "only on {} in k3os: carried over behind a test of the node's name in /etc/kiln/node, since kiln's boot-cmd runs on every node",
            nodes.join(", ")
        )));
        out.boot_cmd.push(format!("{test}\n{}", s.value));
    }
}

/// One order for every node's commands that keeps each node's own order:
/// a node's command not yet placed goes just before the next of its
/// commands that is.
fn merged_order<T>(per_node: &[Vec<(String, T, Val)>]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for items in per_node {
        let mut next = order.len();
        for (key, _, _) in items.iter().rev() {
            match order.iter().position(|k| k == key) {
                Some(p) => next = p,
                None => order.insert(next, key.clone()),
            }
        }
    }
    order
}

/// Modules, sysctls, DNS and NTP servers: cluster-wide in kiln; values
/// kiln would refuse are notes.
fn lists(inputs: &[Input], names: &[String], out: &mut Out, notes: &mut Vec<Note>) {
    type Check<'a> = &'a dyn Fn(&str) -> Result<(), String>;
    fn checked(list: &[Val], ok: Check, notes: &mut Vec<Note>) -> Vec<(String, (), Val)> {
        let mut items = Vec::new();
        for v in list {
            match ok(&v.v) {
                Ok(()) => items.push((v.v.clone(), (), v.clone())),
                Err(e) => notes.push(Note::dropped(&v.at, &v.key, &e)),
            }
        }
        items
    }
    let module = |s: &str| {
        crate::config::profile::parse_module(s)
            .map(|_| ())
            .map_err(|e| e.message)
    };
    let ip = |s: &str| {
        s.parse::<IpAddr>().map(|_| ()).map_err(|_| {
            format!("`{s}` is not an IP address: kiln's dns-nameservers are addresses")
        })
    };
    let host = |s: &str| Host::parse(s).map(|_| ()).map_err(|e| e.message);
    for (pick, target) in [
        (0, &mut out.modules),
        (1, &mut out.dns_nameservers),
        (2, &mut out.ntp_servers),
    ] {
        let per_node = inputs
            .iter()
            .map(|i| match pick {
                0 => checked(&i.c.modules, &module, notes),
                1 => checked(&i.c.dns_nameservers, &ip, notes),
                _ => checked(&i.c.ntp_servers, &host, notes),
            })
            .collect();
        for s in spread(per_node) {
            if widen(&s, names, notes) {
                target.push(s.key);
            }
        }
    }
    let per_node = inputs
        .iter()
        .map(|i| {
            let mut items = Vec::new();
            for (k, v) in &i.c.sysctl {
                match crate::config::profile::check_sysctl_name(&k.v) {
                    Ok(()) => items.push((k.v.clone(), v.v.clone(), v.clone())),
                    Err(e) => notes.push(Note::dropped(&k.at, &k.key, &e.message)),
                }
            }
            items
        })
        .collect();
    for s in spread(per_node) {
        if widen(&s, names, notes) {
            out.sysctl.push((s.key, s.value));
        }
    }
}

/// Keys kiln has nothing for: `wifi`, `password`, `data_sources`,
/// `server_url` (kiln derives the join).
fn unsupported(inputs: &[Input], notes: &mut Vec<Note>) {
    for i in inputs {
        let c = i.c;
        if let Some(w) = &c.wifi {
            notes.push(Note::dropped(&w.at, &w.key, "kiln configures the wired LAN only (systemd-networkd): Wi-Fi is not carried over, nor its passphrases"));
        }
        if let Some(p) = &c.password {
            notes.push(Note::dropped(
                &p.at,
                &p.key,
                "kiln has no password login (SSH keys only): the password is not carried over",
            ));
        }
        if let Some(d) = c.data_sources.first() {
            let key = d.key.rsplit_once('[').map_or(d.key.as_str(), |(k, _)| k);
            notes.push(Note::dropped(&d.at, key, "kiln bakes each node's configuration into its image and reads no cloud data source"));
        }
        if let Some(u) = &c.server_url {
            notes.push(Note::dropped(&u.at, &u.key, "kiln derives the address a node joins (the first server's tunnel address): fill in the nodes' addresses instead"));
        }
    }
}

/// Differences that are not about one key.
fn general_notes(out: &Out, notes: &mut Vec<Note>) {
    let general = |key: &str, text: &str| Note {
        kind: super::NoteKind::Changed,
        at: None,
        key: key.to_string(),
        text: text.to_string(),
    };
    notes.push(general("cluster", "kiln builds a new cluster (its own CA, an empty datastore): workloads and volumes of the k3os nodes are not carried over"));
    notes.push(general("firewall", "k3os had no firewall; kiln's accepts from the LAN only SSH (22) and WireGuard: open the ports your services publish (traefik's 80 and 443, NodePorts) in [firewall] allow-tcp"));
    notes.push(general("cluster.storage", "k3os has no key for storage; kiln installs what Longhorn needs on the nodes (open-iscsi, iscsid under a name of each node's own, the NFS client) only when asked: add storage = [\"longhorn\"] to [cluster] if the cluster runs Longhorn (\"rook-ceph\" for Rook's rbd)"));
    if out.users.iter().any(|u| u.name == K3OS_USER) {
        notes.push(general(K3OS_USER, "k3os's rancher user could sudo; kiln's images have no sudo: to log in as root, add a [[first-boot.users]] entry named root with the keys it should accept"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_keep_each_nodes_order() {
        let at = super::super::yaml::Origin {
            file: "x".into(),
            line: 1,
        };
        let v = |k: &str| {
            (
                k.to_string(),
                (),
                Val {
                    v: k.into(),
                    at: at.clone(),
                    key: k.into(),
                },
            )
        };
        let order = merged_order(&[
            vec![v("boot"), v("mkdir")],
            vec![v("early"), v("mkdir"), v("gpu")],
            vec![v("mkdir")],
        ]);
        assert_eq!(order, ["boot", "early", "mkdir", "gpu"]);
    }

    #[test]
    fn file_stems_make_labels() {
        assert_eq!(file_stem_label("nodes/a1.yaml"), "a1");
        assert_eq!(file_stem_label("Node_2.yml"), "node-2");
        assert_eq!(file_stem_label("--.yaml"), "node");
    }
}
