//! Byte-exact round trips against files written by the real transformers and peft
//! (tests/fixtures/burn, made by tests/interop/fixturegen/burn_cases.py), without Python.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use burn_store::{
    bridge, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};
use peftkit_burn::{
    load_hf, load_peft_adapter, save_hf, save_peft_adapter, HfSaveOptions, LlamaConfig,
    LlamaForCausalLM, LoadOptions,
};
use peftkit_checkpoint::{parse_size, ModelConfig};
use peftkit_peft::AdapterSaveOptions;
use serde_json::Value;

const CASES: [&str; 5] = [
    "llama_untied",
    "llama_tied_bf16",
    "llama_theta_sharded",
    "qwen2",
    "mistral",
];

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/burn")
        .join(name)
}

fn loaded(base: &Path) -> LlamaForCausalLM {
    let config = ModelConfig::read(&base.join("config.json")).unwrap();
    let model = LlamaForCausalLM::new(&LlamaConfig::from_hf(&config).unwrap(), &Device::flex());
    let (model, report) = load_hf(model, base, &LoadOptions::default()).unwrap();
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    model
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The fixture's shard size (the generator's `save_pretrained(max_shard_size=…)`).
fn shard_size(name: &str) -> Option<u64> {
    (name == "llama_theta_sharded").then(|| parse_size("8KB").unwrap())
}

#[test]
fn hf_to_burn_to_hf_gives_identical_files() {
    for name in CASES {
        let base = case(name).join("base");
        let model = loaded(&base);
        let out = tempfile::tempdir().unwrap();
        let mut options = HfSaveOptions::from_dir(&base).unwrap();
        if let Some(size) = shard_size(name) {
            options.save.max_shard_size = size;
        }
        save_hf(&model, out.path(), &options).unwrap();
        assert_eq!(files(out.path()), files(&base), "{name}");
        for f in files(&base) {
            let (ours, theirs) = (
                std::fs::read(out.path().join(&f)).unwrap(),
                std::fs::read(base.join(&f)).unwrap(),
            );
            assert!(
                ours == theirs,
                "{name}/{f} differs from what transformers wrote"
            );
        }
    }
}

/// `adapter_config.json` as a value, with `target_modules` (a Python set, written by peft in
/// hash order and by peftkit sorted) sorted.
fn config_value(path: &Path) -> Value {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    if let Some(Value::Array(items)) = v.get_mut("target_modules") {
        items.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
    v
}

#[test]
fn peft_to_burn_to_peft_gives_identical_files() {
    for name in CASES {
        let adapter = case(name).join("adapter");
        let (model, lora) = load_peft_adapter(loaded(&case(name).join("base")), &adapter).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_peft_adapter(&model, &lora, out.path(), &AdapterSaveOptions::default()).unwrap();
        assert_eq!(files(out.path()), files(&adapter), "{name}");
        for f in ["adapter_model.safetensors", "README.md"] {
            let ours = std::fs::read(out.path().join(f)).unwrap();
            assert!(
                ours == std::fs::read(adapter.join(f)).unwrap(),
                "{name}/{f} differs from what peft wrote"
            );
        }
        let (ours, theirs) = (
            out.path().join("adapter_config.json"),
            adapter.join("adapter_config.json"),
        );
        assert_eq!(config_value(&ours), config_value(&theirs), "{name}");
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert_eq!(
            len(&ours),
            len(&theirs),
            "{name}: same JSON, different formatting"
        );
    }
}

/// Every parameter of a module: path, dtype, shape and bytes.
fn parameters(model: &LlamaForCausalLM) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    model
        .collect(None, None, false)
        .iter()
        .map(|t| {
            let data = bridge::to_data(t).unwrap();
            let (dtype, shape) = (format!("{:?}", data.dtype()), data.shape().to_vec());
            (t.name.clone(), dtype, shape, data.into_bytes().to_vec())
        })
        .collect()
}

/// `load_hf` (peftkit's own transpose and cast) puts the same values in every parameter as
/// burn-store's own loader with its PyTorch adapter (one transpose per Linear weight; bf16 →
/// f32 is exact), square weights (q_proj, o_proj) included, where a missing or doubled
/// transpose keeps the shape.
#[test]
fn load_hf_loads_what_burn_stores_own_loader_loads() {
    for name in CASES.iter().filter(|n| **n != "llama_theta_sharded") {
        let base = case(name).join("base");
        let config = ModelConfig::read(&base.join("config.json")).unwrap();
        let fresh =
            || LlamaForCausalLM::new(&LlamaConfig::from_hf(&config).unwrap(), &Device::flex());
        let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
        let mut store =
            SafetensorsStore::from_file(base.join("model.safetensors")).with_from_adapter(adapter);
        let mut theirs = fresh();
        let result = theirs.load_from(&mut store).unwrap();
        assert!(
            result.errors.is_empty() && result.unused.is_empty(),
            "{name}: {result:?}"
        );
        let ours = parameters(&loaded(&base));
        assert!(
            ours.iter().any(|(_, _, s, _)| s.len() == 2 && s[0] == s[1]),
            "{name}"
        );
        assert_eq!(ours, parameters(&theirs), "{name}");
    }
}
