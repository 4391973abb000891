//! bitsandbytes 0.50.2's 8-bit (LLM.int8) row-wise quantization on the CPU, bit for bit:
//! what `Int8Params` stores (`weight` int8 and `SCB`, one `f32` absmax per row) and
//! `int8_vectorwise_dequant`. Both are bitsandbytes' pure-torch default kernels (its CPU
//! backend overrides neither), so they are reproduced op by op, in torch's CPU arithmetic:
//!
//! * **quantize** (`Int8Params._quantize` with `int8_vectorwise_quant(B, threshold=0)`): the
//!   weight is cast to `float16` (round to nearest even; beyond ±65504 it becomes ±inf);
//!   `SCB = max |B|` per row (NaN propagates), widened to `f32`; the row scale `127.0 / SCB` is
//!   computed as torch computes `scalar / tensor`, `fl(1 / SCB) · 127`; each element
//!   `round(fl(B · scale))` (half to even), cast to int8. An all-zero row gives `0 · inf = NaN`,
//!   a row holding ±inf or NaN gives NaN or `inf · 0 = NaN` everywhere; torch's CPU cast turns
//!   NaN into 0 (as Rust's saturating `as` does), so such rows are stored as zeros;
//! * **dequantize** (`A * SCB.view(-1, 1) * 7.874015718698502e-3`): per element
//!   `fl(fl(q · SCB[row]) · c)`, `c` the Python float rounded to `f32`.
//!
//! Checked against the real library in `tests/fixtures/bnb8/kernels.safetensors`.

use half::{f16, slice::HalfFloatSliceExt};

use super::error::{check_len, MergeMathError};
#[cfg(target_arch = "x86_64")]
use super::isa::{isa, Isa};

type Result<T> = std::result::Result<T, MergeMathError>;

/// The factor `int8_vectorwise_dequant` multiplies by (`1 / 127` as bitsandbytes spells it),
/// rounded to `f32` as torch rounds a Python float multiplying an `f32` tensor.
const DEQUANT_SCALE: f32 = 7.874015718698502e-3_f64 as f32;

/// The rows of a weight of `shape` (every dimension but the last; a 0-D or 1-D weight is one
/// row) and its columns.
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    let numel: usize = shape.iter().product();
    (numel.checked_div(cols).unwrap_or(0), cols)
}

/// `int8_vectorwise_dequant(weight, SCB)`: the `f32` values of an int8 weight of `shape`
/// (row-major) with one scale per row.
///
/// ```
/// use peftkit_merge::{bnb_int8_dequantize, bnb_int8_quantize};
///
/// let w = [1.0, -0.5, 0.25, 0.0, 3.0, 6.0];
/// let q = bnb_int8_quantize(&w, &[2, 3])?;
/// assert_eq!((q.weight.as_slice(), q.scb.as_slice()), (&[127i8, -64, 32, 0, 64, 127][..], &[1.0f32, 6.0][..]));
/// let back = bnb_int8_dequantize(&q.weight, &q.scb, &[2, 3])?;
/// assert_eq!(back[0], 1.0);
/// # Ok::<(), peftkit_merge::MergeMathError>(())
/// ```
pub fn bnb_int8_dequantize(weight: &[i8], scb: &[f32], shape: &[usize]) -> Result<Vec<f32>> {
    let mut out = vec![0.0; weight.len()];
    dequantize_into(weight, |q| q, scb, shape, &mut out)?;
    Ok(out)
}

/// [`bnb_int8_dequantize`] of the codes' stored bytes into `out`, which holds exactly as many
/// values (memory a caller reuses from weight to weight, or the bytes of the tensor it
/// returns).
pub(crate) fn bnb_int8_dequantize_bytes_into(
    weight: &[u8],
    scb: &[f32],
    shape: &[usize],
    out: &mut [f32],
) -> Result<()> {
    dequantize_into(weight, |b| b as i8, scb, shape, out)
}

/// [`bnb_int8_dequantize`] of codes `weight`, each read as `code` says, into `out`.
fn dequantize_into<T: Copy>(
    weight: &[T],
    code: impl Fn(T) -> i8,
    scb: &[f32],
    shape: &[usize],
    out: &mut [f32],
) -> Result<()> {
    check_len("int8 weight", shape, weight.len())?;
    check_len("dequantized int8 weight", shape, out.len())?;
    let (rows, cols) = rows_cols(shape);
    check_len("SCB", &[rows], scb.len())?;
    let rows = weight.chunks(cols.max(1)).zip(out.chunks_mut(cols.max(1)));
    for ((row, out), s) in rows.zip(scb) {
        for (o, &q) in out.iter_mut().zip(row) {
            *o = f32::from(code(q)) * s * DEQUANT_SCALE;
        }
    }
    Ok(())
}

/// What `Int8Params` stores for a weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Quantized {
    /// The int8 codes, row-major in the weight's shape.
    pub weight: Vec<i8>,
    /// One absmax per row (`SCB`), a `float16` value widened to `f32`.
    pub scb: Vec<f32>,
}

/// `Int8Params(values).to("cpu")`: `values` (a weight of `shape`, widened to `f32`)
/// quantized row by row to int8 through `float16`, as described in the module documentation.
pub fn bnb_int8_quantize(values: &[f32], shape: &[usize]) -> Result<Int8Quantized> {
    quantize_rows(values, shape, None)
}

/// [`bnb_int8_quantize`] and `max |dequantize(q) - values|` (the error a merge reports, see
/// [`MaxError`]), each row's error taken while the row is in cache.
pub(crate) fn bnb_int8_quantize_with_error(
    values: &[f32],
    shape: &[usize],
) -> Result<(Int8Quantized, f64)> {
    let mut error = MaxError::default();
    let q = quantize_rows(values, shape, Some(&mut error))?;
    Ok((q, error.value()))
}

/// [`bnb_int8_quantize_with_error`] of whole rows `values` (`cols` each) into `codes` and
/// `scb`, which hold exactly their codes and rows (a band of a merged weight, written into the
/// output's bytes); returns the error. Rows are independent: a band gives the bytes the whole
/// weight gives there.
pub(crate) fn bnb_int8_quantize_rows_into(
    values: &[f32],
    cols: usize,
    (codes, scb): (&mut [i8], &mut [f32]),
) -> Result<f64> {
    let rows = values.len().checked_div(cols).unwrap_or(0);
    let shape = [rows, cols];
    check_len("int8 weight", &shape, values.len())?;
    check_len("int8 codes", &shape, codes.len())?;
    check_len("SCB", &[rows], scb.len())?;
    let mut error = MaxError::default();
    if cols > 0 {
        quantize_into(values, cols, codes, scb, Some(&mut error));
    }
    Ok(error.value())
}

/// [`bnb_int8_quantize`], adding each row's error to `error` if given.
fn quantize_rows(
    values: &[f32],
    shape: &[usize],
    error: Option<&mut MaxError>,
) -> Result<Int8Quantized> {
    check_len("weight", shape, values.len())?;
    let (rows, cols) = rows_cols(shape);
    if cols == 0 {
        // No values: no rows to scale either (a weight of no columns).
        return Ok(Int8Quantized {
            weight: Vec::new(),
            scb: Vec::new(),
        });
    }
    let (mut weight, mut scb) = (vec![0i8; values.len()], vec![0f32; rows]);
    quantize_into(values, cols, &mut weight, &mut scb, error);
    Ok(Int8Quantized { weight, scb })
}

/// [`quantize_rows`] of the rows of `values` (`cols` each, at least one) into `weight` and
/// `scb`, adding each row's error to `error` if given. Compiled for AVX2 too (chosen by
/// `kernels::isa`): the portable build's loops run 4 values at a time (SSE2). The same
/// operations per value, none fused, so the same bits. (Rows in parallel did not help: the
/// save's workers already keep the cores busy, and the page faults of the codes contended.)
fn quantize_into(
    values: &[f32],
    cols: usize,
    weight: &mut [i8],
    scb: &mut [f32],
    error: Option<&mut MaxError>,
) {
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and F16C (`isa` requires both).
        return unsafe { quantize_into_avx2(values, cols, weight, scb, error) };
    }
    quantize_body(values, cols, weight, scb, error)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn quantize_into_avx2(
    values: &[f32],
    cols: usize,
    weight: &mut [i8],
    scb: &mut [f32],
    error: Option<&mut MaxError>,
) {
    quantize_body(values, cols, weight, scb, error)
}

/// The body of [`quantize_into`], inlined into each instruction set's build.
#[inline(always)]
fn quantize_body(
    values: &[f32],
    cols: usize,
    weight: &mut [i8],
    scb: &mut [f32],
    mut error: Option<&mut MaxError>,
) {
    let (mut half16, mut half) = (vec![f16::ZERO; cols], vec![0f32; cols]);
    let rows = values.chunks(cols).zip(weight.chunks_mut(cols));
    for ((row, codes), m_out) in rows.zip(scb) {
        // A row at a time, with the CPU's conversions where it has them (F16C), which round
        // as `f16::from_f32` does.
        half16.convert_from_f32_slice(row);
        half16.convert_to_f32_slice(&mut half);
        let m = nan_max_abs(&half);
        let scale = (1.0 / m) * 127.0;
        for (c, h) in codes.iter_mut().zip(&half) {
            *c = round_ties_even(h * scale) as i8;
        }
        if let Some(error) = error.as_deref_mut() {
            error.add_row(codes, row, m);
        }
        *m_out = m;
    }
}

/// `max |x|` over `xs` (0 if empty), NaN if any is NaN, as `torch.max` of `abs` gives it. Kept in
/// 8 lanes with NaN flagged apart, so that the loop vectorises (a maximum of non-NaN values
/// does not depend on the order).
#[inline(always)] // into each instruction set's build of `quantize_into`
fn nan_max_abs(xs: &[f32]) -> f32 {
    let (mut lanes, mut nan) = ([0f32; 8], false);
    let chunks = xs.chunks_exact(8);
    for x in chunks.remainder() {
        lanes[0] = greater(lanes[0], x.abs());
        nan |= x.is_nan();
    }
    for c in chunks {
        for (lane, x) in lanes.iter_mut().zip(c) {
            *lane = greater(*lane, x.abs());
            nan |= x.is_nan();
        }
    }
    match nan {
        true => f32::NAN,
        false => lanes.iter().fold(0f32, |m, l| m.max(*l)),
    }
}

/// The greater of `m` and `x`, `m` if `x` is NaN: one compare and select (the CPU's `max`), where
/// `f32::max` / `f64::max` also test `m` for NaN. The callers flag NaN apart.
fn greater<T: PartialOrd>(m: T, x: T) -> T {
    if x > m {
        x
    } else {
        m
    }
}

/// `x` rounded to the nearest integer, ties to even, as `f32::round_ties_even` (bit for bit,
/// NaN and infinities kept) without its call to `rintf`, which x86-64's baseline has no
/// instruction for: below 2^23 in magnitude, adding and subtracting 2^23 leaves the integer
/// the FPU's round-to-nearest-even chose (the ulp at 2^23 is 1); from 2^23 on, `x` is one.
#[inline(always)] // into each instruction set's build of `quantize_into`
fn round_ties_even(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let a = x.abs();
    let rounded = ((a + TWO_23) - TWO_23).copysign(x);
    if a < TWO_23 {
        rounded
    } else {
        x
    }
}

/// `max |dequantize(q) - values|`, in `f64` over the `f32` values (NaN if either side holds
/// NaN), dequantized row by row as [`bnb_int8_dequantize`] does. Kept in 8 lanes with NaN
/// flagged apart, as in `nan_max_abs`.
#[derive(Default)]
struct MaxError {
    lanes: [f64; 8],
    nan: bool,
}

impl MaxError {
    /// Adds one row: its `codes`, its scale `s` and the `values` they stand for.
    #[inline(always)] // into each instruction set's build of `quantize_into`
    fn add_row(&mut self, codes: &[i8], values: &[f32], s: f32) {
        let error =
            |c: i8, v: f32| (f64::from(f32::from(c) * s * DEQUANT_SCALE) - f64::from(v)).abs();
        let (codes8, values8) = (codes.chunks_exact(8), values.chunks_exact(8));
        for (&c, &v) in codes8.remainder().iter().zip(values8.remainder()) {
            let d = error(c, v);
            self.lanes[0] = greater(self.lanes[0], d);
            self.nan |= d.is_nan();
        }
        for (c, v) in codes8.zip(values8) {
            for ((lane, &c), &v) in self.lanes.iter_mut().zip(c).zip(v) {
                let d = error(c, v);
                *lane = greater(*lane, d);
                self.nan |= d.is_nan();
            }
        }
    }

    fn value(&self) -> f64 {
        match self.nan {
            true => f64::NAN,
            false => self.lanes.iter().fold(0f64, |m, l| m.max(*l)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_overflowing_rows_are_stored_as_zeros() {
        let q = bnb_int8_quantize(&[0.0, 0.0, 1.0, 70000.0], &[2, 2]).unwrap();
        assert_eq!(q.weight, vec![0, 0, 0, 0]);
        assert_eq!(q.scb[0], 0.0);
        assert!(q.scb[1].is_infinite());
        assert!(bnb_int8_quantize(&[1.0], &[2, 2]).is_err());
    }

    #[test]
    fn rounding_equals_round_ties_even_everywhere_it_matters() {
        // Every f32 up to 2^24 in magnitude by a stride (ties among them), the boundaries, the
        // specials.
        let special = [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -2.5,
            0.0,
            -0.0,
            8_388_607.5,
            8_388_608.0,
        ];
        let special = special
            .into_iter()
            .chain([f32::INFINITY, -f32::INFINITY, f32::MAX]);
        let strided = (0..0x4b80_0000u32).step_by(997).map(f32::from_bits);
        let halves = (0..100_000).map(|i| i as f32 + 0.5);
        for x in special.chain(strided).chain(halves) {
            for x in [x, -x] {
                let (got, want) = (round_ties_even(x), x.round_ties_even());
                assert_eq!(got.to_bits(), want.to_bits(), "{x}");
            }
        }
        assert!(round_ties_even(f32::NAN).is_nan());
    }

    #[test]
    fn maxima_propagate_nan_in_any_position() {
        let xs: Vec<f32> = (0..21).map(|i| (i as f32 - 10.0) * 0.25).collect();
        assert_eq!(nan_max_abs(&xs), 2.5);
        assert_eq!(nan_max_abs(&[]), 0.0);
        // The error against a dequantization made apart.
        let (q, e) = bnb_int8_quantize_with_error(&xs, &[3, 7]).unwrap();
        let back = bnb_int8_dequantize(&q.weight, &q.scb, &[3, 7]).unwrap();
        let apart = back
            .iter()
            .zip(&xs)
            .map(|(b, x)| f64::from(*b) - f64::from(*x));
        assert_eq!(e, apart.fold(0f64, |m, d| m.max(d.abs())));
        assert!(e > 0.0);
        for at in [0, 7, 8, 20] {
            let mut with_nan = xs.clone();
            with_nan[at] = f32::NAN;
            assert!(nan_max_abs(&with_nan).is_nan(), "{at}");
            let (_, e) = bnb_int8_quantize_with_error(&with_nan, &[3, 7]).unwrap();
            assert!(e.is_nan(), "{at}");
        }
    }
}
