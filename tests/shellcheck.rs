//! `shellcheck` over every shell script kiln ships or runs: the node-side
//! scripts in `src/` (initramfs init, DHCP hook, kiln-update, boot check,
//! the k3s manifest deploy script, the iSCSI initiator-name script),
//! the scripts kiln renders for a node (the golden copies), and the
//! repository's own (`scripts/`, `.ci/run`). Warnings and errors fail;
//! style notes do not. A false positive is silenced in the script itself,
//! with a `# shellcheck` directive that says why.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` whose first line is a shell shebang.
fn scripts_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if !p.ends_with("target") {
                scripts_under(&p, out);
            }
        } else if std::fs::read(&p)
            .ok()
            .and_then(|b| {
                b.split(|c| *c == b'\n')
                    .next()
                    .map(|l| String::from_utf8_lossy(l).to_string())
            })
            .is_some_and(|l| l.starts_with("#!") && (l.ends_with("sh") || l.ends_with("bash")))
        {
            out.push(p);
        }
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let root = repo();
    let mut scripts = Vec::new();
    for d in ["src", "scripts", "tests/golden", ".ci", "qemu-tests"] {
        scripts_under(&root.join(d), &mut scripts);
    }
    scripts.sort();
    // The ones that matter most must be found, or the search is broken.
    for must in [
        "src/image/initramfs/init.sh",
        "src/image/rootfs/kiln-update.sh",
        "src/render/manifests.sh",
        "src/render/iscsi-initiator.sh",
        "scripts/setup",
        ".ci/run",
    ] {
        assert!(
            scripts.contains(&root.join(must)),
            "{must} not found among {scripts:?}"
        );
    }
    let mut failures = Vec::new();
    for s in &scripts {
        let out = Command::new("shellcheck")
            .args(["--severity=warning", "--format=gcc"])
            .arg(s)
            .output()
            .expect("shellcheck (apt-get install shellcheck; make setup does)");
        if !out.status.success() {
            failures.push(String::from_utf8_lossy(&out.stdout).to_string());
        }
    }
    assert!(failures.is_empty(), "shellcheck:\n{}", failures.join(""));
}
