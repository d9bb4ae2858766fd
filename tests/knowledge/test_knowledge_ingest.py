"""Ingest: Markdown/text/PDF parsing, chunking with stable offsets, per-file errors, storing.

Parsing tests need no model. The storing tests use the real packaged embedder (loaded once
per process) in a store under tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.ingest import (
    IngestError,
    chunk_text,
    ingest_paths,
    read_document,
    split_markdown,
)
from knowledge.records import IngestStatus, passage_id
from knowledge.store import KnowledgeStore

EXAMPLES = Path(__file__).resolve().parents[2] / "knowledge" / "examples"


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (no PDF library needed)."""
    objects: list[bytes] = []
    n_pages = len(pages)
    page_ids = [4 + 2 * i for i in range(n_pages)]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{i} 0 R" for i in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({safe}) Tj ET".encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {page_ids[i] + 1} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for num, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{num} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


MARKDOWN = """> Example written by a test.

Intro before any heading.

# Runbook

Top text.

## Disk full

Free space on the DataNode.

```bash
# not a heading: inside a fence
df -h
```

### Details
Run the balancer.

## Dead node
Check heartbeats.
"""


# ------------------------------------------------------------------------- parsing (no model)

def test_chunks_point_into_the_text_overlap_and_cover_it() -> None:
    words = [f"word{i:04d}" for i in range(900)]
    text = "  " + " ".join(words[:300]) + ".\n\n" + " ".join(words[300:]) + "\n"
    chunks = list(chunk_text(text, size=400, overlap=60))
    assert len(chunks) > 10
    for offset, chunk in chunks:
        assert text[offset:offset + len(chunk)] == chunk
        assert len(chunk) <= 400 and chunk == chunk.strip()
    for (o1, c1), (o2, _) in zip(chunks, chunks[1:]):
        assert o1 < o2 <= o1 + len(c1), "consecutive chunks overlap or touch"
        assert not text[o2 - 1].isalnum(), "a chunk starts at a word"
    covered = "".join(c for _, c in chunks)
    assert all(w in covered for w in words)
    assert list(chunk_text("short", size=400, overlap=60)) == [(0, "short")]
    no_overlap = list(chunk_text(text, size=400, overlap=0))
    assert sum(len(c) for _, c in no_overlap) <= len(text)
    with pytest.raises(ValueError):
        list(chunk_text(text, size=10))
    with pytest.raises(ValueError):
        list(chunk_text(text, size=400, overlap=300))


def test_markdown_sections_keep_heading_paths_and_offsets() -> None:
    sections = split_markdown(MARKDOWN)
    assert [s.heading for s in sections] == ["", "Runbook", "Runbook > Disk full", "Runbook > Disk full > Details",
                                             "Runbook > Dead node"]
    for s in sections:
        assert MARKDOWN[s.offset:s.offset + len(s.text)] == s.text
    fenced = next(s for s in sections if s.heading == "Runbook > Disk full")
    assert "# not a heading" in fenced.text


def test_read_markdown_gives_stable_ids_and_example_flag(tmp_path: Path) -> None:
    path = tmp_path / "runbook.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    doc = read_document(path)
    again = read_document(path)
    assert doc.source == "runbook.md" and not doc.truncated
    assert [p.id for p in doc.passages] == [p.id for p in again.passages]
    assert all(p.example for p in doc.passages)
    assert doc.passages[0].text == "Intro before any heading." and doc.passages[0].heading == ""
    assert not any("Example written" in p.text for p in doc.passages), "the disclaimer line is a flag, not a passage"
    for p in doc.passages:
        assert p.id == passage_id(p.source, p.heading, p.offset) and p.id.startswith("P-") and len(p.id) == 14
        assert MARKDOWN[p.offset:p.offset + len(p.text)] == p.text
    assert len({p.id for p in doc.passages}) == len(doc.passages)
    assert {p.heading for p in doc.passages} >= {"Runbook > Disk full > Details", "Runbook > Dead node"}


def test_text_and_pdf_are_read(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("Plain notes about the gateway.\nSecond line.\n", encoding="utf-8")
    doc = read_document(txt)
    assert [(p.heading, p.offset) for p in doc.passages] == [("", 0)] and not doc.passages[0].example

    latin = tmp_path / "latin.txt"
    latin.write_bytes("Temp\xe9rature du capteur".encode("latin-1"))
    assert "Temp" in read_document(latin).passages[0].text

    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(make_pdf(["Tile crack inspection guide", "Blowholes come from trapped air"]))
    doc = read_document(pdf)
    assert [p.heading for p in doc.passages] == ["page 1", "page 2"]
    assert "crack" in doc.passages[0].text and "Blowholes" in doc.passages[1].text


@pytest.mark.parametrize("name, content, why", [
    ("empty.md", b"", "empty file"),
    ("blank.txt", b"  \n\n\t ", "empty document"),
    ("headings.md", b"# Only\n## Headings\n", "no text besides headings"),
    ("binary.txt", b"abc\x00\x01\x02", "binary"),
    ("slides.pptx", b"PK\x03\x04", "unsupported file type '.pptx'"),
    ("README", b"text", "unsupported file type (no extension)"),
    ("broken.pdf", b"%PDF-1.4 this is not a pdf", "PDF"),
    ("blank.pdf", None, "no extractable text"),
])
def test_bad_files_give_errors_naming_the_file(tmp_path: Path, name: str, content: bytes | None, why: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if content is not None else make_pdf([""]))
    with pytest.raises(IngestError) as info:
        read_document(path)
    assert str(path) in str(info.value) and why in str(info.value)


def test_missing_and_too_large_files(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no such file"):
        read_document(tmp_path / "gone.md")
    big = tmp_path / "big.txt"
    big.write_text("x " * 5000, encoding="utf-8")
    with pytest.raises(IngestError, match="over the .* limit"):
        read_document(big, max_bytes=1000)
    doc = read_document(big, chunk_size=200, overlap=20, max_passages=3)
    assert doc.truncated and len(doc.passages) == 3 and "max_passages=3" in doc.note
    pdf = tmp_path / "long.pdf"
    pdf.write_bytes(make_pdf([f"page {i} text with a few words to fill the line " * 3 for i in range(40)]))
    doc = read_document(pdf, chunk_size=100, overlap=10, max_passages=5)
    assert doc.truncated and len(doc.passages) == 5 and "page" in doc.note


# ------------------------------------------------------------------------- storing (real embedder)

@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeStore:
    return KnowledgeStore(tmp_path_factory.mktemp("ingest_store"))


def test_bad_files_do_not_stop_the_rest(store: KnowledgeStore, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.md").write_text("# Disk\nA DataNode disk filled up and writes failed.\n", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n")
    (folder / ".hidden.md").write_text("# secret\nnot ingested\n", encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "more.txt").write_text("Reaction wheel speed telemetry.", encoding="utf-8")
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 4000, encoding="utf-8")

    results = ingest_paths(store, [folder, tmp_path / "missing.pdf", huge], max_passages=4, chunk_size=300, overlap=30)
    by_path = {Path(r.path).name: r for r in results}
    assert set(by_path) == {"empty.txt", "good.md", "photo.png", "more.txt", "missing.pdf", "huge.txt"}
    assert by_path["good.md"].status is IngestStatus.OK and by_path["good.md"].source == "docs/good.md"
    assert by_path["more.txt"].ok and by_path["more.txt"].source == "docs/sub/more.txt"
    for name in ("empty.txt", "photo.png", "missing.pdf"):
        r = by_path[name]
        assert r.status is IngestStatus.ERROR and name in (r.reason or "") and name in r.line()
    assert by_path["huge.txt"].ok and by_path["huge.txt"].truncated and by_path["huge.txt"].passages == 4
    assert "max_passages=4" in (by_path["huge.txt"].reason or "")
    sources = {s.source for s in store.list_sources()}
    assert {"docs/good.md", "docs/sub/more.txt", "huge.txt"} <= sources
    assert not any("hidden" in s for s in sources)


def test_examples_ingest_idempotently_and_changes_replace(store: KnowledgeStore, tmp_path: Path) -> None:
    results = ingest_paths(store, [EXAMPLES])
    assert {Path(r.path).name for r in results} == {"hdfs_write_pipeline.md", "spacecraft_telemetry.md",
                                                    "magnetic_tile_defects.md"}
    assert all(r.status is IngestStatus.OK and r.passages > 3 for r in results), [r.line() for r in results]
    info = {s.source: s for s in store.list_sources()}
    assert all(info[f"examples/{Path(r.path).name}"].example for r in results)
    version = store.version

    again = ingest_paths(store, [EXAMPLES])
    assert all(r.status is IngestStatus.UNCHANGED for r in again) and store.version == version

    # a changed document replaces its old passages; a shrunk one loses the ones past its end
    doc = tmp_path / "note.md"
    doc.write_text("# A\n" + "alpha beta gamma. " * 200 + "\n# B\nlast section\n", encoding="utf-8")
    first = ingest_paths(store, [doc])[0]
    assert first.status is IngestStatus.OK and first.passages > 3
    doc.write_text("# A\nalpha only\n", encoding="utf-8")
    second = ingest_paths(store, [doc])[0]
    assert (second.status, second.passages, second.removed) == (IngestStatus.OK, 1, first.passages - 1)
    assert [p.text for p in store.passages("note.md")] == ["alpha only"]
    assert store.version != version

    hits = store.search("trapped air leaves round pits in the tile surface", k=3)
    assert hits[0].source == "examples/magnetic_tile_defects.md" and "Blowhole" in hits[0].heading
    assert hits[0].example
