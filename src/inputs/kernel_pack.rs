//! [`BaseFiles`] as one plain tar and back, so the build can cache what it
//! read out of a base tarball (two passes through 380 MB) as one small
//! file. One entry per field, `modules/<path>` per module; absent optional
//! fields have no entry. Reproducible: fixed order, mode and mtime.

use std::io::Read as _;

use anyhow::{Context as _, bail};

use super::kernel::BaseFiles;

const KERNEL_VERSION: &str = "kernel-version";
const VMLINUZ: &str = "vmlinuz";
const CONFIG: &str = "config";
const MODULES_DEP: &str = "modules.dep";
const MODULES_BUILTIN: &str = "modules.builtin";
const MODULES_SOFTDEP: &str = "modules.softdep";
const BUSYBOX: &str = "busybox";
const SYSTEMD_BOOT: &str = "systemd-boot";
const DPKG_STATUS: &str = "dpkg-status";
const MODULES: &str = "modules/";

/// The tar of `b`.
pub fn pack(b: &BaseFiles) -> anyhow::Result<Vec<u8>> {
    let mut t = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        t.append_data(&mut h, name, data)
            .with_context(|| format!("packing {name}"))
    };
    add(KERNEL_VERSION, b.kernel_version.as_bytes())?;
    add(VMLINUZ, &b.vmlinuz)?;
    if let Some(c) = &b.config {
        add(CONFIG, c.as_bytes())?;
    }
    add(MODULES_DEP, b.modules_dep.as_bytes())?;
    add(MODULES_BUILTIN, b.modules_builtin.as_bytes())?;
    add(MODULES_SOFTDEP, b.modules_softdep.as_bytes())?;
    add(BUSYBOX, &b.busybox)?;
    add(SYSTEMD_BOOT, &b.systemd_boot)?;
    if let Some(s) = &b.dpkg_status {
        add(DPKG_STATUS, s.as_bytes())?;
    }
    for (path, data) in &b.modules {
        add(&format!("{MODULES}{path}"), data)?;
    }
    Ok(t.into_inner()?)
}

/// The [`BaseFiles`] `bytes` ([`pack`]) hold.
pub fn unpack(bytes: &[u8]) -> anyhow::Result<BaseFiles> {
    let mut b = BaseFiles::default();
    let mut seen_version = false;
    for e in tar::Archive::new(bytes).entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        let text = || String::from_utf8(data.clone()).with_context(|| format!("{name}: not UTF-8"));
        match name.as_str() {
            KERNEL_VERSION => {
                b.kernel_version = text()?;
                seen_version = true;
            }
            VMLINUZ => b.vmlinuz = data,
            CONFIG => b.config = Some(text()?),
            MODULES_DEP => b.modules_dep = text()?,
            MODULES_BUILTIN => b.modules_builtin = text()?,
            MODULES_SOFTDEP => b.modules_softdep = text()?,
            BUSYBOX => b.busybox = data,
            SYSTEMD_BOOT => b.systemd_boot = data,
            DPKG_STATUS => b.dpkg_status = Some(text()?),
            _ => match name.strip_prefix(MODULES) {
                Some(path) => {
                    b.modules.insert(path.to_string(), data);
                }
                None => bail!("unknown entry {name} in packed base files"),
            },
        }
    }
    if !seen_version || b.vmlinuz.is_empty() {
        bail!("packed base files without a kernel");
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_packed_is_unpacked_the_same() {
        let mut b = BaseFiles {
            kernel_version: "6.1.0-28-cloud-amd64".into(),
            vmlinuz: b"kernel".to_vec(),
            config: Some("CONFIG_RD_ZSTD=y\n".into()),
            modules_dep: "kernel/fs/ext4/ext4.ko:\n".into(),
            modules_builtin: String::new(),
            modules_softdep: "softdep x pre: y\n".into(),
            busybox: b"busybox".to_vec(),
            systemd_boot: b"efi".to_vec(),
            modules: Default::default(),
            dpkg_status: None,
        };
        b.modules
            .insert("kernel/fs/ext4/ext4.ko".into(), b"ext4".to_vec());
        let packed = pack(&b).unwrap();
        assert_eq!(packed, pack(&b).unwrap(), "not reproducible");
        let back = unpack(&packed).unwrap();
        assert_eq!(format!("{back:?}"), format!("{b:?}"));
        assert!(unpack(&packed[..512]).is_err(), "a cut pack was read");
    }
}
