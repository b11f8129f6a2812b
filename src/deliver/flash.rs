//! `kiln flash`: write a built image to a USB stick, a disk or a file,
//! safely, and verify it.
//!
//! Deciding is pure: [`check`] turns what is known about the image
//! ([`ImageFacts`]) and the target ([`TargetFacts`]) into every reason to
//! refuse, so all of them are reported at once. Facts about a target come
//! from a [`DeviceFacts`]: [`SysFacts`] reads /sys and /proc; [`FakeFacts`]
//! stands in for devices a test machine cannot have (a USB stick, the
//! system disk).
//!
//! Writing leaves no plausible half-image behind: the first and last MiB of
//! a device are zeroed first (no primary and no backup partition table),
//! the image goes on from its second MiB, and its first MiB (protective MBR
//! and primary GPT) is written last. Then the written bytes are read back
//! past the page cache and hashed, the backup GPT moves to the end of the
//! target so the state partition can grow, and the kernel re-reads the
//! partition table. (coreos-installer `ensure_exclusive_access`; mkosi
//! `burn`.)

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{BufRead, IsTerminal as _, Seek as _, SeekFrom, Write};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{
    FileExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sha2::{Digest as _, Sha256};

use crate::image::gpt::{self, PartitionPlan, SECTOR_BYTES};

use crate::util::cancel::{Cancel, Interrupted};
use crate::util::size::MIB;

/// Size of the read and write buffers.
pub const BUFFER_BYTES: usize = 4 * MIB as usize;

/// The image's first bytes, written last: the protective MBR and primary
/// GPT (34 sectors), padded to the 1 MiB where the first partition starts.
pub const HEAD_BYTES: u64 = gpt::ALIGNMENT_BYTES;

/// Bytes zeroed at the end of a device before writing, so that its old
/// backup GPT (last 33 sectors) cannot be mistaken for a table either.
pub const TAIL_BYTES: u64 = MIB;

/// Granularity of hole punching in file targets: zero blocks of this size
/// are skipped (devices get every block).
pub const SPARSE_BLOCK_BYTES: usize = 64 * 1024;

/// On devices, write-back is forced every this many bytes: the progress
/// bar then shows what reached the device, not what reached the page
/// cache, and a slow stick does not pile up gigabytes of dirty pages.
pub const SYNC_EVERY_BYTES: u64 = 256 * MIB;

/// Mount points whose disks hold the running system and are never written.
pub const SYSTEM_PATHS: [&str; 5] = ["/", "/usr", "/boot", "/boot/efi", "/var"];

/// `BLKRRPART`, `_IO(0x12, 95)` in `<linux/fs.h>`: re-read the partition
/// table (the libc crate does not define it).
const BLKRRPART: libc::Ioctl = 0x125f;

/// How often to retry `BLKRRPART` while the kernel answers EBUSY (a
/// prober such as udev may hold a partition open for a moment).
const REREAD_ATTEMPTS: u32 = 10;
const REREAD_DELAY: Duration = Duration::from_millis(200);

/// A size in bytes as given on the command line: a whole number with an
/// optional K, M, G or T suffix (powers of 1024, as `truncate -s` reads
/// them), a whole number of 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}` is not a size: write a whole number with an optional K, M, G or T suffix (powers of 1024), like 32G"
            )
        };
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(digits);
        let n: u64 = number.parse().map_err(|_| bad())?;
        let shift = match unit.to_ascii_lowercase().as_str() {
            "" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            _ => return Err(bad()),
        };
        let bytes = n
            .checked_mul(1 << shift)
            .ok_or_else(|| format!("`{s}` is too large"))?;
        if bytes == 0 || !bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(format!(
                "`{s}` is not a whole, non-zero number of {SECTOR_BYTES}-byte sectors: use a K, M or G suffix, like 32G"
            ));
        }
        Ok(ByteSize(bytes))
    }
}

/// `406 MiB`, `7.5 GiB`: sizes for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What `kiln flash` was asked to do.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    /// The image; `SHA256SUMS` must be beside it.
    pub image: PathBuf,
    /// A whole disk or a regular file (created if missing).
    pub target: PathBuf,
    /// Do not ask before erasing a device.
    pub yes: bool,
    /// Write to a non-removable disk, or over an existing file.
    pub force: bool,
    /// Size of a file target [default: the image's size]; not for devices.
    pub size_bytes: Option<u64>,
}

/// What the write target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetKind {
    /// Nothing there yet: a file to create.
    #[default]
    Missing,
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
    /// A directory, character device, socket, …
    Other,
}

/// A mounted file system on the target or one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `/dev/sdb1`
    pub device: String,
    pub mount_point: PathBuf,
}

/// A device stacked on the target or one of its partitions (LVM, RAID,
/// device-mapper: /sys/class/block/X/holders).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The held device (`sdb2`).
    pub device: String,
    /// The holder (`dm-0 (vg-root)`, `md127`).
    pub holder: String,
}

/// Everything kiln checks about a target before writing a byte. Gathering
/// it only reads /sys, /proc and file metadata; the device is not opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetFacts {
    pub kind: TargetKind,
    /// Kernel name of a block device (`sdb`, `loop3`); empty for files.
    pub name: String,
    /// The whole disk a partition belongs to.
    pub partition_of: Option<String>,
    /// Size of a device or an existing file.
    pub size_bytes: u64,
    /// Logical sector size of a device (images are laid out for 512).
    pub logical_sector_bytes: u64,
    pub read_only: bool,
    /// Removable media (sysfs `removable`) or attached over USB.
    pub removable: bool,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// Mounted file systems on the device or any of its partitions.
    pub mounts: Vec<Mount>,
    /// The device, a partition or the file in use as swap (/proc/swaps).
    pub swaps: Vec<String>,
    pub holders: Vec<Holder>,
    /// System paths on this disk: `/, /usr (from /dev/sda2)`.
    pub system: Vec<String>,
    /// Loop devices backed by this file (`/dev/loop0`).
    pub loop_devices: Vec<String>,
    /// (st_dev, st_ino) of a file, to catch writing an image onto itself.
    pub file_id: Option<(u64, u64)>,
}

impl TargetFacts {
    /// A clean, removable whole disk of `size_bytes` with 512-byte sectors:
    /// the starting point for fake facts.
    pub fn block_device(name: &str, size_bytes: u64) -> TargetFacts {
        TargetFacts {
            kind: TargetKind::BlockDevice,
            name: name.to_string(),
            size_bytes,
            logical_sector_bytes: SECTOR_BYTES,
            removable: true,
            ..TargetFacts::default()
        }
    }
}

/// Where facts about a target come from.
pub trait DeviceFacts {
    /// What is at `target` and what uses it. Must not write anything.
    fn inspect(&self, target: &Path) -> anyhow::Result<TargetFacts>;
}

/// The same facts for every path: for tests that need a device the machine
/// does not have. Never use it outside tests.
#[derive(Debug, Clone)]
pub struct FakeFacts(pub TargetFacts);

impl DeviceFacts for FakeFacts {
    fn inspect(&self, _target: &Path) -> anyhow::Result<TargetFacts> {
        Ok(self.0.clone())
    }
}

/// What is known about the image before writing.
#[derive(Debug, Clone)]
pub struct ImageFacts {
    pub path: PathBuf,
    pub size_bytes: u64,
    /// The sha256 listed in `SHA256SUMS` beside the image, or why there is none.
    pub expected_sha256: Result<String, String>,
    /// The image's partition table, or why it has none.
    pub plan: Result<PartitionPlan, String>,
    /// (st_dev, st_ino)
    pub file_id: (u64, u64),
}

/// Reads the image's size, its `SHA256SUMS` line and its GPT (not its
/// checksum: that is [`verify_image`]).
pub fn inspect_image(path: &Path) -> anyhow::Result<ImageFacts> {
    let file = File::open(path).with_context(|| format!("opening image {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading image {}", path.display()))?;
    ensure!(
        meta.is_file(),
        "image {} is not a regular file",
        path.display()
    );
    Ok(ImageFacts {
        path: path.to_path_buf(),
        size_bytes: meta.len(),
        expected_sha256: expected_sha256(path),
        plan: gpt::read_gpt(&file).map_err(|e| format!("{e:#}")),
        file_id: (meta.dev(), meta.ino()),
    })
}

/// The sha256 that `SHA256SUMS` in the image's directory lists for it.
fn expected_sha256(image: &Path) -> Result<String, String> {
    let dir = image
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let sums = dir.join("SHA256SUMS");
    let text = match std::fs::read_to_string(&sums) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{} cannot be checked: there is no {} beside it; flash images from a `kiln build` output directory, \
                 or, if you trust this image, write one with `cd {} && sha256sum {name} > SHA256SUMS`",
                image.display(),
                sums.display(),
                dir.display()
            ));
        }
        Err(e) => return Err(format!("reading {}: {e}", sums.display())),
    };
    crate::util::hash::sha256sums_lookup(&text, &name).ok_or_else(|| {
        format!(
            "{} has no line for {name}, so the image cannot be checked: rebuild it with `kiln build`, \
             or, if you trust it, add one with `sha256sum {name} >> SHA256SUMS`",
            sums.display()
        )
    })
}

/// Every reason not to write `image` to `target`; empty means go ahead.
/// `can_prompt`: stdin is a terminal, so kiln can ask when `--yes` is absent.
pub fn check(
    image: &ImageFacts,
    target: &TargetFacts,
    opts: &FlashOptions,
    can_prompt: bool,
) -> Vec<String> {
    let t = opts.target.display();
    let mut reasons = Vec::new();
    if let Err(e) = &image.expected_sha256 {
        reasons.push(e.clone());
    }
    if let Err(e) = &image.plan {
        reasons.push(format!(
            "{} is not a kiln disk image: {e}",
            image.path.display()
        ));
    }
    let image_size = human(image.size_bytes);
    match target.kind {
        TargetKind::Other => {
            reasons.push(format!("{t} is neither a block device nor a regular file"))
        }
        TargetKind::Missing | TargetKind::File => {
            if target.kind == TargetKind::File && !opts.force {
                reasons.push(format!(
                    "{t} exists ({}): pass --force to overwrite it",
                    human(target.size_bytes)
                ));
            }
            if target.file_id == Some(image.file_id) {
                reasons.push(format!("{t} is the image itself"));
            }
            if let Some(size) = opts.size_bytes.filter(|&s| s < image.size_bytes) {
                reasons.push(format!(
                    "--size {} is smaller than the image ({image_size})",
                    human(size)
                ));
            }
            for s in &target.swaps {
                reasons.push(format!("{s} is in use as swap: `swapoff {s}` first"));
            }
            for l in &target.loop_devices {
                reasons.push(format!(
                    "{t} backs the loop device {l}: detach it first (`losetup -d {l}`)"
                ));
            }
        }
        TargetKind::BlockDevice => {
            if opts.size_bytes.is_some() {
                reasons.push(format!(
                    "--size is for regular files only; {t} is a device of {}",
                    human(target.size_bytes)
                ));
            }
            if let Some(disk) = &target.partition_of {
                reasons.push(format!(
                    "{t} is a partition of {disk}: flash the whole disk, /dev/{disk}"
                ));
            }
            if target.read_only {
                reasons.push(format!("{t} is read-only (a write-protect switch?)"));
            }
            if target.logical_sector_bytes != SECTOR_BYTES {
                reasons.push(format!(
                    "{t} has {}-byte logical sectors; kiln images are laid out for {SECTOR_BYTES}-byte sectors",
                    target.logical_sector_bytes
                ));
            }
            if target.size_bytes < image.size_bytes {
                reasons.push(format!(
                    "{t} ({}) is smaller than the image ({image_size})",
                    human(target.size_bytes)
                ));
            }
            for m in &target.mounts {
                // Unmounting the running system is no advice to give.
                let hint = if target.system.is_empty() {
                    format!(": unmount it first (`umount {}`)", m.mount_point.display())
                } else {
                    String::new()
                };
                reasons.push(format!(
                    "{} is mounted on {}{hint}",
                    m.device,
                    m.mount_point.display()
                ));
            }
            for s in &target.swaps {
                reasons.push(format!("{s} is in use as swap: `swapoff {s}` first"));
            }
            for h in &target.holders {
                reasons.push(format!(
                    "{} is held by {} (LVM, RAID or device-mapper): stop it first (`vgchange -an`, `mdadm --stop`, `dmsetup remove`)",
                    h.device, h.holder
                ));
            }
            for s in &target.system {
                reasons.push(format!(
                    "{t} holds the running system ({s}): choose another device"
                ));
            }
            if !target.removable && !opts.force {
                reasons.push(format!(
                    "{t} is not removable media{}: pass --force if you really mean to erase this disk",
                    target.model.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
                ));
            }
            if !opts.yes && !can_prompt {
                reasons.push(format!(
                    "stdin is not a terminal, so kiln cannot ask before erasing {t}: pass --yes"
                ));
            }
        }
    }
    reasons
}

/// The refusal: every reason, and the promise that nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub image: PathBuf,
    pub target: PathBuf,
    pub reasons: Vec<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "refusing to write {} to {}:",
            self.image.display(),
            self.target.display()
        )?;
        for r in &self.reasons {
            writeln!(f, "  - {r}")?;
        }
        write!(f, "nothing was written")
    }
}

impl std::error::Error for Refusal {}

fn refuse_if_any(opts: &FlashOptions, reasons: Vec<String>) -> anyhow::Result<()> {
    if reasons.is_empty() {
        return Ok(());
    }
    Err(Refusal {
        image: opts.image.clone(),
        target: opts.target.clone(),
        reasons,
    }
    .into())
}

/// What was written.
#[derive(Debug, Clone)]
pub struct FlashReport {
    pub target: PathBuf,
    pub image_bytes: u64,
    /// Size of the target, where the backup GPT now ends.
    pub target_bytes: u64,
    pub sha256: String,
    /// Whether the kernel re-read the partition table (block devices only).
    pub reread: bool,
}

/// Checks, confirms, writes, verifies and fixes up: `kiln flash`.
pub fn flash(opts: &FlashOptions, facts: &dyn DeviceFacts) -> anyhow::Result<FlashReport> {
    flash_cancellable(opts, facts, &Cancel::default())
}

/// As [`flash`]; when `cancel` is set the write stops at the next buffer
/// (the first MiB is written last, so the target holds no partition
/// table) and the result is an interruption.
pub fn flash_cancellable(
    opts: &FlashOptions,
    facts: &dyn DeviceFacts,
    cancel: &Cancel,
) -> anyhow::Result<FlashReport> {
    let t = opts.target.display().to_string();
    let image = inspect_image(&opts.image)?;
    let target = facts
        .inspect(&opts.target)
        .with_context(|| format!("inspecting {t}"))?;
    let can_prompt = std::io::stdin().is_terminal();
    // Cheap checks first, so every reason shows up in a second; then the
    // full checksum, still before a single byte is written.
    refuse_if_any(opts, check(&image, &target, opts, can_prompt))?;
    let sha256 = verify_image(&image, &t)?;
    cancel.check()?;
    let device = target.kind == TargetKind::BlockDevice;
    if device && !opts.yes {
        confirm(
            &mut std::io::stdin().lock(),
            &mut std::io::stderr(),
            &opts.target,
            &target,
            &image,
        )?;
    }

    let file = open_target(opts, &target)?;
    let result = write_and_verify(opts, facts, &image, &target, file, &sha256, cancel);
    if result.is_err() && target.kind == TargetKind::Missing {
        // A file kiln created and did not finish is no use to anyone.
        let _ = std::fs::remove_file(&opts.target);
    }
    result
}

/// Everything after the target is open: size, write, read back, fix up.
fn write_and_verify(
    opts: &FlashOptions,
    facts: &dyn DeviceFacts,
    image: &ImageFacts,
    target: &TargetFacts,
    mut file: File,
    sha256: &str,
    cancel: &Cancel,
) -> anyhow::Result<FlashReport> {
    let t = opts.target.display().to_string();
    let device = target.kind == TargetKind::BlockDevice;
    let fd_is_device = file
        .metadata()
        .with_context(|| format!("inspecting {t}"))?
        .file_type()
        .is_block_device();
    let target_bytes = if device {
        // Now that kiln holds the device exclusively nothing new can mount
        // it; look again for anything that changed while hashing or asking.
        let again = facts
            .inspect(&opts.target)
            .with_context(|| format!("inspecting {t}"))?;
        refuse_if_any(
            opts,
            check(
                image,
                &again,
                &FlashOptions {
                    yes: true,
                    ..opts.clone()
                },
                true,
            ),
        )?;
        if fd_is_device {
            let rdev = file
                .metadata()
                .with_context(|| format!("inspecting {t}"))?
                .rdev();
            let opened = (libc::major(rdev), libc::minor(rdev));
            let inspected = std::fs::metadata(&opts.target).map(|m| m.rdev()).ok();
            ensure!(
                inspected == Some(rdev),
                "{t} changed while kiln opened it (now {}:{}); nothing was written",
                opened.0,
                opened.1
            );
        }
        let size = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("reading the size of {t}"))?;
        ensure!(
            size >= image.size_bytes,
            "{t} ({}) is smaller than the image ({}); nothing was written",
            human(size),
            human(image.size_bytes)
        );
        size
    } else {
        let size = opts.size_bytes.unwrap_or(image.size_bytes);
        // Emptied, then grown: all holes, so no old table survives and
        // skipped zero blocks read back as zeros.
        file.set_len(0)
            .and_then(|_| file.set_len(size))
            .with_context(|| format!("sizing {t} to {}", human(size)))?;
        size
    };

    write_image(image, &file, &t, target_bytes, device, cancel)?;
    verify_written(&file, &t, image.size_bytes, sha256)?;
    if target_bytes > image.size_bytes {
        gpt::relocate_backup(&mut file, target_bytes)
            .with_context(|| format!("moving the backup GPT to the end of {t}"))?;
        file.sync_all().with_context(|| format!("syncing {t}"))?;
    }
    check_table(&file, &t, image, target_bytes)?;
    let reread = fd_is_device && reread_partitions(&file, &t);
    drop(file);
    if !device {
        sync_parent(&opts.target);
    }
    eprintln!(
        "kiln: wrote {} ({}) to {t} and verified it (sha256 {sha256}); the backup GPT ends the {} target{}",
        image.path.display(),
        human(image.size_bytes),
        human(target_bytes),
        if reread {
            "; the kernel re-read the partition table"
        } else {
            ""
        }
    );
    Ok(FlashReport {
        target: opts.target.clone(),
        image_bytes: image.size_bytes,
        target_bytes,
        sha256: sha256.to_string(),
        reread,
    })
}

/// Hashes the image and compares with `SHA256SUMS`.
fn verify_image(image: &ImageFacts, target: &str) -> anyhow::Result<String> {
    let expected = image
        .expected_sha256
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let file = File::open(&image.path)
        .with_context(|| format!("opening image {}", image.path.display()))?;
    let got = hash_range(&file, image.size_bytes, "checking image")
        .with_context(|| format!("reading image {}", image.path.display()))?;
    if &got != expected {
        bail!(
            "{} does not match SHA256SUMS (expected {expected}, got {got}): the image is damaged or was changed after \
             the build; rebuild it with `kiln build` or copy it again. Nothing was written to {target}",
            image.path.display()
        );
    }
    Ok(got)
}

/// Shows what is about to be erased and waits for `yes`.
fn confirm(
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    path: &Path,
    target: &TargetFacts,
    image: &ImageFacts,
) -> anyhow::Result<()> {
    let unknown = || "unknown".to_string();
    write!(
        out,
        "kiln: about to erase {} and write {} to it\n  model:     {}\n  serial:    {}\n  size:      {} ({} bytes)\n  removable: {}\n\
         Type \"yes\" to erase {}: ",
        path.display(),
        image.path.display(),
        target.model.clone().unwrap_or_else(unknown),
        target.serial.clone().unwrap_or_else(unknown),
        human(target.size_bytes),
        target.size_bytes,
        if target.removable {
            "yes"
        } else {
            "no (--force)"
        },
        path.display(),
    )?;
    out.flush()?;
    let mut answer = String::new();
    input
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    let answer = answer.trim();
    ensure!(
        answer == "yes",
        "not confirmed (answer {answer:?}, expected \"yes\"); nothing was written to {}",
        path.display()
    );
    Ok(())
}

/// Opens the target for writing: a device exclusively (the kernel refuses
/// while anything has it claimed: a mount, swap, a holder), a new file
/// 0600 (images hold node secrets), an existing file made 0600 before a
/// byte of the image reaches it (whatever mode it had).
fn open_target(opts: &FlashOptions, target: &TargetFacts) -> anyhow::Result<File> {
    let t = opts.target.display();
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    match target.kind {
        TargetKind::BlockDevice => {
            o.custom_flags(libc::O_EXCL);
            o.open(&opts.target).with_context(|| {
                format!("opening {t} exclusively: something still uses it (a mounted partition, swap, LVM/RAID/dm or another program); nothing was written")
            })
        }
        TargetKind::Missing => o
            .create_new(true)
            .mode(0o600)
            .open(&opts.target)
            .with_context(|| format!("creating {t}")),
        TargetKind::File => {
            let f = o
                .open(&opts.target)
                .with_context(|| format!("opening {t}"))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {t} private (0600) before writing node secrets to it; nothing was written"))?;
            Ok(f)
        }
        TargetKind::Other => bail!("{t} is neither a block device nor a regular file"),
    }
}

/// Erases the partition tables, writes all but the first MiB, then the
/// first MiB. On devices every block is written; files skip zero blocks
/// (they were emptied first, so those read back as zeros).
fn write_image(
    image: &ImageFacts,
    target: &File,
    t: &str,
    target_bytes: u64,
    device: bool,
    cancel: &Cancel,
) -> anyhow::Result<()> {
    let src = File::open(&image.path)
        .with_context(|| format!("opening image {}", image.path.display()))?;
    let len = image.size_bytes;
    let head = HEAD_BYTES.min(len);
    let sync = |what: &str| {
        target
            .sync_data()
            .with_context(|| format!("syncing {t} ({what})"))
    };
    if device {
        let zeros = vec![0u8; MIB as usize];
        let tail = target_bytes.saturating_sub(TAIL_BYTES);
        for (offset, n) in [
            (0, HEAD_BYTES.min(target_bytes)),
            (tail, target_bytes - tail),
        ] {
            target
                .write_all_at(&zeros[..n as usize], offset)
                .with_context(|| format!("erasing {t} at byte {offset}"))?;
        }
        sync("after erasing the partition tables")?;
    }

    let meter = Meter::new("writing", len);
    meter.inc(head);
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut offset = head;
    let mut unsynced = 0;
    while offset < len {
        if cancel.is_cancelled() {
            return Err(Interrupted::saying(format!(
                "interrupted: {t} is partly written and holds no partition table"
            ))
            .into());
        }
        let n = (len - offset).min(BUFFER_BYTES as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset)
            .with_context(|| format!("reading image {} at byte {offset}", image.path.display()))?;
        if device {
            target
                .write_all_at(&buf[..n], offset)
                .with_context(|| format!("writing {t} at byte {offset}"))?;
        } else {
            for (i, block) in buf[..n].chunks(SPARSE_BLOCK_BYTES).enumerate() {
                if !is_zero(block) {
                    let at = offset + (i * SPARSE_BLOCK_BYTES) as u64;
                    target
                        .write_all_at(block, at)
                        .with_context(|| format!("writing {t} at byte {at}"))?;
                }
            }
        }
        offset += n as u64;
        unsynced += n as u64;
        if device && unsynced >= SYNC_EVERY_BYTES {
            sync("while writing")?;
            unsynced = 0;
        }
        meter.inc(n as u64);
    }
    sync("after writing all but the first MiB")?;
    src.read_exact_at(&mut buf[..head as usize], 0)
        .with_context(|| format!("reading image {}", image.path.display()))?;
    target
        .write_all_at(&buf[..head as usize], 0)
        .with_context(|| format!("writing the partition table to {t}"))?;
    target.sync_all().with_context(|| format!("syncing {t}"))?;
    meter.finish();
    Ok(())
}

fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Reads the first `len` bytes back, past the page cache, and compares
/// their sha256 with the image's.
fn verify_written(target: &File, t: &str, len: u64, sha256: &str) -> anyhow::Result<()> {
    // Drop the (clean, synced) cached pages so the read comes from the
    // device; advice only, so a failure just means a cached read.
    let rc = unsafe { libc::posix_fadvise(target.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        log::debug!("posix_fadvise(DONTNEED) on {t}: error {rc}");
    }
    let got = hash_range(target, len, "verifying").with_context(|| format!("reading {t} back"))?;
    ensure!(
        got == sha256,
        "{t} does not read back as the image (sha256 {got}, expected {sha256}): the device may be failing or fake \
         (a stick smaller than it claims); try another one"
    );
    Ok(())
}

/// The table on the target is the image's, ending at the target's end.
fn check_table(
    target: &File,
    t: &str,
    image: &ImageFacts,
    target_bytes: u64,
) -> anyhow::Result<()> {
    let written = gpt::read_gpt(target)
        .with_context(|| format!("reading the partition table of {t} back"))?;
    if let Ok(plan) = &image.plan {
        ensure!(
            written.partitions == plan.partitions,
            "the partitions on {t} differ from the image's after moving the backup GPT"
        );
    }
    ensure!(
        written.disk_size_bytes == target_bytes,
        "the GPT on {t} ends at byte {}, not at the end of the target ({target_bytes})",
        written.disk_size_bytes
    );
    Ok(())
}

/// Asks the kernel to re-read the partition table; a failure is a warning,
/// the data on the device is complete and verified.
fn reread_partitions(target: &File, t: &str) -> bool {
    for attempt in 1..=REREAD_ATTEMPTS {
        if unsafe { libc::ioctl(target.as_raw_fd(), BLKRRPART) } == 0 {
            return true;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) || attempt == REREAD_ATTEMPTS {
            eprintln!(
                "kiln: warning: the kernel did not re-read the partition table of {t} ({err}); \
                 the image is written and verified: run `blockdev --rereadpt {t}` or replug the device"
            );
            return false;
        }
        std::thread::sleep(REREAD_DELAY);
    }
    false
}

/// Makes a new file's directory entry durable; best effort.
fn sync_parent(path: &Path) {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::debug!("syncing {}: {e}", dir.display());
    }
}

/// sha256 of the first `len` bytes of `file`, with progress.
fn hash_range(file: &File, len: u64, what: &str) -> anyhow::Result<String> {
    let meter = Meter::new(what, len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(BUFFER_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset)
            .with_context(|| format!("at byte {offset}"))?;
        h.update(&buf[..n]);
        offset += n as u64;
        meter.inc(n as u64);
    }
    meter.finish();
    Ok(hex::encode(h.finalize()))
}

/// A progress bar on stderr, or plain start and end lines when stderr is
/// not a terminal (CI logs).
struct Meter {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    total: u64,
    start: Instant,
}

impl Meter {
    fn new(what: &str, total: u64) -> Meter {
        let bar = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "kiln: {msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            Some(bar)
        } else {
            eprintln!("kiln: {what} {} …", human(total));
            None
        };
        Meter {
            bar,
            what: what.to_string(),
            total,
            start: Instant::now(),
        }
    }

    fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.start.elapsed().as_secs_f64();
        let rate = self.total as f64 / secs.max(0.001);
        eprintln!(
            "kiln: {} {}: done in {secs:.1} s ({}/s)",
            self.what,
            human(self.total),
            human(rate as u64)
        );
    }
}

/// Facts from the running kernel: /sys, /proc/self/mountinfo, /proc/swaps
/// and udev's database. Reads only; never opens the device.
#[derive(Debug, Clone)]
pub struct SysFacts {
    /// Paths whose disks hold the running system ([`SYSTEM_PATHS`]).
    pub system_paths: Vec<PathBuf>,
}

impl Default for SysFacts {
    fn default() -> Self {
        SysFacts {
            system_paths: SYSTEM_PATHS.iter().map(PathBuf::from).collect(),
        }
    }
}

impl DeviceFacts for SysFacts {
    fn inspect(&self, target: &Path) -> anyhow::Result<TargetFacts> {
        let meta = match std::fs::metadata(target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TargetFacts::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
        };
        if meta.file_type().is_block_device() {
            self.inspect_device(meta.rdev())
        } else if meta.is_file() {
            inspect_file(target, &meta)
        } else {
            Ok(TargetFacts {
                kind: TargetKind::Other,
                ..TargetFacts::default()
            })
        }
    }
}

type DevNum = (u32, u32);

fn devnum(rdev: u64) -> DevNum {
    (libc::major(rdev), libc::minor(rdev))
}

impl SysFacts {
    fn inspect_device(&self, rdev: u64) -> anyhow::Result<TargetFacts> {
        let (major, minor) = devnum(rdev);
        let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}"))
            .with_context(|| format!("finding block device {major}:{minor} in /sys"))?;
        let name = file_name(&sys);
        let is_partition = sys.join("partition").exists();
        let disk_sys = if is_partition {
            sys.parent().unwrap_or(&sys).to_path_buf()
        } else {
            sys.clone()
        };
        let disk = file_name(&disk_sys);

        // The device and, for a whole disk, its partitions.
        let mut family = vec![(name.clone(), (major, minor), sys.clone())];
        if !is_partition {
            for entry in std::fs::read_dir(&sys).into_iter().flatten().flatten() {
                let dir = entry.path();
                if dir.join("partition").exists()
                    && let Some(d) = read_devnum(&dir)
                {
                    family.push((file_name(&dir), d, dir));
                }
            }
        }
        let in_family = |d: DevNum| {
            family
                .iter()
                .find(|(_, f, _)| *f == d)
                .map(|(n, _, _)| n.clone())
        };

        let mountinfo = parse_mountinfo(
            &std::fs::read_to_string("/proc/self/mountinfo")
                .context("reading /proc/self/mountinfo")?,
        );
        let mut mounts = Vec::new();
        for m in &mountinfo {
            if let Some(n) = mount_devnums(m).into_iter().find_map(in_family) {
                mounts.push(Mount {
                    device: format!("/dev/{n}"),
                    mount_point: m.mount_point.clone(),
                });
            }
        }

        let mut swaps = Vec::new();
        for s in read_swaps()? {
            if let Ok(m) = std::fs::metadata(&s)
                && m.file_type().is_block_device()
                && let Some(n) = in_family(devnum(m.rdev()))
            {
                swaps.push(format!("/dev/{n}"));
            }
        }

        let mut holders = Vec::new();
        for (n, _, dir) in &family {
            for h in std::fs::read_dir(dir.join("holders"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let holder = h.file_name().to_string_lossy().to_string();
                let holder = match read_trimmed(&h.path().join("dm/name")) {
                    Some(dm) => format!("{holder} ({dm})"),
                    None => holder,
                };
                holders.push(Holder {
                    device: n.clone(),
                    holder,
                });
            }
        }

        // System paths whose mount sits on this disk, through partitions,
        // device-mapper and RAID; grouped by mount.
        let mut system: Vec<(String, Vec<String>)> = Vec::new();
        for path in &self.system_paths {
            let Some(m) = governing_mount(&mountinfo, path) else {
                continue;
            };
            let on_disk = mount_devnums(m).into_iter().any(|d| {
                let chain = underlying_devices(d);
                chain.contains(&name) || chain.contains(&disk)
            });
            if on_disk {
                let from = format!("from {}", m.source);
                match system.iter_mut().find(|(f, _)| *f == from) {
                    Some((_, paths)) => paths.push(path.display().to_string()),
                    None => system.push((from, vec![path.display().to_string()])),
                }
            }
        }

        let (model, serial) = identify(&disk_sys, read_devnum(&disk_sys).unwrap_or((major, minor)));
        Ok(TargetFacts {
            kind: TargetKind::BlockDevice,
            partition_of: is_partition.then(|| disk.clone()),
            size_bytes: read_u64(&sys.join("size")).unwrap_or(0) * SECTOR_BYTES,
            logical_sector_bytes: read_u64(&disk_sys.join("queue/logical_block_size"))
                .unwrap_or(SECTOR_BYTES),
            read_only: read_trimmed(&sys.join("ro")).as_deref() == Some("1"),
            removable: read_trimmed(&disk_sys.join("removable")).as_deref() == Some("1")
                || disk_sys.to_string_lossy().contains("/usb"),
            model,
            serial,
            mounts,
            swaps,
            holders,
            system: system
                .into_iter()
                .map(|(from, paths)| format!("{} {from}", paths.join(", ")))
                .collect(),
            name,
            ..TargetFacts::default()
        })
    }
}

fn inspect_file(target: &Path, meta: &Metadata) -> anyhow::Result<TargetFacts> {
    let id = (meta.dev(), meta.ino());
    let swaps = read_swaps()?
        .into_iter()
        .filter(|s| std::fs::metadata(s).is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == id))
        .map(|s| s.display().to_string())
        .collect();
    // Loop devices name their backing file by path; compare canonically.
    let canonical = std::fs::canonicalize(target).ok();
    let mut loop_devices = Vec::new();
    for entry in std::fs::read_dir("/sys/class/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(backing) = read_trimmed(&entry.path().join("loop/backing_file")) {
            let backing = PathBuf::from(backing.trim_end_matches(" (deleted)"));
            if Some(&backing) == canonical.as_ref() {
                loop_devices.push(format!("/dev/{}", entry.file_name().to_string_lossy()));
            }
        }
    }
    Ok(TargetFacts {
        kind: TargetKind::File,
        size_bytes: meta.len(),
        swaps,
        loop_devices,
        file_id: Some(id),
        ..TargetFacts::default()
    })
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    devnum: DevNum,
    mount_point: PathBuf,
    source: String,
}

/// Parses /proc/self/mountinfo (proc(5)): `id parent major:minor root
/// mount-point options [optional…] - fstype source super-options`.
fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (major, minor) = fields.get(2)?.split_once(':')?;
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                devnum: (major.parse().ok()?, minor.parse().ok()?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                source: unescape(fields.get(dash + 2)?),
            })
        })
        .collect()
}

/// The devices a mount is on: its major:minor, and for file systems that
/// report an anonymous one (btrfs), the device its source names.
fn mount_devnums(m: &MountEntry) -> Vec<DevNum> {
    let mut out = vec![m.devnum];
    if m.source.starts_with("/dev/")
        && let Ok(meta) = std::fs::metadata(&m.source)
        && meta.file_type().is_block_device()
    {
        out.push(devnum(meta.rdev()));
    }
    out
}

/// The mount `path` lives on: the longest mount point above it, the last
/// one mounted if several are stacked.
fn governing_mount<'m>(mounts: &'m [MountEntry], path: &Path) -> Option<&'m MountEntry> {
    let path = std::fs::canonicalize(path).ok()?;
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.components().count(), *i))
        .map(|(_, m)| m)
}

/// Kernel names of a device, the disk it is a partition of, and everything
/// beneath it (slaves of dm and md devices), recursively.
fn underlying_devices(d: DevNum) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(sys) = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", d.0, d.1)) {
        collect_underlying(&sys, &mut out, 0);
    }
    out
}

fn collect_underlying(sys: &Path, out: &mut Vec<String>, depth: u32) {
    let name = file_name(sys);
    if depth > 16 || out.contains(&name) {
        return;
    }
    out.push(name);
    if sys.join("partition").exists()
        && let Some(parent) = sys.parent()
    {
        collect_underlying(parent, out, depth + 1);
    }
    for slave in std::fs::read_dir(sys.join("slaves"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::canonicalize(slave.path()) {
            collect_underlying(&s, out, depth + 1);
        }
    }
}

/// File names listed in /proc/swaps.
fn read_swaps() -> anyhow::Result<Vec<PathBuf>> {
    match std::fs::read_to_string("/proc/swaps") {
        Ok(text) => Ok(parse_swaps(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).context("reading /proc/swaps"),
    }
}

fn parse_swaps(text: &str) -> Vec<PathBuf> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(|f| PathBuf::from(unescape(f)))
        .collect()
}

/// Undoes the octal escapes of /proc (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Model and serial: sysfs first, udev's database second; a loop device
/// names its backing file.
fn identify(disk_sys: &Path, d: DevNum) -> (Option<String>, Option<String>) {
    let udev =
        std::fs::read_to_string(format!("/run/udev/data/b{}:{}", d.0, d.1)).unwrap_or_default();
    let udev_value = |key: &str| {
        udev.lines()
            .find_map(|l| l.strip_prefix("E:")?.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.replace('_', " "))
    };
    // `device/vendor` alone is no name (virtio has `0x1af4`); use it only
    // in front of a model.
    let model = read_trimmed(&disk_sys.join("device/model"))
        .filter(|m| !m.is_empty())
        .map(
            |m| match read_trimmed(&disk_sys.join("device/vendor")).filter(|v| !v.is_empty()) {
                Some(v) => format!("{v} {m}"),
                None => m,
            },
        )
        .or_else(|| udev_value("ID_MODEL"))
        .or_else(|| {
            read_trimmed(&disk_sys.join("loop/backing_file"))
                .map(|b| format!("loop device backed by {b}"))
        });
    let serial = udev_value("ID_SERIAL_SHORT")
        .or_else(|| read_trimmed(&disk_sys.join("device/serial")))
        .or_else(|| {
            disk_sys
                .ancestors()
                .skip(1)
                .take_while(|a| a.starts_with("/sys/devices/"))
                .find_map(|a| read_trimmed(&a.join("serial")))
        })
        .filter(|s| !s.is_empty());
    (model, serial)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trimmed(p)?.parse().ok()
}

fn read_devnum(sys: &Path) -> Option<DevNum> {
    let text = read_trimmed(&sys.join("dev"))?;
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size_bytes: u64) -> ImageFacts {
        ImageFacts {
            path: PathBuf::from("out/n1.img"),
            size_bytes,
            expected_sha256: Ok("0".repeat(64)),
            plan: gpt::plan_partitions("t/n1", 260, 64, 64, 16).map_err(|e| e.to_string()),
            file_id: (1, 2),
        }
    }

    fn opts() -> FlashOptions {
        FlashOptions {
            image: "out/n1.img".into(),
            target: "/dev/sdz".into(),
            yes: true,
            force: false,
            size_bytes: None,
        }
    }

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!("32G".parse::<ByteSize>(), Ok(ByteSize(32 << 30)));
        assert_eq!("512m".parse::<ByteSize>(), Ok(ByteSize(512 << 20)));
        assert_eq!("1TiB".parse::<ByteSize>(), Ok(ByteSize(1 << 40)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        for bad in ["", "G", "32GB", "1.5G", "-1G", "100", "0", "99999999999T"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(human(406 * MIB), "406 MiB");
        assert_eq!(human(7 * 1024 * MIB + 512 * MIB), "7.5 GiB");
        assert_eq!(human(100), "100 B");
    }

    #[test]
    fn sha256sums_lines_in_text_and_binary_mode() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let text = format!("{a}  n1.img\n{b} *n2.img\nnot a line\n{a}  manifest.json\n");
        assert_eq!(
            crate::util::hash::sha256sums_lookup(&text, "n1.img"),
            Some(a.clone())
        );
        assert_eq!(
            crate::util::hash::sha256sums_lookup(&text, "n2.img"),
            Some("b".repeat(64))
        );
        assert_eq!(crate::util::hash::sha256sums_lookup(&text, "n3.img"), None);
        assert_eq!(
            crate::util::hash::sha256sums_lookup(&format!("{a} n1.img\n"), "n1.img"),
            None,
            "one space is not sha256sum's format"
        );
    }

    #[test]
    fn mountinfo_and_swaps_parse_with_escapes() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    90 27 8:17 / /media/my\\040stick rw,nosuid shared:45 master:1 - vfat /dev/sdb1 rw\n\
                    91 27 0:45 / /home rw - btrfs /dev/sdc2 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1],
            MountEntry {
                devnum: (8, 17),
                mount_point: "/media/my stick".into(),
                source: "/dev/sdb1".into()
            }
        );
        assert_eq!(m[2].devnum, (0, 45));
        let swaps = parse_swaps(
            "Filename\tType\tSize\tUsed\tPriority\n/dev/sdb2  partition\t1\t0\t-2\n/swap\\040file file 1 0 -3\n",
        );
        assert_eq!(
            swaps,
            vec![PathBuf::from("/dev/sdb2"), PathBuf::from("/swap file")]
        );
    }

    #[test]
    fn clean_removable_disk_passes() {
        let target = TargetFacts::block_device("sdz", 8 << 30);
        assert_eq!(
            check(&image(406 * MIB), &target, &opts(), false),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_reason_is_listed() {
        let mut target = TargetFacts::block_device("sdz1", 100 * MIB);
        target.partition_of = Some("sdz".into());
        target.read_only = true;
        target.logical_sector_bytes = 4096;
        target.removable = false;
        target.mounts = vec![Mount {
            device: "/dev/sdz1".into(),
            mount_point: "/media/x".into(),
        }];
        target.swaps = vec!["/dev/sdz2".into()];
        target.holders = vec![Holder {
            device: "sdz3".into(),
            holder: "dm-0 (vg-root)".into(),
        }];
        target.system = vec!["/, /usr from /dev/dm-0".into()];
        let mut img = image(406 * MIB);
        img.expected_sha256 = Err("no SHA256SUMS".into());
        img.plan = Err("no GPT".into());
        let o = FlashOptions {
            yes: false,
            size_bytes: Some(1 << 30),
            ..opts()
        };
        let reasons = check(&img, &target, &o, false);
        let expect = [
            "no SHA256SUMS",
            "no GPT",
            "--size is for regular files",
            "is a partition of sdz",
            "read-only",
            "4096-byte",
            "smaller than the image",
            "mounted on /media/x",
            "/dev/sdz2 is in use as swap",
            "held by dm-0 (vg-root)",
            "holds the running system",
            "not removable",
            "pass --yes",
        ];
        assert_eq!(reasons.len(), expect.len(), "{reasons:#?}");
        for (r, e) in reasons.iter().zip(expect) {
            assert!(r.contains(e), "{r:?} lacks {e:?}");
        }
        // --force lifts only the removable refusal; a terminal, only --yes.
        let forced = check(
            &img,
            &target,
            &FlashOptions {
                force: true,
                ..o.clone()
            },
            true,
        );
        assert_eq!(forced.len(), expect.len() - 2, "{forced:#?}");
    }

    #[test]
    fn file_targets() {
        let img = image(406 * MIB);
        let existing = TargetFacts {
            kind: TargetKind::File,
            size_bytes: 5,
            file_id: Some((7, 7)),
            ..TargetFacts::default()
        };
        let r = check(&img, &existing, &opts(), false);
        assert!(r.len() == 1 && r[0].contains("pass --force"), "{r:?}");
        assert!(
            check(
                &img,
                &existing,
                &FlashOptions {
                    force: true,
                    ..opts()
                },
                false
            )
            .is_empty()
        );
        let itself = TargetFacts {
            file_id: Some((1, 2)),
            ..existing
        };
        assert!(
            check(
                &img,
                &itself,
                &FlashOptions {
                    force: true,
                    ..opts()
                },
                false
            )[0]
            .contains("the image itself")
        );
        let small = FlashOptions {
            size_bytes: Some(MIB),
            ..opts()
        };
        assert!(
            check(&img, &TargetFacts::default(), &small, false)[0]
                .contains("smaller than the image")
        );
        // No prompt for files: a missing file is fine without --yes or a terminal.
        assert!(
            check(
                &img,
                &TargetFacts::default(),
                &FlashOptions {
                    yes: false,
                    ..opts()
                },
                false
            )
            .is_empty()
        );
    }

    #[test]
    fn confirmation_needs_yes() {
        let target = TargetFacts {
            model: Some("SanDisk Ultra".into()),
            serial: Some("4C53".into()),
            ..TargetFacts::block_device("sdz", 8 << 30)
        };
        let mut out = Vec::new();
        confirm(
            &mut "yes\n".as_bytes(),
            &mut out,
            Path::new("/dev/sdz"),
            &target,
            &image(MIB),
        )
        .unwrap();
        let shown = String::from_utf8(out).unwrap();
        for s in [
            "SanDisk Ultra",
            "4C53",
            "8 GiB (8589934592 bytes)",
            "Type \"yes\" to erase /dev/sdz",
        ] {
            assert!(shown.contains(s), "{shown}");
        }
        for answer in ["y\n", "no\n", ""] {
            let err = confirm(
                &mut answer.as_bytes(),
                &mut Vec::new(),
                Path::new("/dev/sdz"),
                &target,
                &image(MIB),
            )
            .unwrap_err();
            assert!(err.to_string().contains("nothing was written"), "{err}");
        }
    }

    /// The disk holding `/` of this machine is recognised as the system
    /// disk. Inspection only: reads /sys and /proc, never opens the device,
    /// never calls `flash`.
    #[test]
    fn root_disk_is_recognised_as_the_system_disk() {
        let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
        let Some(root) =
            governing_mount(&mounts, Path::new("/")).filter(|m| m.source.starts_with("/dev/"))
        else {
            eprintln!("skipped: / is not mounted from a /dev device here (container?)");
            return;
        };
        let facts = SysFacts::default()
            .inspect(Path::new(&root.source))
            .unwrap();
        assert_eq!(facts.kind, TargetKind::BlockDevice);
        assert!(
            facts.system.iter().any(|s| s.starts_with('/')),
            "{facts:#?}"
        );
        assert!(!facts.mounts.is_empty(), "{facts:#?}");
        let reasons = check(
            &image(MIB),
            &facts,
            &FlashOptions {
                target: root.source.clone().into(),
                force: true,
                ..opts()
            },
            true,
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("holds the running system")),
            "{reasons:#?}"
        );
    }
}
