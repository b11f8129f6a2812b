//! `k3os.k3s_args`: an exec-style list (`server`, then flags, each
//! `--flag=value` or `--flag` followed by its value) split into what kiln
//! models itself (node name and addresses, the join, the token, labels,
//! taints, the cluster's CIDRs and flannel backend, `disable`, `tls-san`,
//! `cluster-init`) and the flags passed on as `k3s.server-args` /
//! `k3s.agent-args`.

use super::Note;
use super::read::Val;

/// One flag as k3os passed it, in long form without the dashes.
#[derive(Debug, Clone)]
pub struct Flag {
    pub name: String,
    pub value: Option<String>,
    /// The first list entry of the flag.
    pub from: Val,
}

impl Flag {
    /// `--name=value` or `--name`: the form `k3s.*-args` takes.
    pub fn arg(&self) -> String {
        match &self.value {
            Some(v) => format!("--{}={v}", self.name),
            None => format!("--{}", self.name),
        }
    }
}

/// What kiln does with a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Passed on in `k3s.server-args` or `k3s.agent-args`.
    Pass,
    Token,
    ClusterInit,
    Label,
    Taint,
    ClusterCidr,
    ServiceCidr,
    FlannelBackend,
    TlsSan,
    Disable,
    /// Rendered by kiln from the profile; the flag is left out, for this reason.
    Rendered(&'static str),
}

/// k3s's one-letter flags, by their long names.
const SHORT: &[(&str, &str)] = &[
    ("c", "config"),
    ("d", "data-dir"),
    ("i", "node-ip"),
    ("l", "log"),
    ("o", "write-kubeconfig"),
    ("s", "server"),
    ("t", "token"),
    ("v", "v"),
];

pub fn kind(flag: &Flag) -> Kind {
    match flag.name.as_str() {
        "token" | "cluster-secret" => Kind::Token,
        "cluster-init" => Kind::ClusterInit,
        "node-label" => Kind::Label,
        "node-taint" => Kind::Taint,
        "kubelet-arg"
            if flag
                .value
                .as_deref()
                .is_some_and(|v| v.starts_with("register-with-taints=")) =>
        {
            Kind::Taint
        }
        "cluster-cidr" => Kind::ClusterCidr,
        "service-cidr" => Kind::ServiceCidr,
        "flannel-backend" => Kind::FlannelBackend,
        "tls-san" => Kind::TlsSan,
        "disable" | "no-deploy" => Kind::Disable,
        "server" => Kind::Rendered(
            "kiln derives the address a node joins (the first server's tunnel address, or k3s.registration-address)",
        ),
        "node-name" => Kind::Rendered("kiln sets node-name to the node's `name`"),
        "node-ip" | "advertise-address" => Kind::Rendered(
            "kiln sets node-ip (and advertise-address on servers) to the node's tunnel address",
        ),
        "flannel-iface" => Kind::Rendered("kiln sets flannel-iface to the WireGuard interface"),
        "token-file" => Kind::Rendered("kiln writes the token file itself"),
        "config" => Kind::Rendered(
            "kiln renders /etc/rancher/k3s/config.yaml; another config file would replace it",
        ),
        "data-dir" => Kind::Rendered(
            "kiln keeps k3s's data in /var/lib/rancher/k3s on the state partition, where its CA seeding and upgrade snapshots look",
        ),
        _ => Kind::Pass,
    }
}

/// The list split into the leading verb (`server` or `agent`, if given)
/// and flags; entries that are neither become notes.
pub fn parse(args: &[Val], notes: &mut Vec<Note>) -> (Option<Val>, Vec<Flag>) {
    let mut verb = None;
    let mut flags: Vec<Flag> = Vec::new();
    let mut i = 0;
    if let Some(first) = args.first()
        && matches!(first.v.as_str(), "server" | "agent")
    {
        verb = Some(first.clone());
        i = 1;
    }
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (dashes, body) = if let Some(b) = a.v.strip_prefix("--") {
            (2, b)
        } else if let Some(b) = a.v.strip_prefix('-') {
            (1, b)
        } else {
            notes.push(Note::dropped(
                &a.at,
                &a.key,
                &format!("`{}` follows no flag: k3s took it as a stray argument", a.v),
            ));
            continue;
        };
        let (name, mut value) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        };
        let name = if dashes == 1 {
            match SHORT.iter().find(|(s, _)| *s == name) {
                Some((_, long)) => long.to_string(),
                None => {
                    notes.push(Note::dropped(
                        &a.at,
                        &a.key,
                        &format!("`{}` is not a one-letter k3s flag kiln knows: write its long form in k3s.server-args or k3s.agent-args", a.v),
                    ));
                    continue;
                }
            }
        } else {
            name
        };
        // `--flag value`: the value is the next entry, when that is no flag.
        if value.is_none()
            && let Some(next) = args.get(i)
            && !next.v.starts_with('-')
        {
            value = Some(next.v.clone());
            i += 1;
        }
        flags.push(Flag {
            name,
            value,
            from: a.clone(),
        });
    }
    (verb, flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::k3os::yaml::Origin;

    fn vals(args: &[&str]) -> Vec<Val> {
        args.iter()
            .enumerate()
            .map(|(i, a)| Val {
                v: a.to_string(),
                at: Origin {
                    file: "s1.yaml".into(),
                    line: 10 + i,
                },
                key: format!("k3os.k3s_args[{i}]"),
            })
            .collect()
    }

    #[test]
    fn both_exec_styles_and_short_flags() {
        let mut notes = Vec::new();
        let (verb, flags) = parse(
            &vals(&[
                "server",
                "--cluster-cidr=10.107.0.0/23",
                "--service-cidr",
                "10.107.1.0/23",
                "--cluster-init",
                "-t",
                "secret",
                "--write-kubeconfig-mode",
                "0644",
                "stray",
                "-x",
            ]),
            &mut notes,
        );
        assert_eq!(verb.unwrap().v, "server");
        let got: Vec<String> = flags.iter().map(Flag::arg).collect();
        assert_eq!(
            got,
            [
                "--cluster-cidr=10.107.0.0/23",
                "--service-cidr=10.107.1.0/23",
                "--cluster-init",
                "--token=secret",
                "--write-kubeconfig-mode=0644"
            ]
        );
        assert_eq!(kind(&flags[0]), Kind::ClusterCidr);
        assert_eq!(kind(&flags[3]), Kind::Token);
        assert_eq!(kind(&flags[4]), Kind::Pass);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0]
                .to_string()
                .contains("s1.yaml:19: k3os.k3s_args[9]")
        );
    }
}
