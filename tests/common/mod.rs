//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln::config::cluster_ca::{self, ClusterCa};
use kiln::config::plan::Plan;
use kiln::config::secrets::ClusterSecrets;
use kiln::config::secrets::{NodePassword, PrivateKey, SshHostKey};
use sha2::{Digest, Sha256};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The example profiles, as the README points to them.
pub const EXAMPLES: [&str; 2] = ["profiles/club.toml", "profiles/ha.toml"];

/// Every profile whose rendered files are checked (golden files, nft,
/// wg-quick): the examples (club: an external hub; ha: a mesh) and a hub
/// topology whose hub is a node. Each has an operator.
pub const RENDERED: [&str; 3] = [
    "profiles/club.toml",
    "profiles/ha.toml",
    "tests/profiles/hub.toml",
];

pub fn load_example(rel: &str) -> Plan {
    // Plan from the text, with the path as a user would type it, so
    // rendered headers do not depend on where the repo is checked out.
    let text = std::fs::read_to_string(repo().join(rel)).unwrap();
    kiln::config::plan::plan_profile(Path::new(rel), &text)
        .unwrap_or_else(|e| panic!("{rel}:\n{e}"))
}

/// Fixed secrets, so rendered files can be compared with golden files.
pub fn fixed_secrets(plan: &Plan) -> ClusterSecrets {
    let private: BTreeMap<String, PrivateKey> = plan
        .nodes
        .iter()
        .map(|n| {
            let d: [u8; 32] = Sha256::digest(format!("kiln golden key {}", n.name)).into();
            (n.name.clone(), PrivateKey::from_bytes(d))
        })
        .collect();
    let seed = |what: &str, node: &str| -> [u8; 32] {
        Sha256::digest(format!("kiln golden {what} {node}")).into()
    };
    let node_passwords = plan
        .nodes
        .iter()
        .map(|n| {
            let b: [u8; 16] = seed("node password", &n.name)[..16].try_into().unwrap();
            (n.name.clone(), NodePassword::from_bytes(b))
        })
        .collect();
    let ssh_host_keys = plan
        .nodes
        .iter()
        .map(|n| {
            let key = SshHostKey::from_seed(seed("ssh host key", &n.name), &n.name);
            (n.name.clone(), key)
        })
        .collect();
    let cluster_ca = fixed_cluster_ca();
    ClusterSecrets {
        private,
        token: cluster_ca::secure_token(&cluster_ca.server_ca_hash(), GOLDEN_SECRET),
        cluster_ca,
        node_passwords,
        ssh_host_keys,
        operators: plan
            .operators
            .iter()
            .map(|o| {
                let d = seed("operator key", &o.name);
                (o.name.clone(), PrivateKey::from_bytes(d))
            })
            .collect(),
    }
}

/// The secret part of the golden token.
pub const GOLDEN_SECRET: &str = "golden-token-0123456789abcdef";

/// A CA set made once by kiln and kept in `tests/fixtures/k3s-ca` (test
/// keys only): certificates carry random serials and ECDSA signatures
/// are randomised, so golden files need a set that does not change.
pub fn fixed_cluster_ca() -> ClusterCa {
    let dir = repo().join("tests/fixtures/k3s-ca");
    let files = cluster_ca::file_names()
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(&n)).unwrap();
            (n, text)
        })
        .collect();
    ClusterCa::from_files(files).unwrap()
}

/// Does a command exist on PATH?
pub fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex_lower(&Sha256::digest(data))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
