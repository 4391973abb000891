//! A Llama-family causal LM (Llama, Mistral, Qwen2) whose burn paths are the Hugging Face keys.

mod config;
mod model;
mod rope;

pub use config::{supported_model_types, LlamaConfig};
pub use model::{
    LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMlp, LlamaModel, LlamaRmsNorm,
};
