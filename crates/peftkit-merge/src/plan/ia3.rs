//! IA³ adapters: a learned vector scaling a weight's input (feedforward modules) or output
//! features, and the bias of the latter.

use std::path::Path;
use std::sync::Arc;

use peftkit_peft::Adapter;
use serde_json::{Map, Value};

use super::{key_of, Planner};
use crate::edit::Edit;
use crate::error::MergeError;

impl Planner<'_> {
    /// Adds the steps of an IA³ adapter whose config fields are `fields`.
    pub(super) fn ia3(
        &mut self,
        adapter: &Adapter,
        dir: &Arc<Path>,
        fields: &Map<String, Value>,
    ) -> Result<(), MergeError> {
        let fan_in_fan_out = fields
            .get("fan_in_fan_out")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let ff: Vec<String> = fields
            .get("feedforward_modules")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for (module, tensors) in &adapter.tensors.modules() {
            let Some(v) = tensors.get("ia3_l") else {
                continue;
            };
            let feedforward = in_list(&ff, module);
            let (bk, _) = self.base_tensor(adapter, module, "weight", &key_of(tensors, "ia3_l"))?;
            let edit = Edit::Ia3 {
                vector: v.clone(),
                feedforward,
                fan_in_fan_out,
            };
            self.push(&bk, dir, edit);
            let bias_key = format!("{module}.bias");
            if !feedforward && self.base.get(&bias_key).is_some() {
                self.push(&bias_key, dir, Edit::Ia3Bias { vector: v.clone() });
            }
        }
        Ok(())
    }
}

/// Matches a module path against a list of target names the way peft does (equal, or a
/// `.`-suffix).
fn in_list(names: &[String], module: &str) -> bool {
    names
        .iter()
        .any(|n| module == n || module.ends_with(&format!(".{n}")))
}
