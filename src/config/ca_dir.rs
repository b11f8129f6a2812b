//! The cluster CA set in the state directory: `<state>/k3s-ca/`, laid out
//! as k3s's `server/tls` (`server-ca.crt`, `server-ca.key`, …,
//! `etcd/peer-ca.crt`, …, `service.key`; see `config::cluster_ca`).
//!
//! Made once, all or nothing: the set is written into a temporary
//! directory beside it, synced, and renamed into place, so `k3s-ca/`
//! either holds a whole set or does not exist. A set found with a file
//! missing or damaged is refused by name, never completed or replaced:
//! the cluster's servers and every agent's token depend on those exact
//! bytes. Directories 0700, files 0600, never printed, never rotated.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::config::cluster_ca::{self, ClusterCa};
use crate::util::mode::{SECRET_FILE_MODE, STATE_DIR_MODE};

/// The subdirectory of the state directory that holds the set.
pub const CA_DIR: &str = "k3s-ca";

/// What to do about a set that cannot be read.
fn fix_hint(dir: &Path) -> String {
    format!(
        "    fix: restore {} as a whole from your backup (or copy the files from a server's /var/lib/rancher/k3s/server/tls, keys converted to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt`); only if no server has ever started with this set, delete {} and kiln makes a new one (then rebuild every node)",
        dir.display(),
        dir.display()
    )
}

/// The file that lets kiln make a new CA in a state directory that
/// already holds node secrets (see [`load_or_create`]).
pub const NEW_CA_MARKER: &str = "k3s-ca.new";

/// The set in `state`, made on first use. A state directory that held
/// node secrets before (`earlier_builds`: nodes were built from it before
/// kiln kept the CA) gets no new CA by itself: a cluster started from
/// those nodes has a CA k3s made, and tokens naming a new one would lock
/// its agents out. The user adopts that CA, or asks for a new one with
/// the [`NEW_CA_MARKER`] file.
pub fn load_or_create(state: &Path, earlier_builds: bool) -> anyhow::Result<ClusterCa> {
    let dir = state.join(CA_DIR);
    if dir.exists() {
        return read_set(&dir);
    }
    let marker = state.join(NEW_CA_MARKER);
    if earlier_builds && !marker.exists() {
        bail!(
            "{} holds node secrets from builds made before kiln kept the cluster CA, and no {}: a cluster started from those nodes has a CA k3s made, and a new one would lock its agents out\n    fix: adopt the running cluster's CA: copy server-ca.crt/.key, client-ca.*, request-header-ca.*, etcd/peer-ca.*, etcd/server-ca.* and service.key from /var/lib/rancher/k3s/server/tls/ on the first server into {}/ (files 0600, directories 0700; keys converted with `openssl pkcs8 -topk8 -nocrypt`); or, if no node built from this state directory runs k3s yet, let kiln make a new CA: `touch {}`",
            state.display(),
            dir.display(),
            dir.display(),
            marker.display()
        );
    }
    let ca = ClusterCa::generate(time::OffsetDateTime::now_utc())?;
    let tmp = state.join(format!(".{CA_DIR}.tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let written = write_set(&tmp, &ca);
    let published = written.and_then(|()| {
        fs::rename(&tmp, &dir).with_context(|| format!("creating {}", dir.display()))
    });
    let _ = fs::remove_dir_all(&tmp);
    match published {
        Ok(()) => {
            let _ = fs::remove_file(&marker);
            fs_err::File::open(state)?.sync_all()?;
            Ok(ca)
        }
        // Another kiln made the set meanwhile: use that one.
        Err(_) if dir.exists() => read_set(&dir),
        Err(e) => Err(e),
    }
}

/// The set in `state`, if it exists; never creates one.
pub fn load_existing(state: &Path) -> anyhow::Result<Option<ClusterCa>> {
    let dir = state.join(CA_DIR);
    if !dir.exists() {
        return Ok(None);
    }
    read_set(&dir).map(Some)
}

/// The path of the server CA certificate in a state directory.
pub fn server_ca_path(state: &Path) -> PathBuf {
    state.join(CA_DIR).join(cluster_ca::SERVER_CA_CRT)
}

fn read_set(dir: &Path) -> anyhow::Result<ClusterCa> {
    let mut files = BTreeMap::new();
    for name in cluster_ca::file_names() {
        let path = dir.join(&name);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{} is missing: the cluster CA set in {} is incomplete\n{}",
                path.display(),
                dir.display(),
                fix_hint(dir)
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if meta.mode() & 0o077 != 0 {
            bail!(
                "{} is readable by others (mode {:o}); run `chmod 600 {}`",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            );
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        files.insert(name, text);
    }
    ClusterCa::from_files(files)
        .with_context(|| format!("the cluster CA set in {} is damaged", dir.display()))
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", fix_hint(dir)))
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .mode(STATE_DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Write every file of the set under `dir` (which must not exist), synced.
fn write_set(dir: &Path, ca: &ClusterCa) -> anyhow::Result<()> {
    make_dir(dir)?;
    for (name, text) in ca.files() {
        let path = dir.join(name);
        let parent = path.parent().expect("files live in a directory");
        if !parent.exists() {
            make_dir(parent)?;
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SECRET_FILE_MODE)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for sub in [dir.to_path_buf(), dir.join("etcd")] {
        fs_err::File::open(&sub)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_set_is_made_once_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let a = load_or_create(state, false).unwrap();
        let b = load_or_create(state, false).unwrap();
        assert_eq!(a, b);
        assert_eq!(load_existing(state).unwrap(), Some(a.clone()));
        let dir = state.join(CA_DIR);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("etcd")), 0o700);
        for name in cluster_ca::file_names() {
            assert_eq!(mode(&dir.join(&name)), 0o600, "{name}");
        }
        assert_eq!(
            fs::read_to_string(server_ca_path(state)).unwrap(),
            a.server_ca_pem()
        );
        let leftovers: Vec<_> = fs::read_dir(state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(CA_DIR)]);
    }

    #[test]
    fn an_incomplete_or_damaged_set_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        load_or_create(state, false).unwrap();
        let dir = state.join(CA_DIR);
        let key = dir.join("etcd/server-ca.key");
        let saved = fs::read(&key).unwrap();
        fs::remove_file(&key).unwrap();
        let err = format!("{:#}", load_or_create(state, false).unwrap_err());
        assert!(err.contains(&key.display().to_string()), "{err}");
        assert!(err.contains("fix:"), "{err}");
        assert!(!key.exists(), "a missing file must not be made again");

        fs::write(&key, "not a key\n").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let err = format!("{:#}", load_or_create(state, false).unwrap_err());
        assert!(err.contains("etcd/server-ca.key"), "{err}");
        assert!(err.contains("fix:"), "{err}");

        fs::write(&key, &saved).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", load_or_create(state, false).unwrap_err());
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn nothing_is_made_by_load_existing() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(load_existing(tmp.path()).unwrap(), None);
        assert!(!tmp.path().join(CA_DIR).exists());
    }

    #[test]
    fn a_state_dir_from_before_the_ca_gets_none_without_asking() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let err = format!("{:#}", load_or_create(state, true).unwrap_err());
        assert!(err.contains("adopt the running cluster's CA"), "{err}");
        assert!(err.contains(NEW_CA_MARKER), "{err}");
        assert!(!state.join(CA_DIR).exists());
        fs::write(state.join(NEW_CA_MARKER), "").unwrap();
        let ca = load_or_create(state, true).unwrap();
        assert!(
            !state.join(NEW_CA_MARKER).exists(),
            "the marker is used once"
        );
        assert_eq!(
            load_or_create(state, true).unwrap().server_ca_pem(),
            ca.server_ca_pem()
        );
    }
}
