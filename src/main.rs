//! kiln's command line. Parses arguments, sets up logging, the umask and
//! the signal handler, calls one function per verb in `kiln::cli`, prints
//! the error chain once and exits non-zero on failure.
//!
//! Signals: SIGINT, SIGTERM and SIGHUP only set the [`Cancel`] token each
//! verb is handed; the verb stops at its next check (external tools are
//! stopped), cleans up through its ordinary error path and returns an
//! interruption, which is reported here with exit status 130. A second
//! signal exits at once.
//!
//! The clap types stay here rather than in `kiln::cli`: they are the
//! binary's interface (flags, help text, `--help` output) and nothing in
//! the library needs them. The verbs take plain typed arguments (a small
//! `*Args` struct when there are many), so tests and other callers drive
//! them without building a command line; `run` below only translates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kiln::cli;
use kiln::config::diag::ProfileErrors;
use kiln::config::profile::Role;
use kiln::util::cancel::{self, Cancel};

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
    /// what a build produces, and how old the cached Debian base is and
    /// when a build makes it again. Reads nothing but the profile, the
    /// cached base's record and, when `k3s.token` is in the secure form
    /// (K10…), the cluster CA in the state directory, whose hash it must
    /// name.
    Check {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print each node's WireGuard public key, [Peer] stanzas for an
    /// external hub, and known_hosts lines for the nodes' SSH host keys.
    ///
    /// WireGuard keys, SSH host keys and k3s node passwords are created on
    /// first use in the state directory (0700, files 0600) and reused
    /// afterwards; private keys and passwords are never printed. A
    /// known_hosts line names a node by name, host name, static LAN
    /// address and WireGuard address.
    Keys {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print only the known_hosts lines (append them to ~/.ssh/known_hosts).
        #[arg(long)]
        known_hosts: bool,
    },
    /// Write an admin kubeconfig for the cluster, signed by the cluster CA kiln holds.
    ///
    /// The client certificate (CN system:admin, O system:masters, valid one
    /// year, a new key on every call) is signed by the client CA in the
    /// state directory; certificate-authority-data is the server CA; the
    /// server is https://ADDRESS:6443, ADDRESS being k3s.registration-address,
    /// else the WireGuard address of the server that starts the cluster,
    /// else its LAN address. Written 0600, atomically; an existing file is
    /// replaced only with --force. Prints the path written.
    Kubeconfig {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// Where to write it, or - for stdout [default: PROFILE's directory/<cluster>.kubeconfig]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Write the wg-quick file an operator's laptop reaches the cluster with.
    ///
    /// For an `[[operators]]` entry of the profile: the operator's WireGuard
    /// key (created once in the state directory), its tunnel address, and
    /// the peers that lead into the cluster (the hub, or in a mesh every
    /// node with an endpoint). Over it the laptop reaches the nodes' SSH
    /// (22) and Kubernetes API (6443) and nothing else. Written 0600 and
    /// atomically; the file name (without .conf) is the interface name
    /// wg-quick creates. Prints the path; on stderr how to bring it up and,
    /// for a hub kiln does not build, the [Peer] its admin must add.
    Operator {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// The operator, as named in `[[operators]]`.
        name: String,
        /// The file to write: NAME.conf, NAME at most 15 characters [default: <cluster>.conf]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing file that differs.
        #[arg(long)]
        force: bool,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Write the bundle for an external hub (a Debian VPS kiln does not build).
    ///
    /// DIR gets the hub's WireGuard config (every node and operator as a
    /// peer; the hub's private key stays on the hub), forwarding, a
    /// firewall table for the tunnel, and when a node reaches the hub over
    /// TCP (`hub-transport`) kiln-relay and its unit; install.sh applies
    /// it, SHA256SUMS covers it. Written whole or not at all.
    Hub {
        /// The cluster profile (TOML).
        profile: PathBuf,
        /// The directory to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing DIR.
        #[arg(long)]
        force: bool,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Build a bootable disk image for each selected node.
    ///
    /// Writes OUT/<node>.img (raw GPT: ESP with systemd-boot, root-a with
    /// the read-only squashfs root, an empty root-b, a state partition),
    /// with --format pxe also the netboot tree OUT/pxe, then
    /// OUT/sbom.cdx.json (CycloneDX: every Debian package in the root, and
    /// k3s), OUT/SHA256SUMS and OUT/manifest.json. Everything is built in a
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
        /// Use this k3s air-gap image tarball (k3s.airgap = true) instead of the cache or a download.
        ///
        /// The release's k3s-airgap-images-amd64.tar.zst, .tar.gz or .tar for
        /// the profile's k3s version; checked against kiln.lock when it pins one.
        #[arg(long, value_name = "FILE", env = "KILN_AIRGAP_IMAGES")]
        airgap_images: Option<PathBuf>,
        /// Extra outputs, comma-separated or repeated (raw disk images are always written).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "raw")]
        format: Vec<Format>,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Make the Debian base again with mmdebstrap (newer packages), whatever its age [default: when older than base.max-age]
        #[arg(long)]
        refresh_base: bool,
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
        /// Use this k3s air-gap image tarball (k3s.airgap = true), as `kiln build` does.
        #[arg(long, value_name = "FILE", env = "KILN_AIRGAP_IMAGES")]
        airgap_images: Option<PathBuf>,
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
    /// Write a kiln profile from k3os config.yaml files.
    ///
    /// One config.yaml per node; a file without `hostname` is shared and
    /// merged under each node's own, as k3os merged its config files.
    /// Every k3os key becomes a profile key, or a note (on stderr and as a
    /// comment at the top of the profile) saying why not. Values k3os did
    /// not know (the k3s version, the WireGuard network, the nodes' tunnel
    /// and LAN addresses) are written as "FILL IN: …" placeholders that
    /// `kiln check` reports at their lines until they are filled in. The
    /// profile goes to stdout, or to --out (0600, atomically; it may hold
    /// the cluster token), whose path is then printed.
    #[command(name = "import-k3os")]
    ImportK3os {
        /// k3os config.yaml files: one per node, and shared ones.
        #[arg(required = true, value_name = "CONFIG.yaml")]
        configs: Vec<PathBuf>,
        /// Write the profile here instead of stdout (its stem names the cluster).
        #[arg(long, value_name = "PROFILE")]
        out: Option<PathBuf>,
        /// Replace an existing --out that differs.
        #[arg(long)]
        force: bool,
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

/// Hand the parsed verb to its file in `kiln::cli`, translating clap's
/// types into the verb's own; verbs that run long take `cancel`.
fn run(args: Cli, cancel: &Cancel) -> anyhow::Result<()> {
    match args.command {
        Command::Check { profile, state_dir } => cli::check::run(&profile, state_dir.as_deref()),
        Command::Keys {
            profile,
            state_dir,
            known_hosts,
        } => cli::keys::run(&profile, state_dir.as_deref(), known_hosts),
        Command::Kubeconfig {
            profile,
            out,
            state_dir,
            force,
        } => cli::kubeconfig::run(&cli::kubeconfig::KubeconfigArgs {
            profile,
            out,
            state_dir,
            force,
        }),
        Command::Operator {
            profile,
            name,
            out,
            force,
            state_dir,
        } => cli::operator::run(cli::operator::OperatorArgs {
            profile,
            name,
            out,
            state_dir,
            force,
        }),
        Command::Hub {
            profile,
            out,
            force,
            state_dir,
        } => cli::hub::run(&cli::hub::HubArgs {
            profile,
            out,
            state_dir,
            force,
        }),
        Command::Build {
            profile,
            nodes,
            role,
            out,
            k3s_binary,
            airgap_images,
            format,
            state_dir,
            refresh_base,
        } => cli::build::run(
            cli::build::BuildArgs {
                profile,
                nodes,
                role: role.map(|r| match r {
                    RoleArg::Server => Role::Server,
                    RoleArg::Agent => Role::Agent,
                }),
                out,
                k3s_binary,
                airgap_images,
                qcow2: format.iter().any(|f| matches!(f, Format::Qcow2)),
                pxe: format.iter().any(|f| matches!(f, Format::Pxe)),
                state_dir,
                refresh_base,
            },
            cancel,
        ),
        Command::Test {
            profile,
            node,
            image,
            ssh_key,
            user_keys,
            k3s_binary,
            airgap_images,
            keep,
            state_dir,
        } => cli::test::run(
            cli::test::TestArgs {
                profile,
                state_dir,
                node,
                image,
                ssh_key,
                user_keys,
                k3s_binary,
                airgap_images,
                keep,
            },
            cancel,
        ),
        Command::ImportK3os {
            configs,
            out,
            force,
        } => cli::import_k3os::run(&cli::import_k3os::ImportArgs {
            configs,
            out,
            force,
        }),
        Command::Run { image } => cli::test::run_interactive(&image, cancel),
        Command::Render {
            profile,
            node,
            out,
            state_dir,
        } => cli::render::run(&profile, &node, &out, state_dir.as_deref()),
        Command::Serve {
            profile,
            listen,
            out,
            url,
            tftp,
            state_dir,
        } => cli::serve::run(
            cli::serve::ServeArgs {
                profile,
                listen,
                out,
                url,
                tftp,
                state_dir,
            },
            cancel,
        ),
        Command::Upgrade {
            profile,
            k3s,
            plan,
            server,
            out,
        } => cli::upgrade::run(cli::upgrade::UpgradeArgs {
            profile,
            k3s,
            plan,
            server,
            out,
        }),
        Command::Flash {
            image,
            device,
            yes,
            force,
            size,
        } => cli::flash::run(
            &kiln::deliver::flash::FlashOptions {
                image,
                target: device,
                yes,
                force,
                size_bytes: size.map(|s| s.0),
            },
            cancel,
        ),
    }
}

/// Exit status after SIGINT, SIGTERM or SIGHUP (128 + SIGINT, as shells do).
const INTERRUPTED: u8 = 130;

/// SIGINT, SIGTERM and SIGHUP set `cancel` and nothing else; a second one
/// exits at once (what was staged stays, locked by nobody, and the next
/// build removes it).
fn install_signal_handler(cancel: Cancel) {
    let installed = ctrlc::set_handler(move || {
        if cancel.is_cancelled() {
            eprintln!("\nkiln: interrupted again: exiting without cleaning up");
            std::process::exit(INTERRUPTED.into());
        }
        cancel.cancel();
    });
    if let Err(e) = installed {
        log::warn!("installing the signal handler: {e}; a signal ends kiln without cleaning up");
    }
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
    let cancel = Cancel::new();
    install_signal_handler(cancel.clone());
    match run(cli, &cancel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(i) = cancel::interrupted(&e) {
                eprintln!("\nkiln: {i}");
                log::debug!("stopped: {e:#}");
                return ExitCode::from(INTERRUPTED);
            }
            if cancel.is_cancelled() {
                // Stopped mid-way by the signal, whatever the error says.
                eprintln!("\nkiln: interrupted ({e:#})");
                return ExitCode::from(INTERRUPTED);
            }
            if let Some(pe) = e.downcast_ref::<ProfileErrors>() {
                eprintln!("{pe}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
