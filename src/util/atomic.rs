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
}
