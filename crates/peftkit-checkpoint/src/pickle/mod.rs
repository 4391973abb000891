//! PyTorch `.bin` weights (`torch.save` of a state dict), read without running a pickle.
//!
//! Two container formats are read: torch's zip format (the default since torch 1.6: one
//! `data.pkl` and one stored, uncompressed entry per storage) and the legacy format before it
//! (a stream of pickles followed by the raw storages), which older Hub checkpoints still use.
//! The even older tar format (torch < 0.4) is refused. The pickle runs on a restricted
//! machine ([`vm`]) whose allow list ([`torch`]) refuses any global but torch's tensor
//! rebuilders, storage types and `collections.OrderedDict`, naming it.
//!
//! Tensors are not loaded: each is a handle on a byte range of the file (a contiguous view)
//! or a closure that gathers its elements when written (a strided view), so memory stays at
//! one tensor however large the file is.

mod archive;
mod torch;
mod vm;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{CheckpointError, Result};
use crate::tensor::{dtype_size, SourceFile, Tensor};
use torch::TensorRef;
use vm::VmError;

/// The tensors of a pickle weights file, and the names it stores twice.
pub(crate) struct PickleWeights {
    /// Every tensor, in the state dict's order.
    pub(crate) tensors: Vec<(String, Tensor)>,
    /// `(target, source)`: a later name that is the very same view of one storage as an
    /// earlier one, as `torch.save` stores tied weights (`lm_head.weight` and
    /// `model.embed_tokens.weight`).
    pub(crate) ties: Vec<(String, String)>,
}

/// Whether `path` is a pickle weights file by its name (`.bin`, `.pt`, `.pth`).
pub(crate) fn is_pickle_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

/// Opens a `torch.save`d state dict.
pub(crate) fn open_pickle(path: &Path) -> Result<PickleWeights> {
    let file = SourceFile::open(path)?;
    let (entries, storages) = archive::read(path, &file)?;
    build(path, &file, entries, &storages)
}

/// Maps a machine error to this crate's error for `path`.
fn vm_error(path: &Path, e: VmError) -> CheckpointError {
    match e {
        VmError::Refused(global) => CheckpointError::RefusedGlobal {
            path: path.to_owned(),
            global,
        },
        VmError::Invalid(reason) => invalid(path, reason),
        VmError::Truncated => invalid(
            path,
            "the pickle ends before its STOP opcode (a truncated file)",
        ),
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::InvalidPickle {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Where a storage's bytes are: absolute offset and length.
type Storages = HashMap<String, (u64, u64)>;

/// The tensors of `entries`, file-backed where they are contiguous.
fn build(
    path: &Path,
    file: &Arc<SourceFile>,
    entries: Vec<(String, TensorRef)>,
    storages: &Storages,
) -> Result<PickleWeights> {
    let mut tensors = Vec::with_capacity(entries.len());
    let mut ties = Vec::new();
    // Byte ranges already handed out as file-backed tensors, per storage: a different view
    // overlapping one of them is given its own copy, since transformers loads every tensor
    // into its own parameter and only identical views are ties.
    let mut seen: Vec<(&str, &TensorRef)> = Vec::new();
    let mut ranges: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for (name, t) in &entries {
        let bad = |reason: String| CheckpointError::InvalidTensor {
            path: path.to_owned(),
            tensor: name.clone(),
            reason,
        };
        let view = View::of(t, storages).map_err(bad)?;
        if let Some((first, _)) = seen.iter().find(|(_, s)| *s == t) {
            ties.push((name.clone(), (*first).to_owned()));
        }
        let key = t.storage.key.as_str();
        let tensor = match view.range() {
            Some((start, end)) => {
                let taken = ranges.entry(key).or_default();
                let same = taken.contains(&(start, end)) && seen.iter().any(|(_, s)| *s == t);
                if same || !taken.iter().any(|&(s, e)| s < end && start < e) {
                    taken.push((start, end));
                    Tensor::from_file(t.storage.dtype, t.shape.clone(), Arc::clone(file), start)
                } else {
                    view.lazy(file)
                }
            }
            None => view.lazy(file),
        }
        .map_err(|e| bad(e.to_string()))?;
        seen.push((name, t));
        tensors.push((name.clone(), tensor));
    }
    Ok(PickleWeights { tensors, ties })
}

/// A tensor view checked against its storage, in bytes.
struct View {
    dtype: crate::Dtype,
    shape: Vec<usize>,
    /// Byte strides.
    stride: Vec<u64>,
    /// Absolute offset of the first element.
    start: u64,
    es: u64,
    contiguous: bool,
    /// Bytes from the first to past the last element.
    span: u64,
}

impl View {
    fn of(t: &TensorRef, storages: &Storages) -> std::result::Result<Self, String> {
        let dtype = t.storage.dtype;
        let es = dtype_size(dtype).ok_or("a sub-byte dtype")? as u64;
        let &(base, len) = storages
            .get(&t.storage.key)
            .ok_or_else(|| format!("storage `{}` is not in the file", t.storage.key))?;
        let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
        let mut last = 0u64; // index of the last element, relative to the offset
        for (&d, &s) in t.shape.iter().zip(&t.stride) {
            if d > 0 {
                last = (d as u64 - 1)
                    .checked_mul(s as u64)
                    .and_then(|x| x.checked_add(last))
                    .ok_or("a stride that overflows")?;
            }
        }
        let end_elem = t
            .offset
            .checked_add(last + 1)
            .ok_or("an offset that overflows")?;
        if numel > 0 && (end_elem > t.storage.numel || t.storage.numel * es > len) {
            return Err(format!(
                "its view (offset {}, shape {:?}, stride {:?}) reaches past its storage `{}` of {} elements ({} bytes in the file)",
                t.offset, t.shape, t.stride, t.storage.key, t.storage.numel, len
            ));
        }
        let mut expect = 1usize;
        let mut contiguous = true;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && s != expect {
                contiguous = false;
            }
            expect = expect.saturating_mul(d);
        }
        Ok(View {
            dtype,
            shape: t.shape.clone(),
            stride: t.stride.iter().map(|&s| s as u64 * es).collect(),
            start: base + t.offset * es,
            es,
            contiguous: contiguous || numel == 0,
            span: if numel == 0 { 0 } else { (last + 1) * es },
        })
    }

    /// The absolute byte range of a contiguous view.
    fn range(&self) -> Option<(u64, u64)> {
        let len = self.shape.iter().map(|&d| d as u64).product::<u64>() * self.es;
        self.contiguous.then_some((self.start, self.start + len))
    }

    /// A tensor that reads the view's span and gathers its elements in row-major order.
    fn lazy(self, file: &Arc<SourceFile>) -> Result<Tensor> {
        let file = Arc::clone(file);
        let (dtype, shape) = (self.dtype, self.shape.clone());
        Tensor::lazy(dtype, shape, move || {
            let span = usize::try_from(self.span).map_err(|_| CheckpointError::TensorData {
                tensor: String::new(),
                reason: "a view larger than memory".into(),
            })?;
            let mut src = vec![0u8; span];
            file.read_exact_at(&mut src, self.start)?;
            Ok(self.gather(&src))
        })
    }

    fn gather(&self, src: &[u8]) -> Vec<u8> {
        let es = self.es as usize;
        let numel: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(numel * es);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..numel {
            let at: u64 = index
                .iter()
                .zip(&self.stride)
                .map(|(&i, &s)| i as u64 * s)
                .sum();
            let at = at as usize;
            out.extend_from_slice(&src[at..at + es]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
