"""The API benchmark's server harness (``eval.api_bench.start_server``) on a real server process."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from eval.api_bench import start_server

pytestmark = pytest.mark.timeout(120)


def test_a_token_that_looks_like_an_option_still_starts_the_server(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # token_urlsafe starts with "-" once in 64 draws; passed as "--token -x..." argparse took it
    # for an option and the server exited with status 2 (a flaky browser test). The harness now
    # hands the token over in the environment, where nothing parses it.
    token = "-Ab" + secrets.token_hex(8)
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: token)
    with start_server(tmp_path / "server", model="none", knowledge=False) as server:
        assert server.token == token
        assert httpx.get(f"{server.url}/api/runs", timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/api/runs", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/api/runs", headers=server.headers, timeout=10).status_code == 200
