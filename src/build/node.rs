//! Per node: the rendered files, the seed, the ESP and the GPT disk image
//! (and its qcow2 copy), with the node's netboot files alongside.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::reuse::{self, KEEP_SHARED, ReuseBy, Stage};
use super::stage_cache::Check;
use super::stage_key::StageKey;
use super::steps::{BootFiles, BuildContext, Inputs, Root, Roots};
use super::{inject_test_key, overlay_dirs, pxe, write_private};
use crate::config::plan::NodePlan;
use crate::image::esp::{EspData, EspFile};
use crate::image::manifest;
use crate::image::{disk, initramfs};
use crate::render::boot;
use crate::util::hash::sha256_file;

/// Every selected node's image (and qcow2, and netboot files): their
/// manifest entries, in the order of the nodes, and the images' sha256 by
/// file name (known from writing or caching them: not hashed again).
///
/// Nodes are written by one worker per CPU: a node's cost is hashing its
/// image (CPU) and syncing it (waiting on the disk), which overlap well.
pub(super) fn write_node_images(
    cx: &BuildContext,
    inputs: &Inputs,
    boot: &BootFiles,
    roots: &Roots,
) -> anyhow::Result<(Vec<manifest::Node>, BTreeMap<String, String>)> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, cx.nodes.len().max(1));
    // After one node fails, the other workers start no new node.
    let failed = AtomicBool::new(false);
    let mut done: Vec<(usize, anyhow::Result<NodeOutput>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let failed = &failed;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (i, node) in cx.nodes.iter().enumerate().skip(w).step_by(workers) {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let r = write_node(cx, inputs, boot, roots, node);
                        failed.fetch_or(r.is_err(), Ordering::Relaxed);
                        out.push((i, r));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a node worker panicked"))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    let mut entries = Vec::new();
    let mut digests = BTreeMap::new();
    for (_, r) in done {
        let (entry, file, sha) = r?;
        digests.insert(file, sha);
        entries.push(entry);
    }
    Ok((entries, digests))
}

/// A node's manifest entry, its image's file name and sha256.
type NodeOutput = (manifest::Node, String, String);

/// One node's image, qcow2 and netboot files.
fn write_node(
    cx: &BuildContext,
    inputs: &Inputs,
    boot: &BootFiles,
    roots: &Roots,
    node: &NodePlan,
) -> anyhow::Result<NodeOutput> {
    let root = &roots[&overlay_dirs(cx.plan, node.role)];
    let name = &node.name;
    let file = format!("{name}.img");
    let image = cx.staging.dir.join(&file);
    let (seed_sha, image_sha) = cx.progress.stage(&file, || {
        write_node_image(cx, inputs, boot, root, node, &image)
    })?;
    let mut entry = manifest::Node {
        cmdline: boot::options(cx.plan, node, 'a'),
        name: name.clone(),
        pxe: None,
        qcow2: None,
        role: node.role.as_str().to_string(),
        root_sha256: root.sha.clone(),
    };
    if cx.opts.qcow2 {
        entry.qcow2 = Some(write_qcow2(cx, name, &image)?);
    }
    if cx.opts.pxe {
        entry.pxe = pxe::write_node_files(cx, inputs, boot, root, node, &seed_sha)?;
    }
    Ok((entry, file, image_sha))
}

/// One node's disk image at `image`: its seed (also into the netboot tree),
/// then the ESP and the GPT disk around its role's root (or the cached
/// image with the same key). Returns the seed's and the image's sha256.
fn write_node_image(
    cx: &BuildContext,
    inputs: &Inputs,
    boot_files: &BootFiles,
    root: &Root,
    node: &NodePlan,
    image: &Path,
) -> anyhow::Result<(String, String)> {
    let (plan, name) = (cx.plan, &node.name);
    let mut rendered = crate::render::render_node(plan, node, &cx.secrets.for_node(name));
    if let Some(k) = &cx.opts.test_access_key {
        inject_test_key(&mut rendered.tree, k);
    }
    let guid_seed = format!("{}/{}", plan.cluster, name);
    let parts = disk::plan_disk(&guid_seed, root.size)?;
    // The netbooting initramfs uses a kiln disk only if it is this node's.
    rendered.tree.file(
        crate::render::DISK_GUID_PATH,
        0o644,
        format!("{}\n", parts.disk_guid),
    );
    let seed = initramfs::build_seed(&rendered.tree, cx.epoch as u32)?;
    let seed_path = cx.work.join(format!("{name}.seed.img"));
    write_private(&seed_path, &seed)?;
    if cx.opts.pxe {
        write_private(&cx.pxe_dir.join(crate::render::pxe::seed_path(name)), &seed)?;
    }
    let mut esp_files = vec![
        EspFile::copy_of(boot::BOOTLOADER_PATH, &boot_files.sdboot),
        EspFile::bytes(boot::LOADER_CONF_PATH, boot::loader_conf(plan)),
        EspFile::bytes(
            boot::entry_path('a'),
            boot::entry(plan, node, 'a', &inputs.files.kernel_version),
        ),
        EspFile::copy_of(boot::kernel_path('a'), &boot_files.vmlinuz),
        EspFile::copy_of(boot::initrd_path('a'), &boot_files.initrd),
        EspFile::copy_of(boot::seed_path('a'), &seed_path),
    ];
    esp_files.extend(disk::install_files(&parts)?);
    let stage = Stage {
        dir: "node-image",
        label: format!("{name}.img"),
        check: Check::Stat,
        reuse_by: ReuseBy::Copy,
        // This build's images and the previous build's.
        keep: KEEP_SHARED.max(2 * cx.nodes.len()),
    };
    let key = image_key(cx, &guid_seed, root, &esp_files)?;
    let img = reuse::cached(cx, &stage, Some(&key), image, || {
        disk::write_disk(image, &parts, &guid_seed, &root.path, &esp_files)
    })?;
    Ok((hex::encode(Sha256::digest(&seed)), img.sha256))
}

/// The key of a node image: what [`disk::write_disk`] writes it from (the
/// GUID seed, which with the root's size fixes the partitions; the root;
/// every ESP file's path and content).
fn image_key(
    cx: &BuildContext,
    guid_seed: &str,
    root: &Root,
    esp_files: &[EspFile],
) -> anyhow::Result<String> {
    let mut key = StageKey::new("node-image")
        .field("kiln", &cx.reuse.identity)
        .field("guid-seed", guid_seed)
        .field("root", format!("{} {}", root.sha, root.size));
    for f in esp_files {
        let sha = match &f.data {
            EspData::Bytes(b) => hex::encode(Sha256::digest(b)),
            EspData::File(p) => sha256_file(p)?,
        };
        key = key.field(&f.path, sha);
    }
    Ok(key.digest())
}

/// `<name>.qcow2` beside the raw `image`, private; its file name.
fn write_qcow2(cx: &BuildContext, name: &str, image: &Path) -> anyhow::Result<String> {
    let q: PathBuf = cx.staging.dir.join(format!("{name}.qcow2"));
    cx.progress.stage(&format!("{name}.qcow2"), || {
        crate::util::tool::run_cancellable(
            crate::image::disk::QEMU_IMG
                .command()?
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(image)
                .arg(&q),
            &cx.opts.cancel,
        )?;
        std::fs::set_permissions(&q, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("making {} private", q.display()))?;
        Ok(())
    })?;
    Ok(format!("{name}.qcow2"))
}
