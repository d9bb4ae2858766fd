"""``anomaly-agent bench explain``: the explainer's cost against raw llama.cpp, in one run.

For each synthetic candidate (``eval.explain.synth_candidates``: every anomaly kind, a normal
one, borderline copies) the same prompt and schema go

* through the product: ``Explainer.explain`` (retrieval from the example knowledge base,
  rules, prompt rendering, our generation path with lazy grammar checking, validation,
  decision), cache off; and
* straight to llama-cpp-python: ``Llama.create_chat_completion(messages, response_format=
  {"type": "json_object", "schema": ...}, temperature=0)`` -- what a user of the library
  would write for the same constrained answer.

Each path has its own ``Llama`` instance (same GGUF, same threads), so each keeps its own KV
cache and sees the same sequence of prompts: neither gains from the other's prefix cache.
The two calls for a candidate run back to back, alternating which goes first, so machine
noise hits both alike. Reported:

* ``overhead_share`` = (retrieval + prompt + validation + decision) / model time, from the
  explainer's own timers: what the product adds around the model (target <= 0.30);
* ``ratio_vs_raw`` = our total time / raw llama-cpp-python time for the same prompt:
  below 1 means the product is faster end to end than calling the library directly;
* latencies p50/p90 of both, tokens generated and grammar rejections.

Absolute seconds depend on what else runs on the machine; the ratios are the result.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from eval.results import percentile

__all__ = ["bench_explain"]



def bench_explain(model: str = "smollm2-135m", repeats: int = 1, knowledge: bool = True,
                  echo: Any = print) -> dict[str, Any]:
    """Run the comparison; see the module doc."""
    from agent.explain import Explainer
    from agent.models import LlamaCppModel
    from eval.explain import example_store, synth_candidates

    ours = LlamaCppModel(model).load()
    raw_model = LlamaCppModel(model).load()
    raw = raw_model._llm
    cands = synth_candidates()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-explain-kb-") as tmp:
        store = example_store(Path(tmp) / "kb") if knowledge else None
        explainer = Explainer(ours, store=store, rules=[], use_cache=False)
        builder = Explainer(None, store=store, rules=[])
        order = [k for _ in range(repeats) for k in cands.by_kind]
        for n, kind in enumerate(order):
            cand = cands.by_kind[kind]
            _prompt, schema, messages = builder.build_prompt(cand)
            md = [{"role": m.role, "content": m.content} for m in messages]

            def run_ours() -> float:
                before = dict(explainer.stats.as_dict())
                t = time.perf_counter()
                explainer.explain(cand)
                took = time.perf_counter() - t
                after = explainer.stats.as_dict()
                row.update(ours_s=round(took, 4), ours_model_s=round(after["model_s"] - before["model_s"], 4),
                           ours_calls=after["model_calls"] - before["model_calls"],
                           ours_tokens=ours.last_usage.get("completion_tokens"),
                           rejections=ours.last_usage.get("grammar_rejections"))
                return took

            def run_raw() -> float:
                t = time.perf_counter()
                out = raw.create_chat_completion(messages=md, max_tokens=explainer.max_tokens, temperature=0.0,
                                                 seed=raw_model.seed,
                                                 response_format={"type": "json_object", "schema": schema})
                took = time.perf_counter() - t
                row.update(raw_s=round(took, 4), raw_tokens=(out.get("usage") or {}).get("completion_tokens"))
                return took

            row: dict[str, Any] = {"candidate": kind}
            for fn in ((run_ours, run_raw) if n % 2 == 0 else (run_raw, run_ours)):
                fn()
            rows.append(row)
            echo(f"  {kind}: ours {row['ours_s']:.2f}s ({row['ours_calls']} call(s), {row['ours_tokens']} tokens) "
                 f"vs raw {row['raw_s']:.2f}s ({row['raw_tokens']} tokens)")
        stats = explainer.stats.as_dict()
    ours.close()
    raw_model.close()
    around = stats["retrieval_s"] + stats["prompt_s"] + stats["validate_s"]
    ours_t = [r["ours_s"] for r in rows]
    raw_t = [r["raw_s"] for r in rows]
    single = [r for r in rows if r["ours_calls"] == 1]  # same work as one raw call (no retry)
    result = {
        "model": ours.model_id, "threads": ours.threads, "candidates": len(rows),
        "overhead_share": round(around / stats["model_s"], 4) if stats["model_s"] else None,
        "overhead_seconds": round(around, 3), "model_seconds": round(stats["model_s"], 3),
        "ratio_vs_raw": round(sum(r["ours_s"] for r in single) / sum(r["raw_s"] for r in single), 4) if single else None,
        "ours_p50_s": percentile(ours_t, 0.5), "ours_p90_s": percentile(ours_t, 0.9),
        "raw_p50_s": percentile(raw_t, 0.5), "raw_p90_s": percentile(raw_t, 0.9),
        "ours_mean_tokens": round(statistics.fmean(r["ours_tokens"] or 0 for r in rows), 1) if rows else None,
        "retries": sum(r["ours_calls"] > 1 for r in rows), "fallbacks": stats["fallbacks"],
        "stats": stats, "rows": rows,
    }
    echo(f"bench explain ({result['model']}, {result['threads']} threads, {len(rows)} candidates): overhead "
         f"{result['overhead_share']:.1%} of model time; ours/raw llama-cpp-python {result['ratio_vs_raw']}x; "
         f"p50 ours {result['ours_p50_s']} s vs raw {result['raw_p50_s']} s")
    return result
