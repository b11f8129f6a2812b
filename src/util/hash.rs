//! sha256 of files, streamed, and `sha256sum` output: one reader and one
//! parser for the whole crate (build outputs, the k3s release's checksum
//! file, the base cache, `kiln flash`).

use std::os::unix::fs::FileExt as _;
use std::path::Path;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// Read buffer: images are hundreds of MiB.
const BUFFER_BYTES: usize = 1 << 20;

/// Lowercase hex sha256 of a file, streamed. Holes of a sparse file (a
/// disk image is mostly holes) are hashed as the zeros they read as,
/// without reading them.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let reading = || format!("reading {}", path.display());
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata().with_context(reading)?;
    if !meta.is_file() {
        return sha256_stream(file).with_context(reading);
    }
    let len = meta.len();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let zeros = vec![0u8; BUFFER_BYTES];
    let mut pos = 0;
    while pos < len {
        let (data, hole) = super::sparse::next_data(&file, pos)
            .with_context(reading)?
            .unwrap_or((len, len));
        hash_zeros(&mut hasher, &zeros, data.min(len) - pos);
        let mut at = data;
        while at < hole.min(len) {
            let n = ((hole.min(len) - at) as usize).min(BUFFER_BYTES);
            file.read_exact_at(&mut buffer[..n], at)
                .with_context(reading)?;
            hasher.update(&buffer[..n]);
            at += n as u64;
        }
        pos = at.max(data.min(len));
    }
    Ok(hex::encode(hasher.finalize()))
}

/// sha256 of what `file` reads until its end (pipes, devices).
fn sha256_stream(mut file: std::fs::File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        match std::io::Read::read(&mut file, &mut buffer) {
            Ok(0) => return Ok(hex::encode(hasher.finalize())),
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn hash_zeros(hasher: &mut Sha256, zeros: &[u8], mut n: u64) {
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        hasher.update(&zeros[..k]);
        n -= k as u64;
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
        // Sparse: holes at the start, between data and at the end.
        let sparse = dir.path().join("sparse");
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(5 << 20).unwrap();
        f.write_all_at(b"abc", 2 << 20).unwrap();
        f.write_all_at(b"abc", (3 << 20) + 7).unwrap();
        drop(f);
        let mut whole = vec![0u8; 5 << 20];
        whole[2 << 20..(2 << 20) + 3].copy_from_slice(b"abc");
        whole[(3 << 20) + 7..(3 << 20) + 10].copy_from_slice(b"abc");
        assert_eq!(
            sha256_file(&sparse).unwrap(),
            hex::encode(Sha256::digest(&whole))
        );
        let err = format!("{:#}", sha256_file(&dir.path().join("nope")).unwrap_err());
        assert!(err.contains("opening") && err.contains("nope"), "{err}");
    }
}
