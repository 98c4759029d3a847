"""`python -m ropo_constraints out=DIR [key=value ...]` (pipeline.main; --help lists the keys)."""

import sys

from ropo_constraints.pipeline import main

sys.exit(main())
