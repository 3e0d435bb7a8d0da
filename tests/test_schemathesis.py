"""Property-based fuzzing of the HTTP API from its own /openapi.json (schemathesis): no input may cause a 5xx,
and responses match their declared status codes, content types and schemas. Bounded examples keep it fast."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.fuzz  # run with -m fuzz (.ci/run does)
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(search_index):
    from ruclip_search.server import create_app

    app = create_app([search_index[0]], max_upload_bytes=300_000, max_pixels=2_000_000)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_never_fails(api_schema):
    """Each operation with bounded generated cases (the schemathesis pytest plugin is not used: it lags pytest)."""
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            case.call_and_validate(checks=CHECKS)

        check()


def test_api_rejects_invalid_input_without_server_errors(api_schema):
    """Negative cases (wrong types, out-of-range values, missing fields): a 4xx, never a 5xx."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    checked: list[str | None] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.path, case.query, response.status_code, response.text[:300])

        try:
            check()
        except Unsatisfiable:  # nothing to get wrong: /health and /info take no parameters
            checked.append(None)
        else:
            checked.append(operation.path)
    assert len([c for c in checked if c]) >= 6
