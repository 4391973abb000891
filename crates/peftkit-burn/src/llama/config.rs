//! The hyper-parameters of a Llama-family model, read from a transformers `config.json`.

use peftkit_checkpoint::ModelConfig;
use serde_json::Value;

use crate::error::BurnError;

/// The shape and numerics of a Llama-family decoder (Llama, Mistral, Qwen2), as transformers
/// 5.24 reads them from `config.json`.
///
/// ```
/// use peftkit_burn::LlamaConfig;
/// use peftkit_checkpoint::ModelConfig;
///
/// let config = ModelConfig::from_json(r#"{"model_type": "qwen2", "vocab_size": 64,
///     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
///     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
///     "tie_word_embeddings": true}"#).unwrap();
/// let llama = LlamaConfig::from_hf(&config).unwrap();
/// assert_eq!((llama.head_dim, llama.num_key_value_heads), (4, 2));
/// assert!(llama.attention_bias); // Qwen2 has q/k/v biases
/// assert_eq!(llama.rope_theta, 1e6);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` of the SiLU MLP.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (grouped-query attention when smaller than the heads).
    pub num_key_value_heads: usize,
    /// `head_dim`, or `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// RoPE base: `rope_parameters.rope_theta` (transformers 5) or the legacy `rope_theta`.
    pub rope_theta: f64,
    /// Biases on q/k/v (`attention_bias`; always on for Qwen2).
    pub attention_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it; Qwen2 and Mistral have none).
    pub o_proj_bias: bool,
    /// Biases on the MLP projections (`mlp_bias`).
    pub mlp_bias: bool,
    /// The input embedding doubles as the output head.
    pub tie_word_embeddings: bool,
    /// Mistral's `sliding_window`, applied to every layer (a query sees this many positions).
    pub sliding_window: Option<usize>,
}

/// How a model type's `config.json` maps onto [`LlamaConfig`]: the one place where the
/// families differ. Data, not code paths.
struct Family {
    model_type: &'static str,
    /// q/k/v carry a bias (Qwen2).
    qkv_bias_always: bool,
    /// The family reads `attention_bias` (q/k/v/o) and `mlp_bias` (Llama); the others
    /// hard-code their biases.
    bias_fields: bool,
    /// The family reads `sliding_window` for every layer (Mistral).
    sliding_window_field: bool,
}

const FAMILIES: [Family; 3] = [
    Family {
        model_type: "llama",
        qkv_bias_always: false,
        bias_fields: true,
        sliding_window_field: false,
    },
    Family {
        model_type: "mistral",
        qkv_bias_always: false,
        bias_fields: false,
        sliding_window_field: true,
    },
    Family {
        model_type: "qwen2",
        qkv_bias_always: true,
        bias_fields: false,
        sliding_window_field: false,
    },
];

/// The model types [`LlamaConfig::from_hf`] reads.
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type).collect()
}

struct Fields<'a>(&'a ModelConfig);

impl Fields<'_> {
    fn bad(&self, field: &str, reason: impl Into<String>) -> BurnError {
        BurnError::Config {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.0.fields.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<usize, BurnError> {
        self.opt_usize(field)?
            .ok_or_else(|| self.bad(field, "missing from config.json"))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>, BurnError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(field, format!("{v} is not a non-negative integer"))),
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64, BurnError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(field, format!("{v} is not a number"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool, BurnError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(field, format!("{v} is not a boolean"))),
        }
    }

    /// transformers 5 keeps RoPE in `rope_parameters`; older configs have `rope_theta` (and
    /// maybe `rope_scaling`). Only the default (unscaled) rotary embedding is implemented.
    fn rope_theta(&self) -> Result<f64, BurnError> {
        if let Some(params) = self.get("rope_parameters") {
            let kind = params.get("rope_type").and_then(Value::as_str);
            if kind.is_some_and(|k| k != "default") {
                return Err(self.bad(
                    "rope_parameters.rope_type",
                    format!(
                        "{} is not supported: only the default RoPE is implemented",
                        kind.unwrap_or_default()
                    ),
                ));
            }
            if let Some(theta) = params.get("rope_theta") {
                return theta.as_f64().ok_or_else(|| {
                    self.bad(
                        "rope_parameters.rope_theta",
                        format!("{theta} is not a number"),
                    )
                });
            }
        }
        if self.get("rope_scaling").is_some() {
            return Err(self.bad(
                "rope_scaling",
                "scaled RoPE is not supported: only the default RoPE is implemented",
            ));
        }
        self.f64_or("rope_theta", 10000.0)
    }
}

impl LlamaConfig {
    /// Reads a Llama, Mistral or Qwen2 `config.json`. Anything this model does not compute
    /// exactly as transformers does (another activation, scaled RoPE, per-layer sliding
    /// windows) is an error naming the field.
    pub fn from_hf(config: &ModelConfig) -> Result<Self, BurnError> {
        let f = Fields(config);
        let model_type = config.model_type().unwrap_or_default();
        let family = FAMILIES
            .iter()
            .find(|fam| fam.model_type == model_type)
            .ok_or_else(|| {
                f.bad(
                    "model_type",
                    format!(
                        "{model_type:?} is not a Llama-family model ({})",
                        supported_model_types().join(", ")
                    ),
                )
            })?;
        let act = f
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(f.bad("hidden_act", format!("{act:?}: only silu is implemented")));
        }
        if f.bool_or("use_sliding_window", false)? {
            return Err(f.bad(
                "use_sliding_window",
                "per-layer sliding windows are not implemented",
            ));
        }
        let hidden_size = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        if heads == 0 || hidden_size % heads != 0 && f.opt_usize("head_dim")?.is_none() {
            return Err(f.bad("num_attention_heads", "must divide hidden_size"));
        }
        let kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(f.bad("num_key_value_heads", "must divide num_attention_heads"));
        }
        let layer_types = f.get("layer_types").and_then(Value::as_array);
        if layer_types.is_some_and(|t| t.iter().any(|l| l != "full_attention")) {
            return Err(f.bad(
                "layer_types",
                "only full_attention layers are implemented (no per-layer sliding windows)",
            ));
        }
        let (attention_bias, mlp_bias) = if family.bias_fields {
            (
                f.bool_or("attention_bias", false)?,
                f.bool_or("mlp_bias", false)?,
            )
        } else {
            (false, false)
        };
        let sliding_window = if family.sliding_window_field {
            f.opt_usize("sliding_window")?
        } else {
            None
        };
        Ok(LlamaConfig {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: f.opt_usize("head_dim")?.unwrap_or(hidden_size / heads),
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: f.rope_theta()?,
            attention_bias: attention_bias || family.qkv_bias_always,
            o_proj_bias: attention_bias,
            mlp_bias,
            tie_word_embeddings: config.tie_word_embeddings(),
            sliding_window,
        })
    }
}
