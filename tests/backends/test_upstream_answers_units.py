"""An upstream's whole answer read for translation: a JSON object, or the target's 502."""

from __future__ import annotations

import pytest

from sidecar.backends.upstream_answers import answer_object
from sidecar.errors import UpstreamError


def test_an_object_is_the_answer() -> None:
    assert answer_object(b'{"id": "x"}', "mock") == {"id": "x"}


@pytest.mark.parametrize(("raw", "said"), [(b"<html>", "not JSON"), (b"[1]", "not an object"),
                                           (b'"text"', "not an object")])
def test_anything_else_is_the_targets_502_naming_it(raw: bytes, said: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        answer_object(raw, "mock")
    assert caught.value.status == 502
    assert "`mock`" in caught.value.message and said in caught.value.message
