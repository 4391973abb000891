//! The FP8 row kernels of [`super::fp8_rows`] written with AVX-512 and AVX2 intrinsics
//! (x86-64 only): the cast to e4m3 with its error, the block max-abs of a BF16 row, and the
//! dequantization of a row straight into BF16.
//!
//! Each lane performs the operations of the scalar definitions in [`super::fp8`] and
//! [`super::fp8_rows`], in the same order and precision (one `f32` multiply by the scale, the
//! integer steps of the cast, the decode, one `f32` multiply by the inverse, the difference in
//! `f32`), so the results are the same bits; `fp8_tests.rs` holds every path to them. What
//! differs is only what cannot change a result:
//!
//! * torch's clamp to ±448 before the cast is left out: the cast saturates every value past
//!   448 to ±448 itself and keeps NaN (a test holds the two to the same byte on edge values);
//! * the value of each e4m3 byte times the inverse scale (to measure the error) is the byte's
//!   bits times `inv · 2^120` ([`back_factor`]), or, in blocks where that is not exact, the
//!   value taken from the cast's own steps; the byte is never decoded again;
//! * the error's maximum is taken lane-wise (the maximum of non-NaN values does not depend on
//!   its order), NaN tracked in a separate mask;
//! * the dequantization multiplies the byte's bits, moved into an `f32`'s places, by
//!   `scale · 2^120` ([`E4M3_BITS`]): the same exact product as the decoded value times the
//!   scale, so the same rounding, in 3 operations instead of the decode's 10 (user time of a
//!   kept FP8 merge on the AVX2 path 1.17 → 1.07 s, AVX-512 0.69 → 0.63 s, 7 interleaved
//!   rounds, medians);
//! * a BF16 row is read as is: its block max-abs is the integer maximum of the bit patterns
//!   without sign, which orders non-NaN values as their magnitudes do and is above `0x7f80`
//!   exactly when a NaN is present.
//!
//! Written by hand because the compiler vectorised the error, then kept in `f64`, only in part
//! (with spills): perf put `quantize_row` at 41 % of a kept-FP8 merge's cycles
//! (docs/architecture.md, "The FP8 merge").

use std::arch::x86_64::*;

use super::avx2::bf16_high;
use super::dtype::{bf16_bits_to_f32, f32_to_bf16_bits};
use super::fp8::e4m3_to_f32;
use super::fp8_rows::{quantize_one, select_max, BlockMax, MaxError, Row};

/// `f32::from_bits(DENORM)` shifts a value below e4m3's smallest normal so that the add rounds
/// its mantissa to e4m3's subnormal step (see [`super::fp8::f32_to_e4m3`]).
const DENORM: i32 = 141 << 23;
/// Magnitudes below this (2^-6) take the subnormal path.
const SMALLEST_NORMAL: i32 = 121 << 23;
/// Added to a normal magnitude to rebias the exponent and round half to even (plus the odd bit).
///
/// The casts saturate with one unsigned `min` of the sum's shifted bits against 0x7e (448), with
/// no mask and no test for the values past 480: from the smallest normal up, the magnitude plus
/// `REBIAS` and the odd bit never wraps and grows with the magnitude, so every magnitude that
/// rounds past 448 (464 rounds up to the NaN code 0x7f; infinity gives 0x438) shifts to 0x7f or
/// more; below the smallest normal the subnormal path replaces the lane. `fp8_tests.rs` holds
/// the saturation bounds to the scalar definition.
const REBIAS: i32 = ((7u32.wrapping_sub(127) << 23).wrapping_add(0x7ffff)) as i32;

/// A sign-extended e4m3 byte shifted left by 20, masked with this, has the byte's sign,
/// exponent and mantissa in an `f32`'s places: read as an `f32`, it is the e4m3 value times
/// 2^-120, subnormals included (they land on `f32` subnormals, whose step is as fine).
const E4M3_BITS: i32 = 0x87f0_0000_u32 as i32;

/// The block scale `s` times 2^120, the factor that takes [`E4M3_BITS`] to `e4m3 × s` in one
/// multiply; `None` when it is not finite (`|s| ≥ 2^8`, or `s` not finite), and the block takes
/// the scalar steps. A power-of-two scaling is exact, so `bits × (s · 2^120)` is the same exact
/// product as `e4m3_to_f32(w) × s` and rounds to the same `f32`.
fn scaled_by_2_120(s: f32) -> Option<f32> {
    let s = s * f32::from_bits((127 + 120) << 23);
    s.is_finite().then_some(s)
}

/// Elements of one block of `bn` columns handled by whole vectors of `lanes`.
fn whole(bn: usize, lanes: usize) -> usize {
    bn / lanes * lanes
}

// ---------------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------------

/// 16 elements at `at` of a row, widened to `f32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn load16<const BF16: bool>(p: *const u8, at: usize) -> __m512 {
    // SAFETY: the caller passes `at + 16` within the row `p` points to.
    unsafe {
        if BF16 {
            let h = _mm256_loadu_si256(p.add(at * 2) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_loadu_ps(p.add(at * 4) as *const f32)
        }
    }
}

/// The e4m3 bytes of 16 lanes (in the low byte of each) and their values (`e4m3_to_f32` of
/// them), taken from the cast's own steps rather than decoded again: a normal code's value is
/// its bits moved back into place, a subnormal's is the cast's sum less the shift it added
/// (exact), a saturated one's 448, a NaN's NaN.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
fn cast16(y: __m512) -> (__m512i, __m512) {
    let set = _mm512_set1_epi32;
    let bits = _mm512_castps_si512(y);
    let sign = _mm512_and_si512(bits, set(i32::MIN));
    let mag = _mm512_and_si512(bits, set(i32::MAX));
    let sum = _mm512_add_ps(_mm512_castsi512_ps(mag), _mm512_castsi512_ps(set(DENORM)));
    let subnormal = _mm512_sub_epi32(_mm512_castps_si512(sum), set(DENORM));
    let odd = _mm512_and_si512(_mm512_srli_epi32::<20>(mag), set(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(mag, set(REBIAS)), odd);
    // Saturation in one `min`: see `REBIAS`.
    let normal = _mm512_min_epu32(_mm512_srli_epi32::<20>(rounded), set(0x7e));
    let small = _mm512_cmplt_epu32_mask(mag, set(SMALLEST_NORMAL));
    let nan = _mm512_cmpgt_epu32_mask(mag, set(0x7f80_0000));
    let code = _mm512_mask_blend_epi32(small, normal, subnormal);
    let code = _mm512_mask_mov_epi32(code, nan, set(0x7f));
    let q = _mm512_or_si512(code, _mm512_srli_epi32::<24>(sign));
    let value = _mm512_castsi512_ps(_mm512_add_epi32(
        _mm512_slli_epi32::<20>(normal),
        set(120 << 23),
    ));
    let value = _mm512_mask_blend_ps(
        small,
        value,
        _mm512_sub_ps(sum, _mm512_castsi512_ps(set(DENORM))),
    );
    let value = _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(f32::NAN));
    (
        q,
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign)),
    )
}

/// [`super::fp8_rows::quantize_row`] with AVX-512.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL and AVX2; `v` and `out` hold `scales.len() * bn`
/// elements and `invs` as many as `scales`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
pub(super) unsafe fn quantize_row_avx512(
    v: Row<'_>,
    scales: &[f32],
    invs: &[f32],
    bn: usize,
    out: &mut [u8],
    err: &mut MaxError,
) {
    // SAFETY: forwarded.
    unsafe {
        match v {
            Row::F32(v) => {
                quantize512::<false>(v.as_ptr() as *const u8, scales, invs, bn, out, err)
            }
            Row::Bf16(b) => quantize512::<true>(b.as_ptr(), scales, invs, bn, out, err),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn quantize512<const BF16: bool>(
    v: *const u8,
    scales: &[f32],
    invs: &[f32],
    bn: usize,
    out: &mut [u8],
    err: &mut MaxError,
) {
    let mut acc = Acc512 {
        max: _mm512_setzero_ps(),
        nans: 0,
    };
    let mut tail = MaxError::default();
    let full = whole(bn, 16);
    let op = out.as_mut_ptr();
    for (b, (&s, &inv)) in scales.iter().zip(invs).enumerate() {
        let start = b * bn;
        let range = start..start + full;
        // SAFETY: the ranges lie within the block, inside the row and `out`.
        unsafe {
            match back_factor(s, inv) {
                Some(iv) => block512::<BF16, true>(v, range, (s, iv), op, &mut acc),
                None => block512::<BF16, false>(v, range, (s, inv), op, &mut acc),
            }
            // A block of 128 columns has no tail: the call with an empty range cost 4 % of this
            // kernel's samples.
            if full < bn {
                quantize_tail::<BF16>(v, (s, inv), start + full..start + bn, out, &mut tail);
            }
        }
    }
    err.fold(f64::from(_mm512_reduce_max_ps(acc.max)));
    err.merge(tail);
    if acc.nans != 0 {
        err.fold(f64::NAN);
    }
}

/// The running error of [`quantize512`]: the lanes' maxima, and which lanes saw a NaN.
struct Acc512 {
    max: __m512,
    nans: __mmask16,
}

/// Whole vectors `range` of one block of [`quantize512`], scale `s`. With `SCALED` the value of
/// each e4m3 byte times the inverse scale is `bits × iv`, `iv` the inverse times 2^120
/// ([`back_factor`]); otherwise `value × iv`, `iv` the inverse.
///
/// # Safety
/// `range` lies within the row `v` points to and `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn block512<const BF16: bool, const SCALED: bool>(
    v: *const u8,
    range: std::ops::Range<usize>,
    (s, iv): (f32, f32),
    op: *mut u8,
    acc: &mut Acc512,
) {
    let (sv, iv) = (_mm512_set1_ps(s), _mm512_set1_ps(iv));
    for j in range.step_by(16) {
        // SAFETY: `j + 16 ≤ range.end`, within the row and `out` (the caller's contract).
        unsafe {
            let x = load16::<BF16>(v, j);
            let (q, value) = cast16(_mm512_mul_ps(x, sv));
            _mm_storeu_si128(op.add(j) as *mut __m128i, _mm512_cvtepi32_epi8(q));
            let value = match SCALED {
                true => e4m3_bits16(q),
                false => value,
            };
            let back = _mm512_mul_ps(value, iv);
            // `max(d, acc)` keeps `acc` when `d` is NaN; the mask records it.
            let d = _mm512_abs_ps(_mm512_sub_ps(back, x));
            acc.nans |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(d, d);
            acc.max = _mm512_max_ps(d, acc.max);
        }
    }
}

/// The e4m3 bytes `q` of 16 lanes (sign at bit 7) as [`E4M3_BITS`] in an `f32`: the value
/// times 2^-120. A NaN code reads as 480 · 2^-120: see [`back_factor`] for why no NaN code
/// reaches it.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
fn e4m3_bits16(q: __m512i) -> __m512 {
    let bits = _mm512_srai_epi32::<4>(_mm512_slli_epi32::<24>(q));
    _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(E4M3_BITS)))
}

/// The factor that takes a cast's e4m3 bits ([`E4M3_BITS`]) to its value times the block's
/// inverse scale `inv` in one multiply (`inv · 2^120`, exact), when no lane can hold a NaN code
/// that its input does not explain: `None` when `inv · 2^120` is not finite, or the scale `s`
/// is zero or not finite. Otherwise a lane's `v · s` is NaN only where `v` is, and its error is
/// NaN from `v` alone, as it is from the decoded NaN. (`block_scales` gives such scales only
/// for blocks with an infinite or tiny maximum; they take the decoded values.)
fn back_factor(s: f32, inv: f32) -> Option<f32> {
    if s.is_finite() && s != 0.0 {
        scaled_by_2_120(inv)
    } else {
        None
    }
}

/// Elements `range` of a row (`v`) quantized one at a time into `out`, their error folded into
/// `err`: the end of a block short of a whole vector.
///
/// # Safety
/// `range` lies within the row `v` points to; `out` is as long as the row.
unsafe fn quantize_tail<const BF16: bool>(
    v: *const u8,
    (s, inv): (f32, f32),
    range: std::ops::Range<usize>,
    out: &mut [u8],
    err: &mut MaxError,
) {
    let start = range.start;
    for (j, q) in out[range].iter_mut().enumerate() {
        // SAFETY: the caller's contract.
        let x = unsafe { load_one::<BF16>(v, start + j) };
        let (byte, e) = quantize_one(x, s, inv);
        *q = byte;
        err.fold(e);
    }
}

/// Element `at` of a row, widened to `f32`.
///
/// # Safety
/// `at` lies within the row `p` points to.
#[inline(always)]
unsafe fn load_one<const BF16: bool>(p: *const u8, at: usize) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        if BF16 {
            bf16_bits_to_f32(u16::from_le_bytes(*(p.add(at * 2) as *const [u8; 2])))
        } else {
            f32::from_le_bytes(*(p.add(at * 4) as *const [u8; 4]))
        }
    }
}

/// [`super::fp8_rows::max_abs_row`] of a BF16 row with AVX-512: the integer maximum of the
/// magnitudes' bit patterns, 32 at a time.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL and AVX2; `row` holds `max`'s blocks of `bn` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
pub(super) unsafe fn max_abs_bf16_avx512(row: &[u8], bn: usize, max: &mut BlockMax) {
    let full = whole(bn, 32);
    let p = row.as_ptr();
    for b in 0..max.len() {
        let start = b * bn;
        let mut acc = _mm512_setzero_si512();
        let mut j = start;
        while j < start + full {
            // SAFETY: `j + 32 ≤ (b + 1) · bn`: inside `row` (two bytes per element).
            let h = unsafe { _mm512_loadu_si512(p.add(j * 2) as *const __m512i) };
            acc = _mm512_max_epu16(acc, _mm512_and_si512(h, _mm512_set1_epi16(0x7fff)));
            j += 32;
        }
        let acc = _mm256_max_epu16(
            _mm512_castsi512_si256(acc),
            _mm512_extracti64x4_epi64::<1>(acc),
        );
        let m = max_epu16(_mm_max_epu16(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256::<1>(acc),
        ));
        let tail = if full < bn {
            bf16_tail(row, start + full, start + bn)
        } else {
            0
        };
        max.fold_bf16(b, [m, tail]);
    }
}

/// The largest of 8 `u16` lanes, by the one horizontal instruction there is (`phminposuw`, the
/// smallest) on their complements: a row's block is 8 vectors, and storing the lanes to fold
/// them one by one took as long as the vectors.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn max_epu16(x: __m128i) -> u32 {
    let ones = _mm_set1_epi32(-1);
    let smallest = _mm_minpos_epu16(_mm_xor_si128(x, ones));
    u32::from(!(_mm_cvtsi128_si32(smallest) as u16))
}

/// The largest magnitude bit pattern of BF16 elements `from..to` of `row`.
fn bf16_tail(row: &[u8], from: usize, to: usize) -> u32 {
    row[from * 2..to * 2]
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]) & 0x7fff))
        .max()
        .unwrap_or(0)
}

/// `f32_to_bf16_bits(e4m3_to_f32(w) * scale)` of one row into `out` (BF16 bytes) with
/// AVX-512: [`super::fp8_rows::dequantize_row`] and the encode fused.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL and AVX2; `w` holds `scales.len() * bn` elements and
/// `out` two bytes for each.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
pub(super) unsafe fn dequantize_bf16_avx512(w: &[u8], scales: &[f32], bn: usize, out: &mut [u8]) {
    let full = whole(bn, 16);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    for (b, &s) in scales.iter().enumerate() {
        let start = b * bn;
        let Some(s) = scaled_by_2_120(s) else {
            dequantize_bf16_tail(w, s, start..start + bn, out);
            continue;
        };
        let sv = _mm512_set1_ps(s);
        let mut j = start;
        while j < start + full {
            // SAFETY: `j + 16 ≤ (b + 1) · bn`, within `w` and (two bytes each) `out`.
            unsafe {
                // The e4m3 bytes were last touched by the writer's copy: fetch them ahead
                // (perf put half of this loop's cycles on the load before).
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(j + 1024) as *const i8);
                let bytes = _mm_loadu_si128(wp.add(j) as *const __m128i);
                let q = _mm512_slli_epi32::<20>(_mm512_cvtepi8_epi32(bytes));
                let bits = _mm512_and_si512(q, _mm512_set1_epi32(E4M3_BITS));
                let x = _mm512_mul_ps(_mm512_castsi512_ps(bits), sv);
                // Round to nearest even on the bits, as `f32_to_bf16_bits`; a NaN code (the
                // only NaN here: `x` is finite otherwise) → 0xFFFF.
                let u = _mm512_castps_si512(x);
                let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
                let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
                let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(u, bias));
                let mag = _mm_and_si128(bytes, _mm_set1_epi8(0x7f));
                let nan = _mm_cmpeq_epi8_mask(mag, _mm_set1_epi8(0x7f));
                let r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0xffff));
                _mm256_storeu_si256(op.add(j * 2) as *mut __m256i, _mm512_cvtepi32_epi16(r));
            }
            j += 16;
        }
        if full < bn {
            dequantize_bf16_tail(w, scales[b], start + full..start + bn, out);
        }
    }
}

/// Elements `range` of [`dequantize_bf16_avx512`] and [`dequantize_bf16_avx2`], one at a time.
fn dequantize_bf16_tail(w: &[u8], s: f32, range: std::ops::Range<usize>, out: &mut [u8]) {
    for j in range {
        let h = f32_to_bf16_bits(e4m3_to_f32(w[j]) * s);
        out[j * 2..j * 2 + 2].copy_from_slice(&h.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

/// [`cast16`] on 8 lanes. Magnitudes fit in 31 bits, so signed compares order them.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn cast8(y: __m256) -> (__m256i, __m256) {
    let set = _mm256_set1_epi32;
    let bits = _mm256_castps_si256(y);
    let sign = _mm256_and_si256(bits, set(i32::MIN));
    let mag = _mm256_and_si256(bits, set(i32::MAX));
    let sum = _mm256_add_ps(_mm256_castsi256_ps(mag), _mm256_castsi256_ps(set(DENORM)));
    let subnormal = _mm256_sub_epi32(_mm256_castps_si256(sum), set(DENORM));
    let odd = _mm256_and_si256(_mm256_srli_epi32::<20>(mag), set(1));
    let rounded = _mm256_add_epi32(_mm256_add_epi32(mag, set(REBIAS)), odd);
    // Saturation in one `min`: see `REBIAS`.
    let normal = _mm256_min_epu32(_mm256_srli_epi32::<20>(rounded), set(0x7e));
    let small = _mm256_cmpgt_epi32(set(SMALLEST_NORMAL), mag);
    let nan = _mm256_cmpgt_epi32(mag, set(0x7f80_0000));
    let code = _mm256_blendv_epi8(normal, subnormal, small);
    let code = _mm256_blendv_epi8(code, set(0x7f), nan);
    let q = _mm256_or_si256(code, _mm256_srli_epi32::<24>(sign));
    let value = _mm256_add_epi32(_mm256_slli_epi32::<20>(normal), set(120 << 23));
    let sub = _mm256_sub_ps(sum, _mm256_castsi256_ps(set(DENORM)));
    let value = _mm256_blendv_ps(_mm256_castsi256_ps(value), sub, _mm256_castsi256_ps(small));
    let value = _mm256_blendv_ps(value, _mm256_set1_ps(f32::NAN), _mm256_castsi256_ps(nan));
    (
        q,
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(value), sign)),
    )
}

/// [`super::fp8_rows::quantize_row`] with AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `v` and `out` hold `scales.len() * bn` elements and `invs`
/// as many as `scales`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_row_avx2(
    v: Row<'_>,
    scales: &[f32],
    invs: &[f32],
    bn: usize,
    out: &mut [u8],
    err: &mut MaxError,
) {
    // SAFETY: forwarded.
    unsafe {
        match v {
            Row::F32(v) => {
                quantize256::<false>(v.as_ptr() as *const u8, scales, invs, bn, out, err)
            }
            Row::Bf16(b) => quantize256::<true>(b.as_ptr(), scales, invs, bn, out, err),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn quantize256<const BF16: bool>(
    v: *const u8,
    scales: &[f32],
    invs: &[f32],
    bn: usize,
    out: &mut [u8],
    err: &mut MaxError,
) {
    let zero = Acc256 {
        max: _mm256_setzero_ps(),
        nans: _mm256_setzero_ps(),
    };
    // One per half of a 16-element step, so that the two maxima do not wait on each other.
    let mut acc = [zero, zero];
    let mut tail = MaxError::default();
    let full = whole(bn, 16);
    let op = out.as_mut_ptr();
    for (b, (&s, &inv)) in scales.iter().zip(invs).enumerate() {
        let start = b * bn;
        let range = start..start + full;
        // SAFETY: the ranges lie within the block, inside the row and `out`.
        unsafe {
            match back_factor(s, inv) {
                Some(iv) => block256::<BF16, true>(v, range, (s, iv), op, &mut acc),
                None => block256::<BF16, false>(v, range, (s, inv), op, &mut acc),
            }
            // A block of 128 columns has no tail: the call with an empty range cost 4 % of this
            // kernel's samples.
            if full < bn {
                quantize_tail::<BF16>(v, (s, inv), start + full..start + bn, out, &mut tail);
            }
        }
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 `f32`.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(acc[0].max, acc[1].max)) };
    err.fold(f64::from(lanes.iter().fold(0.0, |m, &l| select_max(l, m))));
    err.merge(tail);
    if _mm256_movemask_ps(_mm256_or_ps(acc[0].nans, acc[1].nans)) != 0 {
        err.fold(f64::NAN);
    }
}

/// [`Acc512`] on AVX2, the NaN lanes as a mask vector.
#[derive(Clone, Copy)]
struct Acc256 {
    max: __m256,
    nans: __m256,
}

/// [`block512`] with AVX2, 16 elements a step: one load of a BF16 row's 32 bytes, widened in
/// two halves within each 128-bit lane (elements 0–3 and 8–11, then 4–7 and 12–15), whose
/// bytes [`bytes16`] puts back in order.
///
/// # Safety
/// `range` lies within the row `v` points to and `out`; its length is a multiple of 16.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block256<const BF16: bool, const SCALED: bool>(
    v: *const u8,
    range: std::ops::Range<usize>,
    (s, iv): (f32, f32),
    op: *mut u8,
    acc: &mut [Acc256; 2],
) {
    let (sv, iv) = (_mm256_set1_ps(s), _mm256_set1_ps(iv));
    for j in range.step_by(16) {
        // SAFETY: `j + 16 ≤ range.end`, within the row and `out` (the caller's contract).
        unsafe {
            let (xa, xb) = load8x2::<BF16>(v, j);
            let qa = cast_measured::<SCALED>(xa, (sv, iv), &mut acc[0]);
            let qb = cast_measured::<SCALED>(xb, (sv, iv), &mut acc[1]);
            _mm_storeu_si128(op.add(j) as *mut __m128i, bytes16::<BF16>(qa, qb));
        }
    }
}

/// 8 values `x` cast to e4m3 with scale `sv` (the bytes in the low byte of each lane), their
/// error against `iv` ([`block512`]'s `iv`) folded into `acc`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn cast_measured<const SCALED: bool>(
    x: __m256,
    (sv, iv): (__m256, __m256),
    acc: &mut Acc256,
) -> __m256i {
    let (q, value) = cast8(_mm256_mul_ps(x, sv));
    let value = match SCALED {
        true => e4m3_bits8(q),
        false => value,
    };
    let back = _mm256_mul_ps(value, iv);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let d = _mm256_and_ps(_mm256_sub_ps(back, x), abs);
    // `max(d, acc)` keeps `acc` when `d` is NaN; the mask records it.
    acc.nans = _mm256_or_ps(acc.nans, _mm256_cmp_ps::<_CMP_UNORD_Q>(d, d));
    acc.max = _mm256_max_ps(d, acc.max);
    q
}

/// 16 elements at `at` of a row, widened to `f32` in two vectors: for BF16, elements 0–3 and
/// 8–11, then 4–7 and 12–15 (the halves `unpack` gives); for `f32`, 0–7 then 8–15.
///
/// # Safety
/// `at + 16` lies within the row `p` points to.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load8x2<const BF16: bool>(p: *const u8, at: usize) -> (__m256, __m256) {
    // SAFETY: the caller's contract.
    unsafe {
        if BF16 {
            let h = _mm256_loadu_si256(p.add(at * 2) as *const __m256i);
            let zero = _mm256_setzero_si256();
            (
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, h)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, h)),
            )
        } else {
            let p = p.add(at * 4) as *const f32;
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
    }
}

/// The bytes of [`load8x2`]'s two vectors' codes (each in the low byte of an `i32` lane), in
/// element order. The two packs keep each 128-bit lane's values apart; the permute picks the
/// 4-byte groups in the order [`load8x2`] took the elements.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn bytes16<const BF16: bool>(qa: __m256i, qb: __m256i) -> __m128i {
    // Codes are 0..=255, so the unsigned saturating packs are exact.
    let words = _mm256_packus_epi32(qa, qb);
    let bytes = _mm256_packus_epi16(words, words);
    let order = match BF16 {
        true => _mm256_setr_epi32(0, 1, 4, 5, 0, 0, 0, 0),
        false => _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0),
    };
    _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(bytes, order))
}

/// [`e4m3_bits16`] on 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn e4m3_bits8(q: __m256i) -> __m256 {
    let bits = _mm256_srai_epi32::<4>(_mm256_slli_epi32::<24>(q));
    _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(E4M3_BITS)))
}

/// [`max_abs_bf16_avx512`] with AVX2, 16 at a time.
///
/// # Safety
/// The CPU must have AVX2; `row` holds `max`'s blocks of `bn` elements.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn max_abs_bf16_avx2(row: &[u8], bn: usize, max: &mut BlockMax) {
    let full = whole(bn, 16);
    let p = row.as_ptr();
    for b in 0..max.len() {
        let start = b * bn;
        let mut acc = _mm256_setzero_si256();
        let mut j = start;
        while j < start + full {
            // SAFETY: `j + 16 ≤ (b + 1) · bn`: inside `row` (two bytes per element).
            let h = unsafe { _mm256_loadu_si256(p.add(j * 2) as *const __m256i) };
            acc = _mm256_max_epu16(acc, _mm256_and_si256(h, _mm256_set1_epi16(0x7fff)));
            j += 16;
        }
        let m = max_epu16(_mm_max_epu16(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256::<1>(acc),
        ));
        let tail = if full < bn {
            bf16_tail(row, start + full, start + bn)
        } else {
            0
        };
        max.fold_bf16(b, [m, tail]);
    }
}

/// [`dequantize_bf16_avx512`] with AVX2, 16 elements at a time (one load of bytes, one pack of
/// the two halves' BF16, and one test for NaN codes, which real weights do not hold).
///
/// # Safety
/// The CPU must have AVX2; `w` holds `scales.len() * bn` elements and `out` two bytes for each.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dequantize_bf16_avx2(w: &[u8], scales: &[f32], bn: usize, out: &mut [u8]) {
    let full = whole(bn, 16);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    for (b, &s) in scales.iter().enumerate() {
        let start = b * bn;
        let Some(s) = scaled_by_2_120(s) else {
            dequantize_bf16_tail(w, s, start..start + bn, out);
            continue;
        };
        let sv = _mm256_set1_ps(s);
        let mut j = start;
        while j < start + full {
            // SAFETY: `j + 16 ≤ (b + 1) · bn`, within `w` and (two bytes each) `out`.
            unsafe {
                let bytes = _mm_loadu_si128(wp.add(j) as *const __m128i);
                let mut lo = bf16_rounding8(_mm256_cvtepi8_epi32(bytes), sv);
                let mut hi =
                    bf16_rounding8(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(bytes, bytes)), sv);
                // A NaN code's lanes all ones, so 0xFFFF once shifted.
                let mag = _mm_and_si128(bytes, _mm_set1_epi8(0x7f));
                let nan = _mm_cmpeq_epi8(mag, _mm_set1_epi8(0x7f));
                if _mm_movemask_epi8(nan) != 0 {
                    lo = _mm256_or_si256(lo, _mm256_cvtepi8_epi32(nan));
                    let nan_hi = _mm_unpackhi_epi64(nan, nan);
                    hi = _mm256_or_si256(hi, _mm256_cvtepi8_epi32(nan_hi));
                }
                let (lo, hi) = (_mm256_srli_epi32::<16>(lo), _mm256_srli_epi32::<16>(hi));
                // Every lane is ≤ 0xFFFF, so the unsigned pack is exact; it packs within each
                // 128-bit half, and the permute puts the quarters back in order.
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(lo, hi));
                _mm256_storeu_si256(op.add(j * 2) as *mut __m256i, packed);
            }
            j += 16;
        }
        if full < bn {
            dequantize_bf16_tail(w, scales[b], start + full..start + bn, out);
        }
    }
}

/// 8 e4m3 bytes (sign-extended into `i32` lanes) times `sv` (the scale times 2^120), rounded to
/// BF16 by [`bf16_high`]: the BF16 in the high half of each lane. The product is finite
/// (`scaled_by_2_120`); a NaN code reads as a finite value here, and its caller marks it.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn bf16_rounding8(q: __m256i, sv: __m256) -> __m256i {
    let bits = _mm256_and_si256(_mm256_slli_epi32::<20>(q), _mm256_set1_epi32(E4M3_BITS));
    bf16_high(_mm256_mul_ps(_mm256_castsi256_ps(bits), sv))
}
