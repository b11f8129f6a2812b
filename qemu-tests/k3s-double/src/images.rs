//! What k3s would import at its start from `agent/images`, as k3s
//! decides it (k3s `pkg/agent/containerd`, rancher/wharfie `tarfile`):
//! every entry of the directory that is not a directory, by the end of
//! its name (any case): an image tarball is imported, a `.txt` file is a
//! list of images to pull, anything else is an "unhandled file type".
//! k3s opens each file through its path, so a symlink or a bind mount
//! works as long as the file behind it is readable.
//!
//! The double imports nothing: it reads each tarball through (as k3s
//! would) and records what it found, for the VM checks, one line each:
//! `import=<name> <size> <sha256>`, `pull=<name> <size> <sha256>` or
//! `skip=<name> <why>`, then `imports=<count>`.

use std::io::Read as _;

use sha2::{Digest as _, Sha256};

/// k3s's image directory (the default data dir).
pub const IMAGES_DIR: &str = "/var/lib/rancher/k3s/agent/images";
/// The names k3s imports (wharfie's `SupportedExtensions`).
const TARBALL_EXTENSIONS: [&str; 8] = [
    ".tar", ".tar.lz4", ".tar.bz2", ".tbz", ".tar.gz", ".tgz", ".tar.zst", ".tzst",
];

/// What k3s does with a file of this name.
enum Action {
    Import,
    Pull,
    Unhandled,
}

fn action(name: &str) -> Action {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".txt") {
        Action::Pull
    } else if TARBALL_EXTENSIONS.iter().any(|e| lower.ends_with(e)) {
        Action::Import
    } else {
        Action::Unhandled
    }
}

/// Size and sha256 of the file at `path`, read through as k3s reads it.
fn read_through(path: &std::path::Path) -> Result<(u64, String), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file behind its name".into());
    }
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((size, format!("{:x}", hasher.finalize())))
}

/// The record of what k3s would do with `dir` at its start.
pub fn listing(dir: &str) -> Vec<(String, String)> {
    let mut rec = vec![("dir".to_string(), dir.to_string())];
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            // k3s skips a missing directory quietly.
            rec.push(("present".into(), "false".into()));
            rec.push(("error".into(), e.to_string()));
            rec.push(("imports".into(), "0".into()));
            return rec;
        }
    };
    rec.push(("present".into(), "true".into()));
    // Go's os.ReadDir sorts by name; so does k3s's import order.
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    let mut imports = 0;
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        // As k3s: the entry's own type, so a symlink to a directory is
        // not skipped here but fails below.
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            rec.push(("skip".into(), format!("{name} directory")));
            continue;
        }
        let (key, ok) = match action(&name) {
            Action::Import => ("import", true),
            Action::Pull => ("pull", true),
            Action::Unhandled => ("skip", false),
        };
        if !ok {
            rec.push((key.into(), format!("{name} unhandled file type")));
            continue;
        }
        match read_through(&e.path()) {
            Ok((size, sha)) => {
                if key == "import" {
                    imports += 1;
                }
                rec.push((key.into(), format!("{name} {size} {sha}")));
            }
            Err(why) => rec.push(("skip".into(), format!("{name} unreadable: {why}"))),
        }
    }
    rec.push(("imports".into(), imports.to_string()));
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarballs_lists_and_others_as_k3s_sorts_them() {
        let dir = std::env::temp_dir().join(format!("k3s-double-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b.tar.zst"), b"abc").unwrap();
        std::fs::write(dir.join("a.TXT"), b"").unwrap();
        std::fs::write(dir.join("c.zip"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.join("b.tar.zst"), dir.join("d.tgz")).unwrap();
        std::os::unix::fs::symlink(dir.join("gone"), dir.join("e.tar")).unwrap();
        let rec = listing(&dir.to_string_lossy());
        let _ = std::fs::remove_dir_all(&dir);
        let lines: Vec<String> = rec[1..].iter().map(|(k, v)| format!("{k}={v}")).collect();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            lines,
            vec![
                "present=true".to_string(),
                format!("pull=a.TXT 0 {empty}"),
                format!("import=b.tar.zst 3 {abc}"),
                "skip=c.zip unhandled file type".into(),
                format!("import=d.tgz 3 {abc}"),
                "skip=e.tar unreadable: No such file or directory (os error 2)".into(),
                "skip=sub directory".into(),
                "imports=2".into(),
            ]
        );
    }

    #[test]
    fn a_missing_directory_imports_nothing() {
        let rec = listing("/nonexistent/agent/images");
        assert!(rec.contains(&("present".into(), "false".into())));
        assert_eq!(rec.last(), Some(&("imports".into(), "0".into())));
    }
}
