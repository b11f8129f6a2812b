//! Boots on the hardware kiln's users have, as QEMU has it: a USB stick
//! (`qemu-xhci` + `usb-storage`), an NVMe disk, a SATA (AHCI) disk and an
//! Intel e1000e NIC, with the generic kernel users flash. The stick
//! installs itself onto the NVMe, which then runs alone and beside the
//! stick; a stick never touches another node's install, and two copies of
//! one image make the initramfs refuse.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use kiln::verify::checks::{self as verify, Report};
use kiln::verify::vm::{Bus, Disk, SerialLine, Vm, VmConfig};

use super::{Fixture, assert_all_pass, build, expect_for, files_for, fixture_from, show, vm_lock};

/// Where s1 installs itself (the profile key under test).
const INSTALL_DEVICE: &str = "/dev/nvme0n1";

/// vm.toml with the generic kernel, and s1 installing itself onto the
/// NVMe (then powering off); built once.
fn hw() -> &'static (Fixture, PathBuf) {
    static B: OnceLock<(Fixture, PathBuf)> = OnceLock::new();
    B.get_or_init(|| {
        let text = super::vm_profile()
            .replace("kernel = \"cloud\"", "kernel = \"generic\"")
            .replace(
                "name = \"s1\"\nrole = \"server\"\n",
                &format!("name = \"s1\"\nrole = \"server\"\ninstall-device = \"{INSTALL_DEVICE}\"\nafter-install = \"poweroff\"\n"),
            );
        assert!(text.contains("install-device"), "vm.toml's s1 table moved");
        let f = fixture_from(&text, "hw.toml");
        let out = f.dir.path().join("out");
        build(&f, &out, &[]);
        (f, out)
    })
}

/// A machine with `disks` and an e1000e NIC with `node`'s MAC and address.
fn machine(f: &Fixture, node: &str, disks: Vec<Disk>) -> VmConfig {
    let mut cfg = VmConfig::diskless(node);
    cfg.disks = disks;
    cfg.nic_model = "e1000e".into();
    verify::use_nic_of(&mut cfg, f.plan.node(node).unwrap());
    cfg
}

/// A qcow2 file of `bytes` in `dir`: blank, or over `image` (a flashed copy).
fn qcow2(dir: &Path, name: &str, image: Option<&Path>, bytes: u64) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(i) = image {
        cmd.args(["-F", "raw", "-b"]).arg(i);
    }
    let st = cmd.arg(&path).arg(bytes.to_string()).status().unwrap();
    assert!(st.success(), "qemu-img create {name}");
    path
}

fn sha(path: &Path) -> String {
    kiln::util::hash::sha256_file(path).unwrap()
}

/// The serial lines of a kept log that contain `needle`.
fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Boot `cfg` for node `node`, run the single-node checks once, keep the
/// serial log in `log`.
fn checks(f: &Fixture, node: &str, cfg: &VmConfig, log: &Path) -> Report {
    let files = files_for(f, node);
    let e = expect_for(f, node, &files);
    let r = verify::test_node_on(cfg, &f.key, &e, Some(log), false).unwrap();
    show(&r);
    r
}

/// Boot `cfg` until the console shows `needle` and SSH answers, then
/// power off; keep the serial log in `log`. The line with `needle`.
fn boot_until(f: &Fixture, cfg: &VmConfig, log: &Path, needle: &str) -> SerialLine {
    let mut vm = Vm::start(cfg).unwrap();
    vm.keep_log(log);
    let line = vm
        .wait_serial(needle, 0, Duration::from_secs(15 * 60))
        .unwrap();
    vm.wait_ssh(&f.key, Duration::from_secs(600)).unwrap();
    let _ = vm.ssh_as(&f.key, "root", "systemctl poweroff", b"");
    vm.wait_exit(Duration::from_secs(300)).unwrap();
    line
}

const GIB: u64 = 1 << 30;

#[test]
fn a_stick_installs_itself_onto_the_nvme_which_then_runs_alone_and_beside_it() {
    let started = std::time::Instant::now();
    let (f, out) = hw();
    let dir = tempfile::tempdir().unwrap();
    let image = out.join("s1.img");
    let stick = qcow2(dir.path(), "stick.qcow2", Some(&image), 8 * GIB);
    let nvme = qcow2(dir.path(), "nvme.qcow2", None, 16 * GIB);
    let _g = vm_lock();

    // 1. Boot the stick: the unattended install writes the NVMe, powers off.
    let cfg = machine(
        f,
        "s1",
        vec![
            Disk::new(&stick, Bus::Usb, Some(1)),
            Disk::new(&nvme, Bus::Nvme, None),
        ],
    );
    let mut vm = Vm::start(&cfg).unwrap();
    let log1 = dir.path().join("1-stick.log");
    vm.keep_log(&log1);
    let done = vm
        .wait_until("kiln-install: done", Duration::from_secs(40 * 60), |vm| {
            if let Some(failed) = vm.serial_find("kiln-install: failed", 0) {
                anyhow::bail!("{}\n{}", failed.text, vm.tail(40));
            }
            Ok(vm.serial_find("kiln-install: done", 0))
        })
        .unwrap();
    vm.wait_exit(Duration::from_secs(300)).unwrap();
    drop(vm);
    let text = std::fs::read_to_string(&log1).unwrap();
    let booted = log_lines(&log1, "kiln-init: booted from");
    eprintln!(
        "boot 1 (stick):\n{}\n{}",
        booted.join("\n"),
        log_lines(&log1, "kiln-install:").join("\n")
    );
    assert!(
        booted.iter().any(|l| l.contains("booted from /dev/sda ")),
        "{text}"
    );
    let written = log_lines(&log1, "image sha256 ");
    let want = sha(&image);
    assert!(
        written
            .iter()
            .any(|l| l.ends_with(&format!("image sha256 {want}"))),
        "kiln-install must write the built s1.img (sha256 {want}): {written:?}"
    );
    eprintln!(
        "install finished {:.0} s after power-on ({:?})",
        done.at.as_secs_f64(),
        kiln::verify::vm::detect_accel()
    );

    // 2. The NVMe alone: every single-node check.
    let log2 = dir.path().join("2-nvme.log");
    let cfg = machine(f, "s1", vec![Disk::new(&nvme, Bus::Nvme, Some(1))]);
    let r = checks(f, "s1", &cfg, &log2);
    eprintln!(
        "boot 2 (NVMe alone):\n{}",
        log_lines(&log2, "kiln-init: ").join("\n")
    );
    assert!(!log_lines(&log2, "kiln-init: booted from /dev/nvme0n1 ").is_empty());
    assert!(!log_lines(&log2, "state /dev/nvme0n1p4 mounted on /var").is_empty());
    assert_all_pass(&r);

    // 3. NVMe and stick: the NVMe runs, the stick is not written.
    let stick_before = sha(&stick);
    let log3 = dir.path().join("3-both.log");
    let cfg = machine(
        f,
        "s1",
        vec![
            Disk::new(&nvme, Bus::Nvme, Some(1)),
            Disk::new(&stick, Bus::Usb, Some(2)),
        ],
    );
    boot_until(f, &cfg, &log3, "kiln-install: this node runs from");
    eprintln!(
        "boot 3 (NVMe first, stick attached):\n{}",
        log_lines(&log3, "kiln-init: ").join("\n")
    );
    assert!(!log_lines(&log3, "kiln-init: booted from /dev/nvme0n1 ").is_empty());
    assert!(!log_lines(&log3, "root root-a is /dev/nvme0n1p2").is_empty());
    assert_eq!(
        sha(&stick),
        stick_before,
        "booting the NVMe wrote to the stick"
    );

    // 4. The stick boots again (left in, firmware prefers USB): it finds its
    //    node installed and leaves the NVMe alone.
    let nvme_before = sha(&nvme);
    let log4 = dir.path().join("4-stick-again.log");
    let cfg = machine(
        f,
        "s1",
        vec![
            Disk::new(&stick, Bus::Usb, Some(1)),
            Disk::new(&nvme, Bus::Nvme, Some(2)),
        ],
    );
    let line = boot_until(f, &cfg, &log4, "already holds this node's install");
    eprintln!(
        "boot 4 (stick again):\n{}\n{}",
        log_lines(&log4, "kiln-init: booted").join("\n"),
        line.text
    );
    assert!(!log_lines(&log4, "kiln-init: booted from /dev/sda ").is_empty());
    assert_eq!(
        sha(&nvme),
        nvme_before,
        "the stick, booted again, wrote to the NVMe"
    );
    eprintln!("four boots in {:.0} s", started.elapsed().as_secs_f64());
}

/// A raw disk of `bytes` with a GPT holding one partition named `data`
/// (not kiln's).
fn foreign_disk(dir: &Path, bytes: u64) -> PathBuf {
    let path = dir.join("foreign.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let st = std::process::Command::new("sgdisk")
        .args(["-o", "-n", "1:2048:+100M", "-c", "1:data"])
        .stdout(std::process::Stdio::null())
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "sgdisk");
    path
}

/// kiln-install's refusals, run on the node, each one: the command, what
/// its error must say. `$BOOT`, `$SMALL` and `$FOREIGN` are the SATA
/// disks (the kernel names them in the order their ports answer, so they
/// are found by serial). Nothing may be written to any disk.
const REFUSALS: &[(&str, &str)] = &[
    (
        "kiln-install --yes $BOOT",
        "is the disk this node booted from",
    ),
    (
        "kiln-install --yes ${BOOT}1",
        "1 is a partition: give the whole disk",
    ),
    ("kiln-install --yes $SMALL", "the image needs"),
    (
        "kiln-install --yes $FOREIGN",
        "holds partitions that are not kiln's",
    ),
    (
        "kiln-install --force $FOREIGN",
        "not asking on a non-terminal",
    ),
    ("kiln-install --yes /dev/nowhere", "is not a block device"),
    (
        "mount ${FOREIGN}1 /mnt && kiln-install --yes --force $FOREIGN; r=$?; umount /mnt; exit $r",
        "1 (mounted); unmount or stop what uses it first",
    ),
];

/// The SATA disks by serial (QEMU's `serial=kiln-sata-N`), as shell
/// variables.
const SATA_NAMES: &str = "by=/dev/disk/by-id/ata-QEMU_HARDDISK_kiln-sata-; BOOT=$(readlink -f ${by}0); SMALL=$(readlink -f ${by}1); FOREIGN=$(readlink -f ${by}2)";

#[test]
fn a_sata_disk_boots_keeps_var_on_it_and_kiln_install_refuses_what_flash_refuses() {
    let (f, out) = hw();
    let dir = tempfile::tempdir().unwrap();
    let disk = qcow2(dir.path(), "sata.qcow2", Some(&out.join("a1.img")), 8 * GIB);
    let small = qcow2(dir.path(), "small.qcow2", None, 64 << 20);
    let foreign = foreign_disk(dir.path(), 2 * GIB);
    let _g = vm_lock();
    let log = dir.path().join("sata.log");
    let cfg = machine(
        f,
        "a1",
        vec![
            Disk::new(&disk, Bus::Sata, Some(1)),
            Disk::new(&small, Bus::Sata, None),
            Disk::new(&foreign, Bus::Sata, None),
        ],
    );
    let mut vm = Vm::start(&cfg).unwrap();
    vm.keep_log(&log);
    vm.wait_ssh(&f.key, Duration::from_secs(900)).unwrap();
    let var = vm
        .sh(
            &f.key,
            &format!("{SATA_NAMES}; echo $BOOT; findmnt -no SOURCE /var; cat /run/kiln/disk"),
        )
        .unwrap();
    vm.sh(&f.key, &format!("{SATA_NAMES}; mkfs.ext4 -q ${{FOREIGN}}1"))
        .unwrap();
    let disks_sha = format!(
        "{SATA_NAMES}; for d in $BOOT $SMALL $FOREIGN; do dd if=$d bs=1M count=1 status=none | sha256sum; done"
    );
    let before = vm.sh(&f.key, &disks_sha).unwrap();
    let mut refused = Vec::new();
    for (cmd, want) in REFUSALS {
        let said = vm
            .sh(
                &f.key,
                &format!("{SATA_NAMES}; ( {cmd} ) </dev/null 2>&1; echo \"exit $?\""),
            )
            .unwrap();
        refused.push((cmd, want, said));
    }
    let after = vm.sh(&f.key, &disks_sha).unwrap();
    let _ = vm.ssh_as(&f.key, "root", "systemctl poweroff", b"");
    let _ = vm.wait_exit(Duration::from_secs(300));
    drop(vm);
    eprintln!("{}", log_lines(&log, "kiln-init: ").join("\n"));
    let var: Vec<&str> = var.split_whitespace().collect();
    let boot = var[0].trim_start_matches("/dev/");
    assert_eq!(
        var,
        [
            format!("/dev/{boot}"),
            format!("/dev/{boot}4"),
            boot.to_string()
        ]
    );
    assert!(!log_lines(&log, &format!("kiln-init: booted from /dev/{boot} ")).is_empty());
    for (cmd, want, said) in &refused {
        eprintln!("$ {cmd}\n{}", said.trim_end());
        assert!(
            said.contains(**want),
            "{cmd}: expected {want:?}, got:\n{said}"
        );
        assert!(
            said.trim_end().ends_with("exit 1"),
            "{cmd}: exit status:\n{said}"
        );
    }
    assert_eq!(before, after, "a refused kiln-install wrote to a disk");
}

#[test]
fn a_stick_on_a_machine_with_another_nodes_install_runs_from_the_stick_alone() {
    let (f, out) = hw();
    let dir = tempfile::tempdir().unwrap();
    let stick = qcow2(
        dir.path(),
        "stick.qcow2",
        Some(&out.join("a1.img")),
        8 * GIB,
    );
    let nvme = qcow2(
        dir.path(),
        "nvme.qcow2",
        Some(&out.join("s1.img")),
        16 * GIB,
    );
    let nvme_before = sha(&nvme);
    let _g = vm_lock();
    let log = dir.path().join("stick.log");
    let cfg = machine(
        f,
        "a1",
        vec![
            Disk::new(&stick, Bus::Usb, Some(1)),
            Disk::new(&nvme, Bus::Nvme, Some(2)),
        ],
    );
    let r = checks(f, "a1", &cfg, &log);
    eprintln!("{}", log_lines(&log, "kiln-init: ").join("\n"));
    assert!(!log_lines(&log, "kiln-init: booted from /dev/sda ").is_empty());
    assert!(!log_lines(&log, "state /dev/sda4 mounted on /var").is_empty());
    assert!(
        log_lines(&log, "nvme0n1p").is_empty(),
        "the stick's boot named an NVMe partition"
    );
    assert_all_pass(&r);
    assert_eq!(
        sha(&nvme),
        nvme_before,
        "the stick's boot wrote to the NVMe"
    );
}

#[test]
fn two_copies_of_one_image_make_the_initramfs_refuse() {
    let (f, out) = hw();
    let dir = tempfile::tempdir().unwrap();
    let image = out.join("a1.img");
    let stick = qcow2(dir.path(), "stick.qcow2", Some(&image), 8 * GIB);
    let nvme = qcow2(dir.path(), "nvme.qcow2", Some(&image), 16 * GIB);
    let (stick_before, nvme_before) = (sha(&stick), sha(&nvme));
    let _g = vm_lock();
    let cfg = machine(
        f,
        "a1",
        vec![
            Disk::new(&stick, Bus::Usb, Some(1)),
            Disk::new(&nvme, Bus::Nvme, Some(2)),
        ],
    );
    let mut vm = Vm::start(&cfg).unwrap();
    let line = vm
        .wait_serial("kiln-init: FATAL: disks ", 0, Duration::from_secs(600))
        .unwrap();
    drop(vm);
    eprintln!("{}", line.text);
    for want in [
        "/dev/nvme0n1",
        "/dev/sda",
        "Unplug all but one",
        "kiln-install",
    ] {
        assert!(
            line.text.contains(want),
            "{want:?} missing from: {}",
            line.text
        );
    }
    assert_eq!(
        sha(&stick),
        stick_before,
        "the refused boot wrote to the stick"
    );
    assert_eq!(
        sha(&nvme),
        nvme_before,
        "the refused boot wrote to the NVMe"
    );
}
