//! Tensors between peftkit's byte handles and burn's `TensorData`: dtypes, casts and the
//! Linear weights' layout.

use burn::tensor::{Bytes, DType, TensorData};
use peftkit_checkpoint::{dtype_size, Dtype, Tensor};

use crate::layout;

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
/// are never cast) and, when `transposed`, turned from torch's `[out, in]` into burn's
/// `[in, out]` (a Linear weight). Casts follow torch's `.to()` (round to nearest, ties to
/// even; torch's NaN handling), through peftkit-checkpoint's one home for casts, fused with
/// the transpose ([`crate::layout`]): burn's `TensorData::try_cast` converts element by
/// element, which made loading a 1 GB bf16 checkpoint into f32 take minutes, and burn-store's
/// adapter transposes with a `memcpy` per element (docs/benchmarks.md, "burn"). The result
/// is written once, into a buffer burn keeps without copying.
pub(crate) fn read_as(
    name: &str,
    t: &Tensor,
    to: Option<DType>,
    transposed: bool,
) -> Result<TensorData, String> {
    let from = to_burn_dtype(t.dtype())
        .ok_or_else(|| format!("dtype {:?} has no burn equivalent", t.dtype()))?;
    let to = to.filter(|to| from.is_float() && *to != from);
    let fast = to
        .and_then(from_burn_dtype)
        .filter(|d| sliced(t.dtype(), *d));
    let bytes = t.bytes().map_err(|e| e.to_string())?;
    let data = laid_out(
        name,
        &bytes,
        t.dtype(),
        fast.unwrap_or(t.dtype()),
        t.shape(),
        transposed,
    )?;
    match to {
        // F64 and the rarer float types: burn's own cast.
        Some(to) if fast.is_none() => data
            .try_cast(to)
            .map_err(|e| format!("cast to {to:?}: {e:?}")),
        _ => Ok(data),
    }
}

/// `src` (a tensor of `shape` in `from`) cast to `to` and, when `transposed`, transposed,
/// as burn data held in a buffer aligned for `to`'s elements: burn's `Bytes` takes such a
/// vector as it is, where it copies a `Vec<u8>` into a 16-byte aligned one.
fn laid_out(
    name: &str,
    src: &[u8],
    from: Dtype,
    to: Dtype,
    shape: &[usize],
    transposed: bool,
) -> Result<TensorData, String> {
    let (matrix, shape) = matrix(name, shape, transposed)?;
    let numel = matrix[0] * matrix[1];
    let width = dtype_size(to).ok_or_else(|| format!("{name}: {to:?} has no byte width"))?;
    let fill =
        |out: &mut [u8]| layout::cast_transposed(name, src, (from, to), matrix, transposed, out);
    let bytes = match width {
        1 => aligned::<u8>(numel, fill),
        2 => aligned::<u16>(numel, fill),
        4 => aligned::<u32>(numel, fill),
        8 => aligned::<u64>(numel, fill),
        w => Err(format!("{name}: elements of {w} bytes are not supported")),
    }?;
    let dtype =
        to_burn_dtype(to).ok_or_else(|| format!("{name}: {to:?} has no burn equivalent"))?;
    TensorData::try_from_bytes(bytes, shape, dtype).map_err(|e| format!("{name}: {e:?}"))
}

/// `numel` zeroed elements of `U` (a large buffer comes zeroed from the kernel, at no cost),
/// filled as bytes.
fn aligned<U: bytemuck::Pod + Send + Sync>(
    numel: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<Bytes, String> {
    let mut buffer = vec![U::zeroed(); numel];
    fill(bytemuck::cast_slice_mut(&mut buffer))?;
    Ok(Bytes::from_elems(buffer))
}

/// The `[rows, cols]` matrix a tensor of `shape` is laid out as (a single row unless it is
/// transposed, which only a 2-D tensor can be), and the shape of the result.
fn matrix(
    name: &str,
    shape: &[usize],
    transposed: bool,
) -> Result<([usize; 2], Vec<usize>), String> {
    match (transposed, shape) {
        (false, _) => Ok(([1, shape.iter().product()], shape.to_vec())),
        (true, &[rows, cols]) => Ok(([rows, cols], vec![cols, rows])),
        (true, _) => Err(format!(
            "{name}: only a 2-D tensor is transposed, not {shape:?}"
        )),
    }
}

/// burn data as little-endian bytes of `to` (a float cast, as in [`read_as`], when the
/// dtypes differ), transposed from burn's `[in, out]` to torch's `[out, in]` when
/// `transposed` (a Linear weight).
pub(crate) fn bytes_as(
    name: &str,
    data: TensorData,
    to: Dtype,
    transposed: bool,
) -> Result<Vec<u8>, String> {
    let to_burn =
        to_burn_dtype(to).ok_or_else(|| format!("dtype {to:?} has no burn equivalent"))?;
    let (data, from) = match from_burn_dtype(data.dtype()) {
        Some(from) if from == to || sliced(from, to) => (data, from),
        _ => {
            let cast = data
                .try_cast(to_burn)
                .map_err(|e| format!("cast to {to:?}: {e:?}"))?;
            (cast, to)
        }
    };
    let (matrix, _) = matrix(name, &data.shape().to_vec(), transposed)?;
    let width = dtype_size(to).ok_or_else(|| format!("{name}: {to:?} has no byte width"))?;
    let mut out = vec![0u8; matrix[0] * matrix[1] * width];
    layout::cast_transposed(
        name,
        data.as_bytes(),
        (from, to),
        matrix,
        transposed,
        &mut out,
    )?;
    Ok(out)
}

/// Whether a cast between these dtypes goes through peftkit-checkpoint's slice casts (F32,
/// F16 and BF16, both ways).
fn sliced(from: Dtype, to: Dtype) -> bool {
    let float = |d| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16);
    from != to && float(from) && float(to)
}
