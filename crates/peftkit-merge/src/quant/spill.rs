//! What a merge holds for later writes past its memory budget (`joint`), kept in an unnamed
//! file beside the output instead of being computed again.
//!
//! A double-quantized 4-bit weight is computed while planning, for its quantization state,
//! long before its write; memory holds only the first of them (packed bytes and parts). Writing the packed bytes to
//! disk and reading them back costs far less than merging the weight again (a 7B model's
//! packed weights are 3.5 GB; each computation dequantizes, merges and re-quantizes).
//!
//! The file has no name (`O_TMPFILE`, or created and unlinked at once), so nothing is left
//! behind whatever happens to the process; each range read back is punched out, so the disk
//! holds only the tensors not yet written. It never takes more than a limit set from the free
//! space, leaving room for the output; a write that fails (a full disk) only means the tensor
//! is computed again.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use peftkit_checkpoint::buffers;

/// An unnamed file of spilled tensors (and parts of tensors).
pub(crate) struct Spill {
    file: File,
    /// The end of the bytes written so far (ranges are never reused).
    end: AtomicU64,
    /// Bytes of free space this file may take ([`Spill::in_dir`]).
    limit: u64,
    /// Bytes written and not yet read back or discarded.
    held: AtomicU64,
}

/// Where [`Spill::put`] wrote a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spilled {
    offset: u64,
    len: usize,
}

impl Spill {
    /// An unnamed file in `dir` that may hold up to the free space of its file system less
    /// `reserve` bytes (the output's room); `None` when there is no such room or no such file.
    pub(crate) fn in_dir(dir: &Path, reserve: u64) -> Option<Spill> {
        let limit = free_space(dir)?.checked_sub(reserve)?;
        let file = tempfile::tempfile_in(dir).ok()?;
        Some(Spill {
            file,
            end: AtomicU64::new(0),
            limit,
            held: AtomicU64::new(0),
        })
    }

    /// Writes `bytes` into the file; `None` (nothing kept) past the limit or when the write
    /// fails.
    pub(crate) fn put(&self, bytes: &[u8]) -> Option<Spilled> {
        let len = bytes.len() as u64;
        let held = self.held.fetch_add(len, Ordering::AcqRel);
        let at = Spilled {
            offset: self.end.fetch_add(len, Ordering::AcqRel),
            len: bytes.len(),
        };
        if held + len > self.limit || write_at(&self.file, bytes, at.offset).is_err() {
            self.discard(at);
            return None;
        }
        Some(at)
    }

    /// The bytes at `at`, in a pooled buffer, their range freed; `None` when they cannot be
    /// read back.
    pub(crate) fn take(&self, at: Spilled) -> Option<Vec<u8>> {
        let mut bytes = buffers::take(at.len);
        let read = read_at(&self.file, &mut bytes, at.offset);
        self.discard(at);
        match read {
            Ok(()) => Some(bytes),
            Err(_) => {
                buffers::give(bytes);
                None
            }
        }
    }

    /// Frees the range `at` (its blocks punched out, where the file system can).
    pub(crate) fn discard(&self, at: Spilled) {
        self.held.fetch_sub(at.len as u64, Ordering::AcqRel);
        #[cfg(target_os = "linux")]
        {
            use rustix::fs::{fallocate, FallocateFlags};
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            // Best effort: without it the space comes back when the file is closed.
            let _ = fallocate(&self.file, flags, at.offset, at.len as u64);
        }
    }
}

#[cfg(unix)]
fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(unix)]
fn read_at(file: &File, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, bytes, offset)
}

#[cfg(not(unix))]
fn write_at(_: &File, _: &[u8], _: u64) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(not(unix))]
fn read_at(_: &File, _: &mut [u8], _: u64) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Bytes an unprivileged process may still write on `dir`'s file system.
#[cfg(target_os = "linux")]
fn free_space(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(not(target_os = "linux"))]
fn free_space(_: &Path) -> Option<u64> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn spilled_bytes_come_back_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::in_dir(dir.path(), 0).unwrap();
        let (a, b) = (vec![7u8; 5000], vec![9u8; 3]);
        let (at_a, at_b) = (spill.put(&a).unwrap(), spill.put(&b).unwrap());
        assert_eq!(spill.take(at_b).unwrap(), b);
        assert_eq!(spill.take(at_a).unwrap(), a);
        assert_eq!(spill.held.load(Ordering::Acquire), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no name");
    }

    #[test]
    fn nothing_is_spilled_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_space(dir.path()).unwrap();
        assert!(Spill::in_dir(dir.path(), free + (1 << 40)).is_none());
        let mut spill = Spill::in_dir(dir.path(), 0).unwrap();
        spill.limit = 10;
        let at = spill.put(&[1; 8]).unwrap();
        assert_eq!(spill.put(&[2; 8]), None, "8 + 8 > 10");
        assert_eq!(spill.take(at).unwrap(), vec![1; 8]);
        assert!(spill.put(&[3; 8]).is_some(), "room again once taken");
    }
}
