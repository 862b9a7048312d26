"""The notice as published on the channel and read back (broker.store.Notice)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from broker.store import Notice


def retry_abort(retried: tuple[str, int]) -> Notice:
    """The abort notice of r4's grace retry of `retried`'s spend."""
    abort = Notice("app", "abort", rank=(1, 5), refresh_fp="fp", owner="r4", retry_aborted=True)
    return dataclasses.replace(abort, retried=retried)


@pytest.mark.parametrize(
    "notice",
    [
        retry_abort(("r7", 5)),
        retry_abort(("r7", 0)),
        Notice("app", "sent", rank=(1, 5), refresh_fp="fp", owner="r7", fence=5),
        Notice("app", "lease", owner="r1", ttl=17.5),
    ],
    ids=["retry-abort", "retry-abort-of-a-veto", "sent", "lease"],
)
def test_a_notice_reads_back_as_it_was_published(notice: Notice) -> None:
    """Every field a replica acts on survives the channel, `retried` included."""
    assert Notice.decode(notice.encode()) == notice


def test_a_retry_abort_from_a_release_before_names_no_retried_spend() -> None:
    """A release before `retried` publishes no `ro`/`rf`: the notice names no retried spend,
    and a replica keeps what it remembered (the retrier's spend)."""
    raw = json.loads(
        Notice("app", "abort", refresh_fp="fp", owner="r4", retry_aborted=True).encode()
    )
    assert "ro" not in raw and "rf" not in raw
    decoded = Notice.decode(json.dumps(raw))
    assert decoded is not None and decoded.retry_aborted and decoded.retried is None
