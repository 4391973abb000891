//! The sharded-checkpoint index, `model.safetensors.index.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{CheckpointError, Result};
use crate::pyjson::{self, PyJsonStyle};

/// An index: totals and the tensor-to-file map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WeightIndex {
    /// `metadata.total_parameters` (absent in indexes written before transformers 4.53).
    pub total_parameters: Option<u64>,
    /// `metadata.total_size`: bytes of all tensors.
    pub total_size: Option<u64>,
    /// Other metadata entries, kept as read.
    pub extra_metadata: Map<String, Value>,
    /// Tensor name to shard file name (relative to the checkpoint folder).
    pub weight_map: BTreeMap<String, String>,
}

impl WeightIndex {
    /// The bytes transformers writes: `json.dumps(index, indent=2, sort_keys=True) + "\n"`.
    pub fn to_json_string(&self) -> String {
        let mut metadata = self.extra_metadata.clone();
        if let Some(p) = self.total_parameters {
            metadata.insert("total_parameters".into(), json!(p));
        }
        if let Some(s) = self.total_size {
            metadata.insert("total_size".into(), json!(s));
        }
        let map: Map<String, Value> = self
            .weight_map
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let doc = json!({ "metadata": metadata, "weight_map": map });
        pyjson::py_json_string(
            &doc,
            &PyJsonStyle {
                trailing_newline: true,
                ..Default::default()
            },
        )
    }

    /// Reads an index file, checking its shape (not yet its files: see
    /// [`crate::Checkpoint::open`]).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
        Self::parse(&bytes).map_err(|reason| CheckpointError::InvalidIndex {
            path: path.to_owned(),
            reason,
        })
    }

    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let root: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        let root = root.as_object().ok_or("the index is not a JSON object")?;
        let weight_map = root
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or("the index has no `weight_map` object")?
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|f| (k.clone(), f.to_owned()))
                    .ok_or(format!("weight_map[`{k}`] is not a file name"))
            })
            .collect::<std::result::Result<BTreeMap<_, _>, _>>()?;
        let mut extra_metadata = match root.get("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err("`metadata` is not an object".into()),
        };
        let mut take_u64 = |name: &str| -> std::result::Result<Option<u64>, String> {
            match extra_metadata.remove(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or(format!("metadata.{name} is not a non-negative integer")),
            }
        };
        let total_parameters = take_u64("total_parameters")?;
        let total_size = take_u64("total_size")?;
        Ok(WeightIndex {
            total_parameters,
            total_size,
            extra_metadata,
            weight_map,
        })
    }
}
