//! Lazy tensor data for remapped tensors: strided views of a source tensor, and concatenations.
//!
//! Every remap op moves elements without changing them, so an output tensor is described by
//! *which* source elements it holds, and its bytes are gathered only when the writer asks for
//! them. A view of a file-backed tensor reads only the byte runs it covers (one expert's rows of
//! a fused tensor, not the whole tensor); a concatenation reads exactly its parts.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use peftkit_checkpoint::{dtype_name, dtype_size};
use peftkit_checkpoint::{CheckpointError, Dtype, Tensor};

/// What a view looks into.
#[derive(Clone)]
pub(crate) enum Base {
    /// A tensor of the input state dict.
    Tensor(Tensor),
    /// A tensor computed by concatenation (then viewed, e.g. transposed).
    Concat(Arc<Concat>),
}

/// Parts joined along `dim`.
pub(crate) struct Concat {
    pub(crate) parts: Vec<Data>,
    pub(crate) dim: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: Dtype,
}

/// A box of a contiguous base tensor, with its dims in some order.
///
/// `region` has one range per base dim; `axes` gives, for each dim of the view, the base dim it
/// runs along, or `None` for an inserted unit dim. Base dims missing from `axes` have a region
/// of length 1 (they were squeezed away).
#[derive(Clone)]
pub(crate) struct View {
    pub(crate) base: Base,
    pub(crate) base_shape: Vec<usize>,
    pub(crate) region: Vec<Range<usize>>,
    pub(crate) axes: Vec<Option<usize>>,
}

/// The data of one value flowing through a converter.
#[derive(Clone)]
pub(crate) enum Data {
    View(View),
    Concat(Arc<Concat>),
}

pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

impl View {
    /// The whole of a base tensor.
    pub(crate) fn whole(base: Base, shape: &[usize]) -> Self {
        View {
            base,
            base_shape: shape.to_vec(),
            region: shape.iter().map(|&n| 0..n).collect(),
            axes: (0..shape.len()).map(Some).collect(),
        }
    }

    pub(crate) fn shape(&self) -> Vec<usize> {
        self.axes
            .iter()
            .map(|a| a.map_or(1, |b| self.region[b].len()))
            .collect()
    }

    /// Narrows view dim `dim` to `start..start + len`.
    pub(crate) fn slice(&self, dim: usize, start: usize, len: usize) -> View {
        let mut v = self.clone();
        if let Some(b) = v.axes[dim] {
            let s = v.region[b].start + start;
            v.region[b] = s..s + len;
        }
        v
    }

    /// Removes view dim `dim` (of size 1).
    pub(crate) fn squeeze(&self, dim: usize) -> View {
        let mut v = self.clone();
        v.axes.remove(dim);
        v
    }

    /// Inserts a unit dim at `dim`.
    pub(crate) fn unsqueeze(&self, dim: usize) -> View {
        let mut v = self.clone();
        v.axes.insert(dim, None);
        v
    }

    /// Swaps two view dims.
    pub(crate) fn transpose(&self, a: usize, b: usize) -> View {
        let mut v = self.clone();
        v.axes.swap(a, b);
        v
    }

    /// The same elements, looked at through as few concatenations as possible: a view that
    /// falls inside one part of a concatenation is a view of that part (and, through it, of
    /// the part's own base). A round trip's outputs so become views of the source tensors
    /// again, reading only their own bytes instead of the whole concatenation.
    pub(crate) fn resolve(&self) -> View {
        let mut v = self.clone();
        loop {
            let Base::Concat(c) = &v.base else {
                return v;
            };
            let r = v.region[c.dim].clone();
            let mut at = 0usize;
            let mut inside = None;
            for part in &c.parts {
                let len = part.shape()[c.dim];
                if r.start >= at && r.end <= at + len {
                    inside = Some((part, at));
                    break;
                }
                at += len;
            }
            let Some((part, at)) = inside else {
                return v;
            };
            let mut region = v.region.clone();
            region[c.dim] = r.start - at..r.end - at;
            v = part.view().compose(&region, &v.axes);
        }
    }

    /// A view of this view: `region` (one range per dim of this view) seen with `axes`
    /// (indices of this view's dims), expressed on this view's base.
    fn compose(&self, region: &[Range<usize>], axes: &[Option<usize>]) -> View {
        let mut base_region = self.region.clone();
        for (d, r) in region.iter().enumerate() {
            // Inserted unit dims of this view have no base dim to narrow.
            if let Some(b) = self.axes[d] {
                let s = self.region[b].start;
                base_region[b] = s + r.start..s + r.end;
            }
        }
        View {
            base: self.base.clone(),
            base_shape: self.base_shape.clone(),
            region: base_region,
            axes: axes.iter().map(|a| a.and_then(|d| self.axes[d])).collect(),
        }
    }

    /// The base tensor, when this view is all of it in its own order and shape.
    fn whole_tensor(&self) -> Option<&Tensor> {
        let Base::Tensor(t) = &self.base else {
            return None;
        };
        let identity = self
            .axes
            .iter()
            .copied()
            .eq((0..self.base_shape.len()).map(Some))
            && self
                .region
                .iter()
                .zip(&self.base_shape)
                .all(|(r, &n)| r.start == 0 && r.end == n);
        identity.then_some(t)
    }

    fn materialize(&self, dtype: Dtype) -> Result<Vec<u8>, CheckpointError> {
        let elt = elt_size(dtype)?;
        let base_strides = contiguous_strides(&self.base_shape);
        let start: usize = self
            .region
            .iter()
            .zip(&base_strides)
            .map(|(r, s)| r.start * s)
            .sum();
        // (size, stride) per view dim; unit dims never move.
        let dims: Vec<(usize, usize)> = self
            .axes
            .iter()
            .map(|a| a.map_or((1, 0), |b| (self.region[b].len(), base_strides[b])))
            .collect();
        let numel: usize = dims.iter().map(|d| d.0).product();
        if numel == 0 {
            return Ok(Vec::new());
        }
        // The longest run of innermost dims that is contiguous in the base.
        let mut run = 1usize;
        let mut split = dims.len();
        while split > 0 {
            let (size, stride) = dims[split - 1];
            if size == 1 {
                split -= 1;
            } else if stride == run {
                run *= size;
                split -= 1;
            } else {
                break;
            }
        }
        let outer = &dims[..split];
        let run_bytes = run * elt;
        let runs: usize = outer.iter().map(|d| d.0).product();
        // The element span the view touches: from its first run to the end of its last.
        let last = start + outer.iter().map(|&(n, s)| (n - 1) * s).sum::<usize>();
        let span = (start * elt)..((last + run) * elt);
        let mut out = Vec::with_capacity(numel * elt);
        match &self.base {
            Base::Tensor(t) => {
                if let Some((path, file_offset)) = t.file_source() {
                    // A dense region is read in one go; a sparse one (a few rows spread over a
                    // large tensor) run by run, so a view never reads much more than it holds.
                    let dense = span.len() <= (4 * numel * elt).max(1 << 20);
                    let mut file = open(path)?;
                    if dense || runs == 1 {
                        let mut buf = vec![0u8; span.len()];
                        read_at(&mut file, path, &mut buf, file_offset + span.start as u64)?;
                        gather(&buf, outer, start, span.start, elt, run_bytes, &mut out)?;
                    } else {
                        let mut buf = vec![0u8; run_bytes];
                        for o in Offsets::new(outer, start) {
                            read_at(&mut file, path, &mut buf, file_offset + (o * elt) as u64)?;
                            out.extend_from_slice(&buf);
                        }
                    }
                } else {
                    let bytes = t.bytes()?;
                    gather(&bytes, outer, start, 0, elt, run_bytes, &mut out)?;
                }
            }
            Base::Concat(c) => {
                let bytes = c.materialize()?;
                gather(&bytes, outer, start, 0, elt, run_bytes, &mut out)?;
            }
        }
        Ok(out)
    }
}

/// Element offsets of every run, in row-major order of the outer dims, without building the
/// whole list (a transpose has one run per element).
struct Offsets<'a> {
    dims: &'a [(usize, usize)],
    index: Vec<usize>,
    offset: usize,
    done: bool,
}

impl<'a> Offsets<'a> {
    fn new(dims: &'a [(usize, usize)], start: usize) -> Self {
        Offsets {
            dims,
            index: vec![0; dims.len()],
            offset: start,
            done: dims.iter().any(|d| d.0 == 0),
        }
    }
}

impl Iterator for Offsets<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.done {
            return None;
        }
        let current = self.offset;
        // Advance the odometer, last dim fastest.
        let mut d = self.dims.len();
        loop {
            if d == 0 {
                self.done = true;
                break;
            }
            d -= 1;
            let (size, stride) = self.dims[d];
            if self.index[d] + 1 < size {
                self.index[d] += 1;
                self.offset += stride;
                break;
            }
            self.offset -= self.index[d] * stride;
            self.index[d] = 0;
        }
        Some(current)
    }
}

/// Copies every run of the view out of `bytes`, which start at byte `bytes_start` of the base.
fn gather(
    bytes: &[u8],
    outer: &[(usize, usize)],
    start: usize,
    bytes_start: usize,
    elt: usize,
    run_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), CheckpointError> {
    for o in Offsets::new(outer, start) {
        let s = o * elt - bytes_start;
        let chunk = bytes
            .get(s..s + run_bytes)
            .ok_or_else(|| CheckpointError::TensorData {
                tensor: String::new(),
                reason: format!(
                    "view reaches byte {} of a {}-byte tensor",
                    s + run_bytes,
                    bytes.len()
                ),
            })?;
        out.extend_from_slice(chunk);
    }
    Ok(())
}

pub(crate) fn elt_size(dtype: Dtype) -> Result<usize, CheckpointError> {
    dtype_size(dtype).ok_or_else(|| CheckpointError::TensorData {
        tensor: String::new(),
        reason: format!(
            "{} packs several elements per byte; remap ops move whole elements",
            dtype_name(dtype)
        ),
    })
}

fn open(path: &Path) -> Result<File, CheckpointError> {
    File::open(path).map_err(|e| CheckpointError::io(path, e))
}

#[cfg(unix)]
fn read_at(
    file: &mut File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), CheckpointError> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
        .map_err(|e| CheckpointError::io(path, e))
}

#[cfg(not(unix))]
fn read_at(
    file: &mut File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), CheckpointError> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(buf))
        .map_err(|e| CheckpointError::io(path, e))
}

impl Concat {
    /// Fills the output part by part, so at most one part is held besides the output.
    fn materialize(&self) -> Result<Vec<u8>, CheckpointError> {
        let elt = elt_size(self.dtype)?;
        let outer: usize = self.shape[..self.dim].iter().product();
        let inner: usize = self.shape[self.dim + 1..].iter().product();
        let row = self.shape[self.dim] * inner * elt;
        let mut out = vec![0u8; outer * row];
        let mut at = 0usize;
        for part in &self.parts {
            let slab = part.shape()[self.dim] * inner * elt;
            let bytes = part.materialize(self.dtype)?;
            if bytes.len() != outer * slab {
                return Err(CheckpointError::TensorData {
                    tensor: String::new(),
                    reason: format!(
                        "a concatenated part holds {} bytes, {} expected",
                        bytes.len(),
                        outer * slab
                    ),
                });
            }
            for o in 0..outer {
                out[o * row + at..o * row + at + slab]
                    .copy_from_slice(&bytes[o * slab..(o + 1) * slab]);
            }
            at += slab;
        }
        Ok(out)
    }
}

impl Data {
    pub(crate) fn shape(&self) -> Vec<usize> {
        match self {
            Data::View(v) => v.shape(),
            Data::Concat(c) => c.shape.clone(),
        }
    }

    /// As a view, wrapping a concatenation as a base first.
    pub(crate) fn view(&self) -> View {
        match self {
            Data::View(v) => v.clone(),
            Data::Concat(c) => View::whole(Base::Concat(c.clone()), &c.shape),
        }
    }

    /// The same data with every view resolved through concatenations ([`View::resolve`]).
    pub(crate) fn resolve(&self) -> Data {
        match self {
            Data::View(v) => Data::View(v.resolve()),
            Data::Concat(c) => Data::Concat(c.clone()),
        }
    }

    /// The source tensor this data is all of, unchanged, if it is one.
    pub(crate) fn whole_tensor(&self) -> Option<&Tensor> {
        match self {
            Data::View(v) => v.whole_tensor(),
            Data::Concat(_) => None,
        }
    }

    /// The bytes, gathered from the sources.
    pub(crate) fn materialize(&self, dtype: Dtype) -> Result<Vec<u8>, CheckpointError> {
        match self {
            Data::View(v) => v.materialize(dtype),
            Data::Concat(c) => c.materialize(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn tensor(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        Tensor::from_bytes(Dtype::F32, shape.to_vec(), bytes).unwrap()
    }

    #[test]
    fn slices_squeezes_and_transposes() {
        let t = tensor(&[2, 4, 3]);
        let v = View::whole(Base::Tensor(t), &[2, 4, 3]);
        // expert 1, rows 2..4: elements 1*12 + 2*3 .. = 18..24
        let e = v.slice(0, 1, 1).squeeze(0).slice(0, 2, 2);
        assert_eq!(e.shape(), vec![2, 3]);
        assert_eq!(
            f32s(&e.materialize(Dtype::F32).unwrap()),
            [18., 19., 20., 21., 22., 23.]
        );
        let tr = e.transpose(0, 1);
        assert_eq!(
            f32s(&tr.materialize(Dtype::F32).unwrap()),
            [18., 21., 19., 22., 20., 23.]
        );
        let u = e.unsqueeze(0);
        assert_eq!(u.shape(), vec![1, 2, 3]);
    }

    #[test]
    fn file_views_read_dense_and_sparse_regions() {
        use peftkit_checkpoint::SourceFile;
        let dir = std::env::temp_dir().join(format!("peftkit-remap-view-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.bin");
        let n = 2 * 300_000;
        let header = 16usize;
        let mut bytes = vec![7u8; header];
        bytes.extend((0..n).flat_map(|i| (i as f32).to_le_bytes()));
        std::fs::write(&path, &bytes).unwrap();
        let t = Tensor::from_file(
            Dtype::F32,
            vec![2, 300_000],
            SourceFile::open(&path).unwrap(),
            header as u64,
        )
        .unwrap();
        let v = View::whole(Base::Tensor(t), &[2, 300_000]);
        // Two runs 1.2 MB apart: read run by run.
        let sparse = v.slice(1, 5, 2);
        assert_eq!(
            f32s(&sparse.materialize(Dtype::F32).unwrap()),
            [5., 6., 300_005., 300_006.]
        );
        // One contiguous row: one read.
        let row = v.slice(0, 1, 1).squeeze(0).slice(0, 299_998, 2);
        assert_eq!(
            f32s(&row.materialize(Dtype::F32).unwrap()),
            [599_998., 599_999.]
        );
        // A transpose of a small corner: dense, gathered element by element.
        let corner = v.slice(1, 0, 3).transpose(0, 1);
        assert_eq!(
            f32s(&corner.materialize(Dtype::F32).unwrap()),
            [0., 300_000., 1., 300_001., 2., 300_002.]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn views_inside_one_part_of_a_concatenation_resolve_to_that_part() {
        // Two experts stacked, then [gate; up] concatenated along rows, as a fused gate_up_proj.
        let stack = |a: &Tensor, b: &Tensor| {
            let part = |t: &Tensor| {
                Data::View(View::whole(Base::Tensor(t.clone()), t.shape()).unsqueeze(0))
            };
            Data::Concat(Arc::new(Concat {
                parts: vec![part(a), part(b)],
                dim: 0,
                shape: vec![2, 2, 3],
                dtype: Dtype::F32,
            }))
        };
        let (g0, g1, u0, u1) = (
            tensor(&[2, 3]),
            tensor(&[2, 3]),
            tensor(&[2, 3]),
            tensor(&[2, 3]),
        );
        let fused = Concat {
            parts: vec![stack(&g0, &g1), stack(&u0, &u1)],
            dim: 1,
            shape: vec![2, 4, 3],
            dtype: Dtype::F32,
        };
        let whole = View::whole(Base::Concat(Arc::new(fused)), &[2, 4, 3]);
        // Rows 2..4 (the up half), expert 1: exactly u1.
        let up1 = whole.slice(1, 2, 2).slice(0, 1, 1).squeeze(0);
        let resolved = up1.resolve();
        assert!(matches!(&resolved.base, Base::Tensor(t) if t.shape() == [2, 3]));
        assert!(resolved.whole_tensor().is_some());
        assert_eq!(
            resolved.materialize(Dtype::F32).unwrap(),
            up1.materialize(Dtype::F32).unwrap()
        );
        // One row of expert 0's gate: a view of g0, not all of it.
        let row = whole.slice(1, 1, 1).slice(0, 0, 1).squeeze(0);
        let r = row.resolve();
        assert!(matches!(r.base, Base::Tensor(_)) && r.whole_tensor().is_none());
        assert_eq!(f32s(&r.materialize(Dtype::F32).unwrap()), [3., 4., 5.]);
        // Rows 1..3 straddle gate and up: still a view of the concatenation.
        let straddle = whole.slice(1, 1, 2).resolve();
        assert!(matches!(straddle.base, Base::Concat(_)));
    }

    #[test]
    fn concatenates_along_inner_dims() {
        let a = View::whole(Base::Tensor(tensor(&[2, 1])), &[2, 1]);
        let b = View::whole(Base::Tensor(tensor(&[2, 2])), &[2, 2]);
        let c = Concat {
            parts: vec![Data::View(a), Data::View(b)],
            dim: 1,
            shape: vec![2, 3],
            dtype: Dtype::F32,
        };
        assert_eq!(f32s(&c.materialize().unwrap()), [0., 0., 1., 1., 2., 3.]);
    }
}
