"""remap/ fixtures: checkpoints in the original (on-disk, per-expert) layout and in the transformers v5
layout, written by the real transformers 5.24.0 (tests/fixtures/remap/).

`generate(root)` deletes and rewrites `root/remap/`. One folder per case:

- `original/`: what transformers writes with `save_pretrained()` (default `save_original_format=True`,
  default shard size) for a model loaded by `from_pretrained` from an original-layout checkpoint;
- `v5/`: the same loaded model saved with `save_original_format=False` (v5 module names);
- `original_2KB/`, `original_5KB/`, `original_20KB/` (MoE cases only): the loaded model saved with
  `save_original_format=True` and that `max_shard_size`;
- `v5_resaved_2KB/` (MoE cases only): `from_pretrained(v5/)` saved with `max_shard_size="2KB"`: a model loaded
  from a v5 checkpoint has `_weight_conversions == []`, so it is written in v5 names, natural-sort order;
- `case.json`: how the case was built, the transforms transformers recorded as used while loading
  (`model._weight_conversions`), and for every save the exact key order handed to the shard splitter and the
  groups of keys that shared one storage (recorded from the real call, see `common.record_split_input`).

Every model is built from a config with `torch.manual_seed(0)`, saved once to a scratch folder, possibly
rewritten into a legacy on-disk layout (Llava's `vision_model.` prefix as on the Hub, BERT's
`LayerNorm.gamma/beta`), and loaded back with `from_pretrained`, exactly as a user loads a Hub checkpoint.

Run alone with:

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 python tests/interop/make_fixtures.py remap
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .common import TINY_DECODER, fresh_dir, quiet, record_split_input, save_recorded, write_json

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    ViTConfig,
    ViTModel,
)

SEED = 0
SHARD_SIZES = ("2KB", "5KB", "20KB")


def _tensor_names(folder: Path) -> list[str]:
    names = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            names.extend(s.keys())
    return sorted(names)


def _rewrite_weights(folder: Path, rename) -> None:
    """Rename the tensors of a single-file checkpoint in place (to build a legacy on-disk layout)."""
    path = folder / "model.safetensors"
    sd = load_file(path)
    save_file({rename(k): v for k, v in sd.items()}, path, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def _mixtral():
    # The configuration of the reference spec, section 7.5 (4064 parameters): its 2KB save is the
    # worked example there.
    return MixtralForCausalLM(
        MixtralConfig(
            **TINY_DECODER,
            vocab_size=64,
            intermediate_size=8,
            num_hidden_layers=1,
            num_local_experts=3,
            num_experts_per_tok=2,
        )
    )


def _qwen2_moe():
    # 12 experts so that natural order (2 before 10) differs from code-point order.
    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=4,
            shared_expert_intermediate_size=8,
            num_experts=12,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def _llava():
    text = LlamaConfig(**TINY_DECODER, vocab_size=40, intermediate_size=32, num_hidden_layers=1)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )
    return LlavaForConditionalGeneration(
        LlavaConfig(text_config=text, vision_config=vision, image_token_index=39, vision_feature_layer=-1)
    )


def _gpt_neox():
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def _vit():
    return ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
        )
    )


def _bert():
    return BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    )


def _hub_llava_names(key: str) -> str:
    # Llava checkpoints on the Hub keep the CLIP vision model's `vision_model.` level, which v5 drops
    # on load (PrefixChange) and re-adds on save only when it was seen at load.
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key


def _legacy_layernorm_names(key: str) -> str:
    if key.endswith("LayerNorm.weight"):
        return key[: -len("weight")] + "gamma"
    if key.endswith("LayerNorm.bias"):
        return key[: -len("bias")] + "beta"
    return key


CASES = [
    {
        "name": "mixtral",
        "build": _mixtral,
        "model_type": "mixtral",
        "sharded": True,
        "description": "Tiny MixtralForCausalLM (E=3 experts, 1 layer, hidden 16, intermediate 8, vocab 64, "
        "untied), the configuration of the reference spec section 7.5.",
    },
    {
        "name": "qwen2_moe",
        "build": _qwen2_moe,
        "model_type": "qwen2_moe",
        "sharded": True,
        "description": "Tiny Qwen2MoeForCausalLM (12 experts, 2 layers, hidden 16, moe_intermediate 4, "
        "shared expert 8, vocab 64, untied). shared_expert.* and shared_expert_gate pass through.",
    },
    {
        "name": "llava",
        "build": _llava,
        "model_type": "llava",
        "rewrite": _hub_llava_names,
        "description": "Tiny LlavaForConditionalGeneration (Llama text model, CLIP vision tower). The scratch "
        "save is rewritten to the Hub layout (vision_tower.vision_model.*) before loading, so the CLIP "
        "PrefixChange is used at load and re-applied on save.",
    },
    {
        "name": "gpt_neox",
        "build": _gpt_neox,
        "model_type": "gpt_neox",
        "description": "Tiny GPTNeoXForCausalLM (untied): lm_head is saved as embed_out.",
    },
    {
        "name": "vit",
        "build": _vit,
        "model_type": "vit",
        "description": "Tiny ViTModel: v5 layers.N.attention.q_proj / mlp.fc1 ... are saved as "
        "encoder.layer.N.attention.attention.query / intermediate.dense ...",
    },
    {
        "name": "bert_legacy",
        "build": _bert,
        "model_type": "bert",
        "rewrite": _legacy_layernorm_names,
        "description": "Tiny BertModel whose scratch save is rewritten to the legacy LayerNorm.gamma/beta names "
        "before loading: the legacy renames are used at load, so transformers re-saves gamma/beta.",
    },
]


def _case(out: Path, spec: dict) -> dict:
    case_dir = out / spec["name"]
    case_dir.mkdir(parents=True)
    torch.manual_seed(SEED)
    built = spec["build"]()
    built.eval()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "scratch"
        built.save_pretrained(scratch)
        if "rewrite" in spec:
            _rewrite_weights(scratch, spec["rewrite"])
        loaded = type(built).from_pretrained(scratch)
        loaded.eval()
        used = [repr(t) for t in loaded._weight_conversions]
        saves = {"original": save_recorded(loaded, case_dir / "original")}
        # The original layout is a fixed point: loading original/ and saving again changes nothing.
        again = type(built).from_pretrained(case_dir / "original")
        again.eval()
        assert [repr(t) for t in again._weight_conversions] == used, (again._weight_conversions, used)
        with tempfile.TemporaryDirectory() as tmp2:
            again.save_pretrained(tmp2)
            for f in (case_dir / "original").iterdir():
                assert (Path(tmp2) / f.name).read_bytes() == f.read_bytes(), f
        saves["v5"] = save_recorded(again, case_dir / "v5", save_original_format=False)
        assert (case_dir / "v5" / "config.json").read_bytes() == (case_dir / "original" / "config.json").read_bytes()
        if spec.get("sharded"):
            for size in SHARD_SIZES:
                saves[f"original_{size}"] = save_recorded(again, case_dir / f"original_{size}", max_shard_size=size)
            resaved = type(built).from_pretrained(case_dir / "v5")
            assert resaved._weight_conversions == [], resaved._weight_conversions
            saves["v5_resaved_2KB"] = save_recorded(resaved, case_dir / "v5_resaved_2KB", max_shard_size="2KB")
    case = {
        "description": spec["description"],
        "model_type": spec["model_type"],
        "class": type(built).__name__,
        "transformers_version": transformers.__version__,
        "seed": SEED,
        "weight_conversions_used_at_load": used,
        "original_tensors": _tensor_names(case_dir / "original"),
        "v5_tensors": _tensor_names(case_dir / "v5"),
        "saves": {
            name: {
                "folder": name,
                "max_shard_size": name.rsplit("_", 1)[1] if name.endswith("KB") else None,
                **rec,
            }
            for name, rec in saves.items()
        },
    }
    write_json(case_dir / "case.json", case)
    return case


# --------------------------------------------------------------------------------------------
# names only: models of other model types that share a table (aliases), built from config
# --------------------------------------------------------------------------------------------

_TEXT = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)
_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4)


def _names_only_models():
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        DeiTConfig,
        DeiTModel,
        GemmaConfig,
        IJepaConfig,
        IJepaModel,
        MistralConfig,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PixtralVisionConfig,
        SiglipVisionConfig,
        ViTMSNConfig,
        ViTMSNModel,
    )

    def causal(model_type, **extra):
        return lambda: AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, moe_intermediate_size=8, **_TEXT, **extra)
        )

    text = {k: v for k, v in _TEXT.items() if k != "num_hidden_layers"} | {"num_hidden_layers": 1}
    return {
        "minimax": causal("minimax", num_local_experts=3),
        "minimax_m2": causal("minimax_m2", num_local_experts=3),
        "phimoe": causal("phimoe", num_local_experts=3),
        "olmoe": causal("olmoe", num_experts=3),
        "qwen3_moe": causal("qwen3_moe", num_experts=3),
        "glm4_moe": causal("glm4_moe", n_routed_experts=4, first_k_dense_replace=1, n_group=1, topk_group=1),
        "deepseek_v3": causal(
            "deepseek_v3",
            n_routed_experts=4,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
        ),
        "paligemma": lambda: PaliGemmaForConditionalGeneration(
            PaliGemmaConfig(
                text_config=GemmaConfig(**text).to_dict(),
                vision_config=SiglipVisionConfig(**_VISION).to_dict(),
                image_token_index=63,
            )
        ),
        "mistral3": lambda: Mistral3ForConditionalGeneration(
            Mistral3Config(
                text_config=MistralConfig(**text).to_dict(),
                vision_config=PixtralVisionConfig(**_VISION, head_dim=8).to_dict(),
                image_token_index=63,
                spatial_merge_size=1,
            )
        ),
        "deit": lambda: DeiTModel(DeiTConfig(**_VISION)),
        "vit_msn": lambda: ViTMSNModel(ViTMSNConfig(**_VISION)),
        "ijepa": lambda: IJepaModel(IJepaConfig(**_VISION)),
    }


def _names_only(out: Path) -> None:
    """For each model type: the order and shapes transformers hands to the shard splitter when a
    model built from config is saved with save_original_format=False (v5) and True (original)."""
    cases = {}
    for model_type, build in _names_only_models().items():
        torch.manual_seed(SEED)
        model = build()
        model.eval()
        assert model.config.model_type == model_type, (model.config.model_type, model_type)
        rec = {"class": type(model).__name__}
        for name, kwargs in (("v5", {"save_original_format": False}), ("original", {})):
            with tempfile.TemporaryDirectory() as tmp, record_split_input(shapes=True) as seen:
                model.save_pretrained(tmp, **kwargs)
            assert len(seen) == 1, seen
            rec[name] = {"order": seen[0]["order"], "shapes": seen[0]["shapes"]}
        cases[model_type] = rec
    write_json(out / "names_only.json", {"transformers_version": transformers.__version__, "cases": cases})


README = """# remap fixtures

Written by `tests/interop/fixturegen/remap_cases.py` (transformers 5.24.0); do not edit by hand.

Each `<case>/` holds:

- `original/`: `save_pretrained()` (default `save_original_format=True`, default shard size) of a model
  loaded with `from_pretrained` from an original-layout checkpoint: the on-disk layout;
- `v5/`: the same loaded model saved with `save_original_format=False` (v5 module names, registration
  order, single file);
- MoE cases only: `original_2KB/`, `original_5KB/`, `original_20KB/` (the loaded model saved with that
  `max_shard_size`) and `v5_resaved_2KB/` (`from_pretrained(v5/)` saved with `max_shard_size="2KB"`: v5 names in
  natural-sort order, since a model loaded from a v5 checkpoint has no conversion to revert);
- `case.json`: `description`, `model_type`, `class`, `weight_conversions_used_at_load` (the transforms
  transformers kept in `model._weight_conversions`), the sorted tensor names of `original/` and `v5/`, and
  for every save the key `order` handed to the shard splitter and the `storage_groups` (keys whose tensors
  shared one storage, placed together by huggingface_hub).

`original/config.json` and `v5/config.json` are identical (checked by the generator).

`names_only.json`: for more model types that share a table (aliases), built from config with no weights
kept: `cases[model_type].v5` and `.original` hold the key `order` and `shapes` transformers handed to the
shard splitter for `save_pretrained(save_original_format=False)` and for the default save.
"""


def generate(root: Path) -> None:
    root = Path(root)
    quiet()
    torch.use_deterministic_algorithms(True)
    out = fresh_dir(root / "remap")
    for spec in CASES:
        _case(out, spec)
    _names_only(out)
    (out / "README.md").write_text(README, encoding="utf-8")
    print(f"remap: {len(CASES)} cases written under {out}")
