//! `storage = [...]` as written, in `[cluster]` (every node) and in
//! `[[nodes]]` (that node, instead of the cluster's list): the storage
//! systems a node must be ready for. Each value names what the system
//! needs from the host ([`Storage::packages`], [`Storage::modules`],
//! [`Storage::iscsi`]); the plan resolves each node's list
//! (`plan/storage.rs`), rendering sets the node up (`render/storage.rs`).

use super::{At, Tab, inv};
use crate::config::diag::Diagnostics;
use crate::config::types::Invalid;

/// A storage system whose host prerequisites kiln installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Storage {
    /// Longhorn: iSCSI (open-iscsi, iscsid, `iscsi_tcp`) for its volumes,
    /// an NFS client for its ReadWriteMany volumes and backups
    /// (Longhorn's "installation requirements").
    Longhorn,
    /// Rook/Ceph: the kernel RBD client (`rbd`) for block volumes.
    RookCeph,
    /// NFS volumes (`nfs` in pods, NFS provisioners): the NFS client.
    Nfs,
}

/// Every value, in the order the docs and messages list them.
pub const ALL: [Storage; 3] = [Storage::Longhorn, Storage::RookCeph, Storage::Nfs];

impl Storage {
    pub fn as_str(self) -> &'static str {
        match self {
            Storage::Longhorn => "longhorn",
            Storage::RookCeph => "rook-ceph",
            Storage::Nfs => "nfs",
        }
    }

    /// Debian packages it needs in the base.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Storage::Longhorn => &["open-iscsi", "nfs-common"],
            Storage::RookCeph => &[],
            Storage::Nfs => &["nfs-common"],
        }
    }

    /// Kernel modules loaded at boot (modules-load.d).
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Storage::Longhorn => &["iscsi_tcp"],
            Storage::RookCeph => &["rbd"],
            Storage::Nfs => &[],
        }
    }

    /// Does it need `iscsid` running with the node's own initiator name?
    pub fn iscsi(self) -> bool {
        self == Storage::Longhorn
    }
}

/// One value of a `storage` list.
pub fn parse_storage(s: &str) -> Result<Storage, Invalid> {
    ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
        let known: Vec<String> = ALL.iter().map(|v| format!("\"{}\"", v.as_str())).collect();
        inv(
            format!("unknown storage `{}`", s.escape_debug()),
            format!(
                "write one of {}, or remove it (kiln installs nothing for other storage)",
                known.join(", ")
            ),
        )
    })
}

/// `storage` in table `t`: `None` when the key is absent (a node then
/// takes the cluster's list), `Some(vec![])` for `storage = []`.
pub(super) fn read(t: &mut Tab, d: &mut Diagnostics) -> Option<Vec<At<Storage>>> {
    let list = t.str_list(d, "storage")?;
    Some(super::parse_each(list, d, parse_storage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_parses_back_and_unknown_ones_list_the_known() {
        for v in ALL {
            assert_eq!(parse_storage(v.as_str()).unwrap(), v);
        }
        let e = parse_storage("ceph").unwrap_err();
        assert_eq!(e.message, "unknown storage `ceph`");
        assert!(
            e.hint
                .starts_with("write one of \"longhorn\", \"rook-ceph\", \"nfs\""),
            "{}",
            e.hint
        );
    }

    #[test]
    fn longhorn_needs_iscsi_and_nfs_rook_needs_rbd() {
        assert_eq!(Storage::Longhorn.packages(), ["open-iscsi", "nfs-common"]);
        assert_eq!(Storage::Longhorn.modules(), ["iscsi_tcp"]);
        assert!(Storage::Longhorn.iscsi());
        assert_eq!(Storage::RookCeph.modules(), ["rbd"]);
        assert!(!Storage::RookCeph.iscsi() && !Storage::Nfs.iscsi());
        assert_eq!(Storage::Nfs.packages(), ["nfs-common"]);
    }
}
