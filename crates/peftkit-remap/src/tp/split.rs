//! `split`: a checkpoint cut into one folder per tensor-parallel rank, each holding that rank's
//! slices exactly as transformers' tensor-parallel loading reads them for that rank.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use peftkit_checkpoint::{
    companion_files, ensure_apart, save_planned, DirTransaction, Progress, SaveOptions, SavePlan,
    StateDict, Tensor, WeightIndex,
};

use super::chunk;
use super::manifest::{RankManifest, ShardedTensor, MANIFEST_NAME};
use super::plan::TpPlan;
use super::slice::{self, Files};
use crate::engine::{Mapping, Revert};
use crate::error::{RemapError, Result};
use crate::resave::Source;

/// Options of [`split`].
#[derive(Debug, Clone)]
pub struct SplitOptions {
    /// How many ranks (`torch.distributed`'s tensor-parallel size).
    pub world_size: usize,
    /// The plan; `None`: the plan transformers applies to the checkpoint's model type.
    pub plan: Option<TpPlan>,
    /// The model type (default: `config.json`'s `model_type`), for the plan and the
    /// conversion table.
    pub model_type: Option<String>,
    /// Conversion table files added to the embedded ones.
    pub tables: Vec<PathBuf>,
    /// The weights variant to read (`model.VARIANT.safetensors`, as `from_pretrained(variant=…)`);
    /// the rank folders keep the source's file names, so they hold that variant too.
    pub variant: Option<String>,
    /// Sync the output to disk before it is swapped in (default `true`).
    pub durable: bool,
    /// Told the bytes written.
    pub progress: Progress,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions {
            world_size: 2,
            plan: None,
            model_type: None,
            tables: Vec::new(),
            variant: None,
            durable: true,
            progress: Progress::default(),
        }
    }
}

peftkit_checkpoint::option_setters!(SplitOptions {
    world_size: usize,
    plan: Some(TpPlan),
    model_type: Some(String),
    tables: Vec<PathBuf>,
    variant: Some(String),
    durable: bool,
    progress: Progress,
});

/// What [`split`] wrote (`peftkit split --json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitReport {
    /// The rank folders, `rank0` first.
    pub ranks: Vec<PathBuf>,
    /// The plan used.
    pub plan: String,
    /// Tensors cut among the ranks.
    pub sharded: usize,
    /// Tensors every rank holds whole.
    pub replicated: usize,
    /// Bytes of tensor data in each rank.
    pub rank_bytes: Vec<u64>,
}

/// How one on-disk tensor is cut: its style, the on-disk dim and each rank's ranges of it.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    style: String,
    dim: usize,
    per_rank: Vec<Vec<Range<usize>>>,
}

/// The name of rank `r`'s folder.
pub fn rank_dir_name(rank: usize) -> String {
    format!("rank{rank}")
}

fn is_rank_dir_name(name: &str) -> bool {
    name.strip_prefix("rank")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Splits the checkpoint in `src` into `out/rank0` … `out/rank{N-1}` by a tensor-parallel plan.
///
/// Each rank folder is a checkpoint of its own: the source's files under the same names, each
/// holding the same tensors, cut to the rank's slice (`torch.chunk` of the sharded dim, the
/// last ranks shorter or empty when it does not divide; a packed `gate_up_proj` gives each rank
/// its chunk of the gate and of the up half); the index with the rank's totals; the source's
/// other files (`config.json`, tokenizer) unchanged; and [`RankManifest`] (`tensor_parallel.json`).
/// A variant source (`options.variant`) keeps its variant's file names in every rank, and the
/// manifest records it for [`crate::gather`].
/// On-disk tensors of a fused parameter (per-expert MoE weights) are cut as transformers' loader
/// cuts them, each along the dim that maps to the sharded one. Streams: each slice is read from
/// the source when written. `out` changes atomically.
///
/// ```no_run
/// use std::path::Path;
/// use peftkit_remap::{gather, split, GatherOptions, SplitOptions};
/// let report = split(Path::new("llama"), Path::new("llama-tp4"),
///                    &SplitOptions { world_size: 4, ..Default::default() }).unwrap();
/// gather(&report.ranks, Path::new("llama-again"), &GatherOptions::default()).unwrap();
/// ```
pub fn split(src: &Path, out: &Path, options: &SplitOptions) -> Result<SplitReport> {
    ensure_apart(out, &[src])?;
    let n = options.world_size;
    if n == 0 {
        return Err(RemapError::tp("world_size", "must be at least 1"));
    }
    let source = Source::open(
        src,
        options.variant.as_deref(),
        options.model_type.as_deref(),
        &options.tables,
    )?;
    if source.dir.join(MANIFEST_NAME).is_file() {
        return Err(RemapError::tp(
            src.display().to_string(),
            "this is a rank folder of an earlier split; gather the ranks first (peftkit gather)",
        ));
    }
    let plan = match &options.plan {
        Some(p) => p.clone(),
        None => {
            let model_type =
                source
                    .model_type
                    .as_deref()
                    .ok_or_else(|| RemapError::NoModelType {
                        path: source.dir.clone(),
                    })?;
            super::TpPlans::builtin()?.for_model_type(model_type)?
        }
    };
    let state = source.ckpt.state_dict();
    let cuts = cuts(&state, &source.mapping, &plan, n)?;
    let companions = companion_files(&source.dir)?;
    let layout = SavePlan::from_checkpoint(&source.ckpt);
    let tx = DirTransaction::begin(out)?.durable(options.durable);
    let mut files = Files::default();
    let mut rank_bytes = Vec::new();
    for rank in 0..n {
        let mut rank_state = StateDict::with_capacity(state.len());
        let mut manifest = RankManifest::new(rank, n, plan.origin());
        manifest.source_index_metadata = source.ckpt.index.as_ref().map(index_metadata);
        manifest.variant = options.variant.clone();
        for (name, t) in &state {
            let Some(cut) = cuts.get(name) else {
                rank_state.insert(name.clone(), t.clone());
                continue;
            };
            let ranges = &cut.per_rank[rank];
            rank_state.insert(
                name.clone(),
                slice::slice(&mut files, name, t, cut.dim, ranges)?,
            );
            manifest.tensors.insert(
                name.clone(),
                ShardedTensor {
                    style: cut.style.clone(),
                    shape: t.shape().to_vec(),
                    dim: cut.dim,
                    ranges: ranges.iter().map(|r| [r.start, r.end]).collect(),
                },
            );
        }
        let mut save = SaveOptions {
            metadata: source.ckpt.metadata().cloned().unwrap_or_default(),
            variant: options.variant.clone(),
            durable: options.durable,
            progress: options.progress.clone(),
            extra_files: companions.clone(),
            ..Default::default()
        };
        save.extra_files.push((
            MANIFEST_NAME.to_owned(),
            manifest.to_json_string().into_bytes(),
        ));
        let plan = with_totals(&layout, &rank_state, source.ckpt.index.as_ref());
        rank_bytes.push(plan.total_size);
        save_planned(
            &tx.path().join(rank_dir_name(rank)),
            &rank_state,
            &plan,
            &save,
        )?;
    }
    tx.commit(is_rank_dir_name)?;
    Ok(SplitReport {
        ranks: (0..n).map(|r| out.join(rank_dir_name(r))).collect(),
        plan: plan.origin().to_owned(),
        sharded: cuts.len(),
        replicated: state.len() - cuts.len(),
        rank_bytes,
    })
}

/// The source index's `metadata` object, as read.
fn index_metadata(index: &WeightIndex) -> serde_json::Map<String, serde_json::Value> {
    let mut m = index.extra_metadata.clone();
    if let Some(p) = index.total_parameters {
        m.insert("total_parameters".into(), p.into());
    }
    if let Some(s) = index.total_size {
        m.insert("total_size".into(), s.into());
    }
    m
}

/// `layout` (the source's files and index) with the totals of `state`: the index of a rank
/// holds the same names in the same files, and counts what the rank holds.
pub(crate) fn with_totals(
    layout: &SavePlan,
    state: &StateDict,
    src: Option<&WeightIndex>,
) -> SavePlan {
    let total_size: u64 = state.values().map(|t| t.byte_len() as u64).sum();
    let mut plan = layout.clone();
    plan.total_size = total_size;
    if let (Some((_, index)), Some(src)) = (plan.index.as_mut(), src) {
        index.total_size = src.total_size.map(|_| total_size);
        index.total_parameters = src
            .total_parameters
            .map(|_| state.values().map(|t| t.numel() as u64).sum());
    }
    plan
}

/// How every sharded on-disk tensor of `state` is cut among `world_size` ranks by `plan`:
/// the plan applies to the v5 parameters (`mapping` forward), and each is traced back to the
/// on-disk tensors it is loaded from.
pub(crate) fn cuts(
    state: &StateDict,
    mapping: &Mapping,
    plan: &TpPlan,
    world_size: usize,
) -> Result<IndexMap<String, Cut>> {
    let forward = mapping.forward(state)?;
    let by_file: HashMap<(&Path, u64), &str> = state
        .iter()
        .filter_map(|(n, t)| Some((t.file_source()?, n.as_str())))
        .collect();
    let revert = Revert::AsLoaded(forward.used.clone());
    let mut out: IndexMap<String, Cut> = IndexMap::new();
    let mut add = |name: String, cut: Cut, v5: &str| match out.insert(name.clone(), cut) {
        None => Ok(()),
        Some(_) => Err(RemapError::tp(
            format!("tensor `{name}`"),
            format!("two parameters of the plan claim it (the second is `{v5}`)"),
        )),
    };
    for (v5, t) in &forward.state {
        let (style, placement) = plan.placement(v5, t.shape().len())?;
        let (Some(style), Some(dim)) = (style, placement.dim()) else {
            continue;
        };
        if let Some(name) = same_tensor(state, &by_file, v5, t) {
            let per_rank = (0..world_size)
                .map(|r| placement.ranges(t.shape()[dim], world_size, r))
                .collect();
            add(
                name,
                Cut {
                    style,
                    dim,
                    per_rank,
                },
                v5,
            )?;
            continue;
        }
        let not_followed = |why: String| {
            RemapError::tp(
                format!("tensor `{v5}`"),
                format!("style `{style}` shards it, but on disk it is {why}; split follows plain tensors and per-expert MoE weights: convert the checkpoint to the transformers-v5 layout first (peftkit remap --to transformers-v5)"),
            )
        };
        let pieces = mapping
            .fused_pieces(v5, t.shape(), &revert)
            .map_err(|e| not_followed(format!("computed from other tensors ({e})")))?;
        for piece in pieces {
            if piece.expert.is_none() {
                return Err(not_followed(format!(
                    "`{}`, a part of a fused tensor that is not a list of experts",
                    piece.original_name
                )));
            }
            let on_disk = state
                .get(&piece.original_name)
                .filter(|d| d.shape() == piece.original_shape);
            let (Some(k), Some(_)) = (piece.axes.iter().position(|a| *a == Some(dim)), on_disk)
            else {
                return Err(not_followed(format!(
                    "`{}`, whose dims do not carry the sharded dim {dim}",
                    piece.original_name
                )));
            };
            // transformers' per-expert loading cuts each expert's tensor on its own, along
            // the dim that maps to the sharded one (DtensorShardOperation, MoE path).
            let size = piece.original_shape[k];
            let per_rank = (0..world_size)
                .map(|r| chunk::contiguous(0..size, world_size, r))
                .collect();
            add(
                piece.original_name,
                Cut {
                    style: style.clone(),
                    dim: k,
                    per_rank,
                },
                v5,
            )?;
        }
    }
    Ok(out)
}

/// The on-disk tensor a v5 tensor is, unchanged: the same name, or the same file bytes under
/// another name (a rename; `by_file` maps file regions to on-disk names).
fn same_tensor(
    state: &StateDict,
    by_file: &HashMap<(&Path, u64), &str>,
    v5: &str,
    t: &Tensor,
) -> Option<String> {
    let same = |d: &Tensor| d.shape() == t.shape() && d.dtype() == t.dtype();
    if state
        .get(v5)
        .is_some_and(|d| same(d) && d.file_source() == t.file_source())
    {
        return Some(v5.to_owned());
    }
    let name = *by_file.get(&t.file_source()?)?;
    same(&state[name]).then(|| name.to_owned())
}
