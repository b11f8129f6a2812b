//! The EFI System Partition: a FAT32 file system written into a byte range
//! of a disk image file, rootless (no mounts, no loop devices, no mkfs).
//!
//! [`write_esp`] clears the range, formats it as FAT32 with the `hadris-fat`
//! crate and copies the files in, directories first created as needed and
//! every directory's entries in sorted order. The result is reproducible by
//! construction: fixed volume id, no volume label (its directory entry would
//! carry the wall-clock time), every timestamp [`ESP_TIMESTAMP`], every
//! unused byte zero. Two calls with the same inputs give the same bytes.
//!
//! Names longer than 8.3 (`kiln-a.conf`, `vmlinuz-6.1.0-28-amd64`) get VFAT
//! long-name entries, which both the UEFI FAT driver and systemd-boot read.
//! Kiln allows printable ASCII names only, so no code page is involved.
//!
//! [`read_esp_file`] and [`list_esp`] read a written ESP back, for the
//! verify step and the tests.
//!
//! References: Microsoft "FAT: General Overview of On-Disk Format"
//! (fatgen103, 2000); UEFI Specification 2.10 §13.3 "File System Format".

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use hadris_fat::format::{
    FatFormatOptions, FatTypeSelection, FatVolumeFormatter, MediaType, OemName, SectorSize,
};
use hadris_fat::time::{FatDateTime, StaticTimeProvider};
use hadris_fat::{DirectoryEntry, FatDir, FatType, FatVolume, FatVolumeReadExt, FatVolumeWriteExt};

use super::gpt::{ESP_MIN_MIB, SECTOR_BYTES};

use crate::util::range_io::RangeIo;
use crate::util::size::MIB;

/// Smallest ESP [`write_esp`] accepts, in bytes: [`ESP_MIN_MIB`] (260 MiB)
/// at 512-byte sectors. OVMF (like every FAT driver) decides FAT12/16/32 by
/// the cluster count alone and refuses a "FAT32" volume with fewer than
/// [`FAT32_MIN_CLUSTERS`]; with [`CLUSTER_BYTES`] clusters 260 MiB is the
/// smallest size that gets there.
pub const ESP_MIN_BYTES: u64 = ESP_MIN_MIB * MIB;

/// Fewest clusters a FAT32 volume may have (fatgen103, "FAT Type
/// Determination": a volume with fewer than 65,525 clusters is FAT16).
pub const FAT32_MIN_CLUSTERS: u32 = 65_525;

/// Sectors per cluster: 4 KiB clusters, what `mkfs.fat` picks for
/// 260 MiB–8 GiB volumes at 512-byte sectors.
const CLUSTER_SECTORS: u8 = 8;

/// Cluster size in bytes.
pub const CLUSTER_BYTES: u64 = CLUSTER_SECTORS as u64 * SECTOR_BYTES;

/// Largest file FAT32 can hold: the directory entry's size field is 32 bits.
pub const FAT32_MAX_FILE_BYTES: u64 = u32::MAX as u64;

/// Longest name of one path component, in UTF-16 units (fatgen103, "FAT
/// Long Directory Entries").
const NAME_MAX_CHARS: usize = 255;

/// Size of one directory entry in bytes (short or long-name slot).
const DIR_ENTRY_BYTES: u64 = 32;

/// Characters of a long name one long-name slot holds.
const LFN_CHARS_PER_SLOT: usize = 13;

/// Copies of the FAT, as every formatter writes by default.
const FAT_COPIES: u8 = 2;

/// OEM name in the boot sector; fatgen103 recommends "MSWIN4.1" as the
/// value the most FAT drivers accept.
const OEM_NAME: &str = "MSWIN4.1";

/// Every timestamp on the ESP: 1980-01-01 00:00:00, the FAT epoch. Firmware
/// and systemd-boot ignore ESP times; a constant keeps images reproducible
/// without tying them to `SOURCE_DATE_EPOCH`.
pub const ESP_TIMESTAMP: FatDateTime = FatDateTime::EPOCH;

/// The clock `hadris-fat` stamps entries with (it wants a `'static`).
static ESP_CLOCK: StaticTimeProvider = StaticTimeProvider(ESP_TIMESTAMP);

/// Buffer for streaming file contents and for clearing the range.
const BUFFER_BYTES: usize = MIB as usize;

/// A file to put on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspFile {
    /// Path inside the ESP, `/`-separated, without a leading `/`, e.g.
    /// `EFI/BOOT/BOOTX64.EFI` or `loader/entries/kiln-a.conf`. Printable
    /// ASCII except `"*:<>?\|`; compared case-insensitively, as FAT does.
    pub path: String,
    /// The contents.
    pub data: EspData,
}

/// Where an [`EspFile`]'s contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EspData {
    /// Small files rendered in memory (loader entries, `loader.conf`).
    Bytes(Vec<u8>),
    /// A file on the host, streamed in (kernels, initrds, EFI binaries).
    File(PathBuf),
}

impl EspFile {
    /// A file with in-memory contents.
    pub fn bytes(path: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        EspFile {
            path: path.into(),
            data: EspData::Bytes(data.into()),
        }
    }

    /// A file copied from `source` on the host while the ESP is written.
    pub fn copy_of(path: impl Into<String>, source: impl Into<PathBuf>) -> Self {
        EspFile {
            path: path.into(),
            data: EspData::File(source.into()),
        }
    }

    /// Size of the contents in bytes.
    fn len(&self) -> Result<u64> {
        match &self.data {
            EspData::Bytes(bytes) => Ok(bytes.len() as u64),
            EspData::File(source) => Ok(std::fs::metadata(source)
                .with_context(|| {
                    format!("reading {} for ESP file {}", source.display(), self.path)
                })?
                .len()),
        }
    }
}

/// Formats `size_bytes` of `disk` starting at `offset_bytes` as a FAT32 ESP
/// with volume id `volume_id` and writes `files` into it.
///
/// The range must be 512-byte aligned, at least [`ESP_MIN_BYTES`] long and
/// inside the (already sized, typically sparse) file; bytes outside it are
/// never touched. Paths are checked before anything is written. The data is
/// not fsynced: that is the caller's publish step.
pub fn write_esp(
    disk: &mut File,
    offset_bytes: u64,
    size_bytes: u64,
    volume_id: u32,
    files: &[EspFile],
) -> Result<()> {
    let disk: &File = disk;
    check_range(disk, offset_bytes, size_bytes)?;
    ensure!(
        size_bytes >= ESP_MIN_BYTES,
        "ESP of {size_bytes} bytes is below the FAT32 minimum of {ESP_MIN_MIB} MiB \
         (OVMF refuses smaller FAT32 volumes); make the ESP at least {ESP_MIN_MIB} MiB"
    );

    let tree = build_tree(files)?;
    let options = format_options(offset_bytes, size_bytes, volume_id)?;
    let params = FatVolumeFormatter::calculate_params(&options)
        .with_context(|| format!("laying out a FAT32 volume of {size_bytes} bytes"))?;
    ensure!(
        params.fat_type == FatType::Fat32 && params.cluster_count >= FAT32_MIN_CLUSTERS,
        "a {size_bytes}-byte ESP has only {} clusters, FAT32 needs {FAT32_MIN_CLUSTERS}",
        params.cluster_count
    );
    // The root directory holds the first cluster already.
    let free_clusters = u64::from(params.cluster_count) - 1;
    let needed_clusters = clusters_needed(&tree);
    ensure!(
        needed_clusters <= free_clusters,
        "the ESP files need {} MiB but a {} MiB ESP has {} MiB free; make the ESP bigger",
        (needed_clusters * CLUSTER_BYTES).div_ceil(MIB),
        size_bytes / MIB,
        free_clusters * CLUSTER_BYTES / MIB,
    );

    zero_range(disk, offset_bytes, size_bytes)?;
    let io = RangeIo::new(disk, offset_bytes, size_bytes);
    let formatted =
        FatVolumeFormatter::format(io, options).context("formatting the ESP as FAT32")?;
    // The formatter opens the volume with the wall clock; reopen it with ours
    // (the builder reads the boot sector from the current position).
    let mut io = formatted.into_inner();
    io.seek(SeekFrom::Start(0))?;
    let fs = FatVolume::builder(io)
        .time_provider(&ESP_CLOCK)
        .open()
        .context("opening the freshly formatted ESP")?;
    write_tree(&fs, &fs.root_dir(), &tree, "")?;
    fs.sync().context("writing the ESP's FSInfo sector")?;
    Ok(())
}

/// Reads the file at `path` (case-insensitive, `/`-separated) from the ESP
/// at `offset_bytes` of `disk`.
pub fn read_esp_file(
    disk: &mut File,
    offset_bytes: u64,
    size_bytes: u64,
    path: &str,
) -> Result<Vec<u8>> {
    let fs = open_esp(disk, offset_bytes, size_bytes)?;
    let entry = fs
        .open_path(path)
        .with_context(|| format!("looking up {path} on the ESP"))?;
    ensure!(
        entry.is_file(),
        "{path} on the ESP is a directory, not a file"
    );
    fs.read_file(&entry)
        .and_then(|mut reader| reader.read_to_vec())
        .with_context(|| format!("reading {path} from the ESP"))
}

/// One file or directory found on an ESP by [`list_esp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspEntry {
    /// Full path with long names, `/`-separated.
    pub path: String,
    /// The 8.3 alias, e.g. `KILN-A.CON` or `EN~3DDA.CON`.
    pub short_name: String,
    /// Whether this is a directory.
    pub is_dir: bool,
    /// File size in bytes (0 for directories).
    pub size_bytes: u64,
}

impl fmt::Display for EspEntry {
    /// `d|f  size  SHORT.NAM  path`, one line, as in the golden listing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_dir { 'd' } else { 'f' };
        write!(
            f,
            "{kind} {:>10} {:<12} {}",
            self.size_bytes, self.short_name, self.path
        )
    }
}

/// Lists every file and directory on the ESP at `offset_bytes` of `disk`,
/// depth first, in directory order.
pub fn list_esp(disk: &mut File, offset_bytes: u64, size_bytes: u64) -> Result<Vec<EspEntry>> {
    let fs = open_esp(disk, offset_bytes, size_bytes)?;
    let mut out = Vec::new();
    list_dir(&fs, &fs.root_dir(), "", &mut out)?;
    Ok(out)
}

type Volume<'d> = FatVolume<RangeIo<'d>>;

fn open_esp(disk: &File, offset_bytes: u64, size_bytes: u64) -> Result<Volume<'_>> {
    check_range(disk, offset_bytes, size_bytes)?;
    FatVolume::open(RangeIo::new(disk, offset_bytes, size_bytes)).with_context(|| {
        format!("opening the FAT file system at byte {offset_bytes} of the disk image")
    })
}

fn list_dir<'d>(
    fs: &Volume<'d>,
    dir: &FatDir<'_, RangeIo<'d>>,
    parent: &str,
    out: &mut Vec<EspEntry>,
) -> Result<()> {
    let mut entries = dir.entries();
    while let Some(entry) = entries.next_entry() {
        let DirectoryEntry::Entry(entry) =
            entry.with_context(|| format!("listing /{parent} on the ESP"))?;
        let name = entry.name();
        if name == "." || name == ".." {
            continue;
        }
        let path = join(parent, &name);
        out.push(EspEntry {
            path: path.clone(),
            short_name: short_name_display(&entry.short_name().raw_bytes()),
            is_dir: entry.is_directory(),
            size_bytes: if entry.is_directory() { 0 } else { entry.len() },
        });
        if entry.is_directory() {
            let sub = fs.open_dir_entry(&entry)?;
            list_dir(fs, &sub, &path, out)?;
        }
    }
    Ok(())
}

/// `KILN-A  CON` → `KILN-A.CON`.
fn short_name_display(raw: &[u8; 11]) -> String {
    let base = String::from_utf8_lossy(&raw[..8]).trim_end().to_string();
    let ext = String::from_utf8_lossy(&raw[8..]).trim_end().to_string();
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Checks that the range is sector-aligned and inside `disk`.
fn check_range(disk: &File, offset_bytes: u64, size_bytes: u64) -> Result<()> {
    ensure!(
        offset_bytes.is_multiple_of(SECTOR_BYTES) && size_bytes.is_multiple_of(SECTOR_BYTES),
        "ESP at byte {offset_bytes}, {size_bytes} bytes long, is not aligned to {SECTOR_BYTES}-byte sectors"
    );
    let end = offset_bytes
        .checked_add(size_bytes)
        .context("ESP range overflows")?;
    let disk_bytes = disk
        .metadata()
        .context("reading the disk image's size")?
        .len();
    ensure!(
        end <= disk_bytes,
        "ESP ends at byte {end} but the disk image is only {disk_bytes} bytes; size the image first"
    );
    Ok(())
}

fn format_options(offset_bytes: u64, size_bytes: u64, volume_id: u32) -> Result<FatFormatOptions> {
    // Hidden sectors: the partition's first LBA, as mkfs.fat writes it.
    let hidden_sectors = u32::try_from(offset_bytes / SECTOR_BYTES)
        .context("the ESP must start within the first 2 TiB of the disk")?;
    let mut options = FatFormatOptions::new(size_bytes)
        .fat_type(FatTypeSelection::Fat32)
        .sector_size(SectorSize::S512)
        .sectors_per_cluster(CLUSTER_SECTORS)
        .fat_copies(FAT_COPIES)
        .media_type(MediaType::FixedDisk)
        .hidden_sectors(hidden_sectors)
        .volume_id(volume_id);
    // No `.volume_label(..)`: the BPB keeps "NO NAME" and no label entry
    // (with a wall-clock time) is written to the root directory.
    options.oem_name = OemName::new(OEM_NAME);
    Ok(options)
}

/// Zeroes the range so unused clusters and file tails are reproducible,
/// writing only chunks that are not zero already (a fresh sparse image
/// stays sparse).
fn zero_range(disk: &File, offset_bytes: u64, size_bytes: u64) -> Result<()> {
    // A new image file is all holes here: nothing to read or clear.
    let first = crate::util::sparse::next_data(disk, offset_bytes)
        .context("looking for data in the ESP's range")?;
    if first.is_none_or(|(start, _)| start >= offset_bytes + size_bytes) {
        return Ok(());
    }
    let mut buf = vec![0u8; BUFFER_BYTES];
    let zeros = vec![0u8; BUFFER_BYTES];
    let mut done = 0;
    while done < size_bytes {
        let n = (size_bytes - done).min(BUFFER_BYTES as u64) as usize;
        let at = offset_bytes + done;
        disk.read_exact_at(&mut buf[..n], at)
            .with_context(|| format!("reading the disk image at byte {at}"))?;
        if buf[..n] != zeros[..n] {
            disk.write_all_at(&zeros[..n], at)
                .with_context(|| format!("clearing the ESP at byte {at}"))?;
        }
        done += n as u64;
    }
    Ok(())
}

/// The files to write, as a directory tree sorted by name.
type Tree<'a> = BTreeMap<&'a str, Node<'a>>;

enum Node<'a> {
    Dir(Tree<'a>),
    File(&'a EspFile, u64),
}

/// Validates every path and arranges the files in a tree; no I/O but the
/// sizes of host files.
fn build_tree(files: &[EspFile]) -> Result<Tree<'_>> {
    let mut root = Tree::new();
    for file in files {
        let components = split_path(&file.path)?;
        let len = file.len()?;
        ensure!(
            len <= FAT32_MAX_FILE_BYTES,
            "ESP file {} is {len} bytes; FAT32 files are limited to 4 GiB - 1",
            file.path
        );
        let (name, dirs) = components
            .split_last()
            .expect("split_path returns a component");
        let mut tree = &mut root;
        for (depth, dir) in dirs.iter().enumerate() {
            check_case_clash(tree, dir, &file.path)?;
            let node = tree.entry(dir).or_insert_with(|| Node::Dir(Tree::new()));
            tree = match node {
                Node::Dir(sub) => sub,
                Node::File(..) => bail!(
                    "ESP path {} needs {} to be a directory, but it is also a file",
                    file.path,
                    components[..=depth].join("/")
                ),
            };
        }
        check_case_clash(tree, name, &file.path)?;
        ensure!(
            !tree.contains_key(name),
            "ESP path {} is given twice (or is also a directory)",
            file.path
        );
        tree.insert(name, Node::File(file, len));
    }
    Ok(root)
}

/// FAT names are case-insensitive: `EFI` and `efi` are the same directory.
fn check_case_clash(tree: &Tree<'_>, name: &str, path: &str) -> Result<()> {
    if let Some(other) = tree
        .keys()
        .find(|k| **k != name && k.eq_ignore_ascii_case(name))
    {
        bail!(
            "ESP path {path}: {name} and {other} differ only in case, which FAT cannot tell apart"
        );
    }
    Ok(())
}

/// Splits an ESP path into its components, rejecting what FAT or firmware
/// cannot store.
fn split_path(path: &str) -> Result<Vec<&str>> {
    ensure!(
        !path.is_empty() && !path.starts_with('/') && !path.ends_with('/'),
        "ESP path {path:?} must be relative, like EFI/BOOT/BOOTX64.EFI"
    );
    let components: Vec<&str> = path.split('/').collect();
    for name in &components {
        ensure!(
            !name.is_empty() && *name != "." && *name != "..",
            "ESP path {path:?} has an empty, `.` or `..` component"
        );
        ensure!(
            name.len() <= NAME_MAX_CHARS,
            "ESP path {path:?}: a name is longer than {NAME_MAX_CHARS} characters"
        );
        if let Some(bad) = name
            .chars()
            .find(|&c| !(' '..='~').contains(&c) || "\"*:<>?\\|".contains(c))
        {
            bail!(
                "ESP path {path:?}: {bad:?} is not allowed (printable ASCII except \"*:<>?\\| only)"
            );
        }
        ensure!(
            !name.starts_with(' ') && !name.ends_with(' ') && !name.ends_with('.'),
            "ESP path {path:?}: names may not start or end with a space or end with a dot"
        );
    }
    Ok(components)
}

/// Clusters the tree needs beyond the root's first one: file data plus
/// directory clusters (a directory holds `.`, `..`, and per entry one short
/// slot and, for a long name, one slot per 13 characters).
fn clusters_needed(tree: &Tree<'_>) -> u64 {
    fn dir_clusters(tree: &Tree<'_>, is_root: bool) -> u64 {
        let mut slots: u64 = if is_root { 0 } else { 2 };
        let mut clusters = 0;
        for (name, node) in tree {
            slots += 1 + name.len().div_ceil(LFN_CHARS_PER_SLOT) as u64;
            clusters += match node {
                Node::Dir(sub) => dir_clusters(sub, false),
                Node::File(_, len) => len.div_ceil(CLUSTER_BYTES),
            };
        }
        let own = (slots * DIR_ENTRY_BYTES).div_ceil(CLUSTER_BYTES).max(1);
        clusters + if is_root { own - 1 } else { own }
    }
    dir_clusters(tree, true)
}

/// Creates `tree`'s entries in `dir` in sorted order, depth first.
fn write_tree<'a, 'd>(
    fs: &'a Volume<'d>,
    dir: &FatDir<'a, RangeIo<'d>>,
    tree: &Tree<'_>,
    parent: &str,
) -> Result<()> {
    for (name, node) in tree {
        let path = join(parent, name);
        match node {
            Node::Dir(sub) => {
                let sub_dir = fs
                    .create_dir(dir, name)
                    .with_context(|| format!("creating directory {path} on the ESP"))?;
                write_tree(fs, &sub_dir, sub, &path)?;
            }
            Node::File(file, len) => {
                write_file(fs, dir, name, file, *len)
                    .with_context(|| format!("writing {path} to the ESP"))?;
            }
        }
    }
    Ok(())
}

fn write_file<'d>(
    fs: &Volume<'d>,
    dir: &FatDir<'_, RangeIo<'d>>,
    name: &str,
    file: &EspFile,
    len: u64,
) -> Result<()> {
    let entry = fs.create_file(dir, name)?;
    if len == 0 {
        return Ok(());
    }
    let mut writer = fs.write_file(&entry)?;
    let mut put = |mut chunk: &[u8]| -> Result<()> {
        while !chunk.is_empty() {
            let n = writer.write(chunk)?;
            ensure!(n > 0, "the FAT writer accepted no bytes");
            chunk = &chunk[n..];
        }
        Ok(())
    };
    let written = match &file.data {
        EspData::Bytes(bytes) => {
            put(bytes)?;
            bytes.len() as u64
        }
        EspData::File(source) => {
            let mut input =
                File::open(source).with_context(|| format!("opening {}", source.display()))?;
            let mut buf = vec![0u8; BUFFER_BYTES];
            let mut total = 0u64;
            loop {
                let n = input
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", source.display()))?;
                if n == 0 {
                    break;
                }
                put(&buf[..n])?;
                total += n as u64;
            }
            total
        }
    };
    ensure!(
        written == len,
        "{} changed size while being copied ({len} bytes, then {written})",
        match &file.data {
            EspData::File(source) => source.display().to_string(),
            EspData::Bytes(_) => "the contents".to_string(),
        }
    );
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::path::Path;
    use std::process::Command;

    const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/esp-listing.txt");

    /// The ESP starts at 1 MiB, as in a GPT plan.
    const OFFSET: u64 = MIB;
    const SIZE: u64 = ESP_MIN_BYTES;
    /// Marker bytes just before and just after the ESP's range.
    const BEFORE: &[u8] = b"kiln: before the ESP";
    const AFTER: &[u8] = b"kiln: after the ESP";
    const VOLUME_ID: u32 = 0x4b31_4e00;
    const KERNEL: &str = "kiln/vmlinuz-6.1.0-28-amd64";
    const KERNEL_BYTES: usize = 5 * 1000 * 1000 + 123;

    /// Deterministic pseudo-random bytes (xorshift), so the big file has
    /// no runs a FAT bug could hide in.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A sparse disk image with markers around the ESP range.
    fn disk(dir: &Path, name: &str) -> File {
        let path = dir.join(name);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        file.set_len(OFFSET + SIZE + MIB).unwrap();
        file.write_all_at(BEFORE, OFFSET - BEFORE.len() as u64)
            .unwrap();
        file.write_all_at(AFTER, OFFSET + SIZE).unwrap();
        file
    }

    fn markers_intact(disk: &File) {
        let mut before = vec![0u8; BEFORE.len()];
        let mut after = vec![0u8; AFTER.len()];
        disk.read_exact_at(&mut before, OFFSET - BEFORE.len() as u64)
            .unwrap();
        disk.read_exact_at(&mut after, OFFSET + SIZE).unwrap();
        assert_eq!(before, BEFORE, "bytes before the ESP changed");
        assert_eq!(after, AFTER, "bytes after the ESP changed");
    }

    /// Nested directories, a streamed 5 MB file, long names, an empty file
    /// and a directory of 150 entries (more than one 4 KiB cluster).
    fn files(dir: &Path) -> Vec<EspFile> {
        let kernel = dir.join("vmlinuz");
        if !kernel.exists() {
            std::fs::write(&kernel, noise(KERNEL_BYTES, 7)).unwrap();
        }
        let mut files = vec![
            EspFile::bytes("loader/loader.conf", "timeout 0\ndefault kiln-a.conf\n"),
            EspFile::bytes(
                "loader/entries/kiln-a.conf",
                "title kiln A\nlinux /kiln/vmlinuz-6.1.0-28-amd64\n",
            ),
            EspFile::bytes("EFI/BOOT/BOOTX64.EFI", noise(123_457, 1)),
            EspFile::bytes("EFI/systemd/systemd-bootx64.efi", noise(98_765, 2)),
            EspFile::copy_of(KERNEL, &kernel),
            EspFile::bytes("kiln/empty", Vec::new()),
            EspFile::bytes(
                "loader/random-seed-with-a-rather-long-name.bin",
                noise(512, 3),
            ),
        ];
        for i in 0..150 {
            files.push(EspFile::bytes(
                format!("many/entry-{i:03}.conf"),
                format!("{i}\n"),
            ));
        }
        files
    }

    /// SHA-256 over the ESP's non-zero 1 MiB chunks, each with its index:
    /// as exact as hashing all 260 MiB, and fast in a debug build.
    fn partition_sha256(disk: &File) -> String {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; BUFFER_BYTES];
        let zeros = vec![0u8; BUFFER_BYTES];
        for (index, at) in (0..SIZE).step_by(BUFFER_BYTES).enumerate() {
            disk.read_exact_at(&mut buf, OFFSET + at).unwrap();
            if buf != zeros {
                hasher.update((index as u64).to_le_bytes());
                hasher.update(&buf);
            }
        }
        hex::encode(hasher.finalize())
    }

    /// Copies the ESP's range into its own (sparse) file for fsck.vfat.
    fn extract(disk: &File, to: &Path) {
        let out = File::create_new(to).unwrap();
        out.set_len(SIZE).unwrap();
        let mut buf = vec![0u8; BUFFER_BYTES];
        let zeros = vec![0u8; BUFFER_BYTES];
        let mut done = 0;
        while done < SIZE {
            disk.read_exact_at(&mut buf, OFFSET + done).unwrap();
            if buf != zeros {
                out.write_all_at(&buf, done).unwrap();
            }
            done += buf.len() as u64;
        }
    }

    /// Runs a tool, returning its exit success, stdout and stderr.
    fn run(dir: &Path, program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(program)
            .args(args)
            .current_dir(dir)
            .env("LC_ALL", "C")
            .env("TZ", "UTC")
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap_or_else(|e| {
                panic!("running {program} (apt-get install dosfstools mtools): {e}")
            });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    #[test]
    fn esp_is_fsck_clean_and_mtools_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = disk(dir.path(), "disk.img");
        let files = files(dir.path());
        write_esp(&mut disk, OFFSET, SIZE, VOLUME_ID, &files).unwrap();
        markers_intact(&disk);

        extract(&disk, &dir.path().join("esp.img"));
        let (ok, fsck) = run(dir.path(), "fsck.vfat", &["-n", "-v", "esp.img"]);
        assert!(ok, "fsck.vfat -n failed:\n{fsck}");
        for bad in ["Fix", "differ", "Dirty", "Free cluster summary wrong"] {
            assert!(!fsck.contains(bad), "fsck.vfat -n reports {bad:?}:\n{fsck}");
        }
        assert!(fsck.contains("32 bit entries"), "not FAT32:\n{fsck}");
        assert!(fsck.contains("4096 bytes per cluster"), "{fsck}");

        // mtools reads it in place, by offset into the whole disk.
        let image = format!("disk.img@@{OFFSET}");
        let (ok, listing) = run(dir.path(), "mdir", &["-i", &image, "-/", "-a", "::"]);
        assert!(ok, "mdir failed:\n{listing}");
        for name in [
            "BOOTX64  EFI",
            "systemd-bootx64.efi",
            "kiln-a.conf",
            "loader.conf",
            "vmlinuz-6.1.0-28-amd64",
            "random-seed-with-a-rather-long-name.bin",
            "entry-149.conf",
        ] {
            assert!(listing.contains(name), "mdir lacks {name}:\n{listing}");
        }
        assert!(listing.contains("4B31-4E00"), "volume id:\n{listing}");
        assert!(listing.contains("1980-01-01"), "timestamps:\n{listing}");

        for file in &files {
            let want = match &file.data {
                EspData::Bytes(bytes) => bytes.clone(),
                EspData::File(source) => std::fs::read(source).unwrap(),
            };
            let out = dir.path().join("out");
            let (ok, text) = run(
                dir.path(),
                "mcopy",
                &["-n", "-i", &image, &format!("::/{}", file.path), "out"],
            );
            assert!(ok, "mcopy {} failed:\n{text}", file.path);
            assert_eq!(
                std::fs::read(&out).unwrap(),
                want,
                "{} read back by mcopy",
                file.path
            );
            std::fs::remove_file(out).unwrap();
        }
    }

    #[test]
    fn esp_reads_back_and_matches_golden_listing() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = disk(dir.path(), "disk.img");
        let files = files(dir.path());
        let t = std::time::Instant::now();
        write_esp(&mut disk, OFFSET, SIZE, VOLUME_ID, &files).unwrap();
        eprintln!("TIMING write {:?}", t.elapsed());

        let t = std::time::Instant::now();
        let kernel = read_esp_file(&mut disk, OFFSET, SIZE, KERNEL).unwrap();
        eprintln!("TIMING read {:?}", t.elapsed());
        assert_eq!(kernel, noise(KERNEL_BYTES, 7));
        // FAT is case-insensitive, and so is the lookup.
        let entry = read_esp_file(&mut disk, OFFSET, SIZE, "LOADER/ENTRIES/KILN-A.CONF").unwrap();
        assert!(entry.starts_with(b"title kiln A\n"));
        assert!(read_esp_file(&mut disk, OFFSET, SIZE, "EFI/BOOT").is_err());
        assert!(read_esp_file(&mut disk, OFFSET, SIZE, "EFI/BOOT/nope.efi").is_err());

        let t = std::time::Instant::now();
        let listing = list_esp(&mut disk, OFFSET, SIZE).unwrap();
        eprintln!("TIMING list {:?}", t.elapsed());
        let listing: String = listing
            .iter()
            .filter(|e| !e.path.starts_with("many/") || e.path.ends_with("-149.conf"))
            .map(|e| format!("{e}\n"))
            .collect();
        let dump = format!("{listing}sha256 {}\n", partition_sha256(&disk));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(GOLDEN, &dump).unwrap();
        }
        let golden = std::fs::read_to_string(GOLDEN)
            .unwrap_or_else(|e| panic!("{GOLDEN}: {e} (run with UPDATE_GOLDEN=1)"));
        assert_eq!(dump, golden, "ESP differs from {GOLDEN}");
    }

    #[test]
    fn same_inputs_same_bytes_even_over_old_data() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let mut a = disk(dir.path(), "a.img");
        write_esp(&mut a, OFFSET, SIZE, VOLUME_ID, &files).unwrap();

        // b.img held something else first: other files, then garbage.
        let mut b = disk(dir.path(), "b.img");
        let other = [EspFile::bytes("EFI/BOOT/BOOTX64.EFI", noise(9_000_000, 9))];
        write_esp(&mut b, OFFSET, SIZE, 1, &other).unwrap();
        b.write_all_at(&noise(3 * MIB as usize, 5), OFFSET + 100 * MIB)
            .unwrap();
        write_esp(&mut b, OFFSET, SIZE, VOLUME_ID, &files).unwrap();

        assert_eq!(partition_sha256(&a), partition_sha256(&b));
        markers_intact(&b);

        let mut c = disk(dir.path(), "c.img");
        write_esp(&mut c, OFFSET, SIZE, VOLUME_ID + 1, &files).unwrap();
        assert_ne!(
            partition_sha256(&a),
            partition_sha256(&c),
            "volume id is ignored"
        );
    }

    #[test]
    fn bad_ranges_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = disk(dir.path(), "disk.img");
        let files = [EspFile::bytes("a", "a")];
        let err = write_esp(&mut disk, OFFSET, SIZE - MIB, VOLUME_ID, &files).unwrap_err();
        assert!(format!("{err:#}").contains("260 MiB"), "{err:#}");
        let err = write_esp(&mut disk, OFFSET + 1, SIZE, VOLUME_ID, &files).unwrap_err();
        assert!(format!("{err:#}").contains("aligned"), "{err:#}");
        let err = write_esp(&mut disk, OFFSET + 2 * MIB, SIZE, VOLUME_ID, &files).unwrap_err();
        assert!(
            format!("{err:#}").contains("size the image first"),
            "{err:#}"
        );
        markers_intact(&disk);
    }

    #[test]
    fn bad_paths_are_errors_before_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = disk(dir.path(), "disk.img");
        let cases: &[(&[&str], &str)] = &[
            (&["/EFI/BOOT/BOOTX64.EFI"], "relative"),
            (&["EFI//BOOTX64.EFI"], "empty"),
            (&["EFI/../x"], "`..`"),
            (&["EFI/BOOT/a:b"], "not allowed"),
            (&["EFI/BOOT/bö"], "not allowed"),
            (&["EFI/BOOT/trailing."], "end with a dot"),
            (&["EFI/x", "efi/y"], "differ only in case"),
            (&["EFI/x", "EFI/x"], "twice"),
            (&["EFI/x", "EFI/x/y"], "also a file"),
            (&["EFI/x/y", "EFI/x"], "twice (or is also a directory)"),
        ];
        for (paths, want) in cases {
            let files: Vec<EspFile> = paths.iter().map(|p| EspFile::bytes(*p, "x")).collect();
            let err = write_esp(&mut disk, OFFSET, SIZE, VOLUME_ID, &files).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{paths:?}: {err:#}");
        }
        let missing = [EspFile::copy_of("vmlinuz", dir.path().join("nope"))];
        let err = write_esp(&mut disk, OFFSET, SIZE, VOLUME_ID, &missing).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");

        // Nothing was formatted: the range is still all zero.
        let mut head = vec![0u8; 4096];
        disk.read_exact_at(&mut head, OFFSET).unwrap();
        assert!(head.iter().all(|&b| b == 0));
    }

    #[test]
    fn files_too_big_for_the_esp_are_an_error_before_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = disk(dir.path(), "disk.img");
        let big = dir.path().join("big");
        File::create_new(&big).unwrap().set_len(SIZE).unwrap();
        let files = [EspFile::copy_of("kiln/initrd.img", &big)];
        let err = write_esp(&mut disk, OFFSET, SIZE, VOLUME_ID, &files).unwrap_err();
        assert!(
            format!("{err:#}").contains("make the ESP bigger"),
            "{err:#}"
        );
    }
}
