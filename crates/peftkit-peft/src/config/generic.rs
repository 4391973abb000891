//! The config of every method other than LoRA, held as its ordered JSON map.

use serde_json::{Map, Value};

use super::read::{
    as_opt_layers, as_opt_string_list, as_opt_string_or_list, as_opt_target_modules,
};
use super::{set_list_value, ConfigError, SetOrder, TargetRules, WriteOptions};

/// The config of any method other than LoRA: its `peft_type` and all other fields in file order.
/// Written back as held (set-valued lists sorted unless [`SetOrder::AsHeld`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GenericConfig {
    /// `peft_type`.
    pub peft_type: String,
    /// Every other field, in file order.
    pub fields: Map<String, Value>,
    /// Fields peft stores as sets for this method (from the adapters spec).
    pub set_fields: Vec<String>,
}

impl GenericConfig {
    /// The config as a JSON object.
    pub fn to_value(&self, options: &WriteOptions) -> Value {
        let mut m = self.fields.clone();
        m.insert("peft_type".into(), Value::String(self.peft_type.clone()));
        if options.set_order == SetOrder::Sorted {
            for field in &self.set_fields {
                if let Some(Value::Array(items)) = m.get(field) {
                    // Only all-string lists are sets of module names; leave anything else alone.
                    let names: Option<Vec<String>> = items
                        .iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect();
                    if let Some(names) = names {
                        m.insert(field.clone(), set_list_value(&names, SetOrder::Sorted));
                    }
                }
            }
        }
        Value::Object(m)
    }

    pub(super) fn target_rules(&self) -> Result<TargetRules, ConfigError> {
        let get = |f: &str| self.fields.get(f).unwrap_or(&Value::Null);
        Ok(TargetRules {
            target_modules: as_opt_target_modules("target_modules", get("target_modules"))?,
            exclude_modules: as_opt_target_modules("exclude_modules", get("exclude_modules"))?,
            modules_to_save: as_opt_string_list("modules_to_save", get("modules_to_save"))?,
            layers_to_transform: as_opt_layers("layers_to_transform", get("layers_to_transform"))?,
            layers_pattern: as_opt_string_or_list("layers_pattern", get("layers_pattern"))?,
            target_parameters: as_opt_string_or_list(
                "target_parameters",
                get("target_parameters"),
            )?,
        })
    }
}
