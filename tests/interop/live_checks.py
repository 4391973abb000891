#!/usr/bin/env python3
"""Live interop checks: the real transformers and peft load what peftkit writes.

Run by tests/interop/run.sh (which provides the pinned venv and PEFTKIT_BIN). Each check runs
the peftkit binary on a fixture made by the real libraries, loads the result with
transformers/peft and compares it with what the libraries themselves produce, computed here, on
this host: floats that depend on the CPU (logits, merged weights, which MKL and oneDNN compute
with CPU-specific kernels) are never taken from a file recorded on another machine. The fixtures
supply only inputs (base models, adapters, configs).
Prints one line per check and a final 'N passed, N failed' line; exits 1 on any failure.
"""
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturegen.common import quiet  # noqa: E402
from fixturegen.peft_cases import load_peft_model, merge_and_unload  # noqa: E402

FIX = REPO / "tests" / "fixtures"
BIN = os.environ.get("PEFTKIT_BIN", str(REPO / "target" / "release" / "peftkit"))
INPUT_IDS = (torch.arange(10).unsqueeze(0) % 64)
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def peftkit(*args):
    res = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"peftkit {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr}")
    return res.stdout


def logits_of(model, input_ids=None):
    model.eval()
    with torch.no_grad():
        return model(INPUT_IDS if input_ids is None else input_ids).logits


@check
def resharded_checkpoint_loads_in_transformers_with_identical_logits():
    from transformers import AutoModelForCausalLM

    src = FIX / "checkpoint" / "llama_reloaded_5KB" / "source"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        peftkit("reshard", src, "--out", out, "--max-shard-size", "3KB")
        assert (out / "model.safetensors.index.json").is_file()
        ours = logits_of(AutoModelForCausalLM.from_pretrained(out))
    theirs = logits_of(AutoModelForCausalLM.from_pretrained(src))
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


@check
def resharded_variant_loads_with_variant_argument():
    from transformers import AutoModelForCausalLM

    src = FIX / "checkpoint" / "llama_reloaded_5KB" / "source"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        peftkit("reshard", src, "--out", out, "--max-shard-size", "4KB", "--variant", "fp16")
        ours = logits_of(AutoModelForCausalLM.from_pretrained(out, variant="fp16"))
    theirs = logits_of(AutoModelForCausalLM.from_pretrained(src))
    assert torch.equal(ours, theirs)


MERGE_CASES = ["lora_basic", "lora_bf16", "lora_f16", "rslora", "dora_bf16", "embedding_lora", "gpt2_conv1d",
               "modules_to_save", "patterns", "two_adapters", "lora_bias", "trainable_tokens",
               "mixtral_experts"]


def weight_files(d):
    return sorted(p.name for p in Path(d).iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))


def assert_same_weights(ours, theirs, what, report=None):
    """The weight files (shards and index) of two checkpoint folders are byte-identical, except
    the tensors that peftkit's merge report (`merge --json`) lists as outside its verified
    domain: those must agree within the bound it states (units in the last place of the tensor's
    largest element). On a difference, say which tensors differ and by how much."""
    from safetensors.torch import load_file

    from drift import header, ulp_of_max

    numerics = (report or {}).get("numerics", {})
    loose, bound = set(numerics.get("unverified_tensors", [])), numerics.get("unverified_bound_ulp", 0)
    assert weight_files(ours) == weight_files(theirs), f"{what}: files {weight_files(ours)} != {weight_files(theirs)}"
    for name in weight_files(theirs):
        a, b = (Path(ours) / name).read_bytes(), (Path(theirs) / name).read_bytes()
        if a == b:
            continue
        if not name.endswith(".safetensors") or header(Path(ours) / name) != header(Path(theirs) / name):
            raise AssertionError(f"{what}: {name} differs from peft's save on this host (not in its tensors)")
        ta, tb = load_file(Path(ours) / name), load_file(Path(theirs) / name)
        detail = []
        for k in tb:
            if torch.equal(ta[k], tb[k]):
                continue
            x, y = ta[k].double(), tb[k].double()
            d = (x - y).abs().max().item()
            if k in loose and d <= bound * ulp_of_max(tb[k]):
                continue
            detail.append(f"{k}: {(x != y).sum().item()} of {y.numel()} differ, max {d:.3g}"
                          + (f" (> {bound} ulp)" if k in loose else ""))
        if detail:
            raise AssertionError(f"{what}: {name} differs from peft's save on this host: {detail[:5]}")


def merge_report(*args):
    """`peftkit merge ARGS --json`, its summary parsed."""
    return json.loads(peftkit("merge", *args, "--json"))


def peft_merge_here(d, out):
    """peft's own merge of fixture case `d`, computed on this host and saved to `out`, exactly as
    the fixture generator merged it (fixturegen.peft_cases)."""
    case = json.loads((d / "case.json").read_text())
    pm, _ = load_peft_model(d, case["adapter_names"])
    names = case["merge"]["adapter_names"] if "adapter_names=" in case["merge"]["call"] else None
    merged = merge_and_unload(pm, names)
    merged.save_pretrained(out)
    return merged


@check
def merged_checkpoints_equal_peft_merge_computed_here():
    """peftkit merge writes the same weight files as peft's merge_and_unload() + save_pretrained()
    run now, on this host; transformers loads them with the same logits."""
    from transformers import AutoModelForCausalLM

    failures = []
    for case in MERGE_CASES:
        d = FIX / "peft" / case
        adapters = [d / "adapter"] + sorted(p.parent for p in (d / "adapter").glob("*/adapter_config.json"))
        with tempfile.TemporaryDirectory() as tmp:
            out, ref = Path(tmp) / "merged", Path(tmp) / "reference"
            args = ["--base", d / "base", "--out", out]
            for a in adapters:
                args += ["--adapter", a]
            report = merge_report(*args)
            theirs = logits_of(peft_merge_here(d, ref))
            try:
                assert_same_weights(out, ref, case, report)
                if not report["numerics"]["unverified_tensors"]:  # else the weights' bound holds
                    ours = logits_of(AutoModelForCausalLM.from_pretrained(out))
                    assert torch.equal(ours, theirs), f"{case}: logits differ by {(ours - theirs).abs().max()}"
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures)


QUANT_CASES = ["fp8_llama", "fp8_llama_ue8m0", "fp8_qwen3_moe"]


@check
def fp8_merges_equal_transformers_and_peft_computed_here():
    """On the FP8 fixtures: `merge --dequantize` writes what transformers (the FP8 checkpoint loaded
    on CPU, dequantized) + peft's merge_and_unload() + save_pretrained() write now, on this host;
    the default merge writes that merge re-quantized by transformers' own Fp8Quantize, with the
    base's other tensors and config.json unchanged."""
    from safetensors.torch import load_file

    from fixturegen.quant_cases import requantized_state

    failures = []
    for case in QUANT_CASES:
        d = FIX / "quant" / case
        meta = json.loads((d / "case.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            deq, kept, ref = Path(tmp) / "dequantized", Path(tmp) / "kept", Path(tmp) / "reference"
            args = ["--base", d / "base", "--adapter", d / "adapter"]
            report = merge_report(*args, "--out", deq, "--dequantize")
            kept_report = merge_report(*args, "--out", kept)
            pm, _ = load_peft_model(d, ["default"])
            merge_and_unload(pm).save_pretrained(ref)
            try:
                assert_same_weights(deq, ref, f"{case} --dequantize", report)
                assert (deq / "config.json").read_bytes() == (ref / "config.json").read_bytes(), f"{case}: config"
                names = [t["tensor"] for t in kept_report["quantization"]["requantized"]]
                assert names == meta["requantized"], f"{case}: requantized {names}"
                loose = set(kept_report["numerics"]["unverified_tensors"])
                theirs = requantized_state(d / "base", ref, meta["quantization"]["scale_fmt"], names)
                ours = load_file(kept / "model.safetensors")
                assert sorted(ours) == sorted(theirs), f"{case}: tensor names"
                differ = [k for k in theirs if k.removesuffix("_scale_inv") not in loose
                          and not torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8))]
                assert not differ, f"{case}: kept FP8 merge differs from Fp8Quantize of peft's merge: {differ}"
                assert (kept / "config.json").read_bytes() == (d / "base" / "config.json").read_bytes()
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures)


@check
def merge_refuses_mismatched_adapter_and_writes_nothing():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged"
        res = subprocess.run([BIN, "merge", "--base", FIX / "peft" / "lora_basic" / "base", "--adapter",
                              FIX / "peft" / "gpt2_conv1d" / "adapter", "--out", out], capture_output=True, text=True)
        assert res.returncode != 0 and "c_attn" in res.stderr, res.stderr
        assert not out.exists()


@check
def remapped_checkpoints_load_in_transformers_with_identical_logits():
    """original -> transformers-v5 -> original (sharded) with peftkit remap. transformers loads
    each stage into exactly the parameters of the checkpoint it was made from, and gives the
    logits transformers gives for its own save in that layout. (Loading the original and the
    v5 layout can differ by ~1e-8 inside transformers itself: same parameters, other memory
    layout.)"""
    from transformers import AutoModelForCausalLM

    for case in ["mixtral", "qwen2_moe"]:
        src = FIX / "remap" / case / "original"
        reference = {"v5": AutoModelForCausalLM.from_pretrained(FIX / "remap" / case / "v5"),
                     "back": AutoModelForCausalLM.from_pretrained(src)}
        with tempfile.TemporaryDirectory() as tmp:
            v5, back = Path(tmp) / "v5", Path(tmp) / "back"
            peftkit("remap", src, "--out", v5, "--to", "transformers-v5")
            peftkit("remap", v5, "--out", back, "--to", "original", "--max-shard-size", "5KB")
            for d in (v5, back):
                ours_model = AutoModelForCausalLM.from_pretrained(d)
                ref = reference[d.name]
                ours_sd, ref_sd = ours_model.state_dict(), ref.state_dict()
                assert ours_sd.keys() == ref_sd.keys(), f"{case} {d.name}: parameter names differ"
                assert all(torch.equal(ours_sd[k], ref_sd[k]) for k in ref_sd), f"{case} {d.name}: values differ"
                ours, theirs = logits_of(ours_model), logits_of(ref)
                assert torch.equal(ours, theirs), f"{case} {d.name}: {(ours - theirs).abs().max()}"


@check
def converted_legacy_moe_adapters_load_in_peft_with_identical_logits():
    """peftkit remap LEGACY_ADAPTER --to transformers-v5: peft loads the fused adapter on the v5
    model and gives the logits of peft's own conversion of the legacy adapter (peft converts it
    while loading), both computed here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for case in ["mixtral", "mixtral_mixed", "qwen3_moe"]:
        d = FIX / "convert" / case
        input_ids = torch.tensor(json.loads((d / "case.json").read_text())["input_ids"])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "fused"
            peftkit("remap", d / "legacy_adapter", "--out", out, "--to", "transformers-v5", "--base", d / "base")
            ours = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), out), input_ids)
        theirs = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"),
                                                     d / "legacy_adapter"), input_ids)
        assert torch.equal(ours, theirs), f"{case}: max diff {(ours - theirs).abs().max()}"


@check
def converted_legacy_moe_adapters_merge_as_peft_merges_them_here():
    """peftkit merge of the converted adapter into the on-disk base writes the weights of peft's
    merge_and_unload() of the legacy adapter (converted by peft on load) + save_pretrained(),
    computed here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    failures = []
    for case in ["mixtral", "mixtral_mixed", "qwen3_moe"]:
        d = FIX / "convert" / case
        with tempfile.TemporaryDirectory() as tmp:
            out, ref = Path(tmp) / "merged", Path(tmp) / "reference"
            report = merge_report("--base", d / "base", "--adapter", d / "converted_adapter", "--out", out)
            pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), d / "legacy_adapter")
            pm.merge_and_unload().save_pretrained(ref)
            try:
                assert_same_weights(out, ref, case, report)
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures)


# (base dtype, r, lora_alpha, use_rslora, adapter weight): ranks on both sides of every change of
# MKL's reduction blocking seen on AMD and Intel hosts (192, 384, 768), scales that are not exact
# in f32 (32/6, 32/sqrt(6), x0.7).
RANK_CASES = [
    ("float32", 8, 16, False, 1.0),
    ("float32", 192, 16, False, 1.0),
    ("float32", 193, 16, False, 1.0),
    ("float32", 256, 16, False, 1.0),
    ("float32", 320, 16, False, 1.0),
    ("float32", 384, 16, False, 1.0),
    ("float32", 385, 16, False, 1.0),
    ("float32", 512, 16, False, 1.0),
    ("float32", 769, 16, False, 1.0),
    ("bfloat16", 256, 16, False, 1.0),
    ("bfloat16", 512, 16, False, 1.0),
    ("float16", 320, 16, False, 1.0),
    ("float32", 6, 32, False, 1.0),
    ("float32", 6, 32, True, 0.7),
    ("bfloat16", 6, 32, True, 1.0),
    ("bfloat16", 16, 32, False, 0.7),
]


def rank_case(d, dtype, r, alpha, rslora):
    """A one-layer Llama 256 wide (q_proj 256x256, down_proj 256x320) with a random LoRA of rank
    `r` on q_proj and down_proj, saved as base/ and adapter/ under `d`."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fixturegen.peft_cases import randomize_adapter_params

    torch.manual_seed(r)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=320, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=64, vocab_size=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(d / "base")
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                          target_modules=["q_proj", "down_proj"]))
    randomize_adapter_params(pm)
    pm.save_pretrained(d / "adapter")


@check
def merges_at_every_rank_equal_peft_merge_computed_here():
    """f32, bf16 and f16 bases, ranks up to 769, inexact scalings and an adapter weight: peftkit
    merge writes the bytes of peft's merge_and_unload() + save_pretrained() on this host. A weight
    w is `--adapter DIR:w` for peftkit and LoraLayer.scale_layer(w) for peft (both scale the
    Python-float scaling alpha/r by w before torch rounds it to f32)."""
    from peft.tuners.lora import LoraLayer

    # MKL may split long reductions between threads: merge with the thread count a user has.
    torch.set_num_threads(os.cpu_count() or 1)
    failures = []
    for dtype, r, alpha, rslora, weight in RANK_CASES:
        name = f"{dtype} r={r} alpha={alpha}{' rslora' if rslora else ''} weight={weight}"
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            rank_case(d, dtype, r, alpha, rslora)
            report = merge_report("--base", d / "base", "--adapter", f"{d / 'adapter'}:{weight}", "--out", d / "ours")
            pm, _ = load_peft_model(d, ["default"])
            for m in pm.modules():
                if isinstance(m, LoraLayer) and weight != 1.0:
                    m.scale_layer(weight)
            merge_and_unload(pm).save_pretrained(d / "theirs")
            try:
                assert_same_weights(d / "ours", d / "theirs", name, report)
            except AssertionError as e:
                failures.append(str(e))
    torch.set_num_threads(1)
    assert not failures, "\n".join(failures)


EXTRACT_CASES = {  # case -> extra peftkit extract arguments (what the tensors cannot say)
    "lora_basic": ["--lora-alpha", "8"],
    "lora_bf16": ["--lora-alpha", "8"],
    "rslora": ["--lora-alpha", "16", "--use-rslora"],
    "dora": ["--lora-alpha", "8"],
    "embedding_lora": ["--config", "adapter/adapter_config.json"],
    "gpt2_conv1d": ["--config", "adapter/adapter_config.json"],
    "modules_to_save": ["--config", "adapter/adapter_config.json"],
    "patterns": ["--config", "adapter/adapter_config.json"],
    "lora_bias": ["--config", "adapter/adapter_config.json"],
    "trainable_tokens": ["--config", "adapter/adapter_config.json"],
    "prompt_tuning": ["--config", "adapter/adapter_config.json"],
}


@check
def extracted_adapters_load_in_peft_with_identical_logits():
    """peftkit extract from the full PEFT state dict, then PeftModel.from_pretrained: the
    logits equal those of the adapter peft itself saved, both computed here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for case, extra in EXTRACT_CASES.items():
        d = FIX / "peft" / case
        extra = [str(d / a) if a.endswith(".json") else a for a in extra]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "adapter"
            peftkit("extract", "--from", d / "full_state_dict.safetensors", "--out", out,
                    "--base-model", "peftkit/tiny-llama", *extra)
            ours = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), out))
        theirs = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), d / "adapter"))
        assert torch.equal(ours, theirs), f"{case}: max diff {(ours - theirs).abs().max()}"


@check
def bitsandbytes_merges_equal_the_libraries_computed_here():
    """`merge` into a 4-bit base (re-quantized, and `--dequantize`) and `--qlora-base` on its 16-bit
    original write what transformers + bitsandbytes + peft write here, for every bnb fixture case
    rebuilt on this host (same seeds and calls as tests/fixtures/bnb)."""
    from fixturegen import bnb_cases

    for name, spec in bnb_cases.CASES.items():
        qlora = ["--qlora-base", spec["quant_type"]] + (["--qlora-double-quant"] if spec["double_quant"] else [])
        runs = [("base4", [], "merged_requantized"), ("base4", ["--dequantize"], "merged_dequantized"),
                ("base16", qlora, "merged_qlora")]
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            bnb_cases.make_case(d, spec)
            for base, flags, ref in runs:
                out = d / f"peftkit_{ref}"
                peftkit("merge", "--base", d / base, "--adapter", d / "adapter", "--out", out, *flags)
                for f in sorted(p.name for p in (d / ref).iterdir()):
                    same = (out / f).read_bytes() == (d / ref / f).read_bytes()
                    assert same, f"{name}, {ref}: {f} differs from the libraries' file"


@check
def several_adapters_and_dora_into_quantized_bases_equal_the_libraries_computed_here():
    """Kept-format merges of several adapters (4-bit: re-quantized after each, in order; FP8: merged in bf16, then
    quantized once) and of DoRA into a 4-bit base write what bitsandbytes / transformers + peft write here, for every
    quant_multi fixture case rebuilt on this host; the FP8 case's --dequantize too."""
    from fixturegen import quant_multi_cases as qm

    def same_files(out, ref, what):
        for f in sorted(p.name for p in ref.iterdir()):
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f"{what}: {f} differs from the libraries' file"

    def adapters(d, order):
        return [a for n in order for a in ("--adapter", d / f"adapter_{n}")]

    for name, case in qm.CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            qm.make_case(d, case)
            for ref, order in case["merges"].items():
                peftkit("merge", "--base", d / "base4", *adapters(d, order), "--out", d / f"peftkit_{ref}")
                same_files(d / f"peftkit_{ref}", d / ref, f"{name}, {ref}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        qm.make_fp8_case(d)
        for ref, flags in (("merged_fp8", []), ("merged_dequantized", ["--dequantize"])):
            peftkit("merge", "--base", d / "base", *adapters(d, qm.FP8_ORDER), "--out", d / f"peftkit_{ref}", *flags)
            same_files(d / f"peftkit_{ref}", d / ref, f"{qm.FP8_CASE}, {ref}")


@check
def bitsandbytes_int8_merges_equal_the_libraries_computed_here():
    """`merge` into an 8-bit (LLM.int8) base, re-quantized and with `--dequantize`, writes what transformers +
    bitsandbytes + peft write here, for every bnb8 fixture case rebuilt on this host (same seeds and calls as
    tests/fixtures/bnb8); `--json` reports an error per re-quantized weight. Several adapters too (re-quantized after
    each, in order), for every bnb8_multi case."""
    from fixturegen import bnb8_cases, bnb8_multi_cases

    for name, spec in bnb8_cases.CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            bnb8_cases.make_case(d, spec)
            for flags, ref in [([], "merged_requantized"), (["--dequantize"], "merged_dequantized")]:
                out = d / f"peftkit_{ref}"
                report = json.loads(peftkit("merge", "--base", d / "base8", "--adapter", d / "adapter", "--out", out,
                                            "--json", *flags))["quantization"]
                assert report["format"] == "int8", report
                if not flags:
                    assert all(t["max_abs_error"] > 0 for t in report["requantized"]), report
                for f in sorted(p.name for p in (d / ref).iterdir()):
                    same = (out / f).read_bytes() == (d / ref / f).read_bytes()
                    assert same, f"{name}, {ref}: {f} differs from the libraries' file"
    for name, case in bnb8_multi_cases.CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            bnb8_multi_cases.make_case(d, case)
            for ref, order in case["merges"].items():
                out = d / f"peftkit_{ref}"
                adapters = [a for n in order for a in ("--adapter", d / f"adapter_{n}")]
                peftkit("merge", "--base", d / "base8", *adapters, "--out", out)
                for f in sorted(p.name for p in (d / ref).iterdir()):
                    same = (out / f).read_bytes() == (d / ref / f).read_bytes()
                    assert same, f"{name}, {ref}: {f} differs from the libraries' file"

def tp_placements(model):
    """Each parameter's tensor-parallel placement, as transformers' styles give it: every rule of the expanded
    `model.tp_plan` applied with its style's own `shard_param`, `distribute_tensor` recorded instead of run (no process
    group is needed to know where a rank's slice lies)."""
    import transformers.distributed.tensor_parallel as tp
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    placements, seen = {}, []
    original = tp.distribute_tensor
    tp.distribute_tensor = lambda meta, mesh, placement, src_data_rank=None: (seen.append(tuple(placement)), meta)[1]
    try:
        for name, style in model._expand_parallel_plan(model.tp_plan).items():
            if name in params:
                module, _, param = name.rpartition(".")
                seen.clear()
                ALL_PARALLEL_STYLES[style].shard_param(modules[module], param, None)
                if seen:
                    placements[name] = seen[0]
    finally:
        tp.distribute_tensor = original
    return placements


class OneDimMesh:
    """What transformers' `DtensorShardOperation` asks of a 1-D tensor-parallel mesh: this rank and the size."""

    ndim = 1

    def __init__(self, rank, size):
        self.rank, self._size = rank, size

    def get_local_rank(self):
        return self.rank

    def size(self):
        return self._size


def transformers_rank_slice(source, placements, param_shape, rank, world_size, tensor_idx=None):
    """The slice of checkpoint tensor `source` that transformers' tensor-parallel loading reads for `rank`
    (`DtensorShardOperation.shard_tensor`, the shard-on-read of `from_pretrained(distributed_config=...)`)."""
    from transformers.distributed.sharding_utils import DtensorShardOperation

    assert not any(getattr(p, "dim", None) == 0 for p in placements) or len(param_shape) == 2 or tensor_idx is None
    op = DtensorShardOperation.__new__(DtensorShardOperation)
    op.device_mesh, op.placements, op.param_ndim = OneDimMesh(rank, world_size), placements, len(param_shape)
    # No plan of these models shards the expert axis: every rank owns every expert.
    op._axis0_offset, op._axis0_local_size, op._axis0_size = 0, param_shape[0], param_shape[0]
    return op.shard_tensor(source, tensor_idx=tensor_idx)


def rank_slices(tensor, placements, param_shape, rank, world_size, tensor_idx, whole_param):
    """What `rank` should hold of checkpoint tensor `tensor`: transformers' tensor-parallel loading, and for a tensor
    that is the whole parameter also torch's own placement (`Placement._split_tensor`, what `distribute_tensor` keeps on
    the rank). transformers' loader fails on a packed weight of which a rank holds nothing (e.g. `gate_up_proj` with 2
    intermediate rows over 4 ranks: `_slice_and_cat` indexes an empty interval list); torch's placement alone is the
    reference there."""
    wants = []
    try:
        wants.append(transformers_rank_slice(tensor, placements, param_shape, rank, world_size, tensor_idx))
    except IndexError:
        assert whole_param, "transformers' loader failed on a per-expert piece"
    if whole_param:
        [placement] = placements
        wants.append(placement._split_tensor(tensor, world_size, with_padding=False)[0][rank])
    return wants


def per_expert_params(model_type):
    """(regex, v5 target) of every per-expert source pattern of transformers' conversion mapping for `model_type`."""
    import re

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    out = []
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        sources = conv.source_patterns if isinstance(conv.source_patterns, list) else [conv.source_patterns]
        targets = conv.target_patterns if isinstance(conv.target_patterns, list) else [conv.target_patterns]
        for pattern in sources:
            if "*" in pattern and len(targets) == 1:
                out.append((re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$"), targets[0]))
    return out


def all_tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@check
def split_ranks_hold_the_slices_transformers_tp_loading_reads():
    from transformers import AutoConfig, AutoModelForCausalLM

    # A variant checkpoint (model.fp16-*.safetensors) is split with --variant: its ranks hold the same slices.
    sources = [(FIX / "checkpoint" / "llama_untied_3KB" / "expected", []),
               (FIX / "checkpoint" / "llama_variant_fp16" / "expected", ["--variant", "fp16"]),
               (FIX / "reshard" / "qwen2_moe" / "source_v5", []), (FIX / "reshard" / "qwen2_moe" / "source_original", [])]
    for src, flags in sources:
        config = AutoConfig.from_pretrained(src)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        placements = tp_placements(model)
        experts = per_expert_params(config.model_type)
        full = all_tensors(src)
        sharded = 0
        for n in (2, 3, 4):
            with tempfile.TemporaryDirectory() as tmp:
                peftkit("split", src, "--world-size", n, "--out", Path(tmp) / "ranks", *flags)
                for rank in range(n):
                    ours = all_tensors(Path(tmp) / "ranks" / f"rank{rank}")
                    assert ours.keys() == full.keys(), f"{src} rank {rank}: names differ"
                    for name, tensor in full.items():
                        param, idx = name, None
                        for regex, target in experts if name not in shapes else []:
                            if m := regex.search(name):
                                param, idx = name[: m.start()] + target, int(m.group(1))
                        got = ours[name]
                        if param not in placements:
                            assert torch.equal(got, tensor), f"{src} rank {rank}: replicated {name} differs"
                            continue
                        sharded += 1
                        for want in rank_slices(tensor, placements[param], shapes[param], rank, n, idx, name == param):
                            assert got.shape == want.shape and torch.equal(got, want), (
                                f"{src} rank {rank}/{n}: {name} {tuple(got.shape)} vs {tuple(want.shape)}")
        assert sharded > 0, f"{src}: nothing sharded"


def main():
    quiet()
    passed = failed = 0
    only = sys.argv[1:]
    for fn in CHECKS:
        if only and fn.__name__ not in only:
            continue
        try:
            fn()
            print(f"PASS {fn.__name__}")
            passed += 1
        except Exception:  # noqa: BLE001 - report every failure, keep going
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
            failed += 1
    print(f"interop: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
