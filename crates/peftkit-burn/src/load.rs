//! Hugging Face checkpoints into burn modules: peftkit-checkpoint opens the files (single,
//! sharded, variant), the remap tables bring an original-layout MoE checkpoint to the
//! transformers-v5 names a module uses, and burn-store's applier puts each tensor into the
//! parameter of the same path, reading it only then.

use std::path::Path;

use burn::tensor::{DType, Shape};
use burn_store::{bridge, ModuleSnapshot};
use peftkit_checkpoint::{Checkpoint, ModelConfig, StateDict, WeightsKind, MODEL_CONFIG_NAME};
use peftkit_remap::{checkpoint_mapping, Registry};

use crate::convert::{read_as, to_burn_dtype};
use crate::error::BurnError;
use crate::linear::{linear_weights, TorchLayout};

/// Options of [`load_hf`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// The dtype every float tensor is cast to (`None`: as stored). Default `F32`, what
    /// training wants; a bf16 → f32 → bf16 round trip is lossless, so [`crate::save_hf`] can
    /// write the original bytes back.
    pub dtype: Option<DType>,
    /// Refuse a checkpoint whose keys differ from the module's parameters (default `true`).
    pub strict: bool,
    /// The weights variant (`model.<variant>.safetensors`), as `from_pretrained(variant=…)`.
    pub variant: Option<String>,
    /// The model type whose conversion table applies (default: `config.json`'s).
    pub model_type: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: Some(DType::F32),
            strict: true,
            variant: None,
            model_type: None,
        }
    }
}

/// What [`load_hf`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Parameters loaded, by path.
    pub applied: Vec<String>,
    /// Module parameters the checkpoint has no tensor for (kept as initialised).
    pub missing: Vec<String>,
    /// Checkpoint tensors (transformers-v5 names) the module has no parameter for.
    pub unused: Vec<String>,
    /// The conversion rules that renamed or fused tensors on the way in.
    pub rules_used: Vec<String>,
}

/// The checkpoint in `dir` as transformers holds it after `from_pretrained`: v5 names, MoE
/// experts fused, each tensor still a lazy handle on its file.
pub(crate) fn open_v5(
    dir: &Path,
    options: &LoadOptions,
) -> Result<(StateDict, Vec<String>), BurnError> {
    let ckpt = Checkpoint::open_kind(dir, WeightsKind::Model, options.variant.as_deref())?;
    let config_path = dir.join(MODEL_CONFIG_NAME);
    let config = config_path
        .is_file()
        .then(|| ModelConfig::read(&config_path))
        .transpose()?;
    let mapping = checkpoint_mapping(
        &Registry::builtin()?,
        config.as_ref(),
        options.model_type.as_deref(),
    )?;
    let forward = mapping.forward(&ckpt.state_dict())?;
    let rules = mapping.rule_labels(&forward.used);
    Ok((forward.state, rules))
}

/// Loads the Hugging Face checkpoint in `dir` into `module`, whose parameter paths are the
/// checkpoint's (transformers-v5) names. Linear weights are transposed to burn's `[in, out]`;
/// floats are cast to `options.dtype`, in the same pass. Each tensor is read when it is
/// applied, so peak memory is the module plus one tensor (as stored and as loaded).
///
/// Strict by default: every missing and every unused key is reported in one error.
///
/// ```
/// use burn::tensor::Device;
/// use peftkit_burn::{load_hf, LlamaConfig, LlamaForCausalLM, LoadOptions};
/// use peftkit_checkpoint::ModelConfig;
///
/// let dir = std::path::Path::new("../../examples/data/tiny-llama");
/// let config = ModelConfig::read(&dir.join("config.json")).unwrap();
/// let model = LlamaForCausalLM::new(&LlamaConfig::from_hf(&config).unwrap(), &Device::flex());
/// let (model, report) = load_hf(model, dir, &LoadOptions::default()).unwrap();
/// assert!(report.missing.is_empty() && report.unused.is_empty());
/// # let _ = model;
/// ```
pub fn load_hf<M: ModuleSnapshot>(
    mut module: M,
    dir: &Path,
    options: &LoadOptions,
) -> Result<(M, LoadReport), BurnError> {
    let (state, rules_used) = open_v5(dir, options)?;
    // Linear weights are transposed here, with the cast; burn-store's adapter does the rest.
    let linear = linear_weights(&module);
    let mut tensors = Vec::with_capacity(state.len());
    for (name, t) in &state {
        let from = to_burn_dtype(t.dtype()).ok_or_else(|| BurnError::Tensor {
            tensor: name.clone(),
            reason: format!("dtype {:?} cannot be loaded into burn", t.dtype()),
        })?;
        let to = options.dtype.filter(|_| from.is_float()).unwrap_or(from);
        let transposed = t.shape().len() == 2 && linear.contains(name);
        let mut shape = t.shape().to_vec();
        if transposed {
            shape.reverse();
        }
        let (key, handle, cast) = (name.clone(), t.clone(), options.dtype);
        tensors.push(bridge::deferred(
            name.clone(),
            to,
            Shape::from(shape),
            None,
            move || {
                read_as(&key, &handle, cast, transposed)
                    .map_err(burn_store::burn_pack::Error::ValidationError)
            },
        ));
    }
    let adapter = TorchLayout::to_burn(linear);
    let result = module.apply(tensors, None, Some(Box::new(adapter)), false);
    if !result.errors.is_empty() {
        let all: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
        return Err(BurnError::Tensor {
            tensor: dir.display().to_string(),
            reason: all.join("; "),
        });
    }
    let report = LoadReport {
        applied: result.applied,
        missing: result.missing.into_iter().map(|(path, _)| path).collect(),
        unused: result.unused,
        rules_used,
    };
    if options.strict && !(report.missing.is_empty() && report.unused.is_empty()) {
        return Err(BurnError::KeyMismatch {
            dir: dir.to_owned(),
            missing: report.missing,
            unused: report.unused,
        });
    }
    Ok((module, report))
}
