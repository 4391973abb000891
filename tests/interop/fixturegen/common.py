"""Helpers shared by the fixture generators.

Only the standard library is imported here at module level: each generator sets its environment
(`CUDA_VISIBLE_DEVICES`, `HF_HUB_OFFLINE`, ...) before it imports torch and transformers, and importing
this module must not do that earlier. torch and transformers are imported inside the helpers that use them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

# The attention geometry of the tiny decoder models (2 heads of 8 over a hidden size of 16, one KV head,
# untied embeddings); each config adds its vocabulary, widths, layer and expert counts.
TINY_DECODER = dict(
    hidden_size=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def quiet() -> None:
    """Silence transformers' logging and the transformers / huggingface_hub progress bars."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()
    except Exception:  # pragma: no cover - best effort only
        pass


def write_json(path: Path, obj, *, sort_keys: bool = False) -> None:
    """`json.dumps(obj, indent=2)` (ASCII, keys in insertion order unless `sort_keys`) plus a newline,
    creating the parent folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def fresh_dir(path: Path) -> Path:
    """Deletes `path` if it exists and creates it again, empty; returns it."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def record_split_input(shapes: bool = False):
    """Record, for every state dict handed to the shard splitter, its keys in order (`"order"`) and the
    groups of keys whose tensors share one storage (`"storage_groups"`; huggingface_hub places such a
    group as one unit), and with `shapes=True` the tensor shapes (`"shapes"`).

    Only observes: the wrapped function is called unchanged.
    """
    import transformers.modeling_utils as modeling_utils

    seen: list[dict] = []
    original = modeling_utils.split_torch_state_dict_into_shards

    def spy(state_dict, *args, **kwargs):
        groups: dict[int, list[str]] = {}
        for k, t in state_dict.items():
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(k)
        rec = {
            "order": list(state_dict.keys()),
            "storage_groups": [g for g in groups.values() if len(g) > 1],
        }
        if shapes:
            rec["shapes"] = {k: list(t.shape) for k, t in state_dict.items()}
        seen.append(rec)
        return original(state_dict, *args, **kwargs)

    modeling_utils.split_torch_state_dict_into_shards = spy
    try:
        yield seen
    finally:
        modeling_utils.split_torch_state_dict_into_shards = original


def save_recorded(model, dest: Path, *, shapes: bool = False, **kwargs) -> dict:
    """`model.save_pretrained(dest, **kwargs)`, returning what `record_split_input(shapes)` saw of its one
    call to the shard splitter."""
    with record_split_input(shapes=shapes) as seen:
        model.save_pretrained(dest, **kwargs)
    assert len(seen) == 1, seen
    return seen[0]


def name_model(model, name: str) -> None:
    """Gives a model a fixed name, so that nothing peft writes depends on where it was built or loaded."""
    # peft reads model.__dict__["name_or_path"] (get_peft_model) and config._name_or_path (model card)
    model.config._name_or_path = name
    model.name_or_path = name


def build_model(cls_name: str, config_cls_name: str, kw: dict, name: str, seed: int):
    """`torch.manual_seed(seed)`, then the transformers model `cls_name(config_cls_name(**kw))`, named `name`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, config_cls_name)(**kw))
    name_model(model, name)
    return model


def lm_logits(model, input_ids):
    """The model's logits on `input_ids` under `torch.no_grad()`, contiguous."""
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.contiguous()


def generate_cases(root, subdir: str, cases, readme: str) -> None:
    """Deletes and rewrites `root/<subdir>/`: its README (nothing under tests/fixtures/ is edited by hand),
    then `case(out)` for every case function, on one torch thread with warnings silenced.

    Needs PYTHONHASHSEED=0: peft writes `target_modules` in set order.
    """
    if os.environ.get("PYTHONHASHSEED") != "0":
        raise SystemExit(f"{subdir} fixtures need PYTHONHASHSEED=0 (peft writes target_modules in set order)")
    import torch

    torch.set_num_threads(1)
    quiet()
    out = fresh_dir(Path(root) / subdir)
    (out / "README.md").write_text(readme, encoding="utf-8")
    for fn in cases:
        print(f"  {subdir}/{fn.__name__.removeprefix('case_')}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(out)
