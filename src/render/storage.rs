//! A node's storage prerequisites (`storage`): the kernel modules its
//! storage systems need, loaded at boot, and for iSCSI (Longhorn) `iscsid`
//! enabled with the node's own initiator name.
//!
//! The packages are in the shared Debian base (`inputs::base`); everything
//! here is in the node's seed, so a node without storage (or with other
//! storage) has none of it: open-iscsi is then installed but has no
//! initiator name (the root image drops the one the base was made with),
//! and iscsid does not start.
//!
//! The initiator name is state, not configuration: targets and Longhorn
//! know a node by it, so it must outlive reboots, A/B updates and
//! reflashes of the seed, and no two nodes may share it. So it is made on
//! the node, once, on the state partition (`INITIATOR_NAME_STATE`), by
//! `kiln-iscsi-initiator.service`, which iscsid requires; /etc (in RAM)
//! gets a symlink to it each boot.

use crate::config::plan::{NodePlan, Plan};
use crate::render::tree::FileTree;

use super::header;

/// Where the node keeps its initiator name (state partition).
pub const INITIATOR_NAME_STATE: &str = "/var/lib/kiln/iscsi/initiatorname.iscsi";
/// Where open-iscsi reads it.
pub const INITIATOR_NAME_ETC: &str = "/etc/iscsi/initiatorname.iscsi";
/// The script that makes and links it, in the seed.
pub const SCRIPT: &str = "/etc/kiln/iscsi-initiator";
pub const SCRIPT_TEXT: &str = include_str!("iscsi-initiator.sh");
pub const UNIT: &str = "kiln-iscsi-initiator.service";
/// open-iscsi's daemon unit (Debian enables only its socket).
pub const ISCSID_UNIT: &str = "iscsid.service";
/// The modules-load.d file of the storage modules.
pub const MODULES_FILE: &str = "/etc/modules-load.d/kiln-storage.conf";

/// The kernel modules `node`'s storage needs, each once, in order.
pub fn node_modules(node: &NodePlan) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for m in node.storage.iter().flat_map(|s| s.modules()) {
        if !v.contains(m) {
            v.push(m);
        }
    }
    v
}

/// Does `node` run iscsid with its own initiator name?
pub fn needs_iscsi(node: &NodePlan) -> bool {
    node.storage.iter().any(|s| s.iscsi())
}

pub fn render(plan: &Plan, node: &NodePlan, tree: &mut FileTree) {
    let modules = node_modules(node);
    if !modules.is_empty() {
        let names: Vec<&str> = node.storage.iter().map(|s| s.as_str()).collect();
        let mut text = header("#", plan);
        text.push_str(&format!("# for storage: {}\n", names.join(", ")));
        for m in modules {
            text.push_str(m);
            text.push('\n');
        }
        tree.file(MODULES_FILE, 0o644, text);
    }
    if needs_iscsi(node) {
        render_iscsi(plan, tree);
    }
}

/// The initiator-name unit, required by iscsid, and iscsid enabled the
/// way its package's `[Install]` says (wanted by sysinit.target).
fn render_iscsi(plan: &Plan, tree: &mut FileTree) {
    // The header after the `#!` line, as in every rendered script.
    let script = SCRIPT_TEXT.replacen('\n', &format!("\n{}", header("#", plan)), 1);
    tree.file(SCRIPT, 0o755, script);
    tree.file(
        &format!("/etc/systemd/system/{UNIT}"),
        0o644,
        format!(
            "{}[Unit]\nDescription=kiln: this node's iSCSI initiator name, made once in {INITIATOR_NAME_STATE}\nDefaultDependencies=no\nRequiresMountsFor={}\nBefore={ISCSID_UNIT}\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart={SCRIPT}\nStandardOutput=journal+console\nStandardError=journal+console\n\n[Install]\nRequiredBy={ISCSID_UNIT}\n",
            header("#", plan),
            parent(INITIATOR_NAME_STATE),
        ),
    );
    // Required: iscsid must not start under no name, or another one.
    tree.symlink(
        &format!("/etc/systemd/system/{ISCSID_UNIT}.requires/{UNIT}"),
        &format!("/etc/systemd/system/{UNIT}"),
    );
    tree.symlink(
        &format!("/etc/systemd/system/sysinit.target.wants/{ISCSID_UNIT}"),
        &format!("/lib/systemd/system/{ISCSID_UNIT}"),
    );
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("/", |(p, _)| p)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::render::tree::Entry;

    fn plan() -> Plan {
        let text = "[cluster]\nname = \"lab\"\nstorage = [\"longhorn\", \"rook-ceph\"]\n[k3s]\nversion = \"v1.31.1+k3s1\"\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\nlan-address = \"192.168.1.11\"\n[[nodes]]\nname = \"a1\"\nrole = \"agent\"\nstorage = [\"nfs\"]\n[[nodes]]\nname = \"a2\"\nrole = \"agent\"\nstorage = []\n";
        crate::config::plan::plan_profile(Path::new("lab.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn seed(p: &Plan, node: &str) -> FileTree {
        let mut t = FileTree::new();
        render(p, p.node(node).unwrap(), &mut t);
        t
    }

    #[test]
    fn longhorn_enables_iscsid_behind_the_initiator_name_unit() {
        let p = plan();
        let t = seed(&p, "s1");
        let modules = t.text(MODULES_FILE).unwrap();
        assert!(
            modules.ends_with("# for storage: longhorn, rook-ceph\niscsi_tcp\nrbd\n"),
            "{modules}"
        );
        let unit = t
            .text("/etc/systemd/system/kiln-iscsi-initiator.service")
            .unwrap();
        for line in [
            "Before=iscsid.service",
            "RequiresMountsFor=/var/lib/kiln/iscsi",
            "ExecStart=/etc/kiln/iscsi-initiator",
            "Type=oneshot",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} in\n{unit}");
        }
        assert!(matches!(
            t.get("/etc/systemd/system/iscsid.service.requires/kiln-iscsi-initiator.service"),
            Some(Entry::Symlink { .. })
        ));
        assert!(matches!(
            t.get("/etc/systemd/system/sysinit.target.wants/iscsid.service"),
            Some(Entry::Symlink { target }) if target == "/lib/systemd/system/iscsid.service"
        ));
        assert!(matches!(
            t.get(SCRIPT),
            Some(Entry::File { mode: 0o755, .. })
        ));
        // The script's defaults are the paths the docs and checks name.
        for p in [INITIATOR_NAME_STATE, INITIATOR_NAME_ETC] {
            assert!(SCRIPT_TEXT.contains(&format!(":-{p}}}")), "{p}");
        }
    }

    #[test]
    fn other_storage_or_none_gets_no_iscsi() {
        let p = plan();
        // nfs: a package in the base, nothing per node.
        assert_eq!(seed(&p, "a1").paths().count(), 0);
        assert_eq!(seed(&p, "a2").paths().count(), 0);
    }
}
