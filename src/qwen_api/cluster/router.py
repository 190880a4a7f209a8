"""Ray Serve request router for the engine replicas: the replica holding the prompt's prefix, else the least loaded.

It runs inside the front's deployment handle (Ray Serve instantiates it there from the deployment's
`RequestRouterConfig`), so it sees every request the front sends, with its prompt ids (`args[0]`). It keeps
a `PrefixIndex` of what each replica has cached and its own count of each replica's requests in flight.
A request goes to the replica sharing the longest prefix with its prompt (at least one block) when that
replica has a free batch slot and is not more than `imbalance` requests busier than the least loaded one:
reading a prefix again costs a prefill, but waiting for a slot costs a whole sequence. Otherwise it goes to
the least loaded replica. Ray Serve then sends it, or, when the replica refuses (full) or has died, asks
again with the rest; a dead replica's prefixes are forgotten.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from qwen_api.cluster.prefix import PrefixIndex

log = logging.getLogger(__name__)

CHOSEN_TTL = 5.0  # seconds a choice counts as load before its request is sent
FINISHED_TTL = 60.0  # seconds a request reported finished waits for its report of being routed


class PrefixAffinityRouter(RequestRouter):
    """Prefix affinity within a load bound; least loaded otherwise."""

    def initialize_state(self, slots: int = 8, block: int = 16, imbalance: int = 2, **_: Any) -> None:
        self._index = PrefixIndex(slots=slots, block=block)
        self._slots, self._imbalance = slots, imbalance
        self._load: dict[ReplicaID, int] = {}  # requests in flight per replica
        self._in_flight: dict[str, ReplicaID] = {}  # internal request id -> its replica
        # Requests chosen for a replica but not sent yet: several are routed at once, and each must see the others.
        self._chosen: dict[str, tuple[ReplicaID, float]] = {}
        # Requests Ray Serve reported finished before it reported them routed (it does, now and then): their routing
        # must not count as load, which nothing would take away again.
        self._finished_early: dict[str, float] = {}

    def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        now = time.monotonic()
        loads = {r.replica_id: self._load.get(r.replica_id, 0) for r in replicas}
        for request_id, (replica_id, at) in list(self._chosen.items()):
            if now - at > CHOSEN_TTL:  # cancelled before it was sent
                del self._chosen[request_id]
            elif replica_id in loads:
                loads[replica_id] += 1
        return loads

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request_id = pending_request.metadata.internal_request_id if pending_request is not None else None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every replica full: back off, don't spin
            self._chosen.pop(str(request_id), None)  # asked again: its earlier choice was refused
        loads = self._loads(candidate_replicas)
        by_load = sorted(candidate_replicas, key=lambda r: (loads[r.replica_id], random.random()))
        ranks = [[r] for r in by_load]
        prompt = _prompt_of(pending_request)
        if prompt:
            matched = self._index.matched_tokens(prompt, [r.replica_id for r in by_load])
            holder = max(by_load, key=lambda r: matched[r.replica_id])  # ties: the least loaded (first)
            load, least = loads[holder.replica_id], loads[by_load[0].replica_id]
            if matched[holder.replica_id] and load < self._slots and load - least <= self._imbalance:
                ranks = [[holder]] + [[r] for r in by_load if r is not holder]
        if request_id is not None:
            self._chosen[request_id] = (ranks[0][0].replica_id, time.monotonic())
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._chosen.pop(request_id, None)
        if prompt := _prompt_of(pending_request):
            self._index.add(replica_id, prompt)
        if self._finished_early.pop(request_id, None) is not None:  # over already: no load to count
            return
        self._in_flight[request_id] = replica_id
        self._load[replica_id] = self._load.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._chosen.pop(internal_request_id, None)
        if self._in_flight.pop(internal_request_id, None) is not None:
            self._load[replica_id] = max(0, self._load.get(replica_id, 0) - 1)
            return
        now = time.monotonic()  # finished before it was routed: remember it for its routing, a while
        self._finished_early[internal_request_id] = now
        for request_id, at in list(self._finished_early.items()):
            if now - at > FINISHED_TTL:
                del self._finished_early[request_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.drop(replica_id)
        self._load.pop(replica_id, None)


def _prompt_of(pending_request: PendingRequest | None) -> list[int] | None:
    if pending_request is None or not pending_request.args:
        return None
    prompt = pending_request.args[0]
    return prompt if isinstance(prompt, list) else None
