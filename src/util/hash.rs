//! sha256 of files, streamed, and `sha256sum` output: one reader and one
//! parser for the whole crate (build outputs, the k3s release's checksum
//! file, the base cache, `kiln flash`).

use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// Read buffer: images are hundreds of MiB.
const BUFFER_BYTES: usize = 1 << 20;

/// Lowercase hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return Ok(hex::encode(hasher.finalize())),
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// The digest `sha256sum` output lists for `name` (`<hex>  <name>`, or
/// `<hex> *<name>` in binary mode), lowercased; `None` if absent or
/// malformed (one space alone is not sha256sum's format).
pub fn sha256sums_lookup(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (digest, rest) = line.trim_end().split_once(' ')?;
        // Two spaces (text mode) or space and star (binary mode), exactly.
        let file = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*'))?;
        (file == name && digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| digest.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256sums_in_text_and_binary_mode() {
        let h = "A".repeat(64);
        let text = format!("{h}  a.img\n{} *b.img\nbad line\n", "b".repeat(64));
        assert_eq!(sha256sums_lookup(&text, "a.img"), Some("a".repeat(64)));
        assert_eq!(sha256sums_lookup(&text, "b.img"), Some("b".repeat(64)));
        assert_eq!(sha256sums_lookup(&text, "c.img"), None);
        assert_eq!(
            sha256sums_lookup(&format!("{}  x\n", "z".repeat(64)), "x"),
            None
        );
    }

    #[test]
    fn file_digest_matches_sha256sum() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let err = format!("{:#}", sha256_file(&dir.path().join("nope")).unwrap_err());
        assert!(err.contains("opening") && err.contains("nope"), "{err}");
    }
}
