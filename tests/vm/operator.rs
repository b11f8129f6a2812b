//! The operator's laptop, as a network namespace this test creates: it
//! brings up the `wg-quick` file `kiln operator` writes and reaches the
//! cluster through the hub node, over WireGuard only.
//!
//! The namespace is joined to the host by a veth pair; QEMU forwards a
//! UDP port on the host's end of it to the hub's WireGuard port, so the
//! laptop's packets reach the hub as they would from another network
//! (the file's `Endpoint` is the one line the test changes: the hub's
//! LAN address is not reachable from the host). Where the kernel has no
//! WireGuard module (the CI containers), wg-quick runs wireguard-go.
//!
//! QEMU hands the laptop's packets to the hub with the laptop's own source
//! address (10.201.x.y); the hub's default route leads to the profile's
//! LAN gateway, which the virtual LAN does not have, so the test routes
//! the laptop's network back through QEMU's user-net gateway, as a real
//! hub answers through its router.
//!
//! Names carry the test process's pid (`kiln-op-<pid>`), so leftovers of
//! a killed run are recognised and removed by the next one.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln::verify::checks::{Check, Report};
use kiln::verify::vm::Vm;

const NS_PREFIX: &str = "kiln-op-";
/// The laptops' veth networks (one /30 per test process).
const LAPTOP_NETS: &str = "10.201.0.0/16";
/// QEMU user networking's gateway, on the management NIC.
const USER_NET_GATEWAY: &str = "10.0.2.2";

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn must(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

/// A network namespace with a veth to the host and, once `up`, the
/// operator's WireGuard interface.
pub struct Laptop {
    ns: String,
    host_if: String,
    iface: String,
    /// The host's end of the veth: QEMU's forwarded port binds here.
    pub host_addr: Ipv4Addr,
    pub dir: tempfile::TempDir,
    conf: Option<PathBuf>,
}

/// Remove the namespaces, links and daemons of runs that are gone.
fn sweep() {
    let list = String::from_utf8_lossy(&run(&mut ip(&["netns", "list"])).stdout).to_string();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("operator test: removing {name}, left by a run that is gone");
        teardown(name, &format!("kop{pid}h"), &format!("kop{pid}"));
    }
}

/// Stop whatever runs in `ns` (wireguard-go), delete it and its link.
fn teardown(ns: &str, host_if: &str, iface: &str) {
    let pids = String::from_utf8_lossy(&run(&mut ip(&["netns", "pids", ns])).stdout).to_string();
    for sig in ["-TERM", "-KILL"] {
        for p in pids.split_whitespace() {
            let _ = Command::new("kill").args([sig, p]).output();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = run(&mut ip(&["netns", "del", ns]));
    let _ = run(&mut ip(&["link", "del", host_if]));
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
}

impl Laptop {
    pub fn new() -> Laptop {
        sweep();
        let pid = std::process::id();
        let ns = format!("{NS_PREFIX}{pid}");
        let host_if = format!("kop{pid}h");
        let iface = format!("kop{pid}");
        // A /30 of 10.201.0.0/16 of this pid's own.
        let base = (pid % 16384) * 4;
        let host_addr = Ipv4Addr::new(10, 201, (base >> 8) as u8, (base & 0xff) as u8 + 1);
        let ns_addr = Ipv4Addr::new(10, 201, (base >> 8) as u8, (base & 0xff) as u8 + 2);
        let dir = tempfile::tempdir().unwrap();
        let laptop = Laptop {
            ns: ns.clone(),
            host_if: host_if.clone(),
            iface,
            host_addr,
            dir,
            conf: None,
        };
        let ns_if = format!("kop{pid}n");
        must(&mut ip(&["netns", "add", &ns]));
        must(&mut ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]));
        must(&mut ip(&["link", "set", &ns_if, "netns", &ns]));
        must(&mut ip(&[
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &host_if,
        ]));
        must(&mut ip(&["link", "set", &host_if, "up"]));
        must(&mut ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ns_addr}/30"),
            "dev",
            &ns_if,
        ]));
        must(&mut ip(&["-n", &ns, "link", "set", &ns_if, "up"]));
        must(&mut ip(&["-n", &ns, "link", "set", "lo", "up"]));
        laptop
    }

    /// A free UDP port on the host's end of the veth.
    pub fn free_port(&self) -> SocketAddr {
        let s = std::net::UdpSocket::bind((self.host_addr, 0)).unwrap();
        s.local_addr().unwrap()
    }

    /// `wg-quick up` the operator's file, its endpoint replaced by `via`.
    pub fn up(&mut self, conf: &str, via: SocketAddr) -> Result<(), String> {
        let mut changed = 0;
        let text: String = conf
            .lines()
            .map(|l| {
                if l.starts_with("Endpoint = ") {
                    changed += 1;
                    format!("Endpoint = {via}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        if changed != 1 {
            return Err(format!(
                "the operator's file has {changed} Endpoint lines, not 1:\n{conf}"
            ));
        }
        let path = self.dir.path().join(format!("{}.conf", self.iface));
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.ns, "wg-quick", "up"])
            .arg(&path)
            .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go"));
        self.conf = Some(path);
        if !out.status.success() {
            return Err(format!(
                "wg-quick up failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Run a shell command in the namespace; its stdout, trimmed.
    pub fn sh(&self, script: &str) -> String {
        let out = run(Command::new("ip").args(["netns", "exec", &self.ns, "bash", "-c", script]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Connect to `host:port` from the laptop, retrying for `within`:
    /// `connects`, or how it failed the last time.
    pub fn connect(&self, host: &str, port: u16, within: Duration) -> String {
        let start = Instant::now();
        loop {
            let r = self.sh(&format!(
                "timeout 5 bash -c '</dev/tcp/{host}/{port}' 2>&1 && echo connects"
            ));
            let last = r.lines().last().unwrap_or("").to_string();
            if last == "connects" || start.elapsed() >= within {
                return simplify(&last);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// bash's message for a refused connection, without the script's name.
fn simplify(line: &str) -> String {
    if line.contains("No route to host") {
        "refused (no route to host: the firewall's reject)".into()
    } else if line.contains("Connection refused") {
        "refused (connection refused)".into()
    } else if line.is_empty() {
        "timed out".into()
    } else {
        line.to_string()
    }
}

impl Drop for Laptop {
    fn drop(&mut self) {
        if let Some(conf) = &self.conf {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.ns, "wg-quick", "down"])
                .arg(conf)
                .output();
        }
        teardown(&self.ns, &self.host_if, &self.iface);
    }
}

/// The laptop comes up and reaches SSH and the API of the nodes through
/// the hub (server `s`), and nothing else; a node reaches what the
/// laptop may not.
pub fn check_operator(
    laptop: &mut Laptop,
    (conf, via): (&str, SocketAddr),
    (s, a): (&Vm, &Vm),
    (s_wg, a_wg): (&str, &str),
    key: &Path,
    r: &mut Report,
) {
    let back = s
        .sh(
            key,
            &format!("ip route replace {LAPTOP_NETS} via {USER_NET_GATEWAY}"),
        )
        .map_or_else(|e| e.to_string(), |_| "routed".into());
    r.checks.push(Check::eq(
        "hub routes the laptop's network via its uplink (test setup)",
        "routed",
        &back,
    ));
    let up = laptop.up(conf, via).map_or_else(|e| e, |()| "up".into());
    r.checks.push(Check::eq(
        "operator's wg-quick file comes up (network namespace)",
        "up",
        &up,
    ));
    for vm in [s, a] {
        let _ = vm.sh(key, &format!("systemd-run --unit=kiln-probe-{PROBE} --collect systemd-socket-activate -l {PROBE} -a --inetd /bin/echo kiln-probe >/dev/null"));
    }
    // The first connection waits for the handshake through the forward.
    let cases = [
        (s_wg, 22, "s1's SSH", Duration::from_secs(60)),
        (s_wg, 6443, "s1's API", Duration::from_secs(10)),
        (
            a_wg,
            22,
            "a1's SSH, through the hub",
            Duration::from_secs(10),
        ),
    ];
    for (host, port, what, within) in cases {
        let seen = laptop.connect(host, port, within);
        if seen != "connects" {
            diagnose(laptop, s, key);
        }
        r.checks.push(Check::eq(
            &format!("operator reaches {what} ({host}:{port})"),
            "connects",
            &seen,
        ));
    }
    let refused = "refused (no route to host: the firewall's reject)";
    for (host, what) in [(s_wg, "s1"), (a_wg, "a1 (through the hub)")] {
        r.checks.push(Check::eq(
            &format!("operator cannot reach port {PROBE} of {what}"),
            refused,
            &laptop.connect(host, PROBE, Duration::ZERO),
        ));
    }
    let node = a
        .sh(
            key,
            &format!("timeout 5 bash -c '</dev/tcp/{s_wg}/{PROBE}' 2>&1 && echo connects || true"),
        )
        .unwrap_or_else(|e| e.to_string());
    r.checks.push(Check::eq(
        &format!("a1 reaches s1:{PROBE} over the tunnel (the port is open to nodes)"),
        "connects",
        node.lines().last().unwrap_or(""),
    ));
}

/// A port that listens on every node but only nodes may reach.
const PROBE: u16 = kiln::verify::checks::PROBE_PORT;

/// The admin kubeconfig `kiln kubeconfig` writes, used from the laptop
/// over the tunnel: the server's certificate verifies against its CA
/// data at its server address, the client certificate is accepted, and
/// without it the API refuses. With a real k3s (`k3s_binary`), `kubectl
/// get nodes` lists `nodes`.
pub fn check_kubeconfig(
    laptop: &Laptop,
    kubeconfig: &str,
    real_k3s: Option<&Path>,
    (version, nodes): (&str, &[&str]),
    pinned_hash: &str,
    r: &mut Report,
) {
    use base64::Engine as _;
    let doc: serde_yaml::Value = serde_yaml::from_str(kubeconfig).unwrap();
    let field = |path: &[&str]| -> String {
        let mut v = &doc;
        for p in path {
            v = match p.parse::<usize>() {
                Ok(i) => &v[i],
                Err(_) => &v[*p],
            };
        }
        v.as_str().unwrap_or_default().to_string()
    };
    let dir = laptop.dir.path();
    for (file, path) in [
        (
            "ca.crt",
            ["clusters", "0", "cluster", "certificate-authority-data"],
        ),
        (
            "admin.crt",
            ["users", "0", "user", "client-certificate-data"],
        ),
        ("admin.key", ["users", "0", "user", "client-key-data"]),
    ] {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(field(&path))
            .unwrap();
        std::fs::write(dir.join(file), bytes).unwrap();
    }
    std::fs::write(dir.join("kubeconfig"), kubeconfig).unwrap();
    let server = field(&["clusters", "0", "cluster", "server"]);
    let d = dir.display();
    let with_cert = laptop.sh(&format!(
        "curl -sS --max-time 10 --cacert {d}/ca.crt --cert {d}/admin.crt --key {d}/admin.key {server}/version 2>&1 | tr -d ' \\n'"
    ));
    r.checks.push(Check::new(
        &format!("operator's kubeconfig: TLS to {server} verified both ways, /version answered"),
        format!("\"gitVersion\":\"{version}\""),
        with_cert.clone(),
        with_cert.contains(&format!("\"gitVersion\":\"{version}\"")),
    ));
    let served = laptop.sh(&format!(
        "curl -s --max-time 10 --cacert {d}/ca.crt {server}/cacerts | sha256sum | cut -c1-64"
    ));
    r.checks.push(Check::eq(
        "the CA the API serves (/cacerts) is the one the token pins (sha256)",
        pinned_hash,
        &served,
    ));
    let without = laptop.sh(&format!(
        "curl -s --max-time 10 --cacert {d}/ca.crt -o /dev/null -w '%{{http_code}}' {server}/api 2>&1"
    ));
    r.checks.push(Check::eq(
        "without the client certificate the API refuses (HTTP status)",
        "401",
        &without,
    ));
    if let Some(k3s) = real_k3s {
        let seen = laptop.sh(&format!(
            "{} kubectl --kubeconfig {d}/kubeconfig get nodes -o name 2>&1 | sed 's,^node/,,' | sort | xargs",
            k3s.display()
        ));
        let mut want = nodes.to_vec();
        want.sort();
        r.checks.push(Check::eq(
            "kubectl --kubeconfig … get nodes, from the laptop",
            &want.join(" "),
            &seen,
        ));
    }
}

/// What both ends of the laptop's tunnel say, on stderr.
fn diagnose(laptop: &Laptop, hub: &Vm, key: &Path) {
    eprintln!(
        "laptop:\n{}\nhub:\n{}",
        // `wg show` hides private keys (`dump` would print them).
        laptop.sh("wg show all 2>&1; ip -br addr; ip route"),
        hub.sh(
            key,
            "wg show all; ip -br addr; ip route; nft list ruleset 2>&1 | head -60"
        )
        .unwrap_or_else(|e| e.to_string())
    );
}
