//! The `kiln` binary as a user runs it: exit codes, stdout and stderr,
//! files and modes it leaves behind.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Copy an example profile into a temp dir, so its state dir lands there.
fn example_in(dir: &Path, rel: &str) -> String {
    let dst = dir.join(Path::new(rel).file_name().unwrap());
    std::fs::copy(common::repo().join(rel), &dst).unwrap();
    dst.to_string_lossy().to_string()
}

#[test]
fn check_passes_on_both_examples() {
    for rel in common::EXAMPLES {
        let out = kiln(&["check", &common::repo().join(rel).to_string_lossy()]);
        assert!(out.status.success(), "{rel}: {}", text(&out.stderr));
        let s = text(&out.stdout);
        assert!(
            s.contains("v1.31.1+k3s1") && s.contains("NAME") && s.contains("server"),
            "{s}"
        );
    }
}

#[test]
fn check_reports_every_error_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.toml");
    std::fs::write(&p, "[cluster]\nname = \"x\"\ncolour = 1\n[k3s]\nversion = \"latest\"\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\nmac = \"zz\"\n").unwrap();
    let out = kiln(&["check", &p.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.toml:3:1: cluster.colour: unknown key"),
        "{err}"
    );
    assert!(err.contains("bad.toml:5:11: k3s.version"), "{err}");
    assert!(err.contains("bad.toml:9:7: nodes[0].mac"), "{err}");
    assert!(err.contains("3 errors in the profile"), "{err}");
    assert!(text(&out.stdout).is_empty());
}

#[test]
fn missing_profile_is_a_clear_error() {
    let out = kiln(&["check", "/nonexistent/profile.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("reading profile /nonexistent/profile.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn keys_are_stable_private_and_never_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = example_in(tmp.path(), "profiles/club.toml");
    let first = kiln(&["keys", &profile]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let second = kiln(&["keys", &profile]);
    assert_eq!(
        text(&first.stdout),
        text(&second.stdout),
        "keys changed between runs"
    );
    let out = text(&first.stdout);
    // One [Peer] per node and one for the operator's laptop.
    assert_eq!(out.matches("\n[Peer]\n").count(), 6, "{out}");
    assert!(out.contains("# operator alice-laptop"), "{out}");
    let state = tmp.path().join("club.state");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for n in ["rgb1", "rgb2", "rgb3", "rgb4", "rgb5"] {
        let key_file = state.join(format!("wireguard/{n}.key"));
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let private = std::fs::read_to_string(&key_file).unwrap();
        assert!(!out.contains(private.trim()), "private key of {n} printed");
    }
    let token = std::fs::read_to_string(state.join("k3s-token")).unwrap();
    assert!(!out.contains(token.trim()) && !text(&first.stderr).contains(token.trim()));
    let operator = std::fs::read_to_string(state.join("operators/alice-laptop.key")).unwrap();
    assert!(
        !out.contains(operator.trim()),
        "operator's private key printed"
    );
}

#[test]
fn keys_print_known_hosts_lines_and_never_the_node_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = example_in(tmp.path(), "profiles/club.toml");
    let all = kiln(&["keys", &profile]);
    assert!(all.status.success(), "{}", text(&all.stderr));
    let only = kiln(&["keys", &profile, "--known-hosts"]);
    assert!(only.status.success(), "{}", text(&only.stderr));
    let (all, only) = (text(&all.stdout), text(&only.stdout));
    // The full output ends with the same lines, after a comment.
    assert!(all.ends_with(&only), "{all}");
    assert!(
        all.contains("\n# SSH host keys, for ~/.ssh/known_hosts"),
        "{all}"
    );

    let lines: Vec<&str> = only.lines().collect();
    assert_eq!(lines.len(), 5, "{only}");
    let state = tmp.path().join("club.state");
    for (line, n) in lines.iter().zip(["rgb1", "rgb2", "rgb3", "rgb4", "rgb5"]) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "{line}");
        let hosts: Vec<&str> = fields[0].split(',').collect();
        assert_eq!(hosts[0], n, "{line}");
        assert!(hosts.iter().all(|h| !h.is_empty()), "{line}");
        // WireGuard addresses in club.toml are 10.0.0.0/24.
        assert!(hosts.iter().any(|h| h.starts_with("10.0.0.")), "{line}");
        assert_eq!(fields[1], "ssh-ed25519", "{line}");
        assert!(fields[2].starts_with("AAAAC3NzaC1lZDI1NTE5"), "{line}");
        // The line's key is the public half of the key in the state dir.
        let key_file = state.join(format!("ssh-host-key/{n}_ed25519_key"));
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        if common::have("ssh-keygen") {
            let derived = Command::new("ssh-keygen")
                .arg("-y")
                .arg("-f")
                .arg(&key_file)
                .output()
                .unwrap();
            assert!(derived.status.success(), "{}", text(&derived.stderr));
            assert!(text(&derived.stdout).starts_with(&format!("{} {}", fields[1], fields[2])));
        }
    }
    // rgb1 has a static LAN address: by name, LAN and tunnel address.
    assert!(
        lines[0].starts_with("rgb1,192.168.1.11,10.0.0.11 ssh-ed25519 "),
        "{only}"
    );
    if common::have("ssh-keygen") {
        // ssh-keygen reads the lines as a known_hosts file.
        let kh = tmp.path().join("known_hosts");
        std::fs::write(&kh, &all).unwrap();
        let out = Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(&kh)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout).lines().count(),
            5,
            "{}",
            text(&out.stdout)
        );
        let found = Command::new("ssh-keygen")
            .args(["-F", "10.0.0.11", "-f"])
            .arg(&kh)
            .output()
            .unwrap();
        assert!(
            text(&found.stdout).contains("rgb1,"),
            "{}",
            text(&found.stdout)
        );
    }

    // Neither the node password nor the host private key is ever printed.
    let check = kiln(&["check", &profile]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let printed = [all, only, text(&check.stdout), text(&check.stderr)].concat();
    for n in ["rgb1", "rgb2", "rgb3", "rgb4", "rgb5"] {
        let password_file = state.join(format!("node-password/{n}"));
        assert_eq!(
            std::fs::metadata(&password_file)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let password = std::fs::read_to_string(&password_file).unwrap();
        assert_eq!(password.trim().len(), 32, "k3s's 16 bytes in hex");
        assert!(
            !printed.contains(password.trim()),
            "node password of {n} printed"
        );
        let key =
            std::fs::read_to_string(state.join(format!("ssh-host-key/{n}_ed25519_key"))).unwrap();
        for body in key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!printed.contains(body), "host private key of {n} printed");
        }
    }
}

#[test]
fn removing_a_node_keeps_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = example_in(tmp.path(), "profiles/club.toml");
    assert!(kiln(&["keys", &profile]).status.success());
    let key = tmp.path().join("club.state/wireguard/rgb5.key");
    let before = std::fs::read(&key).unwrap();
    let text_p = std::fs::read_to_string(&profile).unwrap();
    let cut = text_p.find("[[nodes]]\nname = \"rgb5\"").unwrap();
    std::fs::write(&profile, &text_p[..cut]).unwrap();
    let out = kiln(&["keys", &profile]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("rgb5"));
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn render_writes_the_tree_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = example_in(tmp.path(), "profiles/club.toml");
    let out_dir = tmp.path().join("rgb1");
    let out = kiln(&[
        "render",
        &profile,
        "--node",
        "rgb1",
        "--out",
        &out_dir.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), out_dir.to_string_lossy());
    let mode = |p: &str| {
        std::fs::metadata(out_dir.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("etc/wireguard/wg0.conf"), 0o600);
    assert_eq!(mode("etc/rancher/k3s/cluster-token"), 0o600);
    assert_eq!(mode("etc/rancher/k3s/config.yaml"), 0o600);
    assert_eq!(mode("etc/kiln/firstboot.sh"), 0o755);
    // The node's identity: private, and the same as in the state dir.
    assert_eq!(mode("etc/rancher/node"), 0o700);
    assert_eq!(mode("etc/rancher/node/password"), 0o600);
    assert_eq!(mode("etc/ssh/ssh_host_ed25519_key"), 0o600);
    assert_eq!(mode("etc/ssh/ssh_host_ed25519_key.pub"), 0o644);
    let state = tmp.path().join("club.state");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(
        read(&out_dir.join("etc/rancher/node/password")),
        read(&state.join("node-password/rgb1"))
    );
    assert_eq!(
        read(&out_dir.join("etc/ssh/ssh_host_ed25519_key")),
        read(&state.join("ssh-host-key/rgb1_ed25519_key"))
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("etc/hostname")).unwrap(),
        "rgb1\n"
    );
    assert!(
        std::fs::read_to_string(out_dir.join("etc/kiln/cmdline"))
            .unwrap()
            .contains("pcie_aspm=off")
    );
    // Masked units are written as links to /dev/null, as `systemctl mask` makes them.
    assert_eq!(
        std::fs::read_link(out_dir.join("etc/systemd/system/suspend.target")).unwrap(),
        Path::new("/dev/null")
    );
    // A second render into the same place refuses instead of mixing trees.
    let again = kiln(&[
        "render",
        &profile,
        "--node",
        "rgb1",
        "--out",
        &out_dir.to_string_lossy(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn render_of_an_unknown_node_lists_the_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = example_in(tmp.path(), "profiles/ha.toml");
    let out = kiln(&[
        "render",
        &profile,
        "--node",
        "nope",
        "--out",
        &tmp.path().join("x").to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no node `nope`") && err.contains("cp1, cp2, cp3, w1, w2"),
        "{err}"
    );
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn help_gives_each_verb_its_own_description() {
    let out = kiln(&["--help"]);
    let s = text(&out.stdout);
    // verb → the first words of its own doc comment.
    let want = [
        ("check", "Validate a profile"),
        ("keys", "Print each node's WireGuard public key"),
        ("build", "Build a bootable disk image"),
        ("render", "Write one node's rendered files"),
        ("test", "Boot a node's image in QEMU"),
        ("run", "Boot an image with its console"),
        ("serve", "Serve the netboot tree"),
        ("flash", "Write"),
        ("operator", "Write the wg-quick file an operator's laptop"),
    ];
    for (verb, words) in want {
        let line = s
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{verb} ")))
            .unwrap_or_else(|| panic!("no line for {verb}:\n{s}"));
        assert!(
            line.contains(words),
            "`{verb}` shows {line:?}, not its own description"
        );
        let own = kiln(&[verb, "--help"]);
        assert!(
            text(&own.stdout).starts_with(words),
            "`kiln {verb} --help` starts {:?}",
            text(&own.stdout).lines().next()
        );
    }
}

#[test]
fn help_describes_every_verb() {
    let out = kiln(&["--help"]);
    let s = text(&out.stdout);
    for verb in ["check", "keys", "render"] {
        assert!(s.contains(verb), "{s}");
    }
}

#[test]
fn upgrade_edits_only_the_k3s_version_and_prints_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let p = example_in(tmp.path(), "profiles/club.toml");
    let before = std::fs::read_to_string(&p).unwrap();
    let out = kiln(&["upgrade", &p, "--k3s", "v1.31.2+k3s1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("k3s v1.31.1+k3s1 → v1.31.2+k3s1"),
        "{}",
        text(&out.stderr)
    );
    let after = std::fs::read_to_string(&p).unwrap();
    let changed: Vec<(&str, &str)> = before
        .lines()
        .zip(after.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(
        changed,
        [("version = \"v1.31.1+k3s1\"", "version = \"v1.31.2+k3s1\"")]
    );
    assert_eq!(before.lines().count(), after.lines().count());
    assert!(kiln(&["check", &p]).status.success());
    // Again: nothing to do, the file is untouched.
    let out = kiln(&["upgrade", &p, "--k3s", "v1.31.2+k3s1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already"),
        "{}",
        text(&out.stderr)
    );
    let out = kiln(&["upgrade", &p, "--k3s", "latest"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&p).unwrap(), after);

    // Plans: need the server's URL; two Plans on stdout.
    let out = kiln(&["upgrade", &p, "--plan"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--server"),
        "{}",
        text(&out.stderr)
    );
    let out = kiln(&[
        "upgrade",
        &p,
        "--plan",
        "--server",
        "http://192.168.1.10:8080",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text(&out.stdout))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect();
    assert_eq!(docs.len(), 2, "{}", text(&out.stdout));
    for (d, role) in docs.iter().zip(["server", "agent"]) {
        assert_eq!(d["kind"].as_str(), Some("Plan"));
        assert_eq!(d["apiVersion"].as_str(), Some("upgrade.cattle.io/v1"));
        assert_eq!(d["spec"]["version"].as_str(), Some("v1.31.2+k3s1"));
        assert_eq!(d["spec"]["concurrency"].as_i64(), Some(1));
        let sel = serde_yaml::to_string(&d["spec"]["nodeSelector"]).unwrap();
        assert!(sel.contains("kiln.dev/role") && sel.contains(role), "{sel}");
        let args = serde_yaml::to_string(&d["spec"]["upgrade"]).unwrap();
        assert!(
            args.contains("http://192.168.1.10:8080") && args.contains("--reboot"),
            "{args}"
        );
    }
    // Into a directory.
    let dir = tmp.path().join("plans");
    let out = kiln(&[
        "upgrade",
        &p,
        "--plan",
        "--server",
        "http://192.168.1.10:8080",
        "--out",
        &dir.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("kiln-upgrade-plans.yaml").is_file());
}

#[test]
fn operator_writes_a_private_wg_quick_file_once() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = example_in(tmp.path(), "profiles/club.toml");
    let conf = tmp.path().join("club.conf");
    let conf_arg = conf.to_string_lossy().to_string();
    let out = kiln(&["operator", &profile, "alice-laptop", "--out", &conf_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), conf_arg);
    let err = text(&out.stderr);
    // The external hub's admin is told what to add.
    assert!(err.contains("AllowedIPs = 10.0.0.200/32"), "{err}");
    assert!(err.contains(&format!("wg-quick up {conf_arg}")), "{err}");
    let meta = std::fs::metadata(&conf).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let written = std::fs::read_to_string(&conf).unwrap();
    let key =
        std::fs::read_to_string(tmp.path().join("club.state/operators/alice-laptop.key")).unwrap();
    assert!(written.contains(&format!("PrivateKey = {}", key.trim())));
    assert!(!err.contains(key.trim()), "private key on stderr");

    // The same again is fine; another file in its place is not replaced.
    let again = kiln(&["operator", &profile, "alice-laptop", "--out", &conf_arg]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    std::fs::write(&conf, "# mine\n").unwrap();
    let refused = kiln(&["operator", &profile, "alice-laptop", "--out", &conf_arg]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("--force"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "# mine\n");
    let forced = kiln(&[
        "operator",
        &profile,
        "alice-laptop",
        "--out",
        &conf_arg,
        "--force",
    ]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), written);
}

#[test]
fn operator_refuses_unknown_names_and_files_wg_quick_cannot_bring_up() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = example_in(tmp.path(), "profiles/club.toml");
    let out = kiln(&["operator", &profile, "bob"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("operators: alice-laptop"),
        "{}",
        text(&out.stderr)
    );
    for bad in ["club.wg", "a-name-far-too-long.conf", "sp ace.conf"] {
        let path = tmp.path().join(bad).to_string_lossy().to_string();
        let out = kiln(&["operator", &profile, "alice-laptop", "--out", &path]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(
            text(&out.stderr).contains("interface name"),
            "{bad}: {}",
            text(&out.stderr)
        );
        assert!(!Path::new(&path).exists(), "{bad} written");
    }
}

#[test]
fn check_prints_each_nodes_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kiln(&["check", &example_in(tmp.path(), "profiles/ha.toml")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let section: Vec<&str> = s
        .lines()
        .skip_while(|l| !l.starts_with("storage "))
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(
        section,
        [
            "storage (packages in the base every node shares: nfs-common open-iscsi; the rest per node)",
            "  cp1  longhorn (modules iscsi_tcp; iscsid, initiator name made once in /var/lib/kiln/iscsi/initiatorname.iscsi)",
            "  cp2  longhorn (modules iscsi_tcp; iscsid, initiator name made once in /var/lib/kiln/iscsi/initiatorname.iscsi)",
            "  cp3  longhorn (modules iscsi_tcp; iscsid, initiator name made once in /var/lib/kiln/iscsi/initiatorname.iscsi)",
            "  w1   longhorn (modules iscsi_tcp; iscsid, initiator name made once in /var/lib/kiln/iscsi/initiatorname.iscsi)",
            "  w2   nfs",
        ],
        "{s}"
    );
    // Without `storage`, no section.
    let out = kiln(&["check", &example_in(tmp.path(), "profiles/club.toml")]);
    assert!(
        !text(&out.stdout).contains("\nstorage "),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_prints_who_peers_with_whom_over_which_endpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kiln(&["check", &example_in(tmp.path(), "profiles/club.toml")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("site campus: rgb1, rgb2, rgb3, rgb4, rgb5 peer directly over their LAN"),
        "{s}"
    );
    let row = |node: &str, peer: &str| -> Vec<String> {
        let rows: Vec<Vec<String>> = s
            .lines()
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect()
            })
            .filter(|c: &Vec<String>| c.len() == 5 && c[0] == node && c[1] == peer)
            .collect();
        assert_eq!(rows.len(), 1, "one row {node} -> {peer}:\n{s}");
        rows[0].clone()
    };
    assert_eq!(
        row("rgb2", "rgb1"),
        [
            "rgb2",
            "rgb1",
            "192.168.1.11:51830",
            "10.0.0.11/32",
            "site campus"
        ]
    );
    assert_eq!(
        row("rgb5", "vps"),
        [
            "rgb5",
            "vps",
            "tcp hub.example.org:443 (kiln-relay)",
            "10.0.0.0/24 minus site campus",
            "hub"
        ]
    );
    // Four LAN peers and the hub for each of the five desktops.
    assert_eq!(s.matches("site campus\n").count(), 20, "{s}");
    assert_eq!(s.matches("  hub\n").count(), 5, "{s}");
}

/// `kiln` with its cache in `cache` (no `KILN_K3S_BINARY` from outside).
fn kiln_with_cache(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_CACHE_DIR", cache)
        .env_remove("KILN_K3S_BINARY")
        .output()
        .unwrap()
}

/// The `base cache` line of `kiln check`.
fn base_cache_line(cache: &Path, profile: &str) -> String {
    let out = kiln_with_cache(cache, &["check", profile]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    s.lines()
        .find(|l| l.starts_with("base cache "))
        .unwrap_or_else(|| panic!("no base cache line:\n{s}"))
        .to_string()
}

#[test]
fn check_says_how_old_the_cached_base_is_and_when_a_build_refreshes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let profile = example_in(tmp.path(), "profiles/club.toml");
    let line = base_cache_line(&cache, &profile);
    assert!(
        line.contains("none yet") && line.contains("the next build makes it"),
        "{line}"
    );

    // A cached base (a stand-in file: check neither hashes nor opens it)
    // with its record, as a build publishes them.
    let plan = kiln::config::plan::load(Path::new(&profile)).unwrap();
    let spec = kiln::inputs::base::base_spec(&plan).unwrap();
    let tarball = kiln::inputs::base::cached_path(&spec, &cache);
    std::fs::create_dir_all(tarball.parent().unwrap()).unwrap();
    std::fs::write(&tarball, b"a base").unwrap();
    let record = tarball.with_extension("").with_extension("json");
    let now = kiln::inputs::freshness::unix_now();
    let day = 86_400;
    let publish = |built_at: u64| {
        let r = serde_json::json!({ "sha256": "0".repeat(64), "built-at": built_at });
        std::fs::write(&record, r.to_string()).unwrap();
    };
    publish(now - 3 * day - 60);
    let line = base_cache_line(&cache, &profile);
    assert!(
        line.contains("built 3d ago (max-age 30d)") && line.contains("reused until"),
        "{line}"
    );
    assert!(line.contains("(in 26d 23h)"), "{line}");

    publish(now - 42 * day);
    let line = base_cache_line(&cache, &profile);
    assert!(
        line.contains("built 42d ago, older than max-age 30d")
            && line.contains("the next build makes it again"),
        "{line}"
    );

    // A profile's own max-age.
    let text_of = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(
        &profile,
        text_of.replace(
            "kernel = \"generic\"",
            "kernel = \"generic\"\nmax-age = \"60d\"",
        ),
    )
    .unwrap();
    let line = base_cache_line(&cache, &profile);
    assert!(line.contains("built 42d ago (max-age 60d)"), "{line}");
}

#[test]
fn build_accepts_refresh_base() {
    let help = kiln(&["build", "--help"]);
    assert!(
        text(&help.stdout).contains("--refresh-base"),
        "{}",
        text(&help.stdout)
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let profile = example_in(tmp.path(), "profiles/club.toml");
    let out_dir = tmp.path().join("out");
    let out_dir = out_dir.to_string_lossy();
    // Parsed and handed to the build, which stops at the unknown node
    // before it reaches the base (and mmdebstrap).
    let out = kiln_with_cache(
        &cache,
        &[
            "build",
            &profile,
            "--refresh-base",
            "--node",
            "nosuch",
            "--out",
            &out_dir,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no node `nosuch`"), "{err}");

    // A supplied tarball is not kiln's to rebuild: the flag says so.
    let text_of = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(
        &profile,
        text_of.replace(
            "suite = \"bookworm\"\nkernel = \"generic\"",
            "tarball = \"root.tar\"",
        ),
    )
    .unwrap();
    let out = kiln_with_cache(
        &cache,
        &["build", &profile, "--refresh-base", "--out", &out_dir],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--refresh-base: the base is the tarball") && err.contains("root.tar"),
        "{err}"
    );
    assert!(!cache.join("base").exists(), "nothing was built");
}

#[test]
fn check_lists_what_k3s_deploys_and_the_proxy_without_its_password() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kiln(&[
        "check",
        &common::repo().join("profiles/club.toml").to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("kiln-registry.yaml")
            && s.contains("Helm chart system-upgrade-controller 0.14.2, namespace system-upgrade"),
        "{s}"
    );
    let profile = example_in(tmp.path(), "profiles/ha.toml");
    let with_password = std::fs::read_to_string(&profile).unwrap().replace(
        "https = \"http://proxy",
        "https = \"http://ops:s3cret@proxy",
    );
    std::fs::write(&profile, with_password).unwrap();
    let out = kiln(&["check", &profile]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("HTTPS_PROXY  http://ops:***@proxy.ha.example.org:3128"),
        "{s}"
    );
    assert!(s.contains("NO_PROXY     localhost,127.0.0.0/8,"), "{s}");
    assert!(!s.contains("s3cret"), "{s}");
}

/// A profile asking for air-gap images, with one tarball of its own
/// next to it, in `dir`.
fn airgap_profile_in(dir: &Path, airgap: bool) -> String {
    std::fs::create_dir(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/registry.tar.zst"), b"x").unwrap();
    let p = dir.join("lab.toml");
    std::fs::write(
        &p,
        format!(
            "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\nairgap = {airgap}\nimage-tarballs = [\"images/registry.tar.zst\"]\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\n"
        ),
    )
    .unwrap();
    p.to_string_lossy().to_string()
}

#[test]
fn check_lists_the_image_tarballs_every_node_gets() {
    let tmp = tempfile::tempdir().unwrap();
    let p = airgap_profile_in(tmp.path(), true);
    let out = kiln(&["check", &p]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout)
        .lines()
        .find(|l| l.starts_with("images "))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("k3s v1.31.1+k3s1 air-gap images")
            && line.contains("registry.tar.zst (")
            && line.contains("/var/lib/rancher/k3s/agent/images"),
        "{line}"
    );
}

#[test]
fn build_refuses_an_airgap_tarball_the_profile_does_not_ask_for_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let p = airgap_profile_in(tmp.path(), false);
    let out_dir = tmp.path().join("out");
    let out = kiln(&[
        "build",
        &p,
        "--airgap-images",
        "/nonexistent/k3s-airgap-images-amd64.tar.zst",
        "--out",
        &out_dir.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--airgap-images /nonexistent/k3s-airgap-images-amd64.tar.zst")
            && err.contains("does not set `k3s.airgap = true`")
            && err.contains("hint: add `airgap = true`"),
        "{err}"
    );
    assert!(!out_dir.exists(), "nothing written");
    let help = text(&kiln(&["build", "--help"]).stdout);
    assert!(
        help.contains("--airgap-images <FILE>") && help.contains("KILN_AIRGAP_IMAGES"),
        "{help}"
    );
}

/// `kiln hub` on the club example: every file the VPS needs, each checked
/// by its own tool; an existing directory is kept without --force; a
/// profile whose hub is a node gets a clear refusal.
#[test]
fn hub_writes_a_bundle_the_tools_accept() {
    let dir = tempfile::tempdir().unwrap();
    let profile = example_in(dir.path(), "profiles/club.toml");
    let out = dir.path().join("hub");
    let o = kiln(&["hub", &profile, "--out", &out.to_string_lossy()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "99-kiln-hub.conf",
            "SHA256SUMS",
            "install.sh",
            "kiln-hub-firewall.service",
            "kiln-hub.nft",
            "kiln-relay",
            "kiln-relay.service",
            "wg0.conf"
        ]
    );
    let mode = |n: &str| std::fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("wg0.conf"), 0o600);
    assert_eq!(mode("install.sh"), 0o755);
    let run = |cmd: &mut Command| {
        let o = cmd.current_dir(&out).output().unwrap();
        assert!(
            o.status.success(),
            "{cmd:?}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        text(&o.stdout)
    };
    run(Command::new("sha256sum").args(["-c", "--quiet", "SHA256SUMS"]));
    run(Command::new("shellcheck").arg("install.sh"));
    run(Command::new("nft").args(["-c", "-f", "kiln-hub.nft"]));
    let stripped = run(Command::new("wg-quick").args(["strip", "./wg0.conf"]));
    // Five desktops and Alice's laptop, and no private key in the bundle.
    let peers = stripped.lines().filter(|l| l.trim() == "[Peer]").count();
    assert_eq!(peers, 6, "{stripped}");
    assert!(!stripped.contains("PrivateKey"), "{stripped}");
    let relay = run(Command::new(out.join("kiln-relay")).arg("--version"));
    assert!(relay.starts_with("kiln-relay "), "{relay}");
    let unit = std::fs::read_to_string(out.join("kiln-relay.service")).unwrap();
    assert!(
        unit.contains("server --tcp 0.0.0.0:443 --udp 127.0.0.1:51820"),
        "{unit}"
    );

    let again = kiln(&["hub", &profile, "--out", &out.to_string_lossy()]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    let forced = kiln(&["hub", &profile, "--out", &out.to_string_lossy(), "--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));

    let ha = example_in(dir.path(), "profiles/ha.toml");
    let refused = kiln(&[
        "hub",
        &ha,
        "--out",
        &dir.path().join("ha-hub").to_string_lossy(),
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("no external hub"),
        "{}",
        text(&refused.stderr)
    );
    assert!(!dir.path().join("ha-hub").exists());
    // Nothing staged is left beside the bundle.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".kiln-hub-") || n.ends_with("old-kiln-hub"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
