//! The profile text: kiln's tables in the order docs/profile.md gives
//! them, the notes as comments at the top, and a `FILL IN:` placeholder
//! (recorded with its line) for each value k3os did not know.

use std::fmt::Write as _;

use super::convert::{FileOut, NodeOut, Out};
use super::{FillIn, Note, NoteKind};
use crate::config::profile::Role;

/// What every placeholder starts with; `kiln check` shows it in its error.
pub const FILL_IN: &str = "FILL IN: ";

/// Lines of TOML, counted, with the placeholders written so far.
struct W {
    text: String,
    fill_in: Vec<FillIn>,
}

impl W {
    fn line(&mut self, s: &str) {
        self.text.push_str(s);
        self.text.push('\n');
    }

    fn comment(&mut self, s: &str) {
        for l in s.lines() {
            self.line(format!("# {l}").trim_end());
        }
    }

    fn kv(&mut self, key: &str, value: &str) {
        self.line(&format!("{} = {value}", toml_key(key)));
    }

    fn strs(&mut self, key: &str, items: &[String]) {
        if !items.is_empty() {
            self.kv(key, &array(items));
        }
    }

    /// `key = "FILL IN: what"`, recorded as `path` (kiln check's key).
    fn fill(&mut self, key: &str, path: &str, what: &str) {
        self.kv(key, &toml_str(&format!("{FILL_IN}{what}")));
        let line = self.text.lines().count();
        self.fill_in.push(FillIn {
            line,
            key: path.to_string(),
            what: what.to_string(),
        });
    }
}

/// A TOML string: basic and escaped on one line; text of several lines
/// as a literal block when it can be one, so files and scripts stay
/// readable.
pub fn toml_str(s: &str) -> String {
    let literal_ok = s.contains('\n')
        && !s.contains("'''")
        && !s.ends_with('\'')
        && !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t');
    if literal_ok {
        return format!("'''\n{s}'''");
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        k.to_string()
    } else {
        toml_str(k)
    }
}

/// One line when short, else one item per line.
fn array(items: &[String]) -> String {
    let parts: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    let one = format!("[{}]", parts.join(", "));
    if one.len() <= 72 && !one.contains('\n') {
        return one;
    }
    let mut s = String::from("[\n");
    for p in parts {
        let _ = writeln!(s, "  {p},");
    }
    s.push(']');
    s
}

/// The profile, and where its placeholders are.
/// `files` are the input files in the order given, `shared` those merged
/// under every node's.
pub fn emit(
    out: &Out,
    notes: &[Note],
    files: &[String],
    shared: &[String],
) -> (String, Vec<FillIn>) {
    let mut w = W {
        text: String::new(),
        fill_in: Vec::new(),
    };
    header(&mut w, notes, files, shared);
    w.line("[cluster]");
    w.kv("name", &toml_str(&out.cluster));
    k3s(&mut w, out);
    w.line("");
    w.line("[wireguard]");
    w.comment("k3os had no tunnel: kiln joins the nodes over WireGuard (a mesh: every\nnode dials every other at its LAN address) and runs k3s inside it.");
    w.fill(
        "network",
        "wireguard.network",
        "a private network your LAN does not use, like 10.99.0.0/24",
    );
    first_boot(&mut w, out);
    for (i, n) in out.nodes.iter().enumerate() {
        node(&mut w, i, n);
    }
    (w.text, w.fill_in)
}

fn header(w: &mut W, notes: &[Note], files: &[String], shared: &[String]) {
    w.comment(&format!(
        "kiln profile imported from k3os by `kiln import-k3os` ({}).",
        files.join(", ")
    ));
    if !shared.is_empty() {
        w.comment(&format!(
            "Shared (no hostname), merged under each node's own file: {}.",
            shared.join(", ")
        ));
    }
    w.comment("\nBefore `kiln build`: replace every value that starts with \"FILL IN:\"\n(`kiln check` reports each one at its line), and read the notes below.\nEvery key: docs/profile.md; the import step by step: docs/coming-from-k3os.md.");
    for (kind, title) in [
        (NoteKind::Dropped, "Not carried over from k3os:"),
        (NoteKind::Changed, "Carried over with a difference:"),
    ] {
        let mine: Vec<&Note> = notes.iter().filter(|n| n.kind == kind).collect();
        if !mine.is_empty() {
            w.comment(&format!("\n{title}"));
            for n in mine {
                w.comment(&format!("  {n}"));
            }
        }
    }
    w.line("");
}

fn k3s(w: &mut W, out: &Out) {
    let k = &out.k3s;
    w.line("");
    w.line("[k3s]");
    w.comment("The k3s release the nodes run: k3os does not say which you want. A\nnewer k3s than your k3os had may no longer serve APIs your manifests use.");
    w.fill(
        "version",
        "k3s.version",
        "a k3s release tag, like v1.31.1+k3s1",
    );
    if let Some(t) = &k.token {
        w.comment("From k3os's token: a secret. Leave it out to have kiln generate one.");
        w.kv("token", &toml_str(t));
    }
    w.strs("server-args", &k.server_args);
    w.strs("agent-args", &k.agent_args);
    w.strs("disable", &k.disable);
    if let Some(f) = &k.flannel_backend {
        w.kv("flannel-backend", &toml_str(f));
    }
    if let Some(c) = &k.cluster_cidr {
        w.kv("cluster-cidr", &toml_str(c));
    }
    if let Some(c) = &k.service_cidr {
        w.kv("service-cidr", &toml_str(c));
    }
    w.strs("tls-san", &k.tls_san);
}

fn first_boot(w: &mut W, out: &Out) {
    let lists = [
        ("boot-cmd", &out.boot_cmd),
        ("dns-nameservers", &out.dns_nameservers),
        ("ntp-servers", &out.ntp_servers),
        ("modules", &out.modules),
    ];
    if lists.iter().any(|(_, l)| !l.is_empty()) {
        w.line("");
        w.line("[first-boot]");
        for (k, l) in lists {
            w.strs(k, l);
        }
    }
    if !out.sysctl.is_empty() {
        w.line("");
        w.line("[first-boot.sysctl]");
        for (k, v) in &out.sysctl {
            w.kv(k, &toml_str(v));
        }
    }
    for u in &out.users {
        w.line("");
        w.line("[[first-boot.users]]");
        w.comment("k3os's user: it had ssh_authorized_keys.");
        w.kv("name", &toml_str(&u.name));
        w.strs("ssh-authorized-keys", &u.keys);
    }
    for f in &out.files {
        file(w, f);
    }
}

fn file(w: &mut W, f: &FileOut) {
    w.line("");
    w.line("[[first-boot.write-files]]");
    w.comment(&format!("From {} {}.", f.from.at, f.from.key));
    w.kv("path", &toml_str(&f.path));
    w.kv("permissions", &toml_str(&f.permissions));
    if let Some(o) = &f.owner {
        w.kv("owner", &toml_str(o));
    }
    w.kv("content", &toml_str(&f.content));
}

fn node(w: &mut W, i: usize, n: &NodeOut) {
    let key = |k: &str| format!("nodes[{i}].{k}");
    w.line("");
    w.line("[[nodes]]");
    w.comment(&format!("From {}.", n.file));
    w.kv("name", &toml_str(&n.name));
    if let Some(h) = &n.hostname {
        w.kv("hostname", &toml_str(h));
    }
    w.kv("role", &toml_str(n.role.as_str()));
    if n.cluster_init && n.role == Role::Server {
        w.kv("cluster-init", "true");
    }
    match &n.lan_address {
        Some((ip, why)) => {
            w.comment(&format!("From {why}, which the agents joined."));
            w.kv("lan-address", &toml_str(&ip.to_string()));
        }
        None => w.fill(
            "lan-address",
            &key("lan-address"),
            &format!(
                "{}'s LAN address (reserve it in DHCP), or drop this line and set endpoint",
                n.name
            ),
        ),
    }
    w.fill(
        "wireguard-address",
        &key("wireguard-address"),
        &format!("{}'s address inside wireguard.network", n.name),
    );
    w.strs("taints", &n.taints);
    if let Some(d) = &n.install_device {
        w.kv("install-device", &toml_str(d));
    }
    if let Some(a) = n.after_install {
        w.kv("after-install", &toml_str(a));
    }
    if !n.labels.is_empty() {
        w.line("[nodes.labels]");
        for (k, v) in &n.labels {
            w.kv(k, &toml_str(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_through_toml() {
        for s in [
            "plain",
            "with \"quotes\" and \\",
            "two\nlines\n",
            "ends in quote'\n",
            "has ''' inside\n",
            "bell\u{7}",
            "tab\there\nnext",
        ] {
            let doc = format!("k = {}\n", toml_str(s));
            let v: toml::Table = toml::from_str(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
            assert_eq!(v["k"].as_str(), Some(s), "{doc}");
        }
        assert_eq!(toml_key("kernel.printk"), "\"kernel.printk\"");
        assert_eq!(toml_key("boot-cmd"), "boot-cmd");
    }
}
