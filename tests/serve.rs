//! `kiln serve` over real HTTP on the loopback, against a netboot tree laid
//! out as `kiln build --format pxe` writes it (small stand-in files: the
//! VM tests serve a real build). Requests are written by hand so the
//! `Host` and `Range` headers are exactly what iPXE and wget send.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln::plan::Plan;
use kiln::serve::{ServeOptions, Server};

const PROFILE: &str = "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n\
[[nodes]]\nname = \"n1\"\nrole = \"server\"\nmac = \"52:54:00:aa:00:01\"\nlan-address = \"192.168.1.11\"\n\
[[nodes]]\nname = \"n2\"\nrole = \"agent\"\nmac = \"52:54:00:aa:00:02\"\n\
[[nodes]]\nname = \"n3\"\nrole = \"agent\"\n";

/// A tree as the build writes it: scripts from kiln's own renderers.
fn tree(dir: &Path) -> (Plan, PathBuf) {
    let profile = dir.join("lab.toml");
    std::fs::write(&profile, PROFILE).unwrap();
    let plan = kiln::plan::plan_profile(&profile, PROFILE).unwrap();
    let out = dir.join("out");
    let pxe = out.join("pxe");
    for d in ["mac", "seed"] {
        std::fs::create_dir_all(pxe.join(d)).unwrap();
    }
    std::fs::write(pxe.join("boot.ipxe"), kiln::pxe::boot_script(&plan)).unwrap();
    let root: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(pxe.join("root-server.sqfs"), &root).unwrap();
    std::fs::write(pxe.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(pxe.join("initrd.img"), b"initrd").unwrap();
    for n in plan.nodes.iter().filter(|n| n.mac.is_some()) {
        std::fs::write(
            pxe.join(kiln::pxe::mac_script_path(n.mac.as_ref().unwrap())),
            kiln::pxe::node_script(&plan, n, "root-server.sqfs", &"0".repeat(64)),
        )
        .unwrap();
        std::fs::write(
            pxe.join(kiln::pxe::seed_path(&n.name)),
            format!("seed of {}", n.name),
        )
        .unwrap();
    }
    std::fs::write(out.join("manifest.json"), r#"{"cluster": "lab"}"#).unwrap();
    (plan, out)
}

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start() -> Running {
        let dir = tempfile::tempdir().unwrap();
        let (plan, out) = tree(dir.path());
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = log.clone();
        let server = Server::bind(
            &plan,
            &ServeOptions {
                out,
                listen: "127.0.0.1:0".parse().unwrap(),
                url: None,
                tftp: None,
                update_keys: Default::default(),
            },
        )
        .unwrap()
        .with_log(move |l| sink.lock().unwrap().push(l.to_string()));
        let addr = server.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || server.run(&flag));
        Running {
            addr,
            stop,
            thread: Some(thread),
            log,
            _dir: dir,
        }
    }

    /// Send a request; (status, headers, body).
    fn req(&self, method: &str, path: &str, extra: &[&str]) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        let mut r =
            format!("{method} {path} HTTP/1.1\r\nHost: 10.9.8.7:8080\r\nConnection: close\r\n");
        for h in extra {
            r.push_str(&format!("{h}\r\n"));
        }
        r.push_str("\r\n");
        s.write_all(r.as_bytes()).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&buf[..split]).to_string();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head, buf[split + 4..].to_vec())
    }

    fn get(&self, path: &str) -> (u16, String, String) {
        let (s, h, b) = self.req("GET", path, &[]);
        (s, h, String::from_utf8_lossy(&b).to_string())
    }

    /// The seed URL (with its token) in a node's rendered per-MAC script.
    fn seed_url(&self, mac: &str) -> String {
        let (s, _, script) = self.get(&format!("/mac/{mac}.ipxe"));
        assert_eq!(s, 200, "{script}");
        let url = script
            .split_whitespace()
            .find(|w| w.contains("/seed/"))
            .unwrap()
            .to_string();
        url.strip_prefix("http://10.9.8.7:8080")
            .unwrap()
            .to_string()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
    }
}

#[test]
fn scripts_are_rendered_with_the_address_the_request_came_to() {
    let r = Running::start();
    let (s, _, boot) = r.get("/boot.ipxe");
    assert_eq!(s, 200);
    assert!(
        boot.contains("chain --autofree http://10.9.8.7:8080/mac/${netX/mac:hexhyp}.ipxe"),
        "{boot}"
    );
    let (s, _, script) = r.get("/mac/52-54-00-aa-00-01.ipxe");
    assert_eq!(s, 200);
    assert!(!script.contains("${kiln-server}"), "{script}");
    assert!(
        script.contains("kernel http://10.9.8.7:8080/vmlinuz ")
            && script.contains(" kiln.root=http://10.9.8.7:8080/root-server.sqfs ")
            && script.contains(" kiln.netif=52:54:00:aa:00:01 "),
        "{script}"
    );
}

#[test]
fn unknown_macs_and_other_paths_are_404_and_nothing_is_listed() {
    let r = Running::start();
    for p in [
        "/mac/52-54-00-aa-00-99.ipxe",
        "/",
        "/mac/",
        "/seed/",
        "/manifest.json",
        "/pxe/boot.ipxe",
        "/seed/../boot.ipxe",
        "/%2e%2e/manifest.json",
    ] {
        let (s, _, body) = r.get(p);
        assert_eq!(s, 404, "{p}: {body}");
    }
    let (s, _, _) = r.req("POST", "/boot.ipxe", &["Content-Length: 0"]);
    assert_eq!(s, 405);
}

#[test]
fn a_seed_needs_the_token_of_its_own_per_mac_script() {
    let r = Running::start();
    // No token, a made-up token: refused.
    assert_eq!(r.get("/seed/n1.img").0, 403);
    assert_eq!(
        r.get(&format!("/seed/n1.img?token={}", "0".repeat(32))).0,
        403
    );
    // The token from n1's script opens n1's seed, and only n1's.
    let url = r.seed_url("52-54-00-aa-00-01");
    assert!(url.starts_with("/seed/n1.img?token="), "{url}");
    let (s, _, body) = r.get(&url);
    assert_eq!((s, body.as_str()), (200, "seed of n1"));
    let token = url.split("token=").nth(1).unwrap();
    assert_eq!(r.get(&format!("/seed/n2.img?token={token}")).0, 403);
    // A node without a MAC cannot netboot: no script, no seed.
    assert_eq!(r.get("/seed/n3.img").0, 403);
    // The token is never logged.
    let log = r.log.lock().unwrap().clone();
    assert!(!log.iter().any(|l| l.contains(token)), "{log:?}");
}

#[test]
fn range_requests() {
    let r = Running::start();
    let full: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (s, h, b) = r.req("GET", "/root-server.sqfs", &[]);
    assert_eq!(s, 200);
    assert!(h.contains("Accept-Ranges: bytes"), "{h}");
    assert!(b == full, "{} bytes, not the file", b.len());
    let (s, h, b) = r.req("GET", "/root-server.sqfs", &["Range: bytes=1000-1999"]);
    assert_eq!(s, 206, "{h}");
    assert!(h.contains("Content-Range: bytes 1000-1999/100000"), "{h}");
    assert!(b == full[1000..2000], "{} bytes, not the range", b.len());
    let (s, _, b) = r.req("GET", "/root-server.sqfs", &["Range: bytes=-10"]);
    assert!(s == 206 && b == full[99_990..], "{s}, {} bytes", b.len());
    let (s, h, _) = r.req("GET", "/root-server.sqfs", &["Range: bytes=200000-"]);
    assert_eq!(s, 416);
    assert!(h.contains("Content-Range: bytes */100000"), "{h}");
    let (s, h, b) = r.req("HEAD", "/root-server.sqfs", &[]);
    assert_eq!(s, 200);
    assert!(h.contains("Content-Length: 100000"), "{h}");
    assert!(b.is_empty());
}

#[test]
fn one_log_line_per_request_with_client_path_status_bytes() {
    let r = Running::start();
    // A line is written once the response is sent, maybe after the client
    // has read it: wait for each before the next request.
    let logged = |n: usize| {
        let start = std::time::Instant::now();
        while r.log.lock().unwrap().len() < n && start.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    r.get("/vmlinuz");
    logged(1);
    r.get("/nope");
    logged(2);
    r.req("GET", "/root-server.sqfs", &["Range: bytes=0-99"]);
    logged(3);
    let log = r.log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            "127.0.0.1 GET /vmlinuz 200 6",
            "127.0.0.1 GET /nope 404 22",
            "127.0.0.1 GET /root-server.sqfs 206 100",
        ]
    );
}

#[test]
fn a_tree_of_another_cluster_or_no_tree_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, out) = tree(dir.path());
    std::fs::write(out.join("manifest.json"), r#"{"cluster": "other"}"#).unwrap();
    let opts = ServeOptions {
        out: out.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        url: None,
        tftp: None,
        update_keys: Default::default(),
    };
    let e = Server::bind(&plan, &opts).err().unwrap().to_string();
    assert!(e.contains("built for cluster \"other\", not lab"), "{e}");
    let opts = ServeOptions {
        out: dir.path().join("nothing"),
        ..opts
    };
    let e = Server::bind(&plan, &opts).err().unwrap().to_string();
    assert!(
        e.contains("has no netboot tree") && e.contains("--format pxe"),
        "{e}"
    );
}

/// The binary: dnsmasq snippet on stdout, TFTP material written, clean
/// exit on Ctrl-C (SIGINT).
#[test]
fn kiln_serve_prints_dnsmasq_config_writes_tftp_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = tree(dir.path());
    let tftp = dir.path().join("tftp");
    let port = kiln::vm::free_port().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg(dir.path().join("lab.toml"))
        .arg("--out")
        .arg(&out)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--url", "http://192.168.1.10:8080"])
        .arg("--tftp")
        .arg(&tftp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it answers.
    let start = std::time::Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed().as_secs() < 20, "kiln serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let script = std::fs::read_to_string(tftp.join(kiln::pxe::TFTP_SCRIPT)).unwrap();
    assert!(
        script.contains("set kiln-server http://192.168.1.10:8080"),
        "{script}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("kiln serve: stopped"), "{stderr}");
    assert!(stdout.contains("dhcp-range=192.168.1.10,proxy"), "{stdout}");
    assert!(
        stdout.contains(&format!("tftp-root={}", tftp.display())),
        "{stdout}"
    );
    // The iPXE binaries from Debian's ipxe package (scripts/setup installs it).
    for f in ["undionly.kpxe", "ipxe.efi"] {
        assert!(
            std::fs::metadata(tftp.join(f)).is_ok_and(|m| m.is_file() && m.len() > 10_000),
            "{f} not copied into the TFTP directory: {stderr}"
        );
    }
    // The snippet is valid dnsmasq configuration (dnsmasq-base, from scripts/setup).
    assert!(
        common::have("dnsmasq"),
        "dnsmasq is missing: run `make setup` (dnsmasq-base)"
    );
    {
        let conf = dir.path().join("dnsmasq.conf");
        std::fs::write(&conf, stdout.as_bytes()).unwrap();
        let t = std::process::Command::new("dnsmasq")
            .arg("--test")
            .arg(format!("--conf-file={}", conf.display()))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&t.stderr);
        assert!(
            t.status.success() && said.contains("syntax check OK"),
            "{said}"
        );
    }
}
