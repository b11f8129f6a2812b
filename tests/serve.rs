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
use std::time::{Duration, Instant};

use kiln::config::plan::Plan;
use kiln::deliver::serve::{Limits, ServeOptions, Server};

const PROFILE: &str = "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n\
[[nodes]]\nname = \"n1\"\nrole = \"server\"\nmac = \"52:54:00:aa:00:01\"\nlan-address = \"192.168.1.11\"\n\
[[nodes]]\nname = \"n2\"\nrole = \"agent\"\nmac = \"52:54:00:aa:00:02\"\n\
[[nodes]]\nname = \"n3\"\nrole = \"agent\"\n";

/// A tree as the build writes it: scripts from kiln's own renderers.
fn tree(dir: &Path) -> (Plan, PathBuf) {
    let profile = dir.join("lab.toml");
    std::fs::write(&profile, PROFILE).unwrap();
    let plan = kiln::config::plan::plan_profile(&profile, PROFILE).unwrap();
    let out = dir.join("out");
    let pxe = out.join("pxe");
    for d in ["mac", "seed"] {
        std::fs::create_dir_all(pxe.join(d)).unwrap();
    }
    std::fs::write(pxe.join("boot.ipxe"), kiln::render::pxe::boot_script(&plan)).unwrap();
    let root: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(pxe.join("root-server.sqfs"), &root).unwrap();
    std::fs::write(pxe.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(pxe.join("initrd.img"), b"initrd").unwrap();
    for n in plan.nodes.iter().filter(|n| n.mac.is_some()) {
        std::fs::write(
            pxe.join(kiln::render::pxe::mac_script_path(n.mac.as_ref().unwrap())),
            kiln::render::pxe::node_script(&plan, n, "root-server.sqfs", &"0".repeat(64)),
        )
        .unwrap();
        std::fs::write(
            pxe.join(kiln::render::pxe::seed_path(&n.name)),
            format!("seed of {}", n.name),
        )
        .unwrap();
    }
    write_manifest(&out, "lab");
    (plan, out)
}

/// A manifest naming `cluster` (the rest is what serve does not read).
fn write_manifest(out: &Path, cluster: &str) {
    use kiln::image::manifest::{Digest, K3s, Kernel, Manifest};
    let m = Manifest {
        artifacts: vec![],
        base: Digest {
            sha256: "0".repeat(64),
        },
        cluster: cluster.into(),
        images: vec![],
        k3s: K3s {
            sha256: "0".repeat(64),
            version: "v1.31.1+k3s1".into(),
        },
        kernel: Kernel {
            initramfs_compression: "zstd".into(),
            version: "6.1.0".into(),
        },
        kiln_version: "0".into(),
        nodes: vec![],
        profile: None,
        profile_sha256: "0".repeat(64),
        relay: None,
        sbom: None,
        source_date_epoch: 0,
    };
    std::fs::write(out.join("manifest.json"), m.to_bytes()).unwrap();
}

struct Running {
    addr: SocketAddr,
    /// The name of the server's connection threads.
    threads: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start() -> Running {
        Running::start_with(|_, _| {}, Limits::default())
    }

    /// A server over a tree changed by `prepare(pxe dir, temp dir)`.
    fn start_with(prepare: impl FnOnce(&Path, &Path), limits: Limits) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let (plan, out) = tree(dir.path());
        prepare(&out.join("pxe"), dir.path());
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
        .with_log(move |l| sink.lock().unwrap().push(l.to_string()))
        .with_limits(limits);
        let addr = server.addr();
        let threads = server.thread_name();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || server.run(&flag));
        Running {
            addr,
            threads,
            stop,
            thread: Some(thread),
            log,
            _dir: dir,
        }
    }

    /// The first log line that `want` accepts, waiting up to 10 s for it.
    fn wait_log(&self, want: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| want(l)) {
                return l.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no such line in {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send a request; (status, headers, body).
    fn req(&self, method: &str, path: &str, extra: &[&str]) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        // A server that hangs fails the test instead.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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
    write_manifest(&out, "other");
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
    let port = kiln::verify::vm::free_port().unwrap();
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
    let script = std::fs::read_to_string(tftp.join(kiln::render::pxe::TFTP_SCRIPT)).unwrap();
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

/// Threads of this test process named `name` (`/proc/self/task/*/comm`).
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == name)
        .count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Issue #11: `kiln serve` runs as root, and a symlink planted in the tree
/// (last component or a directory on the way) served the file it points
/// to; a FIFO hung the request.
#[test]
fn symlinks_fifos_and_devices_in_the_tree_are_404_and_a_fifo_does_not_hang() {
    let mut device = false;
    let r = Running::start_with(
        |pxe, dir| {
            let outside = dir.join("outside");
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("shadow"), "secret").unwrap();
            std::fs::write(outside.join("n1.txt"), "secret").unwrap();
            // The last component a symlink.
            std::os::unix::fs::symlink(outside.join("shadow"), pxe.join("root-x.sqfs")).unwrap();
            // A directory on the way a symlink.
            std::os::unix::fs::symlink(&outside, pxe.join("update")).unwrap();
            // Special files.
            let fifo =
                std::ffi::CString::new(pxe.join("root-fifo.sqfs").to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
            let dev = std::ffi::CString::new(pxe.join("root-dev.sqfs").to_str().unwrap()).unwrap();
            // /dev/null's numbers; only root may make a device node.
            device =
                unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) }
                    == 0;
        },
        Limits::default(),
    );
    for p in ["/root-x.sqfs", "/update/n1.txt", "/root-fifo.sqfs"] {
        let (s, _, body) = r.get(p);
        assert_eq!(s, 404, "{p}: {body}");
        assert!(!body.contains("secret"), "{p}: {body}");
    }
    if device {
        assert_eq!(r.get("/root-dev.sqfs").0, 404);
    } else {
        eprintln!("not root: no device node to serve");
    }
    // Still serving, and regular files as before.
    let (s, _, body) = r.get("/vmlinuz");
    assert_eq!((s, body.as_str()), (200, "kernel"));
}

/// Issue #11: every connection got a thread and none was ever timed out:
/// 500 idle connections held 425 threads.
#[test]
fn idle_connections_past_the_cap_get_503_and_hold_no_thread() {
    let max = 8;
    let r = Running::start_with(
        |_, _| {},
        Limits {
            read_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_secs(5),
            max_connections: max,
        },
    );
    let before = threads();
    let mut conns: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(r.addr).unwrap())
        .collect();
    // Every connection is answered 503 at once or, held, closed after the
    // read timeout; none waits for longer.
    let start = Instant::now();
    let mut refused = 0;
    let mut peak_named = 0;
    let mut peak = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        if buf.starts_with(b"HTTP/1.1 503 ") {
            refused += 1;
        } else {
            assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
        }
        peak_named = peak_named.max(threads_named(&r.threads));
        peak = peak.max(threads());
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(refused >= 100 - max, "only {refused} of 100 refused");
    assert!(peak_named <= max, "{peak_named} connection threads");
    // Other tests run beside this one, with a few threads each.
    assert!(
        peak < before + max + 30,
        "{before} threads before, {peak} with 100 connections"
    );
    let log = r.wait_log(|l| l.ends_with(" (refused: 8 connections open)"));
    assert!(log.starts_with("127.0.0.1 - - 503"), "{log}");
    // And it still serves.
    drop(conns);
    let (s, _, body) = r.get("/vmlinuz");
    assert_eq!((s, body.as_str()), (200, "kernel"));
}

/// Issue #11: a half-sent request was held forever.
#[test]
fn a_half_sent_or_trickled_request_gets_408_and_is_closed_after_the_read_timeout() {
    let r = Running::start_with(
        |_, _| {},
        Limits {
            read_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    );
    let mut c = TcpStream::connect(r.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /vmlinuz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    c.read_to_end(&mut buf).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(
        buf.starts_with(b"HTTP/1.1 408 "),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    r.wait_log(|l| l.starts_with("127.0.0.1 GET /vmlinuz 408 "));
    // One byte every 50 ms never makes a whole head in time either.
    let mut c = TcpStream::connect(r.addr).unwrap();
    let start = Instant::now();
    for b in b"GET /initrd.img HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        .iter()
        .cycle()
        .take(60)
    {
        if c.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Logged with what came of the path.
    r.wait_log(|l| l.starts_with("127.0.0.1 GET /i") && l.contains(" 408 "));
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

/// A tree with a root image big enough that loopback buffers cannot hold
/// it (sparse: nothing is written).
fn big_root(pxe: &Path) {
    let f = std::fs::File::create(pxe.join("root-big.sqfs")).unwrap();
    f.set_len(BIG).unwrap();
}

const BIG: u64 = 256 << 20;

/// Issue #11: a download the client broke off was logged as complete.
#[test]
fn an_aborted_download_is_logged_with_the_bytes_really_sent() {
    let r = Running::start_with(|pxe, _| big_root(pxe), Limits::default());
    let mut c = TcpStream::connect(r.addr).unwrap();
    c.write_all(b"GET /root-big.sqfs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    c.read_exact(&mut buf).unwrap();
    drop(c);
    let line = r.wait_log(|l| l.contains("/root-big.sqfs"));
    let sent: u64 = line
        .strip_prefix("127.0.0.1 GET /root-big.sqfs 200 ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(sent < BIG, "{line}");
    assert!(line.contains(&format!(" of {BIG} (aborted: ")), "{line}");
}

/// Issue #11: a client that stops reading held its thread and file forever.
#[test]
fn a_stalled_download_is_ended_by_the_write_timeout_and_logged_aborted() {
    let r = Running::start_with(
        |pxe, _| big_root(pxe),
        Limits {
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    );
    let mut c = TcpStream::connect(r.addr).unwrap();
    c.write_all(b"GET /root-big.sqfs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    // Read nothing, keep the connection open.
    let line = r.wait_log(|l| l.contains("/root-big.sqfs"));
    assert!(
        line.starts_with("127.0.0.1 GET /root-big.sqfs 200 ")
            && line.contains(&format!(" of {BIG} (aborted: client gone or stalled")),
        "{line}"
    );
    drop(c);
}

/// Issue #11: a 100 KB request path was logged whole, and control
/// characters (ESC) reached the terminal raw.
#[test]
fn request_paths_are_logged_escaped_and_shortened() {
    let r = Running::start();
    let (s, _, _) = r.req("GET", "/\x1b[2J\x1b]0;pwned\x07", &[]);
    assert_eq!(s, 404);
    let line = r.wait_log(|l| l.contains(" 404 "));
    assert_eq!(line, "127.0.0.1 GET /\\x1b[2J\\x1b]0;pwned\\x07 404 22");
    // Under the head limit: 404, logged shortened.
    let long = format!("/{}", "a".repeat(10_000));
    assert_eq!(r.get(&long).0, 404);
    let line = r.wait_log(|l| l.contains("/aaaa") && l.contains(" 404 "));
    assert!(line.len() < 300 && line.contains("a… 404 "), "{line}");
    // 100 KB: refused before it is all read, logged shortened.
    let mut c = TcpStream::connect(r.addr).unwrap();
    let _ = c.write_all(format!("GET /{} HTTP/1.1\r\n\r\n", "b".repeat(100_000)).as_bytes());
    let line = r.wait_log(|l| l.contains("/bbbb"));
    assert!(line.len() < 300 && line.contains("b… 414 "), "{line}");
    assert!(!r.log.lock().unwrap().iter().any(|l| l.contains('\x1b')));
}

/// Issue #11: the "one-time" seed token opened the seed again and again.
#[test]
fn a_seed_token_opens_the_seed_once() {
    let r = Running::start();
    let url = r.seed_url("52-54-00-aa-00-01");
    // HEAD sends no secret and leaves the token as it was.
    assert_eq!(r.req("HEAD", &url, &[]).0, 200);
    let (s, _, body) = r.get(&url);
    assert_eq!((s, body.as_str()), (200, "seed of n1"));
    let (s, _, body) = r.get(&url);
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("used already"), "{body}");
    let line = r.wait_log(|l| l.contains(" 403 "));
    assert!(
        line.starts_with("127.0.0.1 GET /seed/n1.img 403 ")
            && line.ends_with(" (seed token already used)"),
        "{line}"
    );
    // The next boot fetches the script again, with a new token.
    let again = r.seed_url("52-54-00-aa-00-01");
    assert_ne!(again, url);
    assert_eq!(r.get(&again).0, 200);
}

/// iPXE and wget reuse a connection: requests after the first, and
/// pipelined ones, are still answered on it.
#[test]
fn requests_on_a_kept_alive_connection_are_answered_in_order() {
    let r = Running::start();
    let mut c = TcpStream::connect(r.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"GET /vmlinuz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
          GET /initrd.img HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
          GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut buf = Vec::new();
    c.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf);
    let statuses: Vec<&str> = text.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["200", "200", "404"], "{text}");
    assert!(
        text.contains("\r\n\r\nkernelHTTP/1.1") && text.contains("\r\n\r\ninitrdHTTP/1.1"),
        "{text}"
    );
    r.wait_log(|l| l == "127.0.0.1 GET /nope 404 22");
}
