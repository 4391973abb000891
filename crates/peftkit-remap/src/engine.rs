//! The remapping engine: a compiled list of rules run forward (on disk -> v5, what
//! `from_pretrained` does) or in reverse (v5 -> on disk, what `save_pretrained` does with
//! `save_original_format=True`), tensor by tensor and lazily.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use indexmap::IndexMap;
use peftkit_checkpoint::natural::natural_cmp;
use peftkit_checkpoint::{CheckpointError, Dtype, StateDict, Tensor};
use serde_json::{Map, Value};

use crate::error::{RemapError, Result};
use crate::ops::{apply, Entries, Meta, OpContext, Val};
use crate::pattern::{rewrite, Hit, Side};
use crate::table::{Op, ReversePolicy, Rule};
use crate::view::{Base, Data};

/// Which way names and tensors go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Original on-disk layout -> transformers v5 (loading).
    Forward,
    /// Transformers v5 -> original on-disk layout (`save_original_format=True`).
    Reverse,
}

#[derive(Debug, Clone)]
enum Kind {
    Rename,
    Convert(Vec<Op>),
}

#[derive(Debug, Clone)]
struct CompiledRule {
    kind: Kind,
    original: Side,
    v5: Side,
    scope: Option<Vec<String>>,
    reverse: ReversePolicy,
    /// Table file and index, for messages.
    origin: String,
    index: usize,
    /// Part of the model's own table (not an `always` table such as `legacy`).
    model_rule: bool,
}

impl CompiledRule {
    fn sides(&self, dir: Direction) -> (&Side, &Side) {
        match dir {
            Direction::Forward => (&self.original, &self.v5),
            Direction::Reverse => (&self.v5, &self.original),
        }
    }

    fn ops(&self, dir: Direction) -> Vec<Op> {
        match (&self.kind, dir) {
            (Kind::Rename, _) => Vec::new(),
            (Kind::Convert(ops), Direction::Forward) => ops.clone(),
            (Kind::Convert(ops), Direction::Reverse) => ops.iter().rev().map(Op::inverse).collect(),
        }
    }

    /// Renames `name` with this rule (the write form of the other side's first pattern), as
    /// transformers' `rename_source_key`: `None` when the rule does not match.
    fn rename(&self, dir: Direction, name: &str) -> Option<(String, Hit)> {
        let (read, write) = self.sides(dir);
        let (prefix, rest) = match &self.scope {
            None => ("", name),
            Some(prefixes) => {
                let p = prefixes.iter().find(|p| name.starts_with(p.as_str()))?;
                (p.as_str(), &name[p.len()..])
            }
        };
        let hit = read.find(rest)?;
        let renamed = rewrite(rest, &hit, &write.templates[0]);
        Some((format!("{prefix}{renamed}"), hit))
    }

    fn label(&self) -> String {
        format!("{} rule {}", self.origin, self.index)
    }
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

/// Where one on-disk tensor sits inside a fused v5 parameter (see [`Mapping::fused_pieces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedPiece {
    /// The tensor's name in the original on-disk layout.
    pub original_name: String,
    /// Its shape on disk.
    pub original_shape: Vec<usize>,
    /// The box of the fused tensor it holds: one range per dim of the fused tensor.
    pub region: Vec<Range<usize>>,
    /// For each dim of the on-disk tensor, the fused dim it runs along (`None`: a unit dim
    /// that the fused tensor does not have). Fused dims absent here have a region of length 1.
    pub axes: Vec<Option<usize>>,
    /// `(fused dim, index)` of the expert this piece belongs to, when exactly one fused dim was
    /// unstacked away (a per-expert tensor of a stacked module list).
    pub expert: Option<(usize, usize)>,
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

/// One group of the reverse or forward walk: a plain rename or a converter's inputs.
enum Group {
    Rename {
        source: String,
    },
    Convert {
        rule: usize,
        /// Inputs by pattern index, in first-seen order.
        inputs: Vec<(usize, Vec<String>)>,
    },
}

/// The inputs of a walk, by name: values over the tensors of a state dict, or the outputs of an
/// earlier walk (the load half of a round trip), so that views compose and no byte is gathered
/// in between.
struct Values<'a> {
    vals: IndexMap<String, Val>,
    /// The state dict the values come from, for messages naming a tensor's file.
    origin: &'a StateDict,
}

impl<'a> Values<'a> {
    /// Every tensor of `state` as a value owning a storage of its own, as a parameter does.
    fn of(state: &'a StateDict, ids: &mut u64) -> Self {
        let vals = state
            .iter()
            .map(|(k, t)| (k.clone(), Val::of_tensor(t, ids)))
            .collect();
        Values {
            vals,
            origin: state,
        }
    }

    fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.origin.get(name)
    }
}

impl Mapping {
    /// Compiles rules (with their origin and index in their table); the first `model_rules`
    /// belong to the model's own table, the rest to `always` tables.
    pub(crate) fn compile(
        table: Option<String>,
        rules: Vec<(Rule, String, usize)>,
        model_rules: usize,
    ) -> Result<Self> {
        let mut compiled = Vec::new();
        for (pos, (rule, origin, index)) in rules.into_iter().enumerate() {
            let invalid = |reason: String| RemapError::InvalidRule {
                origin: origin.clone(),
                rule: index,
                reason,
            };
            let (kind, original, v5) = match (&rule.rename, &rule.convert) {
                (Some(r), None) => (Kind::Rename, r.original.to_vec(), r.v5.to_vec()),
                (None, Some(c)) => {
                    if c.ops.is_empty() {
                        return Err(invalid("a `convert` rule needs at least one op".into()));
                    }
                    (
                        Kind::Convert(c.ops.clone()),
                        c.original.to_vec(),
                        c.v5.to_vec(),
                    )
                }
                _ => {
                    return Err(invalid(
                        "a rule has exactly one of `rename` and `convert`".into(),
                    ))
                }
            };
            let original = Side::new(original).map_err(&invalid)?;
            let v5 = Side::new(v5).map_err(&invalid)?;
            let any_group = original.has_group() || v5.has_group();
            if any_group {
                if matches!(kind, Kind::Convert(_)) {
                    return Err(invalid(
                        "capture groups are not supported in `convert` patterns".into(),
                    ));
                }
                let all = original
                    .templates
                    .iter()
                    .chain(&v5.templates)
                    .all(|t| t.has_group());
                if !all {
                    return Err(invalid(
                        "when one pattern has a capture group, every pattern of the rule needs one (its text is carried across)".into(),
                    ));
                }
            }
            if let Some(scope) = &rule.scope {
                if scope.is_empty() {
                    return Err(invalid("`scope` lists no prefix".into()));
                }
            }
            compiled.push(CompiledRule {
                kind,
                original,
                v5,
                scope: rule.scope.clone(),
                reverse: rule.reverse,
                origin: origin.clone(),
                index,
                model_rule: pos < model_rules,
            });
        }
        Ok(Mapping {
            table,
            rules: compiled,
            config: None,
        })
    }

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

    /// Groups the names of `values` (walked in natural order) as transformers does: by the
    /// name of their first target, in first-seen order.
    fn group(
        &self,
        dir: Direction,
        selected: &[usize],
        values: &Values<'_>,
        used: &mut BTreeSet<usize>,
    ) -> Result<IndexMap<String, Group>> {
        let renames: Vec<usize> = selected
            .iter()
            .copied()
            .filter(|&i| !self.is_convert(i))
            .collect();
        let converters: Vec<usize> = selected
            .iter()
            .copied()
            .filter(|&i| self.is_convert(i))
            .collect();
        let mut groups: IndexMap<String, Group> = IndexMap::new();
        let mut names: Vec<&String> = values.vals.keys().collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        for name in names {
            // Loading renames first, then at most one converter; saving the other way round.
            let (group_name, found) = match dir {
                Direction::Forward => {
                    let renamed = self.apply_renames(dir, &renames, name, Some(used));
                    match self.find_converter(dir, &converters, &renamed) {
                        Some((rule, g, p)) => (g, Some((rule, p))),
                        None => (renamed, None),
                    }
                }
                Direction::Reverse => match self.find_converter(dir, &converters, name) {
                    Some((rule, g, p)) => (g, Some((rule, p))),
                    None => (self.apply_renames(dir, &renames, name, Some(used)), None),
                },
            };
            match (found, groups.get_mut(&group_name)) {
                (Some((rule, pattern)), None) => {
                    used.insert(rule);
                    groups.insert(
                        group_name,
                        Group::Convert {
                            rule,
                            inputs: vec![(pattern, vec![name.clone()])],
                        },
                    );
                }
                (Some((rule, pattern)), Some(Group::Convert { rule: r, inputs })) if *r == rule => {
                    match inputs.iter_mut().find(|(p, _)| *p == pattern) {
                        Some((_, names)) => names.push(name.clone()),
                        None => inputs.push((pattern, vec![name.clone()])),
                    }
                }
                (None, None) => {
                    groups.insert(
                        group_name,
                        Group::Rename {
                            source: name.clone(),
                        },
                    );
                }
                (_, Some(existing)) => {
                    let first = match existing {
                        Group::Rename { source } => source.clone(),
                        Group::Convert { inputs, .. } => inputs
                            .first()
                            .and_then(|(_, n)| n.first().cloned())
                            .unwrap_or_default(),
                    };
                    return Err(RemapError::Collision {
                        first,
                        second: name.clone(),
                        target: group_name,
                    });
                }
            }
        }
        Ok(groups)
    }

    /// Runs one converter group: the ops on its inputs, then names expanded around the group
    /// name (transformers' prefix/suffix rule). Returns `(name, value)` in op-output order.
    fn convert_group(
        &self,
        dir: Direction,
        rule: usize,
        group_name: &str,
        inputs: &[(usize, Vec<String>)],
        values: &Values<'_>,
        ids: &mut u64,
    ) -> Result<Vec<(String, Val)>> {
        let r = &self.rules[rule];
        let (read, write) = r.sides(dir);
        let reads: Vec<String> = read.templates.iter().map(|t| t.fill(None)).collect();
        let writes: Vec<String> = write.templates.iter().map(|t| t.fill(None)).collect();
        let first_name = inputs
            .first()
            .and_then(|(_, n)| n.first())
            .cloned()
            .unwrap_or_default();
        let fail = |reason: String| {
            RemapError::tensor(
                &first_name,
                values.tensor(&first_name),
                format!("{}: {reason}", r.label()),
            )
        };
        let mut entries: Entries = Vec::new();
        for (pattern, names) in inputs {
            let vals = names.iter().map(|n| values.vals[n].clone()).collect();
            entries.push((reads[*pattern].clone(), vals));
        }
        let mut ctx = OpContext {
            reads: &reads,
            writes: &writes,
            config: self.config.as_ref(),
            ids,
        };
        for op in r.ops(dir) {
            entries = apply(&op, entries, &mut ctx).map_err(&fail)?;
        }
        let mut outputs = Vec::new();
        for (name, mut vals) in entries {
            if vals.len() != 1 {
                return Err(fail(format!(
                    "`{name}` still holds {} tensors after the ops (a `stack` is missing?)",
                    vals.len()
                )));
            }
            outputs.push((name, vals.remove(0)));
        }
        // transformers: the first output fragment found in the group name (with `*.` read as
        // `0.`) splits it into the prefix and suffix every output name gets.
        let full = group_name.replace("*.", "0.");
        let (prefix, suffix) = outputs
            .iter()
            .find_map(|(k, _)| full.split_once(k.as_str()))
            .map(|(p, s)| (p.to_owned(), s.to_owned()))
            .ok_or_else(|| {
                fail(format!(
                    "no output of the rule appears in the group name `{group_name}`"
                ))
            })?;
        Ok(outputs
            .into_iter()
            .map(|(k, v)| (format!("{prefix}{k}{suffix}"), v))
            .collect())
    }

    /// The rules of this mapping, forward: from the original on-disk layout to v5, as
    /// `from_pretrained` converts a checkpoint. Renames apply in table order, then at most one
    /// converter; converters stack/concatenate lazily (each output reads only its own group).
    /// The output is in natural order of the v5 names; no output shares storage with another.
    pub fn forward(&self, state: &StateDict) -> Result<Forward> {
        let mut ids = 0u64;
        let values = Values::of(state, &mut ids);
        let (out, used) = self.forward_values(&values, &mut ids)?;
        Ok(Forward {
            state: out.into_state()?,
            used,
        })
    }

    /// [`Mapping::forward`] on values: the outputs in natural order of their names.
    fn forward_values(&self, values: &Values<'_>, ids: &mut u64) -> Result<(Output, UsedRules)> {
        let all: Vec<usize> = (0..self.rules.len()).collect();
        let mut used = BTreeSet::new();
        let groups = self.group(Direction::Forward, &all, values, &mut used)?;
        let mut out = Output::default();
        for (group_name, group) in groups {
            match group {
                Group::Rename { source } => {
                    out.insert(group_name, values.vals[&source].clone(), None, &source)?
                }
                Group::Convert { rule, inputs } => {
                    let outputs = self.convert_group(
                        Direction::Forward,
                        rule,
                        &group_name,
                        &inputs,
                        values,
                        ids,
                    )?;
                    self.check_complete(rule, &inputs, &outputs, values)?;
                    let first = inputs[0].1[0].clone();
                    for (name, val) in outputs {
                        out.insert(name, val, None, &first)?;
                    }
                }
            }
        }
        out.vals.sort_by(|a, _, b, _| natural_cmp(a, b));
        Ok((out, UsedRules(used)))
    }

    /// Refuses a many-to-one group whose inputs are not exactly what the reverse would write
    /// back: a missing or misnumbered expert would silently shift the experts after it.
    fn check_complete(
        &self,
        rule: usize,
        inputs: &[(usize, Vec<String>)],
        outputs: &[(String, Val)],
        values: &Values<'_>,
    ) -> Result<()> {
        let [(name, val)] = outputs else {
            return Ok(());
        };
        let Some((_, group_name, pattern)) = self.find_converter(Direction::Reverse, &[rule], name)
        else {
            return Ok(());
        };
        let mut probe_state = StateDict::new();
        probe_state.insert(
            name.clone(),
            Tensor::lazy(val.dtype, val.shape(), || Ok(Vec::new()))?,
        );
        let mut ids = 0u64;
        let expected: BTreeSet<String> = self
            .convert_group(
                Direction::Reverse,
                rule,
                &group_name,
                &[(pattern, vec![name.clone()])],
                &Values::of(&probe_state, &mut ids),
                &mut ids,
            )?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        // The converter saw the inputs after the loading renames.
        let renames: Vec<usize> = (0..self.rules.len())
            .filter(|&i| !self.is_convert(i))
            .collect();
        let got: BTreeSet<String> = inputs
            .iter()
            .flat_map(|(_, names)| names.iter())
            .map(|n| self.apply_renames(Direction::Forward, &renames, n, None))
            .collect();
        if expected != got {
            let missing: Vec<&String> = expected.difference(&got).collect();
            let extra: Vec<&String> = got.difference(&expected).collect();
            let first = inputs[0].1[0].clone();
            return Err(RemapError::tensor(
                &first,
                values.tensor(&first),
                format!(
                    "{}: the tensors do not form a complete module list (missing {missing:?}, unexpected {extra:?}); stacking what is there would shift every expert after a gap",
                    self.rules[rule].label()
                ),
            ));
        }
        Ok(())
    }

    /// The rules of this mapping, reversed: from v5 names to the original on-disk layout, in
    /// exactly the order transformers' `revert_weight_conversion` produces.
    ///
    /// The names are walked in natural order; each either starts (or joins) a converter group,
    /// keyed by the name of its first output, or becomes a rename; groups are emitted in
    /// first-seen order, a converter's outputs in op-output order followed by the renames.
    /// Outputs that torch would hold as views of one storage (the experts unstacked from one
    /// fused tensor, or from one contiguous chunk of it) share a storage family, so the shard
    /// planner places them as huggingface_hub does. Renamed tensors are the input handles
    /// themselves; split tensors are lazy and read only their own bytes.
    pub fn reverse(&self, state: &StateDict, revert: &Revert) -> Result<StateDict> {
        self.reverse_used(state, revert).map(|(s, _)| s)
    }

    /// [`Mapping::reverse`], also returning the rules that changed at least one name.
    pub fn reverse_used(
        &self,
        state: &StateDict,
        revert: &Revert,
    ) -> Result<(StateDict, UsedRules)> {
        let selected = self.selected(revert);
        if selected.is_empty() && !matches!(revert, Revert::AsLoaded(_)) {
            return Ok((state.clone(), UsedRules::default()));
        }
        let mut ids = 0u64;
        let values = Values::of(state, &mut ids);
        let (out, used) = self.reverse_values(&values, &selected, &mut ids)?;
        Ok((out.into_state()?, used))
    }

    /// What `save_pretrained` writes for a model that `from_pretrained` loaded from `state` (a
    /// checkpoint in either layout): [`Mapping::forward`], then [`Mapping::reverse`] of exactly
    /// the rules the load used ([`Revert::AsLoaded`]), as transformers reverts
    /// `model._weight_conversions`. The tensors, their order and their storage families are
    /// those transformers hands to its shard planner: an original-layout checkpoint comes back
    /// in its own names but ordered and grouped as the fused v5 model it was loaded into; a v5
    /// checkpoint (nothing used at load) comes back unchanged, in natural order.
    ///
    /// The two halves run on lazy values, so views compose: each output reads only its own
    /// source bytes, and an output that is a source tensor unchanged (every one, for tables of
    /// exact inverses) is that tensor's handle, copied as is when written.
    ///
    /// ```
    /// use peftkit_checkpoint::{Dtype, StateDict, Tensor};
    /// use peftkit_remap::Registry;
    ///
    /// let mapping = Registry::builtin().unwrap().mapping("mixtral").unwrap();
    /// let t = || Tensor::from_bytes(Dtype::F32, vec![1, 2], vec![0; 8]).unwrap();
    /// let mut on_disk = StateDict::new();
    /// for e in 0..2 {
    ///     for w in ["w1", "w2", "w3"] {
    ///         on_disk.insert(format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"), t());
    ///     }
    /// }
    /// on_disk.insert("model.layers.0.block_sparse_moe.gate.weight".into(), t());
    /// let saved = mapping.round_trip(&on_disk).unwrap();
    /// let names: Vec<&str> = saved
    ///     .state
    ///     .keys()
    ///     .map(|k| k.strip_prefix("model.layers.0.block_sparse_moe.").unwrap())
    ///     .collect();
    /// // Planned as the fused model: down_proj (w2) first, then gate_up_proj (w1s, then w3s).
    /// assert_eq!(names, [
    ///     "experts.0.w2.weight", "experts.1.w2.weight",
    ///     "experts.0.w1.weight", "experts.1.w1.weight",
    ///     "experts.0.w3.weight", "experts.1.w3.weight",
    ///     "gate.weight",
    /// ]);
    /// // The two w2s are views of one fused storage: one planning unit.
    /// let w2 = |e: usize| saved.state[&format!("model.layers.0.block_sparse_moe.experts.{e}.w2.weight")].family();
    /// assert!(w2(0).is_some() && w2(0) == w2(1));
    /// assert_eq!(saved.used.0.len(), 3);
    /// ```
    pub fn round_trip(&self, state: &StateDict) -> Result<RoundTrip> {
        let mut ids = 0u64;
        let values = Values::of(state, &mut ids);
        let (loaded, used) = self.forward_values(&values, &mut ids)?;
        // Each loaded parameter owns its storage.
        let vals = loaded
            .vals
            .into_iter()
            .map(|(k, (v, _))| {
                let meta = Meta::fresh(&v.shape(), &mut ids);
                (k, Val { meta, ..v })
            })
            .collect();
        let model = Values {
            vals,
            origin: state,
        };
        let selected = self.selected(&Revert::AsLoaded(used.clone()));
        let (out, _) = self.reverse_values(&model, &selected, &mut ids)?;
        Ok(RoundTrip {
            state: out.into_state()?,
            used,
        })
    }

    /// [`Mapping::reverse`] on values, undoing the rules `selected`.
    fn reverse_values(
        &self,
        values: &Values<'_>,
        selected: &[usize],
        ids: &mut u64,
    ) -> Result<(Output, UsedRules)> {
        // Sub-model transforms were collected after the root's, and must be undone first.
        let reversed: Vec<usize> = selected.iter().copied().rev().collect();
        let renames: Vec<usize> = reversed
            .iter()
            .copied()
            .filter(|&i| !self.is_convert(i))
            .collect();
        let mut used = BTreeSet::new();
        let groups = self.group(Direction::Reverse, &reversed, values, &mut used)?;
        let mut families: HashMap<u64, u64> = HashMap::new();
        let mut next_family = 0u64;
        let mut out = Output::default();
        for (group_name, group) in groups {
            match group {
                Group::Rename { source } => {
                    out.insert(group_name, values.vals[&source].clone(), None, &source)?
                }
                Group::Convert { rule, inputs } => {
                    let outputs = self.convert_group(
                        Direction::Reverse,
                        rule,
                        &group_name,
                        &inputs,
                        values,
                        ids,
                    )?;
                    let mut per_storage: HashMap<u64, usize> = HashMap::new();
                    for (_, v) in &outputs {
                        *per_storage.entry(v.meta.storage).or_default() += 1;
                    }
                    let first = inputs[0].1[0].clone();
                    for (name, val) in outputs {
                        let storage = val.meta.storage;
                        let name = self.apply_renames(Direction::Reverse, &renames, &name, None);
                        let family = (per_storage[&storage] > 1).then(|| {
                            *families.entry(storage).or_insert_with(|| {
                                next_family += 1;
                                next_family
                            })
                        });
                        out.insert(name, val, family, &first)?;
                    }
                }
            }
        }
        Ok((out, UsedRules(used)))
    }

    /// The name rules only, forward: the first rule that would rename `name` when loading, if
    /// any. Used to tell an original-layout checkpoint from a v5 one.
    pub fn forward_match(&self, name: &str) -> Option<usize> {
        (0..self.rules.len()).find(|&i| self.rules[i].rename(Direction::Forward, name).is_some())
    }

    /// The on-disk tensors a fused v5 parameter is written as, with the box of the fused tensor
    /// each one holds. For Mixtral's `model.layers.L.mlp.experts.gate_up_proj` of shape
    /// `[E, 2I, H]` these are `…block_sparse_moe.experts.e.w1.weight` (region `[e..e+1, 0..I,
    /// 0..H]`) for every e, then the `w3`s (rows `I..2I`), in the order they are saved.
    ///
    /// `revert` selects the renames applied to the names, as in [`Mapping::reverse`]. Fails
    /// with [`RemapError::NotFused`] when no converter of the selected rules splits `v5_name`
    /// on its own.
    pub fn fused_pieces(
        &self,
        v5_name: &str,
        v5_shape: &[usize],
        revert: &Revert,
    ) -> Result<Vec<FusedPiece>> {
        let not_fused = |reason: &str| RemapError::NotFused {
            tensor: v5_name.to_owned(),
            table: self.table.clone().unwrap_or_else(|| "(none)".into()),
            reason: reason.to_owned(),
        };
        let reversed: Vec<usize> = self.selected(revert).into_iter().rev().collect();
        let converters: Vec<usize> = reversed
            .iter()
            .copied()
            .filter(|&i| self.is_convert(i))
            .collect();
        let renames: Vec<usize> = reversed
            .iter()
            .copied()
            .filter(|&i| !self.is_convert(i))
            .collect();
        let (rule, group_name, pattern) = self
            .find_converter(Direction::Reverse, &converters, v5_name)
            .ok_or_else(|| not_fused("no converter of the table matches this name"))?;
        if self.rules[rule].v5.patterns.len() != 1 {
            return Err(not_fused("its converter joins several v5 tensors"));
        }
        // A placeholder tensor: only shapes and views are computed, no byte is read.
        let probe = Tensor::lazy(Dtype::U8, v5_shape.to_vec(), || {
            Err(CheckpointError::TensorData {
                tensor: String::new(),
                reason: "placeholder".into(),
            })
        })?;
        let mut single = StateDict::new();
        single.insert(v5_name.to_owned(), probe);
        let mut ids = 0u64;
        let values = Values::of(&single, &mut ids);
        let outputs = self.convert_group(
            Direction::Reverse,
            rule,
            &group_name,
            &[(pattern, vec![v5_name.to_owned()])],
            &values,
            &mut ids,
        )?;
        let mut pieces = Vec::new();
        for (name, val) in outputs {
            let Data::View(view) = &val.data else {
                return Err(not_fused("an output is computed from several tensors"));
            };
            if !matches!(view.base, Base::Tensor(_)) {
                return Err(not_fused("an output is computed from several tensors"));
            }
            let missing: Vec<usize> = (0..v5_shape.len())
                .filter(|d| !view.axes.contains(&Some(*d)))
                .collect();
            let expert = match missing.as_slice() {
                [d] => Some((*d, view.region[*d].start)),
                _ => None,
            };
            pieces.push(FusedPiece {
                original_name: self.apply_renames(Direction::Reverse, &renames, &name, None),
                original_shape: view.shape(),
                region: view.region.clone(),
                axes: view.axes.clone(),
                expert,
            });
        }
        Ok(pieces)
    }

    /// The on-disk tensors holding expert `expert` of a fused expert parameter, with the part
    /// of the fused tensor each holds. For the merge engine: a LoRA delta on
    /// `model.layers.L.mlp.experts.gate_up_proj` row-block `region[1]` of expert `e` goes to
    /// the piece's `original_name`.
    ///
    /// ```
    /// use peftkit_remap::{Registry, Revert};
    /// let m = Registry::builtin().unwrap().mapping("mixtral").unwrap();
    /// let (e, i, h) = (8, 14336, 4096);
    /// let gate_up = m
    ///     .expert_pieces("model.layers.3.mlp.experts.gate_up_proj", &[e, 2 * i, h], 5, &Revert::FromConfig)
    ///     .unwrap();
    /// assert_eq!(gate_up[0].original_name, "model.layers.3.block_sparse_moe.experts.5.w1.weight");
    /// assert_eq!(gate_up[0].region, vec![5..6, 0..i, 0..h]);
    /// assert_eq!(gate_up[1].original_name, "model.layers.3.block_sparse_moe.experts.5.w3.weight");
    /// assert_eq!(gate_up[1].region, vec![5..6, i..2 * i, 0..h]);
    /// assert_eq!(gate_up[1].original_shape, vec![i, h]);
    /// let down = m
    ///     .expert_pieces("model.layers.3.mlp.experts.down_proj", &[e, h, i], 5, &Revert::FromConfig)
    ///     .unwrap();
    /// assert_eq!(down[0].original_name, "model.layers.3.block_sparse_moe.experts.5.w2.weight");
    /// assert_eq!(down[0].region, vec![5..6, 0..h, 0..i]);
    /// ```
    pub fn expert_pieces(
        &self,
        v5_name: &str,
        v5_shape: &[usize],
        expert: usize,
        revert: &Revert,
    ) -> Result<Vec<FusedPiece>> {
        let pieces = self.fused_pieces(v5_name, v5_shape, revert)?;
        if pieces.iter().all(|p| p.expert.is_none()) {
            return Err(RemapError::NotFused {
                tensor: v5_name.to_owned(),
                table: self.table.clone().unwrap_or_default(),
                reason: "its converter does not unstack a module list of experts".into(),
            });
        }
        Ok(pieces
            .into_iter()
            .filter(|p| p.expert.is_some_and(|(_, e)| e == expert))
            .collect())
    }
}

/// The outputs of a walk: each value with its storage family, remembering which input each
/// name came from (for collisions).
#[derive(Default)]
struct Output {
    vals: IndexMap<String, (Val, Option<u64>)>,
    sources: HashMap<String, String>,
}

impl Output {
    fn insert(&mut self, name: String, val: Val, family: Option<u64>, source: &str) -> Result<()> {
        if let Some(first) = self.sources.get(&name) {
            return Err(RemapError::Collision {
                first: first.clone(),
                second: source.to_owned(),
                target: name,
            });
        }
        self.sources.insert(name.clone(), source.to_owned());
        self.vals.insert(name, (val, family));
        Ok(())
    }

    /// The outputs as tensors, in order.
    fn into_state(self) -> Result<StateDict> {
        let mut state = StateDict::with_capacity(self.vals.len());
        for (name, (val, family)) in self.vals {
            let mut t = to_tensor(&name, val)?;
            if let Some(f) = family {
                t = t.in_family(f);
            }
            state.insert(name, t);
        }
        Ok(state)
    }
}

/// A value as a tensor: the source tensor's own handle when the value is all of it unchanged
/// (a renamed tensor, or one taken apart and put back together), else a lazy tensor gathering
/// the value's bytes when written; errors name the tensor.
fn to_tensor(name: &str, val: Val) -> Result<Tensor> {
    let data = val.data.resolve();
    if let Some(t) = data.whole_tensor() {
        if t.dtype() == val.dtype {
            return Ok(t.clone());
        }
    }
    let shape = val.shape();
    let dtype = val.dtype;
    crate::view::elt_size(dtype).map_err(|e| RemapError::tensor(name, None, e.to_string()))?;
    let owned = name.to_owned();
    Ok(Tensor::lazy(dtype, shape, move || {
        data.materialize(dtype).map_err(|e| match e {
            CheckpointError::TensorData { tensor, reason } if tensor.is_empty() => {
                CheckpointError::TensorData {
                    tensor: owned.clone(),
                    reason,
                }
            }
            other => other,
        })
    })?)
}
