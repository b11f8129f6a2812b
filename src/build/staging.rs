//! Staging and publishing an output directory: a build is written into a
//! staging directory beside `--out` and swapped into place in one step.
//!
//! - **No window.** Publishing is `renameat2(RENAME_EXCHANGE)` (or a plain
//!   rename when `--out` does not exist yet): at every instant `--out` is
//!   either the whole previous build or the whole new one. After the swap
//!   the previous build sits under the staging name and is removed.
//! - **Leftovers are found.** Each staging directory `.<out>.staging-X` has
//!   a lock file `.<out>.staging-X.lock` that its build holds (`flock`) for
//!   its whole life; the kernel drops the lock however the process ends
//!   (SIGKILL, power cut). The next build removes every staging directory
//!   whose lock it can take, and says so.
//! - **Signals.** Nothing here is global: on SIGINT, SIGTERM or SIGHUP the
//!   binary sets the build's cancellation token, the build returns an
//!   interruption, and the [`Staging`] is dropped like after any failure,
//!   removing its directory and lock. The build then says truthfully what
//!   `--out` holds (as it was, or the new build if the swap was done).
//! - **`--out` must be kiln's.** An existing, non-empty `--out` that holds
//!   no kiln `manifest.json` is refused: a typo must not replace a home
//!   directory.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::util::space;

/// The file that marks a directory as a kiln build output.
pub use crate::image::manifest::FILE as MANIFEST;
/// A lock file without its directory younger than this may belong to a
/// build that is just starting; older ones are removed.
const ORPHAN_LOCK_AGE: Duration = Duration::from_secs(60);

/// A staging directory that removes itself unless published.
pub struct Staging {
    pub dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    published: bool,
}

impl Staging {
    /// Check `out`, remove leftovers of killed builds beside it, and
    /// create a locked staging directory on `out`'s filesystem.
    pub fn new(out: &Path) -> anyhow::Result<Self> {
        let (parent, name) = split(out)?;
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        check_replaceable(out)?;
        for msg in remove_leftovers(&parent, &name) {
            eprintln!("kiln: {msg}");
        }
        let (lock, lock_path) = tempfile::Builder::new()
            .prefix(&format!(".{name}.staging-"))
            .suffix(".lock")
            .tempfile_in(&parent)
            .with_context(|| format!("creating a staging lock in {}", parent.display()))?
            .keep()
            .context("keeping the staging lock")?;
        if !try_lock(&lock) {
            bail!("could not lock {}", lock_path.display());
        }
        let dir = staging_dir_of(&lock_path);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        set_mode(&dir, 0o755)?;
        Ok(Staging {
            dir,
            lock_path,
            _lock: lock,
            published: false,
        })
    }

    /// Put the staged tree at `out` in one step; then remove the previous
    /// build (now under the staging name).
    pub fn publish(mut self, out: &Path) -> anyhow::Result<()> {
        swap_into_place(&self.dir, out)?;
        self.published = true;
        sync_dir(
            out.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        );
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).with_context(|| {
                format!(
                    "removing the previous build (moved to {})",
                    self.dir.display()
                )
            })?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published || !self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Refuse an `out` that exists and is not a directory, or is a non-empty
/// directory without kiln's manifest.
pub fn check_replaceable(out: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", out.display())),
    };
    if !meta.is_dir() {
        bail!(
            "--out {} exists and is not a directory: kiln replaces the output directory as a whole; choose another --out",
            out.display()
        );
    }
    let mut entries =
        std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
    if entries.next().is_none() {
        return Ok(());
    }
    let manifest = out.join(MANIFEST);
    // Loosely: any kiln's manifest (older ones too) names its kiln version.
    let is_kiln = std::fs::read(&manifest)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("kiln_version").is_some());
    if !is_kiln {
        bail!(
            "--out {} is not empty and holds no kiln {MANIFEST}: kiln replaces the output directory as a whole, so it only replaces its own builds; choose another --out, or empty {} first",
            out.display(),
            out.display()
        );
    }
    Ok(())
}

/// Remove staging directories (and their locks) of builds that died, and
/// `.<name>.old-<pid>` directories of older kilns whose process is gone.
/// Returns one message per removal.
pub fn remove_leftovers(parent: &Path, name: &str) -> Vec<String> {
    let staging_prefix = format!(".{name}.staging-");
    let old_prefix = format!(".{name}.old-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut msgs = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if let Some(rest) = file_name.strip_prefix(&staging_prefix) {
            if is_dir {
                let lock = lock_of(&path);
                let dead = match File::open(&lock) {
                    Ok(f) => try_lock(&f),
                    Err(_) => true,
                };
                if dead && std::fs::remove_dir_all(&path).is_ok() {
                    let _ = std::fs::remove_file(&lock);
                    msgs.push(format!(
                        "removed {}, left by a build that was killed",
                        path.display()
                    ));
                }
            } else if rest.ends_with(".lock") && !staging_dir_of(&path).exists() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > ORPHAN_LOCK_AGE);
                if old && File::open(&path).is_ok_and(|f| try_lock(&f)) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        } else if let Some(pid) = file_name.strip_prefix(&old_prefix)
            && is_dir
            && !pid
                .parse::<u32>()
                .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists())
            && std::fs::remove_dir_all(&path).is_ok()
        {
            msgs.push(format!(
                "removed {}, a previous build left by an interrupted publish",
                path.display()
            ));
        }
    }
    msgs.sort();
    msgs
}

/// Below this much free space, a failed build is taken to have filled
/// its filesystem (tools such as tar2sqfs report only "I/O error").
const NEARLY_FULL_BYTES: u64 = 4 << 20;

/// If `err` came from a full filesystem (ENOSPC anywhere in the chain, or
/// the filesystem holding `staging` now nearly full), say so: which
/// filesystem, how much is free, how much the build had written.
/// Call it before the staging directory is removed.
pub fn explain_no_space(err: anyhow::Error, staging: &Path) -> anyhow::Error {
    let enospc = err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    });
    let free = space::free_bytes(staging);
    if !enospc && free.is_none_or(|f| f >= NEARLY_FULL_BYTES) {
        return err;
    }
    let written = space::du_bytes(staging);
    let mib = space::mib;
    err.context(format!(
        "no space left on the filesystem holding {} ({} MiB free; the build had written {} MiB there when it failed): free space, or choose an --out on a bigger filesystem",
        staging.parent().unwrap_or(staging).display(),
        free.map_or("?".into(), |f| mib(f).to_string()),
        mib(written),
    ))
}

fn split(out: &Path) -> anyhow::Result<(PathBuf, String)> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = out
        .file_name()
        .with_context(|| format!("--out {}: the output directory needs a name", out.display()))?
        .to_string_lossy()
        .to_string();
    Ok((parent, name))
}

fn lock_of(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn staging_dir_of(lock: &Path) -> PathBuf {
    let s = lock.as_os_str().as_bytes();
    let s = s.strip_suffix(b".lock").unwrap_or(s);
    PathBuf::from(std::ffi::OsStr::from_bytes(s))
}

/// Take an exclusive lock without waiting; true if we hold it now.
fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a valid open descriptor.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// `rename(from, to)` if `to` is absent, else exchange the two atomically.
fn swap_into_place(from: &Path, to: &Path) -> anyhow::Result<()> {
    let exists = std::fs::symlink_metadata(to).is_ok();
    let flags = if exists {
        libc::RENAME_EXCHANGE
    } else {
        libc::RENAME_NOREPLACE
    };
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in path");
    let (a, b) = (c(from), c(to));
    // SAFETY: both are valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        return Err(err).with_context(|| {
            format!(
                "publishing {} (swapping in {}); {} is as it was",
                to.display(),
                from.display(),
                to.display()
            )
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_swaps_in_one_step_and_removes_the_previous_build() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join(MANIFEST), r#"{"kiln_version":"0"}"#).unwrap();
        std::fs::write(out.join("old.img"), "old").unwrap();
        let s = Staging::new(&out).unwrap();
        std::fs::write(s.dir.join("new.img"), "new").unwrap();
        let staged = s.dir.clone();
        s.publish(&out).unwrap();
        assert!(out.join("new.img").exists() && !out.join("old.img").exists());
        assert!(!staged.exists(), "the previous build is removed");
        let left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("out")],
            "no lock or staging left"
        );
    }

    #[test]
    fn a_dropped_staging_leaves_out_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let s = Staging::new(&out).unwrap();
        std::fs::write(s.dir.join("x"), "x").unwrap();
        drop(s);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    #[test]
    fn leftovers_of_a_killed_build_are_removed_but_a_running_build_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        // Running: another build of this process holds its lock.
        let running = Staging::new(&out).unwrap();
        // Killed: a staging dir whose lock nobody holds.
        let dead = t.path().join(".out.staging-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("rgb1.img"), "secret").unwrap();
        std::fs::write(t.path().join(".out.staging-dead.lock"), "").unwrap();
        // From an older kiln: no lock at all, and a publish interrupted
        // by the old two-rename scheme (pid that cannot exist).
        std::fs::create_dir(t.path().join(".out.staging-nolock")).unwrap();
        std::fs::create_dir(t.path().join(".out.old-4294967295")).unwrap();
        let msgs = remove_leftovers(t.path(), "out");
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(!dead.exists() && !t.path().join(".out.staging-dead.lock").exists());
        assert!(!t.path().join(".out.old-4294967295").exists());
        assert!(running.dir.exists(), "a live build's staging is kept");
    }

    #[test]
    fn out_that_is_not_a_kiln_build_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::write(home.join("thesis.tex"), "years of work").unwrap();
        let err = format!("{:#}", Staging::new(&home).err().unwrap());
        assert!(err.contains("holds no kiln manifest.json"), "{err}");
        assert_eq!(
            std::fs::read(home.join("thesis.tex")).unwrap(),
            b"years of work"
        );
        let file = t.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = format!("{:#}", Staging::new(&file).err().unwrap());
        assert!(err.contains("is not a directory"), "{err}");
        // Empty directories and kiln builds are fine.
        std::fs::create_dir(t.path().join("empty")).unwrap();
        check_replaceable(&t.path().join("empty")).unwrap();
    }

    #[test]
    fn a_full_disk_is_named_with_what_ran_out() {
        let t = tempfile::tempdir().unwrap();
        let enospc = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context("writing rgb1.img");
        let msg = format!("{:#}", explain_no_space(enospc, t.path()));
        assert!(
            msg.starts_with("no space left on the filesystem holding"),
            "{msg}"
        );
        assert!(
            msg.contains("MiB free") && msg.contains("writing rgb1.img"),
            "{msg}"
        );
        // Any other error on a roomy filesystem is left as it was.
        let other = anyhow::anyhow!("tar2sqfs: I/O error");
        assert_eq!(
            format!("{:#}", explain_no_space(other, t.path())),
            "tar2sqfs: I/O error"
        );
    }
}
