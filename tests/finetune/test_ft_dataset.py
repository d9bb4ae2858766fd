"""The data-set builder: training part only, every case kind, exact explainer prompts, reproducible hash, checked loading."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from ft_support import SMALL, SmallSet

from agent.explain import Explainer
from eval.hdfs import calibration_blocks
from finetune.dataset import (
    BENIGN_PASSAGE,
    COUNT_FIELDS,
    TRAIN_INJECTION_PAYLOADS,
    BuildConfig,
    DatasetError,
    Example,
    build,
    build_examples,
    case_pool,
    load_dataset,
    manifest_path,
    render_case,
    write_dataset,
)


def test_only_training_blocks_are_used(small_set: SmallSet) -> None:
    data, pool = small_set.data, small_set.pool
    n_train = int(len(data.order) * SMALL.train_fraction)
    reserved = calibration_blocks(data.order)  # the explainer's calibration sessions
    assert reserved and not reserved & set(data.order[n_train:])
    held_out = set(data.order[n_train:]) | reserved
    assert pool.held_out == held_out and len(data.order) - n_train > 0
    assert pool.training_blocks == n_train - len(reserved)
    blocks = {ex.block for ex in small_set.examples}
    assert blocks and not blocks & held_out
    text = "\n".join(m["content"] for ex in small_set.examples for m in ex.messages)
    leaked = [b for b in held_out if b in text]
    assert not leaked, f"held-out blocks appear in prompts: {leaked[:3]}"
    # Normal examples come from the training part's held-out-from-fitting tail only.
    assert all(ex.meta["part"] == "holdout" for ex in small_set.examples if ex.case == "normal")


def test_every_case_kind_with_the_right_labels(small_set: SmallSet) -> None:
    by_case: dict[str, list[Example]] = {}
    for ex in small_set.examples:
        by_case.setdefault(ex.case, []).append(ex)
    assert set(by_case) == {"anomaly", "normal", "uncertain", "rule", "injection"}
    assert all(ex.label == "anomaly" and ex.truth == "anomaly" for ex in by_case["anomaly"])
    assert all(ex.label == "normal" and ex.severity == 0 for ex in by_case["normal"])
    assert all(ex.label == "uncertain" for ex in by_case["uncertain"])
    for ex in by_case["rule"]:
        assert f"[{ex.meta['rule_id']}]" in ex.messages[1]["content"] and "MATCHES this candidate" in ex.messages[1]["content"]
        assert [ex.label, ex.severity] != ex.meta["before"], "a rule case must change the verdict"
        assert ex.meta["rule_id"] in json.loads(ex.answer)["rule_ids"]
    assert {ex.meta["where"] for ex in by_case["injection"]} == {"log_line", "source", "passage"}
    ids = [ex.id for ex in small_set.examples]
    assert len(ids) == len(set(ids))


def test_injection_targets_ignore_the_payload(small_set: SmallSet) -> None:
    plain = {ex.block: ex for ex in small_set.examples if ex.case in ("anomaly", "normal")}
    checked = withheld = dropped = shown = 0
    for ex in small_set.examples:
        if ex.case != "injection":
            continue
        payload = TRAIN_INJECTION_PAYLOADS[ex.meta["payload"]]
        user = ex.messages[1]["content"]
        # The payload is in the prompt (neutralised by the renderer, inside a DATA block), or,
        # in the cases rendered as the product renders them, withheld...
        word = re.findall(r"[A-Za-z]{5,}", payload)[0]
        if ex.meta["withheld"] and ex.meta["where"] == "passage":
            dropped += 1  # the product does not show a passage with markers at all
            assert word not in user and BENIGN_PASSAGE[:40] not in user, (payload, user)
        elif ex.meta["withheld"]:
            withheld += 1
            assert word not in user and "[withheld: " in user, (payload, user)
        else:
            shown += 1
            assert word in user, (payload, word)
        # ...but never in the answer, and the verdict is the clean input's.
        answer = json.loads(ex.answer)
        assert payload[:25] not in ex.answer
        if ex.meta["where"] == "source" and ex.block in plain:
            clean = json.loads(plain[ex.block].answer)
            assert (answer["label"], answer["severity"], answer["causal_chain"]) == \
                (clean["label"], clean["severity"], clean["causal_chain"])
            checked += 1
        assert answer["label"] == ex.truth or (answer["label"] == "uncertain")
    assert checked >= 1 and withheld >= 1 and dropped >= 1 and shown >= 1, (checked, withheld, dropped, shown)


def test_prompts_are_exactly_build_prompt(small_set: SmallSet) -> None:
    pool = small_set.pool
    x = Explainer(None, store=None, rules=[], use_cache=False)
    for lab in list(pool.anomalies[:3]) + list(pool.normals[:2]):
        _, _, messages = x.build_prompt(lab.candidate)
        r = render_case(x, lab.candidate)
        assert [{"role": m.role, "content": m.content} for m in messages] == list(r.messages)
    by_block = {ex.block: ex for ex in small_set.examples if ex.case == "anomaly" and not _borderline(ex)}
    lab = next(lab for lab in pool.anomalies if lab.candidate.locator["sequence"] in by_block)
    _, _, messages = x.build_prompt(lab.candidate)
    assert [m.content for m in messages] == [m["content"] for m in by_block[lab.candidate.locator["sequence"]].messages]


def test_build_is_reproducible_and_hashed(small_set: SmallSet, tmp_path: Path) -> None:
    examples, notes = build_examples(case_pool(small_set.data, "synth", SMALL, source="synth.log"), None, SMALL)
    m = write_dataset(examples, tmp_path / "again.jsonl", {"test": True}, notes)
    original = json.loads(manifest_path(small_set.path).read_text())
    assert m.sha256 == original["sha256"] == hashlib.sha256(small_set.path.read_bytes()).hexdigest()
    assert (tmp_path / "again.jsonl").read_bytes() == small_set.path.read_bytes()
    assert m.cases == original["cases"] and m.teacher_version and m.prompt_version.startswith("explain/")
    assert original["notes"]["held_out_blocks_never_used"] > 0


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    man = json.loads(manifest_path(path).read_text())
    man["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path(path).write_text(json.dumps(man))


def test_load_refuses_bad_data_sets(small_set: SmallSet, tmp_path: Path) -> None:
    examples, manifest = load_dataset(small_set.path)
    assert len(examples) == manifest.examples
    lines = small_set.path.read_text(encoding="utf-8").splitlines()
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest_path(path).write_text(manifest_path(small_set.path).read_text())

    # Tampered after building: the hash no longer matches.
    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="does not match the manifest"):
        load_dataset(path)
    # Mislabelled: the label field disagrees with the answer.
    i = next(k for k, line in enumerate(lines) if json.loads(line)["case"] == "anomaly")
    row = json.loads(lines[i])
    row["label"] = "normal"
    _rewrite(path, lines[:i] + [json.dumps(row)] + lines[i + 1:])
    with pytest.raises(DatasetError, match=rf"bad.jsonl:{i + 1}: label 'normal' does not match the answer's label 'anomaly'"):
        load_dataset(path)
    # A normal case whose answer says anomaly.
    j = next(k for k, line in enumerate(lines) if json.loads(line)["case"] == "normal")
    row = json.loads(lines[j])
    ans = json.loads(row["answer"])
    ans.update(label="anomaly", severity=2)
    row.update(answer=json.dumps(ans), label="anomaly", severity=2)
    _rewrite(path, lines[:j] + [json.dumps(row)] + lines[j + 1:])
    with pytest.raises(DatasetError, match="a 'normal' case must be labelled 'normal', got 'anomaly'"):
        load_dataset(path)
    # An answer that is not a verdict.
    row = json.loads(lines[0])
    row["answer"] = '{"label": "anomaly"}'
    _rewrite(path, [json.dumps(row)] + lines[1:])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: the answer is not a valid verdict"):
        load_dataset(path)
    # Empty, missing manifest, missing file.
    _rewrite(path, [])
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(path)
    manifest_path(path).unlink()
    with pytest.raises(DatasetError, match="no manifest"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="empty data set"):
        write_dataset([], tmp_path / "none.jsonl")


def test_full_view_anomalies_show_what_the_deployed_detector_sees(small_set: SmallSet) -> None:
    """Second views of anomalies come from a detector fitted on all training normals: training
    blocks only (checked above), anomalous, and with evidence that differs from the first view."""
    full = [ex for ex in small_set.examples if ex.id.endswith(":anomaly:full")]
    assert full and len(full) <= SMALL.anomalies_full_view
    plain = {ex.block: ex for ex in small_set.examples if ex.case == "anomaly" and ex.meta["part"] != "full"}
    for ex in full:
        assert ex.case == "anomaly" and ex.truth == "anomaly" and ex.label == "anomaly" and ex.meta["part"] == "full"
        other = plain.get(ex.block)
        if other is not None:
            assert other.messages[1]["content"] != ex.messages[1]["content"]
    assert len(small_set.pool.anomalies_full) <= len(small_set.pool.anomalies)


def _borderline(ex: Example) -> bool:
    return "borderline" in ex.id or ex.case == "injection" and int(ex.id.rsplit(":", 1)[1]) > 1000


def test_borderline_variants_are_added_near_the_threshold(small_set: SmallSet) -> None:
    """Borderline copies: score 1.05-1.3x the threshold, evidence kept, the truth's label; one
    with a benign context line, one with a withheld injected line; everything else as without them."""
    near = [ex for ex in small_set.examples if _borderline(ex)]
    assert len(near) == SMALL.borderline
    assert {ex.id.rsplit(":", 1)[1] if ex.case != "injection" else "injection" for ex in near} == \
        {"borderline", "borderline-ctx", "injection"}
    for ex in near:
        assert 1.05 <= ex.meta["ratio"] <= 1.3, ex.id
        assert ex.label == ex.truth, ex.id  # the evidence decides, not the score
        assert "Evidence (cite as" in ex.messages[1]["content"]
        if ex.case == "injection":
            assert ex.meta["withheld"] and "[withheld: " in ex.messages[1]["content"]
    without, _ = build_examples(small_set.pool, None, replace(SMALL, borderline=0))
    assert [ex.to_json() for ex in without] == [ex.to_json() for ex in small_set.examples if not _borderline(ex)]


def _reasons(c: object) -> set[str]:
    return {str(ev.data.get("reason")) for ev in c.evidence}  # type: ignore[attr-defined]


def test_anomalies_are_shared_out_between_evidence_reasons(small_set: SmallSet) -> None:
    """The rarest evidence reason is taken whole; a uniform sample would mirror the pool's skew."""
    import random

    from finetune.dataset import _stratified

    pool = small_set.pool.anomalies
    counts: dict[str, int] = {}
    for lab in pool:
        for r in _reasons(lab.candidate):
            counts[r] = counts.get(r, 0) + 1
    rarest = min(counts, key=lambda r: (counts[r], r))
    assert len(counts) >= 2 and counts[rarest] < len(pool) // 2, counts
    n = len(pool) // 2
    picked = _stratified(pool, n, random.Random(0))
    assert len(picked) == n and len({id(x) for x in picked}) == n
    # Never rarer than in the pool (a uniform sample's expectation) ...
    assert sum(rarest in _reasons(x.candidate) for x in picked) / n >= counts[rarest] / len(pool)
    # ... and whole once the equal share (n over at most len(counts) groups) covers it.
    n = min(len(pool) - 1, counts[rarest] * len(counts))
    picked = _stratified(pool, n, random.Random(1))
    assert sum(rarest in _reasons(x.candidate) for x in picked) == counts[rarest]
    assert picked == _stratified(pool, n, random.Random(1))  # seeded
    assert [pool.index(x) for x in picked] == sorted(pool.index(x) for x in picked)  # pool order kept
    assert _stratified(pool, len(pool) + 5, random.Random(0)) == list(pool)


def test_scaled_config_and_per_origin_scale(small_set: SmallSet, tmp_path: Path) -> None:
    half = SMALL.scaled(0.5)
    assert all(getattr(half, f) == round(getattr(SMALL, f) * 0.5) for f in COUNT_FIELDS)
    assert (half.seed, half.train_fraction, half.fit_fraction) == (SMALL.seed, SMALL.train_fraction, SMALL.fit_fraction)
    with pytest.raises(ValueError, match="-1"):
        BuildConfig().scaled(-1)
    full = build([("synth", small_set.data)], tmp_path / "full.jsonl", cfg=SMALL, echo=lambda _: None)
    scaled = build([("synth", small_set.data)], tmp_path / "half.jsonl", cfg=SMALL, scale={"synth": 0.5},
                   echo=lambda _: None)
    assert scaled.examples < full.examples and scaled.settings["scale"] == {"synth": 0.5}
    assert scaled.cases["injection"] <= half.injection_cases + half.borderline // 3  # + the withheld borderline third


def test_twins_are_the_clean_prompts_with_the_same_target(small_set: SmallSet, twin_set: SmallSet,
                                                          tmp_path: Path) -> None:
    """With ``twins`` every injection case carries its clean twin's prompt and nothing else changes."""
    assert len(twin_set.examples) == len(small_set.examples)
    for plain, ex in zip(small_set.examples, twin_set.examples):
        assert replace(ex, twin=None).to_json() == plain.to_json()  # same bytes without the twin
        assert (ex.twin is not None) == (ex.case == "injection"), ex.id
        if ex.twin is None:
            continue
        clean, dirty = ex.twin[1]["content"], ex.messages[1]["content"]
        assert ex.twin[0] == ex.messages[0] and clean != dirty
        payload = TRAIN_INJECTION_PAYLOADS[ex.meta["payload"]]
        assert "[withheld: " not in clean and payload[:20] not in clean, ex.id
        if ex.meta["where"] == "passage":
            assert BENIGN_PASSAGE[:40] in clean  # the clean twin shows the benign passage
    loaded, _ = load_dataset(twin_set.path)
    assert [e.twin for e in loaded] == [e.twin for e in twin_set.examples]
    # Only an injection case may carry a twin.
    lines = twin_set.path.read_text(encoding="utf-8").splitlines()
    i = next(k for k, line in enumerate(lines) if json.loads(line)["case"] == "anomaly")
    row = json.loads(lines[i])
    row["twin"] = row["messages"]
    path = tmp_path / "bad.jsonl"
    manifest_path(path).write_text(manifest_path(twin_set.path).read_text())
    _rewrite(path, lines[:i] + [json.dumps(row)] + lines[i + 1:])
    with pytest.raises(DatasetError, match=rf"bad.jsonl:{i + 1}: only injection cases have a clean twin"):
        load_dataset(path)
