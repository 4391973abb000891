//! Merging into bitsandbytes 8-bit (LLM.int8) bases: the two ways, as the real libraries run
//! them on the CPU (see docs/formats.md, "bitsandbytes 8-bit").
//!
//! * **re-quantized** (the default): peft's `Linear8bitLt.merge`: `int8_vectorwise_dequant(W)`
//!   (`f32`, not rounded to the model dtype), `+ Δ` in `f32`, then `Int8Params` quantizes the
//!   sum again (through `float16`), adapter by adapter (an [`Edit::Requantize`] round trip
//!   between two). Weight and `SCB` of merged weights are written anew (same dtypes and shapes,
//!   so the base's layout and index are kept), every other tensor is copied,
//!   `quantization_config` is kept. Each merged weight's error `max |dequant(requant(w)) − w|`
//!   against peft's `f32` sum is recorded for the report;
//! * **dequantized** (`MergeJob::dequantize`): transformers' `model.dequantize()` (the `f32`
//!   dequantization rounded to config.json's `dtype`) then peft's plain merge;
//!   `quantization_config`, `SCB` and `weight_format` are dropped and the output planned anew.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use peftkit_checkpoint::{Checkpoint, CheckpointError, Dtype, StateDict, Tensor};

use super::banded::{BandSource, Bands};
use super::streamed::stream_dequantized;
use super::view::{compute_error, dequantized_bytes, with_merged_values};
use super::weight8::{Requantize8, Weight8};
use super::BnbError;
use crate::edit::{Edit, LoraKind, Step};
use crate::error::MergeError;
use crate::kernels::{bnb_int8_quantize_rows_into, nan_max, round_slice_to, MergeOptions};
use crate::plan::MergePlan;
use crate::quant::joint::{main_tensor, part_tensor, Joint, JointSlot, KeepBudget};
use crate::report::{QuantizationReport, RequantizedTensor};

/// A merged int8 weight whose re-quantization stores non-finite row scales the base did not
/// hold: values beyond `float16`'s range (bitsandbytes casts to `float16` before quantizing).
#[derive(Debug, thiserror::Error)]
#[error("{rows} row(s) of the merged weight exceed float16's range (±65504; bitsandbytes quantizes to int8 through float16), the first is row {first}: they would be stored as zeros with an infinite scale; nothing was written. Merge with --dequantize, or pass --allow-nonfinite to write what peft writes")]
pub struct Int8RangeError {
    /// Rows whose scale is not finite.
    pub rows: usize,
    /// The first of them.
    pub first: usize,
}

/// A merge into an int8 base.
pub(crate) struct Int8Merge {
    weights: Vec<Weight8>,
    /// `Some(model dtype)` with `--dequantize`; `None` when re-quantizing.
    dequantize: Option<Dtype>,
    allow_nonfinite: bool,
    /// Each re-quantized weight's error, recorded as it is written.
    errors: Arc<Mutex<BTreeMap<String, f64>>>,
    /// What the re-quantized weights may hold for later writes (see `joint`).
    budget: Arc<KeepBudget>,
}

impl Int8Merge {
    pub fn new(weights: Vec<Weight8>, dequantize: Option<Dtype>, allow_nonfinite: bool) -> Self {
        Int8Merge {
            weights,
            dequantize,
            allow_nonfinite,
            errors: Arc::default(),
            budget: Arc::default(),
        }
    }

    /// Whether every int8 weight is written in the model dtype.
    pub fn dequantizes(&self) -> bool {
        self.dequantize.is_some()
    }

    /// `base` with every int8 weight as a lazily dequantized float tensor (`f32` when
    /// re-quantizing, the model dtype with `--dequantize`) and its `SCB` and `weight_format`
    /// removed.
    pub fn view(&self, base: &Checkpoint) -> Result<Checkpoint, MergeError> {
        let mut view = base.clone();
        let out = self.dequantize.unwrap_or(Dtype::F32);
        for w in &self.weights {
            for part in w.part_names() {
                view.remove_tensor(&part);
            }
            let weight = w.clone();
            let lazy = Tensor::lazy(out, w.shape().to_vec(), move || {
                let err =
                    |e| compute_error(&weight.name, "dequantizing a bitsandbytes int8 weight", e);
                let numel = weight.shape().iter().product();
                dequantized_bytes(out, numel, |values| {
                    weight.dequantize_into(values)?;
                    Ok(round_slice_to(out, values)?)
                })
                .map_err(err)
            })?;
            view.replace_tensor(&w.name, lazy);
        }
        Ok(view)
    }

    /// Makes `plan` re-quantize as peft's `Linear8bitLt.merge` does, adapter by adapter: it
    /// dequantizes the weight to `f32`, adds one adapter's delta and stores the sum as a new
    /// `Int8Params`, so after every adapter but the last the weight goes through int8 once more
    /// (an [`Edit::Requantize`] step; the last quantization is the output's). Refuses, when
    /// re-quantizing, what is not reproduced: DoRA, and edits other than a LoRA pair of a
    /// Linear layer.
    pub fn sequence(&self, plan: &mut MergePlan) -> Result<(), MergeError> {
        if self.dequantizes() {
            return Ok(());
        }
        for w in &self.weights {
            let Some(steps) = plan.steps.get_mut(&w.name) else {
                continue;
            };
            if let Some(what) = steps.iter().find_map(|s| refusal(&s.edit)) {
                let tensor = w.name.clone();
                return Err(BnbError::Requantize {
                    tensor,
                    what,
                    bits: 8,
                }
                .into());
            }
            let count = steps.len();
            let mut sequenced = Vec::with_capacity(2 * count);
            for (i, step) in steps.drain(..).enumerate() {
                let adapter = step.adapter.clone();
                sequenced.push(step);
                if i + 1 < count {
                    let stored = Requantize8 { weight: w.clone() };
                    let edit = Edit::Requantize(Arc::new(stored));
                    sequenced.push(Step { adapter, edit });
                }
            }
            *steps = sequenced;
        }
        Ok(())
    }

    /// The output state: when re-quantizing, each merged weight and its `SCB` quantized from
    /// the merged `f32` values by one computation (see `joint`: the weight computes, its `SCB`
    /// is written after the rest of the file), `weight_format` and every untouched weight's
    /// tensors as stored. With `--dequantize`, `state` as it is.
    /// A weight whose steps allow it is computed band by band (see `banded`, with the
    /// merge's kernel `opts` and non-finite `check`), the others from the merged view; with
    /// `--dequantize` such a weight is streamed band by band (`streamed`).
    pub fn finish(
        &self,
        state: StateDict,
        (base, plan): (&Checkpoint, &MergePlan),
        (opts, check): (&MergeOptions, bool),
    ) -> Result<StateDict, MergeError> {
        if self.dequantizes() {
            let weights = self.weights.iter().map(|w| {
                let (shape, rows) = (w.shape().to_vec(), w.band_rows());
                (w.name.clone(), shape, rows, w.clone())
            });
            return Ok(stream_dequantized(state, weights, plan, (opts, check))?);
        }
        let by_name: HashMap<&str, &Weight8> =
            self.weights.iter().map(|w| (w.name.as_str(), w)).collect();
        let stored = |name: &str| {
            base.get(name).cloned().ok_or_else(|| {
                let e = compute_error(name, "copying an int8 weight", "missing".into());
                MergeError::from(e)
            })
        };
        let mut out = StateDict::new();
        for (name, merged) in state {
            let Some(w) = by_name.get(name.as_str()) else {
                out.insert(name, merged);
                continue;
            };
            if !plan.steps.contains_key(&name) {
                out.insert(name.clone(), stored(&name)?);
                for part in w.part_names() {
                    out.insert(part.clone(), stored(&part)?);
                }
                continue;
            }
            let bands = Bands::of(
                (&name, w.shape()),
                w.band_rows(),
                &plan.steps[&name],
                (opts, check),
            )?;
            let requant = Arc::new(Requant8 {
                weight: (*w).clone(),
                base: stored(&name)?,
                merged,
                bands,
                errors: self.errors.clone(),
                allow_nonfinite: self.allow_nonfinite,
                slot: JointSlot::new(self.budget.clone()),
            });
            let scb = part_tensor(&requant, &name, 0, Dtype::F32, w.scb_shape().to_vec())?;
            out.insert(name.clone(), main_tensor(&requant));
            out.insert(w.scb_name().to_owned(), scb);
            if let Some(format) = w.format_name() {
                out.insert(format.to_owned(), stored(format)?);
            }
        }
        Ok(out)
    }

    /// The summary's account: the merged weights with their re-quantization errors, or the
    /// count of dequantized ones.
    pub fn report(&self, plan: &MergePlan) -> QuantizationReport {
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let requantized = match self.dequantize {
            Some(_) => vec![],
            None => self
                .weights
                .iter()
                .filter(|w| plan.steps.contains_key(&w.name))
                .map(|w| RequantizedTensor {
                    tensor: w.name.clone(),
                    max_abs_error: errors.get(&w.name).copied(),
                })
                .collect(),
        };
        QuantizationReport {
            method: "bitsandbytes".into(),
            output: if self.dequantizes() {
                "dequantized"
            } else {
                "kept"
            }
            .into(),
            format: "int8".into(),
            double_quant: false,
            // peft merges into the f32 dequantization; `--dequantize` rounds to the model dtype.
            dtype: peftkit_checkpoint::torch_dtype_name(self.dequantize.unwrap_or(Dtype::F32))
                .map(Into::into),
            tensors_dequantized: if self.dequantizes() {
                self.weights.len()
            } else {
                0
            },
            requantized,
        }
    }
}

/// Why an edit of an int8 weight cannot be re-quantized as peft does, if it cannot.
fn refusal(edit: &Edit) -> Option<&'static str> {
    match edit {
        Edit::Lora {
            dora: false,
            kind: LoraKind::Linear { .. },
            round_first: false,
            ..
        } => None,
        Edit::Lora { dora: true, .. } => Some("DoRA"),
        _ => Some("an edit other than a LoRA pair"),
    }
}

/// One merged int8 weight re-quantized: the codes (the main tensor, written over the base
/// weight's) and its `SCB` (the one part) from one computation.
struct Requant8 {
    weight: Weight8,
    /// The stored int8 weight.
    base: Tensor,
    /// The merged weight in `f32` (the dequantized view, edited by the plan's steps).
    merged: Tensor,
    /// The steps by bands of rows, when they allow it: then `merged` is not read.
    bands: Option<Bands>,
    errors: Arc<Mutex<BTreeMap<String, f64>>>,
    allow_nonfinite: bool,
    slot: JointSlot,
}

impl Requant8 {
    /// Re-quantizes the merged values, the codes into `codes` (band by band where the steps
    /// allow), checks the row scales, records the error and returns the scales.
    fn quantize_into(&self, codes: &mut [i8]) -> Result<Vec<f32>, CheckpointError> {
        let w = &self.weight;
        let err = |e| compute_error(&w.name, "re-quantizing a merged int8 weight", e);
        let (scb, e) = match &self.bands {
            Some(bands) => self.requantize_bands(bands, codes)?,
            None => {
                let requantize = |values: &[f32]| w.requantize_with_error(values);
                let (q, e) = with_merged_values(&self.merged, requantize).map_err(err)?;
                if q.weight.len() != codes.len() {
                    let reason = format!("{} codes for {} bytes", q.weight.len(), codes.len());
                    return Err(err(reason.into()));
                }
                codes.copy_from_slice(&q.weight);
                (q.scb, e)
            }
        };
        if !self.allow_nonfinite {
            let held = w
                .scb()
                .map_err(err)?
                .iter()
                .filter(|s| !s.is_finite())
                .count();
            let bad: Vec<usize> = (0..scb.len()).filter(|&r| !scb[r].is_finite()).collect();
            if bad.len() > held {
                let (rows, first) = (bad.len() - held, bad[0]);
                return Err(err(Box::new(Int8RangeError { rows, first })));
            }
        }
        if let Ok(mut errors) = self.errors.lock() {
            errors.insert(w.name.clone(), e);
        }
        Ok(scb)
    }

    /// The codes and scales band by band (see `banded`), and the error (NaN if any band's is).
    fn requantize_bands(
        &self,
        bands: &Bands,
        codes: &mut [i8],
    ) -> Result<(Vec<f32>, f64), CheckpointError> {
        let w = &self.weight;
        let err = |e| compute_error(&w.name, "re-quantizing a merged int8 weight", e);
        let (rows, cols) = (w.shape()[0], w.shape()[1]);
        if codes.len() != rows * cols {
            return Err(err("the codes differ in size from the weight's".into()));
        }
        let mut scb = vec![0f32; rows];
        let outs = codes
            .chunks_mut(bands.rows * cols)
            .zip(scb.chunks_mut(bands.rows));
        let quantize = |values: &[f32], out: (&mut [i8], &mut [f32])| {
            bnb_int8_quantize_rows_into(values, cols, out).map_err(|e| err(e.into()))
        };
        let read = w.rows_in(Dtype::F32)?;
        let errors = bands.run((&w.name, rows, cols), outs.collect(), &*read, &quantize)?;
        // A maximum does not depend on the order; NaN wins, as in the whole weight's.
        let error = errors.into_iter().fold(0f64, nan_max);
        Ok((scb, error))
    }
}

/// The codes overwrite the base weight's bytes (computed from the merged view, which reads
/// them itself); the part is the `SCB`.
impl Joint for Requant8 {
    fn shared(&self) -> &JointSlot {
        &self.slot
    }

    fn base(&self) -> &Tensor {
        &self.base
    }

    fn compute(&self, main: &mut [u8]) -> Result<Vec<Vec<u8>>, CheckpointError> {
        let scb = self.quantize_into(bytemuck::cast_slice_mut(main))?;
        Ok(vec![scb.iter().flat_map(|s| s.to_le_bytes()).collect()])
    }

    fn reads_base(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use peftkit_checkpoint::nonfinite;

    use super::*;
    use crate::quant::bnb::banded::tests::{lora_step, refused};

    /// `w` of `base` merged (`merged`, its `f32` bytes), re-quantized by `bands` or (`None`)
    /// from the merged bytes: its codes, scales and error.
    fn run(
        w: &Weight8,
        base: &Checkpoint,
        merged: &[u8],
        bands: Option<Bands>,
    ) -> Result<(Vec<i8>, Vec<f32>, u64), CheckpointError> {
        let errors = Arc::<Mutex<BTreeMap<String, f64>>>::default();
        let r = Requant8 {
            weight: w.clone(),
            base: base.get(&w.name).unwrap().clone(),
            merged: Tensor::from_bytes(Dtype::F32, w.shape().to_vec(), merged.to_vec()).unwrap(),
            bands,
            errors: errors.clone(),
            allow_nonfinite: true,
            slot: JointSlot::new(Arc::default()),
        };
        let mut codes = vec![0i8; w.shape().iter().product()];
        let scb = r.quantize_into(&mut codes)?;
        let error = errors.lock().unwrap()[&w.name].to_bits();
        Ok((codes, scb, error))
    }

    /// Every weight of the int8 fixture merged and re-quantized by bands of 1, 3 and 7 rows
    /// (the last band short) gives the codes, scales and reported error of the whole weight
    /// dequantized, merged and re-quantized; a merge that makes values infinite is refused
    /// with the whole weight's count and first index.
    #[test]
    fn a_weight_requantized_by_bands_is_the_weight_requantized_whole() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bnb8");
        let base = Checkpoint::open(&root.join("int8_bf16/base8")).unwrap();
        let weights = Weight8::find_all(&base).ok().unwrap();
        let merge = Int8Merge::new(weights.clone(), None, true);
        let view = merge.view(&base).unwrap();
        let opts = MergeOptions::default();
        for w in &weights {
            let shape = w.shape().to_vec();
            for blow_up in [false, true] {
                let step = lora_step(shape[0], shape[1], blow_up);
                let mut merged = view.get(&w.name).unwrap().bytes().unwrap().into_owned();
                step.apply(&w.name, Dtype::F32, &shape, &mut merged, &opts, None)
                    .unwrap();
                let whole = run(w, &base, &merged, None).unwrap();
                let stored = base.get(&w.name).unwrap().bytes().unwrap().into_owned();
                assert!(bytemuck::cast_slice::<i8, u8>(&whole.0) != stored);
                let expected = nonfinite(Dtype::F32, &merged);
                assert_eq!(expected.is_some(), blow_up);
                for rows in [1, 3, 7] {
                    let steps = [step.clone()];
                    let bands = Bands::of((&w.name, &shape), Some(rows), &steps, (&opts, true));
                    let bands = bands.unwrap();
                    assert!(bands.is_some());
                    match expected {
                        None => {
                            let got = run(w, &base, &merged, bands).unwrap();
                            assert!(got == whole, "{} {rows}", w.name);
                        }
                        Some(e) => {
                            assert_eq!(refused(run(w, &base, &merged, bands).unwrap_err()), e)
                        }
                    }
                }
            }
        }
    }
}
