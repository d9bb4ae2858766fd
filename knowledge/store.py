"""The knowledge store: documents, rules and past cases in a persistent Chroma database.

One folder holds everything: Chroma's files, and ``rules.json`` (the :class:`RuleBook`).
Three collections, all embedded with the packaged all-MiniLM-L6-v2 (cosine space):

* ``documents``: chunks of runbooks, manuals, notes (see :mod:`knowledge.ingest`);
* ``rules``: the text of the natural-language rules, mirrored by :meth:`KnowledgeStore.sync_rules`
  so text-only rules can be retrieved per candidate;
* ``cases``: past explained cases, for "this looked like ..." retrieval.

Passage ids are stable (``P-`` + sha1(source|heading|offset)), so storing the same
document again is an upsert, and :meth:`KnowledgeStore.replace_source` removes passages of a
changed document that no longer exist. :attr:`KnowledgeStore.version` is a hash of
everything stored (all three collections and the rule book): it changes whenever anything is
added, changed or removed, so callers can key caches on it.

Example::

    store = KnowledgeStore("out/knowledge")
    ingest_paths(store, ["knowledge/examples"])
    for p in store.search("DataNode disk full during write pipeline", k=3):
        print(p.id, p.score, p.source, p.heading)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import chromadb
from chromadb.config import Settings

from detectors.records import Candidate
from knowledge.embedder import MiniLMEmbedding
from knowledge.records import Passage, SourceInfo
from knowledge.rules import RULEBOOK_FILE, Rule, RuleBook

COLLECTIONS: tuple[str, ...] = ("documents", "rules", "cases")
DEFAULT_COLLECTION = "documents"
_BATCH = 256
"""Rows per Chroma upsert/delete (well under its max batch size) and per embedding call."""
MAX_QUERY_CHARS = 1200
"""A query longer than this is cut: the model reads at most 256 tokens anyway."""
MAX_EVIDENCE_QUERIES = 4
"""Queries per candidate: one per evidence item, the strongest first."""


def _settings() -> Settings:
    # The same settings on every open: Chroma refuses a second client for one path with others.
    return Settings(anonymized_telemetry=False, allow_reset=False, is_persistent=True)


def _hash(*parts: str) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _passage_hash(p: Passage) -> str:
    return _hash(p.source, p.heading, str(p.offset), p.text, str(p.example))[:16]


def _embed_text(p: Passage) -> str:
    # The heading path is embedded with the chunk (it is often the best clue to what a
    # chunk is about) but not stored in the chunk's text.
    return f"{p.heading}\n{p.text}" if p.heading else p.text


class KnowledgeStore:
    """A persistent Chroma database with ``documents``, ``rules`` and ``cases``.

    Args:
        path: Folder of the store; created if missing.
        embedder: The embedding function; default :class:`MiniLMEmbedding`. Always ours:
            Chroma's default would try to download a model. It is passed again on every open,
            since Chroma checks the name it stored with the collection.
    """

    def __init__(self, path: str | Path, embedder: MiniLMEmbedding | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder if embedder is not None else MiniLMEmbedding()
        self._client = chromadb.PersistentClient(path=str(self.path), settings=_settings())
        self._collections = {
            name: self._client.get_or_create_collection(
                name, embedding_function=self.embedder, configuration={"hnsw": {"space": "cosine"}},
                metadata={"created_by": "anomaly-agent"})
            for name in COLLECTIONS
        }

    # ------------------------------------------------------------------------- writing
    def _collection(self, name: str) -> Any:
        try:
            return self._collections[name]
        except KeyError:
            raise ValueError(f"unknown collection {name!r}; one of {', '.join(COLLECTIONS)}") from None

    def add_passages(self, passages: Sequence[Passage], collection: str = DEFAULT_COLLECTION) -> int:
        """Upsert passages (same id = replaced); returns how many were written."""
        col = self._collection(collection)
        unique = list({p.id: p for p in passages}.values())
        for start in range(0, len(unique), _BATCH):
            batch = unique[start:start + _BATCH]
            col.upsert(
                ids=[p.id for p in batch],
                embeddings=self.embedder([_embed_text(p) for p in batch]),
                documents=[p.text for p in batch],
                metadatas=[{"source": p.source, "heading": p.heading, "offset": p.offset,
                            "example": p.example, "hash": _passage_hash(p)} for p in batch],
            )
        return len(unique)

    def replace_source(self, source: str, passages: Sequence[Passage],
                       collection: str = DEFAULT_COLLECTION) -> tuple[int, int, bool]:
        """Make ``source``'s stored passages exactly ``passages``.

        Returns:
            (passages now stored, old passages removed, unchanged). When every passage is
            already stored with the same content nothing is embedded again (``unchanged``).
        """
        for p in passages:
            if p.source != source:
                raise ValueError(f"passage {p.id} is from {p.source!r}, not {source!r}")
        col = self._collection(collection)
        old = col.get(where={"source": source}, include=["metadatas"])
        old_hash = {i: (m or {}).get("hash") for i, m in zip(old["ids"], old["metadatas"] or [])}
        new = {p.id: p for p in passages}
        if set(old_hash) == set(new) and all(old_hash[i] == _passage_hash(p) for i, p in new.items()):
            return len(new), 0, True
        stale = sorted(set(old_hash) - set(new))
        for start in range(0, len(stale), _BATCH):
            col.delete(ids=stale[start:start + _BATCH])
        changed = [p for i, p in new.items() if old_hash.get(i) != _passage_hash(p)]
        self.add_passages(changed, collection)
        return len(new), len(stale), False

    def remove_source(self, source: str, collection: str = DEFAULT_COLLECTION) -> int:
        """Delete every passage of ``source``; returns how many there were (0 if unknown)."""
        col = self._collection(collection)
        ids = col.get(where={"source": source}, include=[])["ids"]
        for start in range(0, len(ids), _BATCH):
            col.delete(ids=ids[start:start + _BATCH])
        return len(ids)

    def sync_rules(self, rules: Iterable[Rule]) -> int:
        """Mirror the active rules' text into the ``rules`` collection (ids = rule ids)."""
        passages = [Passage(id=r.id, source="rules", heading=f"{r.id} v{r.version}", offset=0, text=r.text)
                    for r in rules]
        return self.replace_source("rules", passages, collection="rules")[0]

    # ------------------------------------------------------------------------- reading
    def count(self, collection: str = DEFAULT_COLLECTION) -> int:
        """Passages in ``collection``."""
        return int(self._collection(collection).count())

    def search(self, query: str, k: int = 5, where: Mapping[str, Any] | None = None,
               collection: str = DEFAULT_COLLECTION) -> list[Passage]:
        """The ``k`` passages closest to ``query``, best first; ``score`` is cosine similarity.

        Args:
            query: Free text.
            k: How many (fewer if the collection is smaller).
            where: Chroma metadata filter, e.g. ``{"source": "examples/hdfs_write_pipeline.md"}``
                (metadata keys: source, heading, offset, example).
            collection: documents, rules or cases.
        """
        return self.search_many([query], k=k, where=where, collection=collection)

    def search_many(self, queries: Sequence[str], k: int = 5, where: Mapping[str, Any] | None = None,
                    collection: str = DEFAULT_COLLECTION) -> list[Passage]:
        """Best ``k`` passages over several queries (a passage counts with its best score)."""
        queries = [" ".join(q.split())[:MAX_QUERY_CHARS] for q in queries if q and q.strip()]
        if not queries:
            raise ValueError("empty search query")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        col = self._collection(collection)
        n = col.count()
        if n == 0:
            return []
        result = col.query(query_embeddings=self.embedder.embed_query(queries), n_results=min(k, n),
                           where=dict(where) if where else None,
                           include=["documents", "metadatas", "distances"])
        best: dict[str, Passage] = {}
        for ids, docs, metas, dists in zip(result["ids"], result["documents"] or [],
                                           result["metadatas"] or [], result["distances"] or []):
            for pid, doc, meta, dist in zip(ids, docs, metas, dists):
                p = self._passage(pid, doc, meta, score=round(1.0 - float(dist), 6))
                if pid not in best or (p.score or 0.0) > (best[pid].score or 0.0):
                    best[pid] = p
        return sorted(best.values(), key=lambda p: (-(p.score or 0.0), p.id))[:k]

    def search_for(self, candidate: Candidate, k: int = 5, where: Mapping[str, Any] | None = None,
                   collection: str = DEFAULT_COLLECTION) -> list[Passage]:
        """Passages for one candidate, retrieved from its evidence (see :func:`candidate_queries`)."""
        return self.search_many(candidate_queries(candidate), k=k, where=where, collection=collection)

    def get(self, ids: Sequence[str], collection: str = DEFAULT_COLLECTION) -> list[Passage]:
        """Stored passages by id (unknown ids are left out), in the order asked."""
        if not ids:
            return []
        got = self._collection(collection).get(ids=list(ids), include=["documents", "metadatas"])
        found = {pid: self._passage(pid, doc, meta) for pid, doc, meta in
                 zip(got["ids"], got["documents"] or [], got["metadatas"] or [])}
        return [found[i] for i in ids if i in found]

    def passages(self, source: str, collection: str = DEFAULT_COLLECTION) -> list[Passage]:
        """All passages of ``source`` in document order."""
        got = self._collection(collection).get(where={"source": source}, include=["documents", "metadatas"])
        out = [self._passage(pid, doc, meta) for pid, doc, meta in
               zip(got["ids"], got["documents"] or [], got["metadatas"] or [])]
        return sorted(out, key=lambda p: (p.heading if p.heading.startswith("page ") else "", p.offset, p.id))

    def list_sources(self, collection: str = DEFAULT_COLLECTION) -> list[SourceInfo]:
        """Every stored source with its passage count and a content hash, sorted by name."""
        got = self._collection(collection).get(include=["metadatas"])
        by_source: dict[str, list[tuple[str, str]]] = {}
        example: dict[str, bool] = {}
        for pid, meta in zip(got["ids"], got["metadatas"] or []):
            meta = meta or {}
            src = str(meta.get("source", ""))
            by_source.setdefault(src, []).append((pid, str(meta.get("hash", ""))))
            example[src] = example.get(src, False) or bool(meta.get("example", False))
        return [SourceInfo(source=src, passages=len(rows), content_hash=_hash(*(f"{i}:{h}" for i, h in sorted(rows)))[:12],
                           example=example[src])
                for src, rows in sorted(by_source.items())]

    @property
    def rulebook_path(self) -> Path:
        """Where this store's :class:`RuleBook` lives."""
        return self.path / RULEBOOK_FILE

    def rulebook(self) -> RuleBook:
        """The rule book stored beside the collections."""
        return RuleBook(self.rulebook_path)

    @property
    def version(self) -> str:
        """Hash of everything stored (ids and content of all collections, and the rule book).

        Changes when any passage is added, changed or removed, or a rule changes; the same
        content gives the same version, also after reopening.
        """
        parts: list[str] = []
        for name in COLLECTIONS:
            got = self._collection(name).get(include=["metadatas"])
            rows = sorted(f"{pid}:{(meta or {}).get('hash', '')}" for pid, meta in zip(got["ids"], got["metadatas"] or []))
            parts.append(f"[{name}]")
            parts.extend(rows)
        if self.rulebook_path.exists():
            parts.append(f"[rulebook]{RuleBook(self.rulebook_path).rules_version}")
        return _hash(*parts)[:16]

    @staticmethod
    def _passage(pid: str, doc: str | None, meta: Mapping[str, Any] | None, score: float | None = None) -> Passage:
        meta = meta or {}
        return Passage(id=pid, source=str(meta.get("source", "?")), heading=str(meta.get("heading", "")),
                       offset=int(meta.get("offset", 0)), text=doc or " ", score=score,
                       example=bool(meta.get("example", False)))


_DIGITS = re.compile(r"\S*\d\S*")
_REASON_WORDS = {"unseen_template": "new message never seen in normal operation",
                 "count_deviation": "message count differs from the normal workflow",
                 "warning_burst": "warnings and errors", "error_burst": "warnings and errors",
                 "out_of_range": "value out of the normal range"}


def candidate_queries(candidate: Candidate, limit: int = MAX_EVIDENCE_QUERIES) -> list[str]:
    """Search queries for a candidate: one per evidence item, built from what the evidence *is*.

    The content leads (templates; for lines no template covers, the line text with every token
    holding a digit masked; variable, channel and defect names), then the reason in plain words.
    Boilerplate such as the detector name, the file name or "2 line(s) of templates never seen"
    is left out: it is the same for every candidate and pulled every query towards the same
    generic passages. One query from the candidate itself when it has no evidence.
    """
    head = f"{candidate.modality.value} anomaly from detector {candidate.detector} in {candidate.source}"
    loc = {k: v for k, v in candidate.locator.items() if k in ("series", "top_variable", "image", "channel", "sensor")}
    if loc:
        head += " " + " ".join(f"{k} {v}" for k, v in loc.items())
    queries: list[str] = []
    seen: set[str] = set()
    for ev in candidate.evidence:
        data = ev.data
        bits: list[str] = []
        templates = data.get("templates") if isinstance(data.get("templates"), list) else []
        texts = data.get("text") if isinstance(data.get("text"), list) else []
        for i, t in enumerate(templates):
            t = str(t)
            if t.strip().lower() == "<unseen>" and i < len(texts):
                t = _DIGITS.sub(" ", str(texts[i]))
            if t.strip():
                bits.append(" ".join(t.split()))
        for key in ("top_variables", "variables"):
            items = data.get(key)
            if isinstance(items, list):
                bits.extend(f"{key[:-1].replace('_', ' ')} {v.get('name')}" for v in items[:3]
                            if isinstance(v, dict) and v.get("name"))
                break
        for key in ("defect", "label", "channel", "subsystem"):
            if isinstance(data.get(key), str):
                bits.append(f"{key} {data[key]}")
        reason = data.get("reason")
        if isinstance(reason, str):
            bits.append(_REASON_WORDS.get(reason, reason.replace("_", " ")))
        if not bits:
            bits.append(ev.summary)
        query = f"{candidate.modality.value}: " + "; ".join(dict.fromkeys(bits))
        if query not in seen:  # several detectors often cite the same lines
            seen.add(query)
            queries.append(query)
        if len(queries) >= limit:
            break
    return queries or [head]
