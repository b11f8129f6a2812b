//! Running a stage through the stage cache ([`super::stage_cache`]): the
//! entry whose key matches is put in place, else the stage runs and its
//! output is kept. Each stage says which on stderr and in the stage log,
//! `OUT/stages.log` (`reused root[server] key=…`, `built s1.img key=…`),
//! which is not in SHA256SUMS: a reused and a fresh build differ only there.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context as _;

use super::stage_cache::{Check, Entry, StageCache, link_or_copy};
use super::steps::BuildContext;
use crate::util::hash::sha256_file;

/// The stage log's file name in the output.
pub const STAGE_LOG: &str = "stages.log";
/// Entries kept per stage for roots and initramfs: a few generations of
/// each role.
pub const KEEP_SHARED: usize = 8;

/// One cached stage: its cache folder, its name in the log, how its
/// entry is checked and put in place, how many entries of its kind to
/// keep.
pub(super) struct Stage<'a> {
    pub dir: &'a str,
    pub label: String,
    pub check: Check,
    pub reuse_by: ReuseBy,
    pub keep: usize,
}

/// How a reused entry gets to the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReuseBy {
    /// A hard link (else a copy): for what only the build reads.
    Link,
    /// A copy that keeps holes: for what the user gets and may write to
    /// (a node image booted in place), so two outputs never share a file.
    Copy,
}

/// What the build reused and built, in order.
#[derive(Default)]
pub(super) struct StageLog(Mutex<Vec<String>>);

impl StageLog {
    fn say(&self, line: String) {
        eprintln!("kiln: {line}");
        self.0.lock().expect("not poisoned").push(line);
    }

    /// The log's text, a line per stage.
    pub fn text(&self) -> String {
        let lines = self.0.lock().expect("not poisoned");
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// The cache and the log of one build.
pub(super) struct Reuse {
    pub cache: StageCache,
    /// [`super::stage_cache::kiln_identity`], in every key.
    pub identity: String,
    pub log: StageLog,
}

/// `dest` from the entry of `stage` for `key`, or made by `make` (which
/// writes `dest`) and then cached. Its size and sha256 either way.
/// Without a key (its inputs could not be read: `make` then fails with
/// the stage's own error, or succeeds) nothing is looked up or kept.
pub(super) fn cached(
    cx: &BuildContext,
    stage: &Stage,
    key: Option<&str>,
    dest: &Path,
    make: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Entry> {
    let reuse = &cx.reuse;
    cx.opts.cancel.check()?;
    let Some(key) = key else {
        make()?;
        reuse.log.say(format!("built {} uncached", stage.label));
        return entry_of(dest);
    };
    if let Some(hit) = reuse.cache.lookup(stage.dir, key, stage.check) {
        let placed = match stage.reuse_by {
            ReuseBy::Link => link_or_copy(&hit.path, dest).map_err(anyhow::Error::from),
            ReuseBy::Copy => crate::util::sparse::copy_file(&hit.path, dest, mode_of(&hit.path)?)
                .and_then(|()| Ok(std::fs::File::open(dest)?.sync_all()?)),
        };
        placed.with_context(|| {
            format!(
                "copying cached {} {} to {}",
                stage.label,
                hit.path.display(),
                dest.display()
            )
        })?;
        reuse.log.say(format!("reused {} key={key}", stage.label));
        return Ok(Entry {
            path: dest.to_path_buf(),
            ..hit
        });
    }
    make()?;
    let entry = match reuse.cache.store(stage.dir, key, dest) {
        Ok(e) => Entry {
            path: dest.to_path_buf(),
            ..e
        },
        Err(e) => {
            // A cache that cannot be written costs the next build time,
            // not this build its output.
            log::warn!("not caching {}: {e:#}", stage.label);
            entry_of(dest)?
        }
    };
    reuse.cache.prune(stage.dir, stage.keep);
    reuse.log.say(format!("built {} key={key}", stage.label));
    Ok(entry)
}

/// A file's size and sha256.
fn entry_of(path: &Path) -> anyhow::Result<Entry> {
    Ok(Entry {
        path: path.to_path_buf(),
        size: std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len(),
        sha256: sha256_file(path)?,
    })
}

fn mode_of(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// The first line `tool --version` prints: a tool's version for keys.
pub(super) fn tool_version(tool: &crate::util::tool::Tool) -> anyhow::Result<String> {
    let out = crate::util::tool::run(tool.command()?.arg("--version"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}
