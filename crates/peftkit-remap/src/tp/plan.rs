//! Tensor-parallel plans as transformers 5.24 applies them: which style each parameter gets
//! (`model.tp_plan`, keyed by module or parameter name with `*` for layer numbers) and where each
//! style puts a rank's part of a parameter (the placement of its `shard_param`). Both tables are
//! data, `adapters-spec/tp_plans.json`, generated from transformers by `tests/interop/tp_plans.py`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use indexmap::IndexMap;
use regex::Regex;
use serde::Deserialize;

use super::chunk;
use crate::error::{RemapError, Result};

/// Where one rank's part of a parameter lies: torch's DTensor placements, as transformers'
/// parallel styles use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Placement {
    /// Every rank holds the whole parameter.
    Replicate,
    /// `Shard(dim)`: rank `r` holds the `r`-th of `torch.chunk(param, world_size, dim)`; with
    /// an uneven size the last ranks hold less, possibly nothing.
    Shard {
        /// The sharded dim.
        dim: usize,
    },
    /// `_StridedShard(dim, split_factor)` (`packed_colwise`, `packed_rowwise`): the dim holds
    /// `split_factor` packed blocks (gate and up), each sharded like `Shard`, and a rank holds
    /// its part of every block, concatenated.
    Strided {
        /// The sharded dim.
        dim: usize,
        /// How many blocks are packed along it.
        split_factor: usize,
    },
}

impl Placement {
    /// The sharded dim, `None` for [`Placement::Replicate`].
    pub fn dim(&self) -> Option<usize> {
        match self {
            Placement::Replicate => None,
            Placement::Shard { dim } | Placement::Strided { dim, .. } => Some(*dim),
        }
    }

    /// The indices of the sharded dim (of length `size`) that `rank` of `world_size` holds, in
    /// the order the rank stores them: as transformers' `DtensorShardOperation` reads them.
    ///
    /// ```
    /// use peftkit_remap::Placement;
    /// // torch.chunk of 10 rows over 4 ranks: 3, 3, 3, 1.
    /// let shard = Placement::Shard { dim: 0 };
    /// assert_eq!(shard.ranges(10, 4, 3), vec![9..10]);
    /// // gate_up of 2 x 5 rows over 2 ranks: rank 1 holds gate rows 3..5 and up rows 8..10.
    /// let packed = Placement::Strided { dim: 0, split_factor: 2 };
    /// assert_eq!(packed.ranges(10, 2, 1), vec![3..5, 8..10]);
    /// ```
    pub fn ranges(&self, size: usize, world_size: usize, rank: usize) -> Vec<Range<usize>> {
        match self {
            Placement::Replicate => std::iter::once(0..size).collect(),
            Placement::Shard { .. } => chunk::contiguous(0..size, world_size, rank),
            Placement::Strided { split_factor, .. } => {
                chunk::strided(0..size, world_size, rank, *split_factor)
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct StyleRow {
    param: String,
    ndim: usize,
    placement: Placement,
}

#[derive(Debug, Clone, Deserialize)]
struct PlanEntry {
    architecture: String,
    plan: IndexMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct PlansFile {
    transformers_version: String,
    styles: BTreeMap<String, Vec<StyleRow>>,
    plans: BTreeMap<String, PlanEntry>,
}

/// The built-in tables: every model type's plan and every style's placements.
#[derive(Debug, Clone)]
pub struct TpPlans {
    file: Arc<PlansFile>,
}

/// One model's tensor-parallel plan: names (with `*` for layer numbers) to style names, and the
/// styles' placements.
///
/// ```
/// use peftkit_remap::{Placement, TpPlans};
/// let plan = TpPlans::builtin().unwrap().for_model_type("qwen2_moe").unwrap();
/// let (style, p) = plan.placement("model.layers.3.mlp.experts.gate_up_proj", 3).unwrap();
/// assert_eq!(style.as_deref(), Some("packed_colwise"));
/// assert_eq!(p, Placement::Strided { dim: 1, split_factor: 2 });
/// // A bias of a rowwise layer is replicated; a norm has no rule at all.
/// assert_eq!(plan.placement("model.layers.0.self_attn.o_proj.bias", 1).unwrap().1, Placement::Replicate);
/// assert_eq!(plan.placement("model.norm.weight", 1).unwrap(), (None, Placement::Replicate));
/// ```
#[derive(Debug, Clone)]
pub struct TpPlan {
    origin: String,
    entries: IndexMap<String, String>,
    styles: Arc<PlansFile>,
}

fn builtin_file() -> Result<Arc<PlansFile>> {
    static FILE: OnceLock<std::result::Result<Arc<PlansFile>, String>> = OnceLock::new();
    FILE.get_or_init(|| {
        serde_json::from_str::<PlansFile>(peftkit_adapters_spec::TP_PLANS_JSON)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| RemapError::tp("adapters-spec/tp_plans.json", e))
}

impl TpPlans {
    /// The plans of `adapters-spec/tp_plans.json`.
    pub fn builtin() -> Result<Self> {
        Ok(TpPlans {
            file: builtin_file()?,
        })
    }

    /// The transformers version the tables were taken from.
    pub fn transformers_version(&self) -> &str {
        &self.file.transformers_version
    }

    /// The model types that have a plan.
    pub fn model_types(&self) -> impl Iterator<Item = &str> {
        self.file.plans.keys().map(String::as_str)
    }

    /// The plan transformers applies to `model_type`'s causal-LM class.
    pub fn for_model_type(&self, model_type: &str) -> Result<TpPlan> {
        let entry = self.file.plans.get(model_type).ok_or_else(|| {
            RemapError::tp(
                format!("model type `{model_type}`"),
                format!(
                    "transformers {} has no tensor-parallel plan for it; pass one with --tp-plan FILE (a JSON object of module names to styles, as `model.tp_plan`)",
                    self.file.transformers_version
                ),
            )
        })?;
        self.plan(
            format!("{} ({model_type})", entry.architecture),
            entry.plan.clone(),
        )
    }

    /// A plan read from a JSON file: an object of names to style names, as transformers'
    /// `model.tp_plan` (or an object with such a `plan` field, as in `tp_plans.json`).
    pub fn plan_from_file(&self, path: &Path) -> Result<TpPlan> {
        let what = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| RemapError::tp(&what, e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| RemapError::tp(&what, e.to_string()))?;
        let value = value.get("plan").cloned().unwrap_or(value);
        let entries: IndexMap<String, String> = serde_json::from_value(value).map_err(|e| {
            RemapError::tp(
                &what,
                format!("a plan is a JSON object of module names to style names: {e}"),
            )
        })?;
        self.plan(what, entries)
    }

    /// A plan from its entries; every style must be one transformers registers.
    pub fn plan(&self, origin: String, entries: IndexMap<String, String>) -> Result<TpPlan> {
        for (name, style) in &entries {
            if !self.file.styles.contains_key(style) {
                let known: Vec<&str> = self.file.styles.keys().map(String::as_str).collect();
                return Err(RemapError::tp(
                    &origin,
                    format!(
                        "`{name}` has style `{style}`, which transformers {} does not know (known: {})",
                        self.file.transformers_version,
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(TpPlan {
            origin,
            entries,
            styles: self.file.clone(),
        })
    }
}

/// transformers' `replace_layer_number_by_wildcard`: `.3.` and a final `.3` become `.*`.
fn wildcard(name: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"\.\d+(\.|$)").expect("valid regex"));
    re.replace_all(name, ".*$1").into_owned()
}

impl TpPlan {
    /// Where the plan comes from (the architecture, or the file).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The entries, names to style names.
    pub fn entries(&self) -> &IndexMap<String, String> {
        &self.entries
    }

    /// The style transformers gives parameter `name` (its `_get_parameter_plan`): the entry of
    /// the name itself with layer numbers as `*`, or else of its module.
    pub fn style_of(&self, name: &str) -> Option<&str> {
        let generic = wildcard(name);
        if let Some(style) = self.entries.get(&generic) {
            return Some(style);
        }
        let (module, _) = generic.rsplit_once('.')?;
        self.entries.get(module).map(String::as_str)
    }

    /// The style and placement of parameter `name` with `ndim` dims. A parameter without a
    /// rule is replicated.
    pub fn placement(&self, name: &str, ndim: usize) -> Result<(Option<String>, Placement)> {
        let Some(style) = self.style_of(name) else {
            return Ok((None, Placement::Replicate));
        };
        let kind = if name.rsplit('.').next() == Some("bias") {
            "bias"
        } else {
            "weight"
        };
        let rows = &self.styles.styles[style];
        let found = rows.iter().find(|r| r.param == kind && r.ndim == ndim);
        match found {
            Some(row) => Ok((Some(style.to_owned()), row.placement)),
            None if rows.iter().all(|r| r.placement == Placement::Replicate) => {
                Ok((Some(style.to_owned()), Placement::Replicate))
            }
            None => Err(RemapError::tp(
                format!("tensor `{name}`"),
                format!(
                    "style `{style}` of plan {} does not shard a {ndim}-dim parameter; give it another style with --tp-plan",
                    self.origin
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_follow_transformers() {
        assert_eq!(wildcard("model.layers.12.mlp.w1"), "model.layers.*.mlp.w1");
        assert_eq!(wildcard("model.layers.3"), "model.layers.*");
        // Numbers inside a name are kept; adjacent numbers overlap as in Python's re.sub.
        assert_eq!(wildcard("h.0.1.w2"), "h.*.1.w2");
    }

    #[test]
    fn every_builtin_plan_names_known_styles() {
        let plans = TpPlans::builtin().unwrap();
        let n = plans.model_types().count();
        assert!(n > 50, "{n} plans");
        for t in plans.model_types().collect::<Vec<_>>() {
            plans.for_model_type(t).unwrap();
        }
        let llama = plans.for_model_type("llama").unwrap();
        assert_eq!(
            llama
                .placement("model.layers.0.self_attn.o_proj.weight", 2)
                .unwrap(),
            (Some("rowwise".into()), Placement::Shard { dim: 1 })
        );
        assert_eq!(
            llama.placement("lm_head.weight", 2).unwrap(),
            (
                Some("colwise_gather_output".into()),
                Placement::Shard { dim: 0 }
            )
        );
    }
}
