"""DeepLog-style sequence model: a small LSTM learns which template comes next.

Trained on normal sequences only (Du et al., CCS'17). Each sequence is wrapped in
begin/end markers, so a workflow that stops early ("Receiving block" with no
"Received block" after it) is as surprising as a wrong next event. The score of a
sequence is its largest surprise ``-log p(next | previous h templates)``; the
evidence names the lines where the surprise exceeds the threshold and what the
model expected there instead.

Training and scoring work on *distinct* (history, next) pairs with counts: normal
workflows repeat, so this is usually 100x less work than one step per line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from detectors.logs.base import LogDetector, line_evidence
from detectors.logs.sessions import LogSequence
from detectors.records import Evidence
from detectors.threads import torch_threads

PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIAL = 4


class LSTMSequenceDetector(LogDetector):
    """Next-template LSTM over the last ``history`` templates.

    Args:
        history: Templates of context per prediction.
        embed_dim: Template embedding size.
        hidden: LSTM hidden size.
        epochs: Passes over the distinct training pairs.
        lr: Adam learning rate.
        seed: Fixes initialisation and batch order (reproducible scores).
    """

    name = "log-lstm"

    def __init__(self, *, history: int = 10, embed_dim: int = 32, hidden: int = 64, epochs: int = 30,
                 lr: float = 0.01, batch_size: int = 256, seed: int = 0,
                 contamination: float = 0.001, threshold: float | None = None) -> None:
        super().__init__(contamination=contamination, threshold=threshold)
        self.history = history
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    # -- tokens ------------------------------------------------------------------------
    def _tokens(self, seq: LogSequence) -> list[int]:
        return [BOS] + [self.token_of_.get(t, UNK) for t in seq.templates] + [EOS]

    def _pairs(self, seq: LogSequence) -> list[tuple[tuple[int, ...], int]]:
        toks = self._tokens(seq)
        h = self.history
        padded = [PAD] * (h - 1) + toks
        return [(tuple(padded[i: i + h]), padded[i + h]) for i in range(len(toks) - 1)]

    # -- model -------------------------------------------------------------------------
    def _build(self, vocab_size: int):  # noqa: ANN202 - torch types imported lazily
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, v: int, e: int, hdim: int) -> None:
                super().__init__()
                self.emb = nn.Embedding(v, e, padding_idx=PAD)
                self.lstm = nn.LSTM(e, hdim, batch_first=True)
                self.out = nn.Linear(hdim, v)

            def forward(self, x: "torch.Tensor") -> "torch.Tensor":
                y, _ = self.lstm(self.emb(x))
                return self.out(y[:, -1])

        torch.manual_seed(self.seed)
        return Net(vocab_size, self.embed_dim, self.hidden)

    def _fit(self, items: Sequence[LogSequence]) -> None:
        import torch

        torch.set_num_threads(torch_threads())
        ids = sorted({t for s in items for t in s.templates} - {0})
        self.token_of_ = {tid: i + _SPECIAL for i, tid in enumerate(ids)}
        self.template_of_token_ = {v: k for k, v in self.token_of_.items()}
        self.vocab_size_ = len(ids) + _SPECIAL
        counts: Counter[tuple[tuple[int, ...], int]] = Counter()
        for seq in items:
            counts.update(self._pairs(seq))
        hist = torch.tensor([k[0] for k in counts], dtype=torch.long)
        target = torch.tensor([k[1] for k in counts], dtype=torch.long)
        weight = torch.tensor(list(counts.values()), dtype=torch.float32)
        weight = weight / weight.sum()
        self.net_ = self._build(self.vocab_size_)
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        n = len(target)
        self.net_.train()
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, self.batch_size):
                idx = order[start: start + self.batch_size]
                logits = self.net_(hist[idx])
                loss = torch.nn.functional.cross_entropy(logits, target[idx], reduction="none")
                # Weight by frequency so common transitions are learned as common,
                # normalised per batch so rare pairs still get gradient.
                w = weight[idx]
                loss = (loss * w).sum() / w.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net_.eval()
        self._logp_cache: dict[tuple[int, ...], np.ndarray] = {}

    def _log_probs(self, histories: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
        import torch

        cache = getattr(self, "_logp_cache", None)
        if cache is None:
            cache = self._logp_cache = {}
        missing = [h for h in dict.fromkeys(histories) if h not in cache]
        with torch.inference_mode():
            for start in range(0, len(missing), 4096):
                chunk = missing[start: start + 4096]
                logits = self.net_(torch.tensor(chunk, dtype=torch.long))
                logp = torch.log_softmax(logits, dim=-1).numpy()
                for h, row in zip(chunk, logp):
                    cache[h] = row
        if len(cache) > 500_000:
            cache.clear()  # bounded memory; recomputed on demand
            return self._log_probs(histories)
        return {h: cache[h] for h in histories}

    def _surprises(self, seq: LogSequence) -> list[float]:
        pairs = self._pairs(seq)
        logp = self._log_probs([h for h, _ in pairs])
        return [float(-logp[h][t]) for h, t in pairs]

    def _score(self, items: Sequence[LogSequence]) -> np.ndarray:
        all_pairs = [p for seq in items for p in self._pairs(seq)]
        logp = self._log_probs([h for h, _ in all_pairs])
        scores = np.zeros(len(items))
        pos = 0
        for i, seq in enumerate(items):
            n = len(seq.events) + 1
            scores[i] = max(float(-logp[h][t]) for h, t in all_pairs[pos: pos + n])
            pos += n
        return scores

    def _token_text(self, tok: int, seq: LogSequence) -> str:
        if tok == EOS:
            return "<end of sequence>"
        if tok == UNK:
            return "<unseen template>"
        tid = self.template_of_token_.get(tok)
        for event in seq.events:
            if event.template_id == tid:
                return event.template
        return f"template {tid}"

    def evidence(self, item: LogSequence, score: float) -> tuple[Evidence, ...]:
        pairs = self._pairs(item)
        logp = self._log_probs([h for h, _ in pairs])
        hits = [(float(-logp[h][t]), i, h, t) for i, (h, t) in enumerate(pairs) if -logp[h][t] > self.threshold_]
        hits.sort(reverse=True)
        out: list[Evidence] = []
        for surprise, i, h, t in hits[:4]:
            expected = [int(x) for x in np.argsort(-logp[h])[:3]]
            exp_text = [self._token_text(x, item) for x in expected]
            if t == EOS:
                last = item.events[-1]
                summary = (f"sequence ends after line {last.line_no}, but normal sequences continue "
                           f"(expected next: '{exp_text[0][:80]}')")
                events = [last]
                reason = "premature_end"
            else:
                event = item.events[i]
                summary = (f"line {event.line_no} ('{event.template[:80]}') is an unlikely next event "
                           f"(p={np.exp(-surprise):.2g}); expected '{exp_text[0][:80]}'")
                events = [event]
                reason = "unexpected_next_event"
            out.append(line_evidence(f"E{len(out) + 1}", summary, events, reason,
                                     surprise=round(surprise, 3), expected_next=exp_text))
        return tuple(out)
