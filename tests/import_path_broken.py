"""A module whose own import fails (for the registry's import-path errors)."""

import no_such_dependency_of_the_engine  # noqa: F401
