//! The streaming merge: adapters merged into a base checkpoint tensor by tensor.
//!
//! The base is opened by its headers only. Every output tensor is a lazy
//! [`peftkit_checkpoint::Tensor`]: untouched tensors are streamed from the base file without
//! being decoded; a targeted tensor is read, merged in place by the kernels (which use every
//! core), encoded back to the base dtype and dropped once written. Peak memory is a few
//! tensors, whatever the size of the model.
//!
//! Everything that can be checked before writing is checked first (every adapter tensor has a
//! base tensor, shapes agree, the method and its options can be merged); what can only fail
//! while computing (a NaN with `safe_merge`) aborts the atomic save, so the output folder
//! either holds the complete merge or is left as it was.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indexmap::IndexMap;
use peftkit_checkpoint::{
    companion_files, nonfinite, CheckpointError, InPlaceEdit, OutputRegion, SourceRegion,
};
use peftkit_checkpoint::{
    plan_save, save_planned, Checkpoint, ModelConfig, Progress, SaveOptions, SavePlan, StateDict,
    Tensor,
};
use peftkit_peft::Adapter;

use crate::edit::Edit;
use crate::error::{MergeError, NonFiniteResult};
use crate::file_io::FileBlocks;
use crate::job::MergeJob;
use crate::kernels::StreamedBase;
use crate::kernels::{reduction_order, FiniteProbe, MergeOptions as KernelOptions, Numerics};
use crate::plan::{plan, MergePlan};
use crate::quant::{BaseQuant, Fp8Base, Treatment};
use crate::report::{MergeSummary, NumericsReport};

/// Merges `job.adapters` into `job.base` and writes the result to `job.out`, telling
/// `job.progress` of every write.
///
/// The output keeps the base's layout (file names, tensor-to-file assignment, index, header
/// metadata) unless `max_shard_size` asks for a reshard; every other file of the base
/// (configs, tokenizer, chat template, custom code) is copied, and `config.json` gets
/// `tie_word_embeddings: false` when the merge unties the embeddings, as peft does.
///
/// ```no_run
/// use peftkit_merge::{merge, AdapterInput, MergeJob};
///
/// let job = MergeJob::new("base", vec![AdapterInput::parse("adapter")], "merged");
/// let summary = merge(&job)?;
/// println!("{} tensors merged", summary.tensors_merged);
/// # Ok::<(), peftkit_merge::MergeError>(())
/// ```
pub fn merge(job: &MergeJob) -> Result<MergeSummary, MergeError> {
    let start = Instant::now();
    // Inputs are never modified: the output is swapped in atomically, so it must not be one.
    let inputs: Vec<&std::path::Path> = std::iter::once(job.base.as_path())
        .chain(job.adapters.iter().map(|a| a.dir.as_path()))
        .collect();
    let in_place = job.in_place.then_some(job.base.as_path());
    peftkit_checkpoint::ensure_output(&job.out, &inputs, in_place)?;
    if let Some(a) = job.adapters.iter().find(|a| !a.weight.is_finite()) {
        return Err(MergeError::NonFiniteWeight {
            adapter: a.dir.clone(),
            weight: a.weight,
        });
    }
    // A `.bin` base stores tied weights twice; the model peft merges into has them once.
    let base = Checkpoint::open(&job.base)?.without_tie_targets();
    // Its layout cannot be kept (the output is safetensors): plan shards as
    // `save_pretrained` does by default.
    let max_shard_size = job.max_shard_size.or(base
        .is_pickle()
        .then_some(peftkit_checkpoint::DEFAULT_MAX_SHARD_SIZE));
    let base_dir = if job.base.is_dir() {
        job.base.clone()
    } else {
        base.dir.clone()
    };
    let config_path = base_dir.join("config.json");
    let mut config = if config_path.is_file() {
        Some(ModelConfig::read(&config_path)?)
    } else {
        None
    };
    let adapters = job
        .adapters
        .iter()
        .map(|a| Adapter::open(&a.dir).map(|ad| (ad, a.weight)))
        .collect::<Result<Vec<_>, _>>()?;
    if !job.allow_nonfinite {
        check_finite_adapters(&adapters)?;
    }
    let quant = BaseQuant::read(job, &base, &base_dir, config.as_ref())?;
    let order = reduction_order()?;
    // A bitsandbytes base is planned and merged on its dequantized view (see `quant::bnb`);
    // any other base on itself.
    let view = quant.bnb().view(&base)?;
    let mut plan = plan(&view, config.as_ref(), &adapters)?;
    let view = quant.bnb().after_plan(view, &mut plan)?;
    if job.numerics == Numerics::Exact {
        plan.check_exact(job.unmerge)?;
    }
    // A reshard plans on the layout transformers holds the model in (see `save`).
    let resave = match max_shard_size {
        Some(size) => Some((
            size,
            peftkit_remap::checkpoint_mapping(
                &peftkit_remap::Registry::builtin()?,
                config.as_ref(),
                None,
            )?,
        )),
        None => None,
    };
    if job.unmerge {
        let first = job.adapters.first().map(|a| a.dir.clone());
        plan.check_unmerge(&first.unwrap_or_default())?;
    }

    let mut summary = MergeSummary {
        tensors_merged: 0,
        tensors_replaced: 0,
        tensors_copied: 0,
        tensors_added: plan.added.len(),
        bytes: 0,
        files: vec![],
        untied_embeddings: false,
        numerics: NumericsReport::of(&plan, order, job.numerics),
        quantization: None,
        seconds: 0.0,
    };
    // An FP8 base is merged through its FP8 view, tensor by tensor (see `quant::fp8`).
    let fp8 = quant.fp8(&base, &base_dir);
    let state = merged_state(&view, &plan, fp8.as_ref(), job, &mut summary)?;
    // The staging folder is made beside the output: so is a spill file (without a name).
    let beside_out = match job.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let checks = (&kernel_options(job), !job.allow_nonfinite);
    let state = quant
        .bnb()
        .finish(state, (&base, &plan), beside_out, checks)?;
    let mut rewrite_config = false;
    if plan.untie {
        if let Some(c) = config.as_mut() {
            c.fields
                .insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
            summary.untied_embeddings = true;
            rewrite_config = true;
        }
    }
    if quant.drops_config() {
        if let Some(c) = config.as_mut() {
            // transformers removes it from a model it dequantized on load.
            c.fields.shift_remove("quantization_config");
            rewrite_config = true;
        }
    }
    let mut options = SaveOptions {
        durable: job.durable,
        // A `.bin` base has no header metadata: transformers writes `{"format": "pt"}`.
        metadata: match base.metadata() {
            Some(m) => m.clone(),
            None if base.is_pickle() => peftkit_checkpoint::pt_metadata(),
            None => Default::default(),
        },
        ..Default::default()
    };
    // transformers rewrites config.json on save; it is copied unless it changes: untied
    // embeddings, a dropped quantization_config, or a `.bin` base (usually a transformers v4
    // config).
    let rewrite_config = rewrite_config || base.is_pickle();
    if base.is_pickle() {
        if let Some(c) = config.as_mut() {
            c.fields.insert(
                "transformers_version".into(),
                peftkit_checkpoint::TRANSFORMERS_VERSION.into(),
            );
        }
    }
    if job.base.is_dir() {
        options.extra_files = companion_files(&base_dir)?
            .into_iter()
            .filter(|(n, _)| !(rewrite_config && n == "config.json"))
            .collect();
    }
    if rewrite_config {
        options.config = config;
    }
    let layout = Layout {
        resave,
        replan: quant.bnb().replans(),
    };
    save(job, &base, &plan, state, layout, options, &mut summary)?;
    summary.quantization = quant.report(&plan, fp8.as_ref());
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The output state dict: base tensors as they are, or lazily merged by their steps (through
/// `fp8` for an FP8 base), and the added tensors. Counts each kind in `summary`.
fn merged_state(
    base: &Checkpoint,
    plan: &MergePlan,
    fp8: Option<&Fp8Base<'_>>,
    job: &MergeJob,
    summary: &mut MergeSummary,
) -> Result<StateDict, MergeError> {
    let opts = kernel_options(job);
    let mut state = StateDict::new();
    for (name, tensor) in base.tensors() {
        let treatment = match fp8 {
            Some(fp8) => fp8.treat(name, tensor, &plan.steps, &opts)?,
            None => Treatment::Plain,
        };
        match treatment {
            Treatment::Dropped => continue,
            Treatment::Computed { tensor, changed } => {
                match plan.steps.get(name) {
                    None if changed => summary.tensors_merged += 1, // a re-quantized scale
                    steps => count(summary, steps),
                }
                state.insert(name.to_owned(), tensor);
                continue;
            }
            Treatment::Plain => {}
        }
        let Some(steps) = plan.steps.get(name) else {
            summary.tensors_copied += 1;
            state.insert(name.to_owned(), tensor.clone());
            continue;
        };
        count(summary, Some(steps));
        let edit = MergeEdit {
            key: name.to_owned(),
            base: tensor.clone(),
            steps: steps.clone(),
            opts,
            check: !job.allow_nonfinite,
        };
        let lazy = Tensor::edited(tensor.clone(), edit);
        state.insert(name.to_owned(), lazy);
    }
    for (name, (tensor, _)) in &plan.added {
        state.insert(name.clone(), tensor.clone());
    }
    Ok(state)
}

/// The kernels' options for `job`'s merge.
fn kernel_options(job: &MergeJob) -> KernelOptions {
    KernelOptions {
        safe_merge: job.safe_merge,
        unmerge: job.unmerge,
        numerics: job.numerics,
        ..KernelOptions::default()
    }
}

/// A base tensor's merge steps, applied to its bytes in place: in memory, or where the writer
/// copied them in the output file (see [`crate::mapped`]).
struct MergeEdit {
    key: String,
    base: Tensor,
    steps: Vec<crate::edit::Step>,
    opts: KernelOptions,
    /// Refuse a result with more NaN/Inf than the base (no `--allow-nonfinite`).
    check: bool,
}

impl MergeEdit {
    /// Runs the steps on `data`, the base's bytes.
    fn run(&self, data: &mut [u8]) -> Result<(), CheckpointError> {
        let (dtype, shape) = (self.base.dtype(), self.base.shape());
        let probe = FiniteProbe::default();
        for step in &self.steps {
            probe.reset();
            // Only a checked merge asks the kernels to test what they write.
            let probe = self.check.then_some(&probe);
            step.apply(&self.key, dtype, shape, data, &self.opts, probe)?;
        }
        // The fused kernel tests what it writes block by block, in cache: when the last step
        // ran it and found every value finite, the tensor is not read again.
        if !self.check || probe.all_finite() {
            return Ok(());
        }
        self.check_merged(data)
    }

    /// Streams this edit's steps from the base file to `out` (see `file_io`): `None`, having
    /// written nothing, when they cannot stream (see `edit::stream_steps`: LoRA on Linear,
    /// Embedding and Conv weights, and DoRA on Linear ones).
    fn stream(
        &self,
        source: SourceRegion<'_>,
        out: &OutputRegion<'_>,
    ) -> Result<Option<()>, CheckpointError> {
        let io = FileBlocks::new(source, out);
        let base = StreamedBase {
            dtype: self.base.dtype(),
            shape: self.base.shape(),
            len: out.len(),
            io: &io,
            // `safe_merge` refuses any NaN or infinity, `--allow-nonfinite` or not.
            check: self.check || self.opts.safe_merge,
        };
        let done = crate::edit::stream_steps(&self.steps, &self.key, base, &self.opts);
        if let Some(e) = io.source.take_error() {
            return Err(e);
        }
        match done? {
            None => Ok(None),
            Some(true) => Ok(Some(())),
            Some(false) if self.opts.safe_merge => {
                // peft refuses at the first adapter whose result holds one, counting over the
                // whole tensor: the steps run again in memory to say which, and how many (rare).
                let mut data = self.base.bytes()?.into_owned();
                self.run(&mut data).map(Some)
            }
            Some(false) if !self.check => Ok(Some(())),
            Some(false) => {
                // A block holds NaN or infinity: read what was written to count them (rare).
                let mut merged = vec![0u8; out.len()];
                out.read_at(0, &mut merged)?;
                self.check_merged(&merged).map(Some)
            }
        }
    }

    /// Refuses `merged` when it holds more NaN/Inf than the base. Values the base already held
    /// are not the merge's doing: only when the merged tensor holds some is the base read
    /// again to count its own (rare, so the common case pays one pass, not two).
    fn check_merged(&self, merged: &[u8]) -> Result<(), CheckpointError> {
        let dtype = self.base.dtype();
        let Some((after, first)) = nonfinite(dtype, merged) else {
            return Ok(());
        };
        let held = nonfinite(dtype, &self.base.bytes()?).map_or(0, |(n, _)| n);
        match NonFiniteResult::refusal(&self.key, (after, first), held) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl InPlaceEdit for MergeEdit {
    fn apply(&self, data: &mut [u8]) -> Result<(), CheckpointError> {
        self.run(data)
    }

    /// Streams LoRA and DoRA steps block by block where they can ([`Self::stream`]), through
    /// the page cache (each block's
    /// writeback started at once in a synced save: [`OutputRegion::in_blocks`]); writes other
    /// edits through a mapping of the output where that is safe (`mapped`). In a synced save
    /// those are computed whole and written around the page cache by the writer.
    fn apply_in_file(
        &self,
        source: SourceRegion<'_>,
        out: &OutputRegion<'_>,
    ) -> Result<bool, CheckpointError> {
        if let Some(blocks) = out.in_blocks() {
            if self.stream(source, &blocks)?.is_some() {
                return Ok(true);
            }
        }
        if out.is_direct() {
            return Ok(false);
        }
        let Some((file, offset)) = out.mappable()? else {
            return Ok(false);
        };
        crate::mapped::edit_file_range(file, offset, out.len(), |bytes| {
            source.read_at(0, bytes)?;
            self.run(bytes)
        })
    }
}

/// Counts a base tensor in `summary`: merged, replaced whole, or (no `steps`) copied.
fn count(summary: &mut MergeSummary, steps: Option<&Vec<crate::edit::Step>>) {
    match steps {
        None => summary.tensors_copied += 1,
        Some(s) if s.iter().all(|s| matches!(s.edit, Edit::Replace { .. })) => {
            summary.tensors_replaced += 1
        }
        Some(_) => summary.tensors_merged += 1,
    }
}

/// Refuses an adapter tensor holding NaN or infinite values, naming it, before anything is
/// written. Adapters are small next to the base: reading them once more costs little.
fn check_finite_adapters(adapters: &[(Adapter, f64)]) -> Result<(), MergeError> {
    for (ad, _) in adapters {
        for (key, t) in ad.weights.tensors() {
            if let Some((count, first)) = nonfinite(t.dtype(), &t.bytes()?) {
                return Err(MergeError::NonFiniteAdapter {
                    adapter: ad.dir.clone(),
                    key: key.to_owned(),
                    count,
                    first,
                });
            }
        }
    }
    Ok(())
}

/// How the output is laid out: the base's files unless resharded (`resave`: the shard size and
/// the mapping of the layout transformers holds the model in) or planned anew (`replan`: the
/// tensors are not the base's: a dequantized bitsandbytes base). In the base's layout, the
/// index totals follow the tensors written (see `of_state`).
struct Layout {
    resave: Option<(u64, peftkit_remap::Mapping)>,
    replan: bool,
}

/// Writes `state` to `job.out`: in the base's layout, resharded on the layout transformers
/// holds the model in, or planned anew as `save_pretrained` plans a model loaded from disk.
fn save(
    job: &MergeJob,
    base: &Checkpoint,
    plan: &MergePlan,
    mut state: StateDict,
    layout: Layout,
    options: SaveOptions,
    summary: &mut MergeSummary,
) -> Result<(), MergeError> {
    // One progress callback: the job's, plus the count of bytes the summary reports.
    let written = Arc::new(AtomicU64::new(0));
    let (count, progress) = (written.clone(), job.progress.clone());
    let options = SaveOptions {
        progress: Progress::new(move |n| {
            count.fetch_add(n, Ordering::Relaxed);
            progress.report(n)
        }),
        ..options
    };
    let save_plan = match &layout.resave {
        _ if layout.replan => {
            // A model loaded by from_pretrained is saved in natural order of its names.
            state.sort_by(|a, _, b, _| peftkit_checkpoint::natural_cmp(a, b));
            let size = job
                .max_shard_size
                .unwrap_or(peftkit_checkpoint::DEFAULT_MAX_SHARD_SIZE);
            let options = SaveOptions {
                max_shard_size: size,
                ..options.clone()
            };
            plan_save(&state, &options)?
        }
        Some((size, mapping)) => {
            // transformers saves the merged model as it holds it: in the v5 layout it was
            // loaded into, reverted on save. The shards are planned on that, as in `reshard`.
            state = mapping.round_trip(&state)?.state;
            plan_save(
                &state,
                &SaveOptions {
                    max_shard_size: *size,
                    ..options.clone()
                },
            )?
        }
        None => with_added(
            of_state(SavePlan::from_checkpoint(base), &state),
            &plan.added,
            &state,
        ),
    };
    let report = save_planned(&job.out, &state, &save_plan, &options)?;
    summary.bytes = written.load(Ordering::Relaxed);
    summary.files = report.weight_files;
    Ok(())
}

/// The base's layout for `state`: tensors it does not hold (the scales of a dequantized FP8
/// base) dropped, and the index totals recomputed when they change (dequantized FP8 weights
/// are larger, a re-quantized bitsandbytes weight stores its scales in `f32`), as
/// transformers computes them from the state it saves.
fn of_state(mut plan: SavePlan, state: &StateDict) -> SavePlan {
    for (_, names) in &mut plan.shards {
        names.retain(|n| state.contains_key(n));
    }
    let planned = || plan.shards.iter().flat_map(|(_, n)| n).map(|n| &state[n]);
    let size: u64 = planned().map(|t| t.byte_len() as u64).sum();
    let params: u64 = planned().map(|t| t.numel() as u64).sum();
    if size == plan.total_size {
        return plan;
    }
    plan.total_size = size;
    if let Some((_, index)) = plan.index.as_mut() {
        index.weight_map.retain(|n, _| state.contains_key(n));
        index.total_size = index.total_size.map(|_| size);
        index.total_parameters = index.total_parameters.map(|_| params);
    }
    plan
}

/// Puts added tensors (an untied `lm_head`) into the file of their tie source and the index.
fn with_added(
    mut plan: SavePlan,
    added: &IndexMap<String, (Tensor, String)>,
    state: &StateDict,
) -> SavePlan {
    for (name, (_, source)) in added {
        let slot = plan
            .shards
            .iter()
            .position(|(_, names)| names.contains(source))
            .unwrap_or(0);
        if let Some((file, names)) = plan.shards.get_mut(slot) {
            names.push(name.clone());
            if let Some((_, index)) = plan.index.as_mut() {
                index.weight_map.insert(name.clone(), file.clone());
                let t = &state[name];
                index.total_size = index.total_size.map(|s| s + t.byte_len() as u64);
                index.total_parameters = index.total_parameters.map(|p| p + t.numel() as u64);
            }
        }
    }
    plan
}
