"""Offset continuity guard (pure): skips are caught and named, redeliveries are not."""

from __future__ import annotations

from streamtune.kafka.offsets import DONE, IN_PROGRESS, TAKE, OffsetGuard

TP = ("events.review", 0)


def test_contiguous_offsets_pass() -> None:
    g = OffsetGuard()
    assert [g.observe(TP, o) for o in range(5)] == [TAKE] * 5
    assert g.expected(TP) == 5


def test_a_forward_jump_names_the_first_missing_offset_until_it_arrives() -> None:
    g = OffsetGuard()
    g.observe(TP, 14)
    assert g.observe(TP, 72) == 15
    assert g.observe(TP, 73) == 15  # still missing
    assert g.observe(TP, 15) == TAKE  # the seek delivered it
    assert g.expected(TP) == 16


def test_redelivery_is_not_a_skip_and_processed_records_are_not_redone() -> None:
    g = OffsetGuard()
    for o in range(10):
        g.observe(TP, o)
    for o in range(6):
        g.mark_done(TP, o)
    assert g.observe(TP, 3) == DONE  # processed: acknowledge, do not redo
    assert g.observe(TP, 7) == TAKE  # delivered before but never processed
    assert g.expected(TP) == 10
    g.reset()
    assert g.observe(TP, 3) == DONE  # a lost commit does not make us redo it
    assert [g.observe(TP, o) for o in (4, 5, 6)] == [DONE, DONE, TAKE]


def test_the_first_record_after_an_assignment_is_checked_against_the_commit() -> None:
    committed = {TP: 7}
    g = OffsetGuard(committed=committed.get)
    assert g.observe(TP, 72) == 7  # skipped everything from the commit on
    g.reset()
    assert g.observe(TP, 7) == TAKE
    other = ("events.review", 1)
    assert g.observe(other, 40) == TAKE  # nothing known: accepted
    assert g.expected(other) == 41


def test_only_offsets_really_processed_count_as_done() -> None:
    """A record processed after a hole does not make the hole "done" (the hole is redelivered
    and must be processed, not skipped)."""
    g = OffsetGuard()
    for o in (0, 1, 2, 30, 31, 5, 3, 4):
        g.mark_done(TP, o)
    assert g._done[TP] == [(0, 6), (30, 32)]
    for o in (0, 4, 5, 30, 31):
        g.reset()
        assert g.observe(TP, o) == DONE, o
    for o in (6, 7, 29, 32):
        g.reset()
        assert g.observe(TP, o) == TAKE, o


def test_a_processed_record_delivered_again_still_moves_the_sequence_on() -> None:
    """After a rebalance the commit may sit below what we processed: the redelivered records are
    done (not redone), and the next one is not mistaken for a skip."""
    g = OffsetGuard(committed=lambda tp: 11)
    g.mark_done(TP, 11)
    assert g.observe(TP, 11) == DONE
    assert g.observe(TP, 12) == TAKE


def test_rewind_expects_a_failed_batch_again() -> None:
    g = OffsetGuard()
    for o in range(10, 16):
        g.observe(TP, o)
    g.mark_done(TP, 10)
    g.rewind(TP, 11)  # the batch 11..15 failed
    assert g.observe(TP, 16) == 11  # not a skip past the failed batch
    assert [g.observe(TP, o) for o in (10, 11, 12)] == [DONE, TAKE, TAKE]


def test_a_copy_delivered_while_the_first_is_in_progress_is_held_back() -> None:
    g = OffsetGuard(track_in_progress=True)
    assert [g.observe(TP, o) for o in (9, 10, 11)] == [TAKE] * 3
    # Faust re-seeks to the commit and delivers 9-11 again while their batch is still running
    assert [g.observe(TP, o) for o in (9, 10, 11)] == [IN_PROGRESS] * 3
    g.mark_done(TP, 9)
    assert g.observe(TP, 9) == DONE
    g.rewind(TP, 10)  # the batch holding 10-11 failed: they are read again and taken again
    assert [g.observe(TP, o) for o in (10, 11)] == [TAKE, TAKE]


def test_without_tracking_a_redelivered_unfinished_record_is_taken_again() -> None:
    g = OffsetGuard()  # the trainer: records are not reported back
    assert [g.observe(TP, o) for o in (3, 4)] == [TAKE, TAKE]
    assert g.observe(TP, 3) == TAKE
