//! The tensors of each way of merging into a 4-bit base: the dequantized view the planner and
//! kernels work on, the QLoRA round trip, and the re-quantized output.

use std::collections::HashMap;

use peftkit_checkpoint::{Checkpoint, CheckpointError, Dtype, StateDict, Tensor};

use super::codes;
use super::weight::{Part, Weight4};
use super::{host_avx512, torch_threads, BnbError, QloraBase};
use crate::edit::{Edit, LoraKind};
use crate::error::MergeError;
use crate::kernels::{
    bnb_dequantize_4bit, bnb_dequantize_blockwise, bnb_quantize_4bit, bnb_quantize_blockwise,
    decode_f32, encode_f32, round_slice_to, torch_mean_f32, Bnb4Type, Code4,
};
use crate::plan::MergePlan;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// transformers' `Params4bit` block size.
const QLORA_BLOCKSIZE: usize = 64;
/// bitsandbytes' block size for the double-quantized scales.
const QLORA_NESTED_BLOCKSIZE: usize = 256;

pub(super) fn compute_error(tensor: &str, context: &str, source: BoxError) -> CheckpointError {
    CheckpointError::TensorCompute {
        tensor: tensor.to_owned(),
        context: context.to_owned(),
        source,
    }
}

/// `base` with every 4-bit weight as a lazily dequantized float tensor (`f32` if `widen`, its
/// dtype otherwise) and the tensors stored beside it removed.
pub(super) fn dequantized(
    base: &Checkpoint,
    weights: &[Weight4],
    widen: bool,
) -> Result<Checkpoint, MergeError> {
    let mut view = base.clone();
    let avx512 = host_avx512();
    for w in weights {
        for part in w.part_names() {
            view.remove_tensor(&part);
        }
        let dtype = w.dtype();
        let out = if widen { Dtype::F32 } else { dtype };
        let weight = w.clone();
        let lazy = Tensor::lazy(out, w.state.shape.clone(), move || {
            let err =
                |e| compute_error(&weight.name, "dequantizing a bitsandbytes 4-bit weight", e);
            let mut values = weight.dequantize(avx512).map_err(err)?;
            round_slice_to(dtype, &mut values).map_err(|e| err(e.into()))?;
            encode_f32("dequantized weight", out, &values).map_err(|e| err(e.into()))
        })?;
        view.replace_tensor(&w.name, lazy);
    }
    Ok(view)
}

/// Refuses what a re-quantizing merge cannot reproduce: peft dequantizes, adds one plain LoRA
/// delta and re-quantizes, adapter by adapter.
pub(super) fn check_requantizable<'a>(
    weights: impl IntoIterator<Item = &'a str>,
    plan: &MergePlan,
    bits: u8,
) -> Result<(), MergeError> {
    for name in weights {
        let Some(steps) = plan.steps.get(name) else {
            continue;
        };
        let what = match steps.as_slice() {
            [step] => match &step.edit {
                Edit::Lora {
                    dora: false,
                    kind: LoraKind::Linear { .. },
                    round_first: false,
                    ..
                } => continue,
                Edit::Lora { dora: true, .. } => "DoRA",
                _ => "an edit other than a LoRA pair",
            },
            _ => "more than one adapter",
        };
        let tensor = name.to_owned();
        return Err(BnbError::Requantize { tensor, what, bits }.into());
    }
    Ok(())
}

/// The weights a QLoRA round trip replaces: those a LoRA pair of a Linear layer merges into
/// (the layers bitsandbytes quantizes for QLoRA).
pub(super) fn round_trip_targets(plan: &MergePlan) -> impl Iterator<Item = &String> {
    plan.steps.iter().filter_map(|(name, steps)| {
        let linear = steps.iter().any(|s| {
            matches!(
                s.edit,
                Edit::Lora {
                    kind: LoraKind::Linear {
                        fan_in_fan_out: false
                    },
                    ..
                }
            )
        });
        linear.then_some(name)
    })
}

/// `view` with every weight of [`round_trip_targets`] replaced by bitsandbytes' 4-bit round
/// trip of it (quantized with `q`, dequantized to its dtype).
pub(super) fn round_tripped(
    mut view: Checkpoint,
    plan: &MergePlan,
    q: QloraBase,
) -> Result<Checkpoint, MergeError> {
    let (avx512, threads) = (host_avx512(), torch_threads());
    for name in round_trip_targets(plan) {
        let Some(t) = view.get(name).cloned() else {
            continue;
        };
        let (key, dtype, shape) = (name.clone(), t.dtype(), t.shape().to_vec());
        let lazy = Tensor::lazy(dtype, shape.clone(), move || {
            let err =
                |e| compute_error(&key, "the bitsandbytes 4-bit round trip (--qlora-base)", e);
            let values = decode_f32("weight", dtype, &t.bytes()?).map_err(|e| err(e.into()))?;
            let out = round_trip(&values, &shape, q, avx512, threads).map_err(err)?;
            encode_f32("round trip", dtype, &out).map_err(|e| err(e.into()))
        })?;
        view.replace_tensor(name, lazy);
    }
    Ok(view)
}

/// `dequantize_4bit(quantize_4bit(W))` with transformers' QLoRA settings, before the rounding
/// to the weight's dtype.
fn round_trip(
    values: &[f32],
    shape: &[usize],
    q: QloraBase,
    avx512: bool,
    threads: usize,
) -> Result<Vec<f32>, BoxError> {
    let code = Code4::new(
        q.kind,
        match q.kind {
            Bnb4Type::Nf4 => codes::values(&codes::NF4),
            Bnb4Type::Fp4 => codes::values(&codes::FP4),
        },
    );
    let (packed, mut absmax) = bnb_quantize_4bit(values, QLORA_BLOCKSIZE, &code);
    if q.double_quant {
        let dynamic = codes::values(&codes::DYNAMIC);
        let offset = torch_mean_f32(&absmax, threads);
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (codes8, scales) = bnb_quantize_blockwise(&centred, &dynamic, QLORA_NESTED_BLOCKSIZE);
        absmax = bnb_dequantize_blockwise(&codes8, &scales, &dynamic, QLORA_NESTED_BLOCKSIZE)?;
        absmax.iter_mut().for_each(|a| *a += offset);
    }
    Ok(bnb_dequantize_4bit(
        &packed,
        &absmax,
        &code,
        QLORA_BLOCKSIZE,
        shape,
        avx512,
    )?)
}

/// The output of a re-quantizing merge: each merged 4-bit weight quantized again (its state
/// computed now, its other tensors when written, from the merged `f32` values), every other
/// 4-bit weight with its stored tensors, and the rest of `state` as it is.
pub(super) fn requantized(
    state: StateDict,
    base: &Checkpoint,
    weights: &[Weight4],
    plan: &MergePlan,
) -> Result<StateDict, MergeError> {
    let by_name: HashMap<&str, &Weight4> = weights.iter().map(|w| (w.name.as_str(), w)).collect();
    let threads = torch_threads();
    let stored = |name: &str| {
        base.get(name).cloned().ok_or_else(|| {
            let e = compute_error(
                name,
                "copying a 4-bit weight",
                "missing from the base".into(),
            );
            MergeError::from(e)
        })
    };
    let mut out = StateDict::new();
    for (name, tensor) in state {
        let Some(w) = by_name.get(name.as_str()) else {
            out.insert(name, tensor);
            continue;
        };
        if !plan.steps.contains_key(&name) {
            out.insert(name.clone(), stored(&name)?);
            for part in w.part_names() {
                out.insert(part.clone(), stored(&part)?);
            }
            continue;
        }
        // The state's length (its JSON holds the new offset) is needed before anything is
        // written: the weight is merged and quantized once now, and again for each stored part.
        let requantize = {
            let (w, merged) = ((*w).clone(), tensor.clone());
            move || -> Result<_, CheckpointError> {
                let err = |e| compute_error(&w.name, "re-quantizing a merged 4-bit weight", e);
                let values = decode_f32("merged", Dtype::F32, &merged.bytes()?)
                    .map_err(|e| err(e.into()))?;
                w.requantize(&values, threads).map_err(err)
            }
        };
        let state_bytes = requantize()?.state;
        for part in w.part_names() {
            out.insert(part.clone(), stored(&part)?);
        }
        for (part_name, part) in w.requantized_parts() {
            let tensor = match part {
                Part::State => {
                    Tensor::from_bytes(Dtype::U8, vec![state_bytes.len()], state_bytes.clone())?
                }
                _ => {
                    let dtype = match part {
                        Part::Absmax if !w.state.nested() => Dtype::F32,
                        Part::NestedAbsmax => Dtype::F32,
                        _ => Dtype::U8,
                    };
                    let requantize = requantize.clone();
                    Tensor::lazy(dtype, w.shape_of(part), move || {
                        Ok(requantize()?.take(part).1)
                    })?
                }
            };
            out.insert(part_name, tensor);
        }
    }
    Ok(out)
}
