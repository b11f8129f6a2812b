//! Assemble a node's disk image: GPT, the ESP, the root image in slot A,
//! an empty slot B and an empty state partition, written by offset into
//! a sparse file. No loop devices, no mounts.

/// qemu-img: qcow2 copies of images and VM overlays.
pub const QEMU_IMG: crate::util::tool::Tool =
    crate::util::tool::Tool::new("qemu-img", "qemu-utils");

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context as _, ensure};

use super::esp::{self, EspFile};
use super::gpt::{self, Guid, PartitionPlan};

pub use crate::util::size::MIB;
/// The ESP: FAT32 needs at least 260 MiB at 512-byte sectors for OVMF;
/// two slots of kernel + initramfs + seed fit with room to spare.
pub const ESP_MIB: u64 = 260;
/// Initial size of the state partition in the image file. It is formatted
/// and grown to the end of the disk on first boot.
pub const STATE_INITIAL_MIB: u64 = 256;
/// Each root slot holds 1.5 × the root image (rounded up to 64 MiB), so a
/// bigger root fits at the next A/B update.
pub const SLOT_HEADROOM_PERCENT: u64 = 150;
pub const SLOT_ROUND_MIB: u64 = 64;

/// Size of each root slot for a root image of `root_bytes`.
pub fn slot_mib(root_bytes: u64) -> u64 {
    let want = (root_bytes * SLOT_HEADROOM_PERCENT / 100).div_ceil(MIB);
    want.div_ceil(SLOT_ROUND_MIB) * SLOT_ROUND_MIB
}

/// Plan the partitions of a node's disk.
pub fn plan_disk(guid_seed: &str, root_bytes: u64) -> anyhow::Result<PartitionPlan> {
    let slot = slot_mib(root_bytes);
    gpt::plan_partitions(guid_seed, ESP_MIB, slot, slot, STATE_INITIAL_MIB)
}

/// The FAT volume id of a node's ESP, derived like the GUIDs.
pub fn volume_id(guid_seed: &str) -> u32 {
    let g = Guid::derive(guid_seed, "esp-volume-id");
    u32::from_le_bytes([g.0[0], g.0[1], g.0[2], g.0[3]])
}

/// Where kiln-install finds, on the ESP, what it needs to write this
/// image onto another disk: the image's own GPT, which a booted disk no
/// longer has (its first boot grew the state partition and moved the
/// backup table to the end of the disk), and the layout around it.
pub const INSTALL_DIR: &str = "kiln/install";

/// The sectors at the start of the image that hold the protective MBR,
/// the primary GPT header and the entry array.
pub const GPT_HEAD_SECTORS: u64 = 34;
/// The sectors at the end of the image that hold the backup entry array
/// and header.
pub const GPT_TAIL_SECTORS: u64 = 33;

/// The ESP files kiln-install reads (under [`INSTALL_DIR`]): `gpt-head`
/// and `gpt-tail` (the image's partition table, as [`write_disk`] writes
/// it) and `layout` (the image's size and where its state partition
/// starts: the image holds zeros from there up to the tail).
pub fn install_files(plan: &PartitionPlan) -> anyhow::Result<Vec<EspFile>> {
    let sector = gpt::SECTOR_BYTES;
    let head_bytes = GPT_HEAD_SECTORS * sector;
    let tail_bytes = GPT_TAIL_SECTORS * sector;
    let state = plan
        .partition("state")
        .context("the plan has no state partition")?;
    let mut scratch = tempfile::tempfile().context("a scratch file for the partition table")?;
    scratch.set_len(plan.disk_size_bytes)?;
    gpt::write_gpt(&mut scratch, plan)?;
    let mut head = vec![0; head_bytes as usize];
    let mut tail = vec![0; tail_bytes as usize];
    std::os::unix::fs::FileExt::read_exact_at(&scratch, &mut head, 0)?;
    std::os::unix::fs::FileExt::read_exact_at(
        &scratch,
        &mut tail,
        plan.disk_size_bytes - tail_bytes,
    )?;
    let layout = format!(
        "# kiln: the layout of the image this disk was written from (kiln-install reads it)\n\
         image-bytes={}\nhead-bytes={head_bytes}\nstate-start-bytes={}\ntail-bytes={tail_bytes}\n\
         disk-guid={}\n",
        plan.disk_size_bytes,
        state.offset_bytes(),
        plan.disk_guid,
    );
    Ok(vec![
        EspFile::bytes(format!("{INSTALL_DIR}/gpt-head"), head),
        EspFile::bytes(format!("{INSTALL_DIR}/gpt-tail"), tail),
        EspFile::bytes(format!("{INSTALL_DIR}/layout"), layout),
    ])
}

/// Write the disk image at `path` (created 0600: it holds the node's
/// secrets): GPT, ESP with `esp_files`, `root` copied into root-a.
pub fn write_disk(
    path: &Path,
    plan: &PartitionPlan,
    guid_seed: &str,
    root: &Path,
    esp_files: &[EspFile],
) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let writing = || format!("writing {}", path.display());
    f.set_len(plan.disk_size_bytes).with_context(writing)?;
    gpt::write_gpt(&mut f, plan)
        .with_context(|| format!("writing the partition table of {}", path.display()))?;
    let esp_part = plan.partition("ESP").expect("planned");
    esp::write_esp(
        &mut f,
        esp_part.offset_bytes(),
        esp_part.size_bytes(),
        volume_id(guid_seed),
        esp_files,
    )
    .with_context(|| format!("writing the ESP of {}", path.display()))?;
    let slot = plan.partition("root-a").expect("planned");
    let src = File::open(root).with_context(|| format!("reading root image {}", root.display()))?;
    let len = src
        .metadata()
        .with_context(|| format!("reading root image {}", root.display()))?
        .len();
    ensure!(
        len <= slot.size_bytes(),
        "root image {} ({len} bytes) does not fit slot root-a ({} bytes)",
        root.display(),
        slot.size_bytes()
    );
    // In the kernel, and shared where the filesystem can (reflinks): the
    // root is the same bytes in every node of a role.
    crate::util::sparse::copy_range(&src, 0, &f, slot.offset_bytes(), len).with_context(|| {
        format!(
            "copying root image {} into {}",
            root.display(),
            path.display()
        )
    })?;
    f.sync_all().with_context(writing)?;
    Ok(())
}
