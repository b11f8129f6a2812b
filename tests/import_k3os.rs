//! `kiln import-k3os` as a user runs it, on the k3os configs under
//! `tests/golden/import-k3os/<case>/` (written from k3os's configuration
//! reference; `args` lists the files in the order given on the command
//! line). The profile printed must equal `profile.toml` and stderr
//! `stderr.txt`, or, for a file k3os could not read, stderr `error.txt`.
//! `UPDATE_GOLDEN=1 cargo test --test import_k3os` rewrites them; review
//! the diff. Each profile is then run through `kiln check`: refused
//! exactly at its placeholders, accepted once they are filled in.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn cases() -> Vec<PathBuf> {
    let root = common::repo().join("tests/golden/import-k3os");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("args").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 3, "cases under {}", root.display());
    dirs
}

fn args_of(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("args"))
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Run the case's import in a copy of its directory: the output, and the
/// profile (stdout, or the `--out` file the args name).
fn import(dir: &Path) -> (Output, String) {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let args = args_of(dir);
    let mut all = vec!["import-k3os"];
    all.extend(args.iter().map(String::as_str));
    let out = kiln(tmp.path(), &all);
    let profile = match args.iter().position(|a| a == "--out") {
        Some(i) if out.status.success() => {
            std::fs::read_to_string(tmp.path().join(&args[i + 1])).unwrap()
        }
        _ => text(&out.stdout),
    };
    (out, profile)
}

/// Compare with the golden file, or write it under UPDATE_GOLDEN.
fn golden(path: &Path, actual: &str, failures: &mut Vec<String>) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, actual).unwrap();
        return;
    }
    match std::fs::read_to_string(path) {
        Ok(expected) if expected == actual => {}
        Ok(expected) => failures.push(format!(
            "{} differs:\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        )),
        Err(_) => failures.push(format!(
            "{} is missing (run with UPDATE_GOLDEN=1)",
            path.display()
        )),
    }
}

#[test]
fn imports_match_golden() {
    let mut failures = Vec::new();
    for dir in cases() {
        let (out, profile) = import(&dir);
        if dir.join("error.txt").exists() || dir.ends_with("malformed") {
            assert_eq!(out.status.code(), Some(1), "{}", dir.display());
            assert!(out.stdout.is_empty());
            golden(&dir.join("error.txt"), &text(&out.stderr), &mut failures);
            continue;
        }
        assert!(
            out.status.success(),
            "{}: {}",
            dir.display(),
            text(&out.stderr)
        );
        golden(&dir.join("profile.toml"), &profile, &mut failures);
        golden(&dir.join("stderr.txt"), &text(&out.stderr), &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_malformed_file_is_refused_at_its_line() {
    let dir = common::repo().join("tests/golden/import-k3os/malformed");
    let (out, _) = import(&dir);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.starts_with("error: a1.yaml:6:") && err.contains("YAML syntax"),
        "{err}"
    );
}

#[test]
fn every_key_of_the_k3os_reference_is_accounted_for() {
    let dir = common::repo().join("tests/golden/import-k3os/cluster");
    let (out, profile) = import(&dir);
    let err = text(&out.stderr);
    // Not carried over, each named with file and line.
    for key in [
        "common.yaml:4: ssh_authorized_keys[1]: kiln does not fetch keys",
        ": k3os.password: ",
        ": k3os.wifi: ",
        ": k3os.data_sources: ",
        ": k3os.server_url: ",
        "--node-ip=192.168.1.10",
        "/usr/local/bin/backup.sh",
        "/etc/connman/main.conf",
    ] {
        assert!(err.contains(key), "{key} in\n{err}");
        assert!(profile.contains(key), "{key} in the profile's notes");
    }
    // Carried over.
    for value in [
        "name = \"s1\"",
        "hostname = \"a1.homelab.lan\"",
        "cluster-init = true",
        "token = \"homelab-cluster-secret-2021\"",
        "server-args = [\"--write-kubeconfig-mode=0644\"]",
        "agent-args = [\"--kubelet-arg=max-pods=150\"]",
        "disable = [\"traefik\", \"local-storage\"]",
        "cluster-cidr = \"10.107.0.0/23\"",
        "modules = [\"kvm\", \"nvme\", \"nvidia\"]",
        "\"kernel.printk\" = \"4 4 1 7\"",
        "dns-nameservers = [\"192.168.1.1\", \"1.1.1.1\"]",
        "ntp-servers = [\"0.pool.ntp.org\", \"1.pool.ntp.org\"]",
        "taints = [\"gpu=true:NoSchedule\"]",
        "gpu = \"true\"",
        "install-device = \"/dev/nvme0n1\"",
        // b64, gz+b64 and !!binary gzip, decoded.
        "homelab node: managed by k3os config in git\n",
        "15 3 * * * root find /var/log/local -mtime +7 -delete\n",
        "Description=example\n",
        "https_proxy=http://proxy.homelab.lan:3128\n",
        "grep -qx 'name=a1' /etc/kiln/node || exit 0\necho early",
    ] {
        assert!(profile.contains(value), "{value} in\n{profile}");
    }
    // Secrets never reach a note.
    for secret in ["hunter22", "rancher\n", "0123456789abcdef"] {
        assert!(!err.contains(secret), "{secret} in\n{err}");
    }
}

/// The profile's `FILL IN:` lines (1-based).
fn placeholder_lines(profile: &str) -> Vec<usize> {
    profile
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("\"FILL IN: "))
        .map(|(i, _)| i + 1)
        .collect()
}

/// Fill each placeholder in as an operator would.
fn fill_in(profile: &str) -> String {
    let mut n = 0;
    profile
        .lines()
        .map(|l| {
            let Some((key, _)) = l.split_once(" = \"FILL IN: ") else {
                return format!("{l}\n");
            };
            n += 1;
            let value = match key {
                "version" => "v1.31.1+k3s1".to_string(),
                "network" => "10.99.0.0/24".to_string(),
                "lan-address" => format!("192.168.1.{}", 100 + n),
                "wireguard-address" => format!("10.99.0.{}", 10 + n),
                other => panic!("no value to fill {other} with"),
            };
            format!("{key} = \"{value}\"\n")
        })
        .collect()
}

#[test]
fn kiln_check_points_at_each_placeholder_then_passes() {
    for dir in cases() {
        if dir.ends_with("malformed") {
            continue;
        }
        let (out, profile) = import(&dir);
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("lab.toml");
        std::fs::write(&p, &profile).unwrap();
        let check = kiln(tmp.path(), &["check", "lab.toml"]);
        let err = text(&check.stderr);
        assert_eq!(check.status.code(), Some(1), "{err}");
        let mut lines: Vec<usize> = err
            .lines()
            .filter_map(|l| l.strip_prefix("error: lab.toml:"))
            .map(|l| l.split(':').next().unwrap().parse().unwrap())
            .collect();
        lines.dedup();
        assert_eq!(lines, placeholder_lines(&profile), "{err}");
        // The lines stderr of the import named are the same.
        let named: Vec<usize> = text(&out.stderr)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("profile line "))
            .map(|l| l.split(':').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(named, lines, "{}", dir.display());

        std::fs::write(&p, fill_in(&profile)).unwrap();
        let check = kiln(tmp.path(), &["check", "lab.toml"]);
        assert!(
            check.status.success(),
            "{}: {}",
            dir.display(),
            text(&check.stderr)
        );
    }
}

#[test]
fn out_is_written_0600_and_not_replaced_without_force() {
    let dir = common::repo().join("tests/golden/import-k3os/cluster");
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("homelab.toml");
    let files: Vec<String> = args_of(&dir)
        .iter()
        .map(|f| dir.join(f).to_string_lossy().to_string())
        .collect();
    let mut args = vec!["import-k3os", "--out", p.to_str().unwrap()];
    args.extend(files.iter().map(String::as_str));
    let out = kiln(tmp.path(), &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", p.display()));
    let written = std::fs::read_to_string(&p).unwrap();
    assert!(
        written.contains("[cluster]\nname = \"homelab\"\n"),
        "{written}"
    );
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(text(&out.stderr).contains("next: fill in the 7 values above"));

    std::fs::write(&p, "# the operator's edits\n").unwrap();
    let again = kiln(tmp.path(), &args);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&p).unwrap(),
        "# the operator's edits\n"
    );
    args.push("--force");
    assert!(kiln(tmp.path(), &args).status.success());
    assert_eq!(std::fs::read_to_string(&p).unwrap(), written);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temp file left"
    );
}

#[test]
fn a_missing_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kiln(tmp.path(), &["import-k3os", "nope.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: reading nope.yaml"),
        "{}",
        text(&out.stderr)
    );
}

/// docs/coming-from-k3os.md shows the walkthrough case as it is: its
/// inputs, what stderr says and the profile, each verbatim.
#[test]
fn the_walkthrough_in_the_docs_is_what_kiln_prints() {
    let doc = std::fs::read_to_string(common::repo().join("docs/coming-from-k3os.md")).unwrap();
    let dir = common::repo().join("tests/golden/import-k3os/walkthrough");
    let command = format!("kiln import-k3os {}", args_of(&dir).join(" "));
    assert!(doc.contains(&command), "{command}");
    for f in ["server.yaml", "agent.yaml", "stderr.txt", "profile.toml"] {
        let body = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(
            doc.contains(&body),
            "docs/coming-from-k3os.md does not show {f} as it is:\n{body}"
        );
    }
}
