//! kiln's command line. Parses arguments, calls the library, prints the
//! error chain once and exits non-zero on failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kiln::cli::commands;
use kiln::config::diag::ProfileErrors;

/// Bake immutable, k3os-style boot images for the nodes of a small k3s
/// cluster, from one TOML profile.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a profile and print the resolved plan.
    ///
    /// Prints every error found (file, line, column, key and fix) and exits
    /// non-zero, or prints a summary of the nodes, roles, addresses and
    /// what a build produces. Reads nothing but the profile.
    Check {
        /// The cluster profile (TOML).
        profile: PathBuf,
    },
    /// Print each node's WireGuard public key, and [Peer] stanzas for an
    /// external hub.
    ///
    /// Keys are created on first use in the state directory (0700, files
    /// 0600) and reused afterwards; private keys are never printed.
    Keys {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Build a bootable disk image for each selected node.
    ///
    /// Writes OUT/<node>.img (raw GPT: ESP with systemd-boot, root-a with
    /// the read-only squashfs root, an empty root-b, a state partition),
    /// with --format pxe also the netboot tree OUT/pxe, then
    /// OUT/SHA256SUMS and OUT/manifest.json. Everything is built in a
    /// staging directory beside OUT and moved into place only when the
    /// whole build succeeded. Prints the paths written.
    Build {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// Build only this node (repeatable) [default: all nodes]
        #[arg(long = "node", value_name = "NAME")]
        nodes: Vec<String>,
        /// Build only the nodes of this role.
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// The output directory (replaced as a whole by a successful build).
        #[arg(long, value_name = "DIR", default_value = "out")]
        out: PathBuf,
        /// Use this k3s binary instead of the cache or a download.
        #[arg(long, value_name = "PATH", env = "KILN_K3S_BINARY")]
        k3s_binary: Option<PathBuf>,
        /// Extra outputs, comma-separated or repeated (raw disk images are always written).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "raw")]
        format: Vec<Format>,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Boot a node's image in QEMU and check it from inside.
    ///
    /// Builds the node's image (adding a test access key for root, which
    /// only `kiln test` does) or takes --image, boots it under OVMF (KVM if
    /// usable, else TCG) on an overlay enlarged by 2 GiB, checks the kernel
    /// command line, the read-only root, host name, SSH, WireGuard, the
    /// firewall, k3s, the state partition, reboots and checks run-once,
    /// boot commands and persistence. Prints a table and the boot
    /// timeline; exits 1 if any check fails.
    Test {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// The node to test.
        #[arg(long)]
        node: String,
        /// Test this image instead of building one (needs --ssh-key).
        #[arg(long, value_name = "PATH")]
        image: Option<PathBuf>,
        /// A private key the profile authorizes for root.
        #[arg(long, value_name = "PATH")]
        ssh_key: Option<PathBuf>,
        /// A private key of a profile user, to check that user's login (USER=PATH, repeatable).
        #[arg(long = "user-key", value_name = "USER=PATH")]
        user_keys: Vec<String>,
        /// Use this k3s binary (e.g. the test double from `make k3s-double`).
        #[arg(long, value_name = "PATH", env = "KILN_K3S_BINARY")]
        k3s_binary: Option<PathBuf>,
        /// Keep the built image and console log in this directory.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Boot an image with its console on this terminal, to look around.
    ///
    /// The image is not modified (the VM writes to an overlay). SSH is
    /// forwarded from a free local port, printed at start. Quit with
    /// Ctrl-A X.
    Run {
        /// A disk image from `kiln build`.
        image: PathBuf,
    },
    /// Write one node's rendered files into a directory, for inspection.
    ///
    /// The tree holds secrets (WireGuard private key, k3s token): files
    /// that hold them are written 0600.
    Render {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// The node to render.
        #[arg(long)]
        node: String,
        /// A directory to create (must not exist).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Serve the netboot tree (OUT/pxe from `kiln build --format pxe`) over HTTP.
    ///
    /// Prints, on stdout, a dnsmasq configuration for PXE next to an
    /// existing DHCP server (proxy DHCP + TFTP chainloading iPXE), then
    /// serves until Ctrl-C, logging one line per request (client, method,
    /// path, status, bytes) on stderr. iPXE scripts are rendered with the
    /// address the request came to. A node's seed (its WireGuard key and
    /// the cluster token) is served only to the client that fetched that
    /// node's per-MAC script, with the token in it, once, within 15 minutes;
    /// directories are never listed.
    Serve {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// Address and port to listen on.
        #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        /// The output directory of `kiln build` (holds pxe/).
        #[arg(long, value_name = "DIR", default_value = "out")]
        out: PathBuf,
        /// The URL nodes reach this server by, e.g. http://192.168.1.10:8080
        /// [default: from --listen, when it names an address]
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Write the TFTP material (iPXE binaries and the kiln.ipxe
        /// bootstrap script) into DIR, for dnsmasq or another TFTP server.
        #[arg(long, value_name = "DIR")]
        tftp: Option<PathBuf>,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state];
        /// needed to hand seeds to `kiln-update` (never created by serve)
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Move the cluster to another k3s version, or print the plans that
    /// roll the update out through the cluster.
    ///
    /// With --k3s, sets `[k3s] version` in the profile (only that value
    /// changes; the file is replaced atomically and must still validate).
    /// Then `kiln build PROFILE --format pxe` rebuilds the root images (the
    /// base comes from the cache) and writes each node's update bundle,
    /// which `kiln serve` serves to `kiln-update` on the nodes.
    ///
    /// With --plan, prints system-upgrade-controller Plans
    /// (upgrade.cattle.io/v1) that run `kiln-update --server URL --reboot`
    /// on every node, servers first, then agents, one node at a time,
    /// cordoned (agents drained), selected by the kiln.dev/role label.
    Upgrade {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// The k3s version to move to, e.g. v1.31.2+k3s1.
        #[arg(long, value_name = "VERSION")]
        k3s: Option<String>,
        /// Print the system-upgrade-controller Plans (or write them into --out).
        #[arg(long)]
        plan: bool,
        /// kiln serve's URL as the nodes reach it (for --plan).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// Write the plans to DIR/kiln-upgrade-plans.yaml instead of stdout.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Write an image to a USB stick, a disk or a file, and verify it.
    ///
    /// Checks IMAGE against the SHA256SUMS beside it, then refuses, listing
    /// every reason, a device that is mounted (or any of its partitions),
    /// used as swap, held by LVM/RAID/device-mapper, holds the running
    /// system, is smaller than the image, or is not removable (without
    /// --force); asks before erasing (without --yes). Writes the first MiB
    /// last, so an interrupted write leaves no partition table; reads
    /// everything back and compares sha256; moves the backup GPT to the end
    /// of the target so the state partition can grow; has the kernel re-read
    /// the partition table. Prints the target written.
    Flash {
        /// A disk image from `kiln build` (SHA256SUMS must be beside it).
        image: PathBuf,
        /// A whole disk (/dev/sdX, /dev/disk/by-id/…) or a regular file.
        device: PathBuf,
        /// Do not ask before erasing a device (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        /// Write to a non-removable disk, or over an existing file.
        #[arg(long)]
        force: bool,
        /// Size of a file target, e.g. 32G (K/M/G/T are powers of 1024) [default: the image's size]
        #[arg(long, value_name = "SIZE")]
        size: Option<kiln::deliver::flash::ByteSize>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    /// Raw GPT disk images only (always written).
    Raw,
    /// Also a qcow2 copy of each image (qemu-img).
    Qcow2,
    /// Also the netboot tree OUT/pxe (kernel, initramfs, root image, node
    /// seeds, iPXE scripts by MAC) for `kiln serve`.
    Pxe,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Server,
    Agent,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { profile } => {
            let plan = kiln::config::plan::load(&profile)?;
            print!("{}", commands::check(&plan));
        }
        Command::Keys { profile, state_dir } => {
            let (plan, secrets) =
                kiln::config::secrets::load_with_secrets(&profile, state_dir.as_deref())?;
            print!("{}", commands::keys(&plan, &secrets));
        }
        Command::Build {
            profile,
            nodes,
            role,
            out,
            k3s_binary,
            format,
            state_dir,
        } => {
            let (plan, secrets) =
                kiln::config::secrets::load_with_secrets(&profile, state_dir.as_deref())?;
            let opts = kiln::build::BuildOptions {
                out,
                nodes,
                role: role.map(|r| match r {
                    RoleArg::Server => kiln::config::profile::Role::Server,
                    RoleArg::Agent => kiln::config::profile::Role::Agent,
                }),
                k3s_binary,
                qcow2: format.iter().any(|f| matches!(f, Format::Qcow2)),
                pxe: format.iter().any(|f| matches!(f, Format::Pxe)),
                cache: kiln::inputs::cache::cache_dir(),
                test_access_key: None,
            };
            let result = kiln::build::build(&plan, &secrets, &opts)?;
            for a in result.artifacts {
                println!("{}", a.display());
            }
        }
        Command::Test {
            profile,
            node,
            image,
            ssh_key,
            user_keys,
            k3s_binary,
            keep,
            state_dir,
        } => {
            let (plan, secrets) =
                kiln::config::secrets::load_with_secrets(&profile, state_dir.as_deref())?;
            let mut keys = Vec::new();
            for u in user_keys {
                let (user, path) = u
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--user-key {u}: write USER=PATH"))?;
                keys.push((user.to_string(), PathBuf::from(path)));
            }
            let opts = kiln::cli::test::TestOptions {
                node,
                image,
                ssh_key,
                k3s_binary,
                user_keys: keys,
                cache: kiln::inputs::cache::cache_dir(),
                keep,
            };
            let report = kiln::cli::test::test_node(&plan, &secrets, &opts)?;
            print!("{}", report.table());
            if !report.passed() {
                anyhow::bail!("{}: some checks failed", report.node);
            }
        }
        Command::Run { image } => kiln::cli::test::run_interactive(&image)?,
        Command::Render {
            profile,
            node,
            out,
            state_dir,
        } => {
            let (plan, secrets) =
                kiln::config::secrets::load_with_secrets(&profile, state_dir.as_deref())?;
            let files = commands::render_node(&plan, &node, &secrets)?;
            files.tree.write_to(&out)?;
            println!("{}", out.display());
            eprintln!(
                "rendered {} files for {node}; kernel command line: {}",
                files.tree.paths().count(),
                files.cmdline
            );
        }
        Command::Serve {
            profile,
            listen,
            out,
            url,
            tftp,
            state_dir,
        } => {
            let plan = kiln::config::plan::load(&profile)?;
            let dir = kiln::config::secrets::state_dir(&profile, state_dir.as_deref());
            let update_keys = if dir.is_dir() {
                kiln::config::secrets::load_with_secrets(&profile, Some(&dir))?
                    .1
                    .update_keys(&plan.cluster)
            } else {
                eprintln!(
                    "kiln serve: no state directory {}: kiln-update cannot fetch seeds (netboot can)",
                    dir.display()
                );
                Default::default()
            };
            let url = url.or_else(|| kiln::deliver::serve::default_url(listen));
            if let Some(u) = &url
                && !u.starts_with("http://")
            {
                anyhow::bail!(
                    "--url {u}: write http://ADDRESS:PORT (iPXE and the initramfs fetch over plain HTTP)"
                );
            }
            let opts = kiln::deliver::serve::ServeOptions {
                out,
                listen,
                url: url.clone(),
                tftp: tftp.clone(),
                update_keys,
            };
            let tftp_root = match (&tftp, &url) {
                (Some(dir), Some(u)) => {
                    for n in kiln::deliver::serve::write_tftp(dir, u)? {
                        eprintln!("kiln serve: {n}");
                    }
                    dir.display().to_string()
                }
                (Some(_), None) => anyhow::bail!(
                    "--tftp needs --url: the bootstrap script must name an address nodes can reach, and --listen {listen} does not"
                ),
                (None, _) => "/srv/kiln-tftp".to_string(),
            };
            // Ctrl-C stops the server from the moment it answers.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
                .map_err(|e| anyhow::anyhow!("installing the Ctrl-C handler: {e}"))?;
            // Bound last: once it answers, the TFTP material is in place.
            let server = kiln::deliver::serve::Server::bind(&plan, &opts)?;
            let shown = url
                .clone()
                .unwrap_or_else(|| "http://<this machine's address>:PORT".into());
            println!(
                "# dnsmasq for PXE on a LAN with its own DHCP server; kiln serve at {shown}.\n# TFTP root: {tftp_root}{}\n{}",
                if tftp.is_none() {
                    " (fill it with kiln serve --tftp DIR --url URL)"
                } else {
                    ""
                },
                kiln::render::pxe::dnsmasq_snippet(
                    &url.as_deref()
                        .map_or("<your LAN's network address>".to_string(), |u| {
                            kiln::deliver::serve::proxy_range(&plan, u)
                        }),
                    &tftp_root
                )
            );
            eprintln!(
                "kiln serve: {} on http://{} (netboot nodes: {}); Ctrl-C stops",
                opts.out.join(kiln::render::pxe::DIR).display(),
                server.addr(),
                server.nodes().join(", ")
            );
            server.run(&stop)?;
            eprintln!("kiln serve: stopped");
        }
        Command::Upgrade {
            profile,
            k3s,
            plan: want_plan,
            server,
            out,
        } => {
            if k3s.is_none() && !want_plan {
                anyhow::bail!(
                    "say what to do: --k3s VERSION (edit the profile) and/or --plan (print the rollout plans)"
                );
            }
            if let Some(v) = k3s {
                let (old, _) = kiln::deliver::upgrade::write_k3s_version(&profile, &v)?;
                eprintln!(
                    "{}: k3s {old} → {v}\nnext: kiln build {} --format pxe --out DIR (rebuilds the root images and writes each node's update bundle), kiln serve {} --out DIR, then kiln-update on the nodes or kiln upgrade {} --plan --server URL",
                    profile.display(),
                    profile.display(),
                    profile.display(),
                    profile.display()
                );
            }
            if want_plan {
                let plan = kiln::config::plan::load(&profile)?;
                let server = server.ok_or_else(|| {
                    anyhow::anyhow!("--plan needs --server URL: the address of kiln serve as the nodes reach it, e.g. http://192.168.1.10:8080")
                })?;
                if !server.starts_with("http://") {
                    anyhow::bail!(
                        "--server {server}: write http://ADDRESS:PORT (kiln-update fetches over plain HTTP and checks every digest)"
                    );
                }
                let text = kiln::deliver::upgrade::plans(&plan, &server);
                match out {
                    Some(dir) => {
                        std::fs::create_dir_all(&dir)?;
                        let p = dir.join("kiln-upgrade-plans.yaml");
                        kiln::deliver::upgrade::replace_file(&p, &text)?;
                        println!("{}", p.display());
                    }
                    None => print!("{text}"),
                }
            }
        }
        Command::Flash {
            image,
            device,
            yes,
            force,
            size,
        } => {
            let opts = kiln::deliver::flash::FlashOptions {
                image,
                target: device,
                yes,
                force,
                size_bytes: size.map(|s| s.0),
            };
            let report =
                kiln::deliver::flash::flash(&opts, &kiln::deliver::flash::SysFacts::default())?;
            println!("{}", report.target.display());
        }
    }
    Ok(())
}

/// Exit status after SIGINT, SIGTERM or SIGHUP (128 + SIGINT, as shells do).
const INTERRUPTED: i32 = 130;

/// SIGINT, SIGTERM and SIGHUP: remove what this process staged, say what
/// the output directory holds, exit. (`serve` installs its own: it stops
/// answering and returns.)
fn install_abandon_handler() {
    let _ = ctrlc::set_handler(|| {
        for msg in kiln::build::staging::abandon_all() {
            eprintln!("\nkiln: {msg}");
        }
        std::process::exit(INTERRUPTED);
    });
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("KILN_LOG", "warn"))
        .format_timestamp(None)
        .init();
    // Modes of what kiln writes must not depend on the caller's umask:
    // with 000, outputs served by `kiln serve` (as root) would be
    // world-writable. Secrets are created 0600 explicitly.
    // SAFETY: umask only sets the process's file mode mask.
    unsafe { libc::umask(0o022) };
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        install_abandon_handler();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(pe) = e.downcast_ref::<ProfileErrors>() {
                eprintln!("{pe}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
