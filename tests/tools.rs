//! The rendered files, checked by the real tools that will read them:
//! `nft -c`, `wg pubkey`, `systemd-analyze verify`, a YAML parser, and
//! `sh` running the manifest deploy script on a scratch directory.
//! A missing tool fails the test (CI installs them; see .ci/run).

mod common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln::config::secrets::PrivateKey;
use kiln::render::tree::Entry;

#[track_caller]
fn need(cmd: &str, package: &str) {
    assert!(
        common::have(cmd),
        "`{cmd}` is missing: apt-get install --no-install-recommends {package}"
    );
}

/// `wg-quick strip` of `text` written to `path` (0600, as wg-quick wants
/// it): what `wg setconf` would get. Fails naming `what`.
fn wg_quick_strip(path: &std::path::Path, text: &str, what: &str) -> String {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("wg-quick")
        .arg("strip")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rendered() -> Vec<(String, kiln::config::plan::Plan, kiln::render::NodeFiles)> {
    let mut out = Vec::new();
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        for n in &plan.nodes {
            let files = kiln::cli::render::render_node(&plan, &n.name, &secrets).unwrap();
            out.push((format!("{rel}:{}", n.name), plan.clone(), files));
        }
    }
    out
}

#[test]
fn rulesets_pass_nft_check() {
    need("nft", "nftables");
    let dir = tempfile::tempdir().unwrap();
    for (name, _, files) in rendered() {
        let path = dir.path().join("nftables.conf");
        std::fs::write(&path, files.tree.text("/etc/nftables.conf").unwrap()).unwrap();
        let out = Command::new("nft")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: nft -c rejected the ruleset:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_broken_ruleset_fails_nft_check() {
    // The check above can fail: a ruleset with a typo is rejected.
    need("nft", "nftables");
    let (_, _, files) = rendered().remove(0);
    let broken = files
        .tree
        .text("/etc/nftables.conf")
        .unwrap()
        .replace("tcp dport", "tcp dprot");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.conf");
    std::fs::write(&path, broken).unwrap();
    assert!(
        !Command::new("nft")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap()
            .status
            .success()
    );
}

fn wg_pubkey(private: &str) -> String {
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{private}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn key_pairs_agree_with_wg_pubkey() {
    need("wg", "wireguard-tools");
    for _ in 0..200 {
        let k = PrivateKey::generate().unwrap();
        assert_eq!(wg_pubkey(&k.to_base64()), k.public_key().to_base64());
    }
    // And the keys in rendered configs belong to the public keys peers get.
    for (name, _, files) in rendered() {
        let conf = files.tree.text("/etc/wireguard/wg0.conf").unwrap();
        let private = conf
            .lines()
            .find_map(|l| l.strip_prefix("PrivateKey = "))
            .unwrap();
        assert_eq!(
            wg_pubkey(private),
            PrivateKey::parse(private).unwrap().public_key().to_base64(),
            "{name}"
        );
    }
}

#[test]
fn wg_configs_parse_with_wg_tools() {
    // `wg-quick strip` turns the wg-quick file into the `wg setconf` form;
    // `wg` has no offline check, so we check the stripped keys ourselves.
    need("wg-quick", "wireguard-tools");
    let dir = tempfile::tempdir().unwrap();
    for (name, plan, files) in rendered() {
        let stripped = wg_quick_strip(
            &dir.path().join("wg0.conf"),
            files.tree.text("/etc/wireguard/wg0.conf").unwrap(),
            &name,
        );
        assert!(
            !stripped.contains("Address"),
            "{name}: wg-quick keys left in:\n{stripped}"
        );
        let peers = stripped.matches("[Peer]").count();
        let wg = plan.wireguard.as_ref().unwrap();
        // A hub node peers with everyone, like a node in a mesh.
        let everyone = plan.nodes.len() - 1 + wg.peers.len() + plan.operators.len();
        let hub_node = match wg.hub {
            Some(kiln::config::plan::HubRef::Node(i)) => Some(plan.nodes[i].name.as_str()),
            _ => None,
        };
        // A spoke peers with the hub and the other nodes of its site.
        let node = plan.node(&files.node).unwrap();
        let site_peers = plan
            .nodes
            .iter()
            .filter(|n| n.name != node.name && Some(n.name.as_str()) != hub_node)
            .filter(|n| node.site.is_some() && n.site == node.site)
            .count();
        let expected = match wg.topology {
            kiln::config::profile::Topology::Hub if hub_node != Some(files.node.as_str()) => {
                1 + site_peers
            }
            _ => everyone,
        };
        assert_eq!(peers, expected, "{name}");
        assert_no_shared_allowed_ips(&name, &stripped);
    }
}

/// WireGuard routes by AllowedIPs: no address may belong to two peers.
fn assert_no_shared_allowed_ips(name: &str, stripped: &str) {
    let peers: Vec<Vec<ipnet::IpNet>> = stripped
        .lines()
        .filter_map(|l| l.strip_prefix("AllowedIPs = "))
        .map(|l| l.split(", ").map(|n| n.parse().unwrap()).collect())
        .collect();
    for (i, a) in peers.iter().enumerate() {
        for b in &peers[i + 1..] {
            for x in a {
                for y in b {
                    assert!(
                        !x.contains(y) && !y.contains(x),
                        "{name}: {x} and {y} belong to two peers"
                    );
                }
            }
        }
    }
}

/// Make `root` a minimal systemd root for `systemd-analyze verify --root`:
/// the node's files and what kiln puts in its root image for k3s
/// (`render::manifests`), the host's unit files, and an executable for
/// every Exec path the units name that the root lacks (the image
/// provides those).
fn verify_root(root: &Path, plan: &kiln::config::plan::Plan, files: &kiln::render::NodeFiles) {
    let mut tree = files.tree.clone();
    tree.extend(kiln::render::manifests::image_files(plan));
    tree.write_to(root).unwrap();
    {
        let d = "usr/lib/systemd/system";
        let dst = root.join(d);
        std::fs::create_dir_all(&dst).unwrap();
        let st = Command::new("cp")
            .arg("-a")
            .arg(format!("/{d}/."))
            .arg(&dst)
            .status()
            .unwrap();
        assert!(st.success());
    }
    // Debian 12 is merged-/usr.
    for (l, t) in [("lib", "usr/lib"), ("bin", "usr/bin"), ("sbin", "usr/sbin")] {
        std::fs::create_dir_all(root.join(t)).unwrap();
        let _ = std::os::unix::fs::symlink(t, root.join(l));
    }
    let mut exec_paths = Vec::new();
    for dir in ["etc/systemd/system", "usr/lib/systemd/system"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for l in text.lines().filter(|l| l.starts_with("Exec")) {
                let cmd = l
                    .split_once('=')
                    .unwrap()
                    .1
                    .trim_start_matches(['-', '@', '+', '!', ':']);
                if let Some(p) = cmd.split_whitespace().next().filter(|p| p.starts_with('/')) {
                    exec_paths.push(p.to_string());
                }
            }
        }
    }
    for p in exec_paths {
        let dst = root.join(p.trim_start_matches('/'));
        if std::fs::symlink_metadata(&dst).is_err() && !dst.exists() {
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::write(&dst, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

fn rendered_units(files: &kiln::render::NodeFiles) -> Vec<String> {
    let mut units: Vec<String> = files
        .tree
        .iter()
        .filter(|(p, e)| {
            p.starts_with("/etc/systemd/system/")
                && matches!(e, Entry::File { .. })
                && (p.ends_with(".service") || p.ends_with(".mount"))
                && p.matches('/').count() == 4
        })
        .map(|(p, _)| p.rsplit('/').next().unwrap().to_string())
        .collect();
    units.push("wg-quick@wg0.service".into());
    // Servers enable the image's manifest unit (a link in the seed).
    if files.tree.get(kiln::render::manifests::LIST).is_some() {
        units.push(kiln::render::manifests::UNIT.into());
    }
    units
}

#[test]
fn ssh_host_keys_are_read_by_ssh_keygen() {
    // The seeded private key is one OpenSSH reads, and its .pub is its half.
    need("ssh-keygen", "openssh-client");
    for (name, _, files) in rendered() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("ssh_host_ed25519_key");
        let private = files.tree.text("/etc/ssh/ssh_host_ed25519_key").unwrap();
        std::fs::write(&key, private).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = files
            .tree
            .text("/etc/ssh/ssh_host_ed25519_key.pub")
            .unwrap();
        let derived = String::from_utf8_lossy(&out.stdout);
        let key_of = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(key_of(&derived), key_of(public), "{name}");
        let pub_file = tmp.path().join("ssh_host_ed25519_key.pub");
        std::fs::write(&pub_file, public).unwrap();
        let out = Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(&pub_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("(ED25519)"),
            "{name}"
        );
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    need("systemd-analyze", "systemd");
    for (name, plan, files) in rendered().into_iter().step_by(4) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        verify_root(&root, &plan, &files);
        let units = rendered_units(&files);
        assert!(
            units.contains(&"k3s.service".to_string())
                && units.contains(&"kiln-firstboot.service".to_string())
                && units.len() >= 3,
            "{units:?}"
        );
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .args(&units)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{name}: systemd-analyze verify {units:?}:\n{stderr}"
        );
    }
}

#[test]
fn a_broken_unit_fails_systemd_analyze_verify() {
    need("systemd-analyze", "systemd");
    let (_, plan, mut files) = rendered().remove(0);
    let unit = files
        .tree
        .text("/etc/systemd/system/k3s.service")
        .unwrap()
        .replace("[Service]", "[Service]\nRestart=sometimes");
    files
        .tree
        .file("/etc/systemd/system/k3s.service", 0o644, unit);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    verify_root(&root, &plan, &files);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("k3s.service")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "verify accepted Restart=sometimes"
    );
}

#[test]
fn rendered_yaml_parses_with_the_expected_values() {
    for (name, plan, files) in rendered() {
        let node = plan.node(name.rsplit(':').next().unwrap()).unwrap();
        let text = files.tree.text("/etc/rancher/k3s/config.yaml").unwrap();
        let v: serde_yaml::Value =
            serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        assert_eq!(v["node-name"].as_str(), Some(node.name.as_str()), "{name}");
        assert_eq!(
            v["node-ip"].as_str().map(String::from),
            node.wireguard_address.map(|a| a.to_string()),
            "{name}"
        );
        assert_eq!(
            v["token-file"].as_str(),
            Some("/etc/rancher/k3s/cluster-token")
        );
        assert_eq!(
            v["server"].as_str().map(String::from),
            plan.join_url(node),
            "{name}"
        );
        if let Some(r) = files.tree.text("/etc/rancher/k3s/registries.yaml") {
            let v: serde_yaml::Value =
                serde_yaml::from_str(r).unwrap_or_else(|e| panic!("{name}: {e}\n{r}"));
            assert!(v["mirrors"].is_mapping(), "{name}");
        }
    }
}

/// kiln's own scripts parse: the init and udhcpc hook with busybox sh (the
/// shell that runs them), kiln-update and boot-check with bash; a broken
/// copy does not.
#[test]
fn kiln_scripts_parse_with_their_shells() {
    need("busybox", "busybox-static");
    let scripts = [
        (
            "busybox",
            vec!["sh", "-n"],
            kiln::image::initramfs::INIT_SCRIPT,
        ),
        (
            "busybox",
            vec!["sh", "-n"],
            kiln::image::initramfs::UDHCPC_SCRIPT,
        ),
        ("bash", vec!["-n"], kiln::image::rootfs::UPDATE_SCRIPT),
        ("bash", vec!["-n"], kiln::image::rootfs::BOOT_CHECK_SCRIPT),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (shell, args, text)) in scripts.iter().enumerate() {
        for (broken, body) in [
            (false, text.to_string()),
            (true, format!("{text}\nif then fi\n")),
        ] {
            let p = dir.path().join(format!("s{i}{broken}"));
            std::fs::write(&p, &body).unwrap();
            let o = std::process::Command::new(shell)
                .args(args)
                .arg(&p)
                .output()
                .unwrap();
            assert_eq!(
                o.status.success(),
                !broken,
                "{shell} {args:?} on script {i} (broken: {broken}): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

#[test]
fn operator_files_parse_with_wg_quick() {
    // The laptop's file is a wg-quick file like the nodes': `strip` reads it.
    need("wg-quick", "wireguard-tools");
    let dir = tempfile::tempdir().unwrap();
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        for o in &plan.operators {
            let text = kiln::cli::operator::operator_config(&plan, &secrets, &o.name).unwrap();
            let stripped = wg_quick_strip(
                &dir.path()
                    .join(kiln::cli::operator::default_file_name(&plan.cluster)),
                &text,
                &format!("{rel} {}", o.name),
            );
            let private = stripped
                .lines()
                .find_map(|l| l.strip_prefix("PrivateKey = "))
                .unwrap();
            assert_eq!(
                wg_pubkey(private),
                secrets.operators[&o.name].public_key().to_base64(),
                "{rel} {}",
                o.name
            );
            assert!(stripped.contains("PersistentKeepalive = 25"), "{stripped}");
        }
    }
}

/// The deploy script of the root image, run by the host's `sh` on a
/// server's rendered files: it writes the listed manifests as real files
/// (replacing a symlink, not following it), leaves them alone when they
/// match, removes kiln's files no longer listed and nothing else, and
/// refuses files that are not the ones listed.
#[test]
fn the_manifest_deploy_script_writes_real_files_and_removes_only_kiln_ones() {
    use kiln::render::manifests::{IMAGE_DIR, LIST, SCRIPT};
    let (_, plan, files) = rendered()
        .into_iter()
        .find(|(n, _, _)| n == "profiles/club.toml:rgb1")
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut tree = files.tree.clone();
    tree.extend(kiln::render::manifests::image_files(&plan));
    tree.write_to(&root).unwrap();
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let dst = tmp.path().join("manifests");
    std::fs::create_dir(&dst).unwrap();
    std::fs::write(dst.join("traefik.yaml"), "k3s's own\n").unwrap();
    std::fs::write(dst.join("kiln-dropped.yaml"), "from an older set\n").unwrap();
    let outside = tmp.path().join("outside");
    std::fs::write(&outside, "not to be written through\n").unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("kiln-registry.yaml")).unwrap();
    let run = |list: &Path| {
        Command::new("sh")
            .arg(at(SCRIPT))
            .arg(at(IMAGE_DIR))
            .arg(list)
            .arg(&dst)
            .output()
            .unwrap()
    };
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    let out = run(&at(LIST));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("removed: kiln-dropped.yaml"), "{said}");
    assert_eq!(
        names(&dst),
        [
            "kiln-registry.yaml",
            "kiln-system-upgrade-controller.yaml",
            "traefik.yaml"
        ]
    );
    for (name, text) in kiln::render::manifests::node_manifests(&plan, plan.node("rgb1").unwrap()) {
        let p = dst.join(&name);
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(meta.file_type().is_file(), "{name} is not a regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text, "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "not to be written through\n"
    );
    assert_eq!(
        std::fs::read_to_string(dst.join("traefik.yaml")).unwrap(),
        "k3s's own\n"
    );
    // Again: nothing to write.
    let out = run(&at(LIST));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("written: none;"), "{said}");
    // A list naming other bytes (a seed of another build): refused, no change.
    let other = tmp.path().join("other.sha256");
    let list = std::fs::read_to_string(at(LIST)).unwrap();
    std::fs::write(&other, format!("{}{}", "0".repeat(64), &list[64..])).unwrap();
    let out = run(&other);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAILED"),
        "{out:?}"
    );
    // An empty list (every manifest dropped from the profile): kiln's go.
    let empty = tmp.path().join("empty.sha256");
    std::fs::write(&empty, "").unwrap();
    assert!(run(&empty).status.success());
    assert_eq!(names(&dst), ["traefik.yaml"]);
}

/// Every manifest the examples deploy is YAML whose documents all have
/// apiVersion and kind, and a HelmChart's valuesContent is YAML too.
#[test]
fn rendered_manifests_parse_as_kubernetes_objects() {
    use serde::Deserialize as _;
    let mut seen = 0;
    for rel in common::RENDERED {
        let plan = common::load_example(rel);
        for m in &plan.manifests {
            let text = kiln::render::manifests::render_manifest(&plan, m);
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde_yaml::Value::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{rel} {}: {e}", m.name));
                assert!(
                    v["apiVersion"].is_string() && v["kind"].is_string(),
                    "{rel} {}: {v:?}",
                    m.name
                );
                if v["kind"] == "HelmChart" {
                    let values = v["spec"]["valuesContent"].as_str().unwrap_or("{}");
                    serde_yaml::from_str::<serde_yaml::Value>(values).unwrap();
                }
                seen += 1;
            }
        }
    }
    assert!(seen >= 3, "{seen} objects");
}

/// The initiator-name script, as rendered for a Longhorn node: makes a
/// name once (0600, directory 0700) and links open-iscsi's path to it,
/// over the file the base was made with; keeps it on the next run; gives
/// another node another name; takes `iscsi-iname`'s when it is there; and
/// stops, changing nothing, at a file that holds no name.
#[test]
fn the_initiator_name_script_makes_a_name_once_and_links_it() {
    use kiln::render::storage::SCRIPT;
    let (_, _, files) = rendered()
        .into_iter()
        .find(|(n, _, _)| n == "profiles/ha.toml:cp1")
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("iscsi-initiator");
    std::fs::write(&script, files.tree.text(SCRIPT).unwrap()).unwrap();
    // PATH without iscsi-iname (the host has none), or with a stand-in.
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let run = |node: &str, with_iname: bool| {
        let root = tmp.path().join(node);
        let (state, etc) = (
            root.join("var/lib/kiln/iscsi/initiatorname.iscsi"),
            root.join("etc/iscsi/initiatorname.iscsi"),
        );
        let path = if with_iname {
            format!("{}:/usr/bin:/bin", bin.display())
        } else {
            "/usr/bin:/bin".to_string()
        };
        let out = Command::new("sh")
            .arg(&script)
            .arg(&state)
            .arg(&etc)
            .env("PATH", path)
            .output()
            .unwrap();
        (out, state, etc)
    };
    let name_in = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("InitiatorName=").map(String::from))
            .unwrap()
    };
    // The base's name, the same on every node, is in /etc at first.
    let etc1 = tmp.path().join("n1/etc/iscsi/initiatorname.iscsi");
    std::fs::create_dir_all(etc1.parent().unwrap()).unwrap();
    std::fs::write(&etc1, "InitiatorName=iqn.1993-08.org.debian:01:shared\n").unwrap();
    let (out, state, etc) = run("n1", false);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{said}{out:?}");
    assert!(said.contains("made iqn."), "{said}");
    let first = name_in(&state);
    assert!(kiln::verify::storage::is_iqn(&first), "{first}");
    assert!(first.starts_with("iqn.2016-04.com.open-iscsi:"), "{first}");
    assert_eq!(std::fs::read_link(&etc).unwrap(), state);
    assert_eq!(name_in(&etc), first);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o600);
    assert_eq!(mode(state.parent().unwrap()), 0o700);

    // Next boot: /etc is new again (the base's file), the name is kept.
    std::fs::remove_file(&etc).unwrap();
    std::fs::write(&etc, "InitiatorName=iqn.1993-08.org.debian:01:shared\n").unwrap();
    let (out, _, _) = run("n1", true);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("made "));
    assert_eq!(name_in(&state), first);
    assert_eq!(name_in(&etc), first);

    // Another node, another name; with iscsi-iname present, its name.
    let (out, state2, _) = run("n2", false);
    assert!(out.status.success(), "{out:?}");
    assert_ne!(name_in(&state2), first);
    let fake = bin.join("iscsi-iname");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho iqn.2016-04.com.open-iscsi:0123456789ab\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (out, state3, _) = run("n3", true);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(name_in(&state3), "iqn.2016-04.com.open-iscsi:0123456789ab");

    // A file without a name is not replaced: the script fails, says why.
    std::fs::write(&state3, "GenerateName=yes\n").unwrap();
    let (out, _, _) = run("n3", true);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAILED"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&state3).unwrap(),
        "GenerateName=yes\n"
    );
}
