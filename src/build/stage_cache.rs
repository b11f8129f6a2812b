//! The stage cache: outputs of build stages (root images, the initramfs,
//! node images) kept in `CACHE/stages/<stage>/` under their key
//! ([`super::stage_key`]), so a rebuild redoes only what changed.
//!
//! An entry is two files: `<key>`, the output, and `<key>.sum`, written
//! after it, holding its sha256, size and mtime. An entry is used only if
//! both exist and the output still matches: its size and mtime always, and
//! its sha256 too when asked ([`Check::Sha256`]). Anything else is removed
//! and rebuilt. Both files are written under a temp name and renamed, so a
//! killed build leaves no entry that looks whole.
//!
//! Entries enter by hard link when the cache and the build output share
//! a filesystem (no copy), else by a copy that keeps holes; how they
//! leave is the caller's choice ([`link_or_copy`] or a copy). kiln never
//! writes to a file once it is built; a file changed anyway (an image
//! booted in place) fails the check above.
//!
//! The cache is bounded per stage ([`StageCache::prune`]: the entries used
//! last are kept); `rm -rf CACHE/stages` empties it at any time between
//! builds.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::os::unix::fs::PermissionsExt as _;

use anyhow::Context as _;

use crate::util::hash::sha256_file;

/// The cache's folder under kiln's cache directory.
pub const DIR: &str = "stages";
/// Temp files older than this are leftovers of killed builds.
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// How far to check an entry before using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Size and mtime as recorded (node images: hashing one costs as much
    /// as building it).
    Stat,
    /// Size, mtime and the sha256 of the whole file.
    Sha256,
}

/// A whole entry: where it is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// The stage cache under one cache directory.
pub struct StageCache {
    dir: PathBuf,
}

impl StageCache {
    /// The stage cache of the kiln cache directory `cache`.
    pub fn new(cache: &Path) -> Self {
        StageCache {
            dir: cache.join(DIR),
        }
    }

    fn data(&self, stage: &str, key: &str) -> PathBuf {
        self.dir.join(stage).join(key)
    }

    fn sum(&self, stage: &str, key: &str) -> PathBuf {
        self.dir.join(stage).join(format!("{key}.sum"))
    }

    /// The entry of `stage` for `key`, if it is there and whole. A damaged
    /// entry is removed (and said on stderr).
    pub fn lookup(&self, stage: &str, key: &str, check: Check) -> Option<Entry> {
        let (data, sum) = (self.data(stage, key), self.sum(stage, key));
        let text = std::fs::read_to_string(&sum).ok()?;
        match verify(&data, &text, check) {
            Ok(entry) => {
                // Last use, for prune.
                let _ = File::options()
                    .append(true)
                    .open(&sum)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(entry)
            }
            Err(why) => {
                eprintln!("kiln: cached {stage} {key} is damaged ({why:#}): building it again");
                let _ = std::fs::remove_file(&data);
                let _ = std::fs::remove_file(&sum);
                None
            }
        }
    }

    /// Keep `src` (a finished output) as the entry of `stage` for `key`.
    pub fn store(&self, stage: &str, key: &str, src: &Path) -> anyhow::Result<Entry> {
        let dir = self.dir.join(stage);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Node images hold their node's secrets.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", self.dir.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .make_in(&dir, |p| link_or_copy(src, p))
            .with_context(|| format!("caching {} in {}", src.display(), dir.display()))?;
        File::open(tmp.path())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.path().display()))?;
        let sha256 = sha256_file(tmp.path())?;
        let data = self.data(stage, key);
        tmp.persist(&data)
            .map_err(|e| e.error)
            .with_context(|| format!("caching {}", data.display()))?;
        let meta =
            std::fs::metadata(&data).with_context(|| format!("reading {}", data.display()))?;
        let record = format!("{sha256} {} {}\n", meta.len(), mtime_ns(&meta));
        crate::util::atomic::write_atomically(&self.sum(stage, key), record.as_bytes(), 0o644)?;
        Ok(Entry {
            path: data,
            size: meta.len(),
            sha256,
        })
    }

    /// Remove all but the `keep` entries of `stage` used last, and temp
    /// files killed builds left. Errors are ignored: the cache only costs
    /// space.
    pub fn prune(&self, stage: &str, keep: usize) {
        let dir = self.dir.join(stage);
        let Ok(read) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut sums = Vec::new();
        for e in read.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let modified = e.metadata().and_then(|m| m.modified()).ok();
            if name.starts_with(".tmp-") {
                let age = modified.and_then(|m| m.elapsed().ok());
                if age.is_some_and(|a| a > LEFTOVER_AGE) {
                    let _ = std::fs::remove_file(e.path());
                }
            } else if let Some(key) = name.strip_suffix(".sum") {
                sums.push((modified, key.to_string()));
            }
        }
        sums.sort_by(|a, b| b.cmp(a));
        for (_, key) in sums.into_iter().skip(keep) {
            let _ = std::fs::remove_file(self.sum(stage, &key));
            let _ = std::fs::remove_file(self.data(stage, &key));
        }
    }
}

/// Put `entry` (or any finished file) at `dest`: a hard link, else a copy.
pub fn link_or_copy(src: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(src, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            let mode = std::fs::metadata(src)?.permissions().mode() & 0o7777;
            crate::util::sparse::copy_file(src, dest, mode)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
        }
    }
}

/// sha256, size and mtime (ns) from a `.sum` record.
fn parse_record(text: &str) -> Option<(String, u64, i128)> {
    let mut words = text.split_whitespace();
    let sha = words.next()?;
    let size = words.next()?.parse().ok()?;
    let mtime = words.next()?.parse().ok()?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) && words.next().is_none())
        .then(|| (sha.to_string(), size, mtime))
}

fn verify(data: &Path, record: &str, check: Check) -> anyhow::Result<Entry> {
    let (sha256, size, mtime) = parse_record(record).context("unreadable record")?;
    let meta = std::fs::metadata(data).context("no output file")?;
    anyhow::ensure!(meta.len() == size, "{} bytes, recorded {size}", meta.len());
    anyhow::ensure!(mtime_ns(&meta) == mtime, "changed since it was cached");
    if check == Check::Sha256 {
        let actual = sha256_file(data)?;
        anyhow::ensure!(actual == sha256, "sha256 {actual}, recorded {sha256}");
    }
    Ok(Entry {
        path: data.to_path_buf(),
        size,
        sha256,
    })
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt as _;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// What identifies this kiln's code in stage keys: its version and the
/// sha256 of its executable (a rebuilt kiln with the same version number
/// may write different bytes).
pub fn kiln_identity() -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding kiln's own executable")?;
    Ok(format!("{} {}", super::KILN_VERSION, sha256_file(&exe)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn a_stored_entry_is_found_with_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(&dir.path().join("cache"));
        let src = file(dir.path(), "root.sqfs", b"root");
        assert_eq!(cache.lookup("root", "k1", Check::Sha256), None);
        let stored = cache.store("root", "k1", &src).unwrap();
        assert_eq!(
            stored.sha256,
            "4813494d137e1631bba301d5acab6e7bb7aa74ce1185d456565ef51d737677b2"
        );
        assert_eq!(cache.lookup("root", "k1", Check::Sha256), Some(stored));
        assert_eq!(cache.lookup("root", "k2", Check::Sha256), None);
        assert_eq!(cache.lookup("initramfs", "k1", Check::Sha256), None);
    }

    #[test]
    fn a_changed_or_half_written_entry_is_not_used_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(&dir.path().join("cache"));
        for (key, damage) in [("size", b"rooted" as &[u8]), ("same-size", b"ROOT")] {
            let src = file(dir.path(), key, b"root");
            let e = cache.store("root", key, &src).unwrap();
            // Written in place (a hard link shares it with `src`): the
            // mtime changes, and the sha256 too.
            std::fs::write(&e.path, damage).unwrap();
            assert_eq!(cache.lookup("root", key, Check::Sha256), None, "{key}");
            assert!(!e.path.exists(), "{key}: the damaged entry was kept");
        }
        // Output without its record (a build killed between the renames).
        let stage = dir.path().join("cache").join(DIR).join("root");
        std::fs::write(stage.join("k3"), b"root").unwrap();
        assert_eq!(cache.lookup("root", "k3", Check::Stat), None);
    }

    #[test]
    fn the_sha256_check_sees_what_size_and_mtime_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(&dir.path().join("cache"));
        let src = file(dir.path(), "img", b"image");
        let e = cache.store("node-image", "k", &src).unwrap();
        let meta = std::fs::metadata(&e.path).unwrap();
        std::fs::write(&e.path, b"IMAGE").unwrap();
        File::options()
            .append(true)
            .open(&e.path)
            .unwrap()
            .set_modified(meta.modified().unwrap())
            .unwrap();
        assert!(cache.lookup("node-image", "k", Check::Stat).is_some());
        assert_eq!(cache.lookup("node-image", "k", Check::Sha256), None);
    }

    #[test]
    fn prune_keeps_the_entries_used_last() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(&dir.path().join("cache"));
        let old = SystemTime::now() - Duration::from_secs(100);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            let src = file(dir.path(), key, key.as_bytes());
            cache.store("root", key, &src).unwrap();
            File::options()
                .append(true)
                .open(cache.sum("root", key))
                .unwrap()
                .set_modified(old + Duration::from_secs(i as u64))
                .unwrap();
        }
        // Using "a" makes it the newest.
        assert!(cache.lookup("root", "a", Check::Stat).is_some());
        cache.prune("root", 2);
        assert!(cache.lookup("root", "a", Check::Stat).is_some());
        assert!(cache.lookup("root", "c", Check::Stat).is_some());
        assert!(!cache.data("root", "b").exists() && !cache.sum("root", "b").exists());
    }

    #[test]
    fn records_are_read_strictly() {
        let sha = "a".repeat(64);
        assert_eq!(
            parse_record(&format!("{sha} 10 5\n")),
            Some((sha.clone(), 10, 5))
        );
        for bad in [
            format!("{sha} 10\n"),
            format!("{sha} ten 5\n"),
            format!("{} 10 5\n", "g".repeat(64)),
            format!("{sha} 10 5 extra\n"),
        ] {
            assert_eq!(parse_record(&bad), None, "{bad}");
        }
    }
}
