"""Checkpoint, config and JSON-formatting fixtures (tests/fixtures/{checkpoint,configs,json}/).

Everything here is produced by the pinned transformers / safetensors stack; the Rust tests
compare peftkit's output against these files byte for byte. See tests/fixtures/README.md.

Run alone with:

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" python tests/interop/make_fixtures.py checkpoint

Besides writing the files, the generator cross-checks every case against an independent model
of the save algorithm (tensor order, greedy shard split, file names, index contents), so that
`case.json["order"]` is known to be the order transformers really handed to the shard splitter.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

from .common import fresh_dir, quiet, record_split_input, write_json

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SEED = 0
SUBDIRS = ("checkpoint", "configs", "json")

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _llama(tied: bool, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(_llama_config(tie_word_embeddings=tied))
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return model


def dot_natural_key(name: str):
    """Sort key used for models loaded with from_pretrained (reference spec section 1.1).

    Split on "."; an all-digit part sorts as (0, int); any other part as (1, text) or, when it
    ends in digits, (1, text_without_trailing_digits, int(trailing_digits)).
    """
    key = []
    for part in name.split("."):
        if part.isdigit():
            key.append((0, int(part)))
            continue
        m = re.fullmatch(r"(.*?)([0-9]*)", part)
        text, digits = m.group(1), m.group(2)
        key.append((1, text, int(digits)) if digits else (1, text))
    return key


def _parse_size(size) -> int:
    """Decimal size strings, as in reference spec section 1.3."""
    if isinstance(size, int):
        return size
    s = size.strip()
    unit = s[-2:].upper()
    mult = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit]
    return int(float(s[:-2].strip()) * mult)


def _greedy_split(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy shard split (reference spec section 1.2), no shared storages."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_size = 0
    for name, size in sizes:
        if size > max_bytes:
            shards.append([name])
            continue
        if cur_size + size > max_bytes:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(name)
        cur_size += size
    if cur:
        shards.append(cur)
    return shards


def _with_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _read_header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0, (path, n)
    return json.loads(data[8 : 8 + n].decode("utf-8"))


def _tied_pairs(model, state_dict) -> list[list[str]]:
    """[target, source] pairs that transformers drops on save: declared ties whose tensors share storage."""
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    pairs = []
    for target, source in declared.items():
        if target in state_dict and source in state_dict:
            t, s = state_dict[target], state_dict[source]
            if t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():
                pairs.append([target, source])
    return pairs


# --------------------------------------------------------------------------------------------
# checkpoint cases
# --------------------------------------------------------------------------------------------


def _verify_save(expected_dir: Path, state_dict, order, max_shard_size, variant, total_parameters):
    """Check the written directory against an independent model of the algorithm."""
    limit = _parse_size(max_shard_size if max_shard_size is not None else "50GB")
    sizes = [(k, state_dict[k].numel() * state_dict[k].element_size()) for k in order]
    shards = _greedy_split(sizes, limit)
    files = sorted(p.name for p in expected_dir.iterdir())
    weights = _with_variant("model.safetensors", variant)
    index_name = _with_variant("model.safetensors.index.json", variant)
    if len(shards) == 1:
        assert weights in files and index_name not in files, files
        header = _read_header(expected_dir / weights)
        assert list(header)[0] == "__metadata__" and header["__metadata__"] == {"format": "pt"}
        assert set(header) - {"__metadata__"} == set(order), (set(header), order)
        return files
    n = len(shards)
    pattern = weights.replace(".safetensors", "{suffix}.safetensors")
    names = [pattern.format(suffix=f"-{i + 1:05d}-of-{n:05d}") for i in range(n)]
    index = json.loads((expected_dir / index_name).read_text(encoding="utf-8"))
    predicted_map = {k: names[i] for i, keys in enumerate(shards) for k in keys}
    assert index["weight_map"] == predicted_map, "shard assignment differs from the greedy model"
    assert list(index["weight_map"]) == sorted(predicted_map), "weight_map is not sorted"
    assert index["metadata"] == {"total_parameters": total_parameters, "total_size": sum(s for _, s in sizes)}
    raw = (expected_dir / index_name).read_text(encoding="utf-8")
    assert raw == json.dumps(index, indent=2, sort_keys=True) + "\n"
    for name, keys in zip(names, shards):
        header = _read_header(expected_dir / name)
        assert header["__metadata__"] == {"format": "pt"}
        assert set(header) - {"__metadata__"} == set(keys)
    assert sorted(names + [index_name, "config.json", "generation_config.json"]) == files, files
    return files


def _save_case(case_dir: Path, model, description, *, max_shard_size=None, variant=None,
               provenance="from_config", state_dict=None, tied=None):
    expected_dir = case_dir / "expected"
    sd = model.state_dict() if state_dict is None else state_dict
    if tied is None:
        tied = _tied_pairs(model, sd)
    targets = {t for t, _ in tied}
    order = [k for k in sd if k not in targets]
    if provenance == "from_pretrained":
        order = sorted(order, key=dot_natural_key)  # stable, like transformers
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    if variant is not None:
        kwargs["variant"] = variant
    if state_dict is not None:
        # save_pretrained pops tensors out of the dict it writes, i.e. out of the caller's dict
        # when state_dict= is given; hand it a shallow copy.
        kwargs["state_dict"] = dict(state_dict)
    with record_split_input() as seen:
        model.save_pretrained(expected_dir, **kwargs)
    assert len(seen) == 1 and seen[0]["order"] == order, (seen, order)
    total_parameters = model.num_parameters()
    _verify_save(expected_dir, sd, order, max_shard_size, variant, total_parameters)
    case = {
        "description": description,
        "order": order,
        "max_shard_size": max_shard_size,
        "variant": variant,
        "tied": tied,
        "total_parameters": total_parameters,
        "provenance": provenance,
    }
    if provenance == "from_pretrained":
        case["source"] = "source"
    write_json(case_dir / "case.json", case)
    return case


def _reloaded_case(case_dir: Path, tied: bool, description: str, **save_kwargs):
    source_dir = case_dir / "source"
    _llama(tied=tied).save_pretrained(source_dir)
    assert (source_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(source_dir)
    model.eval()
    assert getattr(model, "_weight_conversions", None) is not None  # marks the natural-order path
    return _save_case(case_dir, model, description, provenance="from_pretrained", **save_kwargs)


def _checkpoint_cases(out: Path) -> list[tuple[str, dict]]:
    cases = []

    def add(name, fn):
        case_dir = out / name
        cases.append((name, fn(case_dir)))

    add("llama_tied_single", lambda d: _save_case(
        d, _llama(tied=True),
        "Tiny LlamaForCausalLM from config, tie_word_embeddings=True, default max_shard_size (50GB): "
        "one model.safetensors, no index; lm_head.weight is dropped as a tied target."))
    add("llama_tied_5KB", lambda d: _save_case(
        d, _llama(tied=True),
        "Same tied Llama, max_shard_size='5KB': several shards in registration order; the 4096-byte "
        "embedding fits 5000 bytes alone, so it closes shard 1.", max_shard_size="5KB"))
    add("llama_untied_3KB", lambda d: _save_case(
        d, _llama(tied=False),
        "Untied Llama from config, max_shard_size='3KB': model.embed_tokens.weight and lm_head.weight "
        "(64x16 f32 = 4096 bytes > 3000) each get their own shard as soon as they are met, while the "
        "current shard stays open.", max_shard_size="3KB"))
    add("llama_untied_20KB", lambda d: _save_case(
        d, _llama(tied=False),
        "Untied Llama from config, max_shard_size='20KB': 2 shards, registration order.",
        max_shard_size="20KB"))
    # The shard limit's boundary: "larger than the limit" and "would exceed the limit" are
    # strict, so a tensor of exactly the limit, or tensors summing exactly to it, stay in the
    # normal path / the current shard. max_shard_size is an int (bytes), as transformers allows.
    add("llama_untied_4096B", lambda d: _save_case(
        d, _llama(tied=False),
        "Untied Llama from config, max_shard_size=4096 (int, bytes): model.embed_tokens.weight and "
        "lm_head.weight (64x16 f32 = 4096 bytes) are exactly the limit, not larger, so they take "
        "the normal path: lm_head.weight closes the open shard [..., model.norm.weight] and starts "
        "its own; mlp.gate_proj + mlp.up_proj (2048 + 2048 bytes) fill a shard exactly and stay "
        "together.", max_shard_size=4096))
    add("llama_untied_6144B", lambda d: _save_case(
        d, _llama(tied=False),
        "Untied Llama from config, max_shard_size=6144 (int, bytes): model.embed_tokens.weight + "
        "layer-0 q_proj + k_proj + v_proj (4096 + 1024 + 512 + 512 bytes) fill shard 1 exactly, "
        "which stays open until o_proj; no tensor equals the limit.", max_shard_size=6144))
    add("llama_variant_fp16", lambda d: _save_case(
        d, _llama(tied=True, dtype=torch.float16),
        "Tied Llama from config converted to float16 (config dtype 'float16'), variant='fp16', "
        "max_shard_size='3KB': shards model.fp16-0000k-of-0000n.safetensors and index "
        "model.safetensors.index.fp16.json.", max_shard_size="3KB", variant="fp16"))
    add("llama_variant_single", lambda d: _save_case(
        d, _llama(tied=True, dtype=torch.float16),
        "Tied Llama from config converted to float16, variant='fp16', default max_shard_size: a single "
        "model.fp16.safetensors, no index.", variant="fp16"))

    def mixed(d):
        model = _llama(tied=True)
        # Insertion order is deliberately not the header order: the safetensors header sorts by
        # dtype (descending) then name, whatever order the dict had.
        sd = {
            "z.mask": torch.tensor([True]),
            "a.weight": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32),
            "c.ids": torch.tensor([7, -3], dtype=torch.int64),
            "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3).div(4).to(torch.bfloat16),
            "a.scalar": torch.tensor(1.5, dtype=torch.float32),
        }
        return _save_case(
            d, model,
            "Tiny tied Llama from config saved with save_pretrained(state_dict=...) holding only "
            "c.ids I64 [2], a.scalar F32 0-dim, a.weight F32 [3], b.weight BF16 [2,3], z.mask BOOL [1] "
            "(save_pretrained accepts it; config.json and generation_config.json are the Llama's). "
            "Single file; header order I64, F32, BF16, BOOL then by name. 'order' is the dict's "
            "insertion order; total_parameters is the Llama's (no index is written).",
            state_dict=sd, tied=[])
    add("mixed_dtypes", mixed)

    add("llama_reloaded_5KB", lambda d: _reloaded_case(
        d, False,
        "Untied Llama saved to source/ (default, single file), loaded with "
        "AutoModelForCausalLM.from_pretrained(source/) and saved with max_shard_size='5KB'. A model "
        "loaded by from_pretrained has _weight_conversions set (to []), so the state dict is "
        "re-ordered by dot_natural_key before splitting: lm_head.weight comes first.",
        max_shard_size="5KB"))
    add("llama_reloaded_3KB_fp16variant", lambda d: _reloaded_case(
        d, True,
        "Tied Llama saved to source/ (default, single file), loaded with from_pretrained and saved "
        "(still float32) with max_shard_size='3KB', variant='fp16'. Natural-sort order; lm_head.weight "
        "is dropped as a tied target before sorting.",
        max_shard_size="3KB", variant="fp16"))
    add("llama_bf16_single", lambda d: _save_case(
        d, _llama(tied=True, dtype=torch.bfloat16),
        "Tied Llama from config converted to bfloat16 (config dtype 'bfloat16'), default "
        "max_shard_size: one model.safetensors with BF16 tensors."))
    return cases


def _checkpoint_readme(out: Path, cases) -> None:
    lines = [
        "# checkpoint fixtures",
        "",
        "Written by `tests/interop/fixturegen/checkpoint_cases.py`; do not edit by hand.",
        "",
        "Each `<case>/expected/` is the whole directory written by `model.save_pretrained(...)`",
        "(transformers 5.24.0). `<case>/case.json` holds:",
        "",
        "- `description`: what the case exercises;",
        "- `order`: the state-dict keys in the exact order transformers handed them to the shard",
        "  splitter (after tied-weight removal; natural-sort order for `from_pretrained` cases).",
        "  The generator records it from the real call and checks it against the shards;",
        "- `max_shard_size`: the value passed (string or int), or `null` for the default (`\"50GB\"`);",
        "- `variant`: the variant passed, or `null`;",
        "- `tied`: `[[target, source], ...]` pairs removed as tied weights (target dropped);",
        "- `total_parameters`: `model.num_parameters()`;",
        "- `provenance`: `from_config` or `from_pretrained`;",
        "- `source` (only `from_pretrained`): sibling folder with the plain single-file checkpoint the",
        "  model was loaded from.",
        "",
        "| case | provenance | max_shard_size | variant | files in expected/ |",
        "|---|---|---|---|---|",
    ]
    for name, case in cases:
        n = len(list((out / name / "expected").iterdir()))
        lines.append(
            f"| `{name}` | {case['provenance']} | {json.dumps(case['max_shard_size'])} | "
            f"{json.dumps(case['variant'])} | {n} |"
        )
    lines.append("")
    for name, case in cases:
        lines.append(f"- `{name}`: {case['description']}")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def _save_model_configs(model, dest: Path) -> None:
    """Run the real model.save_pretrained and keep only its JSON files."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (Path(tmp) / name).exists():
                shutil.copyfile(Path(tmp) / name, dest / name)
    assert (dest / "generation_config.json").exists() == model.can_generate()


def _config_cases(out: Path) -> None:
    _save_model_configs(_llama(tied=True), out / "llama")

    torch.manual_seed(SEED)
    _save_model_configs(
        Qwen2ForCausalLM(Qwen2Config(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        )),
        out / "qwen2",
    )

    torch.manual_seed(SEED)
    _save_model_configs(
        GPT2LMHeadModel(GPT2Config(
            vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=128,
            bos_token_id=63, eos_token_id=63,
        )),
        out / "gpt2",
    )

    id2label = {i: f"LABEL_{i}" for i in range(12)}
    id2label[3] = "café"
    id2label[7] = "smile \U0001F642"
    id2label[9] = 'quote " and \\ backslash'
    label2id = {v: k for k, v in id2label.items()}
    torch.manual_seed(SEED)
    _save_model_configs(
        BertForSequenceClassification(BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=128, num_labels=12,
            problem_type="multi_label_classification", id2label=id2label, label2id=label2id,
        )),
        out / "bert_multilabel",
    )

    floats = _llama_config(
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e16},
        my_inf=float("inf"),
        my_neg_inf=float("-inf"),
        my_small=1.5e-7,
        my_big=1.5e20,
        my_neg_zero=-0.0,
        my_tenth=0.1,
        my_third=1 / 3,
        my_int_big=2**63 - 1,
    )
    floats.save_pretrained(out / "llama_floats")

    gen = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=[1, 2], max_new_tokens=32,
        pad_token_id=0,
    )
    gen.save_pretrained(out / "generation_custom")

    readme = """# config fixtures

Written by `tests/interop/fixturegen/checkpoint_cases.py` with transformers 5.24.0; do not edit by
hand. A Rust test parses each file, writes it again and compares the bytes. Every file is
`json.dumps(d, indent=2, sort_keys=True) + "\\n"` with ASCII escaping.

| folder | made by | what it exercises |
|---|---|---|
| `llama/` | `LlamaForCausalLM(config).save_pretrained` (JSON files kept) | tiny tied Llama; `architectures`, `dtype`, null `pad_token_id`, nested `rope_parameters`, `1e-06`; generation config with `_from_model_config` |
| `qwen2/` | `Qwen2ForCausalLM(config).save_pretrained` | `layer_types` list, `sliding_window: null`, null bos/eos; generation config without token ids |
| `gpt2/` | `GPT2LMHeadModel(config).save_pretrained` | GPT-2 field names (`n_embd`, `layer_norm_epsilon: 1e-05`, `n_inner: null`), bos/eos 63 |
| `bert_multilabel/` | `BertForSequenceClassification(config).save_pretrained` | `num_labels=12`, `problem_type`, int-keyed `id2label` sorted numerically (`"9"` before `"10"`) then stringified, `label2id` sorted by code point (`LABEL_10` before `LABEL_2`), `caf\\u00e9`, astral `\\ud83d\\ude42` surrogate pair, escaped quote and backslash; no `generation_config.json` (cannot generate) |
| `llama_floats/` | `LlamaConfig(...).save_pretrained` (config only: no `architectures`/`dtype`) | `rope_theta` `1e+16`, `1e-06`, custom attributes: `my_inf`/`my_neg_inf` as `{"__float__": "Infinity"/"-Infinity"}`, `1.5e-07`, `1.5e+20`, `-0.0`, `0.1`, `1/3`, `2**63-1` |
| `generation_custom/` | `GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=[1, 2], max_new_tokens=32, pad_token_id=0).save_pretrained` | only non-None values, list value, `transformers_version` |

`do_sample=True` is needed in `generation_custom`: without it, saving a fresh GenerationConfig with
`temperature`/`top_p` raises `ValueError` ("GenerationConfig is invalid").
"""
    (out / "README.md").write_text(readme, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# json formatting cases
# --------------------------------------------------------------------------------------------


def _json_values() -> list[tuple[str, object]]:
    floats = [
        ("zero", 0.0), ("neg_zero", -0.0), ("one", 1.0), ("ten_thousand", 10000.0),
        ("1e16", 1e16), ("1e15", 1e15), ("9999999999999998", 9999999999999998.0),
        ("1e-4", 1e-4), ("1e-5", 1e-5), ("1.5e-7", 1.5e-7), ("0.1", 0.1), ("one_third", 1 / 3),
        ("2pow53_float", float(2**53)), ("1e308", 1e308), ("5e-324", 5e-324),
        ("max_f64", 1.7976931348623157e308), ("min_normal", 2.2250738585072014e-308),
        ("123456789012345678.0", 123456789012345678.0), ("sqrt512", 22.627416997969522),
        ("neg_1.5", -1.5), ("1e22", 1e22), ("1e21", 1e21), ("0.001", 0.001), ("1.5e-05", 1.5e-5),
        ("123456.789", 123456.789), ("neg_1e-06", -1e-6), ("1.5e20", 1.5e20),
    ]
    ints = [
        ("int_zero", 0), ("int_neg_one", -1), ("int_2pow53", 2**53), ("int_2pow53_plus1", 2**53 + 1),
        ("int_i64_max", 2**63 - 1), ("int_i64_min", -(2**63)), ("int_1e18", 10**18),
        ("int_neg_big", -123456789012345678),
    ]
    strings = [
        ("str_ascii", "hello world"), ("str_empty", ""), ("str_latin1", "café"),
        ("str_euro", "€ 5"), ("str_cjk", "日本語"), ("str_astral", "smile 🙂"),
        ("str_max_cp", "\U0010ffff"), ("str_control", "\x00\x01\x08\x0b\x1f"),
        ("str_short_escapes", "\t\n\r\b\f"), ("str_del", "a\x7fb"), ("str_c1", "\x80\x9f\xa0\xff"),
        ("str_quotes", 'say "hi"'), ("str_backslash", "C:\\path\\to"), ("str_slash", "a/b</c>"),
        ("str_line_sep", "\u2028\u2029"), ("str_bom", "\ufeffx"),
    ]
    containers = [
        ("empty_list", []), ("empty_dict", {}), ("nested_empty", {"a": [], "b": {}, "c": [[], {}]}),
        ("list_mixed", [1, 2.5, "x", None, True, False, [], {}]),
        ("bools_null", {"t": True, "f": False, "n": None}),
        ("key_sort_basic", {"a": 1, "B": 2, "_": 3, "é": 4, "A": 5, "b": 6}),
        ("key_sort_digits", {"10": 0, "9": 1, "1": 2, "01": 3, "": 4}),
        ("key_sort_astral_vs_bmp", {"\uff61": "bmp high", "🙂": "astral", "\ue000": "private use", "z": 0}),
        ("key_sort_prefix", {"ab": 1, "a": 2, "abc": 3, "a b": 4, "a\u00e9": 5}),
        ("nested_sort", {"z": {"b": [{"y": 1, "x": 2}], "a": {"é": -0.0, "_": 1e-5}}, "B": [1e16, 0.1]}),
        ("config_like", {
            "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "pad_token_id": None, "tie_word_embeddings": True, "vocab_size": 64,
        }),
        ("deep_nesting", [[[[{"k": [1, [2, [3]]]}]]]]),
    ]
    return floats + ints + strings + containers


def _json_cases(out: Path) -> None:
    cases = []
    for name, value in _json_values():
        compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        assert json.loads(compact) == value or (isinstance(value, float) and math.isnan(value))
        pretty = json.dumps(value, indent=2, sort_keys=True)
        cases.append({
            "name": name,
            "input": compact,
            "expected": pretty + "\n",
            "expected_no_newline": pretty,
        })
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cases.json", cases)
    (out / "README.md").write_text(
        "# json formatting fixtures\n\n"
        "Written by `tests/interop/fixturegen/checkpoint_cases.py`; do not edit by hand.\n\n"
        "`cases.json` is a list of `{name, input, expected, expected_no_newline}`:\n\n"
        "- `input`: `json.dumps(value, separators=(',', ':'), ensure_ascii=False)` (compact, raw UTF-8);\n"
        "- `expected_no_newline`: `json.dumps(value, indent=2, sort_keys=True)` (Python 3 default\n"
        "  `ensure_ascii=True`), i.e. what transformers' `to_json_string` writes before the newline;\n"
        "- `expected`: the same plus a trailing `\\n`, exactly as written to `config.json`.\n\n"
        "JSON input can only carry string keys, so int-keyed sorting (`id2label`) is covered by\n"
        "`configs/bert_multilabel/` instead.\n",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def generate(root: Path) -> None:
    root = Path(root)
    quiet()
    torch.use_deterministic_algorithms(True)
    for sub in SUBDIRS:
        fresh_dir(root / sub)
    cases = _checkpoint_cases(root / "checkpoint")
    _checkpoint_readme(root / "checkpoint", cases)
    _config_cases(root / "configs")
    _json_cases(root / "json")
    print(f"checkpoint: {len(cases)} cases; configs and json written under {root}")
