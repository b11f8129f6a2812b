//! The image tarballs k3s imports at its start (`k3s.airgap`,
//! `k3s.image-tarballs`), on every node, servers and agents alike.
//!
//! k3s imports whatever it finds in `/var/lib/rancher/k3s/agent/images`
//! each time it starts. That directory is on the state partition, but
//! the tarballs belong to the image slot: an A/B update must bring the
//! new release's set, and a rollback the old one. So the root image
//! carries them in `/usr/lib/kiln/images` (see `image::rootfs`), and a
//! read-only bind mount, ordered before k3s and required by it, shows
//! that directory at `agent/images`. Why a bind mount:
//!
//! - copying them in at each boot would write hundreds of MB to the
//!   state partition (a USB stick wears, a boot waits) every time;
//! - copying them once (seeding `/var`) goes stale after an A/B update,
//!   which is what the profile's `write-files` into `/var` did before;
//! - symlinks, one per tarball, would work for k3s (it opens through
//!   them) but need a unit that removes the links of the previous slot's
//!   set; the mount shows exactly this slot's set, nothing left over;
//! - read-only, nothing on the node can change what the slot holds.
//!
//! The cost: files put into `agent/images` by hand are hidden while it is
//! mounted (`kiln check` refuses `write-files` there), and k3s cannot
//! keep its `.cache.json` of imported archives there, so it imports every
//! tarball at each start, as it does by default.
//!
//! The unit is conditional on the slot having the directory: a root
//! image without tarballs then leaves `agent/images` as it is, and k3s
//! still starts (a skipped condition does not fail what requires it).

use crate::config::plan::{K3S_IMAGES_DIR, Plan, SLOT_IMAGES_DIR};
use crate::render::tree::FileTree;

use super::header;

/// The mount unit: systemd names it after the mount point.
pub const UNIT: &str = "var-lib-rancher-k3s-agent-images.mount";

/// The bind mount and k3s's requirement on it; nothing without tarballs.
pub fn render(plan: &Plan, tree: &mut FileTree) {
    if plan.airgap.is_empty() {
        return;
    }
    tree.file(
        &format!("/etc/systemd/system/{UNIT}"),
        0o644,
        format!(
            "{}[Unit]\nDescription=kiln: this image slot's image tarballs, where k3s imports them\nBefore=k3s.service\nConditionPathIsDirectory={SLOT_IMAGES_DIR}\n\n[Mount]\nWhat={SLOT_IMAGES_DIR}\nWhere={K3S_IMAGES_DIR}\nType=none\nOptions=bind,ro\n\n[Install]\nRequiredBy=k3s.service\n",
            header("#", plan)
        ),
    );
    // Required by k3s: if the tarballs cannot be shown, k3s must not start
    // and pull (or fail to pull) what it should have imported.
    tree.symlink(
        &format!("/etc/systemd/system/k3s.service.requires/{UNIT}"),
        &format!("/etc/systemd/system/{UNIT}"),
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn plan(k3s: &str) -> Plan {
        let text = format!(
            "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n{k3s}\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\n"
        );
        crate::config::plan::plan_profile(Path::new("lab.toml"), &text).unwrap()
    }

    #[test]
    fn nothing_without_tarballs() {
        let mut tree = FileTree::new();
        render(&plan(""), &mut tree);
        render(&plan("airgap = false"), &mut tree);
        assert_eq!(tree.iter().count(), 0);
    }

    #[test]
    fn a_read_only_bind_mount_required_by_k3s() {
        let mut tree = FileTree::new();
        render(&plan("airgap = true"), &mut tree);
        let unit = tree.text(&format!("/etc/systemd/system/{UNIT}")).unwrap();
        for line in [
            "What=/usr/lib/kiln/images",
            "Where=/var/lib/rancher/k3s/agent/images",
            "Options=bind,ro",
            "Before=k3s.service",
            "RequiredBy=k3s.service",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} in\n{unit}");
        }
        // systemd requires a mount unit's name to be its escaped mount point.
        assert_eq!(
            UNIT,
            format!(
                "{}.mount",
                K3S_IMAGES_DIR.trim_start_matches('/').replace('/', "-")
            )
        );
        assert!(tree.iter().any(|(p, _)| p
            == "/etc/systemd/system/k3s.service.requires/var-lib-rancher-k3s-agent-images.mount"));
    }
}
