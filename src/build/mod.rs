//! `kiln build`: the whole pipeline for the selected nodes, written into a
//! staging directory beside the output and published only when every
//! stage succeeded.
//!
//! base tarball → k3s binary → root image (per role) → initramfs →
//! per node: rendered files → seed → ESP + GPT disk → SHA256SUMS,
//! manifest.json → publish.

pub mod staging;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::config::plan::{NodePlan, Plan};
use crate::config::profile::Role;
use crate::config::secrets::ClusterSecrets;
use crate::image::manifest::{self, Manifest};
use crate::image::{disk, esp::EspFile};
use crate::image::{initramfs, rootfs};
use crate::inputs::{base, kernel};
use crate::render::boot;

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
    pub qcow2: bool,
    /// Also write the netboot tree (OUT/pxe, see [`crate::render::pxe`]).
    pub pxe: bool,
    pub cache: PathBuf,
    /// `kiln test` only: an SSH public key added for root, so the checks
    /// can look inside. Never set by `kiln build`.
    pub test_access_key: Option<String>,
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

/// Progress on stderr: one line per stage with its time.
pub struct Progress {
    start: Instant,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            start: Instant::now(),
        }
    }

    pub fn stage<T>(&self, what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let t = Instant::now();
        let spinner = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let s = indicatif::ProgressBar::new_spinner();
            s.set_message(what.to_string());
            s.enable_steady_tick(std::time::Duration::from_millis(120));
            Some(s)
        } else {
            eprintln!("kiln: {what} …");
            None
        };
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        if let Some(s) = spinner {
            s.finish_and_clear();
        }
        match &r {
            Ok(_) => eprintln!("kiln: {what}: done in {secs:.1} s"),
            Err(_) => eprintln!("kiln: {what}: failed after {secs:.1} s"),
        }
        r.with_context(|| what.to_string())
    }

    pub fn total(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
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
    let epoch = source_date_epoch()?;
    let mut tools = vec![rootfs::TAR2SQFS];
    if opts.qcow2 {
        tools.push(crate::image::disk::QEMU_IMG);
    }
    crate::util::tool::preflight(&tools)?;
    let progress = Progress::new();
    let staging = crate::build::staging::Staging::new(&opts.out)?;
    let (names, mut artifacts, manifest) =
        build_staged(plan, secrets, opts, &nodes, epoch, &progress, &staging)
            .map_err(|e| crate::build::staging::explain_no_space(e, &staging.dir))?;

    let out = opts.out.clone();
    staging.publish(&out)?;
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

/// Everything a build writes, into the staging directory: the file names
/// (relative), the paths printed before them (none yet), the manifest.
#[allow(clippy::type_complexity)]
fn build_staged(
    plan: &Plan,
    secrets: &ClusterSecrets,
    opts: &BuildOptions,
    nodes: &[&NodePlan],
    epoch: u64,
    progress: &Progress,
    staging: &crate::build::staging::Staging,
) -> anyhow::Result<(Vec<String>, Vec<PathBuf>, Manifest)> {
    let work = staging.dir.join(".work");
    std::fs::create_dir_all(&work)?;

    let base = progress.stage("base root tarball", || {
        base::plan_base_tarball(plan, &opts.cache, epoch)
    })?;
    check_space(plan, nodes, &base.path, &staging.dir)?;
    let lock = plan.profile_path.with_file_name("kiln.lock");
    let k3s = progress.stage(&format!("k3s {}", plan.k3s.version), || {
        // The test double is never pinned in kiln.lock: a later real build
        // would otherwise meet the double's digest.
        let record = !crate::inputs::k3s::is_double(opts.k3s_binary.as_deref());
        crate::inputs::k3s::Resolver::new(opts.cache.join("k3s"), &lock)
            .with_lock_recording(record)
            .resolve(&plan.k3s.version.to_string(), opts.k3s_binary.as_deref())
    })?;
    let files = progress.stage("kernel, modules, busybox, systemd-boot", || {
        kernel::read_base_files(&base.path, initramfs::INITRAMFS_MODULES)
    })?;
    let compression = kernel::initramfs_compression(files.config.as_deref())?;
    let initrd = progress.stage("initramfs", || {
        initramfs::build_initramfs(&files, compression, epoch as u32)
    })?;
    let initrd_path = work.join("initrd.img");
    std::fs::write(&initrd_path, &initrd)?;
    let vmlinuz_path = work.join("vmlinuz");
    std::fs::write(&vmlinuz_path, &files.vmlinuz)?;
    let sdboot_path = work.join("systemd-bootx64.efi");
    std::fs::write(&sdboot_path, &files.systemd_boot)?;

    // One root image per distinct set of overlays (per role at most).
    let version_text = format!(
        "kiln {KILN_VERSION}\nk3s {}\nk3s-sha256 {}\nbase-sha256 {}\nkernel {}\n",
        plan.k3s.version, k3s.sha256, base.sha256, files.kernel_version
    );
    let mut roots: BTreeMap<Vec<PathBuf>, (PathBuf, u64, String)> = BTreeMap::new();
    for role in [Role::Server, Role::Agent] {
        if !nodes.iter().any(|n| n.role == role) {
            continue;
        }
        let overlays = overlay_dirs(plan, role);
        if roots.contains_key(&overlays) {
            continue;
        }
        let out = work.join(format!("root-{}.sqfs", role.as_str()));
        let inputs = rootfs::RootInputs {
            base: &base.path,
            overlays: overlays.clone(),
            k3s: &k3s.path,
            image_files: rootfs::image_files(&version_text),
            mtime: epoch,
            level: plan.compression_level,
        };
        let img = progress.stage(
            &format!(
                "root image ({} overlays: {})",
                role.as_str(),
                overlays.len()
            ),
            || rootfs::build_root(&inputs, &out),
        )?;
        let sha = sha256_file(&out)?;
        roots.insert(overlays, (out, img.size, sha));
    }

    let pxe_dir = staging.dir.join(crate::render::pxe::DIR);
    // The same kernel and initramfs for every node's update bundle.
    let boot_sha = if opts.pxe {
        Some((sha256_file(&vmlinuz_path)?, sha256_file(&initrd_path)?))
    } else {
        None
    };
    if opts.pxe {
        for d in ["mac", "seed", "update"] {
            std::fs::create_dir_all(pxe_dir.join(d))?;
        }
        std::fs::set_permissions(
            pxe_dir.join("seed"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        std::fs::copy(&vmlinuz_path, pxe_dir.join(crate::render::pxe::KERNEL))?;
        std::fs::copy(&initrd_path, pxe_dir.join(crate::render::pxe::INITRD))?;
        std::fs::write(
            pxe_dir.join(crate::render::pxe::BOOT_SCRIPT),
            crate::render::pxe::boot_script(plan),
        )?;
    }

    let artifacts = Vec::new();
    let mut node_manifest = Vec::new();
    for node in nodes {
        let (root_path, root_size, root_sha) = roots[&overlay_dirs(plan, node.role)].clone();
        let name = &node.name;
        let image = staging.dir.join(format!("{name}.img"));
        let seed_sha = progress.stage(&format!("{name}.img"), || {
            let mut rendered = crate::render::render_node(plan, node, &secrets.for_node(name));
            if let Some(k) = &opts.test_access_key {
                inject_test_key(&mut rendered.tree, k);
            }
            let seed = initramfs::build_seed(&rendered.tree, epoch as u32)?;
            let seed_path = work.join(format!("{name}.seed.img"));
            write_private(&seed_path, &seed)?;
            if opts.pxe {
                write_private(&pxe_dir.join(crate::render::pxe::seed_path(name)), &seed)?;
            }
            let esp_files = vec![
                EspFile::copy_of(boot::BOOTLOADER_PATH, &sdboot_path),
                EspFile::bytes(boot::LOADER_CONF_PATH, boot::loader_conf(plan)),
                EspFile::bytes(
                    boot::entry_path('a'),
                    boot::entry(plan, node, 'a', &files.kernel_version),
                ),
                EspFile::copy_of(boot::kernel_path('a'), &vmlinuz_path),
                EspFile::copy_of(boot::initrd_path('a'), &initrd_path),
                EspFile::copy_of(boot::seed_path('a'), &seed_path),
            ];
            let guid_seed = format!("{}/{}", plan.cluster, name);
            let parts = disk::plan_disk(&guid_seed, root_size)?;
            disk::write_disk(&image, &parts, &guid_seed, &root_path, &esp_files)?;
            Ok(hex::encode(Sha256::digest(&seed)))
        })?;
        let mut entry = manifest::Node {
            cmdline: boot::options(plan, node, 'a'),
            name: name.clone(),
            pxe: None,
            qcow2: None,
            role: node.role.as_str().to_string(),
            root_sha256: root_sha.clone(),
        };
        if opts.qcow2 {
            let q = staging.dir.join(format!("{name}.qcow2"));
            progress.stage(&format!("{name}.qcow2"), || {
                crate::util::tool::run(
                    crate::image::disk::QEMU_IMG
                        .command()?
                        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                        .arg(&image)
                        .arg(&q),
                )?;
                std::fs::set_permissions(&q, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                Ok(())
            })?;
            entry.qcow2 = Some(format!("{name}.qcow2"));
        }
        if opts.pxe {
            let root_file = root_path.file_name().unwrap().to_string_lossy().to_string();
            let (vmlinuz_sha, initrd_sha) = boot_sha.as_ref().expect("hashed with --format pxe");
            let bundle = crate::render::pxe::UpdateBundle {
                cluster: &plan.cluster,
                node: name,
                kiln_version: KILN_VERSION,
                k3s_version: &plan.k3s.version.to_string(),
                kernel_version: &files.kernel_version,
                options: &boot::options(plan, node, boot::SLOT_PLACEHOLDER),
                root: (&root_file, root_size, &root_sha),
                vmlinuz: vmlinuz_sha,
                initrd: initrd_sha,
                seed: &seed_sha,
            };
            std::fs::write(
                pxe_dir.join(crate::render::pxe::update_path(name)),
                bundle.render(),
            )?;
            match node.mac {
                Some(mac) => {
                    let script = crate::render::pxe::mac_script_path(&mac);
                    std::fs::write(
                        pxe_dir.join(&script),
                        crate::render::pxe::node_script(plan, node, &root_file, &root_sha),
                    )?;
                    entry.pxe = Some(manifest::Pxe {
                        root: format!("{}/{root_file}", crate::render::pxe::DIR),
                        script: format!("{}/{script}", crate::render::pxe::DIR),
                        seed: format!(
                            "{}/{}",
                            crate::render::pxe::DIR,
                            crate::render::pxe::seed_path(name)
                        ),
                    });
                }
                None => eprintln!(
                    "kiln: {name} has no `mac` in {}: it cannot netboot (iPXE picks the script by MAC)",
                    plan.profile_path.display()
                ),
            }
        }
        node_manifest.push(entry);
    }
    if opts.pxe {
        for (root_path, _, _) in roots.values() {
            std::fs::rename(root_path, pxe_dir.join(root_path.file_name().unwrap()))?;
        }
    }
    std::fs::remove_dir_all(&work)?;

    // Checksums and manifest over every file in the staging dir.
    let names = list_files(&staging.dir)?;
    let mut sums = String::new();
    let mut art = Vec::new();
    for n in &names {
        let p = staging.dir.join(n);
        let sha = sha256_file(&p)?;
        sums.push_str(&format!("{sha}  {n}\n"));
        art.push(manifest::Artifact {
            path: n.clone(),
            size: std::fs::metadata(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .len(),
            sha256: sha,
        });
    }
    let mut sf = std::fs::File::create(staging.dir.join("SHA256SUMS"))?;
    sf.write_all(sums.as_bytes())?;
    sf.sync_all()?;
    let profile_text = std::fs::read(&plan.profile_path).unwrap_or_default();
    let manifest = Manifest {
        artifacts: art,
        base: manifest::Digest {
            sha256: base.sha256.clone(),
        },
        cluster: plan.cluster.clone(),
        k3s: manifest::K3s {
            sha256: k3s.sha256.clone(),
            version: plan.k3s.version.to_string(),
        },
        kernel: manifest::Kernel {
            initramfs_compression: format!("{compression:?}").to_lowercase(),
            version: files.kernel_version.clone(),
        },
        kiln_version: KILN_VERSION.to_string(),
        nodes: node_manifest,
        profile: plan
            .profile_path
            .file_name()
            .map(|f| f.to_string_lossy().to_string()),
        profile_sha256: hex::encode(Sha256::digest(&profile_text)),
        source_date_epoch: epoch,
    };
    let mf_path = staging.dir.join(manifest::FILE);
    let mut mf = std::fs::File::create(&mf_path)
        .with_context(|| format!("creating {}", mf_path.display()))?;
    mf.write_all(&manifest.to_bytes())
        .and_then(|()| mf.sync_all())
        .with_context(|| format!("writing {}", mf_path.display()))?;
    std::fs::File::open(&staging.dir)?.sync_all()?;
    Ok((names, artifacts, manifest))
}

/// What a node image holds besides its root: ESP contents (kernel,
/// initramfs, seed) and partition metadata, generously.
const NODE_EXTRA_BYTES: u64 = 64 << 20;

/// Refuse to start writing when the filesystem of `staging` cannot hold
/// the build: each root image is about the size of the (compressed) base
/// tarball, and each node image holds a root plus its ESP.
fn check_space(
    plan: &Plan,
    nodes: &[&NodePlan],
    base: &Path,
    staging: &Path,
) -> anyhow::Result<()> {
    let base_bytes = std::fs::metadata(base)
        .with_context(|| format!("reading {}", base.display()))?
        .len();
    let roles: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.role.as_str()).collect();
    let needed =
        base_bytes * roles.len() as u64 + nodes.len() as u64 * (base_bytes + NODE_EXTRA_BYTES);
    let Some(free) = staging::free_bytes(staging) else {
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
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.file_type()?.is_dir() {
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
    f.write_all(data)?;
    Ok(())
}
