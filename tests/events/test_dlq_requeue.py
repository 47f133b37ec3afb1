"""`payapp dlq requeue`: the relay's dead letters (outbox rows of a topic its release did not know) go back into the
outbox and are published by a release that knows the topic; on real MariaDB and Apache Kafka."""

from __future__ import annotations

import subprocess

from payapp import events
from tests.events.conftest import VENV_BIN, Api, Pipeline, eventually
from tests.events.test_pipeline import per_payment_mismatches, topic_event_ids


def start_relay_of_an_older_release(p: Pipeline, unknown_topic: str) -> subprocess.Popen[bytes]:
    """`payapp relay` as a release that did not have ``unknown_topic`` yet: the same relay code with that topic taken
    out of the topics it publishes (the only way two releases' relays differ here)."""
    code = ("import payapp.relay as r\n"
            f"r.TOPICS = tuple(t for t in r.TOPICS if t != {unknown_topic!r})\n"
            "from payapp.cli import main\n"
            "raise SystemExit(main(['relay']))\n")
    log = open(p.base / f"old-relay-{len(p.procs)}.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", code], env=p.env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    p.procs.append(proc)
    return proc


def unpublished(p: Pipeline) -> int:
    return p.scalar("SELECT COUNT(*) FROM outbox_event WHERE published_at IS NULL")


async def test_requeue_puts_relay_dead_letters_back_into_the_outbox_for_a_release_that_knows_the_topic(
    pipeline: Pipeline, api: Api
) -> None:
    p = pipeline
    refunded = []
    for amount in (1000, 2000):
        pid = await api.authorize(amount)
        await api.capture(pid)
        await api.refund(pid, 300)
        refunded.append(pid)
    refunds = [r[0] for r in p.sql("SELECT event_id FROM outbox_event WHERE topic = 'payment.refunded' ORDER BY id")]
    assert len(refunds) == 2

    # 1. An older release's relay: publishes the rest, dead-letters both refunds (one dead letter each).
    old = start_relay_of_an_older_release(p, events.REFUNDED)
    await eventually(lambda: unpublished(p) == 0, 30, "the old relay to get past the refunds")
    old.terminate()
    assert old.wait(20) == 0
    dead = p.sql("SELECT dlq_id, source, event_id, payment_id, topic, status FROM dlq_event ORDER BY dlq_id")
    assert [d[1:] for d in dead] == [[f"outbox-relay:{e}", e, "NULL", "payment.refunded", "OPEN"] for e in refunds]
    listed = p.payapp("dlq", "list")
    assert listed.returncode == 0 and all(f"outbox-relay:{e}" in listed.stdout for e in refunds), listed.stdout

    # 2. Replay cannot help (the event was never published): it refuses and points to requeue, applying nothing.
    replayed = p.payapp("dlq", "replay", "--event-id", refunds[0])
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert f"payapp dlq requeue --event-id {refunds[0]}" in replayed.stdout
    assert p.scalar("SELECT COUNT(*) FROM processed_event") == 0
    assert p.scalar("SELECT COUNT(*) FROM dlq_event WHERE status = 'OPEN'") == 2

    # 3. Requeue refuses a consumer's dead letter (it was published; replay it) and an id that matches nothing.
    p.sql("INSERT INTO dlq_event (source, event_id, payment_id, topic, `sequence`, payload, error, attempts, status,"
          " created_at) VALUES ('payment.captured:0:7', NULL, NULL, 'payment.captured', NULL, '{not json',"
          " 'PoisonError: not JSON', 1, 'OPEN', UTC_TIMESTAMP(6))")
    consumer_dlq = p.sql("SELECT dlq_id FROM dlq_event WHERE source = 'payment.captured:0:7'")[0][0]
    refused = p.payapp("dlq", "requeue", "--event-id", consumer_dlq)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"payapp: error: dead letter {consumer_dlq} came from the consumer (payment.captured:0:7), not the outbox "
        "relay: its event was published and failed to apply, so there is nothing to put back into the outbox\n"
        f"payapp: hint: replay it after the fix: payapp dlq replay --event-id {consumer_dlq}\n")
    nothing = p.payapp("dlq", "requeue", "--event-id", "no-such-event")
    assert nothing.returncode == 1
    assert "no open dead letter has eventId or dlq id no-such-event" in nothing.stderr
    assert unpublished(p) == 0

    # 4. Requeue the first by eventId: its outbox row is unpublished and its dead letter RESOLVED, together.
    one = p.payapp("dlq", "requeue", "--event-id", refunds[0])
    assert one.returncode == 0, one.stdout + one.stderr
    assert one.stdout == f"{dead[0][0]}\tok\t{refunds[0]}\tpayment.refunded\toutbox row unpublished\n"
    assert p.sql("SELECT event_id FROM outbox_event WHERE published_at IS NULL") == [[refunds[0]]]
    assert p.sql(f"SELECT status, resolved_at IS NOT NULL FROM dlq_event WHERE dlq_id = {dead[0][0]}") == [
        ["RESOLVED", "1"]]
    # The second's outbox row was purged meanwhile (retention): --all-relay re-inserts it from the stored payload,
    # and leaves the consumer's dead letter alone.
    p.sql(f"DELETE FROM outbox_event WHERE event_id = '{refunds[1]}'")
    rest = p.payapp("dlq", "requeue", "--all-relay")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert rest.stdout == (f"{dead[1][0]}\tok\t{refunds[1]}\tpayment.refunded\t"
                           "outbox row re-inserted (it had been purged)\n")
    assert unpublished(p) == 2
    assert p.sql("SELECT source FROM dlq_event WHERE status = 'OPEN'") == [["payment.captured:0:7"]]
    again = p.payapp("dlq", "requeue", "--all-relay")
    assert again.returncode == 1 and "no open dead letter of the outbox relay" in again.stderr

    # 5. This release's relay publishes them on payment.refunded and the consumer applies them, once.
    p.sql(f"DELETE FROM dlq_event WHERE dlq_id = {consumer_dlq}")
    p.start("relay")
    p.start("consume")
    await eventually(lambda: unpublished(p) == 0, 30, "the requeued rows published")
    seen = await topic_event_ids(p, (events.REFUNDED,))
    assert seen[events.REFUNDED] == set(refunds)
    ids = ",".join(f"'{e}'" for e in refunds)
    await eventually(lambda: p.scalar(f"SELECT COUNT(*) FROM processed_event WHERE event_id IN ({ids})") == 2, 30,
                     "the consumer to apply the requeued refunds")
    api_events = p.scalar("SELECT COUNT(*) FROM outbox_event WHERE topic <> 'payment.settled'")
    await eventually(lambda: p.scalar("SELECT COUNT(*) FROM processed_event") == api_events, 30, "all applied")
    assert p.scalar("SELECT COUNT(*) FROM settlement WHERE kind = 'ADJUSTMENT'") == 2
    assert per_payment_mismatches(p) == []
    assert p.scalar("SELECT COUNT(*) FROM dlq_event WHERE status = 'OPEN'") == 0
