"""An engine module whose import fails as root only: an inspection (as U) loads it, a run's
starter (root) does not."""

import os

from reference_engines.minimal.engine import ReferenceEngine

if os.geteuid() == 0:
    raise ImportError("this engine refuses to be imported as root")


class RootShyEngine(ReferenceEngine):
    engine_name = "test-root-shy"
