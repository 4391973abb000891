//! `pyjson` against files written by real Python (see `tests/fixtures/README.md`): the JSON
//! formatting cases of `tests/fixtures/json/cases.json` and the transformers-written files under
//! `tests/fixtures/configs/`. Every expected byte here comes from those files.

use peftkit_checkpoint::{py_json_string, PyJsonStyle};
use serde_json::Value;
use std::path::PathBuf;

mod common;
use common::{fixture_root, read_text};

fn parse(name: &str, text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"))
}

/// One entry of `cases.json`: `input` is Python's compact `json.dumps` (raw UTF-8),
/// `expected_no_newline` is `json.dumps(value, indent=2, sort_keys=True)` and `expected` the
/// same plus `"\n"`.
struct Case {
    name: String,
    input: String,
    expected: String,
    expected_no_newline: String,
}

fn load_cases() -> Vec<Case> {
    let doc = parse(
        "cases.json",
        &read_text(&fixture_root("json").join("cases.json")),
    );
    let Value::Array(items) = doc else {
        panic!("cases.json: expected a list")
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |key: &str| -> String {
                item.get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("cases.json[{i}]: missing string field {key:?}"))
                    .to_string()
            };
            Case {
                name: field("name"),
                input: field("input"),
                expected: field("expected"),
                expected_no_newline: field("expected_no_newline"),
            }
        })
        .collect()
}

#[test]
fn pyjson_json_cases_match_python() {
    let cases = load_cases();
    assert!(!cases.is_empty(), "cases.json has no cases");
    let transformers = PyJsonStyle {
        trailing_newline: true,
        numeric_key_objects: Vec::new(),
    };
    let peft = PyJsonStyle::peft_adapter_config();
    let mut failures = Vec::new();
    for case in &cases {
        let value = parse(&case.name, &case.input);
        let with_nl = py_json_string(&value, &transformers);
        if with_nl != case.expected {
            failures.push(format!(
                "{} (trailing newline):\n--- python\n{}\n--- rust\n{}",
                case.name, case.expected, with_nl
            ));
        }
        let without_nl = py_json_string(&value, &peft);
        if without_nl != case.expected_no_newline {
            failures.push(format!(
                "{} (no newline):\n--- python\n{}\n--- rust\n{}",
                case.name, case.expected_no_newline, without_nl
            ));
        }
    }
    // Report every mismatch at once: one fixture run then shows the whole picture.
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// Every `config.json` / `generation_config.json` under `tests/fixtures/configs/*/`, sorted.
fn config_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let root = fixture_root("configs");
    let dirs =
        std::fs::read_dir(&root).unwrap_or_else(|e| panic!("reading {}: {e}", root.display()));
    for dir in dirs {
        let dir = dir.expect("directory entry").path();
        for name in ["config.json", "generation_config.json"] {
            let file = dir.join(name);
            if file.is_file() {
                files.push(file);
            }
        }
    }
    files.sort();
    files
}

/// transformers writes `config.json` with `id2label` int-keyed (numeric order) and
/// `generation_config.json` with keys stringified before sorting; both end with `"\n"`.
#[test]
fn pyjson_transformers_config_files_round_trip_byte_for_byte() {
    let files = config_files();
    assert!(
        files
            .iter()
            .any(|f| f.file_name().is_some_and(|n| n == "config.json")),
        "no config.json under {}",
        fixture_root("configs").display()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = read_text(file);
        let value = parse(&file.display().to_string(), &text);
        let style = if file.file_name().is_some_and(|n| n == "config.json") {
            PyJsonStyle::transformers_config()
        } else {
            PyJsonStyle::transformers_generation_config()
        };
        let out = py_json_string(&value, &style);
        if out != text {
            failures.push(format!(
                "{}:\n--- python\n{text}--- rust\n{out}",
                file.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} files differ:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// `bert_multilabel` has 12 labels, so `id2label` shows the numeric order (`"9"` before `"10"`)
/// that plain string sorting would break; guard that the fixture still exercises it.
#[test]
fn pyjson_bert_multilabel_fixture_exercises_numeric_id2label() {
    let path = fixture_root("configs").join("bert_multilabel/config.json");
    let text = read_text(&path);
    let nine = text.find("\"9\":").expect("id2label has key 9");
    let ten = text.find("\"10\":").expect("id2label has key 10");
    assert!(nine < ten, "fixture no longer has 9 before 10");
    let plain = py_json_string(
        &parse("bert_multilabel", &text),
        &PyJsonStyle::transformers_generation_config(),
    );
    assert_ne!(
        plain, text,
        "without numeric_key_objects the output should differ"
    );
}

/// Reading a Python-written file and writing it again is only byte-identical if serde_json
/// parses each float to the exact double Python wrote. Its default parser is "best effort" and
/// can land one ULP off for 16–17 significant digits (this value is peft's `lora_alpha / sqrt(r)`
/// style scaling and the `sqrt512` fixture case); the `float_roundtrip` feature makes it exact.
/// Rust's `str::parse::<f64>` is correctly rounded, so it is the reference.
#[test]
fn pyjson_serde_json_parses_python_floats_exactly() {
    let mut wrong = Vec::new();
    for text in [
        "22.627416997969522",
        "0.3333333333333333",
        "1.7976931348623157e+308",
        "2.2250738585072014e-308",
        "1e+308",
    ] {
        let exact: f64 = text.parse().expect("valid float literal");
        let parsed = parse(text, text).as_f64().expect("a float");
        if parsed.to_bits() != exact.to_bits() {
            wrong.push(format!("{text} -> {parsed:?} (exact {exact:?})"));
        }
    }
    assert!(
        wrong.is_empty(),
        "serde_json parsed floats inexactly: {wrong:?}; enable serde_json's \
         \"float_roundtrip\" feature (workspace Cargo.toml) so configs round-trip byte for byte"
    );
}
