"""Mutants that get the state crossing from stage 1 wrong (SPEC §1 config, §2 rule 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kit.starter.config import StarterConfig
from mutants.zoo.base import Mutant
from reference_engines.minimal import ReferenceConfig
from reference_engines.minimal.engine import DEFAULT_NAMESPACES

#: What SharedConfig.config returns, every time.
_SHARED_CONFIG = ReferenceConfig()


class SharedConfig(Mutant):
    slug = "config-shared-object"
    bug = "config() returns one module-level config object instead of a fresh one per call"
    killed_by = ("STATE-001",)
    flows = ("root",)

    def config(self) -> ReferenceConfig:
        return _SHARED_CONFIG


@dataclass
class SharedListConfig(ReferenceConfig):
    #: The default_factory returns the module's list itself: every config shares it.
    namespaces: list[str] = field(default_factory=lambda: DEFAULT_NAMESPACES)


class SharedMutableDefault(Mutant):
    slug = "config-shared-list"
    bug = (
        "config()'s namespaces default is the module's list itself (a default_factory that "
        "returns it, not a copy): every config shares it"
    )
    killed_by = ("STATE-001",)
    flows = ("root",)

    def config(self) -> SharedListConfig:
        return SharedListConfig()


#: Filled by prepare_config in stage 1, a process that exits before stage 2 exists.
_PREPARED: dict[str, list[str]] = {}


class Stage1GlobalState(Mutant):
    slug = "stage1-global-state"
    bug = (
        "prepare_config keeps the validated command line in a module global and "
        "start_process reads it there: stage 2 is another process, the global is empty"
    )
    killed_by = ("ERR-011",)
    mechanism = "other-hook"
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        _PREPARED["argv"] = list(self.common.engine_config.argv)

    def start_process(self, master_fd: int) -> None:
        self.common.engine_config.argv = _PREPARED["argv"]
        super().start_process(master_fd)


MUTANTS = (SharedConfig, SharedMutableDefault, Stage1GlobalState)
