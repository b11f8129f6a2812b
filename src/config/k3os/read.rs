//! k3os's configuration keys, read from the YAML tree the way k3os read
//! them: its fuzzy names (`sysctl` or `sysctls`, `k3s_args` or `k3sArgs`,
//! singular or plural), a single value where a list is expected, every
//! scalar as a string; then one shared file merged under a node's own.
//! Keys k3os did not know become notes; values of the wrong shape
//! (a list where k3os wanted one value) are errors naming file and line.

use std::rc::Rc;

use anyhow::bail;

use super::Note;
use super::yaml::{Node, Origin, Scalar, Value};

/// k3os's top-level keys, as named in its Go config (`json` tags).
const TOP: &[&str] = &[
    "sshAuthorizedKeys",
    "writeFiles",
    "hostname",
    "k3os",
    "runCmd",
    "bootCmd",
    "initCmd",
];
/// The keys under `k3os:`.
const K3OS: &[&str] = &[
    "dataSources",
    "modules",
    "sysctls",
    "ntpServers",
    "dnsNameservers",
    "wifi",
    "password",
    "serverUrl",
    "token",
    "labels",
    "k3sArgs",
    "environment",
    "taints",
    "install",
];
const WRITE_FILE: &[&str] = &["encoding", "content", "owner", "path", "permissions"];
const INSTALL: &[&str] = &[
    "forceEfi",
    "device",
    "configUrl",
    "silent",
    "isoUrl",
    "powerOff",
    "noFormat",
    "debug",
    "tty",
];

/// The fix of a value of the wrong shape.
const SHAPE_FIX: &str =
    "write it as k3os's configuration reference does: k3os could not have read it either";

/// A scalar as k3os saw it (a string), with where it was written and the
/// key path as written (`k3os.sysctl.kernel.printk`).
#[derive(Debug, Clone)]
pub struct Val {
    pub v: String,
    pub at: Origin,
    pub key: String,
}

#[derive(Debug, Clone)]
pub struct WriteFile {
    pub at: Origin,
    pub key: String,
    pub path: Option<Val>,
    pub content: Option<(Val, Scalar)>,
    pub encoding: Option<Val>,
    pub owner: Option<Val>,
    pub permissions: Option<Val>,
}

/// One node's k3os configuration, shared file merged in.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The node's own file.
    pub file: Rc<str>,
    pub hostname: Option<Val>,
    pub ssh_authorized_keys: Vec<Val>,
    pub write_files: Vec<WriteFile>,
    pub init_cmd: Vec<Val>,
    pub boot_cmd: Vec<Val>,
    pub run_cmd: Vec<Val>,
    pub data_sources: Vec<Val>,
    pub modules: Vec<Val>,
    pub sysctl: Vec<(Val, Val)>,
    pub ntp_servers: Vec<Val>,
    pub dns_nameservers: Vec<Val>,
    /// Present, with any value: only reported.
    pub wifi: Option<Val>,
    pub password: Option<Val>,
    pub server_url: Option<Val>,
    pub token: Option<Val>,
    pub labels: Vec<(Val, Val)>,
    pub k3s_args: Vec<Val>,
    pub environment: Vec<(Val, Val)>,
    pub taints: Vec<Val>,
    /// `k3os.install.*`, by Go name.
    pub install: Vec<(&'static str, Val)>,
}

/// A key of a file after fuzzy matching: its Go name, how it was written
/// (as a dotted path) and its value.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: &'static str,
    pub key: String,
    /// Where the key was written.
    pub at: Origin,
    pub node: Node,
}

/// A file's known keys: top level, `k3os:` and `k3os.install:`, each
/// merged separately (k3os merged these key by key, and replaced lists
/// and maps whole).
#[derive(Debug, Clone, Default)]
pub struct Doc {
    pub file: Option<Rc<str>>,
    pub top: Vec<Entry>,
    pub k3os: Vec<Entry>,
    pub install: Vec<Entry>,
}

impl Doc {
    pub fn hostname(&self) -> Option<&Entry> {
        self.top
            .iter()
            .find(|e| e.id == "hostname" && !e.node.is_null())
    }
}

/// k3os's `ToYAMLKey`: `k3sArgs` → `k3s_args`, `serverUrl` → `server_url`.
fn yaml_key(s: &str) -> String {
    let mut out = String::new();
    let mut cap = false;
    for (i, c) in s.chars().enumerate() {
        if i == 0 {
            cap = c.is_uppercase();
            out.extend(c.to_lowercase());
        } else if c.is_uppercase() {
            if !cap {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            cap = false;
            out.push(c);
        }
    }
    out
}

/// The Go name `written` stands for, by k3os's fuzzy names: the name
/// itself, lower-cased, in snake case, and each without a final `s` or `es`.
fn canonical(written: &str, fields: &[&'static str]) -> Option<&'static str> {
    fields.iter().copied().find(|f| {
        let mut forms = vec![f.to_string()];
        forms.extend(f.strip_suffix('s').map(str::to_string));
        forms.extend(f.strip_suffix("es").map(str::to_string));
        written == *f
            || forms.iter().any(|n| {
                let y = yaml_key(n);
                written == n.to_lowercase() || written == y || written == y.to_lowercase()
            })
    })
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// The known keys of a mapping; unknown ones become notes. Two spellings
/// of one key are an error (k3os took one of them at random).
fn entries(
    node: &Node,
    path: &str,
    fields: &[&'static str],
    notes: &mut Vec<Note>,
) -> anyhow::Result<Vec<Entry>> {
    let Value::Map(map) = &node.value else {
        if node.is_null() {
            return Ok(Vec::new());
        }
        bail!(
            "{}: {}: expected a mapping, found {}\n    fix: {SHAPE_FIX}",
            node.at,
            if path.is_empty() { "the file" } else { path },
            node.kind()
        );
    };
    let mut out: Vec<Entry> = Vec::new();
    for (k, v) in map {
        let key = join(path, &k.name);
        match canonical(&k.name, fields) {
            Some(id) => {
                if let Some(first) = out.iter().find(|e| e.id == id) {
                    bail!(
                        "{}: {key}: the same k3os key as `{}` on line {}\n    fix: keep one of the two",
                        k.at,
                        first.key,
                        first.node.at.line
                    );
                }
                out.push(Entry {
                    id,
                    key,
                    at: k.at.clone(),
                    node: v.clone(),
                });
            }
            None => notes.push(Note::dropped(
                &k.at,
                &key,
                "not a k3os key: k3os ignored it, and so does the import",
            )),
        }
    }
    Ok(out)
}

/// A file's YAML tree as k3os keys.
pub fn doc(root: &Node, notes: &mut Vec<Note>) -> anyhow::Result<Doc> {
    let mut d = Doc {
        file: Some(root.at.file.clone()),
        top: entries(root, "", TOP, notes)?,
        ..Doc::default()
    };
    if let Some(k) = d.top.iter().find(|e| e.id == "k3os") {
        d.k3os = entries(&k.node, &k.key, K3OS, notes)?;
    }
    if let Some(i) = d.k3os.iter().find(|e| e.id == "install") {
        d.install = entries(&i.node, &i.key, INSTALL, notes)?;
    }
    Ok(d)
}

/// `own` over `shared`, as k3os merged its config files: a key of `own`
/// replaces the same key of `shared` (lists and maps whole); `k3os:` and
/// `k3os.install:` are merged key by key.
pub fn merge(shared: &Doc, own: &Doc) -> Doc {
    fn over(shared: &[Entry], own: &[Entry]) -> Vec<Entry> {
        let mut out: Vec<Entry> = shared
            .iter()
            .filter(|s| !own.iter().any(|o| o.id == s.id))
            .cloned()
            .collect();
        out.extend(own.iter().cloned());
        out
    }
    Doc {
        file: own.file.clone(),
        top: over(&shared.top, &own.top),
        k3os: over(&shared.k3os, &own.k3os),
        install: over(&shared.install, &own.install),
    }
}

fn scalar(e: &Entry) -> anyhow::Result<Option<Val>> {
    match &e.node.value {
        _ if e.node.is_null() => Ok(None),
        Value::Scalar(s) => Ok(Some(Val {
            v: s.text.clone(),
            at: e.node.at.clone(),
            key: e.key.clone(),
        })),
        _ => bail!(
            "{}: {}: expected a single value, found {}\n    fix: {SHAPE_FIX}",
            e.node.at,
            e.key,
            e.node.kind()
        ),
    }
}

/// A list of strings; one value is a list of one (k3os's `ToSlice`).
fn list(e: &Entry) -> anyhow::Result<Vec<Val>> {
    let items = match &e.node.value {
        Value::Seq(items) => items.clone(),
        Value::Map(_) => bail!(
            "{}: {}: expected a list, found a mapping\n    fix: {SHAPE_FIX}",
            e.node.at,
            e.key
        ),
        Value::Scalar(_) => vec![e.node.clone()],
    };
    let mut out = Vec::new();
    for (i, n) in items.iter().enumerate() {
        let item = Entry {
            id: e.id,
            key: format!("{}[{i}]", e.key),
            at: n.at.clone(),
            node: n.clone(),
        };
        out.extend(scalar(&item)?);
    }
    Ok(out)
}

/// A mapping of strings to strings (k3os's `ToMap`).
fn string_map(e: &Entry) -> anyhow::Result<Vec<(Val, Val)>> {
    if e.node.is_null() {
        return Ok(Vec::new());
    }
    let Value::Map(m) = &e.node.value else {
        bail!(
            "{}: {}: expected a mapping of names to values, found {}\n    fix: {SHAPE_FIX}",
            e.node.at,
            e.key,
            e.node.kind()
        );
    };
    let mut out = Vec::new();
    for (k, v) in m {
        let item = Entry {
            id: e.id,
            key: join(&e.key, &k.name),
            at: k.at.clone(),
            node: v.clone(),
        };
        let name = Val {
            v: k.name.clone(),
            at: k.at.clone(),
            key: item.key.clone(),
        };
        let value = scalar(&item)?.unwrap_or(Val {
            v: String::new(),
            at: k.at.clone(),
            key: item.key.clone(),
        });
        out.push((name, value));
    }
    Ok(out)
}

fn write_files(e: &Entry, notes: &mut Vec<Note>) -> anyhow::Result<Vec<WriteFile>> {
    let items = match &e.node.value {
        Value::Seq(items) => items.clone(),
        _ if e.node.is_null() => Vec::new(),
        _ => vec![e.node.clone()],
    };
    let mut out = Vec::new();
    for (i, n) in items.iter().enumerate() {
        let key = format!("{}[{i}]", e.key);
        let mut f = WriteFile {
            at: n.at.clone(),
            key: key.clone(),
            path: None,
            content: None,
            encoding: None,
            owner: None,
            permissions: None,
        };
        for x in entries(n, &key, WRITE_FILE, notes)? {
            let v = scalar(&x)?;
            match x.id {
                "path" => f.path = v,
                "encoding" => f.encoding = v,
                "owner" => f.owner = v,
                "permissions" => f.permissions = v,
                _ => {
                    if let (Some(v), Value::Scalar(s)) = (v, &x.node.value) {
                        f.content = Some((v, s.clone()));
                    }
                }
            }
        }
        out.push(f);
    }
    Ok(out)
}

/// The typed configuration of one node's (merged) document.
pub fn config(d: &Doc, notes: &mut Vec<Note>) -> anyhow::Result<Config> {
    let mut c = Config {
        file: d.file.clone().unwrap_or_else(|| Rc::from("")),
        ..Config::default()
    };
    for e in &d.top {
        match e.id {
            "sshAuthorizedKeys" => c.ssh_authorized_keys = list(e)?,
            "writeFiles" => c.write_files = write_files(e, notes)?,
            "hostname" => c.hostname = scalar(e)?,
            "runCmd" => c.run_cmd = list(e)?,
            "bootCmd" => c.boot_cmd = list(e)?,
            "initCmd" => c.init_cmd = list(e)?,
            _ => {} // k3os: below
        }
    }
    for e in &d.k3os {
        match e.id {
            "dataSources" => c.data_sources = list(e)?,
            "modules" => c.modules = list(e)?,
            "sysctls" => c.sysctl = string_map(e)?,
            "ntpServers" => c.ntp_servers = list(e)?,
            "dnsNameservers" => c.dns_nameservers = list(e)?,
            "wifi" | "password" => {
                let v = Val {
                    v: String::new(),
                    at: e.at.clone(),
                    key: e.key.clone(),
                };
                let slot = if e.id == "wifi" {
                    &mut c.wifi
                } else {
                    &mut c.password
                };
                *slot = (!e.node.is_null()).then_some(v);
            }
            "serverUrl" => c.server_url = scalar(e)?,
            "token" => c.token = scalar(e)?,
            "labels" => c.labels = string_map(e)?,
            "k3sArgs" => c.k3s_args = list(e)?,
            "environment" => c.environment = string_map(e)?,
            "taints" => c.taints = list(e)?,
            _ => {} // install: below
        }
    }
    for e in &d.install {
        if let Some(v) = scalar(e)? {
            c.install.push((e.id, v));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::super::yaml;
    use super::*;

    #[test]
    fn fuzzy_names_as_k3os_had_them() {
        assert_eq!(yaml_key("k3sArgs"), "k3s_args");
        assert_eq!(yaml_key("dnsNameservers"), "dns_nameservers");
        for (w, id) in [
            ("ssh_authorized_keys", "sshAuthorizedKeys"),
            ("sshAuthorizedKeys", "sshAuthorizedKeys"),
            ("ssh_authorized_key", "sshAuthorizedKeys"),
            ("sysctl", "sysctls"),
            ("sysctls", "sysctls"),
            ("dns_nameserver", "dnsNameservers"),
            ("server_url", "serverUrl"),
            ("serverurl", "serverUrl"),
            ("k3s_args", "k3sArgs"),
            ("taint", "taints"),
        ] {
            assert_eq!(canonical(w, TOP).or(canonical(w, K3OS)), Some(id), "{w}");
        }
        assert_eq!(canonical("k3s_arguments", K3OS), None);
        assert_eq!(canonical("Hostname", TOP), None);
    }

    fn cfg(shared: &str, own: &str) -> (Config, Vec<Note>) {
        let mut notes = Vec::new();
        let s = doc(&yaml::parse("shared.yaml", shared).unwrap().0, &mut notes).unwrap();
        let o = doc(&yaml::parse("a1.yaml", own).unwrap().0, &mut notes).unwrap();
        let c = config(&merge(&s, &o), &mut notes).unwrap();
        (c, notes)
    }

    #[test]
    fn a_node_file_wins_key_by_key_under_k3os() {
        let (c, notes) = cfg(
            "ssh_authorized_keys: [a, b]\nk3os:\n  modules: kvm\n  labels: {x: '1', y: '2'}\n  colour: red\n",
            "hostname: a1\nk3os:\n  labels: {z: '3'}\n",
        );
        assert_eq!(c.ssh_authorized_keys.len(), 2);
        assert_eq!(c.modules[0].v, "kvm");
        assert_eq!(c.modules[0].at.to_string(), "shared.yaml:3");
        // A map is replaced whole, as k3os did.
        assert_eq!(c.labels.len(), 1);
        assert_eq!(c.labels[0].0.key, "k3os.labels.z");
        assert_eq!(&*c.file, "a1.yaml");
        assert_eq!(notes.len(), 1);
        assert!(notes[0].to_string().contains("shared.yaml:5: k3os.colour"));
    }

    #[test]
    fn wrong_shapes_and_double_spellings_are_errors() {
        let mut notes = Vec::new();
        let d = doc(
            &yaml::parse("a.yaml", "k3os:\n  labels: [x]\n").unwrap().0,
            &mut notes,
        )
        .unwrap();
        let e = config(&d, &mut notes).unwrap_err().to_string();
        assert!(
            e.starts_with("a.yaml:2: k3os.labels: expected a mapping"),
            "{e}"
        );
        let e = doc(
            &yaml::parse("a.yaml", "k3os:\n  sysctl: {}\n  sysctls: {}\n")
                .unwrap()
                .0,
            &mut notes,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("a.yaml:3: k3os.sysctls: the same k3os key as `k3os.sysctl`"),
            "{e}"
        );
    }
}
