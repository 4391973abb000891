//! Hugging Face checkpoints and PEFT LoRA adapters in and out of [burn] 0.22.
//!
//! * [`LlamaForCausalLM`]: a Llama-family model (Llama, Mistral, Qwen2) whose parameter
//!   paths are the Hugging Face keys, so burn paths and checkpoint names map one to one.
//! * [`load_hf`]: a checkpoint (single file, sharded, variant; either MoE layout) into any
//!   burn module, cast as asked, strict about missing and unused keys.
//! * [`apply_lora`]: LoRA with peft's targeting, patterns, rsLoRA and initialisations, by one
//!   custom reparameterizer.
//! * [`save_peft_adapter`] / [`load_peft_adapter`]: adapters as peft writes and reads them.
//! * [`save_hf`] / [`save_merged_hf`]: the module, or the module with its adapters merged
//!   (bit-identical to peft's merge), as a Hugging Face checkpoint.
//!
//! The whole loop is in `docs/burn.md` and `examples/finetune_llama.rs`. The library picks
//! no backend: burn chooses it at run time through its `Device` (tests and the example use
//! `flex`, the pure-Rust CPU backend).
//!
//! Modules are private and every item is re-exported here. They depend one way: `error`,
//! `layout` <- `convert` <- `llama`, `lora` <- `linear`, `adapter` <- `load`, `save`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod adapter;
mod convert;
mod error;
mod layout;
mod linear;
mod llama;
mod load;
mod lora;
mod save;

pub use adapter::{load_peft_adapter, save_peft_adapter};
pub use error::BurnError;
pub use llama::{
    supported_model_types, LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM,
    LlamaMlp, LlamaModel, LlamaRmsNorm,
};
pub use load::{load_hf, LoadOptions, LoadReport};
pub use lora::{apply_lora, AppliedLora, ModuleLora};
pub use save::{save_hf, save_merged_hf, HfSaveOptions};
