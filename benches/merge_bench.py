#!/usr/bin/env python3
"""Merge benchmark: `peftkit merge` against `cp -r` of the base and peft's
`merge_and_unload()` + `save_pretrained()`, on a synthetic ~1 GB Llama and a 7B-shaped one.

Run with the pinned venv (see tests/interop/run.sh):

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 \\
        ~/.cache/peftkit/venv/bin/python benches/merge_bench.py --case all

What it does:

* builds the data once into `--work DIR` (default /tmp/peftkit-bench; never inside the repo) and
  reuses it on later runs (a case is rebuilt only if its `.complete` marker is missing):
  - `1gb`: a Llama (hidden 2048, intermediate 5632, 8 layers, 32 heads / 4 KV heads, vocab
    32000, untied, bf16; 0.97 GB) built and saved by the real transformers
    (`save_pretrained(max_shard_size="300MB")`), and an r=16 all-linear LoRA made by peft
    (`get_peft_model` + `save_pretrained`), its A and B set to seeded random values so that the
    merge changes every targeted weight;
  - `7b`: a Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 layers, vocab 32000,
    bf16, 13.5 GB) written shard by shard, tensor by tensor, without ever holding it in memory:
    the shard plan and index are transformers' own (`split_torch_state_dict_into_shards` on a
    meta-device model, 5 GB shards), `config.json` comes from `LlamaConfig.save_pretrained`, the
    shards are safetensors files streamed in 16 M-element chunks and checked with
    `safetensors.safe_open`; the r=16 all-linear adapter has exactly the keys and shapes of
    peft's `get_peft_model_state_dict` for that model (checked on a meta-device model), its
    tensors are written with `safetensors.torch.save_file` and its `adapter_config.json` by
    `LoraConfig(...).save_pretrained`;
* builds peftkit (`cargo build --release`, unless `--peftkit BIN` is given) and times a private
  copy of the binary, so that a rebuild of the repository during the run changes nothing;
  `--baseline BIN` adds another build (say, of an older commit) to the same interleaved rounds,
  so that two builds are compared like for like on one machine;
* times the contenders side by side in one run, interleaved, one discarded warm-up round then
  `--runs` rounds (median reported): `cp -r`, `cp -r` + `sync`, `peftkit merge`,
  `peftkit merge --no-fsync` (when the binary has it) and peft (on 7B only with `--peft-7b`,
  once, under a memory watchdog). Before every run the output folder is removed, `sync`
  flushes dirty pages, the base and adapter are read once (warm page cache), and after 4 s
  fresh memory is touched (see `pretouch`: this VM hands freed pages back to the host);
* measures wall time (fork to exit) and peak resident memory: VmHWM, i.e. `ru_maxrss` from
  `wait4` (what `/usr/bin/time -v` prints as "Maximum resident set size"); a poller reading
  /proc/<pid>/status every 5 ms also records the largest RssAnon and RssFile seen, since
  file-backed pages (mmap of the checkpoint) count in RSS;
* checks correctness: the peftkit- and peft-merged 1 GB checkpoints are compared tensor by
  tensor (differing bf16 elements, expected 0); on 7B, a few merged tensors are checked against
  torch's `W.float() + (B @ A) * s` rounded to bf16 (peft's formula);
* with `--profile`, splits peftkit's time into read+write, arithmetic and fsync (variants with
  `--no-fsync` and a 1-module adapter) and records perf's top symbols;
* prints a table, writes docs/benchmarks/merge.json (raw numbers) and docs/benchmarks/merge.png
  (results of cases not run this time are kept from the existing json).
"""
import argparse
import datetime
import filecmp
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_JSON = REPO / "docs" / "benchmarks" / "merge.json"
OUT_PNG = REPO / "docs" / "benchmarks" / "merge.png"

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32

CASES = {
    "1gb": dict(
        title="Llama 0.5B (1 GB)",
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_shard_size="300MB",
    ),
    "7b": dict(
        title="Llama-2-7B shape (13.5 GB)",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_shard_size="5GB",
    ),
}
CONFIG_KEYS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
]

# Run by the peft contender in a fresh interpreter: argv = base adapter out max_shard_size.
PEFT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
t1 = time.perf_counter()
base, adapter, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
t2 = time.perf_counter()
merged = model.merge_and_unload()
t3 = time.perf_counter()
merged.save_pretrained(out, max_shard_size=shard)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "merge": t3 - t2, "save": t4 - t3}))
"""


def log(*a):
    print(*a, flush=True)


def mib(kb):
    return kb / 1024.0


def dir_bytes(d):
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def torch_imports():
    import torch  # noqa: F401

    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def llama_config(case):
    from transformers import LlamaConfig

    spec = CASES[case]
    return LlamaConfig(
        **{k: spec[k] for k in CONFIG_KEYS},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def lora_config(base_dir, target_modules):
    from peft import LoraConfig

    return LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=target_modules,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir),
    )


def seeded(name, seed=0):
    torch = torch_imports()
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h & ((1 << 63) - 1))


def fill_lora(name, t):
    """Seeded values for a LoRA factor: A ~ U(±1/sqrt(in)) (kaiming-like), B ~ N(0, 0.01)."""
    g = seeded(name)
    if ".lora_A." in name:
        bound = 1.0 / (t.shape[1] ** 0.5)
        t.uniform_(-bound, bound, generator=g)
    else:
        t.normal_(0.0, 0.01, generator=g)


# ---------------------------------------------------------------------------------------------
# data


def build_1gb(d):
    """The 1 GB case, entirely with the real transformers and peft."""
    torch = torch_imports()
    from transformers import LlamaForCausalLM
    from peft import get_peft_model

    base, adapter = d / "base", d / "adapter"
    torch.manual_seed(0)
    cfg = llama_config("1gb")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.config._name_or_path = str(base)
    model.name_or_path = str(base)
    t = time.perf_counter()
    model.save_pretrained(base, max_shard_size=CASES["1gb"]["max_shard_size"])
    log(f"  base saved by transformers in {time.perf_counter() - t:.1f} s: {dir_bytes(base) / 1e9:.3f} GB")
    pm = get_peft_model(model, lora_config(base, "all-linear"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                fill_lora(name, p.data)
    pm.save_pretrained(adapter)
    log(f"  adapter saved by peft: {dir_bytes(adapter) / 1e6:.1f} MB")


def safetensors_header(entries, metadata):
    """Header bytes of a safetensors file holding `entries` [(name, dtype, shape, nbytes)] in
    that order, padded with spaces to 8 bytes as the safetensors library does."""
    header = {"__metadata__": metadata}
    off = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h


def build_7b(d):
    """The 7B case, streamed: never more than one 16 M-element chunk of the base in memory."""
    torch = torch_imports()
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaForCausalLM
    from peft import get_peft_model, get_peft_model_state_dict

    base, adapter = d / "base", d / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    cfg = llama_config("7b")
    cfg._name_or_path = str(base)
    cfg.architectures = ["LlamaForCausalLM"]  # what model.save_pretrained records
    cfg.save_pretrained(base)
    GenerationConfig.from_model_config(cfg).save_pretrained(base)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg).to(torch.bfloat16)
    sd = meta.state_dict()
    split = split_torch_state_dict_into_shards(
        sd, filename_pattern="model{suffix}.safetensors", max_shard_size=CASES["7b"]["max_shard_size"]
    )
    chunk = 1 << 24
    t0 = time.perf_counter()
    for fname, names in split.filename_to_tensors.items():
        # safetensors orders a file's tensors by dtype alignment, then by name; all are BF16 here
        entries = [(n, "BF16", tuple(sd[n].shape), sd[n].numel() * 2) for n in sorted(names)]
        path = base / fname
        with open(path, "wb") as f:
            f.write(safetensors_header(entries, {"format": "pt"}))
            for name, _, shape, _ in entries:
                g, numel = seeded(name), sd[name].numel()
                std = 1.0 if "norm" in name else 0.02
                for start in range(0, numel, chunk):
                    n = min(chunk, numel - start)
                    if "norm" in name:
                        x = torch.ones(n, dtype=torch.bfloat16)
                    else:
                        x = torch.empty(n, dtype=torch.bfloat16).normal_(0.0, std, generator=g)
                    f.write(x.view(torch.int16).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        with safe_open(str(path), framework="pt") as f:  # the safetensors library accepts it
            assert sorted(f.keys()) == sorted(names), path
            for n in names:
                assert tuple(f.get_slice(n).get_shape()) == tuple(sd[n].shape), n
        log(f"  {fname}: {path.stat().st_size / 1e9:.2f} GB, {len(names)} tensors ({time.perf_counter() - t0:.0f} s)")
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": meta.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # adapter: config by peft's LoraConfig, tensors with peft's names and shapes
    lora_config(base, list(LINEAR)).save_pretrained(adapter)
    pm = get_peft_model(meta, lora_config(base, list(LINEAR)))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()}
    tensors = {}
    for name, shape in want.items():
        t = torch.empty(shape, dtype=torch.float32)
        fill_lora(name, t)
        tensors[name] = t
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    n_params = sum(t.numel() for t in tensors.values())
    log(f"  adapter: {len(tensors)} tensors, {n_params * 4 / 1e6:.0f} MB (keys/shapes = peft's state dict)")


def ensure_case(work, case):
    d = work / case
    marker = d / ".complete"
    if marker.exists():
        log(f"[{case}] data cached in {d}")
        return d
    log(f"[{case}] building data in {d}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t = time.perf_counter()
    (build_1gb if case == "1gb" else build_7b)(d)
    subprocess.run(["sync"], check=True)
    marker.write_text(datetime.datetime.now().isoformat() + "\n")
    log(f"[{case}] built in {time.perf_counter() - t:.0f} s")
    return d


# ---------------------------------------------------------------------------------------------
# measurement


def read_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def child_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def measure(cmd, log_prefix, kill_above_kb=None):
    """Runs `cmd` under `/usr/bin/time`; returns wall seconds, its "Maximum resident set size"
    (ru_maxrss = VmHWM of the command) and the RSS split polled from /proc (all KiB).

    The command is started by the small `time` process rather than by this (large) Python
    process: Linux carries the pre-exec hiwater mark of the forking process into the child's
    ru_maxrss, which would report this harness's own RSS."""
    stdout_path = Path(log_prefix + ".stdout")
    stderr_path = Path(log_prefix + ".stderr")
    time_path = Path(log_prefix + ".time")
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "killed": False}
    done = threading.Event()
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M %U %S %R", "-o", str(time_path), *cmd], stdout=so, stderr=se)

        def poll():
            child = None
            while not done.is_set():
                child = child or child_of(p.pid)
                if child:
                    s = read_status(child)
                    for k in ("RssAnon", "RssFile", "VmHWM"):
                        if k in s:
                            peak[k] = max(peak[k], s[k])
                    # anonymous memory only: file-backed pages (the mmap'd base) can be reclaimed
                    if kill_above_kb and (
                        s.get("RssAnon", 0) > kill_above_kb or meminfo("MemAvailable") < (768 << 20)
                    ):
                        peak["killed"] = True
                        os.kill(child, 9)
                time.sleep(0.005)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        p.wait()
        wall = time.perf_counter() - t0
        done.set()
        th.join()
    fields = time_path.read_text().split()[-4:]
    res = {
        "wall_s": wall,
        "vmhwm_kib": int(fields[0]),
        "polled_vmhwm_kib": peak["VmHWM"],
        "polled_max_rss_anon_kib": peak["RssAnon"],
        "polled_max_rss_file_kib": peak["RssFile"],
        "user_s": float(fields[1]),
        "sys_s": float(fields[2]),
        "minor_page_faults": int(fields[3]),
        "exit": p.returncode,
    }
    if peak["killed"]:
        res["killed_by_watchdog"] = True
    res["stdout"] = stdout_path.read_text(errors="replace").strip()
    if p.returncode != 0:
        res["stderr_tail"] = stderr_path.read_text(errors="replace")[-2000:]
    return res


def warm(*dirs):
    n = 0
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while True:
                        b = f.read(8 << 20)
                        if not b:
                            break
                        n += len(b)
    return n


def meminfo(key):
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


SETTLE_S = 4.0
PRETOUCH = "import numpy as np, sys; a = np.empty(int(sys.argv[1]), np.uint8); a[::4096] = 1"


def pretouch(nbytes, settle_s):
    """Touches `nbytes` of anonymous memory in a helper process that exits at once.

    This VM returns free pages to the hypervisor (virtio-balloon free page reporting, about 2 s
    after they are freed); the next first touch of such a page is a host page fault, which
    made writing 1 GB into the page cache take 2-3 s instead of 0.25 s, at random. Waiting
    `settle_s` first lets a report armed by the previous run's frees (peft frees 2 GB) finish,
    then touching the memory right before the run hands every contender pages the host has
    backed, as on bare metal. Capped to the free memory so that it never evicts the warm base
    from the cache."""
    time.sleep(settle_s)
    n = min(nbytes, meminfo("MemFree") - (512 << 20))
    if n > 0:
        subprocess.run([sys.executable, "-c", PRETOUCH, str(n)], check=True)
    return max(n, 0)


def rmtree(p):
    shutil.rmtree(p, ignore_errors=True)


def contenders(case, d, peftkit, with_peft, no_fsync, baseline=None):
    base, adapter = d / "base", d / "adapter"
    out = {}
    out["cp -r"] = lambda o: ["cp", "-r", str(base), str(o)]
    out["cp -r + sync"] = lambda o: ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "sh", str(base), str(o)]
    out["peftkit merge"] = lambda o: [
        str(peftkit), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(o), "--json"
    ]
    if no_fsync:  # no sync to disk, as cp -r and transformers' save_pretrained
        out["peftkit merge --no-fsync"] = lambda o: [
            str(peftkit), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(o), "--no-fsync"
        ]
    if baseline:  # another build of peftkit, timed in the same interleaved rounds
        out["baseline merge"] = lambda o: [
            str(baseline), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(o), "--json"
        ]
        out["baseline merge --no-fsync"] = lambda o: [
            str(baseline), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(o), "--no-fsync"
        ]
    if with_peft:
        out["peft merge_and_unload"] = lambda o: [
            sys.executable, "-c", PEFT_CHILD, str(base), str(adapter), str(o), CASES[case]["max_shard_size"]
        ]
    return out


def out_dir(d, name):
    return d / ("out-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))


def run_case(case, d, cands, runs, warmup, peft_runs, kill_above_kb, pretouch_bytes):
    base, adapter = d / "base", d / "adapter"
    logs = d / "logs"
    logs.mkdir(exist_ok=True)
    results = {name: [] for name in cands}
    warmups = {name: [] for name in cands}
    log(f"[{case}] warming the page cache: {warm(base, adapter) / 1e9:.2f} GB read")
    for i in range(-warmup, runs):
        for name, mk in cands.items():
            is_peft = name.startswith("peft ")
            n_runs = peft_runs if is_peft else runs
            if i >= n_runs or (i < 0 and is_peft and peft_runs < runs):
                continue
            o = out_dir(d, name)
            rmtree(o)
            subprocess.run(["sync"], check=True)
            warm(base, adapter)
            if pretouch_bytes:
                pretouch(pretouch_bytes, SETTLE_S)
            tag = f"warmup{-i}" if i < 0 else str(i + 1)
            r = measure(mk(o), str(logs / f"{name.replace(' ', '_')}.{tag}"), kill_above_kb if is_peft else None)
            (warmups if i < 0 else results)[name].append(r)
            extra = ""
            if r["exit"] != 0:
                extra = f"  FAILED (exit {r['exit']}): {r.get('stderr_tail', '')[-300:]}"
            log(
                f"  {'warm-up' if i < 0 else f'run {i + 1}':7s} {name:22s} {r['wall_s']:8.2f} s"
                f"   VmHWM {mib(r['vmhwm_kib']):8.1f} MiB   (anon {mib(r['polled_max_rss_anon_kib']):.0f},"
                f" file {mib(r['polled_max_rss_file_kib']):.0f}){extra}"
            )
            keep = name in ("peftkit merge", "peft merge_and_unload") and i == n_runs - 1
            if not keep or r["exit"] != 0:
                rmtree(o)
    summary = {}
    for name, rs in results.items():
        ok = [r for r in rs if r["exit"] == 0]
        if not ok:
            summary[name] = {"runs": rs, "failed": True}
            continue
        summary[name] = {
            "runs": rs,
            "warmup_runs": warmups[name],
            "median_wall_s": statistics.median(r["wall_s"] for r in ok),
            "median_vmhwm_mib": statistics.median(mib(r["vmhwm_kib"]) for r in ok),
            "max_vmhwm_mib": max(mib(r["vmhwm_kib"]) for r in ok),
            "median_rss_anon_mib": statistics.median(mib(r["polled_max_rss_anon_kib"]) for r in ok),
            "median_rss_file_mib": statistics.median(mib(r["polled_max_rss_file_kib"]) for r in ok),
            "median_cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in ok),
            "median_user_s": statistics.median(r["user_s"] for r in ok),
            "median_sys_s": statistics.median(r["sys_s"] for r in ok),
        }
        if name.startswith("peft ") and ok[0]["stdout"]:
            try:
                phases = [json.loads(r["stdout"].splitlines()[-1]) for r in ok]
                summary[name]["median_phases_s"] = {
                    k: statistics.median(p[k] for p in phases) for k in phases[0]
                }
            except (ValueError, IndexError):
                pass
        if name == "peftkit merge":
            try:
                summary[name]["summary"] = json.loads(ok[-1]["stdout"])
            except ValueError:
                pass
    return summary


# ---------------------------------------------------------------------------------------------
# profile


NOFSYNC_C = "int fsync(int fd) { (void)fd; return 0; }\nint fdatasync(int fd) { (void)fd; return 0; }\n"


def profile(case, d, peftkit, runs, warmup, pretouch_bytes, no_fsync_flag):
    """Splits peftkit's wall time into phases with variants of the same merge:

    * fsync disabled (`--no-fsync`, or on older builds an LD_PRELOAD shim making
      fsync/fdatasync no-ops) -> fsync cost;
    * a 1-module adapter (layers.0 q_proj only): the same read + write + fsync of the whole
      checkpoint with (almost) no merge arithmetic -> I/O cost; with fsync disabled -> read+write;
    * `perf record` of the full merge, when perf is available -> where the CPU time goes."""
    import torch  # noqa: F401
    from safetensors.torch import load_file, save_file

    prof = d / "profile"
    prof.mkdir(exist_ok=True)
    one = prof / "adapter-one-module"
    if not (one / "adapter_model.safetensors").exists():
        one.mkdir(exist_ok=True)
        sd = load_file(str(d / "adapter" / "adapter_model.safetensors"))
        keep = {k: v for k, v in sd.items() if ".layers.0.self_attn.q_proj." in k}
        shutil.copy(d / "adapter" / "adapter_config.json", one / "adapter_config.json")
        save_file(keep, str(one / "adapter_model.safetensors"), metadata={"format": "pt"})
    shim = prof / "nofsync.so"
    if not no_fsync_flag and not shim.exists() and shutil.which("cc"):
        (prof / "nofsync.c").write_text(NOFSYNC_C)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(prof / "nofsync.c")], check=True)
    base = d / "base"

    def pk(adapter, nofsync):
        def mk(o):
            cmd = [str(peftkit), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(o)]
            if nofsync and no_fsync_flag:
                return cmd + ["--no-fsync"]
            return (["env", f"LD_PRELOAD={shim}"] if nofsync else []) + cmd

        return mk

    cands = {
        "cp -r": lambda o: ["cp", "-r", str(base), str(o)],
        "cp -r + sync": lambda o: ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "sh", str(base), str(o)],
        "peftkit merge": pk(d / "adapter", False),
        "peftkit 1-module": pk(one, False),
    }
    if no_fsync_flag or shim.exists():
        cands["peftkit no-fsync"] = pk(d / "adapter", True)
        cands["peftkit 1-module,no-fsync"] = pk(one, True)
    log(f"[{case}] profile: peftkit variants")
    s = run_case(case, d, cands, runs, warmup, 0, None, pretouch_bytes)
    for name in list(s):
        for r in s[name]["runs"] + s[name]["warmup_runs"]:
            r.pop("stdout", None)
    med = {k: v["median_wall_s"] for k, v in s.items() if not v.get("failed")}
    out = {"variants": s}
    if "peftkit no-fsync" in med:
        full, nof, one_nof = med["peftkit merge"], med["peftkit no-fsync"], med["peftkit 1-module,no-fsync"]
        out["phases_s"] = {
            "read + write (1-module adapter, no fsync)": one_nof,
            "merge arithmetic, not overlapped (full - 1-module, both without fsync)": nof - one_nof,
            "fsync (full - full without fsync)": full - nof,
            "total": full,
        }
        log("  phases: " + ", ".join(f"{k}: {v:.2f} s" for k, v in out["phases_s"].items()))
    if shutil.which("perf"):
        o = prof / "out"
        rmtree(o)
        subprocess.run(["sync"], check=True)
        warm(base, d / "adapter")
        if pretouch_bytes:
            pretouch(pretouch_bytes, SETTLE_S)
        data = prof / "perf.data"
        r = subprocess.run(
            ["perf", "record", "-F", "2000", "-g", "-o", str(data), str(peftkit), "merge", "--base", str(base),
             "--adapter", str(d / "adapter"), "--out", str(o)],
            capture_output=True, text=True,
        )
        rmtree(o)
        if r.returncode == 0:
            rep = subprocess.run(
                ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "--stdio", "-g", "none"],
                capture_output=True, text=True,
            ).stdout
            top = []
            for line in rep.splitlines():
                parts = line.split()
                if parts and parts[0].endswith("%") and len(top) < 15:
                    while parts and parts[-1] == "-":
                        parts.pop()
                    top.append({"self": parts[0], "dso": parts[1], "symbol": " ".join(parts[3:])})
            out["perf_top_self"] = top
            log("  perf (self time): " + "; ".join(f"{t['self']} {t['symbol'][:60]}" for t in top[:6]))
    return out


# ---------------------------------------------------------------------------------------------
# correctness


def compare_checkpoints(a, b, base):
    """Tensor-by-tensor comparison of two checkpoints (and of `a` with the base)."""
    torch = torch_imports()
    from safetensors import safe_open

    def files(d):
        return sorted(p.name for p in Path(d).glob("*.safetensors"))

    def where(d):
        out = {}
        for f in files(d):
            with safe_open(str(Path(d) / f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    fa, fb = files(a), files(b)
    wa, wb, wz = where(a), where(b), where(base)
    res = {"same_files": fa == fb, "files": fa, "same_keys": sorted(wa) == sorted(wb)}
    diff_elems, total, diff_tensors, changed_vs_base = 0, 0, [], 0
    for f in fa:
        with safe_open(str(Path(a) / f), "pt") as x:
            for k in sorted(x.keys()):
                if k not in wb:
                    diff_tensors.append(k)
                    continue
                ta = x.get_tensor(k)
                with safe_open(str(Path(b) / wb[k]), "pt") as y:
                    tb = y.get_tensor(k)
                with safe_open(str(Path(base) / wz[k]), "pt") as z:
                    tz = z.get_tensor(k)
                if ta.dtype != tb.dtype or ta.shape != tb.shape:
                    diff_tensors.append(k)
                    continue
                n = int((ta.view(torch.int16) != tb.view(torch.int16)).sum()) if ta.dtype == torch.bfloat16 else int(
                    (ta != tb).sum()
                )
                total += ta.numel()
                if n:
                    diff_elems += n
                    diff_tensors.append(k)
                if not torch.equal(ta.view(torch.int16), tz.view(torch.int16)):
                    changed_vs_base += 1
    res.update(
        elements_compared=total,
        differing_elements=diff_elems,
        differing_tensors=diff_tensors[:20],
        tensors_changed_vs_base=changed_vs_base,
        byte_identical_files=all(filecmp.cmp(Path(a) / f, Path(b) / f, shallow=False) for f in fa if f in fb),
    )
    idx = "model.safetensors.index.json"
    if (Path(a) / idx).exists() and (Path(b) / idx).exists():
        ja, jb = json.loads((Path(a) / idx).read_text()), json.loads((Path(b) / idx).read_text())
        res["same_weight_map"] = ja["weight_map"] == jb["weight_map"]
    return res


def spot_check(merged, base, adapter, modules):
    """Merged tensors against torch: bf16(W.float() + (B @ A) * (alpha / r)), peft's formula."""
    torch = torch_imports()
    from safetensors import safe_open

    index = json.loads((Path(base) / "model.safetensors.index.json").read_text())["weight_map"]
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    out = {}
    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as ad:
        for m in modules:
            key = m + ".weight"
            with safe_open(str(Path(base) / index[key]), "pt") as fb, safe_open(
                str(Path(merged) / index[key]), "pt"
            ) as fm:
                w, got = fb.get_tensor(key), fm.get_tensor(key)
            a = ad.get_tensor(f"base_model.model.{m}.lora_A.weight")
            b = ad.get_tensor(f"base_model.model.{m}.lora_B.weight")
            want = (w.float() + (b @ a) * s).to(torch.bfloat16)
            out[key] = {
                "elements": w.numel(),
                "differing_elements": int((want.view(torch.int16) != got.view(torch.int16)).sum()),
                "changed_vs_base": int((w.view(torch.int16) != got.view(torch.int16)).sum()),
            }
    return out


# ---------------------------------------------------------------------------------------------
# report


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1])
    fs = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", "/tmp"], capture_output=True, text=True).stdout.strip()
    import torch
    import transformers
    import peft
    import safetensors

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "filesystem": fs,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def targets(case, s):
    """The issue's targets, for `peftkit merge` (default: synced) and `--no-fsync`."""
    out = {}
    cp = s["cp -r"]["median_wall_s"]
    pe = s.get("peft merge_and_unload", {})
    for name, tag in (("peftkit merge", ""), ("peftkit merge --no-fsync", "no_fsync_")):
        pk = s.get(name)
        if not pk:
            continue
        if pk.get("failed"):
            out[tag + "failed"] = True
            continue
        out[tag + "wall_over_cp"] = pk["median_wall_s"] / cp
        if pe and not pe.get("failed"):
            out[tag + "peft_wall_over_peftkit"] = pe["median_wall_s"] / pk["median_wall_s"]
        if case == "1gb":
            out[tag + "wall_le_2x_cp"] = pk["median_wall_s"] <= 2 * cp
            if pe and not pe.get("failed"):
                out[tag + "ge_10x_faster_than_peft"] = out[tag + "peft_wall_over_peftkit"] >= 10
            out[tag + "peak_rss_le_256_mib"] = pk["max_vmhwm_mib"] <= 256
        else:
            out[tag + "peak_rss_lt_1_gib"] = pk["max_vmhwm_mib"] < 1024
    return out


def table(results):
    lines = [
        "| case | contender | wall time, median (min–max) | vs `cp -r` | CPU user + sys | peak RSS (VmHWM) | anon / file-backed |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, c in results["cases"].items():
        cp = c["contenders"].get("cp -r", {}).get("median_wall_s")
        for name, s in c["contenders"].items():
            if s.get("failed"):
                lines.append(f"| {case} | {name} | failed | | | | |")
                continue
            walls = [r["wall_s"] for r in s["runs"] if r["exit"] == 0]
            spread = f" ({min(walls):.2f}–{max(walls):.2f})" if len(walls) > 1 else " (1 run)"
            if s.get("carried_over"):
                spread += f" (earlier run, {s['carried_over'].get('date')})"
            ratio = f"{s['median_wall_s'] / cp:.2f}x" if cp else ""
            lines.append(
                f"| {case} | {name} | {s['median_wall_s']:.2f} s{spread} | {ratio} | "
                f"{s['median_user_s']:.2f} + {s['median_sys_s']:.2f} s | {s['median_vmhwm_mib']:.0f} MiB | {s['median_rss_anon_mib']:.0f} / {s['median_rss_file_mib']:.0f} MiB |"
            )
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results["cases"])
    names = ["cp -r", "cp -r + sync", "peftkit merge", "peftkit merge --no-fsync", "peft merge_and_unload"]
    colors = {
        "cp -r": "#9e9e9e",
        "cp -r + sync": "#616161",
        "peftkit merge": "#1f77b4",
        "peftkit merge --no-fsync": "#7fb8e0",
        "peft merge_and_unload": "#ff7f0e",
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / len(names)
    for ax, key, label, fmt in [
        (axes[0], "median_wall_s", "wall time, s (median, log scale)", "{:.2f}"),
        (axes[1], "median_vmhwm_mib", "peak RSS (VmHWM), MiB (log scale)", "{:.0f}"),
    ]:
        for j, name in enumerate(names):
            xs, ys, notes = [], [], []
            for i, case in enumerate(cases):
                s = results["cases"][case]["contenders"].get(name)
                if s and not s.get("failed"):
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(s[key])
                    notes.append("" if len(s["runs"]) > 1 else "\n(1 run)")
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, label=name, color=colors[name])
            for b, y, note in zip(bars, ys, notes):
                ax.annotate(
                    fmt.format(y) + note, (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7
                )
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 2.5)  # room for the labels
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c}: {results['cases'][c]['model']['title']}" for c in cases], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[1].axhline(256, color="#1f77b4", ls=":", lw=1, label="256 MiB (1gb target)")
    axes[1].axhline(1024, color="#1f77b4", ls="--", lw=1, label="1 GiB (7b target)")
    axes[1].legend(fontsize=8, loc="upper left")
    axes[0].legend(fontsize=8, loc="upper left")
    m = results["machine"]
    fig.suptitle(
        f"Merging a LoRA (r=16, all linear layers) into a bf16 Llama, warm page cache; "
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['filesystem']}; medians of "
        f"{max(c['protocol']['runs'] for c in results['cases'].values())} runs",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def build_peftkit(work):
    """`cargo build --release`, then a private copy of target/release/peftkit in the work dir,
    so that a rebuild of the repository during the run cannot change the binary under test."""
    log("cargo build --release")
    subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
    copy = work / "peftkit"
    shutil.copy2(REPO / "target" / "release" / "peftkit", copy)
    return copy


def git_state():
    def g(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {
        "head": g("rev-parse", "HEAD"),
        "sources_dirty": bool(g("status", "--porcelain", "--", "src", "crates", "Cargo.toml", "Cargo.lock")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/peftkit-bench"))
    ap.add_argument("--case", choices=["1gb", "7b", "all"], default="all")
    ap.add_argument("--runs", type=int, default=3, help="runs per contender (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds before the timed ones")
    ap.add_argument("--peftkit", type=Path, help="use this binary instead of `cargo build --release`")
    ap.add_argument(
        "--peft-7b",
        action="store_true",
        help="also run peft on 7B (once; ~14 GB RAM and 27 GB more disk; killed above --kill-above-gib)",
    )
    ap.add_argument(
        "--kill-above-gib",
        type=float,
        default=20.0,
        help="watchdog for the peft contender: killed above this anonymous RSS or below 768 MiB MemAvailable",
    )
    ap.add_argument(
        "--no-pretouch",
        action="store_true",
        help="do not touch fresh memory before each run (see `pretouch`; on this VM, runs then vary 2-10x)",
    )
    ap.add_argument("--profile", action="store_true", help="split peftkit's time into phases (variants + perf)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks/merge.{json,png}")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="another peftkit binary (e.g. built from an older commit), timed in the same rounds",
    )
    ap.add_argument("--no-peft", action="store_true", help="leave out the peft contender")
    args = ap.parse_args()

    work = args.work.resolve()
    if work == REPO or REPO in work.parents:
        sys.exit(f"--work {work} is inside the repository; use a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    peftkit = args.peftkit.resolve() if args.peftkit else build_peftkit(work)
    no_fsync = "--no-fsync" in subprocess.run(
        [str(peftkit), "merge", "--help"], capture_output=True, text=True
    ).stdout
    cases = ["1gb", "7b"] if args.case == "all" else [args.case]

    results = {"cases": {}}
    if OUT_JSON.exists() and not args.no_write:
        try:
            results = json.loads(OUT_JSON.read_text())
        except ValueError:
            pass
    previous = json.loads(json.dumps(results))
    results["machine"] = machine()
    results["peftkit"] = {"binary": str(peftkit), **git_state()}
    results["date"] = datetime.date.today().isoformat()
    results["command"] = (
        "PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 ~/.cache/peftkit/venv/bin/python "
        "benches/merge_bench.py " + " ".join(sys.argv[1:])
    )
    results.setdefault("cases", {})

    for case in cases:
        d = ensure_case(work, case)
        with_peft = (case == "1gb" or args.peft_7b) and not args.no_peft
        pretouch_bytes = 0 if args.no_pretouch else 2 * dir_bytes(d / "base") + (1 << 30)
        s = run_case(
            case,
            d,
            contenders(case, d, peftkit, with_peft, no_fsync, args.baseline and args.baseline.resolve()),
            args.runs,
            args.warmup,
            args.runs if case == "1gb" else 1,
            int(args.kill_above_gib * 1024 * 1024),
            pretouch_bytes,
        )
        old_peft = previous.get("cases", {}).get(case, {}).get("contenders", {}).get("peft merge_and_unload")
        if not with_peft and old_peft and not old_peft.get("failed"):
            # peft on 7B takes ~14 GB and 90 s per run; its result does not depend on peftkit, so
            # a run without --peft-7b keeps the earlier measurement, labelled as such.
            s["peft merge_and_unload"] = {
                **old_peft,
                "carried_over": old_peft.get("carried_over")
                or {"date": previous.get("date"), "peftkit_head": previous.get("peftkit", {}).get("head")},
            }
        spec = CASES[case]
        c = {
            "model": {
                "title": spec["title"],
                **{k: spec[k] for k in CONFIG_KEYS},
                "dtype": "bfloat16",
                "tie_word_embeddings": False,
                "max_shard_size": spec["max_shard_size"],
                "base_bytes": dir_bytes(d / "base"),
                "adapter_bytes": dir_bytes(d / "adapter"),
                "lora": {"r": R, "lora_alpha": ALPHA, "target_modules": LINEAR},
            },
            "protocol": {
                "runs": args.runs,
                "warmup_rounds": args.warmup,
                "pretouch_bytes": pretouch_bytes,
                "order": list(s),
                "before_each_run": "rm -rf out; sync; read base+adapter; sleep 4 s; touch fresh memory (pretouch)"
                if pretouch_bytes
                else "rm -rf out; sync; read base+adapter",
            },
            "contenders": s,
            # Cases may be run at different commits (`--case`); each records its own.
            "peftkit_head": git_state().get("head"),
        }
        pk_out, pe_out = out_dir(d, "peftkit merge"), out_dir(d, "peft merge_and_unload")
        if pk_out.exists() and pe_out.exists():
            log(f"[{case}] comparing peftkit and peft outputs tensor by tensor")
            c["correctness"] = compare_checkpoints(pk_out, pe_out, d / "base")
            cc = c["correctness"]
            log(
                f"  {cc['elements_compared']} bf16 elements compared, {cc['differing_elements']} differ "
                f"({len(cc['differing_tensors'])} tensors); same files {cc['same_files']}, "
                f"same weight map {cc.get('same_weight_map')}, byte-identical files {cc['byte_identical_files']}; "
                f"{cc['tensors_changed_vs_base']} tensors changed vs base"
            )
            # peftkit keeps the base's layout; transformers re-saving a *loaded* model plans its
            # shards on the sorted state dict. With the same --max-shard-size the files match.
            resharded = d / "out-peftkit-resharded"
            rmtree(resharded)
            subprocess.run(
                [str(peftkit), "merge", "--base", str(d / "base"), "--adapter", str(d / "adapter"), "--out",
                 str(resharded), "--max-shard-size", spec["max_shard_size"]],
                check=True, stdout=subprocess.DEVNULL,
            )
            names = sorted(p.name for p in pe_out.iterdir())
            same = {n: (resharded / n).is_file() and filecmp.cmp(resharded / n, pe_out / n, shallow=False) for n in names}
            cc["resharded_byte_identical"] = {
                "command": f"peftkit merge ... --max-shard-size {spec['max_shard_size']}",
                "files": same,
                "all": all(same.values()) and sorted(p.name for p in resharded.iterdir()) == names,
            }
            log(f"  peftkit --max-shard-size {spec['max_shard_size']} vs peft, byte-identical files: {cc['resharded_byte_identical']['all']}")
            rmtree(resharded)
        if pk_out.exists() and case == "7b":
            mods = ["model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.31.self_attn.k_proj"]
            c["spot_check_vs_torch"] = spot_check(pk_out, d / "base", d / "adapter", mods)
            for k, v in c["spot_check_vs_torch"].items():
                log(f"  spot check {k}: {v['differing_elements']} of {v['elements']} elements differ from torch")
        if args.profile:
            c["profile"] = profile(case, d, peftkit, args.runs, args.warmup, pretouch_bytes, no_fsync)
        c["targets"] = targets(case, s)
        log(f"[{case}] targets: {json.dumps(c['targets'])}")
        for o in (pk_out, pe_out):
            rmtree(o)
        results["cases"][case] = c

    # keep the case order stable
    results["cases"] = {k: results["cases"][k] for k in ("1gb", "7b") if k in results["cases"]}
    print()
    print(table(results))
    if not args.no_write:
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps(results, indent=2) + "\n")
        plot(results, OUT_PNG)
        log(f"\nwrote {OUT_JSON.relative_to(REPO)} and {OUT_PNG.relative_to(REPO)}")


if __name__ == "__main__":
    main()
