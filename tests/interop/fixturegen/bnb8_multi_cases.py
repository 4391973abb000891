"""Kept-format merges of several adapters into a bitsandbytes 8-bit (LLM.int8) base (tests/fixtures/bnb8_multi/):
what peft's `Linear8bitLt.merge` writes when it merges more than one adapter into one int8 weight. For each adapter,
in the order of the active adapters, it dequantizes the weight (`int8_vectorwise_dequant`, f32), adds that adapter's
delta in f32 and stores the sum as a new `Int8Params` (quantized again through float16), whose codes and `SCB` the
next adapter dequantizes.

Each case folder holds:

    base8/          the bnb8 fixtures' tiny Llama, loaded with `BitsAndBytesConfig(load_in_8bit=True)` from its 16-bit
                    `save_pretrained` and saved again
    adapter_x/ ...  LoRA adapters made on the 16-bit model (quant_multi_cases' x, y, z: factors randomized, targets
                    overlapping, so that some weights get one adapter and some two or three)
    <merged>/       for each merge of `case.json`'s "merges": base8 loaded in 8-bit, `PeftModel.from_pretrained` of the
                    first adapter and `load_adapter` of the others, `base_model.set_adapter(order)`,
                    `merge_and_unload()`, `save_pretrained(save_original_format=False)` (what
                    `peftkit merge --base base8 --adapter ...` in that order must write)
    case.json       how each was made

Quantizing to int8 needs no GPU (see bnb8_cases).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import bnb8_cases, bnb_cases
from .common import build_model, fresh_dir, quiet, write_json
from .quant_multi_cases import ADAPTERS, make_adapter, with_adapters

CASES = {
    # A bf16 model quantized to int8: two adapters in both orders, and three.
    "int8_bf16": dict(
        spec=bnb8_cases.CASES["int8_bf16"],
        adapters=["x", "y", "z"],
        merges={"merged_xy": ["x", "y"], "merged_yx": ["y", "x"], "merged_xyz": ["x", "y", "z"]},
    ),
}
MODEL_NAME = "tiny-llama-bnb8"


def make_case(d: Path, case) -> dict:
    import tempfile

    import torch

    spec = case["spec"]
    dtype = getattr(torch, spec["dtype"])
    with tempfile.TemporaryDirectory() as tmp:
        base16 = Path(tmp) / "base16"
        model = build_model("LlamaForCausalLM", "LlamaConfig", bnb_cases.LLAMA_KW, MODEL_NAME,
                            bnb8_cases.BASE_SEED).to(dtype)
        model.save_pretrained(base16)
        del model
        bnb8_cases.load8(base16, spec, quantize=True).save_pretrained(d / "base8")
        for name in case["adapters"]:
            make_adapter(base16, d / f"adapter_{name}", name, MODEL_NAME, dtype)
    for out, order in case["merges"].items():
        pm = with_adapters(bnb8_cases.load8(d / "base8", spec, quantize=False), d, order)
        # transformers 5.24 cannot revert the bitsandbytes load conversion (see bnb_cases); Llama's names are kept.
        pm.merge_and_unload().save_pretrained(d / out, save_original_format=False)
    return {
        "model": {"class": "LlamaForCausalLM", "config": bnb_cases.LLAMA_KW, "dtype": spec["dtype"]},
        "quantization": bnb8_cases.bnb_config().to_dict(),
        "adapters": {n: {"lora": ADAPTERS[n][0], "seed": ADAPTERS[n][1]} for n in case["adapters"]},
        "merges": case["merges"],
        "merge": "load base8 in 8-bit; PeftModel.from_pretrained(adapter_<first>); load_adapter(adapter_<n>, "
        "adapter_name=<n>) for the others; base_model.set_adapter(the order); merge_and_unload(); "
        "save_pretrained(save_original_format=False)",
    }


def generate(root: Path) -> None:
    import bitsandbytes

    quiet()
    out = fresh_dir(root / "bnb8_multi")
    for name, case in CASES.items():
        d = out / name
        d.mkdir()
        info = make_case(d, case)
        info["bitsandbytes"] = bitsandbytes.__version__
        write_json(d / "case.json", info, sort_keys=True)
    (out / "README.md").write_text(__doc__.split("\n\n", 1)[1], encoding="utf-8")
    print(json.dumps(sorted(CASES)))
