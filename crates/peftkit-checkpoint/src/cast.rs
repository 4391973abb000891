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

fn cast_bytes(src: &[u8], from: Dtype, to: Dtype) -> Vec<u8> {
    let (inw, outw) = (width(from), width(to));
    let numel = src.len() / inw;
    let vectorised = numel - numel % TORCH_VECTOR;
    let mut out = Vec::with_capacity(numel * outw);
    for (i, c) in src.chunks_exact(inw).enumerate() {
        let half = || u16::from_le_bytes([c[0], c[1]]);
        match (from, to) {
            (Dtype::F32, _) => {
                let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                match to {
                    Dtype::BF16 => push16(&mut out, f32_to_bf16(x)),
                    _ => push16(&mut out, f16::from_f32(f32::from_bits(x)).to_bits()),
                }
            }
            (Dtype::F16, Dtype::F32) => {
                let x = match f16_to_f32(half()) {
                    NAN_F32 if i < vectorised => widen_nan(half()),
                    x => x,
                };
                out.extend_from_slice(&x.to_le_bytes())
            }
            (Dtype::F16, _) if f16::from_bits(half()).is_nan() => push16(&mut out, 0x7FC0),
            (Dtype::F16, _) => push16(&mut out, round_bf16(f16_to_f32(half()))),
            (_, Dtype::F32) => out.extend_from_slice(&(u32::from(half()) << 16).to_le_bytes()),
            _ => {
                let x = f32::from_bits(u32::from(half()) << 16);
                push16(&mut out, f16::from_f32(x).to_bits())
            }
        }
    }
    out
}

fn width(d: Dtype) -> usize {
    if d == Dtype::F32 {
        4
    } else {
        2
    }
}

fn push16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
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
