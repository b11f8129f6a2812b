//! `kiln serve`: the netboot tree (OUT/pxe) over HTTP, for iPXE and for
//! the initramfs fetching the root image.
//!
//! - Only the regular files of the tree are served: no directory is ever
//!   listed, and no symlink (anywhere on the path), FIFO or device is
//!   followed or opened; those are 404. `serve` often runs as root and the
//!   tree may be writable by others.
//! - iPXE scripts are rendered with the URL the request came to (its
//!   `Host`), so the same tree works behind any address.
//! - Node seeds hold the node's WireGuard key and the cluster token: a
//!   seed is served only with the token that the same client received in
//!   that node's per-MAC script, once, within [`SEED_TOKEN_TTL`] (every
//!   fetch of the script mints a new token, so every boot gets one). On an
//!   open LAN a machine that claims a node's MAC still gets that node's
//!   seed: the MAC is the only identity PXE has.
//! - Connections are bounded ([`Limits`]): a request head must arrive
//!   within the read timeout, a stalled write ends the transfer, and past
//!   the connection cap a client gets 503 at once instead of a thread.
//! - One log line per request: client, method, path (never the token,
//!   escaped and shortened), status, body bytes actually sent, and why a
//!   transfer did not complete.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Seek as _, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::config::plan::Plan;
use crate::render::pxe;

/// How long a seed token from a per-MAC script stays valid.
pub const SEED_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// A request head (request line and headers) larger than this is refused
/// with 414: kiln's URLs are short, and a client must not make the server
/// buffer without end.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Request paths are shortened to this many characters (after escaping)
/// in log lines.
const MAX_LOGGED_PATH_CHARS: usize = 200;

/// Buffer for sending files: the root image is hundreds of megabytes.
const BUFFER_BYTES: usize = 256 * 1024;

/// How often a waiting connection or the accept loop looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(25);

/// Bounds on what clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive within this (an idle kept-alive
    /// connection is closed after it too).
    pub read_timeout: Duration,
    /// A single write that makes no progress for this long ends the
    /// transfer (a slow but moving download is not cut off).
    pub write_timeout: Duration,
    /// Connections served at once; more get 503 and are closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_connections: 64,
        }
    }
}

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
    /// The seed was fetched with it: kept until `until` to say so in the
    /// log when it comes again.
    used: bool,
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
    listener: TcpListener,
    limits: Limits,
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
        let manifest = crate::image::manifest::Manifest::read(&opts.out)?;
        if manifest.cluster != plan.cluster {
            bail!(
                "{} was built for cluster {:?}, not {} ({}): serve the output of this profile's build",
                opts.out.display(),
                manifest.cluster,
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
        let listener = TcpListener::bind(opts.listen)
            .with_context(|| format!("cannot listen on {}", opts.listen))?;
        // Accept without blocking, to see the stop flag.
        listener
            .set_nonblocking(true)
            .with_context(|| format!("setting up the socket on {}", opts.listen))?;
        let bound = listener
            .local_addr()
            .with_context(|| format!("the address of the socket on {}", opts.listen))?;
        let fallback_url = opts
            .url
            .clone()
            .or_else(|| default_url(bound))
            .unwrap_or_else(|| format!("http://127.0.0.1:{}", bound.port()));
        Ok(Server {
            listener,
            limits: Limits::default(),
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

    /// Other bounds than [`Limits::default`] (tests: short timeouts).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound socket")
    }

    /// Nodes that can netboot (have a per-MAC script), by MAC script path.
    pub fn nodes(&self) -> Vec<String> {
        self.state.macs.values().cloned().collect()
    }

    /// The name of this server's connection threads (`/proc/*/task/*/comm`
    /// holds 15 bytes): one per connection, at most
    /// [`Limits::max_connections`].
    pub fn thread_name(&self) -> String {
        format!("serve:{}", self.addr().port())
    }

    /// Serve until `stop` is set; requests in flight finish, idle
    /// connections are closed.
    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        let open = AtomicUsize::new(0);
        let name = self.thread_name();
        std::thread::scope(|s| {
            while !stop.load(Ordering::SeqCst) {
                let (conn, peer) = match self.listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(STOP_POLL);
                        continue;
                    }
                    // Out of file descriptors, a connection reset before
                    // it was accepted: the server itself is fine.
                    Err(e) => {
                        (self.state.log)(&format!("kiln serve: accepting a connection: {e}"));
                        std::thread::sleep(STOP_POLL);
                        continue;
                    }
                };
                if open.load(Ordering::SeqCst) >= self.limits.max_connections {
                    refuse(&self.state, conn, peer, self.limits.max_connections);
                    continue;
                }
                open.fetch_add(1, Ordering::SeqCst);
                let (state, limits, open) = (&*self.state, self.limits, &open);
                let spawned =
                    std::thread::Builder::new()
                        .name(name.clone())
                        .spawn_scoped(s, move || {
                            serve_connection(state, conn, peer, limits, stop);
                            open.fetch_sub(1, Ordering::SeqCst);
                        });
                if let Err(e) = spawned {
                    open.fetch_sub(1, Ordering::SeqCst);
                    (self.state.log)(&format!(
                        "kiln serve: no thread for a connection from {}: {e}",
                        peer.ip()
                    ));
                }
            }
        });
        Ok(())
    }
}

/// Past the connection cap: a 503 if the socket takes it at once, then close.
fn refuse(state: &State, mut conn: TcpStream, peer: SocketAddr, max: usize) {
    let body = format!("kiln serve: too many connections ({max}); try again\n");
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\nServer: kiln\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // Never wait on this client: the accept loop serves everyone.
    let _ = conn.set_nonblocking(true);
    let sent = match conn.write_all(msg.as_bytes()) {
        Ok(()) => body.len(),
        Err(_) => 0,
    };
    let _ = conn.shutdown(std::net::Shutdown::Both);
    (state.log)(&format!(
        "{} - - 503 {sent} (refused: {max} connections open)",
        peer.ip()
    ));
}

/// A parsed request head.
struct Head {
    method: String,
    /// The request target as sent: path and query.
    target: String,
    http11: bool,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// Whether the connection may carry another request after this one.
    fn keep_alive(&self) -> bool {
        let conn = self.header("Connection").unwrap_or("").to_ascii_lowercase();
        let wants = if self.http11 {
            !conn.contains("close")
        } else {
            conn.contains("keep-alive")
        };
        // A request body is never read: the next request would start in it.
        let body = self.header("Transfer-Encoding").is_some()
            || self
                .header("Content-Length")
                .is_some_and(|l| l.trim() != "0");
        wants && !body
    }
}

/// The method and path of the first line of a (maybe partial) head, for
/// the log.
fn first_line_parts(raw: &[u8]) -> (String, String) {
    let line = raw.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let method = parts.next().filter(|m| !m.is_empty()).unwrap_or("-");
    let target = parts.next().unwrap_or("-");
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    (method.to_string(), path.to_string())
}

fn parse_head(raw: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if first.next().is_some() || method.is_empty() || target.is_empty() {
        return None;
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return None,
    };
    let mut headers = Vec::new();
    for l in lines.take_while(|l| !l.is_empty()) {
        let (n, v) = l.split_once(':')?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    Some(Head {
        method: method.to_string(),
        target: target.to_string(),
        http11,
        headers,
    })
}

enum HeadRead {
    /// A whole head (without its blank line).
    Head(Vec<u8>),
    /// Part of a head, and the read timeout passed.
    TimedOut(Vec<u8>),
    /// More than [`MAX_HEAD_BYTES`] without the end of the head.
    TooLong(Vec<u8>),
    /// The client closed, or nothing came before the timeout or the stop.
    Closed,
}

/// Read one request head from `conn`; `buf` holds what came after the
/// previous one (pipelined requests) and keeps what comes after this one.
fn read_head(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    limits: Limits,
    stop: &AtomicBool,
) -> HeadRead {
    let deadline = Instant::now() + limits.read_timeout;
    let mut chunk = [0u8; 4096];
    let mut searched: usize = 0;
    loop {
        if let Some(i) = buf[searched.saturating_sub(3)..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            let end = searched.saturating_sub(3) + i;
            let head = buf[..end].to_vec();
            buf.drain(..end + 4);
            return HeadRead::Head(head);
        }
        searched = buf.len();
        if buf.len() > MAX_HEAD_BYTES {
            return HeadRead::TooLong(std::mem::take(buf));
        }
        let now = Instant::now();
        if now >= deadline {
            return if buf.is_empty() {
                HeadRead::Closed
            } else {
                HeadRead::TimedOut(std::mem::take(buf))
            };
        }
        if buf.is_empty() && stop.load(Ordering::SeqCst) {
            return HeadRead::Closed;
        }
        if conn
            .set_read_timeout(Some((deadline - now).min(STOP_POLL)))
            .is_err()
        {
            return HeadRead::Closed;
        }
        match conn.read(&mut chunk) {
            Ok(0) => return HeadRead::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return HeadRead::Closed,
        }
    }
}

/// Serve the requests of one connection, one after the other.
fn serve_connection(
    state: &State,
    mut conn: TcpStream,
    peer: SocketAddr,
    limits: Limits,
    stop: &AtomicBool,
) {
    let client = peer.ip();
    if conn.set_nonblocking(false).is_err()
        || conn.set_write_timeout(Some(limits.write_timeout)).is_err()
    {
        return;
    }
    let mut buf = Vec::new();
    loop {
        let (method, path, reply, keep) = match read_head(&mut conn, &mut buf, limits, stop) {
            HeadRead::Closed => return,
            HeadRead::TimedOut(part) => {
                let (m, p) = first_line_parts(&part);
                let msg = format!(
                    "no whole request within {} s",
                    limits.read_timeout.as_secs_f32()
                );
                (m, p, error(408, &msg), false)
            }
            HeadRead::TooLong(part) => {
                let (m, p) = first_line_parts(&part);
                let msg = format!("request head longer than {MAX_HEAD_BYTES} bytes");
                (m, p, error(414, &msg), false)
            }
            HeadRead::Head(raw) => match parse_head(&raw) {
                None => {
                    let (m, p) = first_line_parts(&raw);
                    (m, p, error(400, "not an HTTP/1.x request"), false)
                }
                Some(head) => {
                    let reply = respond(state, &head, client);
                    let keep = head.keep_alive() && !stop.load(Ordering::SeqCst);
                    (head.method.clone(), head.path().to_string(), reply, keep)
                }
            },
        };
        let head_only = method == "HEAD";
        let (sent, outcome) = send(
            &mut conn,
            reply.status,
            reply.headers,
            reply.body,
            head_only,
            keep,
        );
        let mut line = format!(
            "{client} {} {} {} {sent}",
            log_escape(&method, 16),
            log_escape(&path, MAX_LOGGED_PATH_CHARS),
            reply.status
        );
        if let Err(why) = &outcome {
            line.push_str(&format!(" of {} (aborted: {why})", reply.len));
        }
        if let Some(note) = reply.note {
            line.push_str(&format!(" ({note})"));
        }
        (state.log)(&line);
        if !keep || outcome.is_err() {
            return;
        }
    }
}

/// A log-safe rendering of a client-supplied string: printable ASCII as
/// is, every other byte (control characters such as ESC, non-ASCII,
/// space) as `\xNN`, `\` as `\\`; at most `max` characters, then `…`.
fn log_escape(s: &str, max: usize) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        let piece = match b {
            b'\\' => "\\\\".to_string(),
            0x21..=0x7e => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        };
        if out.len() + piece.len() > max {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Write the response; the body bytes that reached the socket, and why
/// not all of them did.
fn send(
    conn: &mut TcpStream,
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Body,
    head_only: bool,
    keep: bool,
) -> (u64, Result<(), String>) {
    let mut h = format!("HTTP/1.1 {status} {}\r\nServer: kiln\r\n", reason(status));
    for (n, v) in &headers {
        h.push_str(&format!("{n}: {v}\r\n"));
    }
    h.push_str(&format!(
        "Content-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep { "keep-alive" } else { "close" }
    ));
    if let Err(e) = conn.write_all(h.as_bytes()) {
        return (0, Err(format!("sending the head: {e}")));
    }
    if head_only {
        return (0, Ok(()));
    }
    let (mut reader, len): (Box<dyn Read>, u64) = match body {
        Body::Bytes(b) => {
            let n = b.len() as u64;
            (Box::new(std::io::Cursor::new(b)), n)
        }
        Body::File(f, n) => (Box::new(f.take(n)), n),
    };
    let mut buf = vec![0u8; BUFFER_BYTES.min(len.max(1) as usize)];
    let mut sent = 0u64;
    while sent < len {
        let n = match reader.read(&mut buf) {
            Ok(0) => {
                return (
                    sent,
                    Err("the file is shorter than when it was opened".into()),
                );
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return (sent, Err(format!("reading the file: {e}"))),
        };
        if let Err(e) = conn.write_all(&buf[..n]) {
            // write_all does not say how much of the buffer went out.
            return (sent, Err(format!("client gone or stalled: {e}")));
        }
        sent += n as u64;
    }
    (sent, Ok(()))
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

/// `openat(2)` relative to `dir` (or the working directory).
fn open_at(dir: Option<&OwnedFd>, name: &OsStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let c = CString::new(name.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid C string; the returned descriptor is owned here.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open `rel` (components from [`target`]) under `tree` as a regular
/// file, never through a symlink, never opening a FIFO or a device:
/// every directory on the way is opened with O_NOFOLLOW relative to the
/// one before, the last component first as O_PATH (which opens nothing)
/// to check its type, then for reading, checked again on the open file.
/// `tree` itself may be a symlink: the operator chose it.
fn open_in_tree(tree: &Path, rel: &str) -> std::io::Result<File> {
    let not_regular = || std::io::Error::other("not a regular file");
    let mut dir = open_at(None, tree.as_os_str(), libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut parts = rel.split('/').peekable();
    while let Some(part) = parts.next() {
        let part = OsStr::new(part);
        if parts.peek().is_some() {
            dir = open_at(
                Some(&dir),
                part,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            )?;
            continue;
        }
        let probe = File::from(open_at(Some(&dir), part, libc::O_PATH | libc::O_NOFOLLOW)?);
        let before = probe.metadata()?;
        if !before.is_file() {
            return Err(not_regular());
        }
        // O_NONBLOCK: should a FIFO have taken its place meanwhile, the
        // open does not wait for a writer (and fstat below refuses it).
        let f = File::from(open_at(
            Some(&dir),
            part,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
        )?);
        let after = f.metadata()?;
        if !after.is_file() || (after.dev(), after.ino()) != (before.dev(), before.ino()) {
            return Err(not_regular());
        }
        return Ok(f);
    }
    Err(not_regular())
}

fn read_in_tree(tree: &Path, rel: &str) -> std::io::Result<String> {
    let mut s = String::new();
    open_in_tree(tree, rel)?.read_to_string(&mut s)?;
    Ok(s)
}

enum Body {
    Bytes(Vec<u8>),
    /// A file positioned at the first byte to send, and how many to send.
    File(File, u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, n) => *n,
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Body,
    /// The body's length, for the log of an aborted transfer.
    len: u64,
    /// Said in the log line after the bytes.
    note: Option<&'static str>,
}

fn text(status: u16, body: String, content_type: &str) -> Reply {
    let body = Body::Bytes(body.into_bytes());
    Reply {
        status,
        headers: vec![("Content-Type", content_type.to_string())],
        len: body.len(),
        body,
        note: None,
    }
}

fn error(status: u16, msg: &str) -> Reply {
    text(status, format!("kiln serve: {msg}\n"), "text/plain")
}

/// What a seed token opens.
enum SeedToken {
    /// This node's seed, for this client: now used up.
    Opens,
    /// It did, once: a second fetch.
    Used,
    /// Nothing (unknown, expired, another node's or another client's).
    Refused,
}

fn use_seed_token(
    state: &State,
    token: &str,
    node: &str,
    client: IpAddr,
    spend: bool,
) -> SeedToken {
    if token.is_empty() {
        return SeedToken::Refused;
    }
    let mut g = state.grants.lock().unwrap();
    let now = Instant::now();
    g.retain(|_, v| v.until > now);
    match g.get_mut(token) {
        Some(gr) if gr.node == node && gr.client == client => {
            if gr.used {
                SeedToken::Used
            } else {
                gr.used |= spend;
                SeedToken::Opens
            }
        }
        _ => SeedToken::Refused,
    }
}

fn respond(state: &State, req: &Head, client: IpAddr) -> Reply {
    if !matches!(req.method.as_str(), "GET" | "HEAD") {
        return error(405, "only GET and HEAD");
    }
    let Some(t) = target(req.path()) else {
        return error(404, "not found");
    };
    let base = req
        .header("Host")
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .map(|h| format!("http://{h}"))
        .unwrap_or_else(|| state.fallback_url.clone());
    match t {
        Target::BootScript => match read_in_tree(&state.tree, pxe::BOOT_SCRIPT) {
            Ok(s) => text(200, pxe::render(&s, &base), "text/plain"),
            Err(_) => error(404, "not found"),
        },
        Target::MacScript(rel) => {
            let Some(node) = state.macs.get(&rel) else {
                return error(404, "no node of this cluster has that MAC");
            };
            let Ok(script) = read_in_tree(&state.tree, &rel) else {
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
                        used: false,
                    },
                );
            }
            let seed = format!("/{}", pxe::seed_path(node));
            let script = script.replace(&seed, &format!("{seed}?token={token}"));
            text(200, pxe::render(&script, &base), "text/plain")
        }
        Target::Seed(node) => {
            let key = query_value(req.query(), "key");
            let update = !key.is_empty()
                && state
                    .update_keys
                    .get(&node)
                    .is_some_and(|k| ct_eq(k.as_bytes(), key.as_bytes()));
            // A HEAD sends no secret: it does not spend the token.
            let spend = !update && req.method == "GET";
            match use_seed_token(
                state,
                query_value(req.query(), "token"),
                &node,
                client,
                spend,
            ) {
                SeedToken::Opens => {}
                _ if update => {}
                SeedToken::Used => {
                    let mut r = error(
                        403,
                        "this seed token was used already: a token opens its seed once; fetch the node's per-MAC script again for a new one",
                    );
                    r.note = Some("seed token already used");
                    return r;
                }
                SeedToken::Refused => {
                    return error(
                        403,
                        "a node seed is served only with the token of its per-MAC script (to the same client) or the node's update key",
                    );
                }
            }
            file(req, &state.tree, &pxe::seed_path(&node))
        }
        Target::File(name) => file(req, &state.tree, &name),
    }
}

/// Equal in time independent of where they differ (tokens, keys).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn file(req: &Head, tree: &Path, rel: &str) -> Reply {
    let Ok(mut f) = open_in_tree(tree, rel) else {
        return error(404, "not found");
    };
    let Ok(meta) = f.metadata() else {
        return error(500, "cannot read the file");
    };
    let len = meta.len();
    // Content-Length, not chunks: wget and iPXE show progress by it.
    let mut headers = vec![
        ("Content-Type", "application/octet-stream".to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    match parse_range(req.header("Range"), len) {
        None => Reply {
            status: 200,
            headers,
            body: Body::File(f, len),
            len,
            note: None,
        },
        Some(Err(())) => {
            let mut r = error(416, "range not satisfiable");
            r.headers.push(("Content-Range", format!("bytes */{len}")));
            r
        }
        Some(Ok((start, end))) => {
            if f.seek(SeekFrom::Start(start)).is_err() {
                return error(500, "cannot read the file");
            }
            let n = end - start + 1;
            headers.push(("Content-Range", format!("bytes {start}-{end}/{len}")));
            Reply {
                status: 206,
                headers,
                body: Body::File(f, n),
                len: n,
                note: None,
            }
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

    #[test]
    fn log_paths_are_escaped_and_shortened() {
        assert_eq!(log_escape("/boot.ipxe", 200), "/boot.ipxe");
        // ESC, other controls, space, non-ASCII (C1 controls, bidi
        // overrides) and the escape character itself.
        assert_eq!(
            log_escape("/a\x1b[2Jb\u{9b}\u{202e} \\", 200),
            "/a\\x1b[2Jb\\xc2\\x9b\\xe2\\x80\\xae\\x20\\\\"
        );
        let long = format!("/{}", "a".repeat(100_000));
        let shown = log_escape(&long, MAX_LOGGED_PATH_CHARS);
        assert_eq!(shown, format!("/{}…", "a".repeat(199)));
        // Never a partial escape before the ellipsis.
        let shown = log_escape(&"\x01".repeat(100), 10);
        assert_eq!(shown, "\\x01\\x01…");
        assert!(
            log_escape(&"\x1b".repeat(1000), 200)
                .chars()
                .all(|c| !c.is_control())
        );
    }
}
