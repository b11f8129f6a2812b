//! `kiln upgrade`: move a cluster to a new k3s release.
//!
//! Two pure steps. [`set_k3s_version`] rewrites `[k3s] version` in the
//! profile text, touching only that value's bytes, and checks the result
//! still plans. [`plans`] renders system-upgrade-controller (SUC) `Plan`
//! manifests that roll the new images out: servers one at a time, then
//! agents one at a time, each node running `kiln-update` on itself.
//!
//! How SUC treats a Plan (rancher/system-upgrade-controller):
//! - `spec.version` becomes `status.latestVersion` with every `+` turned
//!   into `-` (`MungeVersion` in `pkg/upgrade/plan/plan.go`, called from
//!   `pkg/upgrade/handle_upgrade.go`), because `+` is not allowed in an
//!   image tag.
//! - That munged version is appended as the tag only to an image given
//!   *without* a tag; an image that has a tag is used as written
//!   (`WithLatestTag` tests `reference.IsNameOnly`,
//!   `pkg/upgrade/container/container.go`). This applies to both the
//!   `prepare` and `upgrade` containers.
//! - A node counts as done when it carries the label
//!   `plan.upgrade.cattle.io/<plan name>=<hash>`, and the hash is taken over
//!   the latest version and the service account (`DigestStatus`,
//!   `plan.go`). A new version therefore runs the plan on every node again;
//!   so the plan name has to fit a label name (63 characters).
//! - Every container gets the host's `/` at `/host`, and the pod uses the
//!   host's network, PID and IPC namespaces (`pkg/upgrade/job/job.go`).

use std::ffi::CString;
use std::fs;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use toml::de::{DeTable, DeValue};

use crate::config::diag::{Diagnostic, line_col};
use crate::config::plan::Plan;
use crate::config::profile::Role;
use crate::config::types::K3sVersion;
use crate::render::yaml::{self, Y};

/// The API group and version of SUC's `Plan` resource.
pub const SUC_API_VERSION: &str = "upgrade.cattle.io/v1";
/// Namespace and service account created by SUC's own manifest
/// (`system-upgrade-controller.yaml` in its releases).
pub const SUC_NAMESPACE: &str = "system-upgrade";
pub const SUC_SERVICE_ACCOUNT: &str = "system-upgrade";
/// The release manifest that installs SUC (from the k3s automated
/// upgrades documentation, https://docs.k3s.io/upgrades/automated).
pub const SUC_INSTALL_URL: &str = "https://github.com/rancher/system-upgrade-controller/releases/latest/download/system-upgrade-controller.yaml";

/// The image of the upgrade container. It only needs `sh`, `sed` and
/// `chroot`: the real work is `kiln-update`, run on the host through
/// `chroot /host`. It carries a tag, so SUC uses it as written and does not
/// append the k3s version (see the module comment); the Docker official
/// busybox image is busybox's `make defconfig` with every applet installed
/// (`busybox --install /bin`, docker-library/busybox
/// `Dockerfile-builder.template`), which includes `chroot`.
pub const UPGRADE_IMAGE: &str = "busybox:1.36.1";
/// The image of the agents' `prepare` step. Its `prepare <plan>` command
/// waits until the named plan applies to no node and every control-plane
/// node's kubelet reports the plan's version (rancher/k3s-upgrade
/// `scripts/upgrade.sh`); k3s's documented agent plan uses it this way
/// (https://docs.k3s.io/upgrades/automated). It is published with a tag
/// for every k3s release, the release with `+` written as `-`.
pub const PREPARE_IMAGE_REPO: &str = "rancher/k3s-upgrade";
/// Where kiln-update is installed in every image (`rootfs::image_files`).
pub const KILN_UPDATE_PATH: &str = "/usr/bin/kiln-update";
/// The image's description; its `k3s <version>` line names the k3s inside.
pub const IMAGE_INFO_PATH: &str = "/usr/lib/kiln/image";
/// The node label that carries a node's role (`server` or `agent`). The
/// renderer (`render::k3s::ROLE_LABEL`, private there) puts it on every
/// node; a test here checks the two agree.
pub const ROLE_LABEL: &str = "kiln.dev/role";
/// Plan names end up in node label names, which allow 63 characters.
pub const PLAN_NAME_MAX_CHARS: usize = 63;

// ---------------------------------------------------------------------------
// The profile edit

/// Set `[k3s] version` in a profile's text to `new`.
///
/// Returns the old version as written and the new text. Only the bytes of
/// the old value change: comments, key order and formatting are kept. The
/// new text must still plan, or its diagnostics are returned.
pub fn set_k3s_version(path: &Path, text: &str, new: &str) -> anyhow::Result<(String, String)> {
    let file = path.display().to_string();
    let new = K3sVersion::parse(new.trim()).map_err(|e| {
        anyhow!(
            "{}: expected the form vX.Y.Z+k3sN\n    fix: {}",
            e.message,
            e.hint
        )
    })?;

    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            // The planner reports syntax errors with file, line and column.
            crate::config::plan::plan_profile(path, text)?;
            return Err(anyhow!("{file}: {}", e.message().trim()));
        }
    };
    let add_hint = format!("add\n\n[k3s]\nversion = \"{new}\"\n\nto {file}");
    let Some(k3s) = root.get_ref().get("k3s") else {
        return Err(diagnostic(
            &file,
            text,
            0..0,
            "k3s",
            "no [k3s] table: there is no version to change",
            &add_hint,
        ));
    };
    let DeValue::Table(k3s_table) = k3s.get_ref() else {
        return Err(diagnostic(
            &file,
            text,
            k3s.span(),
            "k3s",
            "`k3s` is not a table",
            &add_hint,
        ));
    };
    let Some(version) = k3s_table.get("version") else {
        return Err(diagnostic(
            &file,
            text,
            k3s.span(),
            "k3s.version",
            "the [k3s] table has no `version`",
            &format!("add `version = \"{new}\"` under [k3s] in {file}"),
        ));
    };
    let DeValue::String(old) = version.get_ref() else {
        return Err(diagnostic(
            &file,
            text,
            version.span(),
            "k3s.version",
            "`k3s.version` is not a string",
            &format!("write it as `version = \"{new}\"`"),
        ));
    };
    let old = old.to_string();
    if K3sVersion::parse(&old).is_ok_and(|v| v == new) {
        bail!("{file}: k3s.version is already at {new}: nothing to change");
    }

    let span = version.span();
    // Keep the quoting style: a literal string stays a literal string.
    let quote = if text[span.clone()].starts_with('\'') {
        '\''
    } else {
        '"'
    };
    let mut new_text = String::with_capacity(text.len() + 8);
    new_text.push_str(&text[..span.start]);
    new_text.push(quote);
    new_text.push_str(&new.to_string());
    new_text.push(quote);
    new_text.push_str(&text[span.end..]);

    crate::config::plan::plan_profile(path, &new_text)
        .with_context(|| format!("{file} no longer plans with k3s.version = \"{new}\""))?;
    Ok((old, new_text))
}

fn diagnostic(
    file: &str,
    text: &str,
    span: Range<usize>,
    key: &str,
    message: &str,
    hint: &str,
) -> anyhow::Error {
    let (line, column) = line_col(text, span.start);
    anyhow!(
        "{}",
        Diagnostic {
            file: file.to_string(),
            line,
            column,
            key: key.to_string(),
            message: message.to_string(),
            hint: hint.to_string(),
        }
    )
}

// ---------------------------------------------------------------------------
// The SUC plans

/// The name of a cluster's plan for one role: `kiln-<cluster>-servers` or
/// `kiln-<cluster>-agents`, made a valid DNS label of at most
/// [`PLAN_NAME_MAX_CHARS`] characters.
pub fn plan_name(cluster: &str, role: Role) -> String {
    let suffix = match role {
        Role::Server => "-servers",
        Role::Agent => "-agents",
    };
    let mut middle: String = cluster
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    middle.truncate(PLAN_NAME_MAX_CHARS - "kiln-".len() - suffix.len());
    let middle = middle.trim_matches('-');
    if middle.is_empty() {
        format!("kiln{suffix}")
    } else {
        format!("kiln-{middle}{suffix}")
    }
}

/// The image tag SUC derives from a version (`+` becomes `-`).
pub fn image_tag(version: &K3sVersion) -> String {
    version.to_string().replace('+', "-")
}

/// The upgrade container's shell script. `$1` is the k3s version the plan
/// installs; the rest are kiln-update's arguments.
///
/// kiln-update reboots the node, which kills the job's pod, and the Job
/// then runs the pod again after the reboot. So the script first checks
/// what the running image carries and succeeds at once if it is already
/// the target: that is what lets SUC mark the node done.
fn upgrade_script() -> String {
    format!(
        "want=\"$1\"; shift; \
         have=\"$(sed -n 's/^k3s //p' /host{IMAGE_INFO_PATH})\"; \
         if [ \"$have\" = \"$want\" ]; then echo \"kiln: this node runs k3s $want already\"; exit 0; fi; \
         echo \"kiln: k3s ${{have:-unknown}} -> $want\"; \
         exec chroot /host {KILN_UPDATE_PATH} \"$@\""
    )
}

fn kv(k: &str, v: Y) -> (String, Y) {
    (k.to_string(), v)
}

fn plan_doc(plan: &Plan, server_url: &str, role: Role) -> Vec<(String, Y)> {
    let version = plan.k3s.version.to_string();
    let mut spec = vec![
        kv("concurrency", Y::Int(1)),
        kv("version", Y::str(&version)),
        kv("serviceAccountName", Y::str(SUC_SERVICE_ACCOUNT)),
        kv(
            "nodeSelector",
            Y::Map(vec![kv(
                "matchExpressions",
                Y::List(vec![Y::Map(vec![
                    kv("key", Y::str(ROLE_LABEL)),
                    kv("operator", Y::str("In")),
                    kv("values", Y::strs([role.as_str()])),
                ])]),
            )]),
        ),
        // Nodes may carry taints from the profile; the job is pinned to its
        // node anyway, so it tolerates them all.
        kv(
            "tolerations",
            Y::List(vec![Y::Map(vec![kv("operator", Y::str("Exists"))])]),
        ),
        kv("cordon", Y::Bool(true)),
    ];
    if role == Role::Agent {
        spec.push(kv(
            "prepare",
            Y::Map(vec![
                kv(
                    "image",
                    Y::str(format!(
                        "{PREPARE_IMAGE_REPO}:{}",
                        image_tag(&plan.k3s.version)
                    )),
                ),
                kv(
                    "args",
                    Y::strs(["prepare", &plan_name(&plan.cluster, Role::Server)]),
                ),
            ]),
        ));
        spec.push(kv(
            "drain",
            Y::Map(vec![
                kv("force", Y::Bool(true)),
                kv("ignoreDaemonSets", Y::Bool(true)),
                kv("deleteEmptydirData", Y::Bool(true)),
            ]),
        ));
    }
    let script = upgrade_script();
    let command = ["sh", "-c", &script, "kiln-upgrade", &version];
    spec.push(kv(
        "upgrade",
        Y::Map(vec![
            kv("image", Y::str(UPGRADE_IMAGE)),
            kv("command", Y::strs(command)),
            kv("args", Y::strs(["--server", server_url, "--reboot"])),
        ]),
    ));
    vec![
        kv("apiVersion", Y::str(SUC_API_VERSION)),
        kv("kind", Y::str("Plan")),
        kv(
            "metadata",
            Y::Map(vec![
                kv("name", Y::str(plan_name(&plan.cluster, role))),
                kv("namespace", Y::str(SUC_NAMESPACE)),
            ]),
        ),
        kv("spec", Y::Map(spec)),
    ]
}

/// SUC `Plan` manifests that upgrade every node of `plan` to its k3s
/// version with `kiln-update --server <server_url> --reboot`: one YAML
/// stream with a plan for the servers and one for the agents.
pub fn plans(plan: &Plan, server_url: &str) -> String {
    let version = &plan.k3s.version;
    let servers = plan_name(&plan.cluster, Role::Server);
    let agents = plan_name(&plan.cluster, Role::Agent);
    let mut out = format!(
        "# kiln: upgrade cluster {cluster} to k3s {version}, one node at a time.\n\
         # Each node runs `kiln-update --server {server_url} --reboot` on the host:\n\
         # the new image goes into its inactive A/B slot and the node reboots into\n\
         # it (and falls back to the old slot if k3s does not come up).\n\
         # Servers first ({servers}), then agents ({agents}).\n\
         #\n\
         # Needs system-upgrade-controller in the cluster:\n\
         #   kubectl apply -f {SUC_INSTALL_URL}\n\
         # and `kiln serve` reachable at {server_url} with the new build.\n\
         # Then: kubectl apply -f <this file>\n\
         # Watch: kubectl -n {SUC_NAMESPACE} get plans,jobs\n",
        cluster = plan.cluster,
    );
    out.push_str(
        "---\n\
         # Servers are cordoned, not drained: draining the only control-plane\n\
         # node of a small cluster can wait forever on pods that have nowhere\n\
         # else to go.\n",
    );
    out.push_str(&yaml::to_string(&plan_doc(plan, server_url, Role::Server)));
    out.push_str(
        "---\n\
         # Agents wait for every server to run the new version (prepare), and\n\
         # are drained before their update.\n",
    );
    out.push_str(&yaml::to_string(&plan_doc(plan, server_url, Role::Agent)));
    out
}

// ---------------------------------------------------------------------------
// Writing the profile back

/// Mode of a file [`replace_file`] creates (one that did not exist): what a
/// umask of 022 gives, set explicitly so the caller's umask does not matter.
pub const NEW_FILE_MODE: u32 = 0o644;

/// A profile read for an edit: the file the user named, the file it really
/// is (symlinks resolved), and the bytes kiln read from it.
///
/// [`ProfileEdit::publish`] writes the new text only if the file still
/// holds what was read, so an edit the user saved in between is kept.
#[derive(Debug)]
pub struct ProfileEdit {
    path: PathBuf,
    target: PathBuf,
    text: String,
}

impl ProfileEdit {
    /// Read `path` (following symlinks) for an edit.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let target = resolve(path)?;
        let text = fs::read_to_string(&target)
            .with_context(|| format!("reading {}", shown(path, &target)))?;
        Ok(ProfileEdit {
            path: path.to_path_buf(),
            target,
            text,
        })
    }

    /// The text as read.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Write `new_text` over the file read, as [`replace_file`] does, unless
    /// the file no longer holds the text read: then nothing is written.
    pub fn publish(self, new_text: &str) -> anyhow::Result<()> {
        write_file(
            &self.path,
            &self.target,
            Some(self.text.as_bytes()),
            new_text.as_bytes(),
        )
    }
}

/// `kiln upgrade --k3s`: set `[k3s] version` in the profile at `path` to
/// `new` (see [`set_k3s_version`]) and write it back (see
/// [`ProfileEdit::publish`]). Returns the old version and the new text.
pub fn write_k3s_version(path: &Path, new: &str) -> anyhow::Result<(String, String)> {
    let edit = ProfileEdit::read(path)?;
    let (old, new_text) = set_k3s_version(path, edit.text(), new)?;
    edit.publish(&new_text)?;
    Ok((old, new_text))
}

/// Write `text` to `path`, the file it names through any symlinks.
///
/// An existing file keeps its inode's identity as the user sees it: the
/// symlink stays a symlink, owner, group and mode are kept, and a file with
/// hard links is rewritten in place (so every name still shows the same
/// file); otherwise a temporary file beside it, with the old file's owner,
/// group and mode, is synced and renamed over it, and the directory synced.
/// A new file gets [`NEW_FILE_MODE`]. A file its owner may not write, or
/// this user may not, is refused with nothing written.
pub fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let target = resolve(path)?;
    write_file(path, &target, None, text.as_bytes())
}

/// The file `path` names, symlinks resolved; `path` itself if it does not
/// exist yet.
fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    match fs::canonicalize(path) {
        Ok(target) => Ok(target),
        Err(e) if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(path).is_err() => {
            Ok(path.to_path_buf())
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "resolving {} (a symlink to a file that does not exist?)\n    \
                 fix: point it at the profile, or name the profile itself",
                path.display()
            )
        }),
    }
}

/// How errors name the file: as the user gave it, and where it leads.
fn shown(path: &Path, target: &Path) -> String {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        format!("{} (-> {})", path.display(), target.display())
    } else {
        path.display().to_string()
    }
}

/// `target`'s directory (`.` for a bare file name).
fn parent_dir(target: &Path) -> &Path {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `access(2)` for `mode` (`libc::W_OK`, ...): may this process do that?
fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::access(c_path.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Write `bytes` to `target` (what `path` names): in place if it has hard
/// links, else by renaming a synced copy over it. With `expected`, refuse
/// if the file no longer holds those bytes.
fn write_file(
    path: &Path,
    target: &Path,
    expected: Option<&[u8]>,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let name = shown(path, target);
    let meta = match fs::metadata(target) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound && expected.is_none() => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("{name} was removed while kiln upgrade ran; nothing written; run it again")
        }
        Err(e) => return Err(e).with_context(|| format!("reading the metadata of {name}")),
    };
    if let Some(meta) = &meta {
        ensure_writable(target, meta, &name)?;
    }
    match &meta {
        Some(meta) if meta.nlink() > 1 => write_in_place(target, expected, bytes, &name),
        _ => write_by_rename(target, meta.as_ref(), expected, bytes, &name),
    }
}

/// Refuse a file that is not a regular file, has no owner write bit, or
/// that this process may not write.
fn ensure_writable(target: &Path, meta: &fs::Metadata, name: &str) -> anyhow::Result<()> {
    if !meta.is_file() {
        bail!("{name} is not a regular file; nothing written");
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o200 == 0 {
        bail!(
            "{name} is read-only (mode {mode:04o}); nothing written\n    \
             fix: if kiln may change it, run `chmod u+w {}` and run kiln again",
            target.display()
        );
    }
    access(target, libc::W_OK).map_err(|e| {
        anyhow!(
            "{name} is not writable by this user ({e}; it belongs to uid {} gid {}, mode \
             {mode:04o}); nothing written\n    fix: run kiln as its owner, or give yourself \
             write access to {}",
            meta.uid(),
            meta.gid(),
            target.display()
        )
    })
}

/// The same-change check: the file must still hold what was read.
fn ensure_unchanged(now: &[u8], expected: Option<&[u8]>, name: &str) -> anyhow::Result<()> {
    match expected {
        Some(expected) if now != expected => bail!(
            "{name} changed while kiln upgrade ran; nothing written; run it again\n    \
             (your change is kept; kiln edits the file as it finds it)"
        ),
        _ => Ok(()),
    }
}

/// Rewrite a file with hard links through its own inode, so all its names
/// keep showing the same file (a rename would leave the others with the
/// old text). Not atomic: a crash mid-write can leave it partly written,
/// which is the price of keeping the links.
fn write_in_place(
    target: &Path,
    expected: Option<&[u8]>,
    bytes: &[u8],
    name: &str,
) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .with_context(|| format!("opening {name} to rewrite it in place (it has hard links)"))?;
    let mut now = Vec::new();
    file.read_to_end(&mut now)
        .with_context(|| format!("reading {name}"))?;
    ensure_unchanged(&now, expected, name)?;
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(bytes))
        .and_then(|()| file.set_len(bytes.len() as u64))
        .and_then(|()| file.sync_all())
        .with_context(|| {
            format!("rewriting {name} in place (it has hard links); check its contents")
        })
}

/// Write a temporary file beside `target` with its owner, group and mode,
/// sync it, check `target` still holds `expected`, rename it over `target`
/// and sync the directory.
fn write_by_rename(
    target: &Path,
    meta: Option<&fs::Metadata>,
    expected: Option<&[u8]>,
    bytes: &[u8],
    name: &str,
) -> anyhow::Result<()> {
    let dir = parent_dir(target);
    access(dir, libc::W_OK | libc::X_OK).map_err(|e| {
        anyhow!(
            "cannot create a file in {} to replace {name} ({e}); nothing written\n    \
             fix: make {} writable for this user (kiln writes a new copy beside the file and \
             renames it over the old one)",
            dir.display(),
            dir.display()
        )
    })?;
    let file_name = target
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".kiln-tmp")
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "creating a temporary file in {} to replace {name}",
                dir.display()
            )
        })?;
    let tmp_name = tmp.path().display().to_string();
    tmp.write_all(bytes)
        .with_context(|| format!("writing {tmp_name}"))?;
    let file = tmp.as_file();
    let mode = match meta {
        Some(meta) => {
            // Owner first: chown may clear set-id bits that chmod then restores.
            let own = file
                .metadata()
                .with_context(|| format!("reading the metadata of {tmp_name}"))?;
            if (own.uid(), own.gid()) != (meta.uid(), meta.gid()) {
                std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid())).with_context(
                    || {
                        format!(
                            "giving the new copy of {name} its owner uid {} gid {}; nothing \
                             written\n    fix: run kiln as the file's owner or as root",
                            meta.uid(),
                            meta.gid()
                        )
                    },
                )?;
            }
            meta.mode() & 0o7777
        }
        None => NEW_FILE_MODE,
    };
    file.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("finishing {tmp_name}"))?;
    if expected.is_some() {
        let now = fs::read(target).with_context(|| format!("reading {name} again"))?;
        ensure_unchanged(&now, expected, name)?;
    }
    tmp.persist(target)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming {tmp_name} over {name}"))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {} after replacing {name}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize as _;
    use serde_yaml::Value;

    const PROFILE: &str = "\
# The lab cluster.
[cluster]
name = \"lab\"   # short

[k3s]
# pinned on purpose
version   =   \"v1.31.1+k3s1\"  # the release we run
disable = [\"traefik\"]

[[nodes]]
name = \"s1\"
role = \"server\"
lan-address = \"192.168.1.11\"

[[nodes]]
name = \"a1\"
role = \"agent\"
";

    fn path() -> &'static Path {
        Path::new("lab.toml")
    }

    fn lab_plan() -> Plan {
        crate::config::plan::plan_profile(path(), PROFILE).unwrap()
    }

    fn changed_lines<'a>(a: &'a str, b: &'a str) -> Vec<(&'a str, &'a str)> {
        assert_eq!(a.lines().count(), b.lines().count());
        a.lines().zip(b.lines()).filter(|(x, y)| x != y).collect()
    }

    #[test]
    fn changes_only_the_version_value() {
        let (old, text) = set_k3s_version(path(), PROFILE, "v1.31.2+k3s1").unwrap();
        assert_eq!(old, "v1.31.1+k3s1");
        assert_eq!(
            changed_lines(PROFILE, &text),
            vec![(
                "version   =   \"v1.31.1+k3s1\"  # the release we run",
                "version   =   \"v1.31.2+k3s1\"  # the release we run"
            )]
        );
        let plan = crate::config::plan::plan_profile(path(), &text).unwrap();
        assert_eq!(plan.k3s.version.to_string(), "v1.31.2+k3s1");
    }

    #[test]
    fn keeps_literal_strings_and_inline_tables() {
        let src = "k3s = { disable = [\"traefik\"], version = 'v1.31.1+k3s1' } # inline\n\
                   [cluster]\nname = \"lab\"\n[[nodes]]\nname = \"s1\"\nrole = \"server\"\n";
        // The profile reader accepts the inline form.
        crate::config::plan::plan_profile(path(), src).unwrap();
        let (old, text) = set_k3s_version(path(), src, "v1.32.0+k3s2").unwrap();
        assert_eq!(old, "v1.31.1+k3s1");
        assert_eq!(
            changed_lines(src, &text),
            vec![(
                "k3s = { disable = [\"traefik\"], version = 'v1.31.1+k3s1' } # inline",
                "k3s = { disable = [\"traefik\"], version = 'v1.32.0+k3s2' } # inline"
            )]
        );
    }

    #[test]
    fn dotted_keys_work_too() {
        let src = "k3s.version = \"v1.31.1+k3s1\"\n[cluster]\nname = \"lab\"\n\
                   [[nodes]]\nname = \"s1\"\nrole = \"server\"\n";
        crate::config::plan::plan_profile(path(), src).unwrap();
        let (_, text) = set_k3s_version(path(), src, "v1.31.3+k3s1").unwrap();
        assert_eq!(changed_lines(src, &text).len(), 1);
        assert!(text.starts_with("k3s.version = \"v1.31.3+k3s1\"\n"));
    }

    #[test]
    fn rejects_bad_versions() {
        for bad in ["1.31.2+k3s1", "v1.31.2", "v1.31.2-k3s1", "latest", ""] {
            let e = set_k3s_version(path(), PROFILE, bad).unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains("vX.Y.Z+k3sN"), "{bad}: {msg}");
        }
    }

    #[test]
    fn rejects_the_same_version() {
        let e = set_k3s_version(path(), PROFILE, "v1.31.1+k3s1").unwrap_err();
        assert!(e.to_string().contains("already at v1.31.1+k3s1"), "{e}");
    }

    #[test]
    fn missing_table_or_key_says_what_to_add() {
        let no_table = "[cluster]\nname = \"lab\"\n";
        let e = set_k3s_version(path(), no_table, "v1.31.2+k3s1").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("lab.toml:1:1:"), "{msg}");
        assert!(msg.contains("[k3s]\nversion = \"v1.31.2+k3s1\""), "{msg}");

        let no_key = "[cluster]\nname = \"lab\"\n[k3s]\ndisable = [\"traefik\"]\n";
        let e = set_k3s_version(path(), no_key, "v1.31.2+k3s1").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("lab.toml:"), "{msg}");
        assert!(msg.contains("k3s.version"), "{msg}");
        assert!(msg.contains("version = \"v1.31.2+k3s1\""), "{msg}");
    }

    #[test]
    fn a_profile_that_does_not_plan_is_reported() {
        // Valid TOML, but no nodes: the edit is made, planning fails.
        let src = "[cluster]\nname = \"lab\"\n[k3s]\nversion = \"v1.31.1+k3s1\"\n";
        let e = set_k3s_version(path(), src, "v1.31.2+k3s1").unwrap_err();
        assert!(format!("{e:#}").contains("nodes"), "{e:#}");
        // A syntax error is reported with its position.
        let e = set_k3s_version(path(), "[k3s\nversion = 1", "v1.31.2+k3s1").unwrap_err();
        assert!(format!("{e:#}").contains("lab.toml:1:"), "{e:#}");
    }

    fn documents(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect()
    }

    fn s(v: &Value) -> &str {
        v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
    }

    #[test]
    fn plans_are_two_suc_plans() {
        let plan = lab_plan();
        let url = "http://192.168.1.2:8080";
        let text = plans(&plan, url);
        assert!(text.starts_with("# kiln: upgrade cluster lab"));
        assert!(text.contains("kubectl apply -f"));
        assert!(text.contains("system-upgrade-controller"));
        let docs = documents(&text);
        assert_eq!(docs.len(), 2);
        let names: Vec<&str> = docs.iter().map(|d| s(&d["metadata"]["name"])).collect();
        assert_eq!(names, ["kiln-lab-servers", "kiln-lab-agents"]);
        for (d, role) in docs.iter().zip(["server", "agent"]) {
            assert_eq!(s(&d["apiVersion"]), "upgrade.cattle.io/v1");
            assert_eq!(s(&d["kind"]), "Plan");
            assert_eq!(s(&d["metadata"]["namespace"]), "system-upgrade");
            let spec = &d["spec"];
            assert_eq!(s(&spec["serviceAccountName"]), "system-upgrade");
            assert_eq!(spec["concurrency"].as_i64(), Some(1));
            assert_eq!(spec["cordon"].as_bool(), Some(true));
            assert_eq!(s(&spec["version"]), plan.k3s.version.to_string());
            let sel = &spec["nodeSelector"]["matchExpressions"];
            assert_eq!(sel.as_sequence().unwrap().len(), 1);
            assert_eq!(s(&sel[0]["key"]), "kiln.dev/role");
            assert_eq!(s(&sel[0]["operator"]), "In");
            assert_eq!(
                sel[0]["values"].as_sequence().unwrap(),
                &[Value::from(role)]
            );

            let up = &spec["upgrade"];
            assert_eq!(s(&up["image"]), UPGRADE_IMAGE);
            let args: Vec<&str> = up["args"].as_sequence().unwrap().iter().map(s).collect();
            assert_eq!(args, ["--server", url, "--reboot"]);
            let command: Vec<&str> = up["command"].as_sequence().unwrap().iter().map(s).collect();
            assert_eq!(command[..2], ["sh", "-c"]);
            assert!(command[2].contains("chroot /host /usr/bin/kiln-update \"$@\""));
            assert_eq!(command.last(), Some(&"v1.31.1+k3s1"));
        }
        let (servers, agents) = (&docs[0]["spec"], &docs[1]["spec"]);
        assert!(servers.get("drain").is_none());
        assert!(servers.get("prepare").is_none());
        let drain = &agents["drain"];
        assert_eq!(drain["force"].as_bool(), Some(true));
        assert_eq!(drain["ignoreDaemonSets"].as_bool(), Some(true));
        assert_eq!(drain["deleteEmptydirData"].as_bool(), Some(true));
        let prepare = &agents["prepare"];
        assert_eq!(s(&prepare["image"]), "rancher/k3s-upgrade:v1.31.1-k3s1");
        let args: Vec<&str> = prepare["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(s)
            .collect();
        assert_eq!(args, ["prepare", "kiln-lab-servers"]);
    }

    #[test]
    fn server_urls_are_quoted_safely() {
        let url = "http://hub:8080/#x: 'y'";
        let docs = documents(&plans(&lab_plan(), url));
        assert_eq!(s(&docs[1]["spec"]["upgrade"]["args"][1]), url);
    }

    #[test]
    fn plan_names_are_dns_labels() {
        let long = "c".repeat(63);
        for cluster in ["lab", long.as_str(), "Lab_2", "-x-"] {
            for role in [Role::Server, Role::Agent] {
                let n = plan_name(cluster, role);
                assert!(crate::config::types::is_dns_label(&n), "{n}");
                assert!(n.len() <= PLAN_NAME_MAX_CHARS, "{n}");
                assert!(n.starts_with("kiln-") || n.starts_with("kiln"), "{n}");
            }
        }
        assert_eq!(plan_name("Lab_2", Role::Agent), "kiln-lab-2-agents");
        assert_ne!(
            plan_name(&long, Role::Server),
            plan_name(&long, Role::Agent)
        );
    }

    #[test]
    fn role_label_matches_the_rendered_nodes() {
        let plan = lab_plan();
        let ca = crate::config::cluster_ca::ClusterCa::generate(time::OffsetDateTime::now_utc())
            .unwrap();
        for node in &plan.nodes {
            let secrets = crate::render::NodeSecrets {
                private_key: crate::config::secrets::PrivateKey::from_bytes([7; 32]),
                public_keys: Default::default(),
                token: crate::config::types::K3sToken::new("t"),
                cluster_ca: ca.clone(),
                node_password: crate::config::secrets::NodePassword::from_bytes([8; 16]),
                ssh_host_key: crate::config::secrets::SshHostKey::from_seed([9; 32], "n"),
                operator_keys: Default::default(),
            };
            let files = crate::render::render_node(&plan, node, &secrets);
            let config = files.tree.text("/etc/rancher/k3s/config.yaml").unwrap();
            let label = format!("{ROLE_LABEL}={}", node.role.as_str());
            assert!(config.contains(&label), "{config}");
        }
    }

    #[test]
    fn image_tags_munge_plus() {
        let v = K3sVersion::parse("v1.31.2+k3s1").unwrap();
        assert_eq!(image_tag(&v), "v1.31.2-k3s1");
    }

    #[test]
    fn upgrade_script_runs_in_sh() {
        // The guard and the hand-off, run by a real shell against a fake host.
        let dir = tempfile::tempdir().unwrap();
        let script = upgrade_script()
            .replace("/host/", &format!("{}/", dir.path().display()))
            .replace("exec chroot /host ", "exec echo RUN ");
        std::fs::create_dir_all(dir.path().join("usr/lib/kiln")).unwrap();
        std::fs::write(
            dir.path().join("usr/lib/kiln/image"),
            "kiln 0.1.0\nk3s v1.31.1+k3s1\n",
        )
        .unwrap();
        let run = |want: &str| {
            std::process::Command::new("sh")
                .args(["-c", &script, "kiln-upgrade", want, "--server", "u"])
                .output()
                .unwrap()
        };
        let same = run("v1.31.1+k3s1");
        assert!(same.status.success());
        assert!(String::from_utf8_lossy(&same.stdout).contains("already"));
        // A different version hands its arguments to kiln-update.
        let other = run("v1.31.2+k3s1");
        assert!(other.status.success());
        let out = String::from_utf8_lossy(&other.stdout);
        assert!(out.contains("k3s v1.31.1+k3s1 -> v1.31.2+k3s1"), "{out}");
        assert!(
            out.contains("RUN /usr/bin/kiln-update --server u\n"),
            "{out}"
        );
    }
}
