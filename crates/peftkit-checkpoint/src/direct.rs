//! Direct (`O_DIRECT`) output for saves that are synced anyway.
//!
//! A buffered write copies the bytes into freshly allocated page-cache pages, and the sync then
//! writes those pages to disk. When the save is synced, that copy is pure overhead: the bytes
//! could go from our buffer to the disk. On the hosts measured (docs/architecture.md, "Output
//! IO") the copy into the page cache was the largest cost of a merge (61 % of its cycles), and
//! writing 284 MB with `O_DIRECT` took 0.47 s against 0.84 s buffered + `fsync` (medians of 5).
//!
//! `O_DIRECT` needs the file offset, the length and the memory address aligned to the device's
//! block. A tensor's bytes start anywhere in a safetensors file, so each write is split: the
//! unaligned head and tail go through the page cache (the sync flushes them), the aligned middle
//! is copied, a few MB at a time, into an aligned bounce buffer and written directly. The
//! middle's pages are never in the page cache (no other write touches them), so the two paths
//! never see each other's data. Where the file system refuses `O_DIRECT` (tmpfs, some network
//! file systems), every write is buffered, as before.

use std::fs::File;
use std::path::Path;

/// Alignment of offsets, lengths and memory: 4 KiB covers every common block device.
pub(crate) const ALIGN: usize = 4096;
/// Bytes per direct write (and size of each worker's bounce buffer).
const BOUNCE: usize = 2 << 20;
/// Writes whose aligned middle is smaller than this stay buffered.
const MIN_DIRECT: u64 = 1 << 20;

/// A second handle on `path` that writes around the page cache, or `None` when this platform
/// or file system has none. `PEFTKIT_NO_DIRECT` (a switch for benchmarks, to measure what
/// direct output buys) makes every save buffered.
#[cfg(target_os = "linux")]
pub(crate) fn open(path: &Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    if std::env::var_os("PEFTKIT_NO_DIRECT").is_some() {
        return None;
    }
    rustix::fs::open(
        path,
        OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .map(File::from)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn open(_path: &Path) -> Option<File> {
    None
}

/// Whether a synced save of `bytes` in all writes its tensors computed block by block through
/// the page cache ([`crate::OutputRegion::in_blocks`]) rather than each whole around it: when
/// they fit in half the memory the kernel has free.
///
/// Measured on the AMD Zen 4 host (docs/architecture.md, "Output IO"): through the page cache,
/// each block's writeback started at once, the 1 GB merge took 0.71 / 0.81 s (fastest /
/// median) against 0.88 / 1.02 s for whole direct writes; the 7B merge, whose 13.5 GB output
/// does not fit beside its base's cached pages in 23.5 GiB, took 14.7–15.9 s against
/// 8.5–9.2 s, every page written waiting for one to be reclaimed. Free memory, not what the
/// kernel could reclaim, is the measure of that; half of it leaves room for the base's pages
/// still to be read and for the rest of the host. `PEFTKIT_WHOLE_DIRECT` (a switch for
/// benchmarks) always writes whole tensors directly.
pub(crate) fn blocks_in_cache(bytes: u64) -> bool {
    if std::env::var_os("PEFTKIT_WHOLE_DIRECT").is_some() {
        return false;
    }
    free_memory().is_some_and(|free| bytes <= free / 2)
}

/// The memory the kernel has free (not counting what it could reclaim), in bytes.
#[cfg(target_os = "linux")]
#[allow(clippy::useless_conversion)] // `freeram` is a C `unsigned long`: 32 bits on some targets
fn free_memory() -> Option<u64> {
    let info = rustix::system::sysinfo();
    Some(u64::from(info.freeram).saturating_mul(u64::from(info.mem_unit)))
}

#[cfg(not(target_os = "linux"))]
fn free_memory() -> Option<u64> {
    None
}

/// Writes `buf` at `offset`: the aligned middle through `direct`, the rest through `buffered`
/// (see the module documentation). Falls back to `buffered` for the whole middle if the
/// kernel refuses the first direct write.
pub(crate) fn write_all_at(
    buffered: &File,
    direct: &File,
    buf: &[u8],
    offset: u64,
) -> std::io::Result<()> {
    let end = offset + buf.len() as u64;
    let a = offset.next_multiple_of(ALIGN as u64);
    let b = end / ALIGN as u64 * ALIGN as u64;
    if b < a + MIN_DIRECT {
        return plain_write_at(buffered, buf, offset);
    }
    let (head, rest) = buf.split_at((a - offset) as usize);
    let (middle, tail) = rest.split_at((b - a) as usize);
    plain_write_at(buffered, head, offset)?;
    plain_write_at(buffered, tail, b)?;
    if (middle.as_ptr() as usize).is_multiple_of(ALIGN) {
        return write_middle(buffered, direct, middle, a);
    }
    BOUNCE_BUF.with(|cell| {
        let mut held = cell.borrow_mut();
        let bounce = aligned(&mut held);
        let mut done = 0usize;
        while done < middle.len() {
            let n = BOUNCE.min(middle.len() - done);
            bounce[..n].copy_from_slice(&middle[done..done + n]);
            match plain_write_at(direct, &bounce[..n], a + done as u64) {
                Ok(()) => done += n,
                Err(e)
                    if done == 0
                        && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                {
                    return plain_write_at(buffered, middle, a);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// Writes `middle`, which starts at an aligned address, at the aligned `offset` straight from
/// the caller's memory (no bounce copy), `BOUNCE` bytes per call.
fn write_middle(buffered: &File, direct: &File, middle: &[u8], offset: u64) -> std::io::Result<()> {
    for (i, piece) in middle.chunks(BOUNCE).enumerate() {
        let at = offset + (i * BOUNCE) as u64;
        match plain_write_at(direct, piece, at) {
            Ok(()) => {}
            Err(e)
                if i == 0 && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                return plain_write_at(buffered, middle, offset);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A buffer (from the pool) and the range of it where to put `len` bytes bound for file
/// `offset`, so that their address and their offset are aligned alike: their aligned middle
/// then goes to the disk from there, without the bounce copy.
pub(crate) fn same_phase(len: usize, offset: u64) -> (Vec<u8>, std::ops::Range<usize>) {
    let buf = crate::tensor::buffers::take(len + ALIGN);
    let skip = phase_skip(&buf, offset);
    (buf, skip..skip + len)
}

/// How many bytes into `buf` (at least `ALIGN` longer than what it will hold) bytes bound for
/// file `offset` must start for their address and their offset to be aligned alike.
pub(crate) fn phase_skip(buf: &[u8], offset: u64) -> usize {
    let phase = (offset % ALIGN as u64) as usize;
    (phase + ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN
}

thread_local! {
    /// Each writing thread's bounce buffer (allocated on its first direct write).
    static BOUNCE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The `BOUNCE` bytes of `held` that start at an `ALIGN`ed address.
fn aligned(held: &mut Vec<u8>) -> &mut [u8] {
    if held.len() < BOUNCE + ALIGN {
        *held = vec![0; BOUNCE + ALIGN];
    }
    let skip = held.as_ptr().align_offset(ALIGN);
    &mut held[skip..skip + BOUNCE]
}

#[cfg(unix)]
fn plain_write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
fn plain_write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    crate::safetensors_file::write_all_at(file, buf, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes that start and end anywhere, large enough for a direct middle, land byte for
    /// byte where a buffered write would put them (the file is read back through the cache).
    #[test]
    fn split_writes_put_every_byte_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        let file = File::create(&path).unwrap();
        let total = 3 * BOUNCE + 12_345;
        file.set_len(total as u64).unwrap();
        let data: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
        let cuts = [0, 7, ALIGN + 1, BOUNCE + 100, 2 * BOUNCE + ALIGN, total];
        let direct = open(&path);
        for w in cuts.windows(2) {
            let (s, e) = (w[0], w[1]);
            match &direct {
                Some(d) => write_all_at(&file, d, &data[s..e], s as u64).unwrap(),
                None => plain_write_at(&file, &data[s..e], s as u64).unwrap(),
            }
        }
        file.sync_all().unwrap();
        assert!(std::fs::read(&path).unwrap() == data);
    }

    /// An output of a page fits in the page cache on Linux; one larger than half the free
    /// memory does not.
    #[test]
    fn only_outputs_that_fit_in_free_memory_go_through_the_cache_in_blocks() {
        if std::env::var_os("PEFTKIT_WHOLE_DIRECT").is_some() {
            return;
        }
        let free = free_memory();
        assert_eq!(blocks_in_cache(4096), cfg!(target_os = "linux"));
        if let Some(free) = free {
            assert!(!blocks_in_cache(free / 2 + free / 4));
        }
        assert!(!blocks_in_cache(u64::MAX));
    }

    /// Bytes placed by `same_phase` go out without the bounce buffer and land in place.
    #[test]
    fn same_phase_buffers_are_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        let file = File::create(&path).unwrap();
        let total = 2 * BOUNCE + 3 * ALIGN;
        file.set_len(total as u64).unwrap();
        let data: Vec<u8> = (0..total).map(|i| (i * 7 % 253) as u8).collect();
        let Some(direct) = open(&path) else {
            return; // no O_DIRECT here: nothing to test
        };
        let (offset, len) = (1234usize, BOUNCE + 5 * ALIGN + 17);
        let (mut buf, range) = same_phase(len, offset as u64);
        let middle = offset.next_multiple_of(ALIGN) - offset;
        assert_eq!((buf[range.clone()].as_ptr() as usize + middle) % ALIGN, 0);
        buf[range.clone()].copy_from_slice(&data[offset..offset + len]);
        write_all_at(&file, &direct, &buf[range], offset as u64).unwrap();
        file.sync_all().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got[offset..offset + len] == data[offset..offset + len]);
    }
}
