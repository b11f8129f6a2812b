//! Small things written once and used everywhere: [`tool`] (external
//! commands), [`hash`] (sha256 of files, `sha256sum` output), [`atomic`]
//! (replacing kiln's own files), [`size`] (units). Uses nothing of kiln's.

pub mod atomic;
pub mod hash;
pub mod size;
pub mod tool;
