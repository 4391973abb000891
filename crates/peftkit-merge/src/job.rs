//! What to merge and where: [`MergeJob`] and its [`AdapterInput`]s.

use std::path::PathBuf;

use peftkit_checkpoint::Progress;

use crate::kernels::Numerics;
use crate::quant::bnb::QloraBase;

/// One adapter to merge and its weight (`--adapter DIR[:WEIGHT]`).
#[derive(Debug, Clone)]
pub struct AdapterInput {
    /// The adapter folder.
    pub dir: PathBuf,
    /// Multiplies the adapter's scaling (1.0 = as trained).
    pub weight: f64,
}

impl AdapterInput {
    /// Parses `DIR` or `DIR:WEIGHT`. A suffix that is not a number is part of the path.
    pub fn parse(arg: &str) -> Self {
        if let Some((dir, w)) = arg.rsplit_once(':') {
            if let Ok(weight) = w.parse::<f64>() {
                return AdapterInput {
                    dir: dir.into(),
                    weight,
                };
            }
        }
        AdapterInput {
            dir: arg.into(),
            weight: 1.0,
        }
    }
}

/// What to merge and where.
///
/// [`MergeJob::new`] fills in the defaults (peft's numerics, base layout kept, synced output,
/// no progress callback); the setters change one option each. The struct is
/// `#[non_exhaustive]`, so a new option is a new setter and never breaks a caller; the fields
/// stay public to read and assign.
///
/// ```
/// use peftkit_merge::{AdapterInput, MergeJob, Numerics};
///
/// let job = MergeJob::new("base", vec![AdapterInput::parse("adapter:0.5")], "out")
///     .numerics(Numerics::Exact)
///     .progress(|bytes| eprint!("+{bytes}"));
/// assert_eq!(job.adapters[0].weight, 0.5);
/// assert!(!job.safe_merge && job.durable && job.max_shard_size.is_none());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MergeJob {
    /// The base checkpoint folder (or `.safetensors` file).
    pub base: PathBuf,
    /// Adapters, merged in this order, each onto the result of the previous.
    pub adapters: Vec<AdapterInput>,
    /// Output folder (created, or replaced atomically).
    pub out: PathBuf,
    /// `None` keeps the base layout (same files, same index); `Some` reshards.
    pub max_shard_size: Option<u64>,
    /// peft's `safe_merge=True`: round the delta first and refuse NaN/Inf results.
    pub safe_merge: bool,
    /// Subtract the adapters instead (peft's `unmerge`: `W -= Δ.to(W.dtype)`), to recover a
    /// base from a merged checkpoint. Exact in f32 up to rounding; not an exact inverse in 16
    /// bits. Adapters that replace tensors cannot be unmerged.
    pub unmerge: bool,
    /// Sync the output to disk before it is swapped in (see
    /// [`peftkit_checkpoint::SaveOptions::durable`]).
    pub durable: bool,
    /// For a quantized base (FP8 or bitsandbytes 4-bit or int8): write every quantized weight
    /// unquantized and drop `quantization_config`, as transformers saves the model it
    /// dequantizes (FP8: loaded on CPU, in the model dtype; bitsandbytes: `model.dequantize()`
    /// before peft's merge, 4-bit weights in their own dtype, int8 ones in the model dtype).
    /// Off: merged weights are re-quantized into the base's format.
    pub dequantize: bool,
    /// peft's arithmetic, or one correct rounding identical on every machine
    /// ([`Numerics::Exact`]; DoRA, LoHa, LoKr and IA3 unmerges are refused there).
    pub numerics: Numerics,
    /// Told the byte count of every write of tensor data, as the output is written.
    pub progress: Progress,
    /// A 16-bit base a QLoRA adapter was trained on in 4 bits: merge into bitsandbytes' round
    /// trip `dequantize(quantize(W))` of each adapted weight rather than into `W`.
    pub qlora_base: Option<QloraBase>,
    /// Write the result over the base (`out` is then the base): still atomic, the old base is
    /// kept until the merged folder is swapped in.
    pub in_place: bool,
    /// Write NaN and infinite values as peft does, instead of refusing an adapter holding
    /// them or a merge producing them.
    pub allow_nonfinite: bool,
}

impl MergeJob {
    /// A merge of `adapters` (in order) into `base`, written to `out`, with the defaults: the
    /// base layout kept, no safe merge, no unmerge, synced output, [`Numerics::Peft`], no
    /// progress callback.
    pub fn new(
        base: impl Into<PathBuf>,
        adapters: Vec<AdapterInput>,
        out: impl Into<PathBuf>,
    ) -> Self {
        MergeJob {
            base: base.into(),
            adapters,
            out: out.into(),
            max_shard_size: None,
            safe_merge: false,
            unmerge: false,
            durable: true,
            dequantize: false,
            numerics: Numerics::default(),
            progress: Progress::default(),
            qlora_base: None,
            in_place: false,
            allow_nonfinite: false,
        }
    }

    /// Merges into the 4-bit round trip of a 16-bit base (see
    /// [`MergeJob::qlora_base`](#structfield.qlora_base)).
    pub fn qlora_base(mut self, quantization: Option<QloraBase>) -> Self {
        self.qlora_base = quantization;
        self
    }

    /// Writes the result over the base (see [`MergeJob::in_place`](#structfield.in_place)):
    /// sets `out` to the base.
    pub fn in_place(mut self, on: bool) -> Self {
        self.in_place = on;
        if on {
            self.out = self.base.clone();
        }
        self
    }

    /// Keeps NaN and infinite values (see
    /// [`MergeJob::allow_nonfinite`](#structfield.allow_nonfinite)).
    pub fn allow_nonfinite(mut self, on: bool) -> Self {
        self.allow_nonfinite = on;
        self
    }

    /// Reshards the output to at most `size` bytes per file (`None`: the base's layout).
    pub fn max_shard_size(mut self, size: Option<u64>) -> Self {
        self.max_shard_size = size;
        self
    }

    /// peft's `safe_merge=True` (see [`MergeJob::safe_merge`](#structfield.safe_merge)).
    pub fn safe_merge(mut self, on: bool) -> Self {
        self.safe_merge = on;
        self
    }

    /// Subtracts the adapters instead (see [`MergeJob::unmerge`](#structfield.unmerge)).
    pub fn unmerge(mut self, on: bool) -> Self {
        self.unmerge = on;
        self
    }

    /// Whether the output is synced to disk before it is swapped in.
    pub fn durable(mut self, on: bool) -> Self {
        self.durable = on;
        self
    }

    /// Writes a quantized base's weights dequantized (see
    /// [`MergeJob::dequantize`](#structfield.dequantize)).
    pub fn dequantize(mut self, on: bool) -> Self {
        self.dequantize = on;
        self
    }

    /// peft's arithmetic or one correct rounding.
    pub fn numerics(mut self, numerics: Numerics) -> Self {
        self.numerics = numerics;
        self
    }

    /// Calls `on_bytes` with the byte count of every write of tensor data.
    pub fn progress(mut self, on_bytes: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.progress = Progress::new(on_bytes);
        self
    }
}
