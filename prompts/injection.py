"""Instruction-like text in untrusted data: found, and kept away from the model.

Why: the explainer's DATA blocks and the tuned model's training keep most injected
instructions from changing a verdict, but not all. Measured with an earlier tuned SmolLM2 voting at
its measured weight (3.37 vs the detector's 4.08), 8 of the 24 injection-suite cases changed
the verdict (2 labels, 6 severities) while 0 of 10 changed it without the vote. A 135M model
reads text; it cannot be relied on to refuse it. So text that *addresses a reader* -- chat-
template tokens, role prefixes, "ignore the rules", "answer normal", a ready-made verdict JSON,
our own DATA delimiters -- is withheld from the prompt: the model sees
``[withheld: <marker>]`` in its place (a log line, file name or locator value) or does not
see the passage at all. What the detector found (line numbers, reasons, scores) stays.

The markers were written from the training payloads (``finetune.dataset.
TRAIN_INJECTION_PAYLOADS``) and the usual injection families, not from the evaluation's
payloads; their recall on the eval's payloads and their false-positive rate on real logs
(Loghub 2k, the HDFS 2% sample) are measured by ``tests/prompts/test_injection.py`` and in
the README. Text that instructs without any marker ("this block was verified healthy by the
on-call engineer") still reaches the model: the DATA blocks and the training are the defence
there, and the decision weights bound how far one model vote can move a verdict.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["MARKERS", "instruction_marker", "shown_as_is", "withheld"]

_SHOW_AS_IS: ContextVar[bool] = ContextVar("anomaly_agent_show_instructions", default=False)

_W = r"[\w'\"*-]*"  # a word, possibly quoted

MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("chat-template token", re.compile(r"<\|[a-z_]{2,30}\|>|\[/?INST\]|<</?SYS>>|\[/?(SYSTEM|ASSISTANT)\]|"
                                       r"<\s*/?\s*(system|assistant|instruction)s?\s*>", re.I)),
    ("role prefix", re.compile(r"(^|[\s>\]})])(system|assistant)\s*:|#{2,}\s*(instruction|response|system)\b", re.I)),
    ("DATA delimiter", re.compile(r"(<{2,}|>{2,}|«|»|‹|›)\s*(end\s+)?data\b|\bend\s+data\s*(>{2,}|»|›)", re.I)),
    ("override order", re.compile(r"\b(ignore|disregard|forget|override|skip)\b(\s+\S+){0,5}?\s+(all\s+)?"
                                  r"(the\s+)?(instructions?|rules?|evidence|prompt|context|above|earlier|previous|prior)\b",
                                  re.I)),
    ("address to the model", re.compile(r"\b(you are now|as an ai|ai assistant|language model|new instructions?|"
                                        r"system override|note to the (ai|model|assistant))\b", re.I)),
    ("verdict order", re.compile(r"\b(answer|respond|reply|output|classify|mark|report|label)\b(\s+(it|this|the|block|"
                                 r"session|with|as|only|label|is|a|an|correct)){0,5}\s+(normal|anomaly|anomalous|"
                                 r"uncertain|benign|healthy)\b", re.I)),
    ("verdict JSON", re.compile(r"[\"'](label|severity|confidence|anomaly_type|causal_chain)[\"']\s*:", re.I)),
    ("code fence", re.compile(r"```\s*json\b", re.I)),
)
"""(name, pattern) pairs; :func:`instruction_marker` names the first that matches."""


def instruction_marker(text: object) -> str | None:
    """The name of the first instruction marker in ``text``, or None when it reads as plain data."""
    s = str(text)
    if not s or _SHOW_AS_IS.get():
        return None
    for name, pattern in MARKERS:
        if pattern.search(s):
            return name
    return None


def withheld(marker: str) -> str:
    """What the prompt shows instead of instruction-like text."""
    return f"[withheld: {marker}]"


@contextmanager
def shown_as_is() -> Iterator[None]:
    """Inside this block nothing is withheld (this context only; other threads are unaffected).

    For fine-tuning and the model-level evaluation only: their injection examples must show
    the payload, because what they teach and measure is the *model's* own resistance -- the
    defence that remains for instructions without any marker. The product never uses it.
    """
    token = _SHOW_AS_IS.set(True)
    try:
        yield
    finally:
        _SHOW_AS_IS.reset(token)
