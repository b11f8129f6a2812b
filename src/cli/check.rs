//! `kiln check`: load the profile and print a summary of the resolved
//! plan (cluster, base and the age of its cached tarball, WireGuard,
//! firewall, nodes, what a build writes).

use std::fmt::Write as _;
use std::path::Path;

use ipnet::IpNet;

use crate::config::plan::{
    BasePlan, HubRef, Link, LinkKind, ManifestSource, NodePlan, OPERATOR_TCP_PORTS, PeerRef, Plan,
    WgPlan, node_links,
};
use crate::config::profile::{AfterInstall, KernelFlavour, Topology};
use crate::inputs::base::{self, CacheState, CachedBase};
use crate::inputs::freshness::{self, Freshness};

/// `kiln check PROFILE`: load the profile, check a secure-form token
/// against the CA in the state directory (read only, never created), and
/// print the summary.
pub fn run(profile: &Path, state_dir: Option<&Path>) -> anyhow::Result<()> {
    let plan = crate::config::plan::load(profile)?;
    let state = crate::config::secrets::state_dir(profile, state_dir);
    crate::config::secrets::check_profile_token(&plan, &state)?;
    let now = freshness::unix_now();
    let cached = base::inspect_cached(&plan, &crate::inputs::cache::cache_dir(), now);
    print!("{}", check(&plan, cached.as_ref(), now));
    Ok(())
}

/// `kiln check`: a summary of the plan; `cached` is what the cache holds
/// for its Debian base at `now` (unix seconds).
pub fn check(plan: &Plan, cached: Option<&CachedBase>, now: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "profile    {}", plan.profile_path.display());
    let _ = writeln!(s, "cluster    {}", plan.cluster);
    write_k3s(&mut s, plan);
    write_base(&mut s, plan);
    if let Some(c) = cached {
        let _ = writeln!(s, "base cache {}", base_cache_line(c, now));
    }
    write_airgap(&mut s, plan);
    write_wireguard(&mut s, plan);
    write_firewall_and_first_boot(&mut s, plan);
    write_nodes(&mut s, plan);
    write_peers(&mut s, plan);
    write_operators(&mut s, plan);
    write_manifests(&mut s, plan);
    write_storage(&mut s, plan);
    write_proxy(&mut s, plan);
    write_build_plan(&mut s, plan);
    s
}

/// The k3s line: version, flannel backend, what is disabled, registration address.
fn write_k3s(s: &mut String, plan: &Plan) {
    let k = &plan.k3s;
    let _ = writeln!(
        s,
        "k3s        {} (flannel {}{}{})",
        k.version,
        k.flannel_backend,
        if k.disable.is_empty() {
            String::new()
        } else {
            format!(", disable {}", k.disable.join(","))
        },
        k.registration_address
            .as_ref()
            .map(|r| format!(", registration address {r}"))
            .unwrap_or_default()
    );
}

/// The images line: the tarballs every root carries for k3s to import.
fn write_airgap(s: &mut String, plan: &Plan) {
    let a = &plan.airgap;
    if a.is_empty() {
        return;
    }
    let mut items = Vec::new();
    if a.release {
        items.push(format!(
            "k3s {} air-gap images (pinned in kiln.lock)",
            plan.k3s.version
        ));
    }
    items.extend(
        a.tarballs
            .iter()
            .map(|t| format!("{} ({})", t.name, t.path.display())),
    );
    let _ = writeln!(
        s,
        "images     {}; in every root image, at {} on every node",
        items.join(", "),
        crate::config::plan::K3S_IMAGES_DIR
    );
}

/// The base line: Debian suite, kernel and extra packages, or a tarball.
fn write_base(s: &mut String, plan: &Plan) {
    match &plan.base {
        BasePlan::Debian {
            suite,
            kernel,
            packages,
            ..
        } => {
            let _ = writeln!(
                s,
                "base       Debian {suite}, {} kernel{}",
                match kernel {
                    KernelFlavour::Generic => "generic",
                    KernelFlavour::Cloud => "cloud (VM only)",
                },
                if packages.is_empty() {
                    String::new()
                } else {
                    format!(", extra packages: {}", packages.join(" "))
                }
            );
        }
        BasePlan::Tarball(p) => {
            let _ = writeln!(s, "base       tarball {}", p.display());
        }
    }
}

/// How old the cached base is and when a build makes it again.
fn base_cache_line(c: &CachedBase, now: u64) -> String {
    let max = c.max_age;
    match c.state {
        CacheState::Missing => format!(
            "none yet ({}): the next build makes it with mmdebstrap (one to two minutes, needs the Debian mirror)",
            c.path.display()
        ),
        CacheState::Unrecorded => format!(
            "{} has no readable record: the next build makes it again",
            c.path.display()
        ),
        CacheState::Cached {
            freshness:
                Freshness::Fresh {
                    age_secs,
                    left_secs,
                },
            ..
        } => format!(
            "built {} ago (max-age {max}): reused until {} (in {}), then the next build makes it again with newer packages",
            freshness::human_age(age_secs),
            utc_time(now + left_secs),
            freshness::human_age(left_secs)
        ),
        CacheState::Cached {
            freshness: Freshness::Stale {
                age_secs: Some(age),
            },
            ..
        } => format!(
            "built {} ago, older than max-age {max}: the next build makes it again with newer packages",
            freshness::human_age(age)
        ),
        CacheState::Cached {
            built_at,
            freshness: Freshness::Stale { age_secs: None },
        } => format!(
            "built at {}, ahead of this machine's clock: the next build makes it again",
            utc_time(built_at)
        ),
    }
}

/// A unix time as `2026-12-30 14:05 UTC`.
fn utc_time(secs: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs.min(i64::MAX as u64) as i64) {
        Ok(t) => format!("{} {:02}:{:02} UTC", t.date(), t.hour(), t.minute()),
        Err(_) => format!("unix time {secs}"),
    }
}

/// The WireGuard line: interface, network, port, topology and peers.
fn write_wireguard(s: &mut String, plan: &Plan) {
    match &plan.wireguard {
        Some(w) => {
            let topo = match (w.topology, w.hub) {
                (Topology::Mesh, _) => "mesh".to_string(),
                (Topology::Hub, Some(HubRef::External(i))) => format!(
                    "hub via external peer {}{}",
                    w.peers[i].name,
                    w.peers[i]
                        .endpoint
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
                (Topology::Hub, Some(HubRef::Node(i))) => {
                    format!("hub via node {}", plan.nodes[i].name)
                }
                (Topology::Hub, None) => "hub".to_string(),
            };
            let _ = writeln!(
                s,
                "wireguard  {} {} port {}, {topo}, {} external peer(s)",
                w.interface,
                w.network,
                w.listen_port,
                w.peers.len()
            );
        }
        None => {
            let _ = writeln!(s, "wireguard  off");
        }
    }
}

/// What the firewall lets in, and what first boot sets up.
fn write_firewall_and_first_boot(s: &mut String, plan: &Plan) {
    let f = &plan.firewall;
    let _ = writeln!(
        s,
        "firewall   tcp {:?} udp {:?} from anywhere; interfaces {:?} and {} network(s) accepted; {} extra rule(s); rest rejected",
        f.allow_tcp,
        f.allow_udp,
        f.accept_interfaces,
        f.accept_cidrs.len(),
        f.rules.len()
    );
    let _ = writeln!(
        s,
        "first boot {} user(s), {} file(s), {} run-once and {} boot command(s)",
        plan.first_boot.users.len(),
        plan.first_boot.write_files.len(),
        plan.first_boot.run_once.len(),
        plan.first_boot.boot_cmd.len()
    );
}

/// The nodes table, columns padded to their widest cell.
fn write_nodes(s: &mut String, plan: &Plan) {
    let _ = writeln!(s, "\nnodes");
    let rows = node_rows(plan);
    let head = [
        "NAME",
        "ROLE",
        "MAC",
        "LAN",
        "WIREGUARD",
        "JOINS",
        "KERNEL COMMAND LINE",
    ];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(head.map(String::from)).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(s, "  {}", line.join("  ").trim_end());
    }
}

/// One row of the nodes table per node: name, role, MAC, LAN address,
/// WireGuard address, what it joins, kernel command line.
fn node_rows(plan: &Plan) -> Vec<[String; 7]> {
    plan.nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                n.role.as_str().to_string(),
                n.mac.map_or("-".into(), |m| m.to_string()),
                n.network.address.map_or_else(
                    || {
                        n.lan_address
                            .map_or("dhcp".into(), |a| format!("{a} (dhcp, reserved)"))
                    },
                    |a| a.to_string(),
                ),
                n.wireguard_address.map_or("-".into(), |a| a.to_string()),
                plan.join_url(n)
                    .unwrap_or_else(|| "starts the cluster".into()),
                plan.cmdline(n).join(" "),
            ]
        })
        .collect()
}

/// The operators, each with the peers its wg-quick file gets.
fn write_operators(s: &mut String, plan: &Plan) {
    let Some(wg) = &plan.wireguard else { return };
    if plan.operators.is_empty() {
        return;
    }
    let ports: Vec<String> = OPERATOR_TCP_PORTS.iter().map(u16::to_string).collect();
    let _ = writeln!(
        s,
        "\noperators (reach tcp {} of the nodes over the tunnel, nothing else; `kiln operator` writes their file)",
        ports.join(", ")
    );
    let peers = operator_peers_summary(plan, wg);
    let width = plan
        .operators
        .iter()
        .map(|o| o.name.len())
        .max()
        .unwrap_or(0);
    for o in &plan.operators {
        let _ = writeln!(
            s,
            "  {:<width$}  {:<15}  {peers}",
            o.name,
            o.wireguard_address.to_string()
        );
    }
}

/// Whom an operator's file peers with.
fn operator_peers_summary(plan: &Plan, wg: &WgPlan) -> String {
    match (wg.topology, wg.hub) {
        (Topology::Hub, Some(HubRef::External(i))) => {
            let p = &wg.peers[i];
            let at = p
                .endpoint
                .as_ref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default();
            format!(
                "peer: hub {}{at} (its admin adds the operator: `kiln keys`)",
                p.name
            )
        }
        (Topology::Hub, Some(HubRef::Node(i))) => {
            let n = &plan.nodes[i];
            let at = n
                .endpoint
                .as_ref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default();
            format!("peer: hub node {}{at}", n.name)
        }
        _ => {
            let names: Vec<&str> = crate::render::operator_reaches(plan, wg)
                .iter()
                .map(|n| n.name.as_str())
                .collect();
            let cut: Vec<&str> = plan
                .nodes
                .iter()
                .filter(|n| n.endpoint.is_none())
                .map(|n| n.name.as_str())
                .collect();
            let missing = if cut.is_empty() {
                String::new()
            } else {
                format!("; no endpoint, not reachable: {}", cut.join(", "))
            };
            format!("peers: {} (mesh{missing})", names.join(", "))
        }
    }
}

/// Who peers with whom: the sites, then one row per `[Peer]` of each node.
fn write_peers(s: &mut String, plan: &Plan) {
    let Some(wg) = &plan.wireguard else { return };
    let _ = writeln!(
        s,
        "\nwireguard peers (each node's [Peer]s: whom it dials, at which endpoint, for which tunnel addresses)"
    );
    s.push_str(&sites_summary(plan, wg));
    let head = ["NODE", "PEER", "ENDPOINT", "ALLOWED IPS", "WHY"].map(String::from);
    let mut rows = vec![head];
    for (i, n) in plan.nodes.iter().enumerate() {
        for l in node_links(plan, wg, i) {
            rows.push(peer_row(plan, wg, n, &l));
        }
    }
    let mut widths = [0; 5];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(s, "  {}", line.join("  ").trim_end());
    }
}

/// The sites and what a hub outage leaves working; for an external hub,
/// what its admin must add.
fn sites_summary(plan: &Plan, wg: &WgPlan) -> String {
    let mut s = String::new();
    let hub = match wg.hub {
        Some(HubRef::External(i)) => Some(wg.peers[i].name.as_str()),
        Some(HubRef::Node(i)) => Some(plan.nodes[i].name.as_str()),
        None => None,
    };
    for site in &wg.sites {
        let names: Vec<&str> = site
            .nodes
            .iter()
            .map(|&i| plan.nodes[i].name.as_str())
            .collect();
        let _ = writeln!(
            s,
            "  site {}: {} peer directly over their LAN; the rest goes through the hub {}",
            site.name,
            names.join(", "),
            hub.unwrap_or("-")
        );
    }
    if !wg.sites.is_empty() {
        let _ = writeln!(
            s,
            "  with the hub down, each site keeps its own traffic; between sites, to operators and external peers it stops"
        );
    }
    if let (Topology::Hub, Some(HubRef::External(i))) = (wg.topology, wg.hub) {
        let _ = writeln!(
            s,
            "  the hub {} is not built by kiln: it needs every node and operator as a [Peer] (`kiln keys` prints them)",
            wg.peers[i].name
        );
    }
    s
}

/// One row of the peer table: node, peer, endpoint, AllowedIPs, why.
fn peer_row(plan: &Plan, wg: &WgPlan, n: &NodePlan, l: &Link) -> [String; 5] {
    let peer = match l.to {
        PeerRef::Node(m) => plan.nodes[m].name.clone(),
        PeerRef::External(p) => wg.peers[p].name.clone(),
        PeerRef::Operator(o) => format!("{} (operator)", plan.operators[o].name),
    };
    let endpoint = match (&l.relay, &l.endpoint) {
        (Some(r), Some(e)) if e.port == crate::config::plan::RELAY_LOCAL_PORT => {
            format!("tcp {r} (kiln-relay)")
        }
        (Some(r), Some(e)) => format!("{e}, tcp {r} while udp fails"),
        (_, e) => e
            .as_ref()
            .map_or("- (it dials in)".into(), ToString::to_string),
    };
    let why = match l.kind {
        LinkKind::Mesh => "mesh".to_string(),
        LinkKind::Site => format!("site {}", n.site.as_deref().unwrap_or("-")),
        LinkKind::Hub => "hub".to_string(),
        LinkKind::Spoke => "routed by this hub".to_string(),
    };
    let allowed = allowed_summary(wg, l, n.site.as_deref());
    [n.name.clone(), peer, endpoint, allowed, why]
}

/// AllowedIPs, with the hub's share of a site's tunnel network said in
/// words (the CIDRs that make it up are in the rendered file).
fn allowed_summary(wg: &WgPlan, l: &Link, site: Option<&str>) -> String {
    let (inside, outside): (Vec<IpNet>, Vec<IpNet>) =
        l.allowed_ips.iter().partition(|a| wg.network.contains(*a));
    let mut parts: Vec<String> =
        if l.kind == LinkKind::Hub && !inside.is_empty() && inside != [wg.network] {
            vec![format!("{} minus site {}", wg.network, site.unwrap_or("-"))]
        } else {
            inside.iter().map(ToString::to_string).collect()
        };
    parts.extend(outside.iter().map(ToString::to_string));
    parts.join(", ")
}

/// What k3s deploys, and from which servers.
fn write_manifests(s: &mut String, plan: &Plan) {
    if plan.manifests.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nk3s manifests (in every root image; each server named copies its own into {} before k3s starts)",
        crate::render::manifests::K3S_MANIFESTS_DIR
    );
    let rows: Vec<[String; 3]> = plan
        .manifests
        .iter()
        .map(|m| {
            let what = match &m.source {
                ManifestSource::Yaml { file: None, .. } => "manifest (inline)".to_string(),
                ManifestSource::Yaml { file: Some(f), .. } => {
                    format!("manifest from {}", f.display())
                }
                ManifestSource::Chart(c) => format!(
                    "Helm chart {} {}, namespace {}",
                    c.chart,
                    c.version,
                    c.target_namespace
                        .as_deref()
                        .unwrap_or(crate::render::manifests::HELM_CHART_NAMESPACE)
                ),
            };
            let file = crate::render::manifests::file_name(m);
            [file, what, m.nodes.join(", ")]
        })
        .collect();
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0);
    for [file, what, nodes] in rows {
        let _ = writeln!(s, "  {file:<w0$}  {what:<w1$}  {nodes}");
    }
}

/// Each node's storage prerequisites: the packages (in the shared base),
/// the modules, and iscsid with the node's own initiator name.
fn write_storage(s: &mut String, plan: &Plan) {
    if plan.nodes.iter().all(|n| n.storage.is_empty()) {
        return;
    }
    let _ = writeln!(
        s,
        "\nstorage (packages in the base every node shares: {}; the rest per node)",
        plan.storage_packages().join(" ")
    );
    let width = plan.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    for n in &plan.nodes {
        let _ = writeln!(s, "  {:<width$}  {}", n.name, storage_summary(n));
    }
}

/// `longhorn (modules iscsi_tcp; iscsid, initiator name made once in …)`, or `none`.
fn storage_summary(n: &NodePlan) -> String {
    use crate::render::storage::{INITIATOR_NAME_STATE, needs_iscsi, node_modules};
    if n.storage.is_empty() {
        return "none".into();
    }
    let names: Vec<&str> = n.storage.iter().map(|x| x.as_str()).collect();
    let mut what = Vec::new();
    let modules = node_modules(n);
    if !modules.is_empty() {
        what.push(format!("modules {}", modules.join(" ")));
    }
    if needs_iscsi(n) {
        what.push(format!(
            "iscsid, initiator name made once in {INITIATOR_NAME_STATE}"
        ));
    }
    if what.is_empty() {
        names.join(", ")
    } else {
        format!("{} ({})", names.join(", "), what.join("; "))
    }
}

/// The proxy k3s and containerd use (a password shown as `***`).
fn write_proxy(s: &mut String, plan: &Plan) {
    let Some(p) = &plan.proxy else { return };
    let _ = writeln!(
        s,
        "\nproxy (k3s and containerd on every node, from {})",
        crate::render::proxy::ENV_FILE
    );
    for (name, url) in [("HTTP_PROXY", &p.http), ("HTTPS_PROXY", &p.https)] {
        if let Some(u) = url {
            let _ = writeln!(s, "  {name:<11}  {}", u.redacted());
        }
    }
    let _ = writeln!(s, "  {:<11}  {}", "NO_PROXY", p.no_proxy.join(","));
}

/// What a build writes.
fn write_build_plan(s: &mut String, plan: &Plan) {
    let _ = writeln!(
        s,
        "\nbuild plan (per node: a GPT disk image with ESP, root-a, root-b and state)"
    );
    for n in &plan.nodes {
        let install = n.install.as_ref().map_or(String::new(), |i| {
            let then = match i.after {
                AfterInstall::Poweroff => "powers off",
                AfterInstall::Reboot => "reboots",
            };
            format!(" (from a stick, installs onto {}, then {then})", i.device)
        });
        let awake = if n.allow_suspend { ", may sleep" } else { "" };
        let _ = writeln!(s, "  {}.img{install}{awake}", n.name);
    }
    let _ = writeln!(s, "  SHA256SUMS, manifest.json, sbom.cdx.json");
}
