#!/usr/bin/env python3
"""Every streaming verb of peftkit against `cp -r` of its input, per host, for noisy hosts.

Run it through `benches/run_all.sh [--quick]`, which sets up the environment; by hand:

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 \\
        ~/.cache/peftkit/venv/bin/python benches/verbs_bench.py [--quick] [--label TEXT]

Cases (inputs are built once in `--work`, default /tmp/peftkit-bench, and reused):

* `merge-1gb`: `peftkit merge` of the 0.97 GB Llama and its r=16 all-linear LoRA (built by
  benches/merge_bench.py's builders, with transformers and peft);
* `merge-7b`: the same on the 13.5 GB Llama-2-7B shape (full runs only; needs about 30 GB free);
* `merge-dora`: the 1 GB merge with an r=16 all-linear DoRA adapter made by peft
  (`use_dora=True`) instead of the LoRA;
* `merge-safe`: the 1 GB merge with `--safe-merge` (peft's `safe_merge=True`: the delta rounded
  to bf16 before the add, a NaN or infinity refused);
* `reshard`: `peftkit reshard` of the 1 GB Llama into 200 MB shards;
* `remap-v5`, `remap-original`: `peftkit remap` of a 0.9 GB Mixtral-shaped MoE (8 experts,
  saved by transformers in the original per-expert layout) to the transformers-v5 layout (fused
  experts) and back;
* `extract`: `peftkit extract --base-out` of a full PEFT state dict (the 1 GB Llama wrapped by
  peft with the LoRA, `PeftModel.state_dict()` saved in one file): the adapter and the clean base;
* `convert`: `peftkit convert` of the 1 GB Llama as a `.bin` checkpoint (its state dict written
  by `torch.save` into `pytorch_model.bin`, as transformers v4 wrote single-file checkpoints) to
  safetensors;
* `merge-fp8`, `merge-fp8-dequantize`: `peftkit merge` into the 0.97 GB FP8 block-scaled Llama
  of benches/fp8_merge_bench.py (its builder, with transformers' own FP8 quantizer and peft),
  FP8 kept and with `--dequantize` (bf16 out: the projections take twice the bytes);
* `merge-nf4`, `merge-int8`, `merge-nf4-dequantize`: `peftkit merge` (format kept, and NF4 with
  `--dequantize`: bf16 out, the 1 GB model's bytes) into the 1 GB Llama quantized by
  transformers + bitsandbytes on the CPU, NF4 with double quantization (QLoRA's setting) and
  int8, with its LoRA. No target: each merged weight is dequantized (and, format kept,
  quantized again) on the CPU, work `cp` does not do, and `--dequantize` writes more bytes;
* `merge-qlora`: the 1 GB merge with `--qlora-base nf4 --qlora-double-quant` (each merged
  weight replaced by its QLoRA round trip first). No target, for the same reason.

To add a verb: give `CASES` an entry with a data builder (a function of the work folder
returning the input folder and any other paths) and a command builder
(`cmd(inputs, out, synced)`), and set `no_fsync` if the verb has `--no-fsync`; `--cases` then
selects it by its key.

Method. The contenders of a case are `cp -r` of its input, `cp -r` + `sync` of the copy, the
verb synced (peftkit's default) and, where the verb has it, with `--no-fsync`; on an AVX-512
host the merges also run with `PEFTKIT_FORCE_ISA=avx2`, the path of AVX2-only CPUs, and the
1 GB merge also runs synced with `PEFTKIT_WHOLE_DIRECT=1` ("[whole direct]": each merged
tensor computed whole and written with one direct write, the default before 2026-12-04, a
comparison with no target). They run
interleaved: one warm-up round, then `--rounds` rounds, each contender once per round in a
rotating order. Before each run the output is removed, `sync` flushes dirty pages, the inputs
are read (warm cache) and fresh memory is touched (see merge_bench.pretouch); `--quick` skips
the sync, the settle time and the pre-touch (on a shared host a global `sync` waits for
everyone's writeback). Each contender
reports its fastest run and its median; a target holds when it holds for both, and a target
met by the fastest run only is reported as such (noise). Peak RSS is VmHWM (`/usr/bin/time`).

Targets (issue 15; checked here, never in a test): every verb ≤1.2× `cp -r` unsynced and
≤1.0× `cp -r` + `sync` synced; the 7B merge ≤1.05× `cp -r`; peak RSS ≤64 MB at 1 GB and
≤256 MB at 7B.

Output: docs/benchmarks/verbs-HOST.json (every run, the host record), docs/benchmarks/
verbs-HOST.svg (the plot) and HOST's section of docs/benchmarks.md, where HOST names the CPU,
its ISA and core count. Figures of different hosts are kept apart and never divided.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench as mb  # noqa: E402  (the data builders and the measurement)
import fp8_merge_bench as fp8  # noqa: E402  (the FP8 base and its adapter)

REPO = mb.REPO
DOCS = REPO / "docs" / "benchmarks.md"
OUT = REPO / "docs" / "benchmarks"
MARK = "<!-- verbs-bench host={} {} -->"

# ---------------------------------------------------------------------------------------------
# data


def llama(work, case):
    d = mb.ensure_case(work, case)
    return {"input": d / "base", "adapter": d / "adapter"}


MOE = dict(
    hidden_size=1024,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=32000,
    tie_word_embeddings=False,
)


def built(d, make):
    """`make(d)` once; a `.complete` marker says it finished."""
    if (d / ".complete").exists():
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    mb.log(f"building {d}")
    make(d)
    subprocess.run(["sync"], check=True)
    (d / ".complete").write_text(datetime.datetime.now().isoformat() + "\n")


def moe(work, peftkit):
    """A Mixtral-shaped MoE saved by transformers (original layout), and its v5 remap."""

    def make(d):
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM

        torch.manual_seed(0)
        model = MixtralForCausalLM(MixtralConfig(**MOE)).to(torch.bfloat16)
        model.save_pretrained(d / "original", max_shard_size="300MB")
        subprocess.run(
            [str(peftkit), "remap", str(d / "original"), "--out", str(d / "v5"), "--to", "transformers-v5",
             "--max-shard-size", "300MB"],
            check=True,
        )

    d = work / "moe"
    built(d, make)
    return {"original": d / "original", "v5": d / "v5"}


def peft_state_dict(work):
    """The 1 GB Llama wrapped by peft with its LoRA: `PeftModel.state_dict()` in one file."""
    src = llama(work, "1gb")

    def make(d):
        import torch
        from peft import PeftModel
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src["input"], dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, src["adapter"])
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        shutil.copy2(src["input"] / "config.json", d / "config.json")

    d = work / "peft-state-dict"
    built(d, make)
    return {"input": d}


def bin_checkpoint(work):
    """The 1 GB Llama as a `.bin` checkpoint: `torch.save(state_dict)` in `pytorch_model.bin`."""
    src = llama(work, "1gb")

    def make(d):
        import torch
        from safetensors.torch import load_file

        state = {}
        for f in sorted(src["input"].glob("*.safetensors")):
            state.update(load_file(f))
        torch.save(state, d / "pytorch_model.bin")
        for f in ("config.json", "generation_config.json"):
            if (src["input"] / f).exists():
                shutil.copy2(src["input"] / f, d / f)

    d = work / "bin-1gb"
    built(d, make)
    return {"input": d}


def dora_adapter(work):
    """The 1 GB Llama and an r=16 all-linear DoRA made by peft (`use_dora=True`): its A and B
    seeded as the LoRA's are, and its magnitudes (peft's weight norms) scaled by seeded values
    near 1, so that every factor moves the weights."""
    src = llama(work, "1gb")

    def make(d):
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src["input"], dtype=torch.bfloat16)
        config = mb.lora_config(src["input"], "all-linear")
        config.use_dora = True
        pm = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.data.mul_(1.0 + 0.01 * torch.randn(p.shape, generator=mb.seeded(name)))
                elif "lora_" in name:
                    mb.fill_lora(name, p.data)
        pm.save_pretrained(d)

    d = work / "dora-1gb"
    built(d, make)
    return {"input": src["input"], "adapter": d}


# bitsandbytes settings of the quantized bases: NF4 with double quantization (QLoRA's), int8.
BNB = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def bnb_model(work, kind):
    """The 1 GB Llama quantized by transformers + bitsandbytes on the CPU (`BNB[kind]`), and
    its LoRA."""
    src = llama(work, "1gb")

    def make(d):
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(**BNB[kind], bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(
            src["input"], quantization_config=q, dtype=torch.bfloat16, device_map="cpu")
        model.save_pretrained(d)

    d = work / f"bnb-{kind}-1gb"
    built(d, make)
    return {"input": d, "adapter": src["adapter"]}


def fp8_model(work):
    d = fp8.ensure_data(work, fp8.MODEL["num_hidden_layers"])
    return {"input": d / "base", "adapter": d / "adapter"}


# ---------------------------------------------------------------------------------------------
# cases: data, command, whether the verb has --no-fsync


def merge_cmd(p, i, o, synced):
    return [str(p), "merge", "--base", str(i["input"]), "--adapter", str(i["adapter"]), "--out", str(o)] + (
        [] if synced else ["--no-fsync"]
    )


CASES = {
    "merge-1gb": dict(data=lambda w, p: llama(w, "1gb"), cmd=merge_cmd, no_fsync=True, arith=True, size="1gb",
                      whole_direct=True),
    "merge-7b": dict(data=lambda w, p: llama(w, "7b"), cmd=merge_cmd, no_fsync=True, arith=True, size="7b"),
    "merge-dora": dict(data=lambda w, p: dora_adapter(w), cmd=merge_cmd, no_fsync=True, arith=True, size="1gb"),
    "merge-safe": dict(
        data=lambda w, p: llama(w, "1gb"),
        cmd=lambda p, i, o, s: merge_cmd(p, i, o, s) + ["--safe-merge"],
        no_fsync=True,
        arith=True,
        size="1gb",
    ),
    "reshard": dict(
        data=lambda w, p: llama(w, "1gb"),
        cmd=lambda p, i, o, s: [str(p), "reshard", str(i["input"]), "--out", str(o), "--max-shard-size", "200MB"]
        + ([] if s else ["--no-fsync"]),
        no_fsync=True,
        size="1gb",
    ),
    "remap-v5": dict(
        data=lambda w, p: {"input": moe(w, p)["original"]},
        cmd=lambda p, i, o, s: [str(p), "remap", str(i["input"]), "--out", str(o), "--to", "transformers-v5",
                                "--max-shard-size", "300MB"] + ([] if s else ["--no-fsync"]),
        no_fsync=True,
        size="1gb",
    ),
    "remap-original": dict(
        data=lambda w, p: {"input": moe(w, p)["v5"]},
        cmd=lambda p, i, o, s: [str(p), "remap", str(i["input"]), "--out", str(o), "--to", "original",
                                "--max-shard-size", "300MB"] + ([] if s else ["--no-fsync"]),
        no_fsync=True,
        size="1gb",
    ),
    "extract": dict(
        data=lambda w, p: peft_state_dict(w),
        cmd=lambda p, i, o, s: [str(p), "extract", "--from", str(i["input"]), "--out", str(o / "adapter"),
                                "--lora-alpha", "32", "--base-out", str(o / "base")] + ([] if s else ["--no-fsync"]),
        no_fsync=True,
        size="1gb",
        out_is_parent=True,
    ),
    "convert": dict(
        data=lambda w, p: bin_checkpoint(w),
        cmd=lambda p, i, o, s: [str(p), "convert", str(i["input"]), "--out", str(o)] + ([] if s else ["--no-fsync"]),
        no_fsync=True,
        size="1gb",
    ),
    "merge-fp8": dict(data=lambda w, p: fp8_model(w), cmd=merge_cmd, no_fsync=True, arith=True, size="1gb"),
    "merge-fp8-dequantize": dict(
        data=lambda w, p: fp8_model(w),
        cmd=lambda p, i, o, s: merge_cmd(p, i, o, s) + ["--dequantize"],
        no_fsync=True,
        arith=True,
        size="1gb",
    ),
    # Merges into bitsandbytes bases: each merged weight is dequantized (and, format kept,
    # quantized again) on the CPU, so they are reported with no target.
    "merge-nf4": dict(data=lambda w, p: bnb_model(w, "nf4"), cmd=merge_cmd, no_fsync=True, size="1gb",
                      no_target=True),
    "merge-int8": dict(data=lambda w, p: bnb_model(w, "int8"), cmd=merge_cmd, no_fsync=True, size="1gb",
                       no_target=True),
    "merge-nf4-dequantize": dict(
        data=lambda w, p: bnb_model(w, "nf4"),
        cmd=lambda p, i, o, s: merge_cmd(p, i, o, s) + ["--dequantize"],
        no_fsync=True,
        size="1gb",
        no_target=True,
    ),
    # The 1 GB merge into the QLoRA round trip of its base (NF4, double quantization): every
    # merged weight quantized and dequantized on the CPU, so no target either.
    "merge-qlora": dict(
        data=lambda w, p: llama(w, "1gb"),
        cmd=lambda p, i, o, s: merge_cmd(p, i, o, s) + ["--qlora-base", "nf4", "--qlora-double-quant"],
        no_fsync=True,
        size="1gb",
        no_target=True,
    ),
}
QUICK = ["merge-1gb", "merge-dora", "merge-safe", "reshard", "remap-v5", "remap-original", "extract", "convert", "merge-fp8",
         "merge-fp8-dequantize", "merge-nf4", "merge-int8", "merge-nf4-dequantize", "merge-qlora"]
RSS_LIMIT_MIB = {"1gb": 64, "7b": 256}
# The label of a contender run with PEFTKIT_WHOLE_DIRECT=1 (see `contenders`).
WHOLE_DIRECT = "[whole direct]"

# ---------------------------------------------------------------------------------------------
# host


def host():
    info = {"cpu": "?", "vendor": "?", "family": "?", "model": "?", "flags": set()}
    for line in open("/proc/cpuinfo"):
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "model name" and info["cpu"] == "?":
            info["cpu"] = v
        elif k == "vendor_id":
            info["vendor"] = v
        elif k == "cpu family":
            info["family"] = v
        elif k == "model" and info["model"] == "?":
            info["model"] = v
        elif k == "flags" and not info["flags"]:
            info["flags"] = set(v.split())
    flags = info.pop("flags")
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        **info,
        "isa": isa,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
    }


def host_key(h):
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(h["vendor"], h["vendor"].lower())
    isa = "avx512" if "AVX-512" in h["isa"] else "avx2" if "AVX2" in h["isa"] else "sse"
    return f"{vendor}-f{h['family']}m{h['model']}-{isa}-{h['cores']}c"


def filesystem(path):
    r = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(path)], capture_output=True, text=True)
    return " on ".join(r.stdout.split()) or "?"


# ---------------------------------------------------------------------------------------------
# running


def contenders(name, case, peftkit, inputs, avx512):
    src = inputs["input"]
    c = {
        "cp -r": lambda o: ["cp", "-r", str(src), str(o)],
        "cp -r + sync": lambda o: ["sh", "-c", 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} +', "sh", str(src), str(o)],
    }

    def verb(synced, env=None):
        def make(o):
            cmd = case["cmd"](peftkit, inputs, o, synced)
            return (["env", *env] if env else []) + cmd
        return make

    c["peftkit"] = verb(True)
    if case["no_fsync"]:
        c["peftkit --no-fsync"] = verb(False)
    if case.get("whole_direct"):
        # The synced merge with each merged tensor written whole with O_DIRECT instead of in
        # blocks through the page cache, the earlier default: the choice was made on one host
        # (docs/architecture.md, "Output IO"); a comparison only, with no target.
        c[f"peftkit {WHOLE_DIRECT}"] = verb(True, ["PEFTKIT_WHOLE_DIRECT=1"])
    if case.get("arith") and avx512:
        c["peftkit [avx2]"] = verb(True, ["PEFTKIT_FORCE_ISA=avx2"])
        if case["no_fsync"]:
            c["peftkit --no-fsync [avx2]"] = verb(False, ["PEFTKIT_FORCE_ISA=avx2"])
    return c


def one_run(cmd_of, out, inputs, logdir, tag, settle, out_is_parent, prepare):
    if out.exists():
        shutil.rmtree(out)
    if out_is_parent:  # the verb writes several folders into `out`
        out.mkdir()
    if prepare:
        subprocess.run(["sync"], check=True)
    mb.warm(*[p for p in inputs.values() if isinstance(p, Path)])
    if prepare:
        mb.pretouch(2 * mb.dir_bytes(inputs["input"]) + (1 << 30), settle)
    res = mb.measure(cmd_of(out), str(logdir / tag))
    shutil.rmtree(out, ignore_errors=True)
    return res


def run_case(name, case, peftkit, work, rounds, settle, avx512, prepare):
    inputs = case["data"](work, peftkit)
    cands = contenders(name, case, peftkit, inputs, avx512)
    out = work / f"out-{name}"
    logdir = work / "logs" / name
    logdir.mkdir(parents=True, exist_ok=True)
    runs = {k: [] for k in cands}
    order = list(cands)
    for r in range(rounds + 1):  # round 0: warm-up, discarded
        for j in range(len(order)):
            k = order[(j + r) % len(order)]
            res = one_run(cands[k], out, inputs, logdir, f"{r}-{j}", settle, case.get("out_is_parent"), prepare)
            if res["exit"] != 0:
                raise SystemExit(f"[{name}] {k} failed:\n{res.get('stderr_tail', '')}")
            if r:
                runs[k].append(res)
        mb.log(f"[{name}] round {r}/{rounds}" + (" (warm-up)" if r == 0 else ""))
    return {k: summary(v) for k, v in runs.items()}, str(filesystem(work))


def summary(runs):
    walls = sorted(r["wall_s"] for r in runs)
    return {
        "fastest_s": walls[0],
        "median_s": statistics.median(walls),
        "slowest_s": walls[-1],
        "user_s": statistics.median(r["user_s"] for r in runs),
        "sys_s": statistics.median(r["sys_s"] for r in runs),
        "peak_rss_mib": max(r["vmhwm_kib"] for r in runs) / 1024,
        "walls_s": [r["wall_s"] for r in runs],
    }


# ---------------------------------------------------------------------------------------------
# targets and reporting


def ratio(s, a, b):
    return {m: s[a][m] / s[b][m] for m in ("fastest_s", "median_s")}


def targets(name, case, s):
    rows = []
    if case.get("no_target"):
        return rows

    def check(what, r, limit):
        f, m = r["fastest_s"], r["median_s"]
        verdict = "yes" if f <= limit and m <= limit else "fastest only" if f <= limit else "no"
        rows.append({"target": what, "fastest": f, "median": m, "limit": limit, "met": verdict})

    for k in s:
        if not k.startswith("peftkit") or WHOLE_DIRECT in k:
            continue
        if "--no-fsync" in k:
            check(f"`{k}` ≤ 1.2× `cp -r`", ratio(s, k, "cp -r"), 1.2)
        else:
            check(f"`{k}` ≤ 1.0× `cp -r` + `sync`", ratio(s, k, "cp -r + sync"), 1.0)
            if name == "merge-7b":
                check(f"`{k}` ≤ 1.05× `cp -r`", ratio(s, k, "cp -r"), 1.05)
        lim = RSS_LIMIT_MIB[case["size"]]
        rss = s[k]["peak_rss_mib"] * 1.048576  # MiB → MB
        rows.append({"target": f"`{k}` peak RSS ≤ {lim} MB", "value": rss, "limit": lim,
                     "met": "yes" if rss <= lim else "no"})
    return rows


def section(key, rec):
    h = rec["host"]
    lines = [
        MARK.format(key, "begin"),
        f"### {h['cpu']} ({h['vendor']} family {h['family']} model {h['model']}; {', '.join(h['isa'])}), "
        f"{h['cores']} cores, {h['ram_gib']} GiB, kernel {h['kernel']}, {rec['filesystem']}",
        "",
    ]
    if rec.get("label"):
        lines += [f"**{rec['label']}**", ""]
    # This run's cases and their rounds (merge-7b runs fewer than the others).
    this_run = {n: c["rounds"] for n, c in rec["cases"].items()
                if (c.get("commit"), c.get("date"), c.get("command")) == (rec["commit"], rec["date"], rec["command"])}
    rounds = max(this_run.values(), default=rec["rounds"])
    fewer = ", ".join(f"{n}: {r}" for n, r in this_run.items() if r != rounds)
    lines += [
        f"{rec['date']}, peftkit {rec['commit'][:10]}, `{rec['command']}`: {rounds} interleaved rounds "
        + (f"({fewer}) " if fewer else "")
        + "after a warm-up; wall times fastest / median (slowest); CPU is the median user + sys. "
        f"Raw runs: [verbs-{key}.json](benchmarks/verbs-{key}.json).",
        "",
        f"![verbs on {key}](benchmarks/verbs-{key}.svg)",
        "",
    ]
    # A run of some cases keeps the others' earlier figures: say which, and from when.
    def when(c):
        if "commit" not in c:  # recorded before cases kept their own date and commit
            return f"{c['rounds']} rounds; date and commit in the git history of the raw runs"
        return f"{c['date']}, {c['commit'][:10]}, `{c['command']}`, {c['rounds']} rounds"

    older = [
        f"{name} ({when(c)})"
        for name, c in rec["cases"].items()
        if (c.get("commit"), c.get("date"), c.get("command")) != (rec["commit"], rec["date"], rec["command"])
    ]
    if older:
        lines += ["Kept from an earlier run: " + "; ".join(older) + ".", ""]
    lines += [
        "| case | contender | fastest | median (slowest) | vs `cp -r` fastest / median | CPU user + sys | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in rec["cases"].items():
        s = c["contenders"]
        for k, v in s.items():
            r = ratio(s, k, "cp -r")
            lines.append(
                f"| {name} | `{k}` | {v['fastest_s']:.2f} s | {v['median_s']:.2f} s ({v['slowest_s']:.2f}) | "
                f"{r['fastest_s']:.2f}× / {r['median_s']:.2f}× | {v['user_s']:.2f} + {v['sys_s']:.2f} s | "
                f"{v['peak_rss_mib']:.0f} MiB |"
            )
    lines += ["", "| case | target | fastest | median | met? |", "|---|---|---|---|---|"]
    for name, c in rec["cases"].items():
        for t in c["targets"]:
            if "value" in t:
                lines.append(f"| {name} | {t['target']} | {t['value']:.0f} MB | | {t['met']} |")
            else:
                lines.append(f"| {name} | {t['target']} | {t['fastest']:.2f}× | {t['median']:.2f}× | {t['met']} |")
    lines += ["", MARK.format(key, "end")]
    return "\n".join(lines)


def update_doc(key, rec):
    text = DOCS.read_text()
    block = section(key, rec)
    begin, end = MARK.format(key, "begin"), MARK.format(key, "end")
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        head = "## Every streaming verb, per host (`benches/run_all.sh`)"
        if head not in text:
            raise SystemExit(f"{DOCS} has no '{head}' section to put the results in")
        a = text.index(head)
        nxt = text.find("\n## ", a + len(head))
        at = len(text) if nxt < 0 else nxt
        text = text[:at].rstrip("\n") + "\n\n" + block + "\n" + text[at:]
    DOCS.write_text(text)


def plot_svg(key, rec, path):
    """Bars of each contender's median with its fastest run as a tick, normalised to the case's
    `cp -r` median, one group per case (stdlib only: no plotting package needed)."""
    cases = list(rec["cases"])
    names = []
    for c in rec["cases"].values():
        names += [k for k in c["contenders"] if k not in names]
    colors = ["#9e9e9e", "#616161", "#1f77b4", "#7fb8e0", "#2ca02c", "#98df8a"]
    W, H, left, top, bottom = 900, 380, 60, 30, 70
    gw = (W - left - 20) / max(len(cases), 1)
    bw = gw * 0.8 / max(len(names), 1)
    ymax = max(
        [c["contenders"][k]["median_s"] / c["contenders"]["cp -r"]["median_s"] for c in rec["cases"].values()
         for k in c["contenders"]] + [1.3]
    ) * 1.1

    def y(v):
        return top + (H - top - bottom) * (1 - v / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16" font-size="13">{key}: wall time / median of cp -r (bar: median, tick: fastest)</text>']
    for v in (1.0, 1.2):
        out.append(f'<line x1="{left}" x2="{W - 20}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#d62728" '
                   f'stroke-dasharray="4 3"/><text x="{left - 5}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}×</text>')
    for i, name in enumerate(cases):
        c = rec["cases"][name]["contenders"]
        cp = c["cp -r"]["median_s"]
        for j, k in enumerate(names):
            if k not in c:
                continue
            x = left + i * gw + gw * 0.1 + j * bw
            m, f = c[k]["median_s"] / cp, c[k]["fastest_s"] / cp
            out.append(f'<rect x="{x:.1f}" y="{y(m):.1f}" width="{bw * 0.9:.1f}" height="{y(0) - y(m):.1f}" '
                       f'fill="{colors[j % len(colors)]}"/>')
            out.append(f'<line x1="{x:.1f}" x2="{x + bw * 0.9:.1f}" y1="{y(f):.1f}" y2="{y(f):.1f}" stroke="black"/>')
        out.append(f'<text x="{left + i * gw + gw / 2:.1f}" y="{H - bottom + 15}" text-anchor="middle">{name}</text>')
    for j, k in enumerate(names):
        x = left + (j % 3) * 280
        yy = H - 30 + (j // 3) * 14
        out.append(f'<rect x="{x}" y="{yy - 9}" width="10" height="10" fill="{colors[j % len(colors)]}"/>'
                   f'<text x="{x + 14}" y="{yy}">{k}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/peftkit-bench"))
    ap.add_argument("--peftkit", type=Path, help="binary to time (default: cargo build --release, private copy)")
    ap.add_argument("--quick", action="store_true",
                    help="1 GB cases only, 3 rounds; no global sync, settle or pre-touch before each run")
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--rounds", type=int, help="timed rounds (default 7; 3 with --quick; 3 for merge-7b)")
    ap.add_argument("--settle", type=float, help="seconds to wait before each run (default 4; 0.5 with --quick)")
    ap.add_argument("--label", default="", help="a note printed above this host's tables")
    ap.add_argument("--clean", action="store_true", help="remove the work folder's data at the end")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only redraw the plot and the doc section of a results file, then exit")
    a = ap.parse_args()
    if a.render:
        rec = json.loads(a.render.read_text())
        key = a.render.stem.removeprefix("verbs-")
        plot_svg(key, rec, a.render.with_suffix(".svg"))
        update_doc(key, rec)
        return
    if REPO in a.work.resolve().parents or a.work.resolve() == REPO:
        raise SystemExit("--work must be outside the repository")
    a.work.mkdir(parents=True, exist_ok=True)
    names = a.cases.split(",") if a.cases else QUICK if a.quick else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    settle = a.settle if a.settle is not None else 0.5 if a.quick else mb.SETTLE_S
    peftkit = a.peftkit or mb.build_peftkit(a.work)
    h = host()
    key = host_key(h)
    avx512 = "AVX-512" in h["isa"]
    json_path = OUT / f"verbs-{key}.json"
    rec = json.loads(json_path.read_text()) if json_path.exists() else {"cases": {}}
    rec.update(
        host=h, filesystem=filesystem(a.work), label=a.label, commit=mb.git_state()["head"],
        date=datetime.date.today().isoformat(),
        command="benches/run_all.sh" + (" --quick" if a.quick else ""),
    )
    for name in names:
        case = CASES[name]
        if name == "merge-7b":
            free = shutil.disk_usage(a.work).free
            if not (a.work / "7b" / ".complete").exists() and free < 45e9 or free < 30e9:
                mb.log(f"[{name}] skipped: {free / 1e9:.0f} GB free under {a.work}, needs about 30 GB (45 to build)")
                continue
        rounds = a.rounds or (3 if a.quick or name == "merge-7b" else 7)
        s, fs = run_case(name, case, peftkit, a.work, rounds, settle, avx512, not a.quick)
        rec["cases"][name] = {"contenders": s, "targets": targets(name, case, s), "rounds": rounds,
                              "commit": rec["commit"], "date": rec["date"], "command": rec["command"]}
        rec["rounds"] = rounds
        rec["filesystem"] = fs
        json_path.write_text(json.dumps(rec, indent=1) + "\n")
    plot_svg(key, rec, OUT / f"verbs-{key}.svg")
    update_doc(key, rec)
    print(section(key, rec))
    if a.clean:
        for sub in ("1gb", "7b", "moe", "peft-state-dict", "bin-1gb", f"fp8-{fp8.MODEL['num_hidden_layers']}l",
                    "bnb-nf4-1gb", "bnb-int8-1gb"):
            shutil.rmtree(a.work / sub, ignore_errors=True)


if __name__ == "__main__":
    main()
