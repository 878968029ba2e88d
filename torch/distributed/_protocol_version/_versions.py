"""The protocol versions this build speaks: the lines a maintainer edits to bump.

Kept apart from the code so a bump is a one-line change that a reviewer (and the
wheel tool, which builds test wheels of other versions) can find at once.
"""

# The c10d wire protocol version this build speaks. Bump it (see the maintainer's
# checklist in docs/source/distributed.protocol_version.md) whenever a change makes
# this build unable to talk to the previous one.
PROTOCOL_VERSION: int = 1
# The oldest c10d protocol version this build can still work with. Equal to
# PROTOCOL_VERSION means exact match: every rank must run the same version.
MIN_PROTOCOL_VERSION: int = 1

# The RPC wire (torch.distributed.rpc: its pickler, the message framing and the
# MessageType enum) drifts on its own schedule, so it has its own numbers. Bump
# them for a change RPC peers must agree on; they mean nothing for collectives.
RPC_PROTOCOL_VERSION: int = 1
MIN_RPC_PROTOCOL_VERSION: int = 1
