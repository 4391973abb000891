//! Little-endian tensor bytes ⇄ `f32`/`f64`, with torch's rounding.
//!
//! Rounding to BF16 and F16 is round-to-nearest-even, as torch does it on CPU. Special values
//! follow torch 2.15 (measured, CPU/AVX512):
//!
//! * F32 → BF16: **every NaN becomes `0xFFFF`** (sign set, all mantissa bits set), whatever its
//!   sign or payload. This holds for `.to(torch.bfloat16)` and for the in-place `bf16 += f32` of a
//!   merge, scalar and vectorised paths alike. (The `half` crate would keep the payload.)
//! * F32 → F16: sign kept, quiet bit set, payload truncated to its top 10 bits
//!   (`sign | 0x7E00 | mant >> 13`), which is what the F16C instruction and `half` both do.
//!   Caveat: when the NaN comes from an F16 *base* element, torch's scalar tail loop (the last
//!   few elements of a short row) canonicalises it to `0x7FFF` instead; the vectorised path, used
//!   for the bulk of every real tensor, keeps the payload as here.
//! * Overflow rounds to ±Inf; values below the smallest subnormal round to ±0.
//!
//! Decoding BF16/F16 to `f32` is exact. F64 is supported where a kernel documents it.

use half::f16;
use half::slice::HalfFloatSliceExt;
use safetensors::Dtype;

use super::error::{MergeMathError, Result};

/// Bytes per element of the dtypes the kernels compute with (F32, BF16, F16, F64).
pub fn element_size(dtype: Dtype) -> Result<usize> {
    match dtype {
        Dtype::F32 => Ok(4),
        Dtype::BF16 | Dtype::F16 => Ok(2),
        Dtype::F64 => Ok(8),
        other => Err(MergeMathError::UnsupportedDtype {
            what: "tensor",
            dtype: other,
        }),
    }
}

/// Number of elements in `bytes` of `dtype`, or an error if it is not a whole number.
pub fn element_count(what: &'static str, dtype: Dtype, bytes: usize) -> Result<usize> {
    let size = element_size(dtype).map_err(|_| MergeMathError::UnsupportedDtype { what, dtype })?;
    if !bytes.is_multiple_of(size) {
        return Err(MergeMathError::ByteLength {
            what,
            dtype,
            len: bytes,
        });
    }
    Ok(bytes / size)
}

/// Rounds an `f32` to BF16 bits the way torch does (RNE; any NaN → `0xFFFF`); the rule lives
/// with the checkpoint crate's dtype casts.
pub use peftkit_checkpoint::f32_to_bf16_bits;

/// Widens BF16 bits to `f32` (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Rounds an `f32` to F16 bits (IEEE RNE; NaN keeps sign and top payload bits, quiet bit set).
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// Widens F16 bits to `f32` (exact).
#[inline]
pub fn f16_bits_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// `x` rounded to `dtype` and widened back to `f32` — i.e. torch's `t.to(dtype).float()`.
///
/// F32 and F64 return `x` unchanged (F64 can hold every `f32`). Other dtypes are refused.
pub fn round_f32_to(dtype: Dtype, x: f32) -> Result<f32> {
    match dtype {
        Dtype::F32 | Dtype::F64 => Ok(x),
        Dtype::BF16 => Ok(bf16_bits_to_f32(f32_to_bf16_bits(x))),
        Dtype::F16 => Ok(f16_bits_to_f32(f32_to_f16_bits(x))),
        other => Err(MergeMathError::UnsupportedDtype {
            what: "rounding target",
            dtype: other,
        }),
    }
}

/// Rounds every value of `values` to `dtype` in place (see [`round_f32_to`]).
pub fn round_slice_to(dtype: Dtype, values: &mut [f32]) -> Result<()> {
    match dtype {
        Dtype::F32 | Dtype::F64 => Ok(()),
        Dtype::BF16 => {
            for v in values.iter_mut() {
                *v = bf16_bits_to_f32(f32_to_bf16_bits(*v));
            }
            Ok(())
        }
        Dtype::F16 => {
            let mut tmp = [f16::ZERO; CHUNK];
            for chunk in values.chunks_mut(CHUNK) {
                let t = &mut tmp[..chunk.len()];
                t.convert_from_f32_slice(chunk);
                t.convert_to_f32_slice(chunk);
            }
            Ok(())
        }
        other => Err(MergeMathError::UnsupportedDtype {
            what: "rounding target",
            dtype: other,
        }),
    }
}

/// Elements converted per step through `half`'s SIMD slice conversions.
const CHUNK: usize = 64;

/// Checks that `bytes` bytes of `dtype` hold exactly `values` elements (the length of the other
/// side of a conversion).
fn check_count(what: &'static str, dtype: Dtype, bytes: usize, values: usize) -> Result<()> {
    let n = element_count(what, dtype, bytes)?;
    if n != values {
        return Err(MergeMathError::ElementCount {
            what,
            shape: vec![values],
            expected: values,
            got: n,
        });
    }
    Ok(())
}

/// Decodes `N`-byte little-endian elements of `bytes` into `out` with `from_le`.
#[inline(always)]
pub(crate) fn decode_le<const N: usize, T>(
    bytes: &[u8],
    out: &mut [T],
    from_le: impl Fn([u8; N]) -> T,
) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        *o = from_le(a);
    }
}

/// Encodes `values` into `N`-byte little-endian elements of `out` with `to_le`.
#[inline(always)]
pub(crate) fn encode_le<const N: usize, T: Copy>(
    values: &[T],
    out: &mut [u8],
    to_le: impl Fn(T) -> [u8; N],
) {
    for (c, v) in out.chunks_exact_mut(N).zip(values) {
        c.copy_from_slice(&to_le(*v));
    }
}

/// Allocates the output of a `decode_*_into` and fills it.
fn decode_vec<T: Copy + Default>(
    what: &'static str,
    dtype: Dtype,
    bytes: &[u8],
    decode_into: fn(&'static str, Dtype, &[u8], &mut [T]) -> Result<()>,
) -> Result<Vec<T>> {
    let n = element_count(what, dtype, bytes.len())?;
    let mut out = vec![T::default(); n];
    decode_into(what, dtype, bytes, &mut out)?;
    Ok(out)
}

/// Decodes `bytes` (little-endian `dtype`) into `out`, which must hold exactly as many elements.
///
/// F64 values are rounded to the nearest `f32` (lossy; peft would compute with them in f64).
pub fn decode_f32_into(
    what: &'static str,
    dtype: Dtype,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<()> {
    check_count(what, dtype, bytes.len(), out.len())?;
    match dtype {
        Dtype::F32 => decode_le(bytes, out, f32::from_le_bytes),
        #[cfg(target_arch = "x86_64")]
        Dtype::BF16 if super::avx2::decode_bf16(bytes, out) => {}
        Dtype::BF16 => decode_le(bytes, out, |b| bf16_bits_to_f32(u16::from_le_bytes(b))),
        Dtype::F16 => {
            let mut tmp = [f16::ZERO; CHUNK];
            for (o, b) in out.chunks_mut(CHUNK).zip(bytes.chunks(CHUNK * 2)) {
                let t = &mut tmp[..o.len()];
                decode_le(b, t, |h| f16::from_bits(u16::from_le_bytes(h)));
                t.convert_to_f32_slice(o);
            }
        }
        Dtype::F64 => decode_le(bytes, out, |b| f64::from_le_bytes(b) as f32),
        other => return Err(MergeMathError::UnsupportedDtype { what, dtype: other }),
    }
    Ok(())
}

/// Decodes little-endian `dtype` bytes into a new `Vec<f32>` (see [`decode_f32_into`]).
pub fn decode_f32(what: &'static str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    decode_vec(what, dtype, bytes, decode_f32_into)
}

/// Decodes little-endian `dtype` bytes into `f64` (exact for all four dtypes).
pub fn decode_f64(what: &'static str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f64>> {
    decode_vec(what, dtype, bytes, decode_f64_into)
}

/// Decodes little-endian `dtype` bytes into `out` as `f64` (exact).
pub fn decode_f64_into(
    what: &'static str,
    dtype: Dtype,
    bytes: &[u8],
    out: &mut [f64],
) -> Result<()> {
    check_count(what, dtype, bytes.len(), out.len())?;
    if dtype == Dtype::F64 {
        decode_le(bytes, out, f64::from_le_bytes);
        return Ok(());
    }
    let mut tmp = [0f32; CHUNK];
    let size = element_size(dtype)?;
    for (o, b) in out.chunks_mut(CHUNK).zip(bytes.chunks(CHUNK * size)) {
        let t = &mut tmp[..o.len()];
        decode_f32_into(what, dtype, b, t)?;
        for (x, y) in o.iter_mut().zip(t.iter()) {
            *x = f64::from(*y);
        }
    }
    Ok(())
}

/// Encodes `values` as little-endian `dtype` into `out` (rounding as torch does; F64 widens).
pub fn encode_f32_into(
    what: &'static str,
    dtype: Dtype,
    values: &[f32],
    out: &mut [u8],
) -> Result<()> {
    check_count(what, dtype, out.len(), values.len())?;
    match dtype {
        Dtype::F32 => encode_le(values, out, f32::to_le_bytes),
        #[cfg(target_arch = "x86_64")]
        Dtype::BF16 if super::avx2::encode_bf16(values, out) => {}
        Dtype::BF16 => encode_le(values, out, |v| f32_to_bf16_bits(v).to_le_bytes()),
        Dtype::F16 => {
            let mut tmp = [f16::ZERO; CHUNK];
            for (v, o) in values.chunks(CHUNK).zip(out.chunks_mut(CHUNK * 2)) {
                let t = &mut tmp[..v.len()];
                t.convert_from_f32_slice(v);
                encode_le(t, o, |h| h.to_bits().to_le_bytes());
            }
        }
        Dtype::F64 => encode_le(values, out, |v| f64::from(v).to_le_bytes()),
        other => return Err(MergeMathError::UnsupportedDtype { what, dtype: other }),
    }
    Ok(())
}

/// Encodes each row of `values` (`row_len` wide) multiplied by its entry of `factors` as
/// little-endian `dtype` (F32, BF16 or F16) into `out`: `fl_dtype(fl32(f · x))`, the `f32`
/// product rounded once more as torch's `(f * w).to(dtype)` rounds it. Returns whether every
/// value stored is finite.
///
/// With AVX2 one pass does the multiply, the rounding and the test in registers; otherwise
/// `values` are multiplied in place, encoded ([`encode_f32_into`]) and the bytes scanned.
pub(crate) fn encode_scaled_into(
    what: &'static str,
    dtype: Dtype,
    (values, row_len): (&mut [f32], usize),
    factors: &[f32],
    out: &mut [u8],
) -> Result<bool> {
    check_count(what, dtype, out.len(), values.len())?;
    if factors.len().checked_mul(row_len) != Some(values.len()) {
        return Err(MergeMathError::Invalid {
            what,
            reason: format!("{} row factors for rows of {row_len}", factors.len()),
        });
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(finite) = super::avx2::encode_scaled(dtype, (values, row_len), factors, out) {
        return Ok(finite);
    }
    encode_scaled_portable(what, dtype, (values, row_len), factors, out)
}

/// [`encode_scaled_into`] without SIMD, the definition the AVX2 pass is tested against.
pub(crate) fn encode_scaled_portable(
    what: &'static str,
    dtype: Dtype,
    (values, row_len): (&mut [f32], usize),
    factors: &[f32],
    out: &mut [u8],
) -> Result<bool> {
    for (row, f) in values.chunks_exact_mut(row_len.max(1)).zip(factors) {
        for x in row {
            *x *= *f;
        }
    }
    encode_f32_into(what, dtype, values, out)?;
    Ok(peftkit_checkpoint::nonfinite(dtype, out).is_none())
}

/// Encodes `values` as little-endian `dtype` into a new buffer (see [`encode_f32_into`]).
///
/// ```
/// use peftkit_merge::{decode_f32, encode_f32};
/// use safetensors::Dtype;
///
/// // BF16 keeps 8 bits of mantissa: 1 + 2^-9 rounds to even, back to 1.
/// let bytes = encode_f32("w", Dtype::BF16, &[1.5, 1.0 + 2f32.powi(-9)])?;
/// assert_eq!(bytes, [0xc0, 0x3f, 0x80, 0x3f]);
/// assert_eq!(decode_f32("w", Dtype::BF16, &bytes)?, [1.5, 1.0]);
/// assert!(encode_f32("w", Dtype::I32, &[1.0]).is_err());
/// # Ok::<(), peftkit_merge::MergeMathError>(())
/// ```
pub fn encode_f32(what: &'static str, dtype: Dtype, values: &[f32]) -> Result<Vec<u8>> {
    let size = element_size(dtype).map_err(|_| MergeMathError::UnsupportedDtype { what, dtype })?;
    let len = values
        .len()
        .checked_mul(size)
        .ok_or(MergeMathError::Overflow {
            what,
            shape: vec![values.len()],
        })?;
    let mut out = vec![0u8; len];
    encode_f32_into(what, dtype, values, &mut out)?;
    Ok(out)
}

/// Encodes `f64` values as little-endian F64, or rounds them once to F32.
///
/// BF16/F16 are refused: torch rounds f64 → 16-bit through its own paths, which the kernels
/// never need.
pub fn encode_f64_into(
    what: &'static str,
    dtype: Dtype,
    values: &[f64],
    out: &mut [u8],
) -> Result<()> {
    check_count(what, dtype, out.len(), values.len())?;
    match dtype {
        Dtype::F64 => encode_le(values, out, f64::to_le_bytes),
        Dtype::F32 => encode_le(values, out, |v| (v as f32).to_le_bytes()),
        other => return Err(MergeMathError::UnsupportedDtype { what, dtype: other }),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_torch_specials() {
        // Values measured with torch 2.15: `torch.tensor([...]).to(torch.bfloat16)`.
        for bits in [
            0x7fc0_0000u32,
            0xffc0_0000,
            0x7f80_0001,
            0x7fa0_0000,
            0x7fff_ffff,
        ] {
            assert_eq!(f32_to_bf16_bits(f32::from_bits(bits)), 0xFFFF);
        }
        assert_eq!(f32_to_bf16_bits(3.4e38), 0x7f80);
        assert_eq!(f32_to_bf16_bits(65520.0), 0x4780);
        assert_eq!(f32_to_bf16_bits(1e-8), 0x322c);
        // Ties go to even.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
    }

    #[test]
    fn f16_rounding_matches_torch_specials() {
        let cases = [
            (0x7fc0_0000u32, 0x7e00u16),
            (0xffc0_0000, 0xfe00),
            (0x7f80_0001, 0x7e00),
            (0x7fa0_0000, 0x7f00),
            (0x7fff_ffff, 0x7fff),
            (0x7fc1_2345, 0x7e09),
        ];
        for (x, h) in cases {
            assert_eq!(f32_to_f16_bits(f32::from_bits(x)), h, "{x:#x}");
        }
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00);
        assert_eq!(f32_to_f16_bits(65519.99), 0x7bff);
        assert_eq!(f32_to_f16_bits(1e-8), 0);
    }

    #[test]
    fn slice_round_trips() {
        let v: Vec<f32> = (0..200).map(|i| (i as f32 - 100.0) * 0.37).collect();
        for dt in [Dtype::F32, Dtype::BF16, Dtype::F16, Dtype::F64] {
            let bytes = encode_f32("t", dt, &v).unwrap();
            let back = decode_f32("t", dt, &bytes).unwrap();
            for (a, b) in v.iter().zip(&back) {
                assert_eq!(round_f32_to(dt, *a).unwrap().to_bits(), b.to_bits());
            }
            let wide = decode_f64("t", dt, &bytes).unwrap();
            for (a, b) in back.iter().zip(&wide) {
                assert_eq!(f64::from(*a), *b);
            }
        }
        assert!(decode_f32("t", Dtype::BF16, &[0u8; 3]).is_err());
        assert!(decode_f32("t", Dtype::I32, &[0u8; 4]).is_err());
    }
}
