//! `kiln serve`: the netboot tree (OUT/pxe) over HTTP, for iPXE and for
//! the initramfs fetching the root image.
//!
//! - Only the files of the tree are served; no directory is ever listed.
//! - iPXE scripts are rendered with the URL the request came to (its
//!   `Host`), so the same tree works behind any address.
//! - Node seeds hold the node's WireGuard key and the cluster token: a
//!   seed is served only with the token that the same client received in
//!   that node's per-MAC script, within [`SEED_TOKEN_TTL`]. On an open LAN
//!   a machine that claims a node's MAC still gets that node's seed: the
//!   MAC is the only identity PXE has.
//! - One log line per request: client, method, path (never the token),
//!   status, bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek as _, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tiny_http::{Header, Method, Request, Response, StatusCode};

use crate::plan::Plan;
use crate::pxe;

/// How long a seed token from a per-MAC script stays valid.
pub const SEED_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The build's output directory (`--out` of `kiln build`).
    pub out: PathBuf,
    pub listen: SocketAddr,
    /// The URL nodes reach this server by, for the TFTP script and the
    /// dnsmasq snippet [default: from `listen`].
    pub url: Option<String>,
    /// Write the TFTP material (bootstrap script, iPXE binaries) here.
    pub tftp: Option<PathBuf>,
    /// Each node's update key ([`crate::render::update_key`]): a request
    /// for a seed with `?key=` matching it is served (kiln-update). Empty:
    /// seeds only to netbooting nodes.
    pub update_keys: BTreeMap<String, String>,
}

struct Grant {
    node: String,
    client: IpAddr,
    until: Instant,
}

struct State {
    tree: PathBuf,
    /// `mac/<mac>.ipxe` → node.
    macs: BTreeMap<String, String>,
    fallback_url: String,
    grants: Mutex<BTreeMap<String, Grant>>,
    update_keys: BTreeMap<String, String>,
    log: Box<dyn Fn(&str) + Send + Sync>,
}

/// A bound server; [`Server::run`] serves until the stop flag is set.
pub struct Server {
    http: tiny_http::Server,
    state: Arc<State>,
}

/// The URL nodes use to reach `listen`, if it can be told from it.
pub fn default_url(listen: SocketAddr) -> Option<String> {
    (!listen.ip().is_unspecified()).then(|| format!("http://{listen}"))
}

impl Server {
    /// Check the tree against the profile and bind.
    pub fn bind(plan: &Plan, opts: &ServeOptions) -> anyhow::Result<Server> {
        let tree = opts.out.join(pxe::DIR);
        if !tree.join(pxe::BOOT_SCRIPT).is_file() {
            bail!(
                "{} has no netboot tree: run `kiln build {} --format pxe --out {}` first",
                opts.out.display(),
                plan.profile_path.display(),
                opts.out.display()
            );
        }
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(opts.out.join("manifest.json"))
                .with_context(|| format!("reading {}/manifest.json", opts.out.display()))?,
        )
        .with_context(|| format!("parsing {}/manifest.json", opts.out.display()))?;
        if manifest["cluster"].as_str() != Some(plan.cluster.as_str()) {
            bail!(
                "{} was built for cluster {}, not {} ({}): serve the output of this profile's build",
                opts.out.display(),
                manifest["cluster"],
                plan.cluster,
                plan.profile_path.display()
            );
        }
        let mut macs = BTreeMap::new();
        for n in &plan.nodes {
            if let Some(mac) = n.mac {
                let script = pxe::mac_script_path(&mac);
                if tree.join(&script).is_file() {
                    macs.insert(script, n.name.clone());
                }
            }
        }
        let http = tiny_http::Server::http(opts.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.listen))?;
        let bound = http
            .server_addr()
            .to_ip()
            .context("the server is not on an IP socket")?;
        let fallback_url = opts
            .url
            .clone()
            .or_else(|| default_url(bound))
            .unwrap_or_else(|| format!("http://127.0.0.1:{}", bound.port()));
        Ok(Server {
            http,
            state: Arc::new(State {
                tree,
                macs,
                fallback_url,
                grants: Mutex::default(),
                update_keys: opts.update_keys.clone(),
                log: Box::new(|l| eprintln!("{l}")),
            }),
        })
    }

    /// Send log lines somewhere else than stderr (tests).
    pub fn with_log(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Arc::get_mut(&mut self.state).expect("not running yet").log = Box::new(f);
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.http.server_addr().to_ip().expect("IP socket")
    }

    /// Nodes that can netboot (have a per-MAC script), by MAC script path.
    pub fn nodes(&self) -> Vec<String> {
        self.state.macs.values().cloned().collect()
    }

    /// Serve until `stop` is set; requests in flight finish.
    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut workers = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match self.http.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(req)) => {
                    let state = self.state.clone();
                    workers.push(std::thread::spawn(move || handle(&state, req)));
                    workers.retain(|w| !w.is_finished());
                }
                Ok(None) => {}
                Err(e) => bail!("accepting a connection: {e}"),
            }
        }
        for w in workers {
            let _ = w.join();
        }
        Ok(())
    }
}

/// What a request path maps to.
#[derive(Debug, PartialEq)]
enum Target {
    BootScript,
    MacScript(String),
    Seed(String),
    File(String),
}

fn query_value<'q>(query: &'q str, key: &str) -> &'q str {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or("")
}

/// Map a URL path to a file of the tree, or `None` (404). Only names
/// kiln writes are accepted: no `..`, no directories, no hidden files.
fn target(path: &str) -> Option<Target> {
    let rel = path.strip_prefix('/')?;
    let ok_name = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
    };
    match rel.split('/').collect::<Vec<_>>().as_slice() {
        [n] if *n == pxe::BOOT_SCRIPT => Some(Target::BootScript),
        [n] if *n == pxe::KERNEL || *n == pxe::INITRD => Some(Target::File(n.to_string())),
        [n] if ok_name(n) && n.starts_with("root-") && n.ends_with(".sqfs") => {
            Some(Target::File(n.to_string()))
        }
        ["mac", n] if ok_name(n) && n.ends_with(".ipxe") => Some(Target::MacScript(rel.into())),
        ["seed", n] if ok_name(n) && n.ends_with(".img") => {
            Some(Target::Seed(n.trim_end_matches(".img").to_string()))
        }
        ["update", n] if ok_name(n) && n.ends_with(".txt") => Some(Target::File(rel.into())),
        _ => None,
    }
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` against a file of `len` bytes:
/// `Some(Ok((start, end_inclusive)))`, `Some(Err(()))` if unsatisfiable,
/// `None` to send the whole file (no or unsupported header).
fn parse_range(header: Option<&str>, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // several ranges: send the whole file
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let r = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().ok()?.min(len.saturating_sub(1))
        };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(r))
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn handle(state: &State, req: Request) {
    let client = req.remote_addr().map(|a| a.ip());
    let method = req.method().clone();
    let (path, query) = match req.url().split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (req.url().to_string(), String::new()),
    };
    let (status, bytes, resp) = respond(state, &req, client, &path, &query);
    let client_s = client.map_or("-".to_string(), |c| c.to_string());
    let sent = match req.respond(resp) {
        Ok(()) => bytes.to_string(),
        Err(e) => format!("{bytes} (interrupted: {e})"),
    };
    (state.log)(&format!("{client_s} {method} {path} {status} {sent}"));
}

type Reply = (u16, u64, Response<Box<dyn Read + Send>>);

fn text(status: u16, body: String, content_type: &str) -> Reply {
    let len = body.len() as u64;
    let r = Response::new(
        StatusCode(status),
        vec![header("Content-Type", content_type)],
        Box::new(std::io::Cursor::new(body.into_bytes())) as Box<dyn Read + Send>,
        Some(len as usize),
        None,
    );
    (status, len, r)
}

fn error(status: u16, msg: &str) -> Reply {
    text(status, format!("kiln serve: {msg}\n"), "text/plain")
}

fn respond(state: &State, req: &Request, client: Option<IpAddr>, path: &str, query: &str) -> Reply {
    if !matches!(req.method(), Method::Get | Method::Head) {
        return error(405, "only GET and HEAD");
    }
    let Some(t) = target(path) else {
        return error(404, "not found");
    };
    let base = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Host"))
        .map(|h| format!("http://{}", h.value.as_str()))
        .unwrap_or_else(|| state.fallback_url.clone());
    match t {
        Target::BootScript => match std::fs::read_to_string(state.tree.join(pxe::BOOT_SCRIPT)) {
            Ok(s) => text(200, pxe::render(&s, &base), "text/plain"),
            Err(_) => error(404, "not found"),
        },
        Target::MacScript(rel) => {
            let (Some(node), Some(client)) = (state.macs.get(&rel), client) else {
                return error(404, "no node of this cluster has that MAC");
            };
            let Ok(script) = std::fs::read_to_string(state.tree.join(&rel)) else {
                return error(404, "not found");
            };
            let mut raw = [0u8; 16];
            if getrandom::fill(&mut raw).is_err() {
                return error(500, "no randomness for the seed token");
            }
            let token = hex::encode(raw);
            {
                let mut g = state.grants.lock().unwrap();
                let now = Instant::now();
                g.retain(|_, v| v.until > now);
                g.insert(
                    token.clone(),
                    Grant {
                        node: node.clone(),
                        client,
                        until: now + SEED_TOKEN_TTL,
                    },
                );
            }
            let seed = format!("/{}", pxe::seed_path(node));
            let script = script.replace(&seed, &format!("{seed}?token={token}"));
            text(200, pxe::render(&script, &base), "text/plain")
        }
        Target::Seed(node) => {
            let token = query_value(query, "token");
            let netboot = {
                let g = state.grants.lock().unwrap();
                g.get(token).is_some_and(|gr| {
                    gr.node == node && Some(gr.client) == client && gr.until > Instant::now()
                })
            };
            let key = query_value(query, "key");
            let update = !key.is_empty()
                && state
                    .update_keys
                    .get(&node)
                    .is_some_and(|k| constant_time_eq(k.as_bytes(), key.as_bytes()));
            if !netboot && !update {
                return error(
                    403,
                    "a node seed is served only with the token of its per-MAC script (to the same client) or the node's update key",
                );
            }
            file(req, &state.tree.join(pxe::seed_path(&node)))
        }
        Target::File(name) => file(req, &state.tree.join(name)),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn file(req: &Request, path: &Path) -> Reply {
    let Ok(mut f) = File::open(path) else {
        return error(404, "not found");
    };
    let Ok(meta) = f.metadata() else {
        return error(500, "cannot read the file");
    };
    if !meta.is_file() {
        return error(404, "not found");
    }
    let len = meta.len();
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let mut headers = vec![
        header("Content-Type", "application/octet-stream"),
        header("Accept-Ranges", "bytes"),
    ];
    match parse_range(range.as_deref(), len) {
        None => {
            let r = Response::new(
                StatusCode(200),
                headers,
                Box::new(f) as Box<dyn Read + Send>,
                Some(len as usize),
                None,
            )
            // Content-Length, not chunks: wget and iPXE show progress by it.
            .with_chunked_threshold(usize::MAX);
            (200, len, r)
        }
        Some(Err(())) => {
            let (s, n, mut r) = error(416, "range not satisfiable");
            r.add_header(header("Content-Range", &format!("bytes */{len}")));
            (s, n, r)
        }
        Some(Ok((start, end))) => {
            if f.seek(SeekFrom::Start(start)).is_err() {
                return error(500, "cannot read the file");
            }
            let n = end - start + 1;
            headers.push(header(
                "Content-Range",
                &format!("bytes {start}-{end}/{len}"),
            ));
            let r = Response::new(
                StatusCode(206),
                headers,
                Box::new(f.take(n)) as Box<dyn Read + Send>,
                Some(n as usize),
                None,
            )
            .with_chunked_threshold(usize::MAX);
            (206, n, r)
        }
    }
}

/// Write the TFTP material into `dir`: the bootstrap script and, when
/// Debian's `ipxe` package is installed, its BIOS and UEFI binaries.
/// Returns the notes to print.
pub fn write_tftp(dir: &Path, url: &str) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut notes = Vec::new();
    let script = dir.join(pxe::TFTP_SCRIPT);
    std::fs::write(&script, pxe::tftp_script(url))
        .with_context(|| format!("writing {}", script.display()))?;
    notes.push(format!("wrote {}", script.display()));
    for (name, what) in [("undionly.kpxe", "BIOS"), ("ipxe.efi", "UEFI")] {
        let src = Path::new(IPXE_DIR).join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
            notes.push(format!("copied {} ({what} iPXE)", src.display()));
        } else {
            notes.push(format!(
                "{} is missing: apt-get install --no-install-recommends ipxe, or put a {what} iPXE binary there as {name}",
                src.display()
            ));
        }
    }
    Ok(notes)
}

/// Where Debian's `ipxe` package puts its binaries.
pub const IPXE_DIR: &str = "/usr/lib/ipxe";

/// The network address to name in dnsmasq's proxy range: the profile's
/// static LAN containing the server, or the server's address itself.
pub fn proxy_range(plan: &Plan, url: &str) -> String {
    let host = url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    let Ok(ip) = host.parse::<IpAddr>() else {
        return "<your LAN's network address, e.g. 192.168.1.0>".into();
    };
    plan.nodes
        .iter()
        .filter_map(|n| n.network.address)
        .find(|a| a.trunc().contains(&ip))
        .map(|a| a.trunc().addr().to_string())
        .unwrap_or_else(|| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_only_the_trees_files() {
        assert_eq!(target("/boot.ipxe"), Some(Target::BootScript));
        assert_eq!(
            target("/mac/52-54-00-12-34-01.ipxe"),
            Some(Target::MacScript("mac/52-54-00-12-34-01.ipxe".into()))
        );
        assert_eq!(target("/seed/s1.img"), Some(Target::Seed("s1".into())));
        assert_eq!(
            target("/update/s1.txt"),
            Some(Target::File("update/s1.txt".into()))
        );
        assert_eq!(
            target("/root-server.sqfs"),
            Some(Target::File("root-server.sqfs".into()))
        );
        for bad in [
            "/",
            "/mac/",
            "/seed/",
            "/seed/../manifest.json",
            "/../SHA256SUMS",
            "/mac/../seed/s1.img",
            "/root-../../x.sqfs",
            "/.hidden.sqfs",
            "/SHA256SUMS",
            "/s1.img",
            "//etc/passwd",
            "/seed/s1.img/",
            "/update/../seed/s1.img",
            "/update/",
        ] {
            assert_eq!(target(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100), None);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Some(Ok((0, 9))));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Some(Ok((90, 99))));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Some(Ok((90, 99))));
        assert_eq!(parse_range(Some("bytes=95-200"), 100), Some(Ok((95, 99))));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Some(Err(())));
        assert_eq!(parse_range(Some("bytes=5-2"), 100), Some(Err(())));
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), None);
        assert_eq!(parse_range(Some("items=0-1"), 100), None);
    }
}
