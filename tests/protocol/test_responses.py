"""A Responses request read into the internal form, on its own: what it cannot carry is
refused by name, never raised as another error."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.errors import InvalidRequest
from sidecar.protocol.responses import request_from_responses


@pytest.mark.parametrize("tools", [1, -0.5, True, "f", {"type": "function", "name": "f"}])
def test_tools_that_are_not_a_list_are_refused_naming_them(tools: Any) -> None:
    # A number here was a TypeError (not iterable): a 500 to the client.
    with pytest.raises(InvalidRequest) as caught:
        request_from_responses({"model": "m", "input": "hi", "tools": tools})
    assert caught.value.param == "tools"


def test_function_tools_in_a_list_are_carried() -> None:
    request = request_from_responses({"model": "m", "input": "hi", "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "object"}}]})
    assert request.tools == [{"name": "f", "parameters": {"type": "object"}}]
