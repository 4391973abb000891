//! Tensors between peftkit's byte handles and burn's `TensorData`: dtypes and casts.

use burn::tensor::{DType, TensorData};
use peftkit_checkpoint::{Dtype, Tensor};

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
/// are never cast). Casts round to nearest, ties to even, as torch's `.to()` does.
pub(crate) fn read_as(name: &str, t: &Tensor, to: Option<DType>) -> Result<TensorData, String> {
    let from = to_burn_dtype(t.dtype())
        .ok_or_else(|| format!("dtype {:?} has no burn equivalent", t.dtype()))?;
    let bytes = t.bytes().map_err(|e| e.to_string())?.into_owned();
    let data = TensorData::try_from_bytes_vec(bytes, t.shape().to_vec(), from)
        .map_err(|e| format!("{name}: {e:?}"))?;
    match to {
        Some(to) if from.is_float() && to != from => data
            .try_cast(to)
            .map_err(|e| format!("cast to {to:?}: {e:?}")),
        _ => Ok(data),
    }
}

/// burn data as little-endian bytes of `to` (a float cast when the dtypes differ).
pub(crate) fn bytes_as(data: TensorData, to: Dtype) -> Result<Vec<u8>, String> {
    let to_burn =
        to_burn_dtype(to).ok_or_else(|| format!("dtype {to:?} has no burn equivalent"))?;
    let data = if data.dtype() == to_burn {
        data
    } else {
        data.try_cast(to_burn)
            .map_err(|e| format!("cast to {to:?}: {e:?}"))?
    };
    Ok(data.into_bytes().to_vec())
}
