//! The folders of `src/` are the pipeline's layers, and dependencies run
//! one way: a module may use its own layer and the layers below it, never
//! one above; `build`, `deliver` and `verify` stand side by side and do
//! not use each other; and no two modules use each other (no cycles).
//! This test reads every `crate::…` path in `src/` (comments aside) and
//! fails naming the file and line of each reference that breaks a rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the top; a layer may use those after it in this list.
/// Layers in one inner list stand side by side.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["build", "deliver", "verify"],
    &["image"],
    &["inputs"],
    &["render"],
    &["config"],
    &["util"],
];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&layer))
}

/// `src/`-relative path → text, for every `.rs` file.
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &r, out);
            } else if name.ends_with(".rs") {
                out.insert(r, std::fs::read_to_string(e.path()).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut out,
    );
    out
}

/// The module a file defines: `config/plan.rs` → `config::plan`,
/// `build/mod.rs` → `build`.
fn module_of(file: &str) -> String {
    let m = file.trim_end_matches(".rs").trim_end_matches("/mod");
    m.replace('/', "::")
}

/// `crate::a::b::Item` (or `crate::a::{…}`) → the longest known module
/// that prefixes it.
fn target_module(path: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// Every rule broken, as "file:line: message".
fn violations(files: &BTreeMap<String, String>) -> Vec<String> {
    let modules: BTreeSet<String> = files.keys().map(|f| module_of(f)).collect();
    let mut out = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in files {
        // Programs, like main.rs: they use the library, nothing uses them.
        if file == "lib.rs" || file == "main.rs" || file.starts_with("bin/") {
            continue;
        }
        let me = module_of(file);
        let layer = me.split("::").next().unwrap().to_string();
        let Some(my_rank) = rank(&layer) else {
            out.push(format!(
                "{file}: `{layer}` is not a layer: add it to LAYERS (and the README)"
            ));
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let path: Vec<&str> = rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap()
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .collect();
                let Some(target) = target_module(&path, &modules) else {
                    continue;
                };
                let their_layer = target.split("::").next().unwrap();
                let their_rank = rank(their_layer).unwrap_or(usize::MAX);
                if their_rank < my_rank || (their_rank == my_rank && their_layer != layer) {
                    out.push(format!(
                        "{file}:{}: `{layer}` uses `{their_layer}` (crate::{}), which it may not",
                        n + 1,
                        path.join("::")
                    ));
                }
                if target != me && !me.starts_with(&format!("{target}::")) {
                    edges.entry(me.clone()).or_default().insert(target);
                }
            }
        }
    }
    out.extend(cycles(&edges));
    out
}

/// One message per pair of modules that use each other, directly or
/// through others.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    fn reaches(
        from: &str,
        to: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        if !seen.insert(from.to_string()) {
            return false;
        }
        edges
            .get(from)
            .is_some_and(|ts| ts.iter().any(|t| t == to || reaches(t, to, edges, seen)))
    }
    let mut out = Vec::new();
    for (a, ts) in edges {
        for b in ts {
            if a < b && reaches(b, a, edges, &mut BTreeSet::new()) {
                out.push(format!("cycle: {a} uses {b}, and {b} leads back to {a}"));
            }
        }
    }
    out
}

#[test]
fn dependencies_run_one_way_through_the_layers() {
    let v = violations(&sources());
    assert!(
        v.is_empty(),
        "{} broken rule(s):\n{}",
        v.len(),
        v.join("\n")
    );
}

#[test]
fn the_check_catches_an_upward_use_a_sideways_use_and_a_cycle() {
    let files: BTreeMap<String, String> = [
        (
            "config/plan.rs",
            "use crate::render::tree::FileTree;\n// crate::cli in a comment is fine\n",
        ),
        ("render/tree.rs", "use crate::config::plan::Plan;\n"),
        ("build/mod.rs", "fn f() { crate::verify::vm::start() }\n"),
        ("verify/vm.rs", ""),
        ("util/tool.rs", "use crate::util::tool::Tool;\n"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let v = violations(&files);
    assert!(
        v.iter()
            .any(|m| m.starts_with("config/plan.rs:1: `config` uses `render`")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|m| m.starts_with("build/mod.rs:1: `build` uses `verify`")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|m| m.contains("cycle: config::plan uses render::tree")),
        "{v:?}"
    );
    assert_eq!(v.len(), 3, "{v:?}");
}
