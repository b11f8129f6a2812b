//! kiln: bake immutable, k3os-style boot images for a small k3s cluster.
//!
//! The pipeline, one module per stage:
//! profile → plan → render → (rootfs → initramfs → esp → disk / pxe) → verify.

pub mod diag;
pub mod types;
pub mod profile;
pub mod plan;
pub mod secrets;
pub mod tree;
pub mod kernel;
pub mod vm;
pub mod verify;
pub mod nodetest;
pub mod build;
pub mod boot;
pub mod initramfs;
pub mod rootfs;
pub mod cache;
pub mod tool;
pub mod commands;
pub mod render;
pub mod k3s;
pub mod image;
pub mod base;
pub mod flash;
