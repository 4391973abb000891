//! Rank-aware saving for distributed training: every rank of a job calls
//! [`save_pretrained_distributed`] with the same state dict and options; each writes the shards
//! it owns, and rank 0 writes the index and configs and swaps the folder in once all shards are
//! on disk. The barrier between the steps is the caller's (`torch.distributed.barrier`, burn's
//! collective, …), behind the [`Barrier`] trait.

use std::path::Path;

use crate::atomic::DirTransaction;
use crate::error::{CheckpointError, Result};
use crate::save::{
    check_plan, finish, plan_save, planned_report, write_companions, write_shards, SaveOptions,
    SaveReport,
};
use crate::tensor::StateDict;

/// The collective a distributed save waits on: `wait` returns once every rank of the job has
/// called it with the same `step`. An error stops this rank's save (the other ranks' barrier
/// then decides how long they wait, as with `torch.distributed`).
pub trait Barrier {
    /// Blocks until every rank reached `step`.
    fn wait(&self, step: &str)
        -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// Which rank of how many is saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// How many ranks save together.
    pub world_size: usize,
}

impl Rank {
    /// Whether this rank writes shard `index` (the `index`-th file of the plan): shards go to
    /// ranks in turn, so every rank writes about the same number of bytes.
    pub fn owns(&self, index: usize) -> bool {
        index % self.world_size == self.rank
    }
}

/// [`crate::save_pretrained`] by `rank.world_size` processes, giving the same files byte for
/// byte. Every rank plans the same save from the same state dict and options (tensors that are
/// lazy handles: a rank only reads the tensors of the shards it owns), then:
///
/// 1. rank 0 creates the shared staging folder beside `dir`; barrier `staging`;
/// 2. each rank writes (and, when durable, syncs) the shards it owns ([`Rank::owns`]);
///    barrier `shards`;
/// 3. rank 0 writes the configs, extra files and the index and swaps the folder in; barrier
///    `commit`, so no rank returns before the checkpoint exists.
///
/// The report of every rank describes the whole save; its `weight_files` are the files this
/// rank wrote. `options.is_main_process` is ignored (the rank decides). Two distributed saves
/// into the same `dir` at once are not supported (their staging folders would be one).
///
/// ```
/// use peftkit_checkpoint::{save_pretrained_distributed, Barrier, Checkpoint, Dtype, Rank, SaveOptions, StateDict, Tensor};
/// struct Alone;
/// impl Barrier for Alone {
///     fn wait(&self, _: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> { Ok(()) }
/// }
/// let dir = tempfile::tempdir().unwrap();
/// let mut sd = StateDict::new();
/// sd.insert("w".into(), Tensor::from_bytes(Dtype::F32, vec![2], vec![0; 8]).unwrap());
/// let rank = Rank { rank: 0, world_size: 1 };
/// save_pretrained_distributed(dir.path(), &sd, &SaveOptions::default(), rank, &Alone).unwrap();
/// assert_eq!(Checkpoint::open(dir.path()).unwrap().len(), 1);
/// ```
pub fn save_pretrained_distributed(
    dir: &Path,
    state: &StateDict,
    options: &SaveOptions,
    rank: Rank,
    barrier: &dyn Barrier,
) -> Result<SaveReport> {
    if rank.rank >= rank.world_size {
        return Err(CheckpointError::BadRank {
            rank: rank.rank,
            world_size: rank.world_size,
        });
    }
    if state.is_empty() {
        return Err(CheckpointError::EmptyStateDict(dir.to_owned()));
    }
    let plan = plan_save(state, options)?;
    check_plan(dir, state, &plan)?;
    let wait = |step: &str| {
        barrier
            .wait(step)
            .map_err(|source| CheckpointError::Barrier {
                rank: rank.rank,
                step: step.to_owned(),
                dir: dir.to_owned(),
                source,
            })
    };
    let tx = if rank.rank == 0 {
        Some(DirTransaction::begin_shared(dir)?)
    } else {
        None
    };
    wait("staging")?;
    let staging = DirTransaction::shared_staging(dir);
    // Held until this rank's shards are written: a stale-staging cleaner leaves the folder be.
    let lock = DirTransaction::lock_shared_staging(dir)?;
    write_shards(&staging, state, &plan, options, &|i| rank.owns(i))?;
    drop(lock);
    wait("shards")?;
    if let Some(tx) = tx {
        write_companions(tx.path(), state, options)?;
        finish(tx, &plan, options)?;
    }
    wait("commit")?;
    let mut report = planned_report(dir, &plan);
    report.weight_files = plan
        .shards
        .iter()
        .enumerate()
        .filter(|(i, _)| rank.owns(*i))
        .map(|(_, (f, _))| f.clone())
        .collect();
    Ok(report)
}
