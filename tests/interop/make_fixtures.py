#!/usr/bin/env python3
"""Write every fixture under tests/fixtures/ with the real, pinned libraries.

Run through `tests/interop/run.sh --regen` (it sets up the pinned venv and PYTHONHASHSEED=0,
so that Python set iteration order, which peft uses for `target_modules`, is repeatable).
Each generator module owns one sub-folder of tests/fixtures/ and can also be run alone:

    python tests/interop/make_fixtures.py checkpoint peft numerics
    python tests/interop/make_fixtures.py --out /tmp/fresh     # into another folder (drift check)
"""
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fixturegen import (  # noqa: E402
    bnb8_cases,
    bnb8_multi_cases,
    bnb_cases,
    burn_cases,
    checkpoint_cases,
    convert_cases,
    hub_cases,
    numerics_cases,
    peft_cases,
    quant_cases,
    quant_multi_cases,
    remap_cases,
    reshard_cases,
)

GENERATORS = {
    "checkpoint": checkpoint_cases.generate,  # checkpoint/, configs/, json/
    "peft": peft_cases.generate,  # peft/
    "numerics": numerics_cases.generate,  # numerics/
    "remap": remap_cases.generate,  # remap/
    "convert": convert_cases.generate,  # convert/
    "reshard": reshard_cases.generate,  # reshard/ (reads peft/mixtral_experts/merged: after peft)
    "bnb": bnb_cases.generate,  # bnb/ (bitsandbytes 4-bit bases and merges)
    "bnb8": bnb8_cases.generate,  # bnb8/ (bitsandbytes 8-bit bases and merges)
    "bnb8_multi": bnb8_multi_cases.generate,  # bnb8_multi/ (several adapters into an int8 base, kept)
    "hub": hub_cases.generate,  # hub/: .bin weights, their safetensors re-saves, a Hub cache
    "quant": quant_cases.generate,  # quant/ (FP8 bases and merges into them)
    "quant_multi": quant_multi_cases.generate,  # quant_multi/ (several adapters, DoRA: 4-bit and FP8 kept)
    "burn": burn_cases.generate,  # burn/ (crates/peftkit-burn)
}


def copy_examples(root):
    """The README's example: the tiny Llama and its LoRA from the lora_basic peft case (only when
    writing the committed fixtures: a drift check into another folder leaves examples/ alone)."""
    if root != HERE.parent / "fixtures":
        return
    dest = HERE.parent.parent / "examples" / "data"
    case = root / "peft" / "lora_basic"
    for src, name in [(case / "base", "tiny-llama"), (case / "adapter", "tiny-llama-lora")]:
        shutil.rmtree(dest / name, ignore_errors=True)
        shutil.copytree(src, dest / name)


GENERATORS["examples"] = copy_examples  # examples/data (after peft)


def write_host(root):
    """HOST.json: the CPU the fixtures were made on. MKL and oneDNN pick their kernels, and with
    them the rounding of logits, high-rank merges and convolutions, by CPU; the Rust tests that
    compare such floats emulate the kernels of this host (crates/peftkit-merge/src/kernels/order.rs),
    and the drift check compares them within a measured bound on any other host."""
    import torch

    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    host = {
        "vendor_id": info.get("vendor_id", ""),
        "model_name": info.get("model name", ""),
        "cpu_family": info.get("cpu family", ""),
        "model": info.get("model", ""),
        "isa": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")},
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available() and torch.__config__.show().split("Intel(R) oneAPI Math Kernel Library Version ")[-1].split(" ")[0],
    }
    (root / "HOST.json").write_text(json.dumps(host, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv):
    root = HERE.parent / "fixtures"
    if argv[:1] == ["--out"] and len(argv) >= 2:
        root, argv = Path(argv[1]).resolve(), argv[2:]
        root.mkdir(parents=True, exist_ok=True)
    names = argv or list(GENERATORS)
    write_host(root)
    for name in names:
        if name not in GENERATORS:
            sys.exit(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}")
        print(f"== {name}")
        GENERATORS[name](root)


if __name__ == "__main__":
    main(sys.argv[1:])
