//! kiln: bake immutable, k3os-style boot images for a small k3s cluster.
//!
//! The folders are the pipeline, and dependencies run one way, from the
//! top of this list to the bottom (a module never uses one above it; the
//! `layers` test fails if one does):
//!
//! | layer | what lives there |
//! |---|---|
//! | [`cli`] | one file per verb: what `main` calls after parsing |
//! | [`build`], [`deliver`], [`verify`] | the long jobs: build the images; flash, serve, upgrade; boot and check in QEMU (none of the three uses another) |
//! | [`image`] | bytes on a disk: root squashfs, initramfs, cpio, ESP, GPT, disk; the node-side scripts beside the code that installs them |
//! | [`inputs`] | what a build starts from: base tarball, k3s binary, kernel files, the cache |
//! | [`render`] | every text kiln writes for a node (pure) |
//! | [`config`] | profile → plan, diagnostics, typed values, secrets |
//! | [`util`] | small shared tools: external commands |

pub mod cli;

pub mod build;
pub mod deliver;
pub mod verify;

pub mod image;

pub mod inputs;

pub mod render;

pub mod config;

pub mod util;
