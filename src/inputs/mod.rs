//! What a build starts from: the base root tarball ([`base`], made by
//! mmdebstrap and cached), the k3s binary ([`k3s`], pinned and verified),
//! the image tarballs k3s imports ([`airgap`]: the release's, verified and
//! pinned the same way, and the profile's), the kernel, modules and boot
//! files read out of the base ([`kernel`], packed as one file for the
//! stage cache by [`kernel_pack`]), the Debian packages installed in it
//! ([`dpkg`]) and whether its glibc runs a program built here ([`glibc`]),
//! `kiln-relay` ([`relay`]), when a cached base is made again
//! ([`freshness`]), and the [`cache`] directory. Uses render, config and
//! util.

pub mod airgap;
pub mod base;
pub mod cache;
pub mod dpkg;
pub mod freshness;
pub mod glibc;
pub mod k3s;
pub mod kernel;
pub mod kernel_pack;
pub mod relay;
