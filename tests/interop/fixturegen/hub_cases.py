"""hub/ fixtures: pickle (`.bin`) weights as torch.save writes them, what transformers 5.24 and peft 0.21.2
save when they load them, and a Hugging Face cache laid out by huggingface_hub (tests/fixtures/hub/).

`generate(root)` deletes and rewrites `root/hub/`:

- `llama_tied/`: a tiny LlamaForCausalLM (tied embeddings; `q_proj.weight` holds NaNs with payloads and
  signs, infinities, subnormals and rounding ties, to pin torch's casts).
  - `source/`: its `config.json`/`generation_config.json` (save_pretrained) and `pytorch_model.bin`
    (`torch.save(model.state_dict())`: both tied names, one storage);
  - `expected/`, `expected_bf16/`, `expected_f16/`: `from_pretrained(source[, dtype=...]).save_pretrained(...)`.
- `llama_f16/`, `llama_bf16/`: the tied model in float16 / bfloat16 (q_proj holding NaNs with payloads
  and signs, infinities, subnormals), `source/pytorch_model.bin`, and `expected_<dtype>/`: the re-saves
  of `from_pretrained(source, dtype=...)` in the two other dtypes.
- `llama_sharded/`: the same architecture untied, with storage tricks in the state dict: `q_proj.weight` is
  a transposed (non-contiguous) view, `k_proj.weight` and `v_proj.weight` are views of one storage.
  - `source/`: sharded as transformers v4 wrote `.bin` checkpoints (huggingface_hub's
    `split_torch_state_dict_into_shards(max_shard_size="3KB")`, one `torch.save` per shard, and
    `pytorch_model.bin.index.json`);
  - `legacy/`: the same state dict in one file of torch's legacy (pre-1.6, non-zip) format;
  - `expected/`, `expected_3KB/`: `from_pretrained(source).save_pretrained(..., [max_shard_size="3KB"])`
    (the generator checks `legacy/` loads to the same bytes).
- `adapter/`: a LoRA adapter of `llama_sharded/expected` (the base).
  - `source_f32/`, `source_f16/`: `adapter_config.json` and `adapter_model.bin` (`torch.save` of
    `get_peft_model_state_dict`, in float32 / float16);
  - `expected_f32/`, `expected_f16/`: `PeftModel.from_pretrained(base, source).save_pretrained(...)`
    (peft upcasts float16 adapter weights to float32 on load: `autocast_adapter_dtype`);
  - `full_state_dict.bin`: `torch.save` of the whole PeftModel's state dict (float32 adapter loaded).
- `casts.safetensors`: 37-element float32, float16 and bfloat16 tensors with those special values at
  both ends (the tail of a vectorised loop), and `t.to(dtype)` of each into the two other dtypes.
- `evil/`: pickles that would run code if unpickled by Python: `posix_system.bin` (torch.save of an
  object whose `__reduce__` is `os.system`, which pickles as `posix.system`) and `os_system.bin` (the same
  archive with a hand-written `data.pkl` naming `os.system`). Each runs `touch peftkit-pwned` in the
  current folder. The generator checks that torch's own `weights_only` loader refuses both.
- `cache/`: a Hub cache (`models--org--name/{blobs,refs,snapshots}`) written with huggingface_hub's own
  cache functions (`repo_folder_name`, `_cache_commit_hash_for_specific_revision`, `_create_symlink`: the
  code `hf_hub_download` runs after a download), offline:
  - `peftkit-test/tiny-llama`: commit `A` (refs/main; `llama_sharded/expected`) and commit `B` (tag
    `v1.0`; `llama_sharded/expected_3KB`: sharded, so the index names links into blobs/);
  - `peftkit-test/tiny-llama-lora`: refs/main, `adapter/source_f32` (a `.bin` adapter whose
    `base_model_name_or_path` is `peftkit-test/tiny-llama`).
  `cache.json` records, for each spec, the snapshot `snapshot_download(..., local_files_only=True)`
  returns (relative to the cache), and the specs it refuses.

Run alone with:

    PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 python tests/interop/make_fixtures.py --out DIR hub
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

from .common import fresh_dir, quiet, write_json

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SPECIALS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FBFFFFF, 0x7F800000, 0xFF800000,
            0x00000001, 0x80000F00, 0x3F808000, 0x3F818000, 0x3F800FFF, 0x477FF000, 0x477FEFFF, 0x33000000,
            0x387FC000, 0x7F7FFFFF]
COMMIT_A = hashlib.sha1(b"peftkit tiny-llama commit A").hexdigest()
COMMIT_B = hashlib.sha1(b"peftkit tiny-llama commit B").hexdigest()
COMMIT_LORA = hashlib.sha1(b"peftkit tiny-llama-lora commit").hexdigest()


def _model(tied: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=64, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def _configs(model, dest: Path):
    """config.json and generation_config.json as save_pretrained writes them (the weights are removed)."""
    model.save_pretrained(dest)
    (dest / "model.safetensors").unlink()


def _llama_tied(out: Path):
    model = _model(tied=True)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight.view(-1)
        w[: len(SPECIALS)] = torch.tensor(SPECIALS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    src = out / "source"
    _configs(model, src)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    torch.save(sd, src / "pytorch_model.bin")
    LlamaForCausalLM.from_pretrained(src).save_pretrained(out / "expected")
    for name, dtype in [("bf16", torch.bfloat16), ("f16", torch.float16)]:
        LlamaForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(out / f"expected_{name}")


SPECIALS_16 = [0x7E00, 0xFE00, 0x7C01, 0xFE09, 0x7FFF, 0x7C00, 0xFC00, 0x0001, 0x8400, 0x3C01, 0x7BFF, 0x7F81, 0xFFC1]


def _llama_16(out: Path, dtype, targets):
    """A float16 or bfloat16 `.bin` (NaN payloads and signs, infinities, subnormals in q_proj) and its
    re-saves loaded with other dtypes."""
    model = _model(tied=True).to(dtype)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight.view(-1)
        w[: len(SPECIALS_16)] = torch.tensor(SPECIALS_16, dtype=torch.int32).to(torch.int16).view(dtype)
    src = out / "source"
    _configs(model, src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    for name, target in targets:
        LlamaForCausalLM.from_pretrained(src, dtype=target).save_pretrained(out / f"expected_{name}")


def _casts(out: Path):
    """casts.safetensors: 37-element tensors (not a multiple of any vector width) with the special
    values at both ends, in each float dtype, and `tensor.to(dtype)` of each (`<from>_to_<to>`), the
    call transformers makes when it loads with `dtype=`."""
    from safetensors.torch import save_file

    n = 37
    f32 = torch.zeros(n, dtype=torch.int32)
    f32[: len(SPECIALS)] = torch.tensor(SPECIALS, dtype=torch.int64).to(torch.int32)
    f32[-len(SPECIALS):] = torch.tensor(SPECIALS[::-1], dtype=torch.int64).to(torch.int32)
    h = torch.zeros(n, dtype=torch.int16)
    h[: len(SPECIALS_16)] = torch.tensor(SPECIALS_16, dtype=torch.int32).to(torch.int16)
    h[-len(SPECIALS_16):] = torch.tensor(SPECIALS_16[::-1], dtype=torch.int32).to(torch.int16)
    src = {"f32": f32.view(torch.float32), "f16": h.view(torch.float16), "bf16": h.clone().view(torch.bfloat16)}
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    tensors = dict(src)
    for a, t in src.items():
        for b, d in dtypes.items():
            if a != b:
                tensors[f"{a}_to_{b}"] = t.to(d)
    save_file(tensors, out / "casts.safetensors", metadata={"format": "pt"})


def _tricky_state_dict(model):
    """The state dict with a transposed view and two views of one storage (same values)."""
    sd = dict(model.state_dict())
    attn = "model.layers.0.self_attn."
    sd[attn + "q_proj.weight"] = sd[attn + "q_proj.weight"].t().contiguous().t()
    kv = torch.cat([sd[attn + "k_proj.weight"], sd[attn + "v_proj.weight"]])
    n = sd[attn + "k_proj.weight"].shape[0]
    sd[attn + "k_proj.weight"], sd[attn + "v_proj.weight"] = kv[:n], kv[n:]
    assert not sd[attn + "q_proj.weight"].is_contiguous()
    return sd


def _stable_legacy_keys(path: Path):
    """The legacy format names storages by their memory address (`str(storage._cdata)`) and writes
    them in the sorted order of those names, which changes from run to run. Rename each storage to its
    index (the pickles hold no offsets, so a BINUNICODE string may change length) and rewrite the key list and the storages in the sorted order of the new names,
    as torch would have written them under those names; then check torch still loads it."""
    import pickle

    keys = []

    class Keys(pickle.Unpickler):
        def find_class(self, module, name):  # only collect the ids: build nothing
            return super().find_class(module, name) if module == "collections" else (lambda *a: None)

        def persistent_load(self, pid):
            keys.append(pid[2])

    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)
        Keys(f).load()
        head_end = f.tell()
        stored = {}
        for key in pickle.load(f):
            count = struct.unpack("<q", f.read(8))[0]
            stored[key] = struct.pack("<q", count) + f.read(count * 4)  # float32 storages only
        assert not f.read(1)
    head = path.read_bytes()[:head_end]
    rename = {key: str(i) for i, key in enumerate(dict.fromkeys(keys))}
    for old, new in rename.items():
        old_b = b"X" + struct.pack("<I", len(old)) + old.encode()
        head = head.replace(old_b, b"X" + struct.pack("<I", len(new)) + new.encode())
    new_keys = sorted(rename.values())
    back = {new: old for old, new in rename.items()}
    tail = pickle.dumps(new_keys, protocol=2) + b"".join(stored[back[k]] for k in new_keys)
    path.write_bytes(head + tail)
    torch.load(path, weights_only=True)


def _llama_sharded(out: Path):
    from huggingface_hub import split_torch_state_dict_into_shards

    model = _model(tied=False)
    sd = _tricky_state_dict(model)
    src = out / "source"
    _configs(model, src)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="3KB")
    for filename, names in split.filename_to_tensors.items():
        torch.save({k: sd[k] for k in names}, src / filename)
    assert split.is_sharded
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    legacy = out / "legacy"
    _configs(model, legacy)
    torch.save(sd, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _stable_legacy_keys(legacy / "pytorch_model.bin")
    LlamaForCausalLM.from_pretrained(src).save_pretrained(out / "expected")
    LlamaForCausalLM.from_pretrained(src).save_pretrained(out / "expected_3KB", max_shard_size="3KB")
    check = out / "_legacy_check"
    LlamaForCausalLM.from_pretrained(legacy).save_pretrained(check)
    assert (check / "model.safetensors").read_bytes() == (out / "expected" / "model.safetensors").read_bytes()
    shutil.rmtree(check)


def _adapter(out: Path, base: Path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sd = get_peft_model_state_dict(model)
    for name, dtype in [("f32", torch.float32), ("f16", torch.float16)]:
        src = out / f"source_{name}"
        model.peft_config["default"].base_model_name_or_path = "peftkit-test/tiny-llama"
        model.peft_config["default"].save_pretrained(src)
        torch.save({k: v.to(dtype) for k, v in sd.items()}, src / "adapter_model.bin")
        loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), src)
        loaded.save_pretrained(out / f"expected_{name}")
        if name == "f32":
            torch.save(loaded.state_dict(), out / "full_state_dict.bin")
        # The model card names the base by its absolute path: not a fixture.
        (out / f"expected_{name}" / "README.md").unlink()


def _evil(out: Path):
    out.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch peftkit-pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, out / "posix_system.bin")
    # The same archive with data.pkl naming os.system itself (what pickle writes on a platform
    # where os.system is defined in os).
    pkl = b"\x80\x02}q\x00X\x01\x00\x00\x00xq\x01cos\nsystem\nq\x02X\x13\x00\x00\x00touch peftkit-pwnedq\x03\x85q\x04Rq\x05s."
    with zipfile.ZipFile(out / "posix_system.bin") as zin, zipfile.ZipFile(out / "os_system.bin", "w") as zout:
        for info in zin.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info, data)
    for name in ["posix_system.bin", "os_system.bin"]:
        try:
            torch.load(out / name, weights_only=True)
        except Exception as e:  # torch refuses them too
            assert "system" in str(e), e
        else:
            raise AssertionError(f"torch loaded {name}")


def _put(storage: Path, commit: str, rel: str, content: bytes):
    from huggingface_hub.file_download import _create_symlink, _get_pointer_path

    # Regular files are stored under their git blob sha1, LFS files (weights) under their sha256.
    if rel.endswith((".safetensors", ".bin")):
        etag = hashlib.sha256(content).hexdigest()
    else:
        etag = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    blob = storage / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    pointer = Path(_get_pointer_path(str(storage), commit, rel))
    pointer.parent.mkdir(parents=True, exist_ok=True)
    _create_symlink(str(blob), str(pointer), new_blob=False)


def _cache(root: Path, out: Path):
    from huggingface_hub import snapshot_download
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, repo_folder_name

    cache = out / "cache"
    repos = [
        ("peftkit-test/tiny-llama", COMMIT_A, "main", root / "llama_sharded" / "expected"),
        ("peftkit-test/tiny-llama", COMMIT_B, "v1.0", root / "llama_sharded" / "expected_3KB"),
        ("peftkit-test/tiny-llama-lora", COMMIT_LORA, "main", root / "adapter" / "source_f32"),
    ]
    for repo_id, commit, ref, folder in repos:
        storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        for f in sorted(folder.iterdir()):
            _put(storage, commit, f.name, f.read_bytes())
        _cache_commit_hash_for_specific_revision(str(storage), ref, commit)
    specs = {}
    for spec in ["peftkit-test/tiny-llama", "peftkit-test/tiny-llama@main", "peftkit-test/tiny-llama@v1.0",
                 f"peftkit-test/tiny-llama@{COMMIT_A}", f"peftkit-test/tiny-llama@{COMMIT_B}",
                 "peftkit-test/tiny-llama-lora", "peftkit-test/tiny-llama@v2.0", "peftkit-test/not-cached",
                 f"peftkit-test/tiny-llama@{'0' * 40}"]:
        repo_id, _, revision = spec.partition("@")
        try:
            path = snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
            specs[spec] = Path(path).relative_to(cache).as_posix()
        except Exception:
            specs[spec] = None
    write_json(out / "cache.json", {"snapshots": specs})


def generate(root: Path) -> None:
    quiet()
    out = fresh_dir(Path(root) / "hub")
    _llama_tied(out / "llama_tied")
    _llama_sharded(out / "llama_sharded")
    _llama_16(out / "llama_f16", torch.float16, [("f32", torch.float32), ("bf16", torch.bfloat16)])
    _llama_16(out / "llama_bf16", torch.bfloat16, [("f32", torch.float32), ("f16", torch.float16)])
    _adapter(out / "adapter", out / "llama_sharded" / "expected")
    _evil(out / "evil")
    _casts(out)
    _cache(out, out)
