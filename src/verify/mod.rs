//! Proving an image works: [`vm`] boots it in QEMU (OVMF, KVM or TCG),
//! [`checks`] asserts what the profile promised from inside and outside
//! ([`cluster_ca`] the CA kiln holds, [`manifests`] what k3s deploys and
//! its proxy, [`airgap`] the image tarballs k3s imports), into a
//! [`report`].
//! Uses image, inputs, render, config and util; never build or deliver.

pub mod airgap;
pub mod checks;
pub mod cluster_ca;
pub mod manifests;
pub mod report;
pub mod storage;
pub mod vm;
