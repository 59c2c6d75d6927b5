"""An engine module that imports pyroute2 (the starter loads the netlink modules it needs)."""

import pyroute2  # noqa: F401  (what the starter looks for)

from reference_engines.minimal.engine import ReferenceEngine


class NetlinkEngine(ReferenceEngine):
    engine_name = "test-netlink"
