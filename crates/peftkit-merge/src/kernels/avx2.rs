//! The fused plain-merge kernel written with AVX2, FMA and F16C intrinsics (x86-64 only), for
//! CPUs without AVX-512 (AMD Zen 2/3, Intel client cores).
//!
//! It is [`super::avx512`] at half the width, with the same operations on every element (`fma`
//! over each rank block in increasing order, blocks added left to right, one `f32` multiply by
//! the scale, one `f32` add to the decoded base element, one rounding with torch's rules), so its
//! results are bit-identical; a test compares them. The generic AVX2 build of the tile
//! ([`super::gemm`]) converts BF16 one element at a time and has no F16 path at all.
//!
//! A register tile is 6 rows × 16 columns (two `ymm` per row: 12 accumulators of the 16
//! registers); each rank step loads two vectors of the right factor and broadcasts 6 elements
//! of the left one.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx512::BaseType;
use super::dtype::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use super::isa::{isa, Isa};

/// Whether this process may run [`add_rows`].
pub(crate) fn available() -> bool {
    isa() >= Isa::Avx2
}

/// Adds `scale · left @ right` (`rows × k` times `k × n`, reduced in `blocks`) to `base`, the
/// little-endian bytes of a `rows × n` tensor of type `ty`.
///
/// # Panics
/// If the slice lengths do not match the dimensions (callers check shapes first), or if
/// [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rows(
    ty: BaseType,
    left: &[f32],
    right: &[f32],
    (rows, k, n): (usize, usize, usize),
    blocks: &[Range<usize>],
    scale: f32,
    base: &mut [u8],
) {
    assert!(available(), "the AVX2 kernel needs avx2, fma and f16c");
    assert_eq!(left.len(), rows * k, "left factor length");
    assert_eq!(right.len(), k * n, "right factor length");
    assert_eq!(base.len(), rows * n * ty.size(), "base length");
    assert!(
        blocks.iter().all(|b| b.start <= b.end && b.end <= k),
        "blocks within the rank"
    );
    // SAFETY: the CPU features were checked, and every pointer offset below stays inside the
    // slices whose lengths were just checked (rows < `rows`, columns < `n`, rank < `k`).
    unsafe {
        match ty {
            BaseType::F32 => kernel::<0>(left, right, rows, k, n, blocks, scale, base),
            BaseType::Bf16 => kernel::<1>(left, right, rows, k, n, blocks, scale, base),
            BaseType::F16 => kernel::<2>(left, right, rows, k, n, blocks, scale, base),
        }
    }
}

/// Rows per register tile.
const MR: usize = 6;
/// Columns per register tile.
const NR: usize = 16;
/// Elements of `right` per column panel (≈128 KiB): the panel stays in L2 while the rows of the
/// block stream past it.
const PANEL_ELEMS: usize = 32 * 1024;

/// `T` selects the base type: 0 = F32, 1 = BF16, 2 = F16.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const T: u8>(
    left: &[f32],
    right: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    blocks: &[Range<usize>],
    scale: f32,
    base: &mut [u8],
) {
    // SAFETY: every offset stays inside `left` (rows × k), `right` (k × n) and `base` (rows × n
    // elements), whose lengths `add_rows` checked; the CPU features were checked there too.
    unsafe {
        if n == 0 || rows == 0 {
            return;
        }
        let panel = ((PANEL_ELEMS / k.max(1)).max(NR) / NR * NR).min(n.div_ceil(NR) * NR);
        let (lp, rp, bp) = (left.as_ptr(), right.as_ptr(), base.as_mut_ptr());
        let mut j0 = 0;
        while j0 < n {
            let j1 = n.min(j0 + panel);
            let full_end = j0 + (j1 - j0) / NR * NR;
            let mut q = 0;
            while q + MR <= rows {
                tile::<T, MR>(lp, rp, bp, k, n, q, j0..full_end, blocks, scale);
                q += MR;
            }
            while q < rows {
                tile::<T, 1>(lp, rp, bp, k, n, q, j0..full_end, blocks, scale);
                q += 1;
            }
            // Column tail (fewer than 16 columns): the same operations, one element at a time.
            for j in full_end..j1 {
                for row in 0..rows {
                    let mut tot = 0f32;
                    for (bi, blk) in blocks.iter().enumerate() {
                        let mut acc = 0f32;
                        for kk in blk.clone() {
                            acc = (*lp.add(row * k + kk)).mul_add(*rp.add(kk * n + j), acc);
                        }
                        tot = if bi == 0 { acc } else { tot + acc };
                    }
                    add_one::<T>(bp, row * n + j, tot * scale);
                }
            }
            j0 = j1;
        }
    }
}

/// Rows `row0..row0 + Q`, columns `cols` (a multiple of 16 wide).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const T: u8, const Q: usize>(
    lp: *const f32,
    rp: *const f32,
    bp: *mut u8,
    k: usize,
    n: usize,
    row0: usize,
    cols: Range<usize>,
    blocks: &[Range<usize>],
    scale: f32,
) {
    // SAFETY: the caller (`kernel`) passes rows `row0..row0 + Q` < rows and 16-wide column
    // steps inside `cols` ⊆ 0..n, so every load and store stays inside the checked slices.
    unsafe {
        let vscale = _mm256_set1_ps(scale);
        let mut j = cols.start;
        while j < cols.end {
            let mut tot = [[_mm256_setzero_ps(); 2]; Q];
            for (bi, blk) in blocks.iter().enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 2]; Q];
                for kk in blk.clone() {
                    let r0 = _mm256_loadu_ps(rp.add(kk * n + j));
                    let r1 = _mm256_loadu_ps(rp.add(kk * n + j + 8));
                    for (q, a) in acc.iter_mut().enumerate() {
                        let c = _mm256_broadcast_ss(&*lp.add((row0 + q) * k + kk));
                        a[0] = _mm256_fmadd_ps(c, r0, a[0]);
                        a[1] = _mm256_fmadd_ps(c, r1, a[1]);
                    }
                }
                if bi == 0 {
                    tot = acc;
                } else {
                    for (t, a) in tot.iter_mut().zip(&acc) {
                        t[0] = _mm256_add_ps(t[0], a[0]);
                        t[1] = _mm256_add_ps(t[1], a[1]);
                    }
                }
            }
            for (q, t) in tot.iter().enumerate() {
                let at = (row0 + q) * n + j;
                add8::<T>(bp, at, _mm256_mul_ps(t[0], vscale));
                add8::<T>(bp, at + 8, _mm256_mul_ps(t[1], vscale));
            }
            j += NR;
        }
    }
}

/// `base[at..at + 8] = round(f32(base[at..at + 8]) + d)`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add8<const T: u8>(bp: *mut u8, at: usize, d: __m256) {
    // SAFETY: the caller passes `at + 8 ≤ rows · n`, so the 8 elements at `at` lie inside `base`.
    unsafe {
        match T {
            0 => {
                let p = bp.add(at * 4) as *mut f32;
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), d));
            }
            1 => {
                let p = bp.add(at * 2) as *mut __m128i;
                let x = _mm256_add_ps(bf16x8_to_f32(_mm_loadu_si128(p)), d);
                _mm_storeu_si128(p, f32x8_to_bf16(x));
            }
            _ => {
                let p = bp.add(at * 2) as *mut __m128i;
                let x = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)), d);
                // F16C rounding: nearest even (VCVTPS2PH takes no exception bit); NaN keeps sign and
                // top payload, quiet bit set.
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                _mm_storeu_si128(p, h);
            }
        }
    }
}

/// Widens 8 BF16 values to `f32` (exact).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn bf16x8_to_f32(h: __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// Rounds 8 `f32` to BF16 as [`f32_to_bf16_bits`] does (nearest even on the bits; any NaN →
/// `0xFFFF`).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn f32x8_to_bf16(x: __m256) -> __m128i {
    let u = _mm256_castps_si256(x);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(u, bias));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    let r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), nan);
    // Every lane is ≤ 0xFFFF, so the unsigned saturating pack is exact; it packs within each
    // 128-bit half, and the permute brings the two halves' results together.
    let packed = _mm256_packus_epi32(r, r);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
}

/// One element of [`add8`].
#[inline(always)]
unsafe fn add_one<const T: u8>(bp: *mut u8, at: usize, d: f32) {
    // SAFETY: the caller passes `at < rows · n`, so the element at `at` lies inside `base`.
    unsafe {
        match T {
            0 => {
                let p = bp.add(at * 4);
                let w = f32::from_le_bytes(*(p as *const [u8; 4]));
                *(p as *mut [u8; 4]) = (w + d).to_le_bytes();
            }
            1 => {
                let p = bp.add(at * 2);
                let w = bf16_bits_to_f32(u16::from_le_bytes(*(p as *const [u8; 2])));
                *(p as *mut [u8; 2]) = f32_to_bf16_bits(w + d).to_le_bytes();
            }
            _ => {
                let p = bp.add(at * 2);
                let w = f16_bits_to_f32(u16::from_le_bytes(*(p as *const [u8; 2])));
                *(p as *mut [u8; 2]) = f32_to_f16_bits(w + d).to_le_bytes();
            }
        }
    }
}

/// Decodes little-endian BF16 `bytes` into `out` (as long as each other) eight at a time.
/// Returns `false`, having done nothing, when this process may not use AVX2.
pub(crate) fn decode_bf16(bytes: &[u8], out: &mut [f32]) -> bool {
    if !available() || bytes.len() != out.len() * 2 {
        return false;
    }
    // SAFETY: AVX2 is available, and the loop stays inside both slices (checked lengths).
    unsafe { decode_bf16_avx2(bytes, out) };
    true
}

#[target_feature(enable = "avx2")]
unsafe fn decode_bf16_avx2(bytes: &[u8], out: &mut [f32]) {
    let full = out.len() / 8 * 8;
    let (bp, op) = (bytes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 8 ≤ out.len()` and `bytes` holds two bytes per element of `out`.
        unsafe {
            let h = _mm_loadu_si128(bp.add(i * 2) as *const __m128i);
            _mm256_storeu_ps(op.add(i), bf16x8_to_f32(h));
        }
        i += 8;
    }
    for (o, c) in out[full..]
        .iter_mut()
        .zip(bytes[full * 2..].chunks_exact(2))
    {
        *o = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

/// Encodes `values` as little-endian BF16 into `out` (twice as long), eight at a time, rounding
/// as [`f32_to_bf16_bits`]. Returns `false`, having done nothing, without AVX2.
pub(crate) fn encode_bf16(values: &[f32], out: &mut [u8]) -> bool {
    if !available() || out.len() != values.len() * 2 {
        return false;
    }
    // SAFETY: AVX2 is available, and the loop stays inside both slices (checked lengths).
    unsafe { encode_bf16_avx2(values, out) };
    true
}

#[target_feature(enable = "avx2")]
unsafe fn encode_bf16_avx2(values: &[f32], out: &mut [u8]) {
    let full = values.len() / 8 * 8;
    let (vp, op) = (values.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 8 ≤ values.len()` and `out` holds two bytes per value.
        unsafe {
            let x = _mm256_loadu_ps(vp.add(i));
            _mm_storeu_si128(op.add(i * 2) as *mut __m128i, f32x8_to_bf16(x));
        }
        i += 8;
    }
    for (c, v) in out[full * 2..].chunks_exact_mut(2).zip(&values[full..]) {
        c.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every BF16 bit pattern, and `f32` values that exercise the rounding (ties, carries into
    /// the exponent, overflow to infinity, NaNs with payloads), against the scalar conversions.
    #[test]
    fn bf16_slices_equal_the_scalar_conversions() {
        if !available() {
            return;
        }
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let mut got = vec![0f32; 1 << 16];
        assert!(decode_bf16(&bytes, &mut got));
        for (b, g) in (0..=u16::MAX).zip(&got) {
            assert_eq!(g.to_bits(), bf16_bits_to_f32(b).to_bits(), "{b:#06x}");
        }
        let mut s = 99u64;
        let values: Vec<f32> = (0..100_003u32)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 32) as u32;
                match i % 4 {
                    // Ties and near-ties: the low 16 bits around 0x8000.
                    0 => f32::from_bits((r & 0xFFFF_0000) | 0x8000),
                    1 => f32::from_bits((r & 0xFFFF_0000) | 0x7FFF),
                    _ => f32::from_bits(r),
                }
            })
            .chain([f32::MAX, f32::INFINITY, -0.0, f32::from_bits(0x7F80_0001)])
            .collect();
        let mut out = vec![0u8; values.len() * 2];
        assert!(encode_bf16(&values, &mut out));
        for (v, c) in values.iter().zip(out.chunks_exact(2)) {
            assert_eq!(
                u16::from_le_bytes([c[0], c[1]]),
                f32_to_bf16_bits(*v),
                "{v:e}"
            );
        }
    }
}
