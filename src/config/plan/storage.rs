//! Resolves `storage`: a node's own list, or else `cluster.storage`; and
//! what the whole cluster's base must carry for them.
//!
//! A node's list replaces the cluster's (it does not add to it), so one
//! node can opt out with `storage = []`, as a VPS hub that holds no
//! volumes would. The packages go into the one Debian base every node
//! shares; the modules, `iscsid` and the initiator name are per node.

use crate::config::diag::Diagnostics;
use crate::config::profile::{At, Storage};

use super::Plan;

/// A `storage` list as written, each value once (a repeat is reported),
/// in the order written.
pub(super) fn resolve_list(list: &[At<Storage>], d: &mut Diagnostics) -> Vec<Storage> {
    let mut out: Vec<Storage> = Vec::new();
    for a in list {
        if out.contains(&a.v) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("`{}` is listed twice", a.v.as_str()),
                "remove the repeat",
            );
        } else {
            out.push(a.v);
        }
    }
    out
}

/// A node's storage: its own list if it writes one, else the cluster's
/// (`cluster`, resolved once by [`resolve_list`]).
pub(super) fn node_storage(
    cluster: &[Storage],
    node: Option<&[At<Storage>]>,
    d: &mut Diagnostics,
) -> Vec<Storage> {
    match node {
        Some(own) => resolve_list(own, d),
        None => cluster.to_vec(),
    }
}

impl Plan {
    /// Debian packages the nodes' storage needs, for the shared base:
    /// sorted, each once.
    pub fn storage_packages(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| &n.storage)
            .flat_map(|s| s.packages())
            .map(|p| p.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::plan::plan_profile;

    use super::*;

    fn plan(cluster: &str, nodes: &[&str]) -> Result<Plan, String> {
        let mut text =
            format!("[cluster]\nname = \"lab\"\n{cluster}\n[k3s]\nversion = \"v1.31.1+k3s1\"\n");
        for (i, extra) in nodes.iter().enumerate() {
            let role = if i == 0 {
                "server\"\nlan-address = \"192.168.1.11"
            } else {
                "agent"
            };
            text.push_str(&format!(
                "[[nodes]]\nname = \"n{i}\"\nrole = \"{role}\"\n{extra}\n"
            ));
        }
        plan_profile(Path::new("lab.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_node_takes_the_cluster_list_unless_it_writes_its_own() {
        let p = plan(
            "storage = [\"longhorn\"]",
            &["", "storage = []", "storage = [\"rook-ceph\", \"nfs\"]"],
        )
        .unwrap();
        let lists: Vec<&[Storage]> = p.nodes.iter().map(|n| n.storage.as_slice()).collect();
        assert_eq!(
            lists,
            [
                &[Storage::Longhorn][..],
                &[],
                &[Storage::RookCeph, Storage::Nfs]
            ]
        );
        assert_eq!(p.storage_packages(), ["nfs-common", "open-iscsi"]);
    }

    #[test]
    fn no_storage_needs_no_packages() {
        let p = plan("", &["", ""]).unwrap();
        assert!(p.nodes.iter().all(|n| n.storage.is_empty()));
        assert!(p.storage_packages().is_empty());
    }

    #[test]
    fn unknown_and_repeated_values_are_errors_at_their_line() {
        let e = plan("storage = [\"longhorn\", \"ceph\"]", &[""]).unwrap_err();
        assert!(
            e.contains("lab.toml:3:")
                && e.contains("cluster.storage[1]: unknown storage `ceph`")
                && e.contains("fix: write one of \"longhorn\", \"rook-ceph\", \"nfs\""),
            "{e}"
        );
        let e = plan("", &["storage = [\"nfs\", \"nfs\"]"]).unwrap_err();
        assert!(
            e.contains("nodes[0].storage[1]: `nfs` is listed twice"),
            "{e}"
        );
        let e = plan("storage = \"longhorn\"", &[""]).unwrap_err();
        assert!(e.contains("cluster.storage: expected an array"), "{e}");
    }
}
