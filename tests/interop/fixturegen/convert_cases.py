"""convert/ fixtures: legacy (transformers v4, per-expert) LoRA adapters of MoE models and what peft 0.21.2 makes
of them on transformers 5.24 (tests/fixtures/convert/).

transformers v5 fuses the experts of Mixtral-style and Qwen2-MoE-style models (`mlp.experts.gate_up_proj`
`[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`). An adapter trained with transformers v4 has one LoRA pair per
expert projection (`block_sparse_moe.experts.{e}.w1.lora_A.weight`, ...). When such an adapter is loaded on a v5
model, peft rewrites its config (`convert_peft_config_for_transformers`) and fuses its tensors
(`convert_peft_adapter_state_dict_for_transformers`); saving the loaded model writes the fused adapter.

`generate(root)` deletes and rewrites `root/convert/`. One folder per case:

- `base/`: `save_pretrained()` of a tiny v5 model built from a config with `torch.manual_seed(0)` (transformers
  writes the original per-expert layout on disk);
- `legacy_adapter/`: a v4-style adapter: `adapter_config.json` written by
  `LoraConfig(...).save_pretrained()`, and `adapter_model.safetensors` written with `safetensors.torch.save_file`
  (metadata `{"format": "pt"}`), with one f32 LoRA pair per targeted v4 module, values `0.1 * randn` from
  `torch.Generator().manual_seed(1234)` in the order of `case.json["legacy_keys"]`;
- `converted_adapter/`: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base/), legacy_adapter/)`
  then `.save_pretrained(converted_adapter/)` (what peft writes for the converted adapter);
- `merged/`: that loaded model's `merge_and_unload()` saved with `save_pretrained(merged/)`;
- `logits.safetensors`: `logits` of the loaded adapter model and `merged_logits` of the merged one on
  `case.json["input_ids"]`;
- `case.json`: how the case was built.

Run alone with:

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 python tests/interop/make_fixtures.py convert
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .common import TINY_DECODER, build_model, generate_cases, lm_logits, name_model, write_json

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

BASE_SEED = 0
ADAPTER_SEED = 1234
VOCAB = 32
INPUT_IDS = [[3, 17, 22, 5, 31, 0, 28, 9, 11, 12]]

# Expert widths of at least 12: torch's CPU matmul rounds `B @ A` without FMA when the output has
# at most 8 columns (in_features <= 8), a regime real models never hit (see the notes in case.json).
MIXTRAL_KW = dict(
    TINY_DECODER,
    vocab_size=VOCAB,
    intermediate_size=16,
    num_hidden_layers=2,
    num_local_experts=3,
    num_experts_per_tok=2,
)
QWEN3_MOE_KW = dict(
    TINY_DECODER,
    vocab_size=VOCAB,
    intermediate_size=32,
    moe_intermediate_size=12,
    num_experts=3,
    num_experts_per_tok=2,
    num_hidden_layers=1,
)


def _mixtral_modules(layers: int, experts: int, kw: dict, extra: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """(v4 module path, in, out) of every module a v4 LoRA on w1/w2/w3 (plus `extra`) adapts, in model order."""
    h, i = kw["hidden_size"], kw["intermediate_size"]
    q = kw["num_attention_heads"] * kw["head_dim"]
    out = []
    for layer in range(layers):
        p = f"model.layers.{layer}"
        if "q_proj" in extra:
            out.append((f"{p}.self_attn.q_proj", h, q))
        if "gate" in extra:
            out.append((f"{p}.block_sparse_moe.gate", h, experts))
        for e in range(experts):
            for w, (fin, fout) in (("w1", (h, i)), ("w2", (i, h)), ("w3", (h, i))):
                out.append((f"{p}.block_sparse_moe.experts.{e}.{w}", fin, fout))
    return out


def _qwen_moe_modules(layers: int, experts: int, kw: dict) -> list[tuple[str, int, int]]:
    """(v4 module path, in, out) of the routed experts' gate_proj/up_proj/down_proj, in model order."""
    h, i = kw["hidden_size"], kw["moe_intermediate_size"]
    out = []
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp.experts"
        for e in range(experts):
            for w, (fin, fout) in (("gate_proj", (h, i)), ("up_proj", (h, i)), ("down_proj", (i, h))):
                out.append((f"{p}.{e}.{w}", fin, fout))
    return out


def _legacy_state_dict(modules, r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(ADAPTER_SEED)
    sd = {}
    for path, fin, fout in modules:
        a = 0.1 * torch.randn((r, fin), generator=g, dtype=torch.float32)
        b = 0.1 * torch.randn((fout, r), generator=g, dtype=torch.float32)
        sd[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        sd[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    return sd


def _case(out: Path, name: str, *, description: str, model: tuple, lora_kwargs: dict, modules, notes=()):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    cls_name, config_cls_name, kw, model_name = model
    d = out / name
    d.mkdir(parents=True)

    base = build_model(cls_name, config_cls_name, kw, model_name, BASE_SEED)
    base.save_pretrained(d / "base")
    del base

    LoraConfig(**lora_kwargs).save_pretrained(d / "legacy_adapter")
    legacy = _legacy_state_dict(modules, lora_kwargs["r"])
    save_file(legacy, str(d / "legacy_adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})

    loaded = AutoModelForCausalLM.from_pretrained(d / "base")
    # peft's model card names the base by the loaded model's path; pin it so the card does not depend on where the
    # fixtures are generated.
    name_model(loaded, model_name)
    pm = PeftModel.from_pretrained(loaded, d / "legacy_adapter")
    # Every LoRA B starts at zero when peft creates it: a zero B after loading is a tensor peft did not load.
    not_loaded = [n for n, p in pm.named_parameters() if ".lora_B." in n and not torch.any(p != 0)]
    if not_loaded:
        raise RuntimeError(f"{name}: peft did not load {not_loaded}")
    ids = torch.tensor(INPUT_IDS, dtype=torch.long)
    tensors = {"logits": lm_logits(pm, ids)}
    pm.save_pretrained(d / "converted_adapter")
    converted_config = json.loads((d / "converted_adapter" / "adapter_config.json").read_text())

    merged = pm.merge_and_unload()
    merged.save_pretrained(d / "merged")
    tensors["merged_logits"] = lm_logits(merged, ids)
    save_file(tensors, str(d / "logits.safetensors"), metadata={"format": "pt"})

    write_json(
        d / "case.json",
        {
            "description": description,
            "model": {"class": cls_name, "config": kw, "model_type": loaded.config.model_type, "name_or_path": model_name},
            "legacy_config": {"class": "LoraConfig", "kwargs": lora_kwargs},
            "legacy_keys": list(legacy),
            "legacy_init": "g = torch.Generator().manual_seed(1234); per module in legacy_keys order: "
            "A = 0.1 * randn((r, in), g), then B = 0.1 * randn((out, r), g) (float32)",
            "load": "AutoModelForCausalLM.from_pretrained(base/) then PeftModel.from_pretrained(model, legacy_adapter/)",
            "save": "peft_model.save_pretrained(converted_adapter/); merge_and_unload().save_pretrained(merged/)",
            "converted_target_modules": converted_config["target_modules"],
            "converted_target_parameters": converted_config["target_parameters"],
            "input_ids": INPUT_IDS,
            "logits_shape": list(tensors["logits"].shape),
            "notes": list(notes),
        },
        sort_keys=True,
    )


def case_mixtral(out: Path) -> None:
    kw = MIXTRAL_KW
    _case(
        out,
        "mixtral",
        description="Mixtral (2 layers, 3 experts, hidden 16, intermediate 16): v4 LoRA on w1/w2/w3 of every expert",
        model=("MixtralForCausalLM", "MixtralConfig", kw, "peftkit/tiny-mixtral"),
        lora_kwargs=dict(
            r=4,
            lora_alpha=8,
            target_modules=["w1", "w2", "w3"],
            task_type="CAUSAL_LM",
            base_model_name_or_path="peftkit/tiny-mixtral",
        ),
        modules=_mixtral_modules(kw["num_hidden_layers"], kw["num_local_experts"], kw),
    )


def case_mixtral_mixed(out: Path) -> None:
    kw = dict(MIXTRAL_KW, num_hidden_layers=1, num_local_experts=2, intermediate_size=8)
    _case(
        out,
        "mixtral_mixed",
        description="Mixtral (1 layer, 2 experts, intermediate 8): v4 LoRA on q_proj, the router (gate) and w1/w2/w3, r=2, "
        "lora_alpha=3.5, rank_pattern/alpha_pattern for q_proj",
        model=("MixtralForCausalLM", "MixtralConfig", kw, "peftkit/tiny-mixtral-mixed"),
        lora_kwargs=dict(
            r=2,
            lora_alpha=3.5,
            target_modules=["q_proj", "gate", "w1", "w2", "w3"],
            rank_pattern={"q_proj": 2},
            alpha_pattern={"q_proj": 5},
            task_type="CAUSAL_LM",
            base_model_name_or_path="peftkit/tiny-mixtral-mixed",
        ),
        modules=_mixtral_modules(kw["num_hidden_layers"], kw["num_local_experts"], kw, extra=("q_proj", "gate")),
        notes=[
            "q_proj stays in target_modules; gate moves to target_parameters as gate.weight (the v5 router is not an "
            "nn.Linear) and its LoRA pair keeps its shape under the renamed module mlp.gate",
            "intermediate 8: torch's CPU matmul computes the w2 / down_proj delta (8 output columns) without FMA, "
            "so merged/ differs in rounding from an FMA merge kernel there",
        ],
    )


def case_qwen3_moe(out: Path) -> None:
    # The Qwen2-MoE-style case. peft 0.21.2 does not convert model_type "qwen2_moe" itself: its config rewrite looks
    # the model type up in transformers' _MODEL_TO_CONVERSION_PATTERN, which lists the types that *reuse* the
    # qwen2_moe mapping (qwen3_moe, olmoe, deepseek_v3, ...) but not qwen2_moe; the tensors are fused anyway, nothing
    # targets them, and the experts' LoRA is silently not loaded. Qwen3-MoE uses the same conversion and is converted.
    kw = QWEN3_MOE_KW
    _case(
        out,
        "qwen3_moe",
        description="Qwen3-MoE (1 layer, 3 experts, moe_intermediate 12; the qwen2_moe conversion pattern): v4 LoRA "
        "on the experts' gate_proj/up_proj/down_proj",
        model=("Qwen3MoeForCausalLM", "Qwen3MoeConfig", kw, "peftkit/tiny-qwen3-moe"),
        lora_kwargs=dict(
            r=4,
            lora_alpha=16,
            target_modules=["gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
            base_model_name_or_path="peftkit/tiny-qwen3-moe",
        ),
        modules=_qwen_moe_modules(kw["num_hidden_layers"], kw["num_experts"], kw),
        notes=[
            "peft maps every target named gate_proj/up_proj/down_proj to the fused expert parameters and drops it "
            "from target_modules, so on models with a shared expert or dense MLP layers their v4 LoRA pairs would "
            "no longer be targeted (this model has neither)",
            "model_type qwen2_moe itself is not converted by peft 0.21.2 (see convert_cases.py)",
        ],
    )


CASES = [case_mixtral, case_mixtral_mixed, case_qwen3_moe]


def generate(root) -> None:
    generate_cases(root, "convert", CASES, README_MD)


README_MD = """\
# convert fixtures

Written by `tests/interop/fixturegen/convert_cases.py` (`tests/interop/run.sh --regen`, or
`python tests/interop/make_fixtures.py convert`) with the pinned stack: torch 2.15.0 (CPU, 1 thread),
transformers 5.24.0, peft 0.21.2, safetensors 0.8.0, `PYTHONHASHSEED=0`, `HF_HUB_OFFLINE=1`. The generator
deletes and rewrites this folder, this README included. Two runs produce byte-identical files.

Legacy (transformers v4, one LoRA pair per expert projection) MoE adapters and what peft 0.21.2 writes after
loading them on a transformers 5.24 model (`convert_peft_config_for_transformers` +
`convert_peft_adapter_state_dict_for_transformers`, then `save_pretrained`).

| folder | made by |
|---|---|
| `base/` | `save_pretrained()` of the tiny v5 model (original per-expert layout on disk) |
| `legacy_adapter/` | `LoraConfig(...).save_pretrained()` + `safetensors.torch.save_file` of per-expert LoRA pairs (`0.1 * randn`, seed 1234, f32) |
| `converted_adapter/` | `PeftModel.from_pretrained(from_pretrained(base/), legacy_adapter/).save_pretrained(...)` |
| `merged/` | that model's `merge_and_unload().save_pretrained(...)` |
| `logits.safetensors` | `logits` (adapter loaded) and `merged_logits` on `case.json["input_ids"]` |
| `case.json` | the model config, the legacy config and key order, the calls |

| case | model | legacy targets |
|---|---|---|
| `mixtral` | Mixtral, 2 layers, 3 experts, hidden 16, intermediate 16 | `w1`, `w2`, `w3`, r=4, alpha=8 |
| `mixtral_mixed` | Mixtral, 1 layer, 2 experts, intermediate 8 | `q_proj`, `gate` (router), `w1`, `w2`, `w3`, r=2, alpha=3.5, rank/alpha pattern on `q_proj` |
| `qwen3_moe` | Qwen3-MoE, 1 layer, 3 experts, moe_intermediate 12 | `gate_proj`, `up_proj`, `down_proj`, r=4, alpha=16 |

Qwen2-MoE itself has no case: peft 0.21.2 does not convert its config (`qwen2_moe` is not a key of
transformers' `_MODEL_TO_CONVERSION_PATTERN`), fuses the tensors anyway and silently loads the adapter without
its experts' LoRA. Qwen3-MoE uses the same (`qwen2_moe`) conversion and is converted.

`target_modules` and `target_parameters` of `converted_adapter/adapter_config.json` are Python sets written in
set order.
"""
