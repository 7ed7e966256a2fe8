"""Message ids EPOCH:SEQ (broadcast.ids)."""

from __future__ import annotations

import re

import pytest

from broadcast.ids import MAX_SEQ, BadId, MessageId, format_id, new_epoch, parse_id


def test_an_id_round_trips():
    epoch = new_epoch()
    assert parse_id(format_id(epoch, 42)) == MessageId(epoch, 42)
    assert parse_id(format_id(epoch, 0)).seq == 0  # before the first message
    assert parse_id(format_id(epoch, MAX_SEQ)).seq == MAX_SEQ


def test_epochs_are_short_url_safe_and_fresh():
    epochs = {new_epoch() for _ in range(200)}
    assert len(epochs) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{8}", e) for e in epochs)


@pytest.mark.parametrize("text", [
    "", "abc", "abc:", ":1", "abc:-1", "abc:+1", "abc: 1", "abc:1 ", "abc:01", "abc:1_000",
    "abc:\u0661", "a:b:1", "a b:1", "a" * 33 + ":1", f"abc:{MAX_SEQ + 1}", "abc:1.0", "abc:1e3",
])
def test_a_malformed_id_is_a_clear_value_error(text):
    with pytest.raises(BadId, match=r"^malformed message id: expected EPOCH:SEQ$") as caught:
        parse_id(text)
    assert isinstance(caught.value, ValueError)
