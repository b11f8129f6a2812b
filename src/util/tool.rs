//! One wrapper for external tools (mmdebstrap, tar2sqfs, qemu, …): check
//! that they exist up front with an install hint, log the command line,
//! and put the tail of stderr into the error. A running tool is polled,
//! and stopped when the caller's [`Cancel`] token is set.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::cancel::{Cancel, Interrupted};

/// Lines of stderr kept in an error message.
const STDERR_TAIL_LINES: usize = 20;
/// Longest pause between two looks at a running tool (and at the token).
const POLL_MAX: Duration = Duration::from_millis(50);
/// How long a tool asked to stop (SIGTERM) may take to clean up before it
/// is killed (SIGKILL): mmdebstrap removes its temporary chroot.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
/// names the command and carries the tail of its stderr. Not cancellable:
/// for short commands; see [`run_cancellable`].
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    run_cancellable(cmd, &Cancel::default())
}

/// As [`run`], but when `cancel` is set while the tool runs, the tool is
/// stopped (and waited for) and the result is an [`Interrupted`] error.
pub fn run_cancellable(cmd: &mut Command, cancel: &Cancel) -> anyhow::Result<Output> {
    let line = display(cmd);
    cancel.check()?;
    log::debug!("running {line}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {line}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait(&mut child, &line, cancel);
    let out = Output {
        status: status?,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if !out.status.success() {
        bail!("{line} failed ({}):\n{}", out.status, tail(&out.stderr));
    }
    Ok(out)
}

/// Read all of a child's pipe on a thread (so it never blocks on a full
/// pipe while it is polled).
fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut v);
        }
        v
    })
}

/// Wait for a child the caller spawned (`line` is its command line for
/// messages), looking at `cancel` meanwhile. When it is set: SIGTERM,
/// [`STOP_GRACE`] to exit, then SIGKILL; the child is always reaped, and
/// the result is an [`Interrupted`] error naming the command.
pub fn wait(child: &mut Child, line: &str, cancel: &Cancel) -> anyhow::Result<ExitStatus> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {line}"))?
        {
            return Ok(status);
        }
        if cancel.is_cancelled() {
            stop(child);
            return Err(anyhow::Error::new(Interrupted::new()).context(format!("stopped {line}")));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Ask `child` to exit, kill it if it does not within [`STOP_GRACE`], and
/// reap it.
fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped (so its pid is
        // still ours).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let asked = Instant::now();
    while asked.elapsed() < STOP_GRACE {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        std::thread::sleep(POLL_MAX);
    }
    let _ = child.kill();
    let _ = child.wait();
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

    #[test]
    fn a_cancelled_tool_is_stopped_and_reaped() {
        let cancel = Cancel::new();
        let setter = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            setter.cancel();
        });
        let started = Instant::now();
        let err = run_cancellable(Command::new("sleep").arg("30"), &cancel).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "not stopped");
        assert!(crate::util::cancel::interrupted(&err).is_some(), "{err:#}");
        assert_eq!(format!("{err:#}"), "stopped sleep 30: interrupted");
        // A token set before the start runs nothing.
        let err = run_cancellable(&mut Command::new("true"), &cancel).unwrap_err();
        assert_eq!(format!("{err:#}"), "interrupted");
    }
}
