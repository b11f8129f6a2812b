//! How a node treats its machine: it stays awake (a laptop whose lid
//! closes, or a desktop that suspends, drops out of the cluster), and,
//! when the profile asks, it installs itself from the stick onto an
//! internal disk.

use std::fmt::Write as _;

use crate::config::plan::{InstallPlan, NodePlan, Plan};
use crate::render::tree::FileTree;

use super::header;

/// logind's drop-in that ignores the lid and the sleep keys.
pub const STAY_AWAKE_PATH: &str = "/etc/systemd/logind.conf.d/kiln-stay-awake.conf";

/// The sleep states masked on a node that stays awake: the targets
/// `systemctl suspend` and friends start (systemd.special(7)).
pub const SLEEP_TARGETS: [&str; 5] = [
    "sleep.target",
    "suspend.target",
    "hibernate.target",
    "hybrid-sleep.target",
    "suspend-then-hibernate.target",
];

/// The unattended-install request that `kiln-install` reads on the node.
pub const INSTALL_CONFIG_PATH: &str = "/etc/kiln/install";

pub fn render(plan: &Plan, node: &NodePlan, tree: &mut FileTree) {
    if !node.allow_suspend {
        render_stay_awake(plan, tree);
    }
    if let Some(install) = &node.install {
        tree.file(INSTALL_CONFIG_PATH, 0o644, install_config(plan, install));
    }
}

fn render_stay_awake(plan: &Plan, tree: &mut FileTree) {
    let mut s = header("#", plan);
    s.push_str(
        "# kiln keeps this node awake: a sleeping node drops out of the cluster.\n\
         # To let it sleep, set `allow-suspend = true` in its [[nodes]] entry.\n\
         [Login]\n",
    );
    for key in [
        "HandleLidSwitch",
        "HandleLidSwitchExternalPower",
        "HandleLidSwitchDocked",
        "HandleSuspendKey",
        "HandleHibernateKey",
        "IdleAction",
    ] {
        let _ = writeln!(s, "{key}=ignore");
    }
    tree.file(STAY_AWAKE_PATH, 0o644, s);
    // What `systemctl mask` does: the unit becomes /dev/null.
    for unit in SLEEP_TARGETS {
        tree.symlink(&format!("/etc/systemd/system/{unit}"), "/dev/null");
    }
}

/// `key=value` lines; `kiln-install` skips lines starting with `#`.
fn install_config(plan: &Plan, install: &InstallPlan) -> String {
    let file = plan
        .profile_path
        .file_name()
        .map_or(String::new(), |f| f.to_string_lossy().to_string());
    format!(
        "# kiln: unattended install; from {file} {} (kiln-install reads this file)\ndevice={}\nafter={}\n",
        install.key,
        install.device,
        install.after.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tree::Entry;

    const PROFILE: &str = "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n[[nodes]]\nname = \"n1\"\nrole = \"server\"\n";

    fn rendered(node_keys: &str) -> FileTree {
        let text = format!("{PROFILE}{node_keys}");
        let plan =
            crate::config::plan::plan_profile(std::path::Path::new("lab.toml"), &text).unwrap();
        let mut tree = FileTree::new();
        render(&plan, &plan.nodes[0], &mut tree);
        tree
    }

    #[test]
    fn nodes_stay_awake_by_default() {
        let tree = rendered("");
        let logind = tree.text(STAY_AWAKE_PATH).unwrap();
        assert!(logind.contains("allow-suspend = true"), "{logind}");
        let body: Vec<&str> = logind.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "[Login]",
                "HandleLidSwitch=ignore",
                "HandleLidSwitchExternalPower=ignore",
                "HandleLidSwitchDocked=ignore",
                "HandleSuspendKey=ignore",
                "HandleHibernateKey=ignore",
                "IdleAction=ignore",
            ]
        );
        assert!(matches!(
            tree.get(STAY_AWAKE_PATH),
            Some(Entry::File { mode: 0o644, .. })
        ));
        for unit in SLEEP_TARGETS {
            assert_eq!(
                tree.get(&format!("/etc/systemd/system/{unit}")),
                Some(&Entry::Symlink {
                    target: "/dev/null".into()
                }),
                "{unit}"
            );
        }
        assert!(tree.get(INSTALL_CONFIG_PATH).is_none());
    }

    #[test]
    fn allow_suspend_renders_nothing() {
        assert_eq!(rendered("allow-suspend = true\n"), FileTree::new());
        assert_ne!(rendered("allow-suspend = false\n"), FileTree::new());
    }

    #[test]
    fn install_file_names_device_and_action() {
        let tree =
            rendered("allow-suspend = true\ninstall-device = \"/dev/disk/by-id/nvme-X_123\"\n");
        assert_eq!(
            tree.text(INSTALL_CONFIG_PATH).unwrap(),
            "# kiln: unattended install; from lab.toml nodes[0].install-device (kiln-install reads this file)\ndevice=/dev/disk/by-id/nvme-X_123\nafter=poweroff\n"
        );
        assert!(matches!(
            tree.get(INSTALL_CONFIG_PATH),
            Some(Entry::File { mode: 0o644, .. })
        ));
        let tree = rendered("install-device = \"/dev/sda\"\nafter-install = \"reboot\"\n");
        let data: Vec<&str> = tree
            .text(INSTALL_CONFIG_PATH)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert_eq!(data, ["device=/dev/sda", "after=reboot"]);
    }
}
