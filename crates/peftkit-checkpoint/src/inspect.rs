//! A summary of a checkpoint for people and scripts: files, tensors, totals.

use std::path::Path;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::tensor::dtype_name;

/// One tensor as `peftkit inspect` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// Safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub bytes: u64,
    /// File name, relative to the checkpoint folder.
    pub file: String,
}

/// A checkpoint summary.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckpointSummary {
    /// Weight files, relative to the folder, in shard order.
    pub files: Vec<String>,
    /// The index file, if sharded.
    pub index: Option<String>,
    /// Every tensor, in storage order.
    pub tensors: Vec<TensorSummary>,
    /// Number of tensors.
    pub total_tensors: usize,
    /// Number of elements over all tensors.
    pub total_parameters: u64,
    /// Bytes of tensor data.
    pub total_size: u64,
}

fn rel(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).display().to_string()
}

impl CheckpointSummary {
    /// Summarises an opened checkpoint.
    pub fn of(ckpt: &Checkpoint) -> Self {
        let tensors: Vec<TensorSummary> = ckpt
            .tensors()
            .map(|(name, t)| TensorSummary {
                name: name.to_owned(),
                dtype: dtype_name(t.dtype()),
                shape: t.shape().to_vec(),
                bytes: t.byte_len() as u64,
                file: ckpt
                    .file_of(name)
                    .map(|p| rel(&ckpt.dir, p))
                    .unwrap_or_default(),
            })
            .collect();
        CheckpointSummary {
            files: ckpt.files.iter().map(|f| rel(&ckpt.dir, &f.path)).collect(),
            index: match &ckpt.layout {
                crate::FileLayout::Sharded { index, .. } => Some(rel(&ckpt.dir, index)),
                crate::FileLayout::Single { .. } => None,
            },
            total_tensors: tensors.len(),
            total_parameters: ckpt.tensors().map(|(_, t)| t.numel() as u64).sum(),
            total_size: tensors.iter().map(|t| t.bytes).sum(),
            tensors,
        }
    }
}
