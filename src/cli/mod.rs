//! The verbs, one file each: load the profile and secrets, call the layers
//! below, print what the verb prints. May use every layer.

pub mod check;
pub mod commands;
pub mod keys;
pub mod render;
pub mod test;
