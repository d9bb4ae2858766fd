"""LoRA fine-tuning of the explainer model (peft on transformers), resumable and reproducible.

``python -m finetune.train --config smollm2-135m --data data/ft.jsonl --out runs/smollm2``
(``anomaly-agent finetune`` calls :func:`main`). The run folder ``--out`` holds::

    checkpoints/step-000010/   adapter weights, optimizer and RNG state, losses (every save_every steps)
    adapter/                   the final peft adapter + anomaly_agent_adapter.json (metadata)
    adapter.gguf               the same adapter for llama.cpp (finetune.export), if the base is a GGUF
    train_log.jsonl            one line per optimizer step

How it trains, and why
----------------------
* **What is learned**: the answer only. Each example is the explainer's system and user
  messages plus the teacher's answer, formatted with the model's own chat template (the one
  the GGUF carries, which llama.cpp also uses at inference); the prompt tokens get label -100,
  so the loss covers the answer and the end-of-turn token (the model learns to stop).
  Prompt and answer are tokenised separately, as inference sees them (the prompt is
  tokenised, the answer generated). Examples longer than ``max_length`` are dropped and
  counted, never truncated: a cut prompt is not what inference sees.
* **Order**: a seeded permutation of the training examples per epoch; the examples of
  optimizer step ``s`` depend only on the seed and ``s``. With the optimizer state, the LoRA
  weights and the torch RNG (dropout) saved in each checkpoint, a killed run resumes from its
  last checkpoint and continues exactly where it was; a checkpoint made under another config
  or data set is refused (digests are compared).
* **Answer-only logits**: the language-model head (49,152 x 576 for SmolLM2, a fifth of the
  forward pass) runs only on the positions that predict answer tokens (``logits_to_keep``); the
  loss is the same number as the full-logits loss (a test), ~20% less time per example.
* **Upper layers only** (``lora.layers_from``): backpropagation stops at the lowest adapted
  layer, so the layers below cost only their forward pass (SmolLM2 with LoRA on layers 10-29:
  7.8 s per ~1,100-token example vs 13.8 s for all layers with full logits, measured here).
* **Schedule**: linear warm-up, cosine decay to ``min_lr_ratio * lr``; AdamW; gradient
  clipping.
* **Held-out loss**: ``eval_examples`` examples (seeded) are never trained on; their answer loss
  before and after training is in the metadata, next to the training-loss curve.
* **The final adapter** is written to a temporary folder and renamed into place (the previous
  adapter is moved aside first and deleted only after the rename), so a half-written adapter
  never replaces a good one; the same for ``adapter.gguf``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.base import ResolvedBase, load_base, resolve_base
from finetune.config import ConfigError, FinetuneConfig, TrainSpec, load_config
from finetune.dataset import DatasetError, Example, Manifest, load_dataset

__all__ = ["Encoded", "TrainResult", "batch_indices", "encode", "latest_checkpoint", "lr_at", "main", "train"]

METADATA = "anomaly_agent_adapter.json"
CKPT_FORMAT = 1
IGNORE = -100
Echo = Callable[[str], None]


# ================================================================================ data

@dataclass(frozen=True)
class Encoded:
    """One tokenised example: the prompt's labels are IGNORE, the answer's are its token ids."""

    id: str
    case: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    twin_ids: tuple[int, ...] | None = None
    """The clean twin's prompt + the same answer tokens (injection cases built with twins)."""

    @property
    def answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def chat_texts(tok: Any, messages: Sequence[dict[str, str]], answer: str) -> tuple[str, str]:
    """(prompt text, answer text) in the tokenizer's chat template.

    The answer text is what the template puts after the generation prompt for an assistant
    turn (for ChatML: ``answer<|im_end|>\\n``).
    """
    if not getattr(tok, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template; the explainer's prompts need one "
                          "(the GGUF's tokenizer.chat_template)")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError("the chat template does not render a conversation as prompt + answer "
                          "(the generation prompt is not a prefix of the full text)")
    return prompt, full[len(prompt):]


def encode(tok: Any, ex: Example, max_length: int) -> Encoded | None:
    """Token ids and labels for one example; None when it is longer than ``max_length``."""
    prompt, completion = chat_texts(tok, ex.messages, ex.answer)
    p_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    c_ids = list(tok(completion, add_special_tokens=False)["input_ids"])
    if not c_ids:
        raise DatasetError(f"example {ex.id}: the answer tokenises to nothing")
    if len(p_ids) + len(c_ids) > max_length:
        return None
    twin: tuple[int, ...] | None = None
    if ex.twin is not None:
        t_prompt, t_completion = chat_texts(tok, ex.twin, ex.answer)
        if t_completion != completion:  # pragma: no cover - the same template renders the same answer
            raise DatasetError(f"example {ex.id}: the chat template renders its twin's answer differently")
        t_ids = list(tok(t_prompt, add_special_tokens=False)["input_ids"])
        if len(t_ids) + len(c_ids) <= max_length:  # a twin too long is left out, the example kept
            twin = tuple(t_ids + c_ids)
    return Encoded(ex.id, ex.case, tuple(p_ids + c_ids), tuple([IGNORE] * len(p_ids) + c_ids), twin)


def batch_indices(step: int, spec: TrainSpec, n: int) -> list[list[int]]:
    """Indices (into the training examples) of the micro-batches of optimizer step ``step`` (1-based).

    The stream is a concatenation of per-epoch permutations seeded by ``(seed, epoch)``, so any
    step's examples can be computed without replaying the ones before it (exact resume).
    """
    if n <= 0:
        raise ValueError("no training examples")
    per = spec.examples_per_step
    out: list[list[int]] = []
    perms: dict[int, list[int]] = {}
    for m in range(spec.grad_accum):
        batch = []
        for j in range(spec.micro_batch):
            g = (step - 1) * per + m * spec.micro_batch + j
            epoch, pos = divmod(g, n)
            if epoch not in perms:
                order = list(range(n))
                random.Random(f"{spec.seed}:epoch:{epoch}").shuffle(order)
                perms[epoch] = order
            batch.append(perms[epoch][pos])
        out.append(batch)
    return out


def lr_at(step: int, spec: TrainSpec) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine decay."""
    if spec.warmup_steps and step <= spec.warmup_steps:
        return spec.lr * step / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    t = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.lr * spec.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over the answer tokens, with logits computed only where they are needed.

    The prompt's labels are IGNORE, so the logits of every position before the first answer
    token but one are thrown away by the loss anyway; ``logits_to_keep`` skips computing them
    (and their backward pass). Equal to ``model(**batch).loss``.
    """
    import torch

    labels = batch["labels"]
    width = labels.shape[1]
    answer = labels != IGNORE
    if not bool(answer.any()):
        raise DatasetError("a batch without answer tokens (every label is ignored)")
    first = int(torch.where(answer.any(dim=0))[0][0])
    first = max(first, 1)  # position 0 predicts nothing earlier
    keep = width - first + 1
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = out.logits[:, :-1, :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels[:, first:].reshape(-1), ignore_index=IGNORE)


def twin_loss(model: Any, e: Encoded, weight: float, device: Any) -> Any:
    """Cross-entropy on ``e``'s answer plus ``weight`` x KL(clean twin || ``e``) over the answer tokens.

    The twin's prompt differs from ``e``'s by the injection only and both end in the same answer
    tokens, so the last ``n`` positions of each predict the same tokens. The twin's distribution is
    computed without gradient: it is the target, as the teacher's answer is for cross-entropy.
    """
    import torch
    import torch.nn.functional as F

    n = e.answer_tokens

    def answer_logits(token_ids: tuple[int, ...]) -> Any:  # the n positions that predict the answer
        ids = torch.tensor([token_ids], device=device)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=n + 1).logits[0, :-1].float()

    logits = answer_logits(e.input_ids)
    ce = F.cross_entropy(logits, torch.tensor(e.labels[-n:], device=device))
    if e.twin_ids is None or weight <= 0:
        return ce
    with torch.no_grad():
        t_logits = answer_logits(e.twin_ids)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
    return ce + weight * kl


def _collate(items: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ================================================================================ checkpoints

@dataclass(frozen=True)
class Checkpoint:
    """A saved training state."""

    path: Path
    step: int
    state: dict[str, Any]


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint in a run folder (a folder only exists once fully written)."""
    root = _ckpt_dir(Path(out))
    best: Checkpoint | None = None
    if not root.is_dir():
        return None
    for d in root.glob("step-*"):
        if not d.is_dir() or d.name.endswith(".tmp"):
            continue
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
            step = int(state["step"])
        except (OSError, ValueError, KeyError):
            continue
        if best is None or step > best.step:
            best = Checkpoint(d, step, state)
    return best


def _save_checkpoint(out: Path, model: Any, optimizer: Any, step: int, state: dict[str, Any], keep: int) -> Path:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = _ckpt_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, str(tmp / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "format": CKPT_FORMAT}, indent=1),
                                    encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    steps = sorted((c for c in root.glob("step-*") if c.is_dir()), key=lambda c: c.name)
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(ckpt: Checkpoint, model: Any, optimizer: Any) -> None:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt.path / "adapter.safetensors")))
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True))
    rng = torch.load(ckpt.path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ================================================================================ atomic adapter

def _restore_aside(final: Path) -> None:
    """Undo an interrupted swap: if ``final`` is missing but a moved-aside copy exists, put it back."""
    if final.exists():
        return
    aside = sorted(final.parent.glob(f".{final.name}.old-*"))
    if aside:
        os.replace(aside[-1], final)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` (a folder or file) by ``tmp`` with renames only: never half-written."""
    _restore_aside(final)
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    elif aside.exists():
        aside.unlink()


# ================================================================================ training

@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    out: Path
    step: int
    finished: bool
    adapter: Path | None = None
    gguf: Path | None = None
    resumed_from: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _target_check(model: Any, targets: Sequence[str], layers_from: int | None = None) -> list[int] | None:
    """Refuse target modules the base lacks; the decoder layers to adapt (None: all)."""
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                     if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt")})
    bad = [t for t in targets if t not in linear]
    if bad:
        raise ConfigError(f"lora.target_modules {bad} match no linear layer of the base model; "
                          f"its linear layers are: {linear}")
    if layers_from is None:
        return None
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if not 0 <= layers_from < n_layers:
        raise ConfigError(f"lora.layers_from {layers_from} is outside the base model's decoder layers "
                          f"0-{n_layers - 1}")
    return list(range(layers_from, n_layers))


def _mean_loss(model: Any, items: Sequence[Encoded], pad_id: int, device: Any) -> float | None:
    import torch

    if not items:
        return None
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in items:
            batch = {k: v.to(device) for k, v in _collate([e], pad_id).items()}
            loss = answer_loss(model, batch)
            n = e.answer_tokens
            total += float(loss) * n
            tokens += n
    model.train()
    return round(total / max(1, tokens), 5)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _code() -> dict[str, Any]:
    """The commit of the checkout this trainer runs from, and whether it had local changes.

    Why: the data set's hash and the config name what went in, but the code that built the
    examples and ran the steps changes between commits (the shipped adapter was made by an older
    commit's data builder); with the commit recorded, reproducing an adapter is one
    ``git checkout`` away. ``None`` values outside a git checkout (an installed package).
    """
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        top, commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
        # An installed copy inside some other repository (a venv in a project) is not that repository's code.
        if Path(top).resolve() != root:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def train(cfg: FinetuneConfig, data: str | Path, out: str | Path, *, echo: Echo = print, restart: bool = False,
          stop_after: int | None = None, cache_dir: str | Path | None = None) -> TrainResult:
    """Train (or resume) the LoRA adapter of ``cfg`` on the data set ``data`` into the run folder ``out``.

    Args:
        cfg: The validated configuration.
        data: A data set built by :mod:`finetune.dataset` (its manifest hash is checked).
        out: The run folder (checkpoints, final adapter).
        restart: Ignore (delete) existing checkpoints instead of resuming from the last one.
        stop_after: Stop after this optimizer step, as if the run were killed right after its
            checkpoint (tests; the same as killing the process).
        cache_dir: Model cache (where de-quantised GGUF bases are kept).

    Raises:
        ConfigError, DatasetError: a bad setting, base model, data set or checkpoint, named.
    """
    import torch

    from detectors.threads import torch_threads

    out = Path(out)
    t_start = time.perf_counter()
    spec = cfg.train
    examples, manifest = load_dataset(data)
    assert manifest is not None  # load_dataset(verify=True) requires it
    base = resolve_base(cfg.base, cache_dir)
    if cfg.export.gguf and base.kind != "gguf":
        echo("note: export.gguf is on but the base is not a GGUF; the llama.cpp adapter is not written")
    torch.set_num_threads(torch_threads(spec.threads))
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    try:
        import numpy as np

        np.random.seed(spec.seed)
    except ImportError:  # pragma: no cover
        pass

    t0 = time.perf_counter()
    model, tok = load_base(base, dtype=spec.dtype, quantization=spec.quantization, device=spec.device,
                           cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    layers = _target_check(model, cfg.lora.target_modules, cfg.lora.layers_from)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    encoded: list[Encoded] = []
    dropped: list[tuple[str, int]] = []
    for ex in examples:
        e = encode(tok, ex, spec.max_length)
        if e is None:
            prompt, completion = chat_texts(tok, ex.messages, ex.answer)
            dropped.append((ex.id, len(tok(prompt + completion, add_special_tokens=False)["input_ids"])))
        else:
            encoded.append(e)
    if not encoded:
        shortest = min(n for _, n in dropped)
        raise ConfigError(f"train.max_length {spec.max_length} drops every example (the shortest has {shortest} "
                          "tokens); raise it")
    rng = random.Random(f"{spec.seed}:holdout")
    n_eval = min(spec.eval_examples, len(encoded) // 4)
    eval_idx = set(rng.sample(range(len(encoded)), n_eval)) if n_eval else set()
    held = [e for i, e in enumerate(encoded) if i in eval_idx]
    train_set = [e for i, e in enumerate(encoded) if i not in eval_idx]
    if not train_set:
        raise DatasetError(f"{data}: no training examples left after holding out {n_eval} for evaluation")
    twins = sum(e.twin_ids is not None for e in train_set)
    if spec.consistency > 0 and not twins:
        echo(f"warning: train.consistency is {spec.consistency:g} but no training example has a clean twin "
             "(build the data set with finetune-data --twins); the term does nothing")
    echo(f"{cfg.name}: {len(train_set)} training examples ({dict(Counter(e.case for e in train_set))}, "
         f"{twins} with a clean twin), "
         f"{len(held)} held out, {len(dropped)} longer than {spec.max_length} tokens dropped; "
         f"base {base.name} loaded in {load_s:.1f} s")

    from peft import LoraConfig, get_peft_model

    if spec.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    device = next(model.parameters()).device
    eval_before = _mean_loss(model, held, pad_id, device)
    torch.manual_seed(spec.seed)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM",
                      use_rslora=cfg.lora.use_rslora, layers_to_transform=layers)
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)

    digest = cfg.digest()
    if restart and _ckpt_dir(out).exists():
        shutil.rmtree(_ckpt_dir(out))
    ckpt = latest_checkpoint(out)
    start, losses, seconds_before = 1, [], 0.0
    resumed_from: int | None = None
    if ckpt is not None:
        for key, mine in (("config_sha256", digest), ("data_sha256", manifest.sha256)):
            if ckpt.state.get(key) != mine:
                raise ConfigError(f"{ckpt.path} was made with another {key.split('_')[0]} ({key} "
                                  f"{str(ckpt.state.get(key))[:16]}..., this run {mine[:16]}...); use a new --out "
                                  "or --restart")
        _load_checkpoint(ckpt, model, optimizer)
        start, losses = ckpt.step + 1, list(ckpt.state.get("losses", []))
        seconds_before = float(ckpt.state.get("train_seconds", 0.0))
        resumed_from = ckpt.step
        echo(f"resuming from {ckpt.path.name} (step {ckpt.step} of {spec.steps})")

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    model.train()
    t_loop = time.perf_counter()
    warned = False
    for step in range(start, spec.steps + 1):
        t_step = time.perf_counter()
        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens, ids = 0.0, 0, []
        for micro in batch_indices(step, spec, len(train_set)):
            items = [train_set[i] for i in micro]
            ids.extend(e.id for e in items)
            if spec.consistency > 0 and any(e.twin_ids is not None for e in items):
                # one at a time: each item's answer positions are compared with its own twin's
                loss = sum(twin_loss(model, e, spec.consistency, device) for e in items) / (len(items) * spec.grad_accum)
            else:
                batch = {k: v.to(device) for k, v in _collate(items, pad_id).items()}
                loss = answer_loss(model, batch) / spec.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            step_tokens += sum(len(e.input_ids) for e in items)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t_step
        losses.append(round(step_loss, 5))
        row = {"step": step, "loss": round(step_loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
               "tokens": step_tokens, "seconds": round(dt, 2), "examples": ids}
        with log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        done = step - start + 1
        pace = (time.perf_counter() - t_loop) / done
        echo(f"step {step}/{spec.steps} loss {step_loss:.4f} lr {lr:.2e} {dt:.1f} s "
             f"({step_tokens} tokens), eta {pace * (spec.steps - step) / 60:.1f} min")
        if cfg.budget_minutes and not warned and done >= 2:
            projected = (time.perf_counter() - t_start + pace * (spec.steps - step)) / 60
            if projected > cfg.budget_minutes:
                echo(f"warning: at {pace:.1f} s/step this run needs ~{projected:.0f} min, over its "
                     f"{cfg.budget_minutes:g}-minute budget (a busy or slower machine?)")
            warned = True
        if step % spec.save_every == 0 or step == spec.steps:
            state = {"config_sha256": digest, "data_sha256": manifest.sha256, "losses": losses,
                     "train_seconds": round(seconds_before + time.perf_counter() - t_loop, 2)}
            _save_checkpoint(out, model, optimizer, step, state, spec.keep_checkpoints)
        if stop_after is not None and step >= stop_after and step < spec.steps:
            return TrainResult(out=out, step=step, finished=False, resumed_from=resumed_from)

    train_seconds = seconds_before + time.perf_counter() - t_loop
    steps_run = spec.steps - start + 1
    eval_after = _mean_loss(model, held, pad_id, device)
    metrics = {
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_last10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 5) if losses else None,
        "train_losses": losses,
        "eval_loss_before": eval_before, "eval_loss_after": eval_after, "eval_examples": len(held),
        "train_examples": len(train_set), "dropped_too_long": len(dropped),
        "examples_seen": spec.steps * spec.examples_per_step,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step_this_session": round((time.perf_counter() - t_loop) / steps_run, 2) if steps_run > 0 else None,
        "base_load_seconds": round(load_s, 1),
    }
    adapter = _write_adapter(model, out, cfg, base, manifest, data, metrics, resumed_from)
    gguf_path = None
    if cfg.export.gguf and base.kind == "gguf":
        gguf_path = _write_gguf(adapter, out, base, manifest)
    echo(f"adapter written to {adapter}" + (f" and {gguf_path}" if gguf_path else "") +
         f"; held-out answer loss {eval_before} -> {eval_after}")
    return TrainResult(out=out, step=spec.steps, finished=True, adapter=adapter, gguf=gguf_path,
                       resumed_from=resumed_from, metrics=metrics)


def _write_adapter(model: Any, out: Path, cfg: FinetuneConfig, base: ResolvedBase, manifest: Manifest,
                   data: str | Path, metrics: dict[str, Any], resumed_from: int | None) -> Path:
    final = out / "adapter"
    tmp = out / f".adapter.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    meta = {
        "format": 1,
        "name": cfg.name,
        "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "base": base.describe(),
        "dataset": {"path": str(Path(data).resolve()), "sha256": manifest.sha256, "examples": manifest.examples,
                    "cases": manifest.cases, "teacher_version": manifest.teacher_version,
                    "prompt_version": manifest.prompt_version},
        "config": cfg.model_dump(mode="json"),
        "config_sha256": cfg.digest(),
        "steps": cfg.train.steps,
        "resumed_from_step": resumed_from,
        "metrics": metrics,
        "versions": _versions(),
        "code": _code(),
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    swap_in(tmp, final)
    return final


def _write_gguf(adapter: Path, out: Path, base: ResolvedBase, manifest: Manifest) -> Path:
    from finetune.export import export_adapter

    target = out / "adapter.gguf"
    tmp_target = out / f".adapter.gguf.{os.getpid()}.new"
    export_adapter(adapter, tmp_target, base.path,
                   metadata={"base_sha256": base.sha256, "dataset_sha256": manifest.sha256})
    swap_in(tmp_target, target)
    return target


# ================================================================================ CLI

def main(argv: list[str] | None = None) -> int:
    """``anomaly-agent finetune --config CONFIG --data DATA.jsonl --out RUN_DIR``; 0 ok, 2 bad input, 130 interrupted."""
    ap = argparse.ArgumentParser(prog="finetune", description="LoRA fine-tuning of the explainer model "
                                 "(resumes from the last checkpoint in --out).")
    ap.add_argument("--config", required=True, help="a YAML file, or a bundled name (smollm2-135m, ...)")
    ap.add_argument("--data", required=True, help="data set built by finetune.dataset (JSON lines + manifest)")
    ap.add_argument("--out", required=True, help="run folder: checkpoints/, adapter/, adapter.gguf")
    ap.add_argument("--restart", action="store_true", help="discard existing checkpoints instead of resuming")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (e.g. a short timing run)")
    ap.add_argument("--threads", type=int, default=None, help="override train.threads")
    ap.add_argument("--consistency", type=float, default=None, metavar="W",
                    help="override train.consistency (the twin-consistency weight; needs a data set built with --twins)")
    ap.add_argument("--seed", type=int, default=None,
                    help="override train.seed (adapter init, dropout and example order): seed-to-seed spread")
    ap.add_argument("--no-export", action="store_true", help="do not write adapter.gguf")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    overrides: dict[str, Any] = {}
    if a.steps is not None:
        overrides["train.steps"] = a.steps
    if a.threads is not None:
        overrides["train.threads"] = a.threads
    if a.consistency is not None:
        overrides["train.consistency"] = a.consistency
    if a.seed is not None:
        overrides["train.seed"] = a.seed
    if a.no_export:
        overrides["export.gguf"] = False
    try:
        cfg = load_config(a.config, overrides)
        result = train(cfg, a.data, a.out)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume from the last checkpoint in {a.out}", file=sys.stderr)
        return 130
    print(json.dumps({k: v for k, v in asdict(result).items() if k != "metrics"}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
