//! The verbs, one file each: load the profile and secrets, call the layers
//! below, return what `main` prints. May use every layer.

pub mod commands;
pub mod test;
