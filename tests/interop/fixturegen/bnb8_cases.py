"""bitsandbytes 8-bit (LLM.int8) fixtures (tests/fixtures/bnb8/): a tiny Llama quantized to int8 by transformers +
bitsandbytes on the CPU, a LoRA adapter, and peft's merges into it.

Each case folder holds:

    base16/               the 16-bit original (`save_pretrained` of the seeded model)
    base8/                `from_pretrained(base16, quantization_config=BitsAndBytesConfig(load_in_8bit=True))` on the
                          CPU, then `save_pretrained`: for each quantized Linear `weight` (I8, the weight's shape), `SCB`
                          (F32, one absmax per row) and `weight_format` (U8 scalar 0: row-major)
    adapter/              a LoRA adapter (made on the 16-bit model, factors randomized)
    merged_dequantized/   base8 loaded in 8-bit, `model.dequantize()` (to config.json's dtype), the adapter applied,
                          `merge_and_unload()`, `save_pretrained` (what `peftkit merge --dequantize` must write)
    merged_requantized/   base8 loaded in 8-bit, the adapter applied, `merge_and_unload()` (peft's
                          `Linear8bitLt.merge`: `int8_vectorwise_dequant` to f32, `+ delta` in f32, `Int8Params(...)`
                          re-quantizes through float16), `save_pretrained(save_original_format=False)`
                          (what `peftkit merge` into base8 must write)
    case.json             how each was made

and kernels.safetensors: what `Int8Params(x).to("cpu")` stores (`weight` and `SCB`) for inputs in f32, bf16 and
f16 (ties, an all-zero row, with f32 a row beyond float16's range and a row holding NaN), and
`int8_vectorwise_dequant` of them.

Quantizing to int8 needs no GPU: `Int8Params.to("cpu")` runs bitsandbytes' default (pure torch) kernel.
"""
from __future__ import annotations

import json
from pathlib import Path

from .bnb_cases import LLAMA_KW, TARGETS, randomize, with_adapter
from .common import build_model, fresh_dir, quiet, write_json

BASE_SEED = 0
CASES = {
    # The usual: a bf16 model quantized to int8.
    "int8_bf16": dict(dtype="bfloat16"),
    # LLM.int8's original setting: an f16 model.
    "int8_f16": dict(dtype="float16"),
}


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def load8(path: Path, spec, quantize: bool):
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": bnb_config()} if quantize else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec["dtype"]), device_map="cpu", **extra)


def make_case(d: Path, spec) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    dtype = getattr(torch, spec["dtype"])
    model = build_model("LlamaForCausalLM", "LlamaConfig", LLAMA_KW, "tiny-llama-bnb8", BASE_SEED).to(dtype)
    model.save_pretrained(d / "base16")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    randomize(pm)
    pm.save_pretrained(d / "adapter")
    del pm, model

    load8(d / "base16", spec, quantize=True).save_pretrained(d / "base8")

    m = load8(d / "base8", spec, quantize=False)
    m.dequantize()
    with_adapter(m, d).merge_and_unload().save_pretrained(d / "merged_dequantized")

    # As for 4-bit: transformers 5.24 cannot revert the bitsandbytes load conversion of a pre-quantized
    # checkpoint (NotImplementedError); the model keeps Llama's own layout, so save it as held.
    merged = with_adapter(load8(d / "base8", spec, quantize=False), d).merge_and_unload()
    merged.save_pretrained(d / "merged_requantized", save_original_format=False)
    return {
        "model": {"class": "LlamaForCausalLM", "config": LLAMA_KW, "dtype": spec["dtype"]},
        "quantization": bnb_config().to_dict(),
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": TARGETS},
        "base8": "from_pretrained(base16, quantization_config=BitsAndBytesConfig(load_in_8bit=True), "
        "device_map='cpu'); save_pretrained",
        "merged_dequantized": "load base8 in 8-bit; model.dequantize(); PeftModel.from_pretrained; merge_and_unload(); "
        "save_pretrained",
        "merged_requantized": "load base8 in 8-bit; PeftModel.from_pretrained; merge_and_unload(); "
        "save_pretrained(save_original_format=False)",
    }


def kernel_cases(path: Path) -> None:
    """bitsandbytes' int8 quantization as `Int8Params` runs it on the CPU, for the Rust kernel tests:
    `int8.<dtype>.input`, and the `weight` / `SCB` it stores and their `int8_vectorwise_dequant`."""
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(8)
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        rows, cols = 41, 96
        x = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g).pow(3) * 4
        x[3] = 0  # an all-zero row: 127 / 0 = inf, 0 * inf = NaN, stored as 0
        # Exact ties: the scale of a row whose absmax is 254 is 0.5, and odd integers land on k + 0.5.
        x[5] = torch.arange(cols) * 2 - 95
        x[5, 0] = 254
        x[6] = x[6] * 1e-6  # tiny values, f16 subnormals
        if dtype == "float32":
            x[7, 3] = 70000.0  # beyond float16: inf scale, the row stored as zeros
            x[8, 10] = float("nan")  # a NaN row: NaN scale, stored as zeros
        x = x.to(getattr(torch, dtype))
        p = bnb.nn.Int8Params(x.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        out[f"int8.{dtype}.input"] = x
        out[f"int8.{dtype}.weight"] = p.data
        out[f"int8.{dtype}.SCB"] = p.SCB
        out[f"int8.{dtype}.dequantized"] = F.int8_vectorwise_dequant(p.data, p.SCB)
    save_file({k: v.clone().contiguous() for k, v in out.items()}, str(path), metadata={"format": "pt"})


def generate(root: Path) -> None:
    import bitsandbytes

    quiet()
    out = fresh_dir(root / "bnb8")
    for name, spec in CASES.items():
        d = out / name
        d.mkdir()
        case = make_case(d, spec)
        case["bitsandbytes"] = bitsandbytes.__version__
        write_json(d / "case.json", case, sort_keys=True)
    kernel_cases(out / "kernels.safetensors")
    (out / "README.md").write_text(__doc__.split("\n\n", 1)[1], encoding="utf-8")
    print(json.dumps(sorted(CASES)))
