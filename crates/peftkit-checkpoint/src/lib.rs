//! Hugging Face base checkpoints, written the way transformers 5.x writes them.
//!
//! This crate knows safetensors files, shard planning, the sharded index, `config.json` and
//! `generation_config.json`, and atomic directory saves. It knows nothing of PEFT.

pub mod pyjson;
