#!/usr/bin/env python3
"""FP8 merge benchmark: `peftkit merge` into a ~1 GB FP8 block-scaled Llama (format kept, and
`--dequantize`) against `cp -r` of the base, with the method of benches/merge_bench.py (its
measurement, warm-up and pretouch functions are imported, not copied).

Run with the pinned venv (see tests/interop/run.sh), on a quiet machine:

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 \\
        ~/.cache/peftkit/venv/bin/python benches/fp8_merge_bench.py

What it does:

* builds the data once into `--work DIR` (default /tmp/peftkit-bench-fp8; never inside the repo)
  and reuses it (rebuilt only if its `.complete` marker is missing):
  a Llama (hidden 2048, intermediate 5632, 16 layers, 32 heads / 4 KV heads, vocab 32000,
  untied) built by transformers in bf16; every projection quantized by transformers' own
  `Fp8Quantize._quantize_one` on CPU (128 x 128 blocks, f32 `weight_scale_inv`; embeddings, norms
  and lm_head stay bf16: 0.97 GB in all), written in 300 MB shards planned by huggingface_hub
  with transformers' `quantization_config` in config.json; an r=16 all-linear LoRA made by
  peft on the same model, its factors seeded as in merge_bench.py;
* times, interleaved (one discarded warm-up round, then `--runs` rounds, median reported):
  `cp -r`, `cp -r` + `sync`, `peftkit merge` (FP8 kept: every projection dequantized, merged,
  re-quantized), the same with `--no-fsync`, and `peftkit merge --dequantize --no-fsync` (bf16
  out, twice the bytes of the projections); with `--peft`, also transformers' CPU load of the
  FP8 base + peft's `merge_and_unload()` + `save_pretrained()` (the `--dequantize` reference);
* prints the table and writes docs/benchmarks/fp8_merge.json (unless `--no-write`).
"""
import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench as mb  # noqa: E402

OUT_JSON = mb.REPO / "docs" / "benchmarks" / "fp8_merge.json"
MODEL = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
BLOCK = [128, 128]
SHARD = "300MB"

# transformers' CPU load of the FP8 base (dequantized to bf16) + peft's merge and save.
PEFT_CHILD = r"""
import sys
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, shard = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
model.merge_and_unload().save_pretrained(out, max_shard_size=shard)
"""


def build(d, layers):
    """The FP8 base and its adapter, with the real transformers and peft."""
    torch = mb.torch_imports()
    from types import SimpleNamespace

    from huggingface_hub import split_torch_state_dict_into_shards
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    base, adapter = d / "base", d / "adapter"
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(MODEL, num_hidden_layers=layers), max_position_embeddings=4096,
                      tie_word_embeddings=False, dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.config._name_or_path = model.name_or_path = str(base)
    qconfig = FineGrainedFP8Config(weight_block_size=BLOCK)
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=qconfig))
    state = {}
    for k, v in model.state_dict().items():
        v = v.contiguous()
        state.update(quantize._quantize_one(k, v) if k.endswith("_proj.weight") else {k: v})
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors", max_shard_size=SHARD)
    base.mkdir(parents=True)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(base / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.quantization_config = qconfig
    cfg.save_pretrained(base)
    mb.log(f"  FP8 base: {mb.dir_bytes(base) / 1e9:.3f} GB")
    del state
    pm = get_peft_model(model, mb.lora_config(base, "all-linear"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                mb.fill_lora(name, p.data)
    pm.save_pretrained(adapter)
    mb.log(f"  adapter saved by peft: {mb.dir_bytes(adapter) / 1e6:.1f} MB")


def ensure_data(work, layers):
    d = work / f"fp8-{layers}l"
    if (d / ".complete").exists():
        mb.log(f"data cached in {d}")
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    build(d, layers)
    subprocess.run(["sync"], check=True)
    (d / ".complete").write_text(datetime.datetime.now().isoformat() + "\n")
    return d


def contenders(d, peftkit, with_peft):
    base, adapter = d / "base", d / "adapter"
    merge = [str(peftkit), "merge", "--base", str(base), "--adapter", str(adapter)]
    out = {
        "cp -r": lambda o: ["cp", "-r", str(base), str(o)],
        "cp -r + sync": lambda o: ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "sh", str(base), str(o)],
        # run_case keeps the last output of "peftkit merge" and parses its --json summary
        "peftkit merge": lambda o: [*merge, "--out", str(o), "--json"],
        "peftkit merge --no-fsync": lambda o: [*merge, "--out", str(o), "--no-fsync"],
        "peftkit merge --dequantize --no-fsync": lambda o: [*merge, "--out", str(o), "--dequantize", "--no-fsync"],
    }
    if with_peft:
        out["peft merge_and_unload"] = lambda o: [sys.executable, "-c", PEFT_CHILD, str(base), str(adapter), str(o), SHARD]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/peftkit-bench-fp8"))
    ap.add_argument("--runs", type=int, default=3, help="runs per contender (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds")
    ap.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"], help="fewer for a smoke test")
    ap.add_argument("--peftkit", type=Path, help="use this binary instead of `cargo build --release`")
    ap.add_argument("--peft", action="store_true", help="also time transformers + peft (bf16 out, ~4 GB RAM)")
    ap.add_argument("--no-pretouch", action="store_true", help="see merge_bench.py's `pretouch`")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {OUT_JSON.relative_to(mb.REPO)}")
    args = ap.parse_args()

    work = args.work.resolve()
    if work == mb.REPO or mb.REPO in work.parents:
        sys.exit(f"--work {work} is inside the repository; use a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    peftkit = args.peftkit.resolve() if args.peftkit else mb.build_peftkit(work)
    d = ensure_data(work, args.layers)
    pretouch_bytes = 0 if args.no_pretouch else 2 * mb.dir_bytes(d / "base") + (1 << 30)
    s = mb.run_case("fp8", d, contenders(d, peftkit, args.peft), args.runs, args.warmup, args.runs,
                    20 << 20, pretouch_bytes)
    results = {
        "machine": mb.machine(),
        "peftkit": {"binary": str(peftkit), **mb.git_state()},
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 ~/.cache/peftkit/venv/bin/python "
        "benches/fp8_merge_bench.py " + " ".join(sys.argv[1:]),
        "model": {**MODEL, "num_hidden_layers": args.layers, "weight_block_size": BLOCK, "max_shard_size": SHARD,
                  "base_bytes": mb.dir_bytes(d / "base"), "adapter_bytes": mb.dir_bytes(d / "adapter"),
                  "lora": {"r": mb.R, "lora_alpha": mb.ALPHA, "target_modules": "all-linear"}},
        "protocol": {"runs": args.runs, "warmup_rounds": args.warmup, "pretouch_bytes": pretouch_bytes,
                     "order": list(s)},
        "contenders": s,
    }
    shutil.rmtree(mb.out_dir(d, "peftkit merge"), ignore_errors=True)
    shutil.rmtree(mb.out_dir(d, "peft merge_and_unload"), ignore_errors=True)
    cp = s.get("cp -r", {}).get("median_wall_s")
    print(f"\n{'contender':40s} {'median s':>9s} {'x cp -r':>8s} {'VmHWM MiB':>10s}")
    for name, r in s.items():
        if r.get("failed"):
            print(f"{name:40s}   failed")
            continue
        ratio = r["median_wall_s"] / cp if cp else float("nan")
        print(f"{name:40s} {r['median_wall_s']:9.2f} {ratio:8.2f} {r['median_vmhwm_mib']:10.1f}")
    if not args.no_write:
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps(results, indent=2) + "\n")
        mb.log(f"wrote {OUT_JSON.relative_to(mb.REPO)}")


if __name__ == "__main__":
    main()
