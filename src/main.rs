//! kiln's command line. Parses arguments, calls the library, prints the
//! error chain once and exits non-zero on failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kiln::commands;
use kiln::diag::ProfileErrors;

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
        /// Extra image formats.
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
        /// Where node secrets are kept [default: PROFILE's directory/<stem>.state]
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
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
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    /// Raw GPT disk images only (always written).
    Raw,
    /// Also a qcow2 copy of each image (qemu-img).
    Qcow2,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Server,
    Agent,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { profile } => {
            let plan = kiln::plan::load(&profile)?;
            print!("{}", commands::check(&plan));
        }
        Command::Keys { profile, state_dir } => {
            let (plan, secrets) = commands::load_with_secrets(&profile, state_dir.as_deref())?;
            print!("{}", commands::keys(&plan, &secrets));
        }
        Command::Build { profile, nodes, role, out, k3s_binary, format, state_dir } => {
            let (plan, secrets) = commands::load_with_secrets(&profile, state_dir.as_deref())?;
            let opts = kiln::build::BuildOptions {
                out,
                nodes,
                role: role.map(|r| match r {
                    RoleArg::Server => kiln::profile::Role::Server,
                    RoleArg::Agent => kiln::profile::Role::Agent,
                }),
                k3s_binary,
                qcow2: matches!(format, Format::Qcow2),
                cache: kiln::cache::cache_dir(),
            };
            let result = kiln::build::build(&plan, &secrets, &opts)?;
            for a in result.artifacts {
                println!("{}", a.display());
            }
        }
        Command::Render { profile, node, out, state_dir } => {
            let (plan, secrets) = commands::load_with_secrets(&profile, state_dir.as_deref())?;
            let files = commands::render_node(&plan, &node, &secrets)?;
            files.tree.write_to(&out)?;
            println!("{}", out.display());
            eprintln!("rendered {} files for {node}; kernel command line: {}", files.tree.paths().count(), files.cmdline);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("KILN_LOG", "warn")).format_timestamp(None).init();
    match run(Cli::parse()) {
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
