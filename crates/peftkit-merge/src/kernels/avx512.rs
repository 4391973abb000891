//! The fused plain-merge kernel written with AVX-512 intrinsics (x86-64 only).
//!
//! It performs, element for element, the operations of the portable kernel in [`super::gemm`]
//! (`fma` over each rank block in increasing order, blocks added left to right, one `f32`
//! multiply by the scale) and of the general merge (one `f32` add to the decoded base element,
//! one rounding with torch's rules), so its results are bit-identical; a test compares them. It
//! exists because the compiler's auto-vectorisation of the generic tile is several times slower
//! on AVX-512 (it spills the accumulators and gathers).
//!
//! A register tile is `MR` rows × 32 columns (two `zmm` per row, 16 accumulators of 32); each
//! rank step loads two vectors of the right factor and broadcasts `MR` elements of the left one.

use std::arch::x86_64::*;
use std::ops::Range;

use super::dtype::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};

/// Base element types the kernel adds into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaseType {
    F32,
    Bf16,
    F16,
}

impl BaseType {
    /// The kernel's type for a safetensors dtype, if it has one.
    pub(crate) fn of(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(BaseType::F32),
            safetensors::Dtype::BF16 => Some(BaseType::Bf16),
            safetensors::Dtype::F16 => Some(BaseType::F16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub(crate) fn size(self) -> usize {
        match self {
            BaseType::F32 => 4,
            BaseType::Bf16 | BaseType::F16 => 2,
        }
    }
}

/// Whether this CPU can run [`add_rows`].
/// (`PEFTKIT_FORCE_ISA=avx2` says no on an AVX-512 host; see [`super::isa`].)
pub(crate) fn available() -> bool {
    super::isa::isa() >= super::isa::Isa::Avx512
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
    round_first: bool,
    base: &mut [u8],
) {
    assert!(
        available(),
        "the AVX-512 kernel needs avx512f, avx512bw and avx512vl"
    );
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
            BaseType::F32 => {
                kernel::<0>(left, right, rows, k, n, blocks, (scale, round_first), base)
            }
            BaseType::Bf16 => {
                kernel::<1>(left, right, rows, k, n, blocks, (scale, round_first), base)
            }
            BaseType::F16 => {
                kernel::<2>(left, right, rows, k, n, blocks, (scale, round_first), base)
            }
        }
    }
}

/// Rows per register tile.
const MR: usize = 8;
/// Columns per register tile.
const NR: usize = 32;
/// Elements of `right` per column panel (≈128 KiB): the panel stays in L2 while the rows of the
/// block stream past it.
const PANEL_ELEMS: usize = 32 * 1024;

/// `T` selects the base type: 0 = F32, 1 = BF16, 2 = F16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const T: u8>(
    left: &[f32],
    right: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    blocks: &[Range<usize>],
    (scale, round_first): (f32, bool),
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
                tile::<T, MR>(
                    lp,
                    rp,
                    bp,
                    k,
                    n,
                    q,
                    j0..full_end,
                    blocks,
                    (scale, round_first),
                );
                q += MR;
            }
            while q < rows {
                tile::<T, 1>(
                    lp,
                    rp,
                    bp,
                    k,
                    n,
                    q,
                    j0..full_end,
                    blocks,
                    (scale, round_first),
                );
                q += 1;
            }
            // Column tail (fewer than 32 columns): the same operations, one element at a time.
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
                    add_one::<T>(bp, row * n + j, rounded::<T>(tot * scale, round_first));
                }
            }
            j0 = j1;
        }
    }
}

/// Rows `row0..row0 + Q`, columns `cols` (a multiple of 32 wide).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
    (scale, round_first): (f32, bool),
) {
    // SAFETY: the caller (`kernel`) passes rows `row0..row0 + Q` < rows and 32-wide column
    // steps inside `cols` ⊆ 0..n, so every load and store stays inside the checked slices.
    unsafe {
        let vscale = _mm512_set1_ps(scale);
        let mut j = cols.start;
        while j < cols.end {
            let mut tot = [[_mm512_setzero_ps(); 2]; Q];
            for (bi, blk) in blocks.iter().enumerate() {
                let mut acc = [[_mm512_setzero_ps(); 2]; Q];
                for kk in blk.clone() {
                    let r0 = _mm512_loadu_ps(rp.add(kk * n + j));
                    let r1 = _mm512_loadu_ps(rp.add(kk * n + j + 16));
                    for (q, a) in acc.iter_mut().enumerate() {
                        let c = _mm512_set1_ps(*lp.add((row0 + q) * k + kk));
                        a[0] = _mm512_fmadd_ps(c, r0, a[0]);
                        a[1] = _mm512_fmadd_ps(c, r1, a[1]);
                    }
                }
                if bi == 0 {
                    tot = acc;
                } else {
                    for (t, a) in tot.iter_mut().zip(&acc) {
                        t[0] = _mm512_add_ps(t[0], a[0]);
                        t[1] = _mm512_add_ps(t[1], a[1]);
                    }
                }
            }
            for (q, t) in tot.iter().enumerate() {
                let at = (row0 + q) * n + j;
                let d = [_mm512_mul_ps(t[0], vscale), _mm512_mul_ps(t[1], vscale)];
                let d = match round_first {
                    true => d.map(|d| rounded16::<T>(d)),
                    false => d,
                };
                add16::<T>(bp, at, d[0]);
                add16::<T>(bp, at + 16, d[1]);
            }
            j += NR;
        }
    }
}

/// `base[at..at + 16] = round(f32(base[at..at + 16]) + d)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn add16<const T: u8>(bp: *mut u8, at: usize, d: __m512) {
    // SAFETY: the caller passes `at + 16 ≤ rows · n`, so the 16 elements at `at` lie inside `base`.
    unsafe {
        match T {
            0 => {
                let p = bp.add(at * 4) as *mut f32;
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), d));
            }
            1 => {
                let p = bp.add(at * 2) as *mut __m256i;
                let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)));
                let x = _mm512_add_ps(_mm512_castsi512_ps(w), d);
                let r = _mm512_srli_epi32::<16>(bf16_biased(x));
                _mm256_storeu_si256(p, _mm512_cvtepi32_epi16(r));
            }
            _ => {
                let p = bp.add(at * 2) as *mut __m256i;
                let x = _mm512_add_ps(_mm512_cvtph_ps(_mm256_loadu_si256(p)), d);
                // F16C rounding: nearest even; NaN keeps sign and top payload, quiet bit set.
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                _mm256_storeu_si256(p, h);
            }
        }
    }
}

/// `d` rounded to the base type and widened back (exact), as the general path rounds `Δ` for a
/// merge that rounds it first (`safe_merge`; see `lora::apply_lowrank`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn rounded16<const T: u8>(d: __m512) -> __m512 {
    match T {
        0 => d,
        1 => {
            let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
            _mm512_castsi512_ps(_mm512_and_si512(bf16_biased(d), high))
        }
        _ => _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(d)),
    }
}

/// `x` rounded to BF16 as [`f32_to_bf16_bits`] does (nearest even on the bits; any NaN →
/// `0xFFFF`), in the high 16 bits of each 32-bit lane (the low ones are left over).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn bf16_biased(x: __m512) -> __m512i {
    let u = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_mov_epi32(_mm512_add_epi32(u, bias), nan, _mm512_set1_epi32(-1))
}

/// One element of [`rounded16`].
#[inline(always)]
pub(crate) fn rounded<const T: u8>(d: f32, round_first: bool) -> f32 {
    match (T, round_first) {
        (1, true) => bf16_bits_to_f32(f32_to_bf16_bits(d)),
        (2, true) => f16_bits_to_f32(f32_to_f16_bits(d)),
        _ => d,
    }
}

/// One element of [`add16`].
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
