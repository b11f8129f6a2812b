//! The resolved plan: a profile with its defaults applied and every
//! cross-field rule checked. Nothing after this point parses strings or
//! reports profile errors; nothing in here does I/O except [`load`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;

use crate::config::diag::{Diagnostic, Diagnostics, ProfileErrors, escape_controls};
use crate::config::profile::{self, At, KernelFlavour, RegistryConfig, Role, Topology};
use crate::config::types::{self, Endpoint, Host, K3sVersion, MacAddr, WgKey};

// Defaults, in one place. Each is documented in docs/profile.md.
pub const DEFAULT_SUITE: &str = "bookworm";
pub const DEFAULT_CONSOLES: [&str; 2] = ["ttyS0,115200", "tty0"];
pub const DEFAULT_COMPRESSION_LEVEL: i64 = 3;
/// Seconds the boot menu waits: long enough to pick the other slot by hand.
pub const DEFAULT_MENU_TIMEOUT_S: i64 = 3;
pub const DEFAULT_WG_INTERFACE: &str = "wg0";
/// kiln's tunnel port. Not 51820/51821: those are flannel's
/// `wireguard-native` ports (k3s networking docs), which run inside it.
pub const DEFAULT_WG_PORT: u16 = 51830;
/// UDP ports flannel's wireguard-native backend listens on (IPv4, IPv6).
pub const FLANNEL_WG_PORTS: [u16; 2] = [51820, 51821];
/// Keepalive for spokes in a hub topology: keeps NAT mappings open.
pub const DEFAULT_HUB_KEEPALIVE_S: u16 = 25;
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
pub const DEFAULT_ALLOW_TCP: [u16; 1] = [22];
pub const FIRST_USER_UID: u32 = 1000;
/// The k3s supervisor and API server port.
pub const K3S_API_PORT: u16 = 6443;
/// The kubelet port.
pub const KUBELET_PORT: u16 = 10250;
/// Embedded etcd client and peer ports (HA servers).
pub const ETCD_PORTS: [u16; 2] = [2379, 2380];
/// flannel's VXLAN port.
pub const FLANNEL_VXLAN_PORT: u16 = 8472;
/// Components k3s can be told to skip with `--disable`.
pub const K3S_COMPONENTS: [&str; 6] = [
    "coredns",
    "servicelb",
    "traefik",
    "local-storage",
    "metrics-server",
    "runtimes",
];

#[derive(Debug, Clone)]
pub struct Plan {
    /// The profile file as the user named it (for messages).
    pub profile_path: PathBuf,
    pub cluster: String,
    pub k3s: K3sPlan,
    pub boot: BootPlan,
    pub base: BasePlan,
    /// zstd level of the root squashfs.
    pub compression_level: i32,
    pub wireguard: Option<WgPlan>,
    pub firewall: FirewallPlan,
    pub first_boot: FirstBootPlan,
    pub nodes: Vec<NodePlan>,
}

#[derive(Debug, Clone)]
pub struct K3sPlan {
    pub version: K3sVersion,
    /// A token written in the profile; `None` means generated in the state dir.
    pub token: Option<String>,
    pub server_args: Vec<String>,
    pub agent_args: Vec<String>,
    pub disable: Vec<String>,
    pub flannel_backend: String,
    pub registration_address: Option<Host>,
    /// Extra names for the API server certificate (the registration
    /// address is added when rendering).
    pub tls_san: Vec<Host>,
    pub cluster_cidr: IpNet,
    pub service_cidr: IpNet,
    pub mirrors: Vec<(String, Vec<String>)>,
    pub registry_configs: Vec<(String, RegistryConfig)>,
}

#[derive(Debug, Clone)]
pub struct BootPlan {
    pub cmdline: Vec<String>,
    pub consoles: Vec<String>,
    /// Seconds systemd-boot shows its menu.
    pub menu_timeout: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BasePlan {
    Debian {
        suite: String,
        kernel: KernelFlavour,
        packages: Vec<String>,
    },
    /// A root tarball the user supplies (path resolved against the profile's directory).
    Tarball(PathBuf),
}

#[derive(Debug, Clone)]
pub struct WgPlan {
    pub interface: String,
    pub network: IpNet,
    pub listen_port: u16,
    pub topology: Topology,
    /// In a hub topology, who the hub is.
    pub hub: Option<HubRef>,
    pub persistent_keepalive: Option<u16>,
    pub peers: Vec<ExternalPeerPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubRef {
    /// Index into `WgPlan::peers`.
    External(usize),
    /// Index into `Plan::nodes`.
    Node(usize),
}

#[derive(Debug, Clone)]
pub struct ExternalPeerPlan {
    pub name: String,
    pub public_key: WgKey,
    pub endpoint: Option<Endpoint>,
    pub address: Option<IpAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct FirewallPlan {
    pub allow_tcp: Vec<u16>,
    pub allow_udp: Vec<u16>,
    pub accept_interfaces: Vec<String>,
    pub accept_cidrs: Vec<IpNet>,
    pub icmp: bool,
    pub rules: Vec<FirewallRulePlan>,
}

#[derive(Debug, Clone)]
pub struct FirewallRulePlan {
    pub interface: Option<String>,
    pub from: Vec<IpNet>,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

#[derive(Debug, Clone, Default)]
pub struct FirstBootPlan {
    pub users: Vec<UserPlan>,
    pub write_files: Vec<WriteFilePlan>,
    pub sysctl: Vec<(String, String)>,
    pub modules: Vec<String>,
    pub run_once: Vec<String>,
    pub boot_cmd: Vec<String>,
    pub dns_nameservers: Vec<IpAddr>,
    pub ntp_servers: Vec<Host>,
}

#[derive(Debug, Clone)]
pub struct UserPlan {
    pub name: String,
    pub uid: u32,
    pub groups: Vec<String>,
    pub shell: String,
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct WriteFilePlan {
    pub path: String,
    pub content: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone)]
pub struct NodePlan {
    pub name: String,
    pub role: Role,
    pub hostname: String,
    pub mac: Option<MacAddr>,
    pub lan_address: Option<IpAddr>,
    pub wireguard_address: Option<IpAddr>,
    /// Where other nodes reach this node's WireGuard port, if known.
    pub endpoint: Option<Endpoint>,
    pub cluster_init: bool,
    pub labels: Vec<(String, String)>,
    pub taints: Vec<String>,
    /// Kernel command line items for this node only.
    pub cmdline: Vec<String>,
    pub network: NetworkPlan,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkPlan {
    pub matches: IfaceMatch,
    /// `None`: DHCP.
    pub address: Option<IpNet>,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IfaceMatch {
    Name(String),
    Mac(MacAddr),
    /// Any wired Ethernet interface.
    AnyEthernet,
}

impl Plan {
    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn servers(&self) -> impl Iterator<Item = &NodePlan> {
        self.nodes.iter().filter(|n| n.role == Role::Server)
    }

    /// The address a node uses for cluster traffic: its WireGuard address
    /// when WireGuard is on, else its LAN address.
    pub fn cluster_address(&self, node: &NodePlan) -> Option<IpAddr> {
        if self.wireguard.is_some() {
            node.wireguard_address
        } else {
            node.lan_address
        }
    }

    /// The URL a joining node (an agent, or a server that does not
    /// initialise the cluster) registers with; `None` for the node that
    /// starts the cluster.
    pub fn join_url(&self, node: &NodePlan) -> Option<String> {
        if node.role == Role::Server && (node.cluster_init || self.servers().count() == 1) {
            return None;
        }
        let host = match &self.k3s.registration_address {
            Some(h) => h.to_string(),
            None => {
                let first = self
                    .servers()
                    .find(|s| s.cluster_init && s.name != node.name)
                    .or_else(|| self.servers().find(|s| s.name != node.name))?;
                Host::Ip(self.cluster_address(first)?).to_string()
            }
        };
        Some(format!("https://{host}:{K3S_API_PORT}"))
    }

    /// The full kernel command line items of a node: consoles, the
    /// profile's items, then the node's own.
    pub fn cmdline(&self, node: &NodePlan) -> Vec<String> {
        let mut v: Vec<String> = self
            .boot
            .consoles
            .iter()
            .map(|c| format!("console={c}"))
            .collect();
        v.extend(self.boot.cmdline.iter().cloned());
        v.extend(node.cmdline.iter().cloned());
        v
    }
}

/// The largest profile kiln reads. A real one is a few kilobytes; the
/// limit keeps `/dev/zero` or a runaway generator from eating memory.
pub const MAX_PROFILE_BYTES: u64 = 4 * 1024 * 1024;

/// Read and validate a profile file.
pub fn load(path: &Path) -> anyhow::Result<Plan> {
    let source = read_profile_text(path)?;
    Ok(plan_profile(path, &source)?)
}

/// A problem with the profile file as a whole, as a one-error report.
fn file_error(
    path: &Path,
    line: usize,
    column: usize,
    message: String,
    hint: &str,
) -> ProfileErrors {
    ProfileErrors(vec![Diagnostic {
        file: escape_controls(&path.display().to_string()),
        line,
        column,
        key: String::new(),
        message: escape_controls(&message),
        hint: hint.to_string(),
    }])
}

/// Read a profile's bytes as text: a regular file (a FIFO would block, a
/// device never end), at most [`MAX_PROFILE_BYTES`], valid UTF-8.
fn read_profile_text(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let context = || format!("reading profile {}", path.display());
    let not_regular = |ft: std::fs::FileType| -> Option<&'static str> {
        if ft.is_file() {
            None
        } else if ft.is_dir() {
            Some("a directory")
        } else if ft.is_fifo() {
            Some("a FIFO")
        } else if ft.is_char_device() || ft.is_block_device() {
            Some("a device")
        } else if ft.is_socket() {
            Some("a socket")
        } else {
            Some("not a regular file")
        }
    };
    let refuse = |what: &str| {
        file_error(
            path,
            1,
            1,
            format!("the profile is {what}, not a regular file"),
            "name a .toml file; to read a generated profile, write it to a file first",
        )
    };
    // stat before open: opening a FIFO for reading blocks until a writer comes.
    let meta = std::fs::metadata(path).with_context(context)?;
    if let Some(what) = not_regular(meta.file_type()) {
        return Err(refuse(what).into());
    }
    // O_NONBLOCK in case it was swapped for a FIFO since; checked again below.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(context)?;
    if let Some(what) = not_regular(file.metadata().with_context(context)?.file_type()) {
        return Err(refuse(what).into());
    }
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(context)?;
    if bytes.len() as u64 > MAX_PROFILE_BYTES {
        return Err(file_error(
            path,
            1,
            1,
            format!(
                "the profile is larger than {} MiB",
                MAX_PROFILE_BYTES / (1024 * 1024)
            ),
            "a profile is a few kilobytes: check that this is the right file",
        )
        .into());
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let valid = std::str::from_utf8(valid).expect("valid up to here");
        let (line, column) = crate::config::diag::line_col(valid, valid.len());
        let byte = e.as_bytes()[valid.len()];
        file_error(
            path,
            line,
            column,
            format!("the profile is not UTF-8 text: byte 0x{byte:02x} here is not valid UTF-8"),
            "save the file as UTF-8 (the encoding TOML requires)",
        )
        .into()
    })
}

/// Validate a profile's text into a plan, or return every problem found.
pub fn plan_profile(path: &Path, source: &str) -> Result<Plan, ProfileErrors> {
    let mut d = Diagnostics::new(path.display().to_string(), source);
    let Some(p) = profile::read_profile(source, &mut d) else {
        // Not TOML: only the syntax error, no guesses about what is missing.
        return Err(ProfileErrors(d.into_sorted()));
    };
    let plan = resolve(path, p, &mut d);
    if d.is_empty() {
        Ok(plan.expect("a plan without diagnostics"))
    } else {
        Err(ProfileErrors(d.into_sorted()))
    }
}

/// Apply defaults and check cross-field rules. Returns `None` only when a
/// required value is missing (and then a diagnostic says so).
fn resolve(path: &Path, p: profile::Profile, d: &mut Diagnostics) -> Option<Plan> {
    let mut missing = false;
    let mut require = |d: &mut Diagnostics,
                       present: bool,
                       span: std::ops::Range<usize>,
                       key: &str,
                       hint: &str| {
        if !present {
            d.missing(
                span,
                key,
                format!("missing required key `{key}`"),
                hint.to_string(),
            );
            missing = true;
        }
    };
    require(
        d,
        p.cluster_name.is_some(),
        0..0,
        "cluster.name",
        "add `[cluster]` with `name = \"club\"`",
    );
    require(
        d,
        p.k3s.version.is_some(),
        0..0,
        "k3s.version",
        "add `[k3s]` with `version = \"v1.31.1+k3s1\"` (a k3s release tag)",
    );
    require(
        d,
        !p.nodes.is_empty(),
        p.nodes_span.clone(),
        "nodes",
        "add at least one `[[nodes]]` section with `name` and `role = \"server\"`",
    );

    let cluster_cidr = p
        .k3s
        .cluster_cidr
        .as_ref()
        .map_or_else(|| DEFAULT_CLUSTER_CIDR.parse().unwrap(), |a| a.v);
    let service_cidr = p
        .k3s
        .service_cidr
        .as_ref()
        .map_or_else(|| DEFAULT_SERVICE_CIDR.parse().unwrap(), |a| a.v);

    // ---- boot
    let consoles: Vec<String> = match &p.boot.consoles {
        Some(c) => c.iter().map(|a| a.v.clone()).collect(),
        None => DEFAULT_CONSOLES.iter().map(|s| s.to_string()).collect(),
    };
    for a in p
        .boot
        .cmdline
        .iter()
        .chain(p.boot.consoles.iter().flatten())
        .chain(p.nodes.iter().flat_map(|n| n.cmdline.iter()))
    {
        if let Err(e) = types::check_cmdline_item(&a.v) {
            d.error(a.span.clone(), &a.key, e.message, e.hint);
        }
    }
    for a in p
        .boot
        .cmdline
        .iter()
        .chain(p.nodes.iter().flat_map(|n| n.cmdline.iter()))
    {
        let name = a.v.split('=').next().unwrap_or("");
        if ["root", "kiln.slot", "kiln.root", "console"].contains(&name) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("`{name}=` is set by kiln"),
                if name == "console" {
                    "list consoles in `boot.consoles` instead"
                } else {
                    "remove it; kiln adds the root and slot selection itself"
                },
            );
        }
    }

    let menu_timeout = match &p.boot.menu_timeout {
        Some(a) if !(0..=600).contains(&a.v) => {
            d.error(
                a.span.clone(),
                &a.key,
                format!("menu timeout {} s is out of range", a.v),
                "use 0 (no menu) to 600 seconds",
            );
            DEFAULT_MENU_TIMEOUT_S
        }
        Some(a) => a.v,
        None => DEFAULT_MENU_TIMEOUT_S,
    } as u32;

    // ---- base
    let base = match (&p.base.tarball, &p.base.suite) {
        (Some(t), Some(s)) => {
            d.error(
                s.span.clone(),
                &s.key,
                "both `base.suite` and `base.tarball` are set",
                format!(
                    "remove one: `{}` is used as the whole root, so a suite would be ignored",
                    t.v.display()
                ),
            );
            BasePlan::Tarball(t.v.clone())
        }
        (Some(t), None) => {
            if let Some(k) = &p.base.kernel {
                d.error(
                    k.span.clone(),
                    &k.key,
                    "`base.kernel` cannot choose the kernel of a supplied tarball",
                    "remove `kernel`: the tarball's own kernel is used",
                );
            }
            if !p.base.packages.is_empty() {
                d.error(
                    p.base.packages[0].span.clone(),
                    "base.packages",
                    "`base.packages` cannot be added to a supplied tarball",
                    "remove `packages`, or build from a suite instead of `tarball`",
                );
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            BasePlan::Tarball(if t.v.is_absolute() {
                t.v.clone()
            } else {
                dir.join(&t.v)
            })
        }
        (None, s) => BasePlan::Debian {
            suite: s
                .as_ref()
                .map_or(DEFAULT_SUITE.to_string(), |a| a.v.clone()),
            kernel: p
                .base
                .kernel
                .as_ref()
                .map_or(KernelFlavour::Generic, |a| a.v),
            packages: p.base.packages.iter().map(|a| a.v.clone()).collect(),
        },
    };
    let compression_level = match &p.image.compression_level {
        Some(a) if !(1..=22).contains(&a.v) => {
            d.error(
                a.span.clone(),
                &a.key,
                format!("zstd level {} is out of range", a.v),
                "use 1 (fastest) to 22 (smallest); 3 is the default",
            );
            DEFAULT_COMPRESSION_LEVEL
        }
        Some(a) => a.v,
        None => DEFAULT_COMPRESSION_LEVEL,
    } as i32;

    // ---- nodes (names, roles, addresses)
    let wg_enabled = p
        .wireguard
        .as_ref()
        .is_some_and(|w| w.enabled != Some(false));
    let wg_network = p.wireguard.as_ref().and_then(|w| w.network.as_ref());
    if wg_enabled && wg_network.is_none() {
        d.missing(
            p.wireguard_span.clone(),
            "wireguard.network",
            "missing required key `wireguard.network`",
            "add the tunnel network, like `network = \"10.0.0.0/24\"`, or set `enabled = false`",
        );
    }
    if let Some(net) = wg_network.filter(|_| wg_enabled) {
        for (what, other) in [
            ("cluster-cidr", cluster_cidr),
            ("service-cidr", service_cidr),
        ] {
            if net.v.contains(&other.network()) || other.contains(&net.v.network()) {
                d.error(
                    net.span.clone(),
                    &net.key,
                    format!("{} overlaps the k3s {what} {other}", net.v),
                    format!("choose a WireGuard network that does not overlap {other}"),
                );
            }
        }
    }
    let mut seen_names: BTreeMap<String, &At<String>> = BTreeMap::new();
    let mut seen_hosts: BTreeMap<String, &At<String>> = BTreeMap::new();
    let mut seen_macs: BTreeMap<MacAddr, &At<MacAddr>> = BTreeMap::new();
    let mut seen_ips: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut dup_ip = |d: &mut Diagnostics, a: &At<IpAddr>| {
        if let Some(first) = seen_ips.get(&a.v) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("address {} is already used by {first}", a.v),
                "give every node and peer its own address",
            );
        } else {
            seen_ips.insert(a.v, a.key.clone());
        }
    };
    let mut nodes = Vec::new();
    for (i, n) in p.nodes.iter().enumerate() {
        let key = &n.key;
        let name = match &n.name {
            Some(a) => {
                if let Some(first) = seen_names.get(&a.v) {
                    d.error(
                        a.span.clone(),
                        &a.key,
                        format!(
                            "node name `{}` is already used by {}",
                            a.v,
                            first.key.trim_end_matches(".name")
                        ),
                        "give every node a unique name",
                    );
                } else {
                    seen_names.insert(a.v.clone(), a);
                }
                a.v.clone()
            }
            None => {
                d.missing(
                    n.span.clone(),
                    &format!("{key}.name"),
                    "missing required key `name`",
                    "add `name = \"rgb1\"` (a host-name label)",
                );
                missing = true;
                format!("node{i}")
            }
        };
        let role = match &n.role {
            Some(a) => a.v,
            None => {
                d.missing(
                    n.span.clone(),
                    &format!("{key}.role"),
                    "missing required key `role`",
                    "add `role = \"server\"` or `role = \"agent\"`",
                );
                missing = true;
                Role::Agent
            }
        };
        let hostname = n.hostname.as_ref().map_or(name.clone(), |a| a.v.clone());
        let host_at = n.hostname.clone().or_else(|| n.name.clone());
        if let Some(h) = &host_at {
            let h = At {
                v: hostname.clone(),
                ..h.clone()
            };
            if let Some(first) = seen_hosts.get(&hostname) {
                // Two nodes with the same name and no `hostname` are reported once, as a duplicate name.
                if n.hostname.is_some() || first.key.ends_with(".hostname") {
                    d.error(
                        h.span.clone(),
                        &h.key,
                        format!("host name `{hostname}` is already used by {}", first.key),
                        "give every node its own host name",
                    );
                }
            } else {
                seen_hosts.insert(
                    hostname.clone(),
                    n.hostname.as_ref().or(n.name.as_ref()).unwrap(),
                );
            }
        }
        if let Some(m) = &n.mac {
            if let Some(first) = seen_macs.get(&m.v) {
                d.error(
                    m.span.clone(),
                    &m.key,
                    format!("MAC address {} is already used by {}", m.v, first.key),
                    "copy each machine's own MAC from `ip link`",
                );
            } else {
                seen_macs.insert(m.v, m);
            }
        }
        if let Some(c) = &n.cluster_init
            && c.v
            && role == Role::Agent
        {
            d.error(
                c.span.clone(),
                &c.key,
                "`cluster-init` is set on an agent",
                "set it on the first server only, or remove it",
            );
        }
        // LAN: from `lan-address`, or the static `network.address`.
        let net = n.network.as_ref();
        let static_addr = net.and_then(|w| w.address.as_ref());
        let mut lan_address = n.lan_address.as_ref().map(|a| a.v);
        if let (Some(l), Some(s)) = (&n.lan_address, static_addr)
            && l.v != s.v.addr()
        {
            d.error(
                l.span.clone(),
                &l.key,
                format!("lan-address {} differs from network.address {}", l.v, s.v),
                "remove `lan-address`; the static address is used",
            );
        }
        if let Some(s) = static_addr {
            lan_address = Some(s.v.addr());
            if s.v.prefix_len() < s.v.max_prefix_len()
                && (s.v.addr() == s.v.network() || s.v.addr() == s.v.broadcast())
                && s.v.prefix_len() < 31
            {
                d.error(
                    s.span.clone(),
                    &s.key,
                    format!(
                        "{} is the network's {} address",
                        s.v.addr(),
                        if s.v.addr() == s.v.network() {
                            "network"
                        } else {
                            "broadcast"
                        }
                    ),
                    "pick a host address inside the subnet",
                );
            }
        }
        if let (Some(g), Some(s)) = (net.and_then(|w| w.gateway.as_ref()), static_addr)
            && !s.v.contains(&g.v)
        {
            d.error(
                g.span.clone(),
                &g.key,
                format!("gateway {} is outside {}", g.v, s.v.trunc()),
                "use a gateway on the node's LAN subnet",
            );
        }
        if let (Some(g), None) = (net.and_then(|w| w.gateway.as_ref()), static_addr) {
            d.error(
                g.span.clone(),
                &g.key,
                "a gateway without a static address",
                "add `address = \"192.168.1.11/24\"`, or remove `gateway` to use DHCP",
            );
        }
        if let Some(l) = n.lan_address.as_ref() {
            dup_ip(d, l);
        } else if let Some(s) = static_addr {
            dup_ip(
                d,
                &At {
                    v: s.v.addr(),
                    span: s.span.clone(),
                    key: s.key.clone(),
                },
            );
        }
        let matches = match (net.and_then(|w| w.interface.as_ref()), &n.mac) {
            (Some(i), _) => IfaceMatch::Name(i.v.clone()),
            (None, Some(m)) => IfaceMatch::Mac(m.v),
            (None, None) => IfaceMatch::AnyEthernet,
        };
        // WireGuard address.
        let wg_address = n.wireguard_address.as_ref().map(|a| a.v);
        if wg_enabled {
            match &n.wireguard_address {
                None => d.missing(
                    n.span.clone(),
                    &format!("{key}.wireguard-address"),
                    format!("node `{name}` has no WireGuard address"),
                    "add `wireguard-address = \"10.0.0.11\"` inside the WireGuard network",
                ),
                Some(a) => {
                    if let Some(net) = wg_network {
                        check_in_network(d, a, &net.v);
                    }
                    dup_ip(d, a);
                }
            }
        }
        let endpoint = n.endpoint.as_ref().map(|a| a.v.clone()).or_else(|| {
            let port = p
                .wireguard
                .as_ref()
                .and_then(|w| w.listen_port.as_ref())
                .map_or(DEFAULT_WG_PORT, |a| a.v);
            lan_address.map(|ip| Endpoint {
                host: Host::Ip(ip),
                port,
            })
        });
        nodes.push(NodePlan {
            name,
            role,
            hostname,
            mac: n.mac.as_ref().map(|a| a.v),
            lan_address,
            wireguard_address: wg_address,
            endpoint,
            cluster_init: n.cluster_init.as_ref().is_some_and(|a| a.v),
            labels: n
                .labels
                .iter()
                .map(|(k, v)| (k.v.clone(), v.v.clone()))
                .collect(),
            taints: n.taints.iter().map(|a| a.v.clone()).collect(),
            cmdline: n.cmdline.iter().map(|a| a.v.clone()).collect(),
            network: NetworkPlan {
                matches,
                address: static_addr.map(|a| a.v),
                gateway: net.and_then(|w| w.gateway.as_ref()).map(|a| a.v),
            },
        });
    }

    // ---- servers and joining
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

    // ---- wireguard
    let wireguard = if wg_enabled {
        p.wireguard.as_ref().and_then(|w| {
            resolve_wireguard(w, &nodes, &p.nodes, d, &mut seen_ips_for_peers(&nodes))
        })
    } else {
        None
    };

    // ---- k3s
    let k = &p.k3s;
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
        && !types::is_valid_token(&t.v)
    {
        d.error(t.span.clone(), &t.key, "the k3s token is too short or contains whitespace", "remove `token` to let kiln generate one in the state directory, or use at least 16 printable characters");
    }
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
    let flannel_backend = k.flannel_backend.as_ref().map_or_else(
        || {
            if wg_enabled {
                "wireguard-native"
            } else {
                "vxlan"
            }
            .to_string()
        },
        |a| a.v.clone(),
    );

    // ---- firewall
    let f = &p.firewall;
    let wg_iface = wireguard.as_ref().map(|w| w.interface.clone());
    let mut allow_udp: Vec<u16> = f
        .allow_udp
        .as_ref()
        .map_or_else(Vec::new, |l| l.iter().map(|a| a.v).collect());
    let mut allow_tcp: Vec<u16> = f.allow_tcp.as_ref().map_or_else(
        || DEFAULT_ALLOW_TCP.to_vec(),
        |l| l.iter().map(|a| a.v).collect(),
    );
    if !wg_enabled {
        // Without kiln's tunnel, cluster traffic crosses the LAN: open what k3s needs.
        let mut tcp = vec![K3S_API_PORT, KUBELET_PORT];
        if nodes.iter().filter(|n| n.role == Role::Server).count() > 1 {
            tcp.extend(ETCD_PORTS);
        }
        let udp: Vec<u16> = match flannel_backend.as_str() {
            "wireguard-native" => FLANNEL_WG_PORTS.to_vec(),
            "vxlan" => vec![FLANNEL_VXLAN_PORT],
            _ => vec![],
        };
        for p in tcp {
            if !allow_tcp.contains(&p) {
                allow_tcp.push(p);
            }
        }
        for p in udp {
            if !allow_udp.contains(&p) {
                allow_udp.push(p);
            }
        }
    }
    if let Some(w) = &wireguard
        && !allow_udp.contains(&w.listen_port)
    {
        allow_udp.push(w.listen_port);
    }
    let firewall = FirewallPlan {
        allow_tcp,
        allow_udp,
        accept_interfaces: f.accept_interfaces.as_ref().map_or_else(
            || wg_iface.iter().cloned().collect(),
            |l| l.iter().map(|a| a.v.clone()).collect(),
        ),
        accept_cidrs: f.accept_cidrs.as_ref().map_or_else(
            || {
                let mut v = vec![cluster_cidr, service_cidr];
                v.extend(wireguard.as_ref().map(|w| w.network));
                v
            },
            |l| l.iter().map(|a| a.v).collect(),
        ),
        icmp: f.icmp.unwrap_or(true),
        rules: f
            .rules
            .iter()
            .map(|r| {
                if r.tcp.is_empty() && r.udp.is_empty() {
                    d.error(
                        r.span.clone(),
                        &r.key,
                        "a firewall rule with no ports",
                        "add `tcp = [..]` or `udp = [..]`, or remove the rule",
                    );
                }
                FirewallRulePlan {
                    interface: r.interface.as_ref().map(|a| a.v.clone()),
                    from: r.from.iter().map(|a| a.v).collect(),
                    tcp: r.tcp.iter().map(|a| a.v).collect(),
                    udp: r.udp.iter().map(|a| a.v).collect(),
                }
            })
            .collect(),
    };

    // ---- first boot
    let first_boot = resolve_first_boot(&p.first_boot, d);

    if missing {
        return None;
    }
    Some(Plan {
        profile_path: path.to_path_buf(),
        cluster: p.cluster_name?.v,
        k3s: K3sPlan {
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
        },
        boot: BootPlan {
            cmdline: p.boot.cmdline.iter().map(|a| a.v.clone()).collect(),
            consoles,
            menu_timeout,
        },
        base,
        compression_level,
        wireguard,
        firewall,
        first_boot,
        nodes,
    })
}

fn seen_ips_for_peers(nodes: &[NodePlan]) -> BTreeMap<IpAddr, String> {
    nodes
        .iter()
        .filter_map(|n| {
            n.wireguard_address
                .map(|a| (a, format!("node `{}`", n.name)))
        })
        .collect()
}

fn check_in_network(d: &mut Diagnostics, a: &At<IpAddr>, net: &IpNet) {
    if !net.contains(&a.v) {
        d.error(
            a.span.clone(),
            &a.key,
            format!("{} is outside the WireGuard network {net}", a.v),
            format!("pick an address inside {net}"),
        );
    } else if net.prefix_len() < 31
        && net.prefix_len() < net.max_prefix_len()
        && (a.v == net.network() || (net.addr().is_ipv4() && a.v == net.broadcast()))
    {
        let which = if a.v == net.network() {
            "network"
        } else {
            "broadcast"
        };
        d.error(
            a.span.clone(),
            &a.key,
            format!("{} is the {which} address of {net}", a.v),
            format!("pick a host address inside {net}"),
        );
    }
}

fn resolve_wireguard(
    w: &profile::WireGuard,
    nodes: &[NodePlan],
    raw_nodes: &[profile::Node],
    d: &mut Diagnostics,
    seen: &mut BTreeMap<IpAddr, String>,
) -> Option<WgPlan> {
    let network = w.network.as_ref()?.v;
    let topology = w.topology.as_ref().map_or(Topology::Mesh, |a| a.v);
    let mut peers = Vec::new();
    let mut names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    for p in &w.peers {
        let name = match &p.name {
            Some(a) => {
                if names.contains(&a.v) {
                    d.error(
                        a.span.clone(),
                        &a.key,
                        format!("peer name `{}` is already used by a node or peer", a.v),
                        "give the external peer its own name",
                    );
                }
                names.push(a.v.clone());
                a.v.clone()
            }
            None => {
                d.missing(
                    p.span.clone(),
                    &format!("{}.name", p.key),
                    "missing required key `name`",
                    "add `name = \"vps\"`",
                );
                String::new()
            }
        };
        if p.public_key.is_none() {
            d.missing(
                p.span.clone(),
                &format!("{}.public-key", p.key),
                "missing required key `public-key`",
                "paste the output of `wg pubkey` on that host",
            );
        }
        if let Some(a) = &p.address {
            check_in_network(d, a, &network);
            if let Some(first) = seen.get(&a.v) {
                d.error(
                    a.span.clone(),
                    &a.key,
                    format!("address {} is already used by {first}", a.v),
                    "give every node and peer its own address",
                );
            } else {
                seen.insert(a.v, format!("peer `{name}`"));
            }
        }
        let allowed_ips = match (&p.allowed_ips, &p.address) {
            (Some(l), _) => l.iter().map(|a| a.v).collect(),
            (None, Some(a)) => vec![IpNet::from(a.v)],
            (None, None) => {
                d.error(
                    p.span.clone(),
                    &format!("{}.allowed-ips", p.key),
                    format!("peer `{name}` has neither `address` nor `allowed-ips`"),
                    "add `address = \"10.0.0.1\"` (its tunnel address) or `allowed-ips`",
                );
                Vec::new()
            }
        };
        if let Some(pk) = &p.public_key {
            peers.push(ExternalPeerPlan {
                name,
                public_key: pk.v.clone(),
                endpoint: p.endpoint.as_ref().map(|a| a.v.clone()),
                address: p.address.as_ref().map(|a| a.v),
                allowed_ips,
                persistent_keepalive: p.persistent_keepalive.as_ref().map(|a| a.v),
            });
        }
    }
    let hub = match (topology, &w.hub) {
        // An unreadable topology or hub is reported already.
        _ if d.is_broken("wireguard.topology") || d.is_broken("wireguard.hub") => None,
        (Topology::Mesh, Some(h)) => {
            d.error(
                h.span.clone(),
                &h.key,
                "`hub` is set but the topology is mesh",
                "set `topology = \"hub\"`, or remove `hub`",
            );
            None
        }
        (Topology::Mesh, None) => None,
        (Topology::Hub, None) => {
            let span = w.topology.as_ref().map_or(0..0, |a| a.span.clone());
            d.error(
                span,
                "wireguard.hub",
                "topology is hub but no `hub` is named",
                "add `hub = \"vps\"`, naming an external peer or a node",
            );
            None
        }
        (Topology::Hub, Some(h)) => {
            if let Some(i) = peers.iter().position(|p| p.name == h.v) {
                let raw = w
                    .peers
                    .iter()
                    .find(|p| p.name.as_ref().is_some_and(|n| n.v == h.v));
                if peers[i].endpoint.is_none()
                    && !raw.is_some_and(|p| d.is_broken(&format!("{}.endpoint", p.key)))
                {
                    d.error(h.span.clone(), &h.key, format!("hub `{}` has no endpoint", h.v), format!("add `endpoint = \"host:port\"` to the peer `{}`: spokes must know where to reach it", h.v));
                }
                Some(HubRef::External(i))
            } else if let Some(i) = nodes.iter().position(|n| n.name == h.v) {
                let rk = &raw_nodes[i].key;
                if nodes[i].endpoint.is_none()
                    && !["endpoint", "lan-address", "network"]
                        .iter()
                        .any(|k| d.is_broken(&format!("{rk}.{k}")))
                {
                    d.error(
                        h.span.clone(),
                        &h.key,
                        format!("hub node `{}` has no endpoint", h.v),
                        format!("give node `{}` a `lan-address` or an `endpoint`", h.v),
                    );
                }
                Some(HubRef::Node(i))
            } else if w
                .peers
                .iter()
                .any(|p| p.name.is_none() || p.public_key.is_none())
                || raw_nodes.iter().any(|n| n.name.is_none())
            {
                // A peer or node with a broken name or key (already reported)
                // may be the hub: no second error for the same mistake.
                None
            } else {
                d.error(
                    h.span.clone(),
                    &h.key,
                    format!("hub `{}` is neither an external peer nor a node", h.v),
                    "name one of the `[[wireguard.peers]]` or a node",
                );
                None
            }
        }
    };
    let persistent_keepalive =
        w.persistent_keepalive
            .as_ref()
            .map(|a| a.v)
            .or(if topology == Topology::Hub {
                Some(DEFAULT_HUB_KEEPALIVE_S)
            } else {
                None
            });
    Some(WgPlan {
        interface: w
            .interface
            .as_ref()
            .map_or(DEFAULT_WG_INTERFACE.to_string(), |a| a.v.clone()),
        network,
        listen_port: w.listen_port.as_ref().map_or(DEFAULT_WG_PORT, |a| a.v),
        topology,
        hub,
        persistent_keepalive,
        peers,
    })
}

/// Allowed places for first-boot files: the root image is read-only.
const WRITABLE_PREFIXES: [&str; 2] = ["/etc/", "/var/"];
/// Paths kiln renders itself: a write-file there would silently fight
/// with kiln's own file. Entries ending in `/` or `-` are prefixes.
const RESERVED_PATHS: [&str; 15] = [
    "/etc/hostname",
    "/etc/hosts",
    "/etc/nftables.conf",
    "/etc/fstab",
    "/etc/machine-id",
    "/etc/kiln/",
    "/etc/rancher/",
    "/etc/wireguard/",
    "/etc/ssh/sshd_config.d/10-kiln.conf",
    "/etc/ssh/authorized_keys/",
    "/etc/systemd/network/20-kiln-lan.network",
    "/etc/systemd/system/k3s.service",
    "/etc/systemd/system/kiln-",
    "/etc/sysctl.d/90-kiln.conf",
    "/var/lib/kiln/",
];

fn resolve_first_boot(f: &profile::FirstBoot, d: &mut Diagnostics) -> FirstBootPlan {
    let mut users = Vec::new();
    let mut next_uid = FIRST_USER_UID;
    for u in &f.users {
        let Some(name) = &u.name else {
            d.missing(
                u.span.clone(),
                &format!("{}.name", u.key),
                "missing required key `name`",
                "add `name = \"club\"`",
            );
            continue;
        };
        if users.iter().any(|x: &UserPlan| x.name == name.v) {
            d.error(
                name.span.clone(),
                &name.key,
                format!("user `{}` is listed twice", name.v),
                "merge the two entries",
            );
        }
        let uid = match &u.uid {
            Some(a) if name.v == "root" && a.v != 0 => {
                d.error(a.span.clone(), &a.key, "root's uid is 0", "remove `uid`");
                0
            }
            Some(a) if name.v != "root" && !(1000..60000).contains(&a.v) => {
                d.error(
                    a.span.clone(),
                    &a.key,
                    format!("uid {} is outside the range for people (1000-59999)", a.v),
                    "remove `uid` to get the next free one from 1000",
                );
                0
            }
            Some(a) => a.v as u32,
            None if name.v == "root" => 0,
            None => {
                while users.iter().any(|x: &UserPlan| x.uid == next_uid)
                    || f.users
                        .iter()
                        .any(|o| o.uid.as_ref().is_some_and(|a| a.v == i64::from(next_uid)))
                {
                    next_uid += 1;
                }
                next_uid
            }
        };
        if users.iter().any(|x: &UserPlan| x.uid == uid) {
            d.error(
                u.span.clone(),
                &u.key,
                format!("uid {uid} is used by two users"),
                "give each user its own `uid`",
            );
        }
        for k in &u.ssh_authorized_keys {
            let mut parts = k.v.split_whitespace();
            let kind = parts.next().unwrap_or("");
            let body = parts.next().unwrap_or("");
            let kind_ok = kind.starts_with("ssh-")
                || kind.starts_with("ecdsa-sha2-")
                || kind.starts_with("sk-");
            if !kind_ok || body.len() < 16 || k.v.contains('\n') {
                d.error(
                    k.span.clone(),
                    &k.key,
                    "not an SSH public key",
                    "paste one line of a .pub file, like \"ssh-ed25519 AAAA... you@laptop\"",
                );
            }
        }
        let shell = u
            .shell
            .as_ref()
            .map_or("/bin/bash".to_string(), |a| a.v.clone());
        if !shell.starts_with('/') || shell.chars().any(|c| c.is_whitespace() || c.is_control()) {
            let a = u.shell.as_ref().unwrap();
            d.error(
                a.span.clone(),
                &a.key,
                format!(
                    "shell `{}` is not an absolute path without spaces",
                    shell.escape_debug()
                ),
                "write a path like \"/bin/bash\"",
            );
        }
        users.push(UserPlan {
            name: name.v.clone(),
            uid,
            groups: u.groups.iter().map(|a| a.v.clone()).collect(),
            shell,
            ssh_authorized_keys: u.ssh_authorized_keys.iter().map(|a| a.v.clone()).collect(),
        });
    }
    let mut write_files = Vec::new();
    let mut seen_paths: BTreeMap<&str, &At<String>> = BTreeMap::new();
    for w in &f.write_files {
        let Some(path) = &w.path else {
            d.missing(
                w.span.clone(),
                &format!("{}.path", w.key),
                "missing required key `path`",
                "add `path = \"/etc/...\"`",
            );
            continue;
        };
        if !WRITABLE_PREFIXES.iter().any(|p| path.v.starts_with(p))
            || path.v.split('/').any(|c| c == ".." || c == ".")
            || path.v.ends_with('/')
        {
            d.error(path.span.clone(), &path.key, format!("`{}` is not a file under /etc or /var", path.v), "the root image is read-only: write files under /etc/ or /var/, or put them in overlays/ to bake them into the image");
        }
        if let Some(r) = RESERVED_PATHS.iter().find(|r| {
            if r.ends_with(['/', '-']) {
                path.v.starts_with(*r)
            } else {
                path.v == **r
            }
        }) {
            d.error(path.span.clone(), &path.key, format!("`{}` is rendered by kiln ({r})", path.v), "set it through the profile's own keys (hostname, users, wireguard, firewall, k3s), or use another path");
        }
        if let Some(first) = seen_paths.get(path.v.as_str()) {
            let first_line = d.line_of(first.span.start);
            d.error(
                path.span.clone(),
                &path.key,
                format!(
                    "`{}` is already written by {} (line {first_line})",
                    path.v, first.key
                ),
                format!(
                    "keep one entry for `{}`: merge this one into line {first_line}, or remove it",
                    path.v
                ),
            );
        } else {
            seen_paths.insert(&path.v, path);
        }
        let mode = match &w.permissions {
            Some(a) => match u32::from_str_radix(a.v.trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o7777 && !a.v.is_empty() => m,
                _ => {
                    d.error(
                        a.span.clone(),
                        &a.key,
                        format!("`{}` is not an octal file mode", a.v),
                        "write the mode as an octal string, like \"0644\"",
                    );
                    0o644
                }
            },
            None => 0o644,
        };
        let (uid, gid) = match &w.owner {
            Some(a) => match resolve_owner(&a.v, &users) {
                Some(o) => o,
                None => {
                    d.error(a.span.clone(), &a.key, format!("owner `{}` cannot be resolved", a.v), "write user:group as root, a user from [[first-boot.users]], or numeric ids like \"0:0\"");
                    (0, 0)
                }
            },
            None => (0, 0),
        };
        write_files.push(WriteFilePlan {
            path: path.v.clone(),
            content: w.content.as_ref().map_or(String::new(), |a| a.v.clone()),
            mode,
            uid,
            gid,
        });
    }
    FirstBootPlan {
        users,
        write_files,
        sysctl: f
            .sysctl
            .iter()
            .map(|(k, v)| (k.v.clone(), v.v.clone()))
            .collect(),
        modules: f.modules.iter().map(|a| a.v.clone()).collect(),
        run_once: f.run_once.iter().map(|a| a.v.clone()).collect(),
        boot_cmd: f.boot_cmd.iter().map(|a| a.v.clone()).collect(),
        dns_nameservers: f.dns_nameservers.iter().map(|a| a.v).collect(),
        ntp_servers: f.ntp_servers.iter().map(|a| a.v.clone()).collect(),
    }
}

fn resolve_owner(s: &str, users: &[UserPlan]) -> Option<(u32, u32)> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    let id = |x: &str| -> Option<u32> {
        if x == "root" {
            return Some(0);
        }
        if let Ok(n) = x.parse::<u32>() {
            return Some(n);
        }
        users.iter().find(|p| p.name == x).map(|p| p.uid)
    };
    Some((id(u)?, id(g)?))
}
