//! `kiln import-k3os`: read k3os `config.yaml` files, write the kiln
//! profile [`crate::config::k3os`] makes of them (stdout, or `--out`
//! atomically and 0600: it may hold the cluster token and files with
//! secrets), and tell on stderr what to fill in and what was not carried
//! over.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::config::k3os::{self, Source};
use crate::config::types;

/// What `kiln import-k3os` was asked for.
pub struct ImportArgs {
    /// k3os config files, in order: nodes, and shared files (no hostname).
    pub configs: Vec<PathBuf>,
    /// Where to write the profile; `None` for stdout.
    pub out: Option<PathBuf>,
    /// Replace an existing `out` that differs.
    pub force: bool,
}

/// A k3os config is a few KiB; anything this big is another file.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The cluster's name: the `--out` file's stem when it is a label
/// (`lab.toml` → `lab`), else `k3os`.
fn cluster_name(out: Option<&Path>) -> String {
    out.and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .filter(|s| types::is_dns_label(s))
        .unwrap_or_else(|| "k3os".to_string())
}

fn read(path: &Path) -> anyhow::Result<Source> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() > MAX_CONFIG_BYTES {
        anyhow::bail!(
            "{} is {} bytes: not a k3os config.yaml (those are a few KiB)",
            path.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (byte {}): k3os read its config.yaml as UTF-8 YAML",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(Source {
        name: path.display().to_string(),
        text,
    })
}

/// `kiln import-k3os CONFIG.yaml… [--out PROFILE] [--force]`.
pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let sources = args
        .configs
        .iter()
        .map(|p| read(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let import = k3os::import(&sources, &cluster_name(args.out.as_deref()))?;
    eprint!("{}", import.report());
    let Some(out) = &args.out else {
        print!("{}", import.profile);
        return Ok(());
    };
    crate::util::atomic::write_unless_changed(
        out,
        import.profile.as_bytes(),
        crate::util::mode::SECRET_FILE_MODE,
        args.force,
        "pass --force to replace it, or --out to write another file",
    )?;
    println!("{}", out.display());
    if !import.fill_in.is_empty() {
        eprintln!(
            "next: fill in the {} values above, then `kiln check {}`",
            import.fill_in.len(),
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_is_named_after_the_profile() {
        assert_eq!(cluster_name(Some(Path::new("profiles/Lab.toml"))), "lab");
        assert_eq!(cluster_name(Some(Path::new("my.lab.toml"))), "k3os");
        assert_eq!(cluster_name(None), "k3os");
    }
}
