//! The base root filesystem: a Debian root tarball made by `mmdebstrap`
//! from a [`BaseSpec`], cached by a digest of that spec; or a tarball the
//! user supplies.
//!
//! The spec is pure data derived from the plan ([`base_spec`]); only
//! [`ensure_base`] runs mmdebstrap. A cached tarball sits at
//! `<cache>/base/<digest>.tar.zst` with `<digest>.json` beside it recording
//! the spec, the tarball's sha256 and when it was built (`built-at`); a
//! tarball without a matching record is not trusted and is rebuilt.
//!
//! A digest names what was asked for, not the package versions the archive
//! had then, so a cached base is also made again once it is older than
//! `base.max-age`, or when `kiln build --refresh-base` asks (the decision
//! is [`crate::inputs::freshness`]'s, a pure function of the build time,
//! the clock and the max-age); the new tarball replaces the old one by a
//! rename.
//!
//! No mirror is named here: mmdebstrap, given no mirror, uses its built-in
//! default Debian mirror plus the suite's `-updates` and security archives
//! (mmdebstrap(1), DESCRIPTION), with the components we pass in
//! `--components` (so `non-free-firmware` needs no sources edit). Note that
//! it does not read the host's `/etc/apt/sources.list*` or `apt.conf.d`
//! (it runs apt with its own `APT_CONFIG`); it does use the host's archive
//! keyrings, and apt honours `http_proxy` from the environment.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::config::plan::{BasePlan, Plan};
use crate::config::profile::KernelFlavour;
use crate::config::types::MaxAge;
use crate::inputs::freshness::{
    Freshness, Refresh, freshness, human_age, rebuild_reason, unix_now,
};
use crate::util::cancel::Cancel;
use crate::util::tool::{self, Tool};

/// Bump when anything that shapes the tarball but is not in [`BaseSpec`]
/// changes (the hook, the variant, how mmdebstrap is called): every cached
/// base is then rebuilt. The hook text is hashed too, as a safety net.
pub const BASE_FORMAT_VERSION: u32 = 1;

/// The only architecture kiln builds for.
pub const ARCHITECTURE: &str = "amd64";

/// mmdebstrap variant: Essential + apt, then only what we name (no
/// `Priority: important` packages such as vim-tiny or cron).
pub const VARIANT: &str = "minbase";

/// Packages every base gets, whatever the kernel. mmdebstrap installs
/// dependencies but not Recommends.
pub const DEFAULT_PACKAGES: &[&str] = &[
    // Init and devices: systemd as PID 1 once the initramfs switches root,
    // udev for hotplug and module autoloading. dbus: logind, hostnamed,
    // resolvectl/timedatectl and the systemd cgroup driver (k3s's
    // containerd) talk to systemd over the system bus; without it they fail.
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    // Services the rendered files configure (networkd is part of `systemd`
    // in bookworm; resolved and timesyncd are separate packages).
    "systemd-resolved",
    "systemd-timesyncd",
    // Boot: busybox is the initramfs's userland; systemd-boot-efi carries
    // the EFI binary copied to the ESP.
    "busybox-static",
    "systemd-boot-efi",
    // Cluster networking: the WireGuard tunnel, the nftables firewall,
    // iptables (nft backend) for k3s and flannel, `ip` for people and units.
    "wireguard-tools",
    "nftables",
    "iptables",
    "iproute2",
    // Remote access (host keys are made per node at boot, not here).
    "openssh-server",
    // Disks and modules: mkfs.ext4 for the state partition, sfdisk/fdisk,
    // modprobe.
    "e2fsprogs",
    "fdisk",
    "kmod",
    // TLS roots for registries and downloads; bash for scripts and people.
    "ca-certificates",
    "bash",
];

/// The kernel for real machines: has ahci, usb-storage, uas, xhci, nvme.
pub const GENERIC_KERNEL_PACKAGES: &[&str] = &["linux-image-amd64"];

/// NIC firmware for real machines (all in `non-free-firmware`):
/// Realtek NICs (r8169 loads `rtl_nic/*`) and the rest of the non-free
/// blobs (Intel ice DDP, Broadcom tg3 variants, …). Intel's common wired
/// NICs (e1000e, igb, igc) need no firmware, and bookworm has no separate
/// Intel wired-firmware package; Wi-Fi firmware (firmware-iwlwifi) is left
/// out because the image has no Wi-Fi supplicant.
pub const GENERIC_FIRMWARE_PACKAGES: &[&str] = &["firmware-realtek", "firmware-misc-nonfree"];

/// The kernel for VM-only profiles: virtio only, no firmware needed.
pub const CLOUD_KERNEL_PACKAGES: &[&str] = &["linux-image-cloud-amd64"];

/// The Debian component that holds firmware (Debian 12 and later).
pub const FIRMWARE_COMPONENT: &str = "non-free-firmware";

/// dpkg filters (`--dpkgopt`, kept in /etc/dpkg/dpkg.cfg.d/99mmdebstrap),
/// in order: a later rule overrides an earlier one. They drop what a node
/// never reads; copyright files stay (≈1 MB) for licence compliance.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    // Documentation, keeping each package's copyright file.
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/doc-base/*",
    // Manual and info pages.
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    // Message translations; locale.alias (3 KB) is read by glibc's
    // setlocale() to resolve names like "en_US", so it stays.
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    // Lintian overrides: packaging metadata.
    "path-exclude=/usr/share/lintian/*",
];

/// Run inside mmdebstrap after all packages are installed (`$1` is the
/// root), so the cached tarball holds no build-host state and nothing every
/// node would share.
pub const CUSTOMIZE_HOOK: &str = r#"set -eu
root="$1"
# The name of the build host, copied in by mmdebstrap; nodes render their own.
rm -f "$root/etc/hostname"
# The resolver config of the build host: drop a copied file, keep the symlink
# systemd-resolved installs to its stub resolver.
[ -L "$root/etc/resolv.conf" ] || rm -f "$root/etc/resolv.conf"
rm -f "$root/etc/.resolv.conf.systemd-resolved.bak"
# SSH host keys made by the openssh-server postinst: every node would share
# them. Nodes make their own on the state partition.
rm -f "$root"/etc/ssh/ssh_host_*
# The Debian initramfs (about 16 MB per kernel; INITRD=No should have
# stopped it): kiln builds its own.
rm -f "$root"/boot/initrd.img* "$root/initrd.img" "$root/initrd.img.old"
# An empty machine-id: systemd makes one per boot on a read-only root.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
"#;

/// Environment for mmdebstrap (and so for the maintainer scripts it runs).
/// `INITRD=No` makes the kernel's initramfs-tools hook
/// (/etc/kernel/postinst.d/initramfs-tools) skip building Debian's
/// initramfs, which kiln would throw away.
pub const BUILD_ENV: &[(&str, &str)] = &[("INITRD", "No")];

const MMDEBSTRAP: Tool = Tool::new("mmdebstrap", "mmdebstrap");
/// mmdebstrap compresses `.tar.zst` output with the zstd program.
const ZSTD: Tool = Tool::new("zstd", "zstd");

/// What to ask mmdebstrap for. Everything that changes the tarball is here
/// or in [`BASE_FORMAT_VERSION`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseSpec {
    /// Debian codename, like "bookworm".
    pub suite: String,
    pub kernel: KernelFlavour,
    /// The full list: defaults, kernel (and firmware), the profile's extras;
    /// sorted and deduplicated.
    pub packages: Vec<String>,
    /// Archive components, `main` first.
    pub components: Vec<String>,
    /// Always [`ARCHITECTURE`].
    pub architecture: String,
    /// dpkg `path-exclude=`/`path-include=` rules, in order.
    pub excludes: Vec<String>,
}

/// A base root tarball ready for the rootfs stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseTarball {
    pub path: PathBuf,
    /// Lowercase hex sha256 of the tarball file.
    pub sha256: String,
    /// False only when this call ran mmdebstrap to make it.
    pub reused: bool,
    /// The file `sha256` was taken of: see [`BaseTarball::check_unchanged`].
    pub identity: FileIdentity,
}

/// Which file a path names and its size and mtime: a file renamed over it
/// (a refresh publishes so) or rewritten in place has another identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> Result<Self> {
        let m = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Self::from_metadata(&m))
    }

    fn from_metadata(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

impl BaseTarball {
    /// Fails if `path` no longer holds the file hashed at the start.
    ///
    /// A build opens the base several times (boot files, each root), and
    /// the cache lock is held only while the base is looked up: another
    /// kiln that refreshes the same base meanwhile (`--refresh-base`, or
    /// its max-age ran out) renames a new tarball over it. The cache stays
    /// whole, but this build may have read old and new, and its manifest
    /// and SBOM name the old one's sha256. A build calls this once it has
    /// read everything from the base, before publishing anything.
    pub fn check_unchanged(&self) -> Result<()> {
        let now = FileIdentity::of(&self.path)
            .with_context(|| format!("checking the base tarball {}", self.path.display()))?;
        if now != self.identity {
            bail!(
                "the base tarball {} changed while this build read it (another kiln refreshed it, or the file was replaced); nothing was published: run the build again",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// The spec for a plan's Debian base; `None` when the user supplies a tarball.
pub fn base_spec(plan: &Plan) -> Option<BaseSpec> {
    match &plan.base {
        BasePlan::Debian {
            suite,
            kernel,
            packages,
            ..
        } => {
            // Storage prerequisites (`storage`) join the profile's extras:
            // a cluster with storage gets its own base (another digest).
            let extra = [packages.clone(), plan.storage_packages()].concat();
            Some(debian_spec(suite, *kernel, &extra))
        }
        BasePlan::Tarball(_) => None,
    }
}

/// The spec for `suite` with `kernel` and the profile's extra packages.
pub fn debian_spec(suite: &str, kernel: KernelFlavour, extra_packages: &[String]) -> BaseSpec {
    let kernel_packages: Vec<&str> = match kernel {
        KernelFlavour::Generic => [GENERIC_KERNEL_PACKAGES, GENERIC_FIRMWARE_PACKAGES].concat(),
        KernelFlavour::Cloud => CLOUD_KERNEL_PACKAGES.to_vec(),
    };
    let mut packages: Vec<String> = DEFAULT_PACKAGES
        .iter()
        .chain(&kernel_packages)
        .map(|s| s.to_string())
        .chain(extra_packages.iter().cloned())
        .collect();
    packages.sort();
    packages.dedup();
    let mut components = vec!["main".to_string()];
    if packages.iter().any(|p| needs_firmware_component(p)) {
        components.push(FIRMWARE_COMPONENT.to_string());
    }
    BaseSpec {
        suite: suite.to_string(),
        kernel,
        packages,
        components,
        architecture: ARCHITECTURE.to_string(),
        excludes: DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect(),
    }
}

/// Packages that live in `non-free-firmware` (firmware blobs and CPU
/// microcode); `firmware-linux-free` is in main, but asking for the extra
/// component is harmless.
fn needs_firmware_component(package: &str) -> bool {
    package.starts_with("firmware-") || package.ends_with("-microcode")
}

fn kernel_name(k: KernelFlavour) -> &'static str {
    match k {
        KernelFlavour::Generic => "generic",
        KernelFlavour::Cloud => "cloud",
    }
}

/// The text the digest is taken of: one fact per line, in a fixed order.
pub fn canonical_text(spec: &BaseSpec) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "kiln-base-format {BASE_FORMAT_VERSION}");
    let _ = writeln!(s, "suite {}", spec.suite);
    let _ = writeln!(s, "kernel {}", kernel_name(spec.kernel));
    let _ = writeln!(s, "architecture {}", spec.architecture);
    let _ = writeln!(s, "variant {VARIANT}");
    let _ = writeln!(s, "components {}", spec.components.join(","));
    for p in &spec.packages {
        let _ = writeln!(s, "package {p}");
    }
    for e in &spec.excludes {
        let _ = writeln!(s, "dpkgopt {e}");
    }
    for (k, v) in BUILD_ENV {
        let _ = writeln!(s, "env {k}={v}");
    }
    let _ = writeln!(
        s,
        "customize-hook sha256:{}",
        hex::encode(Sha256::digest(CUSTOMIZE_HOOK))
    );
    s
}

/// Lowercase hex sha256 of [`canonical_text`]: the cache key.
pub fn spec_digest(spec: &BaseSpec) -> String {
    hex::encode(Sha256::digest(canonical_text(spec)))
}

/// Where the tarball for `spec` is cached under `cache` (the kiln cache dir).
pub fn cached_path(spec: &BaseSpec, cache: &Path) -> PathBuf {
    cache
        .join("base")
        .join(format!("{}.tar.zst", spec_digest(spec)))
}

fn record_path(tarball: &Path) -> PathBuf {
    let name = tarball.file_name().unwrap_or_default().to_string_lossy();
    tarball.with_file_name(format!("{}.json", name.trim_end_matches(".tar.zst")))
}

/// The mmdebstrap command line for `spec`, writing to `target` (whose
/// `.tar.zst` extension makes mmdebstrap compress with zstd).
pub fn mmdebstrap_command(spec: &BaseSpec, target: &Path) -> Result<Command> {
    let mut cmd = MMDEBSTRAP.command()?;
    cmd.arg(format!("--variant={VARIANT}"))
        .arg(format!("--architectures={}", spec.architecture))
        .arg(format!("--components={}", spec.components.join(",")))
        .arg("--format=tar")
        .arg(format!("--include={}", spec.packages.join(",")));
    for e in &spec.excludes {
        cmd.arg(format!("--dpkgopt={e}"));
    }
    cmd.arg(format!("--customize-hook={CUSTOMIZE_HOOK}"))
        .arg("--")
        .arg(&spec.suite)
        .arg(target);
    cmd.envs(BUILD_ENV.iter().copied());
    Ok(cmd)
}

/// The cached tarball for `spec`, reused if it is fresh by `refresh`,
/// else built with mmdebstrap (see [`ensure_base_cancellable`]). For
/// callers without a profile: `base.max-age`'s default applies.
pub fn ensure_base(spec: &BaseSpec, cache: &Path, source_date_epoch: u64) -> Result<BaseTarball> {
    let refresh = Refresh::WhenOlderThan(crate::config::plan::DEFAULT_BASE_MAX_AGE);
    ensure_base_cancellable(spec, cache, source_date_epoch, refresh, &Cancel::default())
}

/// The cached tarball for `spec`, building it with mmdebstrap first if it
/// is missing, does not match its record, or is due by `refresh`.
///
/// `cache` is the kiln cache dir ([`crate::inputs::cache::cache_dir`]); the build
/// runs with `SOURCE_DATE_EPOCH=source_date_epoch`. A failed or interrupted
/// build leaves only a hidden temp file, never `<digest>.tar.zst`; a
/// refresh replaces the old tarball by a rename, so the cache holds the old
/// base or the new one, never a part of either. When a refresh fails, the
/// old base stays in the cache and the error says how to keep using it.
///
/// Concurrent calls for the same spec (parallel tests, two `kiln build`s)
/// are serialised by an exclusive `flock(2)` on `<cache>/base/<digest>.lock`
/// held from the cache check to the publish: one runs mmdebstrap, the
/// others wait and then reuse its tarball. The kernel drops the lock when
/// the holder exits, however it exits (a lock file left by a killed build
/// is harmless: it is locked afresh and removed by the next build).
/// When `cancel` is set, mmdebstrap is stopped and the result is an
/// interruption (the temp file goes with the error).
pub fn ensure_base_cancellable(
    spec: &BaseSpec,
    cache: &Path,
    source_date_epoch: u64,
    refresh: Refresh,
    cancel: &Cancel,
) -> Result<BaseTarball> {
    let now = unix_now();
    let digest = spec_digest(spec);
    let path = cached_path(spec, cache);
    let record = record_path(&path);
    let dir = path.parent().expect("cached path has a parent");
    let _lock = lock_base(dir, &digest)?;
    let why = match check_cached(&path, &record)? {
        None => None,
        Some(cached) => match rebuild_reason(refresh, cached.built_at, now) {
            None => {
                log::info!(
                    "base {} ({} kernel): reusing {}, built {} ago",
                    spec.suite,
                    kernel_name(spec.kernel),
                    path.display(),
                    human_age(now.saturating_sub(cached.built_at))
                );
                return Ok(cached.tarball);
            }
            Some(why) => {
                log::warn!(
                    "building the {} base again ({why}): {}",
                    spec.suite,
                    path.display()
                );
                Some(why)
            }
        },
    };
    let built = build_and_publish(spec, &path, source_date_epoch, cancel);
    let Some(why) = why else { return built };
    built.with_context(|| {
        format!(
            "refreshing the cached {} base {} because {why}; it stays in the cache: to build with it meanwhile, {}",
            spec.suite,
            path.display(),
            match refresh {
                Refresh::WhenOlderThan(_) => "raise `base.max-age` in the profile",
                Refresh::UnlessBuiltSince(_) => "build without --refresh-base",
            }
        )
    })
}

/// Run mmdebstrap into a temp file beside `path`, then move it to `path`
/// and write its record. The caller holds the digest's lock.
fn build_and_publish(
    spec: &BaseSpec,
    path: &Path,
    source_date_epoch: u64,
    cancel: &Cancel,
) -> Result<BaseTarball> {
    let digest = spec_digest(spec);
    let dir = path.parent().expect("cached path has a parent");
    tool::preflight(&[MMDEBSTRAP, ZSTD])?;
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the base cache {}", dir.display()))?;
    remove_orphaned_temps(dir, &digest);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{digest}."))
        .suffix(".tmp.tar.zst")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;

    let mut cmd = mmdebstrap_command(spec, tmp.path())?;
    cmd.env("SOURCE_DATE_EPOCH", source_date_epoch.to_string());
    let env: Vec<String> = BUILD_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let line = format!(
        "SOURCE_DATE_EPOCH={source_date_epoch} {} {}",
        env.join(" "),
        tool::display(&cmd)
    );
    log::info!(
        "building base {} ({} kernel, {} packages), one to two minutes: {line}",
        spec.suite,
        kernel_name(spec.kernel),
        spec.packages.len()
    );
    let started = Instant::now();
    tool::run_cancellable(&mut cmd, cancel)
        .with_context(|| format!("building the {} base tarball with mmdebstrap", spec.suite))?;
    let seconds = started.elapsed().as_secs_f64();

    let file =
        fs::File::open(tmp.path()).with_context(|| format!("opening {}", tmp.path().display()))?;
    let bytes = file
        .metadata()
        .with_context(|| format!("reading {}", tmp.path().display()))?
        .len();
    if bytes == 0 {
        bail!(
            "mmdebstrap exited successfully but wrote nothing to {}",
            tmp.path().display()
        );
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.path().display()))?;
    fs_err::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
    let sha256 = crate::util::hash::sha256_file(tmp.path())?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("moving the base tarball to {}", path.display()))?;

    let built = Built {
        sha256: &sha256,
        bytes,
        source_date_epoch,
        seconds,
        command: &line,
    };
    write_record(spec, path, &built)?;
    sync_dir(dir);
    log::info!(
        "built base {} in {seconds:.1} s: {} ({:.1} MB)",
        spec.suite,
        path.display(),
        bytes as f64 / 1e6
    );
    Ok(BaseTarball {
        path: path.to_path_buf(),
        sha256,
        reused: false,
        identity: FileIdentity::of(path)?,
    })
}

/// What one mmdebstrap run made, for its record.
struct Built<'a> {
    sha256: &'a str,
    bytes: u64,
    source_date_epoch: u64,
    seconds: f64,
    command: &'a str,
}

/// Write `<digest>.json` beside the tarball at `path`: the spec, the
/// tarball's sha256 and size, how and when (`built-at`, unix seconds) it
/// was made.
fn write_record(spec: &BaseSpec, path: &Path, b: &Built) -> Result<()> {
    let meta = serde_json::json!({
        "kiln-base-format": BASE_FORMAT_VERSION,
        "digest": spec_digest(spec),
        "spec": {
            "suite": spec.suite,
            "kernel": kernel_name(spec.kernel),
            "architecture": spec.architecture,
            "variant": VARIANT,
            "components": spec.components,
            "packages": spec.packages,
            "excludes": spec.excludes,
        },
        "tarball": path.file_name().map(|n| n.to_string_lossy().to_string()),
        "sha256": b.sha256,
        "bytes": b.bytes,
        "source-date-epoch": b.source_date_epoch,
        "built-at": unix_now(),
        "build-seconds": (b.seconds * 10.0).round() / 10.0,
        "command": b.command,
    });
    write_atomic_0644(
        &record_path(path),
        format!("{}\n", serde_json::to_string_pretty(&meta)?).as_bytes(),
    )
}

/// A cached tarball that matches its record, and when it was built.
struct Cached {
    tarball: BaseTarball,
    built_at: u64,
}

/// The record beside a cached tarball, if it is readable JSON.
fn read_record(record: &Path) -> Option<serde_json::Value> {
    let text = fs::read_to_string(record).ok()?;
    serde_json::from_str(&text).ok()
}

/// When a cached tarball was built: its record's `built-at`, or, for a
/// record written before kiln kept that, the tarball's mtime.
///
/// The mtime is a sound stand-in: mmdebstrap writes the file at the end of
/// its run and publishing it is a rename, which keeps the mtime
/// (`SOURCE_DATE_EPOCH` clamps the times inside the tarball, not the
/// file's own). Counting such a base as old instead would rebuild every
/// cached base on the first build after upgrading kiln, however new, and
/// need the Debian mirror right then. A cache copied without its times
/// looks younger than it is, so it is refreshed at most one max-age late.
fn built_at(record: &serde_json::Value, tarball: &fs::Metadata) -> u64 {
    record
        .get("built-at")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| {
            tarball
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs())
        })
}

/// The cached tarball if it and its record agree; `None` means build.
fn check_cached(path: &Path, record: &Path) -> Result<Option<Cached>> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let value = read_record(record);
    let recorded = value
        .as_ref()
        .and_then(|v| v.get("sha256").and_then(|s| s.as_str()).map(str::to_string));
    let (Some(value), Some(recorded)) = (value, recorded) else {
        log::warn!(
            "{} has no readable record {}: rebuilding it",
            path.display(),
            record.display()
        );
        return Ok(None);
    };
    let actual = crate::util::hash::sha256_file(path)?;
    if actual != recorded {
        log::warn!(
            "{} has sha256 {actual}, but {} records {recorded}: rebuilding it",
            path.display(),
            record.display()
        );
        return Ok(None);
    }
    Ok(Some(Cached {
        built_at: built_at(&value, &meta),
        tarball: BaseTarball {
            path: path.to_path_buf(),
            sha256: actual,
            reused: true,
            identity: FileIdentity::from_metadata(&meta),
        },
    }))
}

/// What the cache holds for a plan's Debian base, as `kiln check` tells
/// it: read only, with no lock and no hashing (a build checks the sha256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBase {
    pub path: PathBuf,
    pub max_age: MaxAge,
    pub state: CacheState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    /// Nothing cached yet: the next build makes it.
    Missing,
    /// A tarball without a readable record: the next build makes it again.
    Unrecorded,
    /// Built at `built_at` (unix seconds); `freshness` as of the call.
    Cached { built_at: u64, freshness: Freshness },
}

/// The cached base of `plan` in `cache` at `now`; `None` for a supplied
/// tarball, which kiln does not cache.
pub fn inspect_cached(plan: &Plan, cache: &Path, now: u64) -> Option<CachedBase> {
    let BasePlan::Debian { max_age, .. } = &plan.base else {
        return None;
    };
    let path = cached_path(&base_spec(plan)?, cache);
    let state = match fs::metadata(&path) {
        Ok(meta) if meta.is_file() => match read_record(&record_path(&path)) {
            Some(record) if record.get("sha256").is_some() => {
                let built_at = built_at(&record, &meta);
                CacheState::Cached {
                    built_at,
                    freshness: freshness(built_at, now, *max_age),
                }
            }
            _ => CacheState::Unrecorded,
        },
        _ => CacheState::Missing,
    };
    Some(CachedBase {
        path,
        max_age: *max_age,
        state,
    })
}

/// A root tarball the user supplies (`base.tarball`), hashed.
pub fn use_tarball(path: &Path) -> Result<BaseTarball> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => bail!(
            "base tarball {} is not a file: set `base.tarball` to a root filesystem tarball",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!(
                "base tarball {} does not exist: fix `base.tarball` in the profile (relative paths are relative to the profile), or remove it to build a Debian base",
                path.display()
            )
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading base tarball {}", path.display()));
        }
    }
    // Taken before hashing: a change while hashing shows at the end.
    let identity = FileIdentity::of(path)?;
    let sha256 = crate::util::hash::sha256_file(path)?;
    Ok(BaseTarball {
        path: path.to_path_buf(),
        sha256,
        reused: true,
        identity,
    })
}

/// The base tarball for `plan`: the user's, or the cached (or freshly
/// built) Debian one, made again when older than `base.max-age` or, with
/// `refresh_now` (`--refresh-base`), whatever its age.
pub fn plan_base_tarball(
    plan: &Plan,
    cache: &Path,
    source_date_epoch: u64,
    refresh_now: bool,
    cancel: &Cancel,
) -> Result<BaseTarball> {
    match &plan.base {
        BasePlan::Tarball(p) if refresh_now => bail!(
            "--refresh-base: the base is the tarball {} from the profile, which kiln does not build; replace that file, or build without --refresh-base",
            p.display()
        ),
        BasePlan::Tarball(p) => use_tarball(p),
        BasePlan::Debian { max_age, .. } => ensure_base_cancellable(
            &base_spec(plan).expect("a Debian base has a spec"),
            cache,
            source_date_epoch,
            if refresh_now {
                Refresh::UnlessBuiltSince(unix_now())
            } else {
                Refresh::WhenOlderThan(*max_age)
            },
            cancel,
        ),
    }
}

fn write_atomic_0644(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::util::atomic::write_atomically(path, bytes, 0o644)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Remove temp files of `digest` left by interrupted builds (killed before
/// the temp file's drop could run). Called with the digest's lock held, so
/// no live build of this digest can own one.
fn remove_orphaned_temps(dir: &Path, digest: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{digest}.");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&prefix) && name.ends_with(".tmp.tar.zst") {
            log::info!(
                "removing {}, left by an interrupted build",
                e.path().display()
            );
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Where the lock for `digest` lives in the base cache dir `dir`.
pub fn lock_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join(format!("{digest}.lock"))
}

/// An exclusive `flock(2)` on a base's lock file. Dropping it removes the
/// file (while still holding the lock), then closes it, which unlocks.
struct BaseLock {
    path: PathBuf,
    _file: fs::File,
}

impl Drop for BaseLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Take the exclusive lock for `digest`, waiting for another build of the
/// same spec to finish first (saying so once).
///
/// The holder removes the lock file when it is done, so that the cache
/// holds only tarballs and records. A waiter may therefore wake up holding
/// a file that is no longer at `path` (or another process's newer one is):
/// it checks that the path still names the file it locked, and otherwise
/// starts again.
///
/// A cache we cannot create a lock in (read-only, another user's) is still
/// usable for reading: then we go on unlocked, and a build, if one is
/// needed, fails on writing the tarball with its own error.
fn lock_base(dir: &Path, digest: &str) -> Result<Option<BaseLock>> {
    use std::os::unix::fs::MetadataExt as _;
    let path = lock_path(dir, digest);
    let mut said_waiting = false;
    let started = Instant::now();
    loop {
        let opened = fs::create_dir_all(dir).and_then(|()| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
        });
        let file = match opened {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                log::warn!(
                    "cannot lock {} ({e}): going on without the lock",
                    path.display()
                );
                return Ok(None);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("opening the base lock {}", path.display()));
            }
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                if !said_waiting {
                    log::warn!(
                        "waiting for another kiln to finish building this base (lock {})",
                        path.display()
                    );
                    said_waiting = true;
                }
                file.lock()
                    .with_context(|| format!("locking {}", path.display()))?;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let locked = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        let still_there =
            fs::metadata(&path).is_ok_and(|m| m.dev() == locked.dev() && m.ino() == locked.ino());
        if still_there {
            if said_waiting {
                log::info!(
                    "got the base lock {} after {:.1} s",
                    path.display(),
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(Some(BaseLock { path, _file: file }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A spec mmdebstrap cannot build: if the lock did not hold a second
    /// caller back, it would run mmdebstrap and fail.
    fn unbuildable_spec() -> BaseSpec {
        let mut spec = debian_spec("bookworm", KernelFlavour::Cloud, &[]);
        spec.packages = vec!["kiln-no-such-package".into()];
        spec
    }

    /// Publish a fake cached tarball with a matching record, as a build that
    /// holds the lock would.
    fn publish_fake(spec: &BaseSpec, cache: &Path) -> String {
        let path = cached_path(spec, cache);
        fs::write(&path, b"a tarball built by the lock holder").unwrap();
        let sha = crate::util::hash::sha256_file(&path).unwrap();
        fs::write(
            record_path(&path),
            serde_json::json!({ "sha256": sha }).to_string(),
        )
        .unwrap();
        sha
    }

    const DAY: u64 = 86400;
    /// 2026-12-01T00:00:00Z.
    const NOW: u64 = 1_796_083_200;

    #[test]
    fn the_build_time_is_the_records_or_else_the_tarballs_mtime() {
        let cache = tempfile::tempdir().unwrap();
        let spec = unbuildable_spec();
        fs::create_dir_all(cache.path().join("base")).unwrap();
        let path = cached_path(&spec, cache.path());
        // A record from before kiln kept `built-at`: the tarball's mtime.
        publish_fake(&spec, cache.path());
        let mtime = std::time::UNIX_EPOCH + Duration::from_secs(NOW - 40 * DAY);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let record = record_path(&path);
        let cached = check_cached(&path, &record).unwrap().expect("cached");
        assert_eq!(cached.built_at, NOW - 40 * DAY);
        assert!(cached.tarball.reused);
        // A record with `built-at`: that.
        let mut v = read_record(&record).unwrap();
        v["built-at"] = serde_json::json!(NOW - DAY);
        fs::write(&record, v.to_string()).unwrap();
        let cached = check_cached(&path, &record).unwrap().expect("cached");
        assert_eq!(cached.built_at, NOW - DAY);
        // No tarball: nothing cached.
        fs::remove_file(&path).unwrap();
        assert!(check_cached(&path, &record).unwrap().is_none());
    }

    #[test]
    fn a_base_replaced_or_rewritten_during_a_build_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.tar");
        fs::write(&path, b"the old base").unwrap();
        let t = use_tarball(&path).unwrap();
        t.check_unchanged().unwrap();
        // A refresh: a new file renamed over it.
        let new = dir.path().join(".new");
        fs::write(&new, b"the new base").unwrap();
        fs::rename(&new, &path).unwrap();
        let err = format!("{:#}", t.check_unchanged().unwrap_err());
        assert!(err.contains("changed while this build read it"), "{err}");
        // Rewritten in place, same size, another mtime.
        let t = use_tarball(&path).unwrap();
        fs::write(&path, b"the NEW base").unwrap();
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(NOW))
            .unwrap();
        assert!(t.check_unchanged().is_err());
        // Gone.
        fs::remove_file(&path).unwrap();
        assert!(t.check_unchanged().is_err());
    }

    #[test]
    fn a_second_caller_waits_for_the_lock_then_reuses_the_tarball() {
        let cache = tempfile::tempdir().unwrap();
        let spec = unbuildable_spec();
        let digest = spec_digest(&spec);
        let dir = cache.path().join("base");
        // Another kiln is building this base: it holds the lock.
        let held = lock_base(&dir, &digest)
            .unwrap()
            .expect("the cache is writable");
        assert!(lock_path(&dir, &digest).is_file());

        let (tx, rx) = mpsc::channel();
        let (spec2, cache2) = (spec.clone(), cache.path().to_path_buf());
        let waiter = std::thread::spawn(move || {
            tx.send(ensure_base(&spec2, &cache2, 0).map_err(|e| format!("{e:#}")))
                .unwrap()
        });
        // It must neither find the (missing) tarball nor start mmdebstrap
        // while the lock is held. (Proving a negative needs a time window.)
        match rx.recv_timeout(Duration::from_millis(700)) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            other => panic!("ensure_base did not wait for the lock: {other:?}"),
        }
        let sha = publish_fake(&spec, cache.path());
        drop(held);

        let got = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("ensure_base finished")
            .unwrap_or_else(|e| panic!("{e}"));
        waiter.join().unwrap();
        assert!(
            got.reused,
            "the waiter rebuilt the base instead of reusing it"
        );
        assert_eq!(got.sha256, sha);
        // Both are done: the lock file is gone, only tarball and record stay.
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [format!("{digest}.json"), format!("{digest}.tar.zst")]
        );
    }

    #[test]
    fn a_lock_file_left_by_a_killed_build_does_not_block() {
        let cache = tempfile::tempdir().unwrap();
        let spec = unbuildable_spec();
        let dir = cache.path().join("base");
        fs::create_dir_all(&dir).unwrap();
        // The kernel released the dead process's lock; only the file is left.
        fs::write(lock_path(&dir, &spec_digest(&spec)), b"").unwrap();
        let sha = publish_fake(&spec, cache.path());
        let (tx, rx) = mpsc::channel();
        let cache2 = cache.path().to_path_buf();
        std::thread::spawn(move || {
            tx.send(
                ensure_base(&spec, &cache2, 0)
                    .map(|t| t.sha256)
                    .map_err(|e| format!("{e:#}")),
            )
            .unwrap()
        });
        let got = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a stale lock file blocked ensure_base");
        assert_eq!(got.unwrap(), sha);
        assert!(
            !lock_path(&dir, &spec_digest(&unbuildable_spec())).exists(),
            "the lock file was not cleaned up"
        );
    }

    #[test]
    fn different_specs_do_not_wait_for_each_other() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("base");
        let a = unbuildable_spec();
        let mut b = unbuildable_spec();
        b.suite = "trixie".into();
        let _held = lock_base(&dir, &spec_digest(&a)).unwrap().unwrap();
        let sha = publish_fake(&b, cache.path());
        let (tx, rx) = mpsc::channel();
        let cache2 = cache.path().to_path_buf();
        std::thread::spawn(move || {
            tx.send(
                ensure_base(&b, &cache2, 0)
                    .map(|t| t.sha256)
                    .map_err(|e| format!("{e:#}")),
            )
            .unwrap()
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30))
                .expect("another spec's lock blocked ensure_base")
                .unwrap(),
            sha
        );
    }
}
