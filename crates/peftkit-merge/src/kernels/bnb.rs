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

use rayon::prelude::*;

use super::error::MergeMathError;
#[cfg(target_arch = "x86_64")]
use super::isa::{isa, Isa};

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
    /// Whether `order` is the identity (the values ascend, as NF4's do): counts are nibbles.
    ascending: bool,
    bounds: [f32; 15],
    /// `bounds` and `+inf`: the table of a 16-lane search (see `counts16_avx512`).
    search: [f32; 16],
}

impl Code4 {
    /// The code of `kind` with the values stored in a checkpoint's `quant_map`.
    pub fn new(kind: Bnb4Type, values: [f32; 16]) -> Self {
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // Stable, and -0 equals +0, as torch's argsort ordered them.
        let value = |i: &u8| values[usize::from(*i)];
        order.sort_by(|a, b| value(a).partial_cmp(&value(b)).unwrap_or(Ordering::Equal));
        let bounds = std::array::from_fn(|i| (value(&order[i]) + value(&order[i + 1])) / 2.0);
        let search = std::array::from_fn(|i| bounds.get(i).copied().unwrap_or(f32::INFINITY));
        Code4 {
            kind,
            values,
            order,
            ascending: order == IDENTITY,
            bounds,
            search,
        }
    }

    /// The nibble `torch.bucketize(x, bounds)` picks (the number of midpoints below `x`).
    /// [`Code4::nibble`] of each of `xs`, appended to `out`; `below` (as long as `xs`) is
    /// scratch. The same counts, taken bound by bound over the whole block, so that the
    /// compares run many values at a time (one value at a time, the 15 compares and their sum
    /// were most of a kept 4-bit merge's time).
    #[inline(always)] // into each instruction set's build of `quantize_4bit_chunk`
    #[cfg(test)]
    fn nibbles(&self, xs: &[f32], below: &mut [u8], out: &mut Vec<u8>) {
        self.nibbles_by(xs, below, out, |chunk, below| self.counts16(chunk, below))
    }

    /// [`Code4::nibbles`], each 16 values' counts taken by `count16(values, counts)`.
    #[inline(always)] // into each instruction set's build of `quantize_4bit_chunk`
    fn nibbles_by(
        &self,
        xs: &[f32],
        below: &mut [u8],
        out: &mut Vec<u8>,
        count16: impl Fn(&[f32], &mut [u8]),
    ) {
        let mut chunks = xs.chunks_exact(16);
        let mut counts = below.chunks_exact_mut(16);
        for (chunk, below) in (&mut chunks).zip(&mut counts) {
            count16(chunk, below);
        }
        for (o, x) in counts.into_remainder().iter_mut().zip(chunks.remainder()) {
            *o = self.bounds.iter().map(|b| u8::from(*b < *x)).sum();
        }
        // A code whose values ascend (NF4) has its counts for nibbles; a count is at most 15.
        match self.ascending {
            true => out.extend_from_slice(below),
            false => out.extend(below.iter().map(|&n| self.order[usize::from(n & 0xF)])),
        }
    }

    /// The counts of 16 values, kept in registers across the 15 bounds (a pass over the
    /// block per bound loaded and stored the counts 15 times).
    #[inline(always)] // into each instruction set's build of `quantize_4bit_chunk`
    fn counts16(&self, chunk: &[f32], below: &mut [u8]) {
        let mut n = [0u32; 16];
        for b in &self.bounds {
            for (n, x) in n.iter_mut().zip(chunk) {
                *n += u32::from(*b < *x);
            }
        }
        for (o, n) in below.iter_mut().zip(n) {
            *o = n as u8;
        }
    }

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

/// The nibbles in their own order: the order of a code whose values ascend.
const IDENTITY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// The largest `|x|` of `block` and 0, NaN ignored (as `f32::max` ignores it). Sixteen running
/// maxima, which the compiler vectorises: a maximum does not depend on the order the values
/// are taken in, and one chain of dependent `max`es cost a few cycles per value.
#[inline(always)] // into each instruction set's build of `quantize_4bit_chunk`
fn abs_max(block: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = block.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, x) in lanes.iter_mut().zip(chunk) {
            *m = m.max(x.abs());
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    lanes.iter().fold(rest, |m, l| m.max(*l))
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
    let mut out = vec![0.0; shape.iter().product()];
    bnb_dequantize_4bit_into(packed, absmax, code, (blocksize, shape, avx512), &mut out)?;
    Ok(out)
}

/// [`bnb_dequantize_4bit`] into `out`, which holds exactly the weight's element count: memory
/// a caller reuses from weight to weight (a fresh allocation is paged in and zeroed by the
/// kernel each time), or the `f32` bytes of the tensor it returns.
pub(crate) fn bnb_dequantize_4bit_into(
    packed: &[u8],
    absmax: &[f32],
    code: &Code4,
    (blocksize, shape, avx512): (usize, &[usize], bool),
    out: &mut [f32],
) -> Result<()> {
    let numel: usize = shape.iter().product();
    check_len("dequantized 4-bit weight", out.len(), numel, shape)?;
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
    // dimension is a multiple of 16), a block otherwise. `(length, scale index)`. Where rows
    // are whole blocks the per-row kernel's index, `(i / last) * per_row + (i % last) /
    // blocksize`, is the block's, `i / blocksize`: whole blocks then, a call per block rather
    // than per 16 values (4.5 % of a kept NF4 merge's samples).
    let runs: Box<dyn Iterator<Item = (usize, usize)>> = match kernel {
        Kernel::Rows16 if !last.is_multiple_of(blocksize) => Box::new(
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
    // Both values of a byte at once, from a table of pairs, where every run holds whole bytes
    // (even runs: a byte's two nibbles then share a scale). The same product per value.
    let pairs: Option<Box<[[f32; 2]; 256]>> = (blocksize.is_multiple_of(2)
        && numel.is_multiple_of(2))
    .then(|| Box::new(std::array::from_fn(|b| [table[b >> 4], table[b & 0xF]])));
    let mut nibbles = packed.iter().flat_map(|&b| [b >> 4, b & 0xF]);
    let (mut rest, mut byte) = (out, 0);
    for (len, at) in runs {
        let scale = *absmax.get(at).ok_or_else(|| MergeMathError::ElementCount {
            what: "absmax",
            shape: shape.to_vec(),
            expected: at + 1,
            got: absmax.len(),
        })?;
        let (run, after) = std::mem::take(&mut rest).split_at_mut(len);
        match &pairs {
            Some(pairs) => {
                let bytes = &packed[byte..byte + len / 2];
                for (o, &b) in run.chunks_exact_mut(2).zip(bytes) {
                    let [high, low] = pairs[usize::from(b)];
                    o[0] = high * scale;
                    o[1] = low * scale;
                }
                byte += len / 2;
            }
            None => {
                for (o, n) in run.iter_mut().zip(nibbles.by_ref()) {
                    *o = table[usize::from(n)] * scale;
                }
            }
        }
        rest = after;
    }
    Ok(())
}

/// `quantize_4bit` of `values` (the weight widened to `f32`): the packed nibbles (two per
/// byte, the first high) and one absmax per block of `blocksize`.
///
/// Blocks are independent, so chunks of whole blocks run in parallel (rayon): each chunk holds
/// an even number of values (blocks are even in bitsandbytes; an odd block size makes one
/// chunk), so it packs into its own bytes. Before, one weight's quantization ran on one core:
/// 38 % of a kept 4-bit merge's samples.
pub fn bnb_quantize_4bit(values: &[f32], blocksize: usize, code: &Code4) -> (Vec<u8>, Vec<f32>) {
    let blocks = values.len().div_ceil(blocksize.max(1));
    let mut packed = vec![0u8; values.len().div_ceil(2)];
    let mut absmax = vec![0f32; blocks];
    quantize_4bit_chunks(values, blocksize, code, &mut packed, &mut absmax);
    (packed, absmax)
}

/// [`bnb_quantize_4bit`] into `packed` and `absmax` (the output tensor's own buffer, say,
/// rather than a vector copied into it), which must hold exactly its bytes and blocks.
pub(crate) fn bnb_quantize_4bit_into(
    values: &[f32],
    blocksize: usize,
    code: &Code4,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    let shape = [values.len()];
    let bytes = values.len().div_ceil(2);
    check_len("packed 4-bit weight", packed.len(), bytes, &shape)?;
    let blocks = values.len().div_ceil(blocksize.max(1));
    check_len("absmax", absmax.len(), blocks, &shape)?;
    quantize_4bit_chunks(values, blocksize, code, packed, absmax);
    Ok(())
}

/// The chunks of whole blocks of [`bnb_quantize_4bit`], in parallel.
fn quantize_4bit_chunks(
    values: &[f32],
    blocksize: usize,
    code: &Code4,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    let blocksize = blocksize.max(1);
    let blocks = values.len().div_ceil(blocksize);
    let per = match blocksize % 2 {
        0 => (QUANTIZE_CHUNK / blocksize).max(1),
        _ => blocks.max(1),
    };
    let chunk = per * blocksize;
    values
        .par_chunks(chunk)
        .zip(packed.par_chunks_mut(chunk.div_ceil(2)))
        .zip(absmax.par_chunks_mut(per))
        .for_each(|((v, p), a)| quantize_4bit_chunk(v, blocksize, code, p, a));
}

/// The `absmax` [`bnb_quantize_4bit`] stores for each block of `values` into `out`, without
/// the codes: a block's largest magnitude, a last partial block's clamped to `1e-38` (for a
/// mean of the block maxima before any block is quantized).
pub(crate) fn bnb_block_absmax(values: &[f32], blocksize: usize, out: &mut [f32]) -> Result<()> {
    let blocksize = blocksize.max(1);
    let blocks = values.len().div_ceil(blocksize);
    check_len("absmax", out.len(), blocks, &[values.len()])?;
    for (block, a) in values.chunks(blocksize).zip(out) {
        let m = abs_max(block);
        *a = match block.len() == blocksize {
            true => m,
            false => m.max(1e-38),
        };
    }
    Ok(())
}

/// Values per parallel task of [`bnb_quantize_4bit`].
const QUANTIZE_CHUNK: usize = 1 << 16;

/// [`bnb_quantize_4bit`] of whole blocks `values` (the last may be partial) into `packed` and
/// `absmax`, on this thread; an odd count of values ends with the nibble of 0 in the low half.
/// Blocks are independent, so any run of whole blocks (a parallel chunk, a band of a merged
/// weight's rows) quantizes to the bytes the whole weight would give there.
///
/// Compiled for AVX2 too: the portable build's compares run 4 values at a time (SSE2), AVX2's
/// 8. The same operations in the same order on every value, so the same bits (no operation
/// is fused: Rust never contracts a multiply and an add). Compiled for AVX-512 with the same
/// compares, the body took 3.1 s of CPU in a kept NF4 merge of 0.42 G parameters where the
/// AVX2 build took 1.5 s and the SSE2 one 1.7 s (AMD Zen 4); the AVX-512 build counts by a
/// search instead ([`counts16_avx512`]: user time of that merge 1.18 → 0.86 s), and gives the
/// same counts, so the same bytes.
pub(crate) fn quantize_4bit_chunk(
    values: &[f32],
    blocksize: usize,
    code: &Code4,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: the CPU has AVX-512 (F and BW) and AVX2.
        Isa::Avx512 => {
            return unsafe { quantize_4bit_avx512(values, blocksize, code, packed, absmax) }
        }
        // SAFETY: the CPU has AVX2.
        Isa::Avx2 => return unsafe { quantize_4bit_avx2(values, blocksize, code, packed, absmax) },
        _ => {}
    }
    let count16 = |chunk: &[f32], below: &mut [u8]| code.counts16(chunk, below);
    quantize_4bit_body(values, blocksize, code, (packed, absmax), count16)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_4bit_avx2(v: &[f32], bs: usize, code: &Code4, packed: &mut [u8], absmax: &mut [f32]) {
    let count16 = |chunk: &[f32], below: &mut [u8]| code.counts16(chunk, below);
    quantize_4bit_body(v, bs, code, (packed, absmax), count16)
}

/// The AVX-512 build: the counts by a 4-step search of 16 values at a time
/// ([`counts16_avx512`]) instead of 15 compares.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
fn quantize_4bit_avx512(v: &[f32], bs: usize, code: &Code4, packed: &mut [u8], absmax: &mut [f32]) {
    // SAFETY: this build runs only where the CPU has AVX-512 F.
    let count16 =
        |chunk: &[f32], below: &mut [u8]| unsafe { counts16_avx512(chunk, &code.search, below) };
    quantize_4bit_body(v, bs, code, (packed, absmax), count16)
}

/// How many of the ascending bounds in `search` (15, then `+inf`) lie below each of the 16
/// values of `chunk`, into the 16 bytes of `below`: a branch-free binary search in every lane
/// at once, 4 steps of a table lookup, a compare and a masked add. The bounds ascend, so
/// "below `x`" holds for a prefix of them and the search finds its length: the count the 15
/// compares give, NaN (below nothing) included. `+inf` is never probed.
///
/// # Safety
/// The CPU must have AVX-512 F; `chunk` and `below` must hold 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn counts16_avx512(chunk: &[f32], search: &[f32; 16], below: &mut [u8]) {
    use std::arch::x86_64::*;
    debug_assert!(chunk.len() >= 16 && below.len() >= 16);
    // SAFETY: 16 values are read from `chunk` and `search`, 16 bytes written to `below`.
    unsafe {
        let table = _mm512_loadu_ps(search.as_ptr());
        let x = _mm512_loadu_ps(chunk.as_ptr());
        let mut at = _mm512_setzero_si512();
        for step in [8, 4, 2, 1] {
            let probe = _mm512_add_epi32(at, _mm512_set1_epi32(step - 1));
            let bound = _mm512_permutexvar_ps(probe, table);
            let lower = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(bound, x);
            at = _mm512_mask_add_epi32(at, lower, at, _mm512_set1_epi32(step));
        }
        _mm_storeu_si128(below.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(at));
    }
}

/// The body of [`quantize_4bit_chunk`], inlined into each instruction set's build, each 16
/// values' nibble counts taken by `count16`.
#[inline(always)]
fn quantize_4bit_body(
    values: &[f32],
    blocksize: usize,
    code: &Code4,
    (packed, absmax): (&mut [u8], &mut [f32]),
    count16: impl Fn(&[f32], &mut [u8]),
) {
    let mut nibbles = Vec::with_capacity(values.len() + 1);
    let (mut scaled, mut below) = (vec![0f32; blocksize], vec![0u8; blocksize]);
    for (block, a) in values.chunks(blocksize).zip(absmax) {
        let m = abs_max(block);
        let clamped = m.max(1e-38);
        let scaled = &mut scaled[..block.len()];
        if block.len() == blocksize {
            let recip = 1.0 / clamped;
            *a = m;
            for (s, x) in scaled.iter_mut().zip(block) {
                *s = (x * recip).clamp(-1.0, 1.0);
            }
        } else {
            *a = clamped;
            for (s, x) in scaled.iter_mut().zip(block) {
                *s = (x / clamped).clamp(-1.0, 1.0);
            }
        }
        code.nibbles_by(scaled, &mut below[..block.len()], &mut nibbles, &count16);
    }
    if nibbles.len() % 2 == 1 {
        nibbles.push(code.nibble(0.0));
    }
    for (b, pair) in packed.iter_mut().zip(nibbles.chunks_exact(2)) {
        *b = (pair[0] << 4) | pair[1];
    }
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

    /// The fixtures (checked against bitsandbytes) hold one chunk; past one, the chunks in
    /// parallel are the whole run as one chunk: odd lengths, partial last blocks, odd blocks.
    #[test]
    fn quantization_by_chunks_is_one_run() {
        let code = Code4::new(Bnb4Type::Nf4, std::array::from_fn(|i| i as f32 / 8.0 - 1.0));
        for (len, bs) in [
            (3 * QUANTIZE_CHUNK + 7, 64),
            (QUANTIZE_CHUNK * 2 + 1, 63),
            (5, 64),
        ] {
            let values: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
                .collect();
            let (mut packed, mut absmax) = (vec![0; len.div_ceil(2)], vec![0.0; len.div_ceil(bs)]);
            quantize_4bit_chunk(&values, bs, &code, &mut packed, &mut absmax);
            let got = bnb_quantize_4bit(&values, bs, &code);
            assert!(got == (packed, absmax), "{len} values, blocks of {bs}");
        }
    }

    /// The block maxima alone are the quantizer's: full blocks, a partial last one (clamped),
    /// an all-zero block and a NaN.
    #[test]
    fn block_maxima_alone_are_the_quantizer_s() {
        let code = Code4::new(Bnb4Type::Nf4, std::array::from_fn(|i| i as f32 / 8.0 - 1.0));
        for (len, bs) in [(64 * 5usize, 64usize), (64 * 3 + 17, 64), (40, 16)] {
            let mut values: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
                .collect();
            values[..bs].iter_mut().for_each(|v| *v = 0.0);
            values[bs + 3] = f32::NAN;
            // A partial last block of zeros: the quantizer clamps its maximum.
            values[len - len % bs..].iter_mut().for_each(|v| *v = 0.0);
            let (_, want) = bnb_quantize_4bit(&values, bs, &code);
            let mut got = vec![0.0; len.div_ceil(bs)];
            bnb_block_absmax(&values, bs, &mut got).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{len} values, blocks of {bs}");
        }
    }

    /// The AVX-512 search counts as the 15 compares do: the bounds and the floats on each
    /// side of them, zeros of both signs, NaN, infinities, for an ascending code and FP4's.
    /// (Run where the CPU has AVX-512; the fixtures check the bytes everywhere.)
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_search_counts_as_the_compares_do() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for kind in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            let code = Code4::new(kind, std::array::from_fn(|i| (i as f32 - 7.5) / 7.5));
            let mut xs = vec![
                f32::NAN,
                -0.0,
                0.0,
                -1.0,
                1.0,
                f32::INFINITY,
                -f32::INFINITY,
            ];
            xs.extend(code.bounds);
            xs.extend(code.bounds.iter().map(|b| b.next_up()));
            xs.extend(code.bounds.iter().map(|b| b.next_down()));
            xs.resize(xs.len().div_ceil(16) * 16, 0.5);
            for chunk in xs.chunks_exact(16) {
                let (mut want, mut got) = ([0u8; 16], [0u8; 16]);
                code.counts16(chunk, &mut want);
                // SAFETY: the CPU has AVX-512 F; 16 values and 16 bytes.
                unsafe { counts16_avx512(chunk, &code.search, &mut got) };
                assert_eq!(got, want, "{kind:?} {chunk:?}");
            }
        }
    }

    /// The block-wide counts are the value-by-value search, bounds, zeros and NaN included.
    #[test]
    fn nibbles_of_a_block_are_each_value_s() {
        for kind in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            let code = Code4::new(kind, std::array::from_fn(|i| (i as f32 - 7.5) / 7.5));
            let mut xs = vec![f32::NAN, -0.0, 0.0, -1.0, 1.0, f32::MIN_POSITIVE];
            xs.extend(code.bounds);
            xs.extend(code.bounds.iter().map(|b| f32::from_bits(b.to_bits() + 1)));
            let mut got = vec![];
            code.nibbles(&xs, &mut vec![0; xs.len()], &mut got);
            let want: Vec<u8> = xs.iter().map(|&x| code.nibble(x)).collect();
            assert_eq!(got, want, "{kind:?}");
        }
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
