//! A remapped value as the parts it is written in ([`peftkit_checkpoint::Part`]), so that no
//! output tensor is ever built whole in memory.
//!
//! A fused expert tensor (experts stacked, gate and up concatenated) is, byte for byte, its
//! experts' tensors one after the other, and an expert split from a fused tensor is one
//! contiguous range of it. Such values become file ranges, which the writer copies inside the
//! kernel (`copy_file_range`) exactly as it copies an untouched tensor. What is not a long
//! contiguous range (a transpose, a concatenation along an inner dim) becomes computed parts of
//! at most 8 MB, each gathered from source reads of at most 8 MB, so the
//! memory a write takes does not depend on the size of the tensor (docs/architecture.md,
//! "peftkit-remap": the figures).

use std::sync::Arc;

use peftkit_checkpoint::{buffers, CheckpointError, Part, SourceFile, Tensor};

use crate::view::{contiguous_strides, Base, Data, View};

/// The sizes that bound a streamed value's memory.
#[derive(Clone, Copy)]
struct Limits {
    /// Largest computed part, in bytes.
    chunk: usize,
    /// Largest source range read at once to gather a computed part.
    window: usize,
    /// Strided runs at least this long are file ranges of their own (or, inside a computed
    /// part, read straight into place); shorter ones are gathered.
    long_run: usize,
}

const LIMITS: Limits = Limits {
    chunk: 8 << 20,
    window: 8 << 20,
    long_run: 256 << 10,
};

type Result<T> = std::result::Result<T, CheckpointError>;

/// The parts of `data` in its byte order, or `None` when some source tensor is not read from
/// a file (an in-memory or computed tensor): such a value is gathered whole, as before.
pub(crate) fn parts(data: &Data, elt: usize) -> Option<Vec<Part>> {
    parts_within(data, elt, LIMITS)
}

fn parts_within(data: &Data, elt: usize, limits: Limits) -> Option<Vec<Part>> {
    if !from_files(data) {
        return None;
    }
    let mut parts = Vec::new();
    plan(data.view(), elt, limits, &mut parts);
    Some(coalesce(parts))
}

/// Whether every source tensor of `data` is read from a file.
fn from_files(data: &Data) -> bool {
    let view = match data {
        Data::View(v) => v,
        Data::Concat(c) => return c.parts.iter().all(from_files),
    };
    match &view.base {
        Base::Tensor(t) => t.source_file().is_some(),
        Base::Concat(c) => c.parts.iter().all(from_files),
    }
}

fn numel(v: &View) -> usize {
    v.shape().iter().product()
}

/// Appends the parts of `v` (all of whose source tensors are file-backed): file ranges where
/// its bytes are long runs of a file, computed parts of at most `limits.chunk` bytes elsewhere.
fn plan(v: View, elt: usize, limits: Limits, out: &mut Vec<Part>) {
    let v = v.resolve();
    let bytes = numel(&v) * elt;
    if bytes == 0 {
        return;
    }
    match &v.base {
        Base::Tensor(t) => {
            if let Some((file, offset)) = t.source_file() {
                let b = Boxed::of(&v);
                let (run, split) = b.run();
                if split == 0 || run * elt >= limits.long_run {
                    for (s, _) in Odometer::new(&b.dims[..split], b.src, 0) {
                        out.push(Part::File {
                            file: Arc::clone(file),
                            offset: offset + (s * elt) as u64,
                            len: run * elt,
                        });
                    }
                    return;
                }
            }
        }
        Base::Concat(_) => {
            // Across a concatenation: cut it where its pieces are long enough to be worth
            // looking for file ranges in, else compute it in chunks.
            let subs = split(&v, elt, 0);
            if subs.len() > 1 && bytes / subs.len() >= limits.long_run {
                for sub in subs {
                    plan(sub, elt, limits, out);
                }
                return;
            }
        }
    }
    if bytes <= limits.chunk {
        out.push(computed(v, bytes, elt, limits));
        return;
    }
    for sub in split(&v, elt, limits.chunk) {
        plan(sub, elt, limits, out);
    }
}

/// `v` cut into smaller views whose bytes follow one another in `v`'s order: along the first
/// dim of size > 1, in groups of at most `chunk` bytes (at least one index each); or, when that
/// dim is the dim of a concatenation `v` straddles, at the boundaries of its parts.
fn split(v: &View, elt: usize, chunk: usize) -> Vec<View> {
    let shape = v.shape();
    let Some(o) = shape.iter().position(|&n| n > 1) else {
        return vec![v.clone()];
    };
    if let Base::Concat(c) = &v.base {
        if v.axes[o] == Some(c.dim) {
            let r = v.region[c.dim].clone();
            let mut at = 0usize;
            let mut subs = Vec::new();
            for part in &c.parts {
                let len = part.shape()[c.dim];
                let (s, e) = (at.max(r.start), (at + len).min(r.end));
                if s < e {
                    subs.push(v.slice(o, s - r.start, e - s));
                }
                at += len;
            }
            return subs;
        }
    }
    let slab = shape[o + 1..].iter().product::<usize>() * elt;
    let group = (chunk / slab.max(1)).max(1);
    (0..shape[o])
        .step_by(group)
        .map(|i| v.slice(o, i, group.min(shape[o] - i)))
        .collect()
}

/// A computed part holding `v`'s `bytes`.
fn computed(v: View, bytes: usize, elt: usize, limits: Limits) -> Part {
    Part::Computed {
        len: bytes,
        produce: Arc::new(move || {
            let mut out = buffers::take(bytes);
            fill(&v, elt, limits, &mut out)?;
            Ok(out)
        }),
    }
}

/// Writes `v`'s bytes into `out` (exactly their size), reading at most `limits.window` bytes
/// of a source at once.
fn fill(v: &View, elt: usize, limits: Limits, out: &mut [u8]) -> Result<()> {
    let v = v.resolve();
    match &v.base {
        Base::Tensor(t) => {
            let b = Boxed::of(&v);
            let src = Source::of(t)?;
            let mut dims = b.dims.clone();
            gather(&mut dims, (b.src, 0), &src, (elt, limits), out)
        }
        Base::Concat(_) => {
            let mut at = 0usize;
            // One index at a time: every piece is smaller than `v`, so this ends.
            for sub in split(&v, elt, 0) {
                let n = numel(&sub) * elt;
                fill(&sub, elt, limits, &mut out[at..at + n])?;
                at += n;
            }
            Ok(())
        }
    }
}

/// Where a tensor's bytes are read from: its file and offset.
struct Source<'a>(&'a SourceFile, u64);

impl<'a> Source<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        let (file, offset) = t.source_file().ok_or_else(|| CheckpointError::TensorData {
            tensor: String::new(),
            reason: "a streamed view of a tensor that is not read from a file".into(),
        })?;
        Ok(Source(file, offset))
    }

    /// Reads source bytes `from..from + buf.len()` into `buf`.
    fn read(&self, buf: &mut [u8], from: usize) -> Result<()> {
        self.0.read_exact_at(buf, self.1 + from as u64)
    }
}

/// A view of a tensor as a box: per view dim `(size, source stride, output stride)` in
/// elements, and the source element the box starts at.
#[derive(Clone)]
struct Boxed {
    dims: Vec<(usize, usize, usize)>,
    src: usize,
}

impl Boxed {
    fn of(v: &View) -> Self {
        let strides = contiguous_strides(&v.base_shape);
        let src = v
            .region
            .iter()
            .zip(&strides)
            .map(|(r, s)| r.start * s)
            .sum();
        let sizes: Vec<(usize, usize)> = v
            .axes
            .iter()
            .map(|a| a.map_or((1, 0), |b| (v.region[b].len(), strides[b])))
            .collect();
        let out = contiguous_strides(&sizes.iter().map(|d| d.0).collect::<Vec<_>>());
        let dims = sizes
            .iter()
            .zip(out)
            .map(|(&(n, s), o)| (n, s, o))
            .collect();
        Boxed { dims, src }
    }

    /// The longest run of innermost dims contiguous in the source and the output, in elements,
    /// and the number of outer dims left.
    fn run(&self) -> (usize, usize) {
        run_of(&self.dims)
    }
}

fn run_of(dims: &[(usize, usize, usize)]) -> (usize, usize) {
    let (mut run, mut split) = (1usize, dims.len());
    while split > 0 {
        let (size, s, o) = dims[split - 1];
        if size == 1 {
            split -= 1;
        } else if s == run && o == run {
            run *= size;
            split -= 1;
        } else {
            break;
        }
    }
    (run, split)
}

/// Copies the box `dims` (starting at source element `src`, output element `dst`) into `out`:
/// in one read when its source span fits a window, run by run when runs are long, else in
/// halves along the dim that spreads furthest in the source.
fn gather(
    dims: &mut [(usize, usize, usize)],
    (src, dst): (usize, usize),
    source: &Source<'_>,
    (elt, limits): (usize, Limits),
    out: &mut [u8],
) -> Result<()> {
    if dims.iter().any(|d| d.0 == 0) {
        return Ok(());
    }
    let (run, split) = run_of(dims);
    let run_bytes = run * elt;
    let span = (dims.iter().map(|&(n, s, _)| (n - 1) * s).sum::<usize>() + 1) * elt;
    let runs = Odometer::new(&dims[..split], src, dst);
    if span <= limits.window {
        let mut buf = buffers::take(span);
        source.read(&mut buf, src * elt)?;
        for (s, d) in runs {
            let from = (s - src) * elt;
            out[d * elt..d * elt + run_bytes].copy_from_slice(&buf[from..from + run_bytes]);
        }
        buffers::give(buf);
        return Ok(());
    }
    if run_bytes >= limits.long_run {
        for (s, d) in runs {
            source.read(&mut out[d * elt..d * elt + run_bytes], s * elt)?;
        }
        return Ok(());
    }
    // The outer dim reaching furthest in the source: halving it halves the span.
    let k = (0..split)
        .filter(|&k| dims[k].0 > 1)
        .max_by_key(|&k| dims[k].1)
        .unwrap_or(0);
    let (n, s, o) = dims[k];
    let h = n / 2;
    dims[k].0 = h;
    gather(dims, (src, dst), source, (elt, limits), out)?;
    dims[k].0 = n - h;
    gather(dims, (src + h * s, dst + h * o), source, (elt, limits), out)?;
    dims[k].0 = n;
    Ok(())
}

/// Source and output element offsets of every run, in row-major order of the outer dims.
struct Odometer<'a> {
    dims: &'a [(usize, usize, usize)],
    index: Vec<usize>,
    at: (usize, usize),
    done: bool,
}

impl<'a> Odometer<'a> {
    fn new(dims: &'a [(usize, usize, usize)], src: usize, dst: usize) -> Self {
        Odometer {
            dims,
            index: vec![0; dims.len()],
            at: (src, dst),
            done: dims.iter().any(|d| d.0 == 0),
        }
    }
}

impl Iterator for Odometer<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        if self.done {
            return None;
        }
        let current = self.at;
        let mut d = self.dims.len();
        loop {
            if d == 0 {
                self.done = true;
                break;
            }
            d -= 1;
            let (size, s, o) = self.dims[d];
            if self.index[d] + 1 < size {
                self.index[d] += 1;
                self.at.0 += s;
                self.at.1 += o;
                break;
            }
            self.at.0 -= self.index[d] * s;
            self.at.1 -= self.index[d] * o;
            self.index[d] = 0;
        }
        Some(current)
    }
}

/// Joins file ranges that follow one another in the same file.
fn coalesce(parts: Vec<Part>) -> Vec<Part> {
    let mut out: Vec<Part> = Vec::with_capacity(parts.len());
    for part in parts {
        if let (
            Some(Part::File {
                file: f0,
                offset: o0,
                len: l0,
            }),
            Part::File {
                file: f1,
                offset: o1,
                len: l1,
            },
        ) = (out.last_mut(), &part)
        {
            if Arc::ptr_eq(f0, f1) && *o0 + *l0 as u64 == *o1 {
                *l0 += l1;
                continue;
            }
        }
        out.push(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Concat;
    use peftkit_checkpoint::Dtype;

    /// `n` tensors of `shape` (f32, distinct values) stored one after the other in one file.
    fn file_tensors(dir: &std::path::Path, n: usize, shape: &[usize]) -> Vec<Tensor> {
        let numel: usize = shape.iter().product();
        let path = dir.join("t.bin");
        let mut bytes = vec![9u8; 24]; // a header, so tensors start unaligned
        bytes.extend((0..n * numel).flat_map(|i| (i as f32).to_le_bytes()));
        std::fs::write(&path, &bytes).unwrap();
        let file = SourceFile::open(&path).unwrap();
        (0..n)
            .map(|i| {
                let at = 24 + (i * numel * 4) as u64;
                Tensor::from_file(Dtype::F32, shape.to_vec(), Arc::clone(&file), at).unwrap()
            })
            .collect()
    }

    fn whole(t: &Tensor) -> View {
        View::whole(Base::Tensor(t.clone()), t.shape())
    }

    fn concat(parts: Vec<Data>, dim: usize, dtype: Dtype) -> Data {
        let mut shape = parts[0].shape();
        shape[dim] = parts.iter().map(|p| p.shape()[dim]).sum();
        Data::Concat(Arc::new(Concat {
            parts,
            dim,
            shape,
            dtype,
        }))
    }

    /// The parts of `data` under `limits`, checked against the whole gather; returns them.
    fn check(data: &Data, limits: Limits) -> Vec<Part> {
        let parts = parts_within(data, 4, limits).expect("file-backed");
        for p in &parts {
            if let Part::Computed { len, .. } = p {
                assert!(*len <= limits.chunk, "a computed part of {len} bytes");
            }
        }
        let t = Tensor::from_parts(Dtype::F32, data.shape(), parts.clone()).unwrap();
        assert!(*t.bytes().unwrap() == *data.materialize(Dtype::F32).unwrap());
        parts
    }

    const TINY: Limits = Limits {
        chunk: 64,
        window: 48,
        long_run: 32,
    };

    #[test]
    fn a_fused_expert_tensor_is_its_experts_file_ranges() {
        let dir = tempfile::tempdir().unwrap();
        // Four experts' gate and up ([3, 5] each): gate_up = concat(stack(gates), stack(ups), dim 1).
        let t = file_tensors(dir.path(), 8, &[3, 5]);
        let stack = |ts: &[Tensor]| {
            let parts = ts
                .iter()
                .map(|t| Data::View(whole(t).unsqueeze(0)))
                .collect();
            concat(parts, 0, Dtype::F32)
        };
        let fused = concat(vec![stack(&t[..4]), stack(&t[4..])], 1, Dtype::F32);
        let parts = check(&fused, TINY);
        assert_eq!(parts.len(), 8, "gate 0, up 0, gate 1, …: {parts:?}");
        assert!(parts
            .iter()
            .all(|p| matches!(p, Part::File { len: 60, .. })));
        // Stacked experts stored one after the other: one range.
        let down = stack(&t);
        assert!(matches!(
            check(&down, TINY)[..],
            [Part::File { len: 480, .. }]
        ));
        // With the default limits, pieces this small are computed in one part.
        assert!(matches!(
            parts_within(&fused, 4, LIMITS).unwrap()[..],
            [Part::Computed { len: 480, .. }]
        ));
    }

    #[test]
    fn an_expert_of_a_fused_tensor_is_one_file_range() {
        let dir = tempfile::tempdir().unwrap();
        let t = &file_tensors(dir.path(), 1, &[4, 6, 5])[0];
        // gate of expert 2: rows 0..3 of [2].
        let gate = whole(t).slice(0, 2, 1).squeeze(0).slice(0, 0, 3);
        let parts = check(&Data::View(gate), TINY);
        assert!(
            matches!(parts[..], [Part::File { len: 60, .. }]),
            "{parts:?}"
        );
    }

    #[test]
    fn transposes_and_inner_concatenations_are_computed_in_bounded_parts() {
        let dir = tempfile::tempdir().unwrap();
        let t = file_tensors(dir.path(), 3, &[6, 7]);
        // A transpose: runs of one element, gathered through windows of 48 bytes.
        let tr = Data::View(whole(&t[0]).transpose(0, 1));
        let parts = check(&tr, TINY);
        assert!(parts.iter().all(|p| matches!(p, Part::Computed { .. })));
        assert!(parts.len() >= 168 / 64);
        // A concatenation along the last dim, then transposed, and a column slice of it.
        let inner = concat(
            vec![Data::View(whole(&t[1])), Data::View(whole(&t[2]))],
            1,
            Dtype::F32,
        );
        check(&inner, TINY);
        check(&Data::View(inner.view().transpose(0, 1)), TINY);
        check(&Data::View(inner.view().slice(1, 3, 8)), TINY);
        // Long strided runs are file ranges of their own: columns 1..6 of each row (20 bytes).
        let cols = Data::View(whole(&t[0]).slice(1, 1, 5));
        let long = Limits {
            long_run: 20,
            ..TINY
        };
        let parts = check(&cols, long);
        assert_eq!(parts.len(), 6);
        assert!(parts
            .iter()
            .all(|p| matches!(p, Part::File { len: 20, .. })));
    }

    #[test]
    fn values_of_in_memory_tensors_are_not_streamed() {
        let t = Tensor::from_bytes(Dtype::F32, vec![2, 2], vec![0; 16]).unwrap();
        assert!(parts_within(&Data::View(whole(&t)), 4, TINY).is_none());
    }
}
