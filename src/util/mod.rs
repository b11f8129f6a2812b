//! Small things written once and used everywhere: [`tool`] (external
//! commands), [`cancel`] (stopping a job when `main` is signalled),
//! [`hash`] (sha256 of files, `sha256sum` output), [`atomic`] (replacing
//! kiln's own files), [`mode`] (modes of secret files), [`size`] (units),
//! [`range_io`] (a byte range of a disk image as `Read + Write + Seek`),
//! [`space`] (free and used disk space), [`sparse`] (in-kernel copies
//! that keep holes).
//! Uses nothing of kiln's.

pub mod atomic;
pub mod cancel;
pub mod hash;
pub mod mode;
pub mod range_io;
pub mod size;
pub mod space;
pub mod sparse;
pub mod tool;
