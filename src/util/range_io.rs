//! A window onto a byte range of a file, for libraries that want
//! `Read + Write + Seek` (the FAT writer, the GPT writer) but must not touch
//! the rest of the disk image or move the file's own cursor.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;

/// A window onto `len` bytes of a file starting at `start`: reads end there,
/// writes past it fail, seeks from the end count from `start + len`. Uses
/// positioned I/O, so the file's own cursor is left alone.
pub struct RangeIo<'d> {
    disk: &'d File,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'d> RangeIo<'d> {
    /// The window `start..start + len` of `disk`, positioned at its start.
    pub fn new(disk: &'d File, start: u64, len: u64) -> Self {
        RangeIo {
            disk,
            start,
            len,
            pos: 0,
        }
    }
}

impl Read for RangeIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let read = self.disk.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += read as u64;
        Ok(read)
    }
}

impl Write for RangeIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.pos.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at byte {} would leave the {}-byte range at byte {}",
                    buf.len(),
                    self.pos,
                    self.len,
                    self.start
                ),
            ));
        }
        let written = self.disk.write_at(buf, self.start + self.pos)?;
        self.pos += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for RangeIo<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("seek before the start of the range at byte {}", self.start),
            )
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_io_stays_inside_its_window() {
        const OFFSET: u64 = 4096;
        let mut disk = tempfile::tempfile().unwrap();
        disk.write_all(&[0xAA; 3 * OFFSET as usize]).unwrap();
        let mut io = RangeIo::new(&disk, OFFSET, 16);
        io.seek(SeekFrom::End(-4)).unwrap();
        io.write_all(b"abcd").unwrap();
        assert!(io.write_all(b"e").is_err(), "wrote past the end");
        io.seek(SeekFrom::Start(14)).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"cd");
        assert!(io.seek(SeekFrom::Current(-100)).is_err());

        let mut whole = vec![0u8; 3 * OFFSET as usize];
        disk.read_exact_at(&mut whole, 0).unwrap();
        let window = OFFSET as usize + 12..OFFSET as usize + 16;
        assert_eq!(&whole[window.clone()], b"abcd");
        assert!(
            whole[..window.start].iter().all(|&b| b == 0xAA)
                && whole[window.end..].iter().all(|&b| b == 0xAA),
            "bytes outside the window changed"
        );
        assert_eq!(
            disk.stream_position().unwrap(),
            3 * OFFSET,
            "the file's cursor moved"
        );
    }
}
