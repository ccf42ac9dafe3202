"""``python -m deskpush.server``: the ``deskpush`` command."""

import sys

from .cli import main

sys.exit(main())
