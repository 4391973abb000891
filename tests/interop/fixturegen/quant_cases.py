"""quant/ fixtures: FP8 block-scaled checkpoints (transformers' finegrained_fp8) and merges into them.

`generate(root)` deletes and rewrites `root/quant/`; the layout is documented in README_MD at the end of this file
(written to `tests/fixtures/quant/README.md`).

transformers 5.24 cannot quantize a model to FP8 without a GPU (`FineGrainedFP8HfQuantizer.validate_environment`
raises), but it loads a pre-quantized FP8 checkpoint on CPU by dequantizing it (`dequantize=True` is forced, the
`Fp8Dequantize` op runs on every weight and its `weight_scale_inv`, and `quantization_config` is removed from the
model). So each FP8 base is made by running transformers' own `Fp8Quantize._quantize_one` on CPU over the weights
of a seeded bf16 model, and everything after that is the real pipeline:

* `merged_dequantized/`: `AutoModelForCausalLM.from_pretrained(base/)` on CPU (dequantized to bf16),
  `PeftModel.from_pretrained(.., adapter/)`, `merge_and_unload()`, `save_pretrained()`;
* `merged_fp8/`: the base with every weight the adapter targets replaced by `Fp8Quantize._quantize_one` of that
  weight in `merged_dequantized/` (and its new `weight_scale_inv`); every other tensor and `config.json` as in
  `base/`. This is "transformers' quantizer applied to peft's bf16 merge"; transformers itself has no CPU path that
  writes it.
"""
import json
import os
import shutil
from pathlib import Path

if __package__:
    from .common import build_model, generate_cases, name_model, write_json
    from .peft_cases import load_peft_model, merge_and_unload, randomize_adapter_params
else:  # run as a script
    from common import build_model, generate_cases, name_model, write_json
    from peft_cases import load_peft_model, merge_and_unload, randomize_adapter_params

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

BASE_SEED = 0
BLOCK = [32, 32]
LLAMA_KW = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    vocab_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
QWEN3_MOE_KW = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    num_experts=4,
    num_experts_per_tok=2,
    vocab_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def fp8_quantizer(scale_fmt: str):
    """transformers' `Fp8Quantize` op, bound to a `FineGrainedFP8Config` (it reads only the config)."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    config = FineGrainedFP8Config(weight_block_size=BLOCK, scale_fmt=scale_fmt)
    return Fp8Quantize(SimpleNamespace(quantization_config=config)), config


def is_fp8_weight(key: str) -> bool:
    """The weights an FP8 release quantizes here: every linear projection (attention, MLP, experts); embeddings,
    norms, the router and lm_head stay bf16."""
    return key.endswith("_proj.weight")


def write_fp8_base(model, d: Path, scale_fmt: str) -> None:
    """`model` (bf16) saved to `d/base` as an FP8 checkpoint: its projections quantized by `Fp8Quantize`, the
    config written by transformers with the `quantization_config` it serializes."""
    bf16 = d / "bf16"
    model.save_pretrained(bf16)
    quantize, qconfig = fp8_quantizer(scale_fmt)
    state = {}
    for key, value in load_file(bf16 / "model.safetensors").items():
        state.update(quantize._quantize_one(key, value) if is_fp8_weight(key) else {key: value})
    base = d / "base"
    base.mkdir()
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    model.config.quantization_config = qconfig
    model.config.save_pretrained(base)
    shutil.copy(bf16 / "generation_config.json", base / "generation_config.json")
    shutil.rmtree(bf16)


def requantized_state(base: Path, merged: Path, scale_fmt: str, touched: list) -> dict:
    """The tensors of `base` with the `touched` weights replaced by `Fp8Quantize._quantize_one` of their value in
    the bf16 merge `merged` (weight and weight_scale_inv). tests/interop/live_checks.py builds its references with
    this function too."""
    quantize, _ = fp8_quantizer(scale_fmt)
    merged_state = load_file(merged / "model.safetensors")
    state = load_file(base / "model.safetensors")
    for key in touched:
        state.update(quantize._quantize_one(key, merged_state[key]))
    return state


def write_fp8_reference(d: Path, scale_fmt: str, touched: list) -> None:
    """`d/merged_fp8`: the base with the `touched` weights re-quantized from `merged_dequantized/`."""
    state = requantized_state(d / "base", d / "merged_dequantized", scale_fmt, touched)
    out = d / "merged_fp8"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        shutil.copy(d / "base" / f, out / f)


def changed_weights(d: Path) -> list:
    """The FP8 weights whose merged value differs from the base's dequantized value (what the adapter
    targets: its random factors change every element's block)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(d / "base")
    plain.save_pretrained(d / "dequantized")
    before = load_file(d / "dequantized" / "model.safetensors")
    shutil.rmtree(d / "dequantized")
    after = load_file(d / "merged_dequantized" / "model.safetensors")
    return sorted(k for k in after if is_fp8_weight(k) and not torch.equal(before[k], after[k]))


def fp8_case(out: Path, name: str, *, cls: str, config_cls: str, kw: dict, lora: dict, scale_fmt: str,
             description: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = out / name
    d.mkdir(parents=True)
    model = build_model(cls, config_cls, dict(kw, dtype="bfloat16"), f"peftkit/tiny-{name}", BASE_SEED)
    write_fp8_base(model.to(torch.bfloat16), d, scale_fmt)
    del model

    # The adapter is trained (here: randomized) on the base as transformers loads it on CPU.
    loaded = AutoModelForCausalLM.from_pretrained(d / "base")
    assert not hasattr(loaded.config, "quantization_config") and loaded.dtype == torch.bfloat16
    name_model(loaded, f"peftkit/tiny-{name}")  # what peft records, not the folder it was built in
    peft_model = get_peft_model(loaded, LoraConfig(**lora))
    randomize_adapter_params(peft_model)
    peft_model.save_pretrained(d / "adapter")
    del peft_model, loaded

    pm, _ = load_peft_model(d, ["default"])
    merge_and_unload(pm).save_pretrained(d / "merged_dequantized")
    touched = changed_weights(d)
    write_fp8_reference(d, scale_fmt, touched)
    write_json(d / "case.json", {
        "description": description,
        "model": {"class": cls, "config": kw},
        "quantization": {"weight_block_size": BLOCK, "scale_fmt": scale_fmt, "quantized": "every *_proj.weight"},
        "peft_config": lora,
        "requantized": touched,
    }, sort_keys=True)


def lora_kw(**extra):
    return dict(r=4, lora_alpha=8, init_lora_weights=False, **extra)


def case_fp8_llama(out):
    fp8_case(out, "fp8_llama", cls="LlamaForCausalLM", config_cls="LlamaConfig", kw=LLAMA_KW,
             lora=lora_kw(target_modules=["q_proj", "v_proj", "down_proj"]), scale_fmt="float",
             description="Llama, FP8 projections with f32 weight_scale_inv (32x32 blocks), LoRA on q/v/down_proj")


def case_fp8_llama_ue8m0(out):
    fp8_case(out, "fp8_llama_ue8m0", cls="LlamaForCausalLM", config_cls="LlamaConfig", kw=LLAMA_KW,
             lora=lora_kw(target_modules=["o_proj", "gate_proj"]), scale_fmt="ue8m0",
             description="Llama, FP8 projections with UE8M0 (F8_E8M0) weight_scale_inv, LoRA on o_proj/gate_proj")


def case_fp8_qwen3_moe(out):
    fp8_case(out, "fp8_qwen3_moe", cls="Qwen3MoeForCausalLM", config_cls="Qwen3MoeConfig", kw=QWEN3_MOE_KW,
             lora=lora_kw(target_modules=["q_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
             scale_fmt="float",
             description="Qwen3-MoE (4 experts stored per expert on disk), FP8 attention and experts, LoRA on "
             "q_proj and on the fused expert parameters (target_parameters)")


def case_conversions(out):
    """conversions.safetensors: torch's float -> float8_e4m3fn cast of every bf16 bit pattern (as f32) and of
    random f32 values, and the
    UE8M0 rounding `Fp8Quantize` applies to inverse scales, for values at and just above powers of two."""
    g = torch.Generator().manual_seed(7)
    every_bf16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    # Full f32 mantissas (rounding bits below bf16's) over e4m3's range and past it.
    exponents = torch.randint(-14, 11, (1 << 16,), generator=g).float()
    random_f32 = (torch.rand(1 << 16, generator=g) * 2 - 1) * torch.pow(2.0, exponents)
    x = torch.cat([every_bf16, random_f32])
    ks = torch.arange(-40, 41, dtype=torch.float32)
    steps = torch.arange(0, 9, dtype=torch.float32)
    inv = (torch.pow(2.0, ks)[:, None] * (1 + steps[None, :] * 2.0**-23)).flatten()
    inv = torch.cat([inv, torch.rand(4096, generator=g) * 1e-2])
    ue8m0 = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
    save_file({
        "x": x, "e4m3": x.to(torch.float8_e4m3fn),
        "inv": inv, "inv_ue8m0": ue8m0.to(torch.float8_e8m0fnu),
    }, str(out / "conversions.safetensors"), metadata={"format": "pt"})


CASES = [case_conversions, case_fp8_llama, case_fp8_llama_ue8m0, case_fp8_qwen3_moe]


def generate(root: Path) -> None:
    generate_cases(root, "quant", CASES, README_MD)


README_MD = """\
# quant fixtures

Written by `tests/interop/fixturegen/quant_cases.py` (`python tests/interop/make_fixtures.py quant`) with the
pinned stack (torch 2.15.0 CPU, 1 thread; transformers 5.24.0; peft 0.21.2). The generator rewrites this folder.

transformers cannot quantize to FP8 without a GPU, but loads an FP8 checkpoint on CPU by dequantizing it to the
model dtype. Each FP8 base is therefore made with transformers' own `Fp8Quantize._quantize_one` (run on CPU) from
a seeded bf16 model; everything after is the real pipeline.

```
quant/
  conversions.safetensors   x (every bf16 bit pattern as f32, then 65536 random f32 in +-2**11) and
                            e4m3 = x.to(torch.float8_e4m3fn);
                            inv and inv_ue8m0 = 2**ceil(log2(inv.clamp(min=tiny))) as F8_E8M0
                            (the rounding Fp8Quantize applies to UE8M0 inverse scales)
  <case>/
    case.json               model, quantization, LoRA config, and `requantized`: the weights the adapter changes
    base/                   the FP8 checkpoint: config.json (config.save_pretrained, with quantization_config),
                            generation_config.json, model.safetensors (F8_E4M3 weights + weight_scale_inv)
    adapter/                peft_model.save_pretrained, the LoRA randomized (peft_cases.randomize_adapter_params)
                            on the base as transformers loads it on CPU
    merged_dequantized/     from_pretrained(base/) on CPU (dequantized to bf16) + PeftModel.from_pretrained +
                            merge_and_unload() + save_pretrained(): quantization_config dropped
    merged_fp8/             base/ with each `requantized` weight replaced by Fp8Quantize._quantize_one of its
                            merged_dequantized/ value (weight + weight_scale_inv); all else as in base/
```

Cases: `fp8_llama` (f32 scales), `fp8_llama_ue8m0` (scale_fmt ue8m0: F8_E8M0 scales), `fp8_qwen3_moe` (experts
stored per expert on disk, each FP8 with its own scales; LoRA on the fused v5 expert parameters). Blocks are
32 x 32 so that tiny models have several blocks per weight.

The merged weights contain a low-rank product `B @ A`, whose rounding depends on the host's MKL kernel
(see ../HOST.json); dequantization and re-quantization are elementwise and host-independent.
"""
