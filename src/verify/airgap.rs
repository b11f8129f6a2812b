//! Checks of the image tarballs on a booted node (`k3s.airgap`,
//! `k3s.image-tarballs`, see `render::airgap`): every tarball the build
//! recorded in `manifest.json` is where k3s imports from, with its size
//! and digest; that directory is the slot's, a read-only bind mount of
//! the root image, in place before k3s started; the release's tarball
//! has the digest `kiln.lock` pins; and k3s listed exactly those as what
//! it imports (the double's record, or a real k3s's journal). Without
//! tarballs, nothing is mounted there.
//!
//! Not called by the suite yet; a boot test calls [`check_airgap`] with
//! the manifest of the build it boots.

use std::path::Path;

use crate::config::plan::{K3S_IMAGES_DIR, RELEASE_TARBALL_STEM};
use crate::image::manifest::ImageTarball;
use crate::inputs::k3s::{AIRGAP_IMAGES, pinned};
use crate::render::airgap::UNIT;
use crate::verify::report::{Check, Expect};
use crate::verify::vm::Vm;

/// Where the double records what it would import.
const DOUBLE_RECORD: &str = "/var/lib/rancher/k3s/double/images";

/// `name size sha256` per line, sorted.
fn lines_of(images: &[ImageTarball]) -> String {
    let mut v: Vec<String> = images
        .iter()
        .map(|t| format!("{} {} {}", t.name, t.size, t.sha256))
        .collect();
    v.sort();
    v.join("\n")
}

fn sorted(text: &str) -> String {
    let mut v: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort_unstable();
    v.join("\n")
}

/// Check the node's image tarballs against `images` (the build's
/// `manifest.json`: `Manifest::read(out)?.images`).
///
/// # Errors
/// Only when a command cannot be run over SSH; a wrong sighting is a
/// failed check.
pub fn check_airgap(
    vm: &Vm,
    key: &Path,
    e: &Expect,
    images: &[ImageTarball],
    out: &mut Vec<Check>,
) -> anyhow::Result<()> {
    let sh = |s: &str| vm.sh(key, s);
    let mount = sh(&format!(
        "findmnt -no FSTYPE,OPTIONS --mountpoint {K3S_IMAGES_DIR} || true"
    ))?;
    if images.is_empty() {
        out.push(Check::eq(
            "no image tarballs: nothing mounted on agent/images",
            "",
            &mount,
        ));
        return Ok(());
    }
    // squashfs, read-only: the root image's own directory, not a copy.
    let seen_mount = mount.split_whitespace().collect::<Vec<_>>();
    let fstype = seen_mount.first().copied().unwrap_or("");
    let ro = seen_mount
        .get(1)
        .is_some_and(|o| o.split(',').any(|x| x == "ro"));
    out.push(Check::new(
        "agent/images is the slot's tarballs, mounted read-only",
        "squashfs ro",
        mount.trim(),
        fstype == "squashfs" && ro,
    ));
    let listing = sh(&format!(
        "cd {K3S_IMAGES_DIR} && for f in *; do [ -e \"$f\" ] && echo \"$f $(stat -L -c %s \"$f\") $(sha256sum < \"$f\" | cut -c1-64)\"; done; true"
    ))?;
    let seen_listing = sorted(&listing);
    out.push(Check::eq(
        "image tarballs in agent/images (name, size, sha256)",
        &lines_of(images),
        &seen_listing,
    ));
    check_release_pin(e, images, &seen_listing, out)?;
    check_mounted_before_k3s(vm, key, out)?;
    check_k3s_lists(vm, key, e, images, out)
}

/// The release's tarball on the node has the digest `kiln.lock` pins for
/// the profile's k3s version (when the lock pins one).
fn check_release_pin(
    e: &Expect,
    images: &[ImageTarball],
    seen_listing: &str,
    out: &mut Vec<Check>,
) -> anyhow::Result<()> {
    let Some(release) = images
        .iter()
        .find(|t| t.name.starts_with(RELEASE_TARBALL_STEM))
    else {
        return Ok(());
    };
    let lock = e.plan.profile_path.with_file_name("kiln.lock");
    let version = e.plan.k3s.version.to_string();
    let Some((_, pin)) = pinned(&AIRGAP_IMAGES, &lock)?.filter(|(v, _)| *v == version) else {
        return Ok(());
    };
    let seen = seen_listing
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{} ", release.name))
                .and_then(|rest| rest.split_whitespace().nth(1))
        })
        .unwrap_or("missing");
    out.push(Check::eq(
        &format!("{} has the sha256 kiln.lock pins", release.name),
        &pin,
        seen,
    ));
    Ok(())
}

/// The bind mount was active before k3s started (k3s imports at start).
fn check_mounted_before_k3s(vm: &Vm, key: &Path, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let ts = vm.sh(
        key,
        &format!(
            "for u in {UNIT} k3s.service; do systemctl show -p ActiveEnterTimestampMonotonic --value $u; done"
        ),
    )?;
    let ts: Vec<u64> = ts.lines().map(|l| l.trim().parse().unwrap_or(0)).collect();
    let ordered = ts.len() == 2 && ts[0] > 0 && ts[1] > 0 && ts[0] <= ts[1];
    out.push(Check::new(
        "agent/images mounted before k3s started",
        format!("{UNIT} < k3s.service"),
        ts.iter()
            .map(|t| format!("{:.2}s", *t as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" < "),
        ordered,
    ));
    Ok(())
}

/// k3s saw the tarballs as what it imports: the double's record (name,
/// size, sha256 as it read them), or a real k3s's "Imported images
/// from" journal lines (names only).
fn check_k3s_lists(
    vm: &Vm,
    key: &Path,
    e: &Expect,
    images: &[ImageTarball],
    out: &mut Vec<Check>,
) -> anyhow::Result<()> {
    if e.real_k3s {
        let mut names: Vec<&str> = images.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        let journal = vm.sh(
            key,
            &format!(
                "journalctl -b -u k3s --no-pager -o cat | sed -n 's|.*Imported images from {K3S_IMAGES_DIR}/\\([^ \"]*\\).*|\\1|p' | sort -u"
            ),
        )?;
        out.push(Check::eq(
            "k3s imported each image tarball",
            &names.join("\n"),
            &sorted(&journal),
        ));
        return Ok(());
    }
    let record = vm.sh(key, &format!("cat {DOUBLE_RECORD} 2>/dev/null || true"))?;
    let imports: String = record
        .lines()
        .filter_map(|l| l.strip_prefix("import="))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push(Check::eq(
        "k3s (test double) would import exactly these tarballs",
        &lines_of(images),
        &sorted(&imports),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_compare_sorted_whatever_the_order() {
        let images = [
            ImageTarball {
                name: "registry.tar.zst".into(),
                sha256: "b".repeat(64),
                size: 2,
            },
            ImageTarball {
                name: "k3s-airgap-images-amd64.tar.zst".into(),
                sha256: "a".repeat(64),
                size: 1,
            },
        ];
        let seen = format!(
            "registry.tar.zst 2 {}\n\nk3s-airgap-images-amd64.tar.zst 1 {}\n",
            "b".repeat(64),
            "a".repeat(64)
        );
        assert_eq!(lines_of(&images), sorted(&seen));
    }
}
