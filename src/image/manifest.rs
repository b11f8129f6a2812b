//! `manifest.json`: what a build output holds, typed. Written by build,
//! read by serve, `--out` checks and the tests; one definition for all.
//!
//! Fields are declared in alphabetical order: the file's bytes are the
//! same as when it was written from an untyped JSON map (sorted keys).

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The file name in a build output.
pub const FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Every file of the output but SHA256SUMS and the manifest itself.
    pub artifacts: Vec<Artifact>,
    pub base: Digest,
    pub cluster: String,
    /// The image tarballs every root image carries for k3s to import
    /// (`k3s.airgap`, `k3s.image-tarballs`); absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageTarball>,
    pub k3s: K3s,
    pub kernel: Kernel,
    pub kiln_version: String,
    pub nodes: Vec<Node>,
    /// The profile's file name.
    pub profile: Option<String>,
    pub profile_sha256: String,
    /// `kiln-relay` in the root images, when a node reaches its hub over
    /// TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<Relay>,
    /// The SBOM beside the manifest (absent in outputs of older kilns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<Sbom>,
    pub source_date_epoch: u64,
}

/// The SBOM file ([`crate::image::sbom`]): its path in the output, its
/// sha256, and how many components it lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sbom {
    pub components: usize,
    pub format: String,
    pub path: String,
    pub sha256: String,
}

/// The `kiln-relay` binary the root images carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relay {
    pub sha256: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    pub sha256: String,
}

/// One image tarball, as it is in `/usr/lib/kiln/images` and, on the
/// node, in `/var/lib/rancher/k3s/agent/images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageTarball {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct K3s {
    pub sha256: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub initramfs_compression: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The kernel command line of slot A.
    pub cmdline: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pxe: Option<Pxe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qcow2: Option<String>,
    pub role: String,
    pub root_sha256: String,
}

/// Paths in the output, relative to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pxe {
    pub root: String,
    pub script: String,
    pub seed: String,
}

impl Manifest {
    /// Read `DIR/manifest.json`.
    pub fn read(dir: &Path) -> anyhow::Result<Manifest> {
        let path = dir.join(FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}: not a manifest this kiln wrote", path.display()))
    }

    /// The bytes of `manifest.json`: pretty JSON and a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
    }
}
