"""bitsandbytes 4-bit fixtures (tests/fixtures/bnb/): a tiny Llama quantized by transformers + bitsandbytes on
the CPU, a LoRA adapter, and peft's merges into it.

Each case folder holds:

    base16/               the 16-bit original (`save_pretrained` of the seeded model)
    base4/                `from_pretrained(base16, quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`
                          then `save_pretrained`: packed `weight` (U8) + `absmax`, `quant_map`, nested stats and the
                          `quant_state.bitsandbytes__<type>` JSON
    adapter/              a LoRA adapter (made on the 16-bit model, factors randomized)
    merged_dequantized/   base4 loaded in 4-bit, `model.dequantize()`, the adapter applied, `merge_and_unload()`,
                          `save_pretrained` (what `peftkit merge --dequantize` must write)
    merged_requantized/   base4 loaded in 4-bit, the adapter applied, `merge_and_unload()` (peft dequantizes,
                          adds the delta in f32 and re-quantizes with bitsandbytes), `save_pretrained`
                          (what `peftkit merge` into base4 must write)
    merged_qlora/         base16 with every adapted weight replaced by bitsandbytes' round trip
                          `dequantize_4bit(quantize_4bit(W))` (the weights a QLoRA adapter was trained against),
                          the adapter applied, `merge_and_unload()`, `save_pretrained`
                          (what `peftkit merge --base base16 --qlora-base TYPE` must write)
    case.json             how each was made

and kernels.safetensors: bitsandbytes' quantize_4bit / dequantize_4bit (NF4 and FP4, with and without nested
absmax, f32 / bf16 / f16 inputs) and torch's f32 mean (the nested offset) on random inputs.

Must run on the CPU with bitsandbytes' native CPU library loaded (its C++ kernels are the reference).
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import build_model, fresh_dir, quiet, write_json

BASE_SEED = 0
ADAPTER_SEED = 1234
VOCAB = 128
LLAMA_KW = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
CASES = {
    # QLoRA's recipe: NF4 with double quantization (nested absmax), bf16 weights.
    "nf4_nested_bf16": dict(quant_type="nf4", double_quant=True, dtype="bfloat16"),
    # FP4, absmax kept in f32, f16 weights.
    "fp4_f16": dict(quant_type="fp4", double_quant=False, dtype="float16"),
}


def bnb_config(spec):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec["quant_type"],
        bnb_4bit_use_double_quant=spec["double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, spec["dtype"]),
    )


def load4(path: Path, spec):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(spec), dtype=getattr(torch, spec["dtype"]), device_map="cpu"
    )


def randomize(peft_model):
    import torch

    g = torch.Generator().manual_seed(ADAPTER_SEED)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_((p.float() + 0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))


def with_adapter(model, d: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, d / "adapter")


def round_trip(w, spec):
    """bitsandbytes' 4-bit round trip of one weight, as transformers quantizes it (Params4bit defaults:
    blocksize 64, uint8 storage) and peft's `dequantize_bnb_weight` undoes it."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(
        w, blocksize=64, quant_type=spec["quant_type"], compress_statistics=spec["double_quant"]
    )
    return F.dequantize_4bit(q, state)


def make_case(d: Path, spec) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"])
    model = build_model("LlamaForCausalLM", "LlamaConfig", LLAMA_KW, "tiny-llama-bnb", BASE_SEED).to(dtype)
    model.save_pretrained(d / "base16")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    randomize(pm)
    pm.save_pretrained(d / "adapter")
    del pm, model

    load4(d / "base16", spec).save_pretrained(d / "base4")

    m = load4(d / "base4", spec)
    m.dequantize()
    with_adapter(m, d).merge_and_unload().save_pretrained(d / "merged_dequantized")

    # transformers 5.24 cannot revert the bitsandbytes load conversion of a pre-quantized checkpoint
    # (NotImplementedError); the model keeps Llama's own layout, so save it as held.
    merged = with_adapter(load4(d / "base4", spec), d).merge_and_unload()
    merged.save_pretrained(d / "merged_requantized", save_original_format=False)

    m = AutoModelForCausalLM.from_pretrained(d / "base16", dtype=dtype)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                mod.weight.copy_(round_trip(mod.weight.data, spec))
    with_adapter(m, d).merge_and_unload().save_pretrained(d / "merged_qlora")
    return {
        "model": {"class": "LlamaForCausalLM", "config": LLAMA_KW, "dtype": spec["dtype"]},
        "quantization": bnb_config(spec).to_dict(),
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": TARGETS},
        "qlora_base": spec["quant_type"],
        "qlora_double_quant": spec["double_quant"],
        "merged_dequantized": "load base4 in 4-bit; model.dequantize(); PeftModel.from_pretrained; merge_and_unload(); save_pretrained",
        "merged_requantized": "load base4 in 4-bit; PeftModel.from_pretrained; merge_and_unload(); "
        "save_pretrained(save_original_format=False)",
        "merged_qlora": "base16 with the adapted weights replaced by dequantize_4bit(quantize_4bit(W, blocksize=64)); "
        "PeftModel.from_pretrained; merge_and_unload(); save_pretrained",
    }


def kernel_cases(path: Path) -> None:
    """bitsandbytes' CPU kernels on random inputs (ties, a partial last block, an all-zero block, values far
    outside a block's range), for the Rust kernel tests: `<case>.input`, and what the library returned."""
    import torch
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        x = torch.randn(64 * 37 + 10, generator=g) * torch.rand(64 * 37 + 10, generator=g).pow(4) * 3
        x[64:128] = 0  # an all-zero block
        x[200:264] = torch.linspace(-1, 1, 64)  # exact midpoints between codes
        x = x.to(getattr(torch, dtype))
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                q, st = F.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=nested)
                key = f"q4.{qt}.{dtype}.{'nested' if nested else 'plain'}"
                out[f"q4.{dtype}.input"] = x
                out[f"{key}.packed"] = q.reshape(-1)
                out[f"{key}.absmax"] = st.absmax
                if nested:
                    out[f"{key}.nested_absmax"] = st.state2.absmax
                    out[f"{key}.offset"] = st.offset.reshape(1)
                    out[f"{key}.nested_code"] = st.state2.code
                out[f"{key}.dequantized"] = F.dequantize_4bit(q, st)
    # 8-bit blockwise quantization with the dynamic code (the nested absmax), many values per code interval.
    x = torch.randn(256 * 80 + 77, generator=g) * torch.rand(256 * 80 + 77, generator=g).pow(3)
    x[256:512] = torch.linspace(-1, 1, 256)
    x[512:768] = 0
    q, st = F.quantize_blockwise(x, blocksize=256)
    out.update({"q8.input": x, "q8.out": q, "q8.absmax": st.absmax, "q8.code": st.code})
    out["q8.dequantized"] = F.dequantize_blockwise(q, st)
    # torch's f32 mean (the nested offset) at lengths around its vector and cascade thresholds, one thread
    # and the host's default.
    threads = torch.get_num_threads()
    for n in (1, 7, 8, 31, 33, 1000, 4097, 32768, 40001):
        x = torch.rand(n, generator=g) * 2
        out[f"mean.{n}.input"] = x
        torch.set_num_threads(1)
        out[f"mean.{n}.threads1"] = x.mean().reshape(1)
        torch.set_num_threads(2)
        out[f"mean.{n}.threads2"] = x.mean().reshape(1)
    torch.set_num_threads(threads)
    save_file({k: v.clone().contiguous() for k, v in out.items()}, str(path), metadata={"format": "pt"})


def generate(root: Path) -> None:
    import bitsandbytes
    from bitsandbytes.cextension import BNBNativeLibrary, lib

    quiet()
    # The reference is bitsandbytes' native CPU code; its pure-torch fallback rounds differently.
    assert isinstance(lib, BNBNativeLibrary), "bitsandbytes' native CPU library did not load"
    out = fresh_dir(root / "bnb")
    for name, spec in CASES.items():
        d = out / name
        d.mkdir()
        case = make_case(d, spec)
        case["bitsandbytes"] = bitsandbytes.__version__
        write_json(d / "case.json", case, sort_keys=True)
    kernel_cases(out / "kernels.safetensors")
    (out / "README.md").write_text(__doc__.split("\n\n", 1)[1], encoding="utf-8")
    print(json.dumps(sorted(CASES)))
