//! The forward direction: original on-disk layout -> transformers v5, as `from_pretrained`
//! converts a checkpoint.

use std::collections::BTreeSet;

use peftkit_checkpoint::natural_cmp;
use peftkit_checkpoint::{StateDict, Tensor};

use crate::error::{RemapError, Result};
use crate::ops::Val;

use super::walk::{Output, Values};
use super::{Direction, Forward, Mapping, UsedRules};

impl Mapping {
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
    pub(super) fn forward_values(
        &self,
        values: &Values<'_>,
        ids: &mut u64,
    ) -> Result<(Output, UsedRules)> {
        let all: Vec<usize> = (0..self.rules.len()).collect();
        let mut used = BTreeSet::new();
        let groups = self.group(Direction::Forward, &all, values, &mut used)?;
        let emit =
            |out: &mut Output, rule, inputs: &[_], outputs: Vec<(String, Val)>, first: &str| {
                self.check_complete(rule, inputs, &outputs, values)?;
                for (name, val) in outputs {
                    out.insert(name, val, None, first)?;
                }
                Ok(())
            };
        let mut out = self.run_groups(Direction::Forward, groups, values, ids, emit)?;
        out.vals.sort_by(|a, _, b, _| natural_cmp(a, b));
        Ok((out, UsedRules(used)))
    }

    /// Refuses a many-to-one group whose inputs are not exactly what the reverse would write
    /// back: a missing or misnumbered expert would silently shift the experts after it.
    pub(super) fn check_complete(
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
}
