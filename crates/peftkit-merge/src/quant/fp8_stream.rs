//! An FP8 weight streamed from the base file to the output file, a chunk of whole block rows
//! at a time, as plain LoRA merges stream (`file_io`).
//!
//! For each chunk (about [`OutputRegion::write_size`] bytes of output): `pread` its e4m3 rows,
//! dequantize them into a band buffer in the model dtype, merge the adapters' rows there
//! ([`RowBanded`]: a plain Linear LoRA's rows are independent), and either write that band
//! (`--dequantize`) or re-quantize it over the e4m3 rows and write those (format kept), its new
//! scales kept for the scale tensor (`joint`). Every byte is computed in cache and copied once
//! into the output; no buffer holds a whole weight. The writes go through
//! [`OutputRegion::write_behind`]: in a synced save a thread of their own makes them while the
//! next chunks are computed (docs/architecture.md, "The FP8 merge").

use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;

use peftkit_checkpoint::{
    CheckpointError, OutputRegion, SourceRegion, StreamedTensor, WriteBehind,
};
use rayon::prelude::*;

use super::fp8_weight::{Banded, Fp8Weight, Requant};
use crate::edit::RowBanded;
use crate::kernels::{
    dequantize_fp8_into, element_size, nan_max, requantize_fp8_chunk, with_kept, Fp8Chunk, Fp8Grid,
};

/// One weight's stream: its merge steps, scales, source and output, and its chunking.
pub(super) struct Stream<'a> {
    w: &'a Fp8Weight,
    steps: Vec<RowBanded>,
    scales: Vec<f32>,
    source: SourceRegion<'a>,
    out: &'a OutputRegion<'a>,
    /// Block rows per chunk: what one write takes.
    blocks: usize,
    /// Block rows per band: what is computed at a time (about [`BAND_BYTES`] in the model
    /// dtype, so that it stays in cache from dequantization to quantization).
    band: usize,
}

/// Bytes of a band in the model dtype.
const BAND_BYTES: usize = 1 << 20;

thread_local! {
    /// This thread's e4m3 rows of a chunk read for `--dequantize` (see `kernels::with_kept`);
    /// the output of a chunk is computed in a buffer of its writes ([`WriteBehind::buffer`]).
    static FP8: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl<'a> Stream<'a> {
    /// The stream of `w` from `source` to `out`, which gets `written` bytes per element, or
    /// `None` when it cannot stream: a weight with leading dimensions, or a step that is not a
    /// plain Linear LoRA.
    pub(super) fn new(
        w: &'a Fp8Weight,
        (source, out): (SourceRegion<'a>, &'a OutputRegion<'a>),
        written: usize,
    ) -> Result<Option<Self>, CheckpointError> {
        let Some(steps) = w.row_banded()? else {
            return Ok(None);
        };
        let row = w.grid.block().0 * w.grid.cols;
        let size = element_size(w.dtype).map_err(|e| w.math(e))?;
        let blocks = (out.write_size() / (row * written).max(1)).max(1);
        let band = (BAND_BYTES / (row * size).max(1)).clamp(1, blocks);
        Ok(Some(Stream {
            w,
            steps,
            scales: w.scales()?,
            source,
            out,
            blocks,
            band,
        }))
    }

    /// Runs `chunk` on every chunk of block rows, in parallel, with the region's writes (made
    /// behind the computation in a synced save); returns the results in row order.
    fn run<T: Send>(
        &self,
        chunk: impl Fn(&Self, Range<usize>, &WriteBehind<'_, '_>) -> Result<T, CheckpointError> + Sync,
    ) -> Result<Vec<T>, CheckpointError> {
        let n = self.w.grid.grid_rows;
        let chunks = n.div_ceil(self.blocks);
        self.out.write_behind(|writes| {
            (0..chunks)
                .into_par_iter()
                .map(|i| {
                    chunk(
                        self,
                        i * self.blocks..((i + 1) * self.blocks).min(n),
                        writes,
                    )
                })
                .collect()
        })
    }

    /// The grid, rows and scales of block rows `blocks`.
    fn chunk(&self, blocks: Range<usize>) -> (Fp8Grid, Range<usize>, &[f32]) {
        let grid = self.w.grid.block_rows(blocks.clone());
        let (bm, gc) = (self.w.grid.block().0, grid.grid_cols);
        let scales = &self.scales[blocks.start * gc..blocks.end * gc];
        (grid, blocks.start * bm..blocks.end * bm, scales)
    }

    /// The bands of chunk `blocks`: block rows, and their element range in the chunk.
    fn bands(
        &self,
        blocks: Range<usize>,
    ) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + use<> {
        let (first, last, band) = (blocks.start, blocks.end, self.band);
        let per_block = self.w.grid.block().0 * self.w.grid.cols;
        blocks.step_by(band).map(move |b| {
            let end = (b + band).min(last);
            (b..end, (b - first) * per_block..(end - first) * per_block)
        })
    }

    /// `--dequantize`: every chunk dequantized, merged and written in the model dtype.
    pub(super) fn dequantize(&self) -> Result<(), CheckpointError> {
        self.run(|me, blocks, writes| {
            with_kept(&FP8, |fp8| me.dequantize_chunk(blocks, fp8, writes))
        })
        .map(drop)
    }

    fn dequantize_chunk(
        &self,
        blocks: Range<usize>,
        fp8: &mut Vec<u8>,
        writes: &WriteBehind<'_, '_>,
    ) -> Result<(), CheckpointError> {
        let (grid, rows, _) = self.chunk(blocks.clone());
        let (w, cols) = (self.w, grid.cols);
        let size = element_size(w.dtype).map_err(|e| w.math(e))?;
        if fp8.len() < grid.numel() {
            fp8.resize(grid.numel(), 0);
        }
        let fp8 = &mut fp8[..grid.numel()];
        self.source.read_at(rows.start * cols, fp8)?;
        let at = rows.start * cols * size;
        let (mut buf, range) = writes.buffer(at, grid.numel() * size);
        let chunk = &mut buf[range.clone()];
        for (blocks, elems) in self.bands(blocks) {
            let (grid, rows, scales) = self.chunk(blocks);
            let band = &mut chunk[elems.start * size..elems.end * size];
            let fp8 = &fp8[elems];
            dequantize_fp8_into(fp8, scales, &grid, w.dtype, band).map_err(|e| w.math(e))?;
            w.merge_rows(&self.steps, rows, band)?;
        }
        writes.write(at, buf, range)
    }

    /// Format kept: every chunk dequantized, merged, re-quantized as `requant` says and
    /// written; returns the new inverse scales and the largest re-quantization error.
    pub(super) fn requantize(&self, requant: Requant) -> Result<(Vec<f32>, f64), CheckpointError> {
        let chunks = self.run(|me, blocks, writes| me.requantize_chunk(requant, blocks, writes))?;
        let mut inv = Vec::with_capacity(self.w.grid.scales());
        let mut error = 0.0;
        for (chunk_inv, chunk_error) in chunks {
            inv.extend_from_slice(&chunk_inv);
            error = nan_max(error, chunk_error);
        }
        Ok((inv, error))
    }

    fn requantize_chunk(
        &self,
        requant: Requant,
        blocks: Range<usize>,
        writes: &WriteBehind<'_, '_>,
    ) -> Result<(Vec<f32>, f64), CheckpointError> {
        let (grid, rows, _) = self.chunk(blocks.clone());
        let w = self.w;
        let at = rows.start * grid.cols;
        let (mut buf, range) = writes.buffer(at, grid.numel());
        let q = &mut buf[range.clone()];
        self.source.read_at(at, q)?;
        let merge = |rows, band: &mut [u8]| -> Result<(), Banded> {
            Ok(w.merge_rows(&self.steps, rows, band)?)
        };
        let kinds = (w.dtype, requant.kind);
        let (mut inv, mut error) = (vec![0.0f32; grid.scales()], 0.0);
        let (gc, start) = (grid.grid_cols, blocks.start);
        for (blocks, elems) in self.bands(blocks) {
            let first = blocks.start - start;
            let (grid, rows, scales) = self.chunk(blocks);
            let band = Fp8Chunk {
                q: &mut q[elems],
                scales,
                inv: &mut inv[first * gc..(first + grid.grid_rows) * gc],
                grid,
                first_row: rows.start,
            };
            let e = requantize_fp8_chunk(band, kinds, &merge).map_err(|e| w.banded(e))?;
            error = nan_max(error, e);
        }
        writes.write(at, buf, range)?;
        Ok((inv, error))
    }
}

/// A weight written dequantized (`--dequantize`): streamed where the writer lets it.
pub(super) struct Dequantized(pub Arc<Fp8Weight>);

impl StreamedTensor for Dequantized {
    fn bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        self.0.merged()
    }

    fn write_in_file(&self, out: &OutputRegion<'_>) -> Result<bool, CheckpointError> {
        let Some((file, offset)) = self.0.weight.source_file() else {
            return Ok(false);
        };
        let source = SourceRegion::new(file, offset);
        let size = element_size(self.0.dtype).map_err(|e| self.0.math(e))?;
        match Stream::new(&self.0, (source, out), size)? {
            Some(stream) => stream.dequantize().map(|()| true),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::{Edit, LoraKind, ModuleTensors, Step};
    use crate::kernels::{MergeOptions as KernelOptions, ScaleKind};
    use crate::quant::joint::{main_tensor, part_tensor};
    use peftkit_checkpoint::{save_pretrained, Checkpoint, Dtype, SaveOptions, StateDict, Tensor};

    /// 1536 x 1024 in 128 x 128 blocks: 256 KiB of BF16 per block row, so that a streamed
    /// weight takes several chunks (1 MiB through the page cache, 2 MiB around it).
    const ROWS: usize = 1536;
    const COLS: usize = 1024;
    const GRID: [usize; 2] = [ROWS / 128, COLS / 128];

    fn f32_bytes(n: usize, k: u32) -> Vec<u8> {
        (0..n as u32)
            .flat_map(|i| (((i * k) % 97) as f32 / 97.0 - 0.5).to_le_bytes())
            .collect()
    }

    /// The base weight and its scales, file-backed, and a rank-4 LoRA step on them that moves
    /// every block maximum (so that every scale changes).
    fn base(dir: &std::path::Path) -> (Tensor, Tensor, Step) {
        let q: Vec<u8> = (0..ROWS * COLS)
            .map(|i| (i * 37 % 251) as u8 & 0xf7)
            .collect();
        let n = GRID[0] * GRID[1];
        let inv: Vec<u8> = (0..n)
            .flat_map(|i| (0.01f32 * (i % 7 + 1) as f32).to_le_bytes())
            .collect();
        let mut state = StateDict::new();
        let w = Tensor::from_bytes(Dtype::F8_E4M3, vec![ROWS, COLS], q).unwrap();
        state.insert("w".into(), w);
        let s = Tensor::from_bytes(Dtype::F32, GRID.to_vec(), inv).unwrap();
        state.insert("w_scale_inv".into(), s);
        save_pretrained(dir, &state, &SaveOptions::default().durable(false)).unwrap();
        let ckpt = Checkpoint::open(dir).unwrap();
        let r = 4;
        let a = Tensor::from_bytes(Dtype::F32, vec![r, COLS], f32_bytes(r * COLS, 13)).unwrap();
        let b = Tensor::from_bytes(Dtype::F32, vec![ROWS, r], f32_bytes(ROWS * r, 29)).unwrap();
        let step = Step {
            adapter: std::path::Path::new("adapter").into(),
            edit: Edit::Lora {
                module: ModuleTensors::from_roles([("a", &a), ("b", &b)]),
                kind: LoraKind::Linear {
                    fan_in_fan_out: false,
                },
                scale: 2.0,
                dora: false,
                round_first: false,
            },
        };
        let get = |n: &str| ckpt.get(n).unwrap().clone();
        (get("w"), get("w_scale_inv"), step)
    }

    fn weight(w: &Tensor, s: &Tensor, step: &Step, requant: Option<Requant>) -> Arc<Fp8Weight> {
        let grid = Fp8Grid::new(&[ROWS, COLS], &GRID).unwrap();
        Arc::new(Fp8Weight::new(
            "w",
            (w.clone(), s.clone(), grid),
            requant,
            Dtype::BF16,
            vec![step.clone()],
            KernelOptions::default(),
            Arc::default(),
        ))
    }

    /// Writes `state` (unsynced or synced) and reads its tensors back.
    fn written(dir: &std::path::Path, state: &StateDict, durable: bool) -> Vec<Vec<u8>> {
        let out = dir.join(format!("out-{durable}"));
        save_pretrained(&out, state, &SaveOptions::default().durable(durable)).unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        let bytes = |n: &str| ckpt.get(n).unwrap().bytes().unwrap().into_owned();
        state.keys().map(|n| bytes(n)).collect()
    }

    #[test]
    fn a_dequantized_weight_streamed_is_the_weight_merged_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (w, s, step) = base(&dir.path().join("base"));
        let weight = weight(&w, &s, &step, None);
        let whole = weight.merged().unwrap();
        let plain = Fp8Weight::new(
            "w",
            (w.clone(), s.clone(), weight.grid),
            None,
            Dtype::BF16,
            vec![],
            KernelOptions::default(),
            Arc::default(),
        );
        // Every row moved by the adapter.
        let unmerged = plain.merged().unwrap();
        let row = COLS * 2;
        assert!((0..ROWS).all(|r| whole[r * row..][..row] != unmerged[r * row..][..row]));
        let mut state = StateDict::new();
        let t = Tensor::streamed(Dtype::BF16, vec![ROWS, COLS], Dequantized(weight)).unwrap();
        state.insert("w".into(), t);
        for durable in [false, true] {
            assert!(
                written(dir.path(), &state, durable)[0] == whole,
                "durable {durable}"
            );
        }
    }

    #[test]
    fn a_requantized_weight_streamed_is_the_weight_requantized_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (w, s, step) = base(&dir.path().join("base"));
        let requant = Requant {
            kind: ScaleKind::F32,
            scale_dtype: Dtype::F32,
        };
        let weight = weight(&w, &s, &step, Some(requant));
        let mut whole = w.bytes().unwrap().into_owned();
        let inv = weight.requantize_whole_for_test(requant, &mut whole);
        assert!(whole != *w.bytes().unwrap());
        let mut state = StateDict::new();
        state.insert("w".into(), main_tensor(&weight));
        let scale = part_tensor(&weight, "w", 0, Dtype::F32, GRID.to_vec()).unwrap();
        state.insert("w_scale_inv".into(), scale);
        let inv: Vec<u8> = inv.iter().flat_map(|x| x.to_le_bytes()).collect();
        for durable in [false, true] {
            let got = written(dir.path(), &state, durable);
            assert!(got[0] == whole && got[1] == inv, "durable {durable}");
        }
    }
}
