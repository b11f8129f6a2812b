//! What k3s deploys on first start: `[[k3s.manifests]]` as written and
//! `[[k3s.helm-charts]]` as `HelmChart` resources, as files
//! `kiln-<name>.yaml`.
//!
//! k3s reads `server/manifests` on the state partition (`/var`), and does
//! not follow symlinks there (k3s-io/k3s#9288), yet the set must belong to
//! the image slot so an A/B update brings the new one. So the files live in
//! the root image ([`image_files`], every image: one root image may serve
//! both roles), each server's seed lists the ones it deploys with their
//! sha256 ([`render`]), and `kiln-manifests.service`, required by k3s,
//! copies them into `server/manifests` as real files before k3s starts,
//! removes kiln's files no longer listed and leaves every other file alone.
//! Agents get nothing: k3s deploys manifests from servers only.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use crate::config::plan::{HelmChartPlan, ManifestPlan, ManifestSource, NodePlan, Plan};
use crate::config::profile::Role;
use crate::render::tree::FileTree;

use super::header;
use super::yaml::{self, Y};

/// Where the root image keeps the set.
pub const IMAGE_DIR: &str = "/usr/lib/kiln/manifests";
/// Where k3s reads manifests (default data dir).
pub const K3S_MANIFESTS_DIR: &str = "/var/lib/rancher/k3s/server/manifests";
/// The seed's list of this server's files (`sha256sum` format).
pub const LIST: &str = "/etc/kiln/manifests.sha256";
pub const SCRIPT: &str = "/usr/lib/kiln/deploy-manifests";
pub const UNIT: &str = "kiln-manifests.service";
const UNIT_PATH: &str = "/usr/lib/systemd/system/kiln-manifests.service";
/// The copy script, shipped in every image.
pub const SCRIPT_TEXT: &str = include_str!("manifests.sh");
/// Namespace of the HelmChart resources (where k3s's Helm controller
/// looks for them).
pub const HELM_CHART_NAMESPACE: &str = "kube-system";

/// The file a manifest becomes: `kiln-<name>.yaml`. The prefix marks
/// kiln's files in `server/manifests`; k3s names the AddOn after it.
pub fn file_name(m: &ManifestPlan) -> String {
    format!("kiln-{}.yaml", m.name)
}

/// The text of one manifest's file: a header, then the YAML as written
/// or the HelmChart kiln writes.
pub fn render_manifest(plan: &Plan, m: &ManifestPlan) -> String {
    let mut s = header("#", plan);
    let _ = writeln!(s, "# From {} ({}).", m.key, m.name);
    match &m.source {
        ManifestSource::Yaml { text, .. } => {
            s.push_str(text);
            if !text.ends_with('\n') {
                s.push('\n');
            }
        }
        ManifestSource::Chart(c) => s.push_str(&yaml::to_string(&helm_chart(&m.name, c))),
    }
    s
}

/// The files a node copies into `server/manifests`, by name, with their
/// text (empty on agents).
pub fn node_manifests(plan: &Plan, node: &NodePlan) -> Vec<(String, String)> {
    plan.manifests
        .iter()
        .filter(|m| node.role == Role::Server && m.deploys_on(node))
        .map(|m| (file_name(m), render_manifest(plan, m)))
        .collect()
}

/// What every root image carries: the set, the copy script and its unit.
pub fn image_files(plan: &Plan) -> FileTree {
    let mut t = FileTree::new();
    t.dir(IMAGE_DIR, 0o700);
    for m in &plan.manifests {
        // 0600: a manifest may hold a Secret.
        t.file(
            &format!("{IMAGE_DIR}/{}", file_name(m)),
            0o600,
            render_manifest(plan, m),
        );
    }
    t.file(SCRIPT, 0o755, SCRIPT_TEXT);
    t.file(UNIT_PATH, 0o644, unit());
    t
}

fn unit() -> String {
    format!(
        "[Unit]\nDescription=kiln: this slot's k3s manifests into {K3S_MANIFESTS_DIR}, before k3s starts\nConditionPathExists={LIST}\nRequiresMountsFor=/var/lib/rancher\nBefore=k3s.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart={SCRIPT}\nStandardOutput=journal+console\nStandardError=journal+console\n\n[Install]\nRequiredBy=k3s.service\n"
    )
}

/// A server's part, in its seed: the list of the files it deploys (maybe
/// none: then the unit removes kiln's old ones), and the unit enabled as
/// required by k3s (k3s must not start on a set the unit could not put
/// in place: it would deploy the old one).
pub fn render(plan: &Plan, node: &NodePlan, tree: &mut FileTree) {
    if node.role != Role::Server {
        return;
    }
    let mut list = String::new();
    for (name, text) in node_manifests(plan, node) {
        let _ = writeln!(list, "{}  {name}", hex::encode(Sha256::digest(&text)));
    }
    tree.file(LIST, 0o644, list);
    tree.symlink(
        &format!("/etc/systemd/system/k3s.service.requires/{UNIT}"),
        UNIT_PATH,
    );
}

/// A `helm.cattle.io/v1` `HelmChart` (fields as k3s's Helm controller
/// reads them: `repo`, `chart`, `version`, `targetNamespace`,
/// `createNamespace`, `valuesContent`).
fn helm_chart(name: &str, c: &HelmChartPlan) -> Vec<(String, Y)> {
    let kv = |k: &str, v: Y| (k.to_string(), v);
    let mut spec = vec![
        kv("repo", Y::str(&c.repo)),
        kv("chart", Y::str(&c.chart)),
        kv("version", Y::str(&c.version)),
    ];
    if let Some(ns) = &c.target_namespace {
        spec.push(kv("targetNamespace", Y::str(ns)));
        spec.push(kv("createNamespace", Y::Bool(c.create_namespace)));
    }
    if !c.values.is_empty() {
        let values = yaml::to_string(&table(&c.values));
        spec.push(kv("valuesContent", Y::Block(values)));
    }
    vec![
        kv("apiVersion", Y::str("helm.cattle.io/v1")),
        kv("kind", Y::str("HelmChart")),
        kv(
            "metadata",
            Y::Map(vec![
                kv("name", Y::str(name)),
                kv("namespace", Y::str(HELM_CHART_NAMESPACE)),
            ]),
        ),
        kv("spec", Y::Map(spec)),
    ]
}

fn table(t: &toml::Table) -> Vec<(String, Y)> {
    t.iter().map(|(k, v)| (k.clone(), value(v))).collect()
}

/// A TOML value as YAML; a date-time becomes its text.
fn value(v: &toml::Value) -> Y {
    match v {
        toml::Value::String(s) => Y::str(s),
        toml::Value::Integer(i) => Y::Int(*i),
        toml::Value::Float(f) => Y::Float(*f),
        toml::Value::Boolean(b) => Y::Bool(*b),
        toml::Value::Datetime(d) => Y::str(d.to_string()),
        toml::Value::Array(a) => Y::List(a.iter().map(value).collect()),
        toml::Value::Table(t) => Y::Map(table(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(extra: &str) -> Plan {
        let text = format!(
            "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n{extra}\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\nlan-address = \"192.168.1.11\"\n[[nodes]]\nname = \"s2\"\nrole = \"server\"\nlan-address = \"192.168.1.12\"\ncluster-init = true\n[[nodes]]\nname = \"a1\"\nrole = \"agent\"\n"
        );
        crate::config::plan::plan_profile(std::path::Path::new("lab.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const CHART: &str = "[[k3s.helm-charts]]\nname = \"suc\"\nrepo = \"https://charts.example.org\"\nchart = \"system-upgrade-controller\"\nversion = \"1.2.3\"\ntarget-namespace = \"system-upgrade\"\n[k3s.helm-charts.values]\nreplicas = 1\nratio = 0.5\nimage = { tag = \"v0.14.2\", pull = true }\nargs = [\"--a\", \"--b\"]\n";

    #[test]
    fn a_helm_chart_is_a_helmchart_resource_with_its_values() {
        let p = plan(CHART);
        let text = render_manifest(&p, &p.manifests[0]);
        assert!(
            text.starts_with("# Rendered by kiln from lab.toml"),
            "{text}"
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(v["apiVersion"].as_str(), Some("helm.cattle.io/v1"));
        assert_eq!(v["kind"].as_str(), Some("HelmChart"));
        assert_eq!(v["metadata"]["name"].as_str(), Some("suc"));
        assert_eq!(v["metadata"]["namespace"].as_str(), Some("kube-system"));
        assert_eq!(
            v["spec"]["repo"].as_str(),
            Some("https://charts.example.org")
        );
        assert_eq!(
            v["spec"]["chart"].as_str(),
            Some("system-upgrade-controller")
        );
        assert_eq!(v["spec"]["version"].as_str(), Some("1.2.3"));
        assert_eq!(
            v["spec"]["targetNamespace"].as_str(),
            Some("system-upgrade")
        );
        assert_eq!(v["spec"]["createNamespace"].as_bool(), Some(true));
        let values: serde_yaml::Value =
            serde_yaml::from_str(v["spec"]["valuesContent"].as_str().unwrap()).unwrap();
        assert_eq!(values["replicas"].as_i64(), Some(1));
        assert_eq!(values["ratio"].as_f64(), Some(0.5));
        assert_eq!(values["image"]["tag"].as_str(), Some("v0.14.2"));
        assert_eq!(values["image"]["pull"].as_bool(), Some(true));
        assert_eq!(values["args"][1].as_str(), Some("--b"));
        assert!(
            text.contains("  valuesContent: |\n    replicas: 1\n"),
            "{text}"
        );
    }

    #[test]
    fn servers_list_what_they_deploy_and_agents_get_nothing() {
        let p = plan(&format!(
            "{CHART}[[k3s.manifests]]\nname = \"ns\"\nnodes = [\"s2\"]\ncontent = \"apiVersion: v1\\nkind: Namespace\\nmetadata:\\n  name: x\\n\"\n"
        ));
        let seed = |name: &str| {
            let mut t = FileTree::new();
            render(&p, p.node(name).unwrap(), &mut t);
            t
        };
        let s1 = seed("s1");
        let list = s1.text(LIST).unwrap();
        assert_eq!(list.lines().count(), 1, "{list}");
        assert!(list.ends_with("  kiln-suc.yaml\n"), "{list}");
        let s2 = seed("s2");
        let list = s2.text(LIST).unwrap();
        let names: Vec<&str> = list.lines().map(|l| &l[66..]).collect();
        assert_eq!(names, ["kiln-ns.yaml", "kiln-suc.yaml"], "{list}");
        let (_, ns_text) = &node_manifests(&p, p.node("s2").unwrap())[0];
        assert!(list.starts_with(&hex::encode(Sha256::digest(ns_text))));
        assert!(matches!(
            s2.get("/etc/systemd/system/k3s.service.requires/kiln-manifests.service"),
            Some(crate::render::tree::Entry::Symlink { .. })
        ));
        assert_eq!(seed("a1").paths().count(), 0);
        // Every image holds the whole set, private to root.
        let image = image_files(&p);
        assert!(matches!(
            image.get("/usr/lib/kiln/manifests/kiln-ns.yaml"),
            Some(crate::render::tree::Entry::File { mode: 0o600, .. })
        ));
        assert!(image.text(SCRIPT).unwrap().starts_with("#!/bin/sh\n"));
    }

    #[test]
    fn a_server_without_manifests_still_lists_none() {
        let p = plan("");
        let mut t = FileTree::new();
        render(&p, p.node("s1").unwrap(), &mut t);
        assert_eq!(t.text(LIST), Some(""));
    }
}
