//! The old home of `check`, `keys` and `render_node`, now in one file per
//! verb; re-exported here so `kiln::cli::commands::render_node` (used by
//! the image, VM, golden and tools tests) keeps working.

pub use super::check::check;
pub use super::keys::keys;
pub use super::render::render_node;
