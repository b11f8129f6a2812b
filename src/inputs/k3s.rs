//! k3s release assets: find the k3s binary, or the release's air-gap
//! image tarball, for a pinned release.
//!
//! Both are one [`Asset`] of the release and take the same path. In
//! order: an explicit path (`--k3s-binary` / `KILN_K3S_BINARY`,
//! `--airgap-images` / `KILN_AIRGAP_IMAGES`), the per-version cache
//! (`<cache>/<version>/<asset>`, re-hashed on every use), or a download
//! from the release assets, checked against the release's
//! `sha256sum-amd64.txt` while streaming. The digest is then pinned in
//! `kiln.lock` (one table per asset), so a later build of the same
//! version with other bytes (a replaced release asset, a test double
//! mixed with the real binary) fails.

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
/// Release asset with one `<sha256>  <asset>` line per amd64 asset (the
/// binary and the air-gap tarballs alike).
const CHECKSUM_ASSET: &str = "sha256sum-amd64.txt";
/// Copy buffer for streaming an asset.
const BUFFER_BYTES: usize = 1 << 20;
/// The checksum file is a few lines; refuse anything larger.
const CHECKSUM_FILE_MAX_BYTES: u64 = 1 << 20;
/// Give up on an unreachable host after this long.
const CONNECT_TIMEOUT_SECS: u64 = 30;
/// Give up on a server that sends nothing for this long, while answering
/// or in the middle of a body: it has stalled (a slow link still delivers
/// something every few seconds).
const STALL_TIMEOUT_SECS: u64 = 60;

/// One amd64 asset of a k3s release that kiln puts into images: how it
/// is named, cached, pinned, supplied by hand and talked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// File name in the release, and in the cache's version directory.
    pub name: &'static str,
    /// Table of `kiln.lock` holding its pin (`version`, `sha256`).
    pub lock_table: &'static str,
    /// What it is, before a version in messages ("k3s v1.31.1+k3s1").
    subject: &'static str,
    /// What it is, before a path in messages ("k3s binary /tmp/k3s").
    label: &'static str,
    /// "binary" or "tarball", in hints.
    noun: &'static str,
    /// The flag and environment variable that supply it by hand.
    flag: &'static str,
    env: &'static str,
    /// Mode of the cached file.
    mode: u32,
    /// Give up on one request after this long in all: bounds a server
    /// that trickles a byte just often enough never to stall.
    request_timeout_secs: u64,
}

/// The k3s binary (`k3s`, ~70 MB).
pub const BINARY: Asset = Asset {
    name: "k3s",
    lock_table: "k3s",
    subject: "k3s",
    label: "k3s binary",
    noun: "binary",
    flag: "--k3s-binary",
    env: "KILN_K3S_BINARY",
    mode: 0o755,
    // The ~70 MB binary at 20 KB/s.
    request_timeout_secs: 3600,
};

/// The release's air-gap image tarball for amd64: every image k3s runs
/// by default, as `docker save` writes them, zstd-compressed. The release
/// also has `.tar` and `.tar.gz` copies (listed in the same checksum
/// file); kiln downloads the smallest.
pub const AIRGAP_IMAGES: Asset = Asset {
    name: "k3s-airgap-images-amd64.tar.zst",
    lock_table: "k3s-airgap-images",
    subject: "the air-gap image tarball of k3s",
    label: "air-gap image tarball",
    noun: "tarball",
    flag: "--airgap-images",
    env: "KILN_AIRGAP_IMAGES",
    mode: 0o644,
    // A ~200 MB tarball at 20 KB/s.
    request_timeout_secs: 3 * 3600,
};

impl Asset {
    /// `<subject> <version>`, as messages name it.
    fn of(&self, version: &str) -> String {
        format!("{} {version}", self.subject)
    }

    /// Next to the cached asset: its digest, in `sha256sum` format.
    fn digest_file(&self) -> String {
        format!("{}.sha256", self.name)
    }
}

/// Where a resolved asset came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A path the user gave (`--k3s-binary` or `KILN_K3S_BINARY`, or the
    /// air-gap equivalents).
    Explicit,
    /// The per-version cache, re-hashed and matching its recorded digest.
    Cache,
    /// Downloaded now, verified against the release checksum file.
    Download,
}

/// A k3s release asset (the binary, or the air-gap image tarball) ready
/// to be put into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedK3s {
    /// The file on disk.
    pub path: PathBuf,
    /// The release tag it is for, e.g. `v1.31.1+k3s1`.
    pub version: String,
    /// Lowercase hex sha256 of the file's bytes.
    pub sha256: String,
    /// How it was found.
    pub source: Source,
}

/// Finds a k3s release asset for a version: explicit path, then cache,
/// then download.
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
        self.cached_path(&BINARY, version)
    }

    /// Where the cached `asset` for `version` lives (or would live).
    #[must_use]
    pub fn cached_path(&self, asset: &Asset, version: &str) -> PathBuf {
        self.cache_dir.join(version).join(asset.name)
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
        self.resolve_asset(&BINARY, version, explicit)
    }

    /// Resolve `asset` of release `version` as [`Resolver::resolve`] does
    /// the binary: `explicit`, else the cache, else a download; checked
    /// against, or pinned in, the asset's table of `kiln.lock`.
    ///
    /// # Errors
    /// As [`Resolver::resolve`].
    pub fn resolve_asset(
        &self,
        asset: &Asset,
        version: &str,
        explicit: Option<&Path>,
    ) -> Result<ResolvedK3s> {
        ensure!(
            !version.is_empty() && !version.contains(['/', '\\']) && !version.starts_with('.'),
            "invalid k3s version {version:?}: expected a release tag like v1.31.1+k3s1"
        );
        let mut lock = self
            .record_lock
            .then(|| read_lock(&self.lock_path))
            .transpose()?;
        let pinned = match &lock {
            Some(table) => lock_pin(table, asset.lock_table, &self.lock_path)?
                .filter(|(v, _)| v == version)
                .map(|(_, sha)| sha),
            None => None,
        };
        let resolved = match explicit {
            Some(path) => resolve_explicit(asset, version, path)?,
            None => match self.resolve_cached(asset, version)? {
                Some(cached) => cached,
                None => self.download(asset, version, pinned.as_deref())?,
            },
        };
        if let Some(table) = &mut lock {
            match pinned {
                Some(pin) if pin != resolved.sha256 => {
                    return Err(lock_mismatch(asset, &resolved, &pin, &self.lock_path));
                }
                Some(_) => {}
                None => record_pin(table, asset.lock_table, &resolved, &self.lock_path)?,
            }
        }
        Ok(resolved)
    }

    /// The cached asset, if there is one. A file placed there by hand
    /// (no recorded digest yet) is adopted: hashed and its digest recorded.
    fn resolve_cached(&self, asset: &Asset, version: &str) -> Result<Option<ResolvedK3s>> {
        let path = self.cached_path(asset, version);
        if !path.is_file() {
            return Ok(None);
        }
        let sha256 = crate::util::hash::sha256_file(&path)?;
        let digest_path = path.with_file_name(asset.digest_file());
        match fs::read_to_string(&digest_path) {
            Ok(text) => {
                let recorded = crate::util::hash::sha256sums_lookup(&text, asset.name)
                    .with_context(|| {
                        format!(
                            "reading {}: no `<sha256>  {}` line",
                            digest_path.display(),
                            asset.name
                        )
                    })?;
                ensure!(
                    recorded == sha256,
                    "cached {} at {} is corrupt: recorded sha256 {recorded}, actual \
                     {sha256}\nhint: delete {} to download it again",
                    asset.of(version),
                    path.display(),
                    path.display()
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                crate::util::atomic::write_atomically(
                    &digest_path,
                    format!("{sha256}  {}\n", asset.name).as_bytes(),
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

    /// Download the asset into the cache, verifying it against the release
    /// checksum file (and against the lock's pin, before fetching the asset).
    fn download(&self, asset: &Asset, version: &str, pinned: Option<&str>) -> Result<ResolvedK3s> {
        let release_url = format!("{}/{}", self.base_url, encode_path_segment(version));
        let sums_url = format!("{release_url}/{CHECKSUM_ASSET}");
        let asset_url = format!("{release_url}/{}", asset.name);
        let cached = self.cached_path(asset, version);
        let fetch = Fetch {
            resolver: self,
            asset,
            version,
            cached: &cached,
            agent: self.agent(asset),
        };
        let sums = fetch
            .get(&sums_url, "release checksum file")?
            .with_config()
            .limit(CHECKSUM_FILE_MAX_BYTES)
            .read_to_string()
            .map_err(|e| fetch.failed(&sums_url, &e))?;
        let expected =
            crate::util::hash::sha256sums_lookup(&sums, asset.name).with_context(|| {
                format!(
                    "release checksum file {sums_url} has no valid `<sha256>  {}` line",
                    asset.name
                )
            })?;
        if let Some(pin) = pinned
            && pin != expected
        {
            bail!(
                "{}: release checksum file {sums_url} lists sha256 {expected}, but {} \
                 pins sha256 {pin}\nhint: if the change is intended, delete the [{}] \
                 entry from {} and run again",
                asset.of(version),
                self.lock_path.display(),
                asset.lock_table,
                self.lock_path.display()
            );
        }
        let body = fetch.get(&asset_url, asset.label)?.into_reader();
        let actual = fetch.stream_into_cache(body, &asset_url, &expected)?;
        Ok(ResolvedK3s {
            path: cached,
            version: version.to_owned(),
            sha256: actual,
            source: Source::Download,
        })
    }

    /// An HTTP agent with the platform's roots and this resolver's timeouts.
    fn agent(&self, asset: &Asset) -> ureq::Agent {
        ureq::Agent::config_builder()
            .tls_config(
                TlsConfig::builder()
                    .root_certs(RootCerts::PlatformVerifier)
                    .build(),
            )
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(CONNECT_TIMEOUT_SECS)))
            .timeout_per_read(Some(self.stall_timeout))
            .timeout_per_call(Some(Duration::from_secs(asset.request_timeout_secs)))
            .build()
            .new_agent()
    }
}

/// One download of one asset: its requests and their errors.
struct Fetch<'a> {
    resolver: &'a Resolver,
    asset: &'a Asset,
    version: &'a str,
    /// Where the asset is cached once verified.
    cached: &'a Path,
    agent: ureq::Agent,
}

impl Fetch<'_> {
    /// The asset cannot be had from `url`, and how to supply it instead.
    fn unavailable(&self, url: &str, why: &dyn std::fmt::Display) -> anyhow::Error {
        let a = self.asset;
        anyhow!(
            "{} is not cached and could not be downloaded from {url}: {why}\n\
             hint: supply the {} with `{} PATH` or `{}=PATH`, \
             or place it at {} (it is hashed and pinned on first use)",
            a.of(self.version),
            a.noun,
            a.flag,
            a.env,
            self.cached.display()
        )
    }

    fn failed(&self, url: &str, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
        self.unavailable(url, &self.resolver.why(e, self.asset))
    }

    /// GET `url` (`what` names it in an HTTP error).
    fn get(&self, url: &str, what: &str) -> Result<ureq::Body> {
        let response = self
            .agent
            .get(url)
            .call()
            .map_err(|e| self.failed(url, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.unavailable(url, &format!("{what}: HTTP {status}")));
        }
        Ok(response.into_body())
    }

    /// Stream `body` into the cache, hashing it; keep it only if its
    /// sha256 is `expected`. Returns the digest.
    fn stream_into_cache(&self, mut body: impl Read, url: &str, expected: &str) -> Result<String> {
        let (cache_dir, asset) = (&self.resolver.cache_dir, self.asset);
        fs::create_dir_all(cache_dir)
            .with_context(|| format!("creating cache directory {}", cache_dir.display()))?;
        // In the cache dir, not the version dir: a failure leaves nothing behind.
        let mut staged = tempfile::Builder::new()
            .prefix(&format!(".{}-download-", asset.name))
            .tempfile_in(cache_dir)
            .with_context(|| format!("creating a temp file in {}", cache_dir.display()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; BUFFER_BYTES];
        loop {
            self.resolver.cancel.check()?;
            let n = match body.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.failed(url, &e)),
            };
            hasher.update(&buffer[..n]);
            staged
                .write_all(&buffer[..n])
                .with_context(|| format!("writing {}", staged.path().display()))?;
        }
        let actual = hex::encode(hasher.finalize());
        ensure!(
            actual == expected,
            "{} downloaded from {url} is corrupt: {CHECKSUM_ASSET} expects sha256 \
             {expected}, the download has sha256 {actual}; nothing was cached",
            asset.of(self.version)
        );
        let file = staged.as_file();
        file.set_permissions(fs::Permissions::from_mode(asset.mode))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("finishing {}", staged.path().display()))?;
        let version_dir = self.cached.parent().expect("cache path has a parent");
        fs::create_dir_all(version_dir)
            .with_context(|| format!("creating cache directory {}", version_dir.display()))?;
        staged
            .persist(self.cached)
            .map_err(|e| e.error)
            .with_context(|| {
                format!(
                    "moving the download into place at {}",
                    self.cached.display()
                )
            })?;
        crate::util::atomic::write_atomically(
            &self.cached.with_file_name(asset.digest_file()),
            format!("{actual}  {}\n", asset.name).as_bytes(),
            0o644,
        )?;
        Ok(actual)
    }
}

impl Resolver {
    /// What went wrong with a request, in words: a timeout says the server
    /// stalled (or was too slow) and after how long; anything else as is.
    fn why(&self, e: &(dyn std::error::Error + 'static), asset: &Asset) -> String {
        let stall = self.stall_timeout.as_secs_f64();
        match timeout_in(e) {
            Some(ureq::Timeout::PerRead) => format!("the server stalled: no data for {stall} s"),
            Some(ureq::Timeout::PerCall) => format!(
                "the server stalled or is too slow: the request took over {} s",
                asset.request_timeout_secs
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

/// The user's own copy: must be a regular file; hashed for the lock.
fn resolve_explicit(asset: &Asset, version: &str, path: &Path) -> Result<ResolvedK3s> {
    let meta = fs::metadata(path).with_context(|| {
        format!(
            "{} {} (from {} or {})",
            asset.label,
            path.display(),
            asset.flag,
            asset.env
        )
    })?;
    ensure!(
        meta.is_file(),
        "{} {} is not a regular file",
        asset.label,
        path.display()
    );
    Ok(ResolvedK3s {
        path: path.to_path_buf(),
        version: version.to_owned(),
        sha256: crate::util::hash::sha256_file(path)?,
        source: Source::Explicit,
    })
}

fn lock_mismatch(
    asset: &Asset,
    resolved: &ResolvedK3s,
    pin: &str,
    lock_path: &Path,
) -> anyhow::Error {
    anyhow!(
        "{} at {} has sha256 {}, but {} pins sha256 {pin} for that version\nhint: if the \
         change is intended (a rebuilt or different {}), delete the [{}] entry \
         from {} and run again",
        asset.of(&resolved.version),
        resolved.path.display(),
        resolved.sha256,
        lock_path.display(),
        asset.noun,
        asset.lock_table,
        lock_path.display()
    )
}

/// The lock file as a table (empty if it does not exist yet); other tables are
/// kept as they are when a pin is written back.
fn read_lock(path: &Path) -> Result<Table> {
    match fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("parsing lock file {}", path.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Table::new()),
        Err(e) => Err(e).with_context(|| format!("reading lock file {}", path.display())),
    }
}

/// The `(version, sha256)` that `kiln.lock` at `lock_path` pins for
/// `asset`, if any (a missing lock file pins nothing).
///
/// # Errors
/// An unreadable or malformed lock file.
pub fn pinned(asset: &Asset, lock_path: &Path) -> Result<Option<(String, String)>> {
    lock_pin(&read_lock(lock_path)?, asset.lock_table, lock_path)
}

/// The `(version, sha256)` pinned in `[<table>]`, if any.
fn lock_pin(lock: &Table, table: &str, path: &Path) -> Result<Option<(String, String)>> {
    let Some(entry) = lock.get(table) else {
        return Ok(None);
    };
    let field = |key: &str| entry.get(key).and_then(Value::as_str).map(str::to_owned);
    match (field("version"), field("sha256")) {
        (Some(version), Some(sha256)) => Ok(Some((version, sha256))),
        _ => bail!(
            "lock file {}: [{table}] needs string keys `version` and `sha256`\nhint: delete \
             the [{table}] entry to have it recorded again",
            path.display()
        ),
    }
}

/// Pin `resolved` in `[<table>]`, replacing a pin for another version, and
/// write the lock file atomically.
fn record_pin(lock: &mut Table, table: &str, resolved: &ResolvedK3s, path: &Path) -> Result<()> {
    let mut entry = Table::new();
    entry.insert("version".into(), Value::String(resolved.version.clone()));
    entry.insert("sha256".into(), Value::String(resolved.sha256.clone()));
    lock.insert(table.into(), Value::Table(entry));
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
        record_pin(&mut lock, "k3s", &resolved, &lock_path).unwrap();
        let reread = read_lock(&lock_path).unwrap();
        assert_eq!(reread["base"]["sha256"].as_str(), Some("x"));
        assert_eq!(
            lock_pin(&reread, "k3s", &lock_path).unwrap(),
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
        let err = lock_pin(&lock, "k3s", &lock_path).unwrap_err().to_string();
        assert!(err.contains("kiln.lock") && err.contains("sha256"), "{err}");
    }
}
