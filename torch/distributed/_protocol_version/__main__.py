"""``python -m torch.distributed._protocol_version``: the operator CLI."""

import sys

from torch.distributed._protocol_version._cli import main


sys.exit(main())
