//! What the build takes from the base tarball: the kernel, its config and
//! module index, chosen kernel modules, busybox and the systemd-boot EFI
//! binary for the boot stages, and dpkg's status file for the SBOM. Read
//! by streaming the tarball (no unpacking).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use anyhow::{Context as _, bail};

/// systemd-boot's EFI binary in a Debian root.
pub const SYSTEMD_BOOT_EFI: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// busybox from busybox-static: runs without the image's libraries.
pub const BUSYBOX: &str = "bin/busybox";

/// The files the boot stages need, read from a base tarball.
#[derive(Debug, Default)]
pub struct BaseFiles {
    pub kernel_version: String,
    pub vmlinuz: Vec<u8>,
    /// `/boot/config-<version>`, if present.
    pub config: Option<String>,
    pub modules_dep: String,
    pub modules_builtin: String,
    pub modules_softdep: String,
    pub busybox: Vec<u8>,
    pub systemd_boot: Vec<u8>,
    /// Module files by path relative to `lib/modules/<version>/`.
    pub modules: BTreeMap<String, Vec<u8>>,
    /// dpkg's status file ([`crate::inputs::dpkg::STATUS`]), if the root
    /// has one (a supplied non-Debian tarball may not).
    pub dpkg_status: Option<String>,
}

/// Normalise a tar path: no leading `./` or `/`, merged-/usr aware
/// (`lib/x` and `usr/lib/x` are the same file on Debian 12).
pub fn norm_path(p: &str) -> String {
    let p = p.trim_start_matches("./").trim_start_matches('/');
    for (from, to) in [
        ("lib/", "usr/lib/"),
        ("bin/", "usr/bin/"),
        ("sbin/", "usr/sbin/"),
    ] {
        if let Some(rest) = p.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    p.to_string()
}

fn open_tar(path: &Path) -> anyhow::Result<tar::Archive<Box<dyn Read>>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("opening base tarball {}", path.display()))?;
    let f = std::io::BufReader::with_capacity(1 << 20, f);
    let name = path.to_string_lossy();
    let r: Box<dyn Read> = if name.ends_with(".zst") || name.ends_with(".zstd") {
        Box::new(zstd::stream::read::Decoder::with_buffer(f)?)
    } else {
        Box::new(f)
    };
    Ok(tar::Archive::new(r))
}

/// Read the base's kernel, module index, busybox and systemd-boot, and
/// the modules named by `want` (module names, e.g. `virtio_blk`) with all
/// their dependencies (from `modules.dep`, plus `modules.softdep` `pre:`).
pub fn read_base_files(tarball: &Path, want: &[&str]) -> anyhow::Result<BaseFiles> {
    let mut b = BaseFiles::default();
    let mut kernels: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut configs: BTreeMap<String, String> = BTreeMap::new();
    let mut index: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut busybox_link: Option<String> = None;
    // Pass 1: small files and the kernel.
    for e in open_tar(tarball)?.entries()? {
        let mut e = e?;
        let path = norm_path(&e.path()?.to_string_lossy());
        let kind = e.header().entry_type();
        if let Some(ver) = path.strip_prefix("boot/vmlinuz-") {
            if kind.is_file() {
                let mut v = Vec::new();
                e.read_to_end(&mut v)?;
                kernels.insert(ver.to_string(), v);
            }
        } else if let Some(ver) = path.strip_prefix("boot/config-") {
            let mut s = String::new();
            e.read_to_string(&mut s)?;
            configs.insert(ver.to_string(), s);
        } else if let Some(rest) = path.strip_prefix("usr/lib/modules/") {
            if let Some((ver, file)) = rest.split_once('/')
                && ["modules.dep", "modules.builtin", "modules.softdep"].contains(&file)
            {
                let mut s = String::new();
                e.read_to_string(&mut s)?;
                index.insert((ver.to_string(), file.to_string()), s);
            }
        } else if path == norm_path(BUSYBOX) {
            if kind.is_file() {
                e.read_to_end(&mut b.busybox)?;
            } else if kind.is_hard_link() || kind.is_symlink() {
                busybox_link = e.link_name()?.map(|l| l.to_string_lossy().to_string());
            }
        } else if path == SYSTEMD_BOOT_EFI {
            e.read_to_end(&mut b.systemd_boot)?;
        } else if path == crate::inputs::dpkg::STATUS && kind.is_file() {
            let mut s = String::new();
            e.read_to_string(&mut s)
                .with_context(|| format!("reading {path} in {}", tarball.display()))?;
            b.dpkg_status = Some(s);
        }
    }
    let Some((ver, vmlinuz)) = kernels.into_iter().next_back() else {
        bail!(
            "{} has no kernel (boot/vmlinuz-*): add linux-image-amd64 or linux-image-cloud-amd64 to the base packages",
            tarball.display()
        );
    };
    b.kernel_version = ver.clone();
    b.vmlinuz = vmlinuz;
    b.config = configs.remove(&ver);
    b.modules_dep = index
        .remove(&(ver.clone(), "modules.dep".into()))
        .with_context(|| format!("{} has no lib/modules/{ver}/modules.dep", tarball.display()))?;
    b.modules_builtin = index
        .remove(&(ver.clone(), "modules.builtin".into()))
        .unwrap_or_default();
    b.modules_softdep = index
        .remove(&(ver.clone(), "modules.softdep".into()))
        .unwrap_or_default();
    if b.busybox.is_empty() {
        bail!(
            "{} has no {BUSYBOX}{}: add busybox-static to the base packages",
            tarball.display(),
            busybox_link
                .map(|l| format!(" (only a link to {l})"))
                .unwrap_or_default()
        );
    }
    if b.systemd_boot.is_empty() {
        bail!(
            "{} has no {SYSTEMD_BOOT_EFI}: add systemd-boot-efi to the base packages",
            tarball.display()
        );
    }
    // Pass 2: the modules.
    let needed: BTreeSet<String> = resolve_modules(&b.modules_dep, &b.modules_softdep, want)
        .into_iter()
        .collect();
    if !needed.is_empty() {
        let prefix = format!("usr/lib/modules/{ver}/");
        for e in open_tar(tarball)?.entries()? {
            let mut e = e?;
            let path = norm_path(&e.path()?.to_string_lossy());
            if let Some(rel) = path.strip_prefix(&prefix)
                && needed.contains(rel)
            {
                let mut v = Vec::new();
                e.read_to_end(&mut v)?;
                b.modules.insert(rel.to_string(), v);
            }
        }
        if let Some(m) = needed.iter().find(|m| !b.modules.contains_key(*m)) {
            bail!(
                "{} lists {m} in modules.dep but the file is missing",
                tarball.display()
            );
        }
    }
    Ok(b)
}

/// The module name of a module path: `kernel/fs/ext4/ext4.ko.xz` → `ext4`.
/// Names compare with `-` and `_` as the same character, like modprobe.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

/// Resolve module names to module files (relative to the modules dir)
/// in load order: dependencies first. Names that are built in or unknown
/// are skipped (a kernel that builds ext4 in needs no ext4.ko).
pub fn resolve_modules(modules_dep: &str, softdep: &str, want: &[&str]) -> Vec<String> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module_name(file),
            (
                file.to_string(),
                rest.split_whitespace().map(str::to_string).collect(),
            ),
        );
    }
    // softdep NAME pre: A B post: C  → load A, B before NAME.
    let mut pre: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in softdep.lines() {
        let mut it = line.split_whitespace();
        if it.next() != Some("softdep") {
            continue;
        }
        let Some(name) = it.next() else { continue };
        let mut in_pre = false;
        for t in it {
            match t {
                "pre:" => in_pre = true,
                "post:" => in_pre = false,
                m if in_pre => pre
                    .entry(name.replace('-', "_"))
                    .or_default()
                    .push(m.replace('-', "_")),
                _ => {}
            }
        }
    }
    let file_to_name: BTreeMap<String, String> = deps
        .iter()
        .map(|(n, (f, _))| (f.clone(), n.clone()))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        pre: &BTreeMap<String, Vec<String>>,
        f2n: &BTreeMap<String, String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((file, ds)) = deps.get(name) else {
            return;
        };
        for p in pre.get(name).into_iter().flatten() {
            visit(p, deps, pre, f2n, seen, order);
        }
        // modules.dep lists the full closure; visit each so its own order holds.
        for d in ds.iter().rev() {
            if let Some(n) = f2n.get(d) {
                visit(n, deps, pre, f2n, seen, order);
            }
        }
        order.push(file.clone());
    }
    for w in want {
        visit(
            &w.replace('-', "_"),
            &deps,
            &pre,
            &file_to_name,
            &mut seen,
            &mut order,
        );
    }
    order
}

/// Which initramfs compression does the kernel support? Reads the
/// kernel config: zstd if `CONFIG_RD_ZSTD=y`, else gzip if
/// `CONFIG_RD_GZIP=y`; without a config, gzip (every distribution kernel
/// has it).
pub fn initramfs_compression(config: Option<&str>) -> anyhow::Result<Compression> {
    let Some(c) = config else {
        return Ok(Compression::Gzip);
    };
    let has = |k: &str| c.lines().any(|l| l.trim() == format!("{k}=y"));
    if has("CONFIG_RD_ZSTD") {
        Ok(Compression::Zstd)
    } else if has("CONFIG_RD_GZIP") {
        Ok(Compression::Gzip)
    } else {
        bail!(
            "the kernel supports neither zstd nor gzip initramfs (CONFIG_RD_ZSTD, CONFIG_RD_GZIP); use a Debian kernel"
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Gzip,
}

/// A tiny base tarball for tests, zstd-compressed as mmdebstrap writes
/// it (`./`-prefixed paths, merged /usr): a kernel, its module index,
/// busybox, systemd-boot and, if given, dpkg's status file.
#[cfg(test)]
pub(crate) fn fake_base_tarball(dir: &Path, dpkg_status: Option<&str>) -> std::path::PathBuf {
    let path = dir.join("base.tar.zst");
    let file = std::fs::File::create(&path).unwrap();
    let mut tar = tar::Builder::new(zstd::Encoder::new(file, 3).unwrap().auto_finish());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("./boot/vmlinuz-6.1.0-test", b"a kernel");
    add("./usr/lib/modules/6.1.0-test/modules.dep", b"");
    add("./usr/bin/busybox", b"busybox");
    add(&format!("./{SYSTEMD_BOOT_EFI}"), b"MZ systemd-boot");
    if let Some(s) = dpkg_status {
        add("./var/lib/dpkg/status", s.as_bytes());
    }
    tar.into_inner().unwrap();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\nkernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\nkernel/crypto/crc32c_generic.ko:\nkernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio.ko:\nkernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/usb/core/usbcore.ko\nkernel/drivers/usb/core/usbcore.ko:\n";

    #[test]
    fn modules_come_after_their_dependencies() {
        let order = resolve_modules(
            DEP,
            "softdep ext4 pre: crc32c\nsoftdep crc32c pre: crc32c_generic\n",
            &["ext4", "virtio_blk", "usb_storage", "nvme"],
        );
        let pos = |m: &str| {
            order
                .iter()
                .position(|f| f.ends_with(m))
                .unwrap_or_else(|| panic!("{m} missing from {order:?}"))
        };
        assert!(pos("jbd2.ko") < pos("ext4.ko"));
        assert!(pos("mbcache.ko") < pos("ext4.ko"));
        assert!(pos("virtio.ko") < pos("virtio_blk.ko"));
        assert!(
            pos("usbcore.ko") < pos("usb-storage.ko"),
            "dash and underscore are one"
        );
        assert!(
            !order.iter().any(|f| f.contains("nvme")),
            "unknown (built-in) modules are skipped"
        );
        assert_eq!(order.len(), 8, "{order:?}");
    }

    #[test]
    fn compression_follows_the_kernel_config() {
        assert_eq!(
            initramfs_compression(Some("CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n")).unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            initramfs_compression(Some("CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n")).unwrap(),
            Compression::Gzip
        );
        assert!(initramfs_compression(Some("")).is_err());
    }

    #[test]
    fn dpkg_status_is_read_with_the_boot_files() {
        let dir = tempfile::tempdir().unwrap();
        let status = "Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: all\n";
        let tarball = fake_base_tarball(dir.path(), Some(status));
        let b = read_base_files(&tarball, &[]).unwrap();
        assert_eq!(b.kernel_version, "6.1.0-test");
        assert_eq!(b.dpkg_status.as_deref(), Some(status));
        let tarball = fake_base_tarball(dir.path(), None);
        assert_eq!(read_base_files(&tarball, &[]).unwrap().dpkg_status, None);
    }

    #[test]
    fn paths_are_merged_usr() {
        assert_eq!(
            norm_path("./lib/modules/6.1/modules.dep"),
            "usr/lib/modules/6.1/modules.dep"
        );
        assert_eq!(norm_path("bin/busybox"), "usr/bin/busybox");
        assert_eq!(norm_path("./boot/vmlinuz-6.1"), "boot/vmlinuz-6.1");
    }
}
