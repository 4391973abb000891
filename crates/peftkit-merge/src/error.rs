//! Why a merge was refused or failed.

use std::path::PathBuf;

use peftkit_checkpoint::CheckpointError;
use peftkit_peft::{AdapterError, TargetingError};

use crate::kernels::{refusal_reason, MergeMathError, UnknownOrder};

/// Why a merge was refused or failed. Nothing is written in any of these cases.
///
/// A kernel's [`MergeMathError`] raised while the output is written (a NaN under
/// `safe_merge`) arrives as [`CheckpointError::TensorCompute`], whose source it is:
///
/// ```
/// # use peftkit_merge::{MergeError, MergeMathError};
/// fn math_error(e: &MergeError) -> Option<&MergeMathError> {
///     std::error::Error::source(e)?.downcast_ref::<MergeMathError>()
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// An adapter could not be loaded.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The base could not be read or the output written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// `PEFTKIT_REDUCTION_ORDER` names no known order.
    #[error(transparent)]
    Order(#[from] UnknownOrder),
    /// An adapter weight (`DIR:WEIGHT`) that is NaN or infinite: every merged value would be.
    #[error("{adapter}: the adapter weight {weight} is not a finite number; give DIR:WEIGHT with a finite WEIGHT such as 0.5")]
    NonFiniteWeight {
        /// Adapter folder.
        adapter: PathBuf,
        /// The weight given.
        weight: f64,
    },
    /// An adapter tensor holding NaN or infinite values (refused unless
    /// [`MergeJob::allow_nonfinite`](crate::MergeJob::allow_nonfinite)).
    #[error("{adapter}: tensor `{key}` holds {count} NaN or infinite value(s) (first at flat index {first}); the merged model would too. Retrain or repair the adapter, or pass --allow-nonfinite to merge it as peft does")]
    NonFiniteAdapter {
        /// Adapter folder.
        adapter: PathBuf,
        /// The adapter tensor.
        key: String,
        /// How many values are NaN or infinite.
        count: usize,
        /// Flat (row-major) index of the first.
        first: usize,
    },
    /// An adapter tensor whose module has no tensor in the base.
    #[error("{adapter}: `{key}` adapts `{module}`, but the base {base} has no tensor `{expected}`; the adapter was trained on another model or its names need remapping")]
    NoBaseTensor {
        /// Adapter folder.
        adapter: PathBuf,
        /// Adapter tensor key.
        key: String,
        /// Module path.
        module: String,
        /// Base key looked for.
        expected: String,
        /// Base folder.
        base: PathBuf,
    },
    /// A method, variant or option that cannot be merged (exactly).
    #[error("{adapter}: cannot merge: {what}")]
    Unsupported {
        /// Adapter folder.
        adapter: PathBuf,
        /// What is unsupported.
        what: UnsupportedMerge,
    },
    /// The base's conversion table does not fit its tensors (a resharded merge plans on the
    /// transformers-v5 layout).
    #[error(transparent)]
    Remap(#[from] peftkit_remap::RemapError),
    /// A bitsandbytes base that cannot be merged as asked.
    #[error(transparent)]
    Bnb(#[from] crate::quant::bnb::BnbError),
    /// Adapter and base shapes disagree.
    #[error("{adapter}: `{key}` has shape {adapter_shape:?}, which does not fit base tensor `{base_key}` {base_shape:?}")]
    Shape {
        /// Adapter folder.
        adapter: PathBuf,
        /// Adapter tensor key.
        key: String,
        /// Its shape.
        adapter_shape: Vec<usize>,
        /// Base tensor.
        base_key: String,
        /// Its shape.
        base_shape: Vec<usize>,
    },
    /// A base quantized with a method the merge cannot write into (GPTQ, AWQ, …): its packed
    /// weights would be merged wrongly, so nothing is merged.
    #[error("the base {base} is quantized with `{method}` (config.json quantization_config); peftkit cannot merge into {method} weights (it merges into these quant_methods only: {supported}). Dequantize the base to 16 bits elsewhere and merge into that, or merge into the original 16-bit model")]
    QuantizedBase {
        /// Base folder.
        base: PathBuf,
        /// `quantization_config.quant_method`.
        method: String,
        /// The methods a merge writes into, comma-separated.
        supported: String,
    },
    /// `--dequantize` on a base that is not quantized.
    #[error("the base {base} is not quantized (no quantization_config in config.json); merge without --dequantize")]
    NotQuantized {
        /// Base folder.
        base: PathBuf,
    },
    /// An FP8 base whose config or tensors do not follow transformers' fine-grained FP8
    /// layout where the merge needs them.
    #[error("FP8 base {base}: `{tensor}`: {reason}")]
    Fp8Layout {
        /// Base folder.
        base: PathBuf,
        /// The tensor (or `quantization_config`).
        tensor: String,
        /// What is wrong, and what to do.
        reason: String,
    },
}

/// A method, variant or option a merge refuses, checked before anything is written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnsupportedMerge {
    /// A tensor of no module (prompt-learning adapters: prompt embeddings, prefixes).
    #[error("`{key}` is not a tensor of a {peft_type} adapter (prompt-learning adapters have nothing to merge)")]
    NotAModuleTensor {
        /// The adapter tensor.
        key: String,
        /// The adapter's `peft_type`.
        peft_type: String,
    },
    /// Tensors shared between modules (VeRA's projections, for instance).
    #[error("{peft_type} adapters with shared tensors are not supported")]
    SharedTensors {
        /// The adapter's `peft_type`.
        peft_type: String,
    },
    /// A method whose effect is not a change of weights, or that is not implemented.
    #[error("{peft_type} adapters cannot be merged into weights")]
    Method {
        /// The adapter's `peft_type`.
        peft_type: String,
    },
    /// LoRA variants or options peft merges otherwise (`use_dora` on a layer type that has no
    /// DoRA, `use_bdlora`, ...).
    #[error("LoRA with {}", .features.join(", "))]
    LoraFeatures {
        /// The config fields that are set.
        features: Vec<String>,
    },
    /// Trainable-token rows without the indices they replace.
    #[error("`{key}` without trainable_token_indices in the config")]
    NoTokenIndices {
        /// The adapter tensor.
        key: String,
    },
    /// A trainable-token index below zero.
    #[error("negative trainable token index")]
    NegativeTokenIndex,
    /// A LoRA on a grouped convolution.
    #[error("`{tensor}` is a grouped convolution; peft cannot merge LoRA into it (groups > 1)")]
    GroupedConv {
        /// The base tensor.
        tensor: String,
    },
    /// An expert piece on disk whose axes are not the fused parameter's last two.
    #[error("`{tensor}` maps to fused axes {axes:?}")]
    FusedAxes {
        /// The on-disk tensor.
        tensor: String,
        /// Its axes in the fused parameter.
        axes: Vec<Option<usize>>,
    },
    /// LoHa/LoKr with per-module ranks or alphas.
    #[error("{method} with rank_pattern/alpha_pattern")]
    Patterns {
        /// `LOHA` or `LOKR`.
        method: String,
    },
    /// LoHa/LoKr with a rank that is not a positive integer.
    #[error("{method} with r = {r}")]
    Rank {
        /// `LOHA` or `LOKR`.
        method: String,
        /// The configured rank.
        r: f64,
    },
    /// LoHa/LoKr effective-conv (CP decomposition) factors.
    #[error("{method} with effective-conv (CP) factors on `{module}`")]
    CpFactors {
        /// `LOHA` or `LOKR`.
        method: String,
        /// The module.
        module: String,
    },
    /// A method [`crate::Numerics::Exact`] does not define (DoRA, LoHa, LoKr, IA3 unmerge).
    #[error("`{tensor}`: {}", refusal_reason(method))]
    Exact {
        /// The base tensor.
        tensor: String,
        /// The method, as [`crate::refusal_reason`] names it.
        method: &'static str,
    },
    /// An unmerge of an adapter that adds an untied `lm_head`.
    #[error("unmerge of an adapter that unties the embeddings")]
    UnmergeUntie,
    /// An unmerge of an adapter that replaces tensors or rows.
    #[error("unmerge of an adapter that replaces whole tensors or rows (modules_to_save, trainable tokens): the original values are not in the adapter")]
    UnmergeReplacement,
    /// A rank or alpha pattern that does not resolve.
    #[error(transparent)]
    Targeting(#[from] TargetingError),
    /// A scaling that cannot be computed (rank 0).
    #[error(transparent)]
    Scaling(MergeMathError),
}

/// A merged tensor holding more NaN or infinite values than its base tensor held (the merge
/// produced them),
/// refused unless [`MergeJob::allow_nonfinite`](crate::MergeJob::allow_nonfinite). It arrives
/// as the source of a [`CheckpointError::TensorCompute`] naming the tensor.
#[derive(Debug, thiserror::Error)]
#[error("{count} NaN or infinite value(s) after merging that the base did not hold (the first non-finite value is at flat index {first}); nothing was written. peft would write them: pass --allow-nonfinite to do the same")]
pub struct NonFiniteResult {
    /// How many values are NaN or infinite.
    pub count: usize,
    /// Flat (row-major) index of the first.
    pub first: usize,
}

impl NonFiniteResult {
    /// The refusal of merged tensor `tensor`, which holds `after` NaN/Inf values, the first at
    /// `first`, where its base held `held`; `None` when the merge made none.
    pub(crate) fn refusal(
        tensor: &str,
        (after, first): (usize, usize),
        held: usize,
    ) -> Option<CheckpointError> {
        (after > held).then(|| CheckpointError::TensorCompute {
            tensor: tensor.to_owned(),
            context: "merged".into(),
            source: Box::new(NonFiniteResult {
                count: after - held,
                first,
            }),
        })
    }
}
