//! Quantized checkpoints through the CLI: FP8 merges equal the quant fixtures (made by
//! transformers' `Fp8Quantize` and the real CPU load + peft merge), packed formats (GPTQ) are
//! passed through by reshard and inspect and refused by merge.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::{
    assert_same_dir, fixture, header, peft_case, peftkit, read, read_json, stderr_of, stdout_json,
};

fn quant_case(case: &str) -> std::path::PathBuf {
    fixture("quant").join(case)
}

fn fp8_merge(case: &str, out: &Path, extra: &[&str]) -> Value {
    let d = quant_case(case);
    let run = peftkit()
        .arg("merge")
        .arg("--base")
        .arg(d.join("base"))
        .arg("--adapter")
        .arg(d.join("adapter"))
        .arg("--out")
        .arg(out)
        .args(["--no-fsync", "--json"])
        .args(extra)
        .env("PEFTKIT_REDUCTION_ORDER", host_order())
        .assert()
        .success();
    stdout_json(&run)
}

/// The reduction order of the host that made the fixtures (the merged weights hold a product).
fn host_order() -> &'static str {
    let host = read_json(&fixture("HOST.json"));
    match host["vendor_id"].as_str() {
        Some("GenuineIntel") if host["isa"]["avx512f"] == json!(true) => "mkl-intel-avx512",
        _ => "mkl-amd",
    }
}

#[test]
fn fp8_merges_equal_the_fixtures_and_report_the_requantized_weights() {
    for case in ["fp8_llama", "fp8_qwen3_moe"] {
        let tmp = tempfile::tempdir().unwrap();
        let kept = tmp.path().join("kept");
        let v = fp8_merge(case, &kept, &[]);
        assert_same_dir(&kept, &quant_case(case).join("merged_fp8"));
        let q = &v["quantization"];
        assert_eq!(
            (&q["method"], &q["output"], &q["dtype"]),
            (&json!("fp8"), &json!("kept"), &json!("bfloat16"))
        );
        let names: Vec<&str> = q["requantized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tensor"].as_str().unwrap())
            .collect();
        let meta = read_json(&quant_case(case).join("case.json"));
        let expected: Vec<&str> = meta["requantized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(names, expected, "{case}");
        assert!(q["requantized"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["max_abs_error"].as_f64().unwrap() > 0.0));

        let plain = tmp.path().join("dequantized");
        let v = fp8_merge(case, &plain, &["--dequantize"]);
        assert_same_dir(&plain, &quant_case(case).join("merged_dequantized"));
        assert_eq!(v["quantization"]["output"], "dequantized");
        assert_eq!(v["quantization"]["requantized"], json!([]));
    }
}

#[test]
fn fp8_summary_names_the_requantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let d = quant_case("fp8_llama");
    let run = peftkit()
        .arg("merge")
        .arg("--base")
        .arg(d.join("base"))
        .arg("--adapter")
        .arg(d.join("adapter"))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .arg("--no-fsync")
        .assert()
        .success();
    let text = crate::stdout_of(&run);
    assert!(
        text.contains("fp8 format kept: 6 merged weight(s) re-quantized"),
        "{text}"
    );
    assert!(
        text.contains("  model.layers.1.self_attn.v_proj.weight: "),
        "{text}"
    );
}

/// A safetensors file of `tensors` (name, dtype, shape, bytes), written by hand.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<u64>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            (*name).into(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

/// A tiny Llama in AutoGPTQ's layout: 4-bit weights packed in I32 `qweight`, `qzeros`, F16
/// `scales`, `g_idx`, with its `quantization_config`.
fn gptq_checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes = |n: usize, seed: u8| {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
    };
    let p = "model.layers.0.self_attn";
    write_safetensors(
        &dir.join("model.safetensors"),
        &[
            (
                "model.embed_tokens.weight",
                "F16",
                vec![64, 16],
                bytes(2048, 1),
            ),
            (
                &format!("{p}.q_proj.qweight"),
                "I32",
                vec![2, 16],
                bytes(128, 2),
            ),
            (
                &format!("{p}.q_proj.qzeros"),
                "I32",
                vec![1, 2],
                bytes(8, 3),
            ),
            (
                &format!("{p}.q_proj.scales"),
                "F16",
                vec![1, 16],
                bytes(32, 4),
            ),
            (&format!("{p}.q_proj.g_idx"), "I32", vec![16], bytes(64, 5)),
            ("model.norm.weight", "F16", vec![16], bytes(32, 6)),
            ("lm_head.weight", "F16", vec![64, 16], bytes(2048, 7)),
        ],
    );
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
        "num_hidden_layers": 1, "vocab_size": 64, "dtype": "float16",
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": false, "sym": true},
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// Every tensor's (dtype, shape, bytes) in the weight files of `dir`, by name.
fn tensor_bytes(dir: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = read(&path);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for t in header(&path) {
            let data = bytes[8 + n + t.begin as usize..8 + n + t.end as usize].to_vec();
            out.insert(t.name, (t.dtype, t.shape, data));
        }
    }
    out
}

#[test]
fn packed_checkpoints_pass_through_reshard_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("gptq");
    gptq_checkpoint(&base);
    let out = tmp.path().join("resharded");
    peftkit()
        .arg("reshard")
        .arg(&base)
        .arg("--out")
        .arg(&out)
        .args(["--max-shard-size", "2KB", "--no-fsync"])
        .assert()
        .success();
    assert!(
        out.join("model.safetensors.index.json").is_file(),
        "resharded into several files"
    );
    assert_eq!(tensor_bytes(&out), tensor_bytes(&base));
    assert_eq!(
        read(&out.join("config.json")),
        read(&base.join("config.json"))
    );

    let v = stdout_json(
        &peftkit()
            .arg("inspect")
            .arg(&base)
            .arg("--json")
            .assert()
            .success(),
    );
    let qweight = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.qweight")
        .expect("qweight listed");
    assert_eq!(
        (&qweight["dtype"], &qweight["shape"]),
        (&json!("I32"), &json!([2, 16]))
    );
}

#[test]
fn merge_into_a_packed_base_is_refused_and_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("gptq");
    gptq_checkpoint(&base);
    let out = tmp.path().join("merged");
    let run = peftkit()
        .arg("merge")
        .arg("--base")
        .arg(&base)
        .arg("--adapter")
        .arg(peft_case("lora_basic").join("adapter"))
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2);
    let err = stderr_of(&run);
    for needle in [
        "`gptq`",
        "Dequantize the base to 16 bits",
        "original 16-bit model",
    ] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    assert!(!out.exists());
}
