//! `write_files` (decoded), `k3os.environment` (as `/etc/default/k3s`,
//! which kiln's k3s unit reads) and `ssh_authorized_keys` (the `rancher`
//! user): kiln's `[[first-boot.write-files]]` and `[[first-boot.users]]`.

use std::io::Read as _;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

use super::super::Note;
use super::super::read::{Val, WriteFile};
use super::{FileOut, Input, K3OS_USER, Out, UserOut, node_list, spread, widen};
use crate::config::plan::first_boot;

/// Where k3s's unit reads its environment (`EnvironmentFile=-/etc/default/k3s`).
const K3S_ENV_FILE: &str = "/etc/default/k3s";

/// Base64 as Go's decoder takes it, padded or not.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub(super) fn convert(inputs: &[Input], names: &[String], out: &mut Out, notes: &mut Vec<Note>) {
    write_files(inputs, names, out, notes);
    environment(inputs, names, out, notes);
    users(inputs, names, out, notes);
}

fn b64(text: &str) -> Result<Vec<u8>, String> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    B64.decode(compact).map_err(|e| format!("not base64 ({e})"))
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| format!("not gzip ({e})"))?;
    Ok(out)
}

/// A file's content as k3os wrote it: `!!binary` and `encoding` undone.
fn decode(f: &WriteFile) -> Result<String, String> {
    let raw = match &f.content {
        None => Vec::new(),
        Some((_, s)) if s.binary => b64(&s.text)?,
        Some((v, _)) => v.v.clone().into_bytes(),
    };
    let encoding = f.encoding.as_ref().map_or("", |e| e.v.as_str());
    let text = |b: Vec<u8>| {
        String::from_utf8(b).map_err(|_| "the content is binary: kiln's write-files hold text; bake the file into the image under overlays/ instead".to_string())
    };
    let as_str = || {
        String::from_utf8(raw.clone()).map_err(|_| "base64 content that is not text".to_string())
    };
    let bytes = match encoding {
        "" => raw.clone(),
        "b64" | "base64" => b64(&as_str()?)?,
        "gz" | "gzip" => gunzip(&raw)?,
        "gz+base64" | "gzip+base64" | "gz+b64" | "gzip+b64" => gunzip(&b64(&as_str()?)?)?,
        other => {
            return Err(format!(
                "encoding `{other}` is not one k3os knew (b64, gzip, gz+b64): k3os did not write this file either"
            ));
        }
    };
    text(bytes)
}

/// `0755`, `755` or an unquoted 0755, as k3os read it (octal; empty is 0644).
fn permissions(f: &WriteFile) -> Result<String, String> {
    let Some(p) = f.permissions.as_ref().filter(|p| !p.v.is_empty()) else {
        return Ok("0644".to_string());
    };
    match u32::from_str_radix(p.v.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o7777 => Ok(format!("{m:04o}")),
        _ => Err(format!(
            "permissions `{}` are not an octal mode: k3os could not write this file either",
            p.v
        )),
    }
}

/// Why kiln cannot write a file at `path` (read-only root, a file kiln
/// renders, connman's configuration), if it cannot.
fn refused(path: &str) -> Option<String> {
    if let Err(e) = crate::config::profile::parse_file_path(path) {
        return Some(e.message);
    }
    if path.starts_with("/etc/connman/") || path.starts_with("/var/lib/connman/") {
        return Some(
            "kiln's nodes use systemd-networkd, not connman: describe the LAN with nodes.network"
                .to_string(),
        );
    }
    if !first_boot::is_writable_path(path) {
        return Some(format!(
            "kiln's root is read-only and write-files go under /etc or /var only: bake the file into the image as overlays/common{path}"
        ));
    }
    let why = match first_boot::reserved_path(path)? {
        "/etc/rancher/" if path == "/etc/rancher/k3s/registries.yaml" => "kiln renders registries.yaml from [k3s.mirrors] and [k3s.registry-configs]: move its entries there".to_string(),
        "/etc/rancher/" if path == "/etc/rancher/k3s/config.yaml" => "kiln renders k3s's config.yaml: pass its settings in k3s.server-args / k3s.agent-args".to_string(),
        r => format!("kiln renders this file itself ({r}): set it through the profile's own keys"),
    };
    Some(why)
}

/// One node's files as kiln entries; those kiln cannot take are notes.
/// Content, mode and owner: what makes two nodes' files the same.
type FileBody = (String, String, Option<String>);

fn node_files(i: &Input, notes: &mut Vec<Note>) -> Vec<(String, FileBody, Val)> {
    let mut items = Vec::new();
    for f in &i.c.write_files {
        let Some(path) = &f.path else {
            notes.push(Note::dropped(&f.at, &f.key, "no path: k3os wrote nothing"));
            continue;
        };
        let result = refused(&path.v)
            .map_or(Ok(()), Err)
            .and_then(|()| Ok((decode(f)?, permissions(f)?)));
        let (content, permissions) = match result {
            Ok(x) => x,
            Err(why) => {
                notes.push(Note::dropped(&f.at, &f.key, &format!("{}: {why}", path.v)));
                continue;
            }
        };
        let owner = f
            .owner
            .as_ref()
            .map(|o| o.v.clone())
            .filter(|o| !o.is_empty() && o != "root" && o != "root:root");
        let from = Val {
            v: path.v.clone(),
            at: f.at.clone(),
            key: f.key.clone(),
        };
        items.push((path.v.clone(), (content, permissions, owner), from));
    }
    items
}

/// Each path once, from the nodes that agree on its content and mode.
fn write_files(inputs: &[Input], names: &[String], out: &mut Out, notes: &mut Vec<Note>) {
    let per_node = inputs.iter().map(|i| node_files(i, notes)).collect();
    for s in spread::<FileBody>(per_node) {
        if widen(&s, names, notes) {
            let (content, permissions, owner) = s.value;
            out.files.push(FileOut {
                path: s.key,
                content,
                permissions,
                owner,
                from: s.from,
            });
        }
    }
}

/// A systemd `EnvironmentFile=` value: bare when safe, else double-quoted.
fn env_value(v: &str) -> String {
    if !v.is_empty()
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_./:,@%+=-".contains(&c))
    {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// `k3os.environment` as `/etc/default/k3s`: k3s sees it, as on k3os;
/// boot commands do not.
fn environment(inputs: &[Input], names: &[String], out: &mut Out, notes: &mut Vec<Note>) {
    let per_node = inputs
        .iter()
        .map(|i| {
            let mut items = Vec::new();
            for (k, v) in &i.c.environment {
                let name_ok = k.v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && k.v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
                if name_ok && !v.v.chars().any(char::is_control) {
                    items.push((k.v.clone(), v.v.clone(), k.clone()));
                } else {
                    notes.push(Note::dropped(&k.at, &k.key, "not an environment variable a unit's EnvironmentFile can carry (a name of letters, digits and _, a value on one line)"));
                }
            }
            items
        })
        .collect();
    let mut lines = String::new();
    let mut first: Option<Val> = None;
    for s in spread::<String>(per_node) {
        if widen(&s, names, notes) {
            lines.push_str(&format!("{}={}\n", s.key, env_value(&s.value)));
            first.get_or_insert(s.from);
        }
    }
    let Some(mut first) = first else { return };
    first.key = first
        .key
        .rsplit_once('.')
        .map_or(first.key.clone(), |(k, _)| k.to_string());
    let key = first.key.as_str();
    if let Some(f) = out.files.iter().position(|f| f.path == K3S_ENV_FILE) {
        let old = out.files.remove(f);
        notes.push(Note::dropped(
            &old.from.at,
            &old.from.key,
            &format!("{K3S_ENV_FILE}: replaced by the file k3os.environment becomes"),
        ));
    }
    notes.push(Note::changed(&first.at, key, &format!("written to {K3S_ENV_FILE}, which kiln's k3s.service reads; k3os also set it for boot commands, which do not see it in kiln (proxy variables included)")));
    out.files.push(FileOut {
        path: K3S_ENV_FILE.to_string(),
        content: lines,
        permissions: "0600".to_string(),
        owner: None,
        from: first.clone(),
    });
}

/// `ssh_authorized_keys` for the `rancher` user: only keys every node
/// had (kiln's users are the same on every node, and access is not
/// widened without the operator). `github:USER` is a note: kiln fetches
/// nothing at boot.
fn users(inputs: &[Input], names: &[String], out: &mut Out, notes: &mut Vec<Note>) {
    let per_node = inputs
        .iter()
        .map(|i| {
            let mut items = Vec::new();
            for k in &i.c.ssh_authorized_keys {
                if let Some(user) = k.v.strip_prefix("github:") {
                    notes.push(Note::dropped(&k.at, &k.key, &format!("kiln does not fetch keys at boot: paste the keys GitHub lists for {user} (github.com/{user}.keys) here instead")));
                } else if !first_boot::is_ssh_public_key(&k.v) {
                    notes.push(Note::dropped(&k.at, &k.key, "not an SSH public key line (like \"ssh-ed25519 AAAA… you@laptop\")"));
                } else {
                    items.push((k.v.clone(), (), k.clone()));
                }
            }
            items
        })
        .collect();
    let mut keys = Vec::new();
    for s in spread::<()>(per_node) {
        if s.on.len() == names.len() {
            keys.push(s.key);
        } else {
            notes.push(Note::dropped(&s.from.at, &s.from.key, &format!("a key only {} had: kiln gives a user the same keys on every node; add it to {K3OS_USER}'s keys if it should reach them all", node_list(names, &s.on))));
        }
    }
    let owned = out.files.iter().any(|f| {
        f.owner
            .as_deref()
            .is_some_and(|o| o.split(':').any(|p| p == K3OS_USER))
    });
    if !keys.is_empty() || owned {
        out.users.push(UserOut {
            name: K3OS_USER.to_string(),
            keys,
        });
    }
    owners(out, notes);
}

/// kiln resolves an owner that is root, a number or a profile user;
/// any other name is written as root, with a note.
fn owners(out: &mut Out, notes: &mut Vec<Note>) {
    let users: Vec<String> = out.users.iter().map(|u| u.name.clone()).collect();
    let known = |p: &str| p == "root" || p.parse::<u32>().is_ok() || users.iter().any(|u| u == p);
    for f in &mut out.files {
        if let Some(o) = f.owner.take_if(|o| !o.split(':').all(known)) {
            notes.push(Note::changed(&f.from.at, &f.from.key, &format!("owner `{o}` is no user kiln knows (root, numeric ids, or a [[first-boot.users]] name): written as root:root; give numeric ids if it matters")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::k3os::yaml::{Origin, Scalar};
    use base64::engine::general_purpose;
    use std::io::Write as _;

    fn file(content: &str, binary: bool, encoding: &str) -> WriteFile {
        let at = Origin {
            file: "s1.yaml".into(),
            line: 3,
        };
        let val = |v: &str| Val {
            v: v.to_string(),
            at: at.clone(),
            key: "write_files[0]".into(),
        };
        WriteFile {
            at: at.clone(),
            key: "write_files[0]".into(),
            path: Some(val("/etc/x")),
            content: Some((
                val(content),
                Scalar {
                    text: content.to_string(),
                    plain: false,
                    binary,
                },
            )),
            encoding: (!encoding.is_empty()).then(|| val(encoding)),
            owner: None,
            permissions: None,
        }
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_encoding_k3os_knew() {
        let std = general_purpose::STANDARD;
        assert_eq!(decode(&file("hi\n", false, "")).unwrap(), "hi\n");
        assert_eq!(decode(&file("aGkK", false, "b64")).unwrap(), "hi\n");
        assert_eq!(decode(&file("aGk\nK", false, "base64")).unwrap(), "hi\n");
        let gzb64 = std.encode(gz(b"hi\n"));
        assert_eq!(decode(&file(&gzb64, false, "gz+b64")).unwrap(), "hi\n");
        assert_eq!(decode(&file(&gzb64, false, "gzip+base64")).unwrap(), "hi\n");
        // Plain gzip can only arrive as YAML's !!binary.
        assert_eq!(decode(&file(&gzb64, true, "gzip")).unwrap(), "hi\n");
        assert!(
            decode(&file("aGkK", false, "rot13"))
                .unwrap_err()
                .contains("rot13")
        );
        assert!(
            decode(&file(&std.encode([0xff, 0xfe]), false, "b64"))
                .unwrap_err()
                .contains("binary")
        );
    }

    #[test]
    fn paths_kiln_refuses_say_why() {
        assert!(refused("/etc/motd").is_none());
        assert!(refused("/var/lib/rancher/k3s/server/manifests/a.yaml").is_none());
        assert!(
            refused("/usr/local/bin/x")
                .unwrap()
                .contains("overlays/common/usr/local/bin/x")
        );
        assert!(
            refused("/etc/rancher/k3s/registries.yaml")
                .unwrap()
                .contains("[k3s.mirrors]")
        );
        assert!(
            refused("/etc/connman/main.conf")
                .unwrap()
                .contains("networkd")
        );
        assert!(refused("/etc/hosts").unwrap().contains("renders"));
        assert!(refused("/etc//x").is_some());
    }

    #[test]
    fn environment_values_quoted_for_systemd() {
        assert_eq!(env_value("http://proxy:3128"), "http://proxy:3128");
        assert_eq!(env_value("a b\"c"), "\"a b\\\"c\"");
        assert_eq!(env_value(""), "\"\"");
    }
}
