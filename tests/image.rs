//! Image tests: build real images of the test profile
//! (`qemu-tests/profiles/vm.toml`) with the `kiln` binary into temp dirs and
//! read them back with the standard tools (`sfdisk`, `sgdisk`, `fsck.vfat`,
//! mtools, `unsquashfs`, `sqfs2tar`, `cpio`, `sha256sum`), comparing what
//! they see with the base tarball, the k3s binary and kiln's own rendering.
//!
//! One build of the profile is shared by every test of this binary (the
//! first test to need it builds it; it stays in a temp dir for the life of
//! the process and is removed by the next run). Tests that need builds of
//! their own (reproducibility, failures) make them beside it.
//!
//! Needs: the cached cloud base (or mmdebstrap and the Debian archive to
//! build it once), `make k3s-double` (run here), and the tools above
//! (`make setup`). `KILN_K3S_BINARY` puts that binary in the images instead
//! of the double. `UPDATE_GOLDEN=1` rewrites `tests/golden/image-*.txt`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use sha2::{Digest, Sha256};

/// The test profile, relative to the repository.
const PROFILE: &str = "qemu-tests/profiles/vm.toml";
/// Its nodes, in file order.
const NODES: [&str; 2] = ["s1", "a1"];
/// SOURCE_DATE_EPOCH of every build here: 2026-01-01T00:00:00Z, not kiln's
/// default, so the tests see that it is honoured. Older than every file of
/// the base, so every mtime is clamped.
const EPOCH: u64 = 1_767_225_600;
/// The k3s release the profile pins.
const K3S_VERSION: &str = "v1.31.1+k3s1";
const MIB: u64 = 1024 * 1024;
const SECTOR: u64 = 512;
/// What kiln promises for the layout (DESIGN.md "The image on disk").
const ESP_MIB: u64 = 260;
const STATE_MIB: u64 = 256;
/// Root slots hold 1.5 × the root image, rounded up to 64 MiB.
const SLOT_ROUND_MIB: u64 = 64;
/// zstd level from vm.toml `[image] compression-level`.
const ZSTD_LEVEL: u32 = 3;
/// squashfs block size DESIGN.md measured with (128 KiB).
const SQUASHFS_BLOCK: u32 = 131_072;
/// Prefix of the temp dirs of this test binary, with the pid after it.
const TEMP_PREFIX: &str = "kiln-image-test.";

// ---------------------------------------------------------------------------
// Running things

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Run `cmd`, panic with its stderr unless it succeeds; stdout as bytes.
fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e} (run `make setup`)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stderr),
        text(&out.stdout)
    );
    out.stdout
}

fn run(cmd: &mut Command) -> String {
    text(&run_bytes(cmd))
}

/// Run `cmd` with `input` on stdin; stdout as bytes.
fn run_with_input(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out.stderr)
    );
    out.stdout
}

/// A command with a stable locale and time zone for parsing its output.
fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    c.env("LC_ALL", "C").env("TZ", "UTC");
    c
}

/// The `kiln` binary with a fixed SOURCE_DATE_EPOCH and no k3s binary from
/// the environment (each test says which binary it wants).
fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .env_remove("KILN_K3S_BINARY");
    c
}

fn kiln_build(profile: &Path, out: &Path, k3s: Option<&Path>) -> Output {
    let mut c = kiln();
    c.arg("build").arg(profile).arg("--out").arg(out);
    if let Some(k) = k3s {
        c.arg("--k3s-binary").arg(k);
    }
    c.output().unwrap()
}

fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return hex::encode(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Copy `len` bytes at `offset` of `src` into a new file `dest`.
fn copy_range(src: &Path, offset: u64, len: u64, dest: &Path) {
    let mut f = fs::File::open(src).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut out = fs::File::create(dest).unwrap();
    let copied = std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, f.take(len)),
        &mut out,
    )
    .unwrap();
    assert_eq!(copied, len, "short read of {}", src.display());
}

/// A file name (not a path) that begins with `prefix` in `dir`.
fn names_starting(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

// ---------------------------------------------------------------------------
// The shared build

/// Everything lives in one temp dir, kept until the next run.
struct Shared {
    /// The copy of vm.toml with root's generated key appended.
    profile: PathBuf,
    out: PathBuf,
    /// The k3s binary passed with --k3s-binary (the double, unless
    /// KILN_K3S_BINARY names another).
    k3s: PathBuf,
    /// root's generated SSH public key.
    public_key: String,
    /// The cached base tarball the build used.
    base: PathBuf,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

fn shared() -> &'static Shared {
    match SHARED.get_or_init(|| std::panic::catch_unwind(build_shared).map_err(|p| panic_text(&p)))
    {
        Ok(s) => s,
        Err(e) => panic!("the shared build failed:\n{e}"),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Remove the temp dirs of earlier runs of this binary whose process is gone.
fn remove_old_temp_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A temp dir named for this process, kept after the process ends.
fn process_temp_dir() -> PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}.", std::process::id()))
        .tempdir()
        .unwrap()
        .keep()
}

/// The k3s binary for the images: `KILN_K3S_BINARY`, else the test double
/// built by `make k3s-double`.
fn k3s_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_K3S_BINARY") {
        return PathBuf::from(p);
    }
    let stdout = run(Command::new("make")
        .args(["-s", "--no-print-directory", "k3s-double"])
        .current_dir(common::repo()));
    let path = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("make k3s-double prints the path")
            .trim(),
    );
    assert!(
        path.is_file(),
        "make k3s-double printed {}, which is not a file",
        path.display()
    );
    path
}

/// Write `dir/vm.toml`: the test profile with `public_key` for root.
fn write_profile(dir: &Path, public_key: &str) -> PathBuf {
    let mut text = fs::read_to_string(common::repo().join(PROFILE)).unwrap();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "ssh-authorized-keys = [\"{}\"]\n",
        public_key.trim()
    ));
    let path = dir.join("vm.toml");
    fs::write(&path, text).unwrap();
    path
}

fn build_shared() -> Shared {
    remove_old_temp_dirs();
    let root = process_temp_dir();
    let k3s = k3s_binary();
    let key = root.join("id_ed25519");
    run(tool("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-image-test"])
        .arg("-f")
        .arg(&key));
    let public_key = fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    let dir = root.join("profile");
    fs::create_dir(&dir).unwrap();
    let profile = write_profile(&dir, &public_key);
    let out = root.join("out");

    let started = Instant::now();
    let o = kiln_build(&profile, &out, Some(&k3s));
    assert!(
        o.status.success(),
        "kiln build failed:\n{}",
        text(&o.stderr)
    );
    eprintln!(
        "image tests: shared build of {PROFILE} ({} nodes) in {:.1} s:\n{}",
        NODES.len(),
        started.elapsed().as_secs_f64(),
        text(&o.stderr)
    );
    // stdout lists what was written.
    let printed: BTreeSet<String> = text(&o.stdout).lines().map(str::to_string).collect();
    for n in [
        "s1.img",
        "a1.img",
        "SHA256SUMS",
        "manifest.json",
        "sbom.cdx.json",
    ] {
        assert!(
            printed.contains(&out.join(n).to_string_lossy().to_string()),
            "stdout does not list {n}: {printed:?}"
        );
    }

    let plan = kiln::config::plan::load(&profile).unwrap();
    let spec = kiln::inputs::base::base_spec(&plan).expect("vm.toml builds a Debian base");
    let base = kiln::inputs::base::cached_path(&spec, &kiln::inputs::cache::cache_dir());
    assert!(
        base.is_file(),
        "the build used {}, which is gone",
        base.display()
    );
    Shared {
        profile,
        out,
        k3s,
        public_key,
        base,
    }
}

// ---------------------------------------------------------------------------
// Reading images back

#[derive(Debug, Clone)]
struct Part {
    name: String,
    start: u64,
    size: u64,
}

/// The partitions as `sfdisk --json` sees them (sectors).
fn partitions(image: &Path) -> Vec<Part> {
    let v: serde_json::Value =
        serde_json::from_str(&run(tool("sfdisk").arg("--json").arg(image))).unwrap();
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Part {
            name: p["name"].as_str().unwrap_or("").to_string(),
            start: p["start"].as_u64().unwrap(),
            size: p["size"].as_u64().unwrap(),
        })
        .collect()
}

fn partition(image: &Path, name: &str) -> Part {
    partitions(image)
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{} has no partition {name}", image.display()))
}

/// Copy partition `name` of `image` into `dest`.
fn extract_partition(image: &Path, name: &str, dest: &Path) -> Part {
    let p = partition(image, name);
    copy_range(image, p.start * SECTOR, p.size * SECTOR, dest);
    p
}

/// The ESP of `node`'s image, extracted into a temp dir.
struct Esp {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn esp_of(node: &str) -> Esp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("esp.img");
    extract_partition(&shared().out.join(format!("{node}.img")), "ESP", &path);
    Esp { _dir: dir, path }
}

fn mtools(name: &str, esp: &Path) -> Command {
    let mut c = tool(name);
    c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(esp);
    c
}

/// A file from the ESP, by mtools.
fn esp_file(esp: &Path, path: &str) -> Vec<u8> {
    run_bytes(mtools("mtype", esp).arg(format!("::/{path}")))
}

/// One entry of a listing (`unsquashfs -lln`, `cpio -tv`, a tarball).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    /// `ls -l` style: type letter and permissions, like `-rwsr-xr-x`.
    perms: String,
    uid: u32,
    gid: u32,
    /// Size of a regular file (or a symlink's target length).
    size: Option<u64>,
    /// Major and minor of a device node.
    dev: Option<(u32, u32)>,
    /// Target of a symlink.
    link: Option<String>,
}

/// `ls -l` permissions for a type letter and mode bits.
fn perm_string(kind: char, mode: u32) -> String {
    let mut s = String::from(kind);
    let special = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (i, shift) in [6u32, 3, 0].iter().enumerate() {
        let bits = (mode >> shift) & 0o7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let (flag, on, off) = special[i];
        s.push(match (mode & flag != 0, bits & 1 != 0) {
            (true, true) => on,
            (true, false) => off,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// Parse `unsquashfs -lln` output: path (no leading `/`, root is "") → entry.
fn parse_unsquashfs_listing(listing: &str) -> BTreeMap<String, Listed> {
    let mut out = BTreeMap::new();
    for line in listing.lines() {
        let Some(at) = line.find(" squashfs-root") else {
            continue;
        };
        let (meta, name) = (&line[..at], &line[at + " squashfs-root".len()..]);
        let (path, link) = match name.split_once(" -> ") {
            Some((p, l)) => (p, Some(l.to_string())),
            None => (name, None),
        };
        let t: Vec<&str> = meta.split_whitespace().collect();
        let (uid, gid) = t[1].split_once('/').unwrap();
        let perms = t[0].to_string();
        let (size, dev) = if perms.starts_with(['c', 'b']) {
            (
                None,
                Some((
                    t[2].trim_end_matches(',').parse().unwrap(),
                    t[3].parse().unwrap(),
                )),
            )
        } else {
            (Some(t[2].parse().unwrap()), None)
        };
        out.insert(
            path.trim_start_matches('/').to_string(),
            Listed {
                perms,
                uid: uid.parse().unwrap(),
                gid: gid.parse().unwrap(),
                size,
                dev,
                link,
            },
        );
    }
    out
}

/// Parse `cpio -tv --numeric-uid-gid` output: path → entry.
fn parse_cpio_listing(listing: &str) -> BTreeMap<String, Listed> {
    let mut out = BTreeMap::new();
    for line in listing.lines().filter(|l| !l.trim().is_empty()) {
        let t: Vec<&str> = line.split_whitespace().collect();
        let perms = t[0].to_string();
        let (size, dev, at) = if perms.starts_with(['c', 'b']) {
            (
                None,
                Some((
                    t[4].trim_end_matches(',').parse().unwrap(),
                    t[5].parse().unwrap(),
                )),
                6,
            )
        } else {
            (Some(t[4].parse().unwrap()), None, 5)
        };
        // Three date fields, then the name.
        let name = t[at + 3..].join(" ");
        let (path, link) = match name.split_once(" -> ") {
            Some((p, l)) => (p.to_string(), Some(l.to_string())),
            None => (name, None),
        };
        out.insert(
            path,
            Listed {
                perms,
                uid: t[2].parse().unwrap(),
                gid: t[3].parse().unwrap(),
                size,
                dev,
                link,
            },
        );
    }
    out
}

fn cpio_listing(archive: &[u8]) -> BTreeMap<String, Listed> {
    parse_cpio_listing(&text(&run_with_input(
        tool("cpio").args(["-tv", "--quiet", "--numeric-uid-gid"]),
        archive,
    )))
}

/// Unpack a cpio archive into `dir` (directories, files and symlinks only).
fn cpio_extract(archive: &[u8], dir: &Path, patterns: &[&str]) {
    run_with_input(
        tool("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames"])
            .args(patterns)
            .current_dir(dir),
        archive,
    );
}

/// An entry of the base tarball, as the tar headers say.
#[derive(Debug, Clone)]
struct BaseEntry {
    listed: Listed,
    /// Hard link target (normalised path), if a hard link.
    hard_link: Option<String>,
    mtime: u64,
    xattrs: Vec<String>,
}

/// The base tarball's entries (normalised paths: no `./`, no trailing `/`)
/// and the contents of the few files the tests compare.
struct Base {
    entries: BTreeMap<String, BaseEntry>,
    /// In archive order.
    order: Vec<String>,
    systemd_boot: Vec<u8>,
    vmlinuz: (String, Vec<u8>),
    busybox: Vec<u8>,
    modules_dep: String,
    modules_builtin: String,
}

fn norm(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

fn tar_kind(t: tar::EntryType) -> char {
    match t {
        tar::EntryType::Directory => 'd',
        tar::EntryType::Symlink => 'l',
        tar::EntryType::Char => 'c',
        tar::EntryType::Block => 'b',
        tar::EntryType::Fifo => 'p',
        _ => '-',
    }
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| read_base(&shared().base))
}

fn read_base(path: &Path) -> Base {
    let mut archive = tar::Archive::new(zstd::Decoder::new(fs::File::open(path).unwrap()).unwrap());
    let mut b = Base {
        entries: BTreeMap::new(),
        order: Vec::new(),
        systemd_boot: Vec::new(),
        vmlinuz: (String::new(), Vec::new()),
        busybox: Vec::new(),
        modules_dep: String::new(),
        modules_builtin: String::new(),
    };
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = norm(&e.path().unwrap().to_string_lossy());
        let h = e.header().clone();
        let kind = h.entry_type();
        let mode = h.mode().unwrap();
        let hard_link = kind
            .is_hard_link()
            .then(|| norm(&e.link_name().unwrap().unwrap().to_string_lossy()));
        let link = kind.is_symlink().then(|| {
            e.link_name()
                .unwrap()
                .unwrap()
                .to_string_lossy()
                .to_string()
        });
        let dev = (kind.is_character_special() || kind.is_block_special()).then(|| {
            (
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap(),
            )
        });
        let mut xattrs = Vec::new();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let key = x.unwrap().key().unwrap().to_string();
                if let Some(name) = key
                    .strip_prefix("SCHILY.xattr.")
                    .or_else(|| key.strip_prefix("LIBARCHIVE.xattr."))
                {
                    xattrs.push(name.to_string());
                }
            }
        }
        let size = kind.is_file().then(|| h.size().unwrap());
        let listed = Listed {
            perms: perm_string(tar_kind(kind), mode),
            uid: h.uid().unwrap() as u32,
            gid: h.gid().unwrap() as u32,
            size,
            dev,
            link,
        };
        let mut content = || {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            v
        };
        if kind.is_file() {
            if path == "usr/lib/systemd/boot/efi/systemd-bootx64.efi" {
                b.systemd_boot = content();
            } else if path.starts_with("boot/vmlinuz-") {
                b.vmlinuz = (path.clone(), content());
            } else if path == "usr/bin/busybox" {
                b.busybox = content();
            } else if path.starts_with("usr/lib/modules/") && path.ends_with("/modules.dep") {
                b.modules_dep = text(&content());
            } else if path.starts_with("usr/lib/modules/") && path.ends_with("/modules.builtin") {
                b.modules_builtin = text(&content());
            }
        }
        b.order.push(path.clone());
        b.entries.insert(
            path,
            BaseEntry {
                listed,
                hard_link,
                mtime: h.mtime().unwrap(),
                xattrs,
            },
        );
    }
    assert!(
        !b.systemd_boot.is_empty()
            && !b.vmlinuz.1.is_empty()
            && !b.busybox.is_empty()
            && !b.modules_dep.is_empty(),
        "{} lacks boot files",
        path.display()
    );
    b
}

/// An entry of a tar stream written by `sqfs2tar`.
#[derive(Debug, Clone)]
struct SqfsTarEntry {
    kind: tar::EntryType,
    mtime: u64,
    hard_link: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every entry of a squashfs file as `sqfs2tar` (squashfs-tools-ng) writes
/// it (hard links as tar hard links, xattrs as SCHILY.xattr), with the
/// contents of `keep` files.
fn sqfs_tar(
    sqfs: &Path,
    keep: &[&str],
) -> (BTreeMap<String, SqfsTarEntry>, BTreeMap<String, Vec<u8>>) {
    let mut child = tool("sqfs2tar")
        .arg("--no-skip")
        .arg(sqfs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sqfs2tar (apt-get install squashfs-tools-ng)");
    let mut entries = BTreeMap::new();
    let mut contents = BTreeMap::new();
    {
        let mut archive = tar::Archive::new(child.stdout.take().unwrap());
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = norm(&e.path().unwrap().to_string_lossy());
            let kind = e.header().entry_type();
            let mut xattrs = BTreeMap::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for x in exts {
                    let x = x.unwrap();
                    if let Some(name) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                        xattrs.insert(name.to_string(), x.value_bytes().to_vec());
                    }
                }
            }
            let hard_link = kind
                .is_hard_link()
                .then(|| norm(&e.link_name().unwrap().unwrap().to_string_lossy()));
            let mtime = e.header().mtime().unwrap();
            if kind.is_file() && keep.contains(&path.as_str()) {
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                contents.insert(path.clone(), v);
            }
            entries.insert(
                path,
                SqfsTarEntry {
                    kind,
                    mtime,
                    hard_link,
                    xattrs,
                },
            );
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sqfs2tar {} failed:\n{}",
        sqfs.display(),
        text(&out.stderr)
    );
    (entries, contents)
}

// ---------------------------------------------------------------------------
// The partition table

/// Replace the numbers that follow from the root image's size by names, in
/// an `sfdisk -d` dump, where they match the layout rule: `{slot}` (size of
/// root-a and root-b), `{root-b start}`, `{state start}`, `{last-lba}`. A
/// number that breaks the rule stays a number, and the golden diff shows it.
fn normalise_dump(dump: &str, slot_sectors: u64) -> String {
    let esp_start = MIB / SECTOR;
    let root_a_start = esp_start + ESP_MIB * MIB / SECTOR;
    let root_b_start = root_a_start + slot_sectors;
    let state_start = root_b_start + slot_sectors;
    let end = state_start + STATE_MIB * MIB / SECTOR;
    // 1 MiB after the last partition, minus the backup header and entry array.
    let last_lba = end + MIB / SECTOR - 1 - 1 - 32;
    let mut out = String::new();
    for line in dump.lines() {
        if let Some(v) = line.strip_prefix("last-lba: ") {
            out += &if v.trim() == last_lba.to_string() {
                "last-lba: {last-lba}".to_string()
            } else {
                line.to_string()
            };
        } else if line.contains(" : start=") {
            let name = line
                .split("name=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("");
            let fields: Vec<String> = line
                .split(", ")
                .map(|f| {
                    let (key, value) = match f.split_once('=') {
                        Some((k, v)) => (k, v.trim()),
                        None => return f.to_string(),
                    };
                    let token = match (name, key.rsplit(' ').next().unwrap_or(key)) {
                        ("root-a" | "root-b", "size") if value == slot_sectors.to_string() => {
                            Some("{slot}")
                        }
                        ("root-b", "start") if value == root_b_start.to_string() => {
                            Some("{root-b start}")
                        }
                        ("state", "start") if value == state_start.to_string() => {
                            Some("{state start}")
                        }
                        _ => None,
                    };
                    match token {
                        Some(t) => format!("{}={t}", key.trim_end()),
                        None => f.to_string(),
                    }
                })
                .collect();
            out += &fields.join(", ");
        } else {
            out += line;
        }
        out.push('\n');
    }
    out
}

/// Compare `actual` with a golden file (comment lines `#` ignored), or
/// rewrite it under `UPDATE_GOLDEN=1` keeping its comment.
fn check_golden(name: &str, actual: &str, comment: &str) {
    let path = common::repo().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&path, format!("{comment}{actual}")).unwrap();
        return;
    }
    let expected = fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing (run with UPDATE_GOLDEN=1)", path.display()));
    let expected: String = expected
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        actual,
        expected,
        "{} differs (UPDATE_GOLDEN=1 rewrites it; review the diff)",
        path.display()
    );
}

/// Are the `len` bytes at `offset` of `path` all zero?
fn is_zero(path: &Path, offset: u64, len: u64) -> bool {
    let mut f = fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut r = f.take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return true;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return false;
        }
    }
}

/// squashfs `bytes_used`: little-endian u64 at byte 40 of the superblock.
fn squashfs_bytes_used(image: &Path, offset: u64) -> u64 {
    let mut f = fs::File::open(image).unwrap();
    let mut sb = [0u8; 96];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut sb).unwrap();
    assert_eq!(
        &sb[..4],
        b"hsqs",
        "no squashfs at byte {offset} of {}",
        image.display()
    );
    u64::from_le_bytes(sb[40..48].try_into().unwrap())
}

const GOLDEN_COMMENT: &str = "# `sfdisk -d` of this node's image built from qemu-tests/profiles/vm.toml\n\
# (tests/image.rs). GUIDs come from cluster and node name and are exact.\n\
# Sizes that follow from the root image (which varies with the base) are\n\
# names, checked by rule: {slot} = 1.5 x the root-a squashfs rounded up to\n\
# 64 MiB; {root-b start}, {state start} and {last-lba} follow from it.\n\
# ESP 260 MiB (532480 sectors) and state 256 MiB (524288) are exact.\n";

#[test]
fn partition_table_matches_golden_and_the_layout_rule() {
    let s = shared();
    for node in NODES {
        let name = format!("{node}.img");
        let image = s.out.join(&name);
        // Relative name, so the dump does not depend on the temp dir.
        let dump = run(tool("sfdisk").arg("-d").arg(&name).current_dir(&s.out));
        let root_a = partition(&image, "root-a");
        let root_bytes = squashfs_bytes_used(&image, root_a.start * SECTOR);
        let slot_mib = (root_bytes * 3 / 2).div_ceil(MIB).div_ceil(SLOT_ROUND_MIB) * SLOT_ROUND_MIB;
        let slot_sectors = slot_mib * MIB / SECTOR;
        assert!(
            slot_sectors * SECTOR >= root_bytes,
            "root-a is smaller than the root image"
        );
        check_golden(
            &format!("image-{node}-sfdisk.txt"),
            &normalise_dump(&dump, slot_sectors),
            GOLDEN_COMMENT,
        );

        // kiln's own account of the table is what sfdisk reads.
        let seed = format!("vmtest/{node}");
        let plan = kiln::image::disk::plan_disk(&seed, root_bytes).unwrap();
        assert_eq!(plan.dump(&name), dump, "kiln's plan and sfdisk disagree");
        // The file ends where the plan says: 1 MiB after the state partition.
        assert_eq!(fs::metadata(&image).unwrap().len(), plan.disk_size_bytes);
        let state = partition(&image, "state");
        assert_eq!(
            (state.start + state.size) * SECTOR + MIB,
            plan.disk_size_bytes
        );

        // root-b waits for the first upgrade and state is formatted on first
        // boot: both are zeros (no stale bytes, no half-made file system).
        for empty in ["root-b", "state"] {
            let p = partition(&image, empty);
            assert!(
                is_zero(&image, p.start * SECTOR, p.size * SECTOR),
                "{name}: {empty} is not empty"
            );
        }
        // sgdisk agrees the table (both headers, CRCs, protective MBR) is sound.
        let verify = run(tool("sgdisk").arg("-v").arg(&image));
        assert!(
            verify.contains("No problems found"),
            "sgdisk -v {name}:\n{verify}"
        );
    }
}

#[test]
fn images_are_private_and_the_output_holds_only_the_artifacts() {
    let s = shared();
    let names: BTreeSet<String> = fs::read_dir(&s.out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "a1.img",
            "manifest.json",
            "s1.img",
            "sbom.cdx.json",
            "stages.log",
        ]
        .map(String::from)
        .into(),
        "no work files may be left in the output"
    );
    for node in NODES {
        let mode = fs::metadata(s.out.join(format!("{node}.img")))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(
            mode, 0o600,
            "{node}.img holds the node's secrets but is mode {mode:o}"
        );
    }
    let parent = s.out.parent().unwrap();
    assert!(
        names_starting(parent, ".out.").is_empty(),
        "staging left beside the output: {:?}",
        names_starting(parent, ".out.")
    );
}

// ---------------------------------------------------------------------------
// The ESP

/// kiln-install's files on the ESP describe the image they are in: its
/// first 34 and last 33 sectors (the GPT), its size, and zeros from the
/// state partition up to the tail.
fn install_files_are_the_images_own(node: &str, image: &Path, esp: &Path) {
    let bytes = fs::read(image).unwrap();
    let layout = text(&esp_file(esp, "kiln/install/layout"));
    let field = |k: &str| -> usize {
        layout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{node}: layout lacks {k}:\n{layout}"))
            .parse()
            .unwrap()
    };
    let (size, head, state, tail) = (
        field("image-bytes"),
        field("head-bytes"),
        field("state-start-bytes"),
        field("tail-bytes"),
    );
    assert_eq!(size, bytes.len(), "{node}: image-bytes");
    assert_eq!(
        (head, tail),
        (34 * 512, 33 * 512),
        "{node}: GPT head and tail"
    );
    assert!(
        esp_file(esp, "kiln/install/gpt-head") == bytes[..head],
        "{node}: gpt-head"
    );
    assert!(
        esp_file(esp, "kiln/install/gpt-tail") == bytes[size - tail..],
        "{node}: gpt-tail"
    );
    assert!(
        bytes[state..size - tail].iter().all(|b| *b == 0),
        "{node}: the image is not zero from its state partition to its tail"
    );
    let sgdisk = text(&tool("sgdisk").arg("-p").arg(image).output().unwrap().stdout);
    let guid = layout
        .lines()
        .find_map(|l| l.strip_prefix("disk-guid="))
        .unwrap();
    assert!(
        sgdisk.contains(&format!("Disk identifier (GUID): {}", guid.to_uppercase())),
        "{node}: disk-guid={guid} is not the image's:\n{sgdisk}"
    );
}

#[test]
fn esp_is_clean_fat32_with_systemd_boot_entry_kernel_and_initrds() {
    let s = shared();
    let b = base();
    for node in NODES {
        let esp = esp_of(node);
        let fsck = tool("fsck.vfat").arg("-n").arg(&esp.path).output().unwrap();
        let report = text(&fsck.stdout) + &text(&fsck.stderr);
        assert!(
            fsck.status.success(),
            "fsck.vfat -n of {node}'s ESP:\n{report}"
        );
        // Version line and summary only: any complaint is a line more.
        assert_eq!(
            report.lines().count(),
            2,
            "fsck.vfat -n of {node}'s ESP is not clean:\n{report}"
        );
        // "…: 12 files, 3847/66426 clusters"
        let words: Vec<&str> = report.split_whitespace().collect();
        let clusters: u64 = words
            .iter()
            .position(|w| *w == "clusters")
            .and_then(|i| words[i - 1].split_once('/'))
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or_else(|| panic!("{report}"));
        assert!(
            clusters >= 65_525,
            "{clusters} clusters is FAT16 to OVMF, not FAT32"
        );

        let listing: BTreeSet<String> = run(mtools("mdir", &esp.path).args(["-/", "-b", "::"]))
            .lines()
            .map(str::to_string)
            .collect();
        let expected: BTreeSet<String> = [
            "EFI/",
            "EFI/BOOT/",
            "EFI/BOOT/BOOTX64.EFI",
            "loader/",
            "loader/loader.conf",
            "loader/entries/",
            "loader/entries/kiln-a.conf",
            "kiln/",
            "kiln/a/",
            "kiln/a/vmlinuz",
            "kiln/a/initrd.img",
            "kiln/a/seed.img",
            "kiln/install/",
            "kiln/install/gpt-head",
            "kiln/install/gpt-tail",
            "kiln/install/layout",
        ]
        .iter()
        .map(|p| format!("::/{p}"))
        .collect();
        assert_eq!(listing, expected, "{node}'s ESP");
        install_files_are_the_images_own(node, &s.out.join(format!("{node}.img")), &esp.path);

        assert!(
            esp_file(&esp.path, "EFI/BOOT/BOOTX64.EFI") == b.systemd_boot,
            "BOOTX64.EFI is not the base's systemd-bootx64.efi"
        );
        assert!(
            esp_file(&esp.path, "kiln/a/vmlinuz") == b.vmlinuz.1,
            "kiln/a/vmlinuz is not the base's {}",
            b.vmlinuz.0
        );
        let kernel_version = b.vmlinuz.0.trim_start_matches("boot/vmlinuz-");

        let loader = text(&esp_file(&esp.path, "loader/loader.conf"));
        for line in ["timeout 0", "default kiln-*", "editor no"] {
            assert!(
                loader.lines().any(|l| l == line),
                "loader.conf lacks `{line}`:\n{loader}"
            );
        }
        let entry = text(&esp_file(&esp.path, "loader/entries/kiln-a.conf"));
        let key = |k: &str| -> Vec<String> {
            entry
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{k} ")))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            key("title"),
            [format!(
                "kiln vmtest/{node} (slot a, k3s {K3S_VERSION}, kernel {kernel_version})"
            )],
            "{entry}"
        );
        // The generation: updates add entries with higher ones.
        assert_eq!(key("version"), ["1"], "{entry}");
        assert_eq!(key("linux"), ["/kiln/a/vmlinuz"], "{entry}");
        assert_eq!(
            key("initrd"),
            ["/kiln/a/initrd.img", "/kiln/a/seed.img"],
            "base initramfs first, then the node seed:\n{entry}"
        );
        let options: Vec<String> = key("options")
            .join(" ")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        for want in [
            "kiln.slot=a",
            "pcie_aspm=off",
            "console=ttyS0,115200",
            "panic=10",
        ] {
            assert!(
                options.iter().any(|o| o == want),
                "options lack {want}:\n{entry}"
            );
        }
        assert!(
            !options
                .iter()
                .any(|o| o.starts_with("root=") || o == "console=tty0"),
            "{entry}"
        );
        // kiln's own FAT reader sees the same entry.
        let mut disk = fs::File::open(s.out.join(format!("{node}.img"))).unwrap();
        let p = partition(&s.out.join(format!("{node}.img")), "ESP");
        let via_kiln = kiln::image::esp::read_esp_file(
            &mut disk,
            p.start * SECTOR,
            p.size * SECTOR,
            "loader/entries/kiln-a.conf",
        )
        .unwrap();
        assert_eq!(text(&via_kiln), entry);
    }
}

// ---------------------------------------------------------------------------
// The root image

/// Files the root stream drops from the base (src/rootfs.rs
/// `is_host_state`): build-host state every node would otherwise share.
fn is_dropped(path: &str) -> bool {
    [
        "etc/hostname",
        "etc/machine-id",
        "var/lib/dbus/machine-id",
        kiln::image::rootfs::ISCSI_BASE_INITIATOR_NAME,
    ]
    .contains(&path)
        || path.starts_with("etc/ssh/ssh_host_")
        || path.starts_with("boot/initrd.img")
}

/// Where a base path is in the image: `/var/*` moves to the factory copy.
fn relocated(path: &str) -> String {
    match path.strip_prefix("var/") {
        Some(rest) => format!("usr/share/kiln/factory/var/{rest}"),
        None => path.to_string(),
    }
}

fn ancestors(path: &str) -> impl Iterator<Item = String> + '_ {
    let mut p = Path::new(path).parent();
    std::iter::from_fn(move || {
        let here = p.filter(|x| !x.as_os_str().is_empty())?;
        p = here.parent();
        Some(here.to_string_lossy().to_string())
    })
}

/// kiln's own files in every root image (src/rootfs.rs `image_files`, and
/// the profile's from src/render: its k3s manifests with their copy unit,
/// the transport watcher), the k3s binary and the factory tmpfiles:
/// path → expected listing, with `None` for files whose size the test
/// cannot know in advance.
fn kiln_root_files() -> BTreeMap<String, Option<Listed>> {
    let mut m = BTreeMap::new();
    let mut files = kiln::image::rootfs::image_files("");
    let plan = kiln::config::plan::load(&shared().profile).unwrap();
    files.extend(kiln::render::image_files(&plan));
    for (path, e) in files.iter() {
        let listed = match e {
            // Its text names versions and digests: checked by content below.
            kiln::render::tree::Entry::File { .. } if path == "/usr/lib/kiln/image" => None,
            kiln::render::tree::Entry::File {
                content,
                mode,
                uid,
                gid,
            } => Some(Listed {
                perms: perm_string('-', *mode),
                uid: *uid,
                gid: *gid,
                size: Some(content.len() as u64),
                dev: None,
                link: None,
            }),
            kiln::render::tree::Entry::Symlink { target } => Some(Listed {
                perms: "lrwxrwxrwx".into(),
                uid: 0,
                gid: 0,
                size: Some(target.len() as u64),
                dev: None,
                link: Some(target.clone()),
            }),
            kiln::render::tree::Entry::Dir { mode } => Some(Listed {
                perms: perm_string('d', *mode),
                uid: 0,
                gid: 0,
                size: None,
                dev: None,
                link: None,
            }),
        };
        m.insert(path.trim_start_matches('/').to_string(), listed);
    }
    let k3s_size = fs::metadata(&shared().k3s).unwrap().len();
    m.insert(
        kiln::image::rootfs::K3S_PATH.to_string(),
        Some(Listed {
            perms: "-rwxr-xr-x".into(),
            uid: 0,
            gid: 0,
            size: Some(k3s_size),
            dev: None,
            link: None,
        }),
    );
    // vm.toml's agent may reach its hub over TCP: every root carries the
    // relay the build found beside this test program.
    let relay_size = fs::metadata(env!("CARGO_BIN_EXE_kiln-relay"))
        .unwrap()
        .len();
    m.insert(
        kiln::image::rootfs::RELAY_PATH.to_string(),
        Some(Listed {
            perms: "-rwxr-xr-x".into(),
            uid: 0,
            gid: 0,
            size: Some(relay_size),
            dev: None,
            link: None,
        }),
    );
    m.insert("usr/lib/tmpfiles.d/kiln-factory.conf".to_string(), None);
    m
}

/// The SBOM lists exactly the packages `dpkg-query` lists as installed
/// in the image's root (its dpkg database, kept in the factory copy of
/// `/var`), and k3s with the binary's digest.
#[test]
fn the_sbom_lists_what_dpkg_query_lists_in_the_root() {
    let s = shared();
    let root = root_a_of("s1");
    let admin = tempfile::tempdir().unwrap();
    let status = run_bytes(
        tool("unsquashfs")
            .arg("-cat")
            .arg(&root.path)
            .arg("usr/share/kiln/factory/var/lib/dpkg/status"),
    );
    fs::write(admin.path().join("status"), status).unwrap();
    let listed = run(tool("dpkg-query")
        .arg(format!("--admindir={}", admin.path().display()))
        .arg("--show")
        .arg("--showformat=${db:Status-Abbrev} ${Package} ${Version} ${Architecture}\\n"));
    let installed: BTreeSet<String> = listed
        .lines()
        .filter(|l| l.starts_with("ii ") || l.starts_with("hi "))
        .map(|l| l[3..].trim().to_string())
        .collect();
    assert!(installed.len() > 100, "dpkg-query listed:\n{listed}");

    let sbom: serde_json::Value =
        serde_json::from_slice(&fs::read(s.out.join("sbom.cdx.json")).unwrap()).unwrap();
    assert_eq!(sbom["specVersion"], "1.5");
    let components = sbom["components"].as_array().unwrap();
    let debs: BTreeSet<String> = components
        .iter()
        .filter(|c| {
            c["purl"]
                .as_str()
                .is_some_and(|p| p.starts_with("pkg:deb/debian/"))
        })
        .map(|c| {
            let arch = c["properties"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "kiln:deb:architecture")
                .unwrap()["value"]
                .as_str()
                .unwrap();
            format!(
                "{} {} {arch}",
                c["name"].as_str().unwrap(),
                c["version"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(debs, installed, "SBOM packages differ from dpkg-query's");
    let k3s = components.iter().find(|c| c["name"] == "k3s").unwrap();
    assert_eq!(k3s["version"], K3S_VERSION);
    assert_eq!(k3s["hashes"][0]["content"], sha256_file(&s.k3s).as_str());
    // vm.toml's agent may reach its hub over TCP: the roots carry the relay.
    let relay = components
        .iter()
        .find(|c| c["name"] == "kiln-relay")
        .unwrap();
    assert_eq!(relay["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        relay["hashes"][0]["content"],
        sha256_file(Path::new(env!("CARGO_BIN_EXE_kiln-relay"))).as_str()
    );
    assert_eq!(
        components.len(),
        installed.len() + 2,
        "k3s, kiln-relay, debs"
    );
}

/// root-a of `node`'s image, extracted.
struct RootA {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn root_a_of(node: &str) -> RootA {
    let dir = tempfile::tempdir().unwrap();
    let image = shared().out.join(format!("{node}.img"));
    let p = partition(&image, "root-a");
    let path = dir.path().join("root-a.sqfs");
    // The squashfs only, rounded up to 4 KiB as squashfs pads it.
    let used = squashfs_bytes_used(&image, p.start * SECTOR)
        .next_multiple_of(4096)
        .min(p.size * SECTOR);
    copy_range(&image, p.start * SECTOR, used, &path);
    RootA { _dir: dir, path }
}

#[test]
fn root_a_is_zstd_squashfs_holding_the_base_with_owners_modes_and_types() {
    let s = shared();
    let b = base();
    let image = s.out.join("s1.img");
    let offset = partition(&image, "root-a").start * SECTOR;

    let stats = run(tool("unsquashfs")
        .arg("-s")
        .arg("-o")
        .arg(offset.to_string())
        .arg(&image));
    assert!(
        stats.lines().any(|l| l.trim() == "Compression zstd"),
        "{stats}"
    );
    assert!(
        stats
            .lines()
            .any(|l| l.trim() == format!("compression-level {ZSTD_LEVEL}")),
        "{stats}"
    );
    assert!(
        stats
            .lines()
            .any(|l| l.trim() == format!("Block size {SQUASHFS_BLOCK}")),
        "{stats}"
    );

    let listing = parse_unsquashfs_listing(&run(tool("unsquashfs")
        .arg("-lln")
        .arg("-o")
        .arg(offset.to_string())
        .arg(&image)));
    // vm.toml's `storage = ["longhorn"]` puts open-iscsi in the base, whose
    // postinst names the initiator there: one name for every node, which
    // the root image must not carry (each node makes its own on /var).
    let iname = kiln::image::rootfs::ISCSI_BASE_INITIATOR_NAME;
    assert!(
        b.entries.contains_key(iname),
        "the base has no {iname}: did open-iscsi stop writing one at install time?"
    );
    assert!(!listing.contains_key(iname), "{iname} is in root-a");
    assert!(listing.contains_key("etc/iscsi/iscsid.conf"));
    let kiln_files = kiln_root_files();
    let mut expected_paths: BTreeSet<String> = BTreeSet::new();
    let mut failures = Vec::new();
    let (mut compared, mut devices, mut symlinks, mut hard_links) = (0, 0, 0, 0);
    for path in &b.order {
        let e = &b.entries[path];
        if path.is_empty() {
            continue;
        }
        let target = relocated(path);
        let replaced = kiln_files.contains_key(&target)
            && !(e.listed.perms.starts_with('d')
                && matches!(&kiln_files[&target], Some(l) if l.perms.starts_with('d')));
        if is_dropped(path) || replaced {
            if !replaced {
                assert!(
                    !listing.contains_key(&target),
                    "{path} is build-host state but is in the image"
                );
            }
            continue;
        }
        expected_paths.insert(target.clone());
        let Some(got) = listing.get(&target) else {
            failures.push(format!("{path} (as /{target}) is missing"));
            continue;
        };
        // A hard link is listed as the file it links to.
        let want = match &e.hard_link {
            Some(to) => {
                hard_links += 1;
                b.entries[to].listed.clone()
            }
            None => e.listed.clone(),
        };
        let mut got = got.clone();
        if !want.perms.starts_with('-') {
            // Sizes of directories and symlinks are squashfs's own.
            got.size = None;
        }
        let want = Listed {
            size: if want.perms.starts_with('-') {
                want.size
            } else {
                None
            },
            ..want
        };
        if got != want {
            failures.push(format!("/{target}: base {want:?}, image {got:?}"));
        }
        compared += 1;
        devices += usize::from(want.dev.is_some());
        symlinks += usize::from(want.link.is_some());
    }
    assert!(
        failures.is_empty(),
        "{} base entries differ in root-a:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        compared > 5000 && devices >= 8 && symlinks > 100 && hard_links >= 2,
        "compared {compared} entries, {devices} devices, {symlinks} symlinks, {hard_links} hard links"
    );
    eprintln!(
        "root-a: {compared} base entries match ({devices} device nodes, {symlinks} symlinks, {hard_links} hard links)"
    );

    // kiln's files, with their own modes and owners.
    for (path, want) in &kiln_files {
        let got = listing
            .get(path)
            .unwrap_or_else(|| panic!("/{path} is missing from root-a"));
        if let Some(want) = want {
            let mut got = got.clone();
            if want.perms.starts_with('d') {
                got.size = None;
            }
            assert_eq!(&got, want, "/{path}");
        } else {
            assert!(
                got.perms == "-rw-r--r--" && got.uid == 0 && got.gid == 0,
                "/{path}: {got:?}"
            );
        }
        expected_paths.insert(path.clone());
    }
    // Nothing else, apart from the directories that hold what is expected
    // (the factory's own parents, /etc/rancher for kiln's link), made by
    // tar2sqfs as root-owned 0755 directories.
    let implied: BTreeSet<String> = expected_paths
        .iter()
        .flat_map(|p| ancestors(p).collect::<Vec<_>>())
        .filter(|a| !expected_paths.contains(a))
        .collect();
    for a in &implied {
        let got = listing
            .get(a)
            .unwrap_or_else(|| panic!("/{a} is missing from root-a"));
        assert!(
            got.perms == "drwxr-xr-x" && got.uid == 0 && got.gid == 0,
            "/{a}: {got:?}"
        );
    }
    let extra: Vec<&String> = listing
        .keys()
        .filter(|p| !p.is_empty() && !expected_paths.contains(*p) && !implied.contains(*p))
        .collect();
    assert!(
        extra.is_empty(),
        "root-a holds what is neither the base nor kiln's: {extra:?}"
    );
    // /var itself stays (the state partition is mounted on it), empty.
    assert!(listing["var"].perms.starts_with('d'));
    assert!(
        !listing.keys().any(|p| p.starts_with("var/")),
        "/var in the image is not empty"
    );
}

#[test]
fn root_a_keeps_hard_links_clamps_mtimes_and_carries_k3s_and_kiln_files() {
    let s = shared();
    let b = base();
    let root = root_a_of("s1");
    let (entries, contents) = sqfs_tar(
        &root.path,
        &[
            kiln::image::rootfs::K3S_PATH,
            "usr/lib/kiln/image",
            "usr/lib/tmpfiles.d/kiln-factory.conf",
        ],
    );

    // Hard links stay hard links (either one may come first).
    let pairs: Vec<(&String, &String)> = b
        .entries
        .iter()
        .filter_map(|(p, e)| e.hard_link.as_ref().map(|t| (p, t)))
        .collect();
    assert!(!pairs.is_empty(), "the base has no hard links to check");
    for (a, t) in pairs {
        let (a, t) = (relocated(a), relocated(t));
        let linked = entries.get(&a).and_then(|e| e.hard_link.as_ref()) == Some(&t)
            || entries.get(&t).and_then(|e| e.hard_link.as_ref()) == Some(&a);
        assert!(
            linked,
            "/{a} and /{t} are hard links in the base but not in root-a: {:?} {:?}",
            entries.get(&a),
            entries.get(&t)
        );
    }

    // Every mtime is the base's, clamped to SOURCE_DATE_EPOCH.
    for (path, e) in &b.entries {
        if let Some(got) = entries.get(&relocated(path)) {
            assert_eq!(got.mtime, e.mtime.min(EPOCH), "/{path}");
        }
    }
    assert!(
        entries.values().all(|e| e.mtime <= EPOCH),
        "an mtime is after SOURCE_DATE_EPOCH"
    );

    // xattrs: the base carries only POSIX ACLs (on /var/log/journal), which
    // squashfs cannot store and kiln drops; so the image has none.
    // user_xattrs_survive_the_root_stream shows other xattrs are kept.
    let base_xattrs: BTreeSet<&String> = b.entries.values().flat_map(|e| &e.xattrs).collect();
    assert!(
        base_xattrs
            .iter()
            .all(|x| x.starts_with("system.posix_acl_")),
        "the base has non-ACL xattrs {base_xattrs:?}: check that they are in the image"
    );
    assert!(
        entries.values().all(|e| e.xattrs.is_empty()),
        "root-a stores xattrs the base did not have"
    );

    // The k3s binary is the one given, executable, at /usr/local/bin/k3s.
    assert_eq!(
        sha256(&contents[kiln::image::rootfs::K3S_PATH]),
        sha256_file(&s.k3s),
        "usr/local/bin/k3s is not the --k3s-binary"
    );
    assert!(entries[kiln::image::rootfs::K3S_PATH].kind.is_file());

    // The image's version file names what went in.
    let version = text(&contents["usr/lib/kiln/image"]);
    for want in [
        format!("k3s {K3S_VERSION}"),
        format!("k3s-sha256 {}", sha256_file(&s.k3s)),
        format!("base-sha256 {}", sha256_file(&s.base)),
        format!("kernel {}", b.vmlinuz.0.trim_start_matches("boot/vmlinuz-")),
    ] {
        assert!(
            version.lines().any(|l| l == want),
            "usr/lib/kiln/image lacks `{want}`:\n{version}"
        );
    }

    // systemd-tmpfiles seeds /var from the factory: package state is linked
    // (it follows the slot), the rest copied if missing; every source exists.
    let tmpfiles = text(&contents["usr/lib/tmpfiles.d/kiln-factory.conf"]);
    let rules: Vec<Vec<&str>> = tmpfiles
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    for r in &rules {
        assert_eq!(r.len(), 7, "{r:?}");
        let (kind, dest, src) = (r[0], r[1], r[6]);
        assert!(["C", "L+"].contains(&kind), "{r:?}");
        assert_eq!(src, format!("/usr/share/kiln/factory{dest}"), "{r:?}");
        assert!(
            entries.contains_key(src.trim_start_matches('/')),
            "{src} is not in the image"
        );
    }
    for linked in ["/var/lib/dpkg", "/var/lib/apt"] {
        assert!(
            rules.iter().any(|r| r[0] == "L+" && r[1] == linked),
            "{linked} is not linked to the factory:\n{tmpfiles}"
        );
    }
    // Every top-level /var entry of the base is seeded, one level deeper in
    // the directories seeded child by child.
    let split = ["var/lib", "var/cache", "var/log", "var/spool"];
    for path in b.entries.keys().filter(|p| p.starts_with("var/")) {
        let parts: Vec<&str> = path.split('/').collect();
        let top = format!("var/{}", parts[1]);
        let child = if split.contains(&top.as_str()) {
            if parts.len() > 2 {
                format!("{top}/{}", parts[2])
            } else {
                continue;
            }
        } else {
            top
        };
        assert!(
            rules.iter().any(|r| r[1] == format!("/{child}")),
            "/{child} is not seeded:\n{tmpfiles}"
        );
    }
}

#[test]
fn user_xattrs_survive_the_root_stream_and_acls_are_dropped() {
    // The real base has no xattr squashfs can store (only POSIX ACLs), so a
    // tiny synthetic base shows that the others pass: user.* and
    // security.capability (as setcap writes it, v2, cap_net_raw+ep).
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("base.tar");
    let capability: Vec<u8> = [
        0x00, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0,
        0, 0,
    ]
    .to_vec();
    let acl = b"\x02\x00\x00\x00\x01\x00\x07\x00\xff\xff\xff\xff".to_vec();
    {
        let mut t = tar::Builder::new(fs::File::create(&tarball).unwrap());
        let mut add =
            |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], xattrs: &[(&str, &[u8])]| {
                if !xattrs.is_empty() {
                    t.append_pax_extensions(xattrs.iter().map(|(k, v)| (*k, *v)))
                        .unwrap();
                }
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(mode);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(data.len() as u64);
                h.set_mtime(EPOCH + 1000);
                t.append_data(&mut h, path, data).unwrap();
            };
        add("./", tar::EntryType::Directory, 0o755, b"", &[]);
        add("./etc/", tar::EntryType::Directory, 0o755, b"", &[]);
        add(
            "./etc/tagged",
            tar::EntryType::Regular,
            0o644,
            b"has a user xattr\n",
            &[("SCHILY.xattr.user.kiln-test", b"kept")],
        );
        add("./usr/", tar::EntryType::Directory, 0o755, b"", &[]);
        add("./usr/bin/", tar::EntryType::Directory, 0o755, b"", &[]);
        add(
            "./usr/bin/ping",
            tar::EntryType::Regular,
            0o755,
            b"#!/bin/sh\n",
            &[("SCHILY.xattr.security.capability", &capability)],
        );
        add("./var/", tar::EntryType::Directory, 0o755, b"", &[]);
        add("./var/log/", tar::EntryType::Directory, 0o755, b"", &[]);
        add(
            "./var/log/journal/",
            tar::EntryType::Directory,
            0o2755,
            b"",
            &[
                ("SCHILY.xattr.system.posix_acl_access", &acl),
                ("SCHILY.xattr.user.journal", b"also kept"),
            ],
        );
        t.into_inner().unwrap().flush().unwrap();
    }
    let k3s = dir.path().join("k3s");
    fs::write(&k3s, b"#!/bin/sh\necho k3s\n").unwrap();
    let out = dir.path().join("root.sqfs");
    let inputs = kiln::image::rootfs::RootInputs {
        base: &tarball,
        overlays: vec![],
        k3s: &k3s,
        images: &[],
        relay: None,
        image_files: kiln::render::tree::FileTree::new(),
        mtime: EPOCH,
        level: 3,
    };
    kiln::image::rootfs::build_root(&inputs, &out).unwrap_or_else(|e| panic!("{e:#}"));

    let stats = run(tool("unsquashfs").arg("-s").arg(&out));
    assert!(!stats.contains("Xattrs are not stored"), "{stats}");
    let (entries, _) = sqfs_tar(&out, &[]);
    assert_eq!(
        entries["etc/tagged"]
            .xattrs
            .get("user.kiln-test")
            .map(Vec::as_slice),
        Some(&b"kept"[..]),
        "{:?}",
        entries["etc/tagged"]
    );
    assert_eq!(
        entries["usr/bin/ping"].xattrs.get("security.capability"),
        Some(&capability),
        "{:?}",
        entries["usr/bin/ping"]
    );
    let journal = &entries["usr/share/kiln/factory/var/log/journal"];
    assert!(
        !journal.xattrs.keys().any(|k| k.starts_with("system.")),
        "{journal:?}"
    );
    assert_eq!(
        journal.xattrs.get("user.journal").map(Vec::as_slice),
        Some(&b"also kept"[..]),
        "{journal:?}"
    );
    assert!(entries.values().all(|e| e.mtime <= EPOCH));
}

#[test]
fn a_truncated_base_fails_naming_the_base_not_tar2sqfs() {
    // A base cut off mid-stream: the error must say the base is bad. Today
    // tar2sqfs, fed a truncated tar, fails first and its "unexpected
    // end-of-file" is all the user sees.
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("base.tar");
    let mut whole = zstd::Decoder::new(fs::File::open(&shared().base).unwrap()).unwrap();
    std::io::copy(
        &mut (&mut whole).take(20 * MIB),
        &mut fs::File::create(&truncated).unwrap(),
    )
    .unwrap();
    let k3s = dir.path().join("k3s");
    fs::write(&k3s, b"#!/bin/sh\n").unwrap();
    let inputs = kiln::image::rootfs::RootInputs {
        base: &truncated,
        overlays: vec![],
        k3s: &k3s,
        images: &[],
        relay: None,
        image_files: kiln::render::tree::FileTree::new(),
        mtime: EPOCH,
        level: 3,
    };
    let err = format!(
        "{:#}",
        kiln::image::rootfs::build_root(&inputs, &dir.path().join("root.sqfs")).unwrap_err()
    );
    assert!(err.contains("reading the base tarball"), "{err}");
}

// ---------------------------------------------------------------------------
// Initramfs and seed

/// Decompress an initramfs: one zstd frame, then at most 3 zero bytes of
/// padding to the 4-byte boundary the next archive (the seed) needs.
fn unpack_initramfs(data: &[u8]) -> Vec<u8> {
    assert_eq!(
        &data[..4],
        &[0x28, 0xb5, 0x2f, 0xfd],
        "the initramfs is not zstd"
    );
    let frame = zstd::zstd_safe::find_frame_compressed_size(data).expect("one whole zstd frame");
    let padding = &data[frame..];
    assert!(
        padding.len() < 4 && padding.iter().all(|b| *b == 0) && data.len().is_multiple_of(4),
        "{} bytes after the frame: {padding:?}",
        padding.len()
    );
    zstd::decode_all(&data[..frame]).unwrap()
}

fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap();
    base.split(".ko").next().unwrap().replace('-', "_")
}

#[test]
fn initramfs_has_busybox_init_console_and_the_modules_it_lists() {
    let b = base();
    let esp = esp_of("s1");
    let cpio = unpack_initramfs(&esp_file(&esp.path, "kiln/a/initrd.img"));
    // Every node gets the same initramfs.
    assert!(
        esp_file(&esp_of("a1").path, "kiln/a/initrd.img")
            == esp_file(&esp.path, "kiln/a/initrd.img")
    );

    let listing = cpio_listing(&cpio);
    let names = text(&run_with_input(tool("cpio").args(["-t", "--quiet"]), &cpio));
    assert_eq!(names.lines().count(), listing.len());
    for want in [
        "init",
        "bin/busybox",
        "bin/sh",
        "dev/console",
        "etc/kiln/modules",
        "proc",
        "sys",
        "sysroot",
        "run",
        "tmp",
    ] {
        assert!(
            listing.contains_key(want),
            "{want} is missing from the initramfs"
        );
    }
    assert_eq!(listing["dev/console"].dev, Some((5, 1)));
    assert!(listing["dev/console"].perms.starts_with('c'));
    assert!(listing["init"].perms == "-rwxr-xr-x" && listing["bin/busybox"].perms == "-rwxr-xr-x");
    assert_eq!(listing["bin/sh"].link.as_deref(), Some("busybox"));

    let dir = tempfile::tempdir().unwrap();
    cpio_extract(
        &cpio,
        dir.path(),
        &["init", "bin/busybox", "etc/kiln/modules", "lib/*"],
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("init")).unwrap(),
        kiln::image::initramfs::INIT_SCRIPT
    );
    assert!(
        fs::read(dir.path().join("bin/busybox")).unwrap() == b.busybox,
        "bin/busybox is not the base's busybox-static"
    );

    let kernel_version = b.vmlinuz.0.trim_start_matches("boot/vmlinuz-");
    let modules_text = fs::read_to_string(dir.path().join("etc/kiln/modules")).unwrap();
    let modules: Vec<&str> = modules_text.lines().collect();
    assert!(modules.len() >= 10, "{modules:?}");
    eprintln!(
        "initramfs: {} entries, {} modules for {kernel_version}",
        listing.len(),
        modules.len()
    );
    let deps: BTreeMap<&str, Vec<&str>> = b
        .modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let base_modules: BTreeMap<String, &BaseEntry> = b
        .entries
        .iter()
        .filter_map(|(p, e)| {
            p.strip_prefix(&format!("usr/lib/modules/{kernel_version}/"))
                .map(|r| (r.to_string(), e))
        })
        .collect();
    for (i, m) in modules.iter().enumerate() {
        let inside = format!("lib/modules/{kernel_version}/{m}");
        assert!(
            listing.contains_key(&inside),
            "{inside} is listed in etc/kiln/modules but not in the initramfs"
        );
        let data = fs::read(dir.path().join(&inside)).unwrap();
        assert_eq!(
            Some(data.len() as u64),
            base_modules[*m].listed.size,
            "{m} differs from the base's"
        );
        // Dependencies (modules.dep) are in the initramfs and load first.
        for d in deps
            .get(m)
            .unwrap_or_else(|| panic!("{m} is not in the base's modules.dep"))
        {
            let at = modules
                .iter()
                .position(|x| x == d)
                .unwrap_or_else(|| panic!("{m} needs {d}, which is not in the initramfs"));
            assert!(at < i, "{d} loads after {m}, which needs it");
        }
    }
    // What finding and mounting the root needs, as a module or built in.
    let builtin: BTreeSet<String> = b.modules_builtin.lines().map(module_name).collect();
    let loaded: BTreeSet<String> = modules.iter().map(|m| module_name(m)).collect();
    for m in [
        "virtio_pci",
        "virtio_blk",
        "squashfs",
        "overlay",
        "ext4",
        "vfat",
        "efivarfs",
    ] {
        assert!(
            loaded.contains(m) || builtin.contains(m),
            "{m} is neither in the initramfs nor built into {kernel_version}"
        );
    }
    // Nothing under lib/ that is not listed.
    let listed: BTreeSet<String> = modules
        .iter()
        .map(|m| format!("lib/modules/{kernel_version}/{m}"))
        .collect();
    for (p, e) in &listing {
        if p.ends_with(".ko") || p.ends_with(".ko.xz") || p.ends_with(".ko.zst") {
            assert!(
                listed.contains(p),
                "{p} is in the initramfs but not in etc/kiln/modules"
            );
        }
        assert!(e.uid == 0 && e.gid == 0, "{p} is not root's");
    }
}

#[test]
fn seed_holds_exactly_the_rendered_node_files_with_modes() {
    let s = shared();
    let (plan, secrets) = kiln::config::secrets::load_with_secrets(&s.profile, None).unwrap();
    for node in NODES {
        let esp = esp_of(node);
        let seed = esp_file(&esp.path, "kiln/a/seed.img");
        assert_eq!(&seed[..6], b"070701", "the seed is not a plain newc cpio");
        let listing = cpio_listing(&seed);
        let dir = tempfile::tempdir().unwrap();
        cpio_extract(&seed, dir.path(), &[]);

        let rendered = kiln::cli::render::render_node(&plan, node, &secrets).unwrap();
        let mut expected: BTreeSet<String> = BTreeSet::from(["seed".to_string()]);
        for (path, e) in rendered.tree.iter() {
            let inside = format!("seed{path}");
            expected.extend(ancestors(&inside));
            expected.insert(inside.clone());
            let got = listing
                .get(&inside)
                .unwrap_or_else(|| panic!("{node}: {inside} is missing from the seed"));
            match e {
                kiln::render::tree::Entry::File {
                    content,
                    mode,
                    uid,
                    gid,
                } => {
                    assert_eq!(
                        (got.perms.as_str(), got.uid, got.gid),
                        (perm_string('-', *mode).as_str(), *uid, *gid),
                        "{node}: {inside}"
                    );
                    assert!(
                        &fs::read(dir.path().join(&inside)).unwrap() == content,
                        "{node}: {inside} differs from kiln render"
                    );
                }
                kiln::render::tree::Entry::Symlink { target } => {
                    assert_eq!(got.link.as_ref(), Some(target), "{node}: {inside}")
                }
                kiln::render::tree::Entry::Dir { mode } => {
                    assert_eq!(got.perms, perm_string('d', *mode), "{node}: {inside}")
                }
            }
        }
        // The one file the build adds: the disk GUID of the node's image
        // (a netbooting node uses a kiln disk only if it carries it).
        let guid_file = format!("seed{}", kiln::render::DISK_GUID_PATH);
        expected.insert(guid_file.clone());
        let guid = fs::read_to_string(dir.path().join(&guid_file)).unwrap();
        let sgdisk = text(
            &tool("sgdisk")
                .arg("-p")
                .arg(s.out.join(format!("{node}.img")))
                .output()
                .unwrap()
                .stdout,
        );
        assert!(
            sgdisk.contains(&format!(
                "Disk identifier (GUID): {}",
                guid.trim().to_uppercase()
            )),
            "{node}: {guid_file} ({guid}) is not the image's disk GUID:\n{sgdisk}"
        );
        let keys: BTreeSet<String> = listing.keys().cloned().collect();
        assert_eq!(
            keys, expected,
            "{node}: the seed holds more or less than the rendered files"
        );

        // The facts the VM tests rely on, spelled out.
        let read = |p: &str| {
            fs::read_to_string(dir.path().join("seed").join(p))
                .unwrap_or_else(|e| panic!("{node}: seed/{p}: {e}"))
        };
        assert_eq!(read("etc/hostname").trim(), node);
        for secret in [
            "etc/wireguard/wg0.conf",
            "etc/rancher/k3s/cluster-token",
            "etc/rancher/k3s/config.yaml",
        ] {
            assert_eq!(
                listing[&format!("seed/{secret}")].perms,
                "-rw-------",
                "{node}: {secret}"
            );
        }
        let wg = read("etc/wireguard/wg0.conf");
        assert!(
            wg.contains("PrivateKey = ") && wg.contains("ListenPort = 51830"),
            "{wg}"
        );
        // a1 reaches its hub s1 with `hub-transport = "auto"`: over UDP
        // first (kiln-wg-transport moves the endpoint to the relay when UDP
        // gets no answer), and the hub dials it on the LAN.
        let (me, peer) = if node == "s1" {
            ("10.0.0.1", "192.168.76.12:51830")
        } else {
            ("10.0.0.2", "192.168.76.11:51830")
        };
        assert!(
            wg.contains(&format!("Address = {me}/24"))
                && wg.contains(&format!("Endpoint = {peer}")),
            "{node}: {wg}"
        );
        if node == "a1" {
            let env = read("etc/kiln/wg-transport.env");
            assert!(
                env.contains("UDP_ENDPOINT=192.168.76.11:51830")
                    && env.contains("TCP_ENDPOINT=127.0.0.1:51839"),
                "{env}"
            );
        }
        let config = read("etc/rancher/k3s/config.yaml");
        assert!(
            config.contains(&format!("node-ip: \"{me}\""))
                || config.contains(&format!("node-ip: {me}")),
            "{config}"
        );
        let role = if node == "s1" { "server" } else { "agent" };
        assert!(
            read("etc/systemd/system/k3s.service")
                .lines()
                .any(|l| l == format!("ExecStart=/usr/local/bin/k3s {role}")),
            "{node}: k3s.service"
        );
        assert!(
            read("etc/ssh/authorized_keys/root")
                .lines()
                .any(|l| l == s.public_key),
            "root's generated key is not authorised"
        );
        assert_eq!(
            listing["seed/etc/kiln-test/write-file.txt"].perms,
            "-rw-r-----"
        );
        assert_eq!(
            read("etc/kiln-test/write-file.txt"),
            "written by kiln from vm.toml\n"
        );
        assert!(read("etc/sysctl.d/90-kiln.conf").contains("vm.max_map_count = 262144"));
        assert!(
            read("etc/modules-load.d/kiln.conf")
                .lines()
                .any(|l| l == "ip_vs")
        );
        let firstboot = read("etc/kiln/firstboot.sh");
        assert!(
            firstboot.contains("/var/lib/kiln-test/boot-cmd")
                && firstboot.contains("/var/lib/kiln-test/run-once"),
            "{firstboot}"
        );
        let network = read("etc/systemd/network/20-kiln-lan.network");
        let mac = if node == "s1" {
            "52:54:00:12:34:01"
        } else {
            "52:54:00:12:34:02"
        };
        assert!(
            network.contains(&format!("MACAddress={mac}"))
                && network.contains("Gateway=192.168.76.2"),
            "{network}"
        );
        assert!(read("etc/kiln/cmdline").contains("pcie_aspm=off"));
    }
}

// ---------------------------------------------------------------------------
// Reproducibility, checksums, manifest

#[test]
fn a_second_build_elsewhere_is_byte_identical_and_checksums_verify() {
    let s = shared();
    // The same profile, state and lock in another directory.
    let dir = tempfile::tempdir().unwrap();
    let profile_dir = s.profile.parent().unwrap();
    let copy = dir.path().join("elsewhere");
    copy_tree(profile_dir, &copy);
    let out = dir.path().join("out2");
    // A stage cache of its own: this build makes everything afresh,
    // whatever the shared build took from the user's cache.
    let cache = cache_with_base(dir.path());
    let started = Instant::now();
    // Under umask 000: modes must not depend on the caller's umask.
    let o = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg("build")
        .arg(copy.join("vm.toml"))
        .arg("--out")
        .arg(&out)
        .arg("--k3s-binary")
        .arg(&s.k3s)
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .env("KILN_CACHE_DIR", &cache)
        .env_remove("KILN_K3S_BINARY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        stage_log(&out).iter().all(|l| l.starts_with("built ")),
        "the cold build reused something: {:?}",
        stage_log(&out)
    );
    assert_nothing_writable_by_others(&out);
    eprintln!(
        "image tests: second build in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    for name in ["SHA256SUMS", "manifest.json", "sbom.cdx.json"] {
        assert!(
            fs::read(out.join(name)).unwrap() == fs::read(s.out.join(name)).unwrap(),
            "{name} differs between two builds:\n{}\n---\n{}",
            fs::read_to_string(s.out.join(name)).unwrap(),
            fs::read_to_string(out.join(name)).unwrap()
        );
    }
    for node in NODES {
        let img = format!("{node}.img");
        assert_eq!(
            sha256_file(&out.join(&img)),
            sha256_file(&s.out.join(&img)),
            "{img} differs between two builds"
        );
    }

    for o in [&s.out, &out] {
        let check = run(tool("sha256sum")
            .arg("-c")
            .arg("--strict")
            .arg("SHA256SUMS")
            .current_dir(o));
        for node in NODES {
            assert!(
                check.lines().any(|l| l == format!("{node}.img: OK")),
                "{check}"
            );
        }
    }

    let m = kiln::image::manifest::Manifest::read(&s.out).unwrap();
    assert_eq!(m.cluster, "vmtest");
    assert_eq!(m.source_date_epoch, EPOCH);
    assert_eq!(m.k3s.version, K3S_VERSION);
    assert_eq!(m.k3s.sha256, sha256_file(&s.k3s));
    assert_eq!(m.base.sha256, sha256_file(&s.base));
    let nodes: Vec<(&str, &str)> = m
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.role.as_str()))
        .collect();
    assert_eq!(nodes, [("s1", "server"), ("a1", "agent")]);
    for n in &m.nodes {
        assert!(n.cmdline.split(' ').any(|o| o == "pcie_aspm=off"), "{n:?}");
    }
    for a in &m.artifacts {
        let p = s.out.join(&a.path);
        assert_eq!(a.size, fs::metadata(&p).unwrap().len());
        assert_eq!(a.sha256, sha256_file(&p));
    }
    let sbom = m.sbom.as_ref().expect("the manifest names the SBOM");
    assert_eq!(sbom.path, "sbom.cdx.json");
    assert_eq!(sbom.sha256, sha256_file(&s.out.join(&sbom.path)));
    assert!(m.artifacts.iter().any(|a| a.path == sbom.path));
    let relay = m.relay.as_ref().expect("the manifest names the relay");
    assert_eq!(
        relay.sha256,
        sha256_file(Path::new(env!("CARGO_BIN_EXE_kiln-relay")))
    );
    assert_eq!(relay.version, env!("CARGO_PKG_VERSION"));
    let listed: serde_json::Value =
        serde_json::from_slice(&fs::read(s.out.join(&sbom.path)).unwrap()).unwrap();
    assert_eq!(
        sbom.components,
        listed["components"].as_array().unwrap().len()
    );
    // The typed manifest writes back the very bytes the build wrote.
    assert!(m.to_bytes() == fs::read(s.out.join("manifest.json")).unwrap());
}

/// No file or directory under `dir` (itself included) is writable by
/// group or others.
fn assert_nothing_writable_by_others(dir: &Path) {
    let mode = fs::symlink_metadata(dir).unwrap().mode();
    assert_eq!(mode & 0o022, 0, "{} is {:o}", dir.display(), mode & 0o7777);
    if fs::symlink_metadata(dir).unwrap().is_dir() {
        for e in fs::read_dir(dir).unwrap() {
            assert_nothing_writable_by_others(&e.unwrap().path());
        }
    }
}

/// Copy a directory tree of files (keeping permission bits).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::metadata(from).unwrap().permissions()).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Reuse: the stage cache

/// `DIR/cache`: an empty kiln cache with the user's cached bases linked in.
fn cache_with_base(dir: &Path) -> PathBuf {
    let cache = dir.join("cache");
    fs::create_dir(&cache).unwrap();
    let real_base = kiln::inputs::cache::cache_dir().join("base");
    std::os::unix::fs::symlink(&real_base, cache.join("base")).unwrap();
    cache
}

/// The lines of OUT/stages.log, sorted (nodes are built in parallel).
fn stage_log(out: &Path) -> Vec<String> {
    let text = fs::read_to_string(out.join("stages.log")).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| l.split(" key=").next().unwrap().to_string())
        .collect();
    lines.sort();
    lines
}

/// Build `profile` into `out` with the kiln cache `cache`.
fn build_cached(profile: &Path, out: &Path, cache: &Path, k3s: &Path) {
    let o = kiln()
        .arg("build")
        .arg(profile)
        .arg("--out")
        .arg(out)
        .arg("--k3s-binary")
        .arg(k3s)
        .env("KILN_CACHE_DIR", cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// sha256 of every file of a build output but the stage log, hashed here.
fn output_digests(out: &Path) -> BTreeMap<String, String> {
    fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != "stages.log")
        .map(|n| (n.clone(), sha256_file(&out.join(&n))))
        .collect()
}

#[test]
fn a_warm_rebuild_reuses_every_stage_and_writes_the_bytes_of_a_cold_one() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_base(dir.path());
    let profile = write_profile(dir.path(), &s.public_key);
    let (cold, warm, again) = (
        dir.path().join("cold"),
        dir.path().join("warm"),
        dir.path().join("again"),
    );
    build_cached(&profile, &cold, &cache, &s.k3s);
    let built = [
        "built a1.img",
        "built base-files",
        "built initramfs",
        "built root[server]",
        "built s1.img",
    ];
    assert_eq!(stage_log(&cold), built);
    build_cached(&profile, &warm, &cache, &s.k3s);
    assert_eq!(
        stage_log(&warm),
        built.map(|l| l.replace("built", "reused"))
    );
    let digests = output_digests(&cold);
    assert!(digests.contains_key("s1.img") && digests.contains_key("a1.img"));
    assert_eq!(output_digests(&warm), digests, "reused bytes differ");
    // A reused image is the user's own file: booting it in place must
    // not change another output (or the cache).
    for img in ["s1.img", "a1.img"] {
        let (c, w) = (
            fs::metadata(cold.join(img)).unwrap(),
            fs::metadata(warm.join(img)).unwrap(),
        );
        assert_ne!(c.ino(), w.ino(), "{img} is shared by two outputs");
        assert_eq!(w.nlink(), 1, "{img} is shared with the cache");
    }

    // A damaged entry is not used: the root is made again, the same.
    let roots = cache.join("stages/root");
    let entry = fs::read_dir(&roots)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_none())
        .expect("a cached root");
    let mut f = fs::OpenOptions::new().write(true).open(&entry).unwrap();
    f.write_all(b"not squashfs").unwrap();
    drop(f);
    build_cached(&profile, &again, &cache, &s.k3s);
    let log = stage_log(&again);
    assert!(log.contains(&"built root[server]".to_string()), "{log:?}");
    assert!(log.contains(&"reused s1.img".to_string()), "{log:?}");
    assert_eq!(output_digests(&again), digests, "a rebuilt root differs");
}

#[test]
fn a_config_only_rebuild_reuses_the_roots_and_the_initramfs() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_base(dir.path());
    let profile = write_profile(dir.path(), &s.public_key);
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    build_cached(&profile, &first, &cache, &s.k3s);
    let before = output_digests(&first);

    // The boot command is in every node's seed, nowhere else.
    let text = fs::read_to_string(&profile).unwrap();
    let edited = text.replace("echo boot >>", "echo boot again >>");
    assert_ne!(edited, text, "vm.toml's boot-cmd changed: update this test");
    fs::write(&profile, edited).unwrap();
    build_cached(&profile, &second, &cache, &s.k3s);
    assert_eq!(
        stage_log(&second),
        [
            "built a1.img",
            "built s1.img",
            "reused base-files",
            "reused initramfs",
            "reused root[server]",
        ]
    );
    let after = output_digests(&second);
    for img in ["s1.img", "a1.img"] {
        assert_ne!(before[img], after[img], "{img} did not change");
    }
    assert_eq!(before["sbom.cdx.json"], after["sbom.cdx.json"]);
}

// ---------------------------------------------------------------------------
// Failures

/// An output directory that already holds a build (hard links to the
/// shared one), in a directory of its own, and what it looked like.
struct PreviousOut {
    _dir: tempfile::TempDir,
    parent: PathBuf,
    out: PathBuf,
    snapshot: BTreeMap<String, (u64, u64, i64, u32)>,
}

fn previous_out() -> PreviousOut {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().to_path_buf();
    let out = parent.join("out");
    fs::create_dir(&out).unwrap();
    for e in fs::read_dir(&s.out).unwrap() {
        let e = e.unwrap();
        fs::hard_link(e.path(), out.join(e.file_name())).unwrap();
    }
    let snapshot = snapshot(&out);
    PreviousOut {
        _dir: dir,
        parent,
        out,
        snapshot,
    }
}

/// name → (inode, size, mtime, mode) of every file in `dir`.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, u64, i64, u32)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                (m.ino(), m.len(), m.mtime(), m.mode()),
            )
        })
        .collect()
}

impl PreviousOut {
    fn assert_untouched(&self, what: &str) {
        assert_eq!(
            snapshot(&self.out),
            self.snapshot,
            "{what}: the previous output was changed"
        );
        let left: Vec<String> = names_starting(&self.parent, ".");
        assert!(left.is_empty(), "{what}: left beside the output: {left:?}");
    }
}

fn assert_failed(o: &Output, what: &str, wants: &[&str]) -> String {
    let err = text(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: expected failure, got {}:\n{err}",
        o.status
    );
    assert!(
        text(&o.stdout).is_empty(),
        "{what}: printed artifacts although it failed: {}",
        text(&o.stdout)
    );
    for w in wants {
        assert!(
            err.contains(w),
            "{what}: the error does not mention `{w}`:\n{err}"
        );
    }
    err
}

#[test]
fn a_build_for_an_unknown_node_fails_and_leaves_the_previous_output() {
    let s = shared();
    let prev = previous_out();
    let o = kiln()
        .arg("build")
        .arg(&s.profile)
        .arg("--node")
        .arg("nosuch")
        .arg("--out")
        .arg(&prev.out)
        .arg("--k3s-binary")
        .arg(&s.k3s)
        .output()
        .unwrap();
    assert_failed(&o, "unknown node", &["nosuch", "s1, a1"]);
    prev.assert_untouched("unknown node");
}

#[test]
fn a_missing_k3s_binary_fails_and_leaves_the_previous_output() {
    let s = shared();
    let prev = previous_out();
    let missing = prev.parent.join("no-such-k3s");
    let o = kiln_build(&s.profile, &prev.out, Some(&missing));
    assert_failed(
        &o,
        "missing k3s binary",
        &[&missing.to_string_lossy(), "--k3s-binary"],
    );
    prev.assert_untouched("missing k3s binary");
}

#[test]
fn a_build_failing_midway_in_the_root_image_leaves_the_previous_output() {
    // An overlay with a FIFO: the base, k3s and initramfs stages succeed,
    // then the root image stage fails with tar2sqfs already running.
    let s = shared();
    let prev = previous_out();
    let profile_dir = prev.parent.join("profile");
    fs::create_dir(&profile_dir).unwrap();
    let profile = write_profile(&profile_dir, &s.public_key);
    let fifo_dir = profile_dir.join("overlays/common/etc/kiln-test");
    fs::create_dir_all(&fifo_dir).unwrap();
    run(Command::new("mkfifo").arg(fifo_dir.join("fifo")));
    // A cache of its own, so the initramfs is made, not reused.
    let cache = cache_with_base(&prev.parent);
    let o = kiln()
        .arg("build")
        .arg(&profile)
        .arg("--out")
        .arg(&prev.out)
        .arg("--k3s-binary")
        .arg(&s.k3s)
        .env("KILN_CACHE_DIR", &cache)
        .output()
        .unwrap();
    let err = assert_failed(&o, "FIFO in an overlay", &["fifo", "overlays hold only"]);
    assert!(
        err.contains("initramfs: done"),
        "the build should fail after the initramfs stage:\n{err}"
    );
    prev.assert_untouched("FIFO in an overlay");
    // The profile directory holds nothing new but the state and the lock.
    let names: BTreeSet<String> = fs::read_dir(&profile_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    let allowed: BTreeSet<String> = ["kiln.lock", "overlays", "vm.state", "vm.toml"]
        .map(String::from)
        .into();
    assert!(names.is_subset(&allowed), "{names:?}");
}

/// Start a build into `out` and wait until its stderr shows `line`; the
/// child and the stderr lines read so far.
fn build_until(profile: &Path, out: &Path, line: &str) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead as _;
    let mut child = kiln()
        .arg("build")
        .arg(profile)
        .arg("--out")
        .arg(out)
        .arg("--k3s-binary")
        .arg(&shared().k3s)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    loop {
        let mut l = String::new();
        assert!(
            r.read_line(&mut l).unwrap() > 0,
            "the build ended before {line:?}: {seen:?}"
        );
        let hit = l.contains(line);
        seen.push(l.trim_end().to_string());
        if hit {
            break;
        }
    }
    // Keep draining so the build never blocks on a full pipe.
    let rest = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut r, &mut v);
        v
    });
    std::mem::forget(rest);
    (child, seen)
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn a_killed_build_leaves_a_staging_dir_the_next_build_removes_and_sigterm_cleans_up() {
    let s = shared();
    let prev = previous_out();
    // SIGKILL: nothing can clean up; a staging dir (with secrets) stays …
    let (mut child, _) = build_until(&s.profile, &prev.out, "base root tarball");
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let left = names_starting(&prev.parent, ".out.staging-");
    assert!(!left.is_empty(), "SIGKILL left nothing to clean up?");
    assert_eq!(
        snapshot(&prev.out),
        prev.snapshot,
        "SIGKILL changed the previous output"
    );
    // … until the next build, which removes it and says so. SIGTERM then
    // stops that build like Ctrl-C: staging removed, out as it was.
    let (mut child, seen) = build_until(&s.profile, &prev.out, "base root tarball");
    assert!(
        seen.iter()
            .any(|l| l.contains("left by a build that was killed")),
        "{seen:?}"
    );
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    let left = names_starting(&prev.parent, ".out.");
    assert!(left.is_empty(), "left behind: {left:?}");
    prev.assert_untouched("SIGTERM");
}

#[test]
fn a_build_refuses_an_out_that_is_not_a_kiln_output() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    fs::write(home.join("notes.txt"), "mine").unwrap();
    let o = kiln_build(&s.profile, &home, Some(&s.k3s));
    assert_failed(
        &o,
        "non-kiln --out",
        &["holds no kiln manifest.json", "choose another --out"],
    );
    assert_eq!(fs::read(home.join("notes.txt")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(&home).unwrap().count(), 1);
}

#[test]
fn a_full_disk_fails_saying_what_ran_out_and_leaves_nothing() {
    // A 40 MiB tmpfs: the root image (~100 MiB) cannot fit. Needs root to
    // mount, as CI and `make test` run.
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    fs::create_dir(&small).unwrap();
    run(tool("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "kiln-test-full"])
        .arg(&small));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let o = kiln_build(&s.profile, &small.join("out"), Some(&s.k3s));
    assert_failed(
        &o,
        "disk full",
        &[
            "no space left for the build on the filesystem holding",
            "the build needs about",
            "MiB free",
            "--out",
        ],
    );
    let left: Vec<_> = fs::read_dir(&small).unwrap().collect();
    assert!(
        left.is_empty(),
        "left behind on the full filesystem: {left:?}"
    );
}

#[test]
fn without_k3s_binary_or_network_the_build_fails_naming_both_ways_and_writes_no_image() {
    // The k3s double must never reach an image unasked: with no
    // --k3s-binary, no KILN_K3S_BINARY, nothing cached and no network, the
    // build stops. A cache dir of its own (with the real base cache linked
    // in) makes sure no cached k3s is found; proxies on a closed port stand
    // in for "no network".
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    fs::create_dir(&cache).unwrap();
    let real_base = kiln::inputs::cache::cache_dir().join("base");
    std::os::unix::fs::symlink(&real_base, cache.join("base")).unwrap();
    let out = dir.path().join("out");
    let mut c = kiln();
    c.arg("build")
        .arg(&s.profile)
        .arg("--out")
        .arg(&out)
        .env("KILN_CACHE_DIR", &cache);
    for v in [
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        c.env(v, "http://127.0.0.1:9");
    }
    c.env_remove("NO_PROXY").env_remove("no_proxy");
    let o = c.output().unwrap();
    assert_failed(
        &o,
        "no k3s binary",
        &[K3S_VERSION, "--k3s-binary", "KILN_K3S_BINARY"],
    );
    assert!(!out.exists(), "an output directory was written");
    let left: Vec<String> = names_starting(dir.path(), ".");
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        !cache.join("k3s").join(K3S_VERSION).join("k3s").exists(),
        "something was cached as k3s"
    );
}
