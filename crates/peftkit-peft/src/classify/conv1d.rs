//! Which modules are GPT-2 style `Conv1D` (weights stored `(in, out)`): by the table in
//! adapters-spec/conv1d_modules.json, or by the base weight's shape.

use std::sync::OnceLock;

use indexmap::IndexMap;
use peftkit_checkpoint::Tensor;
use serde::Deserialize;

use crate::py::name_matches_suffix;

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conv1dDoc {
    schema_version: u32,
    #[allow(dead_code)] // Documents the file.
    transformers_version: String,
    #[allow(dead_code)]
    #[serde(default)]
    source: Option<String>,
    conv1d_modules: IndexMap<String, Vec<String>>,
}

/// `model_type` → module-name suffixes that are `Conv1D` (adapters-spec/conv1d_modules.json).
pub fn conv1d_table() -> Result<&'static IndexMap<String, Vec<String>>, ClassifyError> {
    static TABLE: OnceLock<Result<IndexMap<String, Vec<String>>, String>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let doc: Conv1dDoc =
                serde_json::from_str(EMBEDDED_CONV1D_MODULES_JSON).map_err(|e| e.to_string())?;
            if doc.schema_version != 1 {
                return Err(format!("unsupported schema_version {}", doc.schema_version));
            }
            Ok(doc.conv1d_modules)
        })
        .as_ref()
        .map_err(|e| ClassifyError::Conv1dTable(e.clone()))
}

/// Whether `module` is a `Conv1D` by the table: under `model_type` when known, else under any
/// model type whose entries name it.
pub(super) fn conv1d_by_table(
    model_type: Option<&str>,
    module: &str,
) -> Result<bool, ClassifyError> {
    let table = conv1d_table()?;
    let hit = |list: &Vec<String>| list.iter().any(|e| name_matches_suffix(module, e));
    Ok(match model_type {
        Some(mt) => table.get(mt).is_some_and(hit),
        None => table.values().any(hit),
    })
}

/// `Some(true)` for a `Conv1D` (base weight `(in, out)`), `Some(false)` for a Linear
/// (`(out, in)`), `None` when the base weight is unknown, square, or the factors are not 2-D.
pub(super) fn conv1d_kind(
    c: &ClassifiedStateDict,
    module: &str,
    roles: &AdapterModule<'_>,
    base_weight: Option<&Tensor>,
) -> Result<Option<bool>, ClassifyError> {
    let (Some(a), Some(b), Some(w)) = (roles.get("a"), roles.get("b"), base_weight) else {
        return Ok(None);
    };
    let (Ok([_, fan_in]), Ok([fan_out, _]), Ok([p, q])) = (
        <[usize; 2]>::try_from(a.shape()),
        <[usize; 2]>::try_from(b.shape()),
        <[usize; 2]>::try_from(w.shape()),
    ) else {
        return Ok(None);
    };
    if fan_in == fan_out && p == q && p == fan_in {
        return Ok(None);
    }
    if (p, q) == (fan_out, fan_in) {
        return Ok(Some(false));
    }
    if (p, q) == (fan_in, fan_out) {
        return Ok(Some(true));
    }
    let key = c
        .base_source_keys
        .get(&format!("{module}.weight"))
        .cloned()
        .unwrap_or_else(|| format!("{module}.weight"));
    Err(ClassifyError::Inconsistent {
        origin: origin_of(w),
        key,
        module: module.to_owned(),
        reason: format!(
            "base weight shape {:?} fits neither a Linear ({fan_out}, {fan_in}) nor a Conv1D ({fan_in}, {fan_out}) for lora_A {:?} / lora_B {:?}",
            w.shape(),
            a.shape(),
            b.shape()
        ),
    })
}
