"""The transformers backend: local causal LMs (and, later, vision-language models) run by torch.

Kept apart from :mod:`agent.models` so that importing the llama.cpp and endpoint backends does
not import torch and transformers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.models import (
    DEFAULT_MAX_TOKENS,
    Message,
    ModelError,
    ModelNotInstalled,
    ModelTimeout,
    _env,
    run_with_deadline,
)
from detectors.threads import torch_threads

__all__ = ["TransformersModel"]


class TransformersModel:
    """A local causal LM run by ``transformers`` (torch), optionally with a peft LoRA adapter.

    Args:
        model_path: A local model folder (``save_pretrained`` layout); never downloaded
            (``local_files_only``). ``$ANOMALY_AGENT_MODEL_PATH``.
        adapter_path: A peft LoRA adapter folder (``$ANOMALY_AGENT_LORA``); needs ``peft``.
        threads: torch intra-op threads (``$ANOMALY_AGENT_THREADS``, min(2, cores)).
        timeout: Wall-clock seconds per generation (``$ANOMALY_AGENT_MODEL_TIMEOUT``, 60).
        load_in_4bit: Load with bitsandbytes NF4 (needs ``bitsandbytes``).

    Limits: no schema-constrained decoding yet (a schema only adds an instruction; the explainer
    validates and retries anyway); text-only (vision-language models are a follow-up).
    """

    def __init__(self, model_path: str | Path | None = None, *, adapter_path: str | Path | None = None,
                 threads: int | None = None, timeout: float | None = None, load_in_4bit: bool = False) -> None:
        path = model_path if model_path is not None else (_env("MODEL_PATH", "") or None)
        if path is None:
            raise ValueError("the transformers backend needs model_path (a local model folder) "
                             "or ANOMALY_AGENT_MODEL_PATH")
        self.model_path = Path(path).expanduser()
        adapter = adapter_path if adapter_path is not None else (_env("LORA", "") or None)
        self.adapter_path = Path(adapter).expanduser() if adapter is not None else None
        self.threads = torch_threads(threads)
        self.timeout = float(timeout if timeout is not None else _env("MODEL_TIMEOUT", 60.0))
        self.load_in_4bit = load_in_4bit
        self.model_id = f"transformers:{self.model_path.name}"
        self.adapter = self.adapter_path.name if self.adapter_path is not None else None
        self._model: Any = None
        self._tok: Any = None
        self._lock = threading.Lock()

    def load(self) -> "TransformersModel":
        if self._model is not None:
            return self
        if not self.model_path.is_dir():
            raise ModelNotInstalled(f"model folder not found: {self.model_path}")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ModelNotInstalled(f"the transformers backend needs torch and transformers ({exc}); "
                                    "install them with: pip install transformers") from None
        torch.set_num_threads(self.threads)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if self.load_in_4bit:
            try:
                from transformers import BitsAndBytesConfig
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ModelNotInstalled("4-bit loading needs bitsandbytes: pip install bitsandbytes") from None
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(self.model_path), **kwargs)
        except Exception as exc:
            raise ModelError(f"transformers could not load {self.model_path}: {type(exc).__name__}: {exc}") from exc
        if self.adapter_path is not None:
            if not self.adapter_path.exists():
                raise ModelNotInstalled(f"LoRA adapter not found: {self.adapter_path}")
            try:
                from peft import PeftModel
            except ImportError:
                raise ModelNotInstalled("LoRA adapters need peft: pip install peft") from None
            model = PeftModel.from_pretrained(model, str(self.adapter_path), is_trainable=False)
        model.eval()
        self._model = model
        return self

    def generate(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0) -> Message:
        if any(m.images for m in messages):
            raise ModelError(f"{self.model_id} is a text-only model; messages with images need a vision backend")
        self.load()
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        chat = [{"role": m.role, "content": m.content} for m in messages]
        if schema is not None:
            chat[-1] = {**chat[-1], "content": chat[-1]["content"] + "\nAnswer with JSON matching this schema: "
                        + json.dumps(schema, separators=(",", ":"))}
        tok = self._tok
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            input_ids = ids["input_ids"]
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in chat) + "\nassistant:"
            input_ids = tok(text, return_tensors="pt")["input_ids"]
        deadline = time.monotonic() + self.timeout
        timed_out = threading.Event()

        class Deadline(StoppingCriteria):
            def __call__(self, *_a: Any, **_k: Any) -> bool:
                if time.monotonic() >= deadline:
                    timed_out.set()
                    return True
                return False

        def call() -> Any:
            with self._lock, torch.inference_mode():
                return self._model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=int(max_tokens),
                    do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                    stopping_criteria=StoppingCriteriaList([Deadline()]),
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

        out = run_with_deadline(call, self.timeout + 5.0, self.model_id)
        if timed_out.is_set():
            raise ModelTimeout(f"{self.model_id}: generation stopped after {self.timeout:g} s")
        new = out[0, input_ids.shape[1]:]
        self.last_usage = {"prompt_tokens": int(input_ids.shape[1]), "completion_tokens": int(new.shape[0])}
        return Message(role="assistant", content=tok.decode(new, skip_special_tokens=True))
