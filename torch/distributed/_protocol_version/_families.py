"""Protocol families: each wire that is versioned on its own, described as data.

A family is everything the shared exchange needs to know about one wire: the
versions this build speaks, the variables that override them in tests, the store
namespace its keys live in, and the words its messages use. The c10d collectives
are the first family; a second one is another row here, not another code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed._protocol_version import _versions


__all__ = ["C10D", "Family", "RPC"]


@dataclass(frozen=True)
class Family:
    """One versioned wire."""

    name: str  # payload field, and how logs refer to the family
    title: str  # how messages name the protocol
    version: int  # what this build speaks
    min_version: int  # the oldest version this build accepts
    version_env: str  # test-only override of ``version``
    min_version_env: str  # test-only override of ``min_version``
    key_prefix: str  # store namespace of the exchange's keys
    version_word: str  # how messages name one version: "protocol version 2"
    note: str  # a sentence added to every mismatch message, or ""

    def key(self, *parts: object) -> str:
        """A store key of this family's exchange: ``key(3, "rank", 1)`` ->
        ``"protocol_version/3/rank/1"``."""
        return "/".join([self.key_prefix, *map(str, parts)])


C10D = Family(
    name="c10d",
    title="torch.distributed protocol version",
    version=_versions.PROTOCOL_VERSION,
    min_version=_versions.MIN_PROTOCOL_VERSION,
    version_env="TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE",
    min_version_env="TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE",
    key_prefix="protocol_version",
    version_word="protocol version",
    note="",
)

RPC = Family(
    name="rpc",
    title="torch.distributed.rpc protocol version",
    version=_versions.RPC_PROTOCOL_VERSION,
    min_version=_versions.MIN_RPC_PROTOCOL_VERSION,
    version_env="TORCH_DISTRIBUTED_RPC_PROTOCOL_VERSION_OVERRIDE",
    min_version_env="TORCH_DISTRIBUTED_RPC_MIN_PROTOCOL_VERSION_OVERRIDE",
    key_prefix="rpc_protocol_version",
    version_word="RPC protocol version",
    note=(
        "This is the RPC wire protocol (torch.distributed.rpc), versioned apart from the "
        "collectives' protocol of init_process_group."
    ),
)
