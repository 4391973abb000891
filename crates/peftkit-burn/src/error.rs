//! The one error type of this crate. Errors of the layers below keep their type.

use std::path::PathBuf;

/// What went wrong in a load, a save, or a LoRA operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BurnError {
    /// A `config.json` field this model cannot use.
    #[error("config.json: `{field}`: {reason}")]
    Config {
        /// The field.
        field: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(Box<peftkit_checkpoint::CheckpointError>),
    /// The layout conversion tables failed.
    #[error(transparent)]
    Remap(Box<peftkit_remap::RemapError>),
    /// An adapter folder could not be read.
    #[error(transparent)]
    Adapter(Box<peftkit_peft::AdapterError>),
    /// An adapter config could not be read or is invalid.
    #[error(transparent)]
    AdapterConfig(Box<peftkit_peft::ConfigError>),
    /// peft's targeting rules failed (a bad pattern, an invalid rank).
    #[error(transparent)]
    Targeting(Box<peftkit_peft::TargetingError>),
    /// The factors could not be classified as an adapter.
    #[error(transparent)]
    Classify(Box<peftkit_peft::ClassifyError>),
    /// The adapter could not be saved.
    #[error(transparent)]
    Save(Box<peftkit_peft::SaveError>),
    /// The streaming merge failed.
    #[error(transparent)]
    Merge(Box<peftkit_merge::MergeError>),
    /// A strict load found parameters the checkpoint lacks, or tensors the module lacks.
    #[error(
        "{dir}: {} parameter(s) of the module are not in the checkpoint [{}], {} tensor(s) of \
         the checkpoint are not in the module [{}]; load with `strict: false` to accept this",
        missing.len(), missing.join(", "), unused.len(), unused.join(", ")
    )]
    KeyMismatch {
        /// The checkpoint.
        dir: PathBuf,
        /// Module parameters with no tensor.
        missing: Vec<String>,
        /// Checkpoint tensors with no parameter.
        unused: Vec<String>,
    },
    /// A tensor could not be put into (or read out of) the module.
    #[error("tensor `{tensor}`: {reason}")]
    Tensor {
        /// The tensor (its Hugging Face key or burn path).
        tensor: String,
        /// What went wrong.
        reason: String,
    },
    /// A LoRA feature burn's reparameterization cannot express exactly.
    #[error("`{field}` = {value}: {reason}")]
    UnsupportedLora {
        /// The adapter config field.
        field: String,
        /// Its value.
        value: String,
        /// Why it is refused and what to do.
        reason: String,
    },
    /// An adapter names a module the burn module does not have, or one that is not linear.
    #[error("adapter module `{module}`: {reason}")]
    Module {
        /// The module name.
        module: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `From` for the errors of the layers below, boxed: they carry paths and names, and would
/// make every `Result` of this crate large.
macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for BurnError {
            fn from(e: $ty) -> Self {
                BurnError::$variant(Box::new(e))
            }
        })*
    };
}

boxed_from!(
    Checkpoint(peftkit_checkpoint::CheckpointError),
    Remap(peftkit_remap::RemapError),
    Adapter(peftkit_peft::AdapterError),
    AdapterConfig(peftkit_peft::ConfigError),
    Targeting(peftkit_peft::TargetingError),
    Classify(peftkit_peft::ClassifyError),
    Save(peftkit_peft::SaveError),
    Merge(peftkit_merge::MergeError),
);
