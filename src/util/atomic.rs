//! Replacing a file of kiln's own in one step: a synced temp file in the
//! same directory, an explicit mode (never the umask's), a rename, the
//! directory synced. (Editing a *user's* file, the profile, keeps its owner,
//! mode and links: that is `deliver::upgrade::ProfileEdit`.)

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context as _;

/// Write `bytes` to `path` with `mode`, atomically.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut staged = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    staged
        .write_all(bytes)
        .and_then(|()| {
            staged
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
        })
        .and_then(|()| staged.as_file().sync_all())
        .with_context(|| format!("writing {}", staged.path().display()))?;
    staged
        .persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Write `bytes` to `path` with `mode`, atomically, for a file the user
/// named: a file that already holds `bytes` is left alone, one that holds
/// anything else is replaced only with `force`. Refused, the error names
/// the file and ends with `fix` (which should say `--force`).
pub fn write_unless_changed(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    force: bool,
    fix: &str,
) -> anyhow::Result<()> {
    match std::fs::read(path) {
        Ok(old) if old == bytes => return Ok(()),
        Ok(_) if !force => {
            anyhow::bail!(
                "{} exists with other content\n    fix: {fix}",
                path.display()
            )
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    write_atomically(path, bytes, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn the_mode_is_the_one_asked_whatever_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kiln.lock");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomically(&p, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn a_changed_file_is_replaced_only_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("club.conf");
        write_unless_changed(&p, b"one", 0o600, false, "pass --force").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // The same content again: left alone, no --force needed.
        write_unless_changed(&p, b"one", 0o600, false, "pass --force").unwrap();
        let err = write_unless_changed(&p, b"two", 0o600, false, "pass --force")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("club.conf") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_unless_changed(&p, b"two", 0o600, true, "pass --force").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }
}
