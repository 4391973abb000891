//! LoRA on module *parameters* (peft's `target_parameters`, `ParamWrapper`): fused MoE expert
//! tensors `(E, out, in)`, stored fused or per expert on disk, and 2-D router weights.

use peftkit_checkpoint::{Checkpoint, Tensor};
use peftkit_peft::{Adapter, PatternResolver};
use peftkit_remap::{Mapping, Revert};

use super::{on_disk_name, scale_of, unsupported};
use crate::edit::{Edit, ExpertPiece, LoraKind, ModuleTensors};
use crate::error::{MergeError, UnsupportedMerge};

/// Edits keyed by the base tensor they change.
type Edits = Vec<(String, Edit)>;

/// What resolving a `target_parameters` wrapper needs to know.
pub(super) struct ParamContext<'a> {
    pub base: &'a Checkpoint,
    pub mapping: Option<&'a Mapping>,
    pub resolver: &'a PatternResolver,
    pub use_rslora: bool,
    pub weight: f64,
    pub adapter: &'a Adapter,
}

impl ParamContext<'_> {
    /// The edits of a LoRA on a module *parameter* (`target_parameters`), or `None` when the
    /// module is not a parameter wrapper (a plain `target_modules` LoRA).
    ///
    /// peft wraps a module once per targeted parameter, in the order the module registers its
    /// parameters, so the nesting depth (`.base_layer` levels) alone does not say which
    /// parameter a wrapper adapts. The shapes do: `A (r·E, in)` and `B (out, r·E)` must fit the
    /// parameter `(E, out, in)` (or `(out, in)`). Only when several parameters fit equally is
    /// the depth used, counting from the last listed target.
    pub fn edits(
        &self,
        module: &str,
        targets: &[String],
        a: &Tensor,
        b: &Tensor,
        key: &str,
    ) -> Result<Option<Edits>, MergeError> {
        let real = strip_base_layers(module);
        let depth = (module.len() - real.len()) / ".base_layer".len();
        let (owned, named_owner) = owned_params(real, targets);
        if owned.is_empty() {
            return Ok(None);
        }
        let mut fitting = Vec::new();
        for param in &owned {
            if let Some(edits) = self.param_edits(&format!("{real}.{param}"), a, b)? {
                fitting.push((param.clone(), edits));
            }
        }
        let chosen = match fitting.len() {
            0 => None,
            1 => fitting.pop(),
            n => {
                let at = n.checked_sub(1 + depth);
                at.and_then(|i| fitting.into_iter().nth(i))
            }
        };
        match chosen {
            Some((_, edits)) => Ok(Some(edits)),
            // Only bare names, none of them a parameter here: a plain module LoRA.
            None if !named_owner && depth == 0 => Ok(None),
            None => Err(MergeError::NoBaseTensor {
                adapter: self.adapter.dir.clone(),
                key: key.to_owned(),
                module: real.to_owned(),
                expected: format!(
                    "{real}.{{{}}} of a shape that fits lora_A {:?} and lora_B {:?}",
                    owned.join(","),
                    a.shape(),
                    b.shape()
                ),
                base: self.base.dir.clone(),
            }),
        }
    }

    /// The edits for the LoRA on parameter `v5_name`, if the base holds it (fused, 2-D, or
    /// split per expert on disk) with shapes that fit the factors.
    fn param_edits(
        &self,
        v5_name: &str,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<Option<Edits>, MergeError> {
        let (Some(&ra), Some(&fin), Some(&out), Some(&rb)) = (
            a.shape().first(),
            a.shape().get(1),
            b.shape().first(),
            b.shape().get(1),
        ) else {
            return Ok(None);
        };
        if ra != rb || a.shape().len() != 2 || b.shape().len() != 2 {
            return Ok(None);
        }
        let targeting = |e: peftkit_peft::TargetingError| {
            unsupported(self.adapter, UnsupportedMerge::Targeting(e))
        };
        let r = self.resolver.rank_for(v5_name).map_err(targeting)? as usize;
        let alpha = self.resolver.alpha_for(v5_name).map_err(targeting)?;
        let scale = |r| scale_of(alpha, r, self.use_rslora, self.weight, self.adapter);
        if let Some(t) = self.base.get(v5_name) {
            let edit = match *t.shape() {
                // A checkpoint in the v5 layout holds the fused tensor.
                [e, o, i] if r > 0 && e * r == ra && o == out && i == fin => Edit::Experts {
                    a: a.clone(),
                    b: b.clone(),
                    scale: scale(r)?,
                },
                // A 2-D parameter (a router weight): LoRA with the delta rounded first.
                [o, i] if o == out && i == fin => router_edit(a, b, scale(ra)?),
                _ => return Ok(None),
            };
            return Ok(Some(vec![(v5_name.to_owned(), edit)]));
        }
        let Some(mapping) = self.mapping else {
            return Ok(None);
        };
        if let Some(name) = on_disk_name(mapping, v5_name, self.base) {
            // A renamed 2-D parameter (Mixtral's router is `block_sparse_moe.gate` on disk).
            return match self.base.get(&name).map(|t| t.shape().to_vec()) {
                Some(shape) if shape == [out, fin] => {
                    Ok(Some(vec![(name, router_edit(a, b, scale(ra)?))]))
                }
                _ => Ok(None),
            };
        }
        if r == 0 || ra % r != 0 {
            return Ok(None);
        }
        self.expert_pieces(mapping, v5_name, a, b, r, scale(r)?)
    }

    /// The edits of a fused expert LoRA on a base that stores the experts one tensor each:
    /// one [`ExpertPiece`] per on-disk tensor, or `None` if the base does not hold them all.
    fn expert_pieces(
        &self,
        mapping: &Mapping,
        v5_name: &str,
        a: &Tensor,
        b: &Tensor,
        r: usize,
        scale: f32,
    ) -> Result<Option<Edits>, MergeError> {
        let (ra, fin, out) = (a.shape()[0], a.shape()[1], b.shape()[0]);
        let experts = ra / r;
        let fused_shape = [experts, out, fin];
        let mut edits = Vec::new();
        for e in 0..experts {
            let Ok(pieces) = mapping.expert_pieces(v5_name, &fused_shape, e, &Revert::FromConfig)
            else {
                return Ok(None);
            };
            for p in pieces {
                let transposed = match p.axes.as_slice() {
                    [Some(1), Some(2)] => false,
                    [Some(2), Some(1)] => true,
                    other => {
                        let what = UnsupportedMerge::FusedAxes {
                            tensor: p.original_name.clone(),
                            axes: other.to_vec(),
                        };
                        return Err(unsupported(self.adapter, what));
                    }
                };
                match self.base.get(&p.original_name) {
                    Some(t) if t.shape() == p.original_shape.as_slice() => {}
                    _ => return Ok(None),
                }
                let edit = Edit::ExpertPiece(ExpertPiece {
                    a: a.clone(),
                    b: b.clone(),
                    experts,
                    expert: e,
                    rows: p.region[1].clone(),
                    cols: p.region[2].clone(),
                    transposed,
                    scale,
                });
                edits.push((p.original_name.clone(), edit));
            }
        }
        Ok((!edits.is_empty()).then_some(edits))
    }
}

/// The parameters of module `real` that `targets` name, and whether one target named this
/// module as the owner. A bare name (`gate_up_proj`) may name a parameter of any module; peft
/// wraps only the modules that have it. A named owner (`mlp.experts.gate_up_proj`) must match.
fn owned_params(real: &str, targets: &[String]) -> (Vec<String>, bool) {
    let mut owned: Vec<String> = Vec::new();
    let mut named_owner = false;
    for t in targets {
        let (owner, param) = t.rsplit_once('.').unwrap_or(("", t.as_str()));
        let owns = owner.is_empty() || real == owner || real.ends_with(&format!(".{owner}"));
        named_owner |= owns && !owner.is_empty();
        if owns && !owned.iter().any(|p| p == param) {
            owned.push(param.to_owned());
        }
    }
    (owned, named_owner)
}

/// Removes the `.base_layer` levels peft adds when it wraps one module several times.
fn strip_base_layers(mut path: &str) -> &str {
    while let Some(p) = path.strip_suffix(".base_layer") {
        path = p;
    }
    path
}

/// A LoRA on a 2-D module parameter (peft's `ParamWrapper`): like a Linear, but peft rounds
/// the delta to the parameter's dtype before adding it.
fn router_edit(a: &Tensor, b: &Tensor, scale: f32) -> Edit {
    let module = ModuleTensors::from_roles([("a", a), ("b", b)]);
    Edit::Lora {
        module,
        kind: LoraKind::Linear {
            fan_in_fan_out: false,
        },
        scale,
        dora: false,
        round_first: true,
    }
}
