"""The base model for fine-tuning: find it, verify it, load it into transformers (offline).

A GGUF base (a packaged preset or your own file) is loaded by transformers' GGUF support
(``from_pretrained(folder, gguf_file=...)``: it de-quantises every tensor to float and undoes
llama.cpp's q/k row permutation). That takes ~30 s for SmolLM2-135M, most of it parsing the
GGUF's 49k-token vocabulary twice, so the de-quantised model and its tokenizer are kept in a
cache folder (``<model cache>/hf/<name>-<sha256[:16]>``, written atomically, keyed by the
GGUF's hash) and later loads take ~2 s.

Nothing is ever downloaded: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import BaseSpec, ConfigError

__all__ = ["ResolvedBase", "dequantised_folder", "load_base", "resolve_base"]

CACHE_STAMP = "anomaly_agent_base.json"


@dataclass(frozen=True)
class ResolvedBase:
    """A located, verified base model.

    Attributes:
        name: Preset name, or the file/folder name.
        kind: ``gguf`` or ``hf``.
        path: The GGUF file, or the transformers folder.
        sha256: Of the GGUF file; for a folder, of its weight files' hashes (sorted by name).
        preset: The preset name, if any.
    """

    name: str
    kind: str
    path: Path
    sha256: str
    preset: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready record for adapter metadata."""
        return {"name": self.name, "kind": self.kind, "preset": self.preset, "sha256": self.sha256,
                "gguf_path": str(self.path) if self.kind == "gguf" else None,
                "hf_dir": str(self.path) if self.kind == "hf" else None}


def _folder_sha256(folder: Path) -> str:
    from agent.models import sha256_file

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ConfigError(f"base.hf_dir {folder} holds no weights (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def resolve_base(spec: BaseSpec, cache_dir: str | Path | None = None) -> ResolvedBase:
    """Locate and verify the base model named by ``spec``.

    Raises:
        ConfigError: the preset is not installed (with the pip command), the file or folder is
            missing, or the file is not a GGUF / does not match its pinned hash.
    """
    from agent.models import (
        PRESETS,
        ModelError,
        resolve_preset,
        sha256_file,
        verify_gguf,
    )

    try:
        if spec.preset is not None:
            path = resolve_preset(spec.preset, cache_dir)
            return ResolvedBase(spec.preset, "gguf", path, PRESETS[spec.preset].sha256.lower(), spec.preset)
        if spec.gguf is not None:
            path = verify_gguf(Path(spec.gguf), None)
            return ResolvedBase(path.name, "gguf", path, sha256_file(path))
    except ModelError as exc:
        raise ConfigError(f"base model: {exc}") from None
    folder = Path(str(spec.hf_dir)).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"base.hf_dir {folder} is not a transformers model folder (no config.json)")
    return ResolvedBase(folder.name, "hf", folder, _folder_sha256(folder))


def dequantised_folder(base: ResolvedBase, cache_dir: str | Path | None = None) -> Path:
    """A transformers folder (weights + tokenizer) for a GGUF base, built once and cached."""
    from agent.models import model_cache_dir

    if base.kind != "gguf":
        return base.path
    root = model_cache_dir(cache_dir) / "hf"
    target = root / f"{base.name.removesuffix('.gguf')}-{base.sha256[:16]}"
    stamp = target / CACHE_STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")).get("sha256") == base.sha256:
                return target
        except (OSError, ValueError):
            pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(base.path.parent), base.path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # The GGUF quantizer marks the model "not serializable", but its weights are plain floats by
    # now: drop the quantizer and its config entry so the folder loads as an ordinary model.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CACHE_STAMP).write_text(json.dumps({"sha256": base.sha256, "gguf": str(base.path)}), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base(base: ResolvedBase, *, dtype: str = "float32", quantization: str = "none", device: str = "cpu",
              cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for training; nothing is downloaded.

    Args:
        base: From :func:`resolve_base`.
        dtype: ``float32`` (CPU), ``bfloat16`` / ``float16`` (GPU).
        quantization: ``nf4`` loads 4-bit weights with bitsandbytes (QLoRA; CUDA only).
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available).
        cache_dir: Model cache (default ``$ANOMALY_AGENT_MODEL_CACHE`` or ~/.cache/anomaly-agent/models).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but torch sees no CUDA device (this torch build: "
                          f"{torch.__version__}); use device: cpu")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": getattr(torch, dtype)}
    if quantization == "nf4":
        if dev != "cuda":
            raise ConfigError("quantization nf4 (QLoRA) needs a CUDA GPU; this run would be on cpu")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ConfigError("quantization nf4 needs bitsandbytes: pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=getattr(torch, dtype),
                                                           bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0}
    folder = dequantised_folder(base, cache_dir)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if quantization != "nf4" and dev != "cpu":
        model = model.to(dev)
    return model, tok
