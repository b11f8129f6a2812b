//! `kiln import-k3os`: k3os `config.yaml` files in, one kiln profile
//! (TOML text) and a list of notes out. Pure: the caller reads the files
//! and writes the result.
//!
//! The pieces: [`yaml`] (a tree with the file and line of every value),
//! [`read`] (k3os's keys, its fuzzy names and its merge of config files),
//! [`k3s_args`] (which k3s flags kiln renders itself), [`convert`] (k3os
//! values to kiln's, cluster-wide where kiln's keys are), [`emit`] (the
//! profile text with its comments and the values to fill in).
//!
//! Decisions, and why:
//!
//! - **Files and nodes.** Each file with a `hostname` is one node. A file
//!   without one is shared: it is merged under every node's own file the
//!   way k3os merged `/k3os/system/config.yaml` under `config.d/*` (a
//!   node's key replaces the shared one, lists and maps whole; `k3os:`
//!   merges key by key). When no file has a `hostname`, every file is a
//!   node named after the file.
//! - **Nothing dropped silently.** Every k3os key, known or not, ends up
//!   in the profile, or in a note saying why not (on stderr and as a
//!   comment at the top of the profile), with file and line. Secret values
//!   (token, password, Wi-Fi passphrases, environment) never appear in a
//!   note.
//! - **What k3os did not know is a placeholder, not a guess.** The k3s
//!   version, the WireGuard network and each node's tunnel and LAN
//!   addresses are written as strings starting `FILL IN:` that `kiln
//!   check` refuses, each at its own line, with the placeholder's text in
//!   the message. The other way, values that pass marked `# TODO`, was
//!   not taken: a value that passes `kiln check` but is wrong fails much
//!   later, on the hardware or in the cluster (a tunnel network that
//!   overlaps the LAN breaks routing; a k3s release is what the workloads'
//!   manifests meet, and one chosen for the operator may have dropped APIs
//!   they use), and nothing forces anyone to read a TODO. A placeholder
//!   fails at `kiln check`, before anything is built; the check's error
//!   list is the to-do list, and the importer's stderr names the same
//!   lines.
//! - **kiln's shape, not k3os's.** The profile turns WireGuard on (mesh),
//!   kiln's firewall and kiln's join (the first server's tunnel address),
//!   as kiln is designed to run; `k3os.server_url` is therefore not carried
//!   over, and its host only fills in the server's LAN address when it is
//!   an IP and there is one server.
//! - **kiln's `[first-boot]` is the same on every node.** A value found on
//!   every node is carried over as it is. Commands found on some nodes only
//!   are carried over wrapped in a test of the node's name (they still run
//!   only there); modules, sysctls, name and time servers, files and
//!   environment found on some nodes only are carried over for every node,
//!   with a note; SSH keys found on some nodes only are not (kiln would
//!   give them every node: access is not widened without the operator);
//!   values that differ between nodes are not carried over.

pub mod convert;
pub mod emit;
pub mod k3s_args;
pub mod read;
pub mod yaml;

use std::fmt;

use yaml::Origin;

/// One k3os input file: its name as given (used in notes) and its text.
pub struct Source {
    pub name: String,
    pub text: String,
}

/// What happened to a k3os value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NoteKind {
    /// Not in the profile.
    Dropped,
    /// In the profile, but it behaves differently from k3os.
    Changed,
}

/// A k3os value the profile does not carry over as it was, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    pub kind: NoteKind,
    pub at: Option<Origin>,
    pub key: String,
    pub text: String,
}

impl Note {
    pub fn dropped(at: &Origin, key: &str, text: &str) -> Note {
        Note {
            kind: NoteKind::Dropped,
            at: Some(at.clone()),
            key: key.to_string(),
            text: text.to_string(),
        }
    }

    pub fn changed(at: &Origin, key: &str, text: &str) -> Note {
        Note {
            kind: NoteKind::Changed,
            at: Some(at.clone()),
            key: key.to_string(),
            text: text.to_string(),
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{at}: {}: {}", self.key, self.text),
            None => write!(f, "{}: {}", self.key, self.text),
        }
    }
}

/// A value of the profile the operator must write: its line in the
/// profile, its key, and what to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillIn {
    pub line: usize,
    pub key: String,
    pub what: String,
}

/// The result of an import.
#[derive(Debug)]
pub struct Import {
    /// The profile (TOML), placeholders and notes included.
    pub profile: String,
    /// Node names and roles, in file order.
    pub nodes: Vec<(String, &'static str)>,
    /// Files taken as shared (no `hostname`).
    pub shared: Vec<String>,
    pub fill_in: Vec<FillIn>,
    pub notes: Vec<Note>,
}

/// The profile for `sources` (k3os config files, in the order given), for
/// a cluster named `cluster`. Fails on a file that is not YAML, or holds a
/// value of a shape k3os could not have read, naming file and line.
pub fn import(sources: &[Source], cluster: &str) -> anyhow::Result<Import> {
    let mut notes = Vec::new();
    let mut docs = Vec::new();
    for s in sources {
        let (root, more) = yaml::parse(&s.name, &s.text)?;
        if more {
            notes.push(Note::dropped(
                &Origin {
                    file: root.at.file.clone(),
                    line: 1,
                },
                "---",
                "a second YAML document: k3os read only the first, and so does the import",
            ));
        }
        docs.push(read::doc(&root, &mut notes)?);
    }
    let (shared, own) = split_shared(docs);
    let mut configs = Vec::new();
    for d in &own {
        let merged = shared.iter().fold(d.clone(), |acc, s| read::merge(s, &acc));
        configs.push(read::config(&merged, &mut notes)?);
    }
    let shared_names: Vec<String> = shared
        .iter()
        .filter_map(|d| d.file.as_deref().map(str::to_string))
        .collect();
    let out = convert::convert(&configs, cluster, &mut notes)?;
    // General notes first, then by file as given, line, key.
    let order = |n: &Note| {
        n.at.as_ref().map(|a| {
            let file = sources.iter().position(|s| *s.name == *a.file);
            (file, a.line)
        })
    };
    notes.sort_by(|a, b| {
        (a.kind, order(a), &a.key, &a.text).cmp(&(b.kind, order(b), &b.key, &b.text))
    });
    notes.dedup();
    let names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
    let (profile, fill_in) = emit::emit(&out, &notes, &names, &shared_names);
    Ok(Import {
        profile,
        nodes: out
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.role.as_str()))
            .collect(),
        shared: shared_names,
        fill_in,
        notes,
    })
}

/// Shared documents (no `hostname`, when some file has one) and the
/// nodes' own, each in the order given. Shared files are merged in that
/// order: a later one wins.
fn split_shared(docs: Vec<read::Doc>) -> (Vec<read::Doc>, Vec<read::Doc>) {
    if !docs.iter().any(|d| d.hostname().is_some()) {
        return (Vec::new(), docs);
    }
    docs.into_iter().partition(|d| d.hostname().is_none())
}

impl Import {
    /// What stderr shows: the nodes, what to fill in, every note.
    pub fn report(&self) -> String {
        let mut s = String::from("kiln import-k3os: nodes ");
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(n, r)| format!("{n} ({r})"))
            .collect();
        s.push_str(&nodes.join(", "));
        if !self.shared.is_empty() {
            s.push_str(&format!(
                "; shared (no hostname), merged under each node's file: {}",
                self.shared.join(", ")
            ));
        }
        s.push('\n');
        if !self.fill_in.is_empty() {
            s.push_str("fill in (`kiln check` reports each one until it is written):\n");
            for f in &self.fill_in {
                s.push_str(&format!(
                    "  profile line {}: {}: {}\n",
                    f.line, f.key, f.what
                ));
            }
        }
        for (kind, title) in [
            (NoteKind::Dropped, "not carried over:"),
            (NoteKind::Changed, "carried over with a difference:"),
        ] {
            let mut any = false;
            for n in self.notes.iter().filter(|n| n.kind == kind) {
                if !any {
                    s.push_str(title);
                    s.push('\n');
                    any = true;
                }
                s.push_str(&format!("  {n}\n"));
            }
        }
        s
    }
}
