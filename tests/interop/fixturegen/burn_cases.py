"""burn/ fixtures: tiny Llama-family checkpoints and peft adapters for crates/peftkit-burn.

`generate(root)` deletes and rewrites `root/burn/`. One folder per case:

* `base/`: `model.save_pretrained(base/)` of a seeded tiny model (transformers 5.24);
* `adapter/`: `get_peft_model(model, LoraConfig(...))`, adapter parameters overwritten with seeded
  random values (so the adapter is not a no-op), then `peft_model.save_pretrained(adapter/)` (peft 0.21.2).

No logits are recorded: they depend on the CPU, so tests/interop/burn_checks.py computes them live.
The Rust tests (crates/peftkit-burn/tests/) read these files for the byte-exact round trips
HF -> burn -> HF and peft -> burn -> peft. Must run with PYTHONHASHSEED=0 (peft writes
`target_modules` in set order).
"""
import os
from pathlib import Path

if __package__:
    from .common import build_model, generate_cases
else:  # run as a script
    from common import build_model, generate_cases

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

VOCAB = 64
BASE_SEED = 7
ADAPTER_SEED = 99
NAME = "peftkit/tiny-burn"

COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, max_position_embeddings=64)

# name: (model class, config class, config kwargs, base dtype, save kwargs, LoraConfig kwargs, what it covers)
CASES = {
    "llama_untied": (
        "LlamaForCausalLM", "LlamaConfig",
        dict(COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False),
        torch.float32, {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
             alpha_pattern={"q_proj": 16}),
        "Llama, untied head, GQA 2:1, f32; adapter on q/v with rank_pattern and alpha_pattern",
    ),
    "llama_tied_bf16": (
        "LlamaForCausalLM", "LlamaConfig",
        dict(COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        torch.bfloat16, {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "Llama, tied head, GQA 4:2, bf16 base (autocast f32 adapter)",
    ),
    "llama_theta_sharded": (
        "LlamaForCausalLM", "LlamaConfig",
        dict(COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        torch.float32, dict(max_shard_size="8KB"),
        dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True,
             layers_to_transform=[1]),
        "Llama, rope_theta 5e5, GQA 4:1, sharded base; adapter rsLoRA, layer 1 only",
    ),
    "qwen2": (
        "Qwen2ForCausalLM", "Qwen2Config",
        dict(COMMON, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        torch.float32, {},
        dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|k_proj|up_proj)", exclude_modules=["model.layers.0.mlp.up_proj"]),
        "Qwen2 (q/k/v biases), tied head; adapter by regex with exclude_modules",
    ),
    "mistral": (
        "MistralForCausalLM", "MistralConfig",
        dict(COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False),
        torch.float32, {},
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "Mistral (loads as Llama), untied head; adapter all-linear",
    ),
}


def randomize_adapter(peft_model):
    g = torch.Generator().manual_seed(ADAPTER_SEED)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_((p.float() + 0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))


def make_case(name):
    cls, config_cls, kw, dtype, save_kw, lora_kw, _ = CASES[name]

    def case(out: Path):
        from peft import LoraConfig, get_peft_model

        d = out / name
        model = build_model(cls, config_cls, kw, NAME, BASE_SEED).to(dtype)
        model.save_pretrained(d / "base", **save_kw)
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kw))
        randomize_adapter(peft_model)
        peft_model.save_pretrained(d / "adapter")

    case.__name__ = f"case_{name}"
    return case


README_MD = """# burn/ fixtures

Written by `tests/interop/fixturegen/burn_cases.py` (transformers 5.24.0, peft 0.21.2, `PYTHONHASHSEED=0`);
do not edit. Each case has `base/` (`save_pretrained` of a seeded tiny model) and `adapter/` (a peft LoRA
adapter with seeded random factors). No logits: tests/interop/burn_checks.py computes them live.

| case | what it covers |
|---|---|
""" + "".join(f"| `{n}` | {c[-1]} |\n" for n, c in CASES.items())


def generate(root):
    generate_cases(root, "burn", [make_case(n) for n in CASES], README_MD)
