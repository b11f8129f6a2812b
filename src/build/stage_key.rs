//! Cache keys of build stages (pure): a sha256 over exactly what a stage's
//! output depends on, written as named fields in a fixed order.
//!
//! The encoding is unambiguous: every name and value is length-prefixed,
//! so no two different field lists give the same bytes. A key also names
//! its stage and [`FORMAT`], so keys of different stages never meet.

use std::fmt::Display;

use sha2::{Digest as _, Sha256};

use crate::render::tree::{Entry, FileTree};

/// Bump when what a key covers changes in a way the fields do not show.
pub const FORMAT: u32 = 1;

/// The inputs of one stage, as named fields; [`StageKey::digest`] is the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageKey {
    stage: String,
    fields: Vec<(String, String)>,
}

impl StageKey {
    pub fn new(stage: &str) -> Self {
        StageKey {
            stage: stage.to_string(),
            fields: Vec::new(),
        }
    }

    /// Add the input `name` with `value` (order matters: callers add the
    /// same fields in the same order).
    pub fn field(mut self, name: &str, value: impl Display) -> Self {
        self.fields.push((name.to_string(), value.to_string()));
        self
    }

    /// The key: lowercase hex sha256 of the encoded stage and fields.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("kiln-stage-key {FORMAT}\n"));
        for (name, value) in std::iter::once(("stage", self.stage.as_str()))
            .chain(self.fields.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        {
            h.update(format!("{}:{name}={}:", name.len(), value.len()));
            h.update(value);
            h.update("\n");
        }
        hex::encode(h.finalize())
    }
}

/// A digest of a file tree: every path with its kind, mode, owner and
/// content (or link target), in the tree's (sorted) order.
pub fn tree_digest(tree: &FileTree) -> String {
    let mut key = StageKey::new("file-tree");
    for (path, e) in tree.iter() {
        let value = match e {
            Entry::File {
                content,
                mode,
                uid,
                gid,
            } => format!(
                "file {mode:o} {uid}:{gid} {}",
                hex::encode(Sha256::digest(content))
            ),
            Entry::Symlink { target } => format!("symlink {target}"),
            Entry::Dir { mode } => format!("dir {mode:o}"),
        };
        key = key.field(path, value);
    }
    key.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fields: &[(&str, &str)]) -> String {
        fields
            .iter()
            .fold(StageKey::new("root"), |k, (n, v)| k.field(n, v))
            .digest()
    }

    #[test]
    fn the_same_fields_give_the_same_key_and_any_change_another() {
        let base = [("base-sha256", "aa"), ("level", "3")];
        assert_eq!(key(&base), key(&base));
        assert_eq!(key(&base).len(), 64);
        let others = [
            key(&[("base-sha256", "ab"), ("level", "3")]),
            key(&[("base-sha256", "aa"), ("level", "4")]),
            key(&[("level", "3"), ("base-sha256", "aa")]),
            key(&[("base-sha256", "aa")]),
            StageKey::new("initramfs")
                .field("base-sha256", "aa")
                .field("level", "3")
                .digest(),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(&key(&base), o, "change {i} kept the key");
        }
    }

    #[test]
    fn values_cannot_run_into_the_next_field() {
        // Without length prefixes these would encode the same.
        assert_ne!(
            key(&[("a", "1\nb=2")]),
            key(&[("a", "1"), ("b", "2")]),
            "a value with a newline forged a second field"
        );
        assert_ne!(key(&[("a", "bc")]), key(&[("ab", "c")]));
    }

    #[test]
    fn a_tree_digest_sees_content_mode_owner_and_kind() {
        let mut t = FileTree::new();
        t.file("/etc/hostname", 0o644, "s1\n");
        let d = tree_digest(&t);
        assert_eq!(d, tree_digest(&t.clone()));
        let mut content = FileTree::new();
        content.file("/etc/hostname", 0o644, "s2\n");
        let mut mode = FileTree::new();
        mode.file("/etc/hostname", 0o600, "s1\n");
        let mut owner = FileTree::new();
        owner.file_owned("/etc/hostname", 0o644, 1, 1, "s1\n");
        let mut link = FileTree::new();
        link.symlink("/etc/hostname", "s1\n");
        for other in [content, mode, owner, link] {
            assert_ne!(d, tree_digest(&other), "{other:?}");
        }
    }
}
