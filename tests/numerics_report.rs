//! The `numerics` object of `peftkit merge --json`: the reduction order in use (the host's, or
//! `PEFTKIT_REDUCTION_ORDER`'s) and exactly the tensors whose products lie outside that order's
//! verified domain. The live checks rely on this list: every tensor not in it must equal peft's
//! bytes on the host, so a list that grew silently would weaken them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// `peftkit merge --json` of `adapter` into `base` with the environment `env`: its exit status
/// and stdout (the summary) or stderr.
fn merge(base: &str, adapter: &str, env: &[(&str, &str)]) -> (bool, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_peftkit"))
        .arg("merge")
        .arg("--base")
        .arg(fixture(base))
        .arg("--adapter")
        .arg(fixture(adapter))
        .arg("--out")
        .arg(out_dir.path().join("merged"))
        .args(["--json", "--no-fsync"])
        .env_remove("PEFTKIT_REDUCTION_ORDER")
        .envs(env.iter().copied())
        .output()
        .expect("run peftkit");
    let text = if out.status.success() {
        out.stdout
    } else {
        out.stderr
    };
    (out.status.success(), String::from_utf8(text).unwrap())
}

fn numerics(base: &str, adapter: &str, order: &str) -> Value {
    let (ok, text) = merge(base, adapter, &[("PEFTKIT_REDUCTION_ORDER", order)]);
    assert!(ok, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["numerics"].clone()
}

#[test]
fn low_rank_products_of_ordinary_shapes_are_verified_in_every_order() {
    for order in ["mkl-amd", "mkl-intel-avx512"] {
        let n = numerics("peft/lora_basic/base", "peft/lora_basic/adapter", order);
        assert_eq!(n["mode"], "peft");
        assert_eq!(n["reduction_order"], order);
        assert_eq!(n["unverified_tensors"], json!([]), "{order}");
        assert!(n["unverified_bound_ulp"].as_u64().unwrap() > 0);
    }
}

#[test]
fn narrow_expert_products_are_listed_with_their_bound() {
    // The experts of convert/mixtral_mixed are 8 wide: peft's einsum runs them through a
    // batched matmul that does not use FMA there, on AMD and on Intel alike. The router
    // (`gate`, a 2 x 16 product) is narrower than MKL's main kernel on AMD only.
    let experts = [
        "model.layers.0.block_sparse_moe.experts.0.w2.weight",
        "model.layers.0.block_sparse_moe.experts.1.w2.weight",
    ];
    let router = "model.layers.0.block_sparse_moe.gate.weight";
    let listed = |order| {
        numerics(
            "convert/mixtral_mixed/base",
            "convert/mixtral_mixed/converted_adapter",
            order,
        )["unverified_tensors"]
            .clone()
    };
    assert_eq!(listed("mkl-amd"), json!([experts[0], experts[1], router]));
    assert_eq!(listed("mkl-intel-avx512"), json!(experts));
}

#[test]
fn a_tiny_product_is_verified_on_intel_only() {
    // The conv2d fixture's 1x1 convolution is a 6 x 6 product: narrower than MKL's main
    // kernel on AMD (4 x 12), inside the Intel order's domain (2 x 2); its 3x3 convolution
    // goes through oneDNN and is unverified in both.
    let amd = numerics("peft/conv2d/base", "peft/conv2d/adapter", "mkl-amd");
    let intel = numerics(
        "peft/conv2d/base",
        "peft/conv2d/adapter",
        "mkl-intel-avx512",
    );
    assert_eq!(
        amd["unverified_tensors"],
        json!(["conv1.weight", "conv2.weight"])
    );
    assert_eq!(intel["unverified_tensors"], json!(["conv1.weight"]));
}

#[test]
fn an_unknown_order_is_refused_before_anything_is_written() {
    let (ok, stderr) = merge(
        "peft/lora_basic/base",
        "peft/lora_basic/adapter",
        &[("PEFTKIT_REDUCTION_ORDER", "openblas")],
    );
    assert!(!ok);
    assert!(stderr.contains("PEFTKIT_REDUCTION_ORDER"), "{stderr}");
}
