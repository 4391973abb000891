//! Where the pieces of a fused v5 parameter live on disk: the boxes of the fused tensor that
//! each original tensor holds, computed on views alone (no byte is read).

use std::ops::Range;

use peftkit_checkpoint::{CheckpointError, Dtype, StateDict, Tensor};

use crate::error::{RemapError, Result};
use crate::view::{Base, Data};

use super::walk::Values;
use super::{Direction, Mapping, Revert};

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

impl Mapping {
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
