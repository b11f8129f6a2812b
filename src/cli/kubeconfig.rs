//! `kiln kubeconfig`: an admin kubeconfig for the cluster, signed by the
//! client CA kiln holds, so `kubectl` works from the operator's machine
//! without copying `k3s.yaml` off a server.
//!
//! Each call makes a new client key and certificate (`CN=system:admin,
//! O=system:masters`, one year, as k3s makes its own); none is kept in
//! the state directory, so there is no extra secret to back up. Kubernetes
//! cannot revoke a client certificate: a lost kubeconfig stays valid until
//! it expires or the CA is replaced, so it is written 0600 and never over
//! another file without `--force`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::config::ca_dir;
use crate::config::cluster_ca::ClusterCa;
use crate::config::plan::{K3S_API_PORT, Plan};
use crate::config::secrets::{self, StateDir};
use crate::render::yaml::{self, Y};

/// What `kiln kubeconfig` was asked for.
pub struct KubeconfigArgs {
    pub profile: PathBuf,
    /// Where to write it; `-` for stdout; `None` for [`default_path`].
    pub out: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Replace an existing file.
    pub force: bool,
}

/// `kiln kubeconfig PROFILE`: write the kubeconfig and print its path (or
/// print the kubeconfig itself with `--out -`).
pub fn run(args: &KubeconfigArgs) -> anyhow::Result<()> {
    let plan = crate::config::plan::load(&args.profile)?;
    let dir = secrets::state_dir(&args.profile, args.state_dir.as_deref());
    // Never makes a CA: a kubeconfig for a CA no cluster has is useless,
    // and the next build would switch the nodes to it.
    if !dir.is_dir() {
        bail!(
            "no state directory {}: kiln kubeconfig uses the cluster CA of the state directory the nodes were built from\n    fix: build the nodes first (`kiln build {}`), or pass --state-dir DIR",
            dir.display(),
            args.profile.display()
        );
    }
    let state = StateDir::open(&dir)?;
    let ca = ca_dir::load_existing(state.path())
        .with_context(|| format!("reading the cluster CA in {}", dir.display()))?
        .with_context(|| format!(
            "no cluster CA in {}: kiln kubeconfig uses the CA the nodes were built with\n    fix: build the nodes first (`kiln build {}`), or pass --state-dir DIR naming the directory they were built from",
            dir.join(ca_dir::CA_DIR).display(),
            args.profile.display()
        ))?;
    let text = kubeconfig(&plan, &ca, time::OffsetDateTime::now_utc())?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_path(&args.profile, &plan));
    if out == Path::new("-") {
        print!("{text}");
        return Ok(());
    }
    write_kubeconfig(&out, &text, args.force)?;
    println!("{}", out.display());
    Ok(())
}

/// `<cluster>.kubeconfig` beside the profile.
pub fn default_path(profile: &Path, plan: &Plan) -> PathBuf {
    profile
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{}.kubeconfig", plan.cluster))
}

/// The API server URL a kubeconfig points at (see `Plan::api_host`).
pub fn api_url(plan: &Plan) -> anyhow::Result<String> {
    let host = plan.api_host().with_context(|| {
        format!(
            "{}: no address to reach the Kubernetes API by\n    fix: set `k3s.registration-address`, or a `wireguard-address` or `lan-address` on the server that starts the cluster",
            plan.profile_path.display()
        )
    })?;
    Ok(format!("https://{host}:{K3S_API_PORT}"))
}

fn kv(k: &str, v: Y) -> (String, Y) {
    (k.to_string(), v)
}

/// The kubeconfig text: one cluster, one admin user with a new client
/// certificate signed by the client CA at `now`, one context.
pub fn kubeconfig(
    plan: &Plan,
    ca: &ClusterCa,
    now: time::OffsetDateTime,
) -> anyhow::Result<String> {
    let server = api_url(plan)?;
    let admin = ca.issue_admin(now)?;
    let name = plan.cluster.as_str();
    let user = format!("{name}-admin");
    let doc = vec![
        kv("apiVersion", Y::str("v1")),
        kv("kind", Y::str("Config")),
        kv(
            "clusters",
            Y::List(vec![Y::Map(vec![
                kv("name", Y::str(name)),
                kv(
                    "cluster",
                    Y::Map(vec![
                        kv("server", Y::str(server)),
                        kv(
                            "certificate-authority-data",
                            Y::str(B64.encode(ca.server_ca_pem())),
                        ),
                    ]),
                ),
            ])]),
        ),
        kv(
            "users",
            Y::List(vec![Y::Map(vec![
                kv("name", Y::str(&user)),
                kv(
                    "user",
                    Y::Map(vec![
                        kv(
                            "client-certificate-data",
                            Y::str(B64.encode(&admin.cert_pem)),
                        ),
                        kv("client-key-data", Y::str(B64.encode(&admin.key_pem))),
                    ]),
                ),
            ])]),
        ),
        kv(
            "contexts",
            Y::List(vec![Y::Map(vec![
                kv("name", Y::str(name)),
                kv(
                    "context",
                    Y::Map(vec![kv("cluster", Y::str(name)), kv("user", Y::str(&user))]),
                ),
            ])]),
        ),
        kv("current-context", Y::str(name)),
    ];
    Ok(format!(
        "# Admin kubeconfig for cluster {name}, written by `kiln kubeconfig` from {}.\n# Full access to the cluster until the certificate expires: keep it private.\n{}",
        plan.profile_path
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().to_string()),
        yaml::to_string(&doc)
    ))
}

/// Write atomically, 0600; refuse to replace a different file unless `force`.
pub fn write_kubeconfig(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    crate::util::atomic::write_unless_changed(
        path,
        text.as_bytes(),
        crate::util::mode::SECRET_FILE_MODE,
        force,
        "pass --force to replace it (the old file's certificate stays valid until it expires), or --out to write elsewhere",
    )
}
