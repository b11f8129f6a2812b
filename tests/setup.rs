//! `scripts/setup` decides from the commands and files present, not from
//! package status. These tests run it against a fake machine: a PATH of
//! stubs for every command it needs (minus the ones a test removes), a
//! fake `apt-get` that logs what it is asked and can bring a command back,
//! and `KILN_SETUP_ROOT` for the files it checks.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup");
/// Host utilities the script itself uses, linked into the fake PATH.
const UTILITIES: &[&str] = &["id", "sort", "tr", "sed", "awk", "cat"];

/// `package what` pairs from `scripts/setup --list`.
fn needs() -> Vec<(String, String)> {
    let out = Command::new("sh").args([SETUP, "--list"]).output().unwrap();
    assert!(out.status.success());
    let list: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (p, w) = l.split_once(' ').unwrap();
            (p.to_string(), w.to_string())
        })
        .collect();
    assert!(list.len() > 20, "{list:?}");
    list
}

fn write_exe(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct FakeMachine {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    root: PathBuf,
    apt_log: PathBuf,
}

/// Every need met except `missing` (command names or file paths);
/// `apt-get install --reinstall PKG` restores PKG's commands when
/// `apt_restores` is true.
fn fake_machine(missing: &[&str], apt_restores: bool) -> FakeMachine {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&bin).unwrap();
    let apt_log = dir.path().join("apt.log");
    let mut restore = String::new();
    for (pkg, what) in needs() {
        if missing.contains(&what.as_str()) {
            if !what.starts_with('/') {
                restore.push_str(&format!(
                    "case \" $* \" in *' --reinstall '*'{pkg} '*) printf '#!/bin/sh\\n' > {bin}/{what}; /bin/chmod 755 {bin}/{what};; esac\n",
                    bin = bin.display()
                ));
            }
            continue;
        }
        if let Some(rel) = what.strip_prefix('/') {
            let f = root.join(rel);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, "").unwrap();
        } else {
            write_exe(&bin.join(&what), "exit 0");
        }
    }
    for u in UTILITIES {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(u))
            .find(|p| p.exists())
            .unwrap();
        std::os::unix::fs::symlink(real, bin.join(u)).unwrap();
    }
    let body = format!(
        "echo \"$*\" >> {}\n{}",
        apt_log.display(),
        if apt_restores { restore } else { String::new() }
    );
    write_exe(&bin.join("apt-get"), &body);
    write_exe(
        &bin.join("apt-cache"),
        "printf 'qemu-system-x86:\\n  Installed: (none)\\n  Candidate: 1:7.2+dfsg-7\\n'",
    );
    FakeMachine {
        _dir: dir,
        bin,
        root,
        apt_log,
    }
}

fn run_setup(m: &FakeMachine) -> Output {
    Command::new("/bin/sh")
        .args([SETUP, "--no-build"])
        .env_clear()
        .env("PATH", &m.bin)
        .env("KILN_SETUP_ROOT", &m.root)
        .output()
        .unwrap()
}

fn apt_calls(m: &FakeMachine) -> Vec<String> {
    std::fs::read_to_string(&m.apt_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn setup_reinstalls_a_package_that_reports_installed_but_lost_its_tool() {
    // As on the CI kind: qemu-utils "installed", qemu-img gone.
    let m = fake_machine(&["qemu-img"], true);
    let out = run_setup(&m);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let calls = apt_calls(&m);
    let installs: Vec<&String> = calls.iter().filter(|c| c.contains("install")).collect();
    assert_eq!(installs.len(), 2, "{calls:?}");
    // One transaction for the whole list, qemu-utils at qemu-system-x86's version …
    assert!(
        installs[0].contains("qemu-system-x86 ")
            && installs[0].contains("qemu-utils=1:7.2+dfsg-7")
            && installs[0].contains("--no-install-recommends")
            && installs[0].contains("shellcheck"),
        "{}",
        installs[0]
    );
    // … then a reinstall of just the package whose command is missing.
    assert!(
        installs[1].contains("--reinstall") && installs[1].trim_end().ends_with("qemu-utils"),
        "{}",
        installs[1]
    );
    assert!(m.bin.join("qemu-img").exists());
}

#[test]
fn setup_fails_naming_the_command_and_package_still_missing() {
    let m = fake_machine(&["tar2sqfs", "/usr/share/OVMF/OVMF_CODE_4M.fd"], false);
    let out = run_setup(&m);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tar2sqfs is still missing after installing package squashfs-tools-ng"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "/usr/share/OVMF/OVMF_CODE_4M.fd is still missing after installing package ovmf"
        ),
        "{stderr}"
    );
}

#[test]
fn setup_asks_apt_nothing_when_every_need_is_met() {
    let m = fake_machine(&[], false);
    let out = run_setup(&m);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(apt_calls(&m), Vec::<String>::new());
}
