"""The check of torchrun's agents, run once per rendezvous namespace, before any worker starts.

``SimpleElasticAgent._rendezvous`` calls :func:`check_agent_protocol_version`
right after ``next_rendezvous()``, before ``_assign_worker_ranks``: every agent
of the round takes part, on the store of the round (the c10d rendezvous prefixes
it with the round, so each round has its own namespace). The check is the same
exchange as ``init_process_group``'s, so it works whatever backend the workers
use, and whether or not they call ``init_process_group``. An agent without the
check writes ``torchelastic/role_info/<group rank>`` at once, unless
``TORCH_ELASTIC_WORKER_IDENTICAL=1``: that key shows it, and it is judged as
protocol version 1. Loaded by the agent only.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch.distributed as dist
from torch.distributed._protocol_version._exchange import exchange, parse_current, raise_on_failure
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._settings import active_mode, CHECK_MODE_ENV
from torch.distributed._protocol_version._store import find_present, present


__all__ = ["check_agent_protocol_version"]

logger = logging.getLogger(__name__)

WORKER_IDENTICAL_ENV = "TORCH_ELASTIC_WORKER_IDENTICAL"
# The agents check the collectives' protocol of the build their workers will run
# (the workers inherit their environment), under a namespace of their own.
AGENTS = dataclasses.replace(
    C10D,
    name="agents",
    title="torch.distributed protocol version (torchrun agents)",
    key_prefix="protocol_version_agents",
    note=(
        "Here a rank is a torchrun agent, numbered by its node's group rank in the rendezvous. "
        "No agent has started its workers, and torchrun does not restart them: a mismatch is the same every time."
    ),
)


def _role_info_key(group_rank: int) -> str:
    """Where ``_assign_worker_ranks`` announces an agent, relative to the round's store."""
    return f"torchelastic/role_info/{group_rank}"


def _took_part_before(store: dist.Store, group_rank: int) -> bool:
    """Whether this agent took part in the last check on this store. The c10d
    rendezvous gives every round a namespace of its own; the static one keeps one
    for the life of the job, and a node there restarts its workers alone, with the
    same members: checking again would wait for agents that are not coming."""
    current = AGENTS.key("current")
    if not present(store, [current]):
        return False
    token, _ = parse_current(current, store.get(current))
    return bool(find_present(store, [AGENTS.key(token, "rank", group_rank), AGENTS.key(token, "late", group_rank)]))


def check_agent_protocol_version(store: dist.Store, group_rank: int, group_world_size: int, rdzv_backend: str) -> None:
    """Check that every agent of this rendezvous round runs a build that speaks a
    common protocol version, before any of them starts its workers.

    Waits for the others up to the store's timeout (``error``; the bound of every
    wait ``_assign_worker_ranks`` makes on stock), or its grace period (``warn``).
    Does nothing for an agent that took part in the last check on ``store``.

    Args:
        store: the store of the rendezvous round.
        group_rank: this agent's rank in the round.
        group_world_size: the number of agents in the round.
        rdzv_backend: the rendezvous backend, for messages.

    Raises:
        ProtocolVersionError: the agents share no protocol version, in ``error`` mode.
        DistStoreError: an agent did not take part within the store's timeout.
        SettingError: a variable of the guardrail holds an invalid value.
    """
    mode = active_mode(AGENTS)
    if mode is None or _took_part_before(store, group_rank):
        return
    identical = os.environ.get(WORKER_IDENTICAL_ENV, "0") == "1"  # read as _assign_worker_ranks reads it
    backend_key = None if identical else _role_info_key
    verdict, info = exchange(
        store, AGENTS, group_rank, group_world_size, store.timeout, f"{rdzv_backend} rendezvous", mode, backend_key
    )
    try:
        raise_on_failure(verdict, info, AGENTS)
    except dist.DistStoreError as e:
        if not identical:
            raise
        raise dist.DistStoreError(
            f"{e}\nWith {WORKER_IDENTICAL_ENV}=1 an agent without the check leaves no trace before it "
            f"starts its workers: unset {WORKER_IDENTICAL_ENV} while nodes without the check remain, or "
            f"set {CHECK_MODE_ENV}=warn on the nodes that have it."
        ) from e
    if verdict.ok and not verdict.partial:
        logger.info(
            "Agent %s: protocol version check of %s agents passed: negotiated protocol version %s.",
            group_rank, group_world_size, verdict.negotiated,
        )
