//! burn modules out as Hugging Face checkpoints, through the same pipeline as every peftkit
//! save (the remap tables' reverse walk, then `save_pretrained`), and merged models through
//! peftkit's streaming merge, which is bit-identical to peft's.

use std::path::Path;

use burn_store::{bridge, ModuleSnapshot};
use peftkit_checkpoint::{
    torch_dtype_name, CheckpointError, Dtype, GenerationConfig, ModelConfig, SaveOptions,
    SaveReport, StateDict, Tensor, GENERATION_CONFIG_NAME, MODEL_CONFIG_NAME,
};
use peftkit_merge::{merge, AdapterInput, MergeJob, MergeSummary};
use peftkit_peft::AdapterSaveOptions;
use peftkit_remap::{checkpoint_mapping, save_pretrained_original, Registry, Revert};

use crate::adapter::save_peft_adapter;
use crate::convert::{bytes_as, from_burn_dtype};
use crate::error::BurnError;
use crate::linear::{linear_weights, TorchLayout};
use crate::lora::AppliedLora;

/// Options of [`save_hf`]: what transformers' model carries besides its weights.
#[derive(Debug, Clone, Default)]
pub struct HfSaveOptions {
    /// `config.json`; its `dtype` is set to the dtype written.
    pub config: ModelConfig,
    /// `generation_config.json`, for models that generate.
    pub generation_config: Option<GenerationConfig>,
    /// The dtype floats are written in. Default: the config's `dtype` (the checkpoint's own,
    /// so bf16 weights trained in f32 go back to bf16), else as held.
    pub dtype: Option<Dtype>,
    /// The rest of `save_pretrained`'s options (`max_shard_size`, `variant`, …); `config`
    /// and `generation_config` there are replaced by the fields above.
    pub save: SaveOptions,
}

impl HfSaveOptions {
    /// The options that re-save a model loaded from `dir`: its `config.json` and
    /// `generation_config.json` (transformers builds one from the config when there is none).
    pub fn from_dir(dir: &Path) -> Result<Self, BurnError> {
        let config = ModelConfig::read(&dir.join(MODEL_CONFIG_NAME))?;
        let gen_path = dir.join(GENERATION_CONFIG_NAME);
        let generation_config = if gen_path.is_file() {
            GenerationConfig::read(&gen_path)?
        } else {
            GenerationConfig::from_model_config(&config)
        };
        Ok(HfSaveOptions {
            config,
            generation_config: Some(generation_config),
            ..HfSaveOptions::default()
        })
    }
}

/// The dtype a config's `dtype` (or legacy `torch_dtype`) names.
fn config_dtype(config: &ModelConfig) -> Option<Dtype> {
    let name = config
        .fields
        .get("dtype")
        .or_else(|| config.fields.get("torch_dtype"))?
        .as_str()?;
    [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16]
        .into_iter()
        .find(|d| torch_dtype_name(*d) == Some(name))
}

/// The module's parameters under their Hugging Face names, in module order, Linear weights
/// transposed back to `[out, in]` and floats cast to `dtype` in one pass; each read from the
/// device when the writer reaches it.
fn hf_state<M: ModuleSnapshot>(module: &M, dtype: Option<Dtype>) -> Result<StateDict, BurnError> {
    let mut state = StateDict::new();
    let linear = linear_weights(module);
    let adapter = TorchLayout::to_torch(linear.clone());
    for t in module.collect(None, Some(Box::new(adapter)), false) {
        let name = t.name.clone();
        if name.contains(".lora.") {
            return Err(BurnError::Tensor {
                tensor: name,
                reason: "the module carries LoRA adapters: save them with save_peft_adapter, \
                         or write the merged model with save_merged_hf"
                    .into(),
            });
        }
        let held = from_burn_dtype(t.dtype).ok_or_else(|| BurnError::Tensor {
            tensor: name.clone(),
            reason: format!("dtype {:?} cannot be written to safetensors", t.dtype),
        })?;
        let is_float = matches!(held, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16);
        let to = dtype.filter(|_| is_float).unwrap_or(held);
        let transposed = t.shape.len() == 2 && linear.contains(&name);
        let mut shape = t.shape.to_vec();
        if transposed {
            shape.reverse();
        }
        let key = name.clone();
        let lazy = Tensor::lazy(to, shape, move || {
            let fail = |reason: String| CheckpointError::TensorData {
                tensor: key.clone(),
                reason,
            };
            let data = bridge::to_data(&t).map_err(|e| fail(e.to_string()))?;
            bytes_as(&key, data, to, transposed).map_err(fail)
        })?;
        state.insert(name, lazy);
    }
    Ok(state)
}

/// Writes `module` as transformers' `save_pretrained(dir)` writes the same model: the
/// tensors in the original on-disk layout of the config's model type (the remap tables'
/// reverse walk), sharded by `max_shard_size`, with `config.json`
/// and `generation_config.json`; floats cast back to the checkpoint's dtype; a tied head is
/// not a parameter of the module and is not written. A module loaded with [`crate::load_hf`]
/// and saved untouched gives the files it was loaded from.
///
/// A module with LoRA adapters is refused: [`save_merged_hf`] writes the merged model.
pub fn save_hf<M: ModuleSnapshot>(
    module: &M,
    dir: &Path,
    options: &HfSaveOptions,
) -> Result<SaveReport, BurnError> {
    let dtype = options.dtype.or_else(|| config_dtype(&options.config));
    let state = hf_state(module, dtype)?;
    let mut config = options.config.clone();
    if let Some(name) = dtype.and_then(torch_dtype_name) {
        config.set_dtype(name);
    }
    let mapping = checkpoint_mapping(&Registry::builtin()?, Some(&config), None)?;
    let save = SaveOptions {
        config: Some(config),
        generation_config: options.generation_config.clone(),
        ..options.save.clone()
    };
    Ok(save_pretrained_original(
        dir,
        &state,
        &save,
        &mapping,
        &Revert::FromConfig,
    )?)
}

/// Writes the base checkpoint `base` with the LoRA adapters of `module` merged in, into
/// `out`: the adapter is exported as peft writes it, then merged by peftkit's streaming
/// merge, so the result is bit-identical to peft's `merge_and_unload()` +
/// `save_pretrained` on this CPU (burn's own `materialize` rounds differently).
pub fn save_merged_hf<M: ModuleSnapshot>(
    module: &M,
    lora: &AppliedLora,
    base: &Path,
    out: &Path,
) -> Result<MergeSummary, BurnError> {
    let staging = tempfile::tempdir().map_err(|source| CheckpointError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let adapter = staging.path().join("adapter");
    save_peft_adapter(module, lora, &adapter, &AdapterSaveOptions::default())?;
    let job = MergeJob::new(
        base,
        vec![AdapterInput {
            dir: adapter,
            weight: 1.0,
        }],
        out,
    );
    Ok(merge(&job)?)
}
