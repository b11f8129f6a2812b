//! The bytes that end up on a disk: the root squashfs ([`rootfs`], with
//! the node-side update scripts it installs), the [`initramfs`] (with its
//! init scripts), [`cpio`], the [`esp`], [`gpt`] and the [`disk`] that
//! holds them; the [`manifest`] and the [`sbom`] that describe a build.
//! Uses inputs, render, config and util.

pub mod cpio;
pub mod disk;
pub mod esp;
pub mod gpt;
pub mod initramfs;
pub mod manifest;
pub mod rootfs;
pub mod sbom;
