//! `kiln build`: the whole pipeline for the selected nodes, written into a
//! staging directory beside the output and published only when every
//! stage succeeded.
//!
//! base tarball → k3s binary, image tarballs → SBOM → root image (per
//! role) → initramfs →
//! per node: rendered files → seed → ESP + GPT disk → SHA256SUMS,
//! manifest.json → publish.
//!
//! The kernel files, the initramfs, each root and each node image go
//! through the stage cache ([`stage_key`], [`stage_cache`], `reuse`): an
//! output whose inputs did not change is reused, and `OUT/stages.log`
//! says which.

mod node;
mod progress;
mod pxe;
mod reuse;
pub mod stage_cache;
pub mod stage_key;
pub mod staging;
mod steps;

pub use progress::Progress;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::config::plan::{NodePlan, Plan};
use crate::config::profile::Role;
use crate::config::secrets::ClusterSecrets;
use crate::image::manifest::Manifest;
use crate::image::rootfs;
use crate::util::cancel::{self, Cancel, Interrupted};
use steps::BuildContext;

/// Modification time of everything kiln writes when `SOURCE_DATE_EPOCH`
/// is not set: 2025-01-01T00:00:00Z.
pub const DEFAULT_EPOCH: u64 = 1_735_689_600;
/// Name of the kiln version in the image and the manifest.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub out: PathBuf,
    /// Node names; empty means all (or all of `role`).
    pub nodes: Vec<String>,
    pub role: Option<Role>,
    /// `--k3s-binary` / `KILN_K3S_BINARY`.
    pub k3s_binary: Option<PathBuf>,
    /// `--airgap-images` / `KILN_AIRGAP_IMAGES`: the release's air-gap
    /// image tarball (with `k3s.airgap = true`).
    pub airgap_images: Option<PathBuf>,
    pub qcow2: bool,
    /// Also write the netboot tree (OUT/pxe, see [`crate::render::pxe`]).
    pub pxe: bool,
    pub cache: PathBuf,
    /// `--refresh-base`: make the Debian base again, whatever its age.
    pub refresh_base: bool,
    /// `kiln test` only: an SSH public key added for root, so the checks
    /// can look inside. Never set by `kiln build`.
    pub test_access_key: Option<String>,
    /// Set by the caller (`main`, on a signal) to stop the build: it stops
    /// between steps and inside long ones, removes its staging directory
    /// and returns [`Interrupted`].
    pub cancel: Cancel,
}

/// Add a test access key for root to a node's files (`kiln test` only).
pub fn inject_test_key(tree: &mut crate::render::tree::FileTree, public_key: &str) {
    let path = "/etc/ssh/authorized_keys/root";
    let mut text = tree.text(path).unwrap_or("").to_string();
    text.push_str(&format!(
        "# added by `kiln test` for its checks; not in images from `kiln build`\n{}\n",
        public_key.trim()
    ));
    tree.file(path, 0o644, text);
}

/// `SOURCE_DATE_EPOCH`, or [`DEFAULT_EPOCH`].
pub fn source_date_epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s} is not a number of seconds")),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

fn select_nodes<'p>(plan: &'p Plan, opts: &BuildOptions) -> anyhow::Result<Vec<&'p NodePlan>> {
    for n in &opts.nodes {
        if plan.node(n).is_none() {
            let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
            bail!(
                "no node `{n}` in {}; nodes: {}",
                plan.profile_path.display(),
                names.join(", ")
            );
        }
    }
    let sel: Vec<&NodePlan> = plan
        .nodes
        .iter()
        .filter(|n| {
            (opts.nodes.is_empty() || opts.nodes.contains(&n.name))
                && opts.role.is_none_or(|r| r == n.role)
        })
        .collect();
    if sel.is_empty() {
        bail!("no node matches the selection (--node/--role)");
    }
    Ok(sel)
}

/// The overlays of a role, in order: `overlays/common`, `overlays/<role>`
/// next to the profile's repository (the profile's directory's parent,
/// or the profile's directory).
pub fn overlay_dirs(plan: &Plan, role: Role) -> Vec<PathBuf> {
    let dir = plan
        .profile_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let root = [dir.join("overlays"), dir.join("..").join("overlays")]
        .into_iter()
        .find(|p| p.is_dir());
    let Some(root) = root else { return Vec::new() };
    [root.join("common"), root.join(role.as_str())]
        .into_iter()
        .filter(|p| p.is_dir())
        .collect()
}

/// What a build produced.
#[derive(Debug)]
pub struct BuildResult {
    pub artifacts: Vec<PathBuf>,
    pub manifest: Manifest,
}

/// Run the whole build.
pub fn build(
    plan: &Plan,
    secrets: &ClusterSecrets,
    opts: &BuildOptions,
) -> anyhow::Result<BuildResult> {
    let nodes = select_nodes(plan, opts)?;
    crate::inputs::airgap::check_given(plan, opts.airgap_images.as_deref())?;
    let epoch = source_date_epoch()?;
    let mut tools = vec![rootfs::TAR2SQFS];
    if opts.qcow2 {
        tools.push(crate::image::disk::QEMU_IMG);
    }
    crate::util::tool::preflight(&tools)?;
    let progress = Progress::with_cancel(opts.cancel.clone());
    let staging = crate::build::staging::Staging::new(&opts.out)?;
    let cx = BuildContext::new(plan, secrets, opts, &nodes, epoch, &progress, &staging)?;
    let staged = build_staged(&cx).and_then(|r| Ok(opts.cancel.check().map(|()| r)?));
    let (names, manifest) = match staged {
        Ok(r) => r,
        Err(e) if opts.cancel.is_cancelled() || cancel::interrupted(&e).is_some() => {
            // Whatever failed, the build was asked to stop: say so, not
            // what the stopped tool said.
            log::debug!("build stopped: {e:#}");
            let dir = staging.dir.clone();
            drop(staging);
            return Err(Interrupted::saying(format!(
                "interrupted: removed {}; {} is as it was",
                dir.display(),
                opts.out.display()
            ))
            .into());
        }
        Err(e) => return Err(crate::build::staging::explain_no_space(e, &staging.dir)),
    };
    let mut artifacts = Vec::new();

    let out = opts.out.clone();
    staging.publish(&out)?;
    if opts.cancel.is_cancelled() {
        // Too late to keep the previous build: say what OUT holds.
        return Err(Interrupted::saying(format!(
            "interrupted after publishing: {} holds the new build",
            out.display()
        ))
        .into());
    }
    eprintln!(
        "kiln: built {} node(s) in {:.1} s",
        nodes.len(),
        progress.total()
    );
    let mut artifacts_out: Vec<PathBuf> = names.iter().map(|n| out.join(n)).collect();
    artifacts_out.push(out.join("SHA256SUMS"));
    artifacts_out.push(out.join("manifest.json"));
    artifacts.extend(artifacts_out);
    Ok(BuildResult {
        artifacts,
        manifest,
    })
}

/// Everything a build writes, into the staging directory, step by step:
/// the file names (relative) and the manifest.
fn build_staged(cx: &BuildContext) -> anyhow::Result<(Vec<String>, Manifest)> {
    let inputs = steps::resolve_inputs(cx)?;
    let sbom = steps::write_sbom(cx, &inputs)?;
    let boot = steps::build_boot_files(cx, &inputs)?;
    let roots = steps::build_roots(cx, &inputs)?;
    // Everything is read from the base: was it one file all along?
    inputs.base.check_unchanged()?;
    if cx.opts.pxe {
        pxe::write_shared_files(cx, &boot)?;
    }
    let (nodes, digests) = node::write_node_images(cx, &inputs, &boot, &roots)?;
    if cx.opts.pxe {
        pxe::move_roots(cx, &roots)?;
    }
    std::fs::remove_dir_all(&cx.work).with_context(|| format!("removing {}", cx.work.display()))?;
    steps::write_checksums_and_manifest(cx, &inputs, &boot, nodes, &digests, sbom)
}

/// What a node image holds besides its root: ESP contents (kernel,
/// initramfs, seed) and partition metadata, generously.
const NODE_EXTRA_BYTES: u64 = 64 << 20;

/// Refuse to start writing when the filesystem of `staging` cannot hold
/// the build: each root image is about the size of the (compressed) base
/// tarball plus the image tarballs (`image_bytes`), and each node image
/// holds a root plus its ESP.
fn check_space(
    plan: &Plan,
    nodes: &[&NodePlan],
    base: &Path,
    image_bytes: u64,
    staging: &Path,
) -> anyhow::Result<()> {
    let base_bytes = std::fs::metadata(base)
        .with_context(|| format!("reading {}", base.display()))?
        .len()
        + image_bytes;
    let roles: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.role.as_str()).collect();
    let needed =
        base_bytes * roles.len() as u64 + nodes.len() as u64 * (base_bytes + NODE_EXTRA_BYTES);
    let Some(free) = crate::util::space::free_bytes(staging) else {
        return Ok(());
    };
    if free < needed {
        let mib = |b: u64| b.div_ceil(1 << 20);
        bail!(
            "no space left for the build on the filesystem holding {}: {} MiB free, the build needs about {} MiB ({} node(s) of {}); free space, or choose an --out on a bigger filesystem",
            staging.parent().unwrap_or(staging).display(),
            mib(free),
            mib(needed),
            nodes.len(),
            plan.cluster
        );
    }
    Ok(())
}

/// Every file under `dir`, as sorted `/`-separated relative paths.
fn list_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> anyhow::Result<()> {
        let reading = || format!("reading {}", dir.display());
        for e in std::fs::read_dir(dir).with_context(reading)? {
            let e = e.with_context(reading)?;
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.file_type().with_context(reading)?.is_dir() {
                walk(&e.path(), &format!("{name}/"), out)?;
            } else {
                out.push(name);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}
