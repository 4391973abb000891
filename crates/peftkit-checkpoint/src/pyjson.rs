//! Python `json.dumps(obj, indent=2, sort_keys=True)` (ensure_ascii=True), byte for byte.
//! (Stub signatures: being implemented.)

use serde_json::Value;

/// How to write a JSON document the way a Python library writes it.
#[derive(Debug, Clone, Default)]
pub struct PyJsonStyle {
    /// Append `"\n"` after the closing brace (transformers does, peft does not).
    pub trailing_newline: bool,
    /// Names of objects (at any depth) whose keys are Python ints in memory and therefore
    /// sort numerically before being written (transformers' `id2label`).
    pub numeric_key_objects: Vec<String>,
}

/// Formats `value` exactly as Python's `json.dumps(value, indent=2, sort_keys=True)`.
pub fn to_string(value: &Value, style: &PyJsonStyle) -> String {
    let _ = (value, style);
    unimplemented!("pyjson::to_string")
}

/// Python's `repr(float)`: shortest round-trip digits, `1e-05`, `10000.0`, `1e+16`.
pub fn float_repr(f: f64) -> String {
    let _ = f;
    unimplemented!("pyjson::float_repr")
}
