"""peft LoRA -> GGUF LoRA: format, the q/k rope permutation, and agreement with llama.cpp on the real SmolLM2.

The real-model test compares *logit changes*: ``tf(base+LoRA) - tf(base)`` against
``llama.cpp(base+GGUF LoRA) - llama.cpp(base)`` on the same token ids. The Q4_1 base in llama.cpp
and its de-quantised copy in transformers agree closely but not exactly, so raw logits alone
would hide a wrong export; the deltas do not: with the rows of q/k's B matrices left
unpermuted the correlation collapses (checked here as a negative control, so the test can fail).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import finetune.export as fe
from finetune.export import ExportError, GGUFBaseInfo, export_adapter, permute_rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_adapter(model: Any, folder: Path, *, r: int, alpha: float, scale: float, seed: int = 1,
                    targets: list[str] = TARGETS, **lora: Any) -> Any:
    """A peft LoRA with non-zero random B (peft initialises B to zero: an export bug would not show)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                          task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(str(folder))
    return pm


def test_permutation_is_the_inverse_of_transformers_loader() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    for n_head, n_kv, rows in ((9, 9, 576), (9, 3, 192), (4, 2, 16)):
        w = rng.standard_normal((rows, 7)).astype(np.float32)
        undone = LlamaTensorProcessor(config={})._reverse_permute_weights(permute_rows(w, n_head, n_kv), n_head, n_kv)
        assert np.array_equal(undone, w)
        assert not np.array_equal(permute_rows(w, n_head, n_kv), w)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, list[int]]]:
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    data = {t.name: np.array(t.data) for t in reader.tensors}
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    return kv, data, shapes


def test_gguf_layout_names_shapes_and_permutation(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _random_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_base)), tmp_path / "ad", r=4, alpha=8, scale=0.1)
    info = GGUFBaseInfo("llama", n_layers=2, n_head=4, n_head_kv=2)
    res = export_adapter(tmp_path / "ad", tmp_path / "ad.gguf", info=info, metadata={"dataset_sha256": "abc"})
    kv, data, shapes = _read(res.path)
    assert kv["general.architecture"] == "llama" and kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == pytest.approx(8.0)
    assert kv["anomaly_agent.dataset_sha256"] == "abc"
    assert res.tensors == len(data) == 2 * 2 * len(TARGETS)
    assert sorted(res.permuted) == ["blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_q.weight"]
    # ggml order (innermost first): a = [n_in, r], b = [r, n_out]; q: 32 -> 32, k: 32 -> 16, down: 64 -> 32.
    assert shapes["blk.0.attn_q.weight.lora_a"] == [32, 4] and shapes["blk.0.attn_q.weight.lora_b"] == [4, 32]
    assert shapes["blk.1.attn_k.weight.lora_b"] == [4, 16] and shapes["blk.1.ffn_down.weight.lora_a"] == [64, 4]
    from safetensors.numpy import load_file

    peft_w = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.{}.lora_{}.weight"
    assert np.array_equal(data["blk.1.attn_q.weight.lora_a"], peft_w[key.format("q_proj", "A")])  # A: never permuted
    assert np.array_equal(data["blk.1.attn_q.weight.lora_b"], permute_rows(peft_w[key.format("q_proj", "B")], 4, 4))
    assert np.array_equal(data["blk.1.attn_k.weight.lora_b"], permute_rows(peft_w[key.format("k_proj", "B")], 4, 2))
    assert np.array_equal(data["blk.1.attn_v.weight.lora_b"], peft_w[key.format("v_proj", "B")])
    # qwen2 (NEOX rope) is not permuted by either converter.
    res2 = export_adapter(tmp_path / "ad", tmp_path / "q.gguf", info=GGUFBaseInfo("qwen2", 2, 4, 2))
    _, data2, _ = _read(res2.path)
    assert res2.permuted == () and np.array_equal(data2["blk.1.attn_q.weight.lora_b"], peft_w[key.format("q_proj", "B")])


def test_scaling_and_refusals(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    info = GGUFBaseInfo("llama", 2, 4, 2)
    _random_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_base)), tmp_path / "rs", r=4, alpha=8, scale=0.1,
                    use_rslora=True)
    kv, _, _ = _read(export_adapter(tmp_path / "rs", tmp_path / "rs.gguf", info=info).path)
    assert kv["adapter.lora.alpha"] == pytest.approx(8 * 2.0)  # alpha/sqrt(r) == alpha'/r
    cfg_path = tmp_path / "rs" / "adapter_config.json"
    original = cfg_path.read_text()
    for change, message in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"bias": "all"}, "bias")):
        cfg_path.write_text(json.dumps({**json.loads(original), **change}))
        with pytest.raises(ExportError, match=message):
            export_adapter(tmp_path / "rs", tmp_path / "x.gguf", info=info)
    cfg_path.write_text(original)
    with pytest.raises(ExportError, match="not a peft adapter"):
        export_adapter(tmp_path, tmp_path / "x.gguf", info=info)
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------ the real model

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "<|im_start|>user\nIs a write exception on one DataNode an anomaly?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def smollm2(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:
        pytest.skip(f"llama_cpp does not import ({type(exc).__name__}: {exc}); pip install llama-cpp-python")
    from agent.models import ModelNotInstalled, resolve_preset
    from finetune.base import dequantised_folder, resolve_base
    from finetune.config import BaseSpec, ConfigError

    try:
        gguf_path = resolve_preset("smollm2-135m")
    except ModelNotInstalled as exc:
        pytest.skip(str(exc))
    # The de-quantised copy is cached across runs in pytest's cache (30 s to build, 2 s to load).
    cache = request.config.cache.mkdir("finetune-model-cache") if getattr(request.config, "cache", None) else None
    try:
        folder = dequantised_folder(resolve_base(BaseSpec(preset="smollm2-135m")), cache)
    except ConfigError as exc:
        pytest.skip(str(exc))
    return gguf_path, folder


def _llama_logits(gguf_path: Path, lora: Path | None, ids: list[list[int]]) -> list[np.ndarray]:
    from llama_cpp import Llama

    kw: dict[str, Any] = {"model_path": str(gguf_path), "n_ctx": 128, "logits_all": True, "verbose": False,
                          "n_threads": 1, "n_threads_batch": 1, "seed": 0}
    if lora is not None:
        kw["lora_path"] = str(lora)
    llm = Llama(**kw)
    try:
        out = []
        for seq in ids:
            llm.reset()
            llm.eval(seq)
            out.append(np.array(llm.scores[: len(seq)], dtype=np.float64))
        return out
    finally:
        llm.close()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_llama_cpp_with_exported_adapter_matches_transformers(smollm2: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    gguf_path, folder = smollm2
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    pm = _random_adapter(AutoModelForCausalLM.from_pretrained(str(folder)), tmp_path / "ad", r=8, alpha=16,
                         scale=0.12)
    with torch.no_grad():
        tf_lora = [pm(input_ids=torch.tensor([s])).logits[0].double().numpy() for s in ids]
        with pm.disable_adapter():
            tf_base = [pm(input_ids=torch.tensor([s])).logits[0].double().numpy() for s in ids]
    res = export_adapter(tmp_path / "ad", tmp_path / "ad.gguf", gguf_path)
    assert len(res.permuted) == 60  # q and k of 30 layers
    cpp_base = _llama_logits(gguf_path, None, ids)
    cpp_lora = _llama_logits(gguf_path, res.path, ids)

    top1 = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(tf_lora, cpp_lora)])
    changed = np.concatenate([a.argmax(-1) != b.argmax(-1) for a, b in zip(cpp_base, cpp_lora)])
    deltas = [_corr(tl - tb, cl - cb) for tl, tb, cl, cb in zip(tf_lora, tf_base, cpp_lora, cpp_base)]
    base_gap = np.mean([np.abs(tb - cb).mean() for tb, cb in zip(tf_base, cpp_base)])
    lora_shift = np.mean([np.abs(cl - cb).mean() for cl, cb in zip(cpp_lora, cpp_base)])
    print(f"\nall-module adapter: delta corr {np.round(deltas, 4).tolist()}, top-1 tf/llama.cpp {top1.mean():.3f}, "
          f"top-1 changed by the adapter {changed.mean():.3f}, mean |shift| {lora_shift:.3f} vs base gap {base_gap:.3f}")
    # The adapter changes llama.cpp's output far beyond the quantisation gap, in the same way as in transformers.
    assert lora_shift > 5 * base_gap, (lora_shift, base_gap)
    assert changed.mean() >= 0.2, changed.mean()
    assert min(deltas) > 0.9, deltas
    assert top1.mean() >= 0.85, top1.mean()

    # The permutation on its own: a q/k-only adapter, exported right and (negative control) without
    # the row permutation. Only the right one agrees with transformers.
    pm.unload()
    qk = _random_adapter(AutoModelForCausalLM.from_pretrained(str(folder)), tmp_path / "qk", r=8, alpha=16,
                         scale=0.3, seed=2, targets=["q_proj", "k_proj"])
    with torch.no_grad():
        tf_qk = [qk(input_ids=torch.tensor([s])).logits[0].double().numpy() for s in ids]
    right = export_adapter(tmp_path / "qk", tmp_path / "qk.gguf", gguf_path)
    monkeypatch.setattr(fe, "PERMUTED_ARCHS", frozenset())
    wrong = export_adapter(tmp_path / "qk", tmp_path / "wrong.gguf", gguf_path)
    assert len(right.permuted) == 60 and wrong.permuted == ()
    cpp_right = _llama_logits(gguf_path, right.path, ids)
    cpp_wrong = _llama_logits(gguf_path, wrong.path, ids)
    right_d = [_corr(tq - tb, cr - cb) for tq, tb, cr, cb in zip(tf_qk, tf_base, cpp_right, cpp_base)]
    wrong_d = [_corr(tq - tb, cw - cb) for tq, tb, cw, cb in zip(tf_qk, tf_base, cpp_wrong, cpp_base)]
    print(f"q/k-only adapter: delta corr permuted {np.round(right_d, 4).tolist()}, unpermuted {np.round(wrong_d, 4).tolist()}")
    assert min(right_d) > 0.9, right_d
    assert max(wrong_d) < 0.5, wrong_d


def test_llama_cpp_model_serves_the_adapter(smollm2: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from agent.models import LlamaCppModel, Message

    gguf_path, folder = smollm2
    _random_adapter(AutoModelForCausalLM.from_pretrained(str(folder)), tmp_path / "ad", r=4, alpha=8, scale=0.05,
                    targets=["q_proj", "v_proj"])
    path = export_adapter(tmp_path / "ad", tmp_path / "adapter.gguf", gguf_path).path
    model = LlamaCppModel("smollm2-135m", lora_path=path, threads=1, n_ctx=256, timeout=60)
    try:
        reply = model.generate([Message(role="user", content="Say hi.")], max_tokens=4)
        assert isinstance(reply.content, str)
        assert model.adapter is not None and model.adapter.startswith("adapter.gguf@")
    finally:
        model.close()


def test_bench_adapter_serves_one_adapter_through_both_backends(smollm2: tuple[Path, Path], tmp_path: Path,
                                                                request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForCausalLM

    from eval.adapter_bench import bench_adapter

    gguf_path, folder = smollm2
    run = tmp_path / "run"
    _random_adapter(AutoModelForCausalLM.from_pretrained(str(folder)), run / "adapter", r=4, alpha=8, scale=0.05,
                    targets=["q_proj", "v_proj"])
    export_adapter(run / "adapter", run / "adapter.gguf", gguf_path)
    cache = request.config.cache.mkdir("finetune-model-cache") if getattr(request.config, "cache", None) else None
    result = bench_adapter(run / "adapter.gguf", prompts=2, threads=1, max_tokens=6, cache_dir=cache, echo=lambda _: None)
    assert result["prompts"] == 2 and result["peft_adapter"] == str(run / "adapter")
    for name in ("llama.cpp", "transformers"):
        assert all(r[name]["tokens"] >= 1 and r[name]["seconds"] > 0 for r in result["rows"]), result["rows"]
        assert result[name]["tokens_per_s"] > 0
    assert result["ratio"] > 0
    (tmp_path / "lone.gguf").write_bytes((run / "adapter.gguf").read_bytes())
    with pytest.raises(FileNotFoundError, match="no peft adapter folder .*lone.gguf"):
        bench_adapter(tmp_path / "lone.gguf", cache_dir=cache)
