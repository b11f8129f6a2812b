//! The nftables ruleset: what may reach the node, on which interface,
//! from which networks. Everything else inbound is rejected.
//!
//! kiln owns one table (`inet kiln`) and replaces only that table on load,
//! so reloading it never wipes the rules k3s, kube-proxy and flannel keep
//! in their own tables.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::plan::{OperatorAccess, Plan};

use super::header;

fn set<T: ToString>(items: &[T]) -> String {
    let v: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    if v.len() == 1 {
        v[0].clone()
    } else {
        format!("{{ {} }}", v.join(", "))
    }
}

fn split_families(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    nets.iter().partition(|n| matches!(n, IpNet::V4(_)))
}

/// Render `/etc/nftables.conf`.
pub fn render_ruleset(plan: &Plan) -> String {
    let f = &plan.firewall;
    let mut r = String::from("#!/usr/sbin/nft -f\n");
    r.push_str(&header("#", plan));
    r.push_str("# Replace kiln's table only: k3s keeps its own tables beside it.\ntable inet kiln\ndelete table inet kiln\n\ntable inet kiln {\n");
    r.push_str("\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\n");
    r.push_str("\t\tct state established,related accept\n\t\tct state invalid drop\n\t\tiif \"lo\" accept\n");
    if let Some(o) = &f.operators {
        r.push_str(&operator_input_rules(o));
    }
    for i in &f.accept_interfaces {
        let _ = writeln!(r, "\t\tiifname \"{i}\" accept");
    }
    let (v4, v6) = split_families(&f.accept_cidrs);
    if !v4.is_empty() {
        let _ = writeln!(r, "\t\tip saddr {} accept", set(&v4));
    }
    if !v6.is_empty() {
        let _ = writeln!(r, "\t\tip6 saddr {} accept", set(&v6));
    }
    if f.icmp {
        r.push_str("\t\tmeta l4proto icmp accept\n\t\tmeta l4proto ipv6-icmp accept\n");
    } else {
        r.push_str("\t\t# IPv6 does not work without neighbour discovery\n\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept\n");
    }
    if !f.allow_tcp.is_empty() {
        let _ = writeln!(r, "\t\ttcp dport {} accept", set(&f.allow_tcp));
    }
    if !f.allow_udp.is_empty() {
        let _ = writeln!(r, "\t\tudp dport {} accept", set(&f.allow_udp));
    }
    for rule in &f.rules {
        let iface = rule
            .interface
            .as_ref()
            .map(|i| format!("iifname \"{i}\" "))
            .unwrap_or_default();
        let (v4, v6) = split_families(&rule.from);
        let mut sources: Vec<String> = Vec::new();
        if !v4.is_empty() {
            sources.push(format!("ip saddr {} ", set(&v4)));
        }
        if !v6.is_empty() {
            sources.push(format!("ip6 saddr {} ", set(&v6)));
        }
        if sources.is_empty() {
            sources.push(String::new());
        }
        for src in &sources {
            if !rule.tcp.is_empty() {
                let _ = writeln!(r, "\t\t{iface}{src}tcp dport {} accept", set(&rule.tcp));
            }
            if !rule.udp.is_empty() {
                let _ = writeln!(r, "\t\t{iface}{src}udp dport {} accept", set(&rule.udp));
            }
        }
    }
    r.push_str("\n\t\t# everything else: refused, so clients fail fast instead of hanging\n\t\tcounter reject with icmpx type admin-prohibited\n\t}\n");
    if let Some(o) = &f.operators {
        r.push_str(&operator_forward_chain(o));
    }
    r.push_str("}\n");
    r
}

const REJECT: &str = "counter reject with icmpx type admin-prohibited";

/// Operator addresses, one match per address family, each with the
/// destinations of that family (`None`: any destination).
fn by_family(sources: &[IpAddr], dests: Option<&[IpAddr]>) -> Vec<(String, String)> {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = sources.iter().partition(|a| a.is_ipv4());
    let mut out = Vec::new();
    for (family, srcs) in [("ip", v4), ("ip6", v6)] {
        if srcs.is_empty() {
            continue;
        }
        let daddr = match dests {
            None => String::new(),
            Some(d) => {
                let d: Vec<&IpAddr> = d
                    .iter()
                    .filter(|a| a.is_ipv4() == (family == "ip"))
                    .collect();
                if d.is_empty() {
                    continue;
                }
                format!(" {family} daddr {}", set(&d))
            }
        };
        out.push((format!("{family} saddr {}", set(&srcs)), daddr));
    }
    out
}

/// Before any accept: operators reach SSH and the API over the tunnel,
/// and nothing else on this node.
fn operator_input_rules(o: &OperatorAccess) -> String {
    let mut r =
        String::from("\t\t# operators: SSH and the Kubernetes API over the tunnel, nothing else\n");
    for (src, _) in by_family(&o.sources, None) {
        let _ = writeln!(
            r,
            "\t\tiifname \"{}\" {src} tcp dport {} accept",
            o.interface,
            set(&o.tcp)
        );
        let _ = writeln!(r, "\t\t{src} {REJECT}");
    }
    r
}

/// Operator traffic routed through this node (a hub, or a node told to
/// route more than its own address): SSH and the API of the nodes only.
/// The policy stays accept: k3s and flannel decide the rest of forwarding.
fn operator_forward_chain(o: &OperatorAccess) -> String {
    let mut r = String::from(
        "\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\n",
    );
    r.push_str(
        "\t\t# operators, routed through this node: SSH and the Kubernetes API of the nodes only\n",
    );
    // Replies, and ICMP errors about them (path MTU), pass.
    r.push_str("\t\tct state established,related accept\n");
    for (src, dst) in by_family(&o.sources, Some(&o.nodes)) {
        let _ = writeln!(
            r,
            "\t\tiifname \"{}\" {src}{dst} tcp dport {} accept",
            o.interface,
            set(&o.tcp)
        );
    }
    for (src, _) in by_family(&o.sources, None) {
        let _ = writeln!(r, "\t\t{src} {REJECT}");
    }
    r.push_str("\t}\n");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(extra: &str, network: &str, addrs: [&str; 2]) -> Plan {
        let text = format!(
            "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n\
             [wireguard]\nnetwork = \"{network}\"\n\
             [[nodes]]\nname = \"s1\"\nrole = \"server\"\nlan-address = \"192.168.1.11\"\nwireguard-address = \"{}\"\n\
             {extra}",
            addrs[0]
        );
        let text = text.replace("OPERATOR", addrs[1]);
        crate::config::plan::plan_profile(std::path::Path::new("lab.toml"), &text).unwrap()
    }

    #[test]
    fn without_operators_there_are_no_operator_rules_and_no_forward_chain() {
        let r = render_ruleset(&plan("", "10.0.0.0/24", ["10.0.0.11", ""]));
        assert!(!r.contains("operators"), "{r}");
        assert!(!r.contains("chain forward"), "{r}");
    }

    #[test]
    fn ipv6_operators_get_ip6_rules_before_the_tunnel_accepts() {
        let op = "[[operators]]\nname = \"alice\"\nwireguard-address = \"OPERATOR\"\n";
        let r = render_ruleset(&plan(op, "fd00:10::/64", ["fd00:10::11", "fd00:10::200"]));
        let accept = "iifname \"wg0\" ip6 saddr fd00:10::200 tcp dport { 22, 6443 } accept";
        let reject = "ip6 saddr fd00:10::200 counter reject with icmpx type admin-prohibited";
        let forward = "iifname \"wg0\" ip6 saddr fd00:10::200 ip6 daddr fd00:10::11 tcp dport { 22, 6443 } accept";
        for line in [accept, reject, forward] {
            assert!(r.contains(line), "{line} missing:\n{r}");
        }
        assert!(r.find(reject).unwrap() < r.find("iifname \"wg0\" accept").unwrap());
        assert!(!r.contains("ip saddr fd00"), "{r}");
    }
}
