"""peft/ fixtures: adapters written by peft 0.21.2 and checkpoints merged by `merge_and_unload()`.

`generate(root)` deletes and rewrites `root/peft/`. One folder per case; the layout is documented in
`tests/fixtures/peft/README.md`, which is written from `README_MD` at the end of this file (keep it in sync with
the code). Every case is built the same way:

1. seed, build a tiny base model, give it a fixed name, cast it to the case dtype, save it to `base/`;
2. wrap it with `get_peft_model` (plus `add_adapter` for extra adapters), then overwrite the adapter
   parameters with seeded random values (see `randomize_adapter_params`) so that merges change weights;
3. save the full PEFT state dict (`full_state_dict.safetensors` + `full_state_dict_order.json`) and the
   adapter (`peft_model.save_pretrained(adapter/)`);
4. load a fresh copy exactly as a user would (`from_pretrained(base/)` + `PeftModel.from_pretrained(.., adapter/)`),
   record its logits, `merge_and_unload()`, save to `merged/`, record the merged logits.

Must run with PYTHONHASHSEED=0 (peft stores `target_modules` as a set and writes it in set iteration order).
"""
import json
import os
from pathlib import Path

if __package__:
    from .common import build_model, generate_cases, lm_logits, write_json
else:  # run as a script: python tests/interop/fixturegen/peft_cases.py
    from common import build_model, generate_cases, lm_logits, write_json

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# peft's save_embedding_layers="auto" asks the Hub whether base_model_name_or_path has a config.json;
# our names are fake, so stay offline (peft reads this variable at call time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

LLAMA_NAME = "peftkit/tiny-llama"
GPT2_NAME = "peftkit/tiny-gpt2"
MIXTRAL_NAME = "peftkit/tiny-mixtral"
VOCAB = 64
BASE_SEED = 0  # torch.manual_seed before building each base model
ADAPTER_SEED = 1234  # torch.Generator seed for randomize_adapter_params
INPUT_SEED = 4321  # torch.Generator seed for the conv2d case input
INPUT_IDS = (torch.arange(10).unsqueeze(0) % VOCAB).tolist()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LLAMA_KW = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# GPT-2's default bos/eos id 50256 is outside the tiny vocabulary (transformers warns); use 0.
GPT2_KW = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
MIXTRAL_KW = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    num_local_experts=2,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Substrings that identify adapter-owned parameters in peft_model.named_parameters().
ADAPTER_PARAM_MARKERS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A.",
    ".lora_embedding_B.",
    ".lora_magnitude_vector.",
    ".modules_to_save.",
    ".trainable_tokens_delta.",
    "prompt_encoder.",
)
ADAPTER_INIT_DOC = (
    "after get_peft_model/add_adapter: g = torch.Generator().manual_seed(1234); for every parameter of "
    "peft_model.named_parameters() (in that order) whose name contains one of .lora_A. .lora_B. "
    ".lora_embedding_A. .lora_embedding_B. .lora_magnitude_vector. .modules_to_save. "
    ".trainable_tokens_delta. prompt_encoder.: n = torch.randn(p.shape, generator=g) (float32); "
    "lora_magnitude_vector: p *= (1 + 0.1*n); everything else: p += 0.1*n (computed in float32, cast to p.dtype)"
)


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def randomize_adapter_params(peft_model) -> list:
    g = torch.Generator().manual_seed(ADAPTER_SEED)
    touched = []
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not any(m in name for m in ADAPTER_PARAM_MARKERS):
                continue
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if ".lora_magnitude_vector." in name:
                p.copy_((p.float() * (1 + 0.1 * n)).to(p.dtype))
            else:
                p.copy_((p.float() + 0.1 * n).to(p.dtype))
            touched.append(name)
    if not touched:
        raise RuntimeError("no adapter parameters found to randomize")
    return touched


def save_full_state_dict(peft_model, case_dir: Path) -> None:
    sd = peft_model.state_dict()
    order = list(sd.keys())
    seen = set()
    out = {}
    for k, v in sd.items():
        v = v.detach()
        ptr = (v.untyped_storage().data_ptr(), v.device.type)
        if ptr in seen:  # safetensors forbids aliasing: first name keeps the original, later ones get a copy
            v = v.clone()
        else:
            seen.add(ptr)
        out[k] = v.contiguous()
    save_file(out, str(case_dir / "full_state_dict.safetensors"), metadata={"format": "pt"})
    write_json(case_dir / "full_state_dict_order.json", order, sort_keys=True)


def _build(cls_name: str, config_cls_name: str, kw: dict, name: str):
    """The seeded, named base model and its `case.json["model"]` record."""
    model = build_model(cls_name, config_cls_name, kw, name, BASE_SEED)
    return model, {"class": cls_name, "config": kw, "name_or_path": name}


def build_llama(**overrides):
    return _build("LlamaForCausalLM", "LlamaConfig", dict(LLAMA_KW, **overrides), LLAMA_NAME)


def build_gpt2():
    return _build("GPT2LMHeadModel", "GPT2Config", GPT2_KW, GPT2_NAME)


def build_mixtral():
    return _build("MixtralForCausalLM", "MixtralConfig", MIXTRAL_KW, MIXTRAL_NAME)


class TinyConvNet(torch.nn.Module):
    """Not a transformers model: input (N, 4, 5, 5) -> conv1 3x3 -> relu -> conv2 1x1 -> flatten -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 6, 3)
        self.conv2 = torch.nn.Conv2d(6, 6, 1)
        self.fc = torch.nn.Linear(6 * 3 * 3, 8)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.conv2(x)
        return self.fc(x.flatten(1))


# peft writes auto_mapping.parent_library = TinyConvNet.__module__ into adapter_config.json; pin it so the bytes do not
# depend on whether this file runs as __main__ or is imported by make_fixtures.py.
TinyConvNet.__module__ = "fixturegen.peft_cases"


def make_config(cls_name: str, kwargs: dict):
    import peft

    return getattr(peft, cls_name)(**kwargs)


def input_ids_tensor():
    return torch.tensor(INPUT_IDS, dtype=torch.long)


def new_case_dir(out: Path, name: str) -> Path:
    d = out / name
    d.mkdir(parents=True)
    return d


# ---------------------------------------------------------------------------------------------------------------------
# loading and merging a case as a user would: one home for the fixtures and the live checks


def load_peft_model(d: Path, adapter_names: list):
    """`AutoModelForCausalLM.from_pretrained(d/base)`, `PeftModel.from_pretrained(base, d/adapter)`, then
    `load_adapter(d/adapter/<name>)` for every further adapter, all active at once. Returns the model and the
    active adapter names. tests/interop/live_checks.py loads every case through this function too, so
    that its live references are computed exactly as the fixtures were."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(d / "base")
    pm = PeftModel.from_pretrained(base, d / "adapter")
    for aname in adapter_names[1:]:
        pm.load_adapter(d / "adapter" / aname, adapter_name=aname)
    active = list(adapter_names[:1])
    if len(adapter_names) > 1:
        # PeftModel.set_adapter takes one name; the LoRA tuner accepts a list (all active at once).
        pm.base_model.set_adapter(list(adapter_names))
        active = list(adapter_names)
    return pm, active


def merge_and_unload(pm, adapter_names=None):
    """peft's default merge (`safe_merge=False`), of the active adapters or of `adapter_names`."""
    return pm.merge_and_unload() if adapter_names is None else pm.merge_and_unload(adapter_names=adapter_names)


# ---------------------------------------------------------------------------------------------------------------------
# generic transformers case


def transformers_case(
    out: Path,
    name: str,
    *,
    description: str,
    build,
    adapters: list,
    base_dtype: str = "float32",
    mergeable: bool = True,
    merge_adapter_names=None,
    notes=None,
):
    """adapters: [(adapter_name, config_class_name, kwargs)], the first one must be "default"."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    d = new_case_dir(out, name)
    dtype = DTYPES[base_dtype]

    model, model_info = build()
    model = model.to(dtype)
    model.save_pretrained(d / "base")

    assert adapters[0][0] == "default"
    _, cls0, kw0 = adapters[0]
    peft_model = get_peft_model(model, make_config(cls0, kw0))
    for aname, cls, kw in adapters[1:]:
        peft_model.add_adapter(aname, make_config(cls, kw))
    randomize_adapter_params(peft_model)
    save_full_state_dict(peft_model, d)
    peft_model.save_pretrained(d / "adapter")
    del peft_model, model

    # A fresh copy, loaded the way a user would (default dtype handling and adapter autocast).
    adapter_names = [a[0] for a in adapters]
    pm, active = load_peft_model(d, adapter_names)
    assert pm.base_model.model.dtype == dtype, (pm.base_model.model.dtype, dtype)
    ids = input_ids_tensor()
    tensors = {"logits": lm_logits(pm, ids)}

    merge_info = None
    if mergeable:
        names = merge_adapter_names
        merged = merge_and_unload(pm, names)
        merged.save_pretrained(d / "merged")
        tensors["merged_logits"] = lm_logits(merged, ids)
        merge_info = {
            "call": "merge_and_unload()"
            if names is None
            else f"merge_and_unload(adapter_names={json.dumps(names)})",
            "adapter_names": names if names is not None else active,
            "safe_merge": False,
            "progressbar": False,
            "saved_with": "merged.save_pretrained(merged/) (transformers defaults)",
        }
    save_file(tensors, str(d / "logits.safetensors"), metadata={"format": "pt"})

    case = {
        "description": description,
        "model": model_info,
        "config_class": cls0,
        "peft_config": kw0,
        "adapter_names": adapter_names,
        "adapter_configs": {a: {"config_class": c, "kwargs": k} for a, c, k in adapters},
        "lora_alpha": kw0.get("lora_alpha") if cls0 == "LoraConfig" else None,
        "base_dtype": base_dtype,
        "mergeable": mergeable,
        "task_type": kw0.get("task_type"),
        "adapter_init": ADAPTER_INIT_DOC,
        "load": "AutoModelForCausalLM.from_pretrained(base/) then PeftModel.from_pretrained(base, adapter/)"
        + "".join(f"; load_adapter(adapter/{a}, adapter_name={a!r})" for a in adapter_names[1:])
        + (f"; base_model.set_adapter({json.dumps(active)})" if len(active) > 1 else ""),
        "active_adapters_for_logits": active,
        "input_ids": INPUT_IDS,
        "logits_shape": list(tensors["logits"].shape),
        "logits_dtype": str(tensors["logits"].dtype).removeprefix("torch."),
        "merge": merge_info,
    }
    if notes:
        case["notes"] = notes
    write_json(d / "case.json", case, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------------
# cases


def lora_kw(targets, r=4, alpha=8, **extra):
    return dict(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", **extra)


def case_lora_basic(out):
    transformers_case(
        out,
        "lora_basic",
        description="Llama, LoRA r=4 alpha=8 on q_proj,v_proj, f32 base",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["q_proj", "v_proj"]))],
    )


def case_lora_bf16(out):
    transformers_case(
        out,
        "lora_bf16",
        description="as lora_basic, base in bfloat16 (adapter autocast to f32, saved as F32)",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["q_proj", "v_proj"]))],
        base_dtype="bfloat16",
    )


def case_lora_f16(out):
    transformers_case(
        out,
        "lora_f16",
        description="as lora_basic, base in float16 (adapter autocast to f32, saved as F32)",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["q_proj", "v_proj"]))],
        base_dtype="float16",
    )


def case_rslora(out):
    transformers_case(
        out,
        "rslora",
        description="rsLoRA (scaling alpha/sqrt(r) = 8), r=4 alpha=16 on all 7 Llama linears, f32",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(list(ALL_LINEAR), r=4, alpha=16, use_rslora=True))],
    )


def case_dora(out):
    transformers_case(
        out,
        "dora",
        description="DoRA (use_dora=True) r=4 alpha=8 on q_proj,v_proj, f32 base",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["q_proj", "v_proj"], use_dora=True))],
    )


def case_dora_bf16(out):
    transformers_case(
        out,
        "dora_bf16",
        description="DoRA (use_dora=True) r=4 alpha=8 on q_proj,v_proj, bfloat16 base",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["q_proj", "v_proj"], use_dora=True))],
        base_dtype="bfloat16",
    )


def case_embedding_lora(out):
    transformers_case(
        out,
        "embedding_lora",
        description="LoRA on embed_tokens and q_proj, untied Llama; save_embedding_layers='auto' resolves to True "
        "so the full embed_tokens.base_layer.weight is in the adapter file",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["embed_tokens", "q_proj"]))],
    )


def case_gpt2_conv1d(out):
    transformers_case(
        out,
        "gpt2_conv1d",
        description="GPT-2 (transformers Conv1D layers, tied embeddings), LoRA r=4 alpha=8 on c_attn,c_proj "
        "(attn.c_proj and mlp.c_proj); fan_in_fan_out not passed, peft forces it to true",
        build=build_gpt2,
        adapters=[("default", "LoraConfig", lora_kw(["c_attn", "c_proj"]))],
    )


def case_modules_to_save(out):
    transformers_case(
        out,
        "modules_to_save",
        description="LoRA on q_proj plus modules_to_save=['lm_head'] (full copy, replaces lm_head on merge), untied Llama",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["q_proj"], modules_to_save=["lm_head"]))],
    )


def case_patterns(out):
    transformers_case(
        out,
        "patterns",
        description="r=4 alpha=8 on q_proj,v_proj,o_proj with rank_pattern (layer-0 q_proj r=8) and alpha_pattern "
        "(v_proj alpha=32)",
        build=build_llama,
        adapters=[
            (
                "default",
                "LoraConfig",
                lora_kw(
                    ["q_proj", "v_proj", "o_proj"],
                    rank_pattern={"layers.0.self_attn.q_proj": 8},
                    alpha_pattern={"v_proj": 32},
                ),
            )
        ],
    )


def case_two_adapters(out):
    transformers_case(
        out,
        "two_adapters",
        description="two LoRA adapters: 'default' (q_proj,v_proj r=4 alpha=8) and 'other' (k_proj r=2 alpha=4, via "
        "add_adapter); saved to adapter/ and adapter/other/; both active for logits, both merged",
        build=build_llama,
        adapters=[
            ("default", "LoraConfig", lora_kw(["q_proj", "v_proj"])),
            ("other", "LoraConfig", lora_kw(["k_proj"], r=2, alpha=4)),
        ],
        merge_adapter_names=["default", "other"],
    )


def case_prompt_tuning(out):
    transformers_case(
        out,
        "prompt_tuning",
        description="prompt tuning, 4 virtual tokens (RANDOM init), not mergeable; logits include the 4 virtual "
        "token positions first",
        build=build_llama,
        adapters=[("default", "PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=4))],
        mergeable=False,
    )


def case_lora_bias(out):
    transformers_case(
        out,
        "lora_bias",
        description="lora_bias=True on q_proj,v_proj of a Llama with attention_bias=True (merge adds "
        "lora_B.bias * scaling to the base bias)",
        build=lambda: build_llama(attention_bias=True),
        adapters=[("default", "LoraConfig", lora_kw(["q_proj", "v_proj"], lora_bias=True))],
        notes="with the default attention_bias=False the adapter saves fine but merge_and_unload() raises "
        "RuntimeError('Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.'), "
        "so this case uses attention_bias=True",
    )


def case_trainable_tokens(out):
    transformers_case(
        out,
        "trainable_tokens",
        description="LoRA on q_proj with trainable_token_indices=[1,5,7] (rows of embed_tokens replaced on merge), "
        "untied Llama",
        build=build_llama,
        adapters=[("default", "LoraConfig", lora_kw(["q_proj"], trainable_token_indices=[1, 5, 7]))],
    )


def case_lora_many_targets(out):
    names = [
        f"model.layers.{i}.{'self_attn' if m in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{m}"
        for i in range(3)
        for m in ALL_LINEAR
    ]
    transformers_case(
        out,
        "lora_many_targets",
        description="3-layer Llama, all 7 linears given as 21 full module names; peft compresses target_modules to "
        "the 7 suffixes (>= 20 rule) before saving",
        build=lambda: build_llama(num_hidden_layers=3),
        adapters=[("default", "LoraConfig", lora_kw(names))],
    )


def case_mixtral_experts(out):
    transformers_case(
        out,
        "mixtral_experts",
        description="Mixtral (transformers v5 fused experts, E=2, top-2) with LoRA target_parameters on "
        "mlp.experts.gate_up_proj and mlp.experts.down_proj (target_modules=[]); base/ and merged/ are written "
        "by transformers in the original per-expert layout",
        build=build_mixtral,
        adapters=[
            (
                "default",
                "LoraConfig",
                lora_kw([], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
            )
        ],
    )


def case_conv2d(out):
    from peft import LoraConfig, PeftModel, get_peft_model

    name = "conv2d"
    d = new_case_dir(out, name)
    kw = dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "fc"])

    torch.manual_seed(BASE_SEED)
    model = TinyConvNet()
    (d / "base").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(d / "base" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    peft_model = get_peft_model(model, LoraConfig(**kw))
    randomize_adapter_params(peft_model)
    save_full_state_dict(peft_model, d)
    peft_model.save_pretrained(d / "adapter")
    del peft_model, model

    base = TinyConvNet()
    base.load_state_dict(load_file(str(d / "base" / "model.safetensors")))
    base.eval()
    pm = PeftModel.from_pretrained(base, d / "adapter")
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(INPUT_SEED))
    with torch.no_grad():
        logits = pm(x).contiguous()
    merged = pm.merge_and_unload()
    (d / "merged").mkdir()
    save_file(
        {k: v.contiguous() for k, v in merged.state_dict().items()},
        str(d / "merged" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with torch.no_grad():
        merged_logits = merged(x).contiguous()
    save_file(
        {"input": x.contiguous(), "logits": logits, "merged_logits": merged_logits},
        str(d / "logits.safetensors"),
        metadata={"format": "pt"},
    )
    case = {
        "description": "custom torch module (not transformers): conv1 Conv2d(4,6,3), conv2 Conv2d(6,6,1) (1x1 "
        "branch), fc Linear(54,8); LoRA r=4 alpha=8 on all three, task_type None (auto_mapping written); base/ and "
        "merged/ are plain safetensors.torch.save_file(state_dict) files without config.json",
        "model": {
            "class": "TinyConvNet",
            "definition": "conv1=Conv2d(4,6,3); conv2=Conv2d(6,6,1); fc=Linear(54,8); "
            "forward: fc(conv2(relu(conv1(x))).flatten(1)); input (1,4,5,5)",
            "name_or_path": None,
        },
        "config_class": "LoraConfig",
        "peft_config": kw,
        "adapter_names": ["default"],
        "adapter_configs": {"default": {"config_class": "LoraConfig", "kwargs": kw}},
        "lora_alpha": kw["lora_alpha"],
        "base_dtype": "float32",
        "mergeable": True,
        "task_type": None,
        "adapter_init": ADAPTER_INIT_DOC,
        "load": "TinyConvNet() + load_state_dict(base/model.safetensors), then PeftModel.from_pretrained(base, adapter/)",
        "active_adapters_for_logits": ["default"],
        "input": "torch.randn(1,4,5,5, generator=torch.Generator().manual_seed(4321)), stored as 'input' in "
        "logits.safetensors",
        "logits_shape": list(logits.shape),
        "logits_dtype": "float32",
        "merge": {
            "call": "merge_and_unload()",
            "adapter_names": ["default"],
            "safe_merge": False,
            "progressbar": False,
            "saved_with": "safetensors.torch.save_file(merged.state_dict(), merged/model.safetensors, "
            "metadata={'format': 'pt'})",
        },
    }
    write_json(d / "case.json", case, sort_keys=True)


CASES = [
    case_lora_basic,
    case_lora_bf16,
    case_lora_f16,
    case_rslora,
    case_dora,
    case_dora_bf16,
    case_embedding_lora,
    case_gpt2_conv1d,
    case_modules_to_save,
    case_patterns,
    case_two_adapters,
    case_prompt_tuning,
    case_lora_bias,
    case_trainable_tokens,
    case_lora_many_targets,
    case_conv2d,
    case_mixtral_experts,
]


def generate(root: Path) -> None:
    # The README is generated too (nothing under tests/fixtures/ is edited by hand): edit README_MD below.
    generate_cases(root, "peft", CASES, README_MD)


README_MD = """\
# peft fixtures

Written by `tests/interop/fixturegen/peft_cases.py` (`tests/interop/run.sh --regen`, or
`python tests/interop/make_fixtures.py peft`) with the pinned stack: torch 2.15.0 (CPU, 1 thread),
transformers 5.24.0, peft 0.21.2, safetensors 0.8.0, `PYTHONHASHSEED=0`, `HF_HUB_OFFLINE=1`.
The generator deletes and rewrites this whole folder, this README included (its text is `README_MD` in the
generator). Two runs produce byte-identical files.

## Layout (one folder per case)

```
peft/<case>/
  case.json                    how the case was built (see below)
  base/                        base model saved BEFORE peft wraps it: model.save_pretrained(base/)
    config.json                  (not for conv2d)
    generation_config.json       (not for conv2d)
    model.safetensors            in the case's base dtype; conv2d: safetensors.torch.save_file(state_dict)
  adapter/                     peft_model.save_pretrained(adapter/)
    adapter_config.json
    adapter_model.safetensors
    README.md                    peft's model card (content irrelevant for loading)
    <name>/                      each extra adapter (two_adapters: other/): adapter_config.json,
                                 adapter_model.safetensors
  full_state_dict.safetensors  the complete peft_model.state_dict() (base + adapter params, adapter names in the
                               keys, e.g. ...q_proj.base_layer.weight, ...q_proj.lora_A.default.weight); tensors made
                               contiguous, aliased storages cloned (first name keeps the original), {"format":"pt"}
  full_state_dict_order.json   JSON list of those keys in peft_model.state_dict() order
  merged/                      mergeable cases only: merge_and_unload() of a FRESH load, then save_pretrained
    config.json                  (not for conv2d)
    generation_config.json       (not for conv2d)
    model.safetensors            base dtype; conv2d: safetensors.torch.save_file(merged.state_dict())
  logits.safetensors           "logits": unmerged adapter model output; "merged_logits": merged model output
                               (mergeable cases only); "input": model input (conv2d only)
```

Keys in `base/` and `merged/` are the transformers on-disk names (e.g. `model.layers.0.self_attn.q_proj.weight`;
Mixtral: per-expert `model.layers.0.block_sparse_moe.experts.{e}.w{1,2,3}.weight`). `merged/` has exactly the
same keys, order, shapes and dtypes as `base/`; only merged tensors differ. `lm_head.weight` is absent for the
tied GPT-2.

## How every case is built

1. `torch.manual_seed(0)`, build the tiny base model from its config (recorded in `case.json["model"]`), set
   `model.config._name_or_path` and `model.name_or_path` to `peftkit/tiny-llama`, `peftkit/tiny-gpt2` or
   `peftkit/tiny-mixtral` (conv2d has no name: `base_model_name_or_path` is `null`), cast to the base dtype,
   save `base/`.
2. `get_peft_model(model, Config(**case.json["peft_config"]))`, then `add_adapter(name, ...)` for extra
   adapters (`case.json["adapter_configs"]`).
3. Adapter parameters are overwritten with seeded random values so merges really change the weights
   (`case.json["adapter_init"]`): `g = torch.Generator().manual_seed(1234)`; for every parameter of
   `peft_model.named_parameters()` (in order) whose name contains `.lora_A.`, `.lora_B.`, `.lora_embedding_A.`,
   `.lora_embedding_B.`, `.lora_magnitude_vector.`, `.modules_to_save.`, `.trainable_tokens_delta.` or
   `prompt_encoder.`: `n = torch.randn(p.shape, generator=g)`; magnitude vectors `p *= 1 + 0.1*n`, all others
   `p += 0.1*n`. The saved `init_lora_weights` therefore stays `true` (peft's default).
4. Save `full_state_dict.*` and `adapter/` from that model.
5. Fresh load exactly as a user would: `AutoModelForCausalLM.from_pretrained(base/)` (dtype comes from the
   checkpoint) + `PeftModel.from_pretrained(base, adapter/)` (default `autocast_adapter_dtype=True`, so adapter
   weights are F32 in memory), `load_adapter(adapter/<name>, name)` for extra adapters. Logits for
   `input_ids = torch.arange(10).unsqueeze(0) % 64` under `torch.no_grad()` -> `"logits"`.
6. `merge_and_unload()` (defaults: `safe_merge=False`; two_adapters: `adapter_names=["default","other"]`),
   `save_pretrained(merged/)`, logits again -> `"merged_logits"`.

Logits have the model's dtype (bf16/f16 cases: BF16/F16) and shape `(1, 10, 64)`; prompt_tuning `(1, 14, 64)`
(the 4 virtual-token positions come first); conv2d `(1, 8)`.

## case.json

| field | meaning |
|---|---|
| `description` | one line |
| `model` | `class`, the config kwargs (`config`), `name_or_path` |
| `config_class` | `LoraConfig` or `PromptTuningConfig` (of the default adapter) |
| `peft_config` | the kwargs passed to `config_class` for adapter `default` |
| `adapter_names` | adapters in the order they were added (`default` first) |
| `adapter_configs` | `{name: {"config_class", "kwargs"}}` for every adapter |
| `lora_alpha` | `peft_config["lora_alpha"]` (`null` for prompt tuning) |
| `base_dtype` | `float32`, `bfloat16` or `float16` (dtype of `base/` and `merged/`) |
| `mergeable` | false only for prompt_tuning (no `merged/`, no `merged_logits`) |
| `task_type` | `CAUSAL_LM`, or `null` (conv2d) |
| `adapter_init` | the randomisation rule of step 3 |
| `load` | how the unmerged model for `"logits"` was loaded |
| `active_adapters_for_logits` | adapters active when `"logits"` was computed |
| `input_ids` | the token ids (transformers cases); conv2d has `input` (text) and the tensor in `logits.safetensors` |
| `logits_shape`, `logits_dtype` | of `"logits"` |
| `merge` | `null` or `{call, adapter_names, safe_merge, progressbar, saved_with}` |
| `notes` | only where peft behaviour forced a choice (lora_bias) |

## Cases

Llama = `LlamaForCausalLM`, hidden 16, intermediate 32, 2 layers, 2 heads, 1 kv head (head_dim 8, so
`k_proj`/`v_proj` are 8x16), vocab 64, untied. GPT-2 = `GPT2LMHeadModel`, n_embd 16, 2 layers, 2 heads, vocab 64,
n_positions 32, tied. LoRA cases use `task_type="CAUSAL_LM"`, r=4, lora_alpha=8 unless stated.

| case | base | adapter | what it exercises |
|---|---|---|---|
| `lora_basic` | Llama f32 | q_proj, v_proj | plain Linear LoRA, scaling 2 |
| `lora_bf16` | Llama bf16 | q_proj, v_proj | adapter saved F32 (autocast); merge = f32 add, one RNE to bf16 |
| `lora_f16` | Llama f16 | q_proj, v_proj | same with f16 |
| `rslora` | Llama f32 | all 7 linears, alpha 16, `use_rslora` | scaling alpha/sqrt(r) = 8 |
| `dora` | Llama f32 | q_proj, v_proj, `use_dora` | `lora_magnitude_vector` (out,), DoRA merge |
| `dora_bf16` | Llama bf16 | q_proj, v_proj, `use_dora` | DoRA merge into bf16 |
| `embedding_lora` | Llama f32 | embed_tokens, q_proj | `lora_embedding_A/B` (no `.weight`), full `embed_tokens.base_layer.weight` saved (save_embedding_layers auto) |
| `gpt2_conv1d` | GPT-2 f32 | c_attn, c_proj (attn.c_proj and mlp.c_proj) | Conv1D: `fan_in_fan_out` forced to true in the saved config, delta transposed |
| `modules_to_save` | Llama f32 | q_proj + `modules_to_save=["lm_head"]` | `base_model.model.lm_head.weight` full copy; merge replaces lm_head |
| `patterns` | Llama f32 | q_proj, v_proj, o_proj; `rank_pattern={"layers.0.self_attn.q_proj": 8}`, `alpha_pattern={"v_proj": 32}` | per-module r and alpha (layer-0 q_proj r=8 scaling 1; v_proj scaling 8) |
| `two_adapters` | Llama f32 | `default`: q_proj, v_proj; `other`: k_proj r=2 alpha 4 (`add_adapter`) | `adapter/other/`; logits with both adapters active (`base_model.set_adapter([...])`); both merged |
| `prompt_tuning` | Llama f32 | `PromptTuningConfig(num_virtual_tokens=4)` | key `prompt_embeddings` (no prefix), not mergeable |
| `lora_bias` | Llama f32 with `attention_bias=True` | q_proj, v_proj, `lora_bias=True` | `lora_B.bias`; merge adds `lora_B.bias * s` to the base bias |
| `trainable_tokens` | Llama f32 | q_proj, `trainable_token_indices=[1,5,7]` | `embed_tokens.token_adapter.trainable_tokens_delta` (3,16): rows replaced on merge |
| `lora_many_targets` | Llama f32, 3 layers | 21 full module names | saved `target_modules` compressed to the 7 suffixes (>= 20 rule) |
| `conv2d` | `TinyConvNet` f32 (not transformers) | conv1 `Conv2d(4,6,3)`, conv2 `Conv2d(6,6,1)`, fc `Linear(54,8)`; no task_type | Conv2d LoRA (3x3 and 1x1 branches); `auto_mapping` written; `base_model_name_or_path` null |
| `mixtral_experts` | `MixtralForCausalLM` f32 (v5 fused experts, 2 experts, top-2) | `target_modules=[]`, `target_parameters=["mlp.experts.gate_up_proj","mlp.experts.down_proj"]` | ParamWrapper: A `(r*E, in)`, B `(out, r*E)`; nested keys `mlp.experts.base_layer.lora_*` (gate_up_proj) and `mlp.experts.lora_*` (down_proj); `base/`/`merged/` in per-expert `block_sparse_moe.experts.{e}.w1/w2/w3` layout |

conv2d: `forward(x) = fc(conv2(relu(conv1(x))).flatten(1))`, input `torch.randn(1,4,5,5,
generator=torch.Generator().manual_seed(4321))` stored as `"input"`. Its adapter_config.json has
`auto_mapping = {"base_model_class": "TinyConvNet", "parent_library": "fixturegen.peft_cases"}` (the class's
`__module__` is pinned so the bytes do not depend on how the generator is started).

## peft behaviour worth knowing when reading these files

- `target_modules` is written in Python set order (hence `PYTHONHASHSEED=0`), e.g. `["v_proj", "q_proj"]`.
  Compare it as a set unless reproducing bytes.
- `adapter_config.json` for LoRA has 41 keys, `indent=2`, sorted keys, no trailing newline; prompt tuning has 17.
- Every adapter tensor is F32 even for bf16/f16 bases (adapter autocast); `{"format":"pt"}` metadata everywhere.
- `full_state_dict` key shapes differ from the adapter file: adapter name inside (`lora_A.default.weight`,
  `lora_embedding_A.default`, `lora_magnitude_vector.default.weight`, `trainable_tokens_delta.default`), wrapped
  base params under `base_layer` (`embed_tokens.token_adapter.base_layer.weight`;
  Mixtral `mlp.experts.base_layer.base_layer.gate_up_proj`), modules_to_save as `lm_head.original_module.weight`
  + `lm_head.modules_to_save.default.weight`; prompt tuning has `base_model.model.embed_tokens.weight`,
  `base_model.lm_head.weight`, `prompt_encoder.default.embedding.weight` and `word_embeddings.weight` (an alias
  of the input embedding, cloned here); GPT-2's tied `lm_head.weight` is a clone of `transformer.wte.weight`.
- `lora_bias=True` on a layer without a base bias saves fine, but `merge_and_unload()` raises `RuntimeError:
  Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.`; hence `attention_bias=True`.
  peft 0.21.2 also warns at save time that the 1-D `lora_B.bias` tensors have an "invalid shape" (a false
  positive of its ZeRO-3 sanity check); the file is correct.
- The base/merged checkpoints never contain anything from peft; merged `config.json` equals base `config.json`
  in every case here.
"""


if __name__ == "__main__":
    import sys

    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "fixtures")
