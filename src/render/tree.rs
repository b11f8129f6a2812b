//! A tree of files built in memory: what a node's seed holds, and what
//! `kiln render` writes out. Paths are absolute inside the node.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::{Context as _, bail};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        content: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        target: String,
    },
    Dir {
        mode: u32,
    },
}

impl Entry {
    /// Does this entry hold a secret (readable by its owner only)?
    pub fn is_private(&self) -> bool {
        matches!(self, Entry::File { mode, .. } if mode & 0o077 == 0)
    }
}

/// Files by absolute path, sorted (so everything derived is reproducible).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileTree {
    entries: BTreeMap<String, Entry>,
}

impl FileTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a root-owned file.
    pub fn file(&mut self, path: &str, mode: u32, content: impl Into<Vec<u8>>) {
        self.file_owned(path, mode, 0, 0, content);
    }

    pub fn file_owned(
        &mut self,
        path: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        content: impl Into<Vec<u8>>,
    ) {
        assert!(path.starts_with('/'), "tree paths are absolute: {path}");
        self.entries.insert(
            path.to_string(),
            Entry::File {
                content: content.into(),
                mode,
                uid,
                gid,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        assert!(path.starts_with('/'), "tree paths are absolute: {path}");
        self.entries.insert(
            path.to_string(),
            Entry::Symlink {
                target: target.to_string(),
            },
        );
    }

    pub fn dir(&mut self, path: &str, mode: u32) {
        self.entries.insert(path.to_string(), Entry::Dir { mode });
    }

    /// Add every entry of `other` (its entries win on the same path).
    pub fn extend(&mut self, other: FileTree) {
        self.entries.extend(other.entries);
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// The content of a file as text (panics in tests if absent).
    pub fn text(&self, path: &str) -> Option<&str> {
        match self.entries.get(path)? {
            Entry::File { content, .. } => std::str::from_utf8(content).ok(),
            _ => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Every directory that must exist for the entries (parents first),
    /// excluding `/`, with the explicit ones' modes or 0755.
    pub fn parent_dirs(&self) -> BTreeMap<String, u32> {
        let mut dirs = BTreeMap::new();
        for (path, e) in &self.entries {
            if let Entry::Dir { mode } = e {
                dirs.insert(path.clone(), *mode);
            }
            let mut p = Path::new(path.as_str()).parent();
            while let Some(dir) = p {
                let s = dir.to_string_lossy().to_string();
                if s == "/" {
                    break;
                }
                dirs.entry(s).or_insert(0o755);
                p = dir.parent();
            }
        }
        dirs
    }

    /// Write the tree under `root` (a directory that must not exist yet):
    /// modes as recorded, ownership left to the caller's user (a
    /// rendered tree is for inspection). Secrets are created 0600 from the
    /// start, never widened.
    pub fn write_to(&self, root: &Path) -> anyhow::Result<()> {
        if root.exists() {
            bail!(
                "{} already exists; choose a new directory or remove it first",
                root.display()
            );
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        for (dir, mode) in self.parent_dirs() {
            let p = root.join(dir.trim_start_matches('/'));
            std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
            fs_err::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        }
        for (path, e) in &self.entries {
            let p = root.join(path.trim_start_matches('/'));
            match e {
                Entry::File { content, mode, .. } => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(*mode)
                        .open(&p)
                        .with_context(|| format!("writing {}", p.display()))?;
                    f.write_all(content)
                        .with_context(|| format!("writing {}", p.display()))?;
                    fs_err::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
                }
                Entry::Symlink { target } => std::os::unix::fs::symlink(target, &p)
                    .with_context(|| format!("linking {}", p.display()))?,
                Entry::Dir { .. } => {}
            }
        }
        Ok(())
    }
}
