//! `kiln test` and `kiln run`: boot a node's image in QEMU, check it from
//! inside, print the table; or boot it with the console on the terminal.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::build::{self, BuildOptions};
use crate::config::plan::Plan;
use crate::config::secrets::ClusterSecrets;
use crate::util::cancel::Cancel;
use crate::verify::checks::{self as verify, BootOptions, Expect, Report};
use crate::verify::vm::VmConfig;

/// What `kiln test` was asked.
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    pub node: String,
    /// A prebuilt image (else the node's image is built with a test access key).
    pub image: Option<PathBuf>,
    /// A private key authorized for root in the profile (needed with `image`).
    pub ssh_key: Option<PathBuf>,
    pub k3s_binary: Option<PathBuf>,
    /// The release's air-gap image tarball (`--airgap-images`).
    pub airgap_images: Option<PathBuf>,
    /// Private keys of the profile's users (`user=path`), for the login check.
    pub user_keys: Vec<(String, PathBuf)>,
    pub cache: PathBuf,
    /// Keep the built image and the console log here.
    pub keep: Option<PathBuf>,
    /// Set by the caller to stop the build or the VM (which is killed).
    pub cancel: Cancel,
}

/// What `kiln test` was asked, as parsed by `main`.
#[derive(Debug, Clone, Default)]
pub struct TestArgs {
    /// The cluster profile (TOML).
    pub profile: PathBuf,
    /// Where node secrets are kept (default: beside the profile).
    pub state_dir: Option<PathBuf>,
    pub node: String,
    pub image: Option<PathBuf>,
    pub ssh_key: Option<PathBuf>,
    /// `USER=PATH`, as given to `--user-key`.
    pub user_keys: Vec<String>,
    pub k3s_binary: Option<PathBuf>,
    pub airgap_images: Option<PathBuf>,
    pub keep: Option<PathBuf>,
}

/// `kiln test`: load, test, print the table; fails if any check failed.
/// Stops (build cleaned up, VM killed) when `cancel` is set.
pub fn run(args: TestArgs, cancel: &Cancel) -> anyhow::Result<()> {
    let (plan, secrets) =
        crate::config::secrets::load_with_secrets(&args.profile, args.state_dir.as_deref())?;
    let opts = TestOptions {
        node: args.node,
        image: args.image,
        ssh_key: args.ssh_key,
        k3s_binary: args.k3s_binary,
        airgap_images: args.airgap_images,
        user_keys: parse_user_keys(&args.user_keys)?,
        cache: crate::inputs::cache::cache_dir(),
        keep: args.keep,
        cancel: cancel.clone(),
    };
    let report = test_node(&plan, &secrets, &opts)?;
    print!("{}", report.table());
    if !report.passed() {
        bail!("{}: some checks failed", report.node);
    }
    Ok(())
}

/// `USER=PATH` pairs from `--user-key`.
fn parse_user_keys(given: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    given
        .iter()
        .map(|u| {
            let (user, path) = u
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--user-key {u}: write USER=PATH"))?;
            Ok((user.to_string(), PathBuf::from(path)))
        })
        .collect()
}

/// Build (or take) the node's image, boot it and check it.
pub fn test_node(
    plan: &Plan,
    secrets: &ClusterSecrets,
    opts: &TestOptions,
) -> anyhow::Result<Report> {
    let node = plan
        .node(&opts.node)
        .with_context(|| format!("no node `{}` in {}", opts.node, plan.profile_path.display()))?;
    let tmp = tempfile::Builder::new().prefix("kiln-test-").tempdir()?;
    let mut files = crate::render::render_node(plan, node, &secrets.for_node(&node.name));
    let (image, key) = match (&opts.image, &opts.ssh_key) {
        (Some(img), Some(k)) => (img.clone(), k.clone()),
        (Some(_), None) => bail!(
            "--image needs --ssh-key: a private key the profile authorizes for root (kiln adds its own test key only to images it builds)"
        ),
        (None, given) => {
            let (key, public) = match given {
                Some(k) => (k.clone(), None),
                None => {
                    let (k, p) = verify::make_test_key(tmp.path())?;
                    (k, Some(p))
                }
            };
            if let Some(p) = &public {
                build::inject_test_key(&mut files.tree, p);
                eprintln!(
                    "kiln test: the image under test carries a test access key for root (only `kiln test` adds it)"
                );
            }
            let out = opts.keep.clone().unwrap_or_else(|| tmp.path().join("out"));
            let b = BuildOptions {
                out: out.clone(),
                nodes: vec![node.name.clone()],
                k3s_binary: opts.k3s_binary.clone(),
                airgap_images: opts.airgap_images.clone(),
                cache: opts.cache.clone(),
                test_access_key: public,
                cancel: opts.cancel.clone(),
                ..BuildOptions::default()
            };
            build::build(plan, secrets, &b)?;
            (out.join(format!("{}.img", node.name)), key)
        }
    };
    let real_k3s = !crate::inputs::k3s::is_double(opts.k3s_binary.as_deref());
    let e = Expect {
        plan,
        node,
        files: &files,
        wg_public_key: secrets.private[&node.name].public_key().to_base64(),
        user_keys: opts.user_keys.clone(),
        real_k3s,
        medium: crate::verify::checks::Medium::Disk,
    };
    let log = opts
        .keep
        .as_ref()
        .map(|d| d.join(format!("{}.console.log", node.name)));
    // As `verify::test_node`, on a machine that stops with `cancel`.
    let boot = BootOptions::default();
    let mut cfg = VmConfig::new(&node.name, &image);
    let size = std::fs::metadata(&image)
        .with_context(|| format!("reading {}", image.display()))?
        .len();
    cfg.disk_bytes = Some(size + boot.grow_bytes);
    verify::use_nic_of(&mut cfg, node);
    cfg.cancel = opts.cancel.clone();
    verify::test_node_on(&cfg, &key, &e, log.as_deref(), boot.reboot)
}

/// `kiln run`: boot an image (on an overlay) with the console here; QEMU
/// is stopped when `cancel` is set.
pub fn run_interactive(image: &Path, cancel: &Cancel) -> anyhow::Result<()> {
    let mut cfg = VmConfig::new("run", image);
    cfg.cancel = cancel.clone();
    eprintln!(
        "kiln run: booting {} under {:?} on an overlay (the image is not modified); quit with Ctrl-A X",
        image.display(),
        cfg.accel
    );
    let status = crate::verify::vm::interactive(&cfg)?;
    if !status.success() {
        bail!("qemu exited with {status}");
    }
    Ok(())
}
