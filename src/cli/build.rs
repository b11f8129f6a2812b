//! `kiln build`: load the profile and secrets, build the selected nodes'
//! images into OUT, print the paths written.

use std::path::PathBuf;

use crate::build::BuildOptions;
use crate::config::profile::Role;
use crate::util::cancel::Cancel;

/// What `kiln build` was asked, as parsed by `main`.
#[derive(Debug, Clone, Default)]
pub struct BuildArgs {
    /// The cluster profile (TOML).
    pub profile: PathBuf,
    /// Build only these nodes (empty: all).
    pub nodes: Vec<String>,
    /// Build only the nodes of this role.
    pub role: Option<Role>,
    /// The output directory.
    pub out: PathBuf,
    /// Use this k3s binary instead of the cache or a download.
    pub k3s_binary: Option<PathBuf>,
    /// Use this air-gap image tarball instead of the cache or a download.
    pub airgap_images: Option<PathBuf>,
    /// Also a qcow2 copy of each image.
    pub qcow2: bool,
    /// Also the netboot tree OUT/pxe.
    pub pxe: bool,
    /// Where node secrets are kept (default: beside the profile).
    pub state_dir: Option<PathBuf>,
    /// Make the Debian base again, whatever its age.
    pub refresh_base: bool,
}

/// Build, then print each artifact's path on stdout; stop (removing the
/// staging directory) when `cancel` is set.
pub fn run(args: BuildArgs, cancel: &Cancel) -> anyhow::Result<()> {
    let (plan, secrets) =
        crate::config::secrets::load_with_secrets(&args.profile, args.state_dir.as_deref())?;
    let opts = BuildOptions {
        out: args.out,
        nodes: args.nodes,
        role: args.role,
        k3s_binary: args.k3s_binary,
        airgap_images: args.airgap_images,
        qcow2: args.qcow2,
        pxe: args.pxe,
        cache: crate::inputs::cache::cache_dir(),
        refresh_base: args.refresh_base,
        test_access_key: None,
        cancel: cancel.clone(),
    };
    let result = crate::build::build(&plan, &secrets, &opts)?;
    for a in result.artifacts {
        println!("{}", a.display());
    }
    Ok(())
}
