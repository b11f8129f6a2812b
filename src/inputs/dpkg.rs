//! The Debian packages installed in a root, from dpkg's status file
//! (`var/lib/dpkg/status`, read out of the base tarball by
//! [`crate::inputs::kernel::read_base_files`]).
//!
//! The file is deb822 (deb822(5)): stanzas separated by blank lines, each
//! a list of `Field: value` lines, where a line starting with a space or a
//! tab continues the field before it (`Description`, `Conffiles`). Field
//! names are case-insensitive. `Status` is `WANT FLAG STATE`
//! (dpkg-query(1), "Package states"): a package counts as installed when
//! its state is `installed` with the flag `ok` (`install ok installed`,
//! or `hold ok installed` for a held package), which is what dpkg-query
//! shows as `ii` (or `hi`).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

/// Where dpkg keeps its status file, relative to the root.
pub const STATUS: &str = "var/lib/dpkg/status";

/// One installed binary package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DebPackage {
    pub name: String,
    pub version: String,
    /// `amd64`, or `all` for architecture-independent packages.
    pub architecture: String,
    /// The source package, when the stanza names one (`Source:`; dpkg
    /// leaves it out when it equals the binary package's name).
    pub source: Option<SourcePackage>,
}

/// `Source: NAME` or `Source: NAME (VERSION)`; the version is given only
/// when it differs from the binary package's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourcePackage {
    pub name: String,
    pub version: Option<String>,
}

/// The installed packages of a status file, sorted by name, architecture
/// and version. Stanzas in any other state are left out; those whose files
/// may be on disk nonetheless (unpacked, half-configured, triggers
/// pending) are named in a warning.
pub fn installed_packages(status: &str) -> anyhow::Result<Vec<DebPackage>> {
    let mut packages = Vec::new();
    let mut partial = Vec::new();
    for (line, stanza) in stanzas(status) {
        let at = || format!("{STATUS}, stanza at line {line}");
        let fields = fields(&stanza).with_context(at)?;
        let name = field(&fields, "package").with_context(at)?;
        let state = field(&fields, "status").with_context(|| format!("{STATUS}: {name}"))?;
        match package_state(state) {
            PackageState::Installed => {}
            PackageState::Partly => {
                partial.push(format!("{name} ({state})"));
                continue;
            }
            PackageState::Absent => continue,
        }
        let get = |key: &str| field(&fields, key).with_context(|| format!("{STATUS}: {name}"));
        packages.push(DebPackage {
            name: name.to_string(),
            version: get("version")?.to_string(),
            architecture: get("architecture")?.to_string(),
            source: fields.get("source").map(|s| parse_source(s)),
        });
    }
    if !partial.is_empty() {
        log::warn!(
            "{STATUS} lists {} package(s) not fully installed, left out of the SBOM: {}",
            partial.len(),
            partial.join(", ")
        );
    }
    packages.sort();
    Ok(packages)
}

/// The stanzas of a deb822 text, each with the line it starts on.
fn stanzas(text: &str) -> Vec<(usize, Vec<&str>)> {
    let mut out: Vec<(usize, Vec<&str>)> = Vec::new();
    let mut current: Option<(usize, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            out.extend(current.take());
        } else {
            current
                .get_or_insert_with(|| (i + 1, Vec::new()))
                .1
                .push(line);
        }
    }
    out.extend(current);
    out
}

/// A stanza's fields by lower-cased name; a continuation line is joined
/// to its field's value with a newline (a field whose first line is
/// empty, like `Conffiles:`, starts with its second).
fn fields(lines: &[&str]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            let Some(v) = last.as_ref().and_then(|k| fields.get_mut(k)) else {
                bail!("a continuation line before any field: {line:?}");
            };
            if !v.is_empty() {
                v.push('\n');
            }
            v.push_str(line.trim());
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            bail!("not a `Field: value` line: {line:?}");
        };
        let key = key.to_ascii_lowercase();
        fields.insert(key.clone(), value.trim().to_string());
        last = Some(key);
    }
    Ok(fields)
}

fn field<'a>(fields: &'a BTreeMap<String, String>, key: &str) -> anyhow::Result<&'a str> {
    match fields.get(key).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => bail!("no `{key}` field"),
    }
}

enum PackageState {
    /// `installed`, flag `ok`.
    Installed,
    /// Files (partly) on disk, but not configured or with an error flag.
    Partly,
    /// `not-installed` or `config-files`: no files of the package.
    Absent,
}

/// What a `Status:` value (`WANT FLAG STATE`) says about the package's files.
fn package_state(status: &str) -> PackageState {
    let words: Vec<&str> = status.split_whitespace().collect();
    match words.as_slice() {
        [_, "ok", "installed"] => PackageState::Installed,
        [_, _, "not-installed" | "config-files"] => PackageState::Absent,
        _ => PackageState::Partly,
    }
}

/// `NAME` or `NAME (VERSION)`.
fn parse_source(s: &str) -> SourcePackage {
    match s.split_once('(') {
        Some((name, version)) => SourcePackage {
            name: name.trim().to_string(),
            version: Some(version.trim_end().trim_end_matches(')').trim().to_string()),
        },
        None => SourcePackage {
            name: s.trim().to_string(),
            version: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status file as dpkg writes it: multi-line fields, a package with
    /// a source of another version, removed and half-installed packages.
    const STATUS_TEXT: &str = "\
Package: libc6
Status: install ok installed
Priority: optional
Section: libs
Installed-Size: 12986
Maintainer: GNU Libc Maintainers <glibc@example.org>
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u9
Depends: libgcc-s1
Conffiles:
 /etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.
 .
 This package includes shared versions of the standard C library.

Package: removed-thing
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
Conffiles:
 /etc/removed-thing.conf 0123456789abcdef0123456789abcdef

Package: bsdutils
Essential: yes
status: install ok installed
Architecture: amd64
Source: util-linux (2.38.1-5)
Version: 1:2.38.1-5+b1
Description: basic utilities from 4.4BSD-Lite

Package: half-thing
Status: install ok half-configured
Architecture: all
Version: 2

Package: ca-certificates
Status: hold ok installed
Architecture: all
Version: 20230311
Description: Common CA certificates
 Contains the certificate authorities shipped with Mozilla's browser.
";

    #[test]
    fn only_installed_packages_with_their_fields() {
        let got = installed_packages(STATUS_TEXT).unwrap();
        assert_eq!(
            got,
            [
                DebPackage {
                    name: "bsdutils".into(),
                    version: "1:2.38.1-5+b1".into(),
                    architecture: "amd64".into(),
                    source: Some(SourcePackage {
                        name: "util-linux".into(),
                        version: Some("2.38.1-5".into())
                    }),
                },
                DebPackage {
                    name: "ca-certificates".into(),
                    version: "20230311".into(),
                    architecture: "all".into(),
                    source: None,
                },
                DebPackage {
                    name: "libc6".into(),
                    version: "2.36-9+deb12u9".into(),
                    architecture: "amd64".into(),
                    source: Some(SourcePackage {
                        name: "glibc".into(),
                        version: None
                    }),
                },
            ]
        );
    }

    #[test]
    fn continuation_lines_belong_to_their_field() {
        let stanzas = stanzas(STATUS_TEXT);
        assert_eq!(stanzas.len(), 5);
        assert_eq!(stanzas[1].0, 20, "the second stanza starts on line 20");
        let f = fields(&stanzas[0].1).unwrap();
        assert_eq!(
            f["description"],
            "GNU C Library: Shared libraries\nContains the standard libraries that are used by nearly all programs on\nthe system.\n.\nThis package includes shared versions of the standard C library."
        );
        assert_eq!(
            f["conffiles"],
            "/etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab"
        );
        // The fields after a multi-line one are still read.
        assert_eq!(f["version"], "2.36-9+deb12u9");
        assert_eq!(f.len(), 13, "{f:?}");
    }

    #[test]
    fn a_broken_stanza_names_where_it_is() {
        let err = installed_packages("Package: a\nStatus: install ok installed\nVersion 1\n")
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("stanza at line 1") && err.contains("Version 1"),
            "{err}"
        );
        let err =
            installed_packages("Package: a\nStatus: install ok installed\nArchitecture: all\n")
                .unwrap_err();
        assert!(
            format!("{err:#}").contains("a: no `version` field"),
            "{err:#}"
        );
        let err = installed_packages(" leading continuation\n").unwrap_err();
        assert!(format!("{err:#}").contains("continuation"), "{err:#}");
    }

    #[test]
    fn an_empty_status_file_has_no_packages() {
        assert!(installed_packages("").unwrap().is_empty());
        assert!(installed_packages("\n\n").unwrap().is_empty());
    }
}
