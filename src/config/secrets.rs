//! Node secrets, kept in a state directory next to the profile: per node a
//! WireGuard key pair, a k3s node password and an SSH host key; and the
//! k3s cluster token; per operator (`[[operators]]`) a WireGuard key pair.
//! The k3s cluster CA set lives here too (`k3s-ca/`, see
//! `config::ca_dir`); the token nodes join with is the secure form that
//! names it ([`join_token`]).
//!
//! Created once on first use (directory 0700, files 0600), reused on every
//! later run, never rotated by a rebuild and never printed. A node removed
//! from the profile keeps its files. To re-key a node, delete its files.
//!
//! The node password and the SSH host key are the node's identity: k3s's
//! server refuses a node name that comes back with another password, and
//! an operator's `known_hosts` refuses a host that comes back with another
//! key. Kept here and baked into the node's seed, they survive a reflash,
//! a reinstall and a diskless boot.
//!
//! SSH host keys are ed25519 only. Every OpenSSH client since 6.5 (2014)
//! speaks it, the operators' machines and the nodes are all newer, and a
//! node that offers one key type gives `known_hosts` one line to pin.
//! ECDSA would add nothing, and RSA would add a slow, large key to keep.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use std::collections::BTreeMap;

use crate::config::ca_dir;
use crate::config::cluster_ca::{self, ClusterCa};
use crate::config::plan::{self, Plan};
use crate::config::types::{K3sToken, WgKey};
use crate::util::mode::{SECRET_FILE_MODE, STATE_DIR_MODE};

/// Random bytes in a generated k3s token (hex-encoded: 64 characters).
pub const TOKEN_BYTES: usize = 32;
/// Random bytes in a node password: k3s's agent makes 16 (hex-encoded:
/// 32 characters) when `/etc/rancher/node/password` is missing
/// (`ensureNodePassword` in k3s `pkg/agent/config`); kiln makes the same.
pub const NODE_PASSWORD_BYTES: usize = 16;
/// Subdirectories of the state directory, one file per node in each.
const WIREGUARD_DIR: &str = "wireguard";
const NODE_PASSWORD_DIR: &str = "node-password";
const SSH_HOST_KEY_DIR: &str = "ssh-host-key";
/// Operators' WireGuard keys, one `<name>.key` each.
const OPERATOR_DIR: &str = "operators";

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
    Ok(b)
}

/// A node's WireGuard private key. Its `Debug` does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A new key, clamped as `wg genkey` clamps it (RFC 7748), so the base64
    /// text is exactly what `wg genkey` would print for these bytes.
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self::from_bytes(random_bytes()?))
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

/// A node's k3s node password (what the agent sends as `K3s-Node-Password`
/// and keeps in `/etc/rancher/node/password`). Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct NodePassword(String);

impl NodePassword {
    /// 16 random bytes as lower-case hex, as k3s makes one.
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self::from_bytes(random_bytes()?))
    }

    pub fn from_bytes(b: [u8; NODE_PASSWORD_BYTES]) -> Self {
        NodePassword(hex::encode(b))
    }

    /// A password as k3s reads it (trimmed); refuses an empty one or one
    /// with whitespace or control characters inside, which k3s would send
    /// as an HTTP header.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        (!s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()))
            .then(|| NodePassword(s.to_string()))
    }

    /// The password itself. Only for files that hold secrets.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodePassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodePassword(<redacted>)")
    }
}

/// A node's SSH host key (ed25519). Its `Debug` shows only the public key.
#[derive(Clone, PartialEq, Eq)]
pub struct SshHostKey(ssh_key::PrivateKey);

impl SshHostKey {
    /// A new key; `comment` goes into the key files as `ssh-keygen -C` puts it.
    pub fn generate(comment: &str) -> anyhow::Result<Self> {
        Ok(Self::from_seed(random_bytes()?, comment))
    }

    /// The key of a 32-byte ed25519 seed (RFC 8032 private key).
    pub fn from_seed(seed: [u8; 32], comment: &str) -> Self {
        let pair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
        let mut key = ssh_key::PrivateKey::from(pair);
        key.set_comment(comment);
        SshHostKey(key)
    }

    /// An unencrypted OpenSSH ed25519 private key, as `ssh-keygen` writes it.
    pub fn parse(s: &str) -> Option<Self> {
        let key = ssh_key::PrivateKey::from_openssh(s.trim()).ok()?;
        (key.algorithm() == ssh_key::Algorithm::Ed25519 && !key.is_encrypted())
            .then_some(SshHostKey(key))
    }

    /// The private key file (`ssh_host_ed25519_key`). Only for files that
    /// hold secrets.
    pub fn to_openssh(&self) -> String {
        self.0
            .to_openssh(ssh_key::LineEnding::LF)
            .expect("an ed25519 key always encodes")
            .to_string()
    }

    /// The public key line (`ssh_host_ed25519_key.pub`): `ssh-ed25519 AAAA… comment`.
    pub fn public_openssh(&self) -> String {
        self.0
            .public_key()
            .to_openssh()
            .expect("an ed25519 key always encodes")
    }

    /// The public key without its comment: `ssh-ed25519 AAAA…`, as
    /// `known_hosts` wants it.
    pub fn public_key_text(&self) -> String {
        let mut public = self.0.public_key().clone();
        public.set_comment("");
        public.to_openssh().expect("an ed25519 key always encodes")
    }

    /// `SHA256:…`, as `ssh-keygen -l` and ssh's first-connection prompt show it.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint(ssh_key::HashAlg::Sha256).to_string()
    }
}

impl fmt::Debug for SshHostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SshHostKey(<redacted>, public {})",
            self.public_key_text()
        )
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
        for sub in [
            WIREGUARD_DIR,
            NODE_PASSWORD_DIR,
            SSH_HOST_KEY_DIR,
            OPERATOR_DIR,
        ] {
            fs_err::create_dir_all(dir.join(sub))?;
            fs_err::set_permissions(
                dir.join(sub),
                std::os::unix::fs::PermissionsExt::from_mode(STATE_DIR_MODE),
            )?;
        }
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether nodes were built from this directory before: it holds a
    /// node's secret or the cluster token.
    pub fn holds_node_secrets(&self) -> bool {
        self.dir.join("k3s-token").exists()
            || [WIREGUARD_DIR, NODE_PASSWORD_DIR, SSH_HOST_KEY_DIR]
                .iter()
                .any(|d| fs::read_dir(self.dir.join(d)).is_ok_and(|mut r| r.next().is_some()))
    }

    /// The node's WireGuard key, created on first use.
    pub fn node_key(&self, node: &str) -> anyhow::Result<PrivateKey> {
        let path = self.dir.join(WIREGUARD_DIR).join(format!("{node}.key"));
        let text = read_or_create(&path, || Ok(PrivateKey::generate()?.to_base64()))?;
        PrivateKey::parse(&text).with_context(|| format!("{} does not hold a WireGuard private key; restore it from a backup, or delete it to make the node a new key (peers must then be updated)", path.display()))
    }

    /// An operator's WireGuard key, created on first use. Only its
    /// wg-quick file (`kiln operator`) holds the private key.
    pub fn operator_key(&self, operator: &str) -> anyhow::Result<PrivateKey> {
        let path = self.dir.join(OPERATOR_DIR).join(format!("{operator}.key"));
        let text = read_or_create(&path, || Ok(PrivateKey::generate()?.to_base64()))?;
        PrivateKey::parse(&text).with_context(|| format!("{} does not hold a WireGuard private key; restore it from a backup, or delete it to make the operator a new key (then rebuild the nodes and run `kiln operator` again)", path.display()))
    }

    /// The node's k3s node password, created on first use.
    pub fn node_password(&self, node: &str) -> anyhow::Result<NodePassword> {
        let path = self.dir.join(NODE_PASSWORD_DIR).join(node);
        let text = read_or_create(&path, || Ok(NodePassword::generate()?.expose().to_string()))?;
        NodePassword::parse(&text).with_context(|| format!(
            "{} does not hold a k3s node password (empty, or with spaces or control characters)\n    fix: restore it from the node's /etc/rancher/node/password, or delete it to give the node a new password (then delete the node's `{node}.node-password.k3s` secret in kube-system on a server, or the server refuses the node)",
            path.display()
        ))
    }

    /// The node's SSH host key, created on first use.
    pub fn ssh_host_key(&self, node: &str) -> anyhow::Result<SshHostKey> {
        let path = self
            .dir
            .join(SSH_HOST_KEY_DIR)
            .join(format!("{node}_ed25519_key"));
        let text = read_or_create(&path, || Ok(SshHostKey::generate(node)?.to_openssh()))?;
        SshHostKey::parse(&text).with_context(|| format!(
            "{} does not hold an unencrypted OpenSSH ed25519 private key\n    fix: restore it from a backup or the node's /etc/ssh/ssh_host_ed25519_key, or delete it to give the node a new host key (then update known_hosts: `kiln keys --known-hosts`)",
            path.display()
        ))
    }

    /// The k3s cluster token, created on first use.
    pub fn token(&self) -> anyhow::Result<String> {
        let path = self.dir.join("k3s-token");
        let t = read_or_create(&path, || Ok(hex::encode(random_bytes::<TOKEN_BYTES>()?)))?;
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
        let newline: &[u8] = if value.ends_with('\n') { b"" } else { b"\n" };
        f.write_all(value.as_bytes())
            .and_then(|()| f.write_all(newline))
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
    /// The token k3s nodes join with, in the secure form ([`join_token`]).
    pub token: K3sToken,
    /// The k3s cluster CA set (seeded only where `cluster_ca::seeds_ca` says).
    pub cluster_ca: ClusterCa,
    /// This node's k3s node password.
    pub node_password: NodePassword,
    /// This node's SSH host key.
    pub ssh_host_key: SshHostKey,
    /// Every operator's WireGuard public key, by operator name.
    pub operator_keys: BTreeMap<String, WgKey>,
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
    /// WireGuard private keys, by node name.
    pub private: BTreeMap<String, PrivateKey>,
    /// The token k3s nodes join with, in the secure form ([`join_token`]).
    pub token: K3sToken,
    /// The k3s cluster CA set.
    pub cluster_ca: ClusterCa,
    /// k3s node passwords, by node name.
    pub node_passwords: BTreeMap<String, NodePassword>,
    /// SSH host keys, by node name.
    pub ssh_host_keys: BTreeMap<String, SshHostKey>,
    /// Operators' WireGuard private keys, by operator name.
    pub operators: BTreeMap<String, PrivateKey>,
}

impl ClusterSecrets {
    pub fn load(plan: &Plan, state: &StateDir) -> anyhow::Result<Self> {
        // Before anything is created: were nodes built from it already?
        let earlier_builds = state.holds_node_secrets();
        let mut private = BTreeMap::new();
        let mut node_passwords = BTreeMap::new();
        let mut ssh_host_keys = BTreeMap::new();
        for n in &plan.nodes {
            private.insert(n.name.clone(), state.node_key(&n.name)?);
            node_passwords.insert(n.name.clone(), state.node_password(&n.name)?);
            ssh_host_keys.insert(n.name.clone(), state.ssh_host_key(&n.name)?);
        }
        let cluster_ca = ca_dir::load_or_create(state.path(), earlier_builds)?;
        let token = join_token(plan, &cluster_ca, state.path(), || state.token())?;
        let mut operators = BTreeMap::new();
        for o in &plan.operators {
            operators.insert(o.name.clone(), state.operator_key(&o.name)?);
        }
        Ok(ClusterSecrets {
            private,
            token,
            cluster_ca,
            node_passwords,
            ssh_host_keys,
            operators,
        })
    }

    pub fn public_keys(&self) -> BTreeMap<String, WgKey> {
        self.private
            .iter()
            .map(|(n, k)| (n.clone(), k.public_key()))
            .collect()
    }

    /// Every operator's WireGuard public key, by operator name.
    pub fn operator_public_keys(&self) -> BTreeMap<String, WgKey> {
        self.operators
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
            cluster_ca: self.cluster_ca.clone(),
            node_password: self.node_passwords[node].clone(),
            ssh_host_key: self.ssh_host_keys[node].clone(),
            operator_keys: self.operator_public_keys(),
        }
    }
}

/// The token nodes join with: `K10<server CA hash>::server:<secret>`, the
/// secret being the profile's `k3s.token` or the state directory's. A
/// profile token already in that form is used as written if its hash is
/// the CA's, and refused otherwise (agents would refuse the server).
pub fn join_token(
    plan: &Plan,
    ca: &ClusterCa,
    state: &Path,
    secret: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<K3sToken> {
    let hash = ca.server_ca_hash();
    match &plan.k3s.token {
        Some(t) => {
            check_token_hash(plan, t.expose(), Some(&hash), state)?;
            Ok(match cluster_ca::split_secure(t.expose()) {
                Some(_) => t.clone(),
                None => cluster_ca::secure_token(&hash, t.expose()),
            })
        }
        None => Ok(cluster_ca::secure_token(&hash, &secret()?)),
    }
}

/// `kiln check`: a profile token in the secure form must name the CA in
/// the state directory (read, never created here).
pub fn check_profile_token(plan: &Plan, state: &Path) -> anyhow::Result<()> {
    let Some(t) = &plan.k3s.token else {
        return Ok(());
    };
    if cluster_ca::split_secure(t.expose()).is_none() {
        return Ok(());
    }
    let ca = ca_dir::load_existing(state)?;
    check_token_hash(
        plan,
        t.expose(),
        ca.map(|c| c.server_ca_hash()).as_deref(),
        state,
    )
}

/// Refuse a secure-form token whose CA hash is not `hash` (or any hash,
/// when the state directory has no CA yet). Never prints the token.
fn check_token_hash(
    plan: &Plan,
    token: &str,
    hash: Option<&str>,
    state: &Path,
) -> anyhow::Result<()> {
    let Some((named, _)) = cluster_ca::split_secure(token) else {
        return Ok(());
    };
    if Some(named) == hash {
        return Ok(());
    }
    let ca_file = ca_dir::server_ca_path(state);
    let actual = match hash {
        Some(h) => format!("whose SHA-256 is {h}"),
        None => "which does not exist yet (kiln makes a new CA on the first build)".into(),
    };
    bail!(
        "{}: `k3s.token` is a secure token (K10…) for CA hash {named}, but this cluster's CA is {} {actual}\n    fix: write only the secret (what follows `::server:`) and kiln adds the K10 prefix for its CA; or restore the k3s-ca/ directory this token belongs to",
        plan.profile_path.display(),
        ca_file.display()
    )
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
    fn operator_keys_are_created_once_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("club.state");
        let s = StateDir::open(&dir).unwrap();
        let a = s.operator_key("alice-laptop").unwrap();
        assert_eq!(
            a,
            StateDir::open(&dir)
                .unwrap()
                .operator_key("alice-laptop")
                .unwrap()
        );
        assert_ne!(a, s.node_key("alice-laptop").unwrap(), "not a node's key");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("operators")), 0o700);
        assert_eq!(mode(&dir.join("operators/alice-laptop.key")), 0o600);
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
    fn debug_output_does_not_show_the_join_token() {
        let secret = "profile-secret-0123456789";
        let text = format!(
            "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\ntoken = \"{secret}\"\n[[nodes]]\nname = \"n1\"\nrole = \"server\"\nmac = \"52:54:00:aa:bb:01\"\n"
        );
        let plan = plan::plan_profile(Path::new("lab.toml"), &text).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(&tmp.path().join("lab.state")).unwrap();
        let node = ClusterSecrets::load(&plan, &state).unwrap().for_node("n1");
        assert!(
            node.token.expose().ends_with(secret),
            "the secret is joined"
        );

        let mut d = crate::config::diag::Diagnostics::new("lab.toml", &text);
        let profile = crate::config::profile::read_profile(&text, &mut d).unwrap();
        let profile_debug = format!("{profile:?}");
        assert!(!profile_debug.contains(secret), "{profile_debug}");
        assert!(
            profile_debug.contains("K3sToken(<redacted>)"),
            "{profile_debug}"
        );

        let plan_debug = format!("{plan:?}");
        assert!(!plan_debug.contains(secret), "{plan_debug}");
        assert!(plan_debug.contains("K3sToken(<redacted>)"), "{plan_debug}");
        let node_debug = format!("{node:?}");
        assert!(!node_debug.contains(secret), "{node_debug}");
        assert!(!node_debug.contains("::server:"), "{node_debug}");
    }

    #[test]
    fn node_identity_is_created_once_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("club.state");
        let s = StateDir::open(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;

        let p = s.node_password("rgb1").unwrap();
        assert_eq!(p.expose().len(), 2 * NODE_PASSWORD_BYTES);
        assert!(p.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        let again = StateDir::open(&dir).unwrap().node_password("rgb1").unwrap();
        assert_eq!(p, again);
        assert_ne!(p, s.node_password("rgb2").unwrap());
        let file = dir.join("node-password/rgb1");
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&dir.join("node-password")), 0o700);
        // As k3s writes it: the password and one newline.
        assert_eq!(
            fs::read_to_string(&file).unwrap(),
            format!("{}\n", p.expose())
        );

        let k = s.ssh_host_key("rgb1").unwrap();
        let again = StateDir::open(&dir).unwrap().ssh_host_key("rgb1").unwrap();
        assert_eq!(k, again);
        assert_ne!(k, s.ssh_host_key("rgb2").unwrap());
        let file = dir.join("ssh-host-key/rgb1_ed25519_key");
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&dir.join("ssh-host-key")), 0o700);
        let text = fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"),
            "{text}"
        );
        assert!(
            text.ends_with("-----END OPENSSH PRIVATE KEY-----\n"),
            "{text}"
        );
        assert!(k.public_key_text().starts_with("ssh-ed25519 AAAA"));
        assert!(!k.public_key_text().contains("rgb1"));
        assert!(k.public_openssh().ends_with(" rgb1"));
        assert!(k.fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn a_damaged_identity_file_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("club.state");
        let s = StateDir::open(&dir).unwrap();
        let write = |p: &Path, text: &str| {
            let _ = fs::remove_file(p);
            fs::write(p, text).unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(0o600)).unwrap();
        };
        let file = dir.join("node-password/rgb1");
        for bad in ["\n", "two words\n", "a\u{1b}b"] {
            write(&file, bad);
            let err = format!("{:#}", s.node_password("rgb1").unwrap_err());
            assert!(err.contains(&file.display().to_string()), "{err}");
            assert!(err.contains("fix:"), "{err}");
        }
        write(&file, "0123abcd\n");
        assert_eq!(s.node_password("rgb1").unwrap().expose(), "0123abcd");

        let file = dir.join("ssh-host-key/rgb1_ed25519_key");
        let good = SshHostKey::from_seed([3; 32], "rgb1").to_openssh();
        let cut = &good[..good.len() / 2];
        for bad in ["", "not a key\n", cut] {
            write(&file, bad);
            let err = format!("{:#}", s.ssh_host_key("rgb1").unwrap_err());
            assert!(err.contains(&file.display().to_string()), "{err}");
            assert!(err.contains("fix:"), "{err}");
        }
        write(&file, &good);
        assert_eq!(
            s.ssh_host_key("rgb1").unwrap(),
            SshHostKey::from_seed([3; 32], "rgb1")
        );

        // A key file others can read is refused, like a WireGuard key.
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", s.ssh_host_key("rgb1").unwrap_err());
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn ssh_host_keys_are_what_ssh_keygen_reads() {
        // ssh-keygen derives the same public key from the private key file.
        if std::process::Command::new("ssh-keygen")
            .arg("-?")
            .output()
            .is_err()
        {
            eprintln!("skipped: no ssh-keygen");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let k = SshHostKey::from_seed([5; 32], "rgb1");
        let file = tmp.path().join("key");
        fs::write(&file, k.to_openssh()).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let derived = String::from_utf8(out.stdout).unwrap();
        assert!(derived.starts_with(&k.public_key_text()), "{derived}");
    }

    #[test]
    fn debug_does_not_print_node_secrets() {
        let p = NodePassword::from_bytes([1; 16]);
        assert!(!format!("{p:?}").contains(p.expose()));
        let k = SshHostKey::from_seed([2; 32], "n");
        let private = k.to_openssh();
        let body: Vec<&str> = private
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let debug = format!("{k:?}");
        assert!(body.iter().all(|l| !debug.contains(l)), "{debug}");
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
