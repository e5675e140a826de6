"""``python -m exit_recorder <clp arguments>``: runs ``clp`` and writes the code this process exits with to
``$CLP_EXIT_DIR/exit-<pid>.txt``. Lightning's launcher starts the other DDP ranks with the same command, so every
rank leaves its own file, which a test reads to see that the ranks agree."""

import os
import sys
from pathlib import Path

from clp_lightning.cli import main

if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        raise
    finally:
        Path(os.environ["CLP_EXIT_DIR"], f"exit-{os.getpid()}.txt").write_text(str(code))
