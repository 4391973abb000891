//! Typed field readers for config maps. Each takes the value out of the map (so what remains
//! is the unknown fields) and names the field on a type error: validation at the boundary.

use std::path::Path;

use indexmap::IndexMap;
use serde_json::{Map, Number, Value};

use super::{
    ConfigError, InitLoraWeights, LayersToTransform, StringOrList, TargetModules,
    TrainableTokenIndices,
};

fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an int",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let mut text = v.to_string();
    if text.chars().count() > 60 {
        text = text.chars().take(57).collect::<String>() + "...";
    }
    format!("{kind} ({text})")
}

pub(super) fn wrong(field: &str, expected: &'static str, v: &Value) -> ConfigError {
    ConfigError::WrongType {
        field: field.to_owned(),
        expected,
        found: describe(v),
    }
}

pub(super) fn as_bool(field: &str, v: &Value) -> Result<bool, ConfigError> {
    v.as_bool().ok_or_else(|| wrong(field, "true or false", v))
}

pub(super) fn as_opt_string(field: &str, v: &Value) -> Result<Option<String>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(wrong(field, "a string or null", other)),
    }
}

pub(super) fn as_number(field: &str, v: &Value) -> Result<Number, ConfigError> {
    match v {
        Value::Number(n) => Ok(n.clone()),
        other => Err(wrong(field, "a number", other)),
    }
}

pub(super) fn as_int(field: &str, v: &Value) -> Result<i64, ConfigError> {
    v.as_i64().ok_or_else(|| wrong(field, "an integer", v))
}

pub(super) fn as_int_list(field: &str, v: &Value) -> Result<Vec<i64>, ConfigError> {
    let items = v
        .as_array()
        .ok_or_else(|| wrong(field, "a list of integers", v))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| as_int(&format!("{field}[{i}]"), item))
        .collect()
}

fn as_string_list(field: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
    let items = v
        .as_array()
        .ok_or_else(|| wrong(field, "a list of strings", v))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str()
                .map(str::to_owned)
                .ok_or_else(|| wrong(&format!("{field}[{i}]"), "a string", item))
        })
        .collect()
}

pub(super) fn as_opt_string_list(
    field: &str,
    v: &Value,
) -> Result<Option<Vec<String>>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        other => as_string_list(field, other).map(Some),
    }
}

pub(super) fn as_opt_object(field: &str, v: &Value) -> Result<Option<Value>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Object(_) => Ok(Some(v.clone())),
        other => Err(wrong(field, "an object or null", other)),
    }
}

pub(super) fn as_opt_target_modules(
    field: &str,
    v: &Value,
) -> Result<Option<TargetModules>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TargetModules::Regex(s.clone()))),
        Value::Array(_) => as_string_list(field, v).map(|l| Some(TargetModules::Names(l))),
        other => Err(wrong(field, "a list of strings, a string or null", other)),
    }
}

pub(super) fn as_opt_string_or_list(
    field: &str,
    v: &Value,
) -> Result<Option<StringOrList>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(StringOrList::One(s.clone()))),
        Value::Array(_) => as_string_list(field, v).map(|l| Some(StringOrList::Many(l))),
        other => Err(wrong(field, "a string, a list of strings or null", other)),
    }
}

pub(super) fn as_opt_layers(
    field: &str,
    v: &Value,
) -> Result<Option<LayersToTransform>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Array(_) => as_int_list(field, v).map(|l| Some(LayersToTransform::Many(l))),
        Value::Number(_) => as_int(field, v).map(|i| Some(LayersToTransform::One(i))),
        other => Err(wrong(
            field,
            "an integer, a list of integers or null",
            other,
        )),
    }
}

pub(super) fn as_opt_pattern_map(
    field: &str,
    v: &Value,
) -> Result<Option<IndexMap<String, Number>>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Object(map) => map
            .iter()
            .map(|(k, val)| Ok((k.clone(), as_number(&format!("{field}[{k:?}]"), val)?)))
            .collect::<Result<IndexMap<_, _>, _>>()
            .map(Some),
        other => Err(wrong(field, "an object of numbers or null", other)),
    }
}

pub(super) fn as_init(field: &str, v: &Value) -> Result<InitLoraWeights, ConfigError> {
    match v {
        Value::Bool(b) => Ok(InitLoraWeights::Bool(*b)),
        Value::String(s) => Ok(InitLoraWeights::Method(s.clone())),
        other => Err(wrong(field, "true, false or an initialisation name", other)),
    }
}

pub(super) fn as_opt_token_indices(
    field: &str,
    v: &Value,
) -> Result<Option<TrainableTokenIndices>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Array(_) => as_int_list(field, v).map(|l| Some(TrainableTokenIndices::Indices(l))),
        Value::Object(map) => map
            .iter()
            .map(|(k, val)| Ok((k.clone(), as_int_list(&format!("{field}[{k:?}]"), val)?)))
            .collect::<Result<IndexMap<_, _>, _>>()
            .map(|m| Some(TrainableTokenIndices::PerModule(m))),
        other => Err(wrong(
            field,
            "a list of integers, an object of lists or null",
            other,
        )),
    }
}

pub(super) fn as_opt_replication(
    field: &str,
    v: &Value,
) -> Result<Option<Vec<[i64; 2]>>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let f = format!("{field}[{i}]");
                let pair = as_int_list(&f, item)?;
                match pair.as_slice() {
                    [a, b] => Ok([*a, *b]),
                    _ => Err(wrong(&f, "a [start, end] pair", item)),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(wrong(field, "a list of [start, end] pairs or null", other)),
    }
}

/// Takes fields out of a config map one by one.
pub(super) struct FieldReader {
    pub(super) map: Map<String, Value>,
}

impl FieldReader {
    /// The value of `field`, removed from the map; `None` when absent.
    pub(super) fn take(&mut self, field: &str) -> Option<Value> {
        self.map.shift_remove(field)
    }

    pub(super) fn read<T>(
        &mut self,
        field: &str,
        default: T,
        parse: impl Fn(&str, &Value) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        match self.take(field) {
            None => Ok(default),
            Some(v) => parse(field, &v),
        }
    }
}

pub(super) fn parse_object(text: &str) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::from_str::<Value>(text)? {
        Value::Object(map) => Ok(map),
        other => Err(ConfigError::NotAnObject(describe(&other))),
    }
}

pub(super) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(super) fn peft_type_of(map: &Map<String, Value>) -> Result<String, ConfigError> {
    match map.get("peft_type") {
        None | Some(Value::Null) => Err(ConfigError::MissingPeftType),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(wrong("peft_type", "a string", other)),
    }
}
