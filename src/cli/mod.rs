//! The verbs, one file each: load the profile and secrets, call the layers
//! below, print what the verb prints. May use every layer.

pub mod build;
pub mod check;
pub mod flash;
pub mod hub;
pub mod import_k3os;
pub mod keys;
pub mod kubeconfig;
pub mod operator;
pub mod render;
pub mod serve;
pub mod test;
pub mod upgrade;
