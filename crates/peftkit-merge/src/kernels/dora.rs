//! DoRA (`use_dora=true`) merge kernels for Linear / `Conv1D`, Embedding and Conv
//! (docs/formats.md, "Merge numerics"; peft 0.21.2 `DoraLinearVariant.merge_unsafe` and friends).
//!
//! ```text
//! Δ  = fl32(B @ A · s)                       as for plain LoRA (f32 adapters)
//! Wt = f32(W) + Δ                            f32
//! n  = ‖Wt‖₂ per output channel              f32, torch's reduction order (below)
//! f  = m / n                                 m = lora_magnitude_vector, f32 division
//! W' = fl_dtype(f · Wt)                      one rounding; the bias is not touched
//! ```
//!
//! The norm: torch reduces `linalg.norm(x, dim=1)` in a build-specific order. Measured on
//! torch 2.15 CPU (AVX512 build), for every row length 1…1007 we tried:
//!
//! * **contiguous rows** (Linear without `fan_in_fan_out`, Conv over `in·kernel`): 8 lanes, lane
//!   `j` accumulates `x[j+8t]²` with a separate multiply and add (no FMA); the lanes are summed
//!   in order 0..7; of the tail (`len % 8` elements) a group of 4 is added with separate
//!   multiply/add, the last `len % 4` with FMA; then `sqrt`. See [`torch_row_norm`].
//! * **strided reductions** (Linear with `fan_in_fan_out`, Embedding: the norm runs over a
//!   transposed view): one sequential sum per output channel, separate multiply and add, in
//!   increasing index order. See [`torch_column_norms`].
//!
//! This is a property of the PyTorch build (vector width, compiler contraction); other builds
//! may differ by an ulp in `n`, which then shows up as ≤ 1–2 ulp in f32 merged weights (BF16
//! weights absorb it almost always).

use safetensors::Dtype;

use super::apply::{
    stream_blocks, update_rows, update_rows_scaled, BaseTensorMut, F32Tensor, Rows, BLOCK_ELEMS,
    STREAM_BLOCK_BYTES,
};
use super::dtype::decode_f32_into;
use super::error::{check_rank, check_shape, numel, MergeMathError, Result};
use super::exact::{refusal, Numerics};
use super::lora::{
    conv_lowrank, embedding_lowrank, linear_lowrank, LoraKind, LowRank, MergeOptions, StreamedBase,
};

/// torch's f32 `linalg.norm` of one contiguous row (see the module docs for the order).
pub fn torch_row_norm(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            // Rust never contracts `a + b * c` into an FMA, which is what torch does here.
            lanes[j] += c[j] * c[j];
        }
    }
    finish_row_norm(lanes, chunks.remainder())
}

/// The end of [`torch_row_norm`], given its eight lanes' sums over the row but its `tail`
/// (the last `len % 8` elements): the lanes summed in order, the tail, then `sqrt`.
pub(crate) fn finish_row_norm(lanes: [f32; 8], tail: &[f32]) -> f32 {
    let mut s = lanes[0];
    for lane in &lanes[1..] {
        s += *lane;
    }
    let (four, rest) = tail.split_at(if tail.len() >= 4 { 4 } else { 0 });
    for v in four {
        s += v * v;
    }
    for v in rest {
        s = v.mul_add(*v, s);
    }
    s.sqrt()
}

/// [`torch_row_norm`] of each row of `values` (rows of `row_len`), pushed to `norms`: with
/// AVX2 several rows at a time, whose chains of additions overlap (one row's sums form a
/// single chain, bound by the latency of the add).
fn row_norms(values: &[f32], row_len: usize, norms: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::row_norms(values, row_len, norms) {
        return;
    }
    norms.extend(values.chunks_exact(row_len).map(torch_row_norm));
}

/// torch's f32 `linalg.norm(Xᵀ, dim=1)` for a row-major `rows × cols` matrix `X`: one norm
/// per column, each a sequential sum of squares (separate multiply and add) over the rows.
pub fn torch_column_norms(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    super::error::check_len("norm input", &[rows, cols], x.len())?;
    let mut s = vec![0f32; cols];
    add_column_squares(&mut s, x);
    Ok(finish_column_norms(s))
}

/// Adds the squares of each row of `rows` (rows as long as `sums`) to `sums`, row after row:
/// [`torch_column_norms`]'s sums, which a caller may feed in blocks of rows in order.
fn add_column_squares(sums: &mut [f32], rows: &[f32]) {
    if sums.is_empty() {
        return;
    }
    for row in rows.chunks_exact(sums.len()) {
        for (acc, v) in sums.iter_mut().zip(row) {
            *acc += v * v;
        }
    }
}

/// The norms of the sums of squares [`add_column_squares`] made.
fn finish_column_norms(mut sums: Vec<f32>) -> Vec<f32> {
    for v in sums.iter_mut() {
        *v = v.sqrt();
    }
    sums
}

/// Options DoRA cannot honour: peft's DoRA merge never rounds Δ first, has no f32-free path
/// here, and its unmerge needs the norm cached at merge time.
fn check_opts(what: &'static str, dtype: Dtype, opts: &MergeOptions) -> Result<()> {
    if dtype == Dtype::F64 {
        return Err(MergeMathError::UnsupportedDtype {
            what,
            dtype: Dtype::F64,
        });
    }
    if opts.unmerge {
        return Err(MergeMathError::Invalid {
            what,
            reason: "DoRA unmerge needs the weight norm cached at merge time; not supported".into(),
        });
    }
    if !matches!(opts.adapter_dtype, None | Some(Dtype::F32)) {
        return Err(MergeMathError::Invalid {
            what,
            reason: "DoRA is only supported with f32 (autocast) adapters".into(),
        });
    }
    Ok(())
}

/// The `f32` rows of a block: DoRA never merges into an F64 base (see [`check_opts`]).
fn f32_rows<'r>(what: &'static str, rows: Rows<'r>) -> Result<&'r mut [f32]> {
    match rows {
        Rows::F32(w) => Ok(w),
        Rows::F64(_) => Err(MergeMathError::UnsupportedDtype {
            what,
            dtype: Dtype::F64,
        }),
    }
}

/// Row-norm variant: each base row is one output channel (Linear, Conv). The factors scale
/// the rows as they are rounded and stored ([`update_rows_scaled`]).
fn merge_row_channels(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    lr: &LowRank<'_>,
    magnitude: &[f32],
    opts: &MergeOptions,
) -> Result<()> {
    let n = lr.row_len();
    update_rows_scaled(
        what,
        base,
        n,
        opts.safe_merge,
        |first_row, w, factors, scratch| {
            lr.add_rows_f32(what, first_row, w, scratch)?;
            row_norms(w, n, factors);
            for (f, m) in factors.iter_mut().zip(&magnitude[first_row..]) {
                *f = m / *f;
            }
            Ok(())
        },
    )
}

/// Column-norm variant: each base column is one output channel (`fan_in_fan_out`, Embedding).
/// Two passes over blocks of rows, so that no buffer of the weight's size is held: the norms
/// of `W + Δ` (blocks in row order, as torch sums them), then `W + Δ` again, times the factor.
fn merge_column_channels(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    lr: &LowRank<'_>,
    magnitude: &[f32],
    opts: &MergeOptions,
) -> Result<()> {
    base.validate(what, false)?;
    let data: &[u8] = base.data;
    let read = |at: usize, into: &mut [u8]| {
        into.copy_from_slice(&data[at..at + into.len()]);
        Ok(())
    };
    let norms = merged_column_norms(what, (base.dtype, data.len()), lr, read)?;
    let factor = column_factors(magnitude, &norms);
    scale_columns(what, base, lr, (0, &factor), opts.safe_merge)
}

/// DoRA's factor per column, `m / ‖W + Δ‖`.
fn column_factors(magnitude: &[f32], norms: &[f32]) -> Vec<f32> {
    magnitude.iter().zip(norms).map(|(m, n)| m / n).collect()
}

/// The second pass of [`merge_column_channels`] over `base`, rows `first_row..` of the
/// weight: `W + Δ` times each column's factor, in torch's operand order (`f · x`: with both
/// NaN, the first one's is kept).
fn scale_columns(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    lr: &LowRank<'_>,
    (first_row, factor): (usize, &[f32]),
    check: bool,
) -> Result<()> {
    let cols = lr.row_len();
    update_rows(what, base, cols, check, |row, rows, scratch| {
        let w = f32_rows(what, rows)?;
        lr.add_rows_f32(what, first_row + row, w, scratch)?;
        for wr in w.chunks_exact_mut(cols) {
            for (x, f) in wr.iter_mut().zip(factor) {
                #[allow(clippy::assign_op_pattern)]
                {
                    *x = *f * *x;
                }
            }
        }
        Ok(())
    })
}

/// [`torch_column_norms`] of `W + Δ`, made a block of rows at a time in row order, for a
/// base of `dtype` and `len` bytes read by `read(at, into)`.
fn merged_column_norms(
    what: &'static str,
    (dtype, len): (Dtype, usize),
    lr: &LowRank<'_>,
    mut read: impl FnMut(usize, &mut [u8]) -> Result<()>,
) -> Result<Vec<f32>> {
    let cols = lr.row_len();
    let size = super::dtype::element_size(dtype)?;
    let mut sums = vec![0f32; cols];
    if cols == 0 {
        return Ok(sums);
    }
    // Blocks of `update_rows`' size, which the second pass uses.
    let rows_per_block = (BLOCK_ELEMS / cols).max(1);
    let block_bytes = rows_per_block * cols * size;
    let (mut bytes, mut w, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    for (i, at) in (0..len).step_by(block_bytes).enumerate() {
        bytes.resize(block_bytes.min(len - at), 0);
        read(at, &mut bytes)?;
        w.resize(bytes.len() / size, 0.0);
        decode_f32_into(what, dtype, &bytes, &mut w)?;
        lr.add_rows_f32(what, i * rows_per_block, &mut w, &mut scratch)?;
        add_column_squares(&mut sums, &w);
    }
    Ok(finish_column_norms(sums))
}

/// A DoRA merge into an Embedding or a `Conv1D` weight (norms over columns) streamed through
/// `base.io` in two passes over blocks of whole rows: the norms, reading only, then the merge,
/// each block read, merged and written back while in cache. `Ok(None)`, having read and
/// written nothing, for what the merge in memory must refuse or check (`--numerics exact`,
/// `safe_merge`, the options DoRA refuses, factors that do not fit); else whether every
/// merged value is finite (when `base.check`).
pub(crate) fn stream_dora_columns(
    base: StreamedBase<'_>,
    (a, b, magnitude): (F32Tensor<'_>, F32Tensor<'_>, F32Tensor<'_>),
    scale: f32,
    kind: LoraKind,
    opts: &MergeOptions,
) -> Result<Option<bool>> {
    let what = "DoRA weight";
    let columns = matches!(
        kind,
        LoraKind::Embedding
            | LoraKind::Linear {
                fan_in_fan_out: true
            }
    );
    let usable = columns && opts.numerics != Numerics::Exact && !opts.safe_merge;
    if !usable || check_opts(what, base.dtype, opts).is_err() {
        return Ok(None);
    }
    let Ok(size) = super::dtype::element_size(base.dtype) else {
        return Ok(None);
    };
    let fits = |lr: &LowRank<'_>| {
        let cols = lr.row_len();
        cols > 0
            && base.len == numel(what, base.shape).unwrap_or(0) * size
            && base.len.is_multiple_of(cols * size)
    };
    let Ok((lr, _)) = kind.lowrank(base.shape, (&a, &b), scale, None) else {
        return Ok(None);
    };
    if !fits(&lr) || check_magnitude(&magnitude, &[b.shape[0]]).is_err() {
        return Ok(None);
    }
    let unread = || MergeMathError::BaseUnread { what };
    let read = |at: usize, into: &mut [u8]| match base.io.fill(at, into) {
        true => Ok(()),
        false => Err(unread()),
    };
    let norms = merged_column_norms(what, (base.dtype, base.len), &lr, read)?;
    let factor = column_factors(magnitude.data, &norms);
    let cols = lr.row_len();
    let row_bytes = cols * size;
    let block = (STREAM_BLOCK_BYTES / row_bytes).max(1) * row_bytes;
    let finite = stream_blocks(base.io, (base.len, block), unread, |at, bytes| {
        let shape = [bytes.len() / row_bytes, cols];
        let mut band = BaseTensorMut::new(base.dtype, &shape, bytes);
        scale_columns(what, &mut band, &lr, (at / row_bytes, &factor), false)?;
        Ok(!base.check || peftkit_checkpoint::nonfinite(base.dtype, bytes).is_none())
    })?;
    Ok(Some(finite))
}

/// Checks `lora_magnitude_vector` against its `expected` shape: one value per output channel (the
/// product of `expected`, whose other dimensions are 1), in any shape with that many elements; a
/// magnitude with as many dimensions as `expected` must have exactly that shape.
fn check_magnitude(m: &F32Tensor<'_>, expected: &[usize]) -> Result<()> {
    m.validate("lora_magnitude_vector")?;
    let channels: usize = expected.iter().product();
    if m.data.len() != channels {
        return Err(MergeMathError::ShapeMismatch {
            what: "lora_magnitude_vector",
            expected: expected.to_vec(),
            got: m.shape.to_vec(),
        });
    }
    if m.shape.len() == expected.len() {
        check_shape("lora_magnitude_vector", m.shape, expected)?;
    }
    Ok(())
}

/// Where the output channels of a DoRA layer lie in its base weight, i.e. which norm peft takes.
#[derive(Debug, Clone, Copy)]
enum Channels {
    /// One base row per channel (Linear, Conv): [`torch_row_norm`].
    Rows,
    /// One base column per channel (`fan_in_fan_out`, Embedding): [`torch_column_norms`].
    Columns,
}

/// The steps every DoRA merge shares, in peft's order of checks: the options, then `layer` (given
/// the base shape: checks the factors and returns the LoRA product with f32 adapters, the shape
/// of the magnitude vector and where the channels lie), then the magnitude, then the merge.
fn merge_dora<'a>(
    what: &'static str,
    mut base: BaseTensorMut<'_>,
    magnitude: F32Tensor<'_>,
    opts: &MergeOptions,
    layer: impl FnOnce(&[usize]) -> Result<(LowRank<'a>, Vec<usize>, Channels)>,
) -> Result<()> {
    if opts.numerics == Numerics::Exact {
        return Err(refusal(what, "DoRA"));
    }
    check_opts(what, base.dtype, opts)?;
    let (lr, expected, channels) = layer(base.shape)?;
    check_magnitude(&magnitude, &expected)?;
    match channels {
        Channels::Rows => merge_row_channels(what, &mut base, &lr, magnitude.data, opts),
        Channels::Columns => merge_column_channels(what, &mut base, &lr, magnitude.data, opts),
    }
}

/// DoRA merge into a `Linear` weight `(out, in)` — or a transformers `Conv1D` weight
/// `(in, out)` with `fan_in_fan_out` — in place.
///
/// `magnitude` is `lora_magnitude_vector` `(out,)`. Base dtypes F32/BF16/F16. `safe_merge`
/// only adds the finiteness check (peft's DoRA merges compute the same values either way).
pub fn merge_dora_linear(
    base: BaseTensorMut<'_>,
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    magnitude: F32Tensor<'_>,
    scale: f32,
    fan_in_fan_out: bool,
    opts: &MergeOptions,
) -> Result<()> {
    merge_dora("DoRA linear weight", base, magnitude, opts, |shape| {
        let lr = linear_lowrank(shape, &a, &b, scale, fan_in_fan_out, None)?;
        let channels = if fan_in_fan_out {
            Channels::Columns
        } else {
            Channels::Rows
        };
        Ok((lr, vec![b.shape[0]], channels))
    })
}

/// DoRA merge into an `Embedding` weight `(num_embeddings, dim)` in place.
///
/// `magnitude` is `(dim,)`; the norm runs over the vocabulary for each embedding dimension.
/// Unlike a plain LoRA embedding merge, Δ is *not* rounded to the base dtype first.
pub fn merge_dora_embedding(
    base: BaseTensorMut<'_>,
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    magnitude: F32Tensor<'_>,
    scale: f32,
    opts: &MergeOptions,
) -> Result<()> {
    merge_dora("DoRA embedding weight", base, magnitude, opts, |shape| {
        let lr = embedding_lowrank(shape, &a, &b, scale, None)?;
        Ok((lr, vec![b.shape[0]], Channels::Columns))
    })
}

/// DoRA merge into a `Conv1d/2d/3d` weight `(out, in, *kernel)` in place.
///
/// `magnitude` is `(1, out, 1, …)` (any shape with `out` elements is accepted).
pub fn merge_dora_conv(
    base: BaseTensorMut<'_>,
    a: F32Tensor<'_>,
    b: F32Tensor<'_>,
    magnitude: F32Tensor<'_>,
    scale: f32,
    groups: usize,
    opts: &MergeOptions,
) -> Result<()> {
    merge_dora("DoRA conv weight", base, magnitude, opts, |shape| {
        check_rank("base conv weight", shape, 3, 5, "3 to 5")?;
        let lr = conv_lowrank(shape, &a, &b, scale, groups, None)?;
        let mut expected = vec![1, shape[0]];
        expected.resize(shape.len(), 1);
        Ok((lr, expected, Channels::Rows))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DoRA embedding (norms over columns) merged in blocks of rows gives the bits of its
    /// definition on the whole weight: `fl(m / ‖W + Δ‖ · (W + Δ))`, the norms summed in row
    /// order over all rows (three blocks here, the last short).
    #[test]
    fn column_norm_merges_in_blocks_are_the_whole_weight_s() {
        use crate::kernels::{decode_f32, embedding_delta, encode_f32};
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k) % 211) as f32 / 53.0 - 2.0)
                .collect()
        };
        let (vocab, dim, r) = (600, 1024, 4);
        let (a, b) = (vals(r * vocab, 3), vals(dim * r, 5));
        let m: Vec<f32> = vals(dim, 7).iter().map(|v| v + 30.0).collect();
        let (sa, sb, sm, shape) = ([r, vocab], [dim, r], [dim], [vocab, dim]);
        let (a, b, m) = (
            F32Tensor::new(&sa, &a),
            F32Tensor::new(&sb, &b),
            F32Tensor::new(&sm, &m),
        );
        let base = encode_f32("w", Dtype::BF16, &vals(vocab * dim, 11)).unwrap();
        let delta = embedding_delta(&shape, a, b, 0.5, None).unwrap();
        let wt: Vec<f32> = decode_f32("w", Dtype::BF16, &base)
            .unwrap()
            .iter()
            .zip(&delta)
            .map(|(w, d)| w + d)
            .collect();
        let norms = torch_column_norms(&wt, vocab, dim).unwrap();
        let want: Vec<f32> = wt
            .chunks_exact(dim)
            .flat_map(|row| {
                row.iter()
                    .zip(&norms)
                    .zip(m.data)
                    .map(|((x, n), m)| (m / n) * x)
            })
            .collect();
        let want = encode_f32("w", Dtype::BF16, &want).unwrap();
        let mut got = base.clone();
        let into = BaseTensorMut::new(Dtype::BF16, &shape, &mut got);
        merge_dora_embedding(into, a, b, m, 0.5, &MergeOptions::default()).unwrap();
        assert!(got == want && got != base);
    }

    #[test]
    fn norms_of_simple_vectors() {
        assert_eq!(torch_row_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(torch_row_norm(&[]), 0.0);
        assert_eq!(torch_row_norm(&[2.0; 16]), 8.0);
        let c = torch_column_norms(&[3.0, 0.0, 4.0, 2.0], 2, 2).unwrap();
        assert_eq!(c, vec![5.0, 2.0]);
        assert!(torch_column_norms(&[1.0], 2, 2).is_err());
    }
}
