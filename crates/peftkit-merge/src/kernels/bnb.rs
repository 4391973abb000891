//! bitsandbytes 0.50.2's blockwise quantization on the CPU, bit for bit: 4-bit NF4/FP4
//! (`quantize_4bit`, `dequantize_4bit`) and the 8-bit dynamic code of double quantization
//! (`quantize_blockwise`, `dequantize_blockwise`).
//!
//! What bitsandbytes runs on a CPU, and so what is reproduced here:
//!
//! * `quantize_4bit` is its pure-torch kernel: per block of `blocksize` values the absolute
//!   maximum `m`; a full block is scaled by `x * fl(1 / max(m, 1e-38))`, a partial last block by
//!   `x / max(m, 1e-38)` (whose clamped maximum is stored); clamped to ±1; the code index is
//!   `torch.bucketize` over the midpoints of the code sorted stably (FP4's two zeros: `0` below
//!   and `8` above zero); two indices per byte, the first in the high nibble;
//! * `dequantize_4bit` is its C++ kernel: `code[nibble] * absmax` in `f32`, rounded to the
//!   weight dtype. With AVX-512 and a last dimension that is a multiple of 16 it reads the
//!   scales per row (`row * (n / blocksize) + column / blocksize`, the same as flat blocks when
//!   rows are whole blocks) and its FP4 table has `+0` at nibble 8; the scalar kernel's has
//!   `-0` there. An odd last dimension, or AVX-512 with blocks of 2048 and more, falls back to
//!   torch (flat blocks, the stored code);
//! * `quantize_blockwise` is its C++ kernel: a 65 536-entry table from the value (scaled to ±1,
//!   then `(v + 1) · 0.5 · 65535 + 0.5` truncated, the last multiply-add fused) to the nearest
//!   code; `dequantize_blockwise` is `code[q] * absmax` in `f32`.
//!
//! Checked against the real library in `tests/fixtures/bnb/kernels.safetensors`.

use std::cmp::Ordering;

use super::error::MergeMathError;

type Result<T> = std::result::Result<T, MergeMathError>;

/// The two 4-bit data types of bitsandbytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bnb4Type {
    /// NormalFloat 4 (QLoRA's).
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

/// A 4-bit code (`quant_map`: the value each nibble stands for) and what quantizing to it
/// needs: its nibbles by ascending value and the midpoints between them.
#[derive(Debug, Clone, PartialEq)]
pub struct Code4 {
    kind: Bnb4Type,
    values: [f32; 16],
    order: [u8; 16],
    bounds: [f32; 15],
}

impl Code4 {
    /// The code of `kind` with the values stored in a checkpoint's `quant_map`.
    pub fn new(kind: Bnb4Type, values: [f32; 16]) -> Self {
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // Stable, and -0 equals +0, as torch's argsort ordered them.
        let value = |i: &u8| values[usize::from(*i)];
        order.sort_by(|a, b| value(a).partial_cmp(&value(b)).unwrap_or(Ordering::Equal));
        let bounds = std::array::from_fn(|i| (value(&order[i]) + value(&order[i + 1])) / 2.0);
        Code4 {
            kind,
            values,
            order,
            bounds,
        }
    }

    /// The nibble `torch.bucketize(x, bounds)` picks (the number of midpoints below `x`).
    fn nibble(&self, x: f32) -> u8 {
        // The bounds ascend, so the count of those below `x` is the partition point; counting
        // all 15 is branch-free (a binary search mispredicts on every value).
        let below = self
            .bounds
            .iter()
            .map(|b| usize::from(*b < x))
            .sum::<usize>();
        self.order[below]
    }
}

/// Which of bitsandbytes' CPU dequantization kernels runs for a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// The AVX-512 kernel: scales read per row, FP4 zero positive.
    Rows16,
    /// The scalar C++ kernel: flat blocks, FP4 nibble 8 is `-0`.
    Scalar,
    /// The torch fallback: flat blocks, the stored code.
    Torch,
}

fn kernel(shape: &[usize], blocksize: usize, avx512: bool) -> Kernel {
    let last = shape.last().copied().unwrap_or(0);
    if last % 2 != 0 || (avx512 && blocksize >= 2048) {
        Kernel::Torch
    } else if avx512 && last % 16 == 0 && blocksize >= 16 {
        Kernel::Rows16
    } else {
        Kernel::Scalar
    }
}

/// `dequantize_4bit` of a weight of `shape`: its `f32` values before the rounding to the
/// weight dtype (`code[nibble] * absmax`, see the module documentation). `avx512` says whether
/// the host runs bitsandbytes' AVX-512 kernel (it decides how scales are read and the sign of
/// FP4's zero).
///
/// ```
/// use peftkit_merge::{bnb_dequantize_4bit, bnb_quantize_4bit, Bnb4Type, Code4};
///
/// let nf4 = [-1.0, -0.6961928, -0.52507305, -0.3949175, -0.28444138, -0.18477343, -0.09105004,
///     0.0, 0.0795803, 0.1609302, 0.2461123, 0.33791524, 0.44070983, 0.562617, 0.72295684, 1.0];
/// let code = Code4::new(Bnb4Type::Nf4, nf4);
/// let (packed, absmax) = bnb_quantize_4bit(&[2.0, -1.0, 0.0, 0.5], 64, &code);
/// let back = bnb_dequantize_4bit(&packed, &absmax, &code, 64, &[4], false)?;
/// assert_eq!((back[0], back[2]), (2.0, 0.0));
/// # Ok::<(), peftkit_merge::MergeMathError>(())
/// ```
pub fn bnb_dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    code: &Code4,
    blocksize: usize,
    shape: &[usize],
    avx512: bool,
) -> Result<Vec<f32>> {
    let numel: usize = shape.iter().product();
    check_len(
        "packed 4-bit weight",
        packed.len(),
        numel.div_ceil(2),
        shape,
    )?;
    check_len(
        "absmax",
        absmax.len(),
        numel.div_ceil(blocksize.max(1)),
        shape,
    )?;
    let kernel = kernel(shape, blocksize, avx512);
    let mut table = code.values;
    if kernel == Kernel::Scalar && code.kind == Bnb4Type::Fp4 {
        table[8] = -0.0;
    }
    let (last, blocksize) = (shape.last().copied().unwrap_or(1).max(1), blocksize.max(1));
    let per_row = last / blocksize;
    // Elements come in runs that share one scale: 16 columns for the per-row kernel (its last
    // dimension is a multiple of 16), a block otherwise. `(length, scale index)`.
    let runs: Box<dyn Iterator<Item = (usize, usize)>> = match kernel {
        Kernel::Rows16 => Box::new(
            (0..numel)
                .step_by(16)
                .map(|i| (16, (i / last) * per_row + (i % last) / blocksize)),
        ),
        _ => Box::new(
            (0..numel)
                .step_by(blocksize)
                .map(|i| (blocksize.min(numel - i), i / blocksize)),
        ),
    };
    let mut nibbles = packed.iter().flat_map(|&b| [b >> 4, b & 0xF]);
    let mut out = Vec::with_capacity(numel);
    for (len, at) in runs {
        let scale = *absmax.get(at).ok_or_else(|| MergeMathError::ElementCount {
            what: "absmax",
            shape: shape.to_vec(),
            expected: at + 1,
            got: absmax.len(),
        })?;
        let values = nibbles.by_ref().take(len);
        out.extend(values.map(|n| table[usize::from(n)] * scale));
    }
    Ok(out)
}

/// `quantize_4bit` of `values` (the weight widened to `f32`): the packed nibbles (two per
/// byte, the first high) and one absmax per block of `blocksize`.
pub fn bnb_quantize_4bit(values: &[f32], blocksize: usize, code: &Code4) -> (Vec<u8>, Vec<f32>) {
    let mut nibbles = Vec::with_capacity(values.len() + 1);
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let m = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let clamped = m.max(1e-38);
        if block.len() == blocksize {
            let recip = 1.0 / clamped;
            absmax.push(m);
            nibbles.extend(
                block
                    .iter()
                    .map(|x| code.nibble((x * recip).clamp(-1.0, 1.0))),
            );
        } else {
            absmax.push(clamped);
            nibbles.extend(
                block
                    .iter()
                    .map(|x| code.nibble((x / clamped).clamp(-1.0, 1.0))),
            );
        }
    }
    if nibbles.len() % 2 == 1 {
        nibbles.push(code.nibble(0.0));
    }
    let packed = nibbles.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// `quantize_blockwise` of `values` with a 256-value `code` (bitsandbytes' C++ kernel): one
/// code index per value and one absmax per block of `blocksize`.
pub fn bnb_quantize_blockwise(
    values: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let table = code_table(code);
    let mut out = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let m = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        absmax.push(m);
        if m == 0.0 {
            out.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / m;
        out.extend(block.iter().map(|x| table[table_index(x * inv)]));
    }
    (out, absmax)
}

/// `dequantize_blockwise`: `code[q] * absmax` per block, in `f32`.
pub fn bnb_dequantize_blockwise(
    q: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Result<Vec<f32>> {
    let shape = [q.len()];
    check_len(
        "nested absmax",
        absmax.len(),
        q.len().div_ceil(blocksize.max(1)),
        &shape,
    )?;
    Ok(q.iter()
        .enumerate()
        .map(|(i, &c)| code[usize::from(c)] * absmax[i / blocksize])
        .collect())
}

const TABLE: usize = 65536;

/// bitsandbytes' `build_quantize_lut`: for 65 536 points evenly spread over [-1, 1], the
/// index of the first code whose upper midpoint is not below the point.
fn code_table(code: &[f32; 256]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut idx = 0usize;
    (0..TABLE)
        .map(|i| {
            let val = -1.0f32 + (2.0 * i as f32) / (TABLE - 1) as f32;
            while idx < mids.len() && mids[idx] < val {
                idx += 1;
            }
            idx as u8
        })
        .collect()
}

/// `norm_to_lut_index`: `(clamp(v) + 1) * 0.5 * 65535 + 0.5`, the multiply-add fused as GCC
/// compiles it, truncated.
fn table_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5).mul_add((TABLE - 1) as f32, 0.5) as u16 as usize
}

fn check_len(what: &'static str, got: usize, expected: usize, shape: &[usize]) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(MergeMathError::ElementCount {
            what,
            shape: shape.to_vec(),
            expected,
            got,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dequantize_4bit` element by element, as the module documentation states it.
    fn reference(
        packed: &[u8],
        absmax: &[f32],
        code: &Code4,
        bs: usize,
        shape: &[usize],
        avx512: bool,
    ) -> Vec<f32> {
        let (numel, last) = (shape.iter().product::<usize>(), shape[shape.len() - 1]);
        let rows16 = kernel(shape, bs, avx512) == Kernel::Rows16;
        (0..numel)
            .map(|i| {
                let byte = packed[i / 2];
                let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
                let at = match rows16 {
                    true => (i / last) * (last / bs) + (i % last - i % 16) / bs,
                    false => i / bs,
                };
                absmax
                    .get(at)
                    .map_or(f32::NAN, |s| code.values[usize::from(nibble)] * s)
            })
            .collect()
    }

    #[test]
    fn dequantization_reads_scales_per_block_or_per_row_of_16() {
        let code = Code4::new(Bnb4Type::Nf4, std::array::from_fn(|i| i as f32 / 8.0 - 1.0));
        // Rows of whole blocks, rows that are not (the per-row kernel then reads across
        // rows), odd sizes, a partial last block.
        for (shape, bs) in [
            (vec![4, 128], 64),
            (vec![3, 48], 32),
            (vec![5, 80], 64),
            (vec![7, 9], 16),
            (vec![131], 64),
        ] {
            let numel: usize = shape.iter().product();
            let packed: Vec<u8> = (0..numel.div_ceil(2))
                .map(|i| (i * 37 % 256) as u8)
                .collect();
            let absmax: Vec<f32> = (0..numel.div_ceil(bs)).map(|i| 0.5 + i as f32).collect();
            for avx512 in [false, true] {
                let got = bnb_dequantize_4bit(&packed, &absmax, &code, bs, &shape, avx512);
                let want = reference(&packed, &absmax, &code, bs, &shape, avx512);
                match (got, want.iter().any(|v| v.is_nan())) {
                    (Ok(got), false) => assert_eq!(got, want, "{shape:?} {bs} {avx512}"),
                    (Err(_), true) => {}
                    (got, _) => panic!("{shape:?} {bs} {avx512}: {got:?}"),
                }
            }
        }
    }
}
