//! The profile as written: TOML read into typed values, each remembering
//! where it came from so later checks can point at the line.
//!
//! Reading does not stop at the first problem: syntax errors, unknown keys
//! and wrong types are all collected into [`Diagnostics`]. Cross-field rules
//! (duplicates, addresses inside networks, a server to join) live in
//! [`crate::config::plan`].

use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;

use ipnet::IpNet;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::config::diag::Diagnostics;
use crate::config::types::{
    self, DevicePath, Endpoint, Host, ImageTarballPath, Invalid, K3sToken, K3sVersion, MacAddr,
    MaxAge, WgKey,
};

mod manifests;
mod proxy;
mod storage;

pub use manifests::{HelmChart, Manifest};
pub use proxy::Proxy;
pub use storage::{Storage, parse_storage};

/// A value with the span and dotted key it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct At<T> {
    pub v: T,
    pub span: Range<usize>,
    pub key: String,
}

impl<T> At<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> At<U> {
        At {
            v: f(self.v),
            span: self.span,
            key: self.key,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Mesh,
    Hub,
}

/// How a spoke carries its WireGuard packets to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HubTransport {
    /// Plain WireGuard.
    #[default]
    Udp,
    /// Over TCP through `kiln-relay`, for networks that drop UDP.
    Tcp,
    /// UDP, switching to TCP while the hub does not answer over UDP.
    Auto,
}

impl HubTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            HubTransport::Udp => "udp",
            HubTransport::Tcp => "tcp",
            HubTransport::Auto => "auto",
        }
    }

    pub fn parse(s: &str) -> Result<HubTransport, Invalid> {
        match s {
            "udp" => Ok(HubTransport::Udp),
            "tcp" => Ok(HubTransport::Tcp),
            "auto" => Ok(HubTransport::Auto),
            _ => Err(inv(
                format!("unknown hub transport `{s}`"),
                "use \"udp\" (plain WireGuard), \"tcp\" (through kiln-relay, for networks that drop UDP) or \"auto\" (UDP, falling back to TCP)",
            )),
        }
    }
}

/// What a node does once it has installed itself onto `install-device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterInstall {
    Poweroff,
    Reboot,
}

impl AfterInstall {
    pub fn as_str(self) -> &'static str {
        match self {
            AfterInstall::Poweroff => "poweroff",
            AfterInstall::Reboot => "reboot",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFlavour {
    /// `linux-image-amd64`: boots real desktops (AHCI, USB, NVMe).
    Generic,
    /// `linux-image-cloud-amd64`: virtio only, for VM-only profiles.
    Cloud,
}

/// The whole profile, as written (defaults not yet applied).
#[derive(Debug, Default)]
pub struct Profile {
    pub cluster_name: Option<At<String>>,
    /// `cluster.storage`: every node's storage prerequisites, unless the
    /// node sets its own (read in `profile/storage.rs`).
    pub storage: Option<Vec<At<Storage>>>,
    pub k3s: K3s,
    pub boot: Boot,
    pub base: Base,
    pub image: Image,
    pub wireguard: Option<WireGuard>,
    pub wireguard_span: Range<usize>,
    pub firewall: Firewall,
    pub first_boot: FirstBoot,
    pub nodes: Vec<Node>,
    pub nodes_span: Range<usize>,
    pub operators: Vec<Operator>,
}

#[derive(Debug, Default)]
pub struct K3s {
    pub version: Option<At<K3sVersion>>,
    /// Redacted in `Debug`: the profile's K3s section gets logged.
    pub token: Option<At<K3sToken>>,
    pub server_args: Vec<At<String>>,
    pub agent_args: Vec<At<String>>,
    pub disable: Vec<At<String>>,
    pub flannel_backend: Option<At<String>>,
    pub registration_address: Option<At<Host>>,
    pub tls_san: Vec<At<Host>>,
    pub cluster_cidr: Option<At<IpNet>>,
    pub service_cidr: Option<At<IpNet>>,
    /// registry host → mirror endpoints
    pub mirrors: Vec<(At<String>, Vec<At<String>>)>,
    pub registry_configs: Vec<(At<String>, RegistryConfig)>,
    /// `[[k3s.manifests]]` and `[[k3s.helm-charts]]` (read in
    /// `profile/manifests.rs`).
    pub manifests: Vec<Manifest>,
    pub helm_charts: Vec<HelmChart>,
    /// `[k3s.proxy]` (read in `profile/proxy.rs`).
    pub proxy: Option<Proxy>,
    /// `airgap`: the release's air-gap image tarball in every root image.
    pub airgap: Option<At<bool>>,
    /// `image-tarballs`: more image tarballs for every root image.
    pub image_tarballs: Vec<At<ImageTarballPath>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RegistryConfig {
    pub username: Option<String>,
    pub password: Option<String>,
    pub insecure_skip_verify: bool,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default)]
pub struct Boot {
    pub cmdline: Vec<At<String>>,
    pub consoles: Option<Vec<At<String>>>,
    pub menu_timeout: Option<At<i64>>,
}

#[derive(Debug, Default)]
pub struct Base {
    pub suite: Option<At<String>>,
    pub kernel: Option<At<KernelFlavour>>,
    pub packages: Vec<At<String>>,
    pub tarball: Option<At<PathBuf>>,
    pub max_age: Option<At<MaxAge>>,
}

#[derive(Debug, Default)]
pub struct Image {
    pub compression_level: Option<At<i64>>,
}

#[derive(Debug, Default)]
pub struct WireGuard {
    pub enabled: Option<bool>,
    pub interface: Option<At<String>>,
    pub network: Option<At<IpNet>>,
    pub listen_port: Option<At<u16>>,
    pub topology: Option<At<Topology>>,
    pub hub: Option<At<String>>,
    pub persistent_keepalive: Option<At<u16>>,
    pub peers: Vec<ExternalPeer>,
    /// How spokes reach the hub, unless their site or node says otherwise.
    pub hub_transport: Option<At<HubTransport>>,
    /// The TCP port of the hub's `kiln-relay` server.
    pub hub_tcp_port: Option<At<u16>>,
    /// `[wireguard.sites.<name>]`: per-site settings.
    pub sites: Vec<SiteSettings>,
}

#[derive(Debug, Clone)]
pub struct SiteSettings {
    pub name: At<String>,
    pub hub_transport: Option<At<HubTransport>>,
}

#[derive(Debug, Clone)]
pub struct ExternalPeer {
    pub span: Range<usize>,
    pub key: String,
    pub name: Option<At<String>>,
    pub public_key: Option<At<WgKey>>,
    pub endpoint: Option<At<Endpoint>>,
    pub address: Option<At<IpAddr>>,
    pub allowed_ips: Option<Vec<At<IpNet>>>,
    pub persistent_keepalive: Option<At<u16>>,
}

#[derive(Debug, Default)]
pub struct Firewall {
    pub allow_tcp: Option<Vec<At<u16>>>,
    pub allow_udp: Option<Vec<At<u16>>>,
    pub accept_interfaces: Option<Vec<At<String>>>,
    pub accept_cidrs: Option<Vec<At<IpNet>>>,
    pub icmp: Option<bool>,
    pub rules: Vec<FirewallRule>,
}

#[derive(Debug, Clone)]
pub struct FirewallRule {
    pub span: Range<usize>,
    pub key: String,
    pub interface: Option<At<String>>,
    pub from: Vec<At<IpNet>>,
    pub tcp: Vec<At<u16>>,
    pub udp: Vec<At<u16>>,
}

#[derive(Debug, Default)]
pub struct FirstBoot {
    pub users: Vec<User>,
    pub write_files: Vec<WriteFile>,
    pub sysctl: Vec<(At<String>, At<String>)>,
    pub modules: Vec<At<String>>,
    pub run_once: Vec<At<String>>,
    pub boot_cmd: Vec<At<String>>,
    pub dns_nameservers: Vec<At<IpAddr>>,
    pub ntp_servers: Vec<At<Host>>,
}

#[derive(Debug, Clone)]
pub struct User {
    pub span: Range<usize>,
    pub key: String,
    pub name: Option<At<String>>,
    pub uid: Option<At<i64>>,
    pub groups: Vec<At<String>>,
    pub shell: Option<At<String>>,
    pub ssh_authorized_keys: Vec<At<String>>,
}

#[derive(Debug, Clone)]
pub struct WriteFile {
    pub span: Range<usize>,
    pub key: String,
    pub path: Option<At<String>>,
    pub content: Option<At<String>>,
    pub permissions: Option<At<String>>,
    pub owner: Option<At<String>>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub span: Range<usize>,
    pub key: String,
    pub name: Option<At<String>>,
    pub role: Option<At<Role>>,
    pub hostname: Option<At<String>>,
    pub mac: Option<At<MacAddr>>,
    pub lan_address: Option<At<IpAddr>>,
    pub wireguard_address: Option<At<IpAddr>>,
    pub endpoint: Option<At<Endpoint>>,
    /// The LAN the node shares with others it peers with directly.
    pub site: Option<At<String>>,
    pub hub_transport: Option<At<HubTransport>>,
    pub cluster_init: Option<At<bool>>,
    pub labels: Vec<(At<String>, At<String>)>,
    pub taints: Vec<At<String>>,
    pub cmdline: Vec<At<String>>,
    pub network: Option<Network>,
    pub allow_suspend: Option<At<bool>>,
    pub install_device: Option<At<DevicePath>>,
    pub after_install: Option<At<AfterInstall>>,
    /// This node's storage prerequisites, instead of `cluster.storage`.
    pub storage: Option<Vec<At<Storage>>>,
}

/// `[[operators]]`: a machine outside the cluster (an operator's laptop)
/// that reaches the nodes' SSH and API ports over the tunnel.
#[derive(Debug, Clone)]
pub struct Operator {
    pub span: Range<usize>,
    pub key: String,
    pub name: Option<At<String>>,
    pub wireguard_address: Option<At<IpAddr>>,
}

#[derive(Debug, Clone)]
pub struct Network {
    pub span: Range<usize>,
    pub key: String,
    pub interface: Option<At<String>>,
    pub address: Option<At<IpNet>>,
    pub gateway: Option<At<IpAddr>>,
}

// ---------------------------------------------------------------------------
// Reading

/// Read a profile's text. Returns the profile as far as it could be read;
/// every problem is recorded in `d`. Text that is not TOML gives `None`
/// and exactly one diagnostic: the first syntax error. (The parser can
/// recover and go on, but after a missing `]` what it recovers is noise:
/// hundreds of errors, none on the broken line.)
pub fn read_profile(source: &str, d: &mut Diagnostics) -> Option<Profile> {
    let root = match DeTable::parse(source) {
        Ok(root) => root,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_string();
            match unclosed_bracket(source, span.start) {
                Some((open, c))
                    if d.line_of(open) != d.line_of(span.start)
                        && starts_a_statement(source, span.start) =>
                {
                    d.error(
                        open..open + 1,
                        "",
                        format!(
                            "TOML syntax: this `{c}` is not closed (then, on line {}: {msg})",
                            d.line_of(span.start)
                        ),
                        format!(
                            "close it with `{}` on this line, or separate its items with commas",
                            if c == '[' { ']' } else { '}' }
                        ),
                    )
                }
                _ => d.error(
                    span,
                    "",
                    format!("TOML syntax: {msg}"),
                    "fix the syntax at this position (see https://toml.io)",
                ),
            }
            return None;
        }
    };
    let mut p = Profile::default();
    let root_span = root.span();
    let mut t = Tab::new(root.get_ref(), root_span, "");

    if let Some(mut c) = t.table(d, "cluster") {
        p.cluster_name = c.parse(d, "name", |s: &str| {
            types::parse_hostname(s).and_then(|n| label_only(&n, s))
        });
        p.storage = storage::read(&mut c, d);
        c.finish(d);
    }
    if let Some(mut k) = t.table(d, "k3s") {
        p.k3s = read_k3s(&mut k, d);
        k.finish(d);
    }
    if let Some(mut b) = t.table(d, "boot") {
        p.boot.cmdline = b.str_list(d, "cmdline").unwrap_or_default();
        p.boot.consoles = b.str_list(d, "consoles");
        p.boot.menu_timeout = b.int(d, "menu-timeout", "0 to 600 seconds");
        b.finish(d);
    }
    if let Some(mut b) = t.table(d, "base") {
        p.base.suite = b.parse(d, "suite", |s| {
            if types::is_dns_label(s) {
                Ok(s.to_string())
            } else {
                Err(inv(
                    format!("`{s}` is not a Debian suite name"),
                    "write a codename like \"bookworm\"",
                ))
            }
        });
        p.base.kernel = b.parse(d, "kernel", |s| match s {
            "generic" => Ok(KernelFlavour::Generic),
            "cloud" => Ok(KernelFlavour::Cloud),
            _ => Err(inv(
                format!("unknown kernel flavour `{s}`"),
                "write \"generic\" (real hardware) or \"cloud\" (virtual machines only)",
            )),
        });
        p.base.packages = b.parse_list(d, "packages", |s| {
            if !s.is_empty()
                && s.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(&c))
            {
                Ok(s.to_string())
            } else {
                Err(inv(
                    format!("`{s}` is not a Debian package name"),
                    "use lowercase letters, digits and + - .",
                ))
            }
        });
        p.base.tarball = b.str(d, "tarball").map(|a| a.map(PathBuf::from));
        p.base.max_age = b.parse(d, "max-age", MaxAge::parse);
        b.finish(d);
    }
    if let Some(mut i) = t.table(d, "image") {
        p.image.compression_level = i.int(d, "compression-level", "1 to 22");
        i.finish(d);
    }
    if let Some((mut w, span)) = t.table_with_span(d, "wireguard") {
        p.wireguard_span = span;
        p.wireguard = Some(read_wireguard(&mut w, d));
        w.finish(d);
    }
    if let Some(mut f) = t.table(d, "firewall") {
        p.firewall = read_firewall(&mut f, d);
        f.finish(d);
    }
    if let Some(mut f) = t.table(d, "first-boot") {
        p.first_boot = read_first_boot(&mut f, d);
        f.finish(d);
    }
    if let Some((nodes, span)) = t.array_of_tables(d, "nodes") {
        p.nodes_span = span;
        for (i, (mut n, span)) in nodes.into_iter().enumerate() {
            let key = format!("nodes[{i}]");
            p.nodes.push(read_node(&mut n, d, span, key));
            n.finish(d);
        }
    }
    if let Some((operators, _)) = t.array_of_tables(d, "operators") {
        for (i, (mut o, span)) in operators.into_iter().enumerate() {
            p.operators.push(Operator {
                span,
                key: format!("operators[{i}]"),
                name: o.parse(d, "name", |s: &str| {
                    types::parse_hostname(s).and_then(|n| label_only(&n, s))
                }),
                wireguard_address: o.parse(d, "wireguard-address", parse_ip),
            });
            o.finish(d);
        }
    }
    t.finish(d);
    Some(p)
}

/// Does the line at byte `at` begin (at `at`) with what can only start a
/// new statement, `key =` or a `[table]` header? Then a bracket still open
/// before it was never closed, rather than broken on this line.
fn starts_a_statement(source: &str, at: usize) -> bool {
    let line_start = source[..at].rfind('\n').map_or(0, |i| i + 1);
    if !source[line_start..at].trim().is_empty() {
        return false;
    }
    let rest = source[at..].lines().next().unwrap_or("").trim_start();
    if rest.starts_with('[') {
        return true;
    }
    let key_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.\"' ".contains(c)))
        .unwrap_or(rest.len());
    key_len > 0 && rest[key_len..].starts_with('=')
}

/// The innermost `[` or `{` still open at byte `end` of TOML text, skipping
/// strings and comments: where a missing `]` really is, when the parser
/// only notices on a later line.
fn unclosed_bracket(source: &str, end: usize) -> Option<(usize, char)> {
    let b = source.as_bytes();
    let end = end.min(b.len());
    let mut open: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < end {
        match b[i] {
            b'#' => {
                while i < end && b[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'"' | b'\'') => {
                let delim: &[u8] = if q == b'"' { b"\"\"\"" } else { b"'''" };
                let triple = b[i..].starts_with(delim);
                i += if triple { 3 } else { 1 };
                while i < end {
                    if q == b'"' && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if triple {
                        if b[i..].starts_with(delim) {
                            i += 2;
                            break;
                        }
                    } else if b[i] == q || b[i] == b'\n' {
                        break;
                    }
                    i += 1;
                }
            }
            b'[' | b'{' => open.push(i),
            b']' | b'}' => {
                open.pop();
            }
            _ => {}
        }
        i += 1;
    }
    open.last().map(|&o| (o, b[o] as char))
}

fn label_only(name: &str, raw: &str) -> Result<String, Invalid> {
    if name.contains('.') {
        Err(inv(
            format!("`{raw}` contains a dot"),
            "use a single label like \"club\"; it names files and hosts",
        ))
    } else {
        Ok(name.to_string())
    }
}

/// A write-files path: absolute, in its one normal form (no empty, `.` or
/// `..` components, no trailing `/`), without control characters. Refused
/// rather than normalised: `/etc//wireguard` would otherwise slip past the
/// reserved-path check, and two spellings of one path could hide a
/// duplicate.
pub fn parse_file_path(s: &str) -> Result<String, Invalid> {
    if s.chars().any(char::is_control) {
        return Err(inv(
            format!("path `{}` contains a control character", s.escape_debug()),
            "write the path on one line, without NUL, newline or tab",
        ));
    }
    let Some(rest) = s.strip_prefix('/') else {
        return Err(inv(
            format!("path `{s}` is not absolute"),
            "write the full path, starting with /, like \"/etc/motd\"",
        ));
    };
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        let normal: Vec<&str> = rest
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        return Err(inv(
            format!("path `{s}` has an empty, `.` or `..` component"),
            if normal.contains(&"..") {
                "write the path without `..`".to_string()
            } else {
                format!("write it as \"/{}\"", normal.join("/"))
            },
        ));
    }
    Ok(s.to_string())
}

/// A sysctl name as systemd-sysctl reads it: dot-separated segments of
/// letters, digits, `_`, `-` (and `*` globs), or the `/`-separated form
/// sysctl.d(5) allows so a segment may hold a dot (a VLAN interface,
/// `net/ipv4/conf/eth0.100/rp_filter`). The `/` form is kept rather than
/// refused or converted because converting it would change its meaning;
/// either way no segment may be empty, `.` or `..`, so a name stays
/// inside /proc/sys.
pub fn check_sysctl_name(name: &str) -> Result<(), Invalid> {
    let bad = |why: &str| {
        Err(inv(
            format!("`{}` is not a sysctl name: {why}", name.escape_debug()),
            "write a dotted name like \"net.ipv4.ip_forward\" in quotes",
        ))
    };
    let seg_ok = |seg: &str, dot: bool| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_-*".contains(&c) || (dot && c == b'.'))
    };
    let name = name.strip_prefix('-').unwrap_or(name);
    if name.contains('/') {
        if !name.split('/').all(|seg| seg_ok(seg, true)) {
            return bad("a `/`-separated name needs non-empty segments, none `.` or `..`");
        }
    } else if !name.split('.').all(|seg| seg_ok(seg, false)) {
        return bad("use segments of letters, digits, '_', '-' separated by single dots");
    }
    Ok(())
}

/// A node taint, `key[=value]:Effect`.
pub fn parse_taint(s: &str) -> Result<String, Invalid> {
    match s.rsplit_once(':') {
        Some((kv, "NoSchedule" | "PreferNoSchedule" | "NoExecute"))
            if !kv.is_empty() && !kv.contains(char::is_whitespace) =>
        {
            Ok(s.to_string())
        }
        _ => Err(inv(
            format!("`{s}` is not a taint"),
            "write key=value:Effect with Effect NoSchedule, PreferNoSchedule or NoExecute",
        )),
    }
}

/// A Kubernetes label key: letters, digits, `-_./`, at most 316 characters.
pub fn is_label_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 316
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
}

/// A Kubernetes label value: at most 63 letters, digits, `-_.`.
pub fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
}

/// A kernel module name as `modprobe` takes it.
pub fn parse_module(s: &str) -> Result<String, Invalid> {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        Ok(s.to_string())
    } else {
        Err(inv(
            format!("`{s}` is not a kernel module name"),
            "use the module's name as `modprobe` takes it, like \"br_netfilter\"",
        ))
    }
}

fn inv(message: impl Into<String>, hint: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        hint: hint.into(),
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, Invalid> {
    s.parse().map_err(|_| {
        inv(
            format!("`{s}` is not an IP address"),
            "write an address like \"10.0.0.11\", without a /prefix",
        )
    })
}

fn parse_cidr(s: &str) -> Result<IpNet, Invalid> {
    s.parse().map_err(|_| {
        inv(
            format!("`{s}` is not a CIDR"),
            "write an address and prefix length, like \"10.0.0.0/24\"",
        )
    })
}

const PORT_RANGE: &str = "1 to 65535";
const KEEPALIVE_RANGE: &str = "0 (off) to 65535 seconds";

fn parse_port(n: i64) -> Result<u16, Invalid> {
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(inv(
            format!("{n} is not a port number"),
            "use a port between 1 and 65535",
        )),
    }
}

fn parse_iface(s: &str) -> Result<String, Invalid> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(inv(
            format!("`{s}` is not a network interface name"),
            "use at most 15 letters, digits, '-', '_' or '.', like \"wg0\"",
        ))
    }
}

fn read_k3s(k: &mut Tab, d: &mut Diagnostics) -> K3s {
    let mut out = K3s {
        version: k.parse(d, "version", K3sVersion::parse),
        token: k.str(d, "token").map(|a| a.map(K3sToken::new)),
        server_args: k.str_list(d, "server-args").unwrap_or_default(),
        agent_args: k.str_list(d, "agent-args").unwrap_or_default(),
        disable: k.str_list(d, "disable").unwrap_or_default(),
        flannel_backend: k.parse(d, "flannel-backend", |s| match s {
            "wireguard-native" | "vxlan" | "host-gw" | "none" => Ok(s.to_string()),
            _ => Err(inv(
                format!("unknown flannel backend `{s}`"),
                "use \"wireguard-native\", \"vxlan\", \"host-gw\" or \"none\"",
            )),
        }),
        registration_address: k.parse(d, "registration-address", Host::parse),
        tls_san: k.parse_list(d, "tls-san", Host::parse),
        cluster_cidr: k.parse(d, "cluster-cidr", parse_cidr),
        service_cidr: k.parse(d, "service-cidr", parse_cidr),
        airgap: k.bool(d, "airgap"),
        image_tarballs: k.parse_list(d, "image-tarballs", ImageTarballPath::parse),
        ..K3s::default()
    };
    if let Some(mut m) = k.table(d, "mirrors") {
        for (name, span) in m.keys() {
            let key = format!("{}.{}", m.path, quote_key(&name));
            if let Some(mut e) = m.table(d, &name) {
                let endpoints = e.str_list(d, "endpoints").unwrap_or_default();
                out.mirrors.push((
                    At {
                        v: name.clone(),
                        span,
                        key,
                    },
                    endpoints,
                ));
                e.finish(d);
            }
        }
        m.finish(d);
    }
    if let Some(mut m) = k.table(d, "registry-configs") {
        for (name, span) in m.keys() {
            let key = format!("{}.{}", m.path, quote_key(&name));
            if let Some(mut c) = m.table(d, &name) {
                let cfg = RegistryConfig {
                    username: c.str(d, "username").map(|a| a.v),
                    password: c.str(d, "password").map(|a| a.v),
                    insecure_skip_verify: c
                        .bool(d, "insecure-skip-verify")
                        .map(|a| a.v)
                        .unwrap_or(false),
                    ca_file: c.str(d, "ca-file").map(|a| a.v),
                };
                out.registry_configs.push((
                    At {
                        v: name.clone(),
                        span,
                        key,
                    },
                    cfg,
                ));
                c.finish(d);
            }
        }
        m.finish(d);
    }
    manifests::read(k, d, &mut out);
    out.proxy = proxy::read(k, d);
    out
}

fn read_wireguard(w: &mut Tab, d: &mut Diagnostics) -> WireGuard {
    let mut out = WireGuard {
        enabled: w.bool(d, "enabled").map(|a| a.v),
        interface: w.parse(d, "interface", parse_iface),
        network: w.parse(d, "network", parse_cidr),
        listen_port: w.int(d, "listen-port", PORT_RANGE).and_then(|a| port_at(a, d)),
        topology: w.parse(d, "topology", |s| match s {
            "mesh" => Ok(Topology::Mesh),
            "hub" => Ok(Topology::Hub),
            _ => Err(inv(format!("unknown topology `{s}`"), "use \"mesh\" (every node peers with every node) or \"hub\" (every node peers with the hub only)")),
        }),
        hub: w.str(d, "hub"),
        persistent_keepalive: w.int(d, "persistent-keepalive", KEEPALIVE_RANGE).and_then(|a| keepalive_at(a, d)),
        peers: Vec::new(),
        hub_transport: w.parse(d, "hub-transport", HubTransport::parse),
        hub_tcp_port: w.int(d, "hub-tcp-port", PORT_RANGE).and_then(|a| port_at(a, d)),
        sites: Vec::new(),
    };
    if let Some(mut m) = w.table(d, "sites") {
        for (name, span) in m.keys() {
            let key = format!("{}.{}", m.path, quote_key(&name));
            if let Some(mut t) = m.table(d, &name) {
                out.sites.push(SiteSettings {
                    name: At {
                        v: name.clone(),
                        span,
                        key,
                    },
                    hub_transport: t.parse(d, "hub-transport", HubTransport::parse),
                });
                t.finish(d);
            }
        }
        m.finish(d);
    }
    if let Some((peers, _)) = w.array_of_tables(d, "peers") {
        for (i, (mut p, span)) in peers.into_iter().enumerate() {
            let key = format!("wireguard.peers[{i}]");
            out.peers.push(ExternalPeer {
                span,
                key,
                name: p.parse(d, "name", types::parse_hostname),
                public_key: p.parse(d, "public-key", WgKey::parse),
                endpoint: p.parse(d, "endpoint", Endpoint::parse),
                address: p.parse(d, "address", parse_ip),
                allowed_ips: p
                    .str_list(d, "allowed-ips")
                    .map(|l| parse_each(l, d, parse_cidr)),
                persistent_keepalive: p
                    .int(d, "persistent-keepalive", KEEPALIVE_RANGE)
                    .and_then(|a| keepalive_at(a, d)),
            });
            p.finish(d);
        }
    }
    out
}

fn read_firewall(f: &mut Tab, d: &mut Diagnostics) -> Firewall {
    let mut out = Firewall {
        allow_tcp: f.int_list(d, "allow-tcp", PORT_RANGE).map(|l| ports(l, d)),
        allow_udp: f.int_list(d, "allow-udp", PORT_RANGE).map(|l| ports(l, d)),
        accept_interfaces: f
            .str_list(d, "accept-interfaces")
            .map(|l| parse_each(l, d, parse_iface)),
        accept_cidrs: f
            .str_list(d, "accept-cidrs")
            .map(|l| parse_each(l, d, parse_cidr)),
        icmp: f.bool(d, "icmp").map(|a| a.v),
        rules: Vec::new(),
    };
    if let Some((rules, _)) = f.array_of_tables(d, "rules") {
        for (i, (mut r, span)) in rules.into_iter().enumerate() {
            out.rules.push(FirewallRule {
                span,
                key: format!("firewall.rules[{i}]"),
                interface: r.parse(d, "interface", parse_iface),
                from: r.parse_list(d, "from", parse_cidr),
                tcp: r
                    .int_list(d, "tcp", PORT_RANGE)
                    .map(|l| ports(l, d))
                    .unwrap_or_default(),
                udp: r
                    .int_list(d, "udp", PORT_RANGE)
                    .map(|l| ports(l, d))
                    .unwrap_or_default(),
            });
            r.finish(d);
        }
    }
    out
}

fn read_first_boot(f: &mut Tab, d: &mut Diagnostics) -> FirstBoot {
    let mut out = FirstBoot {
        modules: f.parse_list(d, "modules", parse_module),
        run_once: f.str_list(d, "run-once").unwrap_or_default(),
        boot_cmd: f.str_list(d, "boot-cmd").unwrap_or_default(),
        dns_nameservers: f.parse_list(d, "dns-nameservers", parse_ip),
        ntp_servers: f.parse_list(d, "ntp-servers", Host::parse),
        ..FirstBoot::default()
    };
    if let Some(mut s) = f.table(d, "sysctl") {
        for (name, span) in s.keys() {
            let key = format!("{}.{}", s.path, quote_key(&name));
            let value = s.scalar_string(d, &name);
            if let Err(e) = check_sysctl_name(&name) {
                d.error(span.clone(), &key, e.message, e.hint);
            } else if let Some(v) = value {
                if v.v.chars().any(|c| c.is_control()) {
                    d.error(
                        v.span.clone(),
                        &v.key,
                        "the value contains a control character (a newline?)",
                        "write the value on one line",
                    );
                    continue;
                }
                out.sysctl.push((At { v: name, span, key }, v));
            }
        }
        s.finish(d);
    }
    for (i, (mut u, span)) in f
        .array_of_tables(d, "users")
        .map(|x| x.0)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        out.users.push(User {
            span,
            key: format!("first-boot.users[{i}]"),
            name: u.parse(d, "name", |s| {
                if types::is_unix_name(s) {
                    Ok(s.to_string())
                } else {
                    Err(inv(
                        format!("`{s}` is not a valid user name"),
                        "start with a lowercase letter; use lowercase letters, digits, '-' and '_'",
                    ))
                }
            }),
            uid: u.int(d, "uid", "1000 to 59999 (0 for root)"),
            groups: u.parse_list(d, "groups", |s| {
                if types::is_unix_name(s) {
                    Ok(s.to_string())
                } else {
                    Err(inv(
                        format!("`{s}` is not a valid group name"),
                        "use lowercase letters, digits, '-' and '_'",
                    ))
                }
            }),
            shell: u.str(d, "shell"),
            ssh_authorized_keys: u.str_list(d, "ssh-authorized-keys").unwrap_or_default(),
        });
        u.finish(d);
    }
    for (i, (mut w, span)) in f
        .array_of_tables(d, "write-files")
        .map(|x| x.0)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        out.write_files.push(WriteFile {
            span,
            key: format!("first-boot.write-files[{i}]"),
            path: w.parse(d, "path", parse_file_path),
            content: w.str(d, "content"),
            permissions: w.str(d, "permissions"),
            owner: w.str(d, "owner"),
        });
        w.finish(d);
    }
    out
}

fn read_node(n: &mut Tab, d: &mut Diagnostics, span: Range<usize>, key: String) -> Node {
    let mut node = Node {
        span,
        name: n.parse(d, "name", |s: &str| {
            types::parse_hostname(s).and_then(|h| label_only(&h, s))
        }),
        role: n.parse(d, "role", |s| match s {
            "server" => Ok(Role::Server),
            "agent" => Ok(Role::Agent),
            _ => Err(inv(
                format!("unknown role `{s}`"),
                "use \"server\" or \"agent\"",
            )),
        }),
        hostname: n.parse(d, "hostname", types::parse_hostname),
        mac: n.parse(d, "mac", MacAddr::parse),
        lan_address: n.parse(d, "lan-address", parse_ip),
        wireguard_address: n.parse(d, "wireguard-address", parse_ip),
        endpoint: n.parse(d, "endpoint", Endpoint::parse),
        site: n.parse(d, "site", |s| {
            if types::is_dns_label(s) {
                Ok(s.to_string())
            } else {
                Err(inv(
                    format!("`{s}` is not a site name"),
                    "use one label of letters, digits and '-', like \"campus\"",
                ))
            }
        }),
        hub_transport: n.parse(d, "hub-transport", HubTransport::parse),
        cluster_init: n.bool(d, "cluster-init"),
        labels: Vec::new(),
        taints: n.parse_list(d, "taints", parse_taint),
        cmdline: n.str_list(d, "cmdline").unwrap_or_default(),
        network: None,
        allow_suspend: n.bool(d, "allow-suspend"),
        install_device: n.parse(d, "install-device", DevicePath::parse),
        storage: storage::read(n, d),
        after_install: n.parse(d, "after-install", |s| match s {
            "poweroff" => Ok(AfterInstall::Poweroff),
            "reboot" => Ok(AfterInstall::Reboot),
            _ => Err(inv(
                format!("unknown after-install action `{s}`"),
                "write \"poweroff\" (take the stick out, then power on) or \"reboot\" (the firmware must then prefer the internal disk)",
            )),
        }),
        key,
    };
    if let Some(mut l) = n.table(d, "labels") {
        for (name, span) in l.keys() {
            let key = format!("{}.{}", l.path, quote_key(&name));
            let ok = is_label_key(&name);
            if let Some(v) = l.str(d, &name) {
                if !is_label_value(&v.v) {
                    d.error(
                        v.span.clone(),
                        &v.key,
                        format!("`{}` is not a Kubernetes label value", v.v),
                        "use at most 63 letters, digits, '-', '_' or '.'",
                    );
                } else if !ok {
                    d.error(span.clone(), &key, format!("`{name}` is not a Kubernetes label key"), "use letters, digits, '-', '_', '.' and one optional prefix/ like \"kiln.dev/gpu\"");
                } else {
                    node.labels.push((At { v: name, span, key }, v));
                }
            }
        }
        l.finish(d);
    }
    if let Some((mut w, span)) = n.table_with_span(d, "network") {
        node.network = Some(Network {
            span,
            key: w.path.clone(),
            interface: w.parse(d, "interface", parse_iface),
            address: w.parse(d, "address", |s| {
                if !s.contains('/') {
                    return Err(inv(
                        format!("`{s}` has no prefix length"),
                        "write the address with its prefix, like \"192.168.1.11/24\"",
                    ));
                }
                parse_cidr(s)
            }),
            gateway: w.parse(d, "gateway", parse_ip),
        });
        w.finish(d);
    }
    node
}

fn ports(l: Vec<At<i64>>, d: &mut Diagnostics) -> Vec<At<u16>> {
    l.into_iter().filter_map(|a| port_at(a, d)).collect()
}

fn port_at(a: At<i64>, d: &mut Diagnostics) -> Option<At<u16>> {
    match parse_port(a.v) {
        Ok(p) => Some(At {
            v: p,
            span: a.span,
            key: a.key,
        }),
        Err(e) => {
            d.error(a.span, &a.key, e.message, e.hint);
            None
        }
    }
}

fn keepalive_at(a: At<i64>, d: &mut Diagnostics) -> Option<At<u16>> {
    match u16::try_from(a.v) {
        Ok(v) => Some(At {
            v,
            span: a.span,
            key: a.key,
        }),
        Err(_) => {
            d.error(
                a.span,
                &a.key,
                format!("{} is not a keepalive interval", a.v),
                "use seconds between 0 (off) and 65535; 25 keeps most NAT mappings open",
            );
            None
        }
    }
}

fn parse_each<T>(
    l: Vec<At<String>>,
    d: &mut Diagnostics,
    f: impl Fn(&str) -> Result<T, Invalid>,
) -> Vec<At<T>> {
    l.into_iter()
        .filter_map(|a| match f(&a.v) {
            Ok(v) => Some(At {
                v,
                span: a.span,
                key: a.key,
            }),
            Err(e) => {
                d.error(a.span, &a.key, e.message, e.hint);
                None
            }
        })
        .collect()
}

fn quote_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

// ---------------------------------------------------------------------------
// A table being read: typed getters that record errors, and a `finish` that
// reports every key nobody asked for.

struct Tab<'t, 'i> {
    t: &'t DeTable<'i>,
    span: Range<usize>,
    path: String,
    asked: Vec<String>,
}

fn type_name(v: &DeValue) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

impl<'t, 'i> Tab<'t, 'i> {
    fn new(t: &'t DeTable<'i>, span: Range<usize>, path: &str) -> Self {
        Tab {
            t,
            span,
            path: path.to_string(),
            asked: Vec::new(),
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    fn get(&mut self, key: &str) -> Option<&'t Spanned<DeValue<'i>>> {
        self.asked.push(key.to_string());
        self.t.get(key)
    }

    /// Keys present in the table (for maps with user-chosen keys); marks
    /// them all as known.
    fn keys(&mut self) -> Vec<(String, Range<usize>)> {
        let keys: Vec<(String, Range<usize>)> = self
            .t
            .iter()
            .map(|(k, _)| (k.get_ref().to_string(), k.span()))
            .collect();
        self.asked.extend(keys.iter().map(|(k, _)| k.clone()));
        keys
    }

    fn wrong_type(&self, d: &mut Diagnostics, key: &str, v: &Spanned<DeValue>, want: &str) {
        let path = self.child_path(key);
        d.error(
            v.span(),
            &path,
            format!("expected {want}, found {}", type_name(v.get_ref())),
            format!("write `{key}` as {want}"),
        );
    }

    fn str(&mut self, d: &mut Diagnostics, key: &str) -> Option<At<String>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(At {
                v: s.to_string(),
                span: v.span(),
                key: self.child_path(key),
            }),
            _ => {
                self.wrong_type(d, key, v, "a string");
                None
            }
        }
    }

    /// A string, integer, float or boolean, as text (sysctl values).
    fn scalar_string(&mut self, d: &mut Diagnostics, key: &str) -> Option<At<String>> {
        let v = self.get(key)?;
        let s = match v.get_ref() {
            DeValue::String(s) => s.to_string(),
            DeValue::Integer(i) => i.as_str().replace('_', ""),
            DeValue::Float(f) => f.as_str().to_string(),
            DeValue::Boolean(b) => if *b { "1" } else { "0" }.to_string(),
            _ => {
                self.wrong_type(d, key, v, "a string or a number");
                return None;
            }
        };
        Some(At {
            v: s,
            span: v.span(),
            key: self.child_path(key),
        })
    }

    fn bool(&mut self, d: &mut Diagnostics, key: &str) -> Option<At<bool>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(At {
                v: *b,
                span: v.span(),
                key: self.child_path(key),
            }),
            _ => {
                self.wrong_type(d, key, v, "true or false");
                None
            }
        }
    }

    /// An integer; `range` says what the key takes ("1 to 65535"), for a
    /// literal too big for any integer kiln stores.
    fn int_value(
        &self,
        d: &mut Diagnostics,
        key: &str,
        v: &Spanned<DeValue>,
        range: &str,
    ) -> Option<At<i64>> {
        if let DeValue::Integer(i) = v.get_ref() {
            let digits = i.as_str().replace('_', "");
            let digits = digits
                .trim_start_matches("0x")
                .trim_start_matches("0o")
                .trim_start_matches("0b");
            if let Ok(n) = i64::from_str_radix(digits, i.radix()) {
                return Some(At {
                    v: n,
                    span: v.span(),
                    key: key.to_string(),
                });
            }
            d.error(
                v.span(),
                key,
                format!("{} is out of range: `{key}` takes {range}", i.as_str()),
                format!("write a whole number from {range}"),
            );
            return None;
        }
        d.error(
            v.span(),
            key,
            format!("expected an integer, found {}", type_name(v.get_ref())),
            "write a whole number without quotes",
        );
        None
    }

    fn int(&mut self, d: &mut Diagnostics, key: &str, range: &str) -> Option<At<i64>> {
        let v = self.get(key)?;
        let path = self.child_path(key);
        self.int_value(d, &path, v, range)
    }

    fn array(
        &mut self,
        d: &mut Diagnostics,
        key: &str,
    ) -> Option<Vec<(&'t Spanned<DeValue<'i>>, String)>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Array(a) => {
                let path = self.child_path(key);
                Some(
                    a.iter()
                        .enumerate()
                        .map(|(i, e)| (e, format!("{path}[{i}]")))
                        .collect(),
                )
            }
            _ => {
                self.wrong_type(d, key, v, "an array");
                None
            }
        }
    }

    fn str_list(&mut self, d: &mut Diagnostics, key: &str) -> Option<Vec<At<String>>> {
        let items = self.array(d, key)?;
        let mut out = Vec::new();
        for (e, path) in items {
            match e.get_ref() {
                DeValue::String(s) => out.push(At {
                    v: s.to_string(),
                    span: e.span(),
                    key: path,
                }),
                other => d.error(
                    e.span(),
                    &path,
                    format!("expected a string, found {}", type_name(other)),
                    "put the item in double quotes",
                ),
            }
        }
        Some(out)
    }

    fn int_list(&mut self, d: &mut Diagnostics, key: &str, range: &str) -> Option<Vec<At<i64>>> {
        let items = self.array(d, key)?;
        Some(
            items
                .into_iter()
                .filter_map(|(e, path)| self.int_value(d, &path, e, range))
                .collect(),
        )
    }

    fn parse<T>(
        &mut self,
        d: &mut Diagnostics,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<At<T>> {
        let a = self.str(d, key)?;
        match f(&a.v) {
            Ok(v) => Some(At {
                v,
                span: a.span,
                key: a.key,
            }),
            Err(e) => {
                d.error(a.span, &a.key, e.message, e.hint);
                None
            }
        }
    }

    fn parse_list<T>(
        &mut self,
        d: &mut Diagnostics,
        key: &str,
        f: impl Fn(&str) -> Result<T, Invalid>,
    ) -> Vec<At<T>> {
        let l = self.str_list(d, key).unwrap_or_default();
        parse_each(l, d, f)
    }

    fn table_with_span(
        &mut self,
        d: &mut Diagnostics,
        key: &str,
    ) -> Option<(Tab<'t, 'i>, Range<usize>)> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some((Tab::new(t, v.span(), &self.child_path(key)), v.span())),
            _ => {
                self.wrong_type(d, key, v, "a table");
                None
            }
        }
    }

    fn table(&mut self, d: &mut Diagnostics, key: &str) -> Option<Tab<'t, 'i>> {
        self.table_with_span(d, key).map(|x| x.0)
    }

    #[allow(clippy::type_complexity)]
    fn array_of_tables(
        &mut self,
        d: &mut Diagnostics,
        key: &str,
    ) -> Option<(Vec<(Tab<'t, 'i>, Range<usize>)>, Range<usize>)> {
        let v = self.get(key)?;
        let path = self.child_path(key);
        match v.get_ref() {
            DeValue::Array(a) => {
                let mut out = Vec::new();
                for (i, e) in a.iter().enumerate() {
                    match e.get_ref() {
                        DeValue::Table(t) => {
                            out.push((Tab::new(t, e.span(), &format!("{path}[{i}]")), e.span()))
                        }
                        other => d.error(
                            e.span(),
                            &format!("{path}[{i}]"),
                            format!("expected a table, found {}", type_name(other)),
                            format!("write each entry as a [[{path}]] section"),
                        ),
                    }
                }
                Some((out, v.span()))
            }
            _ => {
                self.wrong_type(d, key, v, &format!("an array of tables ([[{path}]])"));
                None
            }
        }
    }

    /// Report every key present that no getter asked for.
    fn finish(self, d: &mut Diagnostics) {
        let _ = &self.span;
        for (k, _) in self.t.iter() {
            let name = k.get_ref();
            if !self.asked.iter().any(|a| a == name.as_ref()) {
                let known = self.asked.join(", ");
                let hint = match closest(name, &self.asked) {
                    Some(c) => format!("did you mean `{c}`? known keys here: {known}"),
                    None if known.is_empty() => "remove it".to_string(),
                    None => format!("remove it; known keys here: {known}"),
                };
                d.error(
                    k.span(),
                    &self.child_path(name),
                    format!("unknown key `{name}`"),
                    hint,
                );
            }
        }
    }
}

/// The known key most like `name` (small edit distance, or `_` for `-`).
fn closest<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    let norm = name.replace('_', "-").to_ascii_lowercase();
    if let Some(k) = known.iter().find(|k| **k == norm) {
        return Some(k);
    }
    // `mac-address` for `mac`, `wireguard` for `wireguard-address`.
    let by_prefix = known
        .iter()
        .filter(|k| {
            k.len() >= 3
                && (norm.starts_with(&format!("{k}-")) || k.starts_with(&format!("{norm}-")))
        })
        .max_by_key(|k| k.len());
    by_prefix.map(String::as_str).or_else(|| {
        known
            .iter()
            .map(|k| (strsim::levenshtein(&norm, k), k))
            .filter(|(dist, k)| *dist <= 2.max(k.len() / 4))
            .min_by_key(|(dist, _)| *dist)
            .map(|(_, k)| k.as_str())
    })
}
