//! Disk space: what a filesystem has free, what a directory holds. Used
//! to turn "No space left on device" into a message that says where and
//! how much, in builds and in the QEMU harness.

use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// Bytes available to an unprivileged user on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes allocated under `dir` (sparse files count what they use).
pub fn du_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.blocks() * 512),
        })
        .sum()
}

/// Whole MiB, rounded up (for messages).
pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_counts_what_its_files_use() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![1u8; 1 << 20]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/b"), vec![1u8; 1 << 20]).unwrap();
        let used = du_bytes(d.path());
        assert!((2 << 20..3 << 20).contains(&used), "{used}");
        assert!(free_bytes(d.path()).is_some());
        assert_eq!(free_bytes(Path::new("/nonexistent/kiln")), None);
        assert_eq!(mib(1), 1);
        assert_eq!(mib(2 << 20), 2);
    }
}
