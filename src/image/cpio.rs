//! A newc ("070701") cpio archive writer, the format the Linux kernel
//! unpacks as an initramfs.
//!
//! Reproducible by construction: one fixed mtime for every entry, inode
//! numbers assigned in order, no host metadata. Entries are written in the
//! order they are added; the kernel does not create missing parents, so add
//! directories before their contents.
//!
//! Written by hand, not with the `cpio` crate (0.4.2, newc `Builder`): the
//! crate can set every field kiln needs (inode, mode, uid/gid, nlink, mtime,
//! rdev major/minor) and pads and ends an archive as kiln does, but it
//! formats the 13 header fields as lower-case hex (`{:08x}`), while kiln,
//! like the kernel's `gen_init_cpio` (`%08X`), writes upper case. The kernel
//! reads both, but the crate would change every header with a hex letter in
//! it (a directory's mode `000041ED`, most mtimes and sizes), so every
//! initramfs and disk image would stop matching its earlier sha256. Checked
//! on this module's test archive: same length, 24 bytes differ, identical
//! ignoring case.
//!
//! Reference: the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`
//! and `usr/gen_init_cpio.c`.

use std::io::Write;

use anyhow::{Context, Result, ensure};

/// Magic of the "new ASCII" format, without checksums.
const MAGIC: &str = "070701";

/// Name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode` (see `inode(7)`).
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Permission bits a caller may pass as `mode` (including setuid, setgid
/// and sticky).
const PERMISSION_BITS: u32 = 0o7777;

/// Writes a newc cpio archive to `W`; call [`CpioWriter::finish`] to end it.
pub struct CpioWriter<W: Write> {
    out: W,
    mtime: u32,
    next_inode: u32,
}

/// The header fields that differ between entry kinds.
#[derive(Default)]
struct Header {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> CpioWriter<W> {
    /// A writer whose entries all carry `mtime` (seconds since the epoch,
    /// e.g. `SOURCE_DATE_EPOCH`).
    pub fn new(out: W, mtime: u32) -> Self {
        CpioWriter {
            out,
            mtime,
            next_inode: 1,
        }
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, mode: u32, uid: u32, gid: u32) -> Result<()> {
        let mode = S_IFDIR | permissions(path, mode)?;
        self.entry(
            path,
            Header {
                mode,
                uid,
                gid,
                nlink: 2,
                ..Header::default()
            },
            &[],
        )
    }

    /// Adds a regular file with permission bits `mode` and contents `data`.
    pub fn file(&mut self, path: &str, mode: u32, uid: u32, gid: u32, data: &[u8]) -> Result<()> {
        let mode = S_IFREG | permissions(path, mode)?;
        self.entry(
            path,
            Header {
                mode,
                uid,
                gid,
                nlink: 1,
                ..Header::default()
            },
            data,
        )
    }

    /// Adds a symbolic link `path` → `target`, owned by root, mode 0777.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        ensure!(!target.is_empty(), "symlink {path} has an empty target");
        let header = Header {
            mode: S_IFLNK | 0o777,
            nlink: 1,
            ..Header::default()
        };
        self.entry(path, header, target.as_bytes())
    }

    /// Adds a character device owned by root (e.g. `dev/console`, 0o600, 5, 1).
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        let mode = S_IFCHR | permissions(path, mode)?;
        let header = Header {
            mode,
            nlink: 1,
            rdev_major: major,
            rdev_minor: minor,
            ..Header::default()
        };
        self.entry(path, header, &[])
    }

    /// Writes the `TRAILER!!!` entry (inode and mtime 0, as the kernel's
    /// `gen_init_cpio` does) and returns the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        let header = Header {
            nlink: 1,
            ..Header::default()
        };
        self.write_header(0, 0, TRAILER, &header, 0)
            .and_then(|()| self.out.flush())
            .context("writing the cpio trailer")?;
        Ok(self.out)
    }

    /// Writes one entry: header, name, padding, data, padding.
    fn entry(&mut self, path: &str, header: Header, data: &[u8]) -> Result<()> {
        let name = archive_path(path)?;
        let size = u32::try_from(data.len())
            .with_context(|| format!("{name} is too large for cpio (4 GiB at most)"))?;
        let inode = self.next_inode;
        self.next_inode += 1;
        self.write_header(inode, self.mtime, name, &header, size)
            .and_then(|()| self.out.write_all(data))
            .and_then(|()| self.out.write_all(padding(data.len())))
            .with_context(|| format!("writing {name} to the cpio archive"))
    }

    /// The 110-byte header, the NUL-terminated name and its padding.
    fn write_header(
        &mut self,
        inode: u32,
        mtime: u32,
        name: &str,
        h: &Header,
        size: u32,
    ) -> std::io::Result<()> {
        let name_size = name.len() as u32 + 1;
        #[rustfmt::skip]
        let fields = [
            inode, h.mode, h.uid, h.gid, h.nlink, mtime, size,
            0, 0, // major, minor of the device holding the file
            h.rdev_major, h.rdev_minor, name_size,
            0, // checksum, only used by "070702"
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.out
            .write_all(padding(header.len() + name_size as usize))
    }
}

/// Zero bytes that bring `len` to a multiple of 4.
fn padding(len: usize) -> &'static [u8] {
    &[0u8; 3][..(4 - len % 4) % 4]
}

/// `mode` if it holds only permission bits.
fn permissions(path: &str, mode: u32) -> Result<u32> {
    ensure!(
        mode & !PERMISSION_BITS == 0,
        "mode {mode:o} of {path} has bits beyond permissions ({PERMISSION_BITS:o})"
    );
    Ok(mode)
}

/// `path` as stored: relative (leading slashes dropped), no `.`/`..` or
/// empty components, no NUL.
fn archive_path(path: &str) -> Result<&str> {
    let relative = path.trim_start_matches('/');
    ensure!(
        !relative.is_empty()
            && !relative.contains('\0')
            && relative.split('/').all(|c| !matches!(c, "" | "." | "..")),
        "cpio path {path:?} must be a normalized path below the root"
    );
    ensure!(
        relative != TRAILER,
        "cpio path {path:?} is reserved for the trailer"
    );
    Ok(relative)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// 2024-01-02 03:04:05 UTC.
    const MTIME: u32 = 1_704_164_645;

    fn archive() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new(), MTIME);
        w.dir("/bin", 0o755, 0, 0).unwrap();
        w.file("/bin/busybox", 0o755, 0, 0, b"\x7fELF not really")
            .unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("dev", 0o755, 0, 0).unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.dir("etc", 0o700, 1000, 100).unwrap();
        w.file("etc/motd", 0o4640, 1000, 100, b"hello\n").unwrap();
        w.finish().unwrap()
    }

    /// Runs `cpio args` in `dir` with `input` on stdin and returns stdout.
    fn cpio(dir: &Path, args: &[&str], input: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .env("LC_ALL", "C")
            .env("TZ", "UTC")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running cpio (apt-get install cpio)");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cpio {args:?} failed: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn cpio_lists_every_kind_of_entry() {
        let dir = tempfile::tempdir().unwrap();
        let listing = cpio(dir.path(), &["-itvn"], &archive());
        let lines: Vec<Vec<&str>> = listing
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        // mode, nlink, uid, gid, size or "major," minor, then date and name.
        let summary: Vec<String> = lines
            .iter()
            .map(|f| {
                let (head, tail) = f.split_at(if f[0].starts_with('c') { 6 } else { 5 });
                format!("{} {}", head.join(" "), tail[3..].join(" "))
            })
            .collect();
        assert_eq!(
            summary,
            [
                "drwxr-xr-x 2 0 0 0 bin",
                "-rwxr-xr-x 1 0 0 15 bin/busybox",
                "lrwxrwxrwx 1 0 0 7 bin/sh -> busybox",
                "drwxr-xr-x 2 0 0 0 dev",
                "crw------- 1 0 0 5, 1 dev/console",
                "drwx------ 2 1000 100 0 etc",
                "-rwSr----- 1 1000 100 6 etc/motd",
            ],
            "cpio -itvn:\n{listing}"
        );
        assert!(
            listing.lines().all(|l| l.contains(" Jan  2  2024 ")),
            "mtime:\n{listing}"
        );
    }

    #[test]
    fn cpio_extracts_file_contents() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            cpio(dir.path(), &["-i", "--to-stdout", "etc/motd"], &archive()),
            "hello\n"
        );
        assert_eq!(
            cpio(
                dir.path(),
                &["-i", "--to-stdout", "bin/busybox"],
                &archive()
            ),
            "\x7fELF not really"
        );
    }

    #[test]
    fn archive_is_reproducible_and_padded() {
        let a = archive();
        assert_eq!(a, archive());
        assert_eq!(a.len() % 4, 0);
        assert!(
            a.starts_with(b"07070100000001000041ED"),
            "first entry: inode 1, dir 0755"
        );
        // Trailer as gen_init_cpio writes it: nlink 1, namesize 11, all else 0.
        let trailer = [
            "070701",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000001",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "0000000B",
            "00000000",
            "TRAILER!!!\0\0\0\0",
        ]
        .concat();
        assert!(a.ends_with(trailer.as_bytes()));
    }

    #[test]
    fn bad_paths_and_modes_are_errors() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        assert!(w.dir("/", 0o755, 0, 0).is_err());
        assert!(w.dir("a/../b", 0o755, 0, 0).is_err());
        assert!(w.file("a//b", 0o644, 0, 0, b"").is_err());
        assert!(w.file("a", 0o100644, 0, 0, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, 0, 0, b"").is_err());
    }
}
