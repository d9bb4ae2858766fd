"""Convert a peft LoRA adapter into a GGUF LoRA that llama.cpp loads (``LlamaCppModel(lora_path=...)``).

This mirrors llama.cpp's ``convert_lora_to_gguf.py`` without needing a llama.cpp checkout:

* metadata ``general.architecture`` (the base's), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha``;
* one pair of tensors per adapted weight, named after the base tensor:
  ``blk.{i}.attn_q.weight.lora_a`` / ``.lora_b`` (the names come from the ``gguf`` package's
  tensor map, the same table the HF->GGUF converter uses);
* ``lora_a`` is peft's ``lora_A`` (numpy shape ``(r, n_in)``), ``lora_b`` is ``lora_B``
  (``(n_out, r)``), written as F32. GGUF lists dimensions innermost first, so llama.cpp sees
  ``a->ne = [n_in, r]`` and ``b->ne = [r, n_out]``, which is what it checks (``a->ne[0]`` =
  the base weight's ``ne[0]``, ``a->ne[1] == b->ne[0]``);
* scale: llama.cpp multiplies ``B (A x)`` by ``alpha / r`` (``r = b->ne[0]``), peft by
  ``lora_alpha / r`` -- so ``alpha`` is written as is; for rsLoRA (``alpha / sqrt(r)``) we write
  ``alpha * sqrt(r)``.

**The rope permutation.** llama.cpp's HF->GGUF conversion permutes the *rows* of ``q_proj`` and
``k_proj`` for the ``llama`` architecture (its rope pairs dimensions (i, i + d/2) HF-style vs
interleaved (2i, 2i+1) in ggml): ``W.reshape(n_head, 2, d/2/..., n_in).swapaxes(1, 2)``.
transformers *reverses* that when it loads a GGUF, so the model we train sees HF row order,
and a LoRA delta ``B A`` trained there must be permuted the same way before llama.cpp adds it
to its permuted weight. Rows of ``B A`` are rows of ``B``, so only ``lora_b`` of ``attn_q``
(with ``n_head``) and ``attn_k`` (with ``n_head_kv``) is permuted; ``lora_a`` never is. Other
architectures (``qwen2``: NEOX rope) are not permuted by either side. The test
``tests/finetune/test_export.py`` checks this numerically against llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ExportError", "ExportResult", "GGUFBaseInfo", "base_info", "export_adapter", "main", "permute_rows",
           "read_metadata"]

PERMUTED_ARCHS = frozenset({"llama"})
"""Architectures whose q/k rows llama.cpp's converter permutes (and transformers un-permutes)."""


class ExportError(ValueError):
    """An adapter that cannot be exported (the message names the file and the problem)."""


@dataclass(frozen=True)
class GGUFBaseInfo:
    """What the export needs to know about the base model."""

    architecture: str
    n_layers: int
    n_head: int
    n_head_kv: int


@dataclass(frozen=True)
class ExportResult:
    """What was written."""

    path: Path
    tensors: int
    alpha: float
    rank: int
    architecture: str
    permuted: tuple[str, ...]


_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_metadata(gguf_path: str | Path, wanted: set[str]) -> dict[str, Any]:
    """The ``wanted`` metadata keys of a GGUF file (scalars and strings), reading only the header.

    Why not ``gguf.GGUFReader``: it parses every field, including the 49k-entry vocabulary and
    merges of a chat model, which takes 3-9 s per call on this machine; this stops as soon as
    the wanted keys are found (they come before the tokenizer in llama.cpp's files).
    """
    import mmap
    import struct

    path = Path(gguf_path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ExportError(f"{path}: cannot open ({exc})") from None
    with fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            if mm[:4] != b"GGUF":
                raise ExportError(f"{path}: not a GGUF file (starts with {bytes(mm[:4])!r})")
            version, _n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
            if version not in (2, 3):
                raise ExportError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
            off = 24
            found: dict[str, Any] = {}

            def string(at: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", mm, at)
                return bytes(mm[at + 8: at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

            def skip(vtype: int, at: int) -> int:
                if vtype in _SCALARS:
                    return at + struct.calcsize(_SCALARS[vtype])
                if vtype == _STRING:
                    (n,) = struct.unpack_from("<Q", mm, at)
                    return at + 8 + n
                if vtype == _ARRAY:
                    itype, count = struct.unpack_from("<IQ", mm, at)
                    at += 12
                    if itype in _SCALARS:
                        return at + count * struct.calcsize(_SCALARS[itype])
                    for _ in range(count):
                        at = skip(itype, at)
                    return at
                raise ExportError(f"{path}: unknown GGUF value type {vtype}")

            for _ in range(n_kv):
                key, off = string(off)
                (vtype,) = struct.unpack_from("<I", mm, off)
                off += 4
                if key in wanted and vtype in _SCALARS:
                    (found[key],) = struct.unpack_from(_SCALARS[vtype], mm, off)
                elif key in wanted and vtype == _STRING:
                    found[key], _ = string(off)
                off = skip(vtype, off)
                if len(found) == len(wanted):
                    break
        except (struct.error, IndexError, ValueError) as exc:
            raise ExportError(f"{path}: cannot read it as a GGUF ({type(exc).__name__}: {exc})") from None
    return found


def base_info(gguf_path: str | Path) -> GGUFBaseInfo:
    """Architecture, layer and head counts from a base GGUF's metadata."""
    arch = read_metadata(gguf_path, {"general.architecture"}).get("general.architecture")
    if not isinstance(arch, str):
        raise ExportError(f"{gguf_path}: metadata key 'general.architecture' missing; is this a model GGUF?")
    keys = {f"{arch}.block_count", f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"}
    meta = read_metadata(gguf_path, keys)
    for key in (f"{arch}.block_count", f"{arch}.attention.head_count"):
        if key not in meta:
            raise ExportError(f"{gguf_path}: metadata key {key!r} missing; is this a model GGUF?")
    n_head = int(meta[f"{arch}.attention.head_count"])
    return GGUFBaseInfo(architecture=arch, n_layers=int(meta[f"{arch}.block_count"]), n_head=n_head,
                        n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv", n_head)))


def permute_rows(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``weights`` (HF row order -> GGUF's)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"cannot permute {rows} rows into {n_head} heads of two rope halves")
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def _load_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (not a peft adapter folder)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights_path))
    except Exception:  # bf16 and friends: numpy has no dtype for them, go through torch
        from safetensors.torch import load_file as load_torch

        tensors = {k: v.float().numpy() for k, v in load_torch(str(weights_path)).items()}
    return cfg, tensors


def _check_config(cfg: dict[str, Any], where: Path) -> tuple[int, float]:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ExportError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ExportError(f"{where}: DoRA adapters (use_dora) have no llama.cpp LoRA equivalent")
    if cfg.get("modules_to_save"):
        raise ExportError(f"{where}: modules_to_save {cfg['modules_to_save']} (fully trained layers) cannot be "
                          "expressed as a LoRA; train without them")
    if str(cfg.get("bias", "none")) != "none":
        raise ExportError(f"{where}: bias {cfg.get('bias')!r} is not supported (use bias: none)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    for key, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        odd = {k: v for k, v in (cfg.get(key) or {}).items() if v != default}
        if odd:
            raise ExportError(f"{where}: per-module {key} {odd} is not supported (llama.cpp has one alpha)")
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)
    return r, alpha


def export_adapter(adapter_dir: str | Path, out: str | Path, base_gguf: str | Path | None = None, *,
                   info: GGUFBaseInfo | None = None, metadata: dict[str, str] | None = None) -> ExportResult:
    """Write ``out`` (a GGUF LoRA) from the peft adapter in ``adapter_dir``.

    Args:
        adapter_dir: A peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
        out: The ``.gguf`` to write; written to a temporary file first and renamed, so a
            half-written file never replaces a good one.
        base_gguf: The base model's GGUF (architecture and head counts are read from it).
        info: The same facts given directly (instead of ``base_gguf``).
        metadata: Extra string metadata (``anomaly_agent.*`` keys: base hash, data-set hash).
    """
    import gguf

    adapter_dir, out = Path(adapter_dir), Path(out)
    cfg, tensors = _load_adapter(adapter_dir)
    rank, alpha = _check_config(cfg, adapter_dir)
    if info is None:
        if base_gguf is None:
            raise ExportError("give base_gguf (the base model's GGUF) or info")
        info = base_info(base_gguf)
    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if info.architecture not in names:
        raise ExportError(f"unknown architecture {info.architecture!r} for the gguf tensor map")
    tmap = gguf.get_tensor_name_map(names[info.architecture], info.n_layers)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ExportError(f"{adapter_dir}: tensor {key!r} is not a lora_A/lora_B weight "
                              "(embedding adapters and extra trained layers cannot be exported)")
        pairs.setdefault(m["base"], {})[m["ab"]] = np.ascontiguousarray(value, dtype=np.float32)

    permuted: list[str] = []
    written: list[tuple[str, np.ndarray]] = []
    for base, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{adapter_dir}: {base} has lora_{''.join(sorted(ab))} only; both A and B are needed")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(f"{adapter_dir}: {base}: lora_A {a.shape} and lora_B {b.shape} do not chain "
                              "(expected (r, n_in) and (n_out, r))")
        name = tmap.get_name(base + ".weight", try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{adapter_dir}: no GGUF tensor for {base!r} in architecture {info.architecture!r}")
        if info.architecture in PERMUTED_ARCHS:
            if name.endswith(".attn_q.weight"):
                b = permute_rows(b, info.n_head, info.n_head)
                permuted.append(name)
            elif name.endswith(".attn_k.weight"):
                b = permute_rows(b, info.n_head, info.n_head_kv)
                permuted.append(name)
        written.append((name + ".lora_a", np.ascontiguousarray(a)))
        written.append((name + ".lora_b", np.ascontiguousarray(b)))
    if not written:
        raise ExportError(f"{adapter_dir}: the adapter has no LoRA tensors")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), info.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(adapter_dir.name)
        for k, v in sorted((metadata or {}).items()):
            writer.add_string(k if k.startswith("anomaly_agent.") else f"anomaly_agent.{k}", str(v))
        for name, arr in written:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=out, tensors=len(written), alpha=float(alpha), rank=rank,
                        architecture=info.architecture, permuted=tuple(permuted))


def main(argv: list[str] | None = None) -> int:
    """``python -m finetune.export ADAPTER_DIR --out adapter.gguf [--base smollm2-135m | --base-gguf F]``."""
    ap = argparse.ArgumentParser(prog="finetune.export", description="peft LoRA adapter -> GGUF LoRA for llama.cpp")
    ap.add_argument("adapter", help="peft adapter folder (e.g. RUN/adapter)")
    ap.add_argument("--out", required=True, help="the .gguf file to write")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--base", default=None, help="base model preset (default: the one in the adapter's metadata)")
    g.add_argument("--base-gguf", default=None, help="base model GGUF file")
    a = ap.parse_args(argv)
    try:
        base: Path | None = Path(a.base_gguf) if a.base_gguf else None
        meta: dict[str, str] = {}
        meta_file = Path(a.adapter) / "anomaly_agent_adapter.json"
        if meta_file.is_file():
            m = json.loads(meta_file.read_text(encoding="utf-8"))
            meta = {"base_sha256": str(m.get("base", {}).get("sha256", "")),
                    "dataset_sha256": str(m.get("dataset", {}).get("sha256", ""))}
            if base is None and a.base is None and m.get("base", {}).get("gguf_path"):
                base = Path(m["base"]["gguf_path"])
        if base is None:
            from agent.models import resolve_preset

            base = resolve_preset(a.base or "smollm2-135m")
        res = export_adapter(a.adapter, a.out, base, metadata=meta)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {res.path}: {res.tensors} tensors, rank {res.rank}, alpha {res.alpha:g}, "
          f"{res.architecture}, permuted {len(res.permuted)} q/k B matrices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
