"""The shared rollout buffer: by-reference batches, blocking producers, staleness, reconciling counters."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def batch(n: int, version: int, start: int = 0) -> pa.Table:
    return pa.table({"prompt_id": [f"p{start + i}" for i in range(n)], "policy_version": [version] * n})


def test_batches_pass_by_reference_and_counters_reconcile(ray_cluster):
    import ray
    from paddock.ppo.buffer import RolloutBuffer

    buf = RolloutBuffer.remote(capacity_rows=100, max_staleness=0)
    tables = [batch(4, 0, start=4 * i) for i in range(3)]
    for t in tables:
        ray.get(buf.put.remote([ray.put(t)], t.num_rows, 0))
    taken = ray.get(buf.take.remote(6))
    assert [rows for _, rows, _ in taken] == [4, 4]
    got = pa.concat_tables([ray.get(wrapped[0]) for wrapped, _, _ in taken])
    assert got.equals(pa.concat_tables(tables[:2]))
    stats = ray.get(buf.stats.remote())
    assert (stats["rows_in"], stats["rows_out"], stats["rows_dropped"], stats["rows_held"]) == (12, 8, 0, 4)
    assert stats["reconciles"] and stats["occupancy"] == pytest.approx(0.04)


def test_producers_block_while_full(ray_cluster):
    import ray
    from paddock.ppo.buffer import RolloutBuffer

    buf = RolloutBuffer.remote(capacity_rows=8)
    for i in range(2):
        ray.get(buf.put.remote([ray.put(batch(4, 0, 4 * i))], 4, 0))
    blocked = buf.put.remote([ray.put(batch(4, 0, 8))], 4, 0)
    ready, _ = ray.wait([blocked], timeout=1.0)
    assert not ready, "a put into a full buffer must wait"
    ray.get(buf.take.remote(4))
    assert ray.get(blocked, timeout=10) == 8
    assert ray.get(buf.stats.remote())["reconciles"]


def test_stale_batches_are_dropped_and_counted(ray_cluster):
    import ray
    from paddock.ppo.buffer import RolloutBuffer

    buf = RolloutBuffer.remote(capacity_rows=100, max_staleness=1)
    ray.get(buf.put.remote([ray.put(batch(3, 0))], 3, 0))
    ray.get(buf.put.remote([ray.put(batch(5, 1))], 5, 1))
    assert ray.get(buf.publish_version.remote(2)) == 3  # version 0 is two behind
    taken = ray.get(buf.take.remote(5))
    assert [(rows, v) for _, rows, v in taken] == [(5, 1)]
    stats = ray.get(buf.stats.remote())
    assert (
        stats["rows_dropped"] == 3 and stats["staleness_mean"] == pytest.approx(1.0) and stats["reconciles"]
    )
    with pytest.raises(ray.exceptions.RayTaskError, match="went backwards"):
        ray.get(buf.publish_version.remote(1))


def test_take_times_out_with_what_there_is_and_spills(ray_cluster, tmp_path: Path):
    import ray
    from paddock.ppo.buffer import RolloutBuffer

    buf = RolloutBuffer.remote(capacity_rows=10, spill_dir=str(tmp_path))
    ray.get(buf.put.remote([ray.put(batch(2, 0))], 2, 0))
    taken = ray.get(buf.take.remote(5, timeout_s=0.5))
    assert sum(rows for _, rows, _ in taken) == 2
    spilled = sorted(tmp_path.glob("*.parquet"))
    assert len(spilled) == 1 and pq.read_table(spilled[0]).equals(batch(2, 0))


def test_a_resend_request_wakes_the_learners_waiting_for_experience_and_takes_nothing(ray_cluster):
    """The driver that lost the latest version asks for it again where rank 0 of the learners waits (``take``):
    the wait ends at once with no rows taken; the request stands until the version is published again, and a
    request for any other version, or after the learners are done, is refused."""
    import ray
    from paddock.ppo.buffer import RolloutBuffer

    buf = RolloutBuffer.remote(capacity_rows=100, max_staleness=1)
    ray.get(buf.publish_version.remote(3))
    ray.get(buf.put.remote([ray.put(batch(2, 3))], 2, 3))
    waiting = buf.take.remote(8, timeout_s=600)
    ready, _ = ray.wait([waiting], timeout=1.0)
    assert not ready, "two rows of eight: take waits"
    assert ray.get(buf.request_resend.remote(2)) is False  # not the learners' latest
    assert ray.get(buf.request_resend.remote(3)) is True
    assert ray.get(waiting, timeout=10) == []
    assert ray.get(buf.resend_requested.remote()) == 3
    assert ray.get(buf.take.remote(8, timeout_s=600), timeout=10) == []  # until the learners send it again
    ray.get(buf.publish_version.remote(3))
    assert ray.get(buf.resend_requested.remote()) is None
    taken = ray.get(buf.take.remote(2, timeout_s=600), timeout=10)
    assert [(rows, v) for _, rows, v in taken] == [(2, 3)]  # the rows waited through it
    ray.get(buf.close.remote())
    assert ray.get(buf.request_resend.remote(3)) is False
    assert ray.get(buf.stats.remote())["reconciles"]


def test_the_hub_announces_a_version_sent_again_as_its_next_attempt(ray_cluster):
    """``republish`` keeps the version (the buffer's staleness counts versions) and raises the attempt, whose
    process groups are new; the driver's wait sees it as newer; the resend marker left for the other ranks goes."""
    import ray
    from paddock.ppo.hub import RESEND, PolicyHub

    hub = PolicyHub.remote()  # type: ignore[attr-defined]
    assert ray.get(hub.publish.remote(2, [], None, 10, {"ppo/kl": 0.5})) == (1, None)  # every worker receives
    first = ray.get(hub.wait_newer.remote((0, 0), 5))
    assert (first.version, first.attempt, first.group("policy")) == (1, 0, "pub1.0/policy")
    assert ray.get(hub.wait_newer.remote((1, 0), 0.2)) is None
    ray.get(hub.put_batch.remote(2, RESEND))
    assert ray.get(hub.get_batch.remote(2, 5)) == RESEND
    waiting = hub.wait_newer.remote((1, 0), 30)
    ray.get(
        hub.set_receivers.remote(3)
    )  # a rollout worker of four died for good: the next attempt goes to three
    assert first.receivers is None and ray.get(hub.republish.remote(1)) == (1, 3)
    again = ray.get(waiting, timeout=10)
    assert (again.version, again.attempt, again.iteration, again.stats) == (1, 1, 2, {"ppo/kl": 0.5})
    assert again.receivers == 3
    assert again.group("value") == "pub1.1/value"
    with pytest.raises(ray.exceptions.RayTaskError):  # the marker is gone: nothing for iteration 2 yet
        ray.get(hub.get_batch.remote(2, 0.2))
    with pytest.raises(ray.exceptions.RayTaskError, match="the latest is 1"):
        ray.get(hub.republish.remote(0))
    assert ray.get(hub.publish.remote(3, [], None, 10)) == (2, 3)
    newer = ray.get(hub.wait_newer.remote((1, 1), 5))
    assert (newer.version, newer.attempt, newer.receivers) == (2, 0, 3)
