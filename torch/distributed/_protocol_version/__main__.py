"""``python -m torch.distributed._protocol_version``: the operator CLI."""

import sys

from torch.distributed._protocol_version import main


sys.exit(main())
