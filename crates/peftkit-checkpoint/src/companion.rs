//! The files that travel with a checkpoint's weights (configs, tokenizer, chat template,
//! custom code): a re-save, a remap or a merge copies them unchanged.

use std::path::Path;

use crate::error::{CheckpointError, Result};

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
