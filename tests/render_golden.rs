//! Golden files: every rendered file of every node of the rendered
//! profiles (`common::RENDERED`), and each operator's wg-quick file, with
//! fixed secrets. `UPDATE_GOLDEN=1 cargo test` rewrites
//! them; review the diff before committing it.

mod common;

use std::fmt::Write as _;
use std::path::Path;

use kiln::render::tree::Entry;

fn listing(tree: &kiln::render::tree::FileTree) -> String {
    let mut s = String::new();
    for (path, e) in tree.iter() {
        let _ = match e {
            Entry::File {
                mode,
                uid,
                gid,
                content,
            } => writeln!(s, "{mode:04o} {uid}:{gid} {path} ({} bytes)", content.len()),
            Entry::Symlink { target } => writeln!(s, "link {path} -> {target}"),
            Entry::Dir { mode } => writeln!(s, "{mode:04o} dir {path}"),
        };
    }
    s
}

fn check_or_update(path: &Path, actual: &[u8], failures: &mut Vec<String>) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    match std::fs::read(path) {
        Ok(expected) if expected == actual => {}
        Ok(expected) => failures.push(format!(
            "{} differs:\n--- expected\n{}\n--- actual\n{}",
            path.display(),
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(actual)
        )),
        Err(_) => failures.push(format!(
            "{} is missing (run with UPDATE_GOLDEN=1)",
            path.display()
        )),
    }
}

#[test]
fn rendered_files_match_golden() {
    let mut failures = Vec::new();
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        let stem = Path::new(rel)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let base = common::repo().join("tests/golden/render").join(&stem);
        for node in &plan.nodes {
            let files = kiln::cli::render::render_node(&plan, &node.name, &secrets).unwrap();
            let dir = base.join(&node.name);
            check_or_update(
                &base.join(format!("{}.list", node.name)),
                listing(&files.tree).as_bytes(),
                &mut failures,
            );
            for (path, e) in files.tree.iter() {
                if let Entry::File { content, .. } = e {
                    check_or_update(
                        &dir.join(path.trim_start_matches('/')),
                        content,
                        &mut failures,
                    );
                }
            }
            // No golden file may be left over from a file no longer rendered.
            if std::env::var_os("UPDATE_GOLDEN").is_none() {
                for f in walk(&dir) {
                    let inside = format!("/{}", f.strip_prefix(&dir).unwrap().display());
                    if files.tree.get(&inside).is_none() {
                        failures.push(format!("{} is golden but no longer rendered", f.display()));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// What the root images carry for the profile (render::image_files): for
/// k3s the manifests and HelmCharts, the deploy script and its unit; for
/// `hub-transport = "auto"` the watcher; for each rendered profile that
/// has any.
#[test]
fn image_manifest_files_match_golden() {
    let mut failures = Vec::new();
    let mut profiles = 0;
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        let tree = kiln::render::image_files(&plan);
        if tree.paths().next().is_none() {
            continue;
        }
        profiles += 1;
        let stem = Path::new(rel).file_stem().unwrap().to_string_lossy();
        let base = common::repo().join("tests/golden/image").join(&*stem);
        check_or_update(
            &base.with_extension("list"),
            listing(&tree).as_bytes(),
            &mut failures,
        );
        for (path, e) in tree.iter() {
            if let Entry::File { content, .. } = e {
                check_or_update(
                    &base.join(path.trim_start_matches('/')),
                    content,
                    &mut failures,
                );
            }
        }
    }
    assert!(
        profiles > 1,
        "no rendered profile deploys manifests or uses auto"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The initramfs copies a node's seed onto the root before it hands over,
/// where only `/etc` and `/var` are writable: a rendered file anywhere else
/// stops the node at boot (`cannot copy the node seed into place`).
#[test]
fn every_seed_file_is_where_the_initramfs_can_write() {
    let mut checked = 0;
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        for node in &plan.nodes {
            let files = kiln::cli::render::render_node(&plan, &node.name, &secrets).unwrap();
            for p in files.tree.paths() {
                assert!(
                    kiln::render::SEED_DIRS.iter().any(|d| p.starts_with(d)),
                    "{rel}: {}: {p} is outside {:?}",
                    node.name,
                    kiln::render::SEED_DIRS
                );
                checked += 1;
            }
            // And the seed builder refuses one that is not.
            let mut bad = files.tree.clone();
            bad.file("/usr/lib/kiln/oops", 0o644, "x");
            let e = kiln::image::initramfs::build_seed(&bad, 0).unwrap_err();
            assert!(e.to_string().contains("/usr/lib/kiln/oops"), "{e}");
        }
    }
    assert!(checked > 100, "{checked} files");
}

#[test]
fn operator_files_match_golden() {
    let mut failures = Vec::new();
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        let stem = Path::new(rel).file_stem().unwrap().to_string_lossy();
        for o in &plan.operators {
            let text = kiln::cli::operator::operator_config(&plan, &secrets, &o.name).unwrap();
            let path = common::repo()
                .join("tests/golden/operator")
                .join(format!("{stem}-{}.conf", o.name));
            check_or_update(&path, text.as_bytes(), &mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn secrets_are_only_in_private_files() {
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        for node in &plan.nodes {
            let files = kiln::cli::render::render_node(&plan, &node.name, &secrets).unwrap();
            let key = secrets.private[&node.name].to_base64();
            let password = secrets.node_passwords[&node.name].expose().to_string();
            let host_key = secrets.ssh_host_keys[&node.name].to_openssh();
            // A line from the middle of the private key file: its base64 body.
            let host_key_body = host_key.lines().nth(2).unwrap().to_string();
            for (path, e) in files.tree.iter() {
                if let Entry::File { content, mode, .. } = e {
                    let text = String::from_utf8_lossy(content);
                    if text.contains(&key)
                        || text.contains(secrets.token.expose())
                        || text.contains(&password)
                        || text.contains(&host_key_body)
                    {
                        assert_eq!(
                            mode & 0o077,
                            0,
                            "{rel} {}: {path} holds a secret but is mode {mode:o}",
                            node.name
                        );
                    }
                }
            }
            // And the secrets are there at all.
            assert!(
                files
                    .tree
                    .text("/etc/wireguard/wg0.conf")
                    .unwrap()
                    .contains(&key)
            );
            assert!(
                files
                    .tree
                    .text("/etc/rancher/k3s/cluster-token")
                    .unwrap()
                    .contains(secrets.token.expose())
            );
            // The node's identity, where k3s and sshd read it.
            assert_eq!(
                files.tree.text("/etc/rancher/node/password").unwrap(),
                format!("{password}\n")
            );
            assert_eq!(
                files.tree.text("/etc/ssh/ssh_host_ed25519_key").unwrap(),
                host_key
            );
            let public = files
                .tree
                .text("/etc/ssh/ssh_host_ed25519_key.pub")
                .unwrap();
            assert!(
                public.starts_with(&secrets.ssh_host_keys[&node.name].public_key_text()),
                "{public}"
            );
            assert!(matches!(
                files.tree.get("/etc/ssh/ssh_host_ed25519_key.pub"),
                Some(Entry::File { mode: 0o644, .. })
            ));
            let sshd = files
                .tree
                .text("/etc/ssh/sshd_config.d/10-kiln.conf")
                .unwrap();
            let host_keys: Vec<&str> = sshd.lines().filter(|l| l.starts_with("HostKey ")).collect();
            assert_eq!(
                host_keys,
                ["HostKey /etc/ssh/ssh_host_ed25519_key"],
                "{sshd}"
            );
        }
    }
}
