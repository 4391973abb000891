//! The remapping engine: a compiled list of rules run forward (on disk -> v5, what
//! `from_pretrained` does) or in reverse (v5 -> on disk, what `save_pretrained` does with
//! `save_original_format=True`), tensor by tensor and lazily.
//!
//! * `rule`: a table's rules compiled into name patterns and ops ([`Mapping`]'s constructor);
//! * `walk`: grouping names as transformers does and running one converter group;
//! * `forward` and `reverse`: the two directions, and the round trip of a save after a load;
//! * `fused`: where one expert's slice of a fused v5 parameter lives on disk.

use std::collections::BTreeSet;

use peftkit_checkpoint::StateDict;
use serde_json::{Map, Value};

use crate::table::ReversePolicy;
use rule::{CompiledRule, Kind};

mod forward;
mod fused;
mod reverse;
mod rule;
mod walk;

pub use fused::FusedPiece;

/// Which way names and tensors go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Original on-disk layout -> transformers v5 (loading).
    Forward,
    /// Transformers v5 -> original on-disk layout (`save_original_format=True`).
    Reverse,
}

/// The rules that matched at least one tensor while loading (transformers'
/// `model._weight_conversions`), as rule indices of the [`Mapping`] (see [`Mapping::rule_label`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsedRules(pub BTreeSet<usize>);

/// Which rules the reverse mapping undoes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Revert {
    /// transformers for a model that was not loaded by `from_pretrained` (built from a config):
    /// every rule of the model's table except the load-only ones (`"reverse": "if_used"`), and
    /// none of the `always` tables. With no rule at all the state dict is returned unchanged,
    /// in its own order (transformers' quick escape). This is the default.
    #[default]
    FromConfig,
    /// transformers for a model loaded by `from_pretrained`: exactly the rules that matched at
    /// load ([`Forward::used`]), load-only and `legacy` rules included. Even with no rule the
    /// output is sorted (transformers sorts whenever `_weight_conversions` is set).
    AsLoaded(UsedRules),
    /// Every rule of the model's table, load-only ones included (`legacy` excluded): gives
    /// back the Hub layout of checkpoints that had, e.g., Llava's `vision_model.` level.
    AllTableRules,
}

/// The result of [`Mapping::round_trip`].
#[derive(Debug, Clone)]
pub struct RoundTrip {
    /// The state dict `save_pretrained` writes, in the order it hands to the shard planner,
    /// with storage families.
    pub state: StateDict,
    /// The rules the load used (transformers' `model._weight_conversions`), all reverted.
    pub used: UsedRules,
}

/// The result of [`Mapping::forward`].
#[derive(Debug, Clone)]
pub struct Forward {
    /// The v5 state dict, in natural order of its names (the order transformers writes a
    /// model loaded from a v5 checkpoint in).
    pub state: StateDict,
    /// The rules that matched.
    pub used: UsedRules,
}

/// A compiled set of rules for one model: its table's rules, then the `always` tables.
///
/// ```
/// use peftkit_checkpoint::{Dtype, StateDict, Tensor};
/// use peftkit_remap::{Registry, Revert};
///
/// let mapping = Registry::builtin().unwrap().mapping("mixtral").unwrap();
/// // A v5 Mixtral layer with 2 experts, hidden 2, intermediate 1.
/// let mut v5 = StateDict::new();
/// let t = |shape: Vec<usize>| {
///     let n: usize = shape.iter().product();
///     Tensor::from_bytes(Dtype::F32, shape, (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()).unwrap()
/// };
/// v5.insert("model.layers.0.mlp.experts.gate_up_proj".into(), t(vec![2, 2, 2]));
/// v5.insert("model.layers.0.mlp.experts.down_proj".into(), t(vec![2, 2, 1]));
/// let original = mapping.reverse(&v5, &Revert::FromConfig).unwrap();
/// let names: Vec<&str> = original.keys().map(String::as_str).collect();
/// assert_eq!(names, [
///     "model.layers.0.block_sparse_moe.experts.0.w2.weight",
///     "model.layers.0.block_sparse_moe.experts.1.w2.weight",
///     "model.layers.0.block_sparse_moe.experts.0.w1.weight",
///     "model.layers.0.block_sparse_moe.experts.1.w1.weight",
///     "model.layers.0.block_sparse_moe.experts.0.w3.weight",
///     "model.layers.0.block_sparse_moe.experts.1.w3.weight",
/// ]);
/// // Expert 1's w3 is gate_up_proj[1, 1:]: elements 6 and 7.
/// let w3 = original["model.layers.0.block_sparse_moe.experts.1.w3.weight"].bytes().unwrap();
/// assert_eq!(&*w3, [6f32.to_le_bytes(), 7f32.to_le_bytes()].concat());
/// // And back: forward gives the fused tensors again.
/// let back = mapping.forward(&original).unwrap();
/// assert_eq!(back.state["model.layers.0.mlp.experts.gate_up_proj"].bytes().unwrap(),
///            v5["model.layers.0.mlp.experts.gate_up_proj"].bytes().unwrap());
/// ```
#[derive(Debug, Clone)]
pub struct Mapping {
    table: Option<String>,
    rules: Vec<CompiledRule>,
    config: Option<Map<String, Value>>,
}

impl Mapping {
    /// The model's table, if it has one (`None`: only the `always` tables apply).
    pub fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// Number of rules (model table, then `always` tables).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there is no rule at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// A readable label of rule `i` (`"mixtral.json (embedded) rule 1"`).
    pub fn rule_label(&self, i: usize) -> Option<String> {
        self.rules.get(i).map(CompiledRule::label)
    }

    /// Readable labels of `used`'s rules.
    pub fn rule_labels(&self, used: &UsedRules) -> Vec<String> {
        used.0.iter().filter_map(|&i| self.rule_label(i)).collect()
    }

    /// Gives the mapping `config.json`, for `split`/`concat` sizes written as config fields.
    pub fn with_config(mut self, config: Map<String, Value>) -> Self {
        self.config = Some(config);
        self
    }

    /// The rules `revert` undoes, in table order.
    fn selected(&self, revert: &Revert) -> Vec<usize> {
        (0..self.rules.len())
            .filter(|&i| {
                let r = &self.rules[i];
                match revert {
                    Revert::FromConfig => r.model_rule && r.reverse == ReversePolicy::Always,
                    Revert::AsLoaded(used) => used.0.contains(&i),
                    Revert::AllTableRules => r.model_rule,
                }
            })
            .collect()
    }

    fn is_convert(&self, i: usize) -> bool {
        matches!(self.rules[i].kind, Kind::Convert(_))
    }

    /// Applies every listed rename in order (they may chain).
    fn apply_renames(
        &self,
        dir: Direction,
        renames: &[usize],
        name: &str,
        used: Option<&mut BTreeSet<usize>>,
    ) -> String {
        let mut name = name.to_owned();
        let mut hits = Vec::new();
        for &i in renames {
            if let Some((n, _)) = self.rules[i].rename(dir, &name) {
                name = n;
                hits.push(i);
            }
        }
        if let Some(used) = used {
            used.extend(hits);
        }
        name
    }

    /// The first listed converter matching `name`: `(rule, group name, pattern index)`.
    fn find_converter(
        &self,
        dir: Direction,
        converters: &[usize],
        name: &str,
    ) -> Option<(usize, String, usize)> {
        converters.iter().find_map(|&i| {
            self.rules[i]
                .rename(dir, name)
                .map(|(group, hit)| (i, group, hit.pattern))
        })
    }

    /// The name rules only, forward: the first rule that would rename `name` when loading, if
    /// any. Used to tell an original-layout checkpoint from a v5 one.
    pub fn forward_match(&self, name: &str) -> Option<usize> {
        (0..self.rules.len()).find(|&i| self.rules[i].rename(Direction::Forward, name).is_some())
    }
}
