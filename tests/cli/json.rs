//! `--json` outputs (`inspect`, `merge`, `diff`, `reshard`, `remap` and `extract`): the exact set of keys
//! and their JSON types, the same for the examples in docs/cli.md, and the values checked
//! against the fixtures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::verbs::{merge_cmd, EXACT_MERGES};
use crate::{
    adapter_dirs, fixture, header, peft_case, peftkit, read_json, stdout_json, weight_files,
    HeaderTensor,
};

/// A JSON type.
#[derive(Debug, Clone)]
enum Ty {
    Str,
    /// A non-negative integer.
    UInt,
    /// Any number (a float, or an integer).
    Num,
    Bool,
    OrNull(Box<Ty>),
    List(Box<Ty>),
    /// An object with exactly these keys.
    Obj(Vec<(&'static str, Ty)>),
    /// An object with any keys, every value of this type.
    Map(Box<Ty>),
}

use Ty::*;

fn list(t: Ty) -> Ty {
    List(Box::new(t))
}

fn or_null(t: Ty) -> Ty {
    OrNull(Box::new(t))
}

/// Asserts that `v` has type `ty`, naming the path of the first mismatch.
fn check(v: &Value, ty: &Ty, at: &str) {
    match (ty, v) {
        (Str, Value::String(_)) | (Bool, Value::Bool(_)) => {}
        (UInt, Value::Number(n)) if n.is_u64() => {}
        (Num, Value::Number(_)) => {}
        (OrNull(_), Value::Null) => {}
        (OrNull(t), v) => check(v, t, at),
        (List(t), Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check(item, t, &format!("{at}[{i}]"));
            }
        }
        (Map(t), Value::Object(m)) => {
            for (k, item) in m {
                check(item, t, &format!("{at}.{k}"));
            }
        }
        (Obj(fields), Value::Object(m)) => {
            let want: BTreeSet<&str> = fields.iter().map(|(k, _)| *k).collect();
            let got: BTreeSet<&str> = m.keys().map(String::as_str).collect();
            assert_eq!(got, want, "keys of {at}");
            for (k, t) in fields {
                check(&m[*k], t, &format!("{at}.{k}"));
            }
        }
        _ => panic!("{at}: expected {ty:?}, got {v}"),
    }
}

fn tensor_ty() -> Ty {
    Obj(vec![
        ("name", Str),
        ("dtype", Str),
        ("shape", list(UInt)),
        ("bytes", UInt),
        ("file", Str),
    ])
}

fn adapter_ty() -> Ty {
    Obj(vec![
        ("name", Str),
        ("method", Str),
        ("layout", Str),
        ("tensors", UInt),
        ("bytes", UInt),
        ("modules", UInt),
        ("ranks", Map(Box::new(UInt))),
        ("target_modules", or_null(list(Str))),
        ("use_dora", Bool),
        ("lora_bias", Bool),
        ("fan_in_fan_out", or_null(Bool)),
        ("modules_to_save", list(Str)),
        ("trainable_token_modules", list(Str)),
        (
            "scaling",
            list(Obj(vec![
                ("r", UInt),
                ("alpha", Num),
                ("use_rslora", Bool),
                ("scaling", Num),
                ("modules", UInt),
            ])),
        ),
        ("notes", list(Str)),
    ])
}

fn inspect_ty() -> Ty {
    Obj(vec![
        ("files", list(Str)),
        ("index", or_null(Str)),
        ("tensors", list(tensor_ty())),
        ("total_tensors", UInt),
        ("total_parameters", UInt),
        ("total_size", UInt),
        ("adapters", list(adapter_ty())),
    ])
}

fn merge_ty() -> Ty {
    Obj(vec![
        ("tensors_merged", UInt),
        ("tensors_replaced", UInt),
        ("tensors_copied", UInt),
        ("tensors_added", UInt),
        ("bytes", UInt),
        ("files", list(Str)),
        ("untied_embeddings", Bool),
        (
            "numerics",
            Obj(vec![
                ("mode", Str),
                ("reduction_order", Str),
                ("host_measured", Bool),
                ("unverified_tensors", list(Str)),
                ("unverified_bound_ulp", UInt),
            ]),
        ),
        (
            "quantization",
            or_null(Obj(vec![
                ("method", Str),
                ("output", Str),
                ("format", Str),
                ("double_quant", Bool),
                ("dtype", or_null(Str)),
                ("tensors_dequantized", UInt),
                (
                    "requantized",
                    list(Obj(vec![("tensor", Str), ("max_abs_error", or_null(Num))])),
                ),
            ])),
        ),
        ("seconds", Num),
    ])
}

fn diff_ty() -> Ty {
    let pair = |t: Ty| Obj(vec![("name", Str), ("a", t.clone()), ("b", t)]);
    Obj(vec![
        ("kinds", list(Str)),
        ("layout", Str),
        ("missing", list(Str)),
        ("extra", list(Str)),
        ("dtype_differs", list(pair(Str))),
        ("shape_differs", list(pair(list(UInt)))),
        (
            "value_differs",
            list(Obj(vec![
                ("name", Str),
                ("dtype", Str),
                ("elements", UInt),
                ("differing", UInt),
                ("non_finite", UInt),
                ("max_abs_diff", or_null(Num)),
                ("max_ulp", or_null(UInt)),
            ])),
        ),
        ("identical", UInt),
    ])
}

/// Asserts that `v` is a `diff --json` object: exactly its keys and types.
pub fn check_diff_json(v: &Value, at: &str) {
    check(v, &diff_ty(), at);
    for (k, allowed) in [
        ("kinds", &["model", "adapter"][..]),
        ("layout", &["stored", "transformers-v5"][..]),
    ] {
        let values: Vec<&Value> = match &v[k] {
            Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for x in values {
            assert!(allowed.contains(&x.as_str().unwrap()), "{at}.{k}: {x}");
        }
    }
}

/// The ```json examples of docs/cli.md's section for `verb`.
pub fn doc_examples(verb: &str) -> Vec<Value> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md")).unwrap();
    let start = doc
        .find(&format!("## `peftkit {verb} "))
        .unwrap_or_else(|| panic!("docs/cli.md has no section for {verb}"));
    let rest = &doc[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    section
        .split("```json\n")
        .skip(1)
        .map(|block| {
            let text = &block[..block.find("```").expect("closed code block")];
            serde_json::from_str(text).unwrap_or_else(|e| {
                panic!("docs/cli.md, {verb}: example is not JSON ({e}):\n{text}")
            })
        })
        .collect()
}

#[test]
fn docs_examples_have_exactly_the_keys_and_types_of_the_output() {
    let inspect = doc_examples("inspect");
    assert_eq!(inspect.len(), 2, "a checkpoint and an adapter example");
    for (i, example) in inspect.iter().enumerate() {
        check(example, &inspect_ty(), &format!("docs inspect example {i}"));
    }
    // The adapter example shows an adapter object (an empty list would check nothing).
    assert_eq!(inspect[1]["adapters"].as_array().map(Vec::len), Some(1));
    assert!(!inspect[1]["adapters"][0]["scaling"]
        .as_array()
        .unwrap()
        .is_empty());
    let diff = doc_examples("diff");
    assert_eq!(diff.len(), 1);
    check_diff_json(&diff[0], "docs diff example");
    for k in ["dtype_differs", "shape_differs", "value_differs"] {
        assert!(
            !diff[0][k].as_array().unwrap().is_empty(),
            "the example shows {k}"
        );
    }
    let merge = doc_examples("merge");
    assert_eq!(merge.len(), 1);
    check(&merge[0], &merge_ty(), "docs merge example");
}

/// What `inspect --json` must say about a checkpoint's files and tensors, from the headers.
fn check_inspect_against_headers(v: &Value, dir: &Path, files: &[String], index: Option<&str>) {
    let at = dir.display();
    assert_eq!(v["files"], serde_json::json!(files), "{at}");
    assert_eq!(v["index"], serde_json::json!(index), "{at}");
    let tensors: Vec<(String, HeaderTensor)> = files
        .iter()
        .flat_map(|f| {
            let path = if dir.is_file() {
                dir.to_owned()
            } else {
                dir.join(f)
            };
            header(&path).into_iter().map(move |t| (f.clone(), t))
        })
        .collect();
    let got = v["tensors"].as_array().unwrap();
    assert_eq!(got.len(), tensors.len(), "{at}");
    for (g, (file, t)) in got.iter().zip(&tensors) {
        assert_eq!(
            g,
            &serde_json::json!({
                "name": t.name, "dtype": t.dtype, "shape": t.shape, "bytes": t.bytes(), "file": file
            }),
            "{at}"
        );
    }
    assert_eq!(v["total_tensors"], tensors.len(), "{at}");
    let params: u64 = tensors.iter().map(|(_, t)| t.numel()).sum();
    let size: u64 = tensors.iter().map(|(_, t)| t.bytes()).sum();
    assert_eq!(v["total_parameters"], params, "{at}");
    assert_eq!(v["total_size"], size, "{at}");
    if let Some(index) = index {
        // transformers wrote both totals into the index.
        let meta = &read_json(&dir.join(index))["metadata"];
        assert_eq!(v["total_size"], meta["total_size"], "{at}");
        assert_eq!(v["total_parameters"], meta["total_parameters"], "{at}");
    }
}

#[test]
fn inspect_json_of_checkpoints() {
    let cases: Vec<(std::path::PathBuf, Option<&str>, &str)> = vec![
        // single file, f32
        (
            peft_case("lora_basic").join("base"),
            None,
            "model.safetensors",
        ),
        // shards
        (
            fixture("checkpoint/llama_tied_5KB/expected"),
            Some("model.safetensors.index.json"),
            "",
        ),
        // I64, BOOL, BF16 and a 0-dim tensor
        (
            fixture("checkpoint/mixed_dtypes/expected"),
            None,
            "model.safetensors",
        ),
    ];
    for (dir, index, single) in cases {
        let ok = peftkit()
            .arg("inspect")
            .arg(&dir)
            .arg("--json")
            .assert()
            .success();
        let v = stdout_json(&ok);
        check(&v, &inspect_ty(), "inspect");
        check_inspect_against_headers(&v, &dir, &weight_files(&dir, index, single), index);
        assert_eq!(v["adapters"], serde_json::json!([]));
    }
    // The mixed case really has a scalar: shape [] counts one parameter.
    let v = stdout_json(
        &peftkit()
            .arg("inspect")
            .arg(fixture("checkpoint/mixed_dtypes/expected"))
            .arg("--json")
            .assert()
            .success(),
    );
    assert!(v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["shape"] == serde_json::json!([])));
}

#[test]
fn inspect_json_of_variants_and_single_files() {
    // --variant fp16 of a sharded variant save.
    let dir = fixture("checkpoint/llama_variant_fp16/expected");
    let index = "model.safetensors.index.fp16.json";
    let v = stdout_json(
        &peftkit()
            .arg("inspect")
            .arg(&dir)
            .args(["--json", "--variant", "fp16"])
            .assert()
            .success(),
    );
    check(&v, &inspect_ty(), "inspect");
    check_inspect_against_headers(&v, &dir, &weight_files(&dir, Some(index), ""), Some(index));
    assert!(v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["dtype"] == "F16"));
    // A lone .safetensors file.
    let file = peft_case("lora_basic").join("base/model.safetensors");
    let v = stdout_json(
        &peftkit()
            .arg("inspect")
            .arg(&file)
            .arg("--json")
            .assert()
            .success(),
    );
    check(&v, &inspect_ty(), "inspect");
    check_inspect_against_headers(&v, &file, &["model.safetensors".to_owned()], None);
}

/// The module a LoRA `A` factor key adapts, and its rank.
fn lora_a_module(t: &HeaderTensor) -> Option<(String, u64)> {
    let name = t.name.strip_prefix("base_model.model.").unwrap_or(&t.name);
    let module = name
        .strip_suffix(".lora_A.weight")
        .or_else(|| name.strip_suffix(".lora_embedding_A"))?;
    Some((module.to_owned(), t.shape[0]))
}

/// peft's pattern rule: a key matches a module named `key` or ending in `.key`.
fn pattern_value<'a>(patterns: &'a Value, module: &str) -> Option<&'a Value> {
    patterns.as_object().and_then(|m| {
        m.iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .map(|(_, v)| v)
    })
}

/// Checks an adapter object of `inspect --json` against the adapter's files.
fn check_adapter(a: &Value, name: &str, dir: &Path) {
    let config = read_json(&dir.join("adapter_config.json"));
    let tensors = header(&dir.join("adapter_model.safetensors"));
    let at = format!("{}: adapter {name}", dir.display());
    assert_eq!(a["name"], name, "{at}");
    assert_eq!(a["method"], config["peft_type"], "{at}");
    assert_eq!(a["layout"], "peft_adapter", "{at}");
    assert_eq!(a["tensors"], tensors.len(), "{at}");
    assert_eq!(
        a["bytes"],
        tensors.iter().map(HeaderTensor::bytes).sum::<u64>(),
        "{at}"
    );
    let modules: Vec<(String, u64)> = tensors.iter().filter_map(lora_a_module).collect();
    assert_eq!(a["modules"], modules.len(), "{at}");
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    for (_, r) in &modules {
        *ranks.entry(r.to_string()).or_default() += 1;
    }
    assert_eq!(a["ranks"], serde_json::json!(ranks), "{at}");
    let set = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        set(&a["target_modules"]),
        set(&config["target_modules"]),
        "{at}"
    );
    for key in ["use_dora", "lora_bias", "fan_in_fan_out"] {
        assert_eq!(a[key], config[key], "{at}: {key}");
    }
    let to_save = match &config["modules_to_save"] {
        Value::Null => BTreeSet::new(),
        v => set(v),
    };
    assert_eq!(set(&a["modules_to_save"]), to_save, "{at}");
    assert_eq!(a["trainable_token_modules"], serde_json::json!([]), "{at}");
    assert_eq!(a["notes"], serde_json::json!([]), "{at}");
    // Scaling groups: (r, alpha) → modules, alpha from alpha_pattern or lora_alpha.
    let rslora = config["use_rslora"].as_bool().unwrap();
    let mut groups: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for (module, r) in &modules {
        let alpha = pattern_value(&config["alpha_pattern"], module)
            .unwrap_or(&config["lora_alpha"])
            .as_f64()
            .unwrap();
        *groups.entry((*r, alpha.to_bits())).or_default() += 1;
    }
    let got = a["scaling"].as_array().unwrap();
    assert_eq!(got.len(), groups.len(), "{at}: {got:?}");
    for (g, (&(r, alpha), &n)) in got.iter().zip(&groups) {
        let alpha = f64::from_bits(alpha);
        let mut g = g.clone();
        // The factor is an f32 (what PyTorch multiplies by): compare it as one.
        let factor = g["scaling"].take().as_f64().unwrap() as f32;
        let want = if rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        assert_eq!(factor, want as f32, "{at}: scaling of r={r} alpha={alpha}");
        assert_eq!(
            g,
            serde_json::json!({"r": r, "alpha": alpha, "use_rslora": rslora, "scaling": null, "modules": n}),
            "{at}"
        );
    }
}

#[test]
fn inspect_json_of_adapter_folders() {
    for case in [
        "lora_basic",
        "rslora",
        "patterns",
        "gpt2_conv1d",
        "modules_to_save",
        "embedding_lora",
        "two_adapters",
    ] {
        let root = peft_case(case).join("adapter");
        let v = stdout_json(
            &peftkit()
                .arg("inspect")
                .arg(&root)
                .arg("--json")
                .assert()
                .success(),
        );
        check(&v, &inspect_ty(), case);
        // Files and tensors: the root adapter's weights.
        check_inspect_against_headers(&v, &root, &["adapter_model.safetensors".to_owned()], None);
        let dirs = adapter_dirs(case);
        let adapters = v["adapters"].as_array().unwrap();
        assert_eq!(adapters.len(), dirs.len(), "{case}");
        for (a, dir) in adapters.iter().zip(&dirs) {
            let name = if *dir == root {
                "default".to_owned()
            } else {
                dir.file_name().unwrap().to_string_lossy().into_owned()
            };
            check_adapter(a, &name, dir);
        }
    }
}

#[test]
fn inspect_json_of_a_full_peft_state_dict() {
    let case = "lora_basic";
    let file = peft_case(case).join("full_state_dict.safetensors");
    let v = stdout_json(
        &peftkit()
            .arg("inspect")
            .arg(&file)
            .arg("--json")
            .assert()
            .success(),
    );
    check(&v, &inspect_ty(), "inspect");
    check_inspect_against_headers(&v, &file, &["full_state_dict.safetensors".to_owned()], None);
    let a = &v["adapters"][0];
    assert_eq!(v["adapters"].as_array().unwrap().len(), 1);
    assert_eq!(a["layout"], "peft_model");
    assert_eq!(a["name"], "default");
    // No config beside the file: alpha, hence scaling, is unknown, and a note says so.
    assert_eq!(a["scaling"], serde_json::json!([]));
    assert_eq!(a["notes"].as_array().unwrap().len(), 1);
    // The adapter's own tensors are those peft saved in adapter/.
    let saved = header(&peft_case(case).join("adapter/adapter_model.safetensors"));
    assert_eq!(a["tensors"], saved.len());
    assert_eq!(
        a["bytes"],
        saved.iter().map(HeaderTensor::bytes).sum::<u64>()
    );
}

/// Names of the base tensors whose bytes differ between peft's base/ and merged/.
fn changed_tensors(case: &str) -> BTreeSet<String> {
    let data = |sub: &str| -> BTreeMap<String, Vec<u8>> {
        let path = peft_case(case).join(sub).join("model.safetensors");
        let bytes = crate::read(&path);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        header(&path)
            .into_iter()
            .map(|t| {
                let s = 8 + n + t.begin as usize;
                let e = 8 + n + t.end as usize;
                (t.name, bytes[s..e].to_vec())
            })
            .collect()
    };
    let (base, merged) = (data("base"), data("merged"));
    base.iter()
        .filter(|(k, v)| merged.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn merge_json_summary() {
    for case in EXACT_MERGES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let v = stdout_json(&merge_cmd(case, &out).arg("--json").assert().success());
        check(&v, &merge_ty(), case);

        let base = header(&peft_case(case).join("base/model.safetensors"));
        let merged = header(&peft_case(case).join("merged/model.safetensors"));
        // Tensors merged: those an adapter's LoRA factors adapt (each once).
        let adapted: BTreeSet<String> = adapter_dirs(case)
            .iter()
            .flat_map(|d| header(&d.join("adapter_model.safetensors")))
            .filter_map(|t| lora_a_module(&t).map(|(m, _)| m))
            .collect();
        assert_eq!(v["tensors_merged"], adapted.len(), "{case}");
        // Every tensor peft changed is merged or replaced; the rest is copied.
        let changed = changed_tensors(case);
        assert_eq!(
            v["tensors_merged"].as_u64().unwrap() + v["tensors_replaced"].as_u64().unwrap(),
            changed.len() as u64,
            "{case}"
        );
        assert_eq!(
            v["tensors_copied"],
            (base.len() - changed.len()) as u64,
            "{case}"
        );
        assert_eq!(
            v["tensors_added"],
            (merged.len() - base.len()) as u64,
            "{case}"
        );
        assert_eq!(
            v["bytes"],
            merged.iter().map(HeaderTensor::bytes).sum::<u64>(),
            "{case}"
        );
        assert_eq!(
            v["files"],
            serde_json::json!(["model.safetensors"]),
            "{case}"
        );
        let tie = |sub: &str| {
            read_json(&peft_case(case).join(sub).join("config.json"))["tie_word_embeddings"].clone()
        };
        assert_eq!(
            v["untied_embeddings"],
            tie("base") != tie("merged"),
            "{case}"
        );
        assert!(v["seconds"].as_f64().unwrap() >= 0.0);
    }
}

#[test]
fn merge_json_files_are_the_shards_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let v = stdout_json(
        &merge_cmd("lora_basic", &out)
            .args(["--json", "--max-shard-size", "5KB"])
            .assert()
            .success(),
    );
    check(&v, &merge_ty(), "merge");
    let shards = weight_files(&out, Some("model.safetensors.index.json"), "");
    assert!(shards.len() > 1);
    assert_eq!(v["files"], serde_json::json!(shards));
    let index = read_json(&out.join("model.safetensors.index.json"));
    assert_eq!(v["bytes"], index["metadata"]["total_size"]);
}

#[test]
fn merge_json_of_an_fp8_base() {
    let case = crate::fixture("quant/fp8_llama");
    for extra in [&[][..], &["--dequantize"][..]] {
        let tmp = tempfile::tempdir().unwrap();
        let run = crate::peftkit()
            .arg("merge")
            .arg("--base")
            .arg(case.join("base"))
            .arg("--adapter")
            .arg(case.join("adapter"))
            .arg("--out")
            .arg(tmp.path().join("out"))
            .args(["--json", "--no-fsync"])
            .args(extra)
            .assert()
            .success();
        let v = stdout_json(&run);
        check(&v, &merge_ty(), "fp8 merge");
        assert!(v["quantization"].is_object(), "{v}");
    }
}

/// The `save` object of every writing verb's `--json`.
fn save_ty() -> Ty {
    Obj(vec![
        ("dir", Str),
        ("weight_files", list(Str)),
        ("index_file", or_null(Str)),
        ("tensors", UInt),
        ("total_size", UInt),
        ("dropped_ties", list(Str)),
    ])
}

fn reshard_ty() -> Ty {
    Obj(vec![
        ("save", save_ty()),
        ("model_type", or_null(Str)),
        ("table", or_null(Str)),
        ("rules_used", list(Str)),
    ])
}

fn remap_ty() -> Ty {
    Obj(vec![
        ("save", save_ty()),
        ("model_type", Str),
        ("table", or_null(Str)),
        ("rules_applied", list(Str)),
        ("tensors_converted", UInt),
    ])
}

fn remap_adapter_ty() -> Ty {
    Obj(vec![
        ("dir", Str),
        ("model_type", Str),
        ("table", Str),
        ("fused_tensors", UInt),
        ("tensors", UInt),
        ("dropped", list(Str)),
        ("copied", list(Str)),
        ("save", save_ty()),
    ])
}

fn extract_ty() -> Ty {
    Obj(vec![
        ("adapter_name", Str),
        ("layout", Str),
        ("inferred", Bool),
        (
            "adapter",
            Obj(vec![
                ("dir", Str),
                ("weights", save_ty()),
                ("model_card", or_null(Str)),
            ]),
        ),
        ("base", or_null(save_ty())),
        ("notes", list(Str)),
    ])
}

/// Asserts that a `save` object describes the weight files in `dir` as the real library wrote
/// them: the same files, tensor count and bytes, read from their headers.
fn assert_save_matches(save: &Value, dir: &Path, at: &str) {
    let files: Vec<String> = save["weight_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(
        files.iter().cloned().collect::<BTreeSet<_>>(),
        on_disk,
        "{at}"
    );
    let tensors: Vec<HeaderTensor> = files.iter().flat_map(|f| header(&dir.join(f))).collect();
    assert_eq!(save["tensors"].as_u64(), Some(tensors.len() as u64), "{at}");
    let bytes: u64 = tensors.iter().map(HeaderTensor::bytes).sum();
    assert_eq!(save["total_size"].as_u64(), Some(bytes), "{at}");
}

#[test]
fn writing_verbs_json_reports_what_transformers_and_peft_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    // reshard: against transformers' own re-save.
    let case = fixture("checkpoint/llama_reloaded_5KB");
    let out = tmp.path().join("reshard");
    let v = stdout_json(
        &peftkit()
            .arg("reshard")
            .arg(case.join("source"))
            .arg("--out")
            .arg(&out)
            .args(["--max-shard-size", "5KB", "--json", "--no-fsync"])
            .assert()
            .success(),
    );
    check(&v, &reshard_ty(), "reshard");
    assert_save_matches(&v["save"], &case.join("expected"), "reshard");
    assert_eq!(v["save"]["index_file"], "model.safetensors.index.json");

    // remap: against transformers' v5 save of the same Mixtral.
    let mixtral = fixture("remap/mixtral");
    let v = stdout_json(
        &peftkit()
            .arg("remap")
            .arg(mixtral.join("original"))
            .arg("--out")
            .arg(tmp.path().join("v5"))
            .args(["--to", "transformers-v5", "--json"])
            .assert()
            .success(),
    );
    check(&v, &remap_ty(), "remap");
    assert_save_matches(&v["save"], &mixtral.join("v5"), "remap");
    assert_eq!(v["model_type"], "mixtral");

    // remap of a legacy adapter: against peft's conversion.
    let convert = fixture("convert/mixtral");
    let v = stdout_json(
        &peftkit()
            .arg("remap")
            .arg(convert.join("legacy_adapter"))
            .arg("--out")
            .arg(tmp.path().join("fused"))
            .args([
                "--to",
                "transformers-v5",
                "--model-type",
                "mixtral",
                "--json",
            ])
            .assert()
            .success(),
    );
    check(&v, &remap_adapter_ty(), "remap adapter");
    assert_save_matches(
        &v["save"],
        &convert.join("converted_adapter"),
        "remap adapter",
    );
    assert_eq!(v["tensors"], v["save"]["tensors"]);

    // extract: against peft's adapter and the clean base.
    let case = peft_case("lora_basic");
    let v = stdout_json(
        &peftkit()
            .arg("extract")
            .arg("--from")
            .arg(case.join("full_state_dict.safetensors"))
            .arg("--base-config")
            .arg(case.join("base/config.json"))
            .args(["--lora-alpha", "8", "--json"])
            .arg("--out")
            .arg(tmp.path().join("adapter"))
            .arg("--base-out")
            .arg(tmp.path().join("base"))
            .assert()
            .success(),
    );
    check(&v, &extract_ty(), "extract");
    assert_save_matches(
        &v["adapter"]["weights"],
        &case.join("adapter"),
        "extract adapter",
    );
    assert_save_matches(&v["base"], &case.join("base"), "extract base");
    assert_eq!(
        (v["layout"].as_str(), v["inferred"].as_bool()),
        (Some("peft_model"), Some(true))
    );
}

#[test]
fn writing_verbs_json_examples_in_the_docs_have_the_output_types() {
    let reshard = doc_examples("reshard");
    assert_eq!(reshard.len(), 1);
    check(&reshard[0], &reshard_ty(), "docs reshard");
    let remap = doc_examples("remap");
    assert_eq!(remap.len(), 2, "a checkpoint and a legacy adapter");
    check(&remap[0], &remap_ty(), "docs remap");
    check(&remap[1], &remap_adapter_ty(), "docs remap adapter");
    let extract = doc_examples("extract");
    assert_eq!(extract.len(), 1);
    check(&extract[0], &extract_ty(), "docs extract");
}
