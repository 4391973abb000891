//! One walk over a state dict's names: grouped as transformers groups them (by the name of
//! their first target, in first-seen order), and one converter group run through its ops.

use std::collections::{BTreeSet, HashMap};

use indexmap::IndexMap;
use peftkit_checkpoint::natural_cmp;
use peftkit_checkpoint::{CheckpointError, StateDict, Tensor};

use crate::error::{RemapError, Result};
use crate::ops::{apply, Entries, OpContext, Val};

use super::{Direction, Mapping};

/// One group of the reverse or forward walk: a plain rename or a converter's inputs.
pub(super) enum Group {
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
pub(super) struct Values<'a> {
    pub(super) vals: IndexMap<String, Val>,
    /// The state dict the values come from, for messages naming a tensor's file.
    pub(super) origin: &'a StateDict,
}

impl<'a> Values<'a> {
    /// Every tensor of `state` as a value owning a storage of its own, as a parameter does.
    pub(super) fn of(state: &'a StateDict, ids: &mut u64) -> Self {
        let vals = state
            .iter()
            .map(|(k, t)| (k.clone(), Val::of_tensor(t, ids)))
            .collect();
        Values {
            vals,
            origin: state,
        }
    }

    pub(super) fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.origin.get(name)
    }
}

impl Mapping {
    /// Groups the names of `values` (walked in natural order) as transformers does: by the
    /// name of their first target, in first-seen order.
    pub(super) fn group(
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

    /// Runs `groups` in order into one output, the walk both directions share: a rename passes
    /// its source's value through under the group name; a converter group is run and its
    /// outputs handed to `emit` with the rule, its inputs and the first input's name (the
    /// source an output collision cites), which is where the directions differ.
    pub(super) fn run_groups<F>(
        &self,
        dir: Direction,
        groups: IndexMap<String, Group>,
        values: &Values<'_>,
        ids: &mut u64,
        mut emit: F,
    ) -> Result<Output>
    where
        F: FnMut(
            &mut Output,
            usize,
            &[(usize, Vec<String>)],
            Vec<(String, Val)>,
            &str,
        ) -> Result<()>,
    {
        let mut out = Output::default();
        for (group_name, group) in groups {
            match group {
                Group::Rename { source } => {
                    out.insert(group_name, values.vals[&source].clone(), None, &source)?
                }
                Group::Convert { rule, inputs } => {
                    let outputs =
                        self.convert_group(dir, rule, &group_name, &inputs, values, ids)?;
                    let first = inputs[0].1[0].clone();
                    emit(&mut out, rule, &inputs, outputs, &first)?;
                }
            }
        }
        Ok(out)
    }

    /// Runs one converter group: the ops on its inputs, then names expanded around the group
    /// name (transformers' prefix/suffix rule). Returns `(name, value)` in op-output order.
    pub(super) fn convert_group(
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
}

/// The outputs of a walk: each value with its storage family, remembering which input each
/// name came from (for collisions).
#[derive(Default)]
pub(super) struct Output {
    pub(super) vals: IndexMap<String, (Val, Option<u64>)>,
    pub(super) sources: HashMap<String, String>,
}

impl Output {
    pub(super) fn insert(
        &mut self,
        name: String,
        val: Val,
        family: Option<u64>,
        source: &str,
    ) -> Result<()> {
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
    pub(super) fn into_state(self) -> Result<StateDict> {
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
/// (a renamed tensor, or one taken apart and put back together); else, when its sources are
/// files, a tensor of parts (file ranges and bounded computed chunks, see `stream`); else a
/// lazy tensor gathering the value's bytes when written. Errors name the tensor.
pub(super) fn to_tensor(name: &str, val: Val) -> Result<Tensor> {
    let data = val.data.resolve();
    if let Some(t) = data.whole_tensor() {
        if t.dtype() == val.dtype {
            return Ok(t.clone());
        }
    }
    let shape = val.shape();
    let dtype = val.dtype;
    let elt =
        crate::view::elt_size(dtype).map_err(|e| RemapError::tensor(name, None, e.to_string()))?;
    if let Some(parts) = crate::stream::parts(&data, elt) {
        return Ok(Tensor::from_parts(dtype, shape, parts)?);
    }
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
