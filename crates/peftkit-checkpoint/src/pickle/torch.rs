//! What torch's pickles of a state dict may contain: the allow list of globals, the storages
//! named by persistent ids, and the tensor views `torch._utils._rebuild_tensor_v2` describes.
//!
//! The allow list is torch's own `weights_only` list cut down to what `torch.save` writes for
//! a state dict: tensor and parameter rebuilders, storage types, `collections.OrderedDict`,
//! and `_codecs.encode` (protocol 2's spelling of `bytes`).

use super::vm::{Global, Value, VmError};
use crate::tensor::Dtype;

/// A storage of the file: its key (the zip entry `data/<key>`), element type and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub(crate) key: String,
    pub(crate) dtype: Dtype,
    pub(crate) numel: u64,
}

/// A strided view of a storage, in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub(crate) storage: StorageRef,
    pub(crate) offset: u64,
    pub(crate) shape: Vec<usize>,
    pub(crate) stride: Vec<usize>,
}

/// The allow list: what `module.name` is, or `None` to refuse it.
pub(crate) fn allowed(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Global::RebuildParameter
        }
        ("_codecs", "encode") => Global::Encode,
        ("torch", storage) => Global::Storage(storage_dtype(storage)?),
        _ => return None,
    })
}

/// The element type of a torch storage class (`FloatStorage` holds `F32`).
fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "DoubleStorage" => Dtype::F64,
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        "UInt16Storage" => Dtype::U16,
        "UInt32Storage" => Dtype::U32,
        "UInt64Storage" => Dtype::U64,
        "Float8_e4m3fnStorage" => Dtype::F8_E4M3,
        "Float8_e5m2Storage" => Dtype::F8_E5M2,
        _ => return None,
    })
}

fn bad(reason: impl Into<String>) -> VmError {
    VmError::Invalid(reason.into())
}

fn int(v: &Value, what: &str) -> Result<i64, VmError> {
    match v {
        Value::Int(i) => Ok(*i),
        _ => Err(bad(format!("{what} is not an integer"))),
    }
}

fn dims(v: &Value, what: &str) -> Result<Vec<usize>, VmError> {
    let Value::Tuple(items) = v else {
        return Err(bad(format!("{what} is not a tuple")));
    };
    items
        .iter()
        .map(|i| usize::try_from(int(i, what)?).map_err(|_| bad(format!("{what} is negative"))))
        .collect()
}

/// Calls an allowed global with its arguments.
pub(crate) fn call(g: &Global, args: Vec<Value>) -> Result<Value, VmError> {
    match g {
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Default::default())),
        Global::OrderedDict => Err(bad("collections.OrderedDict called with arguments")),
        Global::RebuildTensor => rebuild_tensor(&args),
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(bad(
                "a parameter rebuilt from something that is not a tensor",
            )),
        },
        Global::Encode => match args.as_slice() {
            [Value::Str(s), Value::Str(enc)] if enc == "latin1" || enc == "latin-1" => s
                .chars()
                .map(|c| u8::try_from(u32::from(c)).map_err(|_| bad("bytes outside latin-1")))
                .collect::<Result<Vec<u8>, _>>()
                .map(Value::Bytes),
            _ => Err(bad("_codecs.encode called with other than (str, 'latin1')")),
        },
        Global::Storage(_) => Err(bad("a storage type called as a function")),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
/// [metadata])`; the first four are all a view needs.
fn rebuild_tensor(args: &[Value]) -> Result<Value, VmError> {
    let [Value::Storage(storage), offset, size, stride, rest @ ..] = args else {
        return Err(bad(
            "_rebuild_tensor_v2 called without (storage, offset, size, stride)",
        ));
    };
    if let Some(Value::Dict(hooks)) = rest.get(1) {
        if !hooks.borrow().is_empty() {
            return Err(bad("a tensor with backward hooks"));
        }
    }
    let offset = u64::try_from(int(offset, "storage_offset")?)
        .map_err(|_| bad("negative storage_offset"))?;
    let (shape, stride) = (dims(size, "size")?, dims(stride, "stride")?);
    if shape.len() != stride.len() {
        return Err(bad("size and stride of different lengths"));
    }
    Ok(Value::Tensor(TensorRef {
        storage: storage.clone(),
        offset,
        shape,
        stride,
    }))
}

/// torch's persistent id of a storage: `('storage', StorageType, key, location, numel)`, with
/// a sixth `view_metadata` in the legacy format (always `None` since torch 1.0).
pub(crate) fn storage_of(pid: Value) -> Result<StorageRef, VmError> {
    let Value::Tuple(items) = pid else {
        return Err(bad("a persistent id that is not a tuple"));
    };
    match items.as_slice() {
        [Value::Str(kind), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, numel, rest @ ..]
            if kind == "storage" && matches!(rest, [] | [Value::None]) =>
        {
            Ok(StorageRef {
                key: key.clone(),
                dtype: *dtype,
                numel: u64::try_from(int(numel, "storage size")?)
                    .map_err(|_| bad("negative storage size"))?,
            })
        }
        _ => Err(bad("a persistent id that is not a plain torch storage")),
    }
}

/// The `(name, tensor)` entries of a pickled state dict, in its order.
pub(crate) fn state_dict_entries(v: Value) -> Result<Vec<(String, TensorRef)>, String> {
    let Value::Dict(d) = v else {
        return Err("the pickle holds no state dict (a dict of tensors)".into());
    };
    let mut out: Vec<(String, TensorRef)> = Vec::new();
    for (k, v) in d.borrow().iter() {
        let Value::Str(name) = k else {
            return Err("a state dict key that is not a string".into());
        };
        match v {
            Value::Tensor(t) => {
                if out.iter().any(|(n, _)| n == name) {
                    return Err(format!("tensor `{name}` appears twice"));
                }
                out.push((name.clone(), t.clone()));
            }
            Value::Dict(_) => return Err(format!(
                "`{name}` is a nested dict, not a tensor: this is a training checkpoint, not a state dict; save its model state dict alone"
            )),
            other => return Err(format!("`{name}` is {}, not a tensor", describe(other))),
        }
    }
    Ok(out)
}

/// What a non-tensor value is, for an error message.
fn describe(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => format!("the bool {b}"),
        Value::Int(i) => format!("the integer {i}"),
        Value::Long(_) => "a wide integer".into(),
        Value::Float(f) => format!("the float {f}"),
        Value::Str(s) => format!("the string {s:?}"),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::Tuple(_) | Value::List(_) => "a sequence".into(),
        Value::Dict(_) => "a dict".into(),
        Value::Global(_) => "a class or function".into(),
        Value::Storage(_) => "a bare storage".into(),
        Value::Tensor(_) => "a tensor".into(),
    }
}
