#!/usr/bin/env python3
"""Live interop checks: the real transformers and peft load what peftkit writes.

Run by tests/interop/run.sh (which provides the pinned venv and PEFTKIT_BIN). Each check runs
the peftkit binary on a fixture made by the real libraries, loads the result with
transformers/peft and compares logits with what the libraries themselves produce.
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


@check
def merged_checkpoints_load_in_transformers_with_peft_merged_logits():
    """peftkit merge output, loaded by transformers, gives exactly the logits of peft's own
    merge_and_unload() (recorded in the fixture when it was made)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for case in MERGE_CASES:
        d = FIX / "peft" / case
        adapters = [d / "adapter"] + sorted(p.parent for p in (d / "adapter").glob("*/adapter_config.json"))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "merged"
            args = ["merge", "--base", d / "base", "--out", out]
            for a in adapters:
                args += ["--adapter", a]
            peftkit(*args)
            ours = logits_of(AutoModelForCausalLM.from_pretrained(out))
        theirs = load_file(d / "logits.safetensors")["merged_logits"]
        assert torch.equal(ours, theirs), f"{case}: max diff {(ours - theirs).abs().max()}"


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
    model and gives the logits of peft's own conversion of the legacy adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for case in ["mixtral", "qwen3_moe"]:
        d = FIX / "convert" / case
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "fused"
            peftkit("remap", d / "legacy_adapter", "--out", out, "--to", "transformers-v5", "--base", d / "base")
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), out)
            input_ids = torch.tensor(json.loads((d / "case.json").read_text())["input_ids"])
            ours = logits_of(model, input_ids)
        theirs = load_file(d / "logits.safetensors")["logits"]
        assert torch.equal(ours, theirs), f"{case}: max diff {(ours - theirs).abs().max()}"


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
    logits equal those of the adapter peft itself saved (recorded in the fixture)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for case, extra in EXTRACT_CASES.items():
        d = FIX / "peft" / case
        extra = [str(d / a) if a.endswith(".json") else a for a in extra]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "adapter"
            peftkit("extract", "--from", d / "full_state_dict.safetensors", "--out", out,
                    "--base-model", "peftkit/tiny-llama", *extra)
            base = AutoModelForCausalLM.from_pretrained(d / "base")
            model = PeftModel.from_pretrained(base, out)
            ours = logits_of(model)
        theirs = load_file(d / "logits.safetensors")["logits"]
        assert torch.equal(ours, theirs), f"{case}: max diff {(ours - theirs).abs().max()}"


def main():
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
