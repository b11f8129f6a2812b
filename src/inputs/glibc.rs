//! Whether a program built on this machine runs in the image: a dynamically
//! linked program names, for each glibc symbol it uses, the glibc version
//! that symbol comes from (`GLIBC_2.34`; the ELF `.gnu.version_r` section,
//! read with the `object` crate), and the dynamic loader refuses to start
//! it on an older glibc. kiln-relay is built beside kiln on the user's
//! machine; a newer Debian there than the image's base (trixie's glibc 2.41
//! against bookworm's 2.36) would give an image whose relay never starts,
//! found only when a node behind a firewall cannot reach its hub.

use std::path::Path;

use anyhow::Context as _;
use object::read::elf::{ElfFile64, FileHeader as _};

/// A glibc version, `major.minor` (`GLIBC_2.2.5` counts as 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// `2.36` out of `2.36`, `GLIBC_2.2.5` (with `prefix` `GLIBC_`) or a
/// Debian version `2.36-9+deb12u10`.
fn parse(text: &str) -> Option<Version> {
    let mut parts = text.split(['.', '-', '+', '~']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(Version(major, minor))
}

/// The newest glibc version the program at `path` needs; `None` for a
/// program that needs none (static, or not linked against glibc).
pub fn needed(path: &Path) -> anyhow::Result<Option<Version>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    needed_by(&data).with_context(|| format!("reading the ELF version needs of {}", path.display()))
}

fn needed_by(data: &[u8]) -> anyhow::Result<Option<Version>> {
    let file = ElfFile64::<object::Endianness>::parse(data)?;
    let endian = file.elf_header().endian()?;
    let sections = file.elf_section_table();
    let Some((mut needs, link)) = sections.gnu_verneed(endian, data)? else {
        return Ok(None);
    };
    let strings = sections.strings(endian, data, link)?;
    let mut newest = None;
    while let Some((_, mut aux)) = needs.next()? {
        while let Some(a) = aux.next()? {
            let name = String::from_utf8_lossy(a.name(endian, strings)?);
            // GLIBC_PRIVATE and other libraries' versions do not parse.
            if let Some(v) = name.strip_prefix("GLIBC_").and_then(parse) {
                newest = newest.max(Some(v));
            }
        }
    }
    Ok(newest)
}

/// The glibc of a root, from its installed `libc6` package.
pub fn of_packages(packages: &[super::dpkg::DebPackage]) -> Option<Version> {
    packages
        .iter()
        .find(|p| p.name == "libc6")
        .and_then(|p| parse(&p.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_symbol_versions_and_debian_versions() {
        assert_eq!(parse("2.2.5"), Some(Version(2, 2)));
        assert_eq!(parse("2.34"), Some(Version(2, 34)));
        assert_eq!(parse("2.36-9+deb12u10"), Some(Version(2, 36)));
        assert_eq!(parse("2.41-6"), Some(Version(2, 41)));
        assert_eq!(parse("PRIVATE"), None);
        assert!(Version(2, 36) < Version(2, 41));
        assert!(Version(2, 9) < Version(2, 10));
    }

    /// This test program is linked against the host's glibc: it needs a
    /// version, at most the host's (it runs).
    #[test]
    fn a_dynamically_linked_program_needs_a_glibc_no_newer_than_the_one_it_runs_on() {
        let exe = std::env::current_exe().unwrap();
        let v = needed(&exe)
            .unwrap()
            .expect("a Rust test program links glibc dynamically");
        let host = std::process::Command::new("getconf")
            .arg("GNU_LIBC_VERSION")
            .output()
            .unwrap();
        let host = String::from_utf8(host.stdout).unwrap();
        let host = parse(host.trim().trim_start_matches("glibc ")).unwrap();
        assert!(
            v >= Version(2, 2) && v <= host,
            "{v} against the host's {host}"
        );
    }

    /// A program built on a newer system: the same ELF with one version
    /// name changed in its string table (same length, so the tables stay
    /// valid).
    #[test]
    fn a_program_built_against_a_newer_glibc_says_so() {
        let exe = std::env::current_exe().unwrap();
        let mut data = std::fs::read(&exe).unwrap();
        let at = data
            .windows(b"GLIBC_2.2.5\0".len())
            .position(|w| w == b"GLIBC_2.2.5\0")
            .expect("x86-64 programs need GLIBC_2.2.5");
        data[at..at + 11].copy_from_slice(b"GLIBC_9.9.9");
        assert_eq!(needed_by(&data).unwrap(), Some(Version(9, 9)));
    }

    #[test]
    fn a_file_that_is_not_elf_is_an_error() {
        assert!(needed_by(b"#!/bin/sh\necho hi\n").is_err());
    }

    #[test]
    fn the_root_glibc_is_libc6s_version() {
        let pkg = |name: &str, version: &str| super::super::dpkg::DebPackage {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            source: None,
        };
        let packages = [pkg("bash", "5.2.15-2+b7"), pkg("libc6", "2.36-9+deb12u10")];
        assert_eq!(of_packages(&packages), Some(Version(2, 36)));
        assert_eq!(of_packages(&packages[..1]), None);
    }
}
