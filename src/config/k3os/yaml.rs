//! A k3os `config.yaml` read into a small tree that remembers the file
//! and line of every value, so each note and error can point at it.
//!
//! Scalars stay text, as k3os turned them into strings itself (its
//! `sysctl`, `labels` and lists are strings; `permissions: 0755` unquoted
//! is the mode 0755, not the number 493). Anchors and aliases are
//! resolved, `<<` merge keys applied, `!!binary` remembered (a
//! `write_files` content may be binary). A key given twice in one mapping
//! is an error, as it was for k3os's YAML reader.

use std::collections::HashMap;
use std::rc::Rc;

use anyhow::bail;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Where a value was written: file (as named on the command line) and
/// line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub file: Rc<str>,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub at: Origin,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone)]
pub struct Scalar {
    pub text: String,
    /// Written without quotes or block indicator (`~`, `null` and nothing
    /// at all then mean no value).
    pub plain: bool,
    /// Tagged `!!binary`: `text` is base64 of the bytes.
    pub binary: bool,
}

/// A mapping key as written, and where.
#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub at: Origin,
    /// Came in through a `<<` merge: a key written in the mapping replaces it.
    pub merged: bool,
}

impl Node {
    /// A plain `~`, `null` or empty scalar: the key is as good as absent.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s) if s.plain && matches!(s.text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(_) => "a single value",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// What the first document of `text` holds (an empty file is an empty
/// mapping), and whether more documents followed (k3os read only the
/// first). A syntax error names the file, line and column.
pub fn parse(file: &str, text: &str) -> anyhow::Result<(Node, bool)> {
    let file: Rc<str> = Rc::from(file);
    let mut b = Builder {
        file: file.clone(),
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        documents: 0,
        error: None,
    };
    if let Err(e) = Parser::new_from_str(text).load(&mut b, true) {
        let m = e.marker();
        bail!(
            "{file}:{}:{}: YAML syntax: {}\n    fix: correct the YAML at that line (k3os could not have read this file either)",
            m.line(),
            m.col() + 1,
            e.info()
        );
    }
    if let Some(e) = b.error {
        bail!("{e}");
    }
    let root = b.root.unwrap_or(Node {
        at: Origin { file, line: 1 },
        value: Value::Map(Vec::new()),
    });
    Ok((root, b.documents > 1))
}

/// Collections being built, innermost last; a mapping keeps the key that
/// waits for its value.
enum Open {
    Seq(Node, usize),
    Map(Node, usize, Option<Key>),
}

struct Builder {
    file: Rc<str>,
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    error: Option<String>,
}

impl Builder {
    fn at(&self, m: Marker) -> Origin {
        Origin {
            file: self.file.clone(),
            line: m.line(),
        }
    }

    /// A finished value: into its parent, or the root.
    fn done(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let problem = match self.stack.last_mut() {
            None => {
                if self.documents == 1 {
                    self.root = Some(node);
                }
                None
            }
            Some(Open::Seq(seq, _)) => {
                if let Value::Seq(items) = &mut seq.value {
                    items.push(node);
                }
                None
            }
            Some(Open::Map(map, _, pending)) => add_to_map(map, pending, node),
        };
        if let Some((at, what)) = problem {
            self.fail(&at, &what);
        }
    }

    fn fail(&mut self, at: &Origin, what: &str) {
        if self.error.is_none() {
            self.error = Some(format!(
                "{at}: {what}\n    fix: correct the YAML at that line"
            ));
        }
    }
}

/// A key (when none waits) or the value of the waiting key; a problem
/// with where it is.
fn add_to_map(map: &mut Node, pending: &mut Option<Key>, node: Node) -> Option<(Origin, String)> {
    let Some(key) = pending.take() else {
        return match &node.value {
            Value::Scalar(s) => {
                *pending = Some(Key {
                    name: s.text.clone(),
                    at: node.at,
                    merged: false,
                });
                None
            }
            _ => Some((node.at, "a key that is a list or a mapping".to_string())),
        };
    };
    let Value::Map(entries) = &mut map.value else {
        return None;
    };
    if key.name == "<<" {
        merge_into(entries, node);
    } else if let Some(i) = entries
        .iter()
        .position(|(k, _)| k.name == key.name && k.merged)
    {
        entries[i] = (key, node);
    } else if let Some((first, _)) = entries.iter().find(|(k, _)| k.name == key.name) {
        let msg = format!(
            "key `{}` is given twice in one mapping (first on line {})",
            key.name, first.at.line
        );
        return Some((key.at, msg));
    } else {
        entries.push((key, node));
    }
    None
}

/// `<<: *base` (or a list of them): the merged mapping's keys, except
/// those the mapping sets itself.
fn merge_into(entries: &mut Vec<(Key, Node)>, node: Node) {
    let sources = match node.value {
        Value::Seq(items) => items,
        _ => vec![node],
    };
    for s in sources {
        if let Value::Map(more) = s.value {
            for (mut k, v) in more {
                if !entries.iter().any(|(e, _)| e.name == k.name) {
                    k.merged = true;
                    entries.push((k, v));
                }
            }
        }
    }
}

fn is_binary(tag: &Option<Tag>) -> bool {
    tag.as_ref().is_some_and(|t| {
        t.suffix == "binary" && matches!(t.handle.as_str(), "!!" | "tag:yaml.org,2002:")
    })
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.documents > 1 && !matches!(ev, Event::StreamEnd) {
            return;
        }
        let at = self.at(mark);
        match ev {
            Event::DocumentStart => self.documents += 1,
            Event::Scalar(text, style, anchor, tag) => {
                let node = Node {
                    at,
                    value: Value::Scalar(Scalar {
                        text,
                        plain: style == TScalarStyle::Plain && tag.is_none(),
                        binary: is_binary(&tag),
                    }),
                };
                self.done(node, anchor);
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().map(|mut n| {
                    n.at = at.clone();
                    n
                });
                match node {
                    Some(n) => self.done(n, 0),
                    None => self.fail(&at, "an alias (*name) to an anchor not defined before it"),
                }
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Open::Seq(
                Node {
                    at,
                    value: Value::Seq(Vec::new()),
                },
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push(Open::Map(
                Node {
                    at,
                    value: Value::Map(Vec::new()),
                },
                anchor,
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Open::Seq(n, anchor) | Open::Map(n, anchor, _)) => self.done(n, anchor),
                None => {}
            },
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> Vec<(Key, Node)> {
        match parse("c.yaml", text).unwrap().0.value {
            Value::Map(m) => m,
            v => panic!("{v:?}"),
        }
    }

    fn scalar(n: &Node) -> &Scalar {
        match &n.value {
            Value::Scalar(s) => s,
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn values_keep_their_text_and_line() {
        let m = map("hostname: s1\nwrite_files:\n- path: /etc/x\n  permissions: 0755\n");
        assert_eq!(m[0].0.name, "hostname");
        assert_eq!(scalar(&m[0].1).text, "s1");
        let Value::Seq(files) = &m[1].1.value else {
            panic!()
        };
        let Value::Map(f) = &files[0].value else {
            panic!()
        };
        assert_eq!(scalar(&f[1].1).text, "0755");
        assert_eq!(f[1].1.at.line, 4);
        assert_eq!(f[1].1.at.to_string(), "c.yaml:4");
    }

    #[test]
    fn anchors_merges_and_binary() {
        let m = map(
            "base: &b\n  token: t\n  password: p\nk3os:\n  <<: *b\n  labels: {a: b}\n  password: q\nbin: !!binary aGk=\nnone:\n",
        );
        let Value::Map(k) = &m[1].1.value else {
            panic!()
        };
        let names: Vec<&str> = k.iter().map(|(k, _)| k.name.as_str()).collect();
        assert_eq!(names, ["token", "password", "labels"]);
        assert_eq!(scalar(&k[1].1).text, "q", "the mapping's own key wins");
        assert!(scalar(&m[2].1).binary);
        assert!(m[3].1.is_null());
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = parse("a1.yaml", "hostname: a1\nk3os:\n  labels: [a\n  token: x\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a1.yaml:"), "{e}");
        let e = parse("a1.yaml", "hostname: a1\nhostname: a2\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a1.yaml:2: key `hostname` is given twice") && e.contains("line 1"),
            "{e}"
        );
    }

    #[test]
    fn only_the_first_document_counts() {
        let (n, more) = parse("c.yaml", "hostname: a\n---\nhostname: b\n").unwrap();
        assert!(more);
        let Value::Map(m) = n.value else { panic!() };
        assert_eq!(scalar(&m[0].1).text, "a");
        let (n, more) = parse("c.yaml", "").unwrap();
        assert!(!more && matches!(n.value, Value::Map(ref m) if m.is_empty()));
    }
}
