//! `peftkit diff`: two checkpoints or adapters compared in whatever files and layout each is
//! stored in (single file, shards, variant; original or transformers-v5 layout).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use peftkit_checkpoint::{
    diff_state_dicts, Checkpoint, ModelConfig, StateDict, StateDictDiff, WeightsKind,
    MODEL_CONFIG_NAME,
};
use serde::Serialize;

use crate::error::Result;
use crate::registry::Registry;
use crate::resave::checkpoint_mapping;

/// Which names the two sides are compared under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiffLayout {
    /// As stored when both sides hold the same names; otherwise, for two model checkpoints,
    /// the transformers-v5 layout (so an original-layout Mixtral compares equal to the v5
    /// checkpoint transformers writes from it).
    #[default]
    Auto,
    /// The names as stored, never converted.
    Stored,
    /// Both model checkpoints taken to the transformers-v5 layout (what `from_pretrained`
    /// holds) by their model type's conversion table.
    TransformersV5,
}

impl FromStr for DiffLayout {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DiffLayout::Auto),
            "stored" => Ok(DiffLayout::Stored),
            "transformers-v5" | "v5" => Ok(DiffLayout::TransformersV5),
            other => Err(format!(
                "unknown layout `{other}`: use `auto`, `stored` or `transformers-v5`"
            )),
        }
    }
}

/// Options of [`diff_checkpoints`].
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Variant of `a`'s weight files (`model.VARIANT.safetensors`).
    pub variant_a: Option<String>,
    /// Variant of `b`'s weight files.
    pub variant_b: Option<String>,
    /// Which names the sides are compared under.
    pub layout: DiffLayout,
    /// Model type whose table converts both sides (default: each side's `config.json`).
    pub model_type: Option<String>,
    /// Conversion table files added to the embedded ones.
    pub tables: Vec<PathBuf>,
}

peftkit_checkpoint::option_setters!(DiffOptions {
    variant_a: Some(String),
    variant_b: Some(String),
    layout: DiffLayout,
    model_type: Some(String),
    tables: Vec<PathBuf>,
});

/// What [`diff_checkpoints`] found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckpointDiff {
    /// `"model"` or `"adapter"` for `a` and for `b`.
    pub kinds: [&'static str; 2],
    /// The names compared: `"stored"` or `"transformers-v5"`.
    pub layout: &'static str,
    /// The differences, `a` the reference.
    #[serde(flatten)]
    pub diff: StateDictDiff,
}

/// Compares the checkpoint or adapter at `a` with the one at `b`: names, dtypes, shapes and
/// values (see [`diff_state_dicts`]), streaming with bounded memory.
///
/// Each side is a folder (single file, shards with their index, a variant) or a
/// `.safetensors` file. An adapter folder (with `adapter_config.json`) is compared by the keys
/// peft writes (`base_model.model.….lora_A.weight`). Two model checkpoints whose names differ
/// are compared in the transformers-v5 layout under [`DiffLayout::Auto`]: a converted tensor
/// (fused experts) is computed whole, so memory then peaks at the largest such tensor.
///
/// ```no_run
/// use std::path::Path;
/// use peftkit_remap::{diff_checkpoints, DiffOptions};
/// let d = diff_checkpoints(Path::new("mixtral-hub"), Path::new("mixtral-v5"), &DiffOptions::default()).unwrap();
/// println!("{} ({}): identical {}", d.layout, d.kinds[0], d.diff.is_identical());
/// ```
pub fn diff_checkpoints(a: &Path, b: &Path, options: &DiffOptions) -> Result<CheckpointDiff> {
    let side_a = Side::open(a, options.variant_a.as_deref())?;
    let side_b = Side::open(b, options.variant_b.as_deref())?;
    let (sa, sb) = (side_a.ckpt.state_dict(), side_b.ckpt.state_dict());
    let both_models = side_a.kind == WeightsKind::Model && side_b.kind == WeightsKind::Model;
    let convert = match options.layout {
        DiffLayout::Stored => false,
        DiffLayout::TransformersV5 => true,
        DiffLayout::Auto => both_models && !same_names(&sa, &sb),
    };
    let diff = if convert {
        let registry = registry(&options.tables)?;
        let va = side_a.to_v5(&registry, &sa, options.model_type.as_deref())?;
        let vb = side_b.to_v5(&registry, &sb, options.model_type.as_deref())?;
        diff_state_dicts(&va, &vb)?
    } else {
        diff_state_dicts(&sa, &sb)?
    };
    Ok(CheckpointDiff {
        kinds: [side_a.kind_name(), side_b.kind_name()],
        layout: if convert { "transformers-v5" } else { "stored" },
        diff,
    })
}

fn same_names(a: &StateDict, b: &StateDict) -> bool {
    a.len() == b.len() && a.keys().all(|k| b.contains_key(k))
}

fn registry(tables: &[PathBuf]) -> Result<Registry> {
    let mut registry = Registry::builtin()?;
    for t in tables {
        registry.add_table_file(t)?;
    }
    Ok(registry)
}

/// One side of a diff: its weights and, for a model folder, its `config.json`.
struct Side {
    ckpt: Checkpoint,
    kind: WeightsKind,
    config: Option<ModelConfig>,
}

impl Side {
    fn open(path: &Path, variant: Option<&str>) -> Result<Self> {
        let is_adapter = path.join("adapter_config.json").is_file()
            || path.join("adapter_model.safetensors").is_file();
        let kind = if is_adapter {
            WeightsKind::Adapter
        } else {
            WeightsKind::Model
        };
        let dir = if path.is_file() {
            path.parent().map(Path::to_owned).unwrap_or_default()
        } else {
            path.to_owned()
        };
        let config_path = dir.join(MODEL_CONFIG_NAME);
        let config = if !is_adapter && config_path.is_file() {
            Some(ModelConfig::read(&config_path)?)
        } else {
            None
        };
        let ckpt = Checkpoint::open_kind(path, kind, variant)?;
        Ok(Side { ckpt, kind, config })
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            WeightsKind::Adapter => "adapter",
            _ => "model",
        }
    }

    /// The state dict `from_pretrained` would hold (unchanged tensors stay file-backed).
    fn to_v5(
        &self,
        registry: &Registry,
        state: &StateDict,
        model_type: Option<&str>,
    ) -> Result<StateDict> {
        let mapping = checkpoint_mapping(registry, self.config.as_ref(), model_type)?;
        Ok(mapping.forward(state)?.state)
    }
}
