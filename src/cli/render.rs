//! `kiln render`: write one node's rendered files into a directory, for
//! inspection (files holding secrets are written 0600): its seed, and
//! the files its root image carries for the profile (k3s manifests, the
//! transport watcher).

use std::path::Path;

use anyhow::Context as _;

use crate::config::plan::Plan;
use crate::config::secrets::ClusterSecrets;
use crate::render::{self, NodeFiles};

/// `kiln render`: write the node's tree into `out` (which must not
/// exist), print its path, and on stderr what was rendered.
pub fn run(profile: &Path, node: &str, out: &Path, state_dir: Option<&Path>) -> anyhow::Result<()> {
    let (plan, secrets) = crate::config::secrets::load_with_secrets(profile, state_dir)?;
    let files = render_node(&plan, node, &secrets)?;
    let mut tree = files.tree.clone();
    tree.extend(render::image_files(&plan));
    tree.write_to(out)?;
    println!("{}", out.display());
    eprintln!(
        "rendered {} files for {node} ({} from its seed, the rest in its root image); kernel command line: {}",
        tree.paths().count(),
        files.tree.paths().count(),
        files.cmdline
    );
    Ok(())
}

/// Render one node's files.
pub fn render_node(plan: &Plan, node: &str, secrets: &ClusterSecrets) -> anyhow::Result<NodeFiles> {
    let n = plan.node(node).with_context(|| {
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        format!(
            "no node `{node}` in {}; nodes: {}",
            plan.profile_path.display(),
            names.join(", ")
        )
    })?;
    Ok(render::render_node(plan, n, &secrets.for_node(node)))
}
