//! The steps of a build, in order, over one [`BuildContext`]: resolve the
//! inputs, write the SBOM, build the boot files, build the roots; then the
//! node images ([`super::node`]) and the netboot tree ([`super::pxe`]);
//! last the checksums and the manifest.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::reuse::{self, KEEP_SHARED, Reuse, ReuseBy, Stage, StageLog};
use super::stage_cache::{Check, StageCache, kiln_identity};
use super::stage_key::{StageKey, tree_digest};
use super::staging::Staging;
use super::{BuildOptions, KILN_VERSION, Progress, overlay_dirs};
use crate::config::plan::{NodePlan, Plan};
use crate::config::profile::Role;
use crate::config::secrets::ClusterSecrets;
use crate::image::manifest::{self, Manifest};
use crate::image::{initramfs, rootfs, sbom};
use crate::inputs::airgap::ImageTarball;
use crate::inputs::base::{self, BaseTarball};
use crate::inputs::k3s::ResolvedK3s;
use crate::inputs::kernel::{self, BaseFiles, Compression};
use crate::util::hash::sha256_file;

/// What every step of one build reads: the plan, the options, the nodes
/// selected, and where to write.
pub(super) struct BuildContext<'a> {
    pub plan: &'a Plan,
    pub secrets: &'a ClusterSecrets,
    pub opts: &'a BuildOptions,
    pub nodes: &'a [&'a NodePlan],
    pub epoch: u64,
    pub progress: &'a Progress,
    pub staging: &'a Staging,
    /// Intermediate files (STAGING/.work), removed before the checksums.
    pub work: PathBuf,
    /// The netboot tree (STAGING/pxe), written with `--format pxe` only.
    pub pxe_dir: PathBuf,
    /// The stage cache, kiln's identity in its keys, and the stage log.
    pub reuse: Reuse,
}

impl<'a> BuildContext<'a> {
    pub fn new(
        plan: &'a Plan,
        secrets: &'a ClusterSecrets,
        opts: &'a BuildOptions,
        nodes: &'a [&'a NodePlan],
        epoch: u64,
        progress: &'a Progress,
        staging: &'a Staging,
    ) -> anyhow::Result<Self> {
        let reuse = Reuse {
            cache: StageCache::new(&opts.cache),
            identity: kiln_identity()?,
            log: StageLog::default(),
        };
        Ok(BuildContext {
            plan,
            secrets,
            opts,
            nodes,
            epoch,
            progress,
            staging,
            work: staging.dir.join(".work"),
            pxe_dir: staging.dir.join(crate::render::pxe::DIR),
            reuse,
        })
    }
}

/// What the build starts from: the base tarball, the k3s binary, the
/// image tarballs for k3s to import and the boot files read out of the
/// base.
pub(super) struct Inputs {
    pub base: BaseTarball,
    pub k3s: ResolvedK3s,
    /// The release's air-gap tarball and the profile's (often none).
    pub images: Vec<ImageTarball>,
    pub files: BaseFiles,
    /// `kiln-relay`, when a node reaches its hub over TCP.
    pub relay: Option<crate::inputs::relay::Relay>,
}

/// The kernel, initramfs and bootloader, written into the work directory.
pub(super) struct BootFiles {
    pub compression: Compression,
    pub initrd: PathBuf,
    pub vmlinuz: PathBuf,
    pub sdboot: PathBuf,
    /// sha256 of the kernel and of the initramfs (`--format pxe` only):
    /// the same in every node's update bundle.
    pub sha: Option<(String, String)>,
}

/// One root image.
#[derive(Clone)]
pub(super) struct Root {
    pub path: PathBuf,
    pub size: u64,
    pub sha: String,
}

/// Root images by their overlays: one per distinct set (per role at most).
pub(super) type Roots = BTreeMap<Vec<PathBuf>, Root>;

/// The base tarball, the k3s binary, the image tarballs (then a check
/// that the build fits), and the kernel, modules, busybox and
/// systemd-boot out of the base.
pub(super) fn resolve_inputs(cx: &BuildContext) -> anyhow::Result<Inputs> {
    let (plan, opts) = (cx.plan, cx.opts);
    std::fs::create_dir_all(&cx.work).with_context(|| format!("creating {}", cx.work.display()))?;
    let base = cx.progress.stage("base root tarball", || {
        base::plan_base_tarball(plan, &opts.cache, cx.epoch, opts.refresh_base, &opts.cancel)
    })?;
    let lock = plan.profile_path.with_file_name("kiln.lock");
    let resolver = crate::inputs::k3s::Resolver::new(opts.cache.join("k3s"), &lock)
        .with_cancel(opts.cancel.clone());
    let k3s = cx
        .progress
        .stage(&format!("k3s {}", plan.k3s.version), || {
            // The test double is never pinned in kiln.lock: a later real build
            // would otherwise meet the double's digest.
            let record = !crate::inputs::k3s::is_double(opts.k3s_binary.as_deref());
            resolver
                .clone()
                .with_lock_recording(record)
                .resolve(&plan.k3s.version.to_string(), opts.k3s_binary.as_deref())
        })?;
    let images = if plan.airgap.is_empty() && opts.airgap_images.is_none() {
        Vec::new()
    } else {
        cx.progress.stage("image tarballs for k3s to import", || {
            crate::inputs::airgap::resolve_image_tarballs(
                plan,
                &resolver,
                opts.airgap_images.as_deref(),
            )
        })?
    };
    let image_bytes = images.iter().map(|t| t.size).sum();
    super::check_space(plan, cx.nodes, &base.path, image_bytes, &cx.staging.dir)?;
    let files = base_files(cx, &base)?;
    let relay = match &plan.wireguard {
        Some(wg) if wg.uses_relay() => {
            Some(crate::inputs::relay::resolve(files.dpkg_status.as_deref())?)
        }
        _ => None,
    };
    Ok(Inputs {
        base,
        k3s,
        images,
        files,
        relay,
    })
}

/// The kernel, modules, busybox, systemd-boot and dpkg status out of the
/// base, or out of the stage cache (they depend on the base alone).
fn base_files(cx: &BuildContext, base: &BaseTarball) -> anyhow::Result<BaseFiles> {
    let key = StageKey::new("base-files")
        .field("kiln", &cx.reuse.identity)
        .field("base-sha256", &base.sha256)
        .field("modules", initramfs::INITRAMFS_MODULES.join(" "))
        .digest();
    let stage = Stage {
        dir: "base-files",
        label: "base-files".into(),
        check: Check::Sha256,
        reuse_by: ReuseBy::Link,
        keep: KEEP_SHARED,
    };
    let packed = cx.work.join("base-files.tar");
    let mut fresh = None;
    reuse::cached(cx, &stage, Some(&key), &packed, || {
        let files = cx
            .progress
            .stage("kernel, modules, busybox, systemd-boot", || {
                kernel::read_base_files(&base.path, initramfs::INITRAMFS_MODULES)
            })?;
        write(&packed, &crate::inputs::kernel_pack::pack(&files)?)?;
        fresh = Some(files);
        Ok(())
    })?;
    match fresh {
        Some(files) => Ok(files),
        None => {
            let bytes =
                std::fs::read(&packed).with_context(|| format!("reading {}", packed.display()))?;
            crate::inputs::kernel_pack::unpack(&bytes)
                .with_context(|| format!("reading the cached base files {}", packed.display()))
        }
    }
}

/// `sbom.cdx.json` in the staging directory (so SHA256SUMS covers it):
/// the base's installed Debian packages and k3s.
pub(super) fn write_sbom(cx: &BuildContext, inputs: &Inputs) -> anyhow::Result<manifest::Sbom> {
    let base = &inputs.base.path;
    let packages = match &inputs.files.dpkg_status {
        Some(status) => crate::inputs::dpkg::installed_packages(status)
            .with_context(|| format!("listing the Debian packages in {}", base.display()))?,
        None => {
            log::warn!(
                "{} has no {}: the SBOM lists k3s only",
                base.display(),
                crate::inputs::dpkg::STATUS
            );
            Vec::new()
        }
    };
    let version = cx.plan.k3s.version.to_string();
    let bytes = sbom::render_sbom(&sbom::SbomInputs {
        cluster: &cx.plan.cluster,
        kiln_version: KILN_VERSION,
        source_date_epoch: cx.epoch,
        base_sha256: &inputs.base.sha256,
        packages: &packages,
        k3s_version: &version,
        k3s_sha256: &inputs.k3s.sha256,
        relay: inputs
            .relay
            .as_ref()
            .map(|r| (r.version.as_str(), r.sha256.as_str())),
    })?;
    write(&cx.staging.dir.join(sbom::FILE), &bytes)?;
    Ok(manifest::Sbom {
        components: packages.len() + 1 + usize::from(inputs.relay.is_some()),
        format: "CycloneDX 1.5 JSON".into(),
        path: sbom::FILE.into(),
        sha256: hex::encode(Sha256::digest(&bytes)),
    })
}

/// The initramfs, then the kernel, initramfs and systemd-boot written into
/// the work directory (and hashed for the netboot tree).
pub(super) fn build_boot_files(cx: &BuildContext, inputs: &Inputs) -> anyhow::Result<BootFiles> {
    let files = &inputs.files;
    let compression = kernel::initramfs_compression(files.config.as_deref())?;
    // The initramfs is made of the base's files by kiln's code alone.
    let key = StageKey::new("initramfs")
        .field("kiln", &cx.reuse.identity)
        .field("base-sha256", &inputs.base.sha256)
        .field("compression", format!("{compression:?}"))
        .field("mtime", cx.epoch)
        .digest();
    let stage = Stage {
        dir: "initramfs",
        label: "initramfs".into(),
        check: Check::Sha256,
        reuse_by: ReuseBy::Link,
        keep: KEEP_SHARED,
    };
    let initrd_path = cx.work.join("initrd.img");
    let initrd = reuse::cached(cx, &stage, Some(&key), &initrd_path, || {
        let bytes = cx.progress.stage("initramfs", || {
            initramfs::build_initramfs(files, compression, cx.epoch as u32)
        })?;
        write(&initrd_path, &bytes)
    })?;
    let vmlinuz_path = cx.work.join("vmlinuz");
    write(&vmlinuz_path, &files.vmlinuz)?;
    let sdboot_path = cx.work.join("systemd-bootx64.efi");
    write(&sdboot_path, &files.systemd_boot)?;
    let sha = cx
        .opts
        .pxe
        .then(|| (hex::encode(Sha256::digest(&files.vmlinuz)), initrd.sha256));
    Ok(BootFiles {
        compression,
        initrd: initrd_path,
        vmlinuz: vmlinuz_path,
        sdboot: sdboot_path,
        sha,
    })
}

/// One root image per distinct set of overlays (per role at most), for
/// the roles of the selected nodes.
pub(super) fn build_roots(cx: &BuildContext, inputs: &Inputs) -> anyhow::Result<Roots> {
    let mut version_text = format!(
        "kiln {KILN_VERSION}\nk3s {}\nk3s-sha256 {}\nbase-sha256 {}\nkernel {}\n",
        cx.plan.k3s.version, inputs.k3s.sha256, inputs.base.sha256, inputs.files.kernel_version
    );
    for t in &inputs.images {
        version_text.push_str(&format!("image-tarball {} {}\n", t.sha256, t.name));
    }
    let tar2sqfs = reuse::tool_version(&rootfs::TAR2SQFS)?;
    let mut roots = Roots::new();
    for role in [Role::Server, Role::Agent] {
        if !cx.nodes.iter().any(|n| n.role == role) {
            continue;
        }
        let overlays = overlay_dirs(cx.plan, role);
        if roots.contains_key(&overlays) {
            continue;
        }
        let out = cx.work.join(format!("root-{}.sqfs", role.as_str()));
        let root_inputs = rootfs::RootInputs {
            base: &inputs.base.path,
            overlays: overlays.clone(),
            k3s: &inputs.k3s.path,
            images: &inputs.images,
            relay: inputs.relay.as_ref().map(|r| r.path.as_path()),
            image_files: image_files(cx.plan, &version_text),
            mtime: cx.epoch,
            level: cx.plan.compression_level,
        };
        let what = format!(
            "root image ({} overlays: {})",
            role.as_str(),
            overlays.len()
        );
        let key = root_key(cx, inputs, &root_inputs, &tar2sqfs);
        let stage = Stage {
            dir: "root",
            label: format!("root[{}]", role.as_str()),
            check: Check::Sha256,
            reuse_by: ReuseBy::Link,
            keep: KEEP_SHARED,
        };
        let img = reuse::cached(cx, &stage, key.as_deref(), &out, || {
            cx.progress.stage(&what, || {
                rootfs::build_root_cancellable(&root_inputs, &out, &cx.opts.cancel)
            })?;
            Ok(())
        })?;
        report_image_bytes(role, &inputs.images, img.size);
        roots.insert(
            overlays,
            Root {
                path: out,
                size: img.size,
                sha: img.sha256,
            },
        );
    }
    Ok(roots)
}

/// The key of a root image: everything that goes into the tar stream
/// tar2sqfs reads (the base, the overlays, kiln's files, k3s, the image
/// tarballs, the mtime) and how it is compressed. `None` when the overlays
/// cannot be read (a FIFO in them): the stage then fails with its error.
fn root_key(
    cx: &BuildContext,
    inputs: &Inputs,
    root: &rootfs::RootInputs,
    tar2sqfs: &str,
) -> Option<String> {
    let overlays = match rootfs::overlay_tree(&root.overlays) {
        Ok(t) => t,
        Err(e) => {
            log::debug!("no cache key for the root: {e:#}");
            return None;
        }
    };
    let mut key = StageKey::new("root")
        .field("kiln", &cx.reuse.identity)
        .field("base-sha256", &inputs.base.sha256)
        .field("overlays", tree_digest(&overlays))
        .field("image-files", tree_digest(&root.image_files))
        .field("k3s-sha256", &inputs.k3s.sha256);
    for t in root.images {
        key = key.field("image-tarball", format!("{} {}", t.sha256, t.name));
    }
    if let Some(relay) = &inputs.relay {
        key = key.field("relay-sha256", &relay.sha256);
    }
    Some(
        key.field("mtime", root.mtime)
            .field("compression-level", root.level)
            .field("block-bytes", rootfs::BLOCK_BYTES)
            .field("tar2sqfs", tar2sqfs)
            .digest(),
    )
}

/// kiln's files in every root image: units, scripts, version, and the
/// k3s manifests of the profile (`render::manifests`).
fn image_files(plan: &Plan, version_text: &str) -> crate::render::tree::FileTree {
    let mut t = rootfs::image_files(version_text);
    t.extend(crate::render::image_files(plan));
    t
}

/// What the image tarballs cost a root image, on stderr: the bytes they
/// add. squashfs stores them about as they are: a `.tar.zst` or
/// `.tar.gz` is compressed already, and so are the layers in a plain
/// `.tar` that `docker save` writes.
fn report_image_bytes(role: Role, images: &[ImageTarball], root_bytes: u64) {
    if images.is_empty() {
        return;
    }
    let added: u64 = images.iter().map(|t| t.size).sum();
    let mib = |b: u64| b as f64 / crate::util::size::MIB as f64;
    eprintln!(
        "kiln: image tarballs add {:.1} MiB ({added} bytes, {} file(s)) to the {} root image, now {:.1} MiB",
        mib(added),
        images.len(),
        role.as_str(),
        mib(root_bytes)
    );
}

/// SHA256SUMS and manifest.json over every file in the staging directory
/// (`known`: sha256 of some of them by name, not hashed again), then the
/// stage log, then the directory synced. Returns the files' names
/// (relative, sorted).
pub(super) fn write_checksums_and_manifest(
    cx: &BuildContext,
    inputs: &Inputs,
    boot: &BootFiles,
    nodes: Vec<manifest::Node>,
    known: &BTreeMap<String, String>,
    sbom: manifest::Sbom,
) -> anyhow::Result<(Vec<String>, Manifest)> {
    let names = super::list_files(&cx.staging.dir)?;
    let artifacts = write_checksums(cx, &names, known)?;
    let mut manifest = manifest_of(cx, inputs, boot, artifacts, nodes);
    manifest.sbom = Some(sbom);
    let mf_path = cx.staging.dir.join(manifest::FILE);
    let mut mf = std::fs::File::create(&mf_path)
        .with_context(|| format!("creating {}", mf_path.display()))?;
    mf.write_all(&manifest.to_bytes())
        .and_then(|()| mf.sync_all())
        .with_context(|| format!("writing {}", mf_path.display()))?;
    write(
        &cx.staging.dir.join(reuse::STAGE_LOG),
        cx.reuse.log.text().as_bytes(),
    )?;
    let dir = &cx.staging.dir;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok((names, manifest))
}

/// SHA256SUMS over `names`; their manifest entries.
fn write_checksums(
    cx: &BuildContext,
    names: &[String],
    known: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<manifest::Artifact>> {
    let mut sums = String::new();
    let mut art = Vec::new();
    for n in names {
        cx.opts.cancel.check()?;
        let p = cx.staging.dir.join(n);
        let sha = match known.get(n) {
            Some(sha) => sha.clone(),
            None => sha256_file(&p)?,
        };
        sums.push_str(&format!("{sha}  {n}\n"));
        art.push(manifest::Artifact {
            path: n.clone(),
            size: std::fs::metadata(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .len(),
            sha256: sha,
        });
    }
    let sums_path = cx.staging.dir.join("SHA256SUMS");
    std::fs::File::create(&sums_path)
        .and_then(|mut f| {
            f.write_all(sums.as_bytes())?;
            f.sync_all()
        })
        .with_context(|| format!("writing {}", sums_path.display()))?;
    Ok(art)
}

fn manifest_of(
    cx: &BuildContext,
    inputs: &Inputs,
    boot: &BootFiles,
    artifacts: Vec<manifest::Artifact>,
    nodes: Vec<manifest::Node>,
) -> Manifest {
    let plan = cx.plan;
    let profile_text = std::fs::read(&plan.profile_path).unwrap_or_default();
    Manifest {
        artifacts,
        base: manifest::Digest {
            sha256: inputs.base.sha256.clone(),
        },
        cluster: plan.cluster.clone(),
        images: inputs
            .images
            .iter()
            .map(|t| manifest::ImageTarball {
                name: t.name.clone(),
                sha256: t.sha256.clone(),
                size: t.size,
            })
            .collect(),
        k3s: manifest::K3s {
            sha256: inputs.k3s.sha256.clone(),
            version: plan.k3s.version.to_string(),
        },
        kernel: manifest::Kernel {
            initramfs_compression: format!("{:?}", boot.compression).to_lowercase(),
            version: inputs.files.kernel_version.clone(),
        },
        kiln_version: KILN_VERSION.to_string(),
        nodes,
        profile: plan
            .profile_path
            .file_name()
            .map(|f| f.to_string_lossy().to_string()),
        profile_sha256: hex::encode(Sha256::digest(&profile_text)),
        relay: inputs.relay.as_ref().map(|r| manifest::Relay {
            sha256: r.sha256.clone(),
            version: r.version.clone(),
        }),
        sbom: None,
        source_date_epoch: cx.epoch,
    }
}

/// `std::fs::write` with the path in its error.
pub(super) fn write(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}
