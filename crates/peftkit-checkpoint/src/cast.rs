//! Floating-point dtype casts with torch's CPU rounding, as `from_pretrained(dtype=...)` casts
//! a checkpoint's tensors (`tensor.to(dtype)`).
//!
//! Finite values round to nearest, ties to even, overflowing to infinity. NaNs follow what
//! torch's CPU cast kernels do (measured with torch 2.x on x86-64, pinned by the `hub/`
//! fixtures): float32 → bfloat16 turns every NaN into `0xFFFF`; float32 → float16 keeps the
//! sign and the top payload bits, quieted (`sign | 0x7E00 | mantissa >> 13`); float16 →
//! float32 widens a NaN's payload and quiets it, except in the last `numel % 16` elements,
//! which torch's vectorised loop leaves to a scalar path that writes `0x7FFFFFFF` (16 is the
//! AVX-512 vector width this was measured on; AVX2 builds of torch use 8); float16 →
//! bfloat16 turns every NaN into `0x7FC0`; bfloat16 → float32 is exact, and bfloat16 →
//! float16 goes through float32.
//! Integer and bool tensors are never cast; float64 and float8 tensors are refused.

use half::f16;

use crate::error::{CheckpointError, Result};
use crate::tensor::{dtype_name, Dtype, StateDict, Tensor};

/// Parses a `--dtype` value: `bf16`/`bfloat16`, `f16`/`fp16`/`float16`, `f32`/`fp32`/`float32`.
///
/// ```
/// use peftkit_checkpoint::{parse_cast_dtype, Dtype};
/// assert_eq!(parse_cast_dtype("bf16"), Some(Dtype::BF16));
/// assert_eq!(parse_cast_dtype("int8"), None);
/// ```
pub fn parse_cast_dtype(text: &str) -> Option<Dtype> {
    Some(match text.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Dtype::BF16,
        "f16" | "fp16" | "float16" | "half" => Dtype::F16,
        "f32" | "fp32" | "float32" | "float" => Dtype::F32,
        _ => return None,
    })
}

fn is_castable(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Whether a dtype is floating point (what `from_pretrained(dtype=...)` casts).
fn is_floating(d: Dtype) -> bool {
    crate::save::torch_dtype_name(d).is_some()
}

/// `tensor` cast to `to` with torch's rounding (a lazy tensor, computed when written), or the
/// tensor itself when it is already of that dtype or not floating point.
///
/// ```
/// use peftkit_checkpoint::{cast_tensor, Dtype, Tensor};
/// let t = Tensor::from_bytes(Dtype::F32, vec![2], [1.0f32, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect()).unwrap();
/// let b = cast_tensor("w", &t, Dtype::BF16).unwrap();
/// assert_eq!(&*b.bytes().unwrap(), &[0x80, 0x3f, 0xff, 0xff]);
/// ```
pub fn cast_tensor(name: &str, tensor: &Tensor, to: Dtype) -> Result<Tensor> {
    let from = tensor.dtype();
    if from == to || !is_floating(from) {
        return Ok(tensor.clone());
    }
    if !is_castable(from) || !is_castable(to) {
        return Err(CheckpointError::TensorData {
            tensor: name.to_owned(),
            reason: format!(
                "casting {} to {} is not supported (only F32, F16 and BF16 are cast)",
                dtype_name(from),
                dtype_name(to)
            ),
        });
    }
    let src = tensor.clone();
    Tensor::lazy(to, tensor.shape().to_vec(), move || {
        Ok(cast_bytes(&src.bytes()?, from, to))
    })
}

/// Every floating tensor of `state` cast to `to` (see [`cast_tensor`]), in the same order.
pub fn cast_state_dict(state: &StateDict, to: Dtype) -> Result<StateDict> {
    state
        .iter()
        .map(|(n, t)| Ok((n.clone(), cast_tensor(n, t, to)?)))
        .collect()
}

/// Casts a run of consecutive elements of a floating tensor, as [`cast_tensor`] casts the
/// whole tensor, into `out`: `src` holds elements `first..` of a tensor of `numel` elements,
/// and `out` has room for as many elements of `to`. For callers that cast a tensor a piece at
/// a time (peftkit-burn casts a band of rows and transposes it while it is in cache); the
/// position matters because torch's float16 → float32 cast treats a NaN in the last
/// `numel % 16` elements differently.
///
/// ```
/// use peftkit_checkpoint::{cast_slice_into, Dtype};
/// let src: Vec<u8> = [1.0f32, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
/// let mut out = [0u8; 2];
/// // The second element of a two-element tensor.
/// cast_slice_into("w", &src[4..], Dtype::F32, Dtype::BF16, 1, 2, &mut out).unwrap();
/// assert_eq!(out, [0x20, 0x40]);
/// ```
pub fn cast_slice_into(
    name: &str,
    src: &[u8],
    from: Dtype,
    to: Dtype,
    first: usize,
    numel: usize,
    out: &mut [u8],
) -> Result<()> {
    let fail = |reason: String| CheckpointError::TensorData {
        tensor: name.to_owned(),
        reason,
    };
    if !is_castable(from) || !is_castable(to) {
        return Err(fail(format!(
            "casting {} to {} is not supported (only F32, F16 and BF16 are cast)",
            dtype_name(from),
            dtype_name(to)
        )));
    }
    let n = src.len() / width(from);
    let fits = src.len().is_multiple_of(width(from))
        && out.len() == n * width(to)
        && first.checked_add(n).is_some_and(|end| end <= numel);
    if !fits {
        return Err(fail(format!(
            "cannot cast {} bytes of {} at element {first} of {numel} into {} bytes of {}",
            src.len(),
            dtype_name(from),
            out.len(),
            dtype_name(to)
        )));
    }
    cast_into(src, from, to, first, numel, out);
    Ok(())
}

fn cast_bytes(src: &[u8], from: Dtype, to: Dtype) -> Vec<u8> {
    let numel = src.len() / width(from);
    let mut out = vec![0u8; numel * width(to)];
    cast_into(src, from, to, 0, numel, &mut out);
    out
}

/// The casts, one loop per pair of dtypes so that each compiles to straight-line code (a
/// `match` per element kept bf16 → f32 at a fraction of memory speed). `src` holds elements
/// `first..` of a tensor of `numel`; lengths are the caller's to check.
fn cast_into(src: &[u8], from: Dtype, to: Dtype, first: usize, numel: usize, out: &mut [u8]) {
    let vectorised = numel - numel % TORCH_VECTOR;
    let halves = || {
        src.as_chunks::<2>()
            .0
            .iter()
            .map(|c| u16::from_le_bytes(*c))
    };
    let words = || {
        src.as_chunks::<4>()
            .0
            .iter()
            .map(|c| u32::from_le_bytes(*c))
    };
    match (from, to) {
        _ if from == to => out.copy_from_slice(src),
        (Dtype::F32, Dtype::BF16) => {
            for (o, x) in out.as_chunks_mut::<2>().0.iter_mut().zip(words()) {
                *o = f32_to_bf16(x).to_le_bytes();
            }
        }
        (Dtype::F32, _) => {
            for (o, x) in out.as_chunks_mut::<2>().0.iter_mut().zip(words()) {
                *o = f16::from_f32(f32::from_bits(x)).to_bits().to_le_bytes();
            }
        }
        (Dtype::F16, Dtype::F32) => {
            for (i, (o, h)) in out
                .as_chunks_mut::<4>()
                .0
                .iter_mut()
                .zip(halves())
                .enumerate()
            {
                let x = match f16_to_f32(h) {
                    NAN_F32 if first + i < vectorised => widen_nan(h),
                    x => x,
                };
                *o = x.to_le_bytes();
            }
        }
        (Dtype::F16, _) => {
            for (o, h) in out.as_chunks_mut::<2>().0.iter_mut().zip(halves()) {
                let bf = if f16::from_bits(h).is_nan() {
                    0x7FC0
                } else {
                    round_bf16(f16_to_f32(h))
                };
                *o = bf.to_le_bytes();
            }
        }
        (_, Dtype::F32) => {
            for (o, h) in out.as_chunks_mut::<4>().0.iter_mut().zip(halves()) {
                *o = (u32::from(h) << 16).to_le_bytes();
            }
        }
        _ => {
            for (o, h) in out.as_chunks_mut::<2>().0.iter_mut().zip(halves()) {
                let x = f32::from_bits(u32::from(h) << 16);
                *o = f16::from_f32(x).to_bits().to_le_bytes();
            }
        }
    }
}

fn width(d: Dtype) -> usize {
    if d == Dtype::F32 {
        4
    } else {
        2
    }
}

/// Elements per vector of torch's float16 → float32 loop (AVX-512); the rest take the scalar
/// path.
const TORCH_VECTOR: usize = 16;

/// What torch's scalar float16 → float32 conversion makes of every NaN.
const NAN_F32: u32 = 0x7FFF_FFFF;

/// A float16 NaN widened as the vector conversion (`vcvtph2ps`) does: sign and payload kept,
/// quieted.
fn widen_nan(h: u16) -> u32 {
    let h = u32::from(h);
    ((h & 0x8000) << 16) | 0x7FC0_0000 | ((h & 0x03FF) << 13)
}

/// float16 → float32 bits: exact, every NaN becoming [`NAN_F32`].
fn f16_to_f32(h: u16) -> u32 {
    let v = f16::from_bits(h);
    if v.is_nan() {
        NAN_F32
    } else {
        v.to_f32().to_bits()
    }
}

/// float32 bits → bfloat16 bits as torch's vectorised CPU cast does.
fn f32_to_bf16(x: u32) -> u16 {
    f32_to_bf16_bits(f32::from_bits(x))
}

/// Rounds an `f32` to BF16 bits the way torch's CPU cast does: round to nearest even, and any
/// NaN becomes `0xFFFF`. The one home of this rule: `--dtype` casts here, and the merge
/// kernels of `peftkit-merge` round their results with it.
///
/// ```
/// use peftkit_checkpoint::f32_to_bf16_bits;
/// assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
/// assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80); // a tie rounds to even
/// assert_eq!(f32_to_bf16_bits(-f32::NAN), 0xFFFF);
/// ```
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    // Branch-free so that slice loops vectorise: the NaN case is a select on the rounded
    // value, since the rounding add could carry a NaN payload into the exponent.
    let rounded = (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0xFFFF
    } else {
        rounded
    }
}

/// Round to nearest even of a non-NaN float32 to bfloat16 (infinities stay infinite).
fn round_bf16(x: u32) -> u16 {
    let lsb = (x >> 16) & 1;
    ((x + 0x7FFF + lsb) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// float16 bits with NaNs (quiet, signalling, negative) spread over the tensor, the last
    /// `numel % 16` elements included, and ordinary values.
    fn f16_sample(numel: usize) -> Vec<u8> {
        (0..numel)
            .map(|i| match i % 7 {
                0 => 0x7E00u16 | i as u16 & 0x1FF,
                3 => 0xFD01,
                _ => f16::from_f32(i as f32 * 0.37 - 5.0).to_bits(),
            })
            .flat_map(u16::to_le_bytes)
            .collect()
    }

    /// Cast piece by piece at their positions, every pair of dtypes gives the bytes of the
    /// whole-tensor cast, float16 NaNs of the scalar tail included.
    #[test]
    fn pieces_cast_as_the_whole_tensor() {
        let numel = 16 * 5 + 11;
        let f16s = f16_sample(numel);
        let floats = [Dtype::F32, Dtype::F16, Dtype::BF16];
        for from in floats {
            let src = if from == Dtype::F16 {
                f16s.clone()
            } else {
                cast_bytes(&f16s, Dtype::F16, from)
            };
            for to in floats {
                let whole = if from == to {
                    src.clone()
                } else {
                    cast_bytes(&src, from, to)
                };
                let mut pieces = vec![0u8; whole.len()];
                let (inw, outw) = (width(from), width(to));
                for (start, end) in [(0, 7), (7, 64), (64, 85), (85, numel)] {
                    cast_slice_into(
                        "t",
                        &src[start * inw..end * inw],
                        from,
                        to,
                        start,
                        numel,
                        &mut pieces[start * outw..end * outw],
                    )
                    .unwrap();
                }
                assert_eq!(pieces, whole, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn a_piece_that_does_not_fit_is_refused() {
        let src = [0u8; 8];
        let mut out = [0u8; 16];
        let err = cast_slice_into("w", &src, Dtype::BF16, Dtype::F32, 1, 4, &mut out);
        assert!(err.unwrap_err().to_string().contains("w"));
        let err = cast_slice_into("w", &src, Dtype::I64, Dtype::F32, 0, 1, &mut out[..4]);
        assert!(err.is_err());
        assert!(cast_slice_into("w", &src, Dtype::BF16, Dtype::F32, 0, 4, &mut out).is_ok());
    }
}
