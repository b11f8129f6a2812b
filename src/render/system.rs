//! The node's system files: host name, hosts, users and SSH, sysctl,
//! kernel modules, LAN network, DNS, NTP and the profile's own files.

use std::fmt::Write as _;

use crate::config::plan::{IfaceMatch, NodePlan, Plan};
use crate::render::tree::FileTree;

use super::{NodeSecrets, SECRET_MODE, header};

/// Where people's home directories live: /home is on the read-only root.
pub const HOME_BASE: &str = "/var/home";
/// The node's SSH host key, from the seed: kiln keeps it in the state
/// directory, so a reflashed, reinstalled or diskless node keeps its
/// identity (/etc is rebuilt in RAM from the seed each boot).
pub const SSH_HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";

/// Modules k3s needs: bridge netfilter, overlayfs, and WireGuard for flannel.
pub const K3S_MODULES: [&str; 3] = ["br_netfilter", "overlay", "wireguard"];

/// Kernel settings k3s needs for pod networking.
pub const K3S_SYSCTL: [(&str, &str); 4] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
];

pub fn render(plan: &Plan, node: &NodePlan, secrets: &NodeSecrets, tree: &mut FileTree) {
    tree.file("/etc/hostname", 0o644, format!("{}\n", node.hostname));
    tree.file("/etc/hosts", 0o644, hosts(plan, node));

    // Users: created by systemd-sysusers each boot (/etc is in RAM), homes on /var.
    let fb = &plan.first_boot;
    let mut sysusers = header("#", plan);
    let mut tmpfiles = header("#", plan);
    for u in fb.users.iter().filter(|u| u.name != "root") {
        let _ = writeln!(
            sysusers,
            "u {} {} \"{}\" {HOME_BASE}/{} {}",
            u.name, u.uid, u.name, u.name, u.shell
        );
        for g in &u.groups {
            let _ = writeln!(sysusers, "m {} {g}", u.name);
        }
        let _ = writeln!(
            tmpfiles,
            "d {HOME_BASE}/{} 0700 {} {} -",
            u.name, u.name, u.name
        );
    }
    if fb.users.iter().any(|u| u.name != "root") {
        tree.file("/etc/sysusers.d/kiln-users.conf", 0o644, sysusers);
        tree.file("/etc/tmpfiles.d/kiln-users.conf", 0o644, tmpfiles);
    }
    for u in &fb.users {
        let mut keys = header("#", plan);
        for k in &u.ssh_authorized_keys {
            keys.push_str(k.trim());
            keys.push('\n');
        }
        tree.file(&format!("/etc/ssh/authorized_keys/{}", u.name), 0o644, keys);
    }
    tree.file(
        "/etc/ssh/sshd_config.d/10-kiln.conf",
        0o644,
        sshd_config(plan),
    );
    // Modes as ssh-keygen leaves them: sshd refuses a private key others can read.
    tree.file(SSH_HOST_KEY, SECRET_MODE, secrets.ssh_host_key.to_openssh());
    tree.file(
        &format!("{SSH_HOST_KEY}.pub"),
        0o644,
        format!("{}\n", secrets.ssh_host_key.public_openssh()),
    );

    // Kernel settings and modules.
    let mut sysctl = header("#", plan);
    sysctl.push_str("# needed by k3s\n");
    for (k, v) in K3S_SYSCTL {
        let _ = writeln!(sysctl, "{k} = {v}");
    }
    if !fb.sysctl.is_empty() {
        sysctl.push_str("# from the profile\n");
        for (k, v) in &fb.sysctl {
            let _ = writeln!(sysctl, "{k} = {v}");
        }
    }
    tree.file("/etc/sysctl.d/90-kiln.conf", 0o644, sysctl);
    let mut modules = header("#", plan);
    for m in K3S_MODULES
        .iter()
        .map(|s| s.to_string())
        .chain(fb.modules.iter().cloned())
    {
        if !modules.lines().any(|l| l == m) {
            modules.push_str(&m);
            modules.push('\n');
        }
    }
    tree.file("/etc/modules-load.d/kiln.conf", 0o644, modules);

    // LAN by systemd-networkd; DNS by systemd-resolved; time by timesyncd.
    tree.file(
        "/etc/systemd/network/20-kiln-lan.network",
        0o644,
        lan_network(plan, node),
    );
    tree.symlink(
        "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
        "/lib/systemd/system/systemd-networkd.service",
    );
    if !fb.dns_nameservers.is_empty() {
        let list: Vec<String> = fb.dns_nameservers.iter().map(|i| i.to_string()).collect();
        tree.file(
            "/etc/systemd/resolved.conf.d/kiln.conf",
            0o644,
            format!("{}[Resolve]\nDNS={}\n", header("#", plan), list.join(" ")),
        );
    }
    if !fb.ntp_servers.is_empty() {
        // timesyncd wants bare addresses (no [brackets] around IPv6).
        let list: Vec<String> = fb
            .ntp_servers
            .iter()
            .map(|h| match h {
                crate::config::types::Host::Ip(ip) => ip.to_string(),
                crate::config::types::Host::Name(n) => n.clone(),
            })
            .collect();
        tree.file(
            "/etc/systemd/timesyncd.conf.d/kiln.conf",
            0o644,
            format!("{}[Time]\nNTP={}\n", header("#", plan), list.join(" ")),
        );
    }

    for w in &fb.write_files {
        tree.file_owned(&w.path, w.mode, w.uid, w.gid, w.content.clone());
    }
}

fn hosts(plan: &Plan, node: &NodePlan) -> String {
    let mut s = header("#", plan);
    s.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if plan.cluster_address(node).is_none() {
        let _ = writeln!(s, "127.0.1.1\t{}", names(node));
    }
    let _ = writeln!(
        s,
        "# cluster nodes{}",
        if plan.wireguard.is_some() {
            ", by WireGuard address"
        } else {
            ""
        }
    );
    for n in &plan.nodes {
        if let Some(ip) = plan.cluster_address(n) {
            let _ = writeln!(s, "{ip}\t{}", names(n));
        }
    }
    if let Some(wg) = &plan.wireguard {
        for p in wg.peers.iter().filter(|p| p.address.is_some()) {
            let _ = writeln!(s, "{}\t{}", p.address.unwrap(), p.name);
        }
    }
    s
}

fn names(n: &NodePlan) -> String {
    if n.hostname == n.name {
        n.name.clone()
    } else {
        format!("{} {}", n.hostname, n.name)
    }
}

fn sshd_config(plan: &Plan) -> String {
    format!(
        "{}# Keys only: no passwords, root by key only.\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitEmptyPasswords no\nPermitRootLogin prohibit-password\nAuthorizedKeysFile /etc/ssh/authorized_keys/%u .ssh/authorized_keys\n# The node's one host key, from its seed (kiln's state directory keeps it).\nHostKey {SSH_HOST_KEY}\n",
        header("#", plan)
    )
}

fn lan_network(plan: &Plan, node: &NodePlan) -> String {
    let mut s = header("#", plan);
    s.push_str("[Match]\n");
    match &node.network.matches {
        IfaceMatch::Name(n) => {
            let _ = writeln!(s, "Name={n}");
        }
        IfaceMatch::Mac(m) => {
            let _ = writeln!(s, "MACAddress={m}");
        }
        IfaceMatch::AnyEthernet => s.push_str("Type=ether\nName=en* eth*\n"),
    }
    s.push_str("\n[Network]\n");
    match node.network.address {
        None => s.push_str("DHCP=yes\n"),
        Some(a) => {
            let _ = writeln!(s, "Address={a}");
            if let Some(g) = node.network.gateway {
                let _ = writeln!(s, "Gateway={g}");
            }
        }
    }
    for d in &plan.first_boot.dns_nameservers {
        let _ = writeln!(s, "DNS={d}");
    }
    s
}
