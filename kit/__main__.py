"""``python -m kit``: the command line (:mod:`kit.cli`)."""

import atexit
import gc
import os
import sys

# A short-lived process: the collector would only walk the objects of the imports, none of
# them garbage (about 5 ms); `kit run` freezes them and turns it back on before its run.
gc.disable()

from kit.cli import main  # noqa: E402

code = main()
# The interpreter's finalization would tear down every module the kit imported, one object
# at a time (about 5 ms of a one-shot run), only to free memory the kernel frees at exit. What
# must happen at exit still does: the atexit handlers (coverage's, when measured), then
# stdout and stderr flushed. A flush that fails is left to the interpreter to report, as ever.
atexit._run_exitfuncs()
try:
    sys.stdout.flush()
    sys.stderr.flush()
except OSError:
    sys.exit(code)
os._exit(code)
