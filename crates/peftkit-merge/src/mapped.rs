//! Writing a range of an output file where it lies, through a shared mapping.
//!
//! For edits that cannot stream block by block (`file_io`): several adapters on one weight,
//! DoRA, FP8 re-quantization. The range, allocated by peftkit-checkpoint where that is safe
//! (`OutputRegion::mappable`), is mapped and the edit writes it in place, so the merged bytes
//! need no buffer of their size and no `pwrite` (docs/architecture.md, "Output IO").

use std::fs::File;

use peftkit_checkpoint::CheckpointError;

/// Runs `edit` on the `len` bytes at `offset` of `file` (opened for reading and writing),
/// mapped shared, so its changes are the file's. Returns `Ok(false)` without calling `edit`
/// when the range cannot be mapped and populated for writing (the caller then writes the
/// bytes itself, which reports a full disk as an error where a fault would be a `SIGBUS`).
#[cfg(target_os = "linux")]
pub(crate) fn edit_file_range(
    file: &File,
    offset: u64,
    len: usize,
    edit: impl FnOnce(&mut [u8]) -> Result<(), CheckpointError>,
) -> Result<bool, CheckpointError> {
    use rustix::mm::{madvise, mmap, Advice, MapFlags, ProtFlags};

    if len == 0 {
        return Ok(false);
    }
    let page = rustix::param::page_size() as u64;
    let start = offset / page * page;
    let lead = (offset - start) as usize;
    let map_len = lead + len;
    // SAFETY: a fresh shared mapping of a range of `file`, at an address the kernel chooses;
    // nothing else in this process maps or frees it, and `Mapping` unmaps it exactly once.
    let Ok(ptr) = (unsafe {
        mmap(
            std::ptr::null_mut(),
            map_len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            file,
            start,
        )
    }) else {
        return Ok(false);
    };
    let mapping = Mapping { ptr, len: map_len };
    // Fault every page in for writing now: a fault the file system cannot serve is an error
    // here, where touching the page would be a SIGBUS. Kernels before 5.14 lack the advice.
    // SAFETY: the range is exactly the mapping made above.
    if unsafe { madvise(mapping.ptr, mapping.len, Advice::LinuxPopulateWrite) }.is_err() {
        return Ok(false);
    }
    // SAFETY: the mapping is `map_len` bytes long, readable and writable, and lives until
    // `mapping` drops after `edit` returns. The slice covers only this tensor's bytes
    // (`lead..lead + len`): other workers write other byte ranges of the file, some on the
    // same edge pages, but never these bytes, and no other reference to them exists. The file
    // is this save's own, in its staging folder, so nobody truncates it under the mapping.
    let bytes = unsafe { std::slice::from_raw_parts_mut(mapping.ptr.cast::<u8>().add(lead), len) };
    edit(bytes)?;
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn edit_file_range(
    _file: &File,
    _offset: u64,
    _len: usize,
    _edit: impl FnOnce(&mut [u8]) -> Result<(), CheckpointError>,
) -> Result<bool, CheckpointError> {
    Ok(false)
}

/// A shared mapping, unmapped when dropped (also when the edit fails or panics).
#[cfg(target_os = "linux")]
struct Mapping {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

#[cfg(target_os = "linux")]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are those `mmap` returned, unmapped only here. Stores made
        // through the mapping stay in the page cache; the writer's sync covers them.
        let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// An unaligned range across a page boundary is changed in the file, and only it.
    #[test]
    fn an_unaligned_range_is_edited_in_the_file_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let before: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &before).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let (offset, len) = (4000u64, 5000usize);
        let done = edit_file_range(&file, offset, len, |b| {
            assert_eq!(b, &before[4000..9000]);
            b.iter_mut().for_each(|x| *x = x.wrapping_add(1));
            Ok(())
        })
        .unwrap();
        assert!(done);
        let mut after = vec![0u8; before.len()];
        file.read_exact_at(&mut after, 0).unwrap();
        let mut want = before.clone();
        want[4000..9000]
            .iter_mut()
            .for_each(|x| *x = x.wrapping_add(1));
        assert_eq!(after, want);
    }

    /// An edit's error comes back as it is, and the mapping is gone either way.
    #[test]
    fn an_edit_error_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let err = edit_file_range(&file, 10, 20, |_| {
            Err(CheckpointError::TensorData {
                tensor: "t".into(),
                reason: "refused".into(),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }

    /// A file opened for writing only cannot be mapped: the caller is told to write instead.
    #[test]
    fn a_write_only_file_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let done = edit_file_range(&file, 10, 20, |_| panic!("not called")).unwrap();
        assert!(!done);
    }
}
