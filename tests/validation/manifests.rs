//! Mistakes in `[[k3s.manifests]]`, `[[k3s.helm-charts]]` and
//! `[k3s.proxy]`: each names the key and the line, and for a manifest's
//! YAML the place inside it.

use super::{GOOD, errors, line_of_last, one, with};

/// The good profile with `extra` after `[k3s]`'s version.
fn k3s(extra: &str) -> String {
    with(
        "version = \"v1.31.1+k3s1\"\n",
        &format!("version = \"v1.31.1+k3s1\"\n{extra}"),
    )
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";

fn inline(name: &str, yaml: &str) -> String {
    k3s(&format!(
        "[[k3s.manifests]]\nname = \"{name}\"\ncontent = '''\n{yaml}'''\n"
    ))
}

#[test]
fn good_manifests_charts_and_proxy_pass() {
    let text = k3s(&format!(
        "[k3s.proxy]\nhttp = \"http://proxy.lab.example:3128\"\nno-proxy = [\".lab.example\", \"192.168.7.0/24\"]\n[[k3s.manifests]]\nname = \"ns\"\nnodes = [\"s1\"]\ncontent = '''\n{NAMESPACE}---\n{NAMESPACE}'''\n[[k3s.helm-charts]]\nname = \"suc\"\nrepo = \"https://charts.example.org\"\nchart = \"suc\"\nversion = \"1.2.3\"\n[k3s.helm-charts.values]\nimage = {{ tag = \"v1\" }}\n"
    ));
    assert!(errors(&text).is_empty(), "{:?}", errors(&text));
}

#[test]
fn a_document_without_kind_is_named_at_its_line() {
    let text = inline(
        "ns",
        &format!("{NAMESPACE}---\napiVersion: v1\nmetadata: {{}}\n"),
    );
    let e = one(
        &text,
        line_of_last(&text, "---"),
        "k3s.manifests[0].content",
        "document 2 of this manifest: `kind` missing",
    );
    assert!(
        e.hint.contains("apiVersion") && e.hint.contains("kind"),
        "{e}"
    );
}

#[test]
fn broken_yaml_is_reported_at_its_line_in_the_profile() {
    let text = inline(
        "ns",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n   bad: [\n",
    );
    let e = one(
        &text,
        line_of_last(&text, "   bad: ["),
        "k3s.manifests[0].content",
        "line 5, column",
    );
    assert!(e.message.contains("of this manifest"), "{e}");
}

#[test]
fn an_escaped_string_is_reported_at_its_start() {
    // A basic string with escapes: its characters do not map one to one
    // onto the profile, so the error points at the string and names the
    // YAML's own line.
    let text = k3s("[[k3s.manifests]]\nname = \"ns\"\ncontent = \"kind: A\\nbad: [\\n\"\n");
    let e = one(
        &text,
        line_of_last(&text, "content ="),
        "k3s.manifests[0].content",
        "line 3, column",
    );
    assert_eq!(e.column, 11, "{e}");
}

#[test]
fn manifest_names_are_kubernetes_names() {
    one(
        &inline("Registry", NAMESPACE),
        line_of_last(&inline("Registry", NAMESPACE), "name = \"Registry\""),
        "k3s.manifests[0].name",
        "is not a Kubernetes name",
    );
    let long = "a".repeat(54);
    let text = inline(&long, NAMESPACE);
    let e = one(
        &text,
        7,
        "k3s.manifests[0].name",
        "is not a Kubernetes name",
    );
    assert!(e.hint.contains("at most 53"), "{e}");
}

#[test]
fn a_name_is_used_once_across_manifests_and_charts() {
    let text = inline("suc", NAMESPACE)
        + "\n[[k3s.helm-charts]]\nname = \"suc\"\nrepo = \"https://charts.example.org\"\nchart = \"suc\"\nversion = \"1\"\n";
    // The chart comes after the nodes, at the end of the file.
    let e = one(
        &text,
        line_of_last(&text, "name = \"suc\""),
        "k3s.helm-charts[0].name",
        "already the name of k3s.manifests[0] (line 7)",
    );
    assert!(e.hint.contains("kiln-<name>.yaml"), "{e}");
}

#[test]
fn a_manifest_file_is_read_next_to_the_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = tmp.path().join("lab.toml");
    let text = k3s("[[k3s.manifests]]\nname = \"ns\"\nfile = \"manifests/ns.yaml\"\n");
    let plan = |t: &str| kiln::config::plan::plan_profile(&profile, t);
    // Missing: the path as resolved, and where it is looked for.
    let e = &plan(&text).unwrap_err().0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].key.as_str()), (8, "k3s.manifests[0].file"));
    assert!(
        e[0].message.contains("cannot read") && e[0].message.contains("manifests/ns.yaml"),
        "{}",
        e[0]
    );
    assert!(
        e[0].hint.contains("relative to the profile's directory"),
        "{}",
        e[0]
    );
    // Present but broken: the file's own line.
    std::fs::create_dir(tmp.path().join("manifests")).unwrap();
    std::fs::write(
        tmp.path().join("manifests/ns.yaml"),
        "apiVersion: v1\nkind: [\n",
    )
    .unwrap();
    let e = &plan(&text).unwrap_err().0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("ns.yaml`, line 3"), "{}", e[0]);
    assert!(e[0].hint.contains("fix the YAML in"), "{}", e[0]);
    // Good: its text is the plan's.
    std::fs::write(tmp.path().join("manifests/ns.yaml"), NAMESPACE).unwrap();
    let p = plan(&text).unwrap();
    match &p.manifests[0].source {
        kiln::config::plan::ManifestSource::Yaml { text, file } => {
            assert_eq!(text, NAMESPACE);
            assert_eq!(
                file.as_deref(),
                Some(tmp.path().join("manifests/ns.yaml").as_path())
            );
        }
        other => panic!("{other:?}"),
    }
    // A directory is not a manifest.
    std::fs::remove_file(tmp.path().join("manifests/ns.yaml")).unwrap();
    std::fs::create_dir(tmp.path().join("manifests/ns.yaml")).unwrap();
    let e = &plan(&text).unwrap_err().0;
    assert!(e[0].message.contains("not a regular file"), "{}", e[0]);
}

#[test]
fn content_and_file_are_one_or_the_other() {
    let text = k3s("[[k3s.manifests]]\nname = \"ns\"\nfile = \"ns.yaml\"\ncontent = \"x\"\n");
    one(
        &text,
        9,
        "k3s.manifests[0].content",
        "both `content` and `file`",
    );
    let text = k3s("[[k3s.manifests]]\nname = \"ns\"\n");
    one(
        &text,
        6,
        "k3s.manifests[0].content",
        "needs `content` or `file`",
    );
}

#[test]
fn manifests_are_deployed_from_servers_only() {
    let text = k3s(&format!(
        "[[k3s.manifests]]\nname = \"ns\"\nnodes = [\"a1\"]\ncontent = '''\n{NAMESPACE}'''\n"
    ));
    let e = one(&text, 8, "k3s.manifests[0].nodes[0]", "`a1` is an agent");
    assert!(e.hint.contains("nodeSelector"), "{e}");
    let text = text.replace("[\"a1\"]", "[\"s9\"]");
    let e = one(&text, 8, "k3s.manifests[0].nodes[0]", "no node `s9`");
    assert!(e.hint.contains("s1"), "{e}");
    let text = text.replace("[\"s9\"]", "[]");
    one(&text, 6, "k3s.manifests[0].nodes", "deploys it nowhere");
}

#[test]
fn a_chart_needs_repo_chart_and_version() {
    let text = k3s(
        "[[k3s.helm-charts]]\nname = \"suc\"\nrepo = \"https://charts.example.org\"\nchart = \"suc\"\n",
    );
    one(
        &text,
        6,
        "k3s.helm-charts[0].version",
        "missing required key `version`",
    );
    let text = k3s(
        "[[k3s.helm-charts]]\nname = \"suc\"\nrepo = \"ftp://charts\"\nchart = \"suc\"\nversion = \"1\"\n",
    );
    one(
        &text,
        8,
        "k3s.helm-charts[0].repo",
        "not a Helm repository URL",
    );
    let text = k3s(
        "[[k3s.helm-charts]]\nname = \"suc\"\nrepo = \"https://c.example\"\nchart = \"suc\"\nversion = \"1\"\nvalues = \"x: 1\"\n",
    );
    one(
        &text,
        11,
        "k3s.helm-charts[0].values",
        "expected a table, found a string",
    );
}

#[test]
fn proxy_urls_are_http_or_https_with_a_host() {
    for (url, why) in [
        (
            "socks5://proxy:1080",
            "scheme `socks5` is not http or https",
        ),
        ("proxy.lab.example:3128", "no http:// or https://"),
        ("http://:3128", "no host"),
        ("http://proxy:99999", "the port is not 1 to 65535"),
        ("http://proxy:3128/path", "no path"),
        ("http://bob:pa$$word@proxy:3128", "credentials"),
    ] {
        let text = k3s(&format!("[k3s.proxy]\nhttps = \"{url}\"\n"));
        let e = one(&text, 7, "k3s.proxy.https", why);
        assert!(e.hint.contains("http://"), "{e}");
    }
    let text = k3s("[k3s.proxy]\nhttp = \"http://proxy:3128\"\nno-proxy = [\"*\"]\n");
    one(&text, 8, "k3s.proxy.no-proxy[0]", "not a NO_PROXY entry");
    let text = k3s("[k3s.proxy]\nno-proxy = [\"10.0.0.0/8\"]\n");
    one(&text, 6, "k3s.proxy", "names no proxy");
    // A bad URL is the only error: the table is not also empty.
    let text = k3s("[k3s.proxy]\nhttp = \"ftp://proxy\"\n");
    one(&text, 7, "k3s.proxy.http", "scheme `ftp`");
}

#[test]
fn write_files_may_not_place_kiln_manifests() {
    let text = GOOD.to_string()
        + "\n[first-boot]\n[[first-boot.write-files]]\npath = \"/var/lib/rancher/k3s/server/manifests/kiln-x.yaml\"\n";
    one(
        &text,
        line_of_last(&text, "path ="),
        "first-boot.write-files[0].path",
        "is rendered by kiln",
    );
    let fine = text.replace("manifests/kiln-x.yaml", "manifests/mine.yaml");
    assert!(errors(&fine).is_empty(), "{:?}", errors(&fine));
}
