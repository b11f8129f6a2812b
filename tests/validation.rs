//! Validation: one test per kind of mistake, each asserting the message,
//! the key and the line, and a profile with ten mistakes reporting ten.

use std::path::Path;

use kiln::config::diag::Diagnostic;

#[path = "validation/manifests.rs"]
mod manifests;
#[path = "validation/transport.rs"]
mod transport;

/// A small valid profile; tests replace parts of it.
const GOOD: &str = r#"[cluster]
name = "lab"

[k3s]
version = "v1.31.1+k3s1"

[wireguard]
network = "10.0.0.0/24"

[[nodes]]
name = "s1"
role = "server"
mac = "52:54:00:00:00:01"
wireguard-address = "10.0.0.11"

[[nodes]]
name = "a1"
role = "agent"
mac = "52:54:00:00:00:02"
wireguard-address = "10.0.0.12"
"#;

fn errors(text: &str) -> Vec<Diagnostic> {
    match kiln::config::plan::plan_profile(Path::new("lab.toml"), text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

/// Replace `from` (which must occur) in the good profile.
fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "test bug: {from:?} not in GOOD");
    GOOD.replacen(from, to, 1)
}

/// Exactly one error, on `line`, whose key and message contain the given text.
#[track_caller]
fn one(text: &str, line: usize, key: &str, message: &str) -> Diagnostic {
    let errs = errors(text);
    assert_eq!(
        errs.len(),
        1,
        "expected one error, got:\n{}",
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.file, "lab.toml");
    assert_eq!(e.line, line, "{e}");
    assert!(e.key.contains(key), "key {:?} lacks {key:?}: {e}", e.key);
    assert!(
        e.message.contains(message),
        "message lacks {message:?}: {e}"
    );
    assert!(!e.hint.is_empty(), "no fix given: {e}");
    e
}

#[test]
fn good_profile_passes() {
    assert!(errors(GOOD).is_empty());
}

#[test]
fn toml_syntax() {
    let e = errors(&with("name = \"lab\"", "name = \"lab"));
    assert!(!e.is_empty());
    assert_eq!(e[0].line, 2, "{}", e[0]);
    assert!(e[0].message.starts_with("TOML syntax"), "{}", e[0]);
}

#[test]
fn unknown_key_suggests_the_right_one() {
    let e = one(
        &with(
            "mac = \"52:54:00:00:00:02\"",
            "mac-address = \"52:54:00:00:00:02\"",
        ),
        19,
        "nodes[1].mac-address",
        "unknown key",
    );
    assert!(e.hint.contains("`mac`"), "{e}");
    let e = one(
        &with("[wireguard]", "[wireguard]\nlisten_port = 51830"),
        8,
        "wireguard.listen_port",
        "unknown key",
    );
    assert!(e.hint.contains("listen-port"), "{e}");
}

#[test]
fn wrong_type() {
    one(
        &with("[wireguard]", "[wireguard]\nlisten-port = \"51830\""),
        8,
        "wireguard.listen-port",
        "expected an integer, found a string",
    );
}

#[test]
fn duplicate_node_name() {
    one(
        &with("name = \"a1\"", "name = \"s1\""),
        17,
        "nodes[1].name",
        "already used",
    );
}

#[test]
fn duplicate_mac() {
    one(
        &with("52:54:00:00:00:02", "52:54:00:00:00:01"),
        19,
        "nodes[1].mac",
        "already used by nodes[0].mac",
    );
}

#[test]
fn duplicate_wireguard_address() {
    one(
        &with("10.0.0.12", "10.0.0.11"),
        20,
        "nodes[1].wireguard-address",
        "already used",
    );
}

#[test]
fn address_outside_network() {
    one(
        &with("10.0.0.12", "10.0.1.12"),
        20,
        "nodes[1].wireguard-address",
        "outside the WireGuard network 10.0.0.0/24",
    );
}

#[test]
fn network_and_broadcast_addresses() {
    one(
        &with("10.0.0.12", "10.0.0.0"),
        20,
        "wireguard-address",
        "network address",
    );
    one(
        &with("10.0.0.12", "10.0.0.255"),
        20,
        "wireguard-address",
        "broadcast address",
    );
}

#[test]
fn invalid_cidr() {
    one(
        &with("10.0.0.0/24", "10.0.0.0/33"),
        8,
        "wireguard.network",
        "not a CIDR",
    );
}

#[test]
fn invalid_ip() {
    one(
        &with("10.0.0.12", "10.0.0.300"),
        20,
        "wireguard-address",
        "not an IP address",
    );
}

#[test]
fn invalid_mac() {
    one(
        &with("52:54:00:00:00:02", "52:54:00:00:02"),
        19,
        "nodes[1].mac",
        "not a MAC address",
    );
}

#[test]
fn invalid_port() {
    one(
        &with("[wireguard]", "[wireguard]\nlisten-port = 70000"),
        8,
        "wireguard.listen-port",
        "not a port number",
    );
    one(
        &with(
            "[wireguard]",
            "[firewall]\nallow-tcp = [22, 0]\n\n[wireguard]",
        ),
        8,
        "firewall.allow-tcp[1]",
        "not a port number",
    );
}

#[test]
fn invalid_hostname() {
    one(
        &with("name = \"a1\"", "name = \"a_1\""),
        17,
        "nodes[1].name",
        "not a valid host name",
    );
    one(
        &with("name = \"a1\"", "name = \"a1\"\nhostname = \"-bad\""),
        18,
        "nodes[1].hostname",
        "not a valid host name",
    );
}

#[test]
fn no_server() {
    one(
        &with("role = \"server\"", "role = \"agent\""),
        10,
        "nodes",
        "no node has `role = \"server\"`",
    );
}

#[test]
fn agent_with_no_server_to_join() {
    // Without WireGuard the agent joins the server's LAN address: there is none.
    let text = with(
        "[wireguard]\nnetwork = \"10.0.0.0/24\"",
        "[wireguard]\nenabled = false\nnetwork = \"10.0.0.0/24\"",
    );
    one(&text, 17, "nodes[1]", "agent `a1` has no server to join");
}

#[test]
fn k3s_version_must_be_a_release_tag() {
    let e = one(
        &with("v1.31.1+k3s1", "latest"),
        5,
        "k3s.version",
        "not a k3s release tag",
    );
    assert!(e.hint.contains("v1.31.1+k3s1"));
    one(
        &with("v1.31.1+k3s1", "1.31.1"),
        5,
        "k3s.version",
        "not a k3s release tag",
    );
}

#[test]
fn cmdline_items_that_would_break_the_boot_entry() {
    one(
        &with(
            "[wireguard]",
            "[boot]\ncmdline = [\"pcie_aspm=off quiet\"]\n\n[wireguard]",
        ),
        8,
        "boot.cmdline[0]",
        "contains ' '",
    );
    one(
        &with(
            "[wireguard]",
            "[boot]\ncmdline = [\"a=\\\"b\\\"\"]\n\n[wireguard]",
        ),
        8,
        "boot.cmdline[0]",
        "contains '\"'",
    );
    one(
        &with(
            "[wireguard]",
            "[boot]\ncmdline = [\"a\\tb\"]\n\n[wireguard]",
        ),
        8,
        "boot.cmdline[0]",
        "contains",
    );
}

#[test]
fn external_peer_key_must_be_32_bytes() {
    let text = format!(
        "{GOOD}\n[[wireguard.peers]]\nname = \"vps\"\npublic-key = \"AAAAAAAA\"\naddress = \"10.0.0.1\"\n"
    );
    one(
        &text,
        24,
        "wireguard.peers[0].public-key",
        "6 bytes, not 32",
    );
}

#[test]
fn missing_required_keys() {
    one(
        &GOOD.replace("version = \"v1.31.1+k3s1\"\n", ""),
        1,
        "k3s.version",
        "missing required key",
    );
    one(
        &with("wireguard-address = \"10.0.0.12\"\n", ""),
        16,
        "nodes[1].wireguard-address",
        "no WireGuard address",
    );
}

#[test]
fn hub_must_exist() {
    one(
        &with(
            "network = \"10.0.0.0/24\"",
            "network = \"10.0.0.0/24\"\ntopology = \"hub\"\nhub = \"nowhere\"",
        ),
        10,
        "wireguard.hub",
        "neither an external peer nor a node",
    );
}

#[test]
fn tunnel_port_must_not_clash_with_flannel() {
    one(
        &with("[wireguard]", "[wireguard]\nlisten-port = 51820"),
        8,
        "wireguard.listen-port",
        "flannel",
    );
}

#[test]
fn write_files_must_be_on_writable_paths() {
    let text = format!(
        "{GOOD}\n[[first-boot.write-files]]\npath = \"/usr/local/bin/x\"\ncontent = \"x\"\n"
    );
    one(
        &text,
        23,
        "first-boot.write-files[0].path",
        "not a file under /etc or /var",
    );
}

#[test]
fn ten_mistakes_make_ten_errors() {
    let text = r#"[cluster]
name = "lab"
colour = "blue"

[k3s]
version = "v1.31"
disable = ["traefik", "nginx"]

[boot]
cmdline = ["quiet splash"]

[wireguard]
network = "10.0.0.0/24"
listen-port = "x"

[[wireguard.peers]]
name = "vps"
public-key = "tooshort"
address = "10.0.0.1"

[[nodes]]
name = "s1"
role = "server"
mac = "52:54:00:00:00:01"
wireguard-address = "10.0.0.11"

[[nodes]]
name = "s1"
role = "agent"
mac = "52:54:00:00:00:01"
wireguard-address = "10.9.0.12"

[[nodes]]
name = "a2"
role = "agnet"
wireguard-address = "10.0.0.13"
"#;
    let errs = errors(text);
    let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(
        lines,
        vec![3, 6, 7, 10, 14, 18, 28, 30, 31, 35],
        "{}",
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for e in &errs {
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("lab.toml:{}:", e.line)),
            "{shown}"
        );
        assert!(shown.contains("fix: "), "{shown}");
    }
}

#[test]
fn write_files_may_not_replace_what_kiln_renders() {
    let text =
        format!("{GOOD}\n[[first-boot.write-files]]\npath = \"/etc/hostname\"\ncontent = \"x\"\n");
    one(
        &text,
        23,
        "first-boot.write-files[0].path",
        "rendered by kiln",
    );
    // The seeded SSH host key (and any other type's) is the node's identity.
    for key in [
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_rsa_key.pub",
    ] {
        let text =
            format!("{GOOD}\n[[first-boot.write-files]]\npath = \"{key}\"\ncontent = \"x\"\n");
        one(
            &text,
            23,
            "first-boot.write-files[0].path",
            "rendered by kiln",
        );
    }
    let ok = format!(
        "{GOOD}\n[[first-boot.write-files]]\npath = \"/etc/hosts.allow\"\ncontent = \"x\"\n"
    );
    assert!(errors(&ok).is_empty());
}

#[test]
fn label_values_are_checked() {
    one(
        &with(
            "name = \"a1\"",
            "name = \"a1\"\nlabels = { \"kiln.dev/gpu\" = \"two words\" }",
        ),
        18,
        "nodes[1].labels",
        "not a Kubernetes label value",
    );
}

#[test]
fn sysctl_values_are_one_line() {
    let text =
        format!("{GOOD}\n[first-boot.sysctl]\n\"vm.max_map_count\" = \"1\\nkernel.x = 2\"\n");
    one(&text, 23, "first-boot.sysctl", "control character");
}

#[test]
fn keepalive_zero_means_off() {
    assert!(
        errors(&with(
            "[wireguard]",
            "[wireguard]\npersistent-keepalive = 0"
        ))
        .is_empty()
    );
    one(
        &with("[wireguard]", "[wireguard]\npersistent-keepalive = -1"),
        8,
        "wireguard.persistent-keepalive",
        "not a keepalive interval",
    );
}

#[test]
fn joiners_join_the_cluster_init_server() {
    // Three servers, cluster-init on the last: the others join it, not the first.
    let text = with("role = \"agent\"", "role = \"server\"")
        + "\n[[nodes]]\nname = \"s3\"\nrole = \"server\"\ncluster-init = true\nmac = \"52:54:00:00:00:03\"\nwireguard-address = \"10.0.0.13\"\n";
    let plan = kiln::config::plan::plan_profile(Path::new("lab.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    for n in ["s1", "a1"] {
        assert_eq!(
            plan.join_url(plan.node(n).unwrap()).as_deref(),
            Some("https://10.0.0.13:6443"),
            "{n}"
        );
    }
    assert_eq!(plan.join_url(plan.node("s3").unwrap()), None);
}

#[test]
fn a_hostname_taken_by_another_nodes_name_is_an_error() {
    one(
        &with("name = \"s1\"", "name = \"s1\"\nhostname = \"a1\""),
        18,
        "nodes[1].name",
        "already used by nodes[0].hostname",
    );
}

// ---- issue #11: hostile input

fn write_file(path: &str) -> String {
    format!("{GOOD}\n[[first-boot.write-files]]\npath = \"{path}\"\ncontent = \"x\"\n")
}

#[test]
fn write_file_paths_must_be_in_normal_form() {
    let e = one(
        &write_file("/etc//wireguard/wg0.conf"),
        23,
        "first-boot.write-files[0].path",
        "empty, `.` or `..` component",
    );
    assert!(e.hint.contains("/etc/wireguard/wg0.conf"), "{e}");
    one(
        &write_file("/etc/./motd"),
        23,
        "first-boot.write-files[0].path",
        "component",
    );
    one(
        &write_file("etc/motd"),
        23,
        "first-boot.write-files[0].path",
        "not absolute",
    );
}

#[test]
fn write_file_paths_with_nul_or_newline_are_refused() {
    for p in [r"/etc/motd\u0000x", r"/etc/mo\ntd"] {
        let e = one(
            &write_file(p),
            23,
            "first-boot.write-files[0].path",
            "control character",
        );
        assert!(!e.to_string().contains('\0'), "{e}");
    }
}

#[test]
fn two_write_files_with_one_path_name_both_lines() {
    let text = write_file("/etc/motd")
        + "\n[[first-boot.write-files]]\npath = \"/etc/motd\"\ncontent = \"y\"\n";
    let e = one(
        &text,
        27,
        "first-boot.write-files[1].path",
        "already written by first-boot.write-files[0].path (line 23)",
    );
    assert!(e.hint.contains("line 23"), "{e}");
}

#[test]
fn sysctl_names_cannot_leave_proc_sys() {
    for name in ["../../etc/x", "net..ipv4", "/etc/x", "net/../../x", ".net"] {
        let text = format!("{GOOD}\n[first-boot.sysctl]\n\"{name}\" = 1\n");
        one(&text, 23, "first-boot.sysctl", "not a sysctl name");
    }
    // Dotted names, globs, and the `/` form sysctl.d allows (VLAN interfaces).
    let ok = format!(
        "{GOOD}\n[first-boot.sysctl]\n\"net.ipv4.conf.*.rp_filter\" = 1\n\"net/ipv4/conf/eth0.100/rp_filter\" = 1\n\"-vm.swappiness\" = 1\n"
    );
    assert!(errors(&ok).is_empty(), "{:?}", errors(&ok));
}

#[test]
fn all_zero_broadcast_and_multicast_macs_are_refused() {
    for (mac, why) in [
        ("00:00:00:00:00:00", "all-zero"),
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
        ("01:00:5e:00:00:01", "multicast"),
    ] {
        one(&with("52:54:00:00:00:02", mac), 19, "nodes[1].mac", why);
    }
}

#[test]
fn an_integer_too_big_for_any_type_says_out_of_range() {
    let text =
        format!("{GOOD}\n[[first-boot.users]]\nname = \"club\"\nuid = 99999999999999999999\n");
    let e = one(
        &text,
        24,
        "first-boot.users[0].uid",
        "99999999999999999999 is out of range",
    );
    assert!(e.message.contains("1000 to 59999"), "{e}");
    one(
        &with(
            "[wireguard]",
            "[wireguard]\nlisten-port = -99999999999999999999",
        ),
        8,
        "wireguard.listen-port",
        "takes 1 to 65535",
    );
}

#[test]
fn a_missing_bracket_gives_one_error_on_its_line() {
    let text = with(
        "version = \"v1.31.1+k3s1\"",
        "version = \"v1.31.1+k3s1\"\ndisable = [\"traefik\"",
    );
    let e = one(&text, 6, "", "TOML syntax");
    assert!(e.message.contains("not closed"), "{e}");
    // A header missing its `]`: one error, no "missing required key".
    let e = one(
        &with("[[nodes]]\nname = \"a1\"", "[[nodes]\nname = \"a1\""),
        16,
        "",
        "TOML syntax",
    );
    assert!(!e.message.contains("nodes`"), "{e}");
}

#[test]
fn a_bad_hub_peer_key_is_the_only_error() {
    let text = with(
        "network = \"10.0.0.0/24\"",
        "network = \"10.0.0.0/24\"\ntopology = \"hub\"\nhub = \"vps\"",
    ) + "\n[[wireguard.peers]]\nname = \"vps\"\npublic-key = \"AAAAAAAA\"\nendpoint = \"vps.example.org:51830\"\naddress = \"10.0.0.1\"\n";
    one(
        &text,
        26,
        "wireguard.peers[0].public-key",
        "not a WireGuard key",
    );
}

#[test]
fn a_misspelt_role_is_the_only_error() {
    one(
        &with("role = \"server\"", "role = \"sever\""),
        12,
        "nodes[0].role",
        "unknown role",
    );
}

#[test]
fn control_characters_from_the_profile_are_not_echoed_raw() {
    let errs = errors(&with(
        "name = \"a1\"",
        r#"name = "\u001b]0;owned\u0007\u001b[2J""#,
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    let shown = errs[0].to_string();
    assert!(
        !shown.chars().any(|c| c.is_control() && c != '\n'),
        "{shown:?}"
    );
    assert!(shown.contains(r"\u{1b}[2J"), "{shown}");
}

#[test]
fn ten_thousand_bad_nodes_give_ten_thousand_located_errors() {
    let mut text = GOOD.to_string();
    for i in 0..10_000 {
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"n{i}\"\nrole = \"agent\"\nmac = \"00:00:00:00:00:00\"\nwireguard-address = \"10.0.0.12\"\n"
        ));
    }
    let errs = errors(&text);
    // Per node: an all-zero MAC and an address already used by a1.
    assert_eq!(errs.len(), 20_000);
    let base = GOOD.lines().count() + 1;
    for (i, pair) in errs.chunks(2).enumerate() {
        let first = base + 6 * i + 3;
        assert_eq!(pair[0].line, first + 1, "{}", pair[0]);
        assert!(pair[0].message.contains("all-zero"), "{}", pair[0]);
        assert_eq!(pair[1].line, first + 2, "{}", pair[1]);
    }
}

/// `plan::load`'s error as shown to the user, run on a thread so a hang
/// (a FIFO opened for reading) fails the test instead of blocking it.
fn load_error(path: &Path) -> String {
    let path = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(kiln::config::plan::load(&path).map(|_| ()));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("loading the profile hung");
    format!("{:#}", r.expect_err("loaded"))
}

#[test]
fn a_fifo_as_the_profile_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("lab.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = load_error(&fifo);
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    assert!(err.contains("fix:"), "{err}");
}

#[test]
fn a_device_as_the_profile_is_refused() {
    let err = load_error(Path::new("/dev/zero"));
    assert!(err.contains("is a device, not a regular file"), "{err}");
}

#[test]
fn a_profile_over_the_size_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("lab.toml");
    let big = format!(
        "{GOOD}#{}\n",
        "x".repeat(kiln::config::plan::MAX_PROFILE_BYTES as usize)
    );
    std::fs::write(&p, big).unwrap();
    let err = load_error(&p);
    assert!(err.contains("larger than 4 MiB"), "{err}");
    // Exactly at the limit is still read.
    let at = format!("{GOOD}#");
    let pad = kiln::config::plan::MAX_PROFILE_BYTES as usize - at.len();
    std::fs::write(&p, format!("{at}{}", "x".repeat(pad))).unwrap();
    kiln::config::plan::load(&p).unwrap();
}

#[test]
fn invalid_utf8_is_reported_at_its_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("lab.toml");
    let mut bytes = GOOD
        .replacen("name = \"a1\"", "name = \"é\u{1}", 1)
        .into_bytes();
    let at = bytes.iter().position(|&b| b == 1).unwrap();
    bytes[at] = 0xff;
    std::fs::write(&p, bytes).unwrap();
    let err = load_error(&p);
    assert!(err.contains("lab.toml:17:10:"), "{err}");
    assert!(err.contains("0xff"), "{err}");
    assert!(err.contains("fix:"), "{err}");
}

// ---------------------------------------------------------------------------
// Power and install keys of a node (issue 13): `allow-suspend`,
// `install-device`, `after-install`.

/// The good profile with `keys` added to node a1 (from line 21 on).
fn a1_with(keys: &str) -> String {
    with(
        "wireguard-address = \"10.0.0.12\"",
        &format!("wireguard-address = \"10.0.0.12\"\n{keys}"),
    )
}

#[test]
fn power_and_install_keys_pass() {
    let text = a1_with(
        "allow-suspend = true\ninstall-device = \"/dev/disk/by-id/nvme-Samsung_SSD_980_S64DNX0R123456\"\nafter-install = \"reboot\"",
    );
    let plan = kiln::config::plan::plan_profile(Path::new("lab.toml"), &text).unwrap();
    let a1 = plan.node("a1").unwrap();
    assert!(a1.allow_suspend);
    let install = a1.install.as_ref().unwrap();
    assert_eq!(
        install.device.as_str(),
        "/dev/disk/by-id/nvme-Samsung_SSD_980_S64DNX0R123456"
    );
    assert_eq!(install.after.as_str(), "reboot");
    // Defaults: stay awake, no install; an install powers off.
    let s1 = plan.node("s1").unwrap();
    assert!(!s1.allow_suspend);
    assert!(s1.install.is_none());
    let plan = kiln::config::plan::plan_profile(
        Path::new("lab.toml"),
        &a1_with("install-device = \"/dev/nvme0n1\""),
    )
    .unwrap();
    let install = plan.node("a1").unwrap().install.clone().unwrap();
    assert_eq!(install.after.as_str(), "poweroff");
    assert_eq!(install.key, "nodes[1].install-device");
}

#[test]
fn allow_suspend_is_a_boolean() {
    one(
        &a1_with("allow-suspend = \"yes\""),
        21,
        "nodes[1].allow-suspend",
        "expected true or false, found a string",
    );
}

#[test]
fn install_device_must_be_a_device_path() {
    for (value, message) in [
        ("nvme0n1", "not a path under /dev/"),
        ("/mnt/usb", "not a path under /dev/"),
        ("/dev/../etc/passwd", "`..`"),
        ("/dev/disk/by-id/nvme Samsung", "contains ' '"),
        ("/dev/", "empty"),
    ] {
        let e = one(
            &a1_with(&format!("install-device = \"{value}\"")),
            21,
            "nodes[1].install-device",
            message,
        );
        assert!(e.hint.contains("/dev/disk/by-id/"), "{e}");
    }
    one(
        &a1_with("install-device = 0"),
        21,
        "nodes[1].install-device",
        "expected a string, found an integer",
    );
}

#[test]
fn after_install_is_poweroff_or_reboot() {
    let e = one(
        &a1_with("install-device = \"/dev/sda\"\nafter-install = \"halt\""),
        22,
        "nodes[1].after-install",
        "unknown after-install action `halt`",
    );
    assert!(
        e.hint.contains("\"poweroff\"") && e.hint.contains("\"reboot\""),
        "{e}"
    );
}

#[test]
fn after_install_needs_install_device() {
    let e = one(
        &a1_with("after-install = \"reboot\""),
        21,
        "nodes[1].after-install",
        "`install-device` is not",
    );
    assert!(e.hint.contains("add `install-device"), "{e}");
    assert!(e.hint.contains("remove `after-install`"), "{e}");
}

#[test]
fn unknown_power_keys_suggest_the_right_one() {
    for (wrong, right) in [
        ("allow_suspend = true", "`allow-suspend`"),
        ("install_device = \"/dev/sda\"", "`install-device`"),
        ("instal-device = \"/dev/sda\"", "`install-device`"),
        ("after-instal = \"reboot\"", "`after-install`"),
    ] {
        let e = one(&a1_with(wrong), 21, "nodes[1].", "unknown key");
        assert!(e.hint.contains(right), "{wrong}: {e}");
    }
}

#[test]
fn write_files_may_not_replace_the_stay_awake_files() {
    for path in [
        "/etc/systemd/system/suspend.target",
        "/etc/systemd/logind.conf.d/kiln-stay-awake.conf",
        "/etc/kiln/install",
    ] {
        let text =
            format!("{GOOD}\n[[first-boot.write-files]]\npath = \"{path}\"\ncontent = \"x\"\n");
        let e = one(
            &text,
            23,
            "first-boot.write-files[0].path",
            "rendered by kiln",
        );
        assert!(e.hint.contains("allow-suspend"), "{e}");
    }
}

/// An operator's entry of `body`, added to the good profile with an
/// endpoint on s1 (in a mesh the operator dials the nodes that have one).
/// `[[operators]]` is on line 23, its keys on 24 and 25.
fn with_operator(body: &str) -> String {
    let s1_reachable = with(
        "mac = \"52:54:00:00:00:01\"",
        "mac = \"52:54:00:00:00:01\"\nlan-address = \"192.168.1.11\"",
    );
    format!("{s1_reachable}\n[[operators]]\n{body}\n")
}

const OPERATOR: &str = "name = \"alice-laptop\"\nwireguard-address = \"10.0.0.200\"";

#[test]
fn an_operator_with_a_name_and_an_address_passes() {
    assert!(errors(&with_operator(OPERATOR)).is_empty());
}

#[test]
fn operator_names_are_unique_among_nodes_peers_and_operators() {
    one(
        &with_operator("name = \"a1\"\nwireguard-address = \"10.0.0.200\""),
        24,
        "operators[0].name",
        "already used by a node, peer or operator",
    );
    let twice = format!(
        "{OPERATOR}\n[[operators]]\nname = \"alice-laptop\"\nwireguard-address = \"10.0.0.201\""
    );
    one(
        &with_operator(&twice),
        27,
        "operators[1].name",
        "already used",
    );
    let peer = "name = \"vps\"\nwireguard-address = \"10.0.0.200\"\n\n[[wireguard.peers]]\nname = \"vps\"\npublic-key = \"in8aLqpdujLG8XAFqR8Hys5zP2Uu4hNoUkomX1oX1X4=\"\naddress = \"10.0.0.1\"";
    one(
        &with_operator(peer),
        24,
        "operators[0].name",
        "already used",
    );
}

#[test]
fn an_operator_address_is_inside_the_tunnel_and_its_own() {
    one(
        &with_operator("name = \"alice-laptop\"\nwireguard-address = \"10.1.0.200\""),
        25,
        "operators[0].wireguard-address",
        "outside the WireGuard network 10.0.0.0/24",
    );
    let e = one(
        &with_operator("name = \"alice-laptop\"\nwireguard-address = \"10.0.0.12\""),
        25,
        "operators[0].wireguard-address",
        "already used by node `a1`",
    );
    assert!(e.hint.contains("address"), "{e}");
    one(
        &with_operator("name = \"alice-laptop\"\nwireguard-address = \"10.0.0.255\""),
        25,
        "operators[0].wireguard-address",
        "broadcast address",
    );
    let twice =
        format!("{OPERATOR}\n[[operators]]\nname = \"bob\"\nwireguard-address = \"10.0.0.200\"");
    one(
        &with_operator(&twice),
        28,
        "operators[1].wireguard-address",
        "already used by operator `alice-laptop`",
    );
}

#[test]
fn an_operator_needs_wireguard() {
    let off = GOOD
        .replace("[wireguard]\nnetwork = \"10.0.0.0/24\"\n", "")
        .replace(
            "wireguard-address = \"10.0.0.11\"\n",
            "lan-address = \"192.168.1.11\"\n",
        )
        .replace("wireguard-address = \"10.0.0.12\"\n", "");
    assert!(errors(&off).is_empty(), "test bug: {:?}", errors(&off));
    let text = format!("{off}\n[[operators]]\n{OPERATOR}\n");
    let line = text.lines().position(|l| l == "[[operators]]").unwrap() + 1;
    let e = one(&text, line, "operators[0]", "WireGuard is off");
    assert!(e.hint.contains("[wireguard]"), "{e}");
}

#[test]
fn an_operator_needs_its_name_and_address() {
    one(
        &with_operator("wireguard-address = \"10.0.0.200\""),
        23,
        "operators[0].name",
        "missing required key `name`",
    );
    one(
        &with_operator("name = \"alice-laptop\""),
        23,
        "operators[0].wireguard-address",
        "missing required key `wireguard-address`",
    );
    // A misspelt key: unknown, with the right one suggested (and missing).
    let errs = errors(&with_operator(
        "name = \"alice-laptop\"\naddress = \"10.0.0.200\"",
    ));
    let e = errs
        .iter()
        .find(|e| e.key == "operators[0].address")
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(e.line, 25, "{e}");
    assert!(e.message.contains("unknown key"), "{e}");
    assert!(e.hint.contains("wireguard-address"), "{e}");
}

#[test]
fn an_operator_in_a_mesh_needs_a_node_to_dial() {
    let text = format!("{GOOD}\n[[operators]]\n{OPERATOR}\n");
    let e = one(&text, 22, "operators[0]", "no node has an endpoint");
    assert!(e.hint.contains("endpoint"), "{e}");
}

/// GOOD behind an external hub `vps`, with extra lines after each node's MAC.
fn behind_hub(s1: &str, a1: &str) -> String {
    with(
        "network = \"10.0.0.0/24\"",
        "network = \"10.0.0.0/24\"\ntopology = \"hub\"\nhub = \"vps\"",
    )
    .replace(
        "mac = \"52:54:00:00:00:01\"",
        &format!("mac = \"52:54:00:00:00:01\"\n{s1}"),
    )
    .replace(
        "mac = \"52:54:00:00:00:02\"",
        &format!("mac = \"52:54:00:00:00:02\"\n{a1}"),
    ) + "\n[[wireguard.peers]]\nname = \"vps\"\npublic-key = \"in8aLqpdujLG8XAFqR8Hys5zP2Uu4hNoUkomX1oX1X4=\"\nendpoint = \"hub.example.org:51820\"\naddress = \"10.0.0.1\"\n"
}

/// The 1-based line of the last occurrence of `needle`.
fn line_of_last(text: &str, needle: &str) -> usize {
    text[..text.rfind(needle).unwrap()].lines().count() + 1
}

#[test]
fn nodes_sharing_a_site_with_lan_addresses_pass() {
    let text = behind_hub(
        "site = \"campus\"\nlan-address = \"192.168.1.11\"",
        "site = \"campus\"\nendpoint = \"a1.campus.example:51830\"",
    );
    assert!(errors(&text).is_empty(), "{:?}", errors(&text));
}

#[test]
fn a_node_sharing_a_site_needs_a_lan_address() {
    let text = behind_hub(
        "site = \"campus\"\nlan-address = \"192.168.1.11\"",
        "site = \"campus\"",
    );
    let e = one(
        &text,
        line_of_last(&text, "site = "),
        "nodes[1].lan-address",
        "node `a1` shares site `campus` with s1 but has no LAN address",
    );
    assert!(e.hint.contains("lan-address = "), "{e}");
}

#[test]
fn a_node_alone_in_its_site_needs_no_lan_address() {
    let text = behind_hub("site = \"campus\"", "site = \"home\"");
    assert!(errors(&text).is_empty(), "{:?}", errors(&text));
}

#[test]
fn a_site_in_a_mesh_is_an_error() {
    let text = with(
        "mac = \"52:54:00:00:00:02\"",
        "mac = \"52:54:00:00:00:02\"\nsite = \"campus\"",
    );
    let e = one(&text, 20, "nodes[1].site", "the topology is mesh");
    assert!(e.hint.contains("topology = \"hub\""), "{e}");
}

#[test]
fn a_site_without_wireguard_is_an_error() {
    let text = with(
        "network = \"10.0.0.0/24\"",
        "network = \"10.0.0.0/24\"\nenabled = false",
    )
    .replace(
        "mac = \"52:54:00:00:00:01\"",
        "mac = \"52:54:00:00:00:01\"\nsite = \"campus\"\nlan-address = \"192.168.1.11\"",
    );
    one(&text, 15, "nodes[0].site", "WireGuard is off");
}

#[test]
fn a_site_name_is_one_label() {
    let text = behind_hub("site = \"the campus\"", "");
    one(
        &text,
        line_of_last(&text, "site = "),
        "nodes[0].site",
        "not a site name",
    );
}

#[test]
fn a_hub_node_in_a_site_needs_an_endpoint_for_other_sites() {
    let text = with(
        "network = \"10.0.0.0/24\"",
        "network = \"10.0.0.0/24\"\ntopology = \"hub\"\nhub = \"s1\"",
    )
    .replace(
        "mac = \"52:54:00:00:00:01\"",
        "mac = \"52:54:00:00:00:01\"\nlan-address = \"192.168.1.11\"\nsite = \"campus\"",
    )
    .replace(
        "mac = \"52:54:00:00:00:02\"",
        "mac = \"52:54:00:00:00:02\"\nsite = \"home\"",
    );
    let e = one(
        &text,
        line_of_last(&text, "site = \"campus\""),
        "nodes[0].endpoint",
        "nodes of other sites (a1) cannot dial its LAN address",
    );
    assert!(e.hint.contains("endpoint = "), "{e}");
    let fixed = text.replace(
        "site = \"campus\"",
        "site = \"campus\"\nendpoint = \"lab.example.org:51830\"",
    );
    assert!(errors(&fixed).is_empty(), "{:?}", errors(&fixed));
}

#[test]
fn base_max_age_is_days_or_hours() {
    let text = format!("{GOOD}\n[base]\nmax-age = \"30 days\"\n");
    let e = one(
        &text,
        line_of_last(&text, "max-age"),
        "base.max-age",
        "`30 days` has no unit (d or h)",
    );
    assert_eq!(e.file, "lab.toml");
    assert!(e.hint.contains("\"30d\""), "{e}");
    let text = format!("{GOOD}\n[base]\nmax-age = \"0d\"\n");
    let e = one(
        &text,
        line_of_last(&text, "max-age"),
        "base.max-age",
        "every build",
    );
    assert!(e.hint.contains("--refresh-base"), "{e}");
    let text = format!("{GOOD}\n[base]\nmax-age = 30\n");
    one(
        &text,
        line_of_last(&text, "max-age"),
        "base.max-age",
        "string",
    );
    for good in ["7d", "12h"] {
        let text = format!("{GOOD}\n[base]\nmax-age = \"{good}\"\n");
        assert!(errors(&text).is_empty(), "{good}: {:?}", errors(&text));
    }
}

#[test]
fn base_max_age_does_not_apply_to_a_supplied_tarball() {
    let text = format!("{GOOD}\n[base]\ntarball = \"root.tar\"\nmax-age = \"7d\"\n");
    let e = one(
        &text,
        line_of_last(&text, "max-age"),
        "base.max-age",
        "cannot refresh a supplied tarball",
    );
    assert!(e.hint.contains("remove `max-age`"), "{e}");
}

// Air-gap images: `k3s.airgap` and `k3s.image-tarballs`.

/// GOOD with `lines` added to `[k3s]` (they start on line 6).
fn with_k3s(lines: &str) -> String {
    with(
        "version = \"v1.31.1+k3s1\"",
        &format!("version = \"v1.31.1+k3s1\"\n{lines}"),
    )
}

/// The errors of `text` as a profile in `dir` (tarball paths are read
/// from there), with the file name checked.
fn errors_in(dir: &Path, text: &str) -> Vec<Diagnostic> {
    let path = dir.join("lab.toml");
    let errs = match kiln::config::plan::plan_profile(&path, text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    };
    for e in &errs {
        assert_eq!(e.file, path.display().to_string(), "{e}");
        assert!(!e.hint.is_empty(), "no fix given: {e}");
    }
    errs
}

#[test]
fn airgap_is_a_boolean() {
    one(
        &with_k3s("airgap = \"yes\""),
        6,
        "k3s.airgap",
        "expected true or false, found a string",
    );
}

#[test]
fn an_image_tarball_needs_an_extension_k3s_imports() {
    let e = one(
        &with_k3s("image-tarballs = [\"images/registry.tar.xz\"]"),
        6,
        "k3s.image-tarballs[0]",
        "`registry.tar.xz` is not an image tarball k3s imports",
    );
    assert!(e.message.contains(".tar.zst, .tar.gz, .tar"), "{e}");
    assert!(e.hint.contains("zstd"), "{e}");
    one(
        &with_k3s("image-tarballs = [\"images/\"]"),
        6,
        "k3s.image-tarballs[0]",
        "does not name a file",
    );
}

#[test]
fn a_missing_image_tarball_is_named_with_where_it_was_looked_for() {
    let e = one(
        &with_k3s("image-tarballs = [\"images/absent.tar.zst\"]"),
        6,
        "k3s.image-tarballs[0]",
        "image tarball `images/absent.tar.zst` does not exist",
    );
    assert!(e.message.contains("images/absent.tar.zst"), "{e}");
    assert!(e.hint.contains("profile's directory"), "{e}");
}

#[test]
fn image_tarballs_next_to_the_profile_pass_and_are_planned_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    std::fs::write(dir.path().join("images/registry.tar.zst"), b"x").unwrap();
    std::fs::write(dir.path().join("tools.tar"), b"y").unwrap();
    let text =
        with_k3s("airgap = true\nimage-tarballs = [\"images/registry.tar.zst\", \"tools.tar\"]");
    assert_eq!(errors_in(dir.path(), &text), Vec::new());
    let plan = kiln::config::plan::plan_profile(&dir.path().join("lab.toml"), &text).unwrap();
    assert!(plan.airgap.release);
    let got: Vec<(&str, &Path)> = plan
        .airgap
        .tarballs
        .iter()
        .map(|t| (t.name.as_str(), t.path.as_path()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "registry.tar.zst",
                dir.path().join("images/registry.tar.zst").as_path()
            ),
            ("tools.tar", dir.path().join("tools.tar").as_path()),
        ]
    );
    // Left out, nothing is planned.
    let plan = kiln::config::plan::plan_profile(Path::new("lab.toml"), GOOD).unwrap();
    assert!(plan.airgap.is_empty());
}

#[test]
fn image_tarballs_share_one_directory_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["a", "b", "c"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    std::fs::write(dir.path().join("a/x.tar.zst"), b"x").unwrap();
    std::fs::write(dir.path().join("b/x.tar.zst"), b"x").unwrap();
    std::fs::write(dir.path().join("k3s-airgap-images-amd64.tar"), b"x").unwrap();
    let text = with_k3s(
        "airgap = true\nimage-tarballs = [\n  \"a/x.tar.zst\",\n  \"b/x.tar.zst\",\n  \"k3s-airgap-images-amd64.tar\",\n  \"c.tar\",\n  \"c/d.tar\",\n]",
    );
    // `c.tar` is missing; `c/d.tar` is missing too (its parent exists).
    let errs = errors_in(dir.path(), &text);
    let got: Vec<(usize, &str, bool)> = errs
        .iter()
        .map(|e| (e.line, e.key.as_str(), !e.message.is_empty()))
        .collect();
    assert_eq!(
        got,
        vec![
            (9, "k3s.image-tarballs[1]", true),
            (10, "k3s.image-tarballs[2]", true),
            (11, "k3s.image-tarballs[3]", true),
            (12, "k3s.image-tarballs[4]", true),
        ],
        "{errs:#?}"
    );
    assert!(
        errs[0]
            .message
            .contains("second image tarball named `x.tar.zst`")
            && errs[0].message.contains("line 8")
            && errs[0].hint.contains("/usr/lib/kiln/images/x.tar.zst"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].message.contains("release's air-gap tarball"),
        "{}",
        errs[1]
    );
    std::fs::create_dir(dir.path().join("c.tar")).unwrap();
    let errs = errors_in(dir.path(), &with_k3s("image-tarballs = [\"c.tar\"]"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].message.contains("not a regular file"),
        "{}",
        errs[0]
    );
}

#[test]
fn write_files_into_agent_images_are_refused_while_the_slot_mounts_its_tarballs() {
    let text = format!(
        "{}\n[[first-boot.write-files]]\npath = \"/var/lib/rancher/k3s/agent/images/mine.tar\"\n",
        with_k3s("airgap = true")
    );
    let e = one(
        &text,
        line_of_last(&text, "path = "),
        "first-boot.write-files[0].path",
        "would be hidden",
    );
    assert!(e.hint.contains("k3s.image-tarballs"), "{e}");
    let without = text.replace("airgap = true\n", "");
    assert!(errors(&without).is_empty(), "{:?}", errors(&without));
}

#[test]
fn storage_values_are_the_known_ones_each_once() {
    let e = one(
        &with(
            "name = \"lab\"\n",
            "name = \"lab\"\nstorage = [\"longhorn\", \"ceph\"]\n",
        ),
        3,
        "cluster.storage[1]",
        "unknown storage `ceph`",
    );
    assert_eq!(e.column, 24);
    assert_eq!(
        e.hint,
        "write one of \"longhorn\", \"rook-ceph\", \"nfs\", or remove it (kiln installs nothing for other storage)"
    );
    // A node's own list is checked the same way; a repeat is an error.
    one(
        &with(
            "role = \"agent\"\n",
            "role = \"agent\"\nstorage = [\"nfs\", \"nfs\"]\n",
        ),
        19,
        "nodes[1].storage[1]",
        "`nfs` is listed twice",
    );
    // A repeat in the cluster's list is reported once, not per node.
    one(
        &with(
            "name = \"lab\"\n",
            "name = \"lab\"\nstorage = [\"nfs\", \"nfs\"]\n",
        ),
        3,
        "cluster.storage[1]",
        "`nfs` is listed twice",
    );
}
