//! `kiln serve`: check the URL, write the TFTP material, bind, print the
//! dnsmasq configuration on stdout and serve the netboot tree until the
//! caller's token is set (Ctrl-C: `main`'s handler sets it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::config::plan::Plan;
use crate::deliver::serve::{self, ServeOptions, Server};
use crate::util::cancel::Cancel;

/// Where dnsmasq is told the TFTP root is when `--tftp` was not given.
const DEFAULT_TFTP_ROOT: &str = "/srv/kiln-tftp";

/// What `kiln serve` was asked, as parsed by `main`.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// The cluster profile (TOML).
    pub profile: PathBuf,
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// The output directory of `kiln build` (holds pxe/).
    pub out: PathBuf,
    /// The URL nodes reach this server by (default: from `listen`).
    pub url: Option<String>,
    /// Write the TFTP material into this directory.
    pub tftp: Option<PathBuf>,
    /// Where node secrets are kept (default: beside the profile).
    pub state_dir: Option<PathBuf>,
}

/// Serve until `stop` is set (Ctrl-C, SIGTERM, SIGHUP): then stop
/// answering and return.
pub fn run(args: ServeArgs, stop: &Cancel) -> anyhow::Result<()> {
    let plan = crate::config::plan::load(&args.profile)?;
    let update_keys = load_update_keys(&plan, &args.profile, args.state_dir.as_deref())?;
    let url = resolve_url(args.url, args.listen)?;
    let opts = ServeOptions {
        out: args.out,
        listen: args.listen,
        url: url.clone(),
        tftp: args.tftp.clone(),
        update_keys,
    };
    let tftp_root = write_tftp(args.tftp.as_deref(), url.as_deref(), args.listen)?;
    // Bound last: once it answers, the TFTP material is in place.
    let server = Server::bind(&plan, &opts)?;
    println!(
        "{}",
        dnsmasq_config(&plan, url.as_deref(), &tftp_root, args.tftp.is_some())
    );
    eprintln!(
        "kiln serve: {} on http://{} (netboot nodes: {}); Ctrl-C stops",
        opts.out.join(crate::render::pxe::DIR).display(),
        server.addr(),
        server.nodes().join(", ")
    );
    server.run(stop.flag())?;
    eprintln!("kiln serve: stopped");
    Ok(())
}

/// The keys that let `kiln-update` fetch seeds, from the state directory
/// if there is one (serve never creates it; without it netboot still works).
fn load_update_keys(
    plan: &Plan,
    profile: &Path,
    state_dir: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let dir = crate::config::secrets::state_dir(profile, state_dir);
    if dir.is_dir() {
        Ok(
            crate::config::secrets::load_with_secrets(profile, Some(&dir))?
                .1
                .update_keys(&plan.cluster),
        )
    } else {
        eprintln!(
            "kiln serve: no state directory {}: kiln-update cannot fetch seeds (netboot can)",
            dir.display()
        );
        Ok(Default::default())
    }
}

/// `--url`, or one made from `--listen`; refused unless plain HTTP.
fn resolve_url(url: Option<String>, listen: SocketAddr) -> anyhow::Result<Option<String>> {
    let url = url.or_else(|| serve::default_url(listen));
    if let Some(u) = &url
        && !u.starts_with("http://")
    {
        bail!(
            "--url {u}: write http://ADDRESS:PORT (iPXE and the initramfs fetch over plain HTTP)"
        );
    }
    Ok(url)
}

/// With `--tftp`, write the TFTP material there (naming each file on
/// stderr); returns the TFTP root the dnsmasq configuration names.
fn write_tftp(
    tftp: Option<&Path>,
    url: Option<&str>,
    listen: SocketAddr,
) -> anyhow::Result<String> {
    match (tftp, url) {
        (Some(dir), Some(u)) => {
            for n in serve::write_tftp(dir, u)? {
                eprintln!("kiln serve: {n}");
            }
            Ok(dir.display().to_string())
        }
        (Some(_), None) => bail!(
            "--tftp needs --url: the bootstrap script must name an address nodes can reach, and --listen {listen} does not"
        ),
        (None, _) => Ok(DEFAULT_TFTP_ROOT.to_string()),
    }
}

/// The dnsmasq configuration for PXE beside an existing DHCP server
/// (without the final newline).
fn dnsmasq_config(plan: &Plan, url: Option<&str>, tftp_root: &str, tftp_given: bool) -> String {
    let shown = url.unwrap_or("http://<this machine's address>:PORT");
    format!(
        "# dnsmasq for PXE on a LAN with its own DHCP server; kiln serve at {shown}.\n# TFTP root: {tftp_root}{}\n{}",
        if tftp_given {
            ""
        } else {
            " (fill it with kiln serve --tftp DIR --url URL)"
        },
        crate::render::pxe::dnsmasq_snippet(
            &url.map_or("<your LAN's network address>".to_string(), |u| {
                serve::proxy_range(plan, u)
            }),
            tftp_root
        )
    )
}
