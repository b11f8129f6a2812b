//! What systemd-boot reads: `loader/loader.conf` and one Boot Loader
//! Specification (type #1) entry per slot. Pure text.

use crate::config::plan::{NodePlan, Plan};

/// Paths on the ESP (FAT, `/`-separated, no leading slash).
pub const BOOTLOADER_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
pub const LOADER_CONF_PATH: &str = "loader/loader.conf";

/// Kernel arguments kiln adds to every entry: reboot 10 s after a kernel
/// panic, so an unattended node falls back (boot counting) instead of
/// hanging.
pub const KILN_KERNEL_ARGS: &[&str] = &["panic=10"];

/// Where a slot's files live on the ESP.
pub fn slot_dir(slot: char) -> String {
    format!("kiln/{slot}")
}

pub fn kernel_path(slot: char) -> String {
    format!("{}/vmlinuz", slot_dir(slot))
}

pub fn initrd_path(slot: char) -> String {
    format!("{}/initrd.img", slot_dir(slot))
}

pub fn seed_path(slot: char) -> String {
    format!("{}/seed.img", slot_dir(slot))
}

pub fn entry_path(slot: char) -> String {
    format!("loader/entries/kiln-{slot}.conf")
}

/// `loader.conf`: boot the first kiln entry in systemd-boot's order, which
/// puts entries with no boot tries left last and then sorts by `version`
/// (the generation), newest first: a new slot on trial boots first, and a
/// failed one falls back to the other. No command line editor (it would
/// give anyone at the keyboard a root shell through `init=`).
pub fn loader_conf(plan: &Plan) -> String {
    format!(
        "timeout {}\ndefault kiln-*\neditor no\nconsole-mode keep\n",
        plan.boot.menu_timeout
    )
}

/// The generation of the entry a disk image starts with; each update
/// (`kiln-update`) and rollback takes the highest one plus one.
pub const FIRST_GENERATION: u32 = 1;

/// Placeholder for the slot in an update bundle's kernel command line.
pub const SLOT_PLACEHOLDER: &str = "@SLOT@";

/// The kernel command line of a slot's entry (`slot` may also be
/// [`SLOT_PLACEHOLDER`], for an update bundle).
pub fn options(plan: &Plan, node: &NodePlan, slot: impl std::fmt::Display) -> String {
    let mut items = vec![format!("kiln.slot={slot}")];
    items.extend(KILN_KERNEL_ARGS.iter().map(|s| s.to_string()));
    items.extend(plan.cmdline(node));
    items.join(" ")
}

/// A Boot Loader Specification entry for `slot`; `version` is the
/// generation (see [`loader_conf`]), the kernel's version is in the title.
pub fn entry(plan: &Plan, node: &NodePlan, slot: char, kernel_version: &str) -> String {
    format!(
        "title kiln {cluster}/{node} (slot {slot}, k3s {k3s}, kernel {kernel_version})\nversion {FIRST_GENERATION}\nsort-key kiln\nlinux /{kernel}\ninitrd /{initrd}\ninitrd /{seed}\noptions {opts}\n",
        cluster = plan.cluster,
        node = node.name,
        k3s = plan.k3s.version,
        kernel = kernel_path(slot),
        initrd = initrd_path(slot),
        seed = seed_path(slot),
        opts = options(plan, node, slot),
    )
}
