//! Resolves `[[k3s.manifests]]` and `[[k3s.helm-charts]]`: what k3s
//! deploys from `server/manifests`, and on which servers (k3s reads that
//! directory on servers only, so naming an agent is an error).
//!
//! A manifest's YAML is checked here, so `kiln check` finds a broken one:
//! every document must parse and carry `apiVersion` and `kind`. The files
//! a manifest names are read by [`read_files`], the one I/O of planning
//! besides the profile itself; resolving is pure.

use std::io::Read as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, At, Role};

use super::NodePlan;

/// The largest manifest file kiln reads (Kubernetes stores no object
/// over about 1.5 MB anyway).
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// One file k3s deploys, `kiln-<name>.yaml` in `server/manifests`.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestPlan {
    pub name: String,
    /// The profile key it came from (`k3s.manifests[0]`), for the
    /// rendered file's header.
    pub key: String,
    pub source: ManifestSource,
    /// The servers that deploy it, in profile order.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ManifestSource {
    /// YAML as written, inline or read from `file` (resolved against the
    /// profile's directory).
    Yaml { text: String, file: Option<PathBuf> },
    /// A `HelmChart` resource kiln writes.
    Chart(HelmChartPlan),
}

/// The fields of a `helm.cattle.io/v1` `HelmChart` kiln sets.
#[derive(Debug, Clone, PartialEq)]
pub struct HelmChartPlan {
    pub repo: String,
    pub chart: String,
    pub version: String,
    /// `None`: the Helm controller installs into the HelmChart's own
    /// namespace, kube-system.
    pub target_namespace: Option<String>,
    pub create_namespace: bool,
    pub values: toml::Table,
}

impl ManifestPlan {
    pub fn deploys_on(&self, node: &NodePlan) -> bool {
        self.nodes.contains(&node.name)
    }
}

/// What reading each manifest's `file` gave (by index), or `None` for an
/// inline manifest.
pub(super) type ManifestFiles = Vec<Option<Result<String, String>>>;

/// Read every `file` the manifests name, relative to the profile's
/// directory: at most [`MAX_MANIFEST_BYTES`] of UTF-8 from a regular file.
/// Failures are kept, as text, for [`resolve_manifests`] to report.
pub(super) fn read_files(path: &Path, k: &profile::K3s) -> ManifestFiles {
    k.manifests
        .iter()
        .map(|m| m.file.as_ref().map(|f| read_one(&resolve_path(path, &f.v))))
        .collect()
}

fn resolve_path(profile: &Path, file: &Path) -> PathBuf {
    profile.parent().unwrap_or(Path::new(".")).join(file)
}

fn read_one(p: &Path) -> Result<String, String> {
    // stat first: opening a FIFO would block.
    let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!("larger than {} KiB", MAX_MANIFEST_BYTES / 1024));
    }
    String::from_utf8(bytes)
        .map_err(|e| format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

/// Every manifest and chart, in profile order (manifests first).
pub(super) fn resolve_manifests(
    path: &Path,
    k: &profile::K3s,
    files: &ManifestFiles,
    nodes: &[NodePlan],
    d: &mut Diagnostics,
) -> Vec<ManifestPlan> {
    let mut out = Vec::new();
    let mut names: Vec<&At<String>> = Vec::new();
    for (m, file) in k.manifests.iter().zip(files) {
        let source = resolve_yaml(path, m, file.as_ref(), d);
        let plan = entry(
            &m.key,
            m.span.clone(),
            m.name.as_ref(),
            m.nodes.as_deref(),
            nodes,
            &mut names,
            d,
        );
        if let (Some((name, nodes)), Some(source)) = (plan, source) {
            out.push(ManifestPlan {
                name,
                key: m.key.clone(),
                source,
                nodes,
            });
        }
    }
    for c in &k.helm_charts {
        let chart = resolve_chart(c, d);
        let plan = entry(
            &c.key,
            c.span.clone(),
            c.name.as_ref(),
            c.nodes.as_deref(),
            nodes,
            &mut names,
            d,
        );
        if let (Some((name, nodes)), Some(chart)) = (plan, chart) {
            out.push(ManifestPlan {
                name,
                key: c.key.clone(),
                source: ManifestSource::Chart(chart),
                nodes,
            });
        }
    }
    out
}

/// The name (required, unique among manifests and charts) and the
/// servers of one entry.
fn entry<'p>(
    key: &str,
    span: Range<usize>,
    name: Option<&'p At<String>>,
    wanted: Option<&[At<String>]>,
    nodes: &[NodePlan],
    names: &mut Vec<&'p At<String>>,
    d: &mut Diagnostics,
) -> Option<(String, Vec<String>)> {
    let servers = resolve_servers(key, span.clone(), wanted, nodes, d);
    let Some(name) = name else {
        d.missing(
            span,
            &format!("{key}.name"),
            "missing required key `name`",
            "add `name = \"registry\"`: the file is kiln-<name>.yaml",
        );
        return None;
    };
    if let Some(first) = names.iter().find(|n| n.v == name.v) {
        d.error(
            name.span.clone(),
            &name.key,
            format!("`{}` is already the name of {} (line {})", name.v, first.key.trim_end_matches(".name"), d.line_of(first.span.start)),
            "give every manifest and Helm chart its own name: each becomes server/manifests/kiln-<name>.yaml",
        );
        return None;
    }
    names.push(name);
    Some((name.v.clone(), servers?))
}

/// The servers an entry names, or every server; an agent, an unknown
/// node or an empty list is an error.
fn resolve_servers(
    key: &str,
    span: Range<usize>,
    wanted: Option<&[At<String>]>,
    nodes: &[NodePlan],
    d: &mut Diagnostics,
) -> Option<Vec<String>> {
    let servers = || nodes.iter().filter(|n| n.role == Role::Server);
    let Some(wanted) = wanted else {
        return Some(servers().map(|n| n.name.clone()).collect());
    };
    if wanted.is_empty() {
        d.error(
            span,
            &format!("{key}.nodes"),
            "`nodes = []` deploys it nowhere",
            "remove `nodes` to deploy it from every server, or name the servers",
        );
        return None;
    }
    let mut ok = true;
    for w in wanted {
        match nodes.iter().find(|n| n.name == w.v) {
            Some(n) if n.role == Role::Server => {}
            Some(_) => {
                ok = false;
                d.error(w.span.clone(), &w.key, format!("`{}` is an agent: k3s deploys manifests from servers only", w.v), "name a server; to run a workload on this node, pin it in the manifest (a nodeSelector)");
            }
            None => {
                ok = false;
                let names: Vec<&str> = servers().map(|n| n.name.as_str()).collect();
                d.error(
                    w.span.clone(),
                    &w.key,
                    format!("no node `{}` in the profile", w.v),
                    format!("name one of the servers: {}", names.join(", ")),
                );
            }
        }
    }
    ok.then(|| {
        servers()
            .filter(|n| wanted.iter().any(|w| w.v == n.name))
            .map(|n| n.name.clone())
            .collect()
    })
}

/// A `[[k3s.manifests]]` entry's YAML, from `content` or `file`, checked.
fn resolve_yaml(
    path: &Path,
    m: &profile::Manifest,
    file: Option<&Result<String, String>>,
    d: &mut Diagnostics,
) -> Option<ManifestSource> {
    match (&m.content, &m.file, file) {
        (Some(c), Some(_), _) => {
            d.error(
                c.span.clone(),
                &c.key,
                "both `content` and `file` are set",
                "keep one: the YAML inline in `content`, or a `file` next to the profile",
            );
            None
        }
        (None, None, _) => {
            d.missing(
                m.span.clone(),
                &format!("{}.content", m.key),
                "a manifest needs `content` or `file`",
                "add `file = \"registry.yaml\"` (next to the profile) or `content = '''...'''`",
            );
            None
        }
        (Some(c), None, _) => {
            let at = content_start(d.source(), &c.span, &c.v);
            if let Err(p) = check_yaml(&c.v) {
                let offset = at.zip(p.offset).map_or(c.span.start, |(a, o)| a + o);
                d.error(
                    offset..offset + 1,
                    &c.key,
                    format!("{} of this manifest: {}", p.place, p.message),
                    "fix the YAML; every document needs `apiVersion` and `kind`",
                );
                return None;
            }
            Some(ManifestSource::Yaml {
                text: c.v.clone(),
                file: None,
            })
        }
        (None, Some(f), Some(read)) => {
            let shown = resolve_path(path, &f.v);
            let text = match read {
                Ok(t) => t,
                Err(e) => {
                    d.error(f.span.clone(), &f.key, format!("cannot read `{}`: {e}", shown.display()), format!("the path is relative to the profile's directory; check that `{}` is there and readable", shown.display()));
                    return None;
                }
            };
            if let Err(p) = check_yaml(text) {
                d.error(
                    f.span.clone(),
                    &f.key,
                    format!("`{}`, {}: {}", shown.display(), p.place, p.message),
                    format!(
                        "fix the YAML in `{}`; every document needs `apiVersion` and `kind`",
                        shown.display()
                    ),
                );
                return None;
            }
            Some(ManifestSource::Yaml {
                text: text.clone(),
                file: Some(shown),
            })
        }
        (None, Some(_), None) => unreachable!("read_files reads every file"),
    }
}

/// A `[[k3s.helm-charts]]` entry, its required keys present.
fn resolve_chart(c: &profile::HelmChart, d: &mut Diagnostics) -> Option<HelmChartPlan> {
    let mut need = |v: &Option<At<String>>, k: &str, example: &str| {
        if v.is_none() {
            d.missing(
                c.span.clone(),
                &format!("{}.{k}", c.key),
                format!("missing required key `{k}`"),
                format!("add `{k} = {example}`"),
            );
        }
        v.as_ref().map(|a| a.v.clone())
    };
    let repo = need(
        &c.repo,
        "repo",
        "\"https://charts.example.org\" (the chart repository)",
    );
    let chart = need(
        &c.chart,
        "chart",
        "\"system-upgrade-controller\" (the chart's name in the repository)",
    );
    let version = need(
        &c.version,
        "version",
        "\"1.2.3\" (one version: an image holds one set of charts)",
    );
    Some(HelmChartPlan {
        repo: repo?,
        chart: chart?,
        version: version?,
        target_namespace: c.target_namespace.as_ref().map(|a| a.v.clone()),
        create_namespace: c.create_namespace.as_ref().is_none_or(|a| a.v),
        values: c.values.as_ref().map(|a| a.v.clone()).unwrap_or_default(),
    })
}

/// Where in a manifest's YAML something is wrong.
#[derive(Debug, PartialEq)]
struct YamlProblem {
    /// Byte offset into the YAML, when known.
    offset: Option<usize>,
    /// "line 3, column 8" or "document 2".
    place: String,
    message: String,
}

/// Does `text` parse as YAML, every (non-empty) document a mapping with
/// string `apiVersion` and `kind`, and at least one document?
fn check_yaml(text: &str) -> Result<(), YamlProblem> {
    let starts = document_starts(text);
    let mut documents = 0;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| {
            let loc = e.location();
            let mut message = e.to_string();
            if let Some(at) = message.rfind(" at line ").filter(|_| loc.is_some()) {
                message.truncate(at);
            }
            YamlProblem {
                offset: loc.as_ref().map(|l| l.index()),
                place: loc.map_or(format!("document {}", i + 1), |l| {
                    format!("line {}, column {}", l.line(), l.column())
                }),
                message,
            }
        })?;
        let at = |message: String| YamlProblem {
            offset: starts.get(i).copied(),
            place: format!("document {}", i + 1),
            message,
        };
        match &value {
            serde_yaml::Value::Null => continue,
            serde_yaml::Value::Mapping(m) => {
                let missing: Vec<&str> = ["apiVersion", "kind"]
                    .into_iter()
                    .filter(|k| m.get(*k).and_then(|v| v.as_str()).is_none_or(str::is_empty))
                    .collect();
                if !missing.is_empty() {
                    return Err(at(format!(
                        "`{}` missing or not a string: k3s cannot tell what to create",
                        missing.join("` and `")
                    )));
                }
            }
            _ => {
                return Err(at(
                    "a document is not a mapping (a Kubernetes object)".into()
                ));
            }
        }
        documents += 1;
    }
    if documents == 0 {
        return Err(YamlProblem {
            offset: None,
            place: "document 1".into(),
            message: "no Kubernetes object: the YAML is empty".into(),
        });
    }
    Ok(())
}

/// Where each YAML document begins (best effort, to point at a document
/// with a missing key): at its `---` line, or at the first content
/// before any marker.
fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_end_matches(['\n', '\r']);
        let marker = t == "---" || t.starts_with("--- ") || t.starts_with("---\t");
        let prologue = t.trim().is_empty() || t.starts_with('#') || t.starts_with('%');
        if marker || (starts.is_empty() && !prologue) {
            starts.push(offset);
        }
        offset += line.len();
    }
    starts
}

/// Where `content`'s characters start in the profile, when its TOML
/// literal holds them verbatim (a `'''` or `'` literal, or a `"""`/`"`
/// string without escapes): then an offset into the YAML is one into
/// the profile.
fn content_start(source: &str, span: &Range<usize>, content: &str) -> Option<usize> {
    let raw = source.get(span.clone())?;
    for delim in ["'''", "\"\"\"", "'", "\""] {
        if let Some(inner) = raw.strip_prefix(delim).and_then(|r| r.strip_suffix(delim)) {
            let skip = if delim.len() == 3 {
                if inner.starts_with("\r\n") {
                    2
                } else {
                    usize::from(inner.starts_with('\n'))
                }
            } else {
                0
            };
            return (&inner[skip..] == content).then_some(span.start + delim.len() + skip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_need_api_version_and_kind() {
        assert_eq!(
            check_yaml("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n"),
            Ok(())
        );
        assert_eq!(
            check_yaml("---\napiVersion: v1\nkind: A\n---\napiVersion: v1\nkind: B\n---\n"),
            Ok(())
        );
        let p =
            check_yaml("apiVersion: v1\nkind: A\n---\napiVersion: v1\nmetadata: {}\n").unwrap_err();
        assert_eq!(p.place, "document 2");
        assert_eq!(p.offset, Some(23));
        assert!(p.message.starts_with("`kind` missing"), "{p:?}");
        let p =
            check_yaml("apiVersion: v1\nkind: A\nmetadata:\n  name: x\n   bad: [\n").unwrap_err();
        assert!(p.place.starts_with("line 5"), "{p:?}");
        assert!(!p.message.contains(" at line "), "{p:?}");
        assert!(check_yaml("# only a comment\n").is_err());
        assert!(
            check_yaml("- a\n- b\n")
                .unwrap_err()
                .message
                .contains("not a mapping")
        );
        assert!(
            check_yaml("apiVersion: 1\nkind: A\n").is_err(),
            "apiVersion must be a string"
        );
    }

    #[test]
    fn content_maps_into_the_profile_only_when_verbatim() {
        let src = "content = '''\nkind: A\n'''\n";
        let span = 10..src.len() - 1;
        assert_eq!(content_start(src, &span, "kind: A\n"), Some(14));
        let src = "content = \"kind: A\\n\"\n";
        assert_eq!(content_start(src, &(10..src.len() - 1), "kind: A\n"), None);
        let src = "content = \"kind: A\"\n";
        assert_eq!(
            content_start(src, &(10..src.len() - 1), "kind: A"),
            Some(11)
        );
    }
}
