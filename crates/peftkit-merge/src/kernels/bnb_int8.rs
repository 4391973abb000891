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

use half::f16;

use super::error::{check_len, MergeMathError};

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
    check_len("int8 weight", shape, weight.len())?;
    let (rows, cols) = rows_cols(shape);
    check_len("SCB", &[rows], scb.len())?;
    let mut out = Vec::with_capacity(weight.len());
    for (row, s) in weight.chunks(cols.max(1)).zip(scb) {
        out.extend(row.iter().map(|&q| f32::from(q) * s * DEQUANT_SCALE));
    }
    Ok(out)
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
    check_len("weight", shape, values.len())?;
    let (rows, cols) = rows_cols(shape);
    let mut weight = Vec::with_capacity(values.len());
    let mut scb = Vec::with_capacity(rows);
    let mut half = vec![0f32; cols];
    for row in values.chunks(cols.max(1)).take(rows) {
        for (h, &v) in half.iter_mut().zip(row) {
            *h = f16::from_f32(v).to_f32();
        }
        // torch.max propagates NaN.
        let m = half.iter().fold(0f32, |m, h| {
            if m.is_nan() || h.is_nan() {
                f32::NAN
            } else {
                m.max(h.abs())
            }
        });
        let scale = (1.0 / m) * 127.0;
        weight.extend(half.iter().map(|h| (h * scale).round_ties_even() as i8));
        scb.push(m);
    }
    Ok(Int8Quantized { weight, scb })
}

/// `max |dequantize(q) - values|`, in `f64` over the `f32` values (NaN if either side holds
/// NaN): the re-quantization error a merge reports.
pub(crate) fn max_abs_error(q: &Int8Quantized, values: &[f32], shape: &[usize]) -> Result<f64> {
    let back = bnb_int8_dequantize(&q.weight, &q.scb, shape)?;
    Ok(back.iter().zip(values).fold(0f64, |m, (b, v)| {
        let d = (f64::from(*b) - f64::from(*v)).abs();
        if m.is_nan() || d.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    }))
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
}
