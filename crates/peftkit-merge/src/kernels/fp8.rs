//! FP8 block-scaled weights as transformers 5.24's `integrations/finegrained_fp8.py` reads and
//! writes them on CPU: `float8_e4m3fn` elements, one inverse scale per block
//! (`weight_scale_inv`, in `f32` or as a UE8M0 power of two).
//!
//! * [`dequantize_fp8`] is `Fp8Dequantize._dequantize_one` before its final cast: each element
//!   widened to `f32` and multiplied by its block's scale, one `f32` rounding;
//! * [`quantize_fp8`] is `Fp8Quantize._quantize_one`: per-block max-abs, `448 / max` (as
//!   torch divides a scalar by a tensor: `(1 / max) * 448`), its reciprocal stored, the block multiplied by the scale, clamped to ±448 and cast;
//! * [`f32_to_e4m3`] and [`e4m3_to_f32`] are torch's (c10's) conversions.
//!
//! Every step is an elementwise IEEE operation in the order torch performs it, so the results
//! are the same bits on every host. Written by hand: no crate reproduces torch 2.15's cast
//! (round to nearest even, saturating to ±448, NaN kept) together with transformers' block
//! rules.
//!
//! ```
//! use peftkit_merge::{dequantize_fp8, quantize_fp8, Fp8Grid, ScaleKind};
//!
//! let grid = Fp8Grid::new(&[2, 4], &[1, 2]).unwrap(); // blocks of 2 x 2
//! let w = [1.0f32, -2.0, 0.5, 0.25, 3.0, 4.0, 0.0, 0.125];
//! let q = quantize_fp8(&w, &grid, ScaleKind::F32)?;
//! assert_eq!(q.inv_scales, vec![1.0 / 112.0, 1.0 / 896.0]);
//! assert_eq!(q.weight[5], 0x7e); // 4.0 scales to 448, e4m3's largest finite value
//! let back = dequantize_fp8(&q.weight, &q.inv_scales, &grid)?;
//! // Within half an e4m3 step: 3.0 scales to 336, a tie between 320 and 352 (even: 320).
//! assert!(back.iter().zip(&w).all(|(b, w)| (b - w).abs() <= 16.0 / 112.0));
//! assert_eq!(q.max_abs_error, f64::from(3.0 - 320.0 * (1.0f32 / 112.0)));
//! # Ok::<(), peftkit_merge::MergeMathError>(())
//! ```

use std::cell::Cell;

use rayon::prelude::*;
use safetensors::Dtype;

use super::apply::with_kept;
use super::dtype::{decode_f32_into, element_size, encode_f32_into};
use super::fp8_rows as rows;
use crate::kernels::error::{MergeMathError, Result};

/// torch's `finfo(float8_e4m3fn).max`.
pub const E4M3_MAX: f32 = 448.0;

/// How a checkpoint stores `weight_scale_inv`: any float (widened to `f32`), or UE8M0 powers of
/// two (`scale_fmt: "ue8m0"`), as `F8_E8M0` or as raw exponent bytes (`U8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleKind {
    /// Float scales (`scale_fmt: "float"`), written back as `F32`.
    F32,
    /// Power-of-two scales (`scale_fmt: "ue8m0"`): quantization rounds the inverse scale up to
    /// a power of two first.
    Ue8m0,
}

/// torch's `float8_e4m3fn` → `f32` (exact; `0x7f`/`0xff` are NaN).
///
/// Branch-free, so that the loops over whole rows vectorise: the subnormal and NaN cases are
/// selects. Equal to the table of every code that c10 converts (a unit test holds all 256
/// codes to the scalar definition).
#[inline(always)]
pub fn e4m3_to_f32(b: u8) -> f32 {
    let b = u32::from(b);
    let sign = (b & 0x80) << 24;
    let mag = b & 0x7f;
    // Normal: the exponent rebiased from 7 to 127, the mantissa moved to f32's top bits.
    let normal = f32::from_bits((mag << 20) + (120 << 23));
    // Subnormal (exponent 0): mantissa · 2^-9, exact.
    let subnormal = (mag as f32) * (1.0 / 512.0);
    let value = if mag < 8 { subnormal } else { normal };
    let value = if mag == 0x7f { f32::NAN } else { value };
    f32::from_bits(value.to_bits() | sign)
}

/// torch 2.15's `f32` → `float8_e4m3fn` cast on CPU: round to nearest even; finite values
/// and infinities beyond the range saturate to ±448; NaN becomes `0x7f` with its sign.
/// (Measured on every bf16 value and on random `f32`s: `tests/fixtures/quant/conversions`.)
///
/// Every case is computed and the result selected, so that the loops over whole rows
/// vectorise (a unit test holds it to the branchy scalar form on edge values).
#[inline(always)]
pub fn f32_to_e4m3(x: f32) -> u8 {
    const ROUNDS_PAST_MAX: u32 = 1087 << 20; // 480.0 (464 and up round past 448)
    const DENORM_MASK: u32 = 141 << 23;
    let bits = x.to_bits();
    let sign = (bits & 0x8000_0000) >> 24;
    let mag = bits & 0x7fff_ffff;
    // Below e4m3's smallest normal: adding 2^-? shifts the mantissa so the FPU rounds it.
    let sum = f32::from_bits(mag) + f32::from_bits(DENORM_MASK);
    let subnormal = sum.to_bits().wrapping_sub(DENORM_MASK);
    let odd = (mag >> 20) & 1;
    let rounded = mag
        .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7ffff))
        .wrapping_add(odd);
    // 464..480 rounds up to the NaN code: saturated like the values above.
    let normal = ((rounded >> 20) & 0xff).min(0x7e);
    let result = if mag < (121 << 23) { subnormal } else { normal };
    let result = if mag >= ROUNDS_PAST_MAX { 0x7e } else { result };
    let result = if mag > 0x7f80_0000 { 0x7f } else { result };
    ((result & 0xff) | sign) as u8
}

/// A UE8M0 scale byte as `f32`: `2^(b - 127)`; 255 is NaN (`F8_E8M0`).
pub fn e8m0_to_f32(b: u8) -> f32 {
    if b == 0xff {
        return f32::NAN;
    }
    (2.0f64).powi(i32::from(b) - 127) as f32
}

/// The block geometry of one FP8 tensor: `lead` matrices of `rows x cols` (leading dimensions
/// such as experts flattened), cut into a `grid_rows x grid_cols` grid of equal blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Grid {
    /// Product of the leading dimensions (1 for a 2-D weight).
    pub lead: usize,
    /// Rows of each matrix.
    pub rows: usize,
    /// Columns of each matrix.
    pub cols: usize,
    /// Blocks along the rows.
    pub grid_rows: usize,
    /// Blocks along the columns.
    pub grid_cols: usize,
}

impl Fp8Grid {
    /// The grid of a weight of shape `weight` whose scales have shape `scales`, derived from the
    /// scales' last two dimensions as `Fp8Dequantize` does (a scale of fewer than two
    /// dimensions is one per matrix). Refused, as transformers refuses it, when the grid does
    /// not divide the weight (partial edge blocks).
    pub fn new(weight: &[usize], scales: &[usize]) -> Result<Self> {
        let [lead @ .., rows, cols] = weight else {
            return Err(MergeMathError::Rank {
                what: "fp8 weight",
                expected: "at least 2",
                got: weight.to_vec(),
            });
        };
        let (grid_rows, grid_cols) = match scales {
            [.., r, c] => (*r, *c),
            _ => (1, 1),
        };
        let lead: usize = lead.iter().product();
        let scale_count: usize = scales.iter().product();
        let fits = grid_rows > 0 && grid_cols > 0 && rows % grid_rows == 0 && cols % grid_cols == 0;
        if !fits || scale_count != lead * grid_rows * grid_cols {
            return Err(MergeMathError::ShapeMismatch {
                what: "weight_scale_inv (a grid of whole blocks of the weight)",
                expected: weight.to_vec(),
                got: scales.to_vec(),
            });
        }
        Ok(Fp8Grid {
            lead,
            rows: *rows,
            cols: *cols,
            grid_rows,
            grid_cols,
        })
    }

    /// The grid `Fp8Quantize` cuts a `weight`-shaped tensor into with `block` (`None`: one
    /// block per matrix), or `None` where it leaves the tensor unquantized (fewer than two
    /// dimensions, or a block that does not divide it).
    pub fn for_block(weight: &[usize], block: Option<(usize, usize)>) -> Option<Self> {
        let [lead @ .., rows, cols] = weight else {
            return None;
        };
        let (bm, bn) = block.unwrap_or((*rows, *cols));
        if bm == 0 || bn == 0 || rows % bm != 0 || cols % bn != 0 {
            return None;
        }
        Some(Fp8Grid {
            lead: lead.iter().product(),
            rows: *rows,
            cols: *cols,
            grid_rows: rows / bm,
            grid_cols: cols / bn,
        })
    }

    /// Elements of the weight.
    pub fn numel(&self) -> usize {
        self.lead * self.rows * self.cols
    }

    /// Number of scales.
    pub fn scales(&self) -> usize {
        self.lead * self.grid_rows * self.grid_cols
    }

    /// The block size `(rows, cols)`.
    pub fn block(&self) -> (usize, usize) {
        (self.rows / self.grid_rows, self.cols / self.grid_cols)
    }

    /// The grid of block rows `blocks` of a 2-D weight's grid: the rows of those blocks, as a
    /// weight of their own.
    pub(crate) fn block_rows(&self, blocks: std::ops::Range<usize>) -> Fp8Grid {
        Fp8Grid {
            lead: 1,
            rows: blocks.len() * self.block().0,
            cols: self.cols,
            grid_rows: blocks.len(),
            grid_cols: self.grid_cols,
        }
    }

    /// Elements of one band of blocks (`block rows x cols`), the unit the kernels run on in
    /// parallel.
    fn band(&self) -> usize {
        self.block().0 * self.cols
    }

    /// Checks that `what` holds `len` elements where `expected` are needed.
    fn check(&self, what: &'static str, expected: usize, len: usize) -> Result<()> {
        if len == expected {
            return Ok(());
        }
        Err(MergeMathError::ElementCount {
            what,
            shape: vec![self.lead, self.rows, self.cols],
            expected,
            got: len,
        })
    }
}

/// `e4m3(weight) * scale` per element, in `f32` (the caller casts to the model dtype, as
/// `Fp8Dequantize` does). Refused if `weight` or `scales` do not fit `grid`.
pub fn dequantize_fp8(weight: &[u8], scales: &[f32], grid: &Fp8Grid) -> Result<Vec<f32>> {
    grid.check("fp8 weight", grid.numel(), weight.len())?;
    grid.check("weight_scale_inv", grid.scales(), scales.len())?;
    let mut out = vec![0.0f32; weight.len()];
    if out.is_empty() {
        return Ok(out);
    }
    let (cols, (_, bn)) = (grid.cols, grid.block());
    let bands = out
        .par_chunks_mut(grid.band())
        .zip(weight.par_chunks(grid.band()));
    bands
        .zip(scales.par_chunks(grid.grid_cols))
        .for_each(|((out, weight), scales)| {
            for (o_row, w_row) in out.chunks_mut(cols).zip(weight.chunks(cols)) {
                rows::dequantize_row(w_row, scales, bn, o_row);
            }
        });
    Ok(out)
}

/// [`dequantize_fp8`] cast to `dtype` (`Fp8Dequantize`'s final cast, with torch's rounding)
/// into `out`, little-endian, one row at a time: no `f32` copy of the tensor is made. Refused
/// if the slices do not fit `grid` or `dtype` is not a float dtype.
///
/// ```
/// use peftkit_merge::{dequantize_fp8, dequantize_fp8_into, encode_f32, Fp8Grid};
/// use safetensors::Dtype;
///
/// let grid = Fp8Grid::new(&[2, 4], &[1, 2]).unwrap();
/// let (q, scales) = ([0x38u8, 0x40, 0xb8, 0x7e, 0, 1, 0x7f, 0x80], [0.5f32, 3.0]);
/// let mut bf16 = vec![0u8; 16];
/// dequantize_fp8_into(&q, &scales, &grid, Dtype::BF16, &mut bf16)?;
/// let f32s = dequantize_fp8(&q, &scales, &grid)?;
/// assert_eq!(bf16, encode_f32("w", Dtype::BF16, &f32s)?);
/// # Ok::<(), peftkit_merge::MergeMathError>(())
/// ```
pub fn dequantize_fp8_into(
    weight: &[u8],
    scales: &[f32],
    grid: &Fp8Grid,
    dtype: Dtype,
    out: &mut [u8],
) -> Result<()> {
    let size = element_size(dtype)?;
    grid.check("fp8 weight", grid.numel(), weight.len())?;
    grid.check("weight_scale_inv", grid.scales(), scales.len())?;
    grid.check("dequantized weight bytes", grid.numel() * size, out.len())?;
    if weight.is_empty() {
        return Ok(());
    }
    let (cols, (_, bn)) = (grid.cols, grid.block());
    let bands = out
        .par_chunks_mut(grid.band() * size)
        .zip(weight.par_chunks(grid.band()));
    bands
        .zip(scales.par_chunks(grid.grid_cols))
        .try_for_each(|((out, weight), scales)| {
            let rows = out.chunks_mut(cols * size).zip(weight.chunks(cols));
            if dtype == Dtype::BF16 {
                // Straight into BF16, the common model dtype: no `f32` row in between.
                rows.for_each(|(o, w)| rows::dequantize_row_bf16(w, scales, bn, o));
                return Ok(());
            }
            let mut row = vec![0.0f32; cols];
            for (o_row, w_row) in rows {
                rows::dequantize_row(w_row, scales, bn, &mut row);
                encode_f32_into("dequantized fp8 weight", dtype, &row, o_row)?;
            }
            Ok(())
        })
}

/// A tensor quantized by [`quantize_fp8`].
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Quantized {
    /// The `float8_e4m3fn` bytes.
    pub weight: Vec<u8>,
    /// `weight_scale_inv`, one per block (powers of two for [`ScaleKind::Ue8m0`]).
    pub inv_scales: Vec<f32>,
    /// `max |e4m3(q) * inv_scale - w|` over the tensor (the product rounded to `f32`, as
    /// `Fp8Dequantize` computes it; the difference rounded to `f32`, then widened; NaN if an
    /// element is).
    pub max_abs_error: f64,
}

/// `Fp8Quantize._quantize_one` of `values` (already widened to `f32`) cut by `grid`. Refused if
/// `values` do not fit `grid`.
pub fn quantize_fp8(values: &[f32], grid: &Fp8Grid, kind: ScaleKind) -> Result<Fp8Quantized> {
    grid.check("values", grid.numel(), values.len())?;
    let mut weight = vec![0u8; values.len()];
    let mut inv_scales = vec![0.0f32; grid.scales()];
    let max_abs_error = quantize(
        Values::F32(values),
        grid,
        kind,
        &mut weight,
        &mut inv_scales,
    )?;
    Ok(Fp8Quantized {
        weight,
        inv_scales,
        max_abs_error,
    })
}

/// [`quantize_fp8`] of `values`, little-endian `dtype` (widened a row at a time: no `f32`
/// copy of the tensor is made), into `out` (the `float8_e4m3fn` bytes) and `inv_scales`;
/// returns [`Fp8Quantized::max_abs_error`]. Refused if the slices do not fit `grid` or `dtype`
/// is not a float dtype.
///
/// ```
/// use peftkit_merge::{encode_f32, quantize_fp8, quantize_fp8_into, Fp8Grid, ScaleKind};
/// use safetensors::Dtype;
///
/// let grid = Fp8Grid::new(&[2, 4], &[1, 2]).unwrap();
/// let w = [1.0f32, -2.0, 0.5, 0.25, 3.0, 4.0, 0.0, 0.125];
/// let (mut q, mut inv) = (vec![0u8; 8], vec![0f32; 2]);
/// let bf16 = encode_f32("w", Dtype::BF16, &w)?;
/// let err = quantize_fp8_into(&bf16, Dtype::BF16, &grid, ScaleKind::F32, &mut q, &mut inv)?;
/// let want = quantize_fp8(&w, &grid, ScaleKind::F32)?;
/// assert_eq!((q, inv, err), (want.weight, want.inv_scales, want.max_abs_error));
/// # Ok::<(), peftkit_merge::MergeMathError>(())
/// ```
pub fn quantize_fp8_into(
    values: &[u8],
    dtype: Dtype,
    grid: &Fp8Grid,
    kind: ScaleKind,
    out: &mut [u8],
    inv_scales: &mut [f32],
) -> Result<f64> {
    let size = element_size(dtype)?;
    grid.check("values bytes", grid.numel() * size, values.len())?;
    quantize(Values::Encoded(dtype, values), grid, kind, out, inv_scales)
}

/// Merges an FP8 weight band by band and re-quantizes it, in place: each band of blocks of
/// `weight` (e4m3, inverse scales `scales`) is dequantized into a buffer in `dtype` as
/// [`dequantize_fp8_into`] does, `merge(rows, band)` edits it there, and it is quantized back
/// over its own bytes as [`quantize_fp8_into`] does, its new inverse scales into
/// `inv_scales`. Returns [`Fp8Quantized::max_abs_error`]. The same bits as the three calls on
/// the whole tensor when `merge` treats rows independently, with one band per worker in memory
/// (and in cache) instead of the whole weight in `dtype`. Refused if the slices do not fit
/// `grid`, the grid has leading dimensions, or `dtype` is not a float dtype.
///
/// ```
/// use peftkit_merge::{
///     dequantize_fp8_into, quantize_fp8_into, requantize_fp8_bands, Fp8Grid, MergeMathError,
///     ScaleKind,
/// };
/// use safetensors::Dtype;
///
/// let grid = Fp8Grid::new(&[4, 4], &[2, 2]).unwrap();
/// let (w, scales) = ([0x38u8, 0x40, 0xb8, 0x7e, 0, 1, 0x30, 0x80, 9, 0x44, 0x50, 0x51, 0xc0, 2, 3, 4], [0.5f32, 3.0, 1.0, 0.25]);
/// // Every element doubled (in bf16, exactly): a merge that treats rows independently.
/// let double = |band: &mut [u8]| {
///     for c in band.chunks_exact_mut(2) {
///         let x = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16) * 2.0;
///         c.copy_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes());
///     }
/// };
/// let (mut banded, mut inv) = (w, [0f32; 4]);
/// let err = requantize_fp8_bands(&mut banded, &scales, &grid, Dtype::BF16, ScaleKind::F32, &mut inv, |_rows, band| {
///     double(band);
///     Ok::<(), MergeMathError>(())
/// })?;
/// let mut whole = vec![0u8; 32];
/// dequantize_fp8_into(&w, &scales, &grid, Dtype::BF16, &mut whole)?;
/// double(&mut whole);
/// let (mut q, mut want_inv) = ([0u8; 16], [0f32; 4]);
/// let want = quantize_fp8_into(&whole, Dtype::BF16, &grid, ScaleKind::F32, &mut q, &mut want_inv)?;
/// assert_eq!((banded, inv, err.to_bits()), (q, want_inv, want.to_bits()));
/// # Ok::<(), MergeMathError>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn requantize_fp8_bands<E, F>(
    weight: &mut [u8],
    scales: &[f32],
    grid: &Fp8Grid,
    dtype: Dtype,
    kind: ScaleKind,
    inv_scales: &mut [f32],
    merge: F,
) -> std::result::Result<f64, E>
where
    E: From<MergeMathError> + Send,
    F: Fn(std::ops::Range<usize>, &mut [u8]) -> std::result::Result<(), E> + Sync,
{
    element_size(dtype)?;
    grid.check("fp8 weight", grid.numel(), weight.len())?;
    grid.check("weight_scale_inv", grid.scales(), scales.len())?;
    grid.check("new weight_scale_inv", grid.scales(), inv_scales.len())?;
    if grid.lead != 1 {
        return Err(MergeMathError::Rank {
            what: "fp8 weight merged by bands",
            expected: "2",
            got: vec![grid.lead, grid.rows, grid.cols],
        }
        .into());
    }
    if weight.is_empty() {
        return Ok(0.0);
    }
    let (band, bm) = (grid.band(), grid.block().0);
    let bands = weight.par_chunks_mut(band).enumerate();
    let bands = bands.zip(scales.par_chunks(grid.grid_cols));
    bands
        .zip(inv_scales.par_chunks_mut(grid.grid_cols))
        .map(|(((i, q), scales), inv)| {
            let chunk = Fp8Chunk {
                q,
                scales,
                inv,
                grid: grid.block_rows(i..i + 1),
                first_row: i * bm,
            };
            requantize_fp8_chunk(chunk, (dtype, kind), &merge)
        })
        .try_reduce(|| 0.0, |a, b| Ok(nan_max(a, b)))
}

/// Whole block rows of a 2-D FP8 weight, re-quantized in place by [`requantize_fp8_chunk`].
pub(crate) struct Fp8Chunk<'a> {
    /// The rows' e4m3 bytes.
    pub q: &'a mut [u8],
    /// Their blocks' inverse scales.
    pub scales: &'a [f32],
    /// Their blocks' new inverse scales.
    pub inv: &'a mut [f32],
    /// Their grid ([`Fp8Grid::block_rows`]).
    pub grid: Fp8Grid,
    /// The index of their first row in the weight.
    pub first_row: usize,
}

thread_local! {
    /// This thread's band in the model dtype ([`with_band`]).
    static BAND: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's band buffer (see [`with_kept`]).
pub(crate) fn with_band<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    with_kept(&BAND, f)
}

/// One step of [`requantize_fp8_bands`] (and of the FP8 merge streamed from file to file):
/// `chunk` dequantized into this thread's band buffer in `dtype`, `merge(rows, bytes)` run
/// there, and quantized back over `chunk.q` as `kind` says, its new inverse scales into
/// `chunk.inv`. Returns the chunk's [`Fp8Quantized::max_abs_error`].
pub(crate) fn requantize_fp8_chunk<E, F>(
    chunk: Fp8Chunk<'_>,
    (dtype, kind): (Dtype, ScaleKind),
    merge: &F,
) -> std::result::Result<f64, E>
where
    E: From<MergeMathError>,
    F: Fn(std::ops::Range<usize>, &mut [u8]) -> std::result::Result<(), E>,
{
    let grid = chunk.grid;
    let len = grid.numel() * element_size(dtype)?;
    with_band(|buf| {
        if buf.len() < len {
            buf.resize(len, 0);
        }
        requantize_band(chunk, (dtype, kind), &mut buf[..len], merge)
    })
}

/// [`requantize_fp8_chunk`] with its band buffer `band`.
fn requantize_band<E, F>(
    chunk: Fp8Chunk<'_>,
    (dtype, kind): (Dtype, ScaleKind),
    band: &mut [u8],
    merge: &F,
) -> std::result::Result<f64, E>
where
    E: From<MergeMathError>,
    F: Fn(std::ops::Range<usize>, &mut [u8]) -> std::result::Result<(), E>,
{
    let grid = chunk.grid;
    dequantize_fp8_into(chunk.q, chunk.scales, &grid, dtype, band)?;
    merge(chunk.first_row..chunk.first_row + grid.rows, band)?;
    let values = Values::Encoded(dtype, band);
    Ok(quantize(values, &grid, kind, chunk.q, chunk.inv)?)
}

/// The values a quantization reads: `f32`s, or little-endian bytes of a float dtype.
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    Encoded(Dtype, &'a [u8]),
}

impl<'a> Values<'a> {
    /// Elements `range` (bytes of those elements, when encoded).
    fn slice(self, range: std::ops::Range<usize>) -> Result<Values<'a>> {
        Ok(match self {
            Values::F32(v) => Values::F32(&v[range]),
            Values::Encoded(dtype, b) => {
                let size = element_size(dtype)?;
                Values::Encoded(dtype, &b[range.start * size..range.end * size])
            }
        })
    }

    /// Row `r` of `cols` elements: borrowed (`f32`s, or BF16 bytes where the row kernels read
    /// them as they are), or widened to `f32` into `scratch`.
    fn row<'s>(&'s self, r: usize, scratch: &'s mut [f32]) -> Result<rows::Row<'s>> {
        let cols = scratch.len();
        match *self {
            Values::F32(v) => Ok(rows::Row::F32(&v[r * cols..(r + 1) * cols])),
            Values::Encoded(Dtype::BF16, b) if rows::reads_bf16() => {
                Ok(rows::Row::Bf16(&b[r * cols * 2..(r + 1) * cols * 2]))
            }
            Values::Encoded(dtype, b) => {
                let size = element_size(dtype)?;
                let bytes = &b[r * cols * size..(r + 1) * cols * size];
                decode_f32_into("values", dtype, bytes, scratch)?;
                Ok(rows::Row::F32(scratch))
            }
        }
    }
}

/// [`quantize_fp8`] and [`quantize_fp8_into`]: bands of blocks in parallel.
fn quantize(
    values: Values<'_>,
    grid: &Fp8Grid,
    kind: ScaleKind,
    out: &mut [u8],
    inv_scales: &mut [f32],
) -> Result<f64> {
    grid.check("fp8 weight", grid.numel(), out.len())?;
    grid.check("weight_scale_inv", grid.scales(), inv_scales.len())?;
    if out.is_empty() {
        return Ok(0.0);
    }
    let (band, (cols, (_, bn))) = (grid.band(), (grid.cols, grid.block()));
    let bands = out.par_chunks_mut(band).enumerate();
    bands
        .zip(inv_scales.par_chunks_mut(grid.grid_cols))
        .map(|((i, q), inv)| {
            let v = values.slice(i * band..(i + 1) * band)?;
            quantize_band(v, q, inv, (cols, bn), kind)
        })
        .try_reduce(|| 0.0, |a, b| Ok(nan_max(a, b)))
}

/// One band of blocks: per-block max-abs, scales, then the cast; returns the band's error.
/// Each row is read twice (widened again for the cast), so that only one row is ever widened.
fn quantize_band(
    values: Values<'_>,
    out: &mut [u8],
    inv: &mut [f32],
    (cols, bn): (usize, usize),
    kind: ScaleKind,
) -> Result<f64> {
    let mut row = vec![0.0f32; cols];
    let mut max_abs = rows::BlockMax::new(inv.len());
    for r in 0..out.len() / cols {
        rows::max_abs_row(values.row(r, &mut row)?, bn, &mut max_abs);
    }
    let scales: Vec<f32> = max_abs
        .values()
        .zip(inv.iter_mut())
        .map(|(m, inv)| {
            let (scale, inverse) = block_scales(m, kind);
            *inv = inverse;
            scale
        })
        .collect();
    let mut err = rows::MaxError::default();
    for (r, q_row) in out.chunks_mut(cols).enumerate() {
        let v = values.row(r, &mut row)?;
        rows::quantize_row(v, &scales, inv, bn, q_row, &mut err);
    }
    Ok(err.value())
}

/// The larger of two errors, NaN if either is.
pub(crate) fn nan_max(a: f64, b: f64) -> f64 {
    match a.is_nan() || b.is_nan() {
        true => f64::NAN,
        false => a.max(b),
    }
}

/// The forward scale and the stored inverse of a block whose max-abs is `max_abs`, in
/// `Fp8Quantize`'s operations: `448 / max` (1 for an all-zero or NaN block), then `1 / that`;
/// UE8M0 rounds the inverse up to a power of two and takes the forward scale from it.
///
/// torch computes `scalar / tensor` as `tensor.reciprocal() * scalar`: two roundings, so
/// `448 / max` is `(1 / max) * 448` here too.
fn block_scales(max_abs: f32, kind: ScaleKind) -> (f32, f32) {
    let positive = max_abs > 0.0;
    let safe = if positive { max_abs } else { 1.0 };
    let scale = if positive {
        (1.0 / safe) * E4M3_MAX
    } else {
        1.0
    };
    let inv = 1.0 / scale;
    match kind {
        ScaleKind::F32 => (scale, inv),
        ScaleKind::Ue8m0 => {
            let inv = ue8m0_round_up(inv);
            (1.0 / inv, inv)
        }
    }
}

/// The power of two `Fp8Quantize` stores for inverse scale `inv` under `scale_fmt: "ue8m0"`:
/// `2 ** ceil(log2(inv.clamp(min=tiny)))`, with `log2` rounded to `f32` first as torch computes
/// it (a value a few ulps above a power of two has a `log2` that rounds to the integer, so it is
/// not rounded up). NaN stays NaN; infinity stays infinity.
///
/// ```
/// use peftkit_merge::ue8m0_round_up;
/// assert_eq!(ue8m0_round_up(0.3), 0.5);
/// assert_eq!(ue8m0_round_up(0.25), 0.25);
/// assert_eq!(ue8m0_round_up(0.0), f32::MIN_POSITIVE);
/// ```
pub fn ue8m0_round_up(inv: f32) -> f32 {
    let x = if inv.is_nan() {
        inv
    } else {
        inv.max(f32::MIN_POSITIVE)
    };
    if !x.is_finite() {
        return x;
    }
    let exp = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
    let mant = f64::from(f32::from_bits((x.to_bits() & 0x007f_ffff) | (127 << 23)));
    let log2 = (f64::from(exp) + mant.log2()) as f32;
    (2.0f64).powi(log2.ceil() as i32) as f32
}

#[cfg(test)]
#[path = "fp8_tests.rs"]
mod vector_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_finite_code() {
        for b in 0..=255u8 {
            let x = e4m3_to_f32(b);
            if x.is_nan() {
                assert!(b & 0x7f == 0x7f);
                continue;
            }
            // -0.0 keeps its sign bit.
            assert_eq!(f32_to_e4m3(x), b, "code {b:#04x} = {x}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn e4m3_rounds_ties_to_even_and_saturates() {
        // Steps of 32 below 448: 432 ties to 448 (even mantissa), 400 to 384.
        assert_eq!(e4m3_to_f32(f32_to_e4m3(432.0)), 448.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(400.0)), 384.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(440.0)), 448.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(463.9)), 448.0);
        assert_eq!(f32_to_e4m3(470.0), 0x7e);
        assert_eq!(f32_to_e4m3(-f32::INFINITY), 0xfe);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0xff);
        // Half the smallest subnormal ties to zero; a bit more rounds up.
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0);
        assert_eq!(f32_to_e4m3(2f32.powi(-10) * 1.01), 1);
    }

    #[test]
    fn ue8m0_scales_round_the_inverse_up_to_a_power_of_two() {
        let (scale, inv) = block_scales(448.0 * 3.0, ScaleKind::Ue8m0);
        assert_eq!((scale, inv), (0.25, 4.0));
        let (scale, inv) = block_scales(448.0 * 4.0, ScaleKind::Ue8m0);
        assert_eq!((scale, inv), (0.25, 4.0));
        assert_eq!(block_scales(0.0, ScaleKind::F32), (1.0, 1.0));
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn grids_must_divide_the_weight() {
        assert!(Fp8Grid::new(&[576, 256], &[5, 2]).is_err());
        assert!(Fp8Grid::new(&[512, 256], &[4, 3]).is_err());
        let g = Fp8Grid::new(&[4, 512, 256], &[4, 4, 2]).unwrap();
        assert_eq!((g.lead, g.block()), (4, (128, 128)));
        assert_eq!(Fp8Grid::new(&[8, 8], &[]).unwrap().block(), (8, 8));
        assert_eq!(Fp8Grid::for_block(&[576, 256], Some((128, 128))), None);
        assert_eq!(Fp8Grid::for_block(&[8], None), None);
    }

    #[test]
    fn blocks_are_scaled_independently() {
        let grid = Fp8Grid::new(&[2, 2, 2], &[2, 1, 1]).unwrap();
        let w = [1.0, 2.0, 0.5, 4.0, 100.0, 0.0, -50.0, 1e-3];
        let q = quantize_fp8(&w, &grid, ScaleKind::F32).unwrap();
        assert_eq!(
            q.inv_scales,
            vec![1.0 / (448.0 / 4.0), 1.0 / ((1.0 / 100.0) * 448.0)]
        );
        let back = dequantize_fp8(&q.weight, &q.inv_scales, &grid).unwrap();
        assert_eq!(back[..4], [1.0, 2.0, 0.5, 4.0]);
        assert!(q.max_abs_error > 0.0 && q.max_abs_error < 0.5);
        assert!(dequantize_fp8(&q.weight[1..], &q.inv_scales, &grid).is_err());
        assert!(quantize_fp8(&w[1..], &grid, ScaleKind::F32).is_err());
    }

    #[test]
    fn a_nan_spreads_to_its_block_only() {
        let grid = Fp8Grid::new(&[1, 4], &[1, 2]).unwrap();
        let q = quantize_fp8(&[f32::NAN, 1.0, 2.0, 4.0], &grid, ScaleKind::F32).unwrap();
        assert_eq!(q.inv_scales[0], 1.0);
        assert_eq!(q.weight[0] & 0x7f, 0x7f);
        assert_eq!(q.inv_scales[1], 1.0 / ((1.0 / 4.0) * 448.0));
        assert!(q.max_abs_error.is_nan());
    }
}
