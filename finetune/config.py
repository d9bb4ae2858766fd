"""Fine-tuning configuration: a YAML file validated into frozen pydantic records.

Why YAML + pydantic: a run is defined by one reviewable file (``finetune/configs/*.yaml``, each
saying why its numbers are what they are), and a typo must fail before a 45-minute run starts,
with the bad key and value named -- not silently become a default.

The base model is given by exactly one of ``preset`` (a name in :data:`agent.models.PRESETS`,
the packaged GGUFs), ``gguf`` (your own GGUF file) or ``hf_dir`` (a local transformers folder,
e.g. for tests). transformers loads a GGUF by de-quantising it (``from_pretrained(folder,
gguf_file=...)``, needs the ``gguf`` package); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = ["BaseSpec", "ConfigError", "ExportSpec", "FinetuneConfig", "LoraSpec", "TrainSpec", "load_config"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration (or something it points at) that cannot be used; the message names it."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseSpec(_Strict):
    """The base model: exactly one of ``preset``, ``gguf``, ``hf_dir``."""

    preset: str | None = None
    gguf: str | None = None
    hf_dir: str | None = None

    @model_validator(mode="after")
    def _one(self) -> BaseSpec:
        given = [k for k in ("preset", "gguf", "hf_dir") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of preset, gguf, hf_dir (got {given or 'none'})")
        if self.preset is not None:
            from agent.models import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        return self


class LoraSpec(_Strict):
    """LoRA settings (peft ``LoraConfig``)."""

    r: int = Field(16, ge=1, le=512)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    use_rslora: bool = False
    layers_from: int | None = Field(None, ge=0)
    """Adapt only decoder layers ``layers_from`` and up (None: all). Backpropagation then stops at
    that layer, so training is faster; the top layers are where answer formatting is learned."""

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("target_modules must name at least one linear layer, e.g. [q_proj, v_proj]")
        bad = [m for m in v if not m or not m.replace("_", "").replace(".", "").isalnum()]
        if bad:
            raise ValueError(f"target_modules has invalid names {bad}")
        return v


class TrainSpec(_Strict):
    """Optimisation, checkpointing and runtime settings."""

    seed: int = 0
    steps: int = Field(90, ge=1)
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(2, ge=1)
    lr: float = Field(2e-4, gt=0, lt=1)
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(1536, ge=32)
    save_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_examples: int = Field(12, ge=0)
    threads: int | None = Field(None, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "nf4"] = "none"
    gradient_checkpointing: bool = False
    consistency: float = Field(0.0, ge=0.0, le=100.0)
    """Weight of the twin-consistency term: for an injection example that carries its clean twin
    (``finetune-data --twins``), KL(clean || injected) over the answer tokens, the clean side's
    distribution held fixed (no gradient). Why: cross-entropy on the same target teaches the
    injected prompt the right answer token by token, but not that its *whole* distribution --
    the confidence near a decision, the severity digit -- must not move with one changed line;
    the term asks for exactly that. 0 (default) turns it off: measured at 1 and 10 (runs v13,
    v14), 20 and 21 of 24 injection-suite verdicts stayed unchanged in the product against 22
    without it (run v10), the failures all one severity level on held-out candidates."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if self.quantization == "nf4" and self.device == "cpu":
            raise ValueError("quantization nf4 (QLoRA) needs device cuda or auto, got device cpu")
        return self

    @property
    def examples_per_step(self) -> int:
        return self.micro_batch * self.grad_accum


class ExportSpec(_Strict):
    """What to do with the final adapter."""

    gguf: bool = True
    """Also write ``adapter.gguf`` for llama.cpp (needs a GGUF base: ``preset`` or ``gguf``)."""


class FinetuneConfig(_Strict):
    """One fine-tuning run."""

    name: str = Field(min_length=1, max_length=80)
    base: BaseSpec
    lora: LoraSpec = LoraSpec()
    train: TrainSpec = TrainSpec()
    export: ExportSpec = ExportSpec()
    budget_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget the numbers were chosen for; the trainer warns when its measured pace
    would exceed it (it does not stop: a slower machine should still finish)."""
    notes: str = ""

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the settings that change the result (not ``notes``,
        ``threads``, ``budget_minutes``): a checkpoint is only resumed under the same digest."""
        d = self.model_dump(mode="json")
        d.pop("notes", None)
        d.pop("budget_minutes", None)
        d["train"].pop("threads", None)
        d["train"].pop("save_every", None)
        d["train"].pop("keep_checkpoints", None)
        if not d["train"].get("consistency"):
            d["train"].pop("consistency", None)  # off: the digest of the runs before it existed
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode("utf-8")).hexdigest()


def _describe(exc: ValidationError, path: Path | str) -> str:
    parts = []
    for e in exc.errors()[:6]:
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{got_s}")
    return f"{path}: " + "; ".join(parts)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Read and validate a YAML config; a bare name loads ``finetune/configs/<name>.yaml``.

    Raises:
        ConfigError: a missing file, bad YAML, an unknown key or a bad value (named).
    """
    import yaml

    p = Path(path)
    if not p.exists() and len(p.parts) == 1 and (CONFIG_DIR / f"{p.name}.yaml").is_file():
        p = CONFIG_DIR / f"{p.name}.yaml"
    if not p.is_file():
        known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config not found: {path} (bundled configs: {known})")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a config must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    try:
        return FinetuneConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, p)) from None
