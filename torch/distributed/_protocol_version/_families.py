"""Protocol families: each wire versioned on its own, as a row of data (its
versions, test overrides, store namespace and words), not as a code path."""

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
        """``key("c10d/0/0", "rank", 1)`` -> ``"protocol_version/c10d/0/0/rank/1"``."""
        return "/".join([self.key_prefix, *map(str, parts)])


C10D = Family(
    "c10d", "torch.distributed protocol version", _versions.PROTOCOL_VERSION, _versions.MIN_PROTOCOL_VERSION,
    "TORCH_DISTRIBUTED_PROTOCOL_VERSION_OVERRIDE", "TORCH_DISTRIBUTED_MIN_PROTOCOL_VERSION_OVERRIDE",
    "protocol_version", "protocol version", "",
)
RPC = Family(
    "rpc", "torch.distributed.rpc protocol version", _versions.RPC_PROTOCOL_VERSION, _versions.MIN_RPC_PROTOCOL_VERSION,
    "TORCH_DISTRIBUTED_RPC_PROTOCOL_VERSION_OVERRIDE", "TORCH_DISTRIBUTED_RPC_MIN_PROTOCOL_VERSION_OVERRIDE",
    "rpc_protocol_version", "RPC protocol version",
    "This is the RPC wire protocol (torch.distributed.rpc), versioned apart from the collectives' protocol of "
    "init_process_group.",
)
