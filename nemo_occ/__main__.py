"""``python -m nemo_occ``: the ``nemo-occ`` command, for environments where the console script is not on PATH
(an editable install into a container venv, ``PYTHONPATH`` only)."""

import sys

from nemo_occ.cli import main

if __name__ == "__main__":
    sys.exit(main())
