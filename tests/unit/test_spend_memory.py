"""SpendMemory: what one replica remembers of spends, kept consistent without a store."""

from __future__ import annotations

from broker.fleet import MAX_REMEMBERED_ABORTS, SpendMemory


class TestOtherReplicasSpends:
    def test_the_first_sent_notice_is_timed_and_names_its_spender(self) -> None:
        memory = SpendMemory()
        memory.heard_sent("fp", "r1", 10.0)
        memory.heard_sent("fp", "r1", 12.0)  # the same spender again: still the first time
        assert memory.foreign["fp"] == (10.0, "r1")

    def test_a_second_spender_of_one_token_leaves_it_nobodys_to_resolve(self) -> None:
        memory = SpendMemory()
        memory.heard_sent("fp", "r1", 10.0)
        memory.heard_sent("fp", "r2", 12.0)
        assert memory.foreign["fp"] == (10.0, None)

    def test_a_resolved_spend_is_neither_foreign_nor_unknown(self) -> None:
        memory = SpendMemory()
        memory.heard_sent("fp", "r1", 10.0)
        memory.unknown_foreign.add("fp")
        assert memory.is_unknown("fp")
        memory.resolved_foreign("fp")
        assert "fp" not in memory.foreign
        assert not memory.is_unknown("fp")

    def test_our_own_send_time_counts_before_a_notice(self) -> None:
        memory = SpendMemory()
        assert memory.sent_time("fp") is None
        memory.heard_sent("fp", "r1", 10.0)
        assert memory.sent_time("fp") == 10.0
        memory.our_unknown("fp", 8.0)
        memory.our_unknown("fp", 9.0)  # the first send is kept
        assert memory.sent_time("fp") == 8.0
        assert memory.is_unknown("fp")


class TestOurSpends:
    def test_a_rejected_token_is_unknown_and_rejected(self) -> None:
        memory = SpendMemory()
        memory.our_rejected("fp")
        assert memory.is_unknown("fp")
        assert "fp" in memory.rejected

    def test_an_abort_is_remembered_until_written(self) -> None:
        memory = SpendMemory()
        assert not memory.abort_unwritten
        memory.aborted("me", 3, "fp")
        assert memory.abort_unwritten
        assert memory.aborts == {("me", 3): "fp"}
        memory.abort_written(2)  # another fence: still unwritten
        assert memory.aborted_fence == 3
        memory.abort_written(3)
        assert not memory.abort_unwritten
        assert memory.aborts == {("me", 3): "fp"}  # kept, to be ended again after a reconnect

    def test_an_abort_without_a_token_names_only_the_fence(self) -> None:
        memory = SpendMemory()
        memory.aborted("me", 3, None)
        assert memory.aborted_fence == 3
        assert memory.aborts == {}

    def test_the_oldest_and_the_newest_aborts_are_kept_past_the_limit(self) -> None:
        memory = SpendMemory()
        for fence in range(1, MAX_REMEMBERED_ABORTS + 3):
            memory.aborted("me", fence, "fp")
        fences = [fence for _, fence in memory.aborts_in_fence_order()]
        assert len(fences) == MAX_REMEMBERED_ABORTS
        assert fences[0] == 1
        assert fences[-1] == MAX_REMEMBERED_ABORTS + 2

    def test_aborts_of_one_token_in_fence_order(self) -> None:
        memory = SpendMemory()
        memory.aborted("me", 5, "a")
        memory.aborted("old", 2, "a")
        memory.aborted("me", 3, "b")
        assert memory.aborts_of("a") == [("old", 2), ("me", 5)]
        assert memory.aborts_in_fence_order() == [("old", 2), ("me", 3), ("me", 5)]

    def test_a_new_spend_clears_the_last_abort_and_its_repeated_fence(self) -> None:
        memory = SpendMemory()
        memory.aborted("me", 4, "fp")
        memory.aborted("me", 5, "fp")
        memory.began("me", 4, "fp", retry=False)  # fence 4 again, after a rollback
        assert memory.aborted_fence == 0
        assert memory.aborts == {("me", 5): "fp"}
        assert "fp" not in memory.retried
        memory.began("me", 6, "fp", retry=True)
        assert "fp" in memory.retried


class TestCleanUp:
    def test_a_newer_set_forgets_every_older_spend(self) -> None:
        memory = SpendMemory()
        for fp in ("old", "new"):
            memory.heard_sent(fp, "r1", 1.0)
            memory.foreign_fences[fp] = ("r1", 2)
            memory.unknown.add(fp)
            memory.unknown_foreign.add(fp)
            memory.retried.add(fp)
            memory.rejected.add(fp)
        memory.aborted("me", 1, "old")
        memory.aborted("me", 2, "new")
        memory.keep_only("new")
        assert set(memory.foreign) == set(memory.foreign_fences) == {"new"}
        assert memory.unknown == memory.unknown_foreign == {"new"}
        assert memory.retried == memory.rejected == {"new"}
        assert memory.aborts == {("me", 2): "new"}

    def test_no_refresh_token_forgets_everything(self) -> None:
        memory = SpendMemory()
        memory.unknown.add("fp")
        memory.keep_only(None)
        assert not memory.unknown


class TestTakeOver:
    def test_a_reload_carries_what_the_old_protocol_knew(self) -> None:
        old, new = SpendMemory(), SpendMemory()
        old.unknown.add("u")
        old.heard_sent("f", "r2", 1.0)
        old.our_unknown("u", 2.0)
        old.aborted("old-owner", 7, "a")
        new.heard_sent("f", "r3", 5.0)  # its own knowledge wins
        new.take_over(old, owner="old-owner", in_flight="w", now=9.0)
        assert "u" in new.unknown
        assert new.sent_at["u"] == 2.0
        assert new.foreign["f"] == (5.0, "r3")
        assert new.foreign["w"] == (9.0, "old-owner")  # on the old one's wire: another owner's
        assert new.carried_aborts == [("old-owner", 7)]
        assert new.aborts == {("old-owner", 7): "a"}
        assert new.abort_unwritten

    def test_a_reload_of_a_reload_carries_the_older_unwritten_aborts(self) -> None:
        first, second, third = SpendMemory(), SpendMemory(), SpendMemory()
        first.aborted("one", 3, "a")
        second.take_over(first, owner="one", in_flight=None, now=0.0)
        second.aborted("two", 4, "a")
        third.take_over(second, owner="two", in_flight=None, now=0.0)
        assert third.carried_aborts == [("one", 3), ("two", 4)]
        assert third.aborts_of("a") == [("one", 3), ("two", 4)]


class TestSenders:
    def test_every_sender_is_kept_while_the_token_is_nobodys(self) -> None:
        memory = SpendMemory()
        memory.heard_sent("fp", "r1", 10.0)
        memory.heard_sent("fp", "r2", 12.0)
        assert memory.senders["fp"] == {"r1", "r2"}

    def test_a_spend_found_names_its_one_sender_and_keeps_the_first_time(self) -> None:
        memory = SpendMemory()
        memory.heard_sent("fp", "r1", 10.0)
        memory.heard_sent("fp", "r2", 12.0)
        memory.found_foreign("fp", "r1", 15.0)
        assert memory.foreign["fp"] == (10.0, "r1")
        assert memory.senders["fp"] == {"r1"}
        memory.found_foreign("other", None, 16.0)
        assert memory.foreign["other"] == (16.0, None)
        assert "other" not in memory.senders

    def test_resolving_or_a_newer_set_forgets_the_senders(self) -> None:
        memory = SpendMemory()
        memory.heard_sent("fp", "r1", 10.0)
        memory.heard_sent("kept", "r2", 11.0)
        memory.resolved_foreign("fp")
        assert "fp" not in memory.senders
        memory.heard_sent("fp", "r1", 12.0)
        memory.keep_only("kept")
        assert memory.senders == {"kept": {"r2"}}

    def test_a_reload_carries_the_senders_of_what_it_carries(self) -> None:
        previous = SpendMemory()
        previous.heard_sent("fp", "r1", 10.0)
        previous.heard_sent("fp", "r2", 11.0)
        memory = SpendMemory()
        memory.take_over(previous, owner="old", in_flight="wire", now=20.0)
        assert memory.senders == {"fp": {"r1", "r2"}, "wire": {"old"}}
