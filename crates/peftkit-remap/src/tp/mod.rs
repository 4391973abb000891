//! Tensor parallelism as transformers 5.24 shards a model: plans ([`TpPlans`], [`TpPlan`],
//! [`Placement`]), a checkpoint cut into one folder per rank ([`split`]) and put back together
//! ([`gather`]).
//!
//! Inside, modules depend one way: `chunk` (torch's chunking) <- `plan` (the data of
//! `adapters-spec/tp_plans.json`) <- `slice` (lazy slices and assemblies of tensors) <-
//! `manifest` (`tensor_parallel.json`) <- `split` <- `gather`.

mod chunk;
mod gather;
mod manifest;
mod plan;
mod slice;
mod split;

pub use gather::{gather, open_rank, GatherOptions};
pub use manifest::{RankManifest, ShardedTensor, MANIFEST_NAME};
pub use plan::{Placement, TpPlan, TpPlans};
pub use split::{rank_dir_name, split, SplitOptions, SplitReport};
