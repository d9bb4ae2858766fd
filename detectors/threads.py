"""How many threads torch and llama.cpp may use: one setting for detectors, the embedder, the model and training."""

from __future__ import annotations

import os


def torch_threads(explicit: int | None = None) -> int:
    """``explicit`` if given, else ``ANOMALY_AGENT_THREADS``, else min(2, cores).

    A setting, because on a shared 2-core machine torch slows down 3-10x when it
    oversubscribes the cores another process is using.
    """
    if explicit:
        return max(1, int(explicit))
    env = os.environ.get("ANOMALY_AGENT_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(2, os.cpu_count() or 1))
