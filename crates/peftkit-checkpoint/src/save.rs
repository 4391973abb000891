//! `save_pretrained`: a state dict (and its configs) written as transformers 5.24 writes it,
//! into a folder that changes atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::atomic::{explain_abort, DirTransaction};
use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{CheckpointError, Result};
use crate::index::WeightIndex;
use crate::names::{WeightsKind, WeightsNames};
use crate::progress::Progress;
use crate::safetensors_file::{pt_metadata, write_files, FileJob};
use crate::shard::{plan_shards, PlanItem, DEFAULT_MAX_SHARD_SIZE};
use crate::tensor::{StateDict, Tensor};

/// Options of [`save_pretrained`], named after transformers' keyword arguments.
///
/// Build them from [`Default`] with the chained setters (one per field), or with
/// `SaveOptions { .., ..Default::default() }`, so a field added later breaks no caller:
///
/// ```
/// use peftkit_checkpoint::{SaveOptions, WeightsKind};
/// let o = SaveOptions::default().max_shard_size(5_000_000_000u64).variant("fp16").durable(false);
/// assert_eq!((o.max_shard_size, o.variant.as_deref(), o.kind), (5_000_000_000, Some("fp16"), WeightsKind::Model));
/// ```
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Largest shard in bytes (see [`crate::parse_size`] for `"5GB"`-style strings).
    /// Default 50 GB, as in transformers 5.x.
    pub max_shard_size: u64,
    /// File-name variant (`model.fp16.safetensors`).
    pub variant: Option<String>,
    /// `false` writes nothing (a non-zero rank of a distributed job); the state dict is still
    /// checked and planned so every rank fails the same way.
    pub is_main_process: bool,
    /// Header metadata of every file. Default `{"format": "pt"}`, which transformers writes
    /// and older loaders require.
    pub metadata: BTreeMap<String, String>,
    /// Declared ties `(target, source)`, like `_tied_weights_keys`: the target is dropped
    /// when the source is present (the source name is kept).
    pub tied_weights: Vec<(String, String)>,
    /// Model weights or adapter weights (file names).
    pub kind: WeightsKind,
    /// `metadata.total_parameters` of the index. transformers counts the model's parameters
    /// (not buffers); by default this is the element count of the tensors written, which is
    /// the same for models without persistent buffers.
    pub total_parameters: Option<u64>,
    /// `config.json` to write (base checkpoints).
    pub config: Option<ModelConfig>,
    /// `generation_config.json` to write (models that can generate).
    pub generation_config: Option<GenerationConfig>,
    /// Extra files to write as they are: `(file name, bytes)` (an adapter config, a card).
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// Sync every file and folder to disk before the new folder is swapped in (default), so a
    /// power loss leaves the old checkpoint or the new one. `false` keeps the atomic swap for
    /// readers but lets the kernel write back later, like transformers (which never syncs).
    pub durable: bool,
    /// Told the bytes of tensor data written as they are written (none by default): the one
    /// progress mechanism of every save, including those of remap, reshard and extract.
    pub progress: Progress,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            variant: None,
            is_main_process: true,
            metadata: pt_metadata(),
            tied_weights: Vec::new(),
            kind: WeightsKind::Model,
            total_parameters: None,
            config: None,
            generation_config: None,
            extra_files: Vec::new(),
            durable: true,
            progress: Progress::default(),
        }
    }
}

crate::option_setters!(SaveOptions {
    max_shard_size: u64,
    variant: Some(String),
    is_main_process: bool,
    metadata: BTreeMap<String, String>,
    tied_weights: Vec<(String, String)>,
    kind: WeightsKind,
    total_parameters: Some(u64),
    config: Some(ModelConfig),
    generation_config: Some(GenerationConfig),
    extra_files: Vec<(String, Vec<u8>)>,
    durable: bool,
    progress: Progress,
});

/// What a save wrote (serialized as the `save` object of `peftkit reshard --json` and others).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SaveReport {
    /// Final folder.
    pub dir: PathBuf,
    /// Weight files, in shard order.
    pub weight_files: Vec<String>,
    /// The index file, when sharded.
    pub index_file: Option<String>,
    /// Tensors written, after tie removal.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub total_size: u64,
    /// Tie targets dropped.
    pub dropped_ties: Vec<String>,
}

/// A save planned but not yet written: which tensors go to which file.
#[derive(Debug, Clone)]
pub struct SavePlan {
    /// `(file name, tensor names)` in shard order.
    pub shards: Vec<(String, Vec<String>)>,
    /// The index, when there is more than one shard.
    pub index: Option<(String, WeightIndex)>,
    /// Tie targets dropped.
    pub dropped_ties: Vec<String>,
    /// Bytes of tensor data.
    pub total_size: u64,
}

/// torch's name of a floating-point dtype (`str(torch.bfloat16)` without `torch.`), as
/// transformers writes it in `config.json`'s `dtype`; `None` for integer and bool types.
pub fn torch_dtype_name(dtype: crate::Dtype) -> Option<&'static str> {
    use crate::Dtype::*;
    Some(match dtype {
        F64 => "float64",
        F32 => "float32",
        F16 => "float16",
        BF16 => "bfloat16",
        F8_E4M3 => "float8_e4m3fn",
        F8_E5M2 => "float8_e5m2",
        F8_E8M0 => "float8_e8m0fnu",
        F8_E4M3FNUZ => "float8_e4m3fnuz",
        F8_E5M2FNUZ => "float8_e5m2fnuz",
        _ => return None,
    })
}

/// Removes declared tie targets and refuses aliasing no tie explains.
fn remove_ties(state: &StateDict, ties: &[(String, String)]) -> Result<(Vec<String>, Vec<String>)> {
    let mut dropped = Vec::new();
    for (target, source) in ties {
        let (Some(t), Some(s)) = (state.get(target), state.get(source)) else {
            continue;
        };
        if target == source || dropped.contains(target) {
            continue;
        }
        let same_storage = t.storage_key().is_some() && t.storage_key() == s.storage_key();
        if !same_storage
            && (t.dtype() != s.dtype() || t.shape() != s.shape() || t.bytes()? != s.bytes()?)
        {
            return Err(CheckpointError::TiedTensorsDiffer {
                target: target.clone(),
                source_name: source.clone(),
            });
        }
        dropped.push(target.clone());
    }
    let kept: Vec<String> = state
        .keys()
        .filter(|k| !dropped.contains(k))
        .cloned()
        .collect();
    // Aliasing among what is left: identical storage is an undeclared tie; a partial overlap
    // cannot be written at all. Disjoint views of one buffer are fine (written separately).
    let mut by_buffer: HashMap<(usize, u64, u64), &str> = HashMap::new();
    let mut ranges: Vec<(usize, u64, u64, &str)> = Vec::new();
    for name in &kept {
        let Some(key) = state[name].storage_key() else {
            continue;
        };
        if key.start == key.end {
            continue;
        }
        let ptr = key.ptr;
        if let Some(first) = by_buffer.insert((ptr, key.start, key.end), name) {
            return Err(CheckpointError::UndeclaredAliasing {
                first: first.to_owned(),
                second: name.clone(),
            });
        }
        ranges.push((ptr, key.start, key.end, name));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        let ((p1, _, e1, n1), (p2, s2, _, n2)) = (w[0], w[1]);
        if p1 == p2 && s2 < e1 {
            return Err(CheckpointError::PartialOverlap {
                first: n1.to_owned(),
                second: n2.to_owned(),
            });
        }
    }
    Ok((kept, dropped))
}

/// Plans a save: tie removal, alias checks, shard assignment and the index. Nothing is
/// written.
pub fn plan_save(state: &StateDict, options: &SaveOptions) -> Result<SavePlan> {
    let names = WeightsNames::new(options.kind, options.variant.as_deref())?;
    let (kept, dropped_ties) = remove_ties(state, &options.tied_weights)?;
    // Families (storages shared by views in transformers) are planned as one unit placed at
    // the first member.
    let mut items: Vec<PlanItem> = Vec::new();
    let mut family_slot: HashMap<u64, usize> = HashMap::new();
    for name in &kept {
        let t: &Tensor = &state[name];
        let size = t.byte_len() as u64;
        match t.family().and_then(|f| family_slot.get(&f).copied()) {
            Some(slot) => {
                items[slot].names.push(name.clone());
                items[slot].size += size;
            }
            None => {
                if let Some(f) = t.family() {
                    family_slot.insert(f, items.len());
                }
                items.push(PlanItem {
                    names: vec![name.clone()],
                    size,
                });
            }
        }
    }
    // A family's size is only known once all members are seen, so plan after grouping.
    let groups = plan_shards(&items, options.max_shard_size);
    let total_size: u64 = items.iter().map(|i| i.size).sum();
    let n = groups.len();
    let shards: Vec<(String, Vec<String>)> = groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            (
                if n == 1 {
                    names.single()
                } else {
                    names.shard(i + 1, n)
                },
                g,
            )
        })
        .collect();
    let index = (n > 1).then(|| {
        let weight_map = shards
            .iter()
            .flat_map(|(f, g)| g.iter().map(move |t| (t.clone(), f.clone())))
            .collect();
        let total_parameters = options
            .total_parameters
            .unwrap_or_else(|| kept.iter().map(|k| state[k].numel() as u64).sum());
        (
            names.index(),
            WeightIndex {
                total_parameters: Some(total_parameters),
                total_size: Some(total_size),
                extra_metadata: Default::default(),
                weight_map,
            },
        )
    });
    Ok(SavePlan {
        shards,
        index,
        dropped_ties,
        total_size,
    })
}

/// Saves `state` into `dir` as transformers' `save_pretrained` does: `config.json`,
/// `generation_config.json`, one file or greedy shards with `{"format":"pt"}` headers, and
/// the index. The folder changes atomically (see [`crate::DirTransaction`]).
///
/// Stale weights are handled more strictly than transformers: old shards of the *same* stem
/// and variant are removed (transformers also deletes other variants' shards), a stale
/// single file is removed when the new save is sharded and a stale index when it is not
/// (transformers leaves both, and the single file then shadows the new shards).
///
/// ```
/// use peftkit_checkpoint::{save_pretrained, Checkpoint, Dtype, SaveOptions, StateDict, Tensor};
/// let dir = tempfile::tempdir().unwrap();
/// let mut sd = StateDict::new();
/// sd.insert("w".into(), Tensor::from_bytes(Dtype::F32, vec![2], vec![0; 8]).unwrap());
/// save_pretrained(dir.path(), &sd, &SaveOptions::default()).unwrap();
/// assert_eq!(Checkpoint::open(dir.path()).unwrap().len(), 1);
/// ```
pub fn save_pretrained(dir: &Path, state: &StateDict, options: &SaveOptions) -> Result<SaveReport> {
    if dir.exists() && !dir.is_dir() {
        return Err(CheckpointError::NotADirectory(dir.to_owned()));
    }
    if state.is_empty() {
        return Err(CheckpointError::EmptyStateDict(dir.to_owned()));
    }
    let plan = plan_save(state, options)?;
    save_planned(dir, state, &plan, options)
}

impl SavePlan {
    /// The layout of an existing checkpoint: the same files holding the same tensors, and the
    /// same index (its metadata included). Saving a state dict with the same names and shapes
    /// through this plan reproduces the checkpoint's layout exactly.
    pub fn from_checkpoint(ckpt: &crate::Checkpoint) -> Self {
        let shards: Vec<(String, Vec<String>)> = ckpt
            .files
            .iter()
            .map(|f| {
                let name = f
                    .path
                    .strip_prefix(&ckpt.dir)
                    .unwrap_or(&f.path)
                    .to_string_lossy()
                    .into_owned();
                (
                    name,
                    f.header.tensors.iter().map(|t| t.name.clone()).collect(),
                )
            })
            .collect();
        let index = match (&ckpt.layout, &ckpt.index) {
            (crate::FileLayout::Sharded { index, .. }, Some(idx)) => {
                let name = index
                    .strip_prefix(&ckpt.dir)
                    .unwrap_or(index)
                    .to_string_lossy()
                    .into_owned();
                Some((name, idx.clone()))
            }
            _ => None,
        };
        SavePlan {
            shards,
            index,
            dropped_ties: Vec::new(),
            total_size: ckpt.total_bytes(),
        }
    }
}

/// Writes `state` into `dir` following an existing `plan` (from [`plan_save`] or
/// [`SavePlan::from_checkpoint`]), atomically, with the configs and extra files of
/// `options`. Every tensor the plan names must be in `state`.
///
/// `options.progress` is told the bytes written.
pub fn save_planned(
    dir: &Path,
    state: &StateDict,
    plan: &SavePlan,
    options: &SaveOptions,
) -> Result<SaveReport> {
    check_plan(dir, state, plan)?;
    let report = planned_report(dir, plan);
    if !options.is_main_process {
        return Ok(SaveReport {
            weight_files: vec![],
            index_file: None,
            ..report
        });
    }
    let tx = DirTransaction::begin(dir)?.durable(options.durable);
    let staged = write_companions(tx.path(), state, options)
        .and_then(|()| write_shards(tx.path(), state, plan, options, &|_| true));
    staged.map_err(|e| explain_abort(e, dir))?;
    finish(tx, plan, options).map_err(|e| explain_abort(e, dir))?;
    Ok(report)
}

/// Refuses a plan naming a tensor `state` does not hold, or an output that is a file.
pub(crate) fn check_plan(dir: &Path, state: &StateDict, plan: &SavePlan) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(CheckpointError::NotADirectory(dir.to_owned()));
    }
    for (file, group) in &plan.shards {
        if let Some(missing) = group.iter().find(|n| !state.contains_key(*n)) {
            return Err(CheckpointError::MissingTensor {
                path: PathBuf::from(file),
                tensor: missing.clone(),
            });
        }
    }
    Ok(())
}

/// What saving `plan` into `dir` writes.
pub(crate) fn planned_report(dir: &Path, plan: &SavePlan) -> SaveReport {
    SaveReport {
        dir: dir.to_owned(),
        weight_files: plan.shards.iter().map(|(f, _)| f.clone()).collect(),
        index_file: plan.index.as_ref().map(|(f, _)| f.clone()),
        tensors: plan.shards.iter().map(|(_, g)| g.len()).sum(),
        total_size: plan.total_size,
        dropped_ties: plan.dropped_ties.clone(),
    }
}

/// Writes the configs and extra files of `options` into `staging`.
pub(crate) fn write_companions(
    staging: &Path,
    state: &StateDict,
    options: &SaveOptions,
) -> Result<()> {
    if let Some(c) = &options.config {
        let mut c = c.clone();
        // transformers sets `dtype` to the dtype of the model's first floating-point
        // parameter on every save; a state dict stands in for the model here.
        if let Some(name) = state.values().find_map(|t| torch_dtype_name(t.dtype())) {
            c.set_dtype(name);
        }
        c.write(staging)?;
    }
    if let Some(g) = &options.generation_config {
        g.write(staging)?;
    }
    for (name, bytes) in &options.extra_files {
        let p = staging.join(name);
        std::fs::write(&p, bytes).map_err(|e| CheckpointError::io(&p, e))?;
    }
    Ok(())
}

/// Writes the shards of `plan` that `owned` selects (by position) into `staging`, each synced
/// as soon as it is complete when `options.durable`.
pub(crate) fn write_shards(
    staging: &Path,
    state: &StateDict,
    plan: &SavePlan,
    options: &SaveOptions,
    owned: &dyn Fn(usize) -> bool,
) -> Result<()> {
    // All shards are written by one pool of workers; each finished shard is synced on its own
    // thread while the others are written, and all are synced before the folder is swapped in.
    let shards: Vec<&(String, Vec<String>)> = plan
        .shards
        .iter()
        .enumerate()
        .filter(|(i, _)| owned(*i))
        .map(|(_, s)| s)
        .collect();
    if shards.is_empty() {
        return Ok(());
    }
    let jobs = shards
        .iter()
        .map(|(file, group)| FileJob {
            path: staging.join(file),
            tensors: group.iter().map(|n| (n.as_str(), &state[n])).collect(),
            direct: options.durable,
        })
        .collect();
    let mut syncs = Vec::new();
    let on_bytes = &mut |n| options.progress.report(n);
    let written = write_files(jobs, &options.metadata, on_bytes, &mut |f, _, handle| {
        if options.durable {
            let path = staging.join(&shards[f].0);
            syncs.push((path, std::thread::spawn(move || handle.sync_all())));
        }
    });
    // Wait for the sync threads even when writing failed, so none outlives the staging folder.
    let synced: Vec<_> = syncs.into_iter().map(|(p, h)| (p, h.join())).collect();
    written?;
    for (path, sync) in synced {
        match sync {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CheckpointError::io(path, e)),
            Err(_) => {
                return Err(CheckpointError::io(
                    path,
                    std::io::Error::other("sync thread panicked"),
                ))
            }
        }
    }
    Ok(())
}

/// Writes the index of `plan` and swaps the staging folder in, dropping stale weights.
pub(crate) fn finish(tx: DirTransaction, plan: &SavePlan, options: &SaveOptions) -> Result<()> {
    if let Some((file, index)) = &plan.index {
        let path = tx.path().join(file);
        std::fs::write(&path, index.to_json_string()).map_err(|e| CheckpointError::io(&path, e))?;
    }
    let names = WeightsNames::new(options.kind, options.variant.as_deref())?;
    let (single, index_name) = (names.single(), names.index());
    tx.durable(options.durable).commit(|old| {
        old == single
            || old == index_name
            || names.is_shard_of_this_stem(old)
            || plan.shards.iter().any(|(f, _)| f == old)
    })
}
