"""reshard/ fixtures: what `from_pretrained(src).save_pretrained(out, max_shard_size=S)` writes, for
checkpoints of model types with conversion tables, from a source in the original (on-disk) layout and
from one in the transformers v5 layout (tests/fixtures/reshard/).

transformers 5.24 loads an original-layout checkpoint into the v5 layout (fused experts, v5 names),
plans the shards on the reverted v5 tensors (natural order of the v5 names, views of one fused storage as
one unit) and writes them back in the original layout. A v5 checkpoint has nothing to revert
(`_weight_conversions == []`): it is re-saved in v5 names, natural order. `peftkit reshard` must write the
same files from either source.

`generate(root)` deletes and rewrites `root/reshard/`. One folder per case:

- `source_original/`: the original-layout checkpoint the case starts from: the model is built from its
  config, saved to a scratch folder, rewritten into the Hub layout where one exists (Llava's
  `vision_model.` level, BERT's `LayerNorm.gamma/beta`), loaded with `from_pretrained` and saved (so its
  configs are those a re-save writes, and its names those transformers restores);
- `source_original_sharded/` (MoE cases): the same checkpoint, sharded (a save of the loaded model with
  `max_shard_size="3KB"`);
- `source_v5/`: the loaded model saved with `save_original_format=False` (one file), and for MoE cases
  `source_v5_sharded/` (the same, `max_shard_size="3KB"`, registration order);
- `expected_<layout>_<size>/`: `from_pretrained(source_<layout>).save_pretrained(out, max_shard_size=size)`;
  the generator checks that the sharded source of the same layout gives the same bytes. `exact` (MoE cases)
  is a size in bytes that the first shard fills exactly, up to the end of the first expert unit (the greedy
  rule keeps a unit that makes a shard exactly full);
- `case.json`: the sources, and for every expected folder its `max_shard_size` (a string, or an int for
  `exact`), the sources it is the re-save of, the key `order` handed to the shard splitter and the
  `storage_groups` (keys sharing one storage, placed together by huggingface_hub).

The `mixtral_merged` case starts from `peft/mixtral_experts/merged/` (what peft's `merge_and_unload()`
saved; this generator runs after `peft`) and holds only `expected_original_<size>/`: the layout a
resharded merge of `peft/mixtral_experts/{base,adapter}` must have. Re-saving copies tensor bytes, so no
float is computed here.

Run alone with:

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 python tests/interop/make_fixtures.py reshard
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from .common import fresh_dir, quiet, save_recorded, write_json
from .remap_cases import _bert, _gpt_neox, _hub_llava_names, _legacy_layernorm_names, _llava, _mixtral, _rewrite_weights, _vit

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402

SEED = 0
SOURCE_SHARD_SIZE = "3KB"


def _qwen2_moe():
    # 11 experts: expert 10 sorts after 9 in natural order, before 2 in code-point order.
    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=16,
            moe_intermediate_size=2,
            shared_expert_intermediate_size=4,
            num_experts=11,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def _phimoe():
    # Mixtral's fusion plus the router rename (block_sparse_moe.gate -> mlp.router).
    config = AutoConfig.for_model(
        "phimoe",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        num_local_experts=3,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


CASES = [
    {
        "name": "mixtral",
        "build": _mixtral,
        "model_type": "mixtral",
        "moe": True,
        "sizes": ["5KB", "9KB"],
        "description": "Tiny MixtralForCausalLM (E=3, 1 layer, hidden 16, intermediate 8, vocab 64, untied): "
        "per-expert w1/w3/w2 under block_sparse_moe on disk, fused experts under mlp in v5.",
    },
    {
        "name": "qwen2_moe",
        "build": _qwen2_moe,
        "model_type": "qwen2_moe",
        "moe": True,
        "sizes": ["5KB", "9KB"],
        "description": "Tiny Qwen2MoeForCausalLM (11 experts, 2 layers, hidden 16, moe_intermediate 2, shared "
        "expert 4, vocab 32, untied).",
    },
    {
        "name": "phimoe",
        "build": _phimoe,
        "model_type": "phimoe",
        "moe": True,
        "sizes": ["5KB"],
        "description": "Tiny PhimoeForCausalLM (E=3, 1 layer, vocab 32): Mixtral's fusion plus the router "
        "rename block_sparse_moe.gate -> mlp.router.",
    },
    {
        "name": "gpt_neox",
        "build": _gpt_neox,
        "model_type": "gpt_neox",
        "sizes": ["3KB"],
        "description": "Tiny GPTNeoXForCausalLM (untied): embed_out on disk is lm_head in v5, so it sorts last.",
    },
    {
        "name": "vit",
        "build": _vit,
        "model_type": "vit",
        "sizes": ["2KB"],
        "description": "Tiny ViTModel: encoder.layer.N.attention.attention.query ... on disk, layers.N.attention."
        "q_proj ... in v5, which sort differently.",
    },
    {
        "name": "llava",
        "build": _llava,
        "model_type": "llava",
        "rewrite": _hub_llava_names,
        "sizes": ["3KB"],
        "description": "Tiny LlavaForConditionalGeneration in the Hub layout (language_model.model.*, "
        "vision_tower.vision_model.*): every prefix rule, the load-only one included, is used at load and "
        "reverted on save.",
    },
    {
        "name": "bert_legacy",
        "build": _bert,
        "model_type": "bert",
        "rewrite": _legacy_layernorm_names,
        "sizes": ["3KB"],
        "description": "Tiny BertModel with legacy LayerNorm.gamma/beta names on disk: no table, only the "
        "legacy renames, used at load and reverted on save.",
    },
]


def _units(rec: dict, sizes: dict[str, int]) -> list[tuple[list[str], int]]:
    """The planning units of one recorded split: a tensor, or a group of keys sharing a storage (placed at
    its first member, its size the sum of its members)."""
    group_of = {k: tuple(g) for g in rec["storage_groups"] for k in g}
    units, seen = [], set()
    for k in rec["order"]:
        g = group_of.get(k, (k,))
        if g in seen:
            continue
        seen.add(g)
        units.append((list(g), sum(sizes[n] for n in g)))
    return units


def _exact_size(rec: dict, sizes: dict[str, int]) -> int:
    """A shard size that the first shard fills exactly: the units up to and including the first one that
    holds experts (a family of per-expert views in the original layout, a fused tensor in v5)."""
    total = 0
    for names, size in _units(rec, sizes):
        total += size
        if any(".experts." in n for n in names):
            return total
    raise AssertionError("no expert tensor")


def _shard_totals(folder: Path) -> list[int]:
    totals = []
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        totals.append(sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"))
    return totals


def _save(model, dest: Path, **kwargs) -> dict:
    # With the shapes: the `exact` sizes are computed from them.
    return save_recorded(model, dest, shapes=True, **kwargs)


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _load(cls, folder: Path):
    model = cls.from_pretrained(folder)
    model.eval()
    return model


def _resave(cls, sources: list[Path], dest: Path, max_shard_size) -> dict:
    """`from_pretrained(source).save_pretrained(dest, max_shard_size=...)` from the first source; every
    other source (the same weights, sharded differently) must give the same bytes."""
    rec = _save(_load(cls, sources[0]), dest, max_shard_size=max_shard_size)
    for other in sources[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            _save(_load(cls, other), Path(tmp) / "out", max_shard_size=max_shard_size)
            assert _files(Path(tmp) / "out") == _files(dest), (other, dest)
    return rec


def _expected(case_dir: Path, cls, layout: str, sources: dict[str, Path], sizes: list[str], exact: bool) -> dict:
    out = {}
    paths = list(sources.values())
    for size in [*sizes, "exact"] if exact else sizes:
        folder = f"expected_{layout}_{size}"
        if size == "exact":
            # Plan once at the largest named size to find a prefix of units, then save at exactly its size.
            with tempfile.TemporaryDirectory() as tmp:
                rec = _resave(cls, paths[:1], Path(tmp) / "probe", sizes[-1])
            max_shard_size = _exact_size(rec, _byte_sizes(rec))
        else:
            max_shard_size = size
        rec = _resave(cls, paths, case_dir / folder, max_shard_size)
        if size == "exact":
            assert max_shard_size in _shard_totals(case_dir / folder), (folder, max_shard_size)
        out[folder] = {
            "layout": layout,
            "max_shard_size": max_shard_size,
            "sources": list(sources),
            "order": rec["order"],
            "storage_groups": rec["storage_groups"],
        }
    return out


def _byte_sizes(rec: dict) -> dict[str, int]:
    """Bytes of every tensor of a recorded split (every fixture model is float32: 4 per element)."""
    sizes = {}
    for k, shape in rec["shapes"].items():
        n = 4
        for d in shape:
            n *= d
        sizes[k] = n
    return sizes


def _case(out: Path, spec: dict) -> None:
    case_dir = out / spec["name"]
    case_dir.mkdir(parents=True)
    torch.manual_seed(SEED)
    built = spec["build"]()
    built.eval()
    assert built.dtype == torch.float32
    cls = type(built)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "scratch"
        built.save_pretrained(scratch)
        if "rewrite" in spec:
            _rewrite_weights(scratch, spec["rewrite"])
        loaded = _load(cls, scratch)
    used = [repr(t) for t in loaded._weight_conversions]
    assert used, spec["name"]
    # The loaded model's own save: the original layout as a re-save writes it, config.json included
    # (a loaded Llava's sub-configs gain `dtype`), so that only the weights can differ.
    _save(loaded, case_dir / "source_original")
    sources = {"source_original": {"layout": "original", "folder": "source_original", "max_shard_size": None}}
    _save(loaded, case_dir / "source_v5", save_original_format=False)
    sources["source_v5"] = {"layout": "v5", "folder": "source_v5", "max_shard_size": None}
    if spec.get("moe"):
        _save(loaded, case_dir / "source_original_sharded", max_shard_size=SOURCE_SHARD_SIZE)
        _save(loaded, case_dir / "source_v5_sharded", max_shard_size=SOURCE_SHARD_SIZE, save_original_format=False)
        sources["source_original_sharded"] = {
            "layout": "original",
            "folder": "source_original_sharded",
            "max_shard_size": SOURCE_SHARD_SIZE,
        }
        sources["source_v5_sharded"] = {"layout": "v5", "folder": "source_v5_sharded", "max_shard_size": SOURCE_SHARD_SIZE}
    assert _load(cls, case_dir / "source_v5")._weight_conversions == []
    expected = {}
    for layout in ("original", "v5"):
        paths = {name: case_dir / s["folder"] for name, s in sources.items() if s["layout"] == layout}
        expected |= _expected(case_dir, cls, layout, paths, spec["sizes"], exact=spec.get("moe", False))
    write_json(
        case_dir / "case.json",
        {
            "description": spec["description"],
            "model_type": spec["model_type"],
            "class": cls.__name__,
            "transformers_version": transformers.__version__,
            "seed": SEED,
            "weight_conversions_used_at_load": used,
            "sources": sources,
            "expected": expected,
        },
    )


def _merged_case(root: Path, out: Path) -> None:
    """The layout a resharded merge must have: transformers' re-save of what peft merged."""
    merged = root / "peft" / "mixtral_experts" / "merged"
    assert merged.is_dir(), f"{merged}: run the peft generator first"
    case_dir = out / "mixtral_merged"
    case_dir.mkdir(parents=True)
    cls = AutoModelForCausalLM
    expected = _expected(case_dir, cls, "original", {"merged": merged}, ["5KB", "9KB"], exact=True)
    write_json(
        case_dir / "case.json",
        {
            "description": "from_pretrained(peft/mixtral_experts/merged).save_pretrained(out, max_shard_size=...): "
            "the files `peftkit merge --base peft/mixtral_experts/base --adapter peft/mixtral_experts/adapter "
            "--max-shard-size ...` must write.",
            "model_type": "mixtral",
            "transformers_version": transformers.__version__,
            "base": "../../peft/mixtral_experts/base",
            "adapter": "../../peft/mixtral_experts/adapter",
            "sources": {"merged": {"layout": "original", "folder": "../../peft/mixtral_experts/merged", "max_shard_size": None}},
            "expected": expected,
        },
    )


def generate(root: Path) -> None:
    root = Path(root)
    quiet()
    torch.use_deterministic_algorithms(True)
    out = fresh_dir(root / "reshard")
    for spec in CASES:
        _case(out, spec)
    _merged_case(root, out)
    (out / "README.md").write_text(README, encoding="utf-8")
    print(f"reshard: {len(CASES) + 1} cases written under {out}")


README = """# reshard fixtures

Written by `tests/interop/fixturegen/reshard_cases.py` (transformers 5.24.0); do not edit by hand.

Each `<case>/` holds sources and what transformers writes when it re-saves them:

- `source_original/`: a checkpoint in the original (on-disk) layout, one file; MoE cases also have
  `source_original_sharded/` (the same weights in 3KB shards);
- `source_v5/`: the same model in the transformers v5 layout (`save_original_format=False`), one file; MoE
  cases also have `source_v5_sharded/`;
- `expected_<layout>_<size>/`: `from_pretrained(source).save_pretrained(out, max_shard_size=size)` for every
  source of that layout (the generator checks they give the same bytes). `exact` (MoE cases) is a size in
  bytes that the first shard fills exactly, ending with the first expert unit;
- `case.json`: `sources` (folder, layout) and `expected` (for each folder: `max_shard_size`, the `sources` it
  re-saves, the key `order` handed to the shard splitter and the `storage_groups`).

`mixtral_merged/` holds only `expected_original_<size>/`: transformers' re-save of
`peft/mixtral_experts/merged/`, i.e. what a resharded merge of `peft/mixtral_experts/{base,adapter}` writes.

A Rust test runs `reshard` on every source and compares every file byte for byte.
"""
