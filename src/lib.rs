//! kiln: bake immutable, k3os-style boot images for a small k3s cluster.
//!
//! The pipeline, one module per stage:
//! profile → plan → render → (rootfs → initramfs → esp → disk / pxe) → verify.

pub mod base;
pub mod boot;
pub mod build;
pub mod cache;
pub mod commands;
pub mod diag;
pub mod flash;
pub mod image;
pub mod initramfs;
pub mod k3s;
pub mod kernel;
pub mod nodetest;
pub mod plan;
pub mod profile;
pub mod pxe;
pub mod render;
pub mod rootfs;
pub mod secrets;
pub mod serve;
pub mod staging;
pub mod tool;
pub mod tree;
pub mod types;
pub mod upgrade;
pub mod verify;
pub mod vm;
