//! Where a build finds `kiln-relay`, the binary images carry when a node
//! reaches its hub over TCP (see `deliver::relay`). It is built with kiln
//! (`cargo build` makes both) and installed beside it (`cargo install`
//! installs both), so the relay in an image is always the kiln version
//! that built it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// `KILN_RELAY_BINARY` names another build of it.
pub const ENV: &str = "KILN_RELAY_BINARY";
pub const NAME: &str = "kiln-relay";

/// `$KILN_RELAY_BINARY`, else `kiln-relay` beside the running program
/// (or one folder up: test programs run from `target/<profile>/deps`).
pub fn locate() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(ENV) {
        let p = PathBuf::from(p);
        anyhow::ensure!(p.is_file(), "{ENV}={} is not a file", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let dirs: Vec<&Path> = exe.ancestors().skip(1).take(2).collect();
    dirs.iter()
        .map(|d| d.join(NAME))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "a node reaches its hub over TCP (`hub-transport`), so its image needs {NAME}, \
                 and there is none beside {}\nfix: build it with kiln (`cargo build --release` \
                 makes both; `cargo install` installs both), or set {ENV} to its path",
                exe.display()
            )
        })
}

/// The relay a build puts into root images: where it is, its sha256 (in
/// the root's stage key, the manifest and the SBOM) and the version it
/// reports.
#[derive(Debug, Clone)]
pub struct Relay {
    pub path: PathBuf,
    pub sha256: String,
    pub version: String,
}

/// The relay for a build on a base with dpkg status `status`: found,
/// checked against the base's glibc, hashed, asked for its version.
pub fn resolve(status: Option<&str>) -> anyhow::Result<Relay> {
    let path = locate()?;
    check_runs_on_base(&path, status)?;
    Ok(Relay {
        sha256: crate::util::hash::sha256_file(&path)?,
        version: version_of(&path)?,
        path,
    })
}

/// `VERSION` out of `kiln-relay VERSION`, what `--version` prints.
fn version_of(path: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("kiln-relay ")
        .filter(|_| out.status.success())
        .map(str::to_string)
        .with_context(|| {
            format!(
                "{} --version printed {:?} ({}), not `kiln-relay VERSION`\nfix: point {ENV} at \
                 kiln-relay, or unset it to use the one beside kiln",
                path.display(),
                text.trim(),
                out.status
            )
        })
}

/// Refuse a relay that the image's glibc cannot start (see
/// [`super::glibc`]): `status` is the base's dpkg status file.
pub fn check_runs_on_base(relay: &Path, status: Option<&str>) -> anyhow::Result<()> {
    let Some(need) = super::glibc::needed(relay)? else {
        return Ok(()); // static
    };
    let packages = match status {
        Some(s) => super::dpkg::installed_packages(s)?,
        None => Vec::new(),
    };
    let Some(have) = super::glibc::of_packages(&packages) else {
        log::warn!(
            "the base lists no libc6 package: cannot tell whether {} (glibc {need}) runs in the image",
            relay.display()
        );
        return Ok(());
    };
    anyhow::ensure!(
        need <= have,
        "{} needs glibc {need} (it was built on a newer system than the image's), and the \
         image's base has glibc {have} (its libc6 package), so it would not start on the nodes\n\
         fix: build kiln where glibc is {have} or older (Debian 12 for a bookworm base), or \
         build kiln-relay static (`RUSTFLAGS='-C target-feature=+crt-static' cargo build \
         --release --bin kiln-relay --target x86_64-unknown-linux-gnu`) and set {ENV} to \
         target/x86_64-unknown-linux-gnu/release/kiln-relay",
        relay.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(libc6: &str) -> String {
        format!(
            "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: {libc6}\n"
        )
    }

    /// This test program stands in for kiln-relay: both are Rust programs
    /// linked here.
    #[test]
    fn a_relay_built_against_a_newer_glibc_than_the_base_is_refused_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let newer = dir.path().join("kiln-relay");
        let at = exe.windows(12).position(|w| w == b"GLIBC_2.2.5\0").unwrap();
        let mut patched = exe.clone();
        patched[at..at + 11].copy_from_slice(b"GLIBC_9.9.9");
        std::fs::write(&newer, &patched).unwrap();
        let e = check_runs_on_base(&newer, Some(&status("2.36-9+deb12u10")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs glibc 9.9"), "{e}");
        assert!(e.contains("has glibc 2.36"), "{e}");
        assert!(e.contains("fix: ") && e.contains(ENV), "{e}");

        let plain = dir.path().join("plain");
        std::fs::write(&plain, &exe).unwrap();
        check_runs_on_base(&plain, Some(&status("99.0-1"))).unwrap();
        // No libc6 to compare with: a warning, not an error.
        check_runs_on_base(&newer, None).unwrap();
    }

    #[test]
    fn the_version_is_what_the_relay_says() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("kiln-relay");
        std::fs::write(&fake, "#!/bin/sh\necho 'kiln-relay 9.8.7'\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Another test's child may hold the file open for writing a moment
        // (fork before exec): ETXTBSY, "Text file busy".
        let mut got = version_of(&fake);
        for _ in 0..20 {
            match &got {
                Err(e) if format!("{e:#}").contains("busy") => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    got = version_of(&fake);
                }
                _ => break,
            }
        }
        assert_eq!(got.unwrap(), "9.8.7");
        let e = version_of(Path::new("/bin/true")).unwrap_err().to_string();
        assert!(
            e.contains("not `kiln-relay VERSION`") && e.contains("fix: "),
            "{e}"
        );
    }
}
