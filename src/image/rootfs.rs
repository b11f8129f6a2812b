//! The root image: the base tarball, the overlays, the k3s binary, the
//! image tarballs k3s imports (in `/usr/lib/kiln/images`, see
//! `render::airgap`) and kiln's own image files, streamed as one tar into
//! `tar2sqfs`, which writes a zstd squashfs. Rootless: nothing is unpacked, owners, modes,
//! device nodes, hard links and xattrs come from the tar headers.
//!
//! Why tar2sqfs (squashfs-tools-ng) and not the `backhand` crate: it
//! keeps hard links and xattrs (backhand makes copies and drops xattrs),
//! and it compresses on every core (DESIGN.md measured both).
//!
//! On the way through, the stream:
//! - drops build-host state every node would otherwise share (SSH host
//!   keys, host name, machine id, the iSCSI initiator name, Debian's own
//!   initrd);
//! - moves `/var` into `/usr/share/kiln/factory/var`: `/var` is the
//!   state partition, seeded from the factory copy by systemd-tmpfiles
//!   (`C`, copy if missing), while the package manager's state
//!   (`var/lib/dpkg`, …) is a link into the factory, so it always matches
//!   the `/usr` of the slot that booted;
//! - clamps every mtime to `SOURCE_DATE_EPOCH`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};

use crate::config::plan::SLOT_IMAGES_DIR;
use crate::inputs::airgap::ImageTarball;
use crate::render::tree::{Entry, FileTree};
use crate::util::cancel::Cancel;
use crate::util::tool::Tool;

pub const TAR2SQFS: Tool = Tool::new("tar2sqfs", "squashfs-tools-ng");
/// Where the image's own `/var` is kept.
pub const FACTORY_VAR: &str = "usr/share/kiln/factory/var";
/// Where the k3s binary goes.
pub const K3S_PATH: &str = "usr/local/bin/k3s";
/// Where `kiln-relay` goes (`render::relay::RELAY_BINARY`).
pub const RELAY_PATH: &str = "usr/lib/kiln/kiln-relay";
/// squashfs block size: 128 KiB, the size DESIGN.md measured.
pub const BLOCK_BYTES: u32 = 128 * 1024;
/// Package-manager state linked (not copied) from the factory.
const LINKED_VAR: [&str; 3] = ["var/lib/dpkg", "var/lib/apt", "var/cache/debconf"];
/// `/var` directories whose children are seeded one by one.
const SPLIT_VAR: [&str; 4] = ["var/lib", "var/cache", "var/log", "var/spool"];

/// Build-host state dropped from the base: every node would share it.
fn is_host_state(path: &str) -> bool {
    path == "etc/hostname"
        || path == "etc/machine-id"
        || path == "var/lib/dbus/machine-id"
        || path.starts_with("etc/ssh/ssh_host_")
        || path.starts_with("boot/initrd.img")
        // open-iscsi's postinst names the initiator when the base is made:
        // every node would log in to iSCSI targets under one name. A node
        // with storage makes its own (`render::storage`).
        || path == ISCSI_BASE_INITIATOR_NAME
}

/// The initiator name open-iscsi's postinst writes into the base.
pub const ISCSI_BASE_INITIATOR_NAME: &str = "etc/iscsi/initiatorname.iscsi";

/// What goes into a root image.
pub struct RootInputs<'a> {
    pub base: &'a Path,
    /// Overlay directories, later ones win.
    pub overlays: Vec<PathBuf>,
    pub k3s: &'a Path,
    /// Image tarballs for k3s to import, into [`SLOT_IMAGES_DIR`].
    pub images: &'a [ImageTarball],
    /// `kiln-relay`, into [`RELAY_PATH`], when a node uses it.
    pub relay: Option<&'a Path>,
    /// kiln's own files in the image (units, masks, version).
    pub image_files: FileTree,
    pub mtime: u64,
    pub level: i32,
}

#[derive(Debug, Clone)]
pub struct RootImage {
    pub path: PathBuf,
    pub size: u64,
}

/// One file added on top of the base.
enum Added {
    Dir(u32),
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        source: Source,
    },
    Symlink(String),
}

enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// kiln's files for every image: masks, default target and the factory /var.
/// (k3s's node password and the SSH host key come with each node's seed.)
pub fn image_files(version_text: &str) -> FileTree {
    let mut t = FileTree::new();
    t.symlink(
        "/etc/systemd/system/default.target",
        "/lib/systemd/system/multi-user.target",
    );
    // The root is a read-only squashfs: nothing to check or remount.
    t.symlink("/etc/systemd/system/systemd-fsck-root.service", "/dev/null");
    t.symlink(
        "/etc/systemd/system/systemd-remount-fs.service",
        "/dev/null",
    );
    // No package updates on an immutable node.
    t.symlink("/etc/systemd/system/apt-daily.timer", "/dev/null");
    t.symlink("/etc/systemd/system/apt-daily-upgrade.timer", "/dev/null");
    t.file(
        "/etc/tmpfiles.d/kiln.conf",
        0o644,
        "# kiln: state that must survive reboots\nd /var/lib/kiln 0755 root root -\n",
    );
    t.file("/etc/machine-id", 0o444, "");
    t.file("/usr/lib/kiln/image", 0o644, version_text.to_string());
    // A/B updates: the command, and the check that keeps a new slot once
    // k3s is active (or reports a failed update).
    t.file("/usr/bin/kiln-update", 0o755, UPDATE_SCRIPT);
    // Installing from a boot stick onto the machine's own disk, by hand
    // or unattended (the node's /etc/kiln/install, from the profile).
    t.file("/usr/bin/kiln-install", 0o755, INSTALL_SCRIPT);
    t.file(
        "/usr/lib/systemd/system/kiln-install.service",
        0o644,
        INSTALL_UNIT,
    );
    t.symlink(
        "/etc/systemd/system/multi-user.target.wants/kiln-install.service",
        "/usr/lib/systemd/system/kiln-install.service",
    );
    t.file("/usr/lib/kiln/boot-check", 0o755, BOOT_CHECK_SCRIPT);
    t.file(
        "/usr/lib/systemd/system/kiln-boot-check.service",
        0o644,
        BOOT_CHECK_UNIT,
    );
    t.symlink(
        "/etc/systemd/system/multi-user.target.wants/kiln-boot-check.service",
        "/usr/lib/systemd/system/kiln-boot-check.service",
    );
    t
}

/// `kiln-update`, shipped in every image.
pub const UPDATE_SCRIPT: &str = include_str!("rootfs/kiln-update.sh");
/// `kiln-install`, shipped in every image.
pub const INSTALL_SCRIPT: &str = include_str!("rootfs/kiln-install.sh");
/// Runs `kiln-install --unattended` when the node's seed asks for it;
/// before k3s, which would otherwise start on the stick it leaves.
pub const INSTALL_UNIT: &str = "[Unit]
Description=kiln: install this node onto its own disk (install-device in the profile)
ConditionPathExists=/etc/kiln/install
After=local-fs.target
Before=k3s.service

[Service]
Type=oneshot
ExecStart=/usr/bin/kiln-install --unattended
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
";
/// Blesses a trial slot once k3s is active; reports failed updates.
pub const BOOT_CHECK_SCRIPT: &str = include_str!("rootfs/boot-check.sh");
pub const BOOT_CHECK_UNIT: &str = "[Unit]
Description=kiln: keep this A/B slot once k3s is active, report failed updates
After=k3s.service
ConditionPathExists=/sys/firmware/efi

[Service]
Type=simple
ExecStart=/usr/lib/kiln/boot-check
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
";

fn collect_overlay(dir: &Path, rel: &str, out: &mut BTreeMap<String, Added>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading overlay {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        if rel.is_empty() && (name == ".gitkeep" || name == "README.md") {
            continue;
        }
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs_err::symlink_metadata(e.path())?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            out.insert(
                path,
                Added::Symlink(fs_err::read_link(e.path())?.to_string_lossy().to_string()),
            );
        } else if meta.is_dir() {
            out.insert(path.clone(), Added::Dir(mode));
            collect_overlay(&e.path(), &path, out)?;
        } else if meta.is_file() {
            // Overlay files belong to root whoever checked them out.
            out.insert(
                path,
                Added::File {
                    mode,
                    uid: 0,
                    gid: 0,
                    source: Source::Path(e.path()),
                },
            );
        } else {
            bail!(
                "{} is not a file, directory or symlink; overlays hold only those",
                e.path().display()
            );
        }
    }
    Ok(())
}

/// The overlays as one file tree (later ones win), contents read: what
/// they add to a root image, for the stage key of the root
/// (`build::stage_key::tree_digest`).
pub fn overlay_tree(overlays: &[PathBuf]) -> anyhow::Result<FileTree> {
    let mut added = BTreeMap::new();
    for o in overlays {
        collect_overlay(o, "", &mut added)?;
    }
    let mut tree = FileTree::new();
    for (path, a) in added {
        let path = format!("/{path}");
        match a {
            Added::Dir(mode) => tree.dir(&path, mode),
            Added::Symlink(target) => tree.symlink(&path, &target),
            Added::File {
                mode,
                uid,
                gid,
                source,
            } => {
                let content = match source {
                    Source::Path(p) => fs_err::read(p)?,
                    Source::Bytes(b) => b,
                };
                tree.file_owned(&path, mode, uid, gid, content);
            }
        }
    }
    Ok(tree)
}

fn open_base(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    let f = std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(path)
            .with_context(|| format!("opening base tarball {}", path.display()))?,
    );
    let name = path.to_string_lossy();
    Ok(if name.ends_with(".zst") || name.ends_with(".zstd") {
        Box::new(zstd::stream::read::Decoder::with_buffer(f)?)
    } else {
        Box::new(f)
    })
}

/// Map a base path into the image: `/var` moves to the factory.
fn relocate(path: &str) -> String {
    match path.strip_prefix("var/") {
        Some(rest) if !rest.is_empty() => format!("{FACTORY_VAR}/{rest}"),
        _ => path.to_string(),
    }
}

fn header_for(
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(mtime);
    h.set_size(size);
    h
}

/// Write the whole image stream as tar into `out`: the base (its `/var`
/// moved to the factory), then the overlays, kiln's files and k3s.
fn write_stream<W: Write>(inputs: &RootInputs, out: W) -> anyhow::Result<()> {
    let mut added = collect_added(inputs)?;
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Complete);
    let (mut present, var_children) = copy_base(inputs, &added, &mut tar)?;
    present.insert("var".into());
    added.insert(
        "usr/lib/tmpfiles.d/kiln-factory.conf".into(),
        Added::File {
            mode: 0o644,
            uid: 0,
            gid: 0,
            source: Source::Bytes(factory_tmpfiles(&var_children).into_bytes()),
        },
    );
    append_added(&mut tar, &added, &mut present, inputs.mtime)?;
    tar.into_inner()?.flush()?;
    Ok(())
}

/// What the image adds to the base, by path: overlays in order, then
/// kiln's image files, then k3s and the image tarballs (later ones win).
fn collect_added(inputs: &RootInputs) -> anyhow::Result<BTreeMap<String, Added>> {
    let mut added: BTreeMap<String, Added> = BTreeMap::new();
    for o in &inputs.overlays {
        collect_overlay(o, "", &mut added)?;
    }
    for (path, e) in inputs.image_files.iter() {
        let p = path.trim_start_matches('/').to_string();
        added.insert(
            p,
            match e {
                Entry::File {
                    content,
                    mode,
                    uid,
                    gid,
                } => Added::File {
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                    source: Source::Bytes(content.clone()),
                },
                Entry::Symlink { target } => Added::Symlink(target.clone()),
                Entry::Dir { mode } => Added::Dir(*mode),
            },
        );
    }
    added.insert(
        K3S_PATH.to_string(),
        Added::File {
            mode: 0o755,
            uid: 0,
            gid: 0,
            source: Source::Path(inputs.k3s.to_path_buf()),
        },
    );
    if let Some(relay) = inputs.relay {
        added.insert(
            RELAY_PATH.to_string(),
            Added::File {
                mode: 0o755,
                uid: 0,
                gid: 0,
                source: Source::Path(relay.to_path_buf()),
            },
        );
    }
    for t in inputs.images {
        added.insert(
            format!("{}/{}", SLOT_IMAGES_DIR.trim_start_matches('/'), t.name),
            Added::File {
                mode: 0o644,
                uid: 0,
                gid: 0,
                source: Source::Path(t.path.clone()),
            },
        );
    }
    Ok(added)
}

/// Copy the base tarball into `tar`, less host state and what `added`
/// replaces (directories merge), `/var` relocated. Returns the paths
/// written and the children of `/var` the factory must seed.
fn copy_base<W: Write>(
    inputs: &RootInputs,
    added: &BTreeMap<String, Added>,
    tar: &mut tar::Builder<W>,
) -> anyhow::Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut present: BTreeSet<String> = BTreeSet::new();
    let mut var_children: BTreeSet<String> = BTreeSet::new();
    let mut archive = tar::Archive::new(open_base(inputs.base)?);
    for e in archive.entries().context("reading the base tarball")? {
        let mut e = e.context("reading the base tarball")?;
        let raw = e.path()?.to_string_lossy().to_string();
        let path = raw
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        if path.is_empty() || path == "." || is_host_state(&path) {
            continue;
        }
        let kind = e.header().entry_type();
        // Overlay and kiln files replace the base's (directories merge).
        if let Some(a) = added.get(&path)
            && !(kind.is_dir() && matches!(a, Added::Dir(_)))
        {
            continue;
        }
        if let Some(child) = var_child(&path) {
            var_children.insert(child);
        }
        let target = relocate(&path);
        copy_base_entry(tar, &mut e, &target, inputs.mtime)?;
        present.insert(target);
    }
    Ok((present, var_children))
}

/// The child of `/var` a base path belongs to (`var/lib/x/y` is
/// `var/lib/x`: the split directories go one level deeper).
fn var_child(path: &str) -> Option<String> {
    let rest = path.strip_prefix("var/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let top = format!("var/{}", parts[0]);
    Some(if SPLIT_VAR.contains(&top.as_str()) && parts.len() > 1 {
        format!("{top}/{}", parts[1])
    } else {
        top
    })
}

/// One base entry at `target`: its header (mtime clamped to `max_mtime`),
/// xattrs, device numbers, link target or data.
fn copy_base_entry<W: Write, R: Read>(
    tar: &mut tar::Builder<W>,
    e: &mut tar::Entry<R>,
    target: &str,
    max_mtime: u64,
) -> anyhow::Result<()> {
    let kind = e.header().entry_type();
    let h = e.header();
    let mode = h.mode()?;
    let (uid, gid, mtime) = (h.uid()?, h.gid()?, h.mtime()?.min(max_mtime));
    let xattrs = base_xattrs(e)?;
    if !xattrs.is_empty() {
        tar.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    let size = if kind.is_file() {
        e.header().size()?
    } else {
        0
    };
    let mut nh = header_for(kind, mode, uid, gid, mtime, size);
    if kind.is_character_special() || kind.is_block_special() {
        nh.set_device_major(e.header().device_major()?.unwrap_or(0))?;
        nh.set_device_minor(e.header().device_minor()?.unwrap_or(0))?;
    }
    if kind.is_symlink() || kind.is_hard_link() {
        let link = e
            .link_name()?
            .context("link without a target")?
            .to_string_lossy()
            .to_string();
        let link = if kind.is_hard_link() {
            relocate(link.trim_start_matches("./").trim_start_matches('/'))
        } else {
            link
        };
        tar.append_link(&mut nh, target, &link)?;
    } else if kind.is_file() {
        tar.append_data(&mut nh, target, e)?;
    } else {
        tar.append_data(&mut nh, target, std::io::empty())?;
    }
    Ok(())
}

/// A base entry's extended attributes, less the POSIX ACLs (system.*),
/// which squashfs cannot store.
fn base_xattrs<R: Read>(e: &mut tar::Entry<R>) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(exts) = e.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let key = ext.key().unwrap_or("");
            if (key.starts_with("SCHILY.xattr.") || key.starts_with("LIBARCHIVE.xattr."))
                && !key.contains("system.posix_acl")
            {
                xattrs.push((key.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(xattrs)
}

/// The factory /var, seeded by systemd-tmpfiles.
fn factory_tmpfiles(var_children: &BTreeSet<String>) -> String {
    let mut tmpfiles = String::from(
        "# kiln: seed /var (the state partition) from the image's own /var.\n# C: copy if missing; L+: always link (package state follows the slot).\n",
    );
    for child in var_children {
        let src = format!("/{FACTORY_VAR}/{}", child.trim_start_matches("var/"));
        if LINKED_VAR.contains(&child.as_str()) {
            tmpfiles.push_str(&format!("L+ /{child} - - - - {src}\n"));
        } else if !SPLIT_VAR.contains(&child.as_str()) {
            tmpfiles.push_str(&format!("C /{child} - - - - {src}\n"));
        }
    }
    tmpfiles
}

/// Added entries, parents first, skipping directories already `present`.
fn append_added<W: Write>(
    tar: &mut tar::Builder<W>,
    added: &BTreeMap<String, Added>,
    present: &mut BTreeSet<String>,
    mtime: u64,
) -> anyhow::Result<()> {
    for (path, a) in added {
        let mut parent = Path::new(path).parent();
        let mut missing = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let s = p.to_string_lossy().to_string();
            if present.contains(&s) || added.contains_key(&s) {
                break;
            }
            missing.push(s);
            parent = p.parent();
        }
        for d in missing.into_iter().rev() {
            let mut h = header_for(tar::EntryType::Directory, 0o755, 0, 0, mtime, 0);
            tar.append_data(&mut h, &d, std::io::empty())?;
            present.insert(d);
        }
        if present.contains(path) {
            continue; // a directory the base has already
        }
        append_one(tar, path, a, mtime)?;
        present.insert(path.clone());
    }
    Ok(())
}

/// One added entry at `path`, owned as it says, at `mtime`.
fn append_one<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    a: &Added,
    mtime: u64,
) -> anyhow::Result<()> {
    match a {
        Added::Dir(mode) => {
            let mut h = header_for(tar::EntryType::Directory, *mode, 0, 0, mtime, 0);
            tar.append_data(&mut h, path, std::io::empty())?;
        }
        Added::Symlink(target) => {
            let mut h = header_for(tar::EntryType::Symlink, 0o777, 0, 0, mtime, 0);
            tar.append_link(&mut h, path, target)?;
        }
        Added::File {
            mode,
            uid,
            gid,
            source,
        } => {
            let (uid, gid) = (u64::from(*uid), u64::from(*gid));
            match source {
                Source::Bytes(b) => {
                    let mut h = header_for(
                        tar::EntryType::Regular,
                        *mode,
                        uid,
                        gid,
                        mtime,
                        b.len() as u64,
                    );
                    tar.append_data(&mut h, path, b.as_slice())?;
                }
                Source::Path(p) => {
                    let f = std::fs::File::open(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let len = f
                        .metadata()
                        .with_context(|| format!("reading {}", p.display()))?
                        .len();
                    let mut h = header_for(tar::EntryType::Regular, *mode, uid, gid, mtime, len);
                    tar.append_data(&mut h, path, std::io::BufReader::with_capacity(1 << 20, f))?;
                }
            }
        }
    }
    Ok(())
}

/// Build the root image at `out` (which must not exist).
pub fn build_root(inputs: &RootInputs, out: &Path) -> anyhow::Result<RootImage> {
    build_root_cancellable(inputs, out, &Cancel::default())
}

/// As [`build_root`]; when `cancel` is set, the stream into tar2sqfs stops
/// and tar2sqfs is stopped, and the result is an interruption.
pub fn build_root_cancellable(
    inputs: &RootInputs,
    out: &Path,
    cancel: &Cancel,
) -> anyhow::Result<RootImage> {
    let mut cmd = TAR2SQFS.command()?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    cmd.args(["--quiet", "--no-skip", "--compressor", "zstd"])
        .arg("--comp-extra")
        .arg(format!("level={}", inputs.level))
        .arg("--block-size")
        .arg(BLOCK_BYTES.to_string())
        .arg("--num-jobs")
        .arg(jobs.to_string())
        .arg("--defaults")
        .arg(format!("mtime={}", inputs.mtime))
        .arg(out)
        .env("SOURCE_DATE_EPOCH", inputs.mtime.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let line = crate::util::tool::display(&cmd);
    log::debug!("running {line}");
    let mut child = cmd.spawn().with_context(|| format!("starting {line}"))?;
    let stdin = child.stdin.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    // The stream is written on its own thread while this one waits for
    // tar2sqfs and watches `cancel`: a write blocked on a full pipe cannot
    // look at the token, but stopping tar2sqfs breaks the pipe under it.
    let (streamed, status) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            write_stream(
                inputs,
                std::io::BufWriter::with_capacity(1 << 20, cancel.writer(stdin)),
            )
        });
        let status = crate::util::tool::wait(&mut child, &line, cancel);
        let streamed = writer
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the stream into {line} panicked")));
        (streamed, status)
    });
    let err = err_reader.join().unwrap_or_default();
    let status = status?;
    cancel.check()?;
    // A failed stream (say, a truncated base) is the cause; tar2sqfs then
    // only complains about the cut-off input. Its status matters when the
    // stream broke because tar2sqfs died first (EPIPE) or succeeded.
    if let Err(e) = &streamed {
        let epipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if !epipe {
            let tail = String::from_utf8_lossy(&err);
            return Err(streamed.unwrap_err().context(format!(
                "streaming the root image into {line} (its stderr: {})",
                tail.trim()
            )));
        }
    }
    crate::util::tool::check_status(&line, status, &err)?;
    streamed.context("streaming the root image")?;
    let size = fs_err::metadata(out)?.len();
    Ok(RootImage {
        path: out.to_path_buf(),
        size,
    })
}

/// Stream the image as a plain tar (for tests and listings).
pub fn write_tar<W: Write>(inputs: &RootInputs, out: W) -> anyhow::Result<()> {
    write_stream(inputs, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base tarball with `/etc` and one file under `/var`.
    fn tiny_base(dir: &Path) -> PathBuf {
        let path = dir.join("base.tar");
        let mut t = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (p, kind, body) in [
            ("etc", tar::EntryType::Directory, &b""[..]),
            ("etc/os-release", tar::EntryType::Regular, b"ID=debian\n"),
            ("etc/iscsi", tar::EntryType::Directory, b""),
            (
                "etc/iscsi/initiatorname.iscsi",
                tar::EntryType::Regular,
                b"InitiatorName=iqn.1993-08.org.debian:01:0123456789ab\n",
            ),
            (
                "etc/iscsi/iscsid.conf",
                tar::EntryType::Regular,
                b"# conf\n",
            ),
            ("var", tar::EntryType::Directory, b""),
        ] {
            let mut h = header_for(kind, 0o755, 0, 0, 1, body.len() as u64);
            t.append_data(&mut h, p, body).unwrap();
        }
        t.into_inner().unwrap().flush().unwrap();
        path
    }

    #[test]
    fn image_tarballs_are_in_the_slot_directory_read_only_to_all() {
        let dir = tempfile::tempdir().unwrap();
        let k3s = dir.path().join("k3s");
        std::fs::write(&k3s, b"#!/bin/sh\n").unwrap();
        let tarball = dir.path().join("given.tar.zst");
        std::fs::write(&tarball, b"zstd frames").unwrap();
        let images = [ImageTarball {
            name: "k3s-airgap-images-amd64.tar.zst".into(),
            path: tarball,
            sha256: String::new(),
            size: 11,
        }];
        let base = tiny_base(dir.path());
        let inputs = RootInputs {
            base: &base,
            overlays: vec![],
            k3s: &k3s,
            relay: None,
            images: &images,
            image_files: FileTree::new(),
            mtime: 7,
            level: 3,
        };
        let mut stream = Vec::new();
        write_tar(&inputs, &mut stream).unwrap();
        let mut archive = tar::Archive::new(stream.as_slice());
        let mut seen = BTreeMap::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().to_string();
            let mode = e.header().mode().unwrap();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            seen.insert(path, (mode, e.header().uid().unwrap(), body));
        }
        assert_eq!(
            seen["usr/lib/kiln/images/k3s-airgap-images-amd64.tar.zst"],
            (0o644, 0, b"zstd frames".to_vec())
        );
        // Its parents exist, in order, before it.
        for d in ["usr", "usr/lib", "usr/lib/kiln", "usr/lib/kiln/images"] {
            assert_eq!(seen[d].0, 0o755, "{d}");
        }
        // The initiator name the base was made with is not every node's;
        // the rest of open-iscsi's configuration stays.
        assert!(
            !seen.contains_key(ISCSI_BASE_INITIATOR_NAME),
            "{:?}",
            seen.keys()
        );
        assert!(seen.contains_key("etc/iscsi/iscsid.conf"));
    }
}
