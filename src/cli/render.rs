//! `kiln render`: write one node's rendered files into a directory, for
//! inspection (files holding secrets are written 0600).

use anyhow::Context as _;

use crate::config::plan::Plan;
use crate::config::secrets::ClusterSecrets;
use crate::render::{self, NodeFiles};

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
