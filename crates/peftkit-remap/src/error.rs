//! The error type of this crate: every variant names the table, rule, tensor or file involved.

use std::path::PathBuf;

use peftkit_checkpoint::CheckpointError;

/// Everything that can go wrong while loading conversion tables or remapping a state dict.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemapError {
    /// A conversion table that is not valid JSON or not of the documented schema.
    #[error("conversion table {origin}: {reason}")]
    InvalidTable {
        /// Where the table came from (embedded name or file path).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// One rule of a table cannot be compiled or reversed.
    #[error("conversion table {origin}, rule {rule}: {reason}")]
    InvalidRule {
        /// Where the table came from.
        origin: String,
        /// Index of the rule in the table's `rules` (0-based).
        rule: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A table named by `extends` or an alias is not known.
    #[error("no conversion table named `{name}` (known tables: {known}); add a file to adapters-spec/conversions/ or pass one with --table")]
    UnknownTable {
        /// The missing name.
        name: String,
        /// The tables that exist.
        known: String,
    },
    /// A tensor cannot be converted (shape, dtype or count does not fit the rule).
    #[error("tensor `{tensor}`{}: {reason}", file.as_ref().map(|f| format!(" (in {})", f.display())).unwrap_or_default())]
    Tensor {
        /// The tensor's name in the input state dict.
        tensor: String,
        /// The file it is stored in, when it comes from disk.
        file: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
    /// Two input tensors would be written under the same name.
    #[error("tensors `{first}` and `{second}` would both be written as `{target}`; the conversion table maps two names onto one")]
    Collision {
        /// The first input name.
        first: String,
        /// The second input name.
        second: String,
        /// The output name they share.
        target: String,
    },
    /// A checkpoint folder whose model type cannot be found.
    #[error(
        "{path}: no `model_type` in config.json; pass the model type explicitly (--model-type)"
    )]
    NoModelType {
        /// The checkpoint folder.
        path: PathBuf,
    },
    /// A checkpoint asked to be converted to the layout it is already in.
    #[error("{path}: tensor `{tensor}` is already in the original on-disk layout (rule {rule} of table `{table}` would convert it to v5); converting it to the original layout again would double-apply the renames. Use --to transformers-v5, or check --model-type")]
    AlreadyOriginal {
        /// The checkpoint folder.
        path: PathBuf,
        /// A tensor name in the original layout.
        tensor: String,
        /// The table.
        table: String,
        /// The rule that matched it.
        rule: usize,
    },
    /// A v5 parameter that no converter of the table splits (see [`crate::Mapping::fused_pieces`]).
    #[error("`{tensor}` is not a fused parameter of table `{table}`: {reason}")]
    NotFused {
        /// The v5 name asked about.
        tensor: String,
        /// The table.
        table: String,
        /// Why.
        reason: String,
    },
    /// A tensor-parallel plan, split or gather that cannot be carried out (see [`crate::split`]).
    #[error("{what}: {reason}")]
    TensorParallel {
        /// What it is about: the plan file, the rank folder, or the tensor (and its file).
        what: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl RemapError {
    /// A tensor error, with the tensor's file when it is read from disk.
    pub(crate) fn tensor(
        tensor: &str,
        source: Option<&peftkit_checkpoint::Tensor>,
        reason: impl Into<String>,
    ) -> Self {
        RemapError::Tensor {
            tensor: tensor.to_owned(),
            file: source.and_then(|t| t.file_source().map(|(p, _)| p.to_owned())),
            reason: reason.into(),
        }
    }
}

impl RemapError {
    /// A tensor-parallel error about `what`.
    pub(crate) fn tp(what: impl Into<String>, reason: impl Into<String>) -> Self {
        RemapError::TensorParallel {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = RemapError> = std::result::Result<T, E>;
