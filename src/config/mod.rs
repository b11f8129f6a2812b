//! From the profile as written to a resolved plan: [`profile`] (strict
//! TOML model), [`diag`] (errors with file, line, key and fix), [`types`]
//! (sizes, keys, addresses parsed at the boundary), [`plan`] (resolved,
//! validated; no I/O after it), [`secrets`] (the state directory),
//! [`cluster_ca`] (the k3s CA set, pure), [`ca_dir`] (where the state
//! directory keeps it) and [`k3os`] (a profile written from k3os
//! `config.yaml` files, pure). Uses only util.

pub mod ca_dir;
pub mod cluster_ca;
pub mod diag;
pub mod k3os;
pub mod plan;
pub mod profile;
pub mod secrets;
pub mod types;
