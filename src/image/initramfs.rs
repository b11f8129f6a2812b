//! The initramfs (busybox, the kernel modules needed to find and mount
//! the root, and kiln's init) and the node seed (one node's rendered
//! files, as a second cpio the kernel unpacks over the first).

use std::io::Write as _;

use anyhow::Context as _;

use crate::image::cpio::CpioWriter;
use crate::inputs::kernel::{BaseFiles, Compression};
use crate::render::tree::{Entry, FileTree};

/// kiln's init script.
pub const INIT_SCRIPT: &str = include_str!("initramfs/init.sh");
/// busybox udhcpc's hook, for netboot.
pub const UDHCPC_SCRIPT: &str = include_str!("initramfs/udhcpc.sh");

/// Modules the initramfs loads, with their dependencies: enough to find
/// and mount the root on the machines kiln targets. Names a kernel builds
/// in are skipped.
pub const INITRAMFS_MODULES: &[&str] = &[
    // QEMU and cloud VMs
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    // SATA and NVMe disks
    "ahci",
    "sd_mod",
    "nvme",
    // USB sticks: host controllers, storage, UAS
    "xhci_pci",
    "xhci_hcd",
    "ehci_pci",
    "ehci_hcd",
    "ohci_pci",
    "uhci_hcd",
    "usb_storage",
    "uas",
    // SD cards and eMMC (laptops)
    "sdhci_pci",
    "sdhci_acpi",
    "mmc_block",
    // file systems: root, /etc overlay, state, ESP
    "squashfs",
    "overlay",
    "ext4",
    "crc32c_generic",
    "crc32c_intel",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "loop",
    // netboot (root image over HTTP): wired NICs of desktops and laptops,
    // USB Ethernet adapters
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "r8169",
    "tg3",
    "alx",
    "r8152",
    "cdc_ether",
    // which slot booted (systemd-boot's LoaderEntrySelected)
    "efivarfs",
];

/// Mode of the directories kiln creates in its archives.
const DIR_MODE: u32 = 0o755;

/// Build the initramfs: a compressed newc cpio.
pub fn build_initramfs(
    base: &BaseFiles,
    compression: Compression,
    mtime: u32,
) -> anyhow::Result<Vec<u8>> {
    let mut w = CpioWriter::new(Vec::new(), mtime);
    for d in [
        "bin",
        "sbin",
        "dev",
        "etc",
        "etc/kiln",
        "lib",
        "lib/modules",
        "proc",
        "run",
        "sys",
        "sysroot",
        "tmp",
    ] {
        w.dir(d, DIR_MODE, 0, 0)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.char_dev("dev/kmsg", 0o644, 1, 11)?;
    w.file("bin/busybox", 0o755, 0, 0, &base.busybox)?;
    w.symlink("bin/sh", "busybox")?;
    w.file("init", 0o755, 0, 0, INIT_SCRIPT.as_bytes())?;
    w.file("etc/kiln/udhcpc.sh", 0o755, 0, 0, UDHCPC_SCRIPT.as_bytes())?;
    let kmod_dir = format!("lib/modules/{}", base.kernel_version);
    let mut dirs = std::collections::BTreeSet::new();
    let order = crate::inputs::kernel::resolve_modules(
        &base.modules_dep,
        &base.modules_softdep,
        INITRAMFS_MODULES,
    );
    for rel in &order {
        let mut acc = kmod_dir.clone();
        dirs.insert(acc.clone());
        for part in rel
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            acc = format!("{acc}/{part}");
            dirs.insert(acc.clone());
        }
    }
    for d in &dirs {
        w.dir(d, DIR_MODE, 0, 0)?;
    }
    for rel in &order {
        let data = base
            .modules
            .get(rel)
            .with_context(|| format!("module {rel} was not read from the base"))?;
        w.file(&format!("{kmod_dir}/{rel}"), 0o644, 0, 0, data)?;
    }
    let list: String = order.iter().map(|m| format!("{m}\n")).collect();
    w.file("etc/kiln/modules", 0o644, 0, 0, list.as_bytes())?;
    let cpio = w.finish()?;
    let mut out = compress(&cpio, compression)?;
    // The kernel reads the next archive (the node seed) only from a
    // 4-byte aligned offset, and systemd-boot concatenates initrds without
    // padding: pad with zeros, which the kernel skips.
    out.resize(out.len().next_multiple_of(INITRD_ALIGN_BYTES), 0);
    Ok(out)
}

/// Alignment of an initrd that another archive follows (init/initramfs.c).
pub const INITRD_ALIGN_BYTES: usize = 4;

fn compress(data: &[u8], c: Compression) -> anyhow::Result<Vec<u8>> {
    match c {
        // The kernel's zstd decompressor needs a window it can allocate:
        // level 19 without long mode stays within 8 MiB.
        Compression::Zstd => Ok(zstd::stream::encode_all(data, 19)?),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data)?;
            Ok(e.finish()?)
        }
    }
}

/// The node seed: the node's files under `seed/`, uncompressed (the kernel
/// accepts a plain cpio after a compressed one). Holds secrets.
pub fn build_seed(tree: &FileTree, mtime: u32) -> anyhow::Result<Vec<u8>> {
    // The initramfs could not copy it: the node would not boot.
    if let Some(p) = tree
        .paths()
        .find(|p| !crate::render::SEED_DIRS.iter().any(|d| p.starts_with(d)))
    {
        anyhow::bail!(
            "kiln bug: the node seed holds {p}, outside {:?}, which the read-only root \
             cannot take at boot (it belongs in the root image)",
            crate::render::SEED_DIRS
        );
    }
    let mut w = CpioWriter::new(Vec::new(), mtime);
    w.dir("seed", DIR_MODE, 0, 0)?;
    for (dir, mode) in tree.parent_dirs() {
        w.dir(&format!("seed{dir}"), mode, 0, 0)?;
    }
    for (path, e) in tree.iter() {
        let p = format!("seed{path}");
        match e {
            Entry::File {
                content,
                mode,
                uid,
                gid,
            } => w.file(&p, *mode, *uid, *gid, content)?,
            Entry::Symlink { target } => w.symlink(&p, target)?,
            Entry::Dir { .. } => {}
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newc mode field (hex, after the 6-byte magic and 8-byte inode)
    /// of the entry named `name`.
    fn mode_of(cpio: &[u8], name: &str) -> u32 {
        let needle = format!("{name}\0");
        let at = cpio
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap_or_else(|| panic!("{name} not in the archive"));
        let header = at - 110;
        assert_eq!(&cpio[header..header + 6], b"070701");
        u32::from_str_radix(
            std::str::from_utf8(&cpio[header + 14..header + 22]).unwrap(),
            16,
        )
        .unwrap()
    }

    #[test]
    fn seed_carries_symlinks_as_symlinks() {
        // A masked unit must reach the node as a link to /dev/null, not as
        // a file (cp -a in init.sh copies the link as it is).
        let mut tree = FileTree::new();
        tree.symlink("/etc/systemd/system/suspend.target", "/dev/null");
        tree.file("/etc/hostname", 0o644, "n1\n");
        let seed = build_seed(&tree, 0).unwrap();
        assert_eq!(
            mode_of(&seed, "seed/etc/systemd/system/suspend.target"),
            0o120777
        );
        assert_eq!(mode_of(&seed, "seed/etc/hostname"), 0o100644);
    }
}
