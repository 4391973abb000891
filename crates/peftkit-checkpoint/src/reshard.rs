//! Re-saving a dense checkpoint with other shard sizes or a variant, as
//! `AutoModel.from_pretrained(src).save_pretrained(out, max_shard_size=…, variant=…)` would.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{CheckpointError, Result};
use crate::names::WeightsKind;
use crate::save::{save_pretrained_with_progress, SaveOptions, SaveReport};

/// Whether a file of a checkpoint folder is weights (or an index of weights) rather than a
/// file to carry along (configs, tokenizer, chat template, custom code).
pub fn is_weights_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || (name.contains(".safetensors.index") && name.ends_with(".json"))
        || (name.contains(".bin.index") && name.ends_with(".json"))
}

/// Reads every non-weight file at the top of `dir`, to be written beside new weights.
pub fn companion_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CheckpointError::io(dir, e))? {
        let entry = entry.map_err(|e| CheckpointError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().is_file() || is_weights_file(&name) || name.starts_with('.') {
            continue;
        }
        let bytes =
            std::fs::read(entry.path()).map_err(|e| CheckpointError::io(entry.path(), e))?;
        out.push((name, bytes));
    }
    out.sort();
    Ok(out)
}

/// Re-saves the model checkpoint in `src` (variant `src_variant`) into `out` with
/// `options` (shard size, output variant). Tensors are written in transformers' order for a
/// model loaded by `from_pretrained` (natural sort) and streamed from the source files;
/// every other file of `src` (configs, tokenizer, …) is copied as is.
pub fn reshard(
    src: &Path,
    src_variant: Option<&str>,
    out: &Path,
    options: &SaveOptions,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<SaveReport> {
    let ckpt = Checkpoint::open_kind(src, WeightsKind::Model, src_variant)?;
    let state = ckpt.natural_state_dict();
    let mut options = options.clone();
    if src.is_dir() {
        options.extra_files.extend(companion_files(src)?);
    }
    // Keep the header metadata of the source (quantizers add keys next to `format`).
    if let Some(meta) = ckpt.metadata() {
        options.metadata = meta.clone();
    }
    save_pretrained_with_progress(out, &state, &options, on_bytes)
}
