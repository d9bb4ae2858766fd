"""``anomaly-agent bench adapter``: serve the tuned explainer through llama.cpp or transformers?

The fine-tuning issue leaves the choice open: export the peft adapter to a GGUF LoRA for
llama.cpp, or serve the peft adapter through transformers -- "whichever is faster here". This
bench answers it on this machine, in one run: the same explainer prompts (rendered by
``Explainer.build_prompt`` for the synthetic candidates of ``eval.explain.synth_candidates``)
and the same JSON schema go to

* ``LlamaCppModel`` -- the shipped GGUF base (Q4_1) with the exported GGUF LoRA, our lazy
  grammar path; and
* ``TransformersModel`` -- the same base dequantised to float32 (the training copy), the peft
  adapter applied, llguidance masking the logits;

both greedy, same threads, alternating which goes first per prompt so machine noise hits both
alike. Reported per backend: seconds per answer (p50, mean), completion tokens per second, and
whether the answers parse; ``ratio`` = transformers time / llama.cpp time over all prompts
(above 1: llama.cpp is faster). Loading time is reported apart. Absolute seconds depend on
what else runs on the machine; the ratio is the result.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from eval.results import percentile

__all__ = ["bench_adapter"]



def _peft_folder(adapter: Path) -> Path:
    """The peft adapter folder that belongs to a GGUF LoRA (a run's ``adapter/`` beside it)."""
    for folder in (adapter.with_suffix(""), adapter.parent / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise FileNotFoundError(f"no peft adapter folder (adapter_config.json) next to {adapter}; give a training run's "
                            "adapter.gguf, whose adapter/ folder holds the peft weights")


def bench_adapter(adapter: str | Path, preset: str = "smollm2-135m", prompts: int = 6, threads: int | None = None,
                  max_tokens: int | None = None, cache_dir: str | Path | None = None,
                  echo: Any = print) -> dict[str, Any]:
    """Run the comparison for ``adapter`` (a run's ``adapter.gguf``); see the module doc.

    Args:
        adapter: The GGUF LoRA; the peft adapter it was exported from must sit beside it
            (``RUN/adapter/`` next to ``RUN/adapter.gguf``, as training writes them).
        preset: The llama.cpp preset the adapter was trained on.
        prompts: How many explainer prompts each backend answers.
        threads: Threads for both backends (default min(2, cores)).
        max_tokens: Generation limit (default: the explainer's).
        cache_dir: Where the dequantised transformers copy of the base is cached.
    """
    from agent.explain import Explainer, parse_answer
    from agent.hf_models import TransformersModel
    from agent.models import LlamaCppModel
    from eval.explain import example_store, synth_candidates
    from finetune.base import dequantised_folder, resolve_base
    from finetune.config import BaseSpec

    gguf_adapter = Path(adapter)
    if not gguf_adapter.is_file():
        raise FileNotFoundError(f"adapter not found: {gguf_adapter} (give the adapter.gguf a training run wrote)")
    peft_dir = _peft_folder(gguf_adapter)
    base = resolve_base(BaseSpec(preset=preset))
    t = time.perf_counter()
    llama = LlamaCppModel(preset, threads=threads, lora_path=gguf_adapter, timeout=300).load()
    llama_load = time.perf_counter() - t
    t = time.perf_counter()
    hf = TransformersModel(dequantised_folder(base, cache_dir), adapter_path=peft_dir, threads=threads, timeout=300).load()
    hf_load = time.perf_counter() - t
    cands = synth_candidates()
    backends = {"llama.cpp": llama, "transformers": hf}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-adapter-kb-") as tmp:
        builder = Explainer(None, store=example_store(Path(tmp) / "kb"), rules=[])
        for n, kind in enumerate(list(cands.by_kind)[:prompts]):
            prompt, schema, messages = builder.build_prompt(cands.by_kind[kind])
            row: dict[str, Any] = {"candidate": kind}
            for name in (("llama.cpp", "transformers") if n % 2 == 0 else ("transformers", "llama.cpp")):
                model = backends[name]
                t = time.perf_counter()
                reply = model.generate(messages, schema=schema, max_tokens=max_tokens or builder.max_tokens)
                took = time.perf_counter() - t
                try:
                    parse_answer(reply.content, prompt.unalias)
                    valid = True
                except Exception:  # noqa: BLE001 - any refusal counts as invalid
                    valid = False
                row[name] = {"seconds": round(took, 3), "tokens": int(model.last_usage.get("completion_tokens") or 0),
                             "valid": valid}
            rows.append(row)
            echo(f"  {kind}: llama.cpp {row['llama.cpp']['seconds']:.2f}s ({row['llama.cpp']['tokens']} tokens) vs "
                 f"transformers {row['transformers']['seconds']:.2f}s ({row['transformers']['tokens']} tokens)")
    llama.close()
    close = getattr(hf, "close", None)
    if callable(close):
        close()

    def summary(name: str, load_s: float) -> dict[str, Any]:
        secs = [r[name]["seconds"] for r in rows]
        toks = sum(r[name]["tokens"] for r in rows)
        return {"load_s": round(load_s, 2), "p50_s": percentile(secs, 0.5), "mean_s": round(statistics.fmean(secs), 3) if secs else None,
                "tokens_per_s": round(toks / sum(secs), 2) if secs and sum(secs) else None,
                "valid": sum(r[name]["valid"] for r in rows)}

    total = {name: sum(r[name]["seconds"] for r in rows) for name in backends}
    result = {"preset": preset, "adapter": str(gguf_adapter), "peft_adapter": str(peft_dir), "prompts": len(rows),
              "threads": llama.threads, "llama.cpp": summary("llama.cpp", llama_load),
              "transformers": summary("transformers", hf_load),
              "ratio": round(total["transformers"] / total["llama.cpp"], 3) if total["llama.cpp"] else None,
              "rows": rows}
    echo(f"bench adapter ({preset}, {len(rows)} prompts, {result['threads']} threads): transformers + peft takes "
         f"{result['ratio']}x the time of llama.cpp + GGUF LoRA (p50 {result['transformers']['p50_s']} s vs "
         f"{result['llama.cpp']['p50_s']} s); valid {result['transformers']['valid']} vs {result['llama.cpp']['valid']}")
    return result
