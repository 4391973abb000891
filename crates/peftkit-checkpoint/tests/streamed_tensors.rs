//! Streamed tensors (`Tensor::streamed`): the writer lets the tensor write its range of the
//! output piece by piece, unsynced through the page cache and synced around it, at whatever
//! offset the header gives it; the file holds what `StreamedTensor::bytes` gives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use peftkit_checkpoint::{
    save_pretrained, Checkpoint, Dtype, OutputRegion, Result, SaveOptions, StateDict,
    StreamedTensor, Tensor,
};

/// `len` bytes of a pattern, written in pieces of `piece` bytes, last piece first; with
/// `threads`, by that many threads through `OutputRegion::write_behind`, failing after
/// `fail_after` pieces when set.
#[derive(Default)]
struct Pattern {
    len: usize,
    piece: usize,
    calls: Arc<AtomicUsize>,
    threads: usize,
    fail_after: Option<usize>,
}

impl Pattern {
    /// The pieces written by `self.threads` threads, each taking every `threads`-th piece.
    fn write_behind(&self, out: &OutputRegion<'_>, all: &[u8]) -> Result<()> {
        let starts: Vec<usize> = (0..self.len).step_by(self.piece).collect();
        let done = AtomicUsize::new(0);
        out.write_behind(|w| {
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..self.threads)
                    .map(|t| {
                        let (starts, done) = (&starts, &done);
                        s.spawn(move || -> Result<()> {
                            for &at in starts.iter().rev().skip(t).step_by(self.threads) {
                                if Some(done.fetch_add(1, Ordering::Relaxed)) == self.fail_after {
                                    let e = std::io::Error::other("computation failed");
                                    return Err(peftkit_checkpoint::CheckpointError::io("x", e));
                                }
                                let n = self.piece.min(self.len - at);
                                let (mut buf, range) = w.buffer(at, n);
                                buf[range.clone()].copy_from_slice(&all[at..at + n]);
                                w.write(at, buf, range)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                workers.into_iter().try_for_each(|h| h.join().unwrap())
            })
        })
    }
}

impl StreamedTensor for Pattern {
    fn bytes(&self) -> Result<Vec<u8>> {
        Ok((0..self.len).map(|i| (i * 7 % 253) as u8).collect())
    }

    fn write_in_file(&self, out: &OutputRegion<'_>) -> Result<bool> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let all = self.bytes()?;
        if self.threads > 0 {
            return self.write_behind(out, &all).map(|()| true);
        }
        let mut buf = Vec::new();
        let starts: Vec<usize> = (0..self.len).step_by(self.piece).collect();
        for &at in starts.iter().rev() {
            let n = self.piece.min(self.len - at);
            let range = out.place(at, n, &mut buf);
            buf[range.clone()].copy_from_slice(&all[at..at + n]);
            out.write_at(at, &buf[range])?;
        }
        Ok(true)
    }
}

/// `a` (3 bytes, so that the streamed tensors start at unaligned offsets), then `b` and `c`
/// streamed with `threads` (see [`Pattern`]).
fn state(calls: &Arc<AtomicUsize>, threads: usize, fail_after: Option<usize>) -> StateDict {
    let mut state = StateDict::new();
    let small = Tensor::from_bytes(Dtype::U8, vec![3], vec![1, 2, 3]).unwrap();
    state.insert("a".into(), small);
    for (name, len, piece) in [("b", 3 << 20, 1 << 20), ("c", 5_000_001, 2 << 20)] {
        let calls = calls.clone();
        let t = Pattern {
            len,
            piece,
            calls,
            threads,
            fail_after,
        };
        let t = Tensor::streamed(Dtype::U8, vec![len], t).unwrap();
        state.insert(name.into(), t);
    }
    state
}

/// Three threads writing pieces behind (a writer thread in the synced save) give the bytes
/// written directly.
#[test]
fn pieces_written_behind_land_where_they_belong() {
    let tmp = tempfile::tempdir().unwrap();
    for durable in [false, true] {
        let calls = Arc::new(AtomicUsize::new(0));
        let state = state(&calls, 3, None);
        let out = tmp.path().join(format!("out-{durable}"));
        save_pretrained(&out, &state, &SaveOptions::default().durable(durable)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 2, "durable {durable}");
        let written = Checkpoint::open(&out).unwrap();
        for (name, t) in &state {
            let got = written.get(name).unwrap().bytes().unwrap().into_owned();
            assert!(got == *t.bytes().unwrap(), "{name}, durable {durable}");
        }
    }
}

/// A computation that fails after some pieces were queued fails the save, which leaves nothing.
#[test]
fn a_failed_stream_fails_the_save_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for durable in [false, true] {
        let calls = Arc::new(AtomicUsize::new(0));
        let state = state(&calls, 2, Some(2));
        let out = tmp.path().join(format!("out-{durable}"));
        let err = save_pretrained(&out, &state, &SaveOptions::default().durable(durable));
        let err = err.unwrap_err().to_string();
        assert!(err.contains("computation failed"), "{err}");
        assert!(!out.exists(), "durable {durable}");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "durable {durable}: {left:?}");
    }
}

#[test]
fn streamed_tensors_write_themselves_synced_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    for durable in [false, true] {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut state = StateDict::new();
        // Three bytes first: the streamed tensors start at unaligned offsets.
        let small = Tensor::from_bytes(Dtype::U8, vec![3], vec![1, 2, 3]).unwrap();
        state.insert("a".into(), small);
        for (name, len, piece) in [("b", 3 << 20, 1 << 20), ("c", 5_000_001, 2 << 20)] {
            let calls = calls.clone();
            let t = Pattern {
                len,
                piece,
                calls,
                ..Pattern::default()
            };
            state.insert(
                name.into(),
                Tensor::streamed(Dtype::U8, vec![len], t).unwrap(),
            );
        }
        let out = tmp.path().join(format!("out-{durable}"));
        save_pretrained(&out, &state, &SaveOptions::default().durable(durable)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 2, "durable {durable}");
        let written = Checkpoint::open(&out).unwrap();
        for (name, t) in &state {
            let got = written.get(name).unwrap().bytes().unwrap().into_owned();
            assert!(got == *t.bytes().unwrap(), "{name}, durable {durable}");
        }
    }
}
