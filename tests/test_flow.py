"""ServerFlow: when a server owes its client nothing and may go back to the pool."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.protocol import messages as m
from pgproxy.protocol.flow import FlowError, ServerFlow

IDLE, IN_TX, FAILED = m.IDLE, m.IN_TRANSACTION, m.FAILED_TRANSACTION


def send(flow: ServerFlow, types: str) -> None:
    """Forward client messages, one type letter each (``"PBDES"``)."""
    for t in types:
        flow.client_message(ord(t))


def test_new_flow_is_idle() -> None:
    flow = ServerFlow()
    assert flow.idle
    assert not flow.pending
    assert flow.status == IDLE
    assert not flow.in_transaction


def test_simple_query_is_idle_after_ready_for_query_idle() -> None:
    flow = ServerFlow()
    send(flow, "Q")
    assert flow.pending == deque([m.QUERY])
    assert not flow.idle
    flow.server_ready(IDLE)
    assert not flow.pending
    assert flow.idle


def test_begin_keeps_server_until_the_transaction_ends() -> None:
    flow = ServerFlow()
    send(flow, "Q")  # BEGIN
    flow.server_ready(IN_TX)
    assert not flow.pending
    assert flow.status == IN_TX
    assert flow.in_transaction
    assert not flow.idle
    send(flow, "Q")  # COMMIT
    flow.server_ready(IDLE)
    assert flow.idle


def test_failed_transaction_keeps_server() -> None:
    flow = ServerFlow()
    send(flow, "Q")
    flow.server_ready(FAILED)
    assert flow.in_transaction
    assert not flow.idle


def test_extended_messages_with_only_flush_keep_server_until_sync() -> None:
    flow = ServerFlow()
    send(flow, "PBDEH")
    assert not flow.pending
    assert flow.unsynced
    assert not flow.idle  # implicit transaction open on the server
    send(flow, "S")
    assert flow.pending == deque([m.SYNC])
    assert not flow.unsynced
    assert not flow.idle
    flow.server_ready(IDLE)
    assert flow.idle


@pytest.mark.parametrize("types", ["P", "PDH", "B", "D", "E", "C", "PH"])
def test_any_unsynced_extended_message_keeps_server(types: str) -> None:
    flow = ServerFlow()
    send(flow, types)
    assert not flow.idle


def test_pipelined_syncs_need_one_ready_for_query_each() -> None:
    flow = ServerFlow()
    send(flow, "PBESBESBES")
    assert len(flow.pending) == 3
    flow.server_ready(IDLE)
    assert not flow.idle
    flow.server_ready(IDLE)
    assert not flow.idle
    assert len(flow.pending) == 1
    flow.server_ready(IDLE)
    assert flow.idle
    with pytest.raises(FlowError):
        flow.server_ready(IDLE)


def test_simple_copy_in_needs_both_copy_done_and_ready_for_query() -> None:
    flow = ServerFlow()
    send(flow, "Q")  # COPY t FROM STDIN
    flow.server_copy_in()
    assert flow.copy_in
    assert flow.pending == deque([m.QUERY])  # the Query is not swallowed
    send(flow, "ddd")
    assert flow.copy_in
    assert not flow.idle
    send(flow, "c")
    assert not flow.copy_in
    assert not flow.idle  # CommandComplete/ReadyForQuery still owed
    flow.server_ready(IDLE)
    assert flow.idle


def test_sync_and_flush_during_copy_are_not_counted() -> None:
    flow = ServerFlow()
    send(flow, "Q")
    flow.server_copy_in()
    send(flow, "dSHdS")
    assert flow.pending == deque([m.QUERY])
    assert not flow.unsynced
    send(flow, "c")
    flow.server_ready(IDLE)
    assert flow.idle


def test_copy_fail_ends_copy_like_copy_done() -> None:
    flow = ServerFlow()
    send(flow, "Q")
    flow.server_copy_in()
    send(flow, "df")
    assert not flow.copy_in
    flow.server_ready(IDLE)  # after the ErrorResponse
    assert flow.idle


def test_extended_copy_swallows_the_sync_sent_before_copy_in_response() -> None:
    flow = ServerFlow()
    send(flow, "PBDES")
    assert flow.pending == deque([m.SYNC])
    flow.server_copy_in()
    assert not flow.pending  # the server ignores that Sync while copying
    assert not flow.idle
    send(flow, "dd")
    assert not flow.idle
    send(flow, "cS")
    assert flow.pending == deque([m.SYNC])
    assert not flow.idle
    flow.server_ready(IDLE)
    assert flow.idle
    with pytest.raises(FlowError):  # exactly one ReadyForQuery was owed
        flow.server_ready(IDLE)


def test_extended_copy_is_not_idle_between_copy_done_and_the_next_sync() -> None:
    flow = ServerFlow()
    send(flow, "PBDES")
    flow.server_copy_in()
    send(flow, "dc")
    # The COPY's Execute is still unsynced: the server holds an implicit transaction and
    # answers only the Sync the client sends after CopyDone.
    assert not flow.idle


def test_extended_copy_without_early_sync_swallows_nothing() -> None:
    flow = ServerFlow()
    send(flow, "PBEH")
    flow.server_copy_in()
    assert not flow.pending
    send(flow, "dcS")
    assert flow.pending == deque([m.SYNC])
    flow.server_ready(IDLE)
    assert flow.idle


def test_extended_copy_after_pipelined_unit_swallows_only_its_own_sync() -> None:
    flow = ServerFlow()
    send(flow, "PBESPBES")  # SELECT unit, then COPY unit
    flow.server_ready(IDLE)  # first unit answered
    flow.server_copy_in()
    assert not flow.pending
    send(flow, "dcS")
    flow.server_ready(IDLE)
    assert flow.idle


def test_error_mid_copy_keeps_server_until_client_sends_copy_done() -> None:
    flow = ServerFlow()
    send(flow, "Q")
    flow.server_copy_in()
    send(flow, "d")
    flow.server_ready(IDLE)  # ErrorResponse + ReadyForQuery before the client stopped copying
    assert not flow.pending
    assert flow.status == IDLE
    assert flow.copy_in
    assert not flow.idle  # the client's CopyData/CopyDone are still on their way
    send(flow, "dd")
    assert not flow.idle
    send(flow, "c")
    assert flow.idle


def test_function_call_expects_one_ready_for_query() -> None:
    flow = ServerFlow()
    send(flow, "F")
    assert flow.pending == deque([m.FUNCTION_CALL])
    assert not flow.idle
    flow.server_ready(IDLE)
    assert flow.idle


def test_function_call_after_unsynced_messages_counts_as_a_unit() -> None:
    flow = ServerFlow()
    send(flow, "PF")
    assert len(flow.pending) == 1
    assert not flow.unsynced


def test_terminate_and_copy_messages_outside_copy_change_nothing() -> None:
    flow = ServerFlow()
    send(flow, "Xdc")
    assert flow.idle
    assert not flow.pending


def test_ready_for_query_with_nothing_pending_raises() -> None:
    flow = ServerFlow()
    with pytest.raises(FlowError):
        flow.server_ready(IDLE)


def test_ready_for_query_after_all_answered_raises() -> None:
    flow = ServerFlow()
    send(flow, "Q")
    flow.server_ready(IDLE)
    with pytest.raises(FlowError):
        flow.server_ready(IDLE)


def test_reset_forgets_everything() -> None:
    flow = ServerFlow()
    send(flow, "QQ")
    flow.server_ready(IN_TX)
    send(flow, "PB")
    flow.server_copy_in()
    assert not flow.idle
    flow.reset()
    assert flow.idle
    assert not flow.pending
    assert not flow.unsynced
    assert not flow.copy_in
    assert flow.status == IDLE
    send(flow, "Q")  # usable again
    flow.server_ready(IDLE)
    assert flow.idle


UNITS = {"simple": "Q", "extended": "PBDES", "prepared": "BES", "function": "F"}


@settings(max_examples=40, deadline=None)
@given(
    units=st.lists(
        st.tuples(st.sampled_from(sorted(UNITS)), st.sampled_from([IDLE, IN_TX, FAILED])),
        min_size=1,
    )
)
def test_pipelined_units_are_idle_only_after_the_last_answer_is_idle(
    units: list[tuple[str, int]],
) -> None:
    flow = ServerFlow()
    for kind, _ in units:
        send(flow, UNITS[kind])
    assert len(flow.pending) == len(units)
    for n, (_, status) in enumerate(units, 1):
        assert not flow.idle
        flow.server_ready(status)
        assert len(flow.pending) == len(units) - n
        assert flow.status == status
    assert flow.idle == (units[-1][1] == IDLE)


# A client may pipeline its COPY data and CopyDone ahead of the CopyInResponse (libpq-based
# drivers wait for it; a raw or pipelining client need not).


def test_copy_ended_ahead_of_copy_in_response_simple_query() -> None:
    flow = ServerFlow()
    send(flow, "Qddc")
    flow.server_copy_in()
    assert not flow.copy_in  # the CopyDone is already on its way
    flow.server_ready(IDLE)
    assert flow.idle
    send(flow, "Q")  # the next Query counts as usual
    assert flow.pending == deque([m.QUERY])


def test_copy_ended_ahead_extended_with_the_syncs_around_it() -> None:
    flow = ServerFlow()
    send(flow, "PBDESdcS")
    flow.server_copy_in()
    assert not flow.copy_in
    assert flow.pending == deque([m.SYNC])  # the first Sync went into the COPY
    assert not flow.unsynced
    flow.server_ready(IDLE)
    assert flow.idle


def test_copy_ended_ahead_extended_stays_unsynced_until_the_next_sync() -> None:
    flow = ServerFlow()
    send(flow, "PBDESdc")
    flow.server_copy_in()
    assert not flow.copy_in
    assert not flow.pending
    assert not flow.idle  # the Execute's implicit transaction waits for a Sync
    send(flow, "S")
    flow.server_ready(IDLE)
    assert flow.idle


def test_copy_ended_ahead_after_a_flush_swallows_no_sync() -> None:
    flow = ServerFlow()
    send(flow, "PBEHdcS")
    flow.server_copy_in()
    assert not flow.copy_in
    assert flow.pending == deque([m.SYNC])  # sent after the CopyDone: answered
    flow.server_ready(IDLE)
    assert flow.idle


def test_two_copies_pipelined_with_their_data() -> None:
    flow = ServerFlow()
    send(flow, "QdcQdc")
    flow.server_copy_in()
    assert not flow.copy_in
    flow.server_ready(IDLE)
    flow.server_copy_in()
    assert not flow.copy_in
    flow.server_ready(IDLE)
    assert flow.idle


def test_an_end_sent_ahead_of_a_copy_that_never_started_is_forgotten() -> None:
    flow = ServerFlow()
    send(flow, "Qdc")  # COPY into a missing table: the server ignores the data and the end
    flow.server_ready(IDLE)  # after its ErrorResponse
    send(flow, "Q")  # a COPY that works, its data not sent yet
    flow.server_copy_in()
    assert flow.copy_in
    send(flow, "dc")
    assert not flow.copy_in
    flow.server_ready(IDLE)
    assert flow.idle


def test_stray_copy_ends_do_not_accumulate() -> None:
    flow = ServerFlow()
    for _ in range(1000):
        send(flow, "Qc")
        flow.server_ready(IDLE)
    assert len(flow.ended_ahead) <= 1
    assert flow.idle
