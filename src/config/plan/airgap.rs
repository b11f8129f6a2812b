//! Resolves the images k3s imports at its start (`k3s.airgap`,
//! `k3s.image-tarballs`): which tarballs every root image carries, and
//! under which names.
//!
//! The one place planning looks at the disk: it stats (never reads) each
//! tarball the profile names, so a missing file is reported at its line
//! with the other mistakes rather than half-way through a build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::diag::Diagnostics;
use crate::config::profile;

/// Where k3s imports image tarballs from at its start (the default data
/// dir, on the state partition).
pub const K3S_IMAGES_DIR: &str = "/var/lib/rancher/k3s/agent/images";
/// Where the root image keeps them: in the slot, so an A/B update
/// replaces them. Bind-mounted on [`K3S_IMAGES_DIR`] (see
/// `render::airgap`).
pub const SLOT_IMAGES_DIR: &str = "/usr/lib/kiln/images";
/// The name every k3s release gives its air-gap tarballs, before the
/// extension (`k3s-airgap-images-amd64.tar.zst`).
pub const RELEASE_TARBALL_STEM: &str = "k3s-airgap-images-amd64";

/// The image tarballs every node gets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AirgapPlan {
    /// `k3s.airgap`: the release's air-gap tarball for `k3s.version`.
    pub release: bool,
    /// `k3s.image-tarballs`, in profile order.
    pub tarballs: Vec<ImageTarballPlan>,
}

impl AirgapPlan {
    /// No tarballs at all: nothing is added to the image or rendered.
    pub fn is_empty(&self) -> bool {
        !self.release && self.tarballs.is_empty()
    }
}

/// One tarball of `k3s.image-tarballs`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTarballPlan {
    /// Where the build reads it: the path as written, resolved against
    /// the profile's directory.
    pub path: PathBuf,
    /// Its file name, in the root image and in `agent/images`.
    pub name: String,
    /// The profile key it came from (`k3s.image-tarballs[0]`).
    pub key: String,
}

/// `path` is the profile's path: relative tarballs are found next to it.
pub(super) fn resolve_airgap(path: &Path, p: &profile::Profile, d: &mut Diagnostics) -> AirgapPlan {
    let release = p.k3s.airgap.as_ref().is_some_and(|a| a.v);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut tarballs = Vec::new();
    for a in &p.k3s.image_tarballs {
        let t = &a.v;
        let name = t.name().to_string();
        if let Some(first) = names.get(&name) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("a second image tarball named `{name}` (the first is on line {first})"),
                format!(
                    "rename one of the files: both would be {SLOT_IMAGES_DIR}/{name} on the nodes"
                ),
            );
            continue;
        }
        names.insert(name.clone(), d.line_of(a.span.start));
        if release && name.starts_with(RELEASE_TARBALL_STEM) {
            d.error(
                a.span.clone(),
                &a.key,
                format!("`{name}` has the name of the release's air-gap tarball, which `k3s.airgap = true` adds already"),
                "remove this entry (kiln fetches and pins the release's tarball itself), or rename the file",
            );
            continue;
        }
        let resolved = if t.path().is_absolute() {
            t.path().to_path_buf()
        } else {
            dir.join(t.path())
        };
        if let Err((message, hint)) = check_file(t.path(), &resolved) {
            d.error(a.span.clone(), &a.key, message, hint);
            continue;
        }
        tarballs.push(ImageTarballPlan {
            path: resolved,
            name,
            key: a.key.clone(),
        });
    }
    let plan = AirgapPlan { release, tarballs };
    if !plan.is_empty() {
        refuse_hidden_write_files(p, d);
    }
    plan
}

/// The tarball at `resolved` (written as `written`) is a regular file
/// (through symlinks); else the message and the fix.
fn check_file(written: &Path, resolved: &Path) -> Result<(), (String, String)> {
    let shown = written.display();
    match std::fs::metadata(resolved) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err((
            format!("`{shown}` is not a regular file ({})", resolved.display()),
            "name the tarball file itself, not a directory".into(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err((
            format!(
                "image tarball `{shown}` does not exist (looked for {})",
                resolved.display()
            ),
            format!(
                "write it there (`docker save IMAGE… | zstd -o {shown}`), or correct the path: a relative path is read from the profile's directory"
            ),
        )),
        Err(e) => Err((
            format!(
                "cannot read image tarball `{shown}` ({}): {e}",
                resolved.display()
            ),
            "make the file readable by the user running kiln".into(),
        )),
    }
}

/// A write-files entry under `agent/images` would be hidden by the bind
/// mount of the slot's tarballs: refuse it, pointing at the right key.
fn refuse_hidden_write_files(p: &profile::Profile, d: &mut Diagnostics) {
    for w in &p.first_boot.write_files {
        let Some(path) = &w.path else { continue };
        if path.v.starts_with(&format!("{K3S_IMAGES_DIR}/")) {
            d.error(
                path.span.clone(),
                &path.key,
                format!(
                    "`{}` would be hidden: with `k3s.airgap` or `k3s.image-tarballs` set, {K3S_IMAGES_DIR} shows only the image slot's tarballs",
                    path.v
                ),
                "list the tarball in `k3s.image-tarballs` instead (it then comes with every A/B update)",
            );
        }
    }
}
