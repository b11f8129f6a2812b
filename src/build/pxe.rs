//! The netboot tree (STAGING/pxe, `--format pxe`): the shared kernel,
//! initramfs and boot script, per node its seed, update bundle and iPXE
//! script, and the root images moved in last.

use std::os::unix::fs::PermissionsExt as _;

use anyhow::Context as _;

use super::KILN_VERSION;
use super::steps::{BootFiles, BuildContext, Inputs, Root, Roots, write};
use crate::config::plan::NodePlan;
use crate::image::manifest;
use crate::render::{boot, pxe};

/// The tree's directories and what every node shares: kernel, initramfs,
/// boot script.
pub(super) fn write_shared_files(cx: &BuildContext, boot_files: &BootFiles) -> anyhow::Result<()> {
    let dir = &cx.pxe_dir;
    for d in ["mac", "seed", "update"] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    let seed = dir.join("seed");
    std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", seed.display()))?;
    copy(&boot_files.vmlinuz, &dir.join(pxe::KERNEL))?;
    copy(&boot_files.initrd, &dir.join(pxe::INITRD))?;
    write(
        &dir.join(pxe::BOOT_SCRIPT),
        pxe::boot_script(cx.plan).as_bytes(),
    )
}

/// One node's update bundle and, when it has a MAC, its iPXE script; the
/// node's netboot entry for the manifest (none without a MAC). Its seed is
/// written with its image.
pub(super) fn write_node_files(
    cx: &BuildContext,
    inputs: &Inputs,
    boot_files: &BootFiles,
    root: &Root,
    node: &NodePlan,
    seed_sha: &str,
) -> anyhow::Result<Option<manifest::Pxe>> {
    let (plan, name) = (cx.plan, &node.name);
    let root_file = root.path.file_name().unwrap().to_string_lossy().to_string();
    let (vmlinuz_sha, initrd_sha) = boot_files.sha.as_ref().expect("hashed with --format pxe");
    let bundle = pxe::UpdateBundle {
        cluster: &plan.cluster,
        node: name,
        kiln_version: KILN_VERSION,
        k3s_version: &plan.k3s.version.to_string(),
        kernel_version: &inputs.files.kernel_version,
        options: &boot::options(plan, node, boot::SLOT_PLACEHOLDER),
        root: (&root_file, root.size, &root.sha),
        vmlinuz: vmlinuz_sha,
        initrd: initrd_sha,
        seed: seed_sha,
    };
    write(
        &cx.pxe_dir.join(pxe::update_path(name)),
        bundle.render().as_bytes(),
    )?;
    let Some(mac) = node.mac else {
        eprintln!(
            "kiln: {name} has no `mac` in {}: it cannot netboot (iPXE picks the script by MAC)",
            plan.profile_path.display()
        );
        return Ok(None);
    };
    let script = pxe::mac_script_path(&mac);
    write(
        &cx.pxe_dir.join(&script),
        pxe::node_script(plan, node, &root_file, &root.sha).as_bytes(),
    )?;
    Ok(Some(manifest::Pxe {
        root: format!("{}/{root_file}", pxe::DIR),
        script: format!("{}/{script}", pxe::DIR),
        seed: format!("{}/{}", pxe::DIR, pxe::seed_path(name)),
    }))
}

/// The root images, out of the work directory into the tree.
pub(super) fn move_roots(cx: &BuildContext, roots: &Roots) -> anyhow::Result<()> {
    for root in roots.values() {
        let to = cx.pxe_dir.join(root.path.file_name().unwrap());
        std::fs::rename(&root.path, &to)
            .with_context(|| format!("moving {} to {}", root.path.display(), to.display()))?;
    }
    Ok(())
}

fn copy(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}
