//! The cluster CA kiln holds: where it is seeded, the token that names
//! it, and the admin kubeconfig it signs, checked with openssl and
//! sha256sum rather than with kiln's own code.

mod common;

use std::path::Path;
use std::process::Command;

use kiln::config::cluster_ca;
use kiln::render::k3s_ca::SEED_DIR;
use kiln::render::tree::Entry;

const TOKEN_FILE: &str = "/etc/rancher/k3s/cluster-token";

/// The CA hash in a secure token file.
fn token_hash(token_file: &str) -> String {
    let (hash, creds) = cluster_ca::split_secure(token_file.trim()).expect("a K10 token");
    assert!(
        creds.starts_with("server:"),
        "credentials are server:<secret>"
    );
    hash.to_string()
}

#[test]
fn only_the_server_that_starts_the_cluster_gets_the_ca() {
    for rel in common::EXAMPLES {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        let key_bodies: Vec<String> = secrets
            .cluster_ca
            .files()
            .filter(|(n, _)| cluster_ca::is_key(n))
            .map(|(_, t)| t.lines().nth(1).unwrap().to_string())
            .collect();
        let mut seeded = 0;
        for node in &plan.nodes {
            let files = kiln::cli::render::render_node(&plan, &node.name, &secrets).unwrap();
            let has_key = files.tree.iter().any(|(_, e)| {
                matches!(e, Entry::File { content, .. }
                    if key_bodies.iter().any(|b| String::from_utf8_lossy(content).contains(b)))
            });
            if cluster_ca::seeds_ca(&plan, node) {
                seeded += 1;
                for (name, text) in secrets.cluster_ca.files() {
                    let path = format!("{SEED_DIR}/{name}");
                    assert_eq!(files.tree.text(&path), Some(text), "{rel}: {path}");
                }
            } else {
                assert!(!has_key, "{rel}: {} holds a CA key", node.name);
                assert!(
                    files.tree.iter().all(|(p, _)| !p.starts_with(SEED_DIR)),
                    "{rel}: {} has the CA seed",
                    node.name
                );
            }
        }
        assert_eq!(seeded, 1, "{rel}: one server starts the cluster");
    }
}

#[test]
fn the_token_names_the_seeded_server_ca_by_sha256sum() {
    assert!(
        common::have("sha256sum"),
        "`sha256sum` is missing: apt-get install coreutils"
    );
    for rel in common::EXAMPLES {
        let plan = common::load_example(rel);
        let secrets = common::fixed_secrets(&plan);
        let tmp = tempfile::tempdir().unwrap();
        let server = plan
            .nodes
            .iter()
            .find(|n| cluster_ca::seeds_ca(&plan, n))
            .unwrap();
        let files = kiln::cli::render::render_node(&plan, &server.name, &secrets).unwrap();
        let crt = tmp.path().join("server-ca.crt");
        std::fs::write(
            &crt,
            files
                .tree
                .text(&format!("{SEED_DIR}/server-ca.crt"))
                .unwrap(),
        )
        .unwrap();
        let out = Command::new("sha256sum").arg(&crt).output().unwrap();
        let sum = String::from_utf8(out.stdout).unwrap();
        let sum = sum.split_whitespace().next().unwrap().to_string();
        // Every node joins with the same token, naming that file.
        for node in &plan.nodes {
            let files = kiln::cli::render::render_node(&plan, &node.name, &secrets).unwrap();
            let token = files.tree.text(TOKEN_FILE).unwrap();
            assert_eq!(token_hash(token), sum, "{rel}: {}", node.name);
            assert!(token.trim().ends_with(common::GOLDEN_SECRET));
        }
    }
}

#[test]
fn the_seed_unit_runs_before_k3s_and_never_overwrites() {
    let plan = common::load_example("profiles/club.toml");
    let secrets = common::fixed_secrets(&plan);
    let server = plan
        .nodes
        .iter()
        .find(|n| cluster_ca::seeds_ca(&plan, n))
        .unwrap();
    let files = kiln::cli::render::render_node(&plan, &server.name, &secrets).unwrap();
    let unit = files
        .tree
        .text("/etc/systemd/system/kiln-k3s-ca.service")
        .unwrap();
    assert!(unit.contains("Before=k3s.service"), "{unit}");
    assert!(matches!(
        files
            .tree
            .get("/etc/systemd/system/k3s.service.requires/kiln-k3s-ca.service"),
        Some(Entry::Symlink { .. })
    ));
    let script = files.tree.text("/etc/kiln/k3s-ca.sh").unwrap();
    run_seed_script(script, &secrets.cluster_ca);
}

/// Run the seed script against a fake root: it copies the set with k3s's
/// modes, leaves it alone on the next boot, keeps a different set k3s
/// already has (and says so), and completes a half-copied one.
fn run_seed_script(script: &str, ca: &cluster_ca::ClusterCa) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("seed");
    let dst = tmp.path().join("tls");
    for (name, text) in ca.files() {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let script = script
        .replace(
            &format!("src={SEED_DIR}"),
            &format!("src={}", src.display()),
        )
        .replace(
            &format!("dst={}", kiln::render::k3s_ca::K3S_TLS_DIR),
            &format!("dst={}", dst.display()),
        );
    let run = || {
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let said = run();
    assert!(said.contains("put the cluster CA"), "{said}");
    for (name, text) in ca.files() {
        let p = dst.join(name);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text, "{name}");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            if cluster_ca::is_key(name) {
                0o600
            } else {
                0o644
            },
            "{name}"
        );
    }
    assert!(run().contains("is in place"));

    // Half copied: the rest is added.
    std::fs::remove_file(dst.join("service.key")).unwrap();
    assert!(run().contains("service.key"));
    assert!(dst.join("service.key").exists());

    // k3s's own CA: kept, and the console says so.
    std::fs::write(dst.join("server-ca.crt"), "k3s's own\n").unwrap();
    let said = run();
    assert!(said.contains("keeping k3s's"), "{said}");
    assert!(said.contains("server-ca.crt"), "{said}");
    assert_eq!(
        std::fs::read_to_string(dst.join("server-ca.crt")).unwrap(),
        "k3s's own\n"
    );
    assert!(!Path::new(&dst.join("server-ca.crt.kiln-new")).exists());
}

/// A small profile with `token` set under `[k3s]`.
fn plan_with_token(token: &str) -> Result<kiln::config::plan::Plan, String> {
    let text = format!(
        "[cluster]\nname = \"lab\"\n\n[k3s]\nversion = \"v1.31.1+k3s1\"\ntoken = \"{token}\"\n\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\nlan-address = \"192.168.1.11\"\n"
    );
    kiln::config::plan::plan_profile(Path::new("lab.toml"), &text).map_err(|e| e.to_string())
}

#[test]
fn a_secure_profile_token_must_name_the_ca_kiln_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let secret = "abcdef0123456789abcdef";
    let other = format!("K10{}::server:{secret}", "0".repeat(64));
    let plan = plan_with_token(&other).unwrap();
    // No CA yet: kiln would make one, which cannot have that hash.
    let err = kiln::config::secrets::check_profile_token(&plan, state)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lab.toml") && err.contains("`k3s.token`"),
        "{err}"
    );
    assert!(err.contains("fix:"), "{err}");
    assert!(!err.contains(secret), "the token is printed: {err}");

    let ca = kiln::config::ca_dir::load_or_create(state, false).unwrap();
    let err = kiln::config::secrets::check_profile_token(&plan, state)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&ca.server_ca_hash()), "{err}");
    assert!(err.contains("server-ca.crt"), "{err}");

    let right = cluster_ca::secure_token(&ca.server_ca_hash(), secret);
    let plan = plan_with_token(right.expose()).unwrap();
    kiln::config::secrets::check_profile_token(&plan, state).unwrap();
    let t = kiln::config::secrets::join_token(&plan, &ca, state, || unreachable!()).unwrap();
    assert_eq!(t, right);

    // A short profile token gets the prefix.
    let plan = plan_with_token(secret).unwrap();
    let t = kiln::config::secrets::join_token(&plan, &ca, state, || unreachable!()).unwrap();
    assert_eq!(t, right);
}

#[test]
fn a_malformed_k10_token_is_a_profile_error() {
    let err = plan_with_token("K10abc::server:abcdef0123456789").unwrap_err();
    assert!(err.contains("k3s.token"), "{err}");
    assert!(err.contains("not a secure token"), "{err}");
    // A token of another user (an agent-only `node:` token) cannot start a server.
    let node = format!("K10{}::node:abcdef0123456789", "a".repeat(64));
    let err = plan_with_token(&node).unwrap_err();
    assert!(err.contains("not a secure token"), "{err}");
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn b64(v: &serde_yaml::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

#[test]
fn the_kubeconfig_client_cert_verifies_against_the_client_ca() {
    assert!(
        common::have("openssl"),
        "`openssl` is missing: apt-get install --no-install-recommends openssl (scripts/setup does)"
    );
    let plan = common::load_example("profiles/club.toml");
    let ca = common::fixed_cluster_ca();
    let text =
        kiln::cli::kubeconfig::kubeconfig(&plan, &ca, time::OffsetDateTime::now_utc()).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(v["current-context"].as_str(), Some("club"));
    assert_eq!(
        v["contexts"][0]["context"]["cluster"].as_str(),
        Some("club")
    );
    let cluster = &v["clusters"][0]["cluster"];
    assert_eq!(
        b64(&cluster["certificate-authority-data"]),
        ca.server_ca_pem().as_bytes()
    );

    // The server address is in the tls-san of the server it names.
    let server = cluster["server"].as_str().unwrap();
    let host = server
        .strip_prefix("https://")
        .and_then(|s| s.strip_suffix(":6443"))
        .unwrap();
    let first = plan
        .nodes
        .iter()
        .find(|n| cluster_ca::seeds_ca(&plan, n))
        .unwrap();
    assert_eq!(
        Some(host.to_string()),
        first.wireguard_address.map(|a| a.to_string())
    );
    let secrets = common::fixed_secrets(&plan);
    let files = kiln::cli::render::render_node(&plan, &first.name, &secrets).unwrap();
    let config: serde_yaml::Value =
        serde_yaml::from_str(files.tree.text("/etc/rancher/k3s/config.yaml").unwrap()).unwrap();
    let sans: Vec<&str> = config["tls-san"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(sans.contains(&host), "{host} not in {sans:?}");

    let tmp = tempfile::tempdir().unwrap();
    let user = &v["users"][0]["user"];
    let cert = tmp.path().join("admin.crt");
    let key = tmp.path().join("admin.key");
    let client_ca = tmp.path().join("client-ca.crt");
    std::fs::write(&cert, b64(&user["client-certificate-data"])).unwrap();
    std::fs::write(&key, b64(&user["client-key-data"])).unwrap();
    std::fs::write(&client_ca, ca.client_ca_pem()).unwrap();
    let (cert, key, client_ca) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        client_ca.to_str().unwrap(),
    );
    let verified = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        client_ca,
        cert,
    ]);
    assert!(verified.contains(": OK"), "{verified}");
    let subject = openssl(&[
        "x509", "-in", cert, "-noout", "-subject", "-nameopt", "RFC2253",
    ]);
    assert_eq!(subject.trim(), "subject=CN=system:admin,O=system:masters");
    // The key is the certificate's.
    assert_eq!(
        openssl(&["x509", "-in", cert, "-noout", "-pubkey"]),
        openssl(&["pkey", "-in", key, "-pubout"])
    );
    // And the server CA does not vouch for it.
    let server_ca = tmp.path().join("server-ca.crt");
    std::fs::write(&server_ca, ca.server_ca_pem()).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", server_ca.to_str().unwrap(), cert])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn kiln_kubeconfig_writes_0600_reuses_the_ca_and_asks_before_replacing() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let profile = tmp.path().join("club.toml");
    std::fs::copy(common::repo().join("profiles/club.toml"), &profile).unwrap();
    let kiln = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("kubeconfig")
            .arg(&profile)
            .args(args)
            .output()
            .unwrap()
    };
    // Before any build there is no CA, and kubeconfig makes none.
    let out = kiln(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("club.state") && err.contains("fix:"), "{err}");
    assert!(!tmp.path().join("club.state/k3s-ca").exists());
    // `kiln keys` loads (and so makes) every secret, as a build does.
    let keys = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("keys")
        .arg(&profile)
        .output()
        .unwrap();
    assert!(
        keys.status.success(),
        "{}",
        String::from_utf8_lossy(&keys.stderr)
    );
    let out = kiln(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = tmp.path().join("club.kubeconfig");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        written.to_str().unwrap()
    );
    let mode = std::fs::metadata(&written).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let ca_file = tmp.path().join("club.state/k3s-ca/server-ca.crt");
    let ca_before = std::fs::read(&ca_file).unwrap();
    let first = std::fs::read(&written).unwrap();

    let out = kiln(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("club.kubeconfig exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&written).unwrap(), first);

    let out = kiln(&["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(std::fs::read(&written).unwrap(), first, "a new client key");
    assert_eq!(
        std::fs::read(&ca_file).unwrap(),
        ca_before,
        "the CA is reused"
    );

    let out = kiln(&["--out", "-"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("current-context: \"club\""));
}
