//! GPT partition planning and writing, rootless, by offset into a file.
//!
//! Kiln's own is the planner. [`plan_partitions`] is pure: it lays out ESP /
//! root-a / root-b / state on 1 MiB boundaries with GUIDs derived from a
//! seed, so the same seed always gives the same bytes. No crate knows this
//! layout (the A/B slots, the names the initramfs finds them by, the
//! Discoverable Partitions type GUIDs and attributes, the seeded GUIDs), and
//! the [`PartitionPlan`] is what the golden `sfdisk -d` test and `flash`'s
//! read-back compare against. [`Guid`] keeps GUIDs in their textual byte
//! order for constants and dumps.
//!
//! The on-disk format is the `gptman` crate's (the one coreos-installer
//! uses). It takes the disk GUID and every entry from kiln, nothing random:
//! [`write_gpt`] has it write the protective MBR, the primary header and
//! entry array, and the backup entry array and header at the end of a
//! (sparse) file; [`read_gpt`] reads a table back (signature, revision and
//! both CRCs checked); [`relocate_backup`] has it rewrite the table for a
//! bigger disk. It reaches the file through [`RangeIo`], so the file's
//! cursor stays where it was and the disk size is the plan's, not a block
//! device's metadata.
//!
//! Two things kiln does around gptman, to keep what it did before:
//! - gptman writes only the 92 bytes of a header and the 66 bytes of the
//!   MBR partition table and signature, leaving the rest of those sectors
//!   as they were. Kiln zeroes sectors 0, 1 and the last sector first, as
//!   UEFI requires of the header blocks' reserved bytes; otherwise moving
//!   the backup onto a used stick would keep old bytes beside the new
//!   header. (Kiln's images are UEFI-only: there is no MBR boot code to
//!   keep.)
//! - gptman's `GPT::read_from` falls back to the backup table when the
//!   primary is damaged; kiln reads the primary only, with gptman's header
//!   and entry readers, so a damaged primary is an error, not an image that
//!   looks fine.
//!
//! Reference: UEFI Specification 2.10, §5.3 "GUID Partition Table (GPT)
//! Disk Layout"; the Discoverable Partitions Specification
//! (<https://uapi-group.org/specifications/specs/discoverable_partitions_specification/>).

use std::fmt;
use std::fs::File;
use std::io::{Seek as _, SeekFrom};
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail, ensure};
use gptman::{GPT, GPTHeader, GPTPartitionEntry};
use sha2::{Digest, Sha256};

/// Logical sector size in bytes. Images are built for 512-byte sectors; a
/// 4Kn disk would need its own layout.
pub const SECTOR_BYTES: u64 = 512;

/// Partition alignment in bytes (1 MiB), as sfdisk, sgdisk and
/// systemd-repart do: every erase block and RAID stripe size divides it.
pub const ALIGNMENT_BYTES: u64 = 1024 * 1024;

/// Smallest ESP in MiB. OVMF refuses a FAT32 file system with fewer than
/// 65,525 clusters, and 260 MiB is the smallest size that FAT32 reaches with
/// 4 KiB clusters at 512-byte sectors (the size Microsoft recommends too).
pub const ESP_MIN_MIB: u64 = 260;

/// Number of entries in the partition entry array (UEFI 2.10 §5.3.2: at
/// least 16,384 bytes must be reserved for it).
pub const ENTRY_COUNT: u32 = 128;

/// Size of one partition entry in bytes (UEFI 2.10 §5.3.3).
pub const ENTRY_BYTES: u32 = 128;

/// EFI System Partition type GUID (UEFI 2.10 §5.3.3, table 5.7; also the
/// Discoverable Partitions Specification).
pub const ESP_TYPE: Guid = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");

/// Root partition (x86-64) type GUID, Discoverable Partitions Specification.
pub const ROOT_X86_64_TYPE: Guid = Guid::parse("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");

/// Variable data partition (`/var`) type GUID, Discoverable Partitions
/// Specification.
pub const VAR_TYPE: Guid = Guid::parse("4d21b016-b534-45c2-a9fb-5c16e091fd2d");

/// Partition attribute bit 60, "read-only" (Discoverable Partitions
/// Specification): set on the root slots, which hold squashfs images.
pub const ATTR_READ_ONLY: u64 = 1 << 60;

/// Sectors taken by the entry array (128 × 128 bytes = 32 sectors).
const ENTRY_ARRAY_SECTORS: u64 = (ENTRY_COUNT as u64 * ENTRY_BYTES as u64) / SECTOR_BYTES;

/// First usable LBA: MBR, primary header, primary entry array.
const FIRST_USABLE_LBA: u64 = 2 + ENTRY_ARRAY_SECTORS;

use crate::util::range_io::RangeIo;
use crate::util::size::MIB;

/// A GUID in its textual (RFC 4122, big-endian) byte order.
///
/// On disk GPT stores the first three fields little-endian; see
/// [`Guid::to_disk_bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case); a bad
    /// string in a `const` is a compile error.
    pub const fn parse(s: &str) -> Guid {
        let s = s.as_bytes();
        assert!(s.len() == 36, "GUID must be 36 characters");
        let mut out = [0u8; 16];
        let (mut i, mut n) = (0, 0);
        while i < 36 {
            if i == 8 || i == 13 || i == 18 || i == 23 {
                assert!(s[i] == b'-', "GUID dash misplaced");
                i += 1;
                continue;
            }
            out[n / 2] = (out[n / 2] << 4) | hex_digit(s[i]);
            n += 1;
            i += 1;
        }
        Guid(out)
    }

    /// A random-variant, version-4-style GUID from the SHA-256 of
    /// `seed`, a NUL and `label`: the same inputs give the same GUID.
    pub fn derive(seed: &str, label: &str) -> Guid {
        let digest = Sha256::new()
            .chain_update(seed.as_bytes())
            .chain_update([0])
            .chain_update(label.as_bytes())
            .finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&digest[..16]);
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        Guid(b)
    }

    /// The 16 bytes as GPT stores them (mixed-endian).
    pub fn to_disk_bytes(self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }

    /// Inverse of [`Guid::to_disk_bytes`].
    pub fn from_disk_bytes(bytes: &[u8]) -> Guid {
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes[..16]);
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        Guid(b)
    }
}

const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("GUID has a non-hex digit"),
    }
}

/// Lower-case `xxxxxxxx-xxxx-…`; `{:X}` gives upper case, as sfdisk prints.
impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_guid(f, self, false)
    }
}

impl fmt::UpperHex for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_guid(f, self, true)
    }
}

fn write_guid(f: &mut fmt::Formatter<'_>, g: &Guid, upper: bool) -> fmt::Result {
    for (i, byte) in g.0.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            f.write_str("-")?;
        }
        if upper {
            write!(f, "{byte:02X}")?
        } else {
            write!(f, "{byte:02x}")?
        }
    }
    Ok(())
}

/// One partition: an entry of the GPT partition entry array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// GPT partition name (at most 36 UTF-16 code units); the initramfs
    /// finds the root slot by it (`PARTNAME=`).
    pub name: String,
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID.
    pub unique_guid: Guid,
    /// First sector, inclusive.
    pub first_lba: u64,
    /// Last sector, inclusive.
    pub last_lba: u64,
    /// Attribute bits (e.g. [`ATTR_READ_ONLY`]).
    pub attributes: u64,
}

impl Partition {
    /// Byte offset of the partition in the disk.
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * SECTOR_BYTES
    }

    /// Size of the partition in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR_BYTES
    }
}

/// A complete GPT layout for a disk of `disk_size_bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionPlan {
    /// Size of the whole disk in bytes (a multiple of [`SECTOR_BYTES`]); the
    /// backup header lives in its last sector.
    pub disk_size_bytes: u64,
    /// Disk GUID.
    pub disk_guid: Guid,
    /// Partitions in entry-array order (entry 1 first).
    pub partitions: Vec<Partition>,
}

/// Plans ESP / root-a / root-b / state, each 1 MiB aligned and sized in MiB,
/// on the smallest disk that holds them (1 MiB before the first partition,
/// 1 MiB after the last for the backup GPT).
///
/// The disk GUID and partition GUIDs are derived from `seed` (e.g. cluster
/// and node name). Use [`PartitionPlan::with_disk_size`] for a bigger disk.
pub fn plan_partitions(
    seed: &str,
    esp_mib: u64,
    root_mib: u64,
    root_b_mib: u64,
    state_mib: u64,
) -> Result<PartitionPlan> {
    ensure!(
        esp_mib >= ESP_MIN_MIB,
        "ESP of {esp_mib} MiB is too small: OVMF needs at least {ESP_MIN_MIB} MiB for FAT32"
    );
    let layout = [
        ("ESP", ESP_TYPE, esp_mib, 0),
        ("root-a", ROOT_X86_64_TYPE, root_mib, ATTR_READ_ONLY),
        ("root-b", ROOT_X86_64_TYPE, root_b_mib, ATTR_READ_ONLY),
        ("state", VAR_TYPE, state_mib, 0),
    ];
    let sectors_per_mib = MIB / SECTOR_BYTES;
    let mut next_lba = ALIGNMENT_BYTES / SECTOR_BYTES;
    let mut partitions = Vec::with_capacity(layout.len());
    for (name, type_guid, mib, attributes) in layout {
        ensure!(mib > 0, "partition {name} has size 0 MiB");
        let sectors = mib
            .checked_mul(sectors_per_mib)
            .with_context(|| format!("partition {name} of {mib} MiB is too large"))?;
        partitions.push(Partition {
            name: name.to_string(),
            type_guid,
            unique_guid: Guid::derive(seed, name),
            first_lba: next_lba,
            last_lba: next_lba + sectors - 1,
            attributes,
        });
        next_lba += sectors;
    }
    Ok(PartitionPlan {
        disk_size_bytes: next_lba * SECTOR_BYTES + ALIGNMENT_BYTES,
        disk_guid: Guid::derive(seed, "disk"),
        partitions,
    })
}

impl PartitionPlan {
    /// The same layout on a disk of `disk_size_bytes`; an error if the
    /// partitions and the backup GPT do not fit or the size is not whole
    /// sectors.
    pub fn with_disk_size(mut self, disk_size_bytes: u64) -> Result<Self> {
        ensure!(
            disk_size_bytes.is_multiple_of(SECTOR_BYTES),
            "disk size {disk_size_bytes} is not a multiple of {SECTOR_BYTES}-byte sectors"
        );
        self.disk_size_bytes = disk_size_bytes;
        self.check()?;
        Ok(self)
    }

    /// The partition called `name`, if any.
    pub fn partition(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }

    /// Last sector of the disk (where the backup header goes).
    pub fn last_lba(&self) -> u64 {
        self.disk_size_bytes / SECTOR_BYTES - 1
    }

    /// Last sector a partition may use (before the backup entry array).
    pub fn last_usable_lba(&self) -> u64 {
        self.last_lba() - 1 - ENTRY_ARRAY_SECTORS
    }

    /// The table in the format of `sfdisk -d`, with partitions named
    /// `<device>1`, `<device>2`, …
    pub fn dump(&self, device: &str) -> String {
        let mut out = format!(
            "label: gpt\nlabel-id: {:X}\ndevice: {device}\nunit: sectors\n\
             first-lba: {FIRST_USABLE_LBA}\nlast-lba: {}\nsector-size: {SECTOR_BYTES}\n\n",
            self.disk_guid,
            self.last_usable_lba(),
        );
        for (i, p) in self.partitions.iter().enumerate() {
            out += &format!(
                "{device}{} : start={:>12}, size={:>12}, type={:X}, uuid={:X}, name=\"{}\"",
                i + 1,
                p.first_lba,
                p.last_lba + 1 - p.first_lba,
                p.type_guid,
                p.unique_guid,
                p.name,
            );
            if p.attributes != 0 {
                out += &format!(", attrs=\"{}\"", attributes_text(p.attributes));
            }
            out += "\n";
        }
        out
    }

    /// Checks that the plan can be written: sizes, overlaps, names.
    fn check(&self) -> Result<()> {
        let sectors = self.disk_size_bytes / SECTOR_BYTES;
        ensure!(
            self.disk_size_bytes.is_multiple_of(SECTOR_BYTES) && sectors > 2 * FIRST_USABLE_LBA,
            "disk of {} bytes is too small for a GPT",
            self.disk_size_bytes
        );
        ensure!(
            self.partitions.len() <= ENTRY_COUNT as usize,
            "{} partitions, GPT holds at most {ENTRY_COUNT}",
            self.partitions.len()
        );
        let mut previous_end = FIRST_USABLE_LBA - 1;
        for p in &self.partitions {
            ensure!(
                p.name.encode_utf16().count() <= 36,
                "partition name {:?} is longer than 36 UTF-16 units",
                p.name
            );
            ensure!(
                p.first_lba > previous_end && p.first_lba <= p.last_lba,
                "partition {} (sectors {}..={}) overlaps its predecessor or is empty",
                p.name,
                p.first_lba,
                p.last_lba
            );
            if p.last_lba > self.last_usable_lba() {
                bail!(
                    "disk of {} bytes is too small for the plan: partition {} ends at sector {}, \
                     the last usable sector is {}; the plan needs at least {} bytes",
                    self.disk_size_bytes,
                    p.name,
                    p.last_lba,
                    self.last_usable_lba(),
                    self.min_disk_size_bytes()
                );
            }
            previous_end = p.last_lba;
        }
        Ok(())
    }

    /// Smallest disk (1 MiB aligned) that holds the partitions and the backup GPT.
    fn min_disk_size_bytes(&self) -> u64 {
        let end = self
            .partitions
            .iter()
            .map(|p| p.last_lba + 1)
            .max()
            .unwrap_or(FIRST_USABLE_LBA);
        let bytes = (end + ENTRY_ARRAY_SECTORS + 1) * SECTOR_BYTES;
        bytes.div_ceil(ALIGNMENT_BYTES) * ALIGNMENT_BYTES
    }
}

/// Attribute bits as sfdisk names them.
fn attributes_text(attributes: u64) -> String {
    let mut words = Vec::new();
    for bit in 0..64 {
        if attributes & (1 << bit) == 0 {
            continue;
        }
        words.push(match bit {
            0 => "RequiredPartition".to_string(),
            1 => "NoBlockIOProtocol".to_string(),
            2 => "LegacyBIOSBootable".to_string(),
            _ => format!("GUID:{bit}"),
        });
    }
    words.join(" ")
}

/// Writes the GPT of `plan` into `file`, whose length must be exactly
/// `plan.disk_size_bytes`: protective MBR, primary header and entry array,
/// backup entry array and backup header. Partition contents are untouched.
pub fn write_gpt(file: &mut File, plan: &PartitionPlan) -> Result<()> {
    plan.check()?;
    let len = file
        .metadata()
        .context("reading the size of the disk image")?
        .len();
    ensure!(
        len >= plan.disk_size_bytes,
        "disk of {len} bytes is too small for the plan of {} bytes",
        plan.disk_size_bytes
    );
    ensure!(
        len == plan.disk_size_bytes,
        "disk of {len} bytes is larger than the plan of {} bytes: plan for the whole disk \
         with PartitionPlan::with_disk_size",
        plan.disk_size_bytes
    );
    let entries: Vec<GPTPartitionEntry> = plan.partitions.iter().map(entry).collect();
    write_tables(file, plan.disk_size_bytes, plan.disk_guid, &entries)
}

/// Has gptman write the protective MBR, both headers and both entry arrays
/// for a disk of `disk_size_bytes`, with `entries` as entries 1, 2, …
fn write_tables(
    file: &File,
    disk_size_bytes: u64,
    disk_guid: Guid,
    entries: &[GPTPartitionEntry],
) -> Result<()> {
    let last_lba = disk_size_bytes / SECTOR_BYTES - 1;
    // gptman writes only part of these sectors; the rest must be zero.
    for (lba, what) in [
        (0, "protective MBR"),
        (1, "primary GPT header"),
        (last_lba, "backup GPT header"),
    ] {
        file.write_all_at(&[0u8; SECTOR_BYTES as usize], lba * SECTOR_BYTES)
            .with_context(|| format!("clearing the {what} at sector {lba}"))?;
    }
    let mut disk = RangeIo::new(file, 0, disk_size_bytes);
    let mut gpt = GPT::new_from(&mut disk, SECTOR_BYTES, disk_guid.to_disk_bytes())
        .context("laying out the GPT headers")?;
    for (number, e) in (1..).zip(entries) {
        gpt[number] = e.clone();
    }
    gpt.write_into(&mut disk)
        .context("writing the GPT headers and partition entries")?;
    GPT::write_protective_mbr_into(&mut disk, SECTOR_BYTES)
        .context("writing the protective MBR")?;
    Ok(())
}

/// The entry-array entry of `p`, GUIDs in on-disk byte order.
fn entry(p: &Partition) -> GPTPartitionEntry {
    GPTPartitionEntry {
        partition_type_guid: p.type_guid.to_disk_bytes(),
        unique_partition_guid: p.unique_guid.to_disk_bytes(),
        starting_lba: p.first_lba,
        ending_lba: p.last_lba,
        attribute_bits: p.attributes,
        partition_name: p.name.as_str().into(),
    }
}

/// Reads the primary GPT of `file` back into a plan (verifying signature and
/// both CRCs); the disk size is taken from the header's backup location.
pub fn read_gpt(file: &File) -> Result<PartitionPlan> {
    let (header, entries) = read_primary(file)?;
    Ok(parse_plan(&header, &entries))
}

/// The plan a checked header and entry array describe.
fn parse_plan(header: &GPTHeader, entries: &[GPTPartitionEntry]) -> PartitionPlan {
    let partitions = entries
        .iter()
        .filter(|e| e.is_used())
        .map(|e| Partition {
            name: e.partition_name.as_str().to_string(),
            type_guid: Guid::from_disk_bytes(&e.partition_type_guid),
            unique_guid: Guid::from_disk_bytes(&e.unique_partition_guid),
            first_lba: e.starting_lba,
            last_lba: e.ending_lba,
            attributes: e.attribute_bits,
        })
        .collect();
    PartitionPlan {
        disk_size_bytes: (header.backup_lba + 1) * SECTOR_BYTES,
        disk_guid: Guid::from_disk_bytes(&header.disk_guid),
        partitions,
    }
}

/// Rewrites the GPT of `file` for a disk of `new_size_bytes` (e.g. an image
/// written to a bigger USB stick): the backup entries and header move to the
/// new end, the primary header and protective MBR are updated, and the old
/// backup header is zeroed. The partitions themselves do not move.
pub fn relocate_backup(file: &mut File, new_size_bytes: u64) -> Result<()> {
    let (header, entries) = read_primary(file)?;
    let plan = parse_plan(&header, &entries);
    let old_last_lba = plan.last_lba();
    let plan = plan.with_disk_size(new_size_bytes)?;
    // The entries are written back as read, even fields this module ignores
    // (gptman keeps a name's raw UTF-16, padding included).
    write_tables(file, new_size_bytes, plan.disk_guid, &entries)?;
    if old_last_lba < plan.last_lba() {
        file.write_all_at(&[0u8; SECTOR_BYTES as usize], old_last_lba * SECTOR_BYTES)
            .with_context(|| {
                format!("erasing the old backup GPT header at sector {old_last_lba}")
            })?;
    }
    Ok(())
}

/// The primary header and entry array, checked by gptman (signature,
/// revision, header size, both CRCs) and for kiln's 128 × 128-byte array.
fn read_primary(file: &File) -> Result<(GPTHeader, Vec<GPTPartitionEntry>)> {
    // The disk size is in the header, not known yet: reads past the end of
    // the file fail.
    let mut disk = RangeIo::new(file, 0, u64::MAX);
    disk.seek(SeekFrom::Start(SECTOR_BYTES))
        .context("seeking to the primary GPT header")?;
    let header = match GPTHeader::read_from(&mut disk) {
        Err(gptman::Error::InvalidSignature) => {
            bail!("no GPT: sector 1 lacks the \"EFI PART\" signature")
        }
        read => read.context("reading the primary GPT header")?,
    };
    ensure!(
        header.number_of_partition_entries == ENTRY_COUNT
            && header.size_of_partition_entry == ENTRY_BYTES,
        "GPT entry array of {} × {} bytes is not supported (expected {ENTRY_COUNT} × {ENTRY_BYTES})",
        header.number_of_partition_entries,
        header.size_of_partition_entry
    );
    let entries = header
        .read_partitions(&mut disk, SECTOR_BYTES)
        .context("reading the primary GPT partition entries")?;
    Ok((header, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    const GIB: u64 = 1024 * MIB;
    const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/gpt-sfdisk.txt");

    fn test_plan(seed: &str) -> PartitionPlan {
        plan_partitions(seed, 260, 512, 512, 200)
            .unwrap()
            .with_disk_size(3 * GIB / 2)
            .unwrap()
    }

    /// Writes `plan` into `dir/name`, a sparse file of the plan's size, and
    /// returns the sectors GPT owns (the first 34 and the last 33).
    fn write_image(dir: &Path, name: &str, plan: &PartitionPlan) -> Vec<u8> {
        let mut file = File::create_new(dir.join(name)).unwrap();
        file.set_len(plan.disk_size_bytes).unwrap();
        write_gpt(&mut file, plan).unwrap();
        let mut head = vec![0u8; (FIRST_USABLE_LBA * SECTOR_BYTES) as usize];
        let tail_bytes = (ENTRY_ARRAY_SECTORS + 1) * SECTOR_BYTES;
        let mut tail = vec![0u8; tail_bytes as usize];
        file.read_exact_at(&mut head, 0).unwrap();
        file.read_exact_at(&mut tail, plan.disk_size_bytes - tail_bytes)
            .unwrap();
        [head, tail].concat()
    }

    /// Runs a tool in `dir`, panicking with its output unless it succeeds.
    fn run(dir: &Path, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .current_dir(dir)
            .env("LC_ALL", "C")
            .output()
            .unwrap_or_else(|e| panic!("running {program} (apt-get install gdisk fdisk): {e}"));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{stdout}\n{stderr}"
        );
        stdout
    }

    #[test]
    fn guid_round_trips_and_formats() {
        assert_eq!(ESP_TYPE.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(
            format!("{ROOT_X86_64_TYPE:X}"),
            "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
        );
        // The on-disk form of the ESP type, as every GPT tool writes it.
        assert_eq!(
            hex::encode(ESP_TYPE.to_disk_bytes()),
            "28732ac11ff8d211ba4b00a0c93ec93b"
        );
        assert_eq!(Guid::from_disk_bytes(&VAR_TYPE.to_disk_bytes()), VAR_TYPE);
        let g = Guid::derive("seed", "disk");
        assert_eq!(g.0[6] >> 4, 4);
        assert_eq!(g.0[8] >> 6, 0b10);
    }

    #[test]
    fn plan_is_aligned_and_minimal() {
        let plan = plan_partitions("c/n", 260, 512, 512, 200).unwrap();
        assert_eq!(plan.disk_size_bytes, (1 + 260 + 512 + 512 + 200 + 1) * MIB);
        for p in &plan.partitions {
            assert_eq!(p.offset_bytes() % ALIGNMENT_BYTES, 0, "{}", p.name);
        }
        assert_eq!(plan.partition("state").unwrap().size_bytes(), 200 * MIB);
        assert!(
            plan_partitions("c/n", 100, 512, 512, 200).is_err(),
            "ESP below OVMF minimum"
        );
        assert!(
            plan_partitions("c/n", 260, 0, 512, 200).is_err(),
            "empty partition"
        );
    }

    #[test]
    fn gpt_passes_sgdisk_and_matches_golden_sfdisk_dump() {
        let dir = tempfile::tempdir().unwrap();
        let plan = test_plan("cluster/node1");
        write_image(dir.path(), "disk.img", &plan);

        let verify = run(dir.path(), "sgdisk", &["-v", "disk.img"]);
        assert!(verify.contains("No problems found"), "sgdisk -v:\n{verify}");

        let dump = run(dir.path(), "sfdisk", &["-d", "disk.img"]);
        assert_eq!(
            dump,
            plan.dump("disk.img"),
            "sfdisk -d disagrees with PartitionPlan::dump"
        );
        let golden = std::fs::read_to_string(GOLDEN).unwrap();
        assert_eq!(dump, golden, "sfdisk -d differs from {GOLDEN}");

        let file = File::open(dir.path().join("disk.img")).unwrap();
        assert_eq!(read_gpt(&file).unwrap(), plan);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_image(dir.path(), "a.img", &test_plan("cluster/node1"));
        let b = write_image(dir.path(), "b.img", &test_plan("cluster/node1"));
        let c = write_image(dir.path(), "c.img", &test_plan("cluster/node2"));
        assert!(a == b, "same seed wrote different bytes");
        assert!(a != c, "different seeds wrote the same bytes");
        // Nothing else was written: the rest of the image is still a hole,
        // so equal GPT sectors mean equal files.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(dir.path().join("a.img"))
            .unwrap()
            .blocks()
            * 512;
        assert!(allocated <= 256 * 1024, "{allocated} bytes allocated");
    }

    #[test]
    fn disk_too_small_is_an_error() {
        let plan = plan_partitions("s", 260, 512, 512, 200).unwrap();
        let err = plan.clone().with_disk_size(GIB).unwrap_err();
        assert!(format!("{err:#}").contains("too small"), "{err:#}");

        let dir = tempfile::tempdir().unwrap();
        let mut file = File::create_new(dir.path().join("small.img")).unwrap();
        file.set_len(GIB).unwrap();
        let err = write_gpt(&mut file, &plan).unwrap_err();
        assert!(format!("{err:#}").contains("too small"), "{err:#}");
    }

    #[test]
    fn relocated_backup_passes_sgdisk() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan_partitions("s", 260, 512, 512, 200).unwrap();
        write_image(dir.path(), "disk.img", &plan);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("disk.img"))
            .unwrap();
        file.set_len(2 * GIB).unwrap();
        relocate_backup(&mut file, 2 * GIB).unwrap();

        let verify = run(dir.path(), "sgdisk", &["-v", "disk.img"]);
        assert!(verify.contains("No problems found"), "sgdisk -v:\n{verify}");
        let expected = plan.clone().with_disk_size(2 * GIB).unwrap();
        assert_eq!(read_gpt(&file).unwrap(), expected);
        assert_eq!(
            run(dir.path(), "sfdisk", &["-d", "disk.img"]),
            expected.dump("disk.img")
        );
        assert!(
            relocate_backup(&mut file, GIB).is_err(),
            "shrinking below the plan"
        );
    }
}
