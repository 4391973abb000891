//! The reverse direction: transformers v5 -> original on-disk layout, as `save_pretrained`
//! writes with `save_original_format=True`, and the round trip of a save after a load.

use std::collections::{BTreeSet, HashMap};

use peftkit_checkpoint::StateDict;

use crate::error::Result;
use crate::ops::{Meta, Val};

use super::walk::{Output, Values};
use super::{Direction, Mapping, Revert, RoundTrip, UsedRules};

impl Mapping {
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
    pub(super) fn reverse_values(
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
        // Outputs that share a storage (views of one tensor) form a storage family.
        let emit = |out: &mut Output, _, _: &[_], outputs: Vec<(String, Val)>, first: &str| {
            let mut per_storage: HashMap<u64, usize> = HashMap::new();
            for (_, v) in &outputs {
                *per_storage.entry(v.meta.storage).or_default() += 1;
            }
            for (name, val) in outputs {
                let storage = val.meta.storage;
                let name = self.apply_renames(Direction::Reverse, &renames, &name, None);
                let family = (per_storage[&storage] > 1).then(|| {
                    *families.entry(storage).or_insert_with(|| {
                        next_family += 1;
                        next_family
                    })
                });
                out.insert(name, val, family, first)?;
            }
            Ok(())
        };
        let out = self.run_groups(Direction::Reverse, groups, values, ids, emit)?;
        Ok((out, UsedRules(used)))
    }
}
