//! Writes of a streamed tensor handed to a thread of their own in a synced save, so that the
//! threads computing its next pieces do not wait for the disk ([`OutputRegion::write_behind`]).
//!
//! In a synced save a tensor streamed piece by piece (an FP8 merge) writes each piece with
//! `O_DIRECT`: the call returns when the device has the bytes. Made by the computing threads,
//! those writes left the cores idle for their duration: a kept FP8 merge used 1.0 s of CPU in
//! 0.96 s of wall time on 2 cores (docs/architecture.md, "The FP8 merge"). Here a writer thread
//! takes the finished pieces from a short queue, and the computing threads go on with the next
//! ones. Buffered writes (an unsynced save) are copies into the page cache, work for a core
//! rather than waits, and are made at once by the caller.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;

use crate::{CheckpointError, OutputRegion, Result};

/// Pieces waiting for the writer, at most. With the one it writes and one being computed per
/// computing thread, a stream holds at most `DEPTH + 1` pieces more than it has threads (2 MiB
/// each in a synced save).
const DEPTH: usize = 1;

/// The writes of one tensor into its [`OutputRegion`], made behind the computation (see the
/// module documentation): get a buffer with [`WriteBehind::buffer`], fill it, hand it back with
/// [`WriteBehind::write`].
pub struct WriteBehind<'r, 'a> {
    region: &'r OutputRegion<'a>,
    queue: Option<SyncSender<Piece>>,
    shared: &'r Shared,
}

/// A piece waiting to be written: `buf[range]` at byte `at` of the region.
struct Piece {
    at: usize,
    buf: Vec<u8>,
    range: Range<usize>,
}

/// Buffers written and free to fill again, kept from tensor to tensor: a new one costs a page
/// fault per 4 KiB, and a merge streams hundreds of tensors.
static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Free buffers kept at most (a few MiB each).
const MAX_FREE: usize = 6;

fn recycle(buf: Vec<u8>) {
    let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
    if free.len() < MAX_FREE {
        free.push(buf);
    }
}

/// What the writer thread shares with the computing ones.
#[derive(Default)]
struct Shared {
    /// The first write that failed.
    failed: Mutex<Option<CheckpointError>>,
}

impl Shared {
    fn failed(&self) -> std::sync::MutexGuard<'_, Option<CheckpointError>> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl WriteBehind<'_, '_> {
    /// A buffer and the range of it where to compute `len` bytes bound for byte `at` of the
    /// region (placed as [`OutputRegion::place`] places them, so that a direct write needs no
    /// copy). Its bytes are whatever a previous piece left.
    pub fn buffer(&self, at: usize, len: usize) -> (Vec<u8>, Range<usize>) {
        let mut buf = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let buf = buf.get_or_insert_with(Vec::new);
        let range = self.region.place(at, len, buf);
        (std::mem::take(buf), range)
    }

    /// Writes `buf[range]` at byte `at` of the region: queued for the writer thread in a synced
    /// save (waiting while the queue is full), at once otherwise. `buf` is then free for
    /// [`WriteBehind::buffer`]. After a queued write failed, returns an error at once (the
    /// failure itself is what [`OutputRegion::write_behind`] returns).
    pub fn write(&self, at: usize, buf: Vec<u8>, range: Range<usize>) -> Result<()> {
        let Some(queue) = &self.queue else {
            let written = self.region.write_at(at, &buf[range]);
            recycle(buf);
            return written;
        };
        if self.shared.failed().is_some() || queue.send(Piece { at, buf, range }).is_err() {
            let stopped = std::io::Error::other("an earlier write of this tensor failed");
            return Err(CheckpointError::io(self.region.path, stopped));
        }
        Ok(())
    }
}

impl OutputRegion<'_> {
    /// Runs `f`, which writes the region's bytes piece by piece through a [`WriteBehind`]: in a
    /// synced save a thread of its own makes the writes while `f` computes the next pieces.
    /// Returns when every piece is written; the first failed write is the error, else `f`'s.
    ///
    /// ```no_run
    /// # fn f(out: &peftkit_checkpoint::OutputRegion<'_>) -> peftkit_checkpoint::Result<()> {
    /// out.write_behind(|w| {
    ///     for at in (0..out.len()).step_by(1 << 20) {
    ///         let len = (1 << 20).min(out.len() - at);
    ///         let (mut buf, range) = w.buffer(at, len);
    ///         buf[range.clone()].fill(7); // compute the piece here
    ///         w.write(at, buf, range)?;
    ///     }
    ///     Ok(())
    /// })
    /// # }
    /// ```
    pub fn write_behind<R>(&self, f: impl FnOnce(&WriteBehind<'_, '_>) -> Result<R>) -> Result<R> {
        let shared = Shared::default();
        if !self.is_direct() {
            return f(&WriteBehind {
                region: self,
                queue: None,
                shared: &shared,
            });
        }
        std::thread::scope(|scope| {
            let (queue, pieces) = sync_channel::<Piece>(DEPTH);
            let shared = &shared;
            let writer = scope.spawn(move || {
                for Piece { at, buf, range } in pieces {
                    // After a failure the rest is dropped: the save fails and discards the file.
                    if shared.failed().is_none() {
                        if let Err(e) = self.write_at(at, &buf[range]) {
                            shared.failed().get_or_insert(e);
                        }
                    }
                    recycle(buf);
                }
            });
            let result = f(&WriteBehind {
                region: self,
                queue: Some(queue),
                shared,
            });
            // `f`'s writer handle is gone, so the queue is closed: the thread ends when it has
            // written what is queued.
            if let Err(panic) = writer.join() {
                std::panic::resume_unwind(panic);
            }
            match shared.failed().take() {
                Some(e) => Err(e),
                None => result,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A region of `file` that writes "around the page cache" through `direct`.
    fn region<'a>(
        file: &'a std::fs::File,
        direct: &'a std::fs::File,
        writing: &'a Mutex<()>,
    ) -> OutputRegion<'a> {
        OutputRegion {
            file,
            path: Path::new("out.safetensors"),
            offset: 4096,
            len: 8 << 20,
            mappable: false,
            writing,
            direct: Some(direct),
            synced: true,
            blocks_in_cache: false,
        }
    }

    /// A write that fails on the writer thread is the error, naming the file, and the pieces
    /// handed over after it are refused.
    #[test]
    fn a_failed_write_behind_is_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let file = std::fs::File::create(&path).unwrap();
        let read_only = std::fs::File::open(&path).unwrap();
        let writing = Mutex::new(());
        // Pieces too small for a direct write go through `file`; make them fail there too.
        let out = region(&read_only, &read_only, &writing);
        let mut refused = 0;
        let err = out
            .write_behind(|w| {
                for at in (0..8 << 20).step_by(1 << 20) {
                    let (buf, range) = w.buffer(at, 1 << 20);
                    if w.write(at, buf, range).is_err() {
                        refused += 1;
                    }
                }
                Ok(())
            })
            .unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Io { path, .. } if path.ends_with("out.safetensors")),
            "{err}"
        );
        assert!(!err.to_string().contains("earlier write"), "{err}");
        assert!(refused > 0, "pieces after the failure were queued");
        drop(file);
    }

    /// Every piece is written when `write_behind` returns, at its offset.
    #[test]
    fn pieces_are_written_before_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let writing = Mutex::new(());
        let out = region(&file, &file, &writing);
        out.write_behind(|w| {
            for (i, at) in (0..8 << 20).step_by(1 << 20).enumerate() {
                let (mut buf, range) = w.buffer(at, 1 << 20);
                buf[range.clone()].fill(i as u8 + 1);
                w.write(at, buf, range)?;
            }
            Ok(())
        })
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4096 + (8 << 20));
        for (i, piece) in bytes[4096..].chunks(1 << 20).enumerate() {
            assert!(piece.iter().all(|&b| b == i as u8 + 1), "piece {i}");
        }
    }
}
