//! k3s-double: a TEST DOUBLE for the k3s binary, used only by kiln's test
//! suite (passed with `--k3s-binary`). It never ships in an image built
//! from a user's profile.
//!
//! It behaves just enough like k3s for the boot checks:
//! - `k3s --version` prints the version it was built as
//!   (`K3S_DOUBLE_VERSION` at build time) and says it is a double;
//! - `k3s server ARGS…` records its arguments and config, listens on the
//!   supervisor port 6443 and tells systemd it is ready;
//! - `k3s agent ARGS…` records the same, then connects to the `server:`
//!   URL from its config until it gets through, recording each attempt.
//!
//! Records go to /var/lib/rancher/k3s/double/ (on the state partition,
//! like k3s's data), one `key=value` per line.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const VERSION: &str = match option_env!("K3S_DOUBLE_VERSION") {
    Some(v) => v,
    None => "v0.0.0+double",
};
const CONFIG: &str = "/etc/rancher/k3s/config.yaml";
const RECORD_DIR: &str = "/var/lib/rancher/k3s/double";
const API_PORT: u16 = 6443;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record(file: &str, lines: &[(String, String)]) {
    let _ = std::fs::create_dir_all(RECORD_DIR);
    let mut s = String::new();
    for (k, v) in lines {
        s.push_str(&format!("{k}={v}\n"));
    }
    let tmp = format!("{RECORD_DIR}/.{file}.tmp");
    if std::fs::write(&tmp, s).is_ok() {
        let _ = std::fs::rename(&tmp, format!("{RECORD_DIR}/{file}"));
    }
}

fn notify_ready() {
    if let Ok(path) = std::env::var("NOTIFY_SOCKET") {
        if let Ok(sock) = UnixDatagram::unbound() {
            let _ = sock.send_to(b"READY=1", path);
        }
    }
}

/// The `server:` value from config.yaml (kiln writes it quoted).
fn server_url(config: &str) -> Option<String> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("server:"))
        .map(|v| v.trim().trim_matches('"').to_string())
}

fn host_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    Some(rest.split('/').next()?.to_string())
}

fn common(verb: &str, args: &[String]) -> Vec<(String, String)> {
    let config = std::fs::read_to_string(CONFIG).unwrap_or_default();
    let mut r = vec![
        ("double".to_string(), "true".to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("verb".to_string(), verb.to_string()),
        ("argv".to_string(), args.join(" ")),
        ("started".to_string(), now().to_string()),
        (
            "config_sha_lines".to_string(),
            config.lines().count().to_string(),
        ),
    ];
    for l in config
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.starts_with('-'))
    {
        if let Some((k, v)) = l.split_once(':') {
            r.push((
                format!("config.{k}"),
                v.trim().trim_matches('"').to_string(),
            ));
        }
    }
    r
}

fn server(args: &[String]) -> ! {
    let mut rec = common("server", args);
    let listener = match TcpListener::bind(("0.0.0.0", API_PORT)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("k3s-double: cannot listen on {API_PORT}: {e}");
            std::process::exit(1);
        }
    };
    rec.push(("listening".into(), API_PORT.to_string()));
    record("server", &rec);
    notify_ready();
    eprintln!("k3s-double {VERSION}: server listening on {API_PORT}");
    let mut accepted = 0u64;
    for stream in listener.incoming() {
        if let Ok(mut s) = stream {
            accepted += 1;
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let _ = s.write_all(format!("k3s-double {VERSION}\n").as_bytes());
            let mut r = rec.clone();
            r.push(("accepted".into(), accepted.to_string()));
            r.push(("last_peer".into(), peer));
            record("server", &r);
        }
    }
    std::process::exit(1)
}

fn agent(args: &[String]) -> ! {
    let rec = common("agent", args);
    let config = std::fs::read_to_string(CONFIG).unwrap_or_default();
    let Some(target) = server_url(&config).as_deref().and_then(host_port) else {
        eprintln!("k3s-double: no `server:` URL in {CONFIG}");
        std::process::exit(1);
    };
    notify_ready();
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let result = target
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)));
        let (ok, detail) = match result {
            Some(Ok(mut s)) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut banner = String::new();
                let _ = s.read_to_string(&mut banner);
                (true, banner.trim().to_string())
            }
            Some(Err(e)) => (false, e.to_string()),
            None => (false, format!("cannot resolve {target}")),
        };
        let mut r = rec.clone();
        r.push(("server".into(), target.clone()));
        r.push(("attempts".into(), attempts.to_string()));
        r.push(("connected".into(), ok.to_string()));
        r.push(("detail".into(), detail));
        r.push(("at".into(), now().to_string()));
        record("agent", &r);
        std::thread::sleep(Duration::from_secs(if ok { 10 } else { 2 }));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version" | "-v") => {
            println!("k3s version {VERSION} (k3s-double: a test double, not k3s)")
        }
        Some("server") => server(&args[1..]),
        Some("agent") => agent(&args[1..]),
        _ => {
            eprintln!(
                "k3s-double {VERSION}: a test double for k3s; supports --version, server, agent"
            );
            std::process::exit(2);
        }
    }
}
