//! A bitsandbytes weight written dequantized (`--dequantize`), streamed from its stored codes
//! to the output a chunk of rows at a time: each band of rows dequantized, encoded in the
//! model dtype where it goes in the output and merged there ([`Bands::merge_into`]), each chunk
//! written once (about [`OutputRegion::write_size`] bytes). No buffer holds the weight, and no
//! tensor-sized write copies into fresh page-cache pages, which cost this merge most of its
//! time (docs/architecture.md, "Re-quantized weights": "Dequantized, streamed").

use std::ops::Range;

use peftkit_checkpoint::{CheckpointError, Dtype, OutputRegion, StateDict, StreamedTensor, Tensor};
use rayon::prelude::*;

use super::banded::{BandSource, Bands, Dequantize, NonFinite};
use crate::kernels::{element_size, MergeOptions};
use crate::plan::MergePlan;

/// One quantized weight of a dequantized merge: its name, shape, rows per band (`None`: its
/// format cannot be cut in bands) and stored tensors.
pub(super) type Dequantized<W> = (String, Vec<usize>, Option<usize>, W);

/// `state` (a dequantized merge's output) with each weight of `weights` that `plan` merges by
/// plain Linear LoRA steps streamed band by band; the others as they are (merged whole).
/// `opts` and `check` (refuse new NaN/Inf) are the merge's.
pub(super) fn stream_dequantized<W: BandSource + 'static>(
    mut state: StateDict,
    weights: impl Iterator<Item = Dequantized<W>>,
    plan: &MergePlan,
    (opts, check): (&MergeOptions, bool),
) -> Result<StateDict, CheckpointError> {
    for (name, shape, rows, weight) in weights {
        let (Some(steps), Some(whole)) = (plan.steps.get(&name), state.get(&name)) else {
            continue;
        };
        let Some(bands) = Bands::of((&name, &shape), rows, steps, (opts, check))? else {
            continue;
        };
        let tensor = Streamed::tensor(&name, weight, whole.clone(), bands)?;
        state.insert(name, tensor);
    }
    Ok(state)
}

/// A merged weight of a dequantized bitsandbytes base, streamed where the writer lets it.
pub(super) struct Streamed<W> {
    pub name: String,
    /// The stored weight.
    pub weight: W,
    /// `(rows, cols)`.
    pub shape: (usize, usize),
    /// The dequantized view's dtype, which the output keeps.
    pub dtype: Dtype,
    pub bands: Bands,
    /// The same tensor merged whole (the dequantized view edited by the plan's steps), for
    /// readers other than the writer.
    pub whole: Tensor,
}

impl<W: BandSource + 'static> Streamed<W> {
    /// `whole` (the weight `name` of the merged view) as a tensor streamed by `bands`.
    pub fn tensor(
        name: &str,
        weight: W,
        whole: Tensor,
        bands: Bands,
    ) -> Result<Tensor, CheckpointError> {
        let (dtype, shape) = (whole.dtype(), whole.shape().to_vec());
        let streamed = Streamed {
            name: name.to_owned(),
            weight,
            shape: (shape[0], shape[1]),
            dtype,
            bands,
            whole,
        };
        Tensor::streamed(dtype, shape, streamed)
    }
}

impl<W: BandSource> Streamed<W> {
    /// Rows `rows` merged into the output bytes `piece`, band by band.
    fn chunk(
        &self,
        rows: Range<usize>,
        piece: &mut [u8],
        read: &Dequantize<'_>,
    ) -> Result<Vec<NonFinite>, CheckpointError> {
        let row_bytes = piece.len() / rows.len().max(1);
        let (start, per) = (rows.start, self.bands.rows);
        let bands = rows
            .clone()
            .step_by(per)
            .map(|r| r..(r + per).min(rows.end));
        let at = (&*self.name, self.shape.1);
        bands
            .map(|band| {
                let bytes =
                    &mut piece[(band.start - start) * row_bytes..(band.end - start) * row_bytes];
                self.bands
                    .merge_into((at.0, at.1, band), (self.dtype, bytes), read)
            })
            .collect()
    }
}

impl<W: BandSource> StreamedTensor for Streamed<W> {
    fn bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        Ok(self.whole.bytes()?.into_owned())
    }

    fn write_in_file(&self, out: &OutputRegion<'_>) -> Result<bool, CheckpointError> {
        let (rows, cols) = self.shape;
        let size = element_size(self.dtype).map_err(|e| CheckpointError::TensorCompute {
            tensor: self.name.clone(),
            context: "streaming a dequantized weight".into(),
            source: Box::new(e),
        })?;
        if out.len() != rows * cols * size {
            return Ok(false);
        }
        // Through the page cache block by block where the save allows it, around it otherwise.
        let blocks = out.in_blocks();
        let out = blocks.as_ref().unwrap_or(out);
        let read = self.weight.rows_in(self.dtype)?;
        let per = (out.write_size() / (cols * size)).max(1);
        let found = out.write_behind(|writes| {
            (0..rows.div_ceil(per))
                .into_par_iter()
                .map(|i| {
                    let r = i * per..((i + 1) * per).min(rows);
                    let at = r.start * cols * size;
                    let (mut buf, range) = writes.buffer(at, r.len() * cols * size);
                    let found = self.chunk(r, &mut buf[range.clone()], &*read)?;
                    writes.write(at, buf, range)?;
                    Ok(found)
                })
                .collect::<Result<Vec<Vec<NonFinite>>, CheckpointError>>()
        })?;
        let found: Vec<NonFinite> = found.into_iter().flatten().collect();
        self.bands.check(&self.name, &found)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use peftkit_checkpoint::{nonfinite, save_pretrained, Checkpoint, SaveOptions};

    use super::super::banded::tests::{lora_step, refused};
    use super::super::int8::Int8Merge;
    use super::super::view::dequantized;
    use super::super::weight::Weight4;
    use super::super::weight8::Weight8;
    use super::*;

    /// The bytes of tensor `name` of `whole` written by a save of `state`, unsynced and
    /// synced (through the page cache, and around it), or the save's error.
    fn written(state: &StateDict, name: &str) -> Vec<Result<Vec<u8>, CheckpointError>> {
        [false, true]
            .into_iter()
            .map(|durable| {
                let dir = tempfile::tempdir().unwrap();
                let out = dir.path().join("out");
                save_pretrained(&out, state, &SaveOptions::default().durable(durable))?;
                let ckpt = Checkpoint::open(&out).unwrap();
                Ok(ckpt.get(name).unwrap().bytes().unwrap().into_owned())
            })
            .collect()
    }

    /// Streams weight `name` of the dequantized `view` by bands of 1, 3 and 7 rows and holds
    /// what is written to the view's bytes merged whole by a LoRA step (one that turns half
    /// the rows infinite too: then the save is refused with the whole weight's count and first
    /// index).
    fn check_streams<W: BandSource + Clone + 'static>(view: &Checkpoint, name: &str, weight: &W) {
        let opts = MergeOptions::default();
        let base = view.get(name).unwrap();
        let (dtype, shape) = (base.dtype(), base.shape().to_vec());
        for blow_up in [false, true] {
            let step = lora_step(shape[0], shape[1], blow_up);
            let mut merged = base.bytes().unwrap().into_owned();
            step.apply(name, dtype, &shape, &mut merged, &opts, None)
                .unwrap();
            let expected = nonfinite(dtype, &merged);
            assert_eq!(expected.is_some(), blow_up, "{name}");
            let whole = Tensor::from_bytes(dtype, shape.clone(), merged.clone()).unwrap();
            for rows in [1, 3, 7] {
                let steps = [step.clone()];
                let bands = Bands::of((name, &shape), Some(rows), &steps, (&opts, true));
                let bands = bands.unwrap().unwrap();
                let t = Streamed::tensor(name, weight.clone(), whole.clone(), bands).unwrap();
                let mut state = StateDict::new();
                state.insert(name.to_owned(), t);
                for got in written(&state, name) {
                    match expected {
                        None => assert!(got.unwrap() == merged, "{name} {rows}"),
                        Some(e) => assert_eq!(refused(got.unwrap_err()), e, "{name}"),
                    }
                }
            }
        }
    }

    /// Every weight of the 4-bit fixtures (float16 and bfloat16 views): a chunk of several
    /// bands.
    #[test]
    fn a_4bit_weight_streamed_dequantized_is_the_weight_merged_whole() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bnb");
        for case in ["fp4_f16", "nf4_nested_bf16"] {
            let base = Checkpoint::open(&root.join(case).join("base4")).unwrap();
            let weights = Weight4::find_all(&base).ok().unwrap();
            let view = dequantized(&base, &weights, false).unwrap();
            for w in &weights {
                check_streams(&view, &w.name, w);
            }
        }
    }

    /// The QLoRA round trip of every weight of the 4-bit fixtures' 16-bit base and of a
    /// 1536 x 1024 bfloat16 weight (several chunks), NF4 and FP4, with and without double
    /// quantization (whose block maxima are taken over the whole weight first).
    #[test]
    fn a_qlora_weight_streamed_is_the_weight_round_tripped_whole() {
        use super::super::qlora::QloraRows;
        use super::super::view::round_tripped;
        use super::super::QloraBase;
        use crate::kernels::Bnb4Type;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bnb");
        let fixture = Checkpoint::open(&root.join("nf4_nested_bf16/base16")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateDict::new();
        let values: Vec<u8> = (0..1536 * 1024usize)
            .flat_map(|i| {
                half::bf16::from_f32(((i * 37 % 251) as f32 - 125.0) / 64.0).to_le_bytes()
            })
            .collect();
        let t = Tensor::from_bytes(Dtype::BF16, vec![1536, 1024], values).unwrap();
        state.insert("big.weight".into(), t);
        save_pretrained(dir.path(), &state, &SaveOptions::default().durable(false)).unwrap();
        let big = Checkpoint::open(dir.path()).unwrap();
        for base in [&fixture, &big] {
            let names: Vec<String> = base
                .tensors()
                .filter(|(n, t)| n.ends_with("proj.weight") || t.numel() == 1536 * 1024)
                .map(|(n, _)| n.to_owned())
                .collect();
            let mut steps = indexmap::IndexMap::new();
            for name in &names {
                let shape = base.get(name).unwrap().shape();
                steps.insert(name.clone(), vec![lora_step(shape[0], shape[1], false)]);
            }
            let plan = MergePlan {
                steps,
                added: indexmap::IndexMap::new(),
                untie: false,
            };
            for kind in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
                for double_quant in [false, true] {
                    let q = QloraBase { kind, double_quant };
                    let view = round_tripped(base.clone(), &plan, q).unwrap();
                    for name in &names {
                        let (rows, _) = QloraRows::new(name, base.get(name).unwrap(), q).unwrap();
                        check_streams(&view, name, &rows);
                    }
                }
            }
        }
    }

    /// An int8 weight of 1536 x 1024 in bfloat16 (3 MiB): several chunks of output, through
    /// the page cache and around it.
    #[test]
    fn an_int8_weight_streamed_dequantized_is_the_weight_merged_whole() {
        let (rows, cols) = (1536, 1024);
        let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 251) as u8).collect();
        let scb: Vec<u8> = (0..rows)
            .flat_map(|r| (0.5f32 + (r % 13) as f32).to_le_bytes())
            .collect();
        let mut state = StateDict::new();
        let w = Tensor::from_bytes(Dtype::I8, vec![rows, cols], codes).unwrap();
        state.insert("m.weight".into(), w);
        let s = Tensor::from_bytes(Dtype::F32, vec![rows], scb).unwrap();
        state.insert("m.SCB".into(), s);
        let dir = tempfile::tempdir().unwrap();
        save_pretrained(dir.path(), &state, &SaveOptions::default().durable(false)).unwrap();
        let base = Checkpoint::open(dir.path()).unwrap();
        let weights = Weight8::find_all(&base).ok().unwrap();
        let view = Int8Merge::new(weights.clone(), Some(Dtype::BF16), true)
            .view(&base)
            .unwrap();
        check_streams(&view, "m.weight", &weights[0]);
    }
}
