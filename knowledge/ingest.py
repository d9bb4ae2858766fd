"""Read Markdown, plain text and PDF documents into passages and store them.

* Markdown is split at headings (ATX ``#`` headings; fenced code is not split), then each
  section is chunked to about ``chunk_size`` characters with ``overlap``, breaking at
  paragraphs, lines, sentences or spaces; every chunk keeps its heading path
  (``"DataNode runbook > Disk full"``).
* Plain text is chunked the same way without headings.
* PDF text is extracted page by page with ``pypdf``; the heading is ``"page N"``.

Offsets are character offsets in the document's text (in the page's text for a PDF), so a
passage id (source | heading | offset) is stable as long as the text before it is.

One result per file (:class:`IngestResult`): a file that is empty, unreadable, binary, too
large or of an unsupported type gives an ``error`` naming the file and the reason, and the
other files go on. A file with more chunks than ``max_passages`` keeps the first ones and
says so (``truncated``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from knowledge.records import IngestResult, IngestStatus, Passage
from knowledge.store import KnowledgeStore

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
TEXT_SUFFIXES = frozenset({".txt", ".text"})
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = MARKDOWN_SUFFIXES | TEXT_SUFFIXES | PDF_SUFFIXES
CHUNK_SIZE = 800
OVERLAP = 120
MAX_PASSAGES = 1000
"""Chunks kept per file; more are dropped and the result says so (embedding is ~20-50 chunks/s on CPU)."""
MAX_FILE_BYTES = 64 * 1024 * 1024
"""Larger files are refused outright (reading them would cost the memory, not just the time)."""
MIN_CHUNK_CHARS = 1
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
_EXAMPLE = re.compile(r"^[\s>#*_\-]*example\b", re.I)
_SPACE = re.compile(r"\s+")


class IngestError(ValueError):
    """A file that cannot be ingested; the message names it and says why."""


@dataclass(frozen=True)
class Section:
    """A run of text under one heading path; ``offset`` is where ``text`` starts in the document."""

    heading: str
    offset: int
    text: str


@dataclass(frozen=True)
class Document:
    """A parsed file: its passages, and whether they were cut at the cap."""

    source: str
    passages: tuple[Passage, ...]
    truncated: bool = False
    note: str = ""


# ----------------------------------------------------------------------------- chunking

def _break_point(text: str, start: int, end: int) -> int:
    """Best place to end a chunk in ``text[start:end]``: paragraph, line, sentence, then space."""
    floor = start + (end - start) // 2
    for sep in ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " "):
        at = text.rfind(sep, floor, end)
        if at > floor:
            return at + len(sep)
    return end


def chunk_text(text: str, size: int = CHUNK_SIZE, overlap: int = OVERLAP, base: int = 0) -> Iterator[tuple[int, str]]:
    """Yield ``(offset, chunk)`` of about ``size`` characters, consecutive chunks overlapping by
    about ``overlap``; offsets are ``base`` + the chunk's first non-space character in ``text``.
    """
    if size < 50:
        raise ValueError(f"chunk size must be >= 50, got {size}")
    if not 0 <= overlap < size // 2:
        raise ValueError(f"overlap must be in [0, size/2), got {overlap}")
    n, pos = len(text), 0
    while pos < n:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return
        end = n if n - pos <= size else _break_point(text, pos, pos + size)
        chunk = text[pos:end].rstrip()
        if len(chunk) >= MIN_CHUNK_CHARS:
            yield base + pos, chunk
        if end >= n:
            return
        if not overlap:
            pos = end
            continue
        nxt = max(end - overlap, pos + 1)
        space = _SPACE.search(text, nxt, end)  # start the overlap at a word
        pos = space.end() if space else nxt


def split_markdown(text: str) -> list[Section]:
    """Sections of a Markdown document, each with its heading path (``"A > B"``)."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    start, in_fence, fence = 0, False, ""
    pos = 0
    for line in text.splitlines(keepends=True):
        fm = _FENCE.match(line)
        if fm:
            if not in_fence:
                in_fence, fence = True, fm.group(1)[0]
            elif fm.group(1)[0] == fence:
                in_fence = False
        hm = None if in_fence or fm else _HEADING.match(line.rstrip("\r\n"))
        if hm:
            sections.append(Section(" > ".join(t for _, t in stack), start, text[start:pos]))
            level, title = len(hm.group(1)), " ".join(hm.group(2).split())
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, title or "(untitled)"))
            start = pos + len(line)
        pos += len(line)
    sections.append(Section(" > ".join(t for _, t in stack), start, text[start:]))
    return [s for s in sections if s.text.strip()]


def _is_example(text: str) -> bool:
    for line in text.splitlines():
        if line.strip():
            return bool(_EXAMPLE.match(line))
    return False


def _drop_example_line(sections: list[Section]) -> list[Section]:
    """Leave out the "this is an example" first line: every passage carries ``example=True``
    instead, and the disclaimer alone would only crowd search results."""
    if not sections or sections[0].offset != 0:
        return sections
    first = sections[0]
    lead = len(first.text) - len(first.text.lstrip())
    end = first.text.find("\n", lead)
    end = len(first.text) if end < 0 else end + 1
    rest = Section(first.heading, first.offset + end, first.text[end:])
    return ([rest] if rest.text.strip() else []) + sections[1:]


def _passages(source: str, sections: Iterable[Section], size: int, overlap: int, max_passages: int,
              example: bool) -> tuple[list[Passage], bool]:
    out: list[Passage] = []
    for sec in sections:
        for offset, chunk in chunk_text(sec.text, size, overlap, base=sec.offset):
            if len(out) >= max_passages:
                return out, True
            out.append(Passage.make(source, sec.heading, offset, chunk, example=example))
    return out, False


# ----------------------------------------------------------------------------- reading

def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise IngestError(f"{path}: binary content (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_pdf(path: Path, max_chars: int | None = None) -> list[Section]:
    """Text per page; stops reading pages once ``max_chars`` are collected (the passage cap
    would drop the rest anyway, and extraction is the slow part of a big PDF)."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise IngestError(f"{path}: PDF support needs pypdf (pip install pypdf): {exc}") from None
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise IngestError(f"{path}: encrypted PDF (no empty password)")
        sections: list[Section] = []
        total = 0
        for i, page in enumerate(reader.pages, start=1):
            if max_chars is not None and total > max_chars:
                break
            text = page.extract_text() or ""
            if text.strip():
                sections.append(Section(f"page {i}", 0, text))
                total += len(text)
    except IngestError:
        raise
    except (PdfReadError, ValueError, OSError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise IngestError(f"{path}: cannot read PDF: {type(exc).__name__}: {exc}") from None
    if not sections:
        raise IngestError(f"{path}: the PDF has no extractable text (scanned images need OCR)")
    return sections


def read_document(path: str | Path, source: str | None = None, chunk_size: int = CHUNK_SIZE,
                  overlap: int = OVERLAP, max_passages: int = MAX_PASSAGES,
                  max_bytes: int = MAX_FILE_BYTES) -> Document:
    """Parse one file into passages (nothing is stored).

    Raises:
        IngestError: missing, empty, binary, too large, unreadable or unsupported; the message
            names the file.
    """
    path = Path(path)
    source = source or path.name
    suffix = path.suffix.lower()
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    if not path.is_file():
        raise IngestError(f"{path}: not a regular file")
    if suffix not in SUPPORTED_SUFFIXES:
        kind = f"'{suffix}'" if suffix else "(no extension)"
        raise IngestError(f"{path}: unsupported file type {kind}; supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}")
    size = path.stat().st_size
    if size == 0:
        raise IngestError(f"{path}: empty file")
    if size > max_bytes:
        raise IngestError(f"{path}: {size / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} MiB limit; "
                          "split the document")
    try:
        if suffix in PDF_SUFFIXES:
            sections = _read_pdf(path, max_chars=max_passages * chunk_size * 2)
            example = _is_example(sections[0].text)
        else:
            text = _read_text(path)
            if not text.strip():
                raise IngestError(f"{path}: empty document (only whitespace)")
            example = _is_example(text)
            sections = split_markdown(text) if suffix in MARKDOWN_SUFFIXES else [Section("", 0, text)]
            if example:
                sections = _drop_example_line(sections)
    except OSError as exc:
        raise IngestError(f"{path}: cannot read: {exc}") from None
    if not sections:
        raise IngestError(f"{path}: no text besides headings")
    passages, truncated = _passages(source, sections, chunk_size, overlap, max_passages, example)
    note = ""
    if truncated:
        last = passages[-1]
        where = f"{last.heading}, offset {last.offset}" if last.heading else f"offset {last.offset}"
        note = (f"large document: kept the first {len(passages)} passages (cap max_passages={max_passages}); "
                f"the text after {where} was not stored")
    return Document(source=source, passages=tuple(passages), truncated=truncated, note=note)


# ----------------------------------------------------------------------------- storing

def _expand(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str]]:
    """(file, source name): a file is stored under its name, a folder's files under
    ``<folder name>/<relative path>`` (hidden files and folders skipped)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            name = path.resolve().name
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = f.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                yield f, f"{name}/{rel.as_posix()}"
        else:
            yield path, path.name


def ingest_file(store: KnowledgeStore, path: str | Path, source: str | None = None,
                collection: str = "documents", **options: int) -> IngestResult:
    """Parse and store one file; never raises for a bad file (the result says what went wrong).

    Re-ingesting an unchanged file stores nothing (``unchanged``); a changed file replaces the
    source's old passages.
    """
    path = Path(path)
    try:
        doc = read_document(path, source=source, **options)
    except IngestError as exc:
        return IngestResult(path=str(path), source=source or "", status=IngestStatus.ERROR, reason=str(exc))
    try:
        stored, removed, unchanged = store.replace_source(doc.source, doc.passages, collection=collection)
    except Exception as exc:  # the store failed for this file: report it, go on with the rest
        return IngestResult(path=str(path), source=doc.source, status=IngestStatus.ERROR,
                            reason=f"{path}: storing failed: {type(exc).__name__}: {exc}")
    return IngestResult(path=str(path), source=doc.source,
                        status=IngestStatus.UNCHANGED if unchanged else IngestStatus.OK,
                        passages=stored, removed=removed, truncated=doc.truncated, reason=doc.note or None)


def ingest_paths(store: KnowledgeStore, paths: Iterable[str | Path], collection: str = "documents",
                 chunk_size: int = CHUNK_SIZE, overlap: int = OVERLAP, max_passages: int = MAX_PASSAGES,
                 max_bytes: int = MAX_FILE_BYTES) -> list[IngestResult]:
    """Ingest files and folders (recursively); one :class:`IngestResult` per file, in order.

    Example::

        for r in ingest_paths(KnowledgeStore("out/knowledge"), ["knowledge/examples", "notes.pdf"]):
            print(r.line())
    """
    options = {"chunk_size": chunk_size, "overlap": overlap, "max_passages": max_passages, "max_bytes": max_bytes}
    results: list[IngestResult] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            results.append(IngestResult(path=str(path), status=IngestStatus.ERROR, reason=f"{path}: no such file or folder"))
            continue
        found = list(_expand([path]))
        if path.is_dir() and not found:
            results.append(IngestResult(path=str(path), status=IngestStatus.ERROR, reason=f"{path}: folder has no files"))
        for file, source in found:
            if source in seen:
                results.append(IngestResult(path=str(file), source=source, status=IngestStatus.ERROR,
                                            reason=f"{file}: another file in this run is already stored as {source!r}"))
                continue
            seen.add(source)
            results.append(ingest_file(store, file, source=source, collection=collection, **options))
    return results
