"""The check of torchrun's agents, which ``SimpleElasticAgent._rendezvous`` runs right after
``next_rendezvous()`` on the round's store, before any worker starts, whatever their backend."""

import dataclasses
import itertools
import logging
import os

import torch.distributed as dist
from torch._C._distributed_c10d import Store
from torch.distributed._protocol_version import AGENTS_VERDICT_ENV, ROUND_ENV
from torch.distributed._protocol_version._exchange import exchange, mode_or_tell, raise_on_failure
from torch.distributed._protocol_version._families import C10D
from torch.distributed._protocol_version._judge import joined
from torch.distributed._protocol_version._messages import check_head
from torch.distributed._protocol_version._payload import InvalidPayload, local_info, Verdict
from torch.distributed._protocol_version._settings import CHECK_MODE_ENV
from torch.distributed._protocol_version._store import present


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
# Under the static rendezvous, the verdict of the job's agents, kept in its store for a node that rejoins it.
STATIC_VERDICT = AGENTS.key("static", "verdict")
PREFLIGHT_MODULE = "torch.distributed._protocol_version"


def check_agent_protocol_version(
    store: Store, group_rank: int, group_world_size: int, rdzv_backend: str, args: tuple[object, ...] = (),
) -> None:
    """Check that every agent of this rendezvous round speaks a common protocol version.

    An agent without the check is seen by ``torchelastic/role_info/<group rank>``, which
    ``_assign_worker_ranks`` writes unless ``TORCH_ELASTIC_WORKER_IDENTICAL=1``. Waits up to
    the store's timeout, as ``_assign_worker_ranks`` does. The static rendezvous keeps one
    store for the job, where a node restarts its workers alone: there only the first round is checked,
    and an agent that restarts alone is judged against the version the job's agents negotiated.
    Workers that are the preflight are the check, reporting on any cluster: the agents leave it to them.
    The workers inherit the agents' word: the round's name where every agent checked, else their verdict.

    Args:
        store: the store of the rendezvous round.
        group_rank: this agent's rank in the round.
        group_world_size: the number of agents in the round.
        rdzv_backend: the rendezvous backend, for messages.
        args: the arguments of the workers' entry point.

    Raises:
        ProtocolVersionError: the agents share no protocol version, in ``error`` mode.
        DistStoreError: an agent did not take part within the store's timeout.
        SettingError: a variable of the guardrail holds an invalid value.
    """
    static = rdzv_backend == "static"
    if static and next(_rounds) > 0:  # the job's nodes, and so the agents' word (the workers' namespace), stay
        return
    for word in (ROUND_ENV, AGENTS_VERDICT_ENV):  # the workers inherit the agent's environment: none, unless checked
        os.environ.pop(word, None)
    if _runs_the_preflight(args):
        return
    backend = f"{rdzv_backend} rendezvous"
    mode = mode_or_tell(store, AGENTS, "round", group_rank, group_world_size, backend)
    if mode is None:
        return
    if static and group_world_size > 1 and present(store, [STATIC_VERDICT]):
        _rejoin(store, group_rank, group_world_size, mode, backend)
        return
    identical = os.environ.get(WORKER_IDENTICAL_ENV, "0") == "1"  # read as _assign_worker_ranks reads it
    trace = None if identical else lambda r: f"torchelastic/role_info/{r}"
    timeout = store.timeout  # type: ignore[attr-defined]  # every c10d store has it; the stub lacks it
    outcome = exchange(store, AGENTS, group_rank, group_world_size, timeout, backend, mode, "round", trace)
    verdict = outcome.verdict
    _tell_workers(verdict, verdict, group_world_size)
    try:
        raise_on_failure(verdict, outcome.info, AGENTS)
    except dist.DistStoreError as e:
        if not identical:
            raise
        raise dist.DistStoreError(
            f"{e}\nWith {WORKER_IDENTICAL_ENV}=1 an agent without the check leaves no trace before it starts its "
            f"workers: unset {WORKER_IDENTICAL_ENV} while nodes without the check remain, or set {CHECK_MODE_ENV}=warn "
            "on the nodes that have it."
        ) from e
    if static and group_rank == 0 and group_world_size > 1 and verdict.status in ("ok", "mismatch"):
        store.set(STATIC_VERDICT, verdict.to_json())  # the job goes on: on a pass, or a mismatch warned about
    if verdict.ok and not verdict.without:
        logger.info("Agent %s: protocol version check of %s agents passed: negotiated protocol version %s.",
                    group_rank, group_world_size, verdict.negotiated)


def _runs_the_preflight(args: tuple[object, ...]) -> bool:
    """Whether the workers' entry point is the preflight: ``python [options] -m <module> ... --preflight``
    (torchrun passes ``-u -m <module>``), not a script that merely takes such arguments."""
    start = next((i for i, arg in enumerate(args) if arg == "-m" or not str(arg).startswith("-")), len(args))
    return tuple(args[start:start + 2]) == ("-m", PREFLIGHT_MODULE) and "--preflight" in args[start + 2:]


def _rejoin(store: Store, group_rank: int, group_world_size: int, mode: str, backend: str) -> None:
    """An agent that restarted alone under the static rendezvous: judged against the version the job's agents
    negotiated, before its workers start; they get the word the job's workers got."""
    info = local_info(group_rank, AGENTS, mode)
    try:
        job = Verdict.from_json(STATIC_VERDICT, store.get(STATIC_VERDICT))
    except InvalidPayload as e:  # raised below, in every mode
        job = Verdict("invalid", f"{check_head(AGENTS, backend)}: {e}.", None)
    came = f"rank {group_rank} restarted alone and rejoined the job that its agents had checked"
    verdict = (dataclasses.replace(job, enforce=job.enforce or mode == "error") if job.negotiated is None
               else joined(AGENTS, info, backend, came, job.negotiated, job.enforce))
    raise_on_failure(verdict, info, AGENTS)
    _tell_workers(job, verdict, group_world_size)
    if verdict.ok:
        logger.info("Agent %s rejoined the job its agents had checked: protocol version %s.", group_rank,
                    verdict.negotiated)


def _tell_workers(round_verdict: Verdict, verdict: Verdict, group_world_size: int) -> None:
    """The agents' word to the workers this agent starts, which inherit its environment: where every other agent
    read rank 0's verdict of the round, the round's name; where some were seen without the check, this agent's
    ``verdict``, since their workers will not publish, and the workers take it instead of checking. Where some were
    not heard from, nothing: the workers check on their own, as outside torchrun."""
    if round_verdict.without:
        return
    if group_world_size > 1 and round_verdict.readers != group_world_size - 1:
        os.environ[AGENTS_VERDICT_ENV] = str(verdict.negotiated) if verdict.ok else "none"
    elif round_verdict.token:  # rank 0's name for this round, the same on every agent
        os.environ[ROUND_ENV] = round_verdict.token
