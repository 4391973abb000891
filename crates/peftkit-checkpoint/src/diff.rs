//! Two state dicts compared tensor by tensor, streaming: names, dtypes, shapes, and for
//! tensors whose bytes differ, how much (largest absolute difference, largest distance in
//! units in the last place, count of differing elements).

use std::borrow::Cow;

use half::{bf16, f16};
use serde::Serialize;

use crate::error::{CheckpointError, Result};
use crate::tensor::{buffers, dtype_name, dtype_size, Dtype, SourceFile, StateDict, Tensor};

/// Bytes of each tensor compared at a time: file-backed tensors never sit in memory whole.
const CHUNK: usize = 8 << 20;

/// How two state dicts differ. `a` is the reference: `missing` names are in `a` only, `extra`
/// names in `b` only.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StateDictDiff {
    /// Names in `a` and not in `b`, in `a`'s order.
    pub missing: Vec<String>,
    /// Names in `b` and not in `a`, in `b`'s order.
    pub extra: Vec<String>,
    /// Tensors whose dtypes differ (their values are not compared).
    pub dtype_differs: Vec<DtypeDiff>,
    /// Tensors of one dtype whose shapes differ (their values are not compared).
    pub shape_differs: Vec<ShapeDiff>,
    /// Tensors of one dtype and shape whose bytes differ.
    pub value_differs: Vec<ValueDiff>,
    /// Tensors in both whose dtype, shape and bytes are the same.
    pub identical: usize,
}

impl StateDictDiff {
    /// Whether the two sides hold the same names with the same dtypes, shapes and bytes.
    pub fn is_identical(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.dtype_differs.is_empty()
            && self.shape_differs.is_empty()
            && self.value_differs.is_empty()
    }
}

/// A tensor whose dtype differs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DtypeDiff {
    /// Name.
    pub name: String,
    /// Safetensors dtype name in `a`.
    pub a: String,
    /// Safetensors dtype name in `b`.
    pub b: String,
}

/// A tensor whose shape differs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShapeDiff {
    /// Name.
    pub name: String,
    /// Shape in `a`.
    pub a: Vec<usize>,
    /// Shape in `b`.
    pub b: Vec<usize>,
}

/// How much the values of one tensor differ.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ValueDiff {
    /// Name.
    pub name: String,
    /// Safetensors dtype name.
    pub dtype: String,
    /// Elements of the tensor (bytes for dtypes narrower than a byte).
    pub elements: u64,
    /// Elements whose bits differ (`-0.0` and `0.0` differ; NaNs of different bits differ).
    pub differing: u64,
    /// Differing elements where either side is NaN or infinite: they count in `differing`,
    /// not in `max_abs_diff` or `max_ulp`.
    pub non_finite: u64,
    /// Largest `|a - b|` over the other differing elements, computed in f64; `None` for dtypes
    /// peftkit does not decode (F8_E4M3 and narrower floats, complex), compared by bits only.
    pub max_abs_diff: Option<f64>,
    /// Largest distance in units in the last place (floats: steps between the two values in
    /// the dtype; integers: the difference); `None` where `max_abs_diff` is.
    pub max_ulp: Option<u64>,
}

/// Compares `a` with `b`, name by name (names in `a`'s order, then `b`'s extra names), and for
/// tensors of one dtype and shape, chunk by chunk: memory stays at two 8 MB chunks (or one
/// computed tensor per side). Read errors name the file.
///
/// ```
/// use indexmap::IndexMap;
/// use peftkit_checkpoint::{diff_state_dicts, Dtype, Tensor};
/// let t = |v: [f32; 2]| Tensor::from_bytes(Dtype::F32, vec![2], v.iter().flat_map(|x| x.to_le_bytes()).collect()).unwrap();
/// let a = IndexMap::from([("w".to_owned(), t([1.0, 2.0])), ("x".to_owned(), t([0.0, 0.0]))]);
/// let b = IndexMap::from([("w".to_owned(), t([1.0, 2.5]))]);
/// let d = diff_state_dicts(&a, &b).unwrap();
/// assert_eq!(d.missing, ["x"]);
/// let w = &d.value_differs[0];
/// // 2.0 and 2.5 are 2^21 steps of 2^-22 apart in f32.
/// assert_eq!((w.differing, w.max_abs_diff, w.max_ulp), (1, Some(0.5), Some(1 << 21)));
/// ```
pub fn diff_state_dicts(a: &StateDict, b: &StateDict) -> Result<StateDictDiff> {
    let mut diff = StateDictDiff::default();
    for (name, ta) in a {
        let Some(tb) = b.get(name) else {
            diff.missing.push(name.clone());
            continue;
        };
        if ta.dtype() != tb.dtype() {
            diff.dtype_differs.push(DtypeDiff {
                name: name.clone(),
                a: dtype_name(ta.dtype()),
                b: dtype_name(tb.dtype()),
            });
        } else if ta.shape() != tb.shape() {
            diff.shape_differs.push(ShapeDiff {
                name: name.clone(),
                a: ta.shape().to_vec(),
                b: tb.shape().to_vec(),
            });
        } else {
            let v = diff_values(ta, tb).map_err(|e| named(e, name))?;
            if v.differing == 0 {
                diff.identical += 1;
            } else {
                diff.value_differs.push(ValueDiff {
                    name: name.clone(),
                    ..v
                });
            }
        }
    }
    diff.extra = b.keys().filter(|k| !a.contains_key(*k)).cloned().collect();
    Ok(diff)
}

/// Gives a tensor-data error the tensor's name (the tensor layer does not know it).
fn named(e: CheckpointError, name: &str) -> CheckpointError {
    match e {
        CheckpointError::TensorData { tensor, reason } if tensor.is_empty() => {
            CheckpointError::TensorData {
                tensor: name.to_owned(),
                reason,
            }
        }
        other => other,
    }
}

/// Where a tensor's bytes are read from while comparing: its file, chunk by chunk, or memory.
enum Reader<'a> {
    File(&'a SourceFile, u64),
    Memory(Cow<'a, [u8]>),
}

impl<'a> Reader<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        Ok(match t.file_region() {
            Some((file, offset)) => Reader::File(file, offset),
            None => Reader::Memory(t.bytes()?),
        })
    }

    /// Bytes `pos..pos + len`, read into `buf` for files.
    fn chunk<'b>(&'b self, pos: usize, len: usize, buf: &'b mut [u8]) -> Result<&'b [u8]> {
        match self {
            Reader::File(file, offset) => {
                file.read_exact_at(&mut buf[..len], offset + pos as u64)?;
                Ok(&buf[..len])
            }
            Reader::Memory(bytes) => Ok(&bytes[pos..pos + len]),
        }
    }
}

/// The value comparison of two tensors of one dtype and shape (`name` left empty).
fn diff_values(a: &Tensor, b: &Tensor) -> Result<ValueDiff> {
    let dtype = a.dtype();
    let width = dtype_size(dtype).unwrap_or(1);
    let mut acc = Accumulator::new(dtype);
    let (ra, rb) = (Reader::of(a)?, Reader::of(b)?);
    let len = a.byte_len();
    let step = CHUNK.min(len) - CHUNK.min(len) % width.max(1);
    let (mut buf_a, mut buf_b) = (buffers::take(step), buffers::take(step));
    let mut pos = 0;
    while pos < len {
        let n = step.min(len - pos);
        let ca = ra.chunk(pos, n, &mut buf_a)?;
        let cb = rb.chunk(pos, n, &mut buf_b)?;
        if ca != cb {
            for (x, y) in ca.chunks_exact(width).zip(cb.chunks_exact(width)) {
                if x != y {
                    acc.add(x, y);
                }
            }
        }
        pos += n;
    }
    buffers::give(buf_a);
    buffers::give(buf_b);
    Ok(ValueDiff {
        name: String::new(),
        dtype: dtype_name(dtype),
        elements: (len / width) as u64,
        differing: acc.differing,
        non_finite: acc.non_finite,
        max_abs_diff: acc.decoded.then_some(acc.max_abs),
        max_ulp: acc.decoded.then_some(acc.max_ulp),
    })
}

/// The running statistics over differing elements.
struct Accumulator {
    dtype: Dtype,
    decoded: bool,
    differing: u64,
    non_finite: u64,
    max_abs: f64,
    max_ulp: u64,
}

/// One element decoded: its value and its position on the dtype's ordered line of values
/// (floats: sign-magnitude bits made monotone, so neighbours differ by one).
enum Element {
    Float { value: f64, order: i64 },
    Int(i128),
}

impl Accumulator {
    fn new(dtype: Dtype) -> Self {
        Accumulator {
            dtype,
            decoded: decode(dtype, &[0; 8]).is_some(),
            differing: 0,
            non_finite: 0,
            max_abs: 0.0,
            max_ulp: 0,
        }
    }

    /// Counts one pair of differing elements (`x != y` bitwise).
    fn add(&mut self, x: &[u8], y: &[u8]) {
        self.differing += 1;
        let (Some(ex), Some(ey)) = (decode(self.dtype, x), decode(self.dtype, y)) else {
            return;
        };
        let (abs, ulp) = match (ex, ey) {
            (Element::Int(i), Element::Int(j)) => ((i - j).unsigned_abs() as f64, i.abs_diff(j)),
            (Element::Float { value: v, order: o }, Element::Float { value: w, order: p }) => {
                if !v.is_finite() || !w.is_finite() {
                    self.non_finite += 1;
                    return;
                }
                ((v - w).abs(), u128::from(o.abs_diff(p)))
            }
            _ => return,
        };
        self.max_abs = self.max_abs.max(abs);
        self.max_ulp = self.max_ulp.max(u64::try_from(ulp).unwrap_or(u64::MAX));
    }
}

/// The element at the start of `bytes` (little-endian), for the dtypes peftkit decodes.
fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Element> {
    let le = |n: usize| -> u64 {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&bytes[..n]);
        u64::from_le_bytes(b)
    };
    let float = |value: f64, bits: u64, width: u32| {
        let sign = bits >> (width - 1) != 0;
        let magnitude = (bits & ((1u64 << (width - 1)) - 1)) as i64;
        Element::Float {
            value,
            order: if sign { -magnitude } else { magnitude },
        }
    };
    Some(match dtype {
        Dtype::F64 => float(f64::from_bits(le(8)), le(8), 64),
        Dtype::F32 => float(f64::from(f32::from_bits(le(4) as u32)), le(4), 32),
        Dtype::F16 => float(f16::from_bits(le(2) as u16).to_f64(), le(2), 16),
        Dtype::BF16 => float(bf16::from_bits(le(2) as u16).to_f64(), le(2), 16),
        // E5M2 is the high byte of an f16.
        Dtype::F8_E5M2 => float(f16::from_bits((le(1) as u16) << 8).to_f64(), le(1), 8),
        Dtype::BOOL | Dtype::U8 => Element::Int(le(1).into()),
        Dtype::U16 => Element::Int(le(2).into()),
        Dtype::U32 => Element::Int(le(4).into()),
        Dtype::U64 => Element::Int(le(8).into()),
        Dtype::I8 => Element::Int((le(1) as u8 as i8).into()),
        Dtype::I16 => Element::Int((le(2) as u16 as i16).into()),
        Dtype::I32 => Element::Int((le(4) as u32 as i32).into()),
        Dtype::I64 => Element::Int((le(8) as i64).into()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Tensor {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Tensor::from_bytes(Dtype::F32, vec![v.len()], bytes).unwrap()
    }

    fn sd(items: Vec<(&str, Tensor)>) -> StateDict {
        items.into_iter().map(|(k, t)| (k.to_owned(), t)).collect()
    }

    #[test]
    fn names_dtypes_shapes_and_values_are_told_apart() {
        let bf = Tensor::from_bytes(Dtype::BF16, vec![1], vec![0, 0]).unwrap();
        let a = sd(vec![
            ("same", f32s(&[1.0, -2.0])),
            ("only_a", f32s(&[0.0])),
            ("dtype", f32s(&[0.0])),
            ("shape", f32s(&[0.0, 0.0])),
            ("values", f32s(&[1.0, 1.0, f32::NAN, 0.0])),
        ]);
        let b = sd(vec![
            ("only_b", f32s(&[0.0])),
            ("values", f32s(&[1.0, -1.0, 0.0, -0.0])),
            ("shape", f32s(&[0.0])),
            ("dtype", bf),
            ("same", f32s(&[1.0, -2.0])),
        ]);
        let d = diff_state_dicts(&a, &b).unwrap();
        assert_eq!(
            (d.missing.as_slice(), d.extra.as_slice()),
            (&["only_a".to_owned()][..], &["only_b".to_owned()][..])
        );
        assert_eq!(d.dtype_differs[0].b, "BF16");
        assert_eq!(d.shape_differs[0].a, [2]);
        assert_eq!(d.identical, 1);
        let v = &d.value_differs[0];
        // 1 vs -1: two units of magnitude apart, 2 * 0x3f800000 steps; NaN vs 0 non-finite;
        // 0 vs -0 differ in bits only.
        assert_eq!((v.elements, v.differing, v.non_finite), (4, 3, 1));
        assert_eq!(
            (v.max_abs_diff, v.max_ulp),
            (Some(2.0), Some(2 * 0x3f80_0000))
        );
        assert!(!d.is_identical());
        assert!(diff_state_dicts(&a, &a).unwrap().is_identical());
    }

    #[test]
    fn neighbours_are_one_ulp_apart_in_every_float_dtype() {
        for (dtype, x, y) in [
            (
                Dtype::BF16,
                bf16::from_f32(1.0).to_bits(),
                bf16::from_f32(1.0).to_bits() + 1,
            ),
            (
                Dtype::F16,
                f16::from_f32(-3.0).to_bits(),
                f16::from_f32(-3.0).to_bits() + 1,
            ),
        ] {
            let t = |v: u16| Tensor::from_bytes(dtype, vec![1], v.to_le_bytes().to_vec()).unwrap();
            let d = diff_state_dicts(&sd(vec![("w", t(x))]), &sd(vec![("w", t(y))])).unwrap();
            assert_eq!(d.value_differs[0].max_ulp, Some(1), "{dtype:?}");
        }
        // The smallest positive and negative subnormals straddle zero: two steps.
        let t = |v: u8| Tensor::from_bytes(Dtype::F8_E5M2, vec![1], vec![v]).unwrap();
        let d = diff_state_dicts(&sd(vec![("w", t(0x01))]), &sd(vec![("w", t(0x81))])).unwrap();
        assert_eq!(d.value_differs[0].max_ulp, Some(2));
        // Integers differ by their difference; undecoded dtypes by bits only.
        let t = |v: i64| Tensor::from_bytes(Dtype::I64, vec![1], v.to_le_bytes().to_vec()).unwrap();
        let d = diff_state_dicts(&sd(vec![("w", t(-5))]), &sd(vec![("w", t(7))])).unwrap();
        assert_eq!(
            (d.value_differs[0].max_abs_diff, d.value_differs[0].max_ulp),
            (Some(12.0), Some(12))
        );
        let t = |v: u8| Tensor::from_bytes(Dtype::F8_E4M3, vec![1], vec![v]).unwrap();
        let d = diff_state_dicts(&sd(vec![("w", t(1))]), &sd(vec![("w", t(2))])).unwrap();
        assert_eq!(
            (d.value_differs[0].differing, d.value_differs[0].max_ulp),
            (1, None)
        );
    }
}
