//! Streamed tensors (`Tensor::streamed`): the writer lets the tensor write its range of the
//! output piece by piece, unsynced through the page cache and synced around it, at whatever
//! offset the header gives it; the file holds what `StreamedTensor::bytes` gives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use peftkit_checkpoint::{
    save_pretrained, Checkpoint, Dtype, OutputRegion, Result, SaveOptions, StateDict,
    StreamedTensor, Tensor,
};

/// `len` bytes of a pattern, written in pieces of `piece` bytes, last piece first.
struct Pattern {
    len: usize,
    piece: usize,
    calls: Arc<AtomicUsize>,
}

impl StreamedTensor for Pattern {
    fn bytes(&self) -> Result<Vec<u8>> {
        Ok((0..self.len).map(|i| (i * 7 % 253) as u8).collect())
    }

    fn write_in_file(&self, out: &OutputRegion<'_>) -> Result<bool> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let all = self.bytes()?;
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
            let t = Pattern { len, piece, calls };
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
