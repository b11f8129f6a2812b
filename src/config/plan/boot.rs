//! Resolves `[boot]`: kernel command line items, consoles and the
//! systemd-boot menu timeout.

use crate::config::diag::Diagnostics;
use crate::config::profile;
use crate::config::types;

use super::{BootPlan, DEFAULT_CONSOLES, DEFAULT_MENU_TIMEOUT_S};

pub(super) fn resolve_boot(p: &profile::Profile, d: &mut Diagnostics) -> BootPlan {
    let consoles: Vec<String> = match &p.boot.consoles {
        Some(c) => c.iter().map(|a| a.v.clone()).collect(),
        None => DEFAULT_CONSOLES.iter().map(|s| s.to_string()).collect(),
    };
    check_cmdline(p, d);
    let menu_timeout = match &p.boot.menu_timeout {
        Some(a) if !(0..=600).contains(&a.v) => {
            d.error(
                a.span.clone(),
                &a.key,
                format!("menu timeout {} s is out of range", a.v),
                "use 0 (no menu) to 600 seconds",
            );
            DEFAULT_MENU_TIMEOUT_S
        }
        Some(a) => a.v,
        None => DEFAULT_MENU_TIMEOUT_S,
    } as u32;

    BootPlan {
        cmdline: p.boot.cmdline.iter().map(|a| a.v.clone()).collect(),
        consoles,
        menu_timeout,
    }
}

/// Every command line item (the profile's, the consoles, each node's) is
/// one safe word, and none sets what kiln sets itself.
fn check_cmdline(p: &profile::Profile, d: &mut Diagnostics) {
    for a in p
        .boot
        .cmdline
        .iter()
        .chain(p.boot.consoles.iter().flatten())
        .chain(p.nodes.iter().flat_map(|n| n.cmdline.iter()))
    {
        if let Err(e) = types::check_cmdline_item(&a.v) {
            d.error(a.span.clone(), &a.key, e.message, e.hint);
        }
    }
    for a in p
        .boot
        .cmdline
        .iter()
        .chain(p.nodes.iter().flat_map(|n| n.cmdline.iter()))
    {
        let name = a.v.split('=').next().unwrap_or("");
        if ["root", "kiln.slot", "kiln.root", "console"].contains(&name) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("`{name}=` is set by kiln"),
                if name == "console" {
                    "list consoles in `boot.consoles` instead"
                } else {
                    "remove it; kiln adds the root and slot selection itself"
                },
            );
        }
    }
}
