//! A small YAML emitter for the few documents kiln writes (k3s
//! `config.yaml`, `registries.yaml`, HelmCharts). Block style; every
//! string is double-quoted with JSON escapes, which YAML reads the same
//! way, so no value can turn into a bool, a number or a comment by
//! accident. The one exception is [`Y::Block`]: text that is itself a
//! YAML document (a HelmChart's `valuesContent`), written as a literal
//! block so it reads as YAML in the file.

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Y {
    Str(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Multi-line text as a literal block (`|`), falling back to a quoted
    /// string when a literal cannot hold it exactly.
    Block(String),
    List(Vec<Y>),
    Map(Vec<(String, Y)>),
}

impl Y {
    pub fn str(s: impl Into<String>) -> Y {
        Y::Str(s.into())
    }

    pub fn strs<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Y {
        Y::List(
            items
                .into_iter()
                .map(|s| Y::Str(s.as_ref().to_string()))
                .collect(),
        )
    }
}

/// Emit a top-level mapping.
pub fn to_string(map: &[(String, Y)]) -> String {
    let mut out = String::new();
    emit_map(map, 0, &mut out);
    out
}

fn key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
        && !k.starts_with(['-', '.'])
    {
        k.to_string()
    } else {
        scalar_str(k)
    }
}

fn scalar_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialize")
}

fn scalar(v: &Y) -> Option<String> {
    match v {
        Y::Str(s) => Some(scalar_str(s)),
        Y::Bool(b) => Some(b.to_string()),
        Y::Int(i) => Some(i.to_string()),
        Y::Float(f) => Some(float(*f)),
        Y::Block(s) if !block_ok(s) => Some(scalar_str(s)),
        Y::List(l) if l.is_empty() => Some("[]".into()),
        Y::Map(m) if m.is_empty() => Some("{}".into()),
        _ => None,
    }
}

/// A float as YAML 1.1 and 1.2 both read it: digits with a `.` or an
/// exponent, or `.inf`, `-.inf`, `.nan`.
fn float(f: f64) -> String {
    if f.is_nan() {
        ".nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { ".inf" } else { "-.inf" }.into()
    } else {
        // Debug keeps a `.0` or an exponent, so it never reads as an integer.
        format!("{f:?}")
    }
}

/// Can a literal block hold `s` exactly? Printable text (tabs and
/// newlines allowed) whose first non-empty line does not start with a
/// space (its indentation would be read as the block's).
fn block_ok(s: &str) -> bool {
    !s.trim().is_empty()
        && !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
        && !s
            .lines()
            .find(|l| !l.is_empty())
            .is_some_and(|l| l.starts_with([' ', '\t']))
}

/// `|`, `|-` or `|+` (how many final newlines to keep), then each line
/// at `indent`.
fn emit_block(s: &str, indent: usize, out: &mut String) {
    let body = s.trim_end_matches('\n');
    let newlines = s.len() - body.len();
    let chomp = match newlines {
        0 => "-",
        1 => "",
        _ => "+",
    };
    out.push_str(&format!("|{chomp}\n"));
    let pad = " ".repeat(indent);
    for l in body.split('\n') {
        if l.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&format!("{pad}{l}\n"));
        }
    }
    // Kept final newlines beyond the last line's own.
    out.push_str(&"\n".repeat(newlines.saturating_sub(1)));
}

fn emit_map(map: &[(String, Y)], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in map {
        match (scalar(v), v) {
            (Some(s), _) => out.push_str(&format!("{pad}{}: {s}\n", key(k))),
            (None, Y::Block(b)) => {
                out.push_str(&format!("{pad}{}: ", key(k)));
                emit_block(b, indent + 2, out);
            }
            (None, Y::List(l)) => {
                out.push_str(&format!("{pad}{}:\n", key(k)));
                emit_list(l, indent, out);
            }
            (None, Y::Map(m)) => {
                out.push_str(&format!("{pad}{}:\n", key(k)));
                emit_map(m, indent + 2, out);
            }
            (None, _) => unreachable!("scalars always emit"),
        }
    }
}

fn emit_list(list: &[Y], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for v in list {
        match (scalar(v), v) {
            (Some(s), _) => out.push_str(&format!("{pad}- {s}\n")),
            (None, Y::Block(b)) => {
                out.push_str(&format!("{pad}- "));
                emit_block(b, indent + 2, out);
            }
            (None, Y::Map(m)) => {
                let mut inner = String::new();
                emit_map(m, indent + 2, &mut inner);
                out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
            }
            (None, Y::List(l)) => {
                out.push_str(&format!("{pad}-\n"));
                emit_list(l, indent + 2, out);
            }
            (None, _) => unreachable!("scalars always emit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_parseable_yaml() {
        let doc = vec![
            ("token-file".to_string(), Y::str("/etc/rancher/k3s/token")),
            ("cluster-init".to_string(), Y::Bool(true)),
            (
                "tls-san".to_string(),
                Y::strs(["10.0.0.10", "yes", "#x: y"]),
            ),
            ("empty".to_string(), Y::List(vec![])),
            (
                "mirrors".to_string(),
                Y::Map(vec![(
                    "docker.io".into(),
                    Y::Map(vec![("endpoint".into(), Y::strs(["http://rgb1:5000"]))]),
                )]),
            ),
            (
                "list-of-maps".to_string(),
                Y::List(vec![Y::Map(vec![
                    ("a".into(), Y::Int(1)),
                    ("b".into(), Y::str("x")),
                ])]),
            ),
        ];
        let text = to_string(&doc);
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(v["cluster-init"], serde_yaml::Value::Bool(true));
        assert_eq!(v["tls-san"][1], serde_yaml::Value::String("yes".into()));
        assert_eq!(v["tls-san"][2], serde_yaml::Value::String("#x: y".into()));
        assert_eq!(
            v["mirrors"]["docker.io"]["endpoint"][0],
            serde_yaml::Value::String("http://rgb1:5000".into())
        );
        assert_eq!(
            v["list-of-maps"][0]["b"],
            serde_yaml::Value::String("x".into())
        );
        assert_eq!(v["empty"].as_sequence().unwrap().len(), 0);
    }

    #[test]
    fn floats_and_blocks_read_back_exactly() {
        let texts = [
            "a: 1\nb:\n  - \"x\"\n",
            "no final newline",
            "two\n\n",
            "inner\n\nblank\n",
            "  leading space\n",
            "tab\tinside\n",
            "bell\u{7}\n",
        ];
        let mut doc: Vec<(String, Y)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("t{i}"), Y::Block(t.to_string())))
            .collect();
        doc.push(("l".into(), Y::List(vec![Y::Block("x: 1\n".into())])));
        for (i, f) in [0.5, -2.0, 1e-7, 1e21, f64::INFINITY].iter().enumerate() {
            doc.push((format!("f{i}"), Y::Float(*f)));
        }
        let text = to_string(&doc);
        assert!(text.contains("t0: |\n  a: 1\n"), "{text}");
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(v[format!("t{i}").as_str()].as_str(), Some(*t), "{text}");
        }
        assert_eq!(v["l"][0].as_str(), Some("x: 1\n"));
        for (i, f) in [0.5, -2.0, 1e-7, 1e21, f64::INFINITY].iter().enumerate() {
            assert_eq!(v[format!("f{i}").as_str()].as_f64(), Some(*f), "{text}");
        }
    }
}
