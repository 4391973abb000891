//! Kept bitsandbytes merges computed band by band: each band of a weight's rows is
//! dequantized, merged and quantized again while it is in cache, into the output's bytes.
//!
//! The whole-weight path (the dequantized view edited by the plan, then quantized) holds the
//! weight in `f32`: 180 MB for an 11008 x 4096 weight, per worker, written and read four times
//! from memory. A plain Linear LoRA's rows are independent ([`RowBanded`]), and so are an int8
//! weight's rows and a 4-bit weight's blocks when its rows are whole blocks
//! ([`super::weight::Weight4::band_rows`]), so a band gives the bytes the whole weight gives
//! there: the same operations on the same values.

use std::borrow::Cow;
use std::cell::Cell;
use std::ops::Range;

use peftkit_checkpoint::{buffers, nonfinite, CheckpointError, Dtype, SourceRegion, Tensor};
use rayon::prelude::*;

use super::view::{compute_error, with_values};
use crate::edit::{RowBanded, Step};
use crate::error::NonFiniteResult;
use crate::kernels::{encode_f32_into, with_kept, FiniteProbe, MergeMathError, MergeOptions};

/// About this many bytes of `f32` values per band: with its codes it stays in a core's L2
/// (1 MiB on AMD Zen 4, 2 MiB on Intel Sapphire Rapids).
const BAND_BYTES: usize = 512 << 10;

/// Rows per band of a weight of `cols` columns: about [`BAND_BYTES`] of `f32` values.
pub(super) fn rows_per_band(cols: usize) -> usize {
    (BAND_BYTES / (cols * 4).max(1)).max(1)
}

/// The plan's steps on one quantized weight, as steps on bands of its rows.
pub(super) struct Bands {
    steps: Vec<RowBanded>,
    /// Rows per band.
    pub rows: usize,
    /// Refuse a result with more NaN/Inf than the base (no `--allow-nonfinite`), as the
    /// whole-weight path's merge does.
    check: bool,
}

/// The rows of one band and its place in the weight.
pub(super) type BandRows = Range<usize>;

/// Fills a band's `f32` values as the dequantized view holds them.
pub(super) type Dequantize<'a> =
    dyn Fn(BandRows, &mut [f32]) -> Result<(), CheckpointError> + Sync + 'a;

/// A quantized weight whose rows can be dequantized a band at a time: 4-bit or int8.
pub(super) trait BandSource: Send + Sync {
    /// The weight's stored tensors read once, as a [`Dequantize`] of its rows rounded to
    /// `dtype` (the dequantized view's values).
    fn rows_in(&self, dtype: Dtype) -> Result<Box<Dequantize<'_>>, CheckpointError>;
}

/// A stored tensor's bytes, read a range at a time: from its file where it lies in one (a
/// `pread` of the range into this thread's buffer: no buffer of the weight), else from its
/// bytes, read once.
pub(super) struct StoredBytes<'a> {
    name: &'a str,
    source: Source<'a>,
}

enum Source<'a> {
    File(SourceRegion<'a>),
    Held(Cow<'a, [u8]>),
}

thread_local! {
    /// This thread's bytes of a band read from a file (see `kernels::with_kept`).
    static BYTES: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl<'a> StoredBytes<'a> {
    /// The bytes of `tensor` (named `name`, for errors).
    pub fn of(name: &'a str, tensor: &'a Tensor) -> Result<Self, CheckpointError> {
        let source = match tensor.source_file() {
            Some((file, offset)) => Source::File(SourceRegion::new(file, offset)),
            None => Source::Held(tensor.bytes()?),
        };
        Ok(StoredBytes { name, source })
    }

    /// Runs `f` on bytes `range`.
    pub fn with<R>(
        &self,
        range: Range<usize>,
        f: impl FnOnce(&[u8]) -> Result<R, CheckpointError>,
    ) -> Result<R, CheckpointError> {
        match &self.source {
            Source::Held(held) => match held.get(range.clone()) {
                Some(bytes) => f(bytes),
                None => {
                    let reason = format!("bytes {range:?} lie past the stored tensor");
                    Err(compute_error(self.name, "reading a band", reason.into()))
                }
            },
            Source::File(region) => with_kept(&BYTES, |buf| {
                buf.resize(range.len(), 0);
                region.read_at(range.start, buf)?;
                f(buf)
            }),
        }
    }
}

/// Bytes read whole go back to the pool for the next weight.
impl Drop for StoredBytes<'_> {
    fn drop(&mut self) {
        if let Source::Held(Cow::Owned(buf)) = &mut self.source {
            buffers::give(std::mem::take(buf));
        }
    }
}

/// Quantizes a merged band into its piece of the output.
pub(super) type Quantize<'a, O, R> = dyn Fn(&[f32], O) -> Result<R, CheckpointError> + Sync + 'a;

impl Bands {
    /// `steps` on the weight `name` of `shape` by bands of `rows` rows (`None`: its format
    /// cannot be cut in bands), if every step runs by bands, a LoRA or DoRA on a Linear (peft's
    /// kept merge of one adapter; between two adapters, or after a DoRA cast back, the weight
    /// goes through its format whole).
    pub fn of(
        (name, shape): (&str, &[usize]),
        rows: Option<usize>,
        steps: &[Step],
        (opts, check): (&MergeOptions, bool),
    ) -> Result<Option<Self>, CheckpointError> {
        let Some(rows) = rows else {
            return Ok(None);
        };
        let Some(banded) = RowBanded::all(steps, name, shape, opts)? else {
            return Ok(None);
        };
        Ok((!banded.is_empty()).then_some(Bands {
            steps: banded,
            rows,
            check,
        }))
    }

    /// Runs the weight `name` (`total` rows of `cols`) band by band, bands in parallel, each
    /// with its piece of the output from `outs` (in order, one per band): `dequantize` fills a
    /// band's `f32` values as the dequantized view holds them, the steps merge them, and
    /// `quantize` writes them into the band's piece. Returns what `quantize` returned for
    /// each band.
    pub fn run<O: Send, R: Send>(
        &self,
        (name, total, cols): (&str, usize, usize),
        outs: Vec<O>,
        dequantize: &Dequantize<'_>,
        quantize: &Quantize<'_, O, R>,
    ) -> Result<Vec<R>, CheckpointError> {
        let found = outs
            .into_par_iter()
            .enumerate()
            .map(|(i, out)| {
                let rows = i * self.rows..((i + 1) * self.rows).min(total);
                with_values(|buf| {
                    let values = band_of(buf, rows.len() * cols);
                    let band = Band {
                        at: (name, cols, rows),
                        values,
                        out: None,
                    };
                    let found = self.merge(band, dequantize)?;
                    Ok((found, quantize(values, out)?))
                })
            })
            .collect::<Result<Vec<(NonFinite, R)>, CheckpointError>>()?;
        let (found, results): (Vec<NonFinite>, Vec<R>) = found.into_iter().unzip();
        self.check(name, &found)?;
        Ok(results)
    }

    /// Rows `rows` of the weight `name` (`cols` columns) merged in `dtype` in `out`, their
    /// bytes in the output (the dequantized view's dtype): dequantized into this thread's `f32`
    /// buffer, encoded into `out`, merged there. Returns what [`Bands::check`] takes.
    pub fn merge_into(
        &self,
        (name, cols, rows): (&str, usize, BandRows),
        (dtype, out): (Dtype, &mut [u8]),
        dequantize: &Dequantize<'_>,
    ) -> Result<NonFinite, CheckpointError> {
        with_values(|buf| {
            let values = band_of(buf, rows.len() * cols);
            let band = Band {
                at: (name, cols, rows),
                values,
                out: Some((dtype, out)),
            };
            self.merge(band, dequantize)
        })
    }

    /// The whole-weight merge's check over the bands of weight `name` (when checked): more NaN
    /// or infinite values after the merge than the base held is refused, naming the first.
    pub fn check(&self, name: &str, bands: &[NonFinite]) -> Result<(), CheckpointError> {
        match self.check {
            true => check_bands(name, bands),
            false => Ok(()),
        }
    }

    /// One band: dequantized, encoded where it is merged, and merged; returns what it holds
    /// that is not finite.
    fn merge(
        &self,
        band: Band<'_, '_>,
        dequantize: &Dequantize<'_>,
    ) -> Result<NonFinite, CheckpointError> {
        let Band {
            at: (name, cols, rows),
            values,
            out,
        } = band;
        dequantize(rows.clone(), values)?;
        let (dtype, bytes) = match out {
            Some((dtype, out)) => {
                encode_f32_into("dequantized weight", dtype, values, out)
                    .map_err(|e| encode_error(name, e))?;
                (dtype, out)
            }
            None => (Dtype::F32, bytemuck::cast_slice_mut(values)),
        };
        let probe = FiniteProbe::default();
        for step in &self.steps {
            probe.reset();
            let probe = self.check.then_some(&probe);
            step.apply(name, dtype, (rows.clone(), cols), bytes, probe)?;
        }
        // A NaN or infinity of the base stays one after a finite delta is added, so a band
        // whose merged values are all finite held none: only other bands need counting.
        match self.check && !probe.all_finite() {
            true => NonFinite::of((rows, cols), (dtype, bytes), dequantize),
            false => Ok(NonFinite::default()),
        }
    }
}

/// One band of [`Bands::merge`]: the weight's name and columns and the band's rows; the
/// thread's `f32` buffer for its values; where it is merged when not in that buffer (the
/// view's dtype and the band's bytes in the output).
struct Band<'v, 'o> {
    at: (&'v str, usize, BandRows),
    values: &'v mut [f32],
    out: Option<(Dtype, &'o mut [u8])>,
}

fn encode_error(name: &str, e: MergeMathError) -> CheckpointError {
    CheckpointError::TensorCompute {
        tensor: name.to_owned(),
        context: "encoding a dequantized band".into(),
        source: Box::new(e),
    }
}

/// The first `len` values of `buf`, grown if it is shorter: every value is written before it
/// is read, so a buffer kept from band to band is not cleared.
fn band_of(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// The NaN and infinite values of one merged band, and of the same rows of the base.
#[derive(Default)]
pub(super) struct NonFinite {
    /// In the merged band.
    after: usize,
    /// Flat index (in the weight) of the merged band's first.
    first: Option<usize>,
    /// In the base's rows.
    held: usize,
}

impl NonFinite {
    /// What the merged `bytes` (of `dtype`) of rows `rows` hold; the base's rows are
    /// dequantized again only when the band holds any (they rarely do). The dequantized values
    /// are already rounded to the view's dtype, so they are finite where its bytes are.
    fn of(
        (rows, cols): (BandRows, usize),
        (dtype, bytes): (Dtype, &[u8]),
        dequantize: &Dequantize<'_>,
    ) -> Result<Self, CheckpointError> {
        let Some((after, first)) = nonfinite(dtype, bytes) else {
            return Ok(NonFinite::default());
        };
        let mut base = vec![0f32; rows.len() * cols];
        let at = rows.start * cols;
        dequantize(rows, &mut base)?;
        let held = nonfinite(Dtype::F32, bytemuck::cast_slice(&base)).map_or(0, |(n, _)| n);
        Ok(NonFinite {
            after,
            first: Some(at + first),
            held,
        })
    }
}

/// [`Bands::check`].
fn check_bands(name: &str, bands: &[NonFinite]) -> Result<(), CheckpointError> {
    let after: usize = bands.iter().map(|b| b.after).sum();
    let held: usize = bands.iter().map(|b| b.held).sum();
    let refused = bands
        .iter()
        .find_map(|b| b.first)
        .and_then(|first| NonFiniteResult::refusal(name, (after, first), held));
    match refused {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use peftkit_checkpoint::{CheckpointError, Dtype, Tensor};

    use crate::edit::{Edit, LoraKind, ModuleTensors, Step};
    use crate::error::NonFiniteResult;

    /// A rank-4 LoRA step on a `rows` x `cols` weight that moves every row; with `blow_up`,
    /// the rows from the middle on become infinite.
    pub fn lora_step(rows: usize, cols: usize, blow_up: bool) -> Step {
        let r = 4;
        let values = |n: usize, k: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| ((i * k % 97) as f32 / 97.0 - 0.5).to_le_bytes())
                .collect()
        };
        let mut b = values(rows * r, 29);
        if blow_up {
            let huge = 3.0e38f32.to_le_bytes();
            b[rows / 2 * r * 4..]
                .chunks_exact_mut(4)
                .for_each(|v| v.copy_from_slice(&huge));
        }
        let a = Tensor::from_bytes(Dtype::F32, vec![r, cols], values(r * cols, 13)).unwrap();
        let b = Tensor::from_bytes(Dtype::F32, vec![rows, r], b).unwrap();
        Step {
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
        }
    }

    /// A tensor's bytes by ranges are its bytes, read from its file or held in memory; a range
    /// past the end is an error naming the tensor.
    #[test]
    fn stored_bytes_by_ranges_are_the_tensor_s() {
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        let held = Tensor::from_bytes(Dtype::U8, vec![5000], bytes.clone()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut state = peftkit_checkpoint::StateDict::new();
        state.insert("t".into(), held.clone());
        let options = peftkit_checkpoint::SaveOptions::default().durable(false);
        peftkit_checkpoint::save_pretrained(dir.path(), &state, &options).unwrap();
        let ckpt = peftkit_checkpoint::Checkpoint::open(dir.path()).unwrap();
        let in_file = ckpt.get("t").unwrap();
        assert!(in_file.source_file().is_some() && held.source_file().is_none());
        for t in [&held, in_file] {
            let stored = super::StoredBytes::of("t", t).unwrap();
            for range in [0..5000, 17..4093, 4999..5000, 100..100] {
                let got = stored.with(range.clone(), |b| Ok(b.to_vec())).unwrap();
                assert!(got == bytes[range.clone()], "{range:?}");
            }
            let past = stored.with(4990..5010, |b| Ok(b.len())).unwrap_err();
            let said = past.to_string();
            assert!(
                said.contains("`t`") || said.contains("model.safetensors"),
                "{said}"
            );
        }
    }

    /// The count and first index of a refused non-finite result.
    pub fn refused(e: CheckpointError) -> (usize, usize) {
        let CheckpointError::TensorCompute { source, .. } = e else {
            panic!("not a computation's error: {e}");
        };
        let found = source.downcast_ref::<NonFiniteResult>();
        let found = found.unwrap_or_else(|| panic!("not a non-finite result: {source}"));
        (found.count, found.first)
    }
}
