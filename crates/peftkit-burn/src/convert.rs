//! Tensors between peftkit's byte handles and burn's `TensorData`: dtypes and casts.

use burn::tensor::{DType, TensorData};
use peftkit_checkpoint::{cast_tensor, Dtype, Tensor};

/// burn's dtype of a safetensors dtype, for the dtypes both know.
pub(crate) fn to_burn_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U64 => DType::U64,
        Dtype::U32 => DType::U32,
        Dtype::U16 => DType::U16,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool(burn::tensor::BoolStore::Native),
        _ => return None,
    })
}

/// The safetensors dtype of a burn dtype.
pub(crate) fn from_burn_dtype(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U64 => Dtype::U64,
        DType::U32 => Dtype::U32,
        DType::U16 => Dtype::U16,
        DType::U8 => Dtype::U8,
        DType::Bool(_) => Dtype::BOOL,
        _ => return None,
    })
}

/// A checkpoint tensor as burn data, cast to `to` when given (floats only: integer tensors
/// are never cast). Casts follow torch's `.to()` (round to nearest, ties to even; torch's NaN
/// handling), through peftkit-checkpoint's one home for casts, a slice at a time: burn's
/// `TensorData::try_cast` converts element by element, which made loading a 1 GB bf16
/// checkpoint into f32 take minutes (docs/benchmarks.md, "burn").
pub(crate) fn read_as(name: &str, t: &Tensor, to: Option<DType>) -> Result<TensorData, String> {
    let from = to_burn_dtype(t.dtype())
        .ok_or_else(|| format!("dtype {:?} has no burn equivalent", t.dtype()))?;
    let to = to.filter(|to| from.is_float() && *to != from);
    let fast = to
        .and_then(from_burn_dtype)
        .filter(|d| sliced(t.dtype(), *d));
    if let Some(target) = fast {
        let cast = cast_tensor(name, t, target).map_err(|e| e.to_string())?;
        let bytes = cast.bytes().map_err(|e| e.to_string())?.into_owned();
        return TensorData::try_from_bytes_vec(bytes, t.shape().to_vec(), to.unwrap_or(from))
            .map_err(|e| format!("{name}: {e:?}"));
    }
    let bytes = t.bytes().map_err(|e| e.to_string())?.into_owned();
    let data = TensorData::try_from_bytes_vec(bytes, t.shape().to_vec(), from)
        .map_err(|e| format!("{name}: {e:?}"))?;
    match to {
        // F64 and the rarer float types: burn's own cast.
        Some(to) => data
            .try_cast(to)
            .map_err(|e| format!("cast to {to:?}: {e:?}")),
        None => Ok(data),
    }
}

/// burn data as little-endian bytes of `to` (a float cast, as in [`read_as`], when the
/// dtypes differ).
pub(crate) fn bytes_as(data: TensorData, to: Dtype) -> Result<Vec<u8>, String> {
    let to_burn =
        to_burn_dtype(to).ok_or_else(|| format!("dtype {to:?} has no burn equivalent"))?;
    match from_burn_dtype(data.dtype()) {
        Some(from) if from == to => Ok(data.into_bytes().to_vec()),
        Some(from) if sliced(from, to) => {
            let shape = data.shape().to_vec();
            let t = Tensor::from_bytes(from, shape, data.into_bytes().to_vec())
                .map_err(|e| e.to_string())?;
            let cast = cast_tensor("", &t, to).map_err(|e| e.to_string())?;
            Ok(cast.bytes().map_err(|e| e.to_string())?.into_owned())
        }
        _ => Ok(data
            .try_cast(to_burn)
            .map_err(|e| format!("cast to {to:?}: {e:?}"))?
            .into_bytes()
            .to_vec()),
    }
}

/// Whether a cast between these dtypes goes through peftkit-checkpoint's slice casts (F32,
/// F16 and BF16, both ways).
fn sliced(from: Dtype, to: Dtype) -> bool {
    let float = |d| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16);
    from != to && float(from) && float(to)
}
