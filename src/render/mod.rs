//! Rendering: everything a node needs, as a tree of files built in memory
//! from the plan and the node's secrets. Pure: no I/O.

pub mod airgap;
pub mod boot;
mod firstboot;
pub mod hub;
mod k3s;
pub mod k3s_ca;
pub mod manifests;
mod nft;
pub mod power;
pub mod proxy;
pub mod pxe;
pub mod relay;
pub mod storage;
mod system;
pub mod tree;
mod wireguard;
pub mod yaml;

use crate::config::plan::{NodePlan, Plan};
use crate::render::tree::FileTree;

pub use nft::render_ruleset;
pub use wireguard::{hub_peer_stanzas, operator_hub_stanza, operator_reaches, render_operator};

/// Mode of files that hold secrets (keys, tokens, passwords).
pub const SECRET_MODE: u32 = 0o600;

pub use crate::config::secrets::{NodeSecrets, update_key};

/// A node's rendered files and its kernel command line.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub node: String,
    pub tree: FileTree,
    /// The profile's kernel command line items for this node, joined by
    /// spaces (the image adds root and slot selection).
    pub cmdline: String,
}

/// Header comment of every rendered text file.
pub(crate) fn header(comment: &str, plan: &Plan) -> String {
    format!(
        "{comment} Rendered by kiln from {} (cluster {}). Do not edit: change the profile and rebuild.\n",
        plan.profile_path
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().to_string()),
        plan.cluster
    )
}

/// Where a node keeps the key that `kiln serve` asks for before it hands
/// out the node's seed in an update.
pub const UPDATE_KEY_PATH: &str = "/etc/kiln/update-key";

/// Where a node's seed names the GPT disk GUID of its own disk image
/// (added by the build, which plans the disk): a netbooting node uses a
/// kiln disk for `/var` only if it carries this GUID.
pub const DISK_GUID_PATH: &str = "/etc/kiln/disk-guid";

/// Where a node's seed may put files: what the initramfs can write before
/// it hands over (`/etc` is an overlay, `/var` the state partition or RAM);
/// the rest of the root is the read-only squashfs. What every node of a
/// role needs elsewhere goes into the root image ([`image_files`]).
pub const SEED_DIRS: [&str; 2] = ["/etc/", "/var/"];

/// What every root image carries beside the base and k3s, the same for
/// every node: the k3s manifests and, when a node uses `hub-transport =
/// "auto"`, the transport watcher.
pub fn image_files(plan: &Plan) -> FileTree {
    let mut t = manifests::image_files(plan);
    t.extend(relay::image_files(plan));
    t
}

/// Render every file of one node.
pub fn render_node(plan: &Plan, node: &NodePlan, secrets: &NodeSecrets) -> NodeFiles {
    let mut tree = FileTree::new();
    system::render(plan, node, secrets, &mut tree);
    if let Some(wg) = &plan.wireguard {
        wireguard::render(plan, wg, node, secrets, &mut tree);
    }
    tree.file("/etc/nftables.conf", 0o755, nft::render_ruleset(plan));
    k3s::render(plan, node, secrets, &mut tree);
    if crate::config::cluster_ca::seeds_ca(plan, node) {
        k3s_ca::render(plan, &secrets.cluster_ca, &mut tree);
    }
    manifests::render(plan, node, &mut tree);
    proxy::render(plan, &mut tree);
    airgap::render(plan, &mut tree);
    storage::render(plan, node, &mut tree);
    firstboot::render(plan, &mut tree);
    power::render(plan, node, &mut tree);
    tree.file(
        "/etc/kiln/node",
        0o644,
        format!(
            "{}name={}\nrole={}\ncluster={}\n",
            header("#", plan),
            node.name,
            node.role.as_str(),
            plan.cluster
        ),
    );
    let cmdline = plan.cmdline(node).join(" ");
    tree.file("/etc/kiln/cmdline", 0o644, format!("{cmdline}\n"));
    tree.file(
        UPDATE_KEY_PATH,
        SECRET_MODE,
        format!(
            "{}\n",
            update_key(&plan.cluster, &node.name, &secrets.private_key)
        ),
    );
    NodeFiles {
        node: node.name.clone(),
        tree,
        cmdline,
    }
}

/// Quote a string for a POSIX shell (single quotes).
pub(crate) fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./=:,@+".contains(&c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Quote one argument for a systemd `ExecStart=` line: double quotes,
/// backslash escapes, and `%`/`$` doubled so systemd does not expand them.
pub(crate) fn systemd_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
