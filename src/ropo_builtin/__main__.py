"""`python -m ropo_builtin [key=value ...]`: the same as `ropo builtin` (pipeline.main)."""

import sys

from ropo_builtin.pipeline import main

sys.exit(main())
