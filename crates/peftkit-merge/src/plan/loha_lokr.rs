//! LoHa and LoKr adapters: the Hadamard and Kronecker products of low-rank factors.

use std::path::Path;
use std::sync::Arc;

use peftkit_peft::Adapter;
use serde_json::{Map, Value};

use super::{scale_of, unsupported, Planner};
use crate::edit::{Edit, ModuleTensors};
use crate::error::{MergeError, UnsupportedMerge};

impl Planner<'_> {
    /// Adds the steps of a LoHa or LoKr (`method`) adapter whose config fields are `fields`.
    pub(super) fn loha_lokr(
        &mut self,
        adapter: &Adapter,
        dir: &Arc<Path>,
        method: &str,
        fields: &Map<String, Value>,
        weight: f64,
    ) -> Result<(), MergeError> {
        let number = |k| fields.get(k).and_then(Value::as_f64);
        let r = number("r").unwrap_or(8.0);
        let alpha = number("alpha").unwrap_or(r);
        let set = |k| {
            fields
                .get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
        };
        let method_name = method.to_owned();
        if set("rank_pattern") || set("alpha_pattern") {
            let what = UnsupportedMerge::Patterns {
                method: method_name,
            };
            return Err(unsupported(adapter, what));
        }
        if r.fract() != 0.0 || r < 1.0 {
            let what = UnsupportedMerge::Rank {
                method: method_name,
                r,
            };
            return Err(unsupported(adapter, what));
        }
        let scale = scale_of(alpha, r as usize, false, weight, adapter)?;
        for (module, tensors) in &adapter.tensors.modules() {
            if tensors.get("t1").is_some() || tensors.get("t2").is_some() {
                let what = UnsupportedMerge::CpFactors {
                    method: method.to_owned(),
                    module: module.to_string(),
                };
                return Err(unsupported(adapter, what));
            }
            let key = tensors
                .entries()
                .next()
                .map(|(_, e)| e.source_key.clone())
                .unwrap_or_default();
            let (bk, _) = self.base_tensor(adapter, module, "weight", &key)?;
            let module = ModuleTensors::of(tensors);
            let edit = if method == "LOHA" {
                Edit::Loha { module, scale }
            } else {
                Edit::Lokr { module, scale }
            };
            self.push(&bk, dir, edit);
        }
        Ok(())
    }
}
