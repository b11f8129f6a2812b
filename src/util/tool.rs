//! One wrapper for external tools (mmdebstrap, tar2sqfs, qemu, …): check
//! that they exist up front with an install hint, log the command line,
//! and put the tail of stderr into the error.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, bail};

/// Lines of stderr kept in an error message.
const STDERR_TAIL_LINES: usize = 20;

/// An external program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

impl Tool {
    pub const fn new(name: &'static str, package: &'static str) -> Self {
        Tool { name, package }
    }

    /// The tool's path, or an error saying how to install it.
    pub fn find(&self) -> anyhow::Result<PathBuf> {
        which(self.name).with_context(|| {
            format!(
                "`{}` is not installed: run `apt-get install --no-install-recommends {}`",
                self.name, self.package
            )
        })
    }

    /// A command for this tool (after checking it exists).
    pub fn command(&self) -> anyhow::Result<Command> {
        Ok(Command::new(self.find()?))
    }
}

/// Check several tools at once and report every missing one.
pub fn preflight(tools: &[Tool]) -> anyhow::Result<()> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| which(t.name).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|t| t.name).collect();
    let mut pkgs: Vec<&str> = missing.iter().map(|t| t.package).collect();
    pkgs.dedup();
    bail!(
        "missing tools: {}; install them with `apt-get install --no-install-recommends {}`",
        names.join(", "),
        pkgs.join(" ")
    )
}

/// Search PATH (and the sbin directories, which a non-root PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Render a command line for logs and errors.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().to_string()];
    parts.extend(cmd.get_args().map(|a: &OsStr| {
        let s = a.to_string_lossy();
        if s.contains(' ') {
            format!("'{s}'")
        } else {
            s.to_string()
        }
    }));
    parts.join(" ")
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// Run to completion, capturing output; a non-zero exit is an error that
/// names the command and carries the tail of its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let line = display(cmd);
    log::debug!("running {line}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!("{line} failed ({}):\n{}", out.status, tail(&out.stderr));
    }
    Ok(out)
}

/// Check the result of a command that was spawned by the caller (for
/// streaming stdin); `stderr` is what the caller collected.
pub fn check_status(
    line: &str,
    status: std::process::ExitStatus,
    stderr: &[u8],
) -> anyhow::Result<()> {
    if !status.success() {
        bail!("{line} failed ({status}):\n{}", tail(stderr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let err = Tool::new("kiln-no-such-tool", "kiln-pkg")
            .find()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("apt-get install --no-install-recommends kiln-pkg"),
            "{err}"
        );
        let err = preflight(&[
            Tool::new("sh", "dash"),
            Tool::new("kiln-no-such-tool", "kiln-pkg"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kiln-no-such-tool") && !err.contains("sh,"),
            "{err}"
        );
    }

    #[test]
    fn failing_command_carries_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("boom") && err.contains("exit status: 3"),
            "{err}"
        );
    }
}
