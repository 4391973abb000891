//! Hugging Face base checkpoints, written the way transformers 5.x writes them.
//!
//! This crate knows safetensors files, shard planning, the sharded index, `config.json` and
//! `generation_config.json`, and atomic folder saves. It knows nothing of PEFT.
//!
//! * [`Tensor`] and [`StateDict`]: handles on tensors whose bytes are read or computed only
//!   when written, so no operation holds a model in memory.
//! * [`save_pretrained`]: the files of transformers' `save_pretrained`, byte for byte.
//! * [`save_pretrained_distributed`]: the same files written by the ranks of a distributed
//!   job, each writing the shards it owns, behind the caller's [`Barrier`].
//! * [`Checkpoint`]: a single-file or sharded checkpoint opened by its headers, validated.
//! * [`verify`]: every inconsistency of a checkpoint on disk.
//! * [`HubCache`], [`RepoSpec`], [`resolve_model_path`]: repo ids resolved from the local
//!   Hugging Face cache, offline.
//! * `.bin` weights (`torch.save` pickles) open as checkpoints, read by a restricted unpickler
//!   that never runs code; [`cast_tensor`] casts dtypes with torch's rounding.
//! * [`diff_state_dicts`]: how two state dicts differ, tensor by tensor, streaming.
//! * [`Progress`]: the byte-count callback a long save reports to, held by
//!   [`SaveOptions::progress`] (and by the options of the crates above this one).
//!
//! Every module is private; the items are re-exported here, flat, so a module can be split
//! or renamed without breaking a caller. Inside, modules depend one way: `error`, `pyjson`,
//! `natural`, `progress` <- `tensor`, `names`, `shard`, `atomic`, `companion`, `hub`, `direct` <-
//! `safetensors_file`, `pickle`, `index`, `config`, `cast` <- `checkpoint` <- `inspect`, `save`,
//! `diff` <- `distributed`.

#![deny(missing_docs)]

mod atomic;
mod cast;
mod checkpoint;
mod companion;
mod config;
mod diff;
mod direct;
mod distributed;
mod error;
mod finite;
mod hub;
mod in_file;
mod index;
mod inspect;
mod kernel_copy;
mod names;
mod natural;
mod overlap;
mod pickle;
mod progress;
mod pyjson;
mod safetensors_file;
mod save;
mod setters;
mod shard;
mod staging;
mod tensor;
mod write_behind;

pub use atomic::DirTransaction;
pub use cast::{cast_slice_into, cast_state_dict, cast_tensor, f32_to_bf16_bits, parse_cast_dtype};
pub use checkpoint::{
    find_file_layout, verify, verify_problems, Checkpoint, FileLayout, Problem, WeightFile,
    WeightFormat,
};
pub use companion::{companion_files, is_weights_file};
pub use config::{
    GenerationConfig, ModelConfig, GENERATION_CONFIG_NAME, MODEL_CONFIG_NAME, TRANSFORMERS_VERSION,
};
pub use diff::{diff_state_dicts, DtypeDiff, ShapeDiff, StateDictDiff, ValueDiff};
pub use distributed::{save_pretrained_distributed, Barrier, Rank};
pub use error::{CheckpointError, Result};
pub use finite::nonfinite;
pub use hub::{resolve_model_path, HubCache, RepoSpec};
pub use index::WeightIndex;
pub use inspect::{CheckpointSummary, TensorSummary};
pub use names::{WeightsKind, WeightsNames};
pub use natural::{natural_cmp, sort_natural};
pub use overlap::{ensure_apart, ensure_output, Overlap};
pub use progress::Progress;
pub use pyjson::{
    float_repr, nonfinite_marker, py_json_string, write_py_json, write_py_str, PyJsonStyle,
};
pub use safetensors_file::{
    file_order, inspect_file, open_file, pt_metadata, read_header, save_workers, write_file,
    FileProblem, SafetensorsHeader, TensorHeader, MAX_HEADER_SIZE,
};
pub use save::{
    plan_save, save_planned, save_pretrained, torch_dtype_name, SaveOptions, SavePlan, SaveReport,
};
pub use shard::{parse_max_shard_size, parse_size, plan_shards, PlanItem, DEFAULT_MAX_SHARD_SIZE};
pub use staging::{abandon_staging, remove_stale_staging, StaleStaging};
pub use tensor::{
    buffers, byte_len, dtype_name, dtype_size, parse_dtype, Dtype, InPlaceEdit, OutputRegion, Part,
    Producer, SourceFile, SourceRegion, StateDict, StreamedTensor, Tensor,
};
pub use write_behind::WriteBehind;
