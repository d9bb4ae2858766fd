"""The transformers backend: local causal LMs and vision-language models run by torch.

Kept apart from :mod:`agent.models` so that importing the llama.cpp and endpoint backends does
not import torch and transformers; this module itself imports them only on first use too.

What a model folder is decides how it runs (:func:`model_kind`): a config naming an
image-text-to-text architecture (SmolVLM/Idefics3, LLaVA, ...) is loaded with
``AutoModelForImageTextToText`` and ``AutoProcessor`` and may be shown images; anything else
that transformers knows as a causal LM is loaded with ``AutoModelForCausalLM`` and refuses
images with a :class:`~agent.models.ModelError` naming the model.

Schema-constrained decoding (:class:`JsonSchemaLogitsProcessor`) uses ``llguidance``, the
Rust grammar engine behind llama.cpp's and vLLM's JSON-schema support: it compiles the schema
(ordered properties, ``maxLength``, ``minItems``/``maxItems``, enums of strings and numbers,
nested objects) into a token mask computed in ~0.1 ms per token on CPU, from the model's own
fast tokenizer, with no download. ``lm-format-enforcer`` 0.11.3 (its newest release) was
tried first: its transformers integration does not import with transformers 5
(``transformers.tokenization_utils`` is gone). Output is compact JSON (no whitespace between
tokens), the form the fine-tuning data is written in (``finetune/teacher.py``), and each
token costs time on a CPU.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from agent.models import (
    DEFAULT_MAX_TOKENS,
    Message,
    ModelError,
    ModelNotInstalled,
    ModelTimeout,
    _env,
    run_with_deadline,
    sha256_file,
)
from detectors.threads import torch_threads

__all__ = [
    "ADAPTER_FILES",
    "DTYPES",
    "JsonSchemaLogitsProcessor",
    "ModelKind",
    "TransformersModel",
    "adapter_fingerprint",
    "model_kind",
]

ModelKind = Literal["causal-lm", "image-text-to-text"]
"""How a model folder runs: text only (``AutoModelForCausalLM``) or with images
(``AutoModelForImageTextToText`` + ``AutoProcessor``)."""

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
"""peft's adapter weight file names, in the order peft itself looks for them."""

ADAPTER_CONFIG = "adapter_config.json"

DTYPES = ("float32", "bfloat16", "float16", "auto")
"""Weight dtypes :class:`TransformersModel` accepts. float32 is the default because CPUs without
bf16 instructions run bf16 matmuls several times slower, and transformers 5 otherwise loads the
checkpoint's own dtype (``auto``)."""

LLGUIDANCE_PIP = "pip install llguidance==1.9.1"

JSON_GRAMMAR_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
"""llguidance JSON options: compact separators and no free whitespace, so a model cannot spend
its token budget on blanks (a random or weak model otherwise does)."""


# =============================================================================== helpers

def adapter_fingerprint(path: str | Path) -> str:
    """First 12 hex digits of a SHA-256 over a peft adapter's config and weights.

    Goes into the backend's ``adapter`` id, so verdict provenance and the explanation cache key
    change when the adapter is retrained or re-scaled (``lora_alpha`` lives in the config, and
    changes outputs without changing the weights).

    Args:
        path: The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``).

    Returns:
        The hash prefix, or ``"missing"`` when the folder or its weights file does not exist
        (loading such an adapter fails later with :class:`~agent.models.ModelNotInstalled`).
    """
    folder = Path(path).expanduser()
    weights = next((folder / name for name in ADAPTER_FILES if (folder / name).is_file()), None)
    if not folder.is_dir() or weights is None:
        return "missing"
    h = hashlib.sha256()
    h.update(weights.name.encode("utf-8") + b"\x00" + sha256_file(weights).encode("ascii"))
    config = folder / ADAPTER_CONFIG
    if config.is_file():
        h.update(b"\x00" + config.read_bytes())
    return h.hexdigest()[:12]


def _mapping_names(mapping: Mapping[str, Any]) -> set[str]:
    """Class names in a transformers ``*_MAPPING_NAMES`` dict (values are names or tuples of names)."""
    out: set[str] = set()
    for value in mapping.values():
        out.update([value] if isinstance(value, str) else [v for v in value if isinstance(v, str)])
    return out


def _kind_of(config: Any, where: Path) -> ModelKind:
    """The :data:`ModelKind` of a loaded ``PretrainedConfig`` (see :func:`model_kind`)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    architectures = [str(a) for a in (getattr(config, "architectures", None) or [])]
    vision_classes = _mapping_names(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    text_classes = _mapping_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    # An architecture that takes images wins even when transformers also lists it as a causal LM
    # (Gemma3ForConditionalGeneration is in both maps): loaded as a causal LM it would drop images.
    if any(a in vision_classes for a in architectures):
        return "image-text-to-text"
    if any(a in text_classes for a in architectures):
        return "causal-lm"
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "image-text-to-text"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    raise ModelError(
        f"{where}: model_type {model_type!r} (architectures {architectures}) is neither a causal LM nor an "
        "image-text-to-text model known to this transformers; the transformers backend runs those two kinds only")


def model_kind(path: str | Path) -> ModelKind:
    """Whether a local model folder is a text-only causal LM or a vision-language model.

    Decided from ``config.json`` alone (no weights are read): first the ``architectures`` it
    names, then its ``model_type``, against transformers' own auto-class maps, so every model
    transformers can load either way is recognised without a list kept here.

    Args:
        path: A ``save_pretrained`` folder.

    Raises:
        ModelNotInstalled: The folder does not exist, or transformers is not installed.
        ModelError: The config cannot be read, or names a model of neither kind.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelNotInstalled(f"model folder not found: {folder}")
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ModelNotInstalled(f"the transformers backend needs transformers ({exc}); "
                                "install it with: pip install transformers") from None
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"transformers could not read the config of {folder}: {type(exc).__name__}: {exc}") from exc
    return _kind_of(config, folder)


def _open_image(path: str) -> Any:
    """An RGB PIL image from a message's image path; errors name the file."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as exc:  # UnidentifiedImageError, truncated files, decompression bombs
        raise ModelError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc


# =============================================================================== constrained decoding

class JsonSchemaLogitsProcessor:
    """A transformers logits processor that only lets through tokens that keep the output a prefix
    of JSON valid for a schema (greedy or sampled), via llguidance.

    Why a logits processor rather than validation and retry: a small model on a CPU spends
    seconds per answer, and an untuned one rarely writes schema-valid JSON on its own; masking
    every step makes every finished answer parse and validate. Once the JSON is complete only an
    EOS token is allowed, so generation stops there.

    One instance serves one generation of batch size 1: it consumes the tokens generated since
    the prompt on each call (transformers passes the whole sequence).

    Args:
        tokenizer: An ``llguidance.LLTokenizer`` for the model (see
            :meth:`TransformersModel.generate`, which builds and caches it).
        schema: The JSON schema.
        prompt_length: Number of prompt tokens in the ``input_ids`` transformers will pass.

    Raises:
        ValueError: llguidance cannot compile the schema (the message is llguidance's, naming
            the construct).
    """

    def __init__(self, tokenizer: Any, schema: Mapping[str, Any], prompt_length: int) -> None:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=JSON_GRAMMAR_OPTIONS)
        except Exception as exc:
            raise ValueError(f"llguidance cannot compile the schema: {exc}") from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"llguidance cannot compile the schema: {'; '.join(messages)}")
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"llguidance cannot compile the schema: {self._error()}")
        self.n_vocab = int(tokenizer.vocab_size)
        self.prompt_length = int(prompt_length)
        self.consumed = 0
        """Generated tokens the grammar has accepted so far."""

    def _error(self) -> str:
        """llguidance's error, without the parser state and grammar dump it appends."""
        text = (self._matcher.get_error() or "").split("<state>")[0].strip()
        return text[:300] or "dead end"

    def _advance(self, generated: Sequence[int]) -> None:
        for token in generated[self.consumed:]:
            if not self._matcher.consume_token(int(token)):
                raise ModelError(f"constrained decoding: token {int(token)} was generated against the grammar "
                                 f"({self._error()})")
            self.consumed += 1

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Mask ``scores`` (``[1, vocab]``) to the tokens the schema allows next."""
        import torch

        if input_ids.shape[0] != 1:
            raise ValueError(f"JsonSchemaLogitsProcessor serves batch size 1, got {input_ids.shape[0]}")
        self._advance(input_ids[0, self.prompt_length:].tolist())
        allowed = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        width = scores.shape[-1]
        if allowed.shape[0] < width:  # an lm_head wider than the grammar's vocabulary: extra rows never allowed
            allowed = torch.cat([allowed, torch.zeros(width - allowed.shape[0], dtype=torch.bool)])
        allowed = allowed[:width].to(scores.device)
        if not bool(allowed.any()):
            raise ModelError("constrained decoding: no token of this tokenizer can continue the JSON "
                             f"after {self.consumed} tokens ({self._error()})")
        return scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))

    def finish(self, generated: Sequence[int]) -> bool:
        """Feed the tokens generated after the last call; True when the JSON is complete.

        Args:
            generated: All generated tokens (the sequence after the prompt).
        """
        self._advance(generated)
        return bool(self._matcher.is_accepting())


# =============================================================================== backend

class TransformersModel:
    """A local model folder run by ``transformers`` (torch, CPU): a causal LM or a vision-language
    model, optionally with a peft LoRA adapter and bitsandbytes 4-bit weights.

    Args:
        model_path: A local model folder (``save_pretrained`` layout; for vision-language models
            with the processor saved beside it). Never downloaded (``local_files_only``).
            ``$ANOMALY_AGENT_MODEL_PATH``.
        adapter_path: A peft LoRA adapter folder (``$ANOMALY_AGENT_LORA``); needs ``peft``.
        threads: torch intra-op threads (``$ANOMALY_AGENT_THREADS``, min(2, cores)).
        timeout: Wall-clock seconds per generation (``$ANOMALY_AGENT_MODEL_TIMEOUT``, 60).
        load_in_4bit: Load with bitsandbytes NF4 (needs ``bitsandbytes``; runs on CPU).
        dtype: Weight dtype, one of :data:`DTYPES` (default float32).

    Attributes:
        model_id: ``transformers:<folder name>``, for provenance and the explanation cache key.
        adapter: ``<adapter folder name>@<12 hex of the adapter's config and weights>`` (see
            :func:`adapter_fingerprint`) or None, so both change when the adapter changes.
        kind: The folder's :data:`ModelKind`, known after :meth:`load` (or the first image check).
        last_usage: Of the last generation: prompt and completion tokens, images, constrained.
        last_finish_reason: ``"stop"`` (EOS, or the JSON complete) or ``"length"`` (max_tokens
            ran out; a constrained answer is then cut and will not parse).
        last_timing: Seconds to the first generated token and in all.

    The model is loaded on the first :meth:`generate` (or :meth:`load`). One generation at a time
    per instance; after a timeout whose worker is still running, calls fail fast until it ends.
    Image processors are loaded with transformers' PIL backend, which needs only Pillow and numpy
    (the torchvision one is the default when torchvision imports, and it does not with every torch).
    """

    def __init__(self, model_path: str | Path | None = None, *, adapter_path: str | Path | None = None,
                 threads: int | None = None, timeout: float | None = None, load_in_4bit: bool = False,
                 dtype: str = "float32") -> None:
        path = model_path if model_path is not None else (_env("MODEL_PATH", "") or None)
        if path is None:
            raise ValueError("the transformers backend needs model_path (a local model folder) "
                             "or ANOMALY_AGENT_MODEL_PATH")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
        self.model_path = Path(path).expanduser()
        adapter = adapter_path if adapter_path is not None else (_env("LORA", "") or None)
        self.adapter_path = Path(adapter).expanduser() if adapter is not None else None
        self.threads = torch_threads(threads)
        self.timeout = float(timeout if timeout is not None else _env("MODEL_TIMEOUT", 60.0))
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        self.load_in_4bit = load_in_4bit
        self.dtype = dtype
        self.model_id = f"transformers:{self.model_path.name}"
        self.adapter: str | None = None
        if self.adapter_path is not None:
            self.adapter = f"{self.adapter_path.name}@{adapter_fingerprint(self.adapter_path)}"
        self.kind: ModelKind | None = None
        self.last_usage: dict[str, Any] = {}
        self.last_finish_reason: str | None = None
        self.last_timing: dict[str, float] = {}
        self._architecture = ""
        self._model: Any = None
        self._tok: Any = None
        self._processor: Any = None
        self._llg_tokenizer: Any = None
        self._lock = threading.Lock()
        self._busy = threading.Event()

    # ------------------------------------------------------------------ loading
    def _resolve_kind(self) -> ModelKind:
        """Read the folder's config once (no weights) and decide its :data:`ModelKind`."""
        if self.kind is None:
            if not self.model_path.is_dir():
                raise ModelNotInstalled(f"model folder not found: {self.model_path}")
            try:
                from transformers import AutoConfig
            except ImportError as exc:
                raise ModelNotInstalled(f"the transformers backend needs torch and transformers ({exc}); "
                                        "install them with: pip install transformers") from None
            try:
                config = AutoConfig.from_pretrained(str(self.model_path), local_files_only=True)
            except Exception as exc:
                raise ModelError(f"transformers could not read the config of {self.model_path}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            self.kind = _kind_of(config, self.model_path)
            archs = getattr(config, "architectures", None) or []
            self._architecture = str(archs[0]) if archs else str(getattr(config, "model_type", "?"))
        return self.kind

    def load(self) -> TransformersModel:
        """Load tokenizer (or processor), weights and adapter now (otherwise the first generate does).

        Raises:
            ModelNotInstalled: The model folder, the adapter folder or a needed library is missing.
            ModelError: transformers or peft could not load them.
        """
        if self._model is not None:
            return self
        kind = self._resolve_kind()
        try:
            import torch
            from transformers import (
                AutoModelForCausalLM,
                AutoModelForImageTextToText,
                AutoProcessor,
                AutoTokenizer,
            )
        except ImportError as exc:
            raise ModelNotInstalled(f"the transformers backend needs torch and transformers ({exc}); "
                                    "install them with: pip install transformers") from None
        torch.set_num_threads(self.threads)
        kwargs: dict[str, Any] = {"local_files_only": True,
                                  "dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}
        if self.load_in_4bit:
            try:
                import bitsandbytes  # noqa: F401
                from transformers import BitsAndBytesConfig
            except Exception as exc:  # noqa: BLE001 - ImportError, or its native library failing to load
                raise ModelNotInstalled(f"4-bit loading needs a working bitsandbytes ({type(exc).__name__}: {exc}); "
                                        "install it with: pip install bitsandbytes==0.50.2") from None
            compute = torch.float32 if self.dtype in ("float32", "auto") else getattr(torch, self.dtype)
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=compute)
            kwargs["device_map"] = "cpu"
        if self.adapter_path is not None and not self.adapter_path.exists():
            raise ModelNotInstalled(f"LoRA adapter not found: {self.adapter_path}")
        try:
            if kind == "image-text-to-text":
                # backend="pil": the image processor that needs only Pillow and numpy.
                processor = AutoProcessor.from_pretrained(str(self.model_path), local_files_only=True, backend="pil")
                tok = getattr(processor, "tokenizer", None)
                if tok is None:
                    raise ValueError(f"the processor ({type(processor).__name__}) has no tokenizer")
                model = AutoModelForImageTextToText.from_pretrained(str(self.model_path), **kwargs)
            else:
                processor = None
                tok = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(str(self.model_path), **kwargs)
        except Exception as exc:
            raise ModelError(f"transformers could not load {self.model_path} ({kind}): "
                             f"{type(exc).__name__}: {exc}") from exc
        if self.adapter_path is not None:
            try:
                from peft import PeftModel
            except ImportError:
                raise ModelNotInstalled("LoRA adapters need peft: pip install peft") from None
            try:
                model = PeftModel.from_pretrained(model, str(self.adapter_path), is_trainable=False)
            except Exception as exc:
                raise ModelError(f"peft could not load the adapter {self.adapter_path} onto {self.model_path}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            self.adapter = f"{self.adapter_path.name}@{adapter_fingerprint(self.adapter_path)}"
        model.eval()
        self._model, self._tok, self._processor = model, tok, processor
        return self

    @property
    def model(self) -> Any:
        """The loaded torch module (a ``PeftModel`` when an adapter is given); loads on first use."""
        return self.load()._model

    @property
    def tokenizer(self) -> Any:
        """The model's (fast) tokenizer; for a vision-language model, its processor's."""
        return self.load()._tok

    @property
    def processor(self) -> Any:
        """The ``AutoProcessor`` of a vision-language model; None for a text-only one."""
        return self.load()._processor

    # ------------------------------------------------------------------ prompts
    def _refuse_images(self, messages: Sequence[Message]) -> None:
        """Raise :class:`ModelError` naming the model when a text-only one is given images.

        Decided from the config alone, so a wrong pairing fails before gigabytes of weights load.
        """
        n = sum(len(m.images) for m in messages)
        if n and self._resolve_kind() != "image-text-to-text":
            raise ModelError(
                f"{self.model_id} ({self.model_path}) is a text-only model ({self._architecture}, run with "
                f"AutoModelForCausalLM) and cannot take the {n} image(s) in these messages; use a vision-language "
                "model folder (an image-text-to-text architecture such as Idefics3ForConditionalGeneration "
                "(SmolVLM) or LlavaForConditionalGeneration)")

    def prepare_inputs(self, messages: Sequence[Message]) -> dict[str, Any]:
        """The tensors :meth:`generate` feeds the model for ``messages`` (batch of one).

        Public so that fine-tuning and tests see exactly the prompt the backend builds: the
        model's chat template (for a vision-language model, its processor's, with one image
        placeholder per image, images first in each message) and the processed images.

        Args:
            messages: The chat; ``images`` are local file paths.

        Returns:
            ``input_ids`` and ``attention_mask`` (``[1, n]``), plus the processor's image tensors
            (``pixel_values``...) when there are images.

        Raises:
            ModelError: Images for a text-only model (naming it), an image file that is missing or
                unreadable (naming it), or a chat template that fails.
        """
        self._refuse_images(messages)
        self.load()
        paths = [p for m in messages for p in m.images]
        images = [_open_image(p) for p in paths]
        try:
            if self._processor is not None:
                proc = self._processor
                chat = [{"role": m.role, "content": [{"type": "image"} for _ in m.images]
                         + [{"type": "text", "text": m.content}]} for m in messages]
                if getattr(proc, "chat_template", None):
                    text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                    special = False  # the template writes BOS and friends itself
                else:
                    marker = str(getattr(proc, "image_token", "<image>"))
                    text = "\n".join(f"{m.role}: {marker * len(m.images)}{m.content}" for m in messages) + "\nassistant:"
                    special = True
                enc = proc(text=text, images=images or None, return_tensors="pt", add_special_tokens=special)
            else:
                tok = self._tok
                if getattr(tok, "chat_template", None):
                    enc = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
                else:
                    text = "\n".join(f"{m.role}: {m.content}" for m in messages) + "\nassistant:"
                    enc = tok(text, return_tensors="pt")
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.model_id}: could not build the prompt: {type(exc).__name__}: {exc}") from exc
        inputs = dict(enc)
        if "attention_mask" not in inputs:
            import torch

            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    # ------------------------------------------------------------------ generation
    def _eos_ids(self) -> list[int]:
        """Every token that ends an answer: the generation config's EOS ids and the tokenizer's."""
        ids: list[int] = []
        config = getattr(self._model, "generation_config", None)
        for value in (getattr(config, "eos_token_id", None), getattr(self._tok, "eos_token_id", None)):
            if value is None:
                continue
            ids.extend(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        return list(dict.fromkeys(ids))

    def _grammar_tokenizer(self) -> Any:
        """The llguidance view of the tokenizer, built once per loaded model (~1 s for 50k tokens)."""
        if self._llg_tokenizer is None:
            try:
                import llguidance.hf
            except ImportError as exc:
                raise ModelNotInstalled(f"schema-constrained decoding needs llguidance ({exc}); "
                                        f"install it with: {LLGUIDANCE_PIP}") from None
            eos = self._eos_ids()
            if not eos:
                raise ModelError(f"{self.model_id}: neither the tokenizer nor the generation config names an EOS "
                                 "token, so a constrained answer could not end")
            head = self._model.get_output_embeddings()
            n_vocab = int(head.weight.shape[0]) if head is not None else None
            try:
                self._llg_tokenizer = llguidance.hf.from_tokenizer(self._tok, n_vocab=n_vocab, eos_token=eos)
            except Exception as exc:
                raise ModelError(f"{self.model_id}: llguidance cannot read this tokenizer "
                                 f"({type(self._tok).__name__}; it reads a fast tokenizer's tokenizer.json whose "
                                 f"decoder maps tokens to bytes: ByteLevel, Metaspace or ByteFallback): "
                                 f"{type(exc).__name__}: {exc}") from exc
        return self._llg_tokenizer

    def schema_processor(self, schema: Mapping[str, Any], prompt_length: int) -> JsonSchemaLogitsProcessor:
        """A fresh :class:`JsonSchemaLogitsProcessor` for one generation with this model.

        Public so that callers running ``self.model.generate`` themselves (fine-tuning evaluation)
        decode under the same constraint as :meth:`generate`.

        Args:
            schema: The JSON schema.
            prompt_length: Prompt tokens in the ``input_ids`` that will be generated from.

        Raises:
            ModelError: llguidance cannot compile the schema, or cannot use the tokenizer.
            ModelNotInstalled: llguidance is not installed.
        """
        self.load()
        try:
            return JsonSchemaLogitsProcessor(self._grammar_tokenizer(), schema, prompt_length)
        except ValueError as exc:
            raise ModelError(f"{self.model_id}: cannot constrain decoding to this schema: {exc}") from exc

    def generate(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0) -> Message:
        """The assistant's reply; with ``schema``, decoding is constrained to JSON valid for it.

        Args:
            messages: The chat (``images`` only for a vision-language model).
            schema: A JSON schema the answer must match (see :class:`JsonSchemaLogitsProcessor`).
                Unlike the unconstrained backend this replaced, the schema is not pasted into the
                prompt: the mask enforces it, and the prompt tokens would cost time.
            max_tokens: Generation limit. A constrained answer cut by it does not parse
                (``last_finish_reason == "length"``); the explainer then retries or falls back.
            temperature: 0 is greedy; above 0 samples (torch's global RNG: seed it to repeat).

        Raises:
            ModelTimeout: Generation did not finish within ``timeout`` seconds.
            ModelError: Images for a text-only model, a missing image file, a schema llguidance
                cannot compile, or any failure inside transformers.
            ModelNotInstalled: The model, adapter, or a needed library is missing.
        """
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if self._busy.is_set():
            raise ModelError(f"{self.model_id}: a previous generation that timed out is still running")
        self._refuse_images(messages)
        self.load()
        import torch
        from transformers import (
            LogitsProcessorList,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        inputs = self.prepare_inputs(messages)
        prompt_len = int(inputs["input_ids"].shape[1])
        constraint = self.schema_processor(schema, prompt_len) if schema is not None else None
        eos = self._eos_ids()
        tok = self._tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else None)
        start = time.monotonic()
        deadline = start + self.timeout
        timed_out = threading.Event()
        timing: dict[str, float] = {}

        class Deadline(StoppingCriteria):
            """Stops between tokens at the wall-clock deadline (and notes when the first token came)."""

            def __call__(self, *_a: Any, **_k: Any) -> bool:
                now = time.monotonic()
                timing.setdefault("first_token_s", round(now - start, 4))
                if now >= deadline:
                    timed_out.set()
                    return True
                return False

        sampling: dict[str, Any] = ({"do_sample": True, "temperature": float(temperature)} if temperature > 0
                                    else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})

        def call() -> Any:
            self._busy.set()
            try:
                with self._lock, torch.inference_mode():
                    return self._model.generate(
                        **inputs, max_new_tokens=int(max_tokens), **sampling,
                        logits_processor=LogitsProcessorList([constraint] if constraint is not None else []),
                        stopping_criteria=StoppingCriteriaList([Deadline()]),
                        eos_token_id=eos or None, pad_token_id=pad)
            finally:
                self._busy.clear()

        try:
            out = run_with_deadline(call, self.timeout + 5.0, self.model_id)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.model_id}: generation failed: {type(exc).__name__}: {exc}") from exc
        if timed_out.is_set():
            raise ModelTimeout(f"{self.model_id}: generation stopped after {self.timeout:g} s")
        new = out[0, prompt_len:].tolist()
        if constraint is not None:
            finished = constraint.finish(new)
        else:
            finished = bool(new) and new[-1] in eos
        self.last_finish_reason = "stop" if finished else "length"
        self.last_usage = {"prompt_tokens": prompt_len, "completion_tokens": len(new),
                           "images": sum(len(m.images) for m in messages), "constrained": constraint is not None}
        self.last_timing = {"first_token_s": timing.get("first_token_s", 0.0),
                            "total_s": round(time.monotonic() - start, 4)}
        text = tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Message(role="assistant", content=text)
