//! `config.json` and `generation_config.json`, read leniently and written as transformers
//! serializes them.
//!
//! Both are kept as ordered JSON maps: unknown fields survive a read/write round trip, and the
//! writer sorts keys itself. transformers' own writer adds a few rules this module applies:
//! sorted keys with `id2label` sorted numerically (its keys are Python ints in memory) in
//! `config.json` only, ASCII escaping, Python float repr, and a trailing newline.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{CheckpointError, Result};
use crate::pyjson::{self, PyJsonStyle};

/// The transformers version whose output this crate reproduces, written as
/// `transformers_version` when a config does not carry one.
pub const TRANSFORMERS_VERSION: &str = "5.24.0";

/// File name of the model config.
pub const MODEL_CONFIG_NAME: &str = "config.json";
/// File name of the generation config.
pub const GENERATION_CONFIG_NAME: &str = "generation_config.json";

fn parse_object(
    text: &str,
    file: &str,
) -> std::result::Result<Map<String, Value>, serde_json::Error> {
    match serde_json::from_str(text)? {
        Value::Object(fields) => Ok(fields),
        _ => Err(serde::de::Error::custom(format!(
            "{file} must hold a JSON object"
        ))),
    }
}

/// The fields with `transformers_version` added when missing, as transformers always writes it.
fn with_version(fields: &Map<String, Value>) -> Value {
    let mut fields = fields.clone();
    fields
        .entry("transformers_version")
        .or_insert_with(|| Value::String(TRANSFORMERS_VERSION.into()));
    Value::Object(fields)
}

fn write_text(dir: &Path, name: &str, text: String) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| CheckpointError::io(path, e))
}

fn read_object(path: &Path) -> Result<Map<String, Value>> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(CheckpointError::InvalidJson {
            path: path.to_owned(),
            reason: "expected a JSON object".into(),
        }),
        Err(e) => Err(CheckpointError::InvalidJson {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// A model's `config.json`.
///
/// ```
/// use peftkit_checkpoint::ModelConfig;
/// let mut c = ModelConfig::from_json(r#"{"model_type":"llama","rms_norm_eps":1e-06,"id2label":{"10":"b","2":"a"}}"#).unwrap();
/// c.set_dtype("bfloat16");
/// c.set_architectures(&["LlamaForCausalLM"]);
/// let text = c.to_json_string();
/// assert!(text.contains("\"rms_norm_eps\": 1e-06"));
/// assert!(text.find("\"2\"").unwrap() < text.find("\"10\"").unwrap());
/// assert!(text.ends_with("}\n"));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelConfig {
    /// Every field, as read (or set).
    pub fields: Map<String, Value>,
}

impl ModelConfig {
    /// Parses a config from JSON text.
    pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
        parse_object(text, MODEL_CONFIG_NAME).map(|fields| ModelConfig { fields })
    }

    /// Reads `config.json` from a file.
    pub fn read(path: &Path) -> Result<Self> {
        read_object(path).map(|fields| ModelConfig { fields })
    }

    /// `model_type`, if present.
    pub fn model_type(&self) -> Option<&str> {
        self.fields.get("model_type").and_then(Value::as_str)
    }

    /// `quantization_config`, if the checkpoint is quantized (its `quant_method` says how:
    /// `"fp8"`, `"gptq"`, `"awq"`, `"bitsandbytes"`, …).
    ///
    /// ```
    /// use peftkit_checkpoint::ModelConfig;
    /// let c = ModelConfig::from_json(r#"{"quantization_config":{"quant_method":"gptq","bits":4}}"#).unwrap();
    /// assert_eq!(c.quant_method(), Some("gptq"));
    /// assert_eq!(c.quantization_config().unwrap()["bits"], 4);
    /// ```
    pub fn quantization_config(&self) -> Option<&Map<String, Value>> {
        self.fields
            .get("quantization_config")
            .and_then(Value::as_object)
    }

    /// `quantization_config.quant_method` (`"unknown"` for a config without one), or `None`
    /// for an unquantized checkpoint.
    pub fn quant_method(&self) -> Option<&str> {
        let config = self.quantization_config()?;
        Some(
            config
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("unknown"),
        )
    }

    /// `dtype` (or the legacy `torch_dtype`), if present.
    pub fn dtype(&self) -> Option<&str> {
        self.fields
            .get("dtype")
            .or_else(|| self.fields.get("torch_dtype"))
            .and_then(Value::as_str)
    }

    /// Sets `dtype` (`"float32"`, `"bfloat16"`, …), as `save_pretrained` does. The legacy
    /// `torch_dtype` key is dropped: transformers ≥ 4.56 reads it but never writes it.
    pub fn set_dtype(&mut self, dtype: &str) {
        self.fields.shift_remove("torch_dtype");
        self.fields
            .insert("dtype".into(), Value::String(dtype.to_owned()));
    }

    /// Sets `architectures`.
    pub fn set_architectures(&mut self, names: &[&str]) {
        self.fields.insert(
            "architectures".into(),
            Value::Array(names.iter().map(|n| Value::String((*n).into())).collect()),
        );
    }

    /// `tie_word_embeddings`, with transformers' default of `true` when absent.
    pub fn tie_word_embeddings(&self) -> bool {
        self.fields
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    /// The text transformers writes for this config.
    pub fn to_json_string(&self) -> String {
        pyjson::py_json_string(
            &with_version(&self.fields),
            &PyJsonStyle::transformers_config(),
        )
    }

    /// Writes `config.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_text(dir, MODEL_CONFIG_NAME, self.to_json_string())
    }
}

/// A model's `generation_config.json`.
///
/// Unlike `config.json`, transformers converts dict keys to strings before sorting here, so
/// every object sorts by code point.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Every field, as read (or set).
    pub fields: Map<String, Value>,
}

impl GenerationConfig {
    /// Parses a generation config from JSON text.
    pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
        parse_object(text, GENERATION_CONFIG_NAME).map(|fields| GenerationConfig { fields })
    }

    /// Reads `generation_config.json` from a file.
    pub fn read(path: &Path) -> Result<Self> {
        read_object(path).map(|fields| GenerationConfig { fields })
    }

    /// The generation config transformers derives from a model config at init
    /// (`GenerationConfig.from_model_config`) for a causal LM: the special token ids, the
    /// output flags and `use_cache`, marked `_from_model_config`.
    pub fn from_model_config(config: &ModelConfig) -> Self {
        let mut fields = Map::new();
        fields.insert("_from_model_config".into(), Value::Bool(true));
        for key in [
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "decoder_start_token_id",
        ] {
            if let Some(v) = config.fields.get(key).filter(|v| !v.is_null()) {
                fields.insert(key.into(), v.clone());
            }
        }
        fields.insert("output_attentions".into(), Value::Bool(false));
        fields.insert("output_hidden_states".into(), Value::Bool(false));
        fields.insert(
            "use_cache".into(),
            config
                .fields
                .get("use_cache")
                .cloned()
                .unwrap_or(Value::Bool(true)),
        );
        GenerationConfig { fields }
    }

    /// The text transformers writes.
    pub fn to_json_string(&self) -> String {
        pyjson::py_json_string(
            &with_version(&self.fields),
            &PyJsonStyle::transformers_generation_config(),
        )
    }

    /// Writes `generation_config.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_text(dir, GENERATION_CONFIG_NAME, self.to_json_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generation config transformers derives for models built from config
    /// (tests/fixtures/configs, written by transformers 5.24).
    #[test]
    fn generation_config_from_model_config_matches_transformers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/configs");
        for model in ["llama", "qwen2", "gpt2"] {
            let config = ModelConfig::read(&root.join(model).join(MODEL_CONFIG_NAME)).unwrap();
            let expected =
                std::fs::read_to_string(root.join(model).join(GENERATION_CONFIG_NAME)).unwrap();
            assert_eq!(
                GenerationConfig::from_model_config(&config).to_json_string(),
                expected,
                "{model}"
            );
        }
    }
}
