//! Declarative key remapping between the two layouts of a Hugging Face checkpoint: the
//! **original on-disk layout** (what the Hub holds and transformers writes with
//! `save_original_format=True`, e.g. one tensor per Mixtral expert under `block_sparse_moe`)
//! and the **transformers v5 layout** (the module names of transformers 5.x, e.g. one fused
//! `mlp.experts.gate_up_proj` per layer).
//!
//! transformers 5.24 converts between them with the tables of its `conversion_mapping.py`; this
//! crate does the same from JSON tables kept as data in `adapters-spec/conversions/` (embedded
//! at build time from the `peftkit-adapters-spec` crate; user tables are layered over them at
//! run time: [`Registry::add_table_file`], [`RemapOptions::tables`]). A rule is a rename or a group of
//! tensor ops (stack/unstack experts, concat/chunk, split, transpose), each with its exact
//! inverse. Output order, names and storage sharing follow transformers exactly, so
//! [`save_pretrained_original`] writes the same bytes as `model.save_pretrained()`.
//!
//! * [`Registry`]: the tables, and which serves a `model_type`.
//! * [`Mapping::forward`] (on disk -> v5) and [`Mapping::reverse`] (v5 -> on disk): streaming,
//!   every converted tensor is a lazy [`peftkit_checkpoint::Tensor`] reading only the source
//!   bytes it needs.
//! * [`save_pretrained_original`] is `save_pretrained(save_original_format=True)`.
//! * [`Mapping::round_trip`]: what `save_pretrained` writes for a model `from_pretrained`
//!   loaded from a checkpoint of either layout (names, order, storage families), the input to
//!   the shard planner of every re-save ([`reshard`], resharded merges).
//! * [`remap`]: a whole checkpoint folder converted to the other layout.
//! * [`reshard`]: a whole checkpoint folder re-saved with other shards, as transformers does.
//! * [`diff_checkpoints`]: two checkpoints or adapters compared, through the tables when
//!   their layouts differ.
//! * [`Mapping::expert_pieces`]: where one expert's slice of a fused v5 parameter lives on disk.
//! * [`split`] and [`gather`]: a checkpoint cut into one folder per tensor-parallel rank by
//!   transformers' tp plans ([`TpPlans`], data in `adapters-spec/tp_plans.json`), and back.
//!
//! Dependencies point one way: `peftkit-checkpoint` <- `peftkit-remap` <- PEFT / CLI. Inside,
//! modules depend one way too: `table` (pure data) <- `pattern` <- `ops` (over `view`, the
//! strided lazy views) <- `engine` <- `registry` <- `resave` (every
//! operation that writes a checkpoint folder) <- `diff`. Every module is private; the items
//! are re-exported here, flat.

#![deny(missing_docs)]

mod diff;
mod engine;
mod error;
mod ops;
mod pattern;
mod registry;
mod resave;
mod stream;
mod table;
mod tp;
mod view;

pub use diff::{diff_checkpoints, CheckpointDiff, DiffLayout, DiffOptions};
pub use engine::{Direction, Forward, FusedPiece, Mapping, Revert, RoundTrip, UsedRules};
pub use error::{RemapError, Result};
pub use registry::Registry;
pub use resave::{
    checkpoint_mapping, convert, remap, reshard, save_pretrained_original, RemapOptions,
    RemapReport, ReshardOptions, ReshardReport, TensorLayout,
};
pub use table::{
    Aliases, ConversionTable, ConvertSpec, Op, Patterns, RenameSpec, ReversePolicy, Rule, SizeExpr,
    EMBEDDED_ALIASES, EMBEDDED_TABLES,
};
pub use tp::{
    gather, open_rank, rank_dir_name, split, GatherOptions, Placement, RankManifest, ShardedTensor,
    SplitOptions, SplitReport, TpPlan, TpPlans, MANIFEST_NAME,
};
