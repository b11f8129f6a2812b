//! `kiln flash` on regular files, on fake devices (facts a test machine
//! cannot have: a USB stick, the system disk) and on real loop devices.
//!
//! Every target is a file in a temp dir or a loop device over one; no test
//! points at a disk of the machine. The image is a small synthetic one (a
//! sparse file with a kiln GPT and some data in each partition, plus
//! SHA256SUMS), so no `kiln build` is needed.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::deliver::flash::{
    DeviceFacts, FakeFacts, FlashOptions, Holder, Mount, Refusal, SysFacts, TargetFacts, flash,
};
use kiln::image::gpt::{self, PartitionPlan};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Sectors the backup GPT takes at the end of a disk (entries + header).
const BACKUP_GPT_SECTORS: u64 = 33;

/// A 406 MiB image: kiln's GPT, 1 MiB of patterned data at the start and
/// 4 KiB at the end of each partition, and SHA256SUMS beside it.
struct TestImage {
    path: PathBuf,
    plan: PartitionPlan,
    sha256: String,
}

fn make_image(dir: &Path) -> TestImage {
    let plan = gpt::plan_partitions("test/flash", 260, 64, 64, 16).unwrap();
    let path = dir.join("node.img");
    let mut file = File::create_new(&path).unwrap();
    file.set_len(plan.disk_size_bytes).unwrap();
    gpt::write_gpt(&mut file, &plan).unwrap();
    for (i, p) in plan.partitions.iter().enumerate() {
        file.write_all_at(&pattern(i as u64, MIB as usize), p.offset_bytes())
            .unwrap();
        file.write_all_at(
            &pattern(100 + i as u64, 4096),
            p.offset_bytes() + p.size_bytes() - 4096,
        )
        .unwrap();
    }
    file.sync_all().unwrap();
    let sha256 = kiln::util::hash::sha256_file(&path).unwrap();
    std::fs::write(dir.join("SHA256SUMS"), format!("{sha256}  node.img\n")).unwrap();
    TestImage { path, plan, sha256 }
}

/// Deterministic non-zero bytes (xorshift).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

fn opts(image: &TestImage, target: &Path) -> FlashOptions {
    FlashOptions {
        image: image.path.clone(),
        target: target.to_path_buf(),
        yes: true,
        force: false,
        size_bytes: None,
    }
}

fn sha(path: &Path) -> String {
    kiln::util::hash::sha256_file(path).unwrap()
}

/// Runs a tool, panicking with its output unless it succeeds.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The refusal `flash` returned, or a panic saying what it did instead.
fn refusal(result: anyhow::Result<kiln::deliver::flash::FlashReport>) -> Refusal {
    match result {
        Ok(r) => panic!("flash wrote {} instead of refusing", r.target.display()),
        Err(e) => e
            .downcast::<Refusal>()
            .unwrap_or_else(|e| panic!("not a refusal: {e:#}")),
    }
}

/// The table on `target` is the image's, valid, and ends at `size`.
fn assert_table_at_end(target: &Path, image: &TestImage, size: u64) {
    let t = target.to_str().unwrap();
    let verify = run("sgdisk", &["-v", t]);
    assert!(
        verify.contains("No problems found"),
        "sgdisk -v {t}:\n{verify}"
    );
    let dump = run("sfdisk", &["-d", t]);
    let last_usable = size / 512 - 1 - BACKUP_GPT_SECTORS;
    assert!(
        dump.contains(&format!("last-lba: {last_usable}\n")),
        "sfdisk -d {t} (expected last-lba {last_usable}):\n{dump}"
    );
    let table = gpt::read_gpt(&File::open(target).unwrap()).unwrap();
    assert_eq!(table, image.plan.clone().with_disk_size(size).unwrap());
    // The data of every partition is where the image had it.
    let (img, dst) = (
        File::open(&image.path).unwrap(),
        File::open(target).unwrap(),
    );
    for p in &image.plan.partitions {
        for (offset, len) in [
            (p.offset_bytes(), MIB),
            (p.offset_bytes() + p.size_bytes() - 4096, 4096),
        ] {
            let (mut a, mut b) = (vec![0u8; len as usize], vec![0u8; len as usize]);
            img.read_exact_at(&mut a, offset).unwrap();
            dst.read_exact_at(&mut b, offset).unwrap();
            assert!(a == b, "{t}: partition {} differs at byte {offset}", p.name);
        }
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

// ---------------------------------------------------------------- files

#[test]
fn file_target_is_a_verified_copy_of_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let target = dir.path().join("copy.img");
    // Files are never prompted for: no --yes needed.
    let report = flash(
        &FlashOptions {
            yes: false,
            ..opts(&image, &target)
        },
        &SysFacts::default(),
    )
    .unwrap();
    assert_eq!(report.sha256, image.sha256);
    assert_eq!(report.target_bytes, image.plan.disk_size_bytes);
    assert!(!report.reread);
    assert_eq!(
        sha(&target),
        image.sha256,
        "same size: the copy is byte for byte the image"
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o600,
        "images hold node secrets"
    );
    assert_table_at_end(&target, &image, image.plan.disk_size_bytes);
    assert!(
        allocated_bytes(&target) < 32 * MIB,
        "zero blocks of a file are skipped: {} allocated",
        allocated_bytes(&target)
    );
}

#[test]
fn file_target_with_size_gets_the_backup_gpt_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let target = dir.path().join("big.img");
    let report = flash(
        &FlashOptions {
            size_bytes: Some(GIB),
            ..opts(&image, &target)
        },
        &SysFacts::default(),
    )
    .unwrap();
    assert_eq!(report.target_bytes, GIB);
    assert_eq!(std::fs::metadata(&target).unwrap().len(), GIB);
    assert_table_at_end(&target, &image, GIB);
    // The old backup header at the image's end is gone.
    let mut old = [0u8; 512];
    File::open(&target)
        .unwrap()
        .read_exact_at(&mut old, image.plan.disk_size_bytes - 512)
        .unwrap();
    assert!(
        old.iter().all(|&b| b == 0),
        "stale backup GPT header left behind"
    );
}

#[test]
fn existing_file_is_overwritten_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let target = dir.path().join("old.img");
    std::fs::write(&target, "precious").unwrap();
    let r = refusal(flash(&opts(&image, &target), &SysFacts::default()));
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(
        r.reasons[0].contains("exists") && r.reasons[0].contains("--force"),
        "{r}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");

    flash(
        &FlashOptions {
            force: true,
            ..opts(&image, &target)
        },
        &SysFacts::default(),
    )
    .unwrap();
    assert_eq!(sha(&target), image.sha256);
}

#[test]
fn existing_world_readable_file_becomes_private_when_flashed() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let target = dir.path().join("shared.img");
    std::fs::write(&target, "old").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    flash(
        &FlashOptions {
            force: true,
            ..opts(&image, &target)
        },
        &SysFacts::default(),
    )
    .unwrap();
    assert_eq!(sha(&target), image.sha256);
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o600,
        "the image holds the node's WireGuard key and the k3s token"
    );
}

#[test]
fn image_cannot_be_flashed_onto_itself() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let before = sha(&image.path);
    let r = refusal(flash(
        &FlashOptions {
            force: true,
            ..opts(&image, &image.path)
        },
        &SysFacts::default(),
    ));
    assert!(
        r.reasons.iter().any(|r| r.contains("the image itself")),
        "{r}"
    );
    assert_eq!(sha(&image.path), before);
}

#[test]
fn tampered_image_is_refused_before_writing_a_byte() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    // One flipped bit in root-a, after SHA256SUMS was written.
    let root = image.plan.partition("root-a").unwrap().offset_bytes() + 12345;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image.path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, root).unwrap();
    f.write_all_at(&[b[0] ^ 1], root).unwrap();

    let existing = dir.path().join("existing.img");
    std::fs::write(&existing, "precious").unwrap();
    let err = flash(
        &FlashOptions {
            force: true,
            ..opts(&image, &existing)
        },
        &SysFacts::default(),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("does not match SHA256SUMS") && msg.contains(&image.sha256),
        "{msg}"
    );
    assert!(
        msg.contains("rebuild it with `kiln build`") && msg.contains("Nothing was written"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&existing).unwrap(),
        b"precious",
        "target changed"
    );

    let missing = dir.path().join("new.img");
    flash(&opts(&image, &missing), &SysFacts::default()).unwrap_err();
    assert!(
        !missing.exists(),
        "target created although the image is bad"
    );
}

#[test]
fn image_without_sha256sums_is_refused_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let target = dir.path().join("new.img");

    std::fs::write(
        dir.path().join("SHA256SUMS"),
        format!("{}  other.img\n", image.sha256),
    )
    .unwrap();
    let r = refusal(flash(&opts(&image, &target), &SysFacts::default()));
    assert!(
        r.reasons[0].contains("has no line for node.img")
            && r.reasons[0].contains("sha256sum node.img >> SHA256SUMS"),
        "{r}"
    );

    std::fs::remove_file(dir.path().join("SHA256SUMS")).unwrap();
    let r = refusal(flash(&opts(&image, &target), &SysFacts::default()));
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(
        r.reasons[0].contains("no ") && r.reasons[0].contains("SHA256SUMS beside it"),
        "{r}"
    );
    assert!(
        r.reasons[0].contains("kiln build")
            && r.reasons[0].contains("sha256sum node.img > SHA256SUMS"),
        "{r}"
    );
    assert!(r.to_string().ends_with("nothing was written"), "{r}");
    assert!(!target.exists());
}

// --------------------------------------------------------- fake devices

/// A refusal case: its name, how it changes clean facts, and the text its
/// reason must contain.
type Case = (&'static str, fn(&mut TargetFacts), String);

/// Refusal cases a test machine cannot stage for real.
fn fake_cases() -> Vec<Case> {
    vec![
        (
            "mounted partition",
            |f| {
                f.mounts.push(Mount {
                    device: "/dev/sdz1".into(),
                    mount_point: "/media/stick".into(),
                })
            },
            "/dev/sdz1 is mounted on /media/stick".into(),
        ),
        (
            "swap",
            |f| f.swaps.push("/dev/sdz2".into()),
            "/dev/sdz2 is in use as swap: `swapoff /dev/sdz2`".into(),
        ),
        (
            "holders",
            |f| {
                f.holders.push(Holder {
                    device: "sdz3".into(),
                    holder: "dm-0 (vg-data)".into(),
                })
            },
            "sdz3 is held by dm-0 (vg-data) (LVM, RAID or device-mapper)".into(),
        ),
        (
            "system disk",
            |f| f.system.push("/, /usr from /dev/sdz2".into()),
            "holds the running system (/, /usr from /dev/sdz2)".into(),
        ),
        (
            "too small",
            |f| f.size_bytes = 128 * MIB,
            "(128 MiB) is smaller than the image (406 MiB)".into(),
        ),
        (
            "non-removable",
            |f| f.removable = false,
            "is not removable media (Fixed Disk 9000): pass --force".into(),
        ),
    ]
}

fn stick() -> TargetFacts {
    TargetFacts {
        model: Some("Fixed Disk 9000".into()),
        serial: Some("S3R1AL".into()),
        ..TargetFacts::block_device("sdz", 8 * GIB)
    }
}

#[test]
fn fake_device_refusals_each_and_all_at_once_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    // A regular file stands in for the device: the facts say otherwise.
    let target = dir.path().join("sdz");
    std::fs::write(&target, "precious").unwrap();
    let cases = fake_cases();

    for (what, apply, expect) in &cases {
        let mut facts = stick();
        apply(&mut facts);
        let r = refusal(flash(&opts(&image, &target), &FakeFacts(facts)));
        assert_eq!(r.reasons.len(), 1, "{what}: {r}");
        assert!(
            r.reasons[0].contains(expect.as_str()),
            "{what}: {r}\nexpected: {expect}"
        );
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"precious",
            "{what}: target changed"
        );
    }

    let mut all = stick();
    for (_, apply, _) in &cases {
        apply(&mut all);
    }
    let r = refusal(flash(
        &FlashOptions {
            yes: false,
            ..opts(&image, &target)
        },
        &FakeFacts(all),
    ));
    for (what, _, expect) in &cases {
        assert!(
            r.reasons.iter().any(|x| x.contains(expect.as_str())),
            "{what} missing from:\n{r}"
        );
    }
    // Tests run without a terminal on stdin only in CI; either way
    // nothing is written.
    assert!(r.reasons.len() >= cases.len(), "{r}");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
}

/// The device path (no sparse skipping, erase first, first MiB last) on a
/// regular file standing in for a fixed disk, written with --force.
#[test]
fn fake_fixed_disk_is_written_whole_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let target = dir.path().join("sdz");
    let size = 512 * MIB;
    File::create_new(&target).unwrap().set_len(size).unwrap();
    let facts = TargetFacts {
        removable: false,
        ..TargetFacts::block_device("sdz", size)
    };

    let r = refusal(flash(&opts(&image, &target), &FakeFacts(facts.clone())));
    assert!(
        r.reasons.len() == 1 && r.reasons[0].contains("--force"),
        "{r}"
    );
    assert!(
        allocated_bytes(&target) == 0,
        "refused, yet something was written"
    );

    let report = flash(
        &FlashOptions {
            force: true,
            ..opts(&image, &target)
        },
        &FakeFacts(facts),
    )
    .unwrap();
    assert_eq!(report.target_bytes, size);
    assert!(!report.reread, "not a block device, so no BLKRRPART");
    assert!(
        allocated_bytes(&target) >= image.plan.disk_size_bytes,
        "devices get every block: {} allocated",
        allocated_bytes(&target)
    );
    assert_table_at_end(&target, &image, size);
}

/// A write that dies half-way (here: a full file system under a fake
/// device) leaves no partition table, neither the image's nor the old one.
#[test]
fn interrupted_write_leaves_no_partition_table() {
    if !common::have("mount") {
        eprintln!("skipped: `mount` is not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let small = tempfile::tempdir().unwrap();
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=64m",
            "kiln-flash-test",
            small.path().to_str().unwrap(),
        ],
    );
    let _mounted = Mounted(small.path().to_path_buf());

    // The "device" held a valid old table (primary and backup).
    let size = 512 * MIB;
    let target = small.path().join("sdz");
    let mut f = File::create_new(&target).unwrap();
    f.set_len(size).unwrap();
    gpt::write_gpt(
        &mut f,
        &gpt::plan_partitions("old/disk", 260, 100, 100, 40)
            .unwrap()
            .with_disk_size(size)
            .unwrap(),
    )
    .unwrap();
    drop(f);
    assert!(gpt::read_gpt(&File::open(&target).unwrap()).is_ok());

    let err = flash(
        &opts(&image, &target),
        &FakeFacts(TargetFacts::block_device("sdz", size)),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("No space left"), "{err:#}");
    let f = File::open(&target).unwrap();
    assert!(
        gpt::read_gpt(&f).is_err(),
        "a primary GPT survived the interrupted write"
    );
    let (mut head, mut tail) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    f.read_exact_at(&mut head, 0).unwrap();
    f.read_exact_at(&mut tail, size - MIB).unwrap();
    assert!(head.iter().all(|&b| b == 0), "first MiB not zero");
    assert!(
        tail.iter().all(|&b| b == 0),
        "old backup GPT at the end survived"
    );
    let out = Command::new("sfdisk")
        .arg("-d")
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "sfdisk still finds a table:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A file kiln created and could not finish is removed.
    let tiny = tempfile::tempdir().unwrap();
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=2m",
            "kiln-flash-test",
            tiny.path().to_str().unwrap(),
        ],
    );
    let _tiny_mounted = Mounted(tiny.path().to_path_buf());
    let new = tiny.path().join("new.img");
    let err = flash(&opts(&image, &new), &SysFacts::default()).unwrap_err();
    assert!(format!("{err:#}").contains("No space left"), "{err:#}");
    assert!(!new.exists(), "half-written file left behind");
}

// --------------------------------------------------------- loop devices

/// Whether the running kernel parses GPTs (CONFIG_EFI_PARTITION); true
/// when its configuration cannot be found.
fn kernel_reads_gpt() -> bool {
    use std::io::Read as _;
    let mut config = String::new();
    if let Ok(f) = File::open("/proc/config.gz") {
        let _ = flate2::read::GzDecoder::new(f).read_to_string(&mut config);
    } else {
        let release = run("uname", &["-r"]);
        config =
            std::fs::read_to_string(format!("/boot/config-{}", release.trim())).unwrap_or_default();
    }
    config.is_empty() || config.lines().any(|l| l == "CONFIG_EFI_PARTITION=y")
}

/// A loop device over a sparse temp file, detached on drop.
struct Loop {
    dev: String,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    /// None (with a message) only if `losetup` is not installed.
    fn new(size: u64) -> Option<Loop> {
        if !common::have("losetup") {
            eprintln!("skipped: `losetup` is not available (apt-get install mount)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        File::create_new(&backing).unwrap().set_len(size).unwrap();
        let dev = run(
            "losetup",
            &["--find", "--show", "--partscan", backing.to_str().unwrap()],
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Some(Loop {
            dev,
            backing,
            _dir: dir,
        })
    }

    fn path(&self) -> &Path {
        Path::new(&self.dev)
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A mount, unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The real facts, but removable: a loop device posing as a USB stick.
struct AsRemovable;

impl DeviceFacts for AsRemovable {
    fn inspect(&self, target: &Path) -> anyhow::Result<TargetFacts> {
        let mut f = SysFacts::default().inspect(target)?;
        f.removable = true;
        Ok(f)
    }
}

#[test]
fn loop_device_is_written_whole_verified_grown_and_reread() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let Some(lo) = Loop::new(GIB) else { return };
    let facts = SysFacts::default().inspect(lo.path()).unwrap();
    assert_eq!(
        (facts.size_bytes, facts.removable),
        (GIB, false),
        "{facts:#?}"
    );

    let report = flash(&opts(&image, lo.path()), &AsRemovable).unwrap();
    assert_eq!((report.target_bytes, report.reread), (GIB, true));
    assert_table_at_end(lo.path(), &image, GIB);
    assert!(
        allocated_bytes(&lo.backing) >= image.plan.disk_size_bytes,
        "devices get every block: {} allocated",
        allocated_bytes(&lo.backing)
    );
    // The kernel re-read the table: the four partitions exist, state last.
    if !kernel_reads_gpt() {
        return eprintln!(
            "skipped the partition check: this kernel has no CONFIG_EFI_PARTITION, so BLKRRPART finds no partitions"
        );
    }
    let sys = Path::new("/sys/class/block").join(lo.name());
    for n in 1..=4 {
        assert!(
            sys.join(format!("{}p{n}", lo.name())).exists(),
            "partition {n} of {} not seen by the kernel",
            lo.dev
        );
    }
    let state_sectors: u64 = std::fs::read_to_string(sys.join(format!("{}p4/size", lo.name())))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        state_sectors * 512,
        image.plan.partition("state").unwrap().size_bytes()
    );
}

#[test]
fn loop_device_too_small_or_fixed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let Some(lo) = Loop::new(256 * MIB) else {
        return;
    };
    let r = refusal(flash(&opts(&image, lo.path()), &SysFacts::default()));
    assert_eq!(r.reasons.len(), 2, "{r}");
    assert!(
        r.reasons[0].contains("(256 MiB) is smaller than the image (406 MiB)"),
        "{r}"
    );
    assert!(
        r.reasons[1].contains("is not removable media") && r.reasons[1].contains("--force"),
        "{r}"
    );
    assert_eq!(
        allocated_bytes(&lo.backing),
        0,
        "refused, yet something was written"
    );

    // Nor can the file behind the loop device be overwritten.
    let r = refusal(flash(
        &FlashOptions {
            force: true,
            ..opts(&image, &lo.backing)
        },
        &SysFacts::default(),
    ));
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(
        r.reasons[0].contains(&format!("backs the loop device {}", lo.dev)),
        "{r}"
    );
    assert_eq!(
        allocated_bytes(&lo.backing),
        0,
        "refused, yet something was written"
    );
}

#[test]
fn loop_device_mounted_whole_is_refused_and_system_disk_too() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let Some(lo) = Loop::new(GIB) else { return };
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &lo.dev,
        ],
    );
    let mnt = tempfile::tempdir().unwrap();
    run(
        "mount",
        &["-o", "ro", &lo.dev, mnt.path().to_str().unwrap()],
    );
    let _mounted = Mounted(mnt.path().to_path_buf());
    let before = sha(&lo.backing);

    let r = refusal(flash(
        &FlashOptions {
            force: true,
            ..opts(&image, lo.path())
        },
        &SysFacts::default(),
    ));
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(
        r.reasons[0].contains(&format!(
            "{} is mounted on {}",
            lo.dev,
            mnt.path().display()
        )),
        "{r}"
    );

    // The same mount taken for the running system's.
    let system = SysFacts {
        system_paths: vec![mnt.path().join("lost+found")],
    };
    let r = refusal(flash(
        &FlashOptions {
            force: true,
            ..opts(&image, lo.path())
        },
        &system,
    ));
    assert!(
        r.reasons
            .iter()
            .any(|x| x.contains("holds the running system")
                && x.contains(&format!("from {}", lo.dev))),
        "{r}"
    );
    assert_eq!(sha(&lo.backing), before, "backing file changed");
}

#[test]
fn loop_device_with_a_mounted_partition_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let Some(lo) = Loop::new(GIB) else { return };
    flash(&opts(&image, lo.path()), &AsRemovable).unwrap();
    let part = format!("{}p4", lo.dev);
    if !Path::new(&part).exists() {
        // A kernel without GPT support: add the partitions through BLKPG.
        run("partx", &["--add", &lo.dev]);
    }
    run(
        "mkfs.ext4",
        &["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", &part],
    );
    let mnt = tempfile::tempdir().unwrap();
    run("mount", &["-o", "ro", &part, mnt.path().to_str().unwrap()]);
    let _mounted = Mounted(mnt.path().to_path_buf());
    let before = sha(&lo.backing);

    let r = refusal(flash(&opts(&image, lo.path()), &AsRemovable));
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(
        r.reasons[0].contains(&format!("{part} is mounted on {}", mnt.path().display())),
        "{r}"
    );
    // Flashing the partition itself is refused for that and for being one.
    let r = refusal(flash(&opts(&image, Path::new(&part)), &AsRemovable));
    assert!(
        r.reasons
            .iter()
            .any(|x| x.contains(&format!("is a partition of {}", lo.name()))),
        "{r}"
    );
    assert_eq!(sha(&lo.backing), before, "backing file changed");
}

#[test]
fn loop_device_used_as_swap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let Some(lo) = Loop::new(GIB) else { return };
    run("mkswap", &[&lo.dev]);
    let on = Command::new("swapon").arg(&lo.dev).output().unwrap();
    if !on.status.success() {
        eprintln!(
            "skipped: swapon {} failed here: {}",
            lo.dev,
            String::from_utf8_lossy(&on.stderr)
        );
        return;
    }
    struct SwapOff<'a>(&'a str);
    impl Drop for SwapOff<'_> {
        fn drop(&mut self) {
            let _ = Command::new("swapoff").arg(self.0).status();
        }
    }
    let _swap = SwapOff(&lo.dev);
    // The kernel may swap to it meanwhile, but never writes the header
    // page; kiln's first write would zero it.
    let header = || {
        let mut page = vec![0u8; 4096];
        File::open(&lo.backing)
            .unwrap()
            .read_exact_at(&mut page, 0)
            .unwrap();
        page
    };
    let before = header();
    assert_eq!(&before[4086..], b"SWAPSPACE2");
    let r = refusal(flash(&opts(&image, lo.path()), &AsRemovable));
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(
        r.reasons[0].contains(&format!("{} is in use as swap", lo.dev)),
        "{r}"
    );
    assert!(header() == before, "swap header changed");
}

#[test]
fn loop_device_held_by_device_mapper_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let Some(lo) = Loop::new(GIB) else { return };
    let name = format!("kiln-flash-test-{}", std::process::id());
    let table = format!("0 {} linear {} 0", GIB / 512, lo.dev);
    let made = Command::new("dmsetup")
        .args(["create", &name, "--table", &table])
        .output();
    match made {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return eprintln!(
                "skipped: dmsetup create failed here: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Err(e) => return eprintln!("skipped: dmsetup is not available: {e}"),
    }
    struct DmRemove(String);
    impl Drop for DmRemove {
        fn drop(&mut self) {
            let _ = Command::new("dmsetup").args(["remove", &self.0]).status();
        }
    }
    let _dm = DmRemove(name.clone());
    let r = refusal(flash(&opts(&image, lo.path()), &AsRemovable));
    assert_eq!(r.reasons.len(), 1, "{r}");
    assert!(
        r.reasons[0].contains(&format!("{} is held by dm-", lo.name()))
            && r.reasons[0].contains(&format!("({name})")),
        "{r}"
    );
    assert_eq!(
        allocated_bytes(&lo.backing),
        0,
        "refused, yet something was written"
    );
}

// ------------------------------------------------------------ the binary

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_flashes_a_file_and_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let img = image.path.to_str().unwrap();

    let file = dir.path().join("big.img");
    let out = kiln(&["flash", img, file.to_str().unwrap(), "--size", "1G"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", file.display())
    );
    assert_table_at_end(&file, &image, GIB);

    let out = kiln(&["flash", img, file.to_str().unwrap(), "--size", "32GB"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a bad size");
    assert!(String::from_utf8_lossy(&out.stderr).contains("powers of 1024"));

    let Some(lo) = Loop::new(GIB) else { return };
    // stdin is not a terminal here: without --yes kiln cannot ask.
    let out = kiln(&["flash", img, &lo.dev]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not removable media")
            && err.contains("pass --yes")
            && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(
        allocated_bytes(&lo.backing),
        0,
        "refused, yet something was written"
    );

    let out = kiln(&["flash", img, &lo.dev, "--yes", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_table_at_end(lo.path(), &image, GIB);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("verified") && err.contains("re-read the partition table"),
        "{err}"
    );
}
