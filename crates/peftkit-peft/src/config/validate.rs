//! peft's `__post_init__` checks (`LoraConfig.__post_init__`, `PeftConfig` and the tuner
//! configs' shared layer checks), run by `validate` after a lenient read.

use serde_json::Value;

use super::{
    ConfigError, InitLoraWeights, LoraConfig, StringOrList, TargetModules, TargetRules,
    LORA_BIAS_VALUES, TASK_TYPES,
};
use crate::targeting::{PatternResolver, TargetMatcher};

pub(super) fn check_task_type(task_type: Option<&str>) -> Result<(), ConfigError> {
    match task_type {
        Some(t) if !TASK_TYPES.contains(&t) => Err(ConfigError::InvalidTaskType(t.to_owned())),
        _ => Ok(()),
    }
}

/// peft's checks shared by all tuner configs that have layer selection.
pub(super) fn check_layer_options(rules: &TargetRules) -> Result<(), ConfigError> {
    if matches!(rules.target_modules, Some(TargetModules::Regex(_))) {
        if rules.layers_to_transform.is_some() {
            return Err(ConfigError::LayersWithRegexTargets("layers_to_transform"));
        }
        if rules.layers_pattern.is_some() {
            return Err(ConfigError::LayersWithRegexTargets("layers_pattern"));
        }
    }
    if rules
        .layers_pattern
        .as_ref()
        .is_some_and(StringOrList::is_truthy)
        && rules.layers_to_transform.is_none()
    {
        return Err(ConfigError::LayersPatternWithoutLayersToTransform);
    }
    Ok(())
}

pub(super) fn is_truthy_object(v: &Option<Value>) -> bool {
    match v {
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    }
}

impl LoraConfig {
    /// peft's `LoraConfig.__post_init__` checks plus what peft would reject later when it builds
    /// the layers: `task_type`, `r > 0`, `bias`, `init_lora_weights`, `lora_dropout` in [0, 1],
    /// pattern values, contradictory options, and every regex compiling.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_task_type(self.task_type.as_deref())?;
        if self.r == 0 {
            return Err(ConfigError::InvalidValue {
                field: "r".into(),
                reason: "must be a positive integer".into(),
            });
        }
        if !LORA_BIAS_VALUES.contains(&self.bias.as_str()) {
            return Err(ConfigError::InvalidValue {
                field: "bias".into(),
                reason: format!(
                    "{:?} is not one of {}",
                    self.bias,
                    LORA_BIAS_VALUES.join(", ")
                ),
            });
        }
        if !self.init_lora_weights.is_known() {
            return Err(ConfigError::InvalidValue {
                field: "init_lora_weights".into(),
                reason: format!("unknown initialisation {:?}", self.init_lora_weights),
            });
        }
        if !self
            .lora_dropout
            .as_f64()
            .is_some_and(|p| (0.0..=1.0).contains(&p))
        {
            return Err(ConfigError::InvalidValue {
                field: "lora_dropout".into(),
                reason: format!("{} is not a probability in [0, 1]", self.lora_dropout),
            });
        }
        if !self.lora_alpha.as_f64().is_some_and(f64::is_finite) {
            return Err(ConfigError::InvalidValue {
                field: "lora_alpha".into(),
                reason: format!("{} is not a finite number", self.lora_alpha),
            });
        }
        if let Some(StringOrList::One(s)) = &self.target_parameters {
            return Err(ConfigError::StringTargetParameters(s.clone()));
        }
        let rules = TargetRules::from_lora(self);
        check_layer_options(&rules)?;
        if self.use_dora && is_truthy_object(&self.megatron_config) {
            return Err(ConfigError::DoraWithMegatron);
        }
        if self.init_lora_weights.is("loftq") && !is_truthy_object(&self.loftq_config) {
            return Err(ConfigError::LoftqWithoutConfig);
        }
        if self.lora_bias {
            if let InitLoraWeights::Method(m) = &self.init_lora_weights {
                return Err(ConfigError::LoraBiasWithInit(m.clone()));
            }
            if self.use_dora {
                return Err(ConfigError::LoraBiasWithDora);
            }
        }
        for (k, v) in self.rank_pattern.iter().flatten() {
            if v.as_u64().is_none_or(|r| r == 0) {
                return Err(ConfigError::InvalidValue {
                    field: format!("rank_pattern[{k:?}]"),
                    reason: format!("{v} is not a positive integer"),
                });
            }
        }
        for (k, v) in self.alpha_pattern.iter().flatten() {
            if !v.as_f64().is_some_and(f64::is_finite) {
                return Err(ConfigError::InvalidValue {
                    field: format!("alpha_pattern[{k:?}]"),
                    reason: format!("{v} is not a finite number"),
                });
            }
        }
        // Compiling is the regex check.
        TargetMatcher::new(&rules)?;
        PatternResolver::new(self)?;
        Ok(())
    }
}
