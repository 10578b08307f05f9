"""schemathesis against /openapi.json: generated valid and invalid requests, none may get a 5xx,
every response must match the status codes, media types and bodies the schema documents, and
the server must be alive afterwards."""

from __future__ import annotations

import http.client
from urllib.parse import urlparse

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from live_server import LiveServer
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from xllm.api.app import build_app
from xllm.api.settings import ServerSettings

pytestmark = pytest.mark.timeout(240)

# Valid requests reach the engine (a model step each); invalid ones are answered at once.
EXAMPLES = {GenerationMode.POSITIVE: 110, GenerationMode.NEGATIVE: 400}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def test_generated_requests_never_get_a_server_error(served_engine) -> None:  # noqa: ANN001
    # Caps of 1 new token and n <= 2 keep every generated request cheap; the schema says so.
    server_settings = ServerSettings(served_model_names=["demo"], max_tokens_limit=1, max_n=2)
    app = build_app(served_engine, server_settings, shutdown_engine=False)
    with LiveServer(app) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        calls = {mode: 0 for mode in EXAMPLES}
        statuses: dict[int, int] = {}
        for mode, examples in EXAMPLES.items():

            @given(case=schema.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=srv.url, timeout=60)
                calls[mode] += 1  # noqa: B023 - runs inside this iteration
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=CHECKS)

            check()
        assert sum(calls.values()) >= 500, calls
        assert statuses.get(200, 0) >= 20, f"too few requests reached the engine: {statuses}"
        u = urlparse(srv.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200, "the server did not survive"
        conn.close()
    s = served_engine.stats()
    assert s.state == "ready" and s.num_unfinished_requests == 0
