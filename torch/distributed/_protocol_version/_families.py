"""Protocol families: each wire versioned on its own, as a row of data (its
versions, test overrides, store namespace and words), not as a code path."""

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
        """``key("ab12", "rank", 1)`` -> ``"protocol_version/ab12/rank/1"``."""
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
