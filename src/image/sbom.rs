//! `sbom.cdx.json`, written beside `manifest.json`: what software the root
//! images hold, as a CycloneDX 1.5 JSON SBOM. Its components are every
//! Debian package installed in the base (from its dpkg status,
//! [`crate::inputs::dpkg`]) and the k3s binary, with package URLs
//! (`pkg:deb/debian/NAME@VERSION?arch=ARCH`, the package-url spec's `deb`
//! type) so scanners can match them against Debian's security tracker,
//! and, when the roots carry it, `kiln-relay` (its sha256, no URL).
//! Overlays add files, not packages, so one SBOM covers every role.
//!
//! Written with `cyclonedx-bom` (the CycloneDX project's own Rust crate:
//! typed models for spec 1.3 to 1.5, a validator). Its weight was checked
//! with `cargo tree`: besides itself, 13 small crates new to kiln's build
//! (purl, spdx's license list, xml-rs, uuid, strum, fluent-uri, a second
//! base64, …); regex, time, serde and indexmap were already in it.
//! Reasonable for the format most OS and container scanners read, so the
//! SPDX fallback was not needed. `purl` (already one of them) is used
//! directly: `cyclonedx-bom`'s own constructor takes no qualifiers.
//!
//! Deterministic: the same inputs give the same bytes, like
//! `manifest.json`. Components are sorted (k3s, kiln-relay, then the
//! packages by name, architecture and version); the timestamp is
//! `SOURCE_DATE_EPOCH`; the serial number is a UUID made from a digest of
//! the inputs ([`serial`]), not a random one.

use anyhow::Context as _;
use cyclonedx_bom::external_models::normalized_string::NormalizedString;
use cyclonedx_bom::external_models::uri::Purl;
use cyclonedx_bom::models::bom::{Bom, SpecVersion, UrnUuid};
use cyclonedx_bom::models::component::{Classification, Component, Components};
use cyclonedx_bom::models::hash::{Hash, HashAlgorithm, HashValue, Hashes};
use cyclonedx_bom::models::metadata::Metadata;
use cyclonedx_bom::models::property::{Properties, Property};
use cyclonedx_bom::models::tool::Tools;
use cyclonedx_bom::prelude::DateTime;
use sha2::{Digest as _, Sha256};

use crate::inputs::dpkg::DebPackage;

/// The file name in a build output (`.cdx.json`: CycloneDX's
/// recommended suffix for JSON BOMs).
pub const FILE: &str = "sbom.cdx.json";

/// The CycloneDX version written.
pub const SPEC_VERSION: SpecVersion = SpecVersion::V1_5;

/// What the SBOM is made from; everything in it comes from here.
#[derive(Debug, Clone)]
pub struct SbomInputs<'a> {
    pub cluster: &'a str,
    pub kiln_version: &'a str,
    pub source_date_epoch: u64,
    /// sha256 of the base tarball the packages were read from.
    pub base_sha256: &'a str,
    /// Sorted, as [`crate::inputs::dpkg::installed_packages`] returns them.
    pub packages: &'a [DebPackage],
    pub k3s_version: &'a str,
    pub k3s_sha256: &'a str,
    /// `kiln-relay`'s version and sha256, when the roots carry it.
    pub relay: Option<(&'a str, &'a str)>,
}

/// The SBOM's bytes: pretty JSON and a newline.
pub fn render_sbom(i: &SbomInputs) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    sbom(i)?
        .output_as_json_v1_5(&mut out)
        .context("writing the SBOM as CycloneDX 1.5 JSON")?;
    out.push(b'\n');
    Ok(out)
}

/// The SBOM as the crate's model.
pub fn sbom(i: &SbomInputs) -> anyhow::Result<Bom> {
    let mut components = vec![k3s_component(i)?];
    if let Some((version, sha256)) = i.relay {
        components.push(relay_component(version, sha256));
    }
    for p in i.packages {
        components.push(deb_component(p)?);
    }
    Ok(Bom {
        version: 1,
        serial_number: Some(
            UrnUuid::new(serial(i))
                .map_err(|e| anyhow::anyhow!("the SBOM's serial number: {e:?}"))?,
        ),
        metadata: Some(metadata(i)?),
        components: Some(Components(components)),
        services: None,
        external_references: None,
        dependencies: None,
        compositions: None,
        properties: None,
        vulnerabilities: None,
        signature: None,
        annotations: None,
        formulation: None,
        spec_version: SPEC_VERSION,
    })
}

/// `urn:uuid:…` from a sha256 of the inputs: a UUID of version 8
/// ("custom", RFC 9562 section 5.8) with the RFC's variant bits. The base
/// sha256 stands for its packages.
pub fn serial(i: &SbomInputs) -> String {
    let mut text = format!(
        "kiln-sbom 1\ncluster {}\nkiln {}\nsource-date-epoch {}\nbase-sha256 {}\nk3s {}\nk3s-sha256 {}\n",
        i.cluster, i.kiln_version, i.source_date_epoch, i.base_sha256, i.k3s_version, i.k3s_sha256
    );
    if let Some((version, sha256)) = i.relay {
        text.push_str(&format!(
            "kiln-relay {version}\nkiln-relay-sha256 {sha256}\n"
        ));
    }
    let mut b: [u8; 16] = Sha256::digest(text.as_bytes())[..16]
        .try_into()
        .expect("16 bytes of a sha256");
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Timestamp, the tool, and the subject: the root of the cluster's images.
fn metadata(i: &SbomInputs) -> anyhow::Result<Metadata> {
    let mut kiln = Component::new(Classification::Application, "kiln", i.kiln_version, None);
    kiln.description = Some(NormalizedString::new("builds the images"));
    let mut subject = Component::new(
        Classification::OperatingSystem,
        i.cluster,
        "",
        Some("kiln-root".into()),
    );
    subject.version = None;
    subject.description = Some(NormalizedString::new(&format!(
        "the root file system of cluster {}'s node images",
        i.cluster
    )));
    subject.properties = Some(Properties(vec![Property::new(
        "kiln:base-sha256",
        i.base_sha256,
    )]));
    Ok(Metadata {
        timestamp: Some(timestamp(i.source_date_epoch)?),
        tools: Some(Tools::Object {
            services: None,
            components: Some(Components(vec![kiln])),
        }),
        component: Some(subject),
        ..Metadata::default()
    })
}

/// `SOURCE_DATE_EPOCH` as an ISO 8601 UTC time.
fn timestamp(epoch: u64) -> anyhow::Result<DateTime> {
    let t = time::OffsetDateTime::from_unix_timestamp(epoch.try_into()?)
        .with_context(|| format!("SOURCE_DATE_EPOCH {epoch} is not a date"))?;
    let text = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    DateTime::try_from(text).context("SOURCE_DATE_EPOCH as an SBOM timestamp")
}

/// k3s: version, sha256, and the release it comes from.
fn k3s_component(i: &SbomInputs) -> anyhow::Result<Component> {
    let purl = purl::GenericPurlBuilder::new(String::from("github"), "k3s")
        .with_namespace("k3s-io")
        .with_version(i.k3s_version)
        .build()
        .context("the package URL of k3s")?
        .to_string();
    let mut c = Component::new(
        Classification::Application,
        "k3s",
        i.k3s_version,
        Some(purl.clone()),
    );
    // `Purl::new` takes no qualifiers; its `FromStr` keeps the text.
    c.purl = purl.parse::<Purl>().ok();
    c.hashes = Some(Hashes(vec![Hash {
        alg: HashAlgorithm::SHA_256,
        content: HashValue(i.k3s_sha256.to_string()),
    }]));
    Ok(c)
}

/// kiln-relay, built with kiln (no package URL: it is published nowhere).
fn relay_component(version: &str, sha256: &str) -> Component {
    let mut c = Component::new(Classification::Application, "kiln-relay", version, None);
    c.description = Some(NormalizedString::new(
        "WireGuard's UDP over TCP to the hub, built with kiln",
    ));
    c.hashes = Some(Hashes(vec![Hash {
        alg: HashAlgorithm::SHA_256,
        content: HashValue(sha256.to_string()),
    }]));
    c
}

/// A Debian package: `pkg:deb/debian/NAME@VERSION?arch=ARCH`, with its
/// architecture and source package as properties too.
fn deb_component(p: &DebPackage) -> anyhow::Result<Component> {
    let purl = deb_purl(p)?;
    let mut c = Component::new(
        Classification::Library,
        &p.name,
        &p.version,
        Some(purl.clone()),
    );
    c.purl = purl.parse::<Purl>().ok();
    let mut props = vec![Property::new("kiln:deb:architecture", &p.architecture)];
    if let Some(s) = &p.source {
        props.push(Property::new("kiln:deb:source", &s.name));
        if let Some(v) = &s.version {
            props.push(Property::new("kiln:deb:source-version", v));
        }
    }
    c.properties = Some(Properties(props));
    Ok(c)
}

/// The package URL of a Debian package (percent-encoded as the spec says).
pub fn deb_purl(p: &DebPackage) -> anyhow::Result<String> {
    Ok(
        purl::GenericPurlBuilder::new(String::from("deb"), p.name.as_str())
            .with_namespace("debian")
            .with_version(p.version.as_str())
            .with_qualifier("arch", p.architecture.as_str())
            .with_context(|| format!("the architecture of {}", p.name))?
            .build()
            .with_context(|| format!("the package URL of {} {}", p.name, p.version))?
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::dpkg::SourcePackage;
    use cyclonedx_bom::validation::Validate as _;

    fn package(name: &str, version: &str, arch: &str) -> DebPackage {
        DebPackage {
            name: name.into(),
            version: version.into(),
            architecture: arch.into(),
            source: None,
        }
    }

    fn packages() -> Vec<DebPackage> {
        let mut bsdutils = package("bsdutils", "1:2.38.1-5+b1", "amd64");
        bsdutils.source = Some(SourcePackage {
            name: "util-linux".into(),
            version: Some("2.38.1-5".into()),
        });
        vec![
            bsdutils,
            package("ca-certificates", "20230311", "all"),
            package("libc6", "2.36-9+deb12u9", "amd64"),
        ]
    }

    fn inputs(packages: &[DebPackage]) -> SbomInputs<'_> {
        SbomInputs {
            cluster: "lab",
            kiln_version: "0.1.0",
            source_date_epoch: 1_735_689_600,
            base_sha256: "b".repeat(64).leak(),
            packages,
            k3s_version: "v1.31.1+k3s1",
            k3s_sha256: "a".repeat(64).leak(),
            relay: None,
        }
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let p = packages();
        let one = render_sbom(&inputs(&p)).unwrap();
        assert_eq!(one, render_sbom(&inputs(&p)).unwrap());
        let text = String::from_utf8(one).unwrap();
        assert!(text.ends_with("}\n"));
        assert!(
            text.contains("\"timestamp\": \"2025-01-01T00:00:00Z\""),
            "{text}"
        );
        // Another input, another serial number.
        let mut other = inputs(&p);
        other.k3s_sha256 = "c".repeat(64).leak();
        assert_ne!(serial(&other), serial(&inputs(&p)));
        let s = serial(&inputs(&p));
        assert_eq!(s.len(), "urn:uuid:".len() + 36, "{s}");
        assert_eq!(&s[23..24], "8", "UUID version 8: {s}");
        assert!("89ab".contains(&s[28..29]), "RFC 9562 variant: {s}");
    }

    #[test]
    fn it_is_valid_cyclonedx_1_5_listing_k3s_then_every_package() {
        let p = packages();
        let bytes = render_sbom(&inputs(&p)).unwrap();
        let bom = Bom::parse_from_json_v1_5(bytes.as_slice()).unwrap();
        let result = bom.validate_version(SpecVersion::V1_5);
        assert!(result.passed(), "{result:?}");
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["bomFormat"], "CycloneDX");
        assert_eq!(json["specVersion"], "1.5");
        let listed: Vec<(String, String, String)> = json["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("name"), s("version"), s("purl"))
            })
            .collect();
        let want = [
            ("k3s", "v1.31.1+k3s1", "pkg:github/k3s-io/k3s@v1.31.1+k3s1"),
            (
                "bsdutils",
                "1:2.38.1-5+b1",
                "pkg:deb/debian/bsdutils@1:2.38.1-5+b1?arch=amd64",
            ),
            (
                "ca-certificates",
                "20230311",
                "pkg:deb/debian/ca-certificates@20230311?arch=all",
            ),
            (
                "libc6",
                "2.36-9+deb12u9",
                "pkg:deb/debian/libc6@2.36-9+deb12u9?arch=amd64",
            ),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
        assert_eq!(listed, want);
        let k3s = &json["components"][0];
        assert_eq!(k3s["hashes"][0]["alg"], "SHA-256");
        assert_eq!(k3s["hashes"][0]["content"], "a".repeat(64));
        let props = &json["components"][1]["properties"];
        assert_eq!(
            props,
            &serde_json::json!([
                { "name": "kiln:deb:architecture", "value": "amd64" },
                { "name": "kiln:deb:source", "value": "util-linux" },
                { "name": "kiln:deb:source-version", "value": "2.38.1-5" },
            ])
        );
    }

    #[test]
    fn a_fake_base_tarball_gives_its_installed_packages() {
        let dir = tempfile::tempdir().unwrap();
        let status = "Package: zlib1g\nStatus: install ok installed\nArchitecture: amd64\nSource: zlib\nVersion: 1:1.2.13.dfsg-1\nDescription: compression library\n runtime\n\nPackage: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\nPackage: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4+deb12u9\n";
        let tarball = crate::inputs::kernel::fake_base_tarball(dir.path(), Some(status));
        let files = crate::inputs::kernel::read_base_files(&tarball, &[]).unwrap();
        let p =
            crate::inputs::dpkg::installed_packages(files.dpkg_status.as_deref().unwrap()).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&render_sbom(&inputs(&p)).unwrap()).unwrap();
        let purls: Vec<&str> = json["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["purl"].as_str().unwrap())
            .collect();
        assert_eq!(
            purls,
            [
                "pkg:github/k3s-io/k3s@v1.31.1+k3s1",
                "pkg:deb/debian/base-files@12.4+deb12u9?arch=amd64",
                "pkg:deb/debian/zlib1g@1:1.2.13.dfsg-1?arch=amd64",
            ]
        );
    }
}
