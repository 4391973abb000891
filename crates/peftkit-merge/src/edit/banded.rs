//! Steps run on bands of rows: [`RowBanded`], and the streamed merge of a weight whose steps
//! all are (a DoRA among them; plain LoRA chains take the fused kernel's stream), and of a lone
//! DoRA whose norm runs over columns (two passes of bands: [`stream_column_dora`]).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use peftkit_checkpoint::{nonfinite, CheckpointError, Dtype};

use super::{Edit, LoraKind, LoraPair, Site, Step};
use crate::kernels::{
    dora, lora, stream_blocks, BaseTensorMut, F32Tensor, FiniteProbe, MergeMathError,
    MergeOptions as KernelOptions, StreamedBase, STREAM_BLOCK_BYTES,
};

/// A step that runs on bands of rows of a 2-D weight, its factors decoded once: a LoRA, or a
/// DoRA, on a Linear. `Δ` rows depend only on the same rows of `lora_B`, the rank's reduction
/// order only on the rank, and DoRA's norm of an output channel only on that channel's row, so
/// a band's result is the whole weight's on those rows. The FP8 merges and the streamed
/// merges of DoRA run it band by band, so that a weight is never whole in memory.
pub(crate) struct RowBanded {
    adapter: Arc<Path>,
    a: (Vec<f32>, Vec<usize>),
    b: Vec<f32>,
    /// DoRA's `lora_magnitude_vector`, one value per row; `None` for a plain LoRA.
    magnitude: Option<Vec<f32>>,
    rank: usize,
    scale: f32,
    opts: KernelOptions,
}

impl Step {
    /// This step on weight `name` of `shape` as a [`RowBanded`] one, if it is one, its factors
    /// decoded; `None` for any other edit, for factors that do not fit the weight (the
    /// whole-tensor path refuses them with the kernel's error), and under `safe_merge`, whose
    /// refusal counts the whole weight's non-finite values.
    pub(crate) fn row_banded(
        &self,
        name: &str,
        shape: &[usize],
        opts: &KernelOptions,
    ) -> Result<Option<RowBanded>, CheckpointError> {
        let Edit::Lora {
            module,
            kind: LoraKind::Linear {
                fan_in_fan_out: false,
            },
            scale,
            dora,
            round_first,
        } = &self.edit
        else {
            return Ok(None);
        };
        let (Some(ta), Some(tb)) = (module.get("a"), module.get("b")) else {
            return Ok(None);
        };
        let (&[rank, ac], &[br, rb], &[rows, cols]) = (ta.shape(), tb.shape(), shape) else {
            return Ok(None);
        };
        let magnitude = module.get("magnitude").filter(|_| *dora);
        let fits = magnitude.is_some_and(|m| m.numel() == rows) || !*dora;
        if rank != rb || br != rows || ac != cols || !fits || opts.safe_merge {
            return Ok(None);
        }
        let site = Site {
            name,
            adapter: &self.adapter,
        };
        let magnitude = magnitude.map(|m| site.f32s("lora_magnitude_vector", m));
        Ok(Some(RowBanded {
            adapter: self.adapter.clone(),
            a: (site.f32s("lora_A", ta)?, ta.shape().to_vec()),
            b: site.f32s("lora_B", tb)?,
            magnitude: magnitude.transpose()?,
            rank,
            scale: *scale,
            opts: KernelOptions {
                round_delta_first: opts.round_delta_first || *round_first,
                ..*opts
            },
        }))
    }
}

impl RowBanded {
    /// Every step of `steps` on weight `name` of `shape` as a [`RowBanded`] one
    /// ([`Step::row_banded`]), or `None` when one is not.
    pub(crate) fn all(
        steps: &[Step],
        name: &str,
        shape: &[usize],
        opts: &KernelOptions,
    ) -> Result<Option<Vec<RowBanded>>, CheckpointError> {
        let mut banded = Vec::with_capacity(steps.len());
        for step in steps {
            match step.row_banded(name, shape, opts)? {
                Some(b) => banded.push(b),
                None => return Ok(None),
            }
        }
        Ok(Some(banded))
    }

    /// Applies the step to `data`, rows `rows` of the 2-D weight `name` (`dtype`, `cols`
    /// columns). A kernel that checks what it writes tells `probe` (see [`Step::apply`]).
    pub(crate) fn apply(
        &self,
        name: &str,
        dtype: Dtype,
        (rows, cols): (Range<usize>, usize),
        data: &mut [u8],
        probe: Option<&FiniteProbe>,
    ) -> Result<(), CheckpointError> {
        let site = Site {
            name,
            adapter: &self.adapter,
        };
        let short = || site.missing("lora_B has fewer rows than the weight");
        let b = self
            .b
            .get(rows.start * self.rank..rows.end * self.rank)
            .ok_or_else(short)?;
        let shape = [rows.len(), cols];
        let base = BaseTensorMut::new(dtype, &shape, data);
        let base = match probe {
            Some(p) => base.with_probe(p),
            None => base,
        };
        let a = F32Tensor::new(&self.a.1, &self.a.0);
        let b_shape = [rows.len(), self.rank];
        let b = F32Tensor::new(&b_shape, b);
        let done = match &self.magnitude {
            Some(m) => {
                let m = m.get(rows.clone()).ok_or_else(short)?;
                let m_shape = [m.len()];
                let m = F32Tensor::new(&m_shape, m);
                dora::merge_dora_linear(base, a, b, m, self.scale, false, &self.opts)
            }
            None => lora::merge_linear(base, a, b, self.scale, false, &self.opts),
        };
        done.map_err(|e| site.math(e))
    }
}

/// Streams `steps` on base tensor `name` through `base.io` in blocks of whole rows (about
/// 1 MiB), when every step runs by bands ([`Step::row_banded`]): each block is read, gets every
/// step and is written back while in cache, as the fused kernel streams plain LoRA chains.
/// `Ok(None)`, having read and written nothing, otherwise; else whether every merged value is
/// finite (when `base.check`).
pub(super) fn stream_banded(
    steps: &[Step],
    name: &str,
    base: StreamedBase<'_>,
    opts: &KernelOptions,
) -> Result<Option<bool>, CheckpointError> {
    let (&[rows, cols], Some(last)) = (base.shape, steps.last()) else {
        return Ok(None);
    };
    let row_bytes = cols * (base.dtype.bitsize() / 8);
    if row_bytes == 0 || base.len != rows * row_bytes {
        return Ok(None);
    }
    let Some(banded) = RowBanded::all(steps, name, base.shape, opts)? else {
        return Ok(None);
    };
    // Multiples of 8 rows keep the kernels' row tiles whole.
    let block = (STREAM_BLOCK_BYTES / row_bytes).max(1).div_ceil(8) * 8 * row_bytes;
    let site = Site {
        name,
        adapter: &last.adapter,
    };
    let unread = || {
        site.math(MergeMathError::BaseUnread {
            what: "linear weight",
        })
    };
    let finite = stream_blocks(base.io, (base.len, block), unread, |at, bytes| {
        let first = at / row_bytes;
        let band = (first..first + bytes.len() / row_bytes, cols);
        let probe = FiniteProbe::default();
        for step in &banded {
            probe.reset();
            step.apply(
                name,
                base.dtype,
                band.clone(),
                bytes,
                base.check.then_some(&probe),
            )?;
        }
        // Both kernels test what they write (`probe`); should one not, the block is tested
        // here, in cache.
        Ok(!base.check || probe.all_finite() || nonfinite(base.dtype, bytes).is_none())
    })?;
    Ok(Some(finite))
}

/// Streams a lone DoRA step whose norm runs over columns (an Embedding, a `Conv1D`) through
/// `base.io` in two passes (see [`dora::stream_dora_columns`]): such a step cannot run by
/// bands. `Ok(None)`, having read and written nothing, for anything else.
pub(super) fn stream_column_dora(
    steps: &[Step],
    name: &str,
    base: StreamedBase<'_>,
    opts: &KernelOptions,
) -> Result<Option<bool>, CheckpointError> {
    let [step] = steps else {
        return Ok(None);
    };
    let Edit::Lora {
        module,
        kind,
        scale,
        dora: true,
        ..
    } = &step.edit
    else {
        return Ok(None);
    };
    let Some(magnitude) = module.get("magnitude") else {
        return Ok(None);
    };
    let site = Site {
        name,
        adapter: &step.adapter,
    };
    let pair = LoraPair::read(&site, module, *kind)?;
    let (a, b) = pair.tensors();
    let m = site.f32s("lora_magnitude_vector", magnitude)?;
    let m = F32Tensor::new(magnitude.shape(), &m);
    dora::stream_dora_columns(base, (a, b, m), *scale, *kind, opts).map_err(|e| site.math(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::ModuleTensors;
    use crate::kernels::{encode_f32, MemoryBlocks};
    use peftkit_checkpoint::Tensor;

    fn values(n: usize, k: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * k) % 251) as f32 / 251.0 - 0.5)
            .collect()
    }

    fn f32_tensor(shape: Vec<usize>, vals: &[f32]) -> Tensor {
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_bytes(Dtype::F32, shape, bytes).unwrap()
    }

    /// A LoRA step of rank 8 on a `rows x cols` Linear; a DoRA one with `magnitude`.
    fn step(rows: usize, cols: usize, seed: usize, magnitude: Option<&[f32]>) -> Step {
        let a = f32_tensor(vec![8, cols], &values(8 * cols, 13 + seed));
        let b = f32_tensor(vec![rows, 8], &values(rows * 8, 29 + seed));
        let m = magnitude.map(|m| f32_tensor(vec![m.len()], m));
        let mut roles = vec![("a", &a), ("b", &b)];
        if let Some(m) = &m {
            roles.push(("magnitude", m));
        }
        Step {
            adapter: Path::new("adapter").into(),
            edit: Edit::Lora {
                module: ModuleTensors::from_roles(roles),
                kind: LoraKind::Linear {
                    fan_in_fan_out: false,
                },
                scale: 2.0,
                dora: magnitude.is_some(),
                round_first: false,
            },
        }
    }

    /// `steps` applied to the whole weight in turn.
    fn whole(steps: &[Step], dtype: Dtype, shape: &[usize], base: &[u8]) -> Vec<u8> {
        let mut data = base.to_vec();
        for s in steps {
            let opts = KernelOptions::default();
            s.apply("w", dtype, shape, &mut data, &opts, None).unwrap();
        }
        data
    }

    #[test]
    fn dora_bands_of_any_height_give_the_whole_weight_s_bits() {
        let (rows, cols) = (23, 40);
        let m: Vec<f32> = values(rows, 3).iter().map(|v| v + 2.0).collect();
        let dora = step(rows, cols, 0, Some(&m));
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let base = encode_f32("w", dtype, &values(rows * cols, 7)).unwrap();
            let want = whole(std::slice::from_ref(&dora), dtype, &[rows, cols], &base);
            assert!(want != base);
            let opts = KernelOptions::default();
            let banded = dora.row_banded("w", &[rows, cols], &opts).unwrap().unwrap();
            let row_bytes = cols * dtype.bitsize() / 8;
            for height in [1, 3, 7] {
                let mut got = base.clone();
                for (i, band) in got.chunks_mut(height * row_bytes).enumerate() {
                    let first = i * height;
                    let band_rows = first..first + band.len() / row_bytes;
                    banded
                        .apply("w", dtype, (band_rows, cols), band, None)
                        .unwrap();
                }
                assert!(got == want, "{dtype:?} in bands of {height}");
            }
        }
    }

    #[test]
    fn a_dora_chain_streams_to_the_bits_of_the_whole_weight() {
        // 2 KiB rows of BF16: blocks of 512 rows, the last of 76.
        let (rows, cols) = (1100, 1024);
        let mut m: Vec<f32> = values(rows, 3).iter().map(|v| v + 2.0).collect();
        let steps = [step(rows, cols, 0, Some(&m)), step(rows, cols, 5, None)];
        let dtype = Dtype::BF16;
        let base = encode_f32("w", dtype, &values(rows * cols, 7)).unwrap();
        let shape = [rows, cols];
        let stream = |steps: &[Step], check: bool| {
            let io = MemoryBlocks::new(&base);
            let streamed = StreamedBase {
                dtype,
                shape: &shape,
                len: base.len(),
                io: &io,
                check,
            };
            let opts = KernelOptions::default();
            let finite = stream_banded(steps, "w", streamed, &opts).unwrap();
            (finite, io.written())
        };
        let want = whole(&steps, dtype, &shape, &base);
        assert_eq!(stream(&steps, true), (Some(true), want));
        // An infinite magnitude one row deep in the third block is found.
        m[1090] = f32::INFINITY;
        let steps = [step(rows, cols, 0, Some(&m)), step(rows, cols, 5, None)];
        let want = whole(&steps, dtype, &shape, &base);
        assert_eq!(stream(&steps, true), (Some(false), want.clone()));
        assert_eq!(stream(&steps, false), (Some(true), want));
        // So it is when the DoRA is the last step, whose kernel tests what it writes.
        let dora = &steps[..1];
        let want = whole(dora, dtype, &shape, &base);
        assert_eq!(stream(dora, true), (Some(false), want));
    }

    #[test]
    fn what_bands_cannot_reproduce_does_not_run_by_bands() {
        let (rows, cols) = (6, 8);
        let m = vec![1.0f32; rows];
        let dora = step(rows, cols, 0, Some(&m));
        let shape = [rows, cols];
        let safe = KernelOptions {
            safe_merge: true,
            ..KernelOptions::default()
        };
        // safe_merge's refusal counts the whole weight's non-finite values.
        assert!(dora.row_banded("w", &shape, &safe).unwrap().is_none());
        let plain = step(rows, cols, 0, None);
        assert!(plain.row_banded("w", &shape, &safe).unwrap().is_none());
        // A magnitude of another length is the whole path's error to report.
        let short = step(rows, cols, 0, Some(&m[1..]));
        let opts = KernelOptions::default();
        assert!(short.row_banded("w", &shape, &opts).unwrap().is_none());
        // A Conv1D (fan_in_fan_out) DoRA takes its norm over columns.
        let mut conv1d = dora.clone();
        if let Edit::Lora { kind, .. } = &mut conv1d.edit {
            *kind = LoraKind::Linear {
                fan_in_fan_out: true,
            };
        }
        assert!(conv1d.row_banded("w", &shape, &opts).unwrap().is_none());
        assert!(dora.row_banded("w", &shape, &opts).unwrap().is_some());
        // A stream of a step that does not run by bands reads and writes nothing.
        let base = encode_f32("w", Dtype::BF16, &values(rows * cols, 7)).unwrap();
        let io = MemoryBlocks::new(&base);
        let streamed = StreamedBase {
            dtype: Dtype::BF16,
            shape: &shape,
            len: base.len(),
            io: &io,
            check: true,
        };
        let none = stream_banded(&[dora, conv1d], "w", streamed, &opts).unwrap();
        assert_eq!(none, None);
        assert!(io.written().iter().all(|&b| b == 0x5A));
    }

    /// A DoRA whose norm runs over columns streams in two passes to the bits of the whole
    /// weight merged in memory: an Embedding and a `Conv1D`, over several blocks, and an
    /// infinite magnitude found; under `safe_merge` it reads and writes nothing.
    #[test]
    fn a_column_dora_streams_to_the_bits_of_the_whole_weight() {
        // BF16 rows of 2 KiB: 512 rows a block, three blocks.
        let (rows, cols, r) = (1100, 1024, 8);
        let dtype = Dtype::BF16;
        let base = encode_f32("w", dtype, &values(rows * cols, 7)).unwrap();
        let shape = [rows, cols];
        let step = |kind: LoraKind, m: &[f32]| {
            // Embedding: A (r, vocab), B (dim, r); Conv1D (in, out): A (r, in), B (out, r).
            let (ta, tb) = match kind {
                LoraKind::Embedding => (
                    f32_tensor(vec![r, rows], &values(r * rows, 13)),
                    f32_tensor(vec![cols, r], &values(cols * r, 29)),
                ),
                _ => (
                    f32_tensor(vec![r, rows], &values(r * rows, 17)),
                    f32_tensor(vec![cols, r], &values(cols * r, 31)),
                ),
            };
            let tm = f32_tensor(vec![cols], m);
            let roles = match kind {
                LoraKind::Embedding => [("embedding_a", &ta), ("embedding_b", &tb)],
                _ => [("a", &ta), ("b", &tb)],
            };
            let mut roles = roles.to_vec();
            roles.push(("magnitude", &tm));
            Step {
                adapter: Path::new("adapter").into(),
                edit: Edit::Lora {
                    module: ModuleTensors::from_roles(roles),
                    kind,
                    scale: 2.0,
                    dora: true,
                    round_first: false,
                },
            }
        };
        let stream = |steps: &[Step], opts: &KernelOptions| {
            let io = MemoryBlocks::new(&base);
            let streamed = StreamedBase {
                dtype,
                shape: &shape,
                len: base.len(),
                io: &io,
                check: true,
            };
            let finite = stream_column_dora(steps, "w", streamed, opts).unwrap();
            (finite, io.written())
        };
        let opts = KernelOptions::default();
        let mut m: Vec<f32> = values(cols, 3).iter().map(|v| v + 40.0).collect();
        for kind in [
            LoraKind::Embedding,
            LoraKind::Linear {
                fan_in_fan_out: true,
            },
        ] {
            let steps = [step(kind, &m)];
            let want = whole(&steps, dtype, &shape, &base);
            assert!(want != base);
            assert_eq!(stream(&steps, &opts), (Some(true), want), "{kind:?}");
        }
        m[1000] = f32::INFINITY;
        let steps = [step(LoraKind::Embedding, &m)];
        let want = whole(&steps, dtype, &shape, &base);
        assert_eq!(stream(&steps, &opts), (Some(false), want));
        let safe = KernelOptions {
            safe_merge: true,
            ..KernelOptions::default()
        };
        let (none, written) = stream(&steps, &safe);
        assert_eq!(none, None);
        assert!(written.iter().all(|&b| b == 0x5A));
    }
}
