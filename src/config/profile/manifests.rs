//! `[[k3s.manifests]]` and `[[k3s.helm-charts]]` as written: what k3s
//! deploys from `server/manifests` on its servers. Names and URLs are
//! checked here; whether a manifest is YAML, which nodes deploy it and
//! whether a `file` exists is the plan's business (`plan/manifests.rs`).

use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;
use toml::de::DeValue;

use super::{At, K3s, Tab, inv};
use crate::config::diag::Diagnostics;
use crate::config::types::{self, Invalid};

/// The longest name of a manifest or chart: a Helm release name (53),
/// which also keeps `kiln-<name>` one DNS label.
pub const MAX_NAME_CHARS: usize = 53;

/// `[[k3s.manifests]]`: a Kubernetes manifest, inline or from a file.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub span: Range<usize>,
    pub key: String,
    pub name: Option<At<String>>,
    pub content: Option<At<String>>,
    /// As written: relative to the profile's directory unless absolute.
    pub file: Option<At<PathBuf>>,
    /// Servers that deploy it; `None`: every server.
    pub nodes: Option<Vec<At<String>>>,
}

/// `[[k3s.helm-charts]]`: a HelmChart resource for k3s's Helm controller.
#[derive(Debug, Clone)]
pub struct HelmChart {
    pub span: Range<usize>,
    pub key: String,
    pub name: Option<At<String>>,
    pub repo: Option<At<String>>,
    pub chart: Option<At<String>>,
    pub version: Option<At<String>>,
    pub target_namespace: Option<At<String>>,
    pub create_namespace: Option<At<bool>>,
    /// The chart's values, in the order written.
    pub values: Option<At<toml::Table>>,
    pub nodes: Option<Vec<At<String>>>,
}

/// Read both arrays of `[k3s]` into `out`.
pub(super) fn read(k: &mut Tab, d: &mut Diagnostics, out: &mut K3s) {
    for (i, (mut m, span)) in k
        .array_of_tables(d, "manifests")
        .map(|x| x.0)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        out.manifests.push(Manifest {
            span,
            key: format!("k3s.manifests[{i}]"),
            name: m.parse(d, "name", parse_name),
            content: m.str(d, "content"),
            file: m.str(d, "file").map(|a| a.map(PathBuf::from)),
            nodes: m.str_list(d, "nodes"),
        });
        m.finish(d);
    }
    for (i, (mut c, span)) in k
        .array_of_tables(d, "helm-charts")
        .map(|x| x.0)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        out.helm_charts.push(HelmChart {
            span,
            key: format!("k3s.helm-charts[{i}]"),
            name: c.parse(d, "name", parse_name),
            repo: c.parse(d, "repo", parse_repo),
            chart: c.parse(d, "chart", parse_chart),
            version: c.parse(d, "version", parse_version),
            target_namespace: c.parse(d, "target-namespace", |s| types::parse_k8s_name(s, 63)),
            create_namespace: c.bool(d, "create-namespace"),
            values: read_values(&mut c, d),
            nodes: c.str_list(d, "nodes"),
        });
        c.finish(d);
    }
}

fn parse_name(s: &str) -> Result<String, Invalid> {
    types::parse_k8s_name(s, MAX_NAME_CHARS)
}

fn parse_repo(s: &str) -> Result<String, Invalid> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    let host = rest.map(|r| r.split(['/', ':']).next().unwrap_or(""));
    if host.is_some_and(|h| types::Host::parse(h).is_ok())
        && !s.contains(|c: char| c.is_whitespace() || c.is_control())
    {
        Ok(s.to_string())
    } else {
        Err(inv(
            format!("`{}` is not a Helm repository URL", s.escape_debug()),
            "write the repository's http:// or https:// URL, as `helm repo add` takes it",
        ))
    }
}

fn parse_chart(s: &str) -> Result<String, Invalid> {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
    {
        Ok(s.to_string())
    } else {
        Err(inv(
            format!("`{}` is not a chart name", s.escape_debug()),
            "write the chart's name in the repository, like \"system-upgrade-controller\"",
        ))
    }
}

fn parse_version(s: &str) -> Result<String, Invalid> {
    if !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.+".contains(&c))
    {
        Ok(s.to_string())
    } else {
        Err(inv(
            format!("`{}` is not a chart version", s.escape_debug()),
            "pin one version, like \"1.2.3\": an image holds one set of charts",
        ))
    }
}

/// `values`: any TOML table, kept as written (order included).
fn read_values(c: &mut Tab, d: &mut Diagnostics) -> Option<At<toml::Table>> {
    let v = c.get("values")?;
    let key = c.child_path("values");
    match v.get_ref() {
        DeValue::Table(_) => match to_value(c, d, &key, v)? {
            toml::Value::Table(t) => Some(At {
                v: t,
                span: v.span(),
                key,
            }),
            _ => None,
        },
        _ => {
            c.wrong_type(d, "values", v, "a table");
            None
        }
    }
}

/// A TOML value as an owned [`toml::Value`]; `None` (reported) for an
/// integer or float no 64-bit type holds.
fn to_value(c: &Tab, d: &mut Diagnostics, key: &str, v: &Spanned<DeValue>) -> Option<toml::Value> {
    use toml::Value;
    Some(match v.get_ref() {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(_) => Value::Integer(c.int_value(d, key, v, "-2^63 to 2^63-1")?.v),
        DeValue::Float(f) => {
            let text = f.as_str().replace('_', "");
            match text.trim_start_matches(['+', '-']) {
                "nan" => Value::Float(f64::NAN),
                _ => match text.parse::<f64>() {
                    Ok(x) => Value::Float(x),
                    Err(_) => {
                        d.error(
                            v.span(),
                            key,
                            format!("{text} is not a 64-bit float"),
                            "write a smaller number",
                        );
                        return None;
                    }
                },
            }
        }
        DeValue::Boolean(b) => Value::Boolean(*b),
        DeValue::Datetime(t) => Value::Datetime(*t),
        DeValue::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, e)| to_value(c, d, &format!("{key}[{i}]"), e))
                .collect::<Option<Vec<_>>>()?,
        ),
        DeValue::Table(t) => {
            let mut out = toml::Table::new();
            for (k, e) in t.iter() {
                let name = k.get_ref().to_string();
                let child = format!("{key}.{}", super::quote_key(&name));
                out.insert(name, to_value(c, d, &child, e)?);
            }
            Value::Table(out)
        }
    })
}
