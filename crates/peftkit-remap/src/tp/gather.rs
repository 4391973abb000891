//! `gather`: the full checkpoint rebuilt from the rank folders `split` wrote.

use std::path::{Path, PathBuf};

use peftkit_checkpoint::{
    companion_files, ensure_apart, save_planned, Checkpoint, Progress, SaveOptions, SavePlan,
    SaveReport, StateDict, WeightIndex, WeightsKind,
};

use super::manifest::{RankManifest, MANIFEST_NAME};
use super::slice::{self, Files, Piece};
use crate::error::{RemapError, Result};

/// Options of [`gather`].
#[derive(Debug, Clone)]
pub struct GatherOptions {
    /// Sync the output to disk before it is swapped in (default `true`).
    pub durable: bool,
    /// Told the bytes written.
    pub progress: Progress,
}

impl Default for GatherOptions {
    fn default() -> Self {
        GatherOptions {
            durable: true,
            progress: Progress::default(),
        }
    }
}

peftkit_checkpoint::option_setters!(GatherOptions {
    durable: bool,
    progress: Progress,
});

/// One opened rank folder.
struct Rank {
    dir: PathBuf,
    manifest: RankManifest,
    ckpt: Checkpoint,
}

/// Rebuilds into `out` the checkpoint that [`crate::split`] cut into the folders `ranks` (in
/// any order; every rank exactly once). The files, tensors, index and companion files are the
/// source's, byte for byte, when the source was written in safetensors' canonical form (as
/// transformers, safetensors and peftkit write). Sharded tensors are assembled from every rank
/// when written; replicated ones are copied from rank 0. `out` changes atomically. The ranks of
/// a variant source hold that variant's files (the manifest says which), and so does `out`.
pub fn gather(ranks: &[PathBuf], out: &Path, options: &GatherOptions) -> Result<SaveReport> {
    let inputs: Vec<&Path> = ranks.iter().map(PathBuf::as_path).collect();
    ensure_apart(out, &inputs)?;
    let ranks = open_ranks(ranks)?;
    let first = &ranks[0];
    let mut files = Files::default();
    let mut state = StateDict::with_capacity(first.ckpt.len());
    for (name, t) in first.ckpt.tensors() {
        let Some(sharded) = first.manifest.tensors.get(name) else {
            for r in &ranks[1..] {
                let other = r
                    .ckpt
                    .get(name)
                    .filter(|o| o.shape() == t.shape() && o.dtype() == t.dtype());
                if other.is_none() {
                    return Err(RemapError::tp(
                        format!("tensor `{name}`"),
                        format!(
                            "replicated in {} but not the same shape in {}",
                            first.dir.display(),
                            r.dir.display()
                        ),
                    ));
                }
            }
            state.insert(name.to_owned(), t.clone());
            continue;
        };
        let mut ranges = Vec::with_capacity(ranks.len());
        for r in &ranks {
            let entry = r.manifest.tensors.get(name).filter(|e| {
                e.shape == sharded.shape && e.dim == sharded.dim && e.style == sharded.style
            });
            let (Some(entry), Some(_)) = (entry, r.ckpt.get(name)) else {
                return Err(RemapError::tp(
                    format!("tensor `{name}`"),
                    format!(
                        "{} does not hold a slice of it matching {}",
                        r.dir.display(),
                        first.dir.display()
                    ),
                ));
            };
            ranges.push(entry.ranges());
        }
        let pieces: Vec<Piece<'_>> = ranks
            .iter()
            .zip(&ranges)
            .map(|(r, ranges)| Piece {
                tensor: r.ckpt.get(name).expect("checked above"),
                ranges,
            })
            .collect();
        let full = slice::assemble(
            &mut files,
            name,
            &sharded.shape,
            sharded.dim,
            &pieces,
            |i| ranks[i].dir.clone(),
        )?;
        state.insert(name.to_owned(), full);
    }
    let mut plan = SavePlan::from_checkpoint(&first.ckpt);
    plan.total_size = state.values().map(|t| t.byte_len() as u64).sum();
    if let Some((_, index)) = plan.index.as_mut() {
        *index = source_index(first, index, plan.total_size)?;
    }
    let extra_files = companion_files(&first.dir)?
        .into_iter()
        .filter(|(n, _)| n != MANIFEST_NAME)
        .collect();
    let save = SaveOptions {
        metadata: first.ckpt.metadata().cloned().unwrap_or_default(),
        variant: first.manifest.variant.clone(),
        durable: options.durable,
        progress: options.progress.clone(),
        extra_files,
        ..Default::default()
    };
    Ok(save_planned(out, &state, &plan, &save)?)
}

/// Opens every rank folder and checks they are the ranks of one split, each once; returns them
/// in rank order.
fn open_ranks(dirs: &[PathBuf]) -> Result<Vec<Rank>> {
    let mut ranks = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let (manifest, ckpt) = open_rank(dir)?;
        ranks.push(Rank {
            dir: dir.clone(),
            manifest,
            ckpt,
        });
    }
    ranks.sort_by_key(|r| r.manifest.rank);
    let n = ranks.first().map_or(0, |r| r.manifest.world_size);
    let missing: Vec<usize> = (0..n)
        .filter(|i| !ranks.iter().any(|r| r.manifest.rank == *i))
        .collect();
    let what = "the rank folders";
    if ranks.is_empty() {
        return Err(RemapError::tp(what, "none given"));
    }
    if !missing.is_empty() || ranks.len() != n {
        return Err(RemapError::tp(
            what,
            format!(
                "a split into {n} ranks needs each of rank0..rank{} once; given ranks {:?} (missing {missing:?})",
                n - 1,
                ranks.iter().map(|r| r.manifest.rank).collect::<Vec<_>>()
            ),
        ));
    }
    let first = &ranks[0];
    for r in &ranks[1..] {
        let agree = r.manifest.world_size == n
            && r.manifest.plan == first.manifest.plan
            && r.manifest.variant == first.manifest.variant
            && r.manifest.source_index_metadata == first.manifest.source_index_metadata
            && r.manifest.tensors.keys().eq(first.manifest.tensors.keys())
            && same_files(&r.ckpt, &first.ckpt);
        if !agree {
            return Err(RemapError::tp(
                r.dir.display().to_string(),
                format!(
                    "not a rank of the same split as {} (world size, plan, files or tensors differ)",
                    first.dir.display()
                ),
            ));
        }
    }
    Ok(ranks)
}

/// A rank folder of [`crate::split`]: its manifest, and its weights (of the variant the manifest
/// names).
///
/// ```no_run
/// let (manifest, ckpt) = peftkit_remap::open_rank(std::path::Path::new("llama-tp2/rank1")).unwrap();
/// println!("rank {} of {}: {} bytes", manifest.rank, manifest.world_size, ckpt.total_bytes());
/// ```
pub fn open_rank(dir: &Path) -> Result<(RankManifest, Checkpoint)> {
    let manifest = RankManifest::read(dir)?;
    let ckpt = Checkpoint::open_kind(dir, WeightsKind::Model, manifest.variant.as_deref())?;
    Ok((manifest, ckpt))
}

/// The source's index: rank 0's weight map with the metadata the split recorded, whose total
/// size must be what the gathered tensors hold.
fn source_index(first: &Rank, rank_index: &WeightIndex, total_size: u64) -> Result<WeightIndex> {
    let mut index = WeightIndex {
        total_parameters: None,
        total_size: None,
        extra_metadata: first
            .manifest
            .source_index_metadata
            .clone()
            .unwrap_or_default(),
        weight_map: rank_index.weight_map.clone(),
    };
    let meta = &mut index.extra_metadata;
    index.total_parameters = meta.remove("total_parameters").and_then(|v| v.as_u64());
    index.total_size = meta.remove("total_size").and_then(|v| v.as_u64());
    if index.total_size.is_some_and(|s| s != total_size) {
        return Err(RemapError::tp(
            first.dir.join(MANIFEST_NAME).display().to_string(),
            format!(
                "the source index's total_size is {:?} but the gathered tensors hold {total_size} bytes",
                index.total_size
            ),
        ));
    }
    Ok(index)
}

/// Whether two checkpoints have the same files, holding the same tensor names (the rank
/// folders of one split do).
fn same_files(a: &Checkpoint, b: &Checkpoint) -> bool {
    let names = |c: &Checkpoint| -> Vec<(String, Vec<String>)> {
        c.files
            .iter()
            .map(|f| {
                (
                    f.path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    f.header.tensors.iter().map(|t| t.name.clone()).collect(),
                )
            })
            .collect()
    };
    names(a) == names(b)
}
