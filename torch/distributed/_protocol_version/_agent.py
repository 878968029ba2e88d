"""The check of torchrun's agents, which ``SimpleElasticAgent._rendezvous`` runs right after
``next_rendezvous()`` on the round's store, before any worker starts, whatever their backend."""

import dataclasses
import itertools
import logging
import os

import torch.distributed as dist
from torch._C._distributed_c10d import Store
from torch.distributed._protocol_version import ROUND_ENV
from torch.distributed._protocol_version._exchange import exchange, raise_on_failure, mode_or_tell
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV


__all__ = ["check_agent_protocol_version"]

logger = logging.getLogger(__name__)

WORKER_IDENTICAL_ENV = "TORCH_ELASTIC_WORKER_IDENTICAL"
# The agents check the collectives' protocol of the build their workers will run
# (the workers inherit their environment), under a namespace of their own.
AGENTS = dataclasses.replace(
    C10D, name="agents", title="torch.distributed protocol version (torchrun agents)",
    key_prefix="protocol_version_agents",
    note="Here a rank is a torchrun agent, numbered by its node's group rank in the rendezvous; the agents check "
         "before any of them starts its workers.",
)
_rounds = itertools.count()  # the rounds this agent process has rendezvoused


def check_agent_protocol_version(store: Store, group_rank: int, group_world_size: int, rdzv_backend: str) -> None:
    """Check that every agent of this rendezvous round speaks a common protocol version.

    An agent without the check is seen by ``torchelastic/role_info/<group rank>``, which
    ``_assign_worker_ranks`` writes unless ``TORCH_ELASTIC_WORKER_IDENTICAL=1``. Waits up to
    the store's timeout, as ``_assign_worker_ranks`` does. The static rendezvous keeps one
    store for the job, where a node restarts its workers alone: there only the first round is checked.

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
    os.environ.pop(ROUND_ENV, None)  # the workers inherit the agent's environment: no round, unless checked
    backend = f"{rdzv_backend} rendezvous"
    mode = mode_or_tell(store, AGENTS, "round", group_rank, group_world_size, backend)
    if mode is None or (next(_rounds) > 0 and rdzv_backend == "static"):
        return
    identical = os.environ.get(WORKER_IDENTICAL_ENV, "0") == "1"  # read as _assign_worker_ranks reads it
    trace = None if identical else lambda r: f"torchelastic/role_info/{r}"
    timeout = store.timeout  # type: ignore[attr-defined]  # every c10d store has it; the stub lacks it
    outcome = exchange(store, AGENTS, group_rank, group_world_size, timeout, backend, mode, "round", trace)
    if outcome.verdict.token:  # rank 0's name for this round, the same on every agent that read its verdict
        os.environ[ROUND_ENV] = outcome.verdict.token
    try:
        raise_on_failure(outcome.verdict, outcome.info, AGENTS)
    except dist.DistStoreError as e:
        if not identical:
            raise
        raise dist.DistStoreError(
            f"{e}\nWith {WORKER_IDENTICAL_ENV}=1 an agent without the check leaves no trace before it starts its "
            f"workers: unset {WORKER_IDENTICAL_ENV} while nodes without the check remain, or set {CHECK_MODE_ENV}=warn "
            "on the nodes that have it."
        ) from e
    if outcome.verdict.ok and not outcome.verdict.without:
        logger.info("Agent %s: protocol version check of %s agents passed: negotiated protocol version %s.",
                    group_rank, group_world_size, outcome.verdict.negotiated)
