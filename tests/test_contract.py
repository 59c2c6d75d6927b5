"""The contract objects: engine configs, StarterConfig validation, the registry."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kit import registry
from kit.contract import ConfigError, EngineConfig, Operations
from kit.starter.config import StarterConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner(EngineConfig):
    depth: int = 0


@dataclass
class SampleConfig(EngineConfig):
    name: str = "x"
    ratio: float = 1.5
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_engine_config_round_trips_exactly():
    cfg = SampleConfig(
        argv=["/bin/true"],
        name="n",
        ratio=2.0,
        flags=["a"],
        env={"K": "V"},
        inner=Inner(depth=3),
        maybe=4,
    )
    again = SampleConfig.from_json(cfg.to_json())
    assert again == cfg and again.to_json() == cfg.to_json()


@pytest.mark.parametrize(
    "data,message",
    [
        ({"nope": 1}, "unknown field 'nope'"),
        ({"name": 3}, "engine config.name: expected a string"),
        ({"ratio": True}, "engine config.ratio: expected a number"),
        ({"flags": "a"}, "engine config.flags: expected a list"),
        ({"inner": {"depth": "deep"}}, "engine config.inner.depth: expected an integer"),
        ({"maybe": "x"}, "engine config.maybe"),
    ],
)
def test_engine_config_rejects_bad_json_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        SampleConfig.from_json(data)


def sc(flow="root"):
    return StarterConfig(flow, 1000, 1000)


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda s: s.set_ns_flags(["pid", "bogus"]), "set_ns_flags: unknown namespace 'bogus'"),
        (lambda s: s.set_ns_path("bogus", "/x"), "set_ns_path: unknown namespace"),
        (lambda s: s.set_ns_path("net", "relative"), "must be absolute"),
        (lambda s: s.set_capabilities("effective", ["CAP_NOPE"]), "unknown capability 'CAP_NOPE'"),
        (lambda s: s.set_capabilities("sideways", []), "unknown capability set 'sideways'"),
        (lambda s: s.set_mount_propagation("weird"), "unknown propagation 'weird'"),
        (lambda s: s.set_target_uid(-1), "set_target_uid: invalid id"),
        (lambda s: s.add_uid_mappings([(0, 1000)]), "add_uid_mappings: mapping must be"),
        (lambda s: s.keep_file_descriptor(-3), "keep_file_descriptor: invalid fd"),
    ],
)
def test_setters_reject_bad_values_naming_the_setting(setup, message):
    with pytest.raises(ConfigError, match=message):
        setup(sc())


@pytest.mark.parametrize(
    "flow,setup,message",
    [
        (
            "root",
            lambda s: (
                s.set_capabilities("effective", ["sys_admin"]),
                s.set_capabilities("permitted", []),
            ),
            "effective capabilities must be a subset of permitted; not permitted: CAP_SYS_ADMIN",
        ),
        (
            "root",
            lambda s: (
                s.set_capabilities("permitted", ["chown"]),
                s.set_capabilities("ambient", ["chown"]),
            ),
            "ambient capabilities must be both permitted and inheritable",
        ),
        (
            "root",
            lambda s: (
                s.set_capabilities("permitted", ["chown"]),
                s.set_capabilities("bounding", []),
            ),
            "outside the bounding set: CAP_CHOWN",
        ),
        (
            "suid",
            lambda s: (
                s.set_ns_flags(["user"]),
                s.add_uid_mappings([(0, 1000, 1)]),
                s.add_gid_mappings([(0, 1000, 1)]),
            ),
            "needs set_hybrid_workflow",
        ),
        ("userns", lambda s: s.set_hybrid_workflow(), "needs the setuid starter"),
        ("root", lambda s: s.add_uid_mappings([(0, 0, 1)]), "mappings need a user namespace"),
        ("userns", lambda s: s.set_ns_flags(["user"]), "a new user namespace needs a uid mapping"),
        (
            "root",
            lambda s: (
                s.set_ns_flags(["user"]),
                s.add_uid_mappings([(0, 0, 5), (3, 9, 1)]),
                s.add_gid_mappings([(0, 0, 1)]),
            ),
            "container ranges overlap",
        ),
        (
            "root",
            lambda s: (s.set_namespace_join_only(), s.set_ns_flags(["pid"])),
            "a join-only run cannot create namespaces",
        ),
        ("root", lambda s: s.set_namespace_join_only(), "no namespace to join"),
        ("root", lambda s: s.set_bring_loopback_interface(), "needs a network namespace"),
        ("root", lambda s: s.keep_file_descriptor(987), "fd 987 is not open"),
    ],
)
def test_invalid_combinations_are_rejected_naming_the_setting(flow, setup, message):
    s = sc(flow)
    setup(s)
    with pytest.raises(ConfigError, match=message):
        s.validate()


def test_starter_config_round_trips():
    s = sc("fakeroot")
    s.set_ns_flags(["user", "pid", "mount"])
    s.add_uid_mappings([(0, 1000, 1)])
    s.add_gid_mappings([(0, 1000, 1)])
    s.set_capabilities("bounding", ["chown"])
    s.validate()
    again = StarterConfig.from_json(s.to_json())
    assert again.to_json() == s.to_json()
    assert again.ns_flags == ["user", "pid", "mount"] and again.flow == "fakeroot"
    assert again.capabilities["bounding"] == ["CAP_CHOWN"]


class Good(Operations):
    def config(self):
        return EngineConfig()

    def prepare_config(self, starter_config):
        pass

    def create_container(self, ctx, pid, rpc_conn):
        pass

    def start_process(self, master_fd):
        pass

    def monitor_container(self, pid, signals):
        return 0

    def cleanup_container(self, ctx, fatal, status):
        pass


class Methods:
    def __init__(self, engine):
        self.engine = engine

    def ok(self, path: str, count: int = 1) -> None:
        pass


@pytest.fixture
def clean_registry():
    names = set(registry.registered())
    yield
    for name in set(registry.registered()) - names:
        registry.unregister(name)


def test_registering_twice_is_an_error(clean_registry):
    registry.register_operations("twice", Good)
    with pytest.raises(registry.RegistryError, match="engine 'twice' is already registered"):
        registry.register_operations("twice", Good)


def test_abstract_operations_are_refused(clean_registry):
    class Half(Operations):
        def config(self):
            return EngineConfig()

    with pytest.raises(registry.RegistryError, match="does not implement cleanup_container"):
        registry.register_operations("half", Half)


@pytest.mark.parametrize(
    "method,message",
    [
        ("def bad(self, *paths: str) -> None: pass", "parameter 'paths': \\*args is not servable"),
        ("def bad(self, path) -> None: pass", "parameter 'path': missing type annotation"),
        ("def bad(self, obj: object) -> None: pass", "parameter 'obj'"),
        ("def bad(self, **kw: str) -> None: pass", "\\*\\*kwargs is not servable"),
    ],
)
def test_unservable_rpc_methods_fail_at_registration(clean_registry, method, message):
    namespace: dict = {}
    exec(method, namespace)
    cls = type("BadMethods", (Methods,), {"bad": namespace["bad"]})
    registry.register_operations("rpcbad", Good)
    with pytest.raises(registry.RegistryError, match=message):
        registry.register_rpc_methods("rpcbad", cls)


def test_rpc_methods_twice_and_for_unknown_engines(clean_registry):
    with pytest.raises(registry.RegistryError, match="engine 'ghost' is not registered"):
        registry.register_rpc_methods("ghost", Methods)
    registry.register_operations("rpcok", Good)
    registry.register_rpc_methods("rpcok", Methods)
    assert set(registry.find("rpcok").rpc_specs) == {"ok"}
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register_rpc_methods("rpcok", Methods)


class StaticMethods(Methods):
    @staticmethod
    def version() -> str:
        return "2"

    @staticmethod
    def add(a: int, b: int) -> int:
        return a + b


def test_static_rpc_methods_are_checked_and_served_without_self(clean_registry):
    # SPEC §1: only a method whose signature cannot be served is an error at registration;
    # the server serves ``getattr(instance, name)``, which for a static method has no self.
    registry.register_operations("rpcstatic", Good)
    registry.register_rpc_methods("rpcstatic", StaticMethods)
    specs = registry.find("rpcstatic").rpc_specs
    assert set(specs) == {"ok", "version", "add"}
    assert [p.name for p in specs["add"].params] == ["a", "b"]
    assert specs["version"].params == ()


def test_an_unservable_static_rpc_method_still_fails_at_registration(clean_registry):
    class BadStatic(Methods):
        @staticmethod
        def bad(*paths: str) -> None:
            pass

    registry.register_operations("rpcstaticbad", Good)
    with pytest.raises(registry.RegistryError, match="parameter 'paths': \\*args"):
        registry.register_rpc_methods("rpcstaticbad", BadStatic)


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(registry.RegistryError) as info:
        registry.find("no-such-engine")
    assert "unknown engine 'no-such-engine'; known engines:" in str(info.value)
    assert "reference" in str(info.value)


def test_engines_found_by_entry_point_and_module_attribute(clean_registry):
    assert registry.find("reference").name == "reference"
    reg = registry.find("kit_test_engines:FaultEngine")
    assert reg.name == "test-fault" and "mount" in reg.rpc_specs
    with pytest.raises(registry.RegistryError, match="cannot load engine"):
        registry.find("no_such_module:Thing")


def test_the_builtin_engines_are_the_kits_own_entry_points():
    # The table that spares a run of a built-in engine importlib.metadata must say what the
    # kit's distribution declares, and each entry must load.
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"][registry.ENTRY_POINT_GROUP]
    assert declared == registry.BUILTIN_ENGINES
    for name in declared:
        assert callable(registry._builtin_registrar(name)), name


def test_a_builtin_engine_whose_package_is_missing_is_left_to_the_entry_points(
    clean_registry, monkeypatch
):
    monkeypatch.setitem(registry.BUILTIN_ENGINES, "ghost", "no_such_package_of_kit_tests:register")
    with pytest.raises(registry.RegistryError, match="unknown engine 'ghost'"):
        registry.find("ghost")


# --- engines named by import path -------------------------------------------------------------


def test_an_import_path_may_name_a_callable_that_returns_the_engine(clean_registry):
    reg = registry.find("import_path_engines:make_engine")
    assert reg.name == "import-path-returned" and "sethostname" in reg.rpc_specs
    assert registry.find("import_path_engines:make_engine") is reg  # once per process
    assert registry.find("import_path_engines:make_instance") is reg  # the same class
    assert registry.find("import_path_engines:Unnamed").name == "Unnamed"
    assert registry.make_engine("import_path_engines:make_engine").name == reg.name


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "no_such_package_of_kit_tests.engine:register",
            "cannot load engine 'no_such_package_of_kit_tests.engine:register': no module named "
            "'no_such_package_of_kit_tests' on the import path: install the package that holds it, "
            "or add the directory that holds it to PYTHONPATH",
        ),
        (
            "import_path_broken:register",
            "cannot load engine 'import_path_broken:register': importing import_path_broken "
            "failed: "
            "ModuleNotFoundError: No module named 'no_such_dependency_of_the_engine'",
        ),
        (
            "import_path_engines:regster",
            "module import_path_engines \\(/.*/import_path_engines.py\\) has no attribute "
            "'regster' \\(it defines: Returned, Unnamed, make_engine, make_instance, raises, "
            "registers_nothing, registers_two, returns_a_string\\)",
        ),
        (
            "import_path_engines:registers_nothing",
            "engine 'import_path_engines:registers_nothing': it returned None and registered no "
            "engine: return an Operations subclass or instance, or call "
            "kit.registry.register_operations in it",
        ),
        (
            "import_path_engines:returns_a_string",
            "it returned 'import-path-returned': return an Operations subclass or instance, "
            "or None "
            "after registering one engine",
        ),
        (
            "import_path_engines:registers_two",
            "it registered 2 engines \\(import-path-one, import-path-two\\); name one of them "
            "instead",
        ),
        (
            "import_path_engines:raises",
            "engine 'import_path_engines:raises': calling it raised FileNotFoundError: "
            "\\[Errno 2\\] "
            "the engine's config file is missing",
        ),
        (
            "import_path_engines:NOT_CALLABLE",
            "42 is neither an Operations subclass nor a callable that registers or returns an "
            "engine",
        ),
        ("import_path_engines:", "not an import path: write MODULE:ATTRIBUTE"),
        ("import path engines:x", "not an import path: write MODULE:ATTRIBUTE"),
        ("a.b:c:d", "not an import path: write MODULE:ATTRIBUTE"),
    ],
)
def test_a_bad_import_path_says_what_to_change(clean_registry, spec, message):
    with pytest.raises(registry.RegistryError, match=message):
        registry.find(spec)


def test_unregistering_an_engine_forgets_the_import_path_that_named_it(clean_registry):
    registry.find("import_path_engines:make_engine")
    registry.unregister("import-path-returned")
    assert "import-path-returned" not in registry.registered()
    assert registry.find("import_path_engines:make_engine").name == "import-path-returned"
