//! The per-row loops of the FP8 block kernels ([`super::fp8`]): the hand-written AVX-512 and
//! AVX2 kernels of [`super::fp8_x86`] where the CPU has them, otherwise loops written so that
//! the compiler vectorises them (`dequantize_row` and the `f32` block maxima are also built a
//! second time for AVX2, chosen at run time). Every path gives the same bits.
//!
//! The per-element operations are those of the scalar definitions (the casts of
//! [`super::fp8`], one `f32` multiply, torch's clamp, the error in `f32`), so the results are
//! the same bits; only the bookkeeping around them differs:
//!
//! * the conversions are branch-free (every case computed, the result selected);
//! * a running maximum is kept per lane (`LANES` of them, folded at the end of a block or
//!   row), because a maximum of non-NaN values does not depend on the order it is taken in;
//! * NaN, which torch's `amax` and the error propagate, is tracked by a separate flag per lane
//!   instead of inside the maximum, whose compare-and-select ignores it.
//!
//! Before this, perf put half of a kept-FP8 merge's cycles in the scalar loops (a branch per
//! element for the cast, the NaN tests and the serial `f64` maximum): docs/architecture.md,
//! "peftkit-merge".

use super::dtype::{bf16_bits_to_f32, f32_to_bf16_bits};
use super::fp8::{e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
#[cfg(target_arch = "x86_64")]
use super::fp8_x86 as x86;
use super::isa::Isa;

/// Elements per step of the lane-wise loops: one AVX2 register of `f32`s.
const LANES: usize = 8;

/// Defines `pub(super) fn $name` as a body compiled for the baseline CPU and, on x86-64, once
/// more with AVX2 and FMA enabled, run when the CPU has them ([`super::isa`]). The body is the
/// same code: the two builds give the same bits (no fused multiply-add is formed from separate
/// operations), only wider instructions.
macro_rules! with_avx2 {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        pub(super) fn $name($($a: $t),*) {
            #[inline(always)]
            fn generic($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($a: $t),*) {
                generic($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            if !forced_portable() {
                // SAFETY: `isa` found AVX2 and FMA on this CPU.
                return unsafe { avx2($($a),*) };
            }
            generic($($a),*)
        }
    };
}

/// The widest instruction set a test lets the row kernels use ([`with_isa`]), as
/// `Isa as u8`. Process-wide, because the kernels run on rayon's threads: a test that lowers
/// it changes only the speed of the others running at the same time (every path gives the
/// same bits; a caller that asked [`reads_bf16`] before the change is served by the fallback).
#[cfg(test)]
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(Isa::Avx512 as u8);

/// The instruction set the row kernels use: the process's ([`super::isa`]), less what a test
/// withholds ([`with_isa`]).
#[inline(always)]
fn isa() -> Isa {
    #[cfg(test)]
    {
        let cap = match CAP.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Isa::Portable,
            1 => Isa::Avx2,
            _ => Isa::Avx512,
        };
        super::isa::isa().min(cap)
    }
    #[cfg(not(test))]
    super::isa::isa()
}

/// Whether the baseline build must run ([`Isa::Portable`]).
#[inline(always)]
fn forced_portable() -> bool {
    isa() == Isa::Portable
}

/// Runs `f` with the row kernels limited to `cap` (on every thread, one test at a time), so
/// that a test can hold every path to the same bits.
#[cfg(test)]
pub(super) fn with_isa<R>(cap: Isa, f: impl FnOnce() -> R) -> R {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    CAP.store(cap as u8, std::sync::atomic::Ordering::Relaxed);
    let r = f();
    CAP.store(Isa::Avx512 as u8, std::sync::atomic::Ordering::Relaxed);
    r
}

/// Runs `f` with the row kernels of this thread in their baseline build.
#[cfg(test)]
pub(super) fn portable_only<R>(f: impl FnOnce() -> R) -> R {
    with_isa(Isa::Portable, f)
}

/// One row of values: `f32`s, or the little-endian bytes of BF16 ones (read as they are by the
/// hand-written kernels, see [`reads_bf16`]).
#[derive(Clone, Copy)]
pub(super) enum Row<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u8]),
}

/// Whether this thread has hand-written kernels ([`super::fp8_x86`]) that read BF16 rows
/// without widening them first: otherwise a caller widens each row and passes `f32`s.
pub(super) fn reads_bf16() -> bool {
    cfg!(target_arch = "x86_64") && isa() >= Isa::Avx2
}

with_avx2! {
    /// `e4m3(w) * scale` of one row of `w` into `out`, block by block (`scales` per block of
    /// `bn` columns).
    fn dequantize_row(w: &[u8], scales: &[f32], bn: usize, out: &mut [f32]) {
        for ((o, w), &s) in out.chunks_mut(bn).zip(w.chunks(bn)).zip(scales) {
            for (x, &q) in o.iter_mut().zip(w) {
                *x = e4m3_to_f32(q) * s;
            }
        }
    }
}

/// Per-block `amax(|x|)` with torch's NaN propagation, accumulated over rows.
pub(super) struct BlockMax {
    max: Vec<f32>,
    nan: Vec<bool>,
}

impl BlockMax {
    /// `blocks` blocks, all zero so far.
    pub(super) fn new(blocks: usize) -> Self {
        BlockMax {
            max: vec![0.0; blocks],
            nan: vec![false; blocks],
        }
    }

    /// Number of blocks.
    pub(super) fn len(&self) -> usize {
        self.max.len()
    }

    /// Folds into block `b` the largest magnitudes of a BF16 row's block, given as bit
    /// patterns without sign (a part's and the rest's): above `0x7f80` is a NaN.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn fold_bf16(&mut self, b: usize, parts: [u32; 2]) {
        let m = parts[0].max(parts[1]);
        if m > 0x7f80 {
            self.nan[b] = true;
        } else {
            self.max[b] = select_max(f32::from_bits(m << 16), self.max[b]);
        }
    }

    /// Each block's max-abs: NaN if the block held a NaN.
    pub(super) fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.max
            .iter()
            .zip(&self.nan)
            .map(|(&m, &nan)| if nan { f32::NAN } else { m })
    }
}

/// The larger of `a` and `b`, either when they are equal; `b` when `a` is NaN. Written as the
/// select `maxps` computes, where `f32::max` would add a NaN test (NaN is tracked apart).
#[inline(always)]
pub(super) fn select_max<T: PartialOrd + Copy>(a: T, b: T) -> T {
    if a > b {
        a
    } else {
        b
    }
}

/// Folds one row into `max` (blocks of `bn` columns).
pub(super) fn max_abs_row(row: Row<'_>, bn: usize, max: &mut BlockMax) {
    let bf16 = match row {
        Row::F32(v) => return max_abs_f32(v, bn, max),
        Row::Bf16(b) => b,
    };
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: the CPU has the instruction set; `bf16` holds the blocks of `max`.
        Isa::Avx512 => return unsafe { x86::max_abs_bf16_avx512(bf16, bn, max) },
        Isa::Avx2 => return unsafe { x86::max_abs_bf16_avx2(bf16, bn, max) },
        Isa::Portable => {}
    }
    let row: Vec<f32> = bf16
        .chunks_exact(2)
        .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    max_abs_f32(&row, bn, max);
}

with_avx2! {
    /// [`max_abs_row`] of `f32`s.
    fn max_abs_f32(row: &[f32], bn: usize, max: &mut BlockMax) {
        let blocks = max.max.iter_mut().zip(max.nan.iter_mut()).zip(row.chunks(bn));
        for ((m, nan), block) in blocks {
            let mut lanes = [0.0f32; LANES];
            let mut nans = [0u32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    lanes[i] = select_max(c[i].abs(), lanes[i]);
                    nans[i] |= u32::from(c[i].is_nan());
                }
            }
            for &x in chunks.remainder() {
                lanes[0] = select_max(x.abs(), lanes[0]);
                nans[0] |= u32::from(x.is_nan());
            }
            *m = lanes.iter().fold(*m, |m, &l| select_max(l, m));
            *nan |= nans.iter().any(|&n| n != 0);
        }
    }
}

/// The running `max |e4m3(q) * inv - v|` of a quantization, NaN-propagating: each difference
/// rounded to `f32`, so the maximum is the exact one rounded to `f32` (rounding keeps order).
/// The error is a report, not a value written; `f32` lets the kernels keep it in their lanes
/// with three operations per vector (an exact `f64` maximum took eleven and a branch).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MaxError {
    max: f64,
    nan: bool,
}

impl MaxError {
    /// Folds in one error.
    #[inline(always)]
    pub(super) fn fold(&mut self, e: f64) {
        self.max = select_max(e, self.max);
        self.nan |= e.is_nan();
    }

    /// Folds in another maximum.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn merge(&mut self, other: MaxError) {
        self.max = select_max(other.max, self.max);
        self.nan |= other.nan;
    }

    /// The maximum so far, NaN if an error was.
    pub(super) fn value(self) -> f64 {
        if self.nan {
            f64::NAN
        } else {
            self.max
        }
    }
}

/// One element of [`quantize_row`]: `v` scaled by `s`, clamped as `torch.clamp` (NaN stays
/// NaN), cast to e4m3; returns the byte and `|e4m3(q) * inv - v|`, the difference rounded to
/// `f32` (see [`MaxError`]).
#[inline(always)]
pub(super) fn quantize_one(v: f32, s: f32, inv: f32) -> (u8, f64) {
    let q = f32_to_e4m3((v * s).clamp(-E4M3_MAX, E4M3_MAX));
    let back = e4m3_to_f32(q) * inv;
    (q, f64::from((back - v).abs()))
}

/// Casts one row of `v` into `out` with the forward `scales` of its blocks (`bn` columns each)
/// and folds its error, against the stored inverses `invs`, into `err`: by the hand-written
/// kernels of [`super::fp8_x86`] where the CPU has them.
pub(super) fn quantize_row(
    v: Row<'_>,
    scales: &[f32],
    invs: &[f32],
    bn: usize,
    out: &mut [u8],
    err: &mut MaxError,
) {
    let n = scales.len() * bn;
    let len = match v {
        Row::F32(v) => v.len(),
        Row::Bf16(b) => b.len() / 2,
    };
    assert!(
        len == n && out.len() == n && invs.len() == scales.len(),
        "row lengths"
    );
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: the CPU has the instruction set; the lengths were checked.
        Isa::Avx512 => return unsafe { x86::quantize_row_avx512(v, scales, invs, bn, out, err) },
        Isa::Avx2 => return unsafe { x86::quantize_row_avx2(v, scales, invs, bn, out, err) },
        Isa::Portable => {}
    }
    match v {
        Row::F32(v) => quantize_f32(v, scales, invs, bn, out, err),
        Row::Bf16(b) => {
            let v: Vec<f32> = b
                .chunks_exact(2)
                .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            quantize_f32(&v, scales, invs, bn, out, err)
        }
    }
}

/// `f32_to_bf16_bits(e4m3_to_f32(w) * scale)` of one row into `out`, two bytes per element:
/// [`dequantize_row`] fused with the encode (by [`super::fp8_x86`] where the CPU allows).
pub(super) fn dequantize_row_bf16(w: &[u8], scales: &[f32], bn: usize, out: &mut [u8]) {
    assert!(
        w.len() == scales.len() * bn && out.len() == w.len() * 2,
        "row lengths"
    );
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: the CPU has the instruction set; the lengths were checked.
        Isa::Avx512 => return unsafe { x86::dequantize_bf16_avx512(w, scales, bn, out) },
        Isa::Avx2 => return unsafe { x86::dequantize_bf16_avx2(w, scales, bn, out) },
        Isa::Portable => {}
    }
    let blocks = out.chunks_mut(bn * 2).zip(w.chunks(bn)).zip(scales);
    for ((o, w), &s) in blocks {
        for (o, &q) in o.chunks_exact_mut(2).zip(w) {
            o.copy_from_slice(&f32_to_bf16_bits(e4m3_to_f32(q) * s).to_le_bytes());
        }
    }
}

/// The baseline [`quantize_row`] of `f32`s: the loop written for the compiler to vectorise
/// (CPUs without AVX2 only: the others run [`super::fp8_x86`]).
fn quantize_f32(
    v: &[f32],
    scales: &[f32],
    invs: &[f32],
    bn: usize,
    out: &mut [u8],
    err: &mut MaxError,
) {
    let mut lanes = [0.0f64; LANES];
    let mut nans = [0u64; LANES];
    let blocks = out.chunks_mut(bn).zip(v.chunks(bn)).zip(scales).zip(invs);
    for (((q, v), &s), &inv) in blocks {
        let mut qs = q.chunks_exact_mut(LANES);
        let mut vs = v.chunks_exact(LANES);
        for (q, v) in (&mut qs).zip(&mut vs) {
            for i in 0..LANES {
                let (b, e) = quantize_one(v[i], s, inv);
                q[i] = b;
                lanes[i] = select_max(e, lanes[i]);
                nans[i] |= u64::from(e.is_nan());
            }
        }
        for (q, &v) in qs.into_remainder().iter_mut().zip(vs.remainder()) {
            let (b, e) = quantize_one(v, s, inv);
            *q = b;
            lanes[0] = select_max(e, lanes[0]);
            nans[0] |= u64::from(e.is_nan());
        }
    }
    err.max = lanes.iter().fold(err.max, |m, &l| select_max(l, m));
    err.nan |= nans.iter().any(|&n| n != 0);
}
