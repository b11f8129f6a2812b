//! Node secrets: a WireGuard key pair per node and the k3s cluster token,
//! kept in a state directory next to the profile.
//!
//! Created once on first use (directory 0700, files 0600), reused on every
//! later run, never rotated by a rebuild and never printed. A node removed
//! from the profile keeps its key file.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use std::collections::BTreeMap;

use crate::config::plan::{self, Plan};
use crate::config::types::WgKey;

pub const STATE_DIR_MODE: u32 = 0o700;
pub const SECRET_FILE_MODE: u32 = 0o600;
/// Random bytes in a generated k3s token (hex-encoded: 64 characters).
pub const TOKEN_BYTES: usize = 32;

/// A node's WireGuard private key. Its `Debug` does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A new key, clamped as `wg genkey` clamps it (RFC 7748), so the base64
    /// text is exactly what `wg genkey` would print for these bytes.
    pub fn generate() -> anyhow::Result<Self> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
        Ok(Self::from_bytes(b))
    }

    pub fn from_bytes(mut b: [u8; 32]) -> Self {
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        PrivateKey(b)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let v = B64.decode(s.trim()).ok()?;
        Some(PrivateKey(v.try_into().ok()?))
    }

    /// The key as `wg` writes it. Only for files that hold secrets.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn public_key(&self) -> WgKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        WgKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

/// The state directory of a profile.
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The default state directory of a profile: `<dir>/<stem>.state`.
    pub fn default_for(profile: &Path) -> PathBuf {
        let stem = profile
            .file_stem()
            .map_or("profile".into(), |s| s.to_string_lossy().to_string());
        profile
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("{stem}.state"))
    }

    /// Open (and create on first use) a state directory. Refuses one that
    /// others can read.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(STATE_DIR_MODE)
                .create(dir)
                .with_context(|| format!("creating state directory {}", dir.display()))?;
        }
        let meta = fs::metadata(dir)
            .with_context(|| format!("reading state directory {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("state directory {} is not a directory", dir.display());
        }
        if meta.mode() & 0o077 != 0 {
            bail!(
                "state directory {} is readable by others (mode {:o}); it holds private keys: run `chmod 700 {}`",
                dir.display(),
                meta.mode() & 0o777,
                dir.display()
            );
        }
        fs_err::create_dir_all(dir.join("wireguard"))?;
        fs_err::set_permissions(
            dir.join("wireguard"),
            std::os::unix::fs::PermissionsExt::from_mode(STATE_DIR_MODE),
        )?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The node's WireGuard key, created on first use.
    pub fn node_key(&self, node: &str) -> anyhow::Result<PrivateKey> {
        let path = self.dir.join("wireguard").join(format!("{node}.key"));
        let text = read_or_create(&path, || Ok(PrivateKey::generate()?.to_base64()))?;
        PrivateKey::parse(&text).with_context(|| format!("{} does not hold a WireGuard private key; restore it from a backup, or delete it to make the node a new key (peers must then be updated)", path.display()))
    }

    /// The k3s cluster token, created on first use.
    pub fn token(&self) -> anyhow::Result<String> {
        let path = self.dir.join("k3s-token");
        let t = read_or_create(&path, || {
            let mut b = [0u8; TOKEN_BYTES];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
            Ok(hex::encode(b))
        })?;
        let t = t.trim().to_string();
        if t.is_empty() {
            bail!(
                "{} is empty; restore the token from a running server (/var/lib/rancher/k3s/server/token)",
                path.display()
            );
        }
        // The same rule as a token written in the profile. Never print it.
        if !crate::config::types::is_valid_token(&t) {
            bail!(
                "{} does not hold a usable k3s token (shorter than {} bytes, or containing whitespace or control characters)\n    fix: restore the token from a running server (/var/lib/rancher/k3s/server/token); before the first build, delete the file to let kiln generate one",
                path.display(),
                crate::config::types::MIN_TOKEN_CHARS
            );
        }
        Ok(t)
    }
}

/// Read a secret file, or create it atomically with `make()` (0600; an
/// existing file is never replaced). A file others can read is refused.
fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    match fs::metadata(path) {
        Ok(m) => {
            if m.mode() & 0o077 != 0 {
                bail!(
                    "{} is readable by others (mode {:o}); run `chmod 600 {}`",
                    path.display(),
                    m.mode() & 0o777,
                    path.display()
                );
            }
            return fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let value = make()?;
    let dir = path.parent().expect("secret files live in a directory");
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SECRET_FILE_MODE)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(value.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    // A hard link publishes the file only if nobody else created it meanwhile.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            fs_err::File::open(dir)?.sync_all()?;
            Ok(value)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// The secrets a node's files are rendered with.
#[derive(Debug, Clone)]
pub struct NodeSecrets {
    /// This node's WireGuard private key.
    pub private_key: PrivateKey,
    /// Every node's WireGuard public key, by node name.
    pub public_keys: BTreeMap<String, WgKey>,
    /// The k3s cluster token.
    pub token: String,
}

/// The node's update key: derived from its WireGuard private key, so the
/// server (which has the state directory) and the node agree without
/// another secret to keep, and the key says nothing about the private key.
pub fn update_key(cluster: &str, node: &str, private: &PrivateKey) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(format!(
        "kiln update key\n{cluster}\n{node}\n{}",
        private.to_base64()
    ));
    hex::encode(d)
}

/// The state directory to use: the one given, or the profile's default.
pub fn state_dir(profile: &Path, given: Option<&Path>) -> PathBuf {
    given.map_or_else(|| StateDir::default_for(profile), Path::to_path_buf)
}

/// Every node's keys and the cluster token, created on first use.
pub struct ClusterSecrets {
    pub private: BTreeMap<String, PrivateKey>,
    pub token: String,
}

impl ClusterSecrets {
    pub fn load(plan: &Plan, state: &StateDir) -> anyhow::Result<Self> {
        let mut private = BTreeMap::new();
        for n in &plan.nodes {
            private.insert(n.name.clone(), state.node_key(&n.name)?);
        }
        let token = match &plan.k3s.token {
            Some(t) => t.clone(),
            None => state.token()?,
        };
        Ok(ClusterSecrets { private, token })
    }

    pub fn public_keys(&self) -> BTreeMap<String, WgKey> {
        self.private
            .iter()
            .map(|(n, k)| (n.clone(), k.public_key()))
            .collect()
    }

    /// Every node's update key (what `kiln serve` checks before handing
    /// a node its seed for an update).
    pub fn update_keys(&self, cluster: &str) -> BTreeMap<String, String> {
        self.private
            .iter()
            .map(|(n, k)| (n.clone(), update_key(cluster, n, k)))
            .collect()
    }

    pub fn for_node(&self, node: &str) -> NodeSecrets {
        NodeSecrets {
            private_key: self.private[node].clone(),
            public_keys: self.public_keys(),
            token: self.token.clone(),
        }
    }
}

/// Load a profile and its secrets in one step.
pub fn load_with_secrets(
    profile: &Path,
    state: Option<&Path>,
) -> anyhow::Result<(Plan, ClusterSecrets)> {
    let plan = plan::load(profile)?;
    let dir = state_dir(profile, state);
    let state = StateDir::open(&dir)?;
    let secrets = ClusterSecrets::load(&plan, &state)
        .with_context(|| format!("reading secrets in {}", dir.display()))?;
    Ok((plan, secrets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn keys_are_created_once_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("club.state");
        let s = StateDir::open(&dir).unwrap();
        let a = s.node_key("rgb1").unwrap();
        let b = StateDir::open(&dir).unwrap().node_key("rgb1").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, s.node_key("rgb2").unwrap());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("wireguard/rgb1.key")), 0o600);
        let t = s.token().unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(t, s.token().unwrap());
        assert_eq!(mode(&dir.join("k3s-token")), 0o600);
    }

    #[test]
    fn a_short_or_spaced_token_file_is_refused_like_a_profile_token() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("club.state");
        let s = StateDir::open(&dir).unwrap();
        let file = dir.join("k3s-token");
        for bad in ["§\n", "abcdefgh ijklmnopqrs\n", "abcdefghijklmnop\u{1b}q"] {
            let _ = fs::remove_file(&file);
            fs::write(&file, bad).unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
            let err = format!("{:#}", s.token().unwrap_err());
            assert!(err.contains(&file.display().to_string()), "{err}");
            assert!(err.contains("fix:"), "{err}");
            assert!(!err.contains(bad.trim()), "the token is printed: {err}");
        }
        fs::write(&file, "0123456789abcdef0123\n").unwrap();
        assert_eq!(s.token().unwrap(), "0123456789abcdef0123");
    }

    #[test]
    fn debug_does_not_print_the_private_key() {
        let k = PrivateKey::generate().unwrap();
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }

    #[test]
    fn readable_state_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let err = StateDir::open(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("chmod 700"), "{err}");
    }

    #[test]
    fn clamping_matches_wg_genkey() {
        let k = PrivateKey::from_bytes([0xff; 32]);
        assert_eq!(k.0[0], 0xf8);
        assert_eq!(k.0[31], 0x7f);
    }
}
