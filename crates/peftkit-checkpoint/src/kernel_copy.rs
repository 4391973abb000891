//! Copies of untouched file ranges inside the kernel, without a trip through user memory.
//!
//! `copy_file_range` is the default: it makes reflinks (btrfs, XFS) and server-side copies
//! (NFS) where the file system has them. On ext4 and tmpfs it has neither and copies through
//! the page cache with `splice`, via a pipe of 16 pages: each round writes at most 64 KiB of
//! the output. When the source and the output offsets fall at different places in a page
//! (a tensor moves by a header of another length, as in `extract` or `convert`), those short
//! writes cost about 20 % more than `cp`'s copy of the same bytes. Splicing through our own
//! pipe of 1 MiB gives the output 1 MiB writes and brings the copy back to `cp`'s time.
//!
//! Measured on the benchmark host (ext4, kernel 6.18, 0.94 GB, pages warm, 5 interleaved
//! rounds, medians): `copy_file_range` 0.274–0.286 s with the offsets in different places of a
//! page, 0.236 s at offsets 0 and 0 (`cp`'s case); the 1 MiB pipe 0.238–0.261 s for the
//! former. With offsets in the same place of a page the pipe gained nothing and, at offsets
//! aligned to 2 MiB, took up to 3.6× as long (0.44–0.86 s: the source's large folios), so
//! those keep `copy_file_range`. docs/architecture.md, "Output IO", has the table.
//! `PEFTKIT_NO_SPLICE` switches the pipe off, for comparisons.

use std::fs::File;
use std::path::Path;

use crate::error::{CheckpointError, Result};
use crate::tensor::SourceFile;

/// The pipe's size: the longest write the output gets per round.
#[cfg(target_os = "linux")]
const PIPE_BYTES: usize = 1 << 20;

/// The page size that decides whether two offsets fall at the same place of a page.
#[cfg(target_os = "linux")]
const PAGE: u64 = 4096;

/// How to copy: by `copy_file_range`, or `splice` through our own pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    CopyFileRange,
    Pipe,
}

/// The method for a copy from `src_offset` to `offset`, where `splices` says whether the
/// output's file system copies through the page cache anyway (see the module documentation).
pub(crate) fn method(src_offset: u64, offset: u64, splices: bool) -> Method {
    #[cfg(target_os = "linux")]
    if splices && src_offset % PAGE != offset % PAGE {
        return Method::Pipe;
    }
    let _ = (src_offset, offset, splices);
    Method::CopyFileRange
}

/// Whether copies into `out` may go through our own pipe: on ext4 and tmpfs, unless
/// `PEFTKIT_NO_SPLICE` is set.
pub(crate) fn splices(out: &File) -> bool {
    std::env::var_os("PEFTKIT_NO_SPLICE").is_none() && crate::in_file::ext4_or_tmpfs(out)
}

/// Copies `len` bytes of `src` from `src_offset` to `offset` of `out` (named `path` in
/// errors) inside the kernel. `None` when the kernel or the file systems cannot, before
/// anything was written: the caller then copies through memory.
pub(crate) fn copy_range(
    out: &File,
    src: &SourceFile,
    src_offset: u64,
    len: usize,
    offset: u64,
    path: &Path,
    splices: bool,
) -> Result<Option<u64>> {
    #[cfg(target_os = "linux")]
    if method(src_offset, offset, splices) == Method::Pipe {
        if let Some(n) = pipe::copy(out, &src.file, src_offset, len, offset, path)? {
            return Ok(Some(n));
        }
    }
    copy_file_range(out, &src.file, src_offset, len, offset, path)
}

/// The copy by `copy_file_range`.
#[cfg(target_os = "linux")]
fn copy_file_range(
    out: &File,
    src: &File,
    src_offset: u64,
    len: usize,
    offset: u64,
    path: &Path,
) -> Result<Option<u64>> {
    let (mut off_in, mut off_out, mut left) = (src_offset, offset, len);
    let mut first = true;
    while left > 0 {
        match rustix::fs::copy_file_range(src, Some(&mut off_in), out, Some(&mut off_out), left) {
            Ok(0) if first => return Ok(None),
            Ok(0) => return Err(truncated(path)),
            Ok(n) => left -= n,
            Err(_) if first => return Ok(None),
            Err(e) => return Err(CheckpointError::io(path, e.into())),
        }
        first = false;
    }
    Ok(Some(len as u64))
}

#[cfg(not(target_os = "linux"))]
fn copy_file_range(
    _out: &File,
    _src: &File,
    _src_offset: u64,
    _len: usize,
    _offset: u64,
    _path: &Path,
) -> Result<Option<u64>> {
    Ok(None)
}

/// The source ended before the range did (it was truncated while being read).
fn truncated(path: &Path) -> CheckpointError {
    CheckpointError::io(path, std::io::ErrorKind::UnexpectedEof.into())
}

/// The copy by `splice` through a pipe of [`PIPE_BYTES`], one per thread.
#[cfg(target_os = "linux")]
mod pipe {
    use std::cell::RefCell;
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::path::Path;

    use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};

    use super::{truncated, PIPE_BYTES};
    use crate::error::{CheckpointError, Result};

    thread_local! {
        /// This thread's pipe (read end, write end), empty between copies.
        static PIPE: RefCell<Option<(OwnedFd, OwnedFd)>> = const { RefCell::new(None) };
    }

    /// Copies as [`super::copy_range`] does; `None` when no pipe of [`PIPE_BYTES`] can be had
    /// or the kernel refuses the first splice, before anything was written.
    pub(super) fn copy(
        out: &File,
        src: &File,
        src_offset: u64,
        len: usize,
        offset: u64,
        path: &Path,
    ) -> Result<Option<u64>> {
        PIPE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = new_pipe();
            }
            let Some((r, w)) = slot.as_ref() else {
                return Ok(None);
            };
            let copied = through(out, src, (r, w), src_offset, len, offset, path);
            if !matches!(copied, Ok(Some(_))) {
                // Bytes may be left in the pipe: the next copy gets a new one.
                *slot = None;
            }
            copied
        })
    }

    /// A pipe of [`PIPE_BYTES`], or `None` (pipes limited below it by
    /// `/proc/sys/fs/pipe-max-size`, or none left).
    fn new_pipe() -> Option<(OwnedFd, OwnedFd)> {
        let (r, w) = pipe_with(PipeFlags::CLOEXEC).ok()?;
        let size = fcntl_setpipe_size(&w, PIPE_BYTES).ok()?;
        (size >= PIPE_BYTES).then_some((r, w))
    }

    /// Moves the range through the pipe: up to [`PIPE_BYTES`] from the source into the pipe
    /// (references to page-cache pages, no copy), then all of it out into the output (the one
    /// copy).
    fn through(
        out: &File,
        src: &File,
        (r, w): (&OwnedFd, &OwnedFd),
        src_offset: u64,
        len: usize,
        offset: u64,
        path: &Path,
    ) -> Result<Option<u64>> {
        let (mut off_in, mut off_out, mut left) = (src_offset, offset, len);
        let io = |e: rustix::io::Errno| CheckpointError::io(path, e.into());
        while left > 0 {
            let first = off_in == src_offset;
            let flags = SpliceFlags::MOVE;
            let got = match splice(src, Some(&mut off_in), w, None, left.min(PIPE_BYTES), flags) {
                Ok(0) if first => return Ok(None),
                Ok(0) => return Err(truncated(path)),
                Ok(n) => n,
                Err(_) if first => return Ok(None),
                Err(e) => return Err(io(e)),
            };
            let mut pending = got;
            while pending > 0 {
                match splice(r, None, out, Some(&mut off_out), pending, flags) {
                    Ok(0) => return Err(io(rustix::io::Errno::IO)),
                    Ok(n) => pending -= n,
                    Err(e) => return Err(io(e)),
                }
            }
            left -= got;
        }
        Ok(Some(len as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn source(dir: &Path, bytes: &[u8]) -> std::sync::Arc<SourceFile> {
        let path = dir.join("src.bin");
        std::fs::write(&path, bytes).unwrap();
        SourceFile::open(&path).unwrap()
    }

    /// Offsets in different places of a page take the pipe on ext4 and tmpfs only.
    #[test]
    fn the_pipe_is_for_offsets_in_different_places_of_a_page() {
        assert_eq!(method(1376, 280, true), Method::Pipe);
        assert_eq!(method(8, 0, true), Method::Pipe);
        assert_eq!(method(4096 + 16, 16, true), Method::CopyFileRange);
        assert_eq!(method(0, 0, true), Method::CopyFileRange);
        assert_eq!(method(1376, 280, false), Method::CopyFileRange);
    }

    /// Both methods copy exactly the range, longer than the pipe and not a multiple of it,
    /// to the offset asked, leaving the rest of the output as it was.
    #[test]
    fn both_methods_copy_the_range_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3_500_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let src = source(dir.path(), &bytes);
        for (splices, src_offset, offset) in
            [(true, 1376, 280), (false, 1376, 280), (true, 0, 4096)]
        {
            let path = dir.path().join("out.bin");
            let mut options = File::options();
            let out = options.read(true).write(true).create(true).truncate(true);
            let out = out.open(&path).unwrap();
            out.write_all_at(&[0xAA; 100], 0).unwrap();
            let len = bytes.len() - src_offset as usize - 5;
            let n = copy_range(&out, &src, src_offset, len, offset, &path, splices).unwrap();
            assert_eq!(n, Some(len as u64));
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), offset as usize + len);
            let start = src_offset as usize;
            assert!(
                got[offset as usize..] == bytes[start..start + len],
                "{splices} {offset}"
            );
            assert!(got[..100.min(offset as usize)].iter().all(|&b| b == 0xAA));
        }
    }

    /// A source shorter than the range (truncated while it was read) is an error once bytes
    /// were copied, whichever the method.
    #[test]
    fn a_source_that_ends_early_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path(), &vec![7u8; 2_000_000]);
        for splices in [true, false] {
            let path = dir.path().join("out.bin");
            let out = File::create(&path).unwrap();
            let r = copy_range(&out, &src, 1376, 3_000_000, 280, &path, splices);
            let e = r.expect_err("the range goes past the source's end");
            assert!(e.to_string().contains("out.bin"), "{e}");
        }
    }
}
