//! Where an edited tensor may be written in the output file where it lies.
//!
//! An unsynced merge used to read each targeted base tensor into memory (`pread`), merge it
//! there and write it back (`pwrite`): two copies through user space, the second into fresh
//! page-cache pages, which was most of its time (docs/architecture.md, "Output IO"). Instead,
//! the writer allocates the tensor's range of the output file, and an edit that cannot stream
//! block by block maps that range, reads the base into it and edits it there
//! ([`crate::InPlaceEdit::apply_in_file`]).
//!
//! Writing through a shared mapping has one hazard: a page fault that the file system cannot
//! serve (no space for a block) is a `SIGBUS`, not an error. The writer therefore allocates
//! the range first with `fallocate`, which reports a full disk as an error, and the merge
//! populates its mapping for writing, which reports any other failure of the first fault as an
//! error. A page written back meanwhile may fault again; that is safe only where a block, once
//! allocated, needs no new space to be written again: ext4 (blocks are written in place; the
//! conversion of an allocated-but-unwritten extent draws on ext4's reserved pool) and tmpfs (no
//! writeback). XFS and btrfs may allocate anew on a write to a shared or copy-on-write extent;
//! they keep the copy through memory.

use std::fs::File;

/// ext4's (and ext2/3's) `f_type`.
#[cfg(target_os = "linux")]
const EXT4_SUPER_MAGIC: i64 = 0xEF53;
/// tmpfs's `f_type`.
#[cfg(target_os = "linux")]
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether edits may be made in `file` (see the module documentation).
pub(crate) fn edits_in_file(file: &File) -> bool {
    std::env::var_os("PEFTKIT_NO_EDIT_IN_FILE").is_none() && ext4_or_tmpfs(file)
}

/// Whether `file` is on ext4 or tmpfs: blocks written in place, and no copy the file system
/// makes itself (no reflinks, no server-side copies), so `copy_file_range` is a copy through
/// the page cache like any other (see also [`crate::kernel_copy`]).
#[cfg(target_os = "linux")]
pub(crate) fn ext4_or_tmpfs(file: &File) -> bool {
    rustix::fs::fstatfs(file).is_ok_and(|s| {
        #[allow(clippy::unnecessary_cast)] // f_type is i64 or u32 depending on the target
        let ty = s.f_type as i64;
        ty == EXT4_SUPER_MAGIC || ty == TMPFS_MAGIC
    })
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn ext4_or_tmpfs(_file: &File) -> bool {
    false
}

/// Allocates the `len` bytes at `offset` of `file` (extending it if needed), for an edit
/// written there through a mapping. `Ok(false)` when the file system cannot (the writer then
/// writes the bytes itself); a full disk is an error naming `path`.
#[cfg(target_os = "linux")]
pub(crate) fn allocate(
    file: &File,
    offset: u64,
    len: usize,
    path: &std::path::Path,
) -> crate::Result<bool> {
    use rustix::fs::{fallocate, FallocateFlags};
    if len == 0 {
        return Ok(false);
    }
    match fallocate(file, FallocateFlags::empty(), offset, len as u64) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(false),
        Err(e) => Err(crate::CheckpointError::io(path, e.into())),
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn allocate(
    _file: &File,
    _offset: u64,
    _len: usize,
    _path: &std::path::Path,
) -> crate::Result<bool> {
    Ok(false)
}
