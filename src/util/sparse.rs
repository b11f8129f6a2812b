//! Copying file data without moving it through user space or filling
//! holes: `copy_file_range(2)` over the data extents `lseek(2)`
//! (`SEEK_DATA`/`SEEK_HOLE`) finds. A filesystem with reflinks shares the
//! blocks; others copy in the kernel. Holes in the source stay holes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use anyhow::Context as _;

/// Copy `len` bytes of `src` at `src_at` to `dest` at `dest_at`, data
/// extents only: the destination range must read as zeros already (a new
/// or truncated file). Returns the bytes of data copied.
pub fn copy_range(src: &File, src_at: u64, dest: &File, dest_at: u64, len: u64) -> io::Result<u64> {
    let end = src_at + len;
    let mut pos = src_at;
    let mut copied = 0;
    while pos < end {
        let Some((data, hole)) = next_data(src, pos)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = hole.min(end);
        copied += copy_extent(src, data, dest, dest_at + (data - src_at), hole - data)?;
        pos = hole;
    }
    Ok(copied)
}

/// The first data extent of `f` at or after `at`: `(start, end)`, the end
/// being where the next hole starts (at the latest the file's end);
/// `None` when only holes follow. A filesystem without hole support
/// reports the whole rest as data.
pub fn next_data(f: &File, at: u64) -> io::Result<Option<(u64, u64)>> {
    let Some(start) = seek(f, at, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    let end = match seek(f, start, libc::SEEK_HOLE)? {
        Some(end) => end,
        None => f.metadata()?.len(),
    };
    Ok(Some((start, end)))
}

/// A copy of `src` at `dest` (created, `mode`), holes kept.
pub fn copy_file(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let copying = || format!("copying {} to {}", src.display(), dest.display());
    let from = File::open(src).with_context(copying)?;
    let len = from.metadata().with_context(copying)?.len();
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dest)
        .with_context(copying)?;
    to.set_len(len).with_context(copying)?;
    copy_range(&from, 0, &to, 0, len).with_context(copying)?;
    Ok(())
}

/// `lseek` to the next data or hole at or after `at`; `None` past the end.
fn seek(f: &File, at: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open descriptor has no memory effects.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

fn copy_extent(src: &File, at: u64, dest: &File, to: u64, len: u64) -> io::Result<u64> {
    let (mut off_in, mut off_out) = (at as libc::loff_t, to as libc::loff_t);
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dest.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the source ended {left} bytes early"),
            ));
        }
        left -= n as u64;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt as _, MetadataExt as _};

    #[test]
    fn data_is_copied_at_its_offset_and_holes_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let dest = dir.path().join("dest");
        copy_file(&src, &dest, 0o600).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
        let m = std::fs::metadata(&dest).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "the hole was filled: {} blocks",
            m.blocks()
        );

        // A window of the source into the middle of another file.
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("out"))
            .unwrap();
        out.set_len(1 << 20).unwrap();
        let from = File::open(&src).unwrap();
        assert_eq!(copy_range(&from, 2, &out, 100, 2).unwrap(), 2);
        let mut buf = [0u8; 4];
        out.read_exact_at(&mut buf, 99).unwrap();
        assert_eq!(&buf, b"\0ad\0");
    }
}
