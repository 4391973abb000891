//! The tensors of each way of merging into a 4-bit base: the dequantized view the planner and
//! kernels work on, the QLoRA round trip, and the re-quantized output.

use std::collections::HashMap;

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use peftkit_checkpoint::{
    buffers, save_workers, Checkpoint, CheckpointError, Dtype, StateDict, Tensor,
};

use super::banded::{BandSource, Bands};
use super::codes;
use super::weight::{Part, Requantize4, RoundTrip4, Scales4, Weight4};
use super::{host_avx512, torch_threads, BnbError, QloraBase};
use crate::edit::{Edit, LoraKind, Step};
use crate::error::MergeError;
use crate::kernels::{
    decode_f32, decode_f32_into, element_size, encode_f32, encode_f32_into, quantize_4bit_chunk,
    round_slice_to, with_kept, Bnb4Type, Code4, MergeOptions,
};
use crate::plan::MergePlan;
use crate::quant::joint::{main_tensor, part_tensor, Joint, JointSlot, KeepBudget};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// transformers' `Params4bit` block size.
pub(super) const QLORA_BLOCKSIZE: usize = 64;
/// bitsandbytes' block size for the double-quantized scales.
const QLORA_NESTED_BLOCKSIZE: usize = 256;

pub(super) fn compute_error(tensor: &str, context: &str, source: BoxError) -> CheckpointError {
    CheckpointError::TensorCompute {
        tensor: tensor.to_owned(),
        context: context.to_owned(),
        source,
    }
}

/// A dequantized weight's `numel` values as `dtype` bytes, in a pooled buffer (a merge that
/// re-quantizes it gives the buffer back once read: [`with_merged_values`], so the next weight
/// reuses its pages). `fill` writes the values as `f32`: straight into the buffer when `dtype`
/// is `f32` (a kept merge's view), else into this thread's kept `f32` buffer, which is then
/// encoded. A weight's `f32` copy in each place was twice the memory and a pass more.
pub(super) fn dequantized_bytes(
    dtype: Dtype,
    numel: usize,
    fill: impl FnOnce(&mut [f32]) -> Result<(), BoxError>,
) -> Result<Vec<u8>, BoxError> {
    let mut out = buffers::take(numel * element_size(dtype)?);
    if let Some(values) = as_f32s_mut(dtype, &mut out) {
        fill(values)?;
        return Ok(out);
    }
    with_values(|values| {
        values.clear();
        values.resize(numel, 0.0);
        fill(values)?;
        encode_f32_into("dequantized weight", dtype, values, &mut out)?;
        Ok(out)
    })
}

/// `bytes` of `dtype` as the `f32` values they hold, read in place (no copy) where they can
/// be ([`readable_in_place`]).
fn as_f32s(dtype: Dtype, bytes: &[u8]) -> Option<&[f32]> {
    readable_in_place(dtype)
        .then(|| bytemuck::try_cast_slice(bytes).ok())
        .flatten()
}

/// [`as_f32s`], to write.
fn as_f32s_mut(dtype: Dtype, bytes: &mut [u8]) -> Option<&mut [f32]> {
    readable_in_place(dtype)
        .then(|| bytemuck::try_cast_slice_mut(bytes).ok())
        .flatten()
}

/// Whether bytes of `dtype` are `f32` values as they lie: `f32` on a little-endian host
/// (safetensors' byte order), where an aligned address is all a cast needs (large buffers
/// always are aligned).
fn readable_in_place(dtype: Dtype) -> bool {
    dtype == Dtype::F32 && cfg!(target_endian = "little")
}

thread_local! {
    /// This thread's `f32` copy of a weight (see `kernels::with_kept`): dequantized, or merged
    /// and decoded. A fresh one per weight was paged in and zeroed by the kernel each time,
    /// most of a kept 4-bit merge's system time.
    static VALUES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's kept `f32` buffer ([`VALUES`]).
pub(super) fn with_values<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    with_kept(&VALUES, f)
}

/// Runs `f` on the `f32` values of a merged weight (the dequantized view, edited), read in
/// place where they can be ([`as_f32s`]), its bytes given back.
pub(super) fn with_merged_values<R>(
    merged: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<R, BoxError>,
) -> Result<R, BoxError> {
    let bytes = merged.bytes()?;
    let result = match as_f32s(merged.dtype(), &bytes) {
        Some(values) => f(values),
        None => with_values(|values| {
            values.clear();
            values.resize(bytes.len() / element_size(merged.dtype())?, 0.0);
            decode_f32_into("merged", merged.dtype(), &bytes, values)?;
            f(values)
        }),
    };
    if let Cow::Owned(buf) = bytes {
        buffers::give(buf);
    }
    result
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
            let numel = weight.state.shape.iter().product();
            dequantized_bytes(out, numel, |values| {
                weight.dequantize_into(avx512, values)?;
                Ok(round_slice_to(dtype, values)?)
            })
            .map_err(err)
        })?;
        view.replace_tensor(&w.name, lazy);
    }
    Ok(view)
}

/// Makes `plan` re-quantize as peft's `Linear4bit.merge` does, adapter by adapter: it
/// dequantizes the weight, merges one adapter and stores the result in 4 bits again, so after
/// every adapter but the last the weight goes through 4 bits once more (the last quantization
/// is the output's, [`requantized`]). A plain LoRA pair gives an `f32` sum (`bf16 + f32`
/// promotes), stored as `float32`; DoRA casts its result back to the dtype it dequantized to,
/// so that dtype stays ([`stored_dtype`]). Refuses what is not reproduced: an edit other than
/// a LoRA pair of a Linear layer, and DoRA after another adapter of the same weight (peft then
/// unmerges and re-merges the earlier adapters, each through 4 bits, to find DoRA's norm).
pub(super) fn sequence_requantized(
    weights: &[Weight4],
    plan: &mut MergePlan,
) -> Result<(), MergeError> {
    let (threads, avx512) = (torch_threads(), host_avx512());
    for w in weights {
        let Some(steps) = plan.steps.get_mut(&w.name) else {
            continue;
        };
        if let Some(what) = steps
            .iter()
            .enumerate()
            .find_map(|(i, s)| refusal(i, &s.edit))
        {
            let tensor = w.name.clone();
            return Err(BnbError::Requantize {
                tensor,
                what,
                bits: 4,
            }
            .into());
        }
        let (count, mut sequenced) = (steps.len(), Vec::with_capacity(2 * steps.len()));
        for (i, step) in steps.drain(..).enumerate() {
            sequenced.push(step);
            let dtype = stored_dtype(w, &sequenced);
            let round_trip = i + 1 < count;
            // The last adapter's sum is quantized by the output itself; before that, only a
            // DoRA result needs its cast.
            if round_trip || dtype != Dtype::F32 {
                let adapter = sequenced[sequenced.len() - 1].adapter.clone();
                let stored = Requantize4 {
                    weight: w.clone(),
                    dtype,
                    round_trip,
                    threads,
                    avx512,
                };
                sequenced.push(Step {
                    adapter,
                    edit: Edit::Requantize(Arc::new(stored)),
                });
            }
        }
        *steps = sequenced;
    }
    Ok(())
}

/// Why the `i`-th edit of a 4-bit weight cannot be re-quantized as peft does, if it cannot.
fn refusal(i: usize, edit: &Edit) -> Option<&'static str> {
    match edit {
        Edit::Lora {
            kind: LoraKind::Linear { .. },
            round_first: false,
            dora,
            ..
        } if !*dora || i == 0 => None,
        Edit::Lora { dora: true, .. } if i > 0 => Some("DoRA after another adapter"),
        Edit::Lora { dora: true, .. } => Some("DoRA"),
        _ => Some("an edit other than a LoRA pair"),
    }
}

/// The dtype peft's `Params4bit` holds `w` in after `steps`: the weight's own at first; `f32`
/// after a plain LoRA pair (its `f32` delta promotes the sum); unchanged after DoRA (which
/// casts back to the dequantized dtype).
pub(super) fn stored_dtype(w: &Weight4, steps: &[Step]) -> Dtype {
    steps.iter().fold(w.dtype(), |dtype, s| match &s.edit {
        Edit::Lora { dora: true, .. } | Edit::Requantize(_) => dtype,
        _ => Dtype::F32,
    })
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
    let dynamic = codes::values(&codes::DYNAMIC);
    qlora_settings(q, &dynamic).run(values, shape, threads, avx512)
}

/// How transformers quantizes a weight for QLoRA with `q`: blocks of 64 in its 4-bit code
/// and, with double quantization, block scales in `dynamic` (bitsandbytes' 8-bit dynamic code)
/// in blocks of 256.
pub(super) fn qlora_settings(q: QloraBase, dynamic: &[f32; 256]) -> RoundTrip4<'_> {
    let code = Code4::new(
        q.kind,
        match q.kind {
            Bnb4Type::Nf4 => codes::values(&codes::NF4),
            Bnb4Type::Fp4 => codes::values(&codes::FP4),
        },
    );
    RoundTrip4 {
        code,
        blocksize: QLORA_BLOCKSIZE,
        nested: q.double_quant.then_some((dynamic, QLORA_NESTED_BLOCKSIZE)),
    }
}

/// The output of a re-quantizing merge: each merged 4-bit weight quantized again, every other
/// 4-bit weight with its stored tensors, and the rest of `state` as it is. A merged weight's
/// packed bytes, `absmax` and `nested_absmax` come from one computation when written (see
/// `joint`, within `budget`); its quantization state is known before (see
/// [`Requant4::state_bytes`]), computed for all weights before any is written, as many at a
/// time as the save will compute. A weight whose steps allow it is computed band by band
/// ([`Bands`], with the merge's kernel options and non-finite `check`), the others from the
/// merged view.
pub(super) fn requantized(
    state: StateDict,
    base: &Checkpoint,
    weights: &[Weight4],
    plan: &MergePlan,
    (budget, opts, check): (Arc<KeepBudget>, &MergeOptions, bool),
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
    let mut entries = Vec::with_capacity(state.len());
    for (name, tensor) in state {
        let Some(w) = by_name.get(name.as_str()) else {
            entries.push(Entry::Kept(name, tensor));
            continue;
        };
        if !plan.steps.contains_key(&name) {
            entries.push(Entry::Kept(name.clone(), stored(&name)?));
            for part in w.part_names() {
                let tensor = stored(&part)?;
                entries.push(Entry::Kept(part, tensor));
            }
            continue;
        }
        let steps = &plan.steps[&name];
        entries.push(Entry::Merged(Box::new(Requant4 {
            weight: (*w).clone(),
            base: stored(&name)?,
            merged: tensor,
            bands: Bands::of(
                (&w.name, &w.state.shape),
                w.band_rows(),
                steps,
                (opts, check),
            )?,
            dtype: stored_dtype(w, steps),
            threads,
            state: vec![],
            slot: JointSlot::new(budget.clone()),
        })));
    }
    plan_states(&mut entries)?;
    let mut out = StateDict::new();
    for entry in entries {
        match entry {
            Entry::Kept(name, tensor) => {
                out.insert(name, tensor);
            }
            Entry::Merged(requant) => insert_requantized(Arc::from(requant), &stored, &mut out)?,
        }
    }
    Ok(out)
}

/// A tensor of [`requantized`]'s output, or a merged weight to re-quantize.
enum Entry {
    Kept(String, Tensor),
    Merged(Box<Requant4>),
}

/// [`Requant4::state_bytes`] of every merged weight in `entries`, at most
/// [`save_workers`] at a time: a double-quantized weight is computed for its state, and each
/// computation holds the weight's `f32` copies, as each of the save's workers will.
fn plan_states(entries: &mut [Entry]) -> Result<(), CheckpointError> {
    let merged = entries.iter_mut().filter_map(|e| match e {
        Entry::Merged(r) => Some(&mut **r),
        Entry::Kept(..) => None,
    });
    each_at_most(save_workers(), merged.collect(), |r| {
        r.state = r.state_bytes()?;
        Ok(())
    })
}

/// Runs `f` on every item, on at most `workers` scoped threads; stops starting items after a
/// failure and returns the error of the first failing item in `items` order, whatever the
/// threads' timing. (rayon would run as many at a time as the pool has threads.)
fn each_at_most<T: Send, E: Send>(
    workers: usize,
    mut items: Vec<&mut T>,
    f: impl Fn(&mut T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = Mutex::new(items.iter_mut().enumerate());
    let errors = Mutex::new(Vec::new());
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some((i, item)) = next.lock().unwrap_or_else(|e| e.into_inner()).next()
                    else {
                        return;
                    };
                    if let Err(e) = f(item) {
                        failed.store(true, Ordering::Relaxed);
                        errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((i, e));
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap_or_else(|e| e.into_inner());
    match errors.into_iter().min_by_key(|(i, _)| *i) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// Inserts the tensors of one merged weight into `out`: its stored tensors, then those the
/// re-quantization replaces (in their places) or adds.
fn insert_requantized(
    requant: Arc<Requant4>,
    stored: &dyn Fn(&str) -> Result<Tensor, MergeError>,
    out: &mut StateDict,
) -> Result<(), MergeError> {
    let w = &requant.weight;
    for part in w.part_names() {
        out.insert(part.clone(), stored(&part)?);
    }
    for (part_name, part) in w.requantized_parts() {
        let tensor = match part {
            Part::Packed => main_tensor(&requant),
            Part::State => {
                let bytes = requant.state.clone();
                Tensor::from_bytes(Dtype::U8, vec![bytes.len()], bytes)?
            }
            Part::Absmax if w.state.nested() => {
                part_tensor(&requant, &w.name, 0, Dtype::U8, w.shape_of(part))?
            }
            Part::Absmax => part_tensor(&requant, &w.name, 0, Dtype::F32, w.shape_of(part))?,
            Part::NestedAbsmax => part_tensor(&requant, &w.name, 1, Dtype::F32, w.shape_of(part))?,
        };
        out.insert(part_name, tensor);
    }
    Ok(())
}

/// One merged 4-bit weight re-quantized: the packed codes (the main tensor, written over the
/// base weight's), `absmax` and, with double quantization, `nested_absmax` (parts 0 and 1)
/// from one computation.
struct Requant4 {
    weight: Weight4,
    /// The stored packed weight.
    base: Tensor,
    /// The merged weight in `f32` (the dequantized view, edited by the plan's steps).
    merged: Tensor,
    /// The steps by bands of rows, when they allow it: then `merged` is not read.
    bands: Option<Bands>,
    /// The dtype the sum is stored as ([`stored_dtype`]).
    dtype: Dtype,
    threads: usize,
    /// The quantization state's JSON, fixed before anything is written.
    state: Vec<u8>,
    slot: JointSlot,
}

impl Requant4 {
    /// Re-quantizes the merged weight, its packed bytes into `packed` (band by band where its
    /// steps allow), and returns the tensors stored beside them.
    fn quantize_into(&self, packed: &mut [u8]) -> Result<Scales4, CheckpointError> {
        let w = &self.weight;
        let err = |e| compute_error(&w.name, "re-quantizing a merged 4-bit weight", e);
        let settings = (self.dtype, self.threads);
        let Some(bands) = &self.bands else {
            let requantize = |values: &[f32]| w.requantize_into(values, settings, packed);
            return with_merged_values(&self.merged, requantize).map_err(err);
        };
        let absmax = self.requantize_bands(bands, packed)?;
        w.scales(absmax, self.dtype, self.threads).map_err(err)
    }

    /// [`Requant4::quantize_into`] band by band (see `banded`); returns the block maxima.
    fn requantize_bands(
        &self,
        bands: &Bands,
        packed: &mut [u8],
    ) -> Result<Vec<f32>, CheckpointError> {
        let w = &self.weight;
        let err = |e| compute_error(&w.name, "re-quantizing a merged 4-bit weight", e);
        let (rows, cols, bs) = (w.state.shape[0], w.state.shape[1], w.state.blocksize);
        if packed.len() != (rows * cols).div_ceil(2) {
            return Err(err(
                "the packed output differs in size from the weight's".into()
            ));
        }
        let code = w.code().map_err(err)?;
        let mut absmax = vec![0f32; (rows * cols).div_ceil(bs)];
        // Rows are whole blocks of an even size (`Weight4::band_rows`): a band's codes and
        // block maxima are whole pieces of the weight's.
        let per = bands.rows * cols;
        let outs = packed.chunks_mut(per / 2).zip(absmax.chunks_mut(per / bs));
        let quantize = |values: &[f32], (p, a): (&mut [u8], &mut [f32])| {
            quantize_4bit_chunk(values, bs, &code, p, a);
            Ok(())
        };
        let read = w.rows_in(w.dtype())?;
        bands.run((&w.name, rows, cols), outs.collect(), &*read, &quantize)?;
        Ok(absmax)
    }

    /// The packed weight's length in bytes.
    fn packed_len(&self) -> usize {
        self.base.byte_len()
    }

    /// The quantization state's JSON. Its length must be known before the header is written:
    /// without double quantization it follows from the settings; with it, it holds the mean of
    /// the new block absmax, so the weight is computed now. What that computation made is left
    /// in the slot for the writes, within the merge's budget (`joint`): holding every merged
    /// weight until its write would not be bounded, so those past the budget are computed
    /// again when written.
    fn state_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        if self.weight.state.nested() {
            let mut packed = vec![0u8; self.packed_len()];
            let q = self.quantize_into(&mut packed)?;
            let parts = std::iter::once(q.absmax).chain(q.nested_absmax).collect();
            self.slot.leave(packed, parts);
            return Ok(q.state);
        }
        let w = &self.weight;
        let err = |e| compute_error(&w.name, "re-quantizing a merged 4-bit weight", e);
        w.requantized_state(self.dtype, None).map_err(err)
    }
}

/// The packed codes overwrite the base weight's bytes (computed from the merged view, which
/// reads them itself).
impl Joint for Requant4 {
    fn shared(&self) -> &JointSlot {
        &self.slot
    }

    fn base(&self) -> &Tensor {
        &self.base
    }

    fn compute(&self, main: &mut [u8]) -> Result<Vec<Vec<u8>>, CheckpointError> {
        let q = self.quantize_into(main)?;
        if q.state != self.state {
            let reason = "the re-quantized weight's state differs from the one planned";
            return Err(compute_error(
                &self.weight.name,
                "re-quantizing",
                reason.into(),
            ));
        }
        Ok(std::iter::once(q.absmax).chain(q.nested_absmax).collect())
    }

    fn reads_base(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_at_most_runs_every_item_and_reports_the_first_failure_in_order() {
        let mut items: Vec<u32> = (0..64).collect();
        each_at_most(3, items.iter_mut().collect(), |x| {
            *x += 100;
            Ok::<(), u32>(())
        })
        .unwrap();
        assert!(items.iter().zip(100..).all(|(&x, want)| x == want));
        // Item 40 fails at once, item 5 (started before it) only later: 5 is reported.
        let mut items: Vec<u32> = (0..64).collect();
        let failed = each_at_most(4, items.iter_mut().collect(), |x| match *x {
            5 => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                Err(5)
            }
            40 => Err(40),
            _ => Ok(()),
        });
        assert_eq!(failed, Err(5));
    }
}

#[cfg(test)]
mod band_tests {
    use std::path::Path;

    use peftkit_checkpoint::nonfinite;

    use super::*;
    use crate::quant::bnb::banded::tests::{lora_step, refused};

    fn fixture(case: &str) -> Checkpoint {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bnb");
        Checkpoint::open(&root.join(case).join("base4")).unwrap()
    }

    /// `w` of `base` merged (`merged`, its `f32` bytes), re-quantized by bands of `band` rows
    /// or (`None`) from the merged bytes.
    fn requant(w: &Weight4, base: &Checkpoint, merged: &[u8], bands: Option<Bands>) -> Requant4 {
        let shape = w.state.shape.clone();
        Requant4 {
            weight: w.clone(),
            base: base.get(&w.name).unwrap().clone(),
            merged: Tensor::from_bytes(Dtype::F32, shape, merged.to_vec()).unwrap(),
            bands,
            dtype: Dtype::F32,
            threads: 1,
            state: vec![],
            slot: JointSlot::new(Arc::default()),
        }
    }

    type Output = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Vec<u8>);

    fn run(r: &Requant4) -> Result<Output, CheckpointError> {
        let mut packed = vec![0u8; r.packed_len()];
        let s = r.quantize_into(&mut packed)?;
        Ok((packed, s.absmax, s.nested_absmax, s.state))
    }

    /// Every weight of the 4-bit fixtures (FP4 in float16, NF4 with double quantization in
    /// bfloat16), merged and re-quantized by bands of 1, 3 and 7 rows (the last band short),
    /// gives the bytes of the whole weight dequantized, merged and re-quantized; and a merge
    /// that makes values infinite is refused with the whole weight's count and first index.
    #[test]
    fn a_weight_requantized_by_bands_is_the_weight_requantized_whole() {
        let opts = MergeOptions::default();
        for case in ["fp4_f16", "nf4_nested_bf16"] {
            let base = fixture(case);
            let weights = Weight4::find_all(&base).ok().unwrap();
            let view = dequantized(&base, &weights, true).unwrap();
            for w in &weights {
                let shape = w.state.shape.clone();
                for blow_up in [false, true] {
                    let step = lora_step(shape[0], shape[1], blow_up);
                    let mut merged = view.get(&w.name).unwrap().bytes().unwrap().into_owned();
                    step.apply(&w.name, Dtype::F32, &shape, &mut merged, &opts, None)
                        .unwrap();
                    let whole = run(&requant(w, &base, &merged, None)).unwrap();
                    let stored = base.get(&w.name).unwrap().bytes().unwrap().into_owned();
                    assert!(whole.0 != stored, "{case} {}: the step moves it", w.name);
                    let expected = nonfinite(Dtype::F32, &merged);
                    assert_eq!(expected.is_some(), blow_up);
                    for rows in [1, 3, 7] {
                        let steps = [step.clone()];
                        let bands = Bands::of((&w.name, &shape), Some(rows), &steps, (&opts, true));
                        let r = requant(w, &base, &merged, bands.unwrap());
                        assert!(r.bands.is_some());
                        match expected {
                            None => assert!(run(&r).unwrap() == whole, "{case} {} {rows}", w.name),
                            Some(e) => assert_eq!(refused(run(&r).unwrap_err()), e),
                        }
                    }
                }
            }
        }
    }
}
