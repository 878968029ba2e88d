"""``python -m torch.distributed._protocol_version``: the operator CLI."""

import os
import sys

from torch.distributed._protocol_version._cli import main


code = main()
# End now, with this code. Under torchrun the preflight's ranks leave within
# moments of each other and the agent stops the rest with SIGTERM as soon as one
# exits non-zero: a worker still in interpreter shutdown would report -15.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
