//! The per-row loops of the FP8 block kernels ([`super::fp8`]), written so that the compiler
//! vectorises them, and built twice: for the baseline CPU and for AVX2, chosen at run time.
//!
//! The per-element operations are those of the scalar definitions (the casts of
//! [`super::fp8`], one `f32` multiply, torch's clamp, the error in `f64`), so the results are
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

use super::fp8::{e4m3_to_f32, f32_to_e4m3, E4M3_MAX};

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
            if super::isa::isa() >= super::isa::Isa::Avx2 && !forced_portable() {
                // SAFETY: `isa` found AVX2 and FMA on this CPU.
                return unsafe { avx2($($a),*) };
            }
            generic($($a),*)
        }
    };
}

#[cfg(test)]
thread_local! {
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a test runs the baseline build on this thread ([`portable_only`]).
#[inline(always)]
fn forced_portable() -> bool {
    #[cfg(test)]
    return PORTABLE.with(|p| p.get());
    #[cfg(not(test))]
    false
}

/// Runs `f` with the row kernels of this thread in their baseline build, so that a test can
/// hold the two builds to the same bits.
#[cfg(test)]
pub(super) fn portable_only<R>(f: impl FnOnce() -> R) -> R {
    PORTABLE.with(|p| p.set(true));
    let r = f();
    PORTABLE.with(|p| p.set(false));
    r
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
fn select_max<T: PartialOrd + Copy>(a: T, b: T) -> T {
    if a > b {
        a
    } else {
        b
    }
}

with_avx2! {
    /// Folds one row into `max` (blocks of `bn` columns).
    fn max_abs_row(row: &[f32], bn: usize, max: &mut BlockMax) {
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

/// The running `max |e4m3(q) * inv - v|` of a quantization, NaN-propagating.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MaxError {
    max: f64,
    nan: bool,
}

impl MaxError {
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
/// NaN), cast to e4m3; returns the byte and `|e4m3(q) * inv - v|` in `f64`.
#[inline(always)]
fn quantize_one(v: f32, s: f32, inv: f32) -> (u8, f64) {
    let q = f32_to_e4m3((v * s).clamp(-E4M3_MAX, E4M3_MAX));
    let back = e4m3_to_f32(q) * inv;
    (q, (f64::from(back) - f64::from(v)).abs())
}

with_avx2! {
    /// Casts one row of `v` into `out` with the forward `scales` of its blocks (`bn` columns
    /// each) and folds its error, against the stored inverses `invs`, into `err`.
    fn quantize_row(
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
}
