"""``python -m kit``: the command line (:mod:`kit.cli`)."""

import gc
import sys

# A short-lived process: the collector would only walk the objects of the imports, none of
# them garbage (about 5 ms); `kit run` freezes them and turns it back on before its run.
gc.disable()

from kit.cli import main  # noqa: E402

sys.exit(main())
