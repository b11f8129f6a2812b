//! k3s release assets (the binary, the air-gap image tarball) against a
//! fake release served on 127.0.0.1.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kiln::inputs::k3s::{AIRGAP_IMAGES, Resolver, Source};
use sha2::{Digest, Sha256};
use tiny_http::{Response, Server};

const VERSION: &str = "v1.31.1+k3s1";
/// How the release directory appears in URLs: `+` must arrive as `%2B`.
const RELEASE_PATH: &str = "/releases/download/v1.31.1%2Bk3s1";
const BINARY: &[u8] = b"#!/bin/sh\necho 'k3s test double'\n";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn checksum_file(binary: &[u8]) -> Vec<u8> {
    let other = "0".repeat(64);
    format!(
        "{other}  k3s-airgap-images-amd64.tar.zst\n{}  k3s\n",
        sha256_hex(binary)
    )
    .into_bytes()
}

/// An HTTP server answering GETs for a fixed set of paths, 404 otherwise.
struct FakeRelease {
    server: Option<Arc<Server>>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeRelease {
    fn serve(files: Vec<(&str, Vec<u8>)>) -> Self {
        Self::serve_paths(
            files
                .into_iter()
                .map(|(name, body)| (format!("{RELEASE_PATH}/{name}"), body))
                .collect(),
        )
    }

    /// Files by full URL path.
    fn serve_paths(files: Vec<(String, Vec<u8>)>) -> Self {
        let server = Arc::new(Server::http("127.0.0.1:0").unwrap());
        let addr = server.server_addr().to_ip().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (srv, log) = (Arc::clone(&server), Arc::clone(&requests));
        let thread = thread::spawn(move || {
            for request in srv.incoming_requests() {
                log.lock().unwrap().push(request.url().to_owned());
                let response = match files.iter().find(|(path, _)| path == request.url()) {
                    Some((_, body)) => Response::from_data(body.clone()),
                    None => Response::from_data(b"Not Found".to_vec()).with_status_code(404),
                };
                let _ = request.respond(response);
            }
        });
        FakeRelease {
            server: Some(server),
            thread: Some(thread),
            addr,
            requests,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}/releases/download", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Stop serving and wait until the port refuses connections.
    fn shut_down(&mut self) {
        if let Some(server) = self.server.take() {
            server.unblock();
            self.thread.take().unwrap().join().unwrap();
            drop(server);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(self.addr).is_ok() {
            assert!(
                Instant::now() < deadline,
                "fake release server still accepts connections"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeRelease {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.unblock();
        }
    }
}

/// Where a [`StallingRelease`] goes silent.
#[derive(Clone, Copy)]
enum Stall {
    /// Accept the request for the checksum file and never answer.
    BeforeHeaders,
    /// Serve the checksum file; answer the binary's request with its
    /// headers and the first KiB of a 1 MB body, then send nothing more.
    InBody,
}

/// A release server that stops sending and holds the connection open until
/// it is dropped (or 30 s pass), so only a client-side timeout ends the wait.
struct StallingRelease {
    addr: SocketAddr,
    _stop: mpsc::Sender<()>,
}

impl StallingRelease {
    fn serve(stall: Stall) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = mpsc::channel::<()>();
        let sums = checksum_file(BINARY);
        thread::spawn(move || {
            // At most the checksum file and the binary.
            for _ in 0..2 {
                let Ok((mut conn, _)) = listener.accept() else {
                    return;
                };
                let path = request_path(&mut conn);
                let silent = match stall {
                    Stall::BeforeHeaders => true,
                    Stall::InBody if path.ends_with("/sha256sum-amd64.txt") => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            sums.len()
                        );
                        let _ = conn.write_all(head.as_bytes());
                        let _ = conn.write_all(&sums);
                        false
                    }
                    Stall::InBody => {
                        let _ = conn.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n",
                        );
                        let _ = conn.write_all(&[b'x'; 1024]);
                        let _ = conn.flush();
                        true
                    }
                };
                if silent {
                    // Hold the connection open and silent; the test's end
                    // drops the sender and ends the wait.
                    let _ = stopped.recv_timeout(Duration::from_secs(30));
                    return;
                }
            }
        });
        StallingRelease { addr, _stop: stop }
    }

    fn base_url(&self) -> String {
        format!("http://{}/releases/download", self.addr)
    }
}

/// The path of the HTTP request on `conn` (its head read, the rest ignored).
fn request_path(conn: &mut TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head);
    head.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

/// All entries under `dir`, recursively, relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        let name = path.strip_prefix(dir).unwrap().display().to_string();
        if path.is_dir() {
            out.extend(tree(&path).into_iter().map(|p| format!("{name}/{p}")));
        }
        out.push(name);
    }
    out.sort();
    out
}

struct Setup {
    _dir: tempfile::TempDir,
    cache: std::path::PathBuf,
    lock: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (cache, lock) = (dir.path().join("cache"), dir.path().join("kiln.lock"));
    Setup {
        _dir: dir,
        cache,
        lock,
    }
}

#[test]
fn good_release_is_downloaded_cached_pinned_then_used_offline() {
    let s = setup();
    let mut release = FakeRelease::serve(vec![
        ("k3s", BINARY.to_vec()),
        ("sha256sum-amd64.txt", checksum_file(BINARY)),
    ]);
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());

    let first = resolver.resolve(VERSION, None).unwrap();
    assert_eq!(first.source, Source::Download);
    assert_eq!(first.sha256, sha256_hex(BINARY));
    assert_eq!(first.path, s.cache.join(VERSION).join("k3s"));
    assert_eq!(fs::read(&first.path).unwrap(), BINARY);
    assert_eq!(
        fs::metadata(&first.path).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        tree(&s.cache),
        vec![
            VERSION.to_owned(),
            format!("{VERSION}/k3s"),
            format!("{VERSION}/k3s.sha256")
        ]
    );
    let lock = fs::read_to_string(&s.lock).unwrap();
    assert!(
        lock.contains("[k3s]") && lock.contains(VERSION) && lock.contains(&first.sha256),
        "{lock}"
    );
    assert_eq!(
        release.requests(),
        vec![
            format!("{RELEASE_PATH}/sha256sum-amd64.txt"),
            format!("{RELEASE_PATH}/k3s")
        ]
    );

    release.shut_down();
    let second = resolver.resolve(VERSION, None).unwrap();
    assert_eq!(second.source, Source::Cache);
    assert_eq!((second.path, second.sha256), (first.path, first.sha256));
}

#[test]
fn corrupted_download_is_rejected_and_nothing_is_cached() {
    let s = setup();
    let release = FakeRelease::serve(vec![
        ("k3s", b"tampered".to_vec()),
        ("sha256sum-amd64.txt", checksum_file(BINARY)),
    ]);
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());
    let err = format!("{:#}", resolver.resolve(VERSION, None).unwrap_err());
    assert!(
        err.contains(&sha256_hex(BINARY)),
        "expected digest missing: {err}"
    );
    assert!(
        err.contains(&sha256_hex(b"tampered")),
        "actual digest missing: {err}"
    );
    assert!(err.contains("corrupt"), "{err}");
    assert_eq!(
        tree(&s.cache),
        Vec::<String>::new(),
        "cache must stay empty"
    );
    assert!(!s.lock.exists(), "a failed resolve must not write the lock");
}

#[test]
fn missing_checksum_file_is_a_clear_error() {
    let s = setup();
    let release = FakeRelease::serve(vec![("k3s", BINARY.to_vec())]);
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());
    let err = format!("{:#}", resolver.resolve(VERSION, None).unwrap_err());
    let url = format!("{}/v1.31.1%2Bk3s1/sha256sum-amd64.txt", release.base_url());
    assert!(
        err.contains(&url) && err.contains("checksum file") && err.contains("404"),
        "{err}"
    );
    assert_eq!(
        release.requests().len(),
        1,
        "the binary must not be fetched without a checksum"
    );
    assert!(!resolver.cached_binary_path(VERSION).exists());
}

#[test]
fn missing_binary_is_a_clear_error_with_ways_to_supply_it() {
    let s = setup();
    let release = FakeRelease::serve(vec![("sha256sum-amd64.txt", checksum_file(BINARY))]);
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());
    let err = format!("{:#}", resolver.resolve(VERSION, None).unwrap_err());
    let url = format!("{}/v1.31.1%2Bk3s1/k3s", release.base_url());
    assert!(
        err.contains(&url) && err.contains("404") && err.contains(VERSION),
        "{err}"
    );
    assert!(
        err.contains("--k3s-binary") && err.contains("KILN_K3S_BINARY"),
        "{err}"
    );
    assert_eq!(tree(&s.cache), Vec::<String>::new());
}

#[test]
fn offline_and_uncached_names_version_url_and_both_remedies() {
    let s = setup();
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let base = format!("http://{closed_port}/releases/download");
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(&base);
    let err = format!("{:#}", resolver.resolve(VERSION, None).unwrap_err());
    assert!(
        err.contains(VERSION) && err.contains(&format!("{base}/v1.31.1%2Bk3s1/")),
        "{err}"
    );
    assert!(
        err.contains("--k3s-binary PATH") && err.contains("KILN_K3S_BINARY"),
        "{err}"
    );
    assert!(
        err.contains(&resolver.cached_binary_path(VERSION).display().to_string()),
        "{err}"
    );
}

#[test]
fn lock_mismatch_is_a_hard_error_naming_both_digests_and_the_fix() {
    let s = setup();
    let double = s.cache.parent().unwrap().join("k3s-double");
    fs::write(&double, BINARY).unwrap();
    let pinned = "b".repeat(64);
    let lock_text = format!("[k3s]\nversion = \"{VERSION}\"\nsha256 = \"{pinned}\"\n");
    fs::write(&s.lock, &lock_text).unwrap();
    let resolver = Resolver::new(&s.cache, &s.lock);
    let err = format!(
        "{:#}",
        resolver.resolve(VERSION, Some(&double)).unwrap_err()
    );
    assert!(
        err.contains(&pinned) && err.contains(&sha256_hex(BINARY)),
        "{err}"
    );
    assert!(
        err.contains(&s.lock.display().to_string()) && err.contains("delete the [k3s] entry"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(&s.lock).unwrap(),
        lock_text,
        "the lock must not be rewritten"
    );

    // A download whose release checksum disagrees with the pin fails before fetching the binary.
    let release = FakeRelease::serve(vec![
        ("k3s", BINARY.to_vec()),
        ("sha256sum-amd64.txt", checksum_file(BINARY)),
    ]);
    let err = format!(
        "{:#}",
        resolver
            .clone()
            .with_base_url(release.base_url())
            .resolve(VERSION, None)
            .unwrap_err()
    );
    assert!(
        err.contains(&pinned) && err.contains(&sha256_hex(BINARY)),
        "{err}"
    );
    assert_eq!(release.requests().len(), 1);
    assert_eq!(tree(&s.cache), Vec::<String>::new());
}

#[test]
fn explicit_binary_wins_and_is_pinned_unless_recording_is_off() {
    let s = setup();
    let double = s.cache.parent().unwrap().join("k3s-double");
    fs::write(&double, BINARY).unwrap();
    let unreachable = "http://127.0.0.1:9/never-contacted";

    let unpinned = Resolver::new(&s.cache, &s.lock)
        .with_base_url(unreachable)
        .with_lock_recording(false);
    let resolved = unpinned.resolve(VERSION, Some(&double)).unwrap();
    assert_eq!(
        (resolved.source, resolved.path.as_path()),
        (Source::Explicit, double.as_path())
    );
    assert_eq!(resolved.sha256, sha256_hex(BINARY));
    assert!(
        !s.lock.exists(),
        "record_lock=false must not write the lock"
    );
    assert!(
        !s.cache.exists(),
        "an explicit binary is not copied into the cache"
    );

    let pinned = Resolver::new(&s.cache, &s.lock).with_base_url(unreachable);
    pinned.resolve(VERSION, Some(&double)).unwrap();
    let lock = fs::read_to_string(&s.lock).unwrap();
    assert!(
        lock.contains(VERSION) && lock.contains(&sha256_hex(BINARY)),
        "{lock}"
    );

    let err = format!(
        "{:#}",
        pinned
            .resolve(VERSION, Some(&s.cache.join("absent")))
            .unwrap_err()
    );
    assert!(
        err.contains("absent") && err.contains("--k3s-binary"),
        "{err}"
    );
}

#[test]
fn cache_is_rehashed_hand_placed_binaries_adopted_and_corruption_reported() {
    let s = setup();
    let resolver = Resolver::new(&s.cache, &s.lock)
        .with_base_url("http://127.0.0.1:9")
        .with_lock_recording(false);
    let cached = resolver.cached_binary_path(VERSION);
    fs::create_dir_all(cached.parent().unwrap()).unwrap();
    fs::write(&cached, BINARY).unwrap();

    let adopted = resolver.resolve(VERSION, None).unwrap();
    assert_eq!(
        (adopted.source, adopted.sha256.as_str()),
        (Source::Cache, sha256_hex(BINARY).as_str())
    );
    let record = fs::read_to_string(cached.with_file_name("k3s.sha256")).unwrap();
    assert_eq!(record, format!("{}  k3s\n", sha256_hex(BINARY)));

    fs::write(&cached, b"bit rot").unwrap();
    let err = format!("{:#}", resolver.resolve(VERSION, None).unwrap_err());
    assert!(
        err.contains(&sha256_hex(BINARY)) && err.contains(&sha256_hex(b"bit rot")),
        "{err}"
    );
    assert!(err.contains("delete"), "{err}");
}

/// `kiln upgrade --k3s` then a build: the new release is fetched and
/// verified, kiln.lock moves to it, and the base stays the cached one (its
/// spec does not involve k3s).
#[test]
fn a_k3s_bump_pins_the_new_release_and_keeps_the_base() {
    const B: &str = "v1.31.2+k3s1";
    const B_PATH: &str = "/releases/download/v1.31.2%2Bk3s1";
    let binary_b: &[u8] = b"#!/bin/sh\necho 'k3s test double B'\n";
    let s = setup();
    let release = FakeRelease::serve_paths(vec![
        (format!("{RELEASE_PATH}/k3s"), BINARY.to_vec()),
        (
            format!("{RELEASE_PATH}/sha256sum-amd64.txt"),
            checksum_file(BINARY),
        ),
        (format!("{B_PATH}/k3s"), binary_b.to_vec()),
        (
            format!("{B_PATH}/sha256sum-amd64.txt"),
            checksum_file(binary_b),
        ),
    ]);
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());
    resolver.resolve(VERSION, None).unwrap();

    let profile = std::path::Path::new("lab.toml");
    let text_a = "# the lab\n[cluster]\nname = \"lab\"\n\n[k3s]\nversion = \"v1.31.1+k3s1\" # pinned\n\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\n";
    let (old, text_b) = kiln::deliver::upgrade::set_k3s_version(profile, text_a, B).unwrap();
    assert_eq!(old, VERSION);
    assert_eq!(text_b, text_a.replace(VERSION, B));
    let plan_a = kiln::config::plan::plan_profile(profile, text_a).unwrap();
    let plan_b = kiln::config::plan::plan_profile(profile, &text_b).unwrap();
    let spec = |p: &kiln::config::plan::Plan| {
        kiln::inputs::base::spec_digest(&kiln::inputs::base::base_spec(p).expect("a Debian base"))
    };
    assert_eq!(
        spec(&plan_a),
        spec(&plan_b),
        "a k3s bump must not rebuild the base"
    );

    let b = resolver
        .resolve(&plan_b.k3s.version.to_string(), None)
        .unwrap();
    assert_eq!(b.source, Source::Download);
    assert_eq!(b.sha256, sha256_hex(binary_b));
    let lock = fs::read_to_string(&s.lock).unwrap();
    assert!(lock.contains(B) && lock.contains(&b.sha256), "{lock}");
    assert!(!lock.contains(VERSION), "the old pin is replaced: {lock}");
}

/// Resolve against a server that stalls at `stall`, with a 1 s stall
/// timeout: the error, and how long it took to come.
fn resolve_stalled(s: &Setup, stall: Stall) -> (String, String, Duration) {
    let release = StallingRelease::serve(stall);
    let resolver = Resolver::new(&s.cache, &s.lock)
        .with_base_url(release.base_url())
        .with_stall_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let err = format!("{:#}", resolver.resolve(VERSION, None).unwrap_err());
    (err, release.base_url(), started.elapsed())
}

#[test]
fn a_download_that_stalls_mid_body_fails_within_seconds_naming_the_url() {
    let s = setup();
    let (err, base, took) = resolve_stalled(&s, Stall::InBody);
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    let url = format!("{base}/v1.31.1%2Bk3s1/k3s");
    assert!(
        err.contains(&url) && err.contains("stalled: no data for 1 s"),
        "{err}"
    );
    assert!(
        err.contains("--k3s-binary PATH") && err.contains("KILN_K3S_BINARY"),
        "{err}"
    );
    assert_eq!(tree(&s.cache), Vec::<String>::new(), "nothing cached");
    assert!(!s.lock.exists(), "a failed resolve must not write the lock");
}

#[test]
fn a_server_that_never_answers_fails_within_seconds_naming_the_url() {
    let s = setup();
    let (err, base, took) = resolve_stalled(&s, Stall::BeforeHeaders);
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    let url = format!("{base}/v1.31.1%2Bk3s1/sha256sum-amd64.txt");
    assert!(err.contains(&url) && err.contains("stalled"), "{err}");
    assert!(!s.lock.exists());
}

// The release's air-gap image tarball: the same path as the binary, its
// own cache file and its own kiln.lock table.

const AIRGAP: &[u8] = b"(a zstd tar of images would be here)";
const AIRGAP_NAME: &str = "k3s-airgap-images-amd64.tar.zst";

/// A release checksum file listing both the binary and the air-gap tarball.
fn checksum_file_both(binary: &[u8], airgap: &[u8]) -> Vec<u8> {
    format!(
        "{}  {AIRGAP_NAME}\n{}  k3s\n",
        sha256_hex(airgap),
        sha256_hex(binary)
    )
    .into_bytes()
}

fn airgap_release(airgap: &[u8]) -> FakeRelease {
    FakeRelease::serve(vec![
        ("k3s", BINARY.to_vec()),
        (AIRGAP_NAME, airgap.to_vec()),
        ("sha256sum-amd64.txt", checksum_file_both(BINARY, AIRGAP)),
    ])
}

#[test]
fn airgap_tarball_is_downloaded_verified_cached_and_pinned_beside_the_binary() {
    let s = setup();
    let mut release = airgap_release(AIRGAP);
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());
    let binary = resolver.resolve(VERSION, None).unwrap();
    let first = resolver
        .resolve_asset(&AIRGAP_IMAGES, VERSION, None)
        .unwrap();
    assert_eq!(first.source, Source::Download);
    assert_eq!(first.sha256, sha256_hex(AIRGAP));
    assert_eq!(first.path, s.cache.join(VERSION).join(AIRGAP_NAME));
    assert_eq!(
        fs::metadata(&first.path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(
        tree(&s.cache),
        vec![
            VERSION.to_owned(),
            format!("{VERSION}/k3s"),
            format!("{VERSION}/{AIRGAP_NAME}"),
            format!("{VERSION}/{AIRGAP_NAME}.sha256"),
            format!("{VERSION}/k3s.sha256"),
        ]
    );
    let lock: toml::Table = toml::from_str(&fs::read_to_string(&s.lock).unwrap()).unwrap();
    assert_eq!(lock["k3s"]["sha256"].as_str(), Some(binary.sha256.as_str()));
    assert_eq!(
        lock["k3s-airgap-images"]["sha256"].as_str(),
        Some(first.sha256.as_str())
    );
    assert_eq!(lock["k3s-airgap-images"]["version"].as_str(), Some(VERSION));
    assert_eq!(
        kiln::inputs::k3s::pinned(&AIRGAP_IMAGES, &s.lock).unwrap(),
        Some((VERSION.to_owned(), first.sha256.clone()))
    );

    // Offline: the cache serves it, re-hashed.
    release.shut_down();
    let second = resolver
        .resolve_asset(&AIRGAP_IMAGES, VERSION, None)
        .unwrap();
    assert_eq!(second.source, Source::Cache);
    assert_eq!((second.path, second.sha256), (first.path, first.sha256));
}

#[test]
fn a_corrupt_airgap_download_is_refused_naming_both_digests_and_nothing_is_kept() {
    let s = setup();
    let release = airgap_release(b"truncated");
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());
    let err = format!(
        "{:#}",
        resolver
            .resolve_asset(&AIRGAP_IMAGES, VERSION, None)
            .unwrap_err()
    );
    assert!(
        err.contains("air-gap image tarball of k3s v1.31.1+k3s1")
            && err.contains("corrupt")
            && err.contains(&sha256_hex(AIRGAP))
            && err.contains(&sha256_hex(b"truncated")),
        "{err}"
    );
    assert_eq!(tree(&s.cache), Vec::<String>::new());
    assert!(!s.lock.exists());
}

#[test]
fn an_airgap_tarball_the_lock_does_not_pin_is_refused_from_file_cache_and_release() {
    let s = setup();
    let pinned = "c".repeat(64);
    let lock_text =
        format!("[k3s-airgap-images]\nversion = \"{VERSION}\"\nsha256 = \"{pinned}\"\n");
    fs::write(&s.lock, &lock_text).unwrap();
    let file = s.cache.parent().unwrap().join(AIRGAP_NAME);
    fs::write(&file, AIRGAP).unwrap();
    let release = airgap_release(AIRGAP);
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(release.base_url());

    // Given on the command line.
    let err = format!(
        "{:#}",
        resolver
            .resolve_asset(&AIRGAP_IMAGES, VERSION, Some(&file))
            .unwrap_err()
    );
    assert!(
        err.contains(&pinned)
            && err.contains(&sha256_hex(AIRGAP))
            && err.contains(&file.display().to_string())
            && err.contains("delete the [k3s-airgap-images] entry"),
        "{err}"
    );
    // From the release: the checksum file disagrees with the pin, so the
    // tarball is not even fetched.
    let err = format!(
        "{:#}",
        resolver
            .resolve_asset(&AIRGAP_IMAGES, VERSION, None)
            .unwrap_err()
    );
    assert!(
        err.contains(&pinned) && err.contains("checksum file"),
        "{err}"
    );
    assert_eq!(
        release.requests(),
        vec![format!("{RELEASE_PATH}/sha256sum-amd64.txt")]
    );
    // From the cache.
    let cached = resolver.cached_path(&AIRGAP_IMAGES, VERSION);
    fs::create_dir_all(cached.parent().unwrap()).unwrap();
    fs::write(&cached, AIRGAP).unwrap();
    let err = format!(
        "{:#}",
        resolver
            .resolve_asset(&AIRGAP_IMAGES, VERSION, None)
            .unwrap_err()
    );
    assert!(err.contains(&pinned), "{err}");
    assert_eq!(fs::read_to_string(&s.lock).unwrap(), lock_text);
}

#[test]
fn an_airgap_tarball_given_on_the_command_line_is_checked_against_the_pin_never_fetched() {
    let s = setup();
    let file = s.cache.parent().unwrap().join(AIRGAP_NAME);
    fs::write(&file, AIRGAP).unwrap();
    let unreachable = "http://127.0.0.1:9/never-contacted";
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(unreachable);
    let first = resolver
        .resolve_asset(&AIRGAP_IMAGES, VERSION, Some(&file))
        .unwrap();
    assert_eq!(
        (first.source, first.path.as_path()),
        (Source::Explicit, file.as_path())
    );
    assert!(
        !s.cache.exists(),
        "a given file is not copied into the cache"
    );
    // Pinned on first use; the same bytes pass again.
    assert_eq!(
        kiln::inputs::k3s::pinned(&AIRGAP_IMAGES, &s.lock).unwrap(),
        Some((VERSION.to_owned(), sha256_hex(AIRGAP)))
    );
    resolver
        .resolve_asset(&AIRGAP_IMAGES, VERSION, Some(&file))
        .unwrap();

    let err = format!(
        "{:#}",
        resolver
            .resolve_asset(&AIRGAP_IMAGES, VERSION, Some(&s.cache.join("absent")))
            .unwrap_err()
    );
    assert!(
        err.contains("absent")
            && err.contains("--airgap-images")
            && err.contains("KILN_AIRGAP_IMAGES"),
        "{err}"
    );
}

#[test]
fn offline_without_a_cached_airgap_tarball_says_how_to_supply_one() {
    let s = setup();
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let base = format!("http://{closed_port}/releases/download");
    let resolver = Resolver::new(&s.cache, &s.lock).with_base_url(&base);
    let err = format!(
        "{:#}",
        resolver
            .resolve_asset(&AIRGAP_IMAGES, VERSION, None)
            .unwrap_err()
    );
    assert!(
        err.contains("--airgap-images PATH")
            && err.contains("KILN_AIRGAP_IMAGES=PATH")
            && err.contains(
                &resolver
                    .cached_path(&AIRGAP_IMAGES, VERSION)
                    .display()
                    .to_string()
            ),
        "{err}"
    );
}
