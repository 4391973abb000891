//! Edited tensors (`Tensor::edited`): the writer lets the edit write the tensor's range of a
//! buffered output file from the source, or writes the edited bytes itself; either way the file
//! holds the source's bytes after `InPlaceEdit::apply`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use peftkit_checkpoint::{
    save_pretrained, Checkpoint, Dtype, InPlaceEdit, OutputRegion, Result, SaveOptions,
    SourceRegion, StateDict, Tensor,
};

/// Adds one to every byte; in the file when `in_file`, through positioned reads and writes.
struct AddOne {
    in_file: bool,
    calls: Arc<AtomicUsize>,
    /// How many regions were offered for writing through a mapping.
    mapped: Arc<AtomicUsize>,
}

impl InPlaceEdit for AddOne {
    fn apply(&self, bytes: &mut [u8]) -> Result<()> {
        bytes.iter_mut().for_each(|b| *b = b.wrapping_add(1));
        Ok(())
    }

    fn apply_in_file(&self, source: SourceRegion<'_>, out: &OutputRegion<'_>) -> Result<bool> {
        if !self.in_file {
            return Ok(false);
        }
        if let Some((file, offset)) = out.mappable()? {
            // Allocated: the file reaches the region's end, which a mapping may cover.
            let end = offset + out.len() as u64;
            assert!(file.metadata().unwrap().len() >= end);
            self.mapped.fetch_add(1, Ordering::Relaxed);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        // The range is empty: the source is read and the result written in two pieces, as a
        // kernel streaming block by block would.
        let mut buf = vec![0u8; out.len()];
        let half = buf.len() / 2;
        source.read_at(0, &mut buf[..half])?;
        source.read_at(half, &mut buf[half..])?;
        self.apply(&mut buf)?;
        out.write_at(half, &buf[half..])?;
        out.write_at(0, &buf[..half])?;
        // What was written reads back.
        let mut back = vec![0u8; buf.len()];
        out.read_at(0, &mut back)?;
        assert!(back == buf);
        Ok(true)
    }
}

/// A source checkpoint of tensors whose lengths put them at unaligned offsets.
fn source(dir: &std::path::Path) -> Checkpoint {
    let mut state = StateDict::new();
    for (i, n) in [3usize, 70_001, 5, 300_000].into_iter().enumerate() {
        let bytes: Vec<u8> = (0..n * 2).map(|j| (j * 31 + i) as u8).collect();
        let t = Tensor::from_bytes(Dtype::BF16, vec![n], bytes).unwrap();
        state.insert(format!("t{i}"), t);
    }
    save_pretrained(dir, &state, &SaveOptions::default().durable(false)).unwrap();
    Checkpoint::open(dir).unwrap()
}

/// Whether this platform edits in the output file under `dir` (Linux, ext4 or tmpfs).
fn edits_in_file_here(dir: &std::path::Path) -> bool {
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    cfg!(target_os = "linux")
        && std::env::var_os("PEFTKIT_NO_EDIT_IN_FILE").is_none()
        && (fs == "ext2/ext3" || fs == "tmpfs")
}

#[test]
fn edited_tensors_are_written_edited_in_the_file_or_from_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    for (in_file, durable) in [(true, false), (false, false), (true, true)] {
        let calls = Arc::new(AtomicUsize::new(0));
        let mapped = Arc::new(AtomicUsize::new(0));
        let mut state = StateDict::new();
        for (i, (name, t)) in src.tensors().enumerate() {
            let t = match i % 2 {
                0 => t.clone(),
                _ => Tensor::edited(
                    t.clone(),
                    AddOne {
                        in_file,
                        calls: calls.clone(),
                        mapped: mapped.clone(),
                    },
                ),
            };
            state.insert(name.to_owned(), t);
        }
        let out = tmp.path().join(format!("out-{in_file}-{durable}"));
        save_pretrained(&out, &state, &SaveOptions::default().durable(durable)).unwrap();
        let written = Checkpoint::open(&out).unwrap();
        for (i, (name, t)) in src.tensors().enumerate() {
            let mut want = t.bytes().unwrap().into_owned();
            if i % 2 == 1 {
                want.iter_mut().for_each(|b| *b = b.wrapping_add(1));
            }
            let got = written.get(name).unwrap().bytes().unwrap().into_owned();
            assert!(got == want, "{name}, in_file {in_file}, durable {durable}");
        }
        // Every buffered save lets the edit write the file (a synced one writes around the
        // page cache where the file system allows, else buffered); a mapping is offered only
        // where it is safe (see `in_file`).
        let used = calls.load(Ordering::Relaxed);
        if in_file && !durable {
            assert_eq!(used, 2, "both edited tensors written by the edit");
            let offered = mapped.load(Ordering::Relaxed);
            assert_eq!(offered, if edits_in_file_here(tmp.path()) { 2 } else { 0 });
        }
        if !in_file {
            assert_eq!(used, 0);
        }
    }
}

/// Anyone reading an edited tensor gets the edited bytes.
#[test]
fn reading_an_edited_tensor_applies_the_edit() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    let t = src.get("t1").unwrap().clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let e = Tensor::edited(
        t.clone(),
        AddOne {
            in_file: true,
            calls,
            mapped: Default::default(),
        },
    );
    assert!(e.is_computed());
    assert_eq!((e.dtype(), e.shape()), (t.dtype(), t.shape()));
    let want: Vec<u8> = t
        .bytes()
        .unwrap()
        .iter()
        .map(|b| b.wrapping_add(1))
        .collect();
    assert!(*e.bytes().unwrap() == want[..]);
}
