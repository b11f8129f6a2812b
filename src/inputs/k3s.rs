//! k3s binary resolution: find the k3s binary for a pinned release.
//!
//! In order: an explicit path (`--k3s-binary` / `KILN_K3S_BINARY`), the
//! per-version cache (`<cache>/<version>/k3s`, re-hashed on every use), or a
//! download from the release assets, checked against the release's
//! `sha256sum-amd64.txt` while streaming. The digest is then pinned in
//! `kiln.lock`, so a later build of the same version with other bytes (a
//! replaced release asset, a test double mixed with the real binary) fails.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use sha2::{Digest, Sha256};
use toml::{Table, Value};
use ureq::tls::{RootCerts, TlsConfig};

use crate::util::cancel::Cancel;

/// Where k3s releases publish their assets: `<base>/<version>/<asset>`.
pub const DEFAULT_BASE_URL: &str = "https://github.com/k3s-io/k3s/releases/download";
/// The amd64 binary, as named in a release and in the cache.
const BINARY_NAME: &str = "k3s";
/// Release asset with one `<sha256>  <asset>` line per amd64 asset.
const CHECKSUM_ASSET: &str = "sha256sum-amd64.txt";
/// Next to a cached binary: its digest, in `sha256sum` format.
const DIGEST_FILE: &str = "k3s.sha256";
/// Table of `kiln.lock` holding the k3s pin.
const LOCK_TABLE: &str = "k3s";
/// Copy buffer for streaming the ~70 MB binary.
const BUFFER_BYTES: usize = 1 << 20;
/// The checksum file is a few lines; refuse anything larger.
const CHECKSUM_FILE_MAX_BYTES: u64 = 1 << 20;
/// Give up on an unreachable host after this long.
const CONNECT_TIMEOUT_SECS: u64 = 30;
/// Give up on a server that sends nothing for this long, while answering
/// or in the middle of a body: it has stalled (a slow link still delivers
/// something every few seconds).
const STALL_TIMEOUT_SECS: u64 = 60;
/// Give up on one request after this long in all: the ~70 MB binary at
/// 20 KB/s. Bounds a server that trickles a byte just often enough never to
/// stall.
const REQUEST_TIMEOUT_SECS: u64 = 3600;

/// Where a resolved k3s binary came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A path the user gave (`--k3s-binary` or `KILN_K3S_BINARY`).
    Explicit,
    /// The per-version cache, re-hashed and matching its recorded digest.
    Cache,
    /// Downloaded now, verified against the release checksum file.
    Download,
}

/// A k3s binary ready to be put into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedK3s {
    /// The binary on disk.
    pub path: PathBuf,
    /// The release tag it is for, e.g. `v1.31.1+k3s1`.
    pub version: String,
    /// Lowercase hex sha256 of the binary's bytes.
    pub sha256: String,
    /// How it was found.
    pub source: Source,
}

/// Finds the k3s binary for a version: explicit path, then cache, then download.
#[derive(Debug, Clone)]
pub struct Resolver {
    cache_dir: PathBuf,
    base_url: String,
    lock_path: PathBuf,
    record_lock: bool,
    stall_timeout: Duration,
    cancel: Cancel,
}

impl Resolver {
    /// A resolver caching under `cache_dir` and pinning digests in `lock_path`
    /// (the `kiln.lock` next to the profile), downloading from [`DEFAULT_BASE_URL`].
    #[must_use]
    pub fn new(cache_dir: impl Into<PathBuf>, lock_path: impl Into<PathBuf>) -> Self {
        Resolver {
            cache_dir: cache_dir.into(),
            base_url: DEFAULT_BASE_URL.to_owned(),
            lock_path: lock_path.into(),
            record_lock: true,
            stall_timeout: Duration::from_secs(STALL_TIMEOUT_SECS),
            cancel: Cancel::default(),
        }
    }

    /// Download release assets from `base_url` instead (a mirror, or a test server).
    #[must_use]
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into().trim_end_matches('/').to_owned();
        self
    }

    /// Whether to check and record the digest in the lock file (default true).
    ///
    /// With `false` the lock file is neither read nor written: for test
    /// doubles, which must never be pinned in place of the real binary.
    #[must_use]
    pub fn with_lock_recording(mut self, record_lock: bool) -> Self {
        self.record_lock = record_lock;
        self
    }

    /// Fail a download when the server sends nothing for `stall_timeout`
    /// (default 60 s): a stalled mirror, or a test that cannot wait a minute.
    #[must_use]
    pub fn with_stall_timeout(mut self, stall_timeout: Duration) -> Self {
        self.stall_timeout = stall_timeout;
        self
    }

    /// Stop a download under way when `cancel` is set (an interruption;
    /// nothing is cached).
    #[must_use]
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// Where the cached binary for `version` lives (or would live).
    #[must_use]
    pub fn cached_binary_path(&self, version: &str) -> PathBuf {
        self.cache_dir.join(version).join(BINARY_NAME)
    }

    /// Resolve the k3s binary for `version` (a release tag like `v1.31.1+k3s1`).
    ///
    /// `explicit` is the path from `--k3s-binary` or `KILN_K3S_BINARY`, if any.
    /// Fails if the binary's digest differs from the one `kiln.lock` pins for
    /// this version; records the digest there on first resolve.
    ///
    /// # Errors
    /// An unreadable explicit path or lock file, a cached binary that no longer
    /// matches its recorded digest, a failed or corrupt download (the message
    /// says how to supply the binary offline), or a digest the lock disagrees with.
    pub fn resolve(&self, version: &str, explicit: Option<&Path>) -> Result<ResolvedK3s> {
        ensure!(
            !version.is_empty() && !version.contains(['/', '\\']) && !version.starts_with('.'),
            "invalid k3s version {version:?}: expected a release tag like v1.31.1+k3s1"
        );
        let mut lock = self
            .record_lock
            .then(|| read_lock(&self.lock_path))
            .transpose()?;
        let pinned = match &lock {
            Some(table) => lock_pin(table, &self.lock_path)?
                .filter(|(v, _)| v == version)
                .map(|(_, sha)| sha),
            None => None,
        };
        let resolved = match explicit {
            Some(path) => resolve_explicit(version, path)?,
            None => match self.resolve_cached(version)? {
                Some(cached) => cached,
                None => self.download(version, pinned.as_deref())?,
            },
        };
        if let Some(table) = &mut lock {
            match pinned {
                Some(pin) if pin != resolved.sha256 => {
                    return Err(lock_mismatch(&resolved, &pin, &self.lock_path));
                }
                Some(_) => {}
                None => record_pin(table, &resolved, &self.lock_path)?,
            }
        }
        Ok(resolved)
    }

    /// The cached binary, if there is one. A binary placed there by hand
    /// (no recorded digest yet) is adopted: hashed and its digest recorded.
    fn resolve_cached(&self, version: &str) -> Result<Option<ResolvedK3s>> {
        let path = self.cached_binary_path(version);
        if !path.is_file() {
            return Ok(None);
        }
        let sha256 = crate::util::hash::sha256_file(&path)?;
        let digest_path = path.with_file_name(DIGEST_FILE);
        match fs::read_to_string(&digest_path) {
            Ok(text) => {
                let recorded = crate::util::hash::sha256sums_lookup(&text, BINARY_NAME)
                    .with_context(|| {
                        format!(
                            "reading {}: no `<sha256>  {BINARY_NAME}` line",
                            digest_path.display()
                        )
                    })?;
                ensure!(
                    recorded == sha256,
                    "cached k3s {version} at {} is corrupt: recorded sha256 {recorded}, actual \
                     {sha256}\nhint: delete {} to download it again",
                    path.display(),
                    path.parent().unwrap_or(&path).display()
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                crate::util::atomic::write_atomically(
                    &digest_path,
                    format!("{sha256}  {BINARY_NAME}\n").as_bytes(),
                    0o644,
                )?;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", digest_path.display())),
        }
        Ok(Some(ResolvedK3s {
            path,
            version: version.to_owned(),
            sha256,
            source: Source::Cache,
        }))
    }

    /// Download the binary into the cache, verifying it against the release
    /// checksum file (and against the lock's pin, before fetching the binary).
    fn download(&self, version: &str, pinned: Option<&str>) -> Result<ResolvedK3s> {
        let release_url = format!("{}/{}", self.base_url, encode_path_segment(version));
        let sums_url = format!("{release_url}/{CHECKSUM_ASSET}");
        let binary_url = format!("{release_url}/{BINARY_NAME}");
        let cached = self.cached_binary_path(version);
        let unavailable = |url: &str, why: &dyn std::fmt::Display| {
            anyhow!(
                "k3s {version} is not cached and could not be downloaded from {url}: {why}\n\
                 hint: supply the binary with `--k3s-binary PATH` or `KILN_K3S_BINARY=PATH`, \
                 or place it at {} (it is hashed and pinned on first use)",
                cached.display()
            )
        };
        let agent = ureq::Agent::config_builder()
            .tls_config(
                TlsConfig::builder()
                    .root_certs(RootCerts::PlatformVerifier)
                    .build(),
            )
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(CONNECT_TIMEOUT_SECS)))
            .timeout_per_read(Some(self.stall_timeout))
            .timeout_per_call(Some(Duration::from_secs(REQUEST_TIMEOUT_SECS)))
            .build()
            .new_agent();
        let failed =
            |url: &str, e: &(dyn std::error::Error + 'static)| unavailable(url, &self.why(e));
        let get = |url: &str, what: &str| -> Result<ureq::Body> {
            let response = agent.get(url).call().map_err(|e| failed(url, &e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(unavailable(url, &format!("{what}: HTTP {status}")));
            }
            Ok(response.into_body())
        };

        let sums = get(&sums_url, "release checksum file")?
            .with_config()
            .limit(CHECKSUM_FILE_MAX_BYTES)
            .read_to_string()
            .map_err(|e| failed(&sums_url, &e))?;
        let expected =
            crate::util::hash::sha256sums_lookup(&sums, BINARY_NAME).with_context(|| {
                format!(
                    "release checksum file {sums_url} has no valid `<sha256>  {BINARY_NAME}` line"
                )
            })?;
        if let Some(pin) = pinned
            && pin != expected
        {
            bail!(
                "k3s {version}: release checksum file {sums_url} lists sha256 {expected}, but {} \
                 pins sha256 {pin}\nhint: if the change is intended, delete the [{LOCK_TABLE}] \
                 entry from {} and run again",
                self.lock_path.display(),
                self.lock_path.display()
            );
        }

        let mut body = get(&binary_url, "k3s binary")?.into_reader();
        fs::create_dir_all(&self.cache_dir)
            .with_context(|| format!("creating cache directory {}", self.cache_dir.display()))?;
        // In the cache dir, not the version dir: a failure leaves nothing behind.
        let mut staged = tempfile::Builder::new()
            .prefix(".k3s-download-")
            .tempfile_in(&self.cache_dir)
            .with_context(|| format!("creating a temp file in {}", self.cache_dir.display()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; BUFFER_BYTES];
        loop {
            self.cancel.check()?;
            let n = match body.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(failed(&binary_url, &e)),
            };
            hasher.update(&buffer[..n]);
            staged
                .write_all(&buffer[..n])
                .with_context(|| format!("writing {}", staged.path().display()))?;
        }
        let actual = hex::encode(hasher.finalize());
        ensure!(
            actual == expected,
            "k3s {version} downloaded from {binary_url} is corrupt: {CHECKSUM_ASSET} expects sha256 \
             {expected}, the download has sha256 {actual}; nothing was cached"
        );
        let file = staged.as_file();
        file.set_permissions(fs::Permissions::from_mode(0o755))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("finishing {}", staged.path().display()))?;
        let version_dir = cached.parent().expect("cache path has a parent");
        fs::create_dir_all(version_dir)
            .with_context(|| format!("creating cache directory {}", version_dir.display()))?;
        staged
            .persist(&cached)
            .map_err(|e| e.error)
            .with_context(|| format!("moving the download into place at {}", cached.display()))?;
        let digest_line = format!("{actual}  {BINARY_NAME}\n");
        crate::util::atomic::write_atomically(
            &cached.with_file_name(DIGEST_FILE),
            digest_line.as_bytes(),
            0o644,
        )?;
        Ok(ResolvedK3s {
            path: cached,
            version: version.to_owned(),
            sha256: actual,
            source: Source::Download,
        })
    }
}

impl Resolver {
    /// What went wrong with a request, in words: a timeout says the server
    /// stalled (or was too slow) and after how long; anything else as is.
    fn why(&self, e: &(dyn std::error::Error + 'static)) -> String {
        let stall = self.stall_timeout.as_secs_f64();
        match timeout_in(e) {
            Some(ureq::Timeout::PerRead) => format!("the server stalled: no data for {stall} s"),
            Some(ureq::Timeout::PerCall) => format!(
                "the server stalled or is too slow: the request took over \
                 {REQUEST_TIMEOUT_SECS} s"
            ),
            Some(ureq::Timeout::Connect) => {
                format!("no connection within {CONNECT_TIMEOUT_SECS} s ({e})")
            }
            Some(_) => format!("timed out ({e})"),
            None => e.to_string(),
        }
    }
}

/// The ureq timeout behind `e`, if any: the body reader wraps ureq's
/// errors in an `io::Error`, and ureq wraps I/O errors in its own.
fn timeout_in(e: &(dyn std::error::Error + 'static)) -> Option<ureq::Timeout> {
    if let Some(e) = e.downcast_ref::<ureq::Error>() {
        return match e {
            ureq::Error::Timeout(timeout) => Some(*timeout),
            ureq::Error::Io(io) => timeout_in(io),
            _ => None,
        };
    }
    timeout_in(e.downcast_ref::<io::Error>()?.get_ref()?)
}

/// The user's own binary: must be a regular file; hashed for the lock.
fn resolve_explicit(version: &str, path: &Path) -> Result<ResolvedK3s> {
    let meta = fs::metadata(path).with_context(|| {
        format!(
            "k3s binary {} (from --k3s-binary or KILN_K3S_BINARY)",
            path.display()
        )
    })?;
    ensure!(
        meta.is_file(),
        "k3s binary {} is not a regular file",
        path.display()
    );
    Ok(ResolvedK3s {
        path: path.to_path_buf(),
        version: version.to_owned(),
        sha256: crate::util::hash::sha256_file(path)?,
        source: Source::Explicit,
    })
}

fn lock_mismatch(resolved: &ResolvedK3s, pin: &str, lock_path: &Path) -> anyhow::Error {
    anyhow!(
        "k3s {} at {} has sha256 {}, but {} pins sha256 {pin} for that version\nhint: if the \
         change is intended (a rebuilt or different binary), delete the [{LOCK_TABLE}] entry \
         from {} and run again",
        resolved.version,
        resolved.path.display(),
        resolved.sha256,
        lock_path.display(),
        lock_path.display()
    )
}

/// The lock file as a table (empty if it does not exist yet); other tables are
/// kept as they are when the k3s pin is written back.
fn read_lock(path: &Path) -> Result<Table> {
    match fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("parsing lock file {}", path.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Table::new()),
        Err(e) => Err(e).with_context(|| format!("reading lock file {}", path.display())),
    }
}

/// The `(version, sha256)` pinned in `[k3s]`, if any.
fn lock_pin(lock: &Table, path: &Path) -> Result<Option<(String, String)>> {
    let Some(entry) = lock.get(LOCK_TABLE) else {
        return Ok(None);
    };
    let field = |key: &str| entry.get(key).and_then(Value::as_str).map(str::to_owned);
    match (field("version"), field("sha256")) {
        (Some(version), Some(sha256)) => Ok(Some((version, sha256))),
        _ => bail!(
            "lock file {}: [{LOCK_TABLE}] needs string keys `version` and `sha256`\nhint: delete \
             the [{LOCK_TABLE}] entry to have it recorded again",
            path.display()
        ),
    }
}

/// Pin `resolved` in `[k3s]`, replacing a pin for another version, and write
/// the lock file atomically.
fn record_pin(lock: &mut Table, resolved: &ResolvedK3s, path: &Path) -> Result<()> {
    let mut entry = Table::new();
    entry.insert("version".into(), Value::String(resolved.version.clone()));
    entry.insert("sha256".into(), Value::String(resolved.sha256.clone()));
    lock.insert(LOCK_TABLE.into(), Value::Table(entry));
    let text = toml::to_string(lock)
        .with_context(|| format!("serializing lock file {}", path.display()))?;
    crate::util::atomic::write_atomically(path, text.as_bytes(), 0o644)
}

/// Everything but RFC 3986 unreserved characters is percent-encoded.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode a path segment, so the `+` of a k3s tag becomes `%2B`
/// (a raw `+` in the path 404s on GitHub).
fn encode_path_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

/// Is this k3s binary kiln's test double? (`--version` says so.)
pub fn is_double(k3s: Option<&Path>) -> bool {
    let Some(p) = k3s else { return false };
    std::process::Command::new(p)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("k3s-double"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "a3f1c5e8b1d2c3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8";

    #[test]
    fn version_tag_plus_is_percent_encoded() {
        assert_eq!(encode_path_segment("v1.31.1+k3s1"), "v1.31.1%2Bk3s1");
        assert_eq!(encode_path_segment("v1.30.0-rc1~x_y"), "v1.30.0-rc1~x_y");
    }

    #[test]
    fn checksum_line_for_k3s_only() {
        let sums = format!(
            "{}  k3s-airgap-images-amd64.tar\n{}  k3s\n",
            "0".repeat(64),
            SHA_A.to_uppercase()
        );
        assert_eq!(
            crate::util::hash::sha256sums_lookup(&sums, "k3s").as_deref(),
            Some(SHA_A)
        );
        assert_eq!(
            crate::util::hash::sha256sums_lookup(&format!("{SHA_A} *k3s"), "k3s").as_deref(),
            Some(SHA_A)
        );
        assert_eq!(
            crate::util::hash::sha256sums_lookup("abc  k3s\n", "k3s"),
            None,
            "short digest rejected"
        );
        assert_eq!(
            crate::util::hash::sha256sums_lookup(&format!("{SHA_A}  k3s-arm64"), "k3s"),
            None
        );
    }

    #[test]
    fn recording_a_pin_keeps_other_tables_and_replaces_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let lock_path = dir.path().join("kiln.lock");
        fs::write(
            &lock_path,
            "[base]\nsha256 = \"x\"\n\n[k3s]\nversion = \"v1.30.0+k3s1\"\nsha256 = \"old\"\n",
        )
        .unwrap();
        let mut lock = read_lock(&lock_path).unwrap();
        let resolved = ResolvedK3s {
            path: "k3s".into(),
            version: "v1.31.1+k3s1".into(),
            sha256: SHA_A.into(),
            source: Source::Explicit,
        };
        record_pin(&mut lock, &resolved, &lock_path).unwrap();
        let reread = read_lock(&lock_path).unwrap();
        assert_eq!(reread["base"]["sha256"].as_str(), Some("x"));
        assert_eq!(
            lock_pin(&reread, &lock_path).unwrap(),
            Some(("v1.31.1+k3s1".to_owned(), SHA_A.to_owned()))
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers,
            vec!["kiln.lock"],
            "no temp file left beside the lock"
        );
    }

    #[test]
    fn malformed_lock_entry_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let lock_path = dir.path().join("kiln.lock");
        let lock: Table = toml::from_str("[k3s]\nversion = \"v1.31.1+k3s1\"\n").unwrap();
        let err = lock_pin(&lock, &lock_path).unwrap_err().to_string();
        assert!(err.contains("kiln.lock") && err.contains("sha256"), "{err}");
    }
}
