//! VM tests: images booted in QEMU (OVMF → systemd-boot → kernel) and
//! checked from inside. KVM when it works, TCG otherwise.
//!
//! They use the k3s test double (built here, like `make k3s-double`), or
//! a real k3s when `KILN_K3S_BINARY` points to one: the same checks run,
//! and the multi-node test then waits for both nodes to be Ready.
//!
//! VMs run one test at a time (a lock): the machines have two cores.

#[path = "vm/airgap.rs"]
mod airgap;
mod common;
#[path = "vm/hardware.rs"]
mod hardware;
#[path = "vm/operator.rs"]
mod operator;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use kiln::build::BuildOptions;
use kiln::config::plan::Plan;
use kiln::config::secrets::ClusterSecrets;
use kiln::verify::checks::{self as verify, BootOptions, ClusterNode, Expect, Report};

static VM_LOCK: Mutex<()> = Mutex::new(());

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// MACs of the management NICs in multi-node tests (the LAN NICs carry
/// the nodes' own MACs).
const MGMT_MACS: [&str; 2] = ["52:54:00:99:00:01", "52:54:00:99:00:02"];

/// The k3s binary under test: `KILN_K3S_BINARY`, or the double built now.
fn k3s_binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_K3S_BINARY") {
            return PathBuf::from(p);
        }
        build_double("v1.31.1+k3s1", "target")
    })
}

/// The version the upgrade test moves to.
const K3S_B: &str = "v1.31.2+k3s1";

/// The k3s binary of version B for the upgrade test: a double built as
/// B, or with a real k3s the same binary (the image then says B, the
/// binary's own version is not checked).
fn k3s_binary_b() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if std::env::var_os("KILN_K3S_BINARY").is_some() {
            return k3s_binary().clone();
        }
        build_double(K3S_B, "target-b")
    })
}

fn build_double(version: &str, target: &str) -> PathBuf {
    let dir = common::repo().join("qemu-tests/k3s-double");
    let st = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "--release", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(dir.join(target))
        .env("K3S_DOUBLE_VERSION", version)
        .status()
        .unwrap();
    assert!(st.success(), "building the k3s double {version} failed");
    dir.join(target).join("release/k3s-double")
}

fn real_k3s() -> bool {
    !kiln::inputs::k3s::is_double(Some(k3s_binary()))
}

/// A test profile with the run's root key and the multi-node management
/// NIC config appended, planned, with secrets in a temp state dir.
struct Fixture {
    dir: tempfile::TempDir,
    plan: Plan,
    secrets: ClusterSecrets,
    key: PathBuf,
}

fn fixture_from(text: &str, name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (key, public_key) = verify::make_test_key(dir.path()).unwrap();
    let mgmt = format!(
        "\n[[first-boot.write-files]]\npath = \"/etc/systemd/network/10-kiln-test-mgmt.network\"\ncontent = \"[Match]\\nMACAddress={}\\n\\n[Network]\\nDHCP=yes\\n\"\n",
        MGMT_MACS.join(" ")
    );
    let text = format!("{text}ssh-authorized-keys = [\"{public_key}\"]\n{mgmt}");
    let path = dir.path().join(name);
    std::fs::write(&path, &text).unwrap();
    let plan = kiln::config::plan::plan_profile(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let state = kiln::config::secrets::StateDir::open(&dir.path().join("state")).unwrap();
    let secrets = ClusterSecrets::load(&plan, &state).unwrap();
    Fixture {
        dir,
        plan,
        secrets,
        key,
    }
}

fn vm_profile() -> String {
    let text = std::fs::read_to_string(common::repo().join("qemu-tests/profiles/vm.toml")).unwrap();
    assert!(
        text.trim_end().ends_with("name = \"root\""),
        "vm.toml must end with the root user's table"
    );
    format!("{}\n", text.trim_end())
}

fn build(f: &Fixture, out: &Path, nodes: &[&str]) {
    let opts = BuildOptions {
        out: out.to_path_buf(),
        nodes: nodes.iter().map(|s| s.to_string()).collect(),
        k3s_binary: Some(k3s_binary().clone()),
        cache: kiln::inputs::cache::cache_dir(),
        test_access_key: None,
        // The netboot tests serve OUT/pxe.
        pxe: true,
        ..BuildOptions::default()
    };
    kiln::build::build(&f.plan, &f.secrets, &opts).unwrap();
}

/// The vm.toml images, built once for every test here.
fn built() -> &'static (Fixture, PathBuf) {
    static B: OnceLock<(Fixture, PathBuf)> = OnceLock::new();
    B.get_or_init(|| {
        let f = fixture_from(&vm_profile(), "vm.toml");
        let out = f.dir.path().join("out");
        build(&f, &out, &[]);
        (f, out)
    })
}

fn expect_for<'a>(f: &'a Fixture, node: &str, files: &'a kiln::render::NodeFiles) -> Expect<'a> {
    Expect {
        plan: &f.plan,
        node: f.plan.node(node).unwrap(),
        files,
        wg_public_key: f.secrets.private[node].public_key().to_base64(),
        user_keys: Vec::new(),
        real_k3s: real_k3s(),
        medium: verify::Medium::Disk,
    }
}

fn files_for(f: &Fixture, node: &str) -> kiln::render::NodeFiles {
    kiln::cli::render::render_node(&f.plan, node, &f.secrets).unwrap()
}

fn show(r: &Report) {
    eprintln!("{}:\n{}", r.node, r.table());
}

#[track_caller]
fn assert_all_pass(r: &Report) {
    show(r);
    let failed: Vec<&str> = r
        .checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        failed.is_empty() && !r.checks.is_empty(),
        "{}: failed checks: {failed:?}",
        r.node
    );
}

#[test]
fn the_accelerator_probe_works() {
    // TCG always runs the probe guest, so a `false` for KVM means KVM
    // failed, not that the probe is broken.
    assert!(
        kiln::verify::vm::probe(
            kiln::verify::vm::Accel::Tcg,
            std::time::Duration::from_secs(30)
        )
        .unwrap()
    );
    eprintln!(
        "accelerator for the VM tests: {:?}",
        kiln::verify::vm::detect_accel()
    );
}

fn single_node(node: &str) {
    let (f, out) = built();
    let _g = vm_lock();
    let files = files_for(f, node);
    let e = expect_for(f, node, &files);
    let r = verify::test_node(&out.join(format!("{node}.img")), &f.key, &e, None).unwrap();
    assert_all_pass(&r);
    // The timeline is complete.
    assert!(
        r.timeline.iter().all(|m| m.at.is_some()),
        "{:?}",
        r.timeline
    );
}

#[test]
fn server_node_passes_every_check() {
    single_node("s1");
}

#[test]
fn agent_node_passes_every_check() {
    single_node("a1");
}

/// The server (the tunnel's hub) and the agent on one LAN, and the
/// operator's laptop reaching them through the hub with the file `kiln
/// operator` writes.
#[test]
fn server_agent_and_an_operator_on_the_tunnel() {
    let (f, out) = built();
    let _g = vm_lock();
    let mut laptop = operator::Laptop::new();
    let via = laptop.free_port();
    let wg_port = f.plan.wireguard.as_ref().unwrap().listen_port;
    let s = ClusterNode {
        image: &out.join("s1.img"),
        node: f.plan.node("s1").unwrap(),
        mgmt_mac: MGMT_MACS[0].into(),
        udp_forward: vec![(via, wg_port)],
    };
    let a = ClusterNode {
        image: &out.join("a1.img"),
        node: f.plan.node("a1").unwrap(),
        mgmt_mac: MGMT_MACS[1].into(),
        udp_forward: Vec::new(),
    };
    let conf = kiln::cli::operator::operator_config(&f.plan, &f.secrets, "op").unwrap();
    let wg = |n: &ClusterNode| n.node.wireguard_address.unwrap().to_string();
    let (s_wg, a_wg) = (wg(&s), wg(&a));
    let r = verify::test_cluster_then(&f.plan, (&s, &a), &f.key, real_k3s(), None, |sv, av, r| {
        operator::check_operator(
            &mut laptop,
            (&conf, via),
            (sv, av),
            (&s_wg, &a_wg),
            &f.key,
            r,
        );
        let kubeconfig = kiln::cli::kubeconfig::kubeconfig(
            &f.plan,
            &f.secrets.cluster_ca,
            time::OffsetDateTime::now_utc(),
        )?;
        let k3s = real_k3s().then(|| k3s_binary().as_path());
        let version = f.plan.k3s.version.to_string();
        let pinned = f.secrets.cluster_ca.server_ca_hash();
        operator::check_kubeconfig(
            &laptop,
            &kubeconfig,
            k3s,
            (&version, &["s1", "a1"]),
            &pinned,
            r,
        );
        Ok(())
    })
    .unwrap();
    assert_all_pass(&r);
}

/// Boot `image` once with the expectations of `node` in the vm.toml
/// fixture; return the report.
fn check_once(image: &Path, node: &str) -> Report {
    check_once_as(image, node, node)
}

/// As `check_once`, for an image whose network is that of `boot_as`.
fn check_once_as(image: &Path, node: &str, boot_as: &str) -> Report {
    let (f, _) = built();
    let files = files_for(f, node);
    let e = expect_for(f, node, &files);
    let opts = BootOptions {
        reboot: false,
        boot_as: Some(f.plan.node(boot_as).unwrap().clone()),
        ..BootOptions::default()
    };
    let r = verify::test_node_with(image, &f.key, &e, None, &opts).unwrap();
    show(&r);
    r
}

/// Boot `image` once at its own size (a flashed target: the state
/// partition must fill it as it is) and show the report.
fn boot_once_as_is(image: &Path, key: &Path, e: &Expect) -> Report {
    let opts = BootOptions {
        reboot: false,
        grow_bytes: 0,
        boot_as: None,
    };
    let r = verify::test_node_with(image, key, e, None, &opts).unwrap();
    show(&r);
    r
}

#[track_caller]
fn assert_check(r: &Report, name: &str, pass: bool) {
    let c = r.check(name).unwrap_or_else(|| panic!("no check {name:?}"));
    assert_eq!(
        c.pass,
        pass,
        "{name}: expected {} but it {}: {c:?}",
        if pass { "pass" } else { "fail" },
        if c.pass { "passed" } else { "failed" }
    );
}

/// Build the vm.toml profile changed by `edit`, with the same secrets and
/// key as the fixture, and return node `node`'s image.
fn build_variant(edit: impl Fn(&str) -> String, node: &str) -> (tempfile::TempDir, PathBuf) {
    let (f, _) = built();
    let text = std::fs::read_to_string(&f.plan.profile_path).unwrap();
    let changed = edit(&text);
    assert_ne!(changed, text, "the variant must differ");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.toml");
    std::fs::write(&path, &changed).unwrap();
    let plan = kiln::config::plan::plan_profile(&path, &changed).unwrap();
    let opts = BuildOptions {
        out: dir.path().join("out"),
        nodes: vec![node.into()],
        k3s_binary: Some(k3s_binary().clone()),
        cache: kiln::inputs::cache::cache_dir(),
        ..BuildOptions::default()
    };
    kiln::build::build(&plan, &f.secrets, &opts).unwrap();
    let img = dir.path().join("out").join(format!("{node}.img"));
    (dir, img)
}

#[test]
fn broken_entry_without_the_cmdline_item_fails_that_check() {
    let (_d, img) = build_variant(
        |t| t.replace("cmdline = [\"pcie_aspm=off\"]", "cmdline = []"),
        "s1",
    );
    let _g = vm_lock();
    let r = check_once(&img, "s1");
    assert_check(&r, "kernel command line", false);
    assert_check(&r, "hostname", true);
    assert_check(&r, "nft ruleset is the rendered one", true);
}

#[test]
fn broken_ruleset_fails_the_firewall_check() {
    let (_d, img) = build_variant(
        |t| {
            t.replace(
                "[wireguard]",
                "[firewall]\nallow-tcp = [22, 8080]\n\n[wireguard]",
            )
        },
        "s1",
    );
    let _g = vm_lock();
    let r = check_once(&img, "s1");
    assert_check(&r, "nft ruleset is the rendered one", false);
    assert_check(&r, "kernel command line", true);
    assert_check(&r, "hostname", true);
}

#[test]
fn a_seed_from_another_node_fails_the_identity_checks() {
    let (_, out) = built();
    let _g = vm_lock();
    // a1's image (its seed) booted where s1 is expected.
    let r = check_once_as(&out.join("a1.img"), "s1", "a1");
    assert_check(&r, "hostname", false);
    assert_check(&r, "WireGuard public key (kiln keys)", false);
    assert_check(&r, "k3s config.yaml", false);
    assert_check(&r, "kernel command line", true);
    assert_check(
        &r,
        "kiln's cluster CA is in /var/lib/rancher/k3s/server/tls (sha256, mode)",
        false,
    );
}

#[test]
fn a_flashed_8g_copy_boots_and_the_state_partition_fills_it() {
    let (f, out) = built();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("stick.img");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("flash")
        .arg(out.join("s1.img"))
        .arg(&target)
        .args(["--size", "8G", "--yes"])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 8 << 30);
    let _g = vm_lock();
    let files = files_for(f, "s1");
    let e = expect_for(f, "s1", &files);
    let r = boot_once_as_is(&target, &f.key, &e);
    assert_check(&r, "state partition reaches the end of the disk", true);
    assert_check(&r, "/ is the slot's read-only squashfs", true);
}

/// `kiln test profiles/club.toml --node NAME`, as the README shows it:
/// the generic kernel users flash, booted and checked.
fn club_node(node: &str) {
    let state = tempfile::tempdir().unwrap();
    let _g = vm_lock();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["test", "profiles/club.toml", "--node", node, "--state-dir"])
        .arg(state.path().join("club.state"))
        .arg("--k3s-binary")
        .arg(k3s_binary())
        .current_dir(common::repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "kiln test --node {node} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(
        !common::repo().join("profiles/kiln.lock").exists() || real_k3s(),
        "the test double was pinned in profiles/kiln.lock"
    );
}

#[test]
fn club_profile_server_rgb1_with_the_generic_kernel() {
    club_node("rgb1");
}

#[test]
fn club_profile_agent_rgb2_with_the_generic_kernel() {
    club_node("rgb2");
}

/// A loop device over a sparse file, detached on drop.
struct LoopDev {
    dev: String,
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

#[test]
fn a_flashed_loop_device_verifies_and_boots() {
    let (f, out) = built();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.raw");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let o = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lo = LoopDev {
        dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
    };
    // A loop device is not removable: --force, as for a fixed disk.
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("flash")
        .arg(out.join("s1.img"))
        .arg(&lo.dev)
        .args(["--yes", "--force"])
        .status()
        .unwrap();
    assert!(st.success());
    let _g = vm_lock();
    let files = files_for(f, "s1");
    let e = expect_for(f, "s1", &files);
    // Boot the block device itself (through an overlay: it is not modified).
    let r = boot_once_as_is(Path::new(&lo.dev), &f.key, &e);
    assert_check(&r, "state partition reaches the end of the disk", true);
    assert_check(&r, "hostname", true);
}

/// `kiln serve` on the host's loopback, in this process, for netboot
/// tests. QEMU's user networking shows the host to the guest as the
/// LAN's .2 (vm.toml: 192.168.76.2), and hands out the TFTP directory.
struct Serving {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    log: std::sync::Arc<Mutex<Vec<String>>>,
    tftp: tempfile::TempDir,
    /// The server's URL as the guest sees it.
    guest_url: String,
}

impl Serving {
    fn start(plan: &Plan, out: &Path) -> Serving {
        Self::start_with_keys(plan, out, Default::default())
    }

    fn start_with_keys(
        plan: &Plan,
        out: &Path,
        update_keys: std::collections::BTreeMap<String, String>,
    ) -> Serving {
        let opts = kiln::deliver::serve::ServeOptions {
            out: out.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            url: None,
            tftp: None,
            update_keys,
        };
        let log: std::sync::Arc<Mutex<Vec<String>>> = Default::default();
        let sink = log.clone();
        let server = kiln::deliver::serve::Server::bind(plan, &opts)
            .unwrap()
            .with_log(move |l| sink.lock().unwrap().push(l.to_string()));
        let url = format!("http://192.168.76.2:{}", server.addr().port());
        let guest_url = url.clone();
        let tftp = tempfile::tempdir().unwrap();
        kiln::deliver::serve::write_tftp(tftp.path(), &url).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || server.run(&flag).unwrap());
        Serving {
            stop,
            thread: Some(thread),
            log,
            tftp,
            guest_url,
        }
    }

    fn netboot(&self) -> kiln::verify::vm::NetBoot {
        kiln::verify::vm::NetBoot {
            tftp: self.tftp.path().to_path_buf(),
            bootfile: kiln::render::pxe::TFTP_SCRIPT.into(),
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn netboot_expect<'a>(
    f: &'a Fixture,
    out: &Path,
    node: &str,
    files: &'a kiln::render::NodeFiles,
    disk: bool,
) -> Expect<'a> {
    let m = kiln::image::manifest::Manifest::read(out).unwrap();
    let sha = m
        .nodes
        .iter()
        .find(|n| n.name == node)
        .unwrap()
        .root_sha256
        .clone();
    Expect {
        medium: verify::Medium::Net {
            root_sha256: sha,
            disk,
        },
        ..expect_for(f, node, files)
    }
}

#[test]
fn a_diskless_node_netboots_from_kiln_serve() {
    diskless_netboot("s1");
}

/// The agent too: with /var in RAM it still presents the node password
/// and SSH host key of the state dir (the identity checks of every boot),
/// so a server that knew it lets it back in.
#[test]
fn a_diskless_agent_netboots_with_its_own_identity() {
    diskless_netboot("a1");
}

fn diskless_netboot(node: &str) {
    let (f, out) = built();
    let _g = vm_lock();
    let serving = Serving::start(&f.plan, out);
    let files = files_for(f, node);
    let e = netboot_expect(f, out, node, &files, false);
    let r = verify::test_netboot(&serving.netboot(), None, &f.key, &e, None).unwrap();
    assert_all_pass(&r);
    assert!(
        r.timeline.iter().all(|m| m.at.is_some()),
        "{:?}",
        r.timeline
    );
    let log = serving.log();
    eprintln!("kiln serve log:\n{}", log.join("\n"));
    let mac = f
        .plan
        .node(node)
        .unwrap()
        .mac
        .unwrap()
        .to_string()
        .replace(':', "-");
    // The node's script names its root (one image per distinct set of
    // overlays: an agent may share the server's).
    let script = std::fs::read_to_string(out.join(format!("pxe/mac/{mac}.ipxe"))).unwrap();
    let at = script
        .find("/root-")
        .expect("the node's script names a root image");
    let root = &script[at..at + script[at..].find(".sqfs").unwrap() + ".sqfs".len()];
    for want in [
        "GET /boot.ipxe 200".to_string(),
        format!("GET /mac/{mac}.ipxe 200"),
        "GET /vmlinuz 200".into(),
        "GET /initrd.img 200".into(),
        format!("GET /seed/{node}.img 200"),
        format!("GET {root} 200"),
    ] {
        assert!(
            log.iter().any(|l| l.contains(&want)),
            "no `{want}` in the serve log"
        );
    }
    // The token never reaches the log.
    assert!(!log.iter().any(|l| l.contains("token")), "{log:?}");
}

/// A netbooted node whose disk carries a kiln state partition keeps /var
/// there (the root still comes from the network).
#[test]
fn a_netbooted_node_with_a_kiln_disk_keeps_var_on_it() {
    let (f, out) = built();
    let _g = vm_lock();
    let serving = Serving::start(&f.plan, out);
    let files = files_for(f, "a1");
    let e = netboot_expect(f, out, "a1", &files, true);
    let r = verify::test_netboot(
        &serving.netboot(),
        Some(&out.join("a1.img")),
        &f.key,
        &e,
        None,
    )
    .unwrap();
    assert_all_pass(&r);
    assert_check(&r, "k3s data is on the state partition", true);
}

#[test]
fn a_tampered_root_image_stops_the_netboot() {
    let (f, out) = built();
    let _g = vm_lock();
    // A copy of the tree whose root image has one byte changed.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("out");
    std::fs::create_dir_all(copy.join("pxe")).unwrap();
    std::fs::copy(out.join("manifest.json"), copy.join("manifest.json")).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(out.join("pxe/."))
        .arg(copy.join("pxe"))
        .status()
        .unwrap();
    assert!(status.success());
    let root = copy.join("pxe/root-server.sqfs");
    let mut bytes = std::fs::read(&root).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&root, &bytes).unwrap();

    let serving = Serving::start(&f.plan, &copy);
    let files = files_for(f, "s1");
    let e = netboot_expect(f, out, "s1", &files, false);
    let mut vm = kiln::verify::vm::Vm::start(&verify::netboot_vm(&e, &serving.netboot())).unwrap();
    let line = vm
        .wait_serial("FATAL: root image from", 0, verify::BOOT_TIMEOUT)
        .unwrap();
    eprintln!("{}", vm.tail(15));
    assert!(line.text.contains("refusing to boot it"), "{}", line.text);
    assert!(
        line.text.contains("root-server.sqfs has sha256"),
        "{}",
        line.text
    );
    assert!(vm.serial_find("kiln-init: switch_root", 0).is_none());
}

#[test]
fn an_unknown_mac_gets_a_clear_message_from_ipxe() {
    let (f, out) = built();
    let _g = vm_lock();
    let serving = Serving::start(&f.plan, out);
    let files = files_for(f, "s1");
    let e = netboot_expect(f, out, "s1", &files, false);
    let mut cfg = verify::netboot_vm(&e, &serving.netboot());
    cfg.mac = "52:54:00:99:99:99".into();
    let mut vm = kiln::verify::vm::Vm::start(&cfg).unwrap();
    let line = vm
        .wait_serial(
            "no node of cluster vmtest has MAC 52:54:00:99:99:99",
            0,
            verify::BOOT_TIMEOUT,
        )
        .unwrap();
    eprintln!("{}", vm.tail(10));
    assert!(line.text.starts_with("kiln:"), "{}", line.text);
    let log = serving.log();
    assert!(
        log.iter()
            .any(|l| l.contains("GET /mac/52-54-00-99-99-99.ipxe 404")),
        "{log:?}"
    );
}

/// A line `key=value` of an update bundle.
fn bundle_field(bundle: &str, key: &str) -> String {
    bundle
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_default()
        .to_string()
}

/// The sha256 of the first MiB of slot b's partition on the boot disk.
fn slot_b_head(vm: &kiln::verify::vm::Vm, key: &std::path::Path) -> String {
    let script = r#"d=$(cat /run/kiln/disk); for u in /sys/block/$d/$d*/uevent; do grep -qx PARTNAME=root-b "$u" && p=$(basename "$(dirname "$u")"); done; head -c 1048576 "/dev/$p" | sha256sum"#;
    let h = vm.sh(key, script).unwrap();
    assert_eq!(h.trim().len(), 64 + 3, "{h}");
    h
}

/// Updates that must stop at the datastore snapshot, on the server running
/// slot a: kiln-update exits non-zero and says why; slot b's partition and
/// the status are as before.
fn refused_without_snapshot(vm: &kiln::verify::vm::Vm, key: &std::path::Path, server: &str) {
    let refused = |why: &[&str]| {
        let head = slot_b_head(vm, key);
        let status = vm.sh(key, "kiln-update --status").unwrap();
        let o = vm
            .ssh_as(key, "root", &format!("kiln-update --server {server}"), b"")
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("snapshot fails:\n{err}");
        assert!(!o.status.success(), "{err}");
        for w in why {
            assert!(err.contains(w), "`{w}` not in:\n{err}");
        }
        assert!(err.contains("nothing was written to slot b"), "{err}");
        assert!(!err.contains("kiln-update: writing "), "{err}");
        assert_eq!(slot_b_head(vm, key), head, "slot b changed");
        assert_eq!(vm.sh(key, "kiln-update --status").unwrap(), status);
    };

    // SQLite (this profile's single server): the copy cannot be made (a
    // file where the snapshot directory goes); k3s is not stopped.
    vm.sh(
        key,
        "rm -rf /var/lib/kiln/snapshots && touch /var/lib/kiln/snapshots",
    )
    .unwrap();
    refused(&["cannot create /var/lib/kiln/snapshots/kiln-pre-update-"]);
    vm.sh(key, "rm /var/lib/kiln/snapshots && systemctl is-active k3s")
        .unwrap();

    // Embedded etcd, with the double only: cluster-init in the config (in
    // RAM: /etc is an overlay) makes the double keep an etcd member dir,
    // and its test hook makes `k3s etcd-snapshot save` fail.
    if real_k3s() {
        return;
    }
    vm.sh(
        key,
        "cp /etc/rancher/k3s/config.yaml /run/config.yaml.before \
         && echo 'cluster-init: true' >> /etc/rancher/k3s/config.yaml \
         && systemctl restart k3s && systemctl is-active k3s",
    )
    .unwrap();
    let rec = vm
        .sh(key, "cat /var/lib/rancher/k3s/double/server")
        .unwrap();
    assert!(rec.contains("datastore=etcd"), "{rec}");
    vm.sh(key, "touch /var/lib/rancher/k3s/double/fail-snapshot")
        .unwrap();
    refused(&[
        "k3s etcd-snapshot save --name kiln-pre-update-",
        "failed on purpose",
        "k3s etcd-snapshot save failed",
    ]);
    let calls = vm
        .sh(
            key,
            "cat /var/lib/rancher/k3s/double/snapshots 2>/dev/null || true",
        )
        .unwrap();
    assert_eq!(calls.trim(), "", "the failed snapshot was recorded");
    // Back to SQLite for the update that follows.
    vm.sh(
        key,
        "systemctl stop k3s && cp /run/config.yaml.before /etc/rancher/k3s/config.yaml \
         && rm -rf /var/lib/rancher/k3s/server/db/etcd /var/lib/rancher/k3s/double/fail-snapshot \
         && systemctl start k3s && systemctl is-active k3s",
    )
    .unwrap();
    let rec = vm
        .sh(key, "cat /var/lib/rancher/k3s/double/server")
        .unwrap();
    assert!(rec.contains("datastore=sqlite"), "{rec}");
}

/// The snapshot a good update took on the SQLite server: named in the
/// output before the slot was written and in the status, and (with the
/// double, whose state.db is text) a copy of the datastore as it was.
/// Returns its path.
fn snapshot_taken(
    vm: &kiln::verify::vm::Vm,
    key: &std::path::Path,
    err: &str,
    db_before: &str,
    from: &str,
    to: &str,
) -> String {
    let name = format!("kiln-pre-update-{from}-to-{to}").replace('+', "-");
    let said = "kiln-update: datastore snapshot: ";
    let path = err
        .lines()
        .find_map(|l| l.strip_prefix(said))
        .unwrap_or_else(|| panic!("no `{said}` line:\n{err}"))
        .to_string();
    assert!(
        path.starts_with(&format!("/var/lib/kiln/snapshots/{name}-s1-")),
        "{path}"
    );
    // Order: k3s stopped and copied, the snapshot named, then the slot.
    let at = |w: &str| {
        err.find(w)
            .unwrap_or_else(|| panic!("`{w}` not in:\n{err}"))
    };
    assert!(at("snapshotting SQLite: stopping k3s") < at(said), "{err}");
    assert!(at(said) < at("kiln-update: writing "), "{err}");
    let st = vm.sh(key, "kiln-update --status").unwrap();
    assert!(
        st.contains(&format!(
            "datastore snapshot before the last update: {path}"
        )),
        "{st}"
    );
    assert!(st.contains(&format!("datastore snapshot {path}")), "{st}");
    vm.sh(key, &format!("test -s {path}/state.db")).unwrap();
    if !real_k3s() {
        let copy = vm.sh(key, &format!("cat {path}/state.db")).unwrap();
        // The double appends a line to state.db each time it starts: the
        // copy is the datastore as it was when k3s stopped for it, and k3s
        // started again once, after the copy.
        let live = vm
            .sh(key, "cat /var/lib/rancher/k3s/server/db/state.db")
            .unwrap();
        assert_eq!(copy, db_before, "the copy is not the datastore as it was");
        assert!(live.starts_with(&copy), "{live}");
        assert_eq!(live.lines().count(), copy.lines().count() + 1, "{live}");
    }
    path
}

/// The A/B update cycle on one disk: an image of k3s A boots; an update
/// too big for the slot is refused with nothing written; `kiln-update`
/// from `kiln serve` moves it to B on the other slot (blessed once k3s is
/// active) and brings B's manifests; `--rollback` returns to A (and A's
/// manifests); an update whose root cannot be
/// mounted fails its three tries and systemd-boot returns to A, which
/// reports the failure. A file on /var survives all of it. On this server
/// (SQLite) every update snapshots the datastore before writing the slot,
/// and one whose snapshot fails is refused with slot b untouched.
#[test]
fn ab_updates_good_broken_and_rollback() {
    let (f, out_a) = built();
    let _g = vm_lock();
    let a_version = f.plan.k3s.version.to_string();

    // Version B: the same profile and secrets, another k3s version.
    let dir = tempfile::tempdir().unwrap();
    let profile_b = dir.path().join("vm.toml");
    let text_a = std::fs::read_to_string(&f.plan.profile_path).unwrap();
    // B also changes the manifest s1 deploys: the update must bring it.
    let text_b = text_a
        .replacen(
            &format!("version = \"{a_version}\""),
            &format!("version = \"{K3S_B}\""),
            1,
        )
        .replacen("  slot: \"a\"\n", "  slot: \"b\"\n", 1);
    assert_eq!(
        text_b.matches("slot: \"b\"").count(),
        1,
        "vm.toml's manifest no longer says slot: \"a\""
    );
    std::fs::write(&profile_b, &text_b).unwrap();
    let plan_b = kiln::config::plan::plan_profile(&profile_b, &text_b).unwrap();
    let out_b = dir.path().join("out");
    let opts = BuildOptions {
        out: out_b.clone(),
        nodes: vec!["s1".into()],
        k3s_binary: Some(k3s_binary_b().clone()),
        cache: kiln::inputs::cache::cache_dir(),
        pxe: true,
        ..BuildOptions::default()
    };
    kiln::build::build(&plan_b, &f.secrets, &opts).unwrap();
    let bundle = std::fs::read_to_string(out_b.join("pxe/update/s1.txt")).unwrap();
    assert_eq!(bundle_field(&bundle, "k3s_version"), K3S_B);

    // Two bundles that must not go in: one too big for the slot, one whose
    // root image is not a file system (with the right digest).
    let big = bundle.replace(
        &format!("root_size={}", bundle_field(&bundle, "root_size")),
        "root_size=99999999999",
    );
    std::fs::write(out_b.join("pxe/update/s1-big.txt"), big).unwrap();
    let garbage: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(out_b.join("pxe/root-broken.sqfs"), &garbage).unwrap();
    let broken = bundle
        .replace(
            &format!("root={}", bundle_field(&bundle, "root")),
            "root=root-broken.sqfs",
        )
        .replace(
            &format!("root_size={}", bundle_field(&bundle, "root_size")),
            &format!("root_size={}", garbage.len()),
        )
        .replace(
            &format!("root_sha256={}", bundle_field(&bundle, "root_sha256")),
            &format!("root_sha256={}", common::sha256_hex(&garbage)),
        );
    std::fs::write(out_b.join("pxe/update/s1-broken.txt"), broken).unwrap();

    let serving = Serving::start_with_keys(&plan_b, &out_b, f.secrets.update_keys(&f.plan.cluster));
    let server = serving.guest_url.clone();

    let node = f.plan.node("s1").unwrap();
    let mut cfg = kiln::verify::vm::VmConfig::new("s1", &out_a.join("s1.img"));
    cfg.disk_bytes = Some(std::fs::metadata(out_a.join("s1.img")).unwrap().len() + (1 << 30));
    verify::use_nic_of(&mut cfg, node);
    let mut vm = kiln::verify::vm::Vm::start(&cfg).unwrap();
    let key = &f.key;
    let t = verify::BOOT_TIMEOUT;
    let mut boots = 0;
    let boot = |vm: &mut kiln::verify::vm::Vm, boots: &mut usize| {
        vm.wait_serial("kiln-init: switch_root", *boots, t).unwrap();
        *boots += 1;
        vm.wait_ssh(key, t).unwrap();
        vm.wait_until("k3s active", std::time::Duration::from_secs(180), |vm| {
            Ok(vm
                .sh(key, "systemctl is-active k3s")
                .ok()
                .filter(|s| s.trim() == "active"))
        })
        .unwrap();
    };
    let facts = |vm: &kiln::verify::vm::Vm| -> (String, String, String) {
        let slot = vm.sh(key, "cat /run/kiln/slot").unwrap().trim().to_string();
        let image = vm
            .sh(key, "sed -n 's/^k3s //p' /usr/lib/kiln/image")
            .unwrap()
            .trim()
            .to_string();
        let marker = vm
            .sh(key, "cat /var/lib/kiln-check/before-update 2>&1")
            .unwrap()
            .trim()
            .to_string();
        (slot, image, marker)
    };
    let double_says = |vm: &kiln::verify::vm::Vm, want: &str| {
        if !real_k3s() {
            let v = vm.sh(key, "k3s --version").unwrap();
            assert!(v.contains(want), "k3s --version: {v}");
            let rec = vm
                .sh(key, "cat /var/lib/rancher/k3s/double/server")
                .unwrap();
            assert!(rec.contains(&format!("version={want}")), "{rec}");
        }
    };
    // kiln's manifests in server/manifests, as plan `p` says s1 has them;
    // and the node's iSCSI initiator name, which no update may change.
    let manifests_are = |vm: &kiln::verify::vm::Vm, p: &Plan, which: &str| {
        let want = kiln::verify::manifests::expected_manifest_listing(p, p.node("s1").unwrap());
        let seen = kiln::verify::manifests::manifest_listing(vm, key).unwrap();
        assert!(!want.is_empty());
        assert_eq!(seen, want, "s1's manifests are not plan {which}'s");
    };
    let initiator = |vm: &kiln::verify::vm::Vm| {
        let n = kiln::verify::storage::initiator_name(vm, key).unwrap();
        assert!(kiln::verify::storage::is_iqn(&n), "{n:?}");
        n
    };
    let wait_status = |vm: &mut kiln::verify::vm::Vm, prefix: &str| -> String {
        vm.wait_until(
            &format!("update-status `{prefix}`"),
            std::time::Duration::from_secs(240),
            |vm| {
                Ok(vm
                    .sh(key, "cat /var/lib/kiln/update-status 2>/dev/null || true")
                    .ok()
                    .filter(|s| s.starts_with(prefix)))
            },
        )
        .unwrap()
    };

    // Boot A.
    boot(&mut vm, &mut boots);
    vm.sh(
        key,
        "mkdir -p /var/lib/kiln-check && echo kept > /var/lib/kiln-check/before-update && sync",
    )
    .unwrap();
    assert_eq!(facts(&vm), ("a".into(), a_version.clone(), "kept".into()));
    double_says(&vm, &a_version);
    manifests_are(&vm, &f.plan, "A");
    let iname = initiator(&vm);

    // Too big: refused before anything is written.
    let before = vm.sh(key, "kiln-update --status").unwrap();
    let o = vm
        .ssh_as(
            key,
            "root",
            &format!("kiln-update --bundle {server}/update/s1-big.txt"),
            b"",
        )
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("too big:\n{err}");
    assert!(!o.status.success());
    assert!(
        err.contains("does not fit slot b") && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(vm.sh(key, "kiln-update --status").unwrap(), before);

    // No snapshot of the datastore, no update.
    refused_without_snapshot(&vm, key, &server);

    // The good update: A → B on slot b, after a snapshot.
    let db_before = if real_k3s() {
        String::new()
    } else {
        vm.sh(key, "cat /var/lib/rancher/k3s/server/db/state.db")
            .unwrap()
    };
    let o = vm
        .ssh_as(key, "root", &format!("kiln-update --server {server}"), b"")
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("update:\n{err}");
    assert!(o.status.success(), "{err}");
    assert!(err.contains("slot b verified"), "{err}");
    let snapshot = snapshot_taken(&vm, key, &err, &db_before, &a_version, K3S_B);
    let st = vm.sh(key, "kiln-update --status").unwrap();
    assert!(
        st.contains("slot b: generation 2, on trial (kiln-b+3.conf)"),
        "{st}"
    );
    let _ = vm.ssh_as(key, "root", "systemctl reboot", b"");
    boot(&mut vm, &mut boots);
    let ok = wait_status(&mut vm, "ok:");
    eprintln!("after the update: {ok}");
    assert_eq!(facts(&vm), ("b".into(), K3S_B.into(), "kept".into()));
    double_says(&vm, K3S_B);
    manifests_are(&vm, &plan_b, "B");
    assert_eq!(
        initiator(&vm),
        iname,
        "the update changed the initiator name"
    );
    vm.sh(key, &format!("test -s {snapshot}/state.db")).unwrap();
    let st = vm.sh(key, "kiln-update --status").unwrap();
    assert!(st.contains("slot b: generation 2, good"), "{st}");
    assert!(st.contains("slot a: generation 1, good"), "{st}");

    // Rollback by hand: back to A.
    let o = vm
        .ssh_as(key, "root", "kiln-update --rollback --reboot", b"")
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("rollback: {err}");
    // The snapshot is still on /var, and the rollback points at it.
    assert!(
        err.contains(&format!("restore the datastore from {snapshot}")),
        "{err}"
    );
    boot(&mut vm, &mut boots);
    assert_eq!(facts(&vm), ("a".into(), a_version.clone(), "kept".into()));
    double_says(&vm, &a_version);
    manifests_are(&vm, &f.plan, "A");
    assert_eq!(
        initiator(&vm),
        iname,
        "the rollback changed the initiator name"
    );

    // The broken update: its root cannot be mounted; three tries, then A.
    let o = vm
        .ssh_as(
            key,
            "root",
            &format!("kiln-update --bundle {server}/update/s1-broken.txt --reboot"),
            b"",
        )
        .unwrap();
    eprintln!("broken update: {}", String::from_utf8_lossy(&o.stderr));
    boot(&mut vm, &mut boots);
    let failed = wait_status(&mut vm, "failed:");
    eprintln!("after the broken update: {failed}");
    assert_eq!(facts(&vm), ("a".into(), a_version.clone(), "kept".into()));
    double_says(&vm, &a_version);
    // One console line per try (the init also logs it to the kernel log,
    // which the console shows with a timestamp).
    let tries = vm
        .serial_lines()
        .iter()
        .filter(|l| {
            l.text.starts_with("kiln-init: FATAL: cannot mount") && l.text.contains("(root-b)")
        })
        .count();
    assert_eq!(tries, 3, "{}", vm.tail(40));
    assert!(
        vm.serial_find("kiln-boot-check: update FAILED: slot b", 0)
            .is_some(),
        "the console does not report the failed update\n{}",
        vm.tail(40)
    );
    let st = vm.sh(key, "kiln-update --status").unwrap();
    assert!(
        st.contains("slot b: generation 4, failed (no tries left)"),
        "{st}"
    );
    // Rolling back to the failed slot is refused.
    let o = vm
        .ssh_as(key, "root", "kiln-update --rollback", b"")
        .unwrap();
    assert!(!o.status.success());
    let _ = vm.ssh_as(key, "root", "systemctl poweroff", b"");
    let _ = vm.wait_exit(std::time::Duration::from_secs(120));
    let log = serving.log();
    assert!(
        log.iter().any(|l| l.contains("GET /seed/s1.img 200")),
        "{log:?}"
    );
}
