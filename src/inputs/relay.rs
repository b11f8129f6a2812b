//! Where a build finds `kiln-relay`, the binary images carry when a node
//! reaches its hub over TCP (see `deliver::relay`). It is built with kiln
//! (`cargo build` makes both) and installed beside it (`cargo install`
//! installs both), so the relay in an image is always the kiln version
//! that built it.

use std::path::{Path, PathBuf};

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
