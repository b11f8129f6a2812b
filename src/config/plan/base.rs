//! Resolves `[base]` (a Debian suite or a supplied root tarball) and
//! `[image]` (the squashfs compression level).

use std::path::Path;

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, KernelFlavour};

use super::{BasePlan, DEFAULT_BASE_MAX_AGE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_SUITE};

/// `path` is the profile's path: a relative tarball is found next to it.
pub(super) fn resolve_base(path: &Path, p: &profile::Profile, d: &mut Diagnostics) -> BasePlan {
    match (&p.base.tarball, &p.base.suite) {
        (Some(t), Some(s)) => {
            d.error(
                s.span.clone(),
                &s.key,
                "both `base.suite` and `base.tarball` are set",
                format!(
                    "remove one: `{}` is used as the whole root, so a suite would be ignored",
                    t.v.display()
                ),
            );
            BasePlan::Tarball(t.v.clone())
        }
        (Some(t), None) => {
            if let Some(k) = &p.base.kernel {
                d.error(
                    k.span.clone(),
                    &k.key,
                    "`base.kernel` cannot choose the kernel of a supplied tarball",
                    "remove `kernel`: the tarball's own kernel is used",
                );
            }
            if !p.base.packages.is_empty() {
                d.error(
                    p.base.packages[0].span.clone(),
                    "base.packages",
                    "`base.packages` cannot be added to a supplied tarball",
                    "remove `packages`, or build from a suite instead of `tarball`",
                );
            }
            if let Some(a) = &p.base.max_age {
                d.error(
                    a.span.clone(),
                    &a.key,
                    "`base.max-age` cannot refresh a supplied tarball",
                    "remove `max-age`: kiln only rebuilds the Debian bases it makes; replace the tarball yourself",
                );
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            BasePlan::Tarball(if t.v.is_absolute() {
                t.v.clone()
            } else {
                dir.join(&t.v)
            })
        }
        (None, s) => BasePlan::Debian {
            suite: s
                .as_ref()
                .map_or(DEFAULT_SUITE.to_string(), |a| a.v.clone()),
            kernel: p
                .base
                .kernel
                .as_ref()
                .map_or(KernelFlavour::Generic, |a| a.v),
            packages: p.base.packages.iter().map(|a| a.v.clone()).collect(),
            max_age: p
                .base
                .max_age
                .as_ref()
                .map_or(DEFAULT_BASE_MAX_AGE, |a| a.v),
        },
    }
}

pub(super) fn resolve_compression_level(p: &profile::Profile, d: &mut Diagnostics) -> i32 {
    let level = match &p.image.compression_level {
        Some(a) if !(1..=22).contains(&a.v) => {
            d.error(
                a.span.clone(),
                &a.key,
                format!("zstd level {} is out of range", a.v),
                "use 1 (fastest) to 22 (smallest); 3 is the default",
            );
            DEFAULT_COMPRESSION_LEVEL
        }
        Some(a) => a.v,
        None => DEFAULT_COMPRESSION_LEVEL,
    };
    level as i32
}
