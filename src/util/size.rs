//! Size units, once.

/// Bytes in a mebibyte.
pub const MIB: u64 = 1024 * 1024;
