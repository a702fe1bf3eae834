"""``python -m tfrun.deps build SPEC.json|RUN_DIR``: what a job's setup line runs with
``deps.build_on=job``."""

import sys

from tfrun.deps.build import main

if __name__ == "__main__":
    sys.exit(main())
