//! `numerics = exact`: correctly rounded merges, the same bytes on every machine.
//!
//! # Definition
//!
//! For a LoRA delta (Linear, `Conv1D`, Embedding, Conv, MoE experts, `lora_bias`) every merged
//! element is the **exact** real number
//!
//! ```text
//! V = W + s · Σ_k L[g,k] · R[k,j]        (unmerge: W − s · Σ_k …)
//! ```
//!
//! rounded **once**, to nearest with ties to even, to the base dtype (F32, BF16 or F16). `s` is
//! the f32 scale peft multiplies with (adapter weight included); `L`, `R` are the f32 factors
//! in the layout of the base (`B`, `A`, transposed for `fan_in_fan_out` and embeddings). For a
//! Conv, `lora_B` is 1×1, so the sum runs over the rank and every kernel position is its own
//! element. Nothing depends on a summation order, a BLAS, a thread count or an instruction
//! set, so the result is a function of the input bytes alone. Special cases, fixed so that they
//! too are host independent:
//!
//! * when the delta is exactly zero (`s = 0`, all products zero, or products that cancel
//!   exactly) the element is left as it was;
//! * a nonzero delta that cancels `W` exactly gives `+0`; a tiny negative `V` that rounds to
//!   zero gives `−0`; values beyond the dtype's range round to `±Inf` (IEEE 754 rules);
//! * when `W` or a product is infinite or NaN, the result is what IEEE arithmetic gives in any
//!   order (NaN as soon as a NaN or `∞ − ∞` or `0 · ∞` appears, else the infinity), and a NaN
//!   is written as the canonical `f32` NaN encoded in the base dtype (`0x7FC00000`, BF16
//!   `0xFFFF`, F16 `0x7E00`).
//!
//! IA³ (`W · l`) is one product, rounded once likewise. Merges whose arithmetic is not a sum
//! of products (DoRA's norm and division, LoHa's and LoKr's products of sums, IA³'s unmerge
//! division) and F64 bases are refused with [`MergeMathError::Invalid`] (see [`refusal`]).
//!
//! # Fast path and its proof
//!
//! A product of two `f32` is exact in `f64` (24 + 24 ≤ 53 significant bits, exponents within
//! range), so the kernel sums the products in `f64` — in whatever order and vector width the
//! CPU likes — together with `A = Σ |products|`, and forms `v = fl(W + fl(s · S))`. With
//! `u = 2⁻⁵³` and `k` products, the recursive-summation bound gives
//! `|S − Σ| ≤ γ_{k−1} Σ|p| ≤ (k+1)·u·A` (for `k ≤ 2²⁰`), and the two final operations add at
//! most `u·|s·S|` and `u·|v|`, so
//!
//! ```text
//! |v − V| ≤ E = u · ( |s|·A·(k+1) + |m| + |v| )
//! ```
//!
//! The kernel uses `4E` (unit `4u = 2⁻⁵¹`): twice `E`, which covers the `(1 + O(u))` factors
//! above, the roundings of computing the bound, and the rounding of the endpoints
//! `fl(v ∓ 4E)` themselves (each off by at most `u·(|v| + 4E)`), so the computed interval
//! surely contains `V`. No underflow occurs (every nonzero product is at least 2⁻²⁹⁸ in
//! magnitude, `s · S` at least 2⁻⁴⁴⁷). Rounding to nearest-even is monotone: if both
//! endpoints round to the same bits, every point in between — `V` included — rounds to them,
//! and that is the correctly rounded result. Ties, exact zero results and intervals
//! straddling a rounding boundary give different endpoints (the interval always has a
//! positive width), so they fall back.
//!
//! # Fallback
//!
//! Every product `s · L · R` of three `f32` is an integer multiple of 2⁻⁴⁴⁷ below 2⁸³², so the
//! fallback adds them, and then `W`, exactly into a 896-bit two's-complement fixed-point
//! accumulator ([`Acc`]). Its value is rounded to odd at 53 bits into an `f64`, then to the
//! base dtype with [`Target::round`]: rounding to odd with at least two more bits than the
//! target, then to nearest-even, is the correct rounding (Boldo & Melquiond, 2008).
//!
//! # Rounding an `f64` to the base dtype
//!
//! [`Target::round`]: F32 is Rust's `as f32` (IEEE round to nearest-even). BF16 and F16 round
//! to odd into an `f32` first, then to nearest-even with the crate's encoders, which is the
//! correct rounding of the `f64` by the same theorem (24 ≥ 11 + 2). Going through a plain
//! `as f32` would round twice and be wrong.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use safetensors::Dtype;
use serde::Serialize;

use super::apply::{update_rows, BaseTensorMut, Rows};
use super::dtype::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use super::error::{MergeMathError, Result};
use super::gemm::Product;

/// How a merge rounds.
///
/// ```
/// use peftkit_merge::Numerics;
/// assert_eq!(Numerics::default(), Numerics::Peft);
/// assert_eq!("exact".parse::<Numerics>().unwrap(), Numerics::Exact);
/// assert_eq!(Numerics::Exact.to_string(), "exact");
/// assert!("fast".parse::<Numerics>().is_err());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    /// peft 0.21.2's CPU arithmetic bit for bit (f32 GEMM in MKL's order and peft's roundings).
    #[default]
    Peft,
    /// One correct rounding of the exact result: identical bytes on every machine (the method
    /// and its proof: docs/formats.md, "Exact numerics").
    Exact,
}

impl Numerics {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Numerics::Peft => "peft",
            Numerics::Exact => "exact",
        }
    }
}

impl fmt::Display for Numerics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A numerics name that is neither `peft` nor `exact`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown numerics `{0}` (expected `peft` or `exact`)")]
pub struct ParseNumericsError(pub String);

impl FromStr for Numerics {
    type Err = ParseNumericsError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "peft" => Ok(Numerics::Peft),
            "exact" => Ok(Numerics::Exact),
            other => Err(ParseNumericsError(other.to_owned())),
        }
    }
}

/// Why exact numerics refuse `method` (DoRA, LoHa, LoKr, IA³ unmerge): their arithmetic is
/// not a sum of products, so "one correct rounding" has no cheap exact definition here.
pub fn refusal_reason(method: &str) -> String {
    format!(
        "{method} cannot be merged with numerics `exact` (only LoRA deltas and IA3 merges have \
         a correctly rounded definition); use numerics `peft`"
    )
}

/// The kernels' error for a merge exact numerics refuse (see [`refusal_reason`]).
pub fn refusal(what: &'static str, method: &str) -> MergeMathError {
    MergeMathError::Invalid {
        what,
        reason: refusal_reason(method),
    }
}

/// The base dtype the one rounding goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    F32,
    Bf16,
    F16,
}

impl Target {
    /// The target of a base dtype; F64 bases are refused (an F64 result would need more than
    /// the `f64` fast path can certify, and such checkpoints do not occur in practice).
    pub(crate) fn of(what: &'static str, dtype: Dtype) -> Result<Self> {
        match dtype {
            Dtype::F32 => Ok(Target::F32),
            Dtype::BF16 => Ok(Target::Bf16),
            Dtype::F16 => Ok(Target::F16),
            Dtype::F64 => Err(MergeMathError::Invalid {
                what,
                reason: "numerics `exact` supports F32, BF16 and F16 tensors, not F64".into(),
            }),
            other => Err(MergeMathError::UnsupportedDtype { what, dtype: other }),
        }
    }

    /// `x` (not NaN) rounded to nearest-even in the target format, as the `f32` holding it.
    #[inline(always)]
    pub(crate) fn round(self, x: f64) -> f32 {
        match self {
            Target::F32 => x as f32,
            Target::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(to_f32_odd(x))),
            Target::F16 => f16_bits_to_f32(f32_to_f16_bits(to_f32_odd(x))),
        }
    }

    /// `a · b` rounded once (the `f64` product of two `f32` is exact); NaN is canonical.
    #[inline(always)]
    pub(crate) fn product(self, a: f32, b: f32) -> f32 {
        let p = f64::from(a) * f64::from(b);
        if p.is_nan() {
            f32::NAN
        } else {
            self.round(p)
        }
    }
}

/// `x` rounded to odd at `f32` precision: truncated toward zero, with the last bit set when
/// that lost anything.
#[inline(always)]
fn to_f32_odd(x: f64) -> f32 {
    let r = x as f32;
    // `r` is the nearest f32; when it lies beyond x, the one below it in magnitude is the
    // truncation (this also turns an overflow to ±Inf into ±MAX). Branch-free, so that the
    // certification loop stays cheap.
    let inexact = f64::from(r) != x;
    let beyond = f64::from(r).abs() > x.abs();
    f32::from_bits((r.to_bits() - u32::from(beyond)) | u32::from(inexact))
}

/// Largest rank the fast path's bound is stated for (`(k+1)·u` must stay far below 1) and the
/// accumulator is sized for.
const MAX_RANK: usize = 1 << 20;

/// Which implementation runs, chosen once per process from `PEFTKIT_EXACT_KERNEL`
/// (`portable`, `exact-only`; anything else or unset: the fastest for this CPU). All give the
/// same bytes; the variable exists to check that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX2+FMA build of the fast path where the CPU has it, else the portable one.
    Auto,
    /// The fast path compiled for the baseline target.
    Portable,
    /// Every finite element through the exact accumulator.
    ExactOnly,
}

impl Kernel {
    fn from_env() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| match std::env::var("PEFTKIT_EXACT_KERNEL").as_deref() {
            Ok("portable") => Kernel::Portable,
            Ok("exact-only") => Kernel::ExactOnly,
            _ => Kernel::Auto,
        })
    }
}

/// How many elements took each path (for tests and measurements).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Certified by the `f64` fast path.
    pub fast: usize,
    /// Computed by the exact accumulator.
    pub fallback: usize,
    /// Left unchanged (exactly zero delta) or non-finite, decided without rounding.
    pub special: usize,
}

/// Adds `p` to `base` in place with exact numerics (see the module docs); with
/// `check_finite`, a NaN or ±Inf result is a [`MergeMathError::NonFinite`] error.
pub(crate) fn merge_lowrank(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    p: &Product<'_>,
    check_finite: bool,
) -> Result<Stats> {
    merge_lowrank_with(what, base, p, check_finite, Kernel::from_env())
}

/// [`merge_lowrank`] with an explicit kernel.
pub(crate) fn merge_lowrank_with(
    what: &'static str,
    base: &mut BaseTensorMut<'_>,
    p: &Product<'_>,
    check_finite: bool,
    kernel: Kernel,
) -> Result<Stats> {
    let target = Target::of(what, base.dtype)?;
    check_product(what, base, p)?;
    let counts = [const { AtomicUsize::new(0) }; 3];
    update_rows(what, base, p.n, check_finite, |first_row, rows, _| {
        let Rows::F32(w) = rows else {
            return Err(Target::of(what, Dtype::F64).unwrap_err());
        };
        let st = run_block(kernel, p, target, first_row, w);
        for (c, v) in counts.iter().zip([st.fast, st.fallback, st.special]) {
            c.fetch_add(v, Ordering::Relaxed);
        }
        Ok(())
    })?;
    let [fast, fallback, special] = counts.map(AtomicUsize::into_inner);
    Ok(Stats {
        fast,
        fallback,
        special,
    })
}

/// Checks the scale, the rank and that the product covers the base exactly.
fn check_product(what: &'static str, base: &BaseTensorMut<'_>, p: &Product<'_>) -> Result<()> {
    let total = base.validate(what, true)?;
    let invalid = |reason: String| Err(MergeMathError::Invalid { what, reason });
    if !p.scale.is_finite() {
        return invalid(format!("the scale {} is not finite", p.scale));
    }
    if p.k == 0 || p.k > MAX_RANK {
        return invalid(format!("rank {} is outside 1..={MAX_RANK}", p.k));
    }
    let rows_total = p.left.len() / p.k;
    let batch = rows_total.checked_div(p.rows).unwrap_or(0);
    if p.left.len() != rows_total * p.k
        || rows_total != batch * p.rows
        || p.right.len() != batch * p.k * p.n
        || total != rows_total * p.n
    {
        return invalid(format!(
            "a {rows_total}×{} product does not cover the {total} base elements",
            p.n
        ));
    }
    Ok(())
}

/// Dispatches one block of rows to the chosen build.
fn run_block(kernel: Kernel, p: &Product<'_>, t: Target, first_row: usize, w: &mut [f32]) -> Stats {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Auto && super::isa::isa() >= super::isa::Isa::Avx2 {
        // SAFETY: `Isa::Avx2` means the features enabled on `block_avx2` were detected.
        return unsafe { block_avx2(p, t, first_row, w) };
    }
    block(p, t, first_row, w, kernel != Kernel::ExactOnly)
}

/// [`block`] compiled with AVX2 and FMA, so the `f64` sums vectorise four lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(p: &Product<'_>, t: Target, first_row: usize, w: &mut [f32]) -> Stats {
    block(p, t, first_row, w, true)
}

/// `4u = 2⁻⁵¹`, the unit of the fast path's error bound.
const BOUND_UNIT: f64 = 2.0 * f64::EPSILON;

/// Columns summed together: two `f64` arrays of this length stay in L1 while the rank loop
/// streams over a panel of the right factor.
const CHUNK: usize = 64;

/// Merges base rows `first_row..` (decoded in `w`, rewritten with the rounded results).
#[inline(always)]
fn block(p: &Product<'_>, t: Target, first_row: usize, w: &mut [f32], certify: bool) -> Stats {
    let (k, n) = (p.k, p.n);
    let mut st = Stats::default();
    let (mut sum, mut abs) = ([0f64; CHUNK], [0f64; CHUNK]);
    for (q, wrow) in w.chunks_exact_mut(n).enumerate() {
        let g = first_row + q;
        let e = g / p.rows;
        let lrow = &p.left[g * k..(g + 1) * k];
        let right = &p.right[e * k * n..(e + 1) * k * n];
        for (c, wchunk) in wrow.chunks_mut(CHUNK).enumerate() {
            let j0 = c * CHUNK;
            let len = wchunk.len();
            sums(lrow, right, n, j0, &mut sum[..len], &mut abs[..len]);
            for (i, x) in wchunk.iter_mut().enumerate() {
                *x = match element(t, *x, p.scale, sum[i], abs[i], k, certify) {
                    Some((v, fast)) => {
                        if fast {
                            st.fast += 1;
                        } else {
                            st.special += 1;
                        }
                        v
                    }
                    None => {
                        st.fallback += 1;
                        exact_element(t, *x, p.scale, lrow, &right[j0 + i..], n)
                    }
                };
            }
        }
    }
    st
}

/// `sum[i] ≈ Σ_k l_k · r[k, j0+i]` and `abs[i] ≈ Σ_k |l_k · r[k, j0+i]|` in `f64` (each
/// product exact, each addition rounded), a register tile of columns at a time.
#[inline(always)]
fn sums(lrow: &[f32], right: &[f32], n: usize, j0: usize, sum: &mut [f64], abs: &mut [f64]) {
    let full = sum.len() / TILE * TILE;
    for t0 in (0..full).step_by(TILE) {
        let (s, a) = sums_tile::<TILE>(lrow, right, n, j0 + t0);
        sum[t0..t0 + TILE].copy_from_slice(&s);
        abs[t0..t0 + TILE].copy_from_slice(&a);
    }
    for t in full..sum.len() {
        let ([s], [a]) = sums_tile::<1>(lrow, right, n, j0 + t);
        (sum[t], abs[t]) = (s, a);
    }
}

/// Columns whose sums stay in registers through the rank loop (8 `ymm` accumulators).
const TILE: usize = 16;

/// The sums of columns `j..j + W`, accumulated in registers over the whole rank.
#[inline(always)]
fn sums_tile<const W: usize>(
    lrow: &[f32],
    right: &[f32],
    n: usize,
    j: usize,
) -> ([f64; W], [f64; W]) {
    let (mut s, mut a) = ([0f64; W], [0f64; W]);
    for (kk, &l) in lrow.iter().enumerate() {
        let (l, la) = (f64::from(l), f64::from(l.abs()));
        let r = &right[kk * n + j..kk * n + j + W];
        for t in 0..W {
            let x = f64::from(r[t]);
            s[t] += l * x;
            a[t] += la * x.abs();
        }
    }
    (s, a)
}

/// The result of one element from its `f64` sums: `Some((value, certified))`, or `None` when
/// the exact accumulator must decide. `certified` is false for the special cases (zero delta,
/// non-finite inputs), which need no rounding argument.
#[inline(always)]
fn element(
    t: Target,
    w: f32,
    scale: f32,
    sum: f64,
    abs: f64,
    k: usize,
    certify: bool,
) -> Option<(f32, bool)> {
    let s = f64::from(scale);
    if !w.is_finite() || !abs.is_finite() {
        // A NaN or ±Inf input: IEEE's answer does not depend on the order of the sum.
        let v = f64::from(w) + s * sum;
        return Some((if v.is_nan() { f32::NAN } else { t.round(v) }, false));
    }
    if s == 0.0 || abs == 0.0 {
        // Every product is exactly zero: W + 0 = W.
        return Some((w, false));
    }
    if !certify {
        return None;
    }
    let m = s * sum;
    let v = f64::from(w) + m;
    // 4u·(|s|·A·(k+1) + |m| + |v|): twice the error bound, which also covers the roundings of
    // computing it and of the endpoints (see the module docs).
    let bound = (s.abs() * abs * (k as f64 + 1.0) + m.abs() + v.abs()) * BOUND_UNIT;
    let lo = t.round(v - bound);
    let hi = t.round(v + bound);
    (lo.to_bits() == hi.to_bits()).then_some((lo, true))
}

/// One element computed exactly: `right` starts at the element's column, rows `n` apart.
fn exact_element(t: Target, w: f32, scale: f32, lrow: &[f32], right: &[f32], n: usize) -> f32 {
    let mut acc = Acc::default();
    let s = Parts::of(scale);
    for (kk, &l) in lrow.iter().enumerate() {
        let (l, r) = (Parts::of(l), Parts::of(right[kk * n]));
        let mag = u128::from(s.mant) * u128::from(l.mant) * u128::from(r.mant);
        if mag != 0 {
            acc.add(mag, s.exp + l.exp + r.exp, s.neg ^ l.neg ^ r.neg);
        }
    }
    if acc.is_zero() {
        // The products cancel exactly: the delta is zero and W stays as it is.
        return w;
    }
    let wp = Parts::of(w);
    // W = mant · 2^(exp − 149) = mant · 2^(exp + 298) · 2⁻⁴⁴⁷.
    acc.add(u128::from(wp.mant), wp.exp + 2 * F32_EXP_MIN, wp.neg);
    acc.round(t)
}

/// A finite `f32` is an integer multiple of 2⁻¹⁴⁹.
const F32_EXP_MIN: u32 = 149;

/// A finite `f32` as `±mant · 2^(exp − 149)`, `mant < 2²⁴`.
struct Parts {
    neg: bool,
    mant: u32,
    exp: u32,
}

impl Parts {
    #[inline(always)]
    fn of(x: f32) -> Parts {
        let b = x.to_bits();
        let field = (b >> 23) & 0xFF;
        let frac = b & 0x7F_FFFF;
        let (mant, exp) = if field == 0 {
            (frac, 0)
        } else {
            (frac | 0x80_0000, field - 1)
        };
        Parts {
            neg: b >> 31 == 1,
            mant,
            exp,
        }
    }
}

/// 64-bit limbs of the accumulator.
const LIMBS: usize = 14;

/// Fixed point value `Σ limbs[i]·2^(64i) · 2⁻⁴⁴⁷` in two's complement.
///
/// Bit 0 weighs 2⁻⁴⁴⁷ (a product of three `f32` is a multiple of 2⁻³·¹⁴⁹); a product is below
/// 2⁷²·2^(3·104), so `k ≤ 2²⁰` of them and `W` stay below 2⁸⁵², well inside the 895 value
/// bits.
#[derive(Default)]
struct Acc([u64; LIMBS]);

impl Acc {
    /// Adds (or subtracts) `mag · 2^shift` (in units of 2⁻⁴⁴⁷); `mag < 2⁷²`.
    #[inline]
    fn add(&mut self, mag: u128, shift: u32, neg: bool) {
        let (li, bo) = ((shift / 64) as usize, shift % 64);
        let shifted = mag << bo; // low 128 bits; the rest comes from `mag >> (128 − bo)`
        let top = if bo == 0 {
            0
        } else {
            (mag >> (128 - bo)) as u64
        };
        let parts = [shifted as u64, (shifted >> 64) as u64, top];
        let mut carry = false;
        for (i, limb) in self.0.iter_mut().enumerate().skip(li) {
            let p = parts.get(i - li).copied().unwrap_or(0);
            let c = u64::from(carry);
            let ((x, c1), (y, c2));
            if neg {
                (x, c1) = limb.overflowing_sub(p);
                (y, c2) = x.overflowing_sub(c);
            } else {
                (x, c1) = limb.overflowing_add(p);
                (y, c2) = x.overflowing_add(c);
            }
            *limb = y;
            carry = c1 || c2;
            if i >= li + 2 && !carry {
                break;
            }
        }
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|&l| l == 0)
    }

    /// The value rounded to the target: to odd at 53 bits into an `f64` first (exact exponent
    /// range: 2⁻⁴⁴⁷ ≤ |value| < 2⁴⁰⁵), then [`Target::round`]. Zero is `+0`.
    fn round(&self, t: Target) -> f32 {
        let neg = self.0[LIMBS - 1] >> 63 == 1;
        let mut mag = self.0;
        if neg {
            // Two's complement negation: invert, add one.
            let mut carry = true;
            for l in mag.iter_mut() {
                let (x, c) = (!*l).overflowing_add(u64::from(carry));
                *l = x;
                carry = c;
            }
        }
        let Some(top) = mag.iter().rposition(|&l| l != 0) else {
            return 0.0;
        };
        let high = top as u32 * 64 + 63 - mag[top].leading_zeros();
        let low = high.saturating_sub(52);
        let mut mant = bits_from(&mag, low) & ((1 << 53) - 1);
        if below_nonzero(&mag, low) {
            mant |= 1; // round to odd
        }
        // `mant < 2⁵³` converts exactly; the power of two is a normal f64.
        let scale = f64::from_bits(((i64::from(low) - 447 + 1023) as u64) << 52);
        let x = mant as f64 * scale;
        t.round(if neg { -x } else { x })
    }
}

/// The 64 bits of `mag` starting at bit `at`.
fn bits_from(mag: &[u64; LIMBS], at: u32) -> u64 {
    let (li, bo) = ((at / 64) as usize, at % 64);
    let lo = mag[li] >> bo;
    let hi = match (bo, mag.get(li + 1)) {
        (0, _) | (_, None) => 0,
        (_, Some(&next)) => next << (64 - bo),
    };
    lo | hi
}

/// Whether any bit of `mag` below bit `at` is set.
fn below_nonzero(mag: &[u64; LIMBS], at: u32) -> bool {
    let (li, bo) = ((at / 64) as usize, at % 64);
    mag[..li].iter().any(|&l| l != 0) || (bo > 0 && mag[li] & ((1u64 << bo) - 1) != 0)
}

#[cfg(test)]
#[path = "exact_tests.rs"]
mod tests;
