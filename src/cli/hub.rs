//! `kiln hub PROFILE --out DIR`: the bundle for an external hub (see
//! `render::hub`), with `kiln-relay` when a node reaches the hub over
//! TCP, and `SHA256SUMS`. Staged beside DIR and renamed into place, so
//! DIR is either the old bundle or the whole new one.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::config::secrets::load_with_secrets;
use crate::render::hub::bundle;
use crate::util::hash::sha256_file;

/// What `kiln hub` was asked, as parsed by `main`.
#[derive(Debug, Clone, Default)]
pub struct HubArgs {
    pub profile: PathBuf,
    pub out: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// Replace an existing DIR.
    pub force: bool,
}

pub fn run(args: &HubArgs) -> anyhow::Result<()> {
    let (plan, secrets) = load_with_secrets(&args.profile, args.state_dir.as_deref())?;
    let files = bundle(
        &plan,
        &secrets.public_keys(),
        &secrets.operator_public_keys(),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.profile.display()))?;
    let relay = match &plan.wireguard {
        Some(wg) if wg.uses_relay() => Some(crate::inputs::relay::locate()?),
        _ => None,
    };
    if args.out.exists() && !args.force {
        bail!(
            "{} exists\nfix: pass --force to replace it, or choose another --out",
            args.out.display()
        );
    }
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stage = tempfile::Builder::new()
        .prefix(".kiln-hub-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
    let mut names = Vec::new();
    for f in &files {
        write(stage.path(), &f.name, f.text.as_bytes(), f.mode)?;
        names.push(f.name.clone());
    }
    if let Some(r) = relay {
        let bytes = std::fs::read(&r).with_context(|| format!("reading {}", r.display()))?;
        write(stage.path(), crate::inputs::relay::NAME, &bytes, 0o755)?;
        names.push(crate::inputs::relay::NAME.to_string());
    }
    names.sort();
    let mut sums = String::new();
    for n in &names {
        sums.push_str(&format!("{}  {n}\n", sha256_file(&stage.path().join(n))?));
    }
    write(stage.path(), "SHA256SUMS", sums.as_bytes(), 0o644)?;
    publish(stage, &args.out)?;
    println!("{}", args.out.display());
    eprintln!(
        "copy {} to the hub and run ./install.sh there as root (the hub's private key goes in /etc/wireguard/ first; install.sh says where)",
        args.out.display()
    );
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", p.display()))
}

/// Move the staged bundle to `out`, replacing an old one only once the
/// new one is complete.
fn publish(stage: tempfile::TempDir, out: &Path) -> anyhow::Result<()> {
    let staged = stage.keep();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
    if out.exists() {
        let old = out.with_extension("old-kiln-hub");
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        std::fs::rename(&staged, out)
            .with_context(|| format!("renaming into {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(&staged, out)
            .with_context(|| format!("renaming into {}", out.display()))?;
    }
    Ok(())
}
