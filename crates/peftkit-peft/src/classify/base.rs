//! What the base model is: its name, task and `config.json`.

use peftkit_checkpoint::ModelConfig;
use serde_json::{json, Value};

/// How `task_type` is chosen for an inferred config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TaskTypeChoice {
    /// From the base config's `architectures[0]` (`…ForCausalLM` → `CAUSAL_LM`, …); null when
    /// unknown.
    #[default]
    FromArchitecture,
    /// This value.
    Given(String),
    /// `null` (peft then writes `auto_mapping`).
    Null,
}

/// What peft takes from the live model when it writes a config and a model card, and peftkit
/// must be told: the base model's name, the task and its `config.json`.
#[derive(Debug, Clone, Default)]
pub struct BaseModelInfo {
    /// `base_model_name_or_path` (peft: the model's `name_or_path`; `null` when unknown).
    pub name_or_path: Option<String>,
    /// `task_type`.
    pub task_type: TaskTypeChoice,
    /// `auto_mapping` to write when `task_type` is null (default: derived from `config`).
    pub auto_mapping: Option<Value>,
    /// The base model's `config.json` (model type, architecture, tied embeddings, sizes).
    pub config: Option<ModelConfig>,
}

peftkit_checkpoint::option_setters!(BaseModelInfo {
    name_or_path: Some(String),
    task_type: TaskTypeChoice,
    auto_mapping: Some(Value),
    config: Some(ModelConfig),
});

impl BaseModelInfo {
    /// `model_type` of the config.
    pub fn model_type(&self) -> Option<&str> {
        self.config.as_ref().and_then(ModelConfig::model_type)
    }

    /// `architectures[0]` of the config.
    pub fn architecture(&self) -> Option<&str> {
        self.config
            .as_ref()?
            .fields
            .get("architectures")?
            .as_array()?
            .first()?
            .as_str()
    }

    /// The `task_type` to write.
    pub fn resolved_task_type(&self) -> Option<String> {
        match &self.task_type {
            TaskTypeChoice::Given(t) => Some(t.clone()),
            TaskTypeChoice::Null => None,
            TaskTypeChoice::FromArchitecture => {
                let arch = self.architecture()?;
                let encoder_decoder = self
                    .config
                    .as_ref()
                    .and_then(|c| c.fields.get("is_encoder_decoder"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let t = if arch.ends_with("ForCausalLM") || arch.ends_with("LMHeadModel") {
                    "CAUSAL_LM"
                } else if arch.ends_with("ForSequenceClassification") {
                    "SEQ_CLS"
                } else if arch.ends_with("ForTokenClassification") {
                    "TOKEN_CLS"
                } else if arch.ends_with("ForQuestionAnswering") {
                    "QUESTION_ANS"
                } else if encoder_decoder
                    && (arch.ends_with("ForConditionalGeneration")
                        || arch.ends_with("ForSeq2SeqLM"))
                {
                    "SEQ_2_SEQ_LM"
                } else {
                    return None;
                };
                Some(t.to_owned())
            }
        }
    }

    /// The `auto_mapping` peft writes when `task_type` is null: the base class and its module
    /// (`transformers.models.<model_type>.modeling_<model_type>`).
    pub fn resolved_auto_mapping(&self, task_type: Option<&str>) -> Option<Value> {
        if task_type.is_some() {
            return None;
        }
        if let Some(m) = &self.auto_mapping {
            return Some(m.clone());
        }
        let arch = self.architecture()?;
        let mt = self.model_type()?.replace('-', "_");
        Some(json!({
            "base_model_class": arch,
            "parent_library": format!("transformers.models.{mt}.modeling_{mt}"),
        }))
    }

    pub(super) fn config_usize(&self, names: &[&str]) -> Option<u64> {
        let c = self.config.as_ref()?;
        names
            .iter()
            .find_map(|n| c.fields.get(*n).and_then(Value::as_u64))
    }
}
