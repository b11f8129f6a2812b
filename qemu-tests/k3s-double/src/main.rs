//! k3s-double: a TEST DOUBLE for the k3s binary, used only by kiln's test
//! suite (passed with `--k3s-binary`). It never ships in an image built
//! from a user's profile.
//!
//! It behaves just enough like k3s for the boot checks:
//! - `k3s --version` prints the version it was built as
//!   (`K3S_DOUBLE_VERSION` at build time) and says it is a double;
//! - `k3s server ARGS…` and `k3s agent ARGS…` first record what k3s
//!   would import from `agent/images` (see `images`);
//! - `k3s server ARGS…` records its arguments and config, takes its CA
//!   set from `server/tls` (making what is missing), refuses a secure
//!   token that pins another CA, serves TLS on the supervisor port 6443
//!   and tells systemd it is ready (see `tls` for what it answers);
//! - `k3s agent ARGS…` records the same, then joins the `server:` URL
//!   from its config as k3s does (fetch `/cacerts`, check it against a
//!   secure token, then talk TLS verified with that CA) until it gets
//!   through, recording each attempt;
//! - `k3s etcd-snapshot save [--name N]` saves a snapshot file the way k3s
//!   does and records the call (see `etcd_snapshot_save`).
//!
//! The server keeps a stand-in datastore where k3s keeps its own, under
//! /var/lib/rancher/k3s/server/db/: embedded etcd (a `etcd/member/`
//! directory) when the config has `cluster-init: true` or `server:`, or
//! when that directory already exists, as k3s does; else SQLite, a
//! `state.db` text file to which each server start appends a line, so a
//! copy of it shows which start it was taken after.
//!
//! Records go to /var/lib/rancher/k3s/double/ (on the state partition,
//! like k3s's data), one `key=value` per line: `server` or `agent`, and
//! `images` (a key may repeat there: one `import=` line per tarball).
//!
//! Test hook (of the double only, nothing in kiln knows it): while
//! /var/lib/rancher/k3s/double/fail-snapshot exists, `etcd-snapshot save`
//! fails (exit 1, a message on stderr), as a real one does when etcd is
//! unhealthy or /var is full.

mod images;
mod tls;

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const VERSION: &str = match option_env!("K3S_DOUBLE_VERSION") {
    Some(v) => v,
    None => "v0.0.0+double",
};
const CONFIG: &str = "/etc/rancher/k3s/config.yaml";
const RECORD_DIR: &str = "/var/lib/rancher/k3s/double";
const API_PORT: u16 = 6443;
const DB_DIR: &str = "/var/lib/rancher/k3s/server/db";
/// k3s's default `--etcd-snapshot-dir` (under `DB_DIR`).
const SNAPSHOT_DIR: &str = "/var/lib/rancher/k3s/server/db/snapshots";
/// One line per snapshot saved, in order.
const SNAPSHOT_RECORD: &str = "/var/lib/rancher/k3s/double/snapshots";
/// The test hook: `etcd-snapshot save` fails while this file exists.
const FAIL_SNAPSHOT: &str = "/var/lib/rancher/k3s/double/fail-snapshot";

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
    if let Ok(path) = std::env::var("NOTIFY_SOCKET")
        && let Ok(sock) = UnixDatagram::unbound()
    {
        let _ = sock.send_to(b"READY=1", path);
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

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn die(msg: &str) -> ! {
    eprintln!("k3s-double: {msg}");
    std::process::exit(1)
}

/// A top-level `key:` value of config.yaml (kiln writes strings quoted).
fn config_value(config: &str, key: &str) -> Option<String> {
    config.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')
            .map(|v| v.trim().trim_matches('"').to_string())
    })
}

/// The join token, from `token-file:` or `token:` in config.yaml.
fn read_token(config: &str) -> Option<String> {
    match config_value(config, "token-file") {
        Some(f) => std::fs::read_to_string(&f).ok(),
        None => config_value(config, "token"),
    }
    .map(|t| t.trim().to_string())
    .filter(|t| !t.is_empty())
}

fn etcd_dir() -> String {
    format!("{DB_DIR}/etcd")
}

/// Which datastore k3s would use with this config, the way k3s decides:
/// etcd with cluster-init or a server to join, or once etcd data exists.
fn uses_etcd(config: &str) -> bool {
    config_value(config, "cluster-init").as_deref() == Some("true")
        || config_value(config, "server").is_some()
        || std::path::Path::new(&format!("{}/member", etcd_dir())).is_dir()
}

/// Set up the stand-in datastore; returns its kind and path.
fn open_datastore(config: &str) -> (String, String) {
    if uses_etcd(config) {
        let member = format!("{}/member", etcd_dir());
        if let Err(e) = std::fs::create_dir_all(&member) {
            die(&format!("cannot create {member}: {e}"));
        }
        ("etcd".into(), etcd_dir())
    } else {
        let db = format!("{DB_DIR}/state.db");
        let line = format!("k3s-double {VERSION} server start at {}\n", now_nanos());
        let appended = std::fs::create_dir_all(DB_DIR).and_then(|()| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&db)?;
            f.write_all(line.as_bytes())?;
            f.sync_all()
        });
        if let Err(e) = appended {
            die(&format!("cannot write {db}: {e}"));
        }
        ("sqlite".into(), db)
    }
}

fn server(args: &[String]) -> ! {
    record("images", &images::listing(images::IMAGES_DIR));
    let mut rec = common("server", args);
    let config = std::fs::read_to_string(CONFIG).unwrap_or_default();
    let cas = tls::load_or_make_cas().unwrap_or_else(|e| die(&e));
    let ca_hash = tls::sha256_hex(cas.server_ca_pem.as_bytes());
    if let Some(pinned) = read_token(&config).as_deref().and_then(tls::token_ca_hash)
        && pinned != ca_hash
    {
        die(&format!(
            "token CA hash {pinned} does not match the cluster CA certificate hash {ca_hash}"
        ));
    }
    let names = tls::serving_names(&config);
    let tls_config = tls::server_config(&cas, names.clone()).unwrap_or_else(|e| die(&e));
    rec.push(("ca".into(), cas.origin.clone()));
    rec.push(("server_ca_sha256".into(), ca_hash));
    rec.push(("serving_names".into(), names.join(",")));
    let (kind, path) = open_datastore(&config);
    rec.push(("datastore".into(), kind));
    rec.push(("datastore_path".into(), path));
    let listener = match TcpListener::bind(("0.0.0.0", API_PORT)) {
        Ok(l) => l,
        Err(e) => die(&format!("cannot listen on {API_PORT}: {e}")),
    };
    rec.push(("listening".into(), API_PORT.to_string()));
    record("server", &rec);
    notify_ready();
    eprintln!("k3s-double {VERSION}: server listening on {API_PORT} (TLS)");
    let banner = format!("k3s-double {VERSION}");
    let mut accepted = 0u64;
    // A failed accept (a peer gone before it was accepted) is skipped.
    // One connection at a time: enough for a double.
    for s in listener.incoming().flatten() {
        accepted += 1;
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let answered = tls::serve(tls_config.clone(), s, &cas.server_ca_pem, &banner);
        let mut r = rec.clone();
        r.push(("accepted".into(), accepted.to_string()));
        r.push(("last_peer".into(), peer));
        r.push(("last_request".into(), answered));
        record("server", &r);
    }
    std::process::exit(1)
}

/// One join attempt as k3s's agent makes it: the server's CA from
/// `/cacerts` (checked against a secure token), then a request verified
/// with that CA. Returns the server's answer and the token's form.
fn join(target: &str, token: Option<&str>) -> Result<(String, &'static str), String> {
    let ca = tls::get(target, "/cacerts", None)?;
    let form = match token.and_then(tls::token_ca_hash) {
        Some(pinned) => {
            let got = tls::sha256_hex(ca.as_bytes());
            if got != pinned {
                return Err(format!(
                    "the server's CA (sha256 {got}) is not the one the token pins ({pinned})"
                ));
            }
            "secure"
        }
        None => "short",
    };
    let answer = tls::get(target, "/ping", Some(ca.as_bytes()))?;
    Ok((answer.trim().to_string(), form))
}

fn agent(args: &[String]) -> ! {
    record("images", &images::listing(images::IMAGES_DIR));
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
        let token = read_token(&config);
        let (ok, detail, form) = match join(&target, token.as_deref()) {
            Ok((answer, form)) => (true, answer, form),
            Err(e) => (false, e, ""),
        };
        let mut r = rec.clone();
        r.push(("server".into(), target.clone()));
        r.push(("attempts".into(), attempts.to_string()));
        r.push(("connected".into(), ok.to_string()));
        r.push(("detail".into(), detail));
        r.push(("token_form".into(), form.to_string()));
        r.push(("at".into(), now().to_string()));
        record("agent", &r);
        std::thread::sleep(Duration::from_secs(if ok { 10 } else { 2 }));
    }
}

/// `k3s etcd-snapshot save [--name N]`, checked as k3s checks it: the
/// server's etcd must exist (k3s refuses on a SQLite server) and the
/// server must be running (k3s asks it for the snapshot; the double
/// connects to its port). The file is `N-<node>-<unix time>` in k3s's
/// default snapshot dir, holding a line that names it; a line
/// `seq=… at=<unix ns> name=… file=…` is appended to `SNAPSHOT_RECORD`.
fn etcd_snapshot_save(args: &[String]) -> ! {
    let mut name = "on-demand".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--name" {
            name = it.next().cloned().unwrap_or_default();
        } else if let Some(n) = a.strip_prefix("--name=") {
            name = n.to_string();
        } else {
            die(&format!("etcd-snapshot save: the double does not know {a}"));
        }
    }
    if name.is_empty() {
        die("etcd-snapshot save: --name needs a value");
    }
    if std::path::Path::new(FAIL_SNAPSHOT).exists() {
        die(&format!(
            "etcd-snapshot save failed on purpose: {FAIL_SNAPSHOT} exists (a test hook of the double)"
        ));
    }
    let config = std::fs::read_to_string(CONFIG).unwrap_or_default();
    if !std::path::Path::new(&format!("{}/member", etcd_dir())).is_dir() {
        die(&format!(
            "etcd datastore disabled: no {}/member (this server uses SQLite, or has never started)",
            etcd_dir()
        ));
    }
    if TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], API_PORT)),
        Duration::from_secs(3),
    )
    .is_err()
    {
        die(&format!(
            "etcd-snapshot save: no server running on 127.0.0.1:{API_PORT}"
        ));
    }
    let node = config_value(&config, "node-name")
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default();
    let file = format!("{SNAPSHOT_DIR}/{name}-{node}-{}", now());
    let saved = std::fs::create_dir_all(SNAPSHOT_DIR).and_then(|()| {
        std::fs::write(
            &file,
            format!("k3s-double {VERSION} etcd snapshot {name}\n"),
        )
    });
    if let Err(e) = saved {
        die(&format!("cannot write {file}: {e}"));
    }
    let _ = std::fs::create_dir_all(RECORD_DIR);
    let seq = std::fs::read_to_string(SNAPSHOT_RECORD).map_or(0, |s| s.lines().count()) + 1;
    let line = format!("seq={seq} at={} name={name} file={file}\n", now_nanos());
    let recorded = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SNAPSHOT_RECORD)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = recorded {
        die(&format!("cannot record in {SNAPSHOT_RECORD}: {e}"));
    }
    eprintln!(
        "k3s-double: Snapshot {} saved.",
        file.rsplit('/').next().unwrap_or_default()
    );
    std::process::exit(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version" | "-v") => {
            println!("k3s version {VERSION} (k3s-double: a test double, not k3s)")
        }
        Some("server") => server(&args[1..]),
        Some("agent") => agent(&args[1..]),
        Some("etcd-snapshot") if args.get(1).map(String::as_str) == Some("save") => {
            etcd_snapshot_save(&args[2..])
        }
        _ => {
            eprintln!(
                "k3s-double {VERSION}: a test double for k3s; supports --version, server, agent, etcd-snapshot save"
            );
            std::process::exit(2);
        }
    }
}
