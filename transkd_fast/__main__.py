"""``python -m transkd_fast`` is the ``transkd-fast`` command (``torchrun -m transkd_fast train ...``)."""

import sys

from transkd_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
