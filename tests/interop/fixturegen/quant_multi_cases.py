"""Kept-format merges of several adapters, and of DoRA, into quantized bases (tests/fixtures/quant_multi/).

bitsandbytes 4-bit (`nf4_nested_bf16`, `fp4_f16`): what peft's `Linear4bit.merge` writes when it merges more than one
adapter into one 4-bit weight (dequantize, add that adapter's delta, re-quantize: once per adapter, in the order of
the active adapters) or a DoRA adapter (its weight norm taken from the dequantized weight, the result cast back to the
dequantized dtype). Each such case folder holds:

    base4/          a tiny Llama (the bnb fixtures' model) loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)`
                    from its 16-bit `save_pretrained` and saved again
    adapter_x/ ...  LoRA (or DoRA) adapters made on the 16-bit model, factors randomized, targets overlapping
    <merged>/       for each merge of `case.json`'s "merges": base4 loaded in 4-bit, `PeftModel.from_pretrained` of
                    the first adapter and `load_adapter` of the others, `base_model.set_adapter(order)`,
                    `merge_and_unload()`, `save_pretrained(save_original_format=False)` (what
                    `peftkit merge --base base4 --adapter ...` in that order must write)
    case.json       how each was made

FP8 (`fp8_llama`, made as quant_cases.py makes its cases): transformers loads an FP8 checkpoint on CPU dequantized to
bf16, so peft merges several adapters as into any bf16 model (one rounding per adapter) and the FP8 format is applied
once, by `Fp8Quantize`, to the result:

    base/ adapter_x/ adapter_y/
    merged_dequantized/   from_pretrained(base) on CPU, both adapters active (x, y), merge_and_unload(), save_pretrained
    merged_fp8/           base with every changed weight replaced by Fp8Quantize._quantize_one of merged_dequantized's

Must run on the CPU with bitsandbytes' native CPU library loaded (its C++ kernels are the reference).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import bnb_cases
from .common import build_model, fresh_dir, name_model, quiet, write_json

# (name, LoraConfig kwargs, seed): overlapping targets, so that some weights get one adapter and some two or three.
# Names are not substrings of peft's "lora_" prefix (peft warns that such a name may reinitialize the adapter).
ADAPTERS = {
    "x": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]), 11),
    "y": (dict(r=2, lora_alpha=16, target_modules=["q_proj", "down_proj", "gate_proj"]), 22),
    "z": (dict(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"]), 33),
    "dora": (dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]), 44),
}
CASES = {
    # QLoRA's recipe (NF4, double quantization, bf16): two adapters in both orders, and three.
    "nf4_nested_bf16": dict(
        spec=bnb_cases.CASES["nf4_nested_bf16"],
        adapters=["x", "y", "z", "dora"],
        merges={"merged_xy": ["x", "y"], "merged_yx": ["y", "x"], "merged_xyz": ["x", "y", "z"],
                "merged_dora": ["dora"], "merged_dora_y": ["dora", "y"]},
    ),
    # FP4 with f32 absmax, f16 weights.
    "fp4_f16": dict(
        spec=bnb_cases.CASES["fp4_f16"],
        adapters=["x", "y", "dora"],
        merges={"merged_xy": ["x", "y"], "merged_dora": ["dora"]},
    ),
}
FP8_CASE = "fp8_llama"
FP8_ORDER = ["x", "y"]


def make_adapter(base16: Path, dest: Path, name: str, model_name: str, dtype=None) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kw, seed = ADAPTERS[name]
    model = AutoModelForCausalLM.from_pretrained(base16, **({} if dtype is None else {"dtype": dtype}))
    name_model(model, model_name)  # what peft records, not the (temporary) folder it was loaded from
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                # Magnitudes near 1 (DoRA), factors of 0.1: deltas of the order of the weights' quantization steps.
                p.copy_((p.float() + 0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
    pm.save_pretrained(dest)


def merged(d: Path, spec, order: list, out: Path) -> None:
    pm = with_adapters(bnb_cases.load4(d / "base4", spec), d, order)
    # transformers 5.24 cannot revert the bitsandbytes load conversion (see bnb_cases); Llama's names are kept.
    pm.merge_and_unload().save_pretrained(out, save_original_format=False)


def make_case(d: Path, case) -> dict:
    import tempfile

    import torch

    spec = case["spec"]
    dtype = getattr(torch, spec["dtype"])
    with tempfile.TemporaryDirectory() as tmp:
        base16 = Path(tmp) / "base16"
        model = build_model("LlamaForCausalLM", "LlamaConfig", bnb_cases.LLAMA_KW, "tiny-llama-bnb",
                            bnb_cases.BASE_SEED).to(dtype)
        model.save_pretrained(base16)
        del model
        bnb_cases.load4(base16, spec).save_pretrained(d / "base4")
        for name in case["adapters"]:
            make_adapter(base16, d / f"adapter_{name}", name, "tiny-llama-bnb", dtype)
    for out, order in case["merges"].items():
        merged(d, spec, order, d / out)
    return {
        "model": {"class": "LlamaForCausalLM", "config": bnb_cases.LLAMA_KW, "dtype": spec["dtype"]},
        "quantization": bnb_cases.bnb_config(spec).to_dict(),
        "adapters": {n: {"lora": ADAPTERS[n][0], "seed": ADAPTERS[n][1]} for n in case["adapters"]},
        "merges": case["merges"],
        "merge": "load base4 in 4-bit; PeftModel.from_pretrained(adapter_<first>); load_adapter(adapter_<n>, "
        "adapter_name=<n>) for the others; base_model.set_adapter(the order); merge_and_unload(); "
        "save_pretrained(save_original_format=False)",
    }


def with_adapters(model, d: Path, order: list):
    """`model` with the adapters `adapter_<name>` of `d` loaded and active, in `order`."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, d / f"adapter_{order[0]}")
    for name in order[1:]:
        pm.load_adapter(d / f"adapter_{name}", adapter_name=name)
    pm.base_model.set_adapter(["default"] + order[1:])
    return pm


def make_fp8_case(d: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from . import quant_cases as qc

    model = build_model("LlamaForCausalLM", "LlamaConfig", dict(qc.LLAMA_KW, dtype="bfloat16"),
                        f"peftkit/tiny-{FP8_CASE}", qc.BASE_SEED)
    qc.write_fp8_base(model.to(torch.bfloat16), d, "float")
    for name in FP8_ORDER:
        make_adapter(d / "base", d / f"adapter_{name}", name, f"peftkit/tiny-{FP8_CASE}")
    pm = with_adapters(AutoModelForCausalLM.from_pretrained(d / "base"), d, FP8_ORDER)
    pm.merge_and_unload().save_pretrained(d / "merged_dequantized")
    touched = qc.changed_weights(d)
    qc.write_fp8_reference(d, "float", touched)
    return {
        "model": {"class": "LlamaForCausalLM", "config": qc.LLAMA_KW, "dtype": "bfloat16"},
        "quantization": {"weight_block_size": qc.BLOCK, "scale_fmt": "float", "quantized": "every *_proj.weight"},
        "adapters": {n: {"lora": ADAPTERS[n][0], "seed": ADAPTERS[n][1]} for n in FP8_ORDER},
        "order": FP8_ORDER,
        "requantized": touched,
    }


def generate(root: Path) -> None:
    import bitsandbytes
    from bitsandbytes.cextension import BNBNativeLibrary, lib

    quiet()
    assert isinstance(lib, BNBNativeLibrary), "bitsandbytes' native CPU library did not load"
    out = fresh_dir(root / "quant_multi")
    for name, case in CASES.items():
        d = out / name
        d.mkdir()
        info = make_case(d, case)
        info["bitsandbytes"] = bitsandbytes.__version__
        write_json(d / "case.json", info, sort_keys=True)
    d = out / FP8_CASE
    d.mkdir()
    write_json(d / "case.json", make_fp8_case(d), sort_keys=True)
    (out / "README.md").write_text(__doc__.split("\n\n", 1)[1], encoding="utf-8")
    print(json.dumps(sorted(CASES) + [FP8_CASE]))
