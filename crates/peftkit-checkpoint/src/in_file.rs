//! Where an edited tensor may be changed in the output file itself.
//!
//! An unsynced merge used to read each targeted base tensor into memory (`pread`), merge it
//! there and write it back (`pwrite`): two copies through user space, the second into fresh
//! page-cache pages, which was most of its time (docs/architecture.md, "Output IO"). Instead,
//! the writer copies the base bytes into the output inside the kernel, as it copies untouched
//! tensors, and the merge maps that range and changes it in place ([`crate::InPlaceEdit`]).
//!
//! Writing through a shared mapping has one hazard: a page fault that the file system cannot
//! serve (no space for a copy-on-write block) is a `SIGBUS`, not an error. The merge populates
//! its mapping for writing first, which reports such failures as errors, but a page written
//! back meanwhile may fault again. That is safe only where a block, once written by the
//! kernel copy, needs no new space to be written again: ext4 (no reflinks, so the copy
//! allocated real blocks) and tmpfs (no writeback). XFS and btrfs share extents on
//! `copy_file_range` and must allocate on the first write; they keep the copy through memory.

use std::fs::File;

/// ext4's (and ext2/3's) `f_type`.
#[cfg(target_os = "linux")]
const EXT4_SUPER_MAGIC: i64 = 0xEF53;
/// tmpfs's `f_type`.
#[cfg(target_os = "linux")]
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether edits may be made in `file` (see the module documentation).
#[cfg(target_os = "linux")]
pub(crate) fn edits_in_file(file: &File) -> bool {
    if std::env::var_os("PEFTKIT_NO_EDIT_IN_FILE").is_some() {
        return false;
    }
    rustix::fs::fstatfs(file).is_ok_and(|s| {
        #[allow(clippy::unnecessary_cast)] // f_type is i64 or u32 depending on the target
        let ty = s.f_type as i64;
        ty == EXT4_SUPER_MAGIC || ty == TMPFS_MAGIC
    })
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn edits_in_file(_file: &File) -> bool {
    false
}
