//! Lazy tensors for a rank's slice of a tensor along one dim, and for a tensor assembled from
//! its ranks' slices. Each is a closure that reads only its own byte runs when the writer
//! reaches it (positioned reads for file-backed tensors), so a split or a gather holds one
//! tensor per writer thread, never a model.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use peftkit_checkpoint::{buffers, dtype_size, CheckpointError, SourceFile, Tensor};

use crate::error::{RemapError, Result};

/// Where a tensor's bytes are read from: its file (positioned reads of single runs) or the
/// tensor itself (computed or in memory: read once per use).
#[derive(Clone)]
pub(crate) enum Bytes {
    File(Arc<SourceFile>, u64),
    Whole(Tensor),
}

/// Opens each source file once, shared by every lazy tensor reading from it.
#[derive(Default)]
pub(crate) struct Files(HashMap<PathBuf, Arc<SourceFile>>);

impl Files {
    pub(crate) fn bytes_of(&mut self, t: &Tensor) -> Result<Bytes> {
        let Some((path, offset)) = t.file_source() else {
            return Ok(Bytes::Whole(t.clone()));
        };
        let file = match self.0.get(path) {
            Some(f) => f.clone(),
            None => {
                let f = SourceFile::open(path)?;
                self.0.insert(path.to_owned(), f.clone());
                f
            }
        };
        Ok(Bytes::File(file, offset))
    }
}

/// A tensor as `[outer, dim, inner]`: elements before the dim, the dim, bytes after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    outer: usize,
    size: usize,
    inner: usize,
}

impl Frame {
    pub(crate) fn of(name: &str, t: &Tensor, dim: usize) -> Result<Self> {
        let shape = t.shape();
        let elem = dtype_size(t.dtype())
            .filter(|_| dim < shape.len())
            .ok_or_else(|| {
                RemapError::tensor(
                    name,
                    Some(t),
                    format!(
                        "cannot slice dim {dim} of a {:?} tensor of shape {shape:?}",
                        t.dtype()
                    ),
                )
            })?;
        Ok(Frame {
            outer: shape[..dim].iter().product(),
            size: shape[dim],
            inner: shape[dim + 1..].iter().product::<usize>() * elem,
        })
    }
}

/// One run to copy: `len` bytes at `src` of a source into `dst` of the output.
#[derive(Debug, Clone, Copy)]
struct Run {
    part: usize,
    src: usize,
    dst: usize,
    len: usize,
}

/// Adds a run, joining it to the previous one when both continue each other.
fn push(runs: &mut Vec<Run>, run: Run) {
    if run.len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut() {
        if last.part == run.part && last.src + last.len == run.src && last.dst + last.len == run.dst
        {
            last.len += run.len;
            return;
        }
    }
    runs.push(run);
}

/// Copies `runs` out of `parts` into one buffer of `len` bytes.
fn gather_runs(
    parts: &[Bytes],
    runs: &[Run],
    len: usize,
    name: &str,
) -> peftkit_checkpoint::Result<Vec<u8>> {
    let mut out = buffers::take(len);
    let mut whole: HashMap<usize, std::borrow::Cow<'_, [u8]>> = HashMap::new();
    for run in runs {
        let dst = &mut out[run.dst..run.dst + run.len];
        match &parts[run.part] {
            Bytes::File(file, offset) => file.read_exact_at(dst, offset + run.src as u64)?,
            Bytes::Whole(t) => {
                let src = match whole.entry(run.part) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(t.bytes()?),
                };
                let bytes = src.get(run.src..run.src + run.len).ok_or_else(|| {
                    CheckpointError::TensorData {
                        tensor: name.to_owned(),
                        reason: "a source tensor is shorter than its shape".into(),
                    }
                })?;
                dst.copy_from_slice(bytes);
            }
        }
    }
    Ok(out)
}

/// The slice of `t` holding `ranges` of `dim`, concatenated along it: what a rank holds.
pub(crate) fn slice(
    files: &mut Files,
    name: &str,
    t: &Tensor,
    dim: usize,
    ranges: &[Range<usize>],
) -> Result<Tensor> {
    let frame = Frame::of(name, t, dim)?;
    if ranges.iter().any(|r| r.end > frame.size) {
        return Err(RemapError::tensor(
            name,
            Some(t),
            format!(
                "dim {dim} has {} indices, fewer than a rank's slice needs",
                frame.size
            ),
        ));
    }
    let kept: usize = ranges.iter().map(Range::len).sum();
    let mut shape = t.shape().to_vec();
    shape[dim] = kept;
    let mut runs = Vec::new();
    let mut dst = 0;
    for o in 0..frame.outer {
        for r in ranges {
            let len = r.len() * frame.inner;
            let src = (o * frame.size + r.start) * frame.inner;
            push(
                &mut runs,
                Run {
                    part: 0,
                    src,
                    dst,
                    len,
                },
            );
            dst += len;
        }
    }
    let parts = vec![files.bytes_of(t)?];
    let owned = name.to_owned();
    Tensor::lazy(t.dtype(), shape, move || {
        gather_runs(&parts, &runs, dst, &owned)
    })
    .map_err(RemapError::from)
}

/// One rank's slice of a tensor being gathered: the tensor and the ranges of the full dim it
/// holds, in the order it stores them.
pub(crate) struct Piece<'a> {
    pub(crate) tensor: &'a Tensor,
    pub(crate) ranges: &'a [Range<usize>],
}

/// The full tensor of shape `full` rebuilt along `dim` from every rank's slice. The ranges of
/// all pieces must tile `0..full[dim]` exactly.
pub(crate) fn assemble(
    files: &mut Files,
    name: &str,
    full: &[usize],
    dim: usize,
    pieces: &[Piece<'_>],
    rank_dir: impl Fn(usize) -> PathBuf,
) -> Result<Tensor> {
    let bad = |reason: String| RemapError::tp(format!("tensor `{name}`"), reason);
    let first = pieces
        .first()
        .ok_or_else(|| bad("no rank holds it".into()))?
        .tensor;
    let mut sources = Vec::new();
    let mut tiles: Vec<(Range<usize>, usize, usize)> = Vec::new();
    for (rank, piece) in pieces.iter().enumerate() {
        let t = piece.tensor;
        let held: usize = piece.ranges.iter().map(Range::len).sum();
        let mut expect = full.to_vec();
        expect[dim] = held;
        if t.shape() != expect || t.dtype() != first.dtype() {
            return Err(bad(format!(
                "{} holds a {:?} {:?} slice; its manifest says {:?} {expect:?}",
                rank_dir(rank).display(),
                t.dtype(),
                t.shape(),
                first.dtype()
            )));
        }
        let mut local = 0;
        for r in piece.ranges {
            tiles.push((r.clone(), rank, local));
            local += r.len();
        }
        sources.push((Frame::of(name, t, dim)?, files.bytes_of(t)?));
    }
    tiles.sort_by_key(|(r, _, _)| r.start);
    let mut next = 0;
    for (r, rank, _) in &tiles {
        if r.start != next {
            return Err(bad(format!(
                "the ranks' slices do not tile dim {dim} of {full:?}: {} starts at {} where {next} was expected",
                rank_dir(*rank).display(),
                r.start
            )));
        }
        next = r.end;
    }
    if next != full[dim] {
        return Err(bad(format!(
            "the ranks' slices cover {next} of the {} indices of dim {dim}",
            full[dim]
        )));
    }
    let out = Frame::of(name, first, dim).map(|f| Frame {
        size: full[dim],
        ..f
    })?;
    let mut runs = Vec::new();
    for o in 0..out.outer {
        for (r, rank, local) in &tiles {
            let frame = sources[*rank].0;
            push(
                &mut runs,
                Run {
                    part: *rank,
                    src: (o * frame.size + local) * frame.inner,
                    dst: (o * out.size + r.start) * out.inner,
                    len: r.len() * out.inner,
                },
            );
        }
    }
    let len = out.outer * out.size * out.inner;
    let parts: Vec<Bytes> = sources.into_iter().map(|(_, b)| b).collect();
    let owned = name.to_owned();
    Tensor::lazy(first.dtype(), full.to_vec(), move || {
        gather_runs(&parts, &runs, len, &owned)
    })
    .map_err(RemapError::from)
}
