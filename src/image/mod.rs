//! Writers for the bytes that end up on a disk: GPT and cpio.

pub mod cpio;
pub mod disk;
pub mod esp;
pub mod gpt;
