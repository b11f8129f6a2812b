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
