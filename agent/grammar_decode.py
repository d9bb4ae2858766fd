"""Greedy JSON-schema-constrained decoding for llama.cpp that checks the grammar lazily.

Why not ``create_chat_completion(response_format=...)``: llama-cpp-python puts the grammar
sampler in front of greedy selection, so every token runs the grammar over the whole
vocabulary (49,152 tokens for SmolLM2). Measured here that halved generation speed
(~30 vs ~60 tokens/s on 2 cores). llama.cpp's own ``common_sampler`` avoids that: it takes the
model's best token first and asks the grammar about that one token; only when the grammar
rejects it does it filter the whole vocabulary. This module does the same through the
low-level API, so a model that already writes valid JSON (a tuned one) pays almost nothing
for the guarantee, and an untuned one pays the full price only on the tokens it gets wrong.

The result is the same token sequence the eager sampler produces at temperature 0: the
highest-logit token the grammar accepts. (Both break exact ties by lowest token id.)

Choice probabilities
--------------------
Greedy decoding keeps only the winner, so a 51:49 choice between severity 3 and 4 reads the same
as a 99:1 one, and anything that tips such a near-tie (a withheld line, one more passage) moves
the answer a whole level. For every top-level ``enum`` property whose values one token can tell
apart (the verdict's ``label`` and ``severity``; not ``confidence``, whose values share ``0.``),
:func:`generate_constrained` also records the model's distribution over the values at the token
where it chose one: the softmax over the grammar-accepted tokens that each lead to exactly one
value, summed per value (:attr:`ConstrainedResult.choice_probs`). The decoded tokens do not
change. The distributions are for diagnosis (the injection suite reports how far they moved);
``agent.explain.decide`` does not vote with them -- that was measured and not adopted (README).
"""

from __future__ import annotations

import ctypes
import json
import re
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ConstrainedResult", "choice_fields", "generate_constrained", "strict_json_strings"]


@dataclass(frozen=True)
class ConstrainedResult:
    """What one constrained generation produced and what it cost."""

    text: str
    tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int
    finish_reason: str  # "stop" (grammar complete), "length", or "deadline"
    first_token_s: float
    total_s: float
    grammar_rejections: int
    choice_probs: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Per probed field (:func:`choice_fields`): value (as the JSON text, quotes stripped) ->
    the model's probability of it where it chose; fields it never reached are absent."""


def choice_fields(schema: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Top-level enum properties whose values differ in their first character, as JSON texts.

    Only for those does the first token that commits to a value carry the whole choice; for
    values with a shared prefix (``0.1`` .. ``0.9``) the greedy path would hide the alternatives.
    """
    out: dict[str, tuple[str, ...]] = {}
    props = schema.get("properties")
    for name, prop in (props.items() if isinstance(props, Mapping) else ()):
        enum = prop.get("enum") if isinstance(prop, Mapping) else None
        if not isinstance(enum, list) or len(enum) < 2:
            continue
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in enum):
            continue
        texts = tuple(json.dumps(v) for v in enum)
        cores = [t.strip('"') for t in texts]
        if all(cores) and len({c[0] for c in cores}) == len(cores):
            out[str(name)] = texts
    return out


_TOKEN_TEXTS: "weakref.WeakKeyDictionary[Any, dict[Any, Any]]" = weakref.WeakKeyDictionary()


def _token_texts(llm: Any) -> dict[Any, Any]:
    """Per loaded model: every token's text (None if not whole UTF-8) and the probe groups made."""
    try:
        memo = _TOKEN_TEXTS.get(llm)
    except TypeError:  # not weak-referenceable: no memo
        memo = None
    if memo is None:
        texts: list[str | None] = []
        for i in range(llm.n_vocab()):
            try:
                texts.append(llm.detokenize([i]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                texts.append(None)
        memo = {"texts": texts}
        try:
            _TOKEN_TEXTS[llm] = memo
        except TypeError:
            pass
    return memo


def _groups(memo: dict[Any, Any], values: tuple[str, ...], typed: str) -> dict[int, np.ndarray]:
    """Value index -> ids of the tokens that, after ``typed`` (what follows the colon so far),
    are consistent with that value and no other."""
    key = (values, typed)
    if key in memo:
        return memo[key]
    rest = {i: v[len(typed):] for i, v in enumerate(values) if v.startswith(typed) and len(v) > len(typed)}
    found: dict[int, list[int]] = {i: [] for i in rest}
    for tid, t in enumerate(memo["texts"]):
        if not t:
            continue
        hit = [i for i, r in rest.items() if r.startswith(t) or t.startswith(r)]
        if len(hit) == 1:
            found[hit[0]].append(tid)
    groups = {i: np.asarray(ids, dtype=np.int32) for i, ids in found.items() if ids}
    memo[key] = groups
    return groups


def _probe(sampler: Any, logits: np.ndarray, groups: dict[int, np.ndarray]) -> dict[int, float] | None:
    """Softmax over the grammar-accepted tokens of ``groups``, summed per value (None if none)."""
    import llama_cpp

    ids = np.concatenate(list(groups.values()))
    arr_t = (llama_cpp.llama_token_data * len(ids))()
    view = np.ctypeslib.as_array(arr_t)
    view["id"], view["logit"], view["p"] = ids, logits[ids], 0.0
    arr = llama_cpp.llama_token_data_array(data=arr_t, size=len(ids), selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
    out = np.ctypeslib.as_array(arr.data, shape=(arr.size,))
    allowed = {int(t): float(x) for t, x in zip(out["id"], out["logit"]) if np.isfinite(x)}
    if not allowed:
        return None
    top = max(allowed.values())
    mass = {i: float(sum(np.exp(allowed[int(t)] - top) for t in g if int(t) in allowed)) for i, g in groups.items()}
    total = sum(mass.values())
    return {i: m / total for i, m in mass.items() if m > 0} if total > 0 else None


_LAX_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def strict_json_strings(grammar: str) -> str:
    """Forbid raw control characters inside JSON strings.

    llama-cpp-python's schema converter writes ``char ::= [^"\\] | ...``, which lets a model put
    a raw newline inside a string -- invalid JSON (seen with the tuned SmolLM2). llama.cpp's own
    converter excludes U+0000-U+001F and U+007F, as JSON requires; we do the same.
    """
    if _LAX_CHAR not in grammar:
        return grammar
    return grammar.replace(_LAX_CHAR, _STRICT_CHAR)


def _chat_prompt(llm: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Tokens of the chat, formatted with the model's own chat template (as llama-cpp-python does)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF carries no chat template (tokenizer.chat_template)")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
    bos_id = llm.token_bos()
    bos = llm.detokenize([bos_id], special=True).decode("utf-8", "replace") if bos_id >= 0 else ""
    result = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=list(messages))
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def _reuse_prefix(llm: Any, tokens: Sequence[int]) -> int:
    """Keep the KV cache of the longest common prefix (the constant system prompt, at least)."""
    n = 0
    cached = llm.input_ids[: llm.n_tokens]
    for a, b in zip(cached, tokens):
        if int(a) != int(b):
            break
        n += 1
    n = min(n, len(tokens) - 1)  # the last prompt token is evaluated again for its logits
    llm.n_tokens = n
    return n


def generate_constrained(llm: Any, messages: Sequence[dict[str, str]], schema: dict[str, Any], *,
                         max_tokens: int, deadline: float | None = None) -> ConstrainedResult:
    """Greedy decoding of ``messages`` under ``schema`` (see the module doc).

    Args:
        llm: A loaded ``llama_cpp.Llama``.
        messages: OpenAI-style ``{"role", "content"}`` dicts.
        schema: The JSON schema the answer must match (turned into a GBNF grammar).
        max_tokens: Generation limit.
        deadline: ``time.monotonic()`` value after which generation stops between tokens.
    """
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    start = time.monotonic()
    grammar_text = strict_json_strings(json_schema_to_gbnf(json.dumps(schema)))
    vocab = llm._model.vocab
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar_text.encode("utf-8"), b"root")
    if not sampler:
        raise ValueError("llama.cpp could not parse the grammar built from the schema")
    n_vocab = llm.n_vocab()
    one = (llama_cpp.llama_token_data * 1)()
    one_arr = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
    full = (llama_cpp.llama_token_data * n_vocab)()
    full_np = np.ctypeslib.as_array(full)  # structured view: fields id, logit, p
    ids = np.arange(n_vocab, dtype=np.int32)
    try:
        prompt = _chat_prompt(llm, messages)
        cached = _reuse_prefix(llm, prompt)
        llm.eval(prompt[cached:])
        first_s: float | None = None
        out: list[int] = []
        rejections = 0
        finish = "length"
        fields = choice_fields(schema)
        pending = {name: re.compile(r'(?<!\\)"' + re.escape(name) + r'"\s*:\s*(\S*)$') for name in fields}
        memo = _token_texts(llm) if pending else {}
        tail = ""
        probs: dict[str, dict[str, float]] = {}
        while len(out) < max_tokens:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            one[0].id, one[0].logit, one[0].p = tok, float(logits[tok]), 0.0
            one_arr.data, one_arr.size, one_arr.selected, one_arr.sorted = one, 1, -1, False
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(one_arr))
            if not np.isfinite(one[0].logit):  # the grammar rejects the model's choice: filter all
                rejections += 1
                full_np["id"] = ids
                full_np["logit"] = logits
                full_np["p"] = 0.0
                arr = llama_cpp.llama_token_data_array(data=full, size=n_vocab, selected=-1, sorted=False)
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
                # The sampler may have compacted the array; read what it left.
                view = np.ctypeslib.as_array(arr.data, shape=(arr.size,))
                best = int(np.argmax(view["logit"]))
                if not np.isfinite(view["logit"][best]):
                    finish = "stop"  # nothing is allowed: the grammar is complete
                    break
                tok = int(view["id"][best])
            if first_s is None:
                first_s = time.monotonic() - start
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                finish = "stop"
                break
            for name, rx in list(pending.items()):
                m = rx.search(tail)
                if m is None:
                    continue
                typed = m.group(1)
                if not any(v.startswith(typed) and len(v) > len(typed) for v in fields[name]):
                    del pending[name]  # past the value without a probe (cannot happen under the grammar)
                    continue
                groups = _groups(memo, fields[name], typed)
                chosen = next((i for i, g in groups.items() if tok in g), None)
                if chosen is None:
                    continue  # this token commits to no single value yet (a quote, a space)
                dist = _probe(sampler, logits, groups)
                if dist:
                    probs[name] = {fields[name][i].strip('"'): round(p, 6) for i, p in dist.items()}
                del pending[name]
            llama_cpp.llama_sampler_accept(sampler, tok)
            out.append(tok)
            if pending:
                tail = (tail + (memo["texts"][tok] or ""))[-64:]
            if deadline is not None and time.monotonic() >= deadline:
                finish = "deadline"
                break
            llm.eval([tok])
        text = llm.detokenize(out).decode("utf-8", "ignore")
        return ConstrainedResult(text=text, tokens=len(out), prompt_tokens=len(prompt), cached_prompt_tokens=cached,
                                 finish_reason=finish, first_token_s=round(first_s or 0.0, 4),
                                 total_s=round(time.monotonic() - start, 4), grammar_rejections=rejections,
                                 choice_probs=probs)
    finally:
        llama_cpp.llama_sampler_free(sampler)
