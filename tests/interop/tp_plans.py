"""Writes adapters-spec/tp_plans.json from the installed transformers (the pinned 5.24).

    python tests/interop/tp_plans.py            rewrite adapters-spec/tp_plans.json
    python tests/interop/tp_plans.py --check    exit 1 if the committed file differs (run.sh)

Two tables, both read from transformers itself rather than typed:

* `plans`: per `model_type`, the tensor-parallel plan transformers applies to its
  `AutoModelForCausalLM` class (`model.tp_plan` after `init_parallel_plans`: the class's own
  `_tp_plan`, e.g. `lm_head`, the config's `base_model_tp_plan` under the base model's prefix, and
  the `embed_tokens` rule transformers adds), built on the meta device from the default config.
* `styles`: per registered parallel style, the placement its `shard_param` gives a parameter,
  by parameter kind (`bias` or any other name) and number of dims. It is captured by calling the
  style's `shard_param` on a meta parameter with `distribute_tensor` replaced by a recorder, so no
  process group is needed.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import transformers
import transformers.distributed.tensor_parallel as tp
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

OUT = Path(__file__).resolve().parents[2] / "adapters-spec" / "tp_plans.json"


def placement_json(p, ndim):
    """The placement with its dim counted from 0; `None` when the dim does not exist (the style cannot shard a
    parameter of that many dims: torch would refuse it)."""
    if isinstance(p, Replicate):
        return {"kind": "replicate"}
    dim = p.dim + ndim if p.dim < 0 else p.dim
    if not 0 <= dim < ndim:
        return None
    if isinstance(p, _StridedShard):
        return {"kind": "strided", "dim": dim, "split_factor": p.split_factor}
    if isinstance(p, Shard):
        return {"kind": "shard", "dim": dim}
    raise ValueError(f"unknown placement {p!r}")


def style_table():
    seen = []
    original = tp.distribute_tensor

    def record(meta, mesh, placements, src_data_rank=None):
        seen.append(list(placements))
        return meta

    tp.distribute_tensor = record
    try:
        styles = {}
        for name in sorted(ALL_PARALLEL_STYLES.keys()):
            style = ALL_PARALLEL_STYLES[name]
            rows = []
            for param in ("weight", "bias"):
                for ndim in (1, 2, 3):
                    module = torch.nn.Module()
                    module.register_parameter(param, torch.nn.Parameter(torch.empty([2] * ndim, device="meta")))
                    seen.clear()
                    style.shard_param(module, param, None)
                    placement = placement_json(seen[0][0], ndim) if seen else {"kind": "replicate"}
                    if placement is not None:
                        rows.append({"param": param, "ndim": ndim, "placement": placement})
            styles[name] = rows
        return styles
    finally:
        tp.distribute_tensor = original


def plan_table():
    plans = {}
    for model_type, cfg_cls in CONFIG_MAPPING.items():
        if not getattr(cfg_cls, "base_model_tp_plan", None) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            continue
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type))
        except Exception:  # a default config some models cannot build from; it then has no entry
            continue
        if model.tp_plan:
            plans[model_type] = {"architecture": type(model).__name__, "plan": dict(model.tp_plan)}
    return plans


def build():
    doc = {
        "schema_version": 1,
        "transformers_version": transformers.__version__,
        "source": "tests/interop/tp_plans.py: model.tp_plan of AutoModelForCausalLM per model_type; "
        "each style's shard_param placements (transformers/distributed/tensor_parallel.py)",
        "styles": style_table(),
        "plans": plans_sorted(plan_table()),
    }
    return json.dumps(doc, indent=2) + "\n"


def plans_sorted(plans):
    return {k: plans[k] for k in sorted(plans)}


if __name__ == "__main__":
    text = build()
    if "--check" in sys.argv:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} differs from what transformers {transformers.__version__} gives: rerun {__file__}")
        print(f"tp plans: {OUT.name} matches transformers {transformers.__version__}")
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")
