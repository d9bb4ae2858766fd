"""The packaged embedder and the Chroma-backed KnowledgeStore.

The embedder test really loads all-MiniLM-L6-v2 from the installed wheel, with every
non-loopback network connection refused, so a hidden download would fail the test.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import knowledge.embedder as embedder_mod
from detectors.records import Candidate, Evidence
from knowledge.embedder import (
    DIMENSION,
    EMBEDDER_NAME,
    PACKAGE,
    EmbedderUnavailable,
    MiniLMEmbedding,
    embed,
    model_dir,
)
from detectors.threads import torch_threads as embed_threads
from knowledge.records import Passage, SourceInfo
from knowledge.rules import RuleBook
from knowledge.store import COLLECTIONS, KnowledgeStore, candidate_queries


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every connection that leaves the machine."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost") or "/" in host):
            return real_connect(self, address)
        raise OSError(f"network disabled in tests: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("no DNS in tests")))


# ------------------------------------------------------------------------- embedder

def test_model_is_found_inside_the_installed_package() -> None:
    folder = model_dir()
    assert folder.name == "model" and (folder / "model.safetensors").stat().st_size > 50_000_000
    assert (folder / "modules.json").is_file()


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedder_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbedderUnavailable, match=f"pip install {PACKAGE}"):
        model_dir()
    with pytest.raises(EmbedderUnavailable, match="pip install"):
        MiniLMEmbedding()


def test_thread_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_AGENT_THREADS", "3")
    assert embed_threads() == 3 and embed_threads(1) == 1
    monkeypatch.delenv("ANOMALY_AGENT_THREADS")
    assert 1 <= embed_threads() <= 2


def test_packaged_model_loads_offline_and_ranks_related_sentences_closer(no_network: None) -> None:
    embedder_mod._load.cache_clear()  # really load it here, with the network refused
    vectors = embed([
        "The DataNode disk is full and block writes fail.",
        "Writes to HDFS fail because a data node ran out of storage space.",
        "A crack runs across the surface of the magnetic tile.",
        "Thermal telemetry channel shows a sudden temperature step.",
    ], threads=1)
    assert vectors.shape == (4, DIMENSION) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sim = vectors @ vectors.T
    assert sim[0, 1] > 0.5
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert sim[2, 3] < sim[0, 1]
    assert embed([]).shape == (0, DIMENSION)


def test_chroma_embedding_function_protocol() -> None:
    ef = MiniLMEmbedding(threads=1)
    assert ef.name() == EMBEDDER_NAME and not ef.is_legacy()
    assert ef.default_space() == "cosine"
    config = ef.get_config()
    assert not any(isinstance(v, str) and "/" in v for v in config.values()), "no machine path in the stored config"
    rebuilt = MiniLMEmbedding.build_from_config(config)
    assert rebuilt.get_config() == config
    out = ef(["pipeline", "tile"])
    assert len(out) == 2 and len(out[0]) == DIMENSION
    with pytest.raises(ValueError):
        MiniLMEmbedding.validate_config({"package": "some-other-model"})


# ------------------------------------------------------------------------- store

def passages(source: str, texts: list[str], heading: str = "Runbook") -> list[Passage]:
    return [Passage.make(source, heading, i * 1000, text) for i, text in enumerate(texts)]


HDFS = ["When a DataNode disk fills up, block writes fail with no space left on device.",
        "A write pipeline streams each block through three DataNodes in a chain.",
        "Redundant addStoredBlock requests after a DataNode restart are usually harmless."]
TILES = ["A crack is a thin dark line through the magnetic tile surface.",
         "Blowholes are round pits caused by air trapped during pressing."]


@pytest.fixture
def store(tmp_path: Path) -> KnowledgeStore:
    return KnowledgeStore(tmp_path / "kb", embedder=MiniLMEmbedding(threads=1))


def test_collections_use_our_embedder(store: KnowledgeStore) -> None:
    for name in COLLECTIONS:
        col = store._collection(name)
        assert col.configuration_json["embedding_function"]["name"] == EMBEDDER_NAME
    with pytest.raises(ValueError, match="unknown collection"):
        store.count("nope")


def test_add_search_list_remove(store: KnowledgeStore) -> None:
    assert store.search("anything", k=3) == []
    empty_version = store.version
    assert store.add_passages(passages("hdfs.md", HDFS)) == 3
    assert store.add_passages(passages("tiles.md", TILES, heading="Defects")) == 2
    assert store.count() == 5 and store.version != empty_version

    hits = store.search("datanode ran out of disk space", k=2)
    assert len(hits) == 2 and all(isinstance(h, Passage) for h in hits)
    assert hits[0].text == HDFS[0] and hits[0].source == "hdfs.md" and hits[0].heading == "Runbook"
    assert hits[0].score is not None and hits[1].score is not None and hits[0].score >= hits[1].score
    assert store.search("tile surface defect", k=1, where={"source": "hdfs.md"})[0].source == "hdfs.md"
    assert len(store.search("x", k=50)) == 5
    with pytest.raises(ValueError):
        store.search("   ")

    assert store.list_sources() == [
        SourceInfo(source="hdfs.md", passages=3, content_hash=store.list_sources()[0].content_hash),
        SourceInfo(source="tiles.md", passages=2, content_hash=store.list_sources()[1].content_hash),
    ]
    assert store.get([hits[0].id, "P-unknown"]) == [store.passages("hdfs.md")[0]]

    version = store.version
    assert store.add_passages(passages("hdfs.md", HDFS)) == 3  # upsert: same ids, no duplicates
    assert store.count() == 5 and store.version == version

    assert store.remove_source("tiles.md") == 2 and store.remove_source("tiles.md") == 0
    assert [s.source for s in store.list_sources()] == ["hdfs.md"] and store.version != version
    store.add_passages(passages("tiles.md", TILES, heading="Defects"))
    assert store.version == version, "the version is a content hash: same content, same version"


def test_replace_source_keeps_ids_and_drops_stale_passages(store: KnowledgeStore) -> None:
    assert store.replace_source("hdfs.md", passages("hdfs.md", HDFS)) == (3, 0, False)
    assert store.replace_source("hdfs.md", passages("hdfs.md", HDFS)) == (3, 0, True)
    changed = passages("hdfs.md", [HDFS[0], "Pipeline recovery replaces the failed DataNode."])
    assert store.replace_source("hdfs.md", changed) == (2, 1, False)
    stored = store.passages("hdfs.md")
    assert [p.text for p in stored] == [HDFS[0], "Pipeline recovery replaces the failed DataNode."]
    assert [p.id for p in stored] == [p.id for p in changed]
    with pytest.raises(ValueError, match="not 'hdfs.md'"):
        store.replace_source("hdfs.md", passages("other.md", ["x"]))


def test_reopening_sees_the_same_content(tmp_path: Path) -> None:
    first = KnowledgeStore(tmp_path / "kb")
    first.add_passages(passages("hdfs.md", HDFS))
    first.add_passages([Passage.make("case-1", "", 0, "Past case: disk full on dn-3 caused failed writes.")],
                       collection="cases")
    version = first.version
    again = KnowledgeStore(tmp_path / "kb")
    assert again.version == version and again.count() == 3 and again.count("cases") == 1
    assert again.search("no space left", k=1)[0].text == HDFS[0]
    assert again.search("disk full", k=1, collection="cases")[0].source == "case-1"


def test_rules_are_part_of_the_version_and_searchable(store: KnowledgeStore) -> None:
    store.add_passages(passages("hdfs.md", HDFS))
    before = store.version
    book = store.rulebook()
    assert book.path == store.path / "rules.json"
    r1 = book.add("Redundant addStoredBlock requests after a DataNode restart are normal")
    book.add("Unseen templates are at least high severity")
    assert store.version != before
    assert RuleBook(store.path).rules_version == book.rules_version
    assert store.sync_rules(book.list()) == 2
    hit = store.search("datanode restarted and reported blocks twice", k=1, collection="rules")[0]
    assert hit.id == r1.id and hit.heading == f"{r1.id} v1"
    book.remove(r1.id)
    assert store.sync_rules(book.list()) == 1 and store.count("rules") == 1


def test_retrieval_per_candidate_uses_its_evidence(store: KnowledgeStore) -> None:
    store.add_passages(passages("hdfs.md", HDFS))
    store.add_passages(passages("tiles.md", TILES, heading="Defects"))
    cand = Candidate(
        id="hdfs.log:blk_7", source="hdfs.log", modality="logs", locator={"events": 9}, score=3.0, threshold=1.0,
        detector="counts",
        evidence=(Evidence(id="E1", kind="log_lines", summary="1 line of a template never seen in normal sequences",
                           data={"reason": "unseen_template",
                                 "templates": ["BLOCK* NameSystem.addStoredBlock: Redundant addStoredBlock "
                                               "request received for <*> on <*> size <*>"]}),),
    )
    queries = candidate_queries(cand)
    assert len(queries) == 1 and "Redundant addStoredBlock" in queries[0] and "never seen" in queries[0]
    hits = store.search_for(cand, k=2)
    assert hits[0].text == HDFS[2]
    bare = cand.model_copy(update={"evidence": ()})
    assert candidate_queries(bare) == ["logs anomaly from detector counts in hdfs.log"]
