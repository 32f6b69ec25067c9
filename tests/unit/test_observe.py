"""The request-side counters behind /metrics: label sets stay bounded whatever clients send."""

from __future__ import annotations

from gateway.observe import MAX_ACTOR_LABELS, OTHER, GatewayStats


def test_actor_labels_are_capped_like_models() -> None:
    # In personal mode every client key is an actor: a client must not grow the series at will.
    stats = GatewayStats(actor_labels=True)
    route = stats.route("anthropic", "messages")
    for n in range(MAX_ACTOR_LABELS + 50):
        stats.labels(route, "claude-sonnet-4-5", f"key-{n:016x}")
    actors = {actor for (_, _, actor) in stats.usage}
    assert len(actors) == MAX_ACTOR_LABELS + 1
    assert OTHER in actors


def test_no_actor_label_unless_asked() -> None:
    stats = GatewayStats()
    route = stats.route("anthropic", "messages")
    for n in range(10):
        stats.labels(route, "claude-sonnet-4-5", f"key-{n}")
    assert {actor for (_, _, actor) in stats.usage} == {""}
