//! `kiln upgrade`: set the profile's k3s version (`--k3s`) and/or print
//! the system-upgrade-controller Plans that roll it out (`--plan`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};

use crate::deliver::upgrade;

/// What `kiln upgrade` was asked, as parsed by `main`.
#[derive(Debug, Clone, Default)]
pub struct UpgradeArgs {
    /// The cluster profile (TOML).
    pub profile: PathBuf,
    /// The k3s version to move to.
    pub k3s: Option<String>,
    /// Print (or write) the rollout plans.
    pub plan: bool,
    /// kiln serve's URL as the nodes reach it (for `plan`).
    pub server: Option<String>,
    /// Write the plans into this directory instead of stdout.
    pub out: Option<PathBuf>,
}

/// Edit the profile, then print the plans, as asked.
pub fn run(args: UpgradeArgs) -> anyhow::Result<()> {
    if args.k3s.is_none() && !args.plan {
        bail!(
            "say what to do: --k3s VERSION (edit the profile) and/or --plan (print the rollout plans)"
        );
    }
    if let Some(v) = &args.k3s {
        set_k3s_version(&args.profile, v)?;
    }
    if args.plan {
        print_plans(&args.profile, args.server, args.out)?;
    }
    Ok(())
}

/// `--k3s`: rewrite the profile's version and say what to run next (stderr).
fn set_k3s_version(profile: &Path, v: &str) -> anyhow::Result<()> {
    let (old, _) = upgrade::write_k3s_version(profile, v)?;
    eprintln!(
        "{}: k3s {old} → {v}\nnext: kiln build {} --format pxe --out DIR (rebuilds the root images and writes each node's update bundle), kiln serve {} --out DIR, then kiln-update on the nodes or kiln upgrade {} --plan --server URL",
        profile.display(),
        profile.display(),
        profile.display(),
        profile.display()
    );
    Ok(())
}

/// `--plan`: the rollout plans on stdout, or into OUT (printing the path).
fn print_plans(profile: &Path, server: Option<String>, out: Option<PathBuf>) -> anyhow::Result<()> {
    let plan = crate::config::plan::load(profile)?;
    let server = server.ok_or_else(|| {
        anyhow!("--plan needs --server URL: the address of kiln serve as the nodes reach it, e.g. http://192.168.1.10:8080")
    })?;
    if !server.starts_with("http://") {
        bail!(
            "--server {server}: write http://ADDRESS:PORT (kiln-update fetches over plain HTTP and checks every digest)"
        );
    }
    let text = upgrade::plans(&plan, &server);
    match out {
        Some(dir) => {
            fs_err::create_dir_all(&dir)?;
            let p = dir.join("kiln-upgrade-plans.yaml");
            upgrade::replace_file(&p, &text)?;
            println!("{}", p.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}
