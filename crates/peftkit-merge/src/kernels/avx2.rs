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
//! of the left one. The rows left over make one narrower tile.
//!
//! With rank 16 a BF16 element costs 16 FMAs and about 20 other operations (widen, scale, add,
//! round, narrow). On Intel cores the FMAs and the shifts, multiplies and compares share two
//! ports, so what the FMA ports must also do sets the time. Hence: each column panel of the
//! right factor is first copied into contiguous strips (`pack`), in the order in which BF16
//! rows widen without a shift (even columns, then odd ones); BF16 is widened, rounded and
//! narrowed sixteen at a time with byte shuffles and blends, which run on another port; a NaN
//! is marked with an `or`, not a blend. The copy also removes the large power-of-two stride
//! between the rank rows of the right factor, whose loads fell in one L1 set.

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
    round_first: bool,
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
const MR: usize = 6;
/// Columns per register tile.
const NR: usize = 16;
/// Elements of `right` per column panel (≈128 KiB): the packed panel stays in L2 while the rows
/// of the block stream past it.
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
        let mut packed = PACKED.take();
        packed.resize(k * panel, 0.0);
        let pp = packed.as_mut_ptr();
        let mut j0 = 0;
        while j0 < n {
            let j1 = n.min(j0 + panel);
            let full_end = j0 + (j1 - j0) / NR * NR;
            pack(rp, pp, (k, n), j0..full_end, T == 1);
            let mut q = 0;
            while q + MR <= rows {
                tile::<T, MR>(
                    lp,
                    pp,
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
            // The last rows in one narrower tile: a tile of one row would leave the FMA units
            // waiting on its two chains of dependent adds.
            macro_rules! last_rows {
                ($($r:literal)*) => {
                    match rows - q {
                        $($r => tile::<T, $r>(lp, pp, bp, k, n, q, j0..full_end, blocks, (scale, round_first)),)*
                        _ => {} // none left (always fewer than `MR`)
                    }
                };
            }
            last_rows!(1 2 3 4 5);
            column_tail::<T>(
                lp,
                rp,
                bp,
                (rows, k, n),
                full_end..j1,
                blocks,
                (scale, round_first),
            );
            j0 = j1;
        }
        PACKED.set(packed);
    }
}

/// Columns `cols` (fewer than 16, at the end of a panel) of every row: the same operations,
/// one element at a time.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn column_tail<const T: u8>(
    lp: *const f32,
    rp: *const f32,
    bp: *mut u8,
    (rows, k, n): (usize, usize, usize),
    cols: Range<usize>,
    blocks: &[Range<usize>],
    (scale, round_first): (f32, bool),
) {
    // SAFETY: `kernel` passes `cols` ⊆ 0..n and the checked slices' pointers.
    unsafe {
        for j in cols {
            for row in 0..rows {
                let mut tot = 0f32;
                for (bi, blk) in blocks.iter().enumerate() {
                    let mut acc = 0f32;
                    for kk in blk.clone() {
                        acc = (*lp.add(row * k + kk)).mul_add(*rp.add(kk * n + j), acc);
                    }
                    tot = if bi == 0 { acc } else { tot + acc };
                }
                add_one::<T>(
                    bp,
                    row * n + j,
                    super::avx512::rounded::<T>(tot * scale, round_first),
                );
            }
        }
    }
}

thread_local! {
    /// The packed column panel of the right factor (see `pack`), one per thread, kept between
    /// calls (at most `PANEL_ELEMS` values, or `16 k` for very high ranks).
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Copies columns `cols` of `right` (`k` × `n`, from `rp`) to `pp` strip by strip: for each
/// 16 columns, `k` rows of 16 contiguous values. With `split` (BF16) each row of a strip holds
/// its 8 even columns, then its 8 odd ones, the order in which [`add16`] widens the base.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pack(
    rp: *const f32,
    pp: *mut f32,
    (k, n): (usize, usize),
    cols: Range<usize>,
    split: bool,
) {
    // SAFETY: `kernel` passes 16-wide steps of `cols` ⊆ 0..n, so the loads stay inside `right`
    // (k × n), and a buffer of `k` values per column of the panel.
    unsafe {
        let mut dst = pp;
        let mut j = cols.start;
        while j < cols.end {
            for kk in 0..k {
                let src = rp.add(kk * n + j);
                let (a, b) = (_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(8)));
                let (a, b) = if split { even_odd(a, b) } else { (a, b) };
                _mm256_storeu_ps(dst, a);
                _mm256_storeu_ps(dst.add(8), b);
                dst = dst.add(NR);
            }
            j += NR;
        }
    }
}

/// The even elements of `a` then `b`, and the odd ones.
#[target_feature(enable = "avx2")]
#[inline]
fn even_odd(a: __m256, b: __m256) -> (__m256, __m256) {
    // The shuffles pick within each 128-bit half (even or odd of `a`'s half, then of `b`'s),
    // so the permute puts the quarters in the order 0, 2, 1, 3.
    let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
    let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
    let fix =
        |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
    (fix(e), fix(o))
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
    (scale, round_first): (f32, bool),
) {
    // SAFETY: the caller (`kernel`) passes rows `row0..row0 + Q` < rows and 16-wide column
    // steps inside `cols` ⊆ 0..n, so every load and store stays inside the checked slices.
    unsafe {
        let vscale = _mm256_set1_ps(scale);
        // Opaque to the compiler, which would otherwise turn these byte shuffles back into
        // shifts (see `add16`).
        let masks = std::hint::black_box([EVEN_UP, HIGH_DOWN, BYTE2_DOWN]);
        let mut j = cols.start;
        let mut rp = rp;
        while j < cols.end {
            // The first block's sums are the totals, without a copy: with one block (ranks up
            // to 192 or 384) the accumulators then stay in registers.
            let (first, rest) = blocks.split_first().unwrap_or((&(0..0), &[]));
            let mut tot = rank_block::<Q>(lp.add(row0 * k), rp, k, first.clone());
            for blk in rest {
                let acc = rank_block::<Q>(lp.add(row0 * k), rp, k, blk.clone());
                for (t, a) in tot.iter_mut().zip(&acc) {
                    t[0] = _mm256_add_ps(t[0], a[0]);
                    t[1] = _mm256_add_ps(t[1], a[1]);
                }
            }
            for (q, t) in tot.iter().enumerate() {
                let d = [_mm256_mul_ps(t[0], vscale), _mm256_mul_ps(t[1], vscale)];
                let d = match round_first {
                    true => d.map(|d| rounded8::<T>(d, masks[2])),
                    false => d,
                };
                add16::<T>(bp, (row0 + q) * n + j, d, &masks);
            }
            j += NR;
            rp = rp.add(k * NR);
        }
    }
}

/// The sums over the rank indices `blk` of `Q` rows of `left` (from `lp`, `k` apart) times a
/// strip of the packed right factor (`rp`, 16 values per rank index): one `fma` per index, in
/// increasing order, from zero.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rank_block<const Q: usize>(
    lp: *const f32,
    rp: *const f32,
    k: usize,
    blk: Range<usize>,
) -> [[__m256; 2]; Q] {
    // SAFETY: `tile` passes `blk` within the rank, `lp` at a row of the tile and `rp` at a
    // strip of `k` × 16 packed values.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; Q];
        for kk in blk {
            let r0 = _mm256_loadu_ps(rp.add(kk * NR));
            let r1 = _mm256_loadu_ps(rp.add(kk * NR + 8));
            for (q, a) in acc.iter_mut().enumerate() {
                let c = _mm256_broadcast_ss(&*lp.add(q * k + kk));
                a[0] = _mm256_fmadd_ps(c, r0, a[0]);
                a[1] = _mm256_fmadd_ps(c, r1, a[1]);
            }
        }
        acc
    }
}

/// `base[at..at + 16] = round(f32(base[at..at + 16]) + d)`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add16<const T: u8>(bp: *mut u8, at: usize, d: [__m256; 2], masks: &[__m256i; 3]) {
    // SAFETY: the caller passes `at + 16 ≤ rows · n`, so the 16 elements at `at` lie inside `base`.
    unsafe {
        match T {
            0 => {
                let p = bp.add(at * 4) as *mut f32;
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), d[0]));
                let p = p.add(8);
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), d[1]));
            }
            1 => {
                // Sixteen at a time, even elements in `d[0]`, odd ones in `d[1]` (see `pack`):
                // one shuffle and one `and` widen them, one shuffle and one blend narrow them.
                let p = bp.add(at * 2) as *mut __m256i;
                let h = _mm256_loadu_si256(p);
                // Byte shuffles, not shifts: on Intel cores shifts share the two ports of the
                // FMAs, which the product keeps busy, and shuffles have a port of their own.
                let [up, down, lsb] = *masks;
                let even = _mm256_shuffle_epi8(h, up);
                let odd = _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
                let e = bf16_biased(_mm256_add_ps(_mm256_castsi256_ps(even), d[0]), lsb);
                let o = bf16_biased(_mm256_add_ps(_mm256_castsi256_ps(odd), d[1]), lsb);
                let e = _mm256_shuffle_epi8(e, down);
                _mm256_storeu_si256(p, _mm256_blend_epi16::<0b1010_1010>(e, o));
            }
            _ => {
                for (h, d) in d.into_iter().enumerate() {
                    let p = bp.add((at + 8 * h) * 2) as *mut __m128i;
                    let x = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)), d);
                    // F16C rounding: nearest even (VCVTPS2PH takes no exception bit); NaN keeps
                    // sign and top payload, quiet bit set.
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                    _mm_storeu_si128(p, h);
                }
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

/// `_mm256_shuffle_epi8` indices moving the low 16 bits of each 32-bit lane to its high 16
/// bits, zeroing the low ones (the indices count bytes within each 128-bit half).
const EVEN_UP: __m256i = lanes([0x0100_8080, 0x0504_8080, 0x0908_8080, 0x0D0C_8080]);
/// `_mm256_shuffle_epi8` indices moving the high 16 bits of each 32-bit lane to its low 16
/// bits, zeroing the high ones.
const HIGH_DOWN: __m256i = lanes([0x8080_0302, 0x8080_0706, 0x8080_0B0A, 0x8080_0F0E]);
/// `_mm256_shuffle_epi8` indices moving byte 2 of each 32-bit lane (bits 16–23) to byte 0,
/// zeroing the others.
const BYTE2_DOWN: __m256i = lanes([0x8080_8002, 0x8080_8006, 0x8080_800A, 0x8080_800E]);

/// A vector of the four 32-bit lanes `q` in each 128-bit half.
const fn lanes(q: [u32; 4]) -> __m256i {
    // SAFETY: `__m256i` is 32 plain bytes; any bit pattern is a valid value.
    unsafe { std::mem::transmute([q, q]) }
}

/// `x` rounded to BF16 as [`f32_to_bf16_bits`] does (nearest even on the bits; any NaN →
/// `0xFFFF`), in the high 16 bits of each 32-bit lane (the low ones are left over).
/// `byte2_down` is [`BYTE2_DOWN`], passed in so that a caller can hide it from the compiler.
#[target_feature(enable = "avx2")]
#[inline]
fn bf16_biased(x: __m256, byte2_down: __m256i) -> __m256i {
    let u = _mm256_castps_si256(x);
    // Bit 16 (the lowest kept bit) moved to bit 0 by the shuffle `byte2_down` (`BYTE2_DOWN`).
    let lsb = _mm256_and_si256(_mm256_shuffle_epi8(u, byte2_down), _mm256_set1_epi32(1));
    let t = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    // A NaN lane of the comparison is all ones, and so is its lane after the `or`: its high
    // half is 0xFFFF. One `or` where a blend costs up to three micro-ops.
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    _mm256_or_si256(t, nan)
}

/// 8 `f32` rounded to BF16 as [`f32_to_bf16_bits`] does, in the high 16 bits of each lane
/// ([`bf16_biased`]), for callers that pack lanes themselves.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn bf16_high(x: __m256) -> __m256i {
    bf16_biased(x, BYTE2_DOWN)
}

/// Rounds 8 `f32` to BF16 as [`f32_to_bf16_bits`] does (nearest even on the bits; any NaN →
/// `0xFFFF`).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn f32x8_to_bf16(x: __m256) -> __m128i {
    let r = _mm256_srli_epi32::<16>(bf16_high(x));
    // Every lane is ≤ 0xFFFF, so the unsigned saturating pack is exact; it packs within each
    // 128-bit half, and the permute brings the two halves' results together.
    let packed = _mm256_packus_epi32(r, r);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
}

/// `d` rounded to the base type and widened back (exact), as the general path rounds `Δ` for a
/// merge that rounds it first (`safe_merge`; see `lora::apply_lowrank`). `byte2_down` is
/// [`BYTE2_DOWN`] (see [`bf16_biased`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn rounded8<const T: u8>(d: __m256, byte2_down: __m256i) -> __m256 {
    match T {
        0 => d,
        // A NaN lane is all ones, so 0xFFFF_0000 once the low half is cleared.
        1 => _mm256_castsi256_ps(_mm256_and_si256(
            bf16_biased(d, byte2_down),
            _mm256_set1_epi32(0xFFFF_0000u32 as i32),
        )),
        _ => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(d)),
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

/// DoRA's norm of each row of `values` (rows of `row_len`), as `dora::torch_row_norm` takes it,
/// pushed to `norms`: eight lanes of separate multiplies and adds, four rows at a time so that
/// four chains of additions overlap. `false`, having done nothing, without AVX2.
pub(crate) fn row_norms(values: &[f32], row_len: usize, norms: &mut Vec<f32>) -> bool {
    if !available() || row_len == 0 || !values.len().is_multiple_of(row_len) {
        return false;
    }
    let mut quads = values.chunks_exact(row_len * 4);
    for quad in &mut quads {
        // SAFETY: AVX2 is available, and each row lies inside `quad`.
        norms.extend(unsafe { lane_sums::<4>(quad, row_len) });
    }
    for row in quads.remainder().chunks_exact(row_len) {
        // SAFETY: as above.
        norms.extend(unsafe { lane_sums::<1>(row, row_len) });
    }
    true
}

/// [`row_norms`] of the `R` rows of `rows`.
#[target_feature(enable = "avx2")]
unsafe fn lane_sums<const R: usize>(rows: &[f32], row_len: usize) -> [f32; R] {
    let full = row_len / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); R];
    let p = rows.as_ptr();
    let mut i = 0;
    while i < full {
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: `i + 8 ≤ row_len` and `rows` holds `R` rows of `row_len`.
            let x = unsafe { _mm256_loadu_ps(p.add(r * row_len + i)) };
            // torch's order: a separate multiply and add per lane, never an FMA.
            *a = _mm256_add_ps(*a, _mm256_mul_ps(x, x));
        }
        i += 8;
    }
    std::array::from_fn(|r| {
        // SAFETY: `__m256` is eight `f32`s.
        let lanes: [f32; 8] = unsafe { std::mem::transmute(acc[r]) };
        super::dora::finish_row_norm(lanes, &rows[r * row_len + full..(r + 1) * row_len])
    })
}

/// [`super::dtype::encode_scaled_into`] in one pass, eight values at a time: each row of
/// `values` times its factor, rounded to `dtype` and stored in `out`, each stored value tested
/// for NaN or infinity in registers. `Some(all finite)`, or `None`, having done nothing, without
/// AVX2 or for another dtype (the caller has checked the lengths).
pub(crate) fn encode_scaled(
    dtype: safetensors::Dtype,
    (values, row_len): (&[f32], usize),
    factors: &[f32],
    out: &mut [u8],
) -> Option<bool> {
    let ty = BaseType::of(dtype)?;
    let fits = factors.len().checked_mul(row_len) == Some(values.len())
        && out.len() == values.len() * ty.size();
    if !available() || !fits || row_len == 0 {
        return None;
    }
    // SAFETY: AVX2 (and F16C, which every AVX2 CPU has) is available, and the loops stay
    // inside the slices (lengths checked above).
    Some(unsafe {
        match ty {
            BaseType::F32 => encode_scaled_avx2::<0>(values, row_len, factors, out),
            BaseType::Bf16 => encode_scaled_avx2::<1>(values, row_len, factors, out),
            BaseType::F16 => encode_scaled_avx2::<2>(values, row_len, factors, out),
        }
    })
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn encode_scaled_avx2<const T: u8>(
    values: &[f32],
    row_len: usize,
    factors: &[f32],
    out: &mut [u8],
) -> bool {
    let size = if T == 0 { 4 } else { 2 };
    // Exponent bits of the stored type: a value is NaN or infinite when all are set.
    let (exp32, exp16) = (
        _mm256_set1_epi32(0x7F80_0000),
        match T {
            1 => _mm_set1_epi16(0x7F80),
            _ => _mm_set1_epi16(0x7C00),
        },
    );
    let mut bad32 = _mm256_setzero_si256();
    let mut bad16 = _mm_setzero_si128();
    let mut bad_tail = false;
    let full = row_len / 8 * 8;
    let rows = values
        .chunks_exact(row_len)
        .zip(out.chunks_exact_mut(row_len * size));
    for ((row, o), f) in rows.zip(factors) {
        let (vp, op, fv) = (row.as_ptr(), o.as_mut_ptr(), _mm256_set1_ps(*f));
        let mut i = 0;
        while i < full {
            // SAFETY: `i + 8 ≤ row_len`, and `o` holds `size` bytes per value of `row`.
            unsafe {
                let y = _mm256_mul_ps(_mm256_loadu_ps(vp.add(i)), fv);
                match T {
                    0 => {
                        _mm256_storeu_ps(op.add(i * 4) as *mut f32, y);
                        let e = _mm256_and_si256(_mm256_castps_si256(y), exp32);
                        bad32 = _mm256_or_si256(bad32, _mm256_cmpeq_epi32(e, exp32));
                    }
                    _ => {
                        let h = match T {
                            1 => f32x8_to_bf16(y),
                            _ => _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y),
                        };
                        _mm_storeu_si128(op.add(i * 2) as *mut __m128i, h);
                        let e = _mm_and_si128(h, exp16);
                        bad16 = _mm_or_si128(bad16, _mm_cmpeq_epi16(e, exp16));
                    }
                }
            }
            i += 8;
        }
        for (x, c) in row[full..]
            .iter()
            .zip(o[full * size..].chunks_exact_mut(size))
        {
            let y = x * f;
            let finite = match T {
                0 => {
                    c.copy_from_slice(&y.to_le_bytes());
                    y.is_finite()
                }
                1 => {
                    let b = f32_to_bf16_bits(y);
                    c.copy_from_slice(&b.to_le_bytes());
                    bf16_bits_to_f32(b).is_finite()
                }
                _ => {
                    let b = f32_to_f16_bits(y);
                    c.copy_from_slice(&b.to_le_bytes());
                    f16_bits_to_f32(b).is_finite()
                }
            };
            bad_tail |= !finite;
        }
    }
    _mm256_testz_si256(bad32, bad32) == 1 && _mm_testz_si128(bad16, bad16) == 1 && !bad_tail
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

    /// Random `f32` bit patterns (NaNs, infinities, subnormals among them) with ties for the
    /// BF16 rounding, from a fixed seed.
    fn patterns(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 32) as u32;
                match i % 5 {
                    0 => f32::from_bits((r & 0xFFFF_0000) | 0x8000),
                    // Values near 1 whose products neither overflow nor underflow.
                    1 | 2 => {
                        f32::from_bits(0x3F80_0000 | (r & 0x007F_FFFF))
                            * if r & 1 == 0 { 1.0 } else { -1.0 }
                    }
                    _ => f32::from_bits(r),
                }
            })
            .collect()
    }

    /// The one-pass scaled encode stores what the multiply, the encode and the scan store and
    /// find, in every type: rows with and without a tail of fewer than eight, factors that
    /// overflow, underflow to subnormals, are zero, infinite or NaN, and blocks all finite.
    #[test]
    fn scaled_encodes_equal_the_portable_definition() {
        if !available() {
            return;
        }
        use safetensors::Dtype;
        let factors = [
            1.0,
            0.75,
            3.0e38,
            1.0e-39,
            0.0,
            -2.5,
            f32::INFINITY,
            f32::NAN,
            1.0 + f32::EPSILON,
        ];
        for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let size = if dtype == Dtype::F32 { 4 } else { 2 };
            for row_len in [1, 5, 8, 13, 16, 27] {
                for finite in [false, true] {
                    let mut values = patterns(row_len * factors.len(), row_len as u64);
                    let mut factors = factors.to_vec();
                    if finite {
                        values
                            .iter_mut()
                            .for_each(|v| *v = (*v % 7.0).abs().min(7.0));
                        factors
                            .iter_mut()
                            .for_each(|f| *f = (*f % 5.0).abs().min(5.0));
                    }
                    let mut got = vec![0x5Au8; values.len() * size];
                    let ok = encode_scaled(dtype, (&values, row_len), &factors, &mut got);
                    let mut want = vec![0u8; got.len()];
                    let want_ok = super::super::dtype::encode_scaled_portable(
                        "w",
                        dtype,
                        (&mut values.clone(), row_len),
                        &factors,
                        &mut want,
                    )
                    .unwrap();
                    assert_eq!(got, want, "{dtype:?}, rows of {row_len}");
                    assert_eq!(ok, Some(want_ok), "{dtype:?}, rows of {row_len}");
                    assert_eq!(want_ok, finite, "{dtype:?}, rows of {row_len}");
                }
            }
        }
        let mut out = [0u8; 8];
        assert_eq!(
            encode_scaled(Dtype::F32, (&[1.0; 2], 1), &[1.0], &mut out),
            None
        );
        assert_eq!(
            encode_scaled(Dtype::F64, (&[1.0], 1), &[1.0], &mut out),
            None
        );
    }

    /// Norms four rows at a time equal `torch_row_norm` of each row, bit for bit, for row
    /// counts that leave every remainder and lengths with every tail.
    #[test]
    fn row_norms_equal_torch_row_norm() {
        if !available() {
            return;
        }
        for row_len in 1..=35 {
            for rows in [1, 3, 4, 7, 9] {
                let values: Vec<f32> = patterns(row_len * rows, 7 + row_len as u64)
                    .iter()
                    .map(|v| if v.is_finite() { v % 1.0e19 } else { 0.5 })
                    .collect();
                let mut got = vec![];
                assert!(row_norms(&values, row_len, &mut got));
                let want: Vec<u32> = values
                    .chunks_exact(row_len)
                    .map(|r| super::super::dora::torch_row_norm(r).to_bits())
                    .collect();
                let got: Vec<u32> = got.iter().map(|n| n.to_bits()).collect();
                assert_eq!(got, want, "{rows} rows of {row_len}");
            }
        }
        assert!(!row_norms(&[1.0; 3], 2, &mut vec![]));
    }
}
