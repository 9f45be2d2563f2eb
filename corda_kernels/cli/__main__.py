"""``python -m corda_kernels.cli``: the ``corda-kernels`` command."""

import sys

from . import main

sys.exit(main())
