"""``python -m nvpool``: the ``nvpool`` command."""

import sys

from nvpool.client.cli import main

sys.exit(main())
