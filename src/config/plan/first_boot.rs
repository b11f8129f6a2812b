//! Resolves `[first-boot]`: the users, files, sysctls, modules and
//! commands applied on a node's first boot.

use std::collections::BTreeMap;

use crate::config::diag::Diagnostics;
use crate::config::profile::{self, At};

use super::{FIRST_USER_UID, FirstBootPlan, UserPlan, WriteFilePlan};

/// Allowed places for first-boot files: the root image is read-only.
const WRITABLE_PREFIXES: [&str; 2] = ["/etc/", "/var/"];
/// Paths kiln renders itself: a write-file there would silently fight
/// with kiln's own file. Entries ending in `/` or `-` are prefixes.
const RESERVED_PATHS: [&str; 23] = [
    "/etc/hostname",
    "/etc/hosts",
    "/etc/nftables.conf",
    "/etc/fstab",
    "/etc/machine-id",
    "/etc/kiln/",
    "/etc/rancher/",
    "/etc/wireguard/",
    "/etc/ssh/sshd_config.d/10-kiln.conf",
    "/etc/ssh/authorized_keys/",
    "/etc/ssh/ssh_host_",
    "/etc/systemd/network/20-kiln-lan.network",
    "/etc/systemd/system/k3s.service",
    "/etc/systemd/system/kiln-",
    "/etc/sysctl.d/90-kiln.conf",
    "/var/lib/kiln/",
    // k3s manifests: kiln's deploy unit owns every kiln-* file there.
    "/var/lib/rancher/k3s/server/manifests/kiln-",
    // Staying awake (render::power): logind's drop-in and the masked sleep targets.
    "/etc/systemd/logind.conf.d/kiln-",
    "/etc/systemd/system/sleep.target",
    "/etc/systemd/system/suspend.target",
    "/etc/systemd/system/hibernate.target",
    "/etc/systemd/system/hybrid-sleep.target",
    "/etc/systemd/system/suspend-then-hibernate.target",
];

/// May a write-file go to `path`: under /etc or /var, without `.` or
/// `..` components, not a directory?
pub fn is_writable_path(path: &str) -> bool {
    WRITABLE_PREFIXES.iter().any(|p| path.starts_with(p))
        && !path.split('/').any(|c| c == ".." || c == ".")
        && !path.ends_with('/')
}

/// The entry of [`RESERVED_PATHS`] that makes `path` kiln's own, if any.
pub fn reserved_path(path: &str) -> Option<&'static str> {
    RESERVED_PATHS.iter().copied().find(|r| {
        if r.ends_with(['/', '-', '_']) {
            path.starts_with(*r)
        } else {
            path == *r
        }
    })
}

/// Is `line` one line of a `.pub` file: a key type kiln knows and a body?
pub fn is_ssh_public_key(line: &str) -> bool {
    let mut parts = line.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let body = parts.next().unwrap_or("");
    let kind_ok =
        kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    kind_ok && body.len() >= 16 && !line.contains('\n')
}

pub(super) fn resolve_first_boot(f: &profile::FirstBoot, d: &mut Diagnostics) -> FirstBootPlan {
    let users = resolve_users(f, d);
    let write_files = resolve_write_files(f, &users, d);
    FirstBootPlan {
        users,
        write_files,
        sysctl: f
            .sysctl
            .iter()
            .map(|(k, v)| (k.v.clone(), v.v.clone()))
            .collect(),
        modules: f.modules.iter().map(|a| a.v.clone()).collect(),
        run_once: f.run_once.iter().map(|a| a.v.clone()).collect(),
        boot_cmd: f.boot_cmd.iter().map(|a| a.v.clone()).collect(),
        dns_nameservers: f.dns_nameservers.iter().map(|a| a.v).collect(),
        ntp_servers: f.ntp_servers.iter().map(|a| a.v.clone()).collect(),
    }
}

/// `[[first-boot.users]]`: names, uids (the next free one from 1000 when
/// not given), SSH keys and shells.
fn resolve_users(f: &profile::FirstBoot, d: &mut Diagnostics) -> Vec<UserPlan> {
    let mut users = Vec::new();
    let mut next_uid = FIRST_USER_UID;
    for u in &f.users {
        let Some(name) = &u.name else {
            d.missing(
                u.span.clone(),
                &format!("{}.name", u.key),
                "missing required key `name`",
                "add `name = \"club\"`",
            );
            continue;
        };
        if users.iter().any(|x: &UserPlan| x.name == name.v) {
            d.error(
                name.span.clone(),
                &name.key,
                format!("user `{}` is listed twice", name.v),
                "merge the two entries",
            );
        }
        let uid = match &u.uid {
            Some(a) if name.v == "root" && a.v != 0 => {
                d.error(a.span.clone(), &a.key, "root's uid is 0", "remove `uid`");
                0
            }
            Some(a) if name.v != "root" && !(1000..60000).contains(&a.v) => {
                d.error(
                    a.span.clone(),
                    &a.key,
                    format!("uid {} is outside the range for people (1000-59999)", a.v),
                    "remove `uid` to get the next free one from 1000",
                );
                0
            }
            Some(a) => a.v as u32,
            None if name.v == "root" => 0,
            None => {
                while users.iter().any(|x: &UserPlan| x.uid == next_uid)
                    || f.users
                        .iter()
                        .any(|o| o.uid.as_ref().is_some_and(|a| a.v == i64::from(next_uid)))
                {
                    next_uid += 1;
                }
                next_uid
            }
        };
        if users.iter().any(|x: &UserPlan| x.uid == uid) {
            d.error(
                u.span.clone(),
                &u.key,
                format!("uid {uid} is used by two users"),
                "give each user its own `uid`",
            );
        }
        let shell = check_user_keys_and_shell(u, d);
        users.push(UserPlan {
            name: name.v.clone(),
            uid,
            groups: u.groups.iter().map(|a| a.v.clone()).collect(),
            shell,
            ssh_authorized_keys: u.ssh_authorized_keys.iter().map(|a| a.v.clone()).collect(),
        });
    }
    users
}

/// `[[first-boot.write-files]]`: where (only /etc and /var, never a file
/// kiln renders), with which mode and owner.
fn resolve_write_files(
    f: &profile::FirstBoot,
    users: &[UserPlan],
    d: &mut Diagnostics,
) -> Vec<WriteFilePlan> {
    let mut write_files = Vec::new();
    let mut seen_paths: BTreeMap<&str, &At<String>> = BTreeMap::new();
    for w in &f.write_files {
        let Some(path) = &w.path else {
            d.missing(
                w.span.clone(),
                &format!("{}.path", w.key),
                "missing required key `path`",
                "add `path = \"/etc/...\"`",
            );
            continue;
        };
        if !is_writable_path(&path.v) {
            d.error(path.span.clone(), &path.key, format!("`{}` is not a file under /etc or /var", path.v), "the root image is read-only: write files under /etc/ or /var/, or put them in overlays/ to bake them into the image");
        }
        if let Some(r) = reserved_path(&path.v) {
            d.error(path.span.clone(), &path.key, format!("`{}` is rendered by kiln ({r})", path.v), "set it through the profile's own keys (hostname, users, wireguard, firewall, k3s, allow-suspend), or use another path");
        }
        if let Some(first) = seen_paths.get(path.v.as_str()) {
            let first_line = d.line_of(first.span.start);
            d.error(
                path.span.clone(),
                &path.key,
                format!(
                    "`{}` is already written by {} (line {first_line})",
                    path.v, first.key
                ),
                format!(
                    "keep one entry for `{}`: merge this one into line {first_line}, or remove it",
                    path.v
                ),
            );
        } else {
            seen_paths.insert(&path.v, path);
        }
        let mode = match &w.permissions {
            Some(a) => match u32::from_str_radix(a.v.trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o7777 && !a.v.is_empty() => m,
                _ => {
                    d.error(
                        a.span.clone(),
                        &a.key,
                        format!("`{}` is not an octal file mode", a.v),
                        "write the mode as an octal string, like \"0644\"",
                    );
                    0o644
                }
            },
            None => 0o644,
        };
        let (uid, gid) = match &w.owner {
            Some(a) => match resolve_owner(&a.v, users) {
                Some(o) => o,
                None => {
                    d.error(a.span.clone(), &a.key, format!("owner `{}` cannot be resolved", a.v), "write user:group as root, a user from [[first-boot.users]], or numeric ids like \"0:0\"");
                    (0, 0)
                }
            },
            None => (0, 0),
        };
        write_files.push(WriteFilePlan {
            path: path.v.clone(),
            content: w.content.as_ref().map_or(String::new(), |a| a.v.clone()),
            mode,
            uid,
            gid,
        });
    }
    write_files
}

fn resolve_owner(s: &str, users: &[UserPlan]) -> Option<(u32, u32)> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    let id = |x: &str| -> Option<u32> {
        if x == "root" {
            return Some(0);
        }
        if let Ok(n) = x.parse::<u32>() {
            return Some(n);
        }
        users.iter().find(|p| p.name == x).map(|p| p.uid)
    };
    Some((id(u)?, id(g)?))
}

/// A user's SSH keys and shell (`/bin/bash` unless set); returns the shell.
fn check_user_keys_and_shell(u: &profile::User, d: &mut Diagnostics) -> String {
    for k in &u.ssh_authorized_keys {
        if !is_ssh_public_key(&k.v) {
            d.error(
                k.span.clone(),
                &k.key,
                "not an SSH public key",
                "paste one line of a .pub file, like \"ssh-ed25519 AAAA... you@laptop\"",
            );
        }
    }
    let shell = u
        .shell
        .as_ref()
        .map_or("/bin/bash".to_string(), |a| a.v.clone());
    if !shell.starts_with('/') || shell.chars().any(|c| c.is_whitespace() || c.is_control()) {
        let a = u.shell.as_ref().unwrap();
        d.error(
            a.span.clone(),
            &a.key,
            format!(
                "shell `{}` is not an absolute path without spaces",
                shell.escape_debug()
            ),
            "write a path like \"/bin/bash\"",
        );
    }
    shell
}
