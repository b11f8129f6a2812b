//! A small YAML emitter for the few documents kiln writes (k3s
//! `config.yaml`, `registries.yaml`). Block style; every string is
//! double-quoted with JSON escapes, which YAML reads the same way, so no
//! value can turn into a bool, a number or a comment by accident.

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Y {
    Str(String),
    Bool(bool),
    Int(i64),
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
        Y::List(l) if l.is_empty() => Some("[]".into()),
        Y::Map(m) if m.is_empty() => Some("{}".into()),
        _ => None,
    }
}

fn emit_map(map: &[(String, Y)], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in map {
        match (scalar(v), v) {
            (Some(s), _) => out.push_str(&format!("{pad}{}: {s}\n", key(k))),
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
}
