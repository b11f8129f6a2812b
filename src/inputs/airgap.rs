//! The image tarballs a build puts into every root image, for k3s to
//! import at its start (see `render::airgap` for how they reach it):
//! the release's air-gap tarball (`k3s.airgap`, found like the binary by
//! [`super::k3s::Resolver`]: `--airgap-images`, the cache, or a verified
//! download, pinned in `kiln.lock`), then the profile's own
//! (`k3s.image-tarballs`), each hashed for the manifest.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::config::plan::{Plan, RELEASE_TARBALL_STEM};
use crate::config::types::{IMAGE_TARBALL_EXTENSIONS, image_tarball_extension};
use crate::inputs::k3s::{AIRGAP_IMAGES, Resolver};

/// One image tarball, ready for the root image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTarball {
    /// Its file name in the image and in `agent/images` on the node.
    pub name: String,
    /// Where the build reads it.
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// The plan's tarballs: the release's first (when `k3s.airgap`), then
/// the profile's in order. `explicit` is `--airgap-images`: the
/// release's tarball, in any of the forms the release publishes.
///
/// # Errors
/// `--airgap-images` without `k3s.airgap`, or with a name k3s would not
/// import; the release's tarball unavailable or not the one `kiln.lock`
/// pins; a profile tarball unreadable.
pub fn resolve_image_tarballs(
    plan: &Plan,
    resolver: &Resolver,
    explicit: Option<&Path>,
) -> anyhow::Result<Vec<ImageTarball>> {
    check_given(plan, explicit)?;
    let mut out = Vec::new();
    if plan.airgap.release {
        out.push(release_tarball(plan, resolver, explicit)?);
    }
    for t in &plan.airgap.tarballs {
        out.push(ImageTarball {
            name: t.name.clone(),
            path: t.path.clone(),
            sha256: crate::util::hash::sha256_file(&t.path)
                .with_context(|| format!("image tarball of {}", t.key))?,
            size: file_size(&t.path)?,
        });
    }
    Ok(out)
}

/// `--airgap-images` is for a profile with `k3s.airgap = true`: a build
/// checks this before any work.
///
/// # Errors
/// A tarball given for a profile that does not ask for one.
pub fn check_given(plan: &Plan, explicit: Option<&Path>) -> anyhow::Result<()> {
    if let Some(given) = explicit
        && !plan.airgap.release
    {
        bail!(
            "--airgap-images {} was given, but {} does not set `k3s.airgap = true`\nhint: add `airgap = true` to its [k3s] table, or leave --airgap-images (KILN_AIRGAP_IMAGES) out",
            given.display(),
            plan.profile_path.display()
        );
    }
    Ok(())
}

/// The release's air-gap tarball for the plan's k3s version. A given
/// file keeps its compression, so its name on the node keeps its
/// extension: k3s chooses the decompressor by the name.
fn release_tarball(
    plan: &Plan,
    resolver: &Resolver,
    explicit: Option<&Path>,
) -> anyhow::Result<ImageTarball> {
    let ext = match explicit {
        Some(given) => given_extension(given)?,
        None => image_tarball_extension(AIRGAP_IMAGES.name).expect("a known extension"),
    };
    let version = plan.k3s.version.to_string();
    let resolved = resolver.resolve_asset(&AIRGAP_IMAGES, &version, explicit)?;
    Ok(ImageTarball {
        name: format!("{RELEASE_TARBALL_STEM}{ext}"),
        size: file_size(&resolved.path)?,
        path: resolved.path,
        sha256: resolved.sha256,
    })
}

/// The extension of a file given with `--airgap-images`, which k3s must
/// recognise.
fn given_extension(given: &Path) -> anyhow::Result<&'static str> {
    let name = given
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    match image_tarball_extension(&name) {
        Some(ext) => Ok(ext),
        None => bail!(
            "--airgap-images {}: the name must end in {} (as the release's {RELEASE_TARBALL_STEM}.* do): k3s chooses how to decompress an image tarball by its name\nhint: give the file as the release names it, e.g. {}",
            given.display(),
            IMAGE_TARBALL_EXTENSIONS.join(", "),
            AIRGAP_IMAGES.name
        ),
    }
}

fn file_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(dir: &Path, k3s: &str) -> Plan {
        let text = format!(
            "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n{k3s}\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\n"
        );
        crate::config::plan::plan_profile(&dir.join("lab.toml"), &text).unwrap()
    }

    fn sha(b: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(b))
    }

    #[test]
    fn the_release_tarball_first_named_by_its_compression_then_the_profiles() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("registry.tar.gz"), b"registry").unwrap();
        std::fs::write(dir.path().join("given.tar"), b"release").unwrap();
        let p = plan(
            dir.path(),
            "airgap = true\nimage-tarballs = [\"registry.tar.gz\"]",
        );
        let resolver = Resolver::new(dir.path().join("cache"), dir.path().join("kiln.lock"))
            .with_base_url("http://127.0.0.1:9/never-contacted");
        let got =
            resolve_image_tarballs(&p, &resolver, Some(&dir.path().join("given.tar"))).unwrap();
        let want = vec![
            ImageTarball {
                name: "k3s-airgap-images-amd64.tar".into(),
                path: dir.path().join("given.tar"),
                sha256: sha(b"release"),
                size: 7,
            },
            ImageTarball {
                name: "registry.tar.gz".into(),
                path: dir.path().join("registry.tar.gz"),
                sha256: sha(b"registry"),
                size: 8,
            },
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_given_tarball_needs_airgap_and_a_name_k3s_imports() {
        let dir = tempfile::tempdir().unwrap();
        let resolver = Resolver::new(dir.path().join("cache"), dir.path().join("kiln.lock"));
        let given = dir.path().join("images.tar.zst");
        std::fs::write(&given, b"x").unwrap();
        let err = format!(
            "{:#}",
            resolve_image_tarballs(&plan(dir.path(), ""), &resolver, Some(&given)).unwrap_err()
        );
        assert!(
            err.contains("airgap = true") && err.contains("images.tar.zst"),
            "{err}"
        );
        let odd = dir.path().join("images.zip");
        std::fs::write(&odd, b"x").unwrap();
        let err = format!(
            "{:#}",
            resolve_image_tarballs(&plan(dir.path(), "airgap = true"), &resolver, Some(&odd))
                .unwrap_err()
        );
        assert!(
            err.contains("images.zip") && err.contains(".tar.zst"),
            "{err}"
        );
        assert!(!dir.path().join("kiln.lock").exists(), "nothing pinned");
        assert!(
            resolve_image_tarballs(&plan(dir.path(), ""), &resolver, None)
                .unwrap()
                .is_empty()
        );
    }
}
