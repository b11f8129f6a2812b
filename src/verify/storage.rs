//! Checks of a node's storage prerequisites (`storage`), on a booted
//! node: the modules loaded; with iSCSI, `iscsid` active and the node's
//! initiator name where open-iscsi reads it, a link to the file made once
//! on the state partition, private to root; without, no initiator name at
//! all (the base's is dropped).
//!
//! [`crate::verify::checks`] runs them on every first boot, compares the
//! name across a reboot, and between the two nodes of a cluster test.

use std::path::Path;

use crate::render::storage::{
    INITIATOR_NAME_ETC, INITIATOR_NAME_STATE, ISCSID_UNIT, needs_iscsi, node_modules,
};
use crate::verify::report::{Check, Expect};
use crate::verify::vm::Vm;

/// The initiator name open-iscsi reads on the node (empty if none).
pub fn initiator_name(vm: &Vm, key: &Path) -> anyhow::Result<String> {
    Ok(vm
        .sh(
            key,
            &format!("sed -n 's/^InitiatorName=//p' {INITIATOR_NAME_ETC} 2>/dev/null || true"),
        )?
        .trim()
        .to_string())
}

/// An iSCSI qualified name as RFC 3720 3.2.6.3.1 writes it:
/// `iqn.YYYY-MM.<reversed domain>[:<unique part>]`, here with the unique
/// part a node's name needs; lower-case, no spaces.
pub fn is_iqn(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("iqn.") else {
        return false;
    };
    let (Some(date), Some(rest)) = (rest.get(..7), rest.get(7..)) else {
        return false;
    };
    let date_ok = date.bytes().enumerate().all(|(i, c)| match i {
        4 => c == b'-',
        _ => c.is_ascii_digit(),
    });
    let Some((domain, unique)) = rest.strip_prefix('.').and_then(|r| r.split_once(':')) else {
        return false;
    };
    date_ok
        && !domain.is_empty()
        && domain
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-".contains(&c))
        && !unique.is_empty()
        && unique.bytes().all(|c| c.is_ascii_graphic() && c != b'/')
}

/// Modules, and iscsid with its name; or no name on a node without iSCSI.
pub fn check_storage(vm: &Vm, key: &Path, e: &Expect, out: &mut Vec<Check>) -> anyhow::Result<()> {
    let modules = node_modules(e.node);
    if !modules.is_empty() {
        let seen = vm.sh(
            key,
            &format!(
                "for m in {}; do [ -d /sys/module/$m ] && echo $m; done; true",
                modules.join(" ")
            ),
        )?;
        out.push(Check::eq(
            "storage modules loaded",
            &modules.iter().map(|m| format!("{m}\n")).collect::<String>(),
            &seen,
        ));
    }
    let name = initiator_name(vm, key)?;
    if !needs_iscsi(e.node) {
        out.push(Check::eq(
            "no iSCSI initiator name on a node without longhorn storage",
            "",
            &name,
        ));
        return Ok(());
    }
    out.push(Check::eq(
        "iscsid active",
        "active",
        &vm.sh(key, &format!("systemctl is-active {ISCSID_UNIT} || true"))?,
    ));
    out.push(Check::new(
        "iSCSI initiator name present, an iqn",
        "InitiatorName=iqn.YYYY-MM.<domain>:<unique>",
        &name,
        is_iqn(&name),
    ));
    out.push(Check::eq(
        "the initiator name is the state partition's, private to root",
        &format!("{INITIATOR_NAME_STATE} 600 root 700\n"),
        &vm.sh(
            key,
            &format!(
                "echo \"$(readlink {INITIATOR_NAME_ETC}) $(stat -c '%a %U' {INITIATOR_NAME_STATE}) $(stat -c %a $(dirname {INITIATOR_NAME_STATE}))\""
            ),
        )?,
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iqns_as_iscsi_iname_makes_them_pass_and_others_fail() {
        for good in [
            "iqn.2016-04.com.open-iscsi:74b6bfdf158e",
            "iqn.1993-08.org.debian:01:0123456789ab",
        ] {
            assert!(is_iqn(good), "{good}");
        }
        for bad in [
            "",
            "iqn.2016-04.com.open-iscsi",
            "iqn.2016-04.com.open-iscsi:",
            "iqn.16-04.com.open-iscsi:74b6bfdf158e",
            "eui.02004567A425678D",
            "iqn.2016-04.com.Open-iscsi:74b6",
            "iqn.2016-04.com.open iscsi:74b6",
            "GenerateName=yes",
        ] {
            assert!(!is_iqn(bad), "{bad}");
        }
    }
}
