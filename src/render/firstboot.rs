//! First boot, cloud-init style: commands run on every boot (`boot-cmd`)
//! and commands run exactly once per node (`run-once`), recorded on the
//! state partition so a reboot or an A/B update does not run them again.

use std::fmt::Write as _;

use crate::config::plan::Plan;
use crate::render::tree::FileTree;

use super::{header, sh_quote};

/// The marker written once the run-once commands have run.
pub const RUN_ONCE_MARKER: &str = "/var/lib/kiln/run-once.done";

pub fn render(plan: &Plan, tree: &mut FileTree) {
    tree.file("/etc/kiln/firstboot.sh", 0o755, script(plan));
    tree.file(
        "/etc/systemd/system/kiln-firstboot.service",
        0o644,
        format!(
            "{}[Unit]\nDescription=kiln: boot commands and run-once commands\nRequiresMountsFor=/var/lib\nWants=network-online.target\nAfter=network-online.target nftables.service\nBefore=k3s.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/etc/kiln/firstboot.sh\nStandardOutput=journal+console\n\n[Install]\nWantedBy=multi-user.target\n",
            header("#", plan)
        ),
    );
    tree.symlink(
        "/etc/systemd/system/multi-user.target.wants/kiln-firstboot.service",
        "/etc/systemd/system/kiln-firstboot.service",
    );
}

fn script(plan: &Plan) -> String {
    let fb = &plan.first_boot;
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&header("#", plan));
    s.push_str("# A failing command is reported and makes the unit fail; run-once\n# commands are still not run again (exactly once, like cloud-init).\nset -u\nstatus=0\nrun() {\n  echo \"kiln-firstboot: $1: $2\"\n  /bin/sh -c \"$2\" || { rc=$?; echo \"kiln-firstboot: $1 failed with status $rc: $2\"; status=1; }\n}\n");
    let _ = writeln!(
        s,
        "marker={RUN_ONCE_MARKER}\nmkdir -p \"$(dirname \"$marker\")\"\n"
    );
    s.push_str("# boot-cmd: every boot\n");
    for c in &fb.boot_cmd {
        let _ = writeln!(s, "run boot-cmd {}", sh_quote(c));
    }
    s.push_str("\n# run-once: first boot only\nif [ -e \"$marker\" ]; then\n  echo \"kiln-firstboot: run-once commands already ran ($(cat \"$marker\"))\"\nelse\n");
    for c in &fb.run_once {
        let _ = writeln!(s, "  run run-once {}", sh_quote(c));
    }
    s.push_str("  date -u +%Y-%m-%dT%H:%M:%SZ > \"$marker.tmp\" && mv \"$marker.tmp\" \"$marker\"\nfi\nexit $status\n");
    s
}
