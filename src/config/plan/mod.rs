//! The resolved plan: a profile with its defaults applied and every
//! cross-field rule checked. Nothing after this point parses strings or
//! reports profile errors; nothing in here does I/O except [`load`] and
//! [`plan_profile`] reading the manifest files the profile names (and
//! [`airgap`], which stats the image tarballs the profile names).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;

use crate::config::diag::{Diagnostic, Diagnostics, ProfileErrors, escape_controls};
use crate::config::profile::{
    self, AfterInstall, HubTransport, KernelFlavour, RegistryConfig, Role, Storage, Topology,
};
use crate::config::types::{
    DevicePath, Endpoint, Host, K3sToken, K3sVersion, MacAddr, MaxAge, WgKey,
};

mod airgap;
mod base;
mod boot;
mod firewall;
pub mod first_boot;
mod k3s;
mod manifests;
mod nodes;
mod operators;
mod peers;
mod proxy;
mod servers;
mod storage;
mod transport;
mod wireguard;

pub use airgap::{
    AirgapPlan, ImageTarballPlan, K3S_IMAGES_DIR, RELEASE_TARBALL_STEM, SLOT_IMAGES_DIR,
};
pub use manifests::{HelmChartPlan, MAX_MANIFEST_BYTES, ManifestPlan, ManifestSource};
pub use peers::{Link, LinkKind, PeerRef, exclude, host_net, node_links, site_endpoint};
pub use proxy::{NO_PROXY_ALWAYS, ProxyPlan};

// Defaults, in one place. Each is documented in docs/profile.md.
pub const DEFAULT_SUITE: &str = "bookworm";
/// How old a cached Debian base may get before a build makes it again
/// (`base.max-age`). Debian publishes security updates for stable within
/// days and a point release about every two months; a base made once and
/// kept forever never gets any of them. 30 days keeps a node at most a
/// month behind the archive while costing one mmdebstrap run (one to two
/// minutes) a month; a cluster that must track security fixes faster sets
/// a shorter age or builds with `--refresh-base`.
pub const DEFAULT_BASE_MAX_AGE: MaxAge = MaxAge::days(30);
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
/// The TCP port of the hub's `kiln-relay`: 443 passes firewalls that let
/// out only HTTPS.
pub const DEFAULT_HUB_TCP_PORT: u16 = 443;
/// The loopback UDP port of a node's `kiln-relay` client: the hub's
/// WireGuard endpoint while the node reaches it over TCP.
pub const RELAY_LOCAL_PORT: u16 = 51839;
/// The tunnel MTU of a node that reaches its hub over TCP: a WireGuard
/// packet (MTU + 32 bytes) and its 2-byte frame fit one TCP segment of a
/// 1500-byte path (1448 bytes of payload with timestamps), so no packet
/// waits for the next segment. WireGuard's own default is 1420.
pub const TCP_TRANSPORT_MTU: u16 = 1380;
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
pub const DEFAULT_ALLOW_TCP: [u16; 1] = [22];
/// Nodes stay awake (lid ignored, sleep masked) unless a node allows suspend:
/// a sleeping laptop drops out of the cluster.
pub const DEFAULT_ALLOW_SUSPEND: bool = false;
/// Power off after an unattended install, so the stick can be pulled
/// before the machine next boots (a reboot would boot the stick again on
/// firmware that prefers USB).
pub const DEFAULT_AFTER_INSTALL: AfterInstall = AfterInstall::Poweroff;
pub const FIRST_USER_UID: u32 = 1000;
/// The k3s supervisor and API server port.
pub const K3S_API_PORT: u16 = 6443;
/// sshd's port on the nodes.
pub const SSH_PORT: u16 = 22;
/// What an operator may reach on a node over the tunnel: SSH and the
/// Kubernetes API, nothing else.
pub const OPERATOR_TCP_PORTS: [u16; 2] = [SSH_PORT, K3S_API_PORT];
/// Keepalive of an operator's peers: a laptop is behind NAT, and the
/// nodes cannot dial it.
pub const OPERATOR_KEEPALIVE_S: u16 = 25;
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
    /// The image tarballs k3s imports at start, in every root image.
    pub airgap: AirgapPlan,
    pub boot: BootPlan,
    pub base: BasePlan,
    /// zstd level of the root squashfs.
    pub compression_level: i32,
    pub wireguard: Option<WgPlan>,
    pub firewall: FirewallPlan,
    pub first_boot: FirstBootPlan,
    pub nodes: Vec<NodePlan>,
    /// Machines outside the cluster that reach it through the tunnel.
    pub operators: Vec<OperatorPlan>,
    /// `[[k3s.manifests]]` and `[[k3s.helm-charts]]`: what k3s deploys
    /// from `server/manifests`, and on which servers.
    pub manifests: Vec<ManifestPlan>,
    /// `[k3s.proxy]`: the proxy k3s and containerd use.
    pub proxy: Option<ProxyPlan>,
}

#[derive(Debug, Clone)]
pub struct K3sPlan {
    pub version: K3sVersion,
    /// A token written in the profile; `None` means generated in the state dir.
    pub token: Option<K3sToken>,
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
        /// A cached base older than this is made again by the next build.
        max_age: MaxAge,
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
    /// In a hub topology, the nodes that share a LAN and peer directly.
    pub sites: Vec<SitePlan>,
    /// How each node (by index into `Plan::nodes`) reaches the hub: UDP
    /// for the hub itself and in a mesh.
    pub hub_transport: Vec<HubTransport>,
    /// The TCP port of the hub's `kiln-relay` server.
    pub hub_tcp_port: u16,
}

impl WgPlan {
    /// Whether any node reaches the hub over TCP (always or as fallback).
    pub fn uses_relay(&self) -> bool {
        self.hub_transport.iter().any(|t| *t != HubTransport::Udp)
    }
}

/// Nodes on one LAN (`site = "campus"`): they peer with each other over
/// their LAN endpoints, and with the hub for everything else. The place
/// for per-site settings, such as how the site reaches its hub.
#[derive(Debug, Clone, PartialEq)]
pub struct SitePlan {
    pub name: String,
    /// Indices into `Plan::nodes`, in profile order.
    pub nodes: Vec<usize>,
    /// `[wireguard.sites.<name>] hub-transport`, if set.
    pub hub_transport: Option<HubTransport>,
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

/// An `[[operators]]` entry: a laptop with a tunnel address of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorPlan {
    pub name: String,
    pub wireguard_address: IpAddr,
}

#[derive(Debug, Clone)]
pub struct FirewallPlan {
    pub allow_tcp: Vec<u16>,
    pub allow_udp: Vec<u16>,
    pub accept_interfaces: Vec<String>,
    pub accept_cidrs: Vec<IpNet>,
    pub icmp: bool,
    pub rules: Vec<FirewallRulePlan>,
    /// Limits on operators, checked before any accept above.
    pub operators: Option<OperatorAccess>,
}

/// What operators may reach: `tcp` on the nodes, arriving on the tunnel
/// `interface`; everything else from their addresses is refused, on the
/// node itself and forwarded through it.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorAccess {
    pub interface: String,
    pub sources: Vec<IpAddr>,
    pub tcp: Vec<u16>,
    /// The nodes' tunnel addresses: where forwarded operator traffic may go.
    pub nodes: Vec<IpAddr>,
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
    /// The site it shares a LAN with (only in a hub topology).
    pub site: Option<String>,
    pub cluster_init: bool,
    pub labels: Vec<(String, String)>,
    pub taints: Vec<String>,
    /// Kernel command line items for this node only.
    pub cmdline: Vec<String>,
    pub network: NetworkPlan,
    /// May the machine sleep (lid, suspend, hibernate)? Off by default.
    pub allow_suspend: bool,
    /// Install onto an internal disk when booted from a kiln stick.
    pub install: Option<InstallPlan>,
    /// Storage systems the node is made ready for (`storage`: its own
    /// list, else `cluster.storage`).
    pub storage: Vec<Storage>,
}

/// An unattended install, read on the node by `kiln-install`.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallPlan {
    pub device: DevicePath,
    pub after: AfterInstall,
    /// The profile key it came from (`nodes[0].install-device`), for the
    /// comment in the rendered file.
    pub key: String,
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

    /// A node's index into `nodes`, which per-node lists of the plan
    /// (`WgPlan::hub_transport`, `HubRef::Node`) use.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
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

    /// Where a client outside the cluster reaches the Kubernetes API
    /// (what `kiln kubeconfig` points at): the registration address, else
    /// the server that starts the cluster, by its WireGuard address when
    /// WireGuard is on, else by its LAN address.
    pub fn api_host(&self) -> Option<Host> {
        if let Some(h) = &self.k3s.registration_address {
            return Some(h.clone());
        }
        let first = self.servers().find(|s| self.join_url(s).is_none())?;
        let tunnel = self.wireguard.as_ref().and(first.wireguard_address);
        tunnel.or(first.lan_address).map(Host::Ip)
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
    let files = manifests::read_files(path, &p.k3s);
    let plan = resolve(path, p, &files, &mut d);
    if d.is_empty() {
        Ok(plan.expect("a plan without diagnostics"))
    } else {
        Err(ProfileErrors(d.into_sorted()))
    }
}

/// Apply defaults and check cross-field rules. Returns `None` only when a
/// required value is missing (and then a diagnostic says so). Each step
/// reports its own diagnostics, in this order.
fn resolve(
    path: &Path,
    p: profile::Profile,
    files: &manifests::ManifestFiles,
    d: &mut Diagnostics,
) -> Option<Plan> {
    let mut missing = require_top_level(&p, d);
    let cidrs = k3s::cidrs(&p.k3s);
    let boot = boot::resolve_boot(&p, d);
    let base = base::resolve_base(path, &p, d);
    let compression_level = base::resolve_compression_level(&p, d);
    let wg_enabled = p
        .wireguard
        .as_ref()
        .is_some_and(|w| w.enabled != Some(false));
    wireguard::check_network(&p, wg_enabled, cidrs, d);
    let nodes = nodes::resolve_nodes(&p, wg_enabled, d, &mut missing);
    servers::check_servers(&p, &nodes, wg_enabled, d);
    let mut seen_ips = wireguard::seen_ips_for_peers(&nodes);
    let wireguard = if wg_enabled {
        p.wireguard
            .as_ref()
            .and_then(|w| wireguard::resolve_wireguard(w, &nodes, &p.nodes, d, &mut seen_ips))
    } else {
        wireguard::refuse_sites(&p.nodes, "WireGuard is off", d);
        None
    };
    let operators =
        operators::resolve_operators(&p, wg_enabled, wireguard.as_ref(), &nodes, d, &mut seen_ips);
    let flannel_backend = k3s::resolve_flannel(&p, wg_enabled, d);
    let firewall = firewall::resolve_firewall(
        &p.firewall,
        &nodes,
        wireguard.as_ref(),
        &flannel_backend,
        wg_enabled,
        cidrs,
        d,
    );
    let firewall = FirewallPlan {
        operators: firewall::operator_access(wireguard.as_ref(), &nodes, &operators),
        ..firewall
    };
    let first_boot = first_boot::resolve_first_boot(&p.first_boot, d);
    let manifests = manifests::resolve_manifests(path, &p.k3s, files, &nodes, d);
    let proxy = proxy::resolve_proxy(&p, &nodes, wireguard.as_ref(), cidrs, d);
    let airgap = airgap::resolve_airgap(path, &p, d);

    if missing {
        return None;
    }
    Some(Plan {
        profile_path: path.to_path_buf(),
        cluster: p.cluster_name?.v,
        k3s: k3s::k3s_plan(&p.k3s, flannel_backend, cidrs)?,
        airgap,
        boot,
        base,
        compression_level,
        wireguard,
        firewall,
        first_boot,
        nodes,
        operators,
        manifests,
        proxy,
    })
}

/// The keys without which there is no plan: the cluster's name, the k3s
/// version and at least one node. Returns whether one is missing.
fn require_top_level(p: &profile::Profile, d: &mut Diagnostics) -> bool {
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
    missing
}
