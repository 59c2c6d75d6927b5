"""The supervisor's result encoding (events reused as they arrived) and the backend the
zygote prepares before it forks a supervisor."""

from __future__ import annotations

import json
import os

from conftest import in_child

from kit import system
from kit.ledger.record import decode_checked
from kit.run.launcher import make_request
from kit.run.supervisor import Supervisor, _backend, prepare_backend

DATAGRAMS = [
    # as LedgerWriter.emit sends them
    json.dumps(
        {
            "t": 1,
            "kind": "process_start",
            "role": "starter",
            "pid": 7,
            "tid": 7,
            "ppid": 1,
            "nspid": [7],
        },
        separators=(",", ":"),
    ).encode(),
    # not as the kit writes them, but valid: spaces, escapes, a duplicate key, a float
    b'{ "kind" : "signal", "role": "master", "name": "SIG\\u0043HLD", "signum": 17,'
    b' "signum": 18, "x": 1.5e3, "t": 2 }',
    # carries its own seq: encoded again, seq where it was
    b'{"seq": 99, "kind": "stage2_exec", "role": "master", "t": 3}',
    # undecodable: recorded as a starter_error
    b'{"kind": "oops", ',
    b"\xff\xfe not json",
    # UTF-16 JSON (json.loads accepts it): not spliced into a UTF-8 document
    json.dumps({"kind": "stage2_failed", "role": "master", "message": "é"}).encode("utf-16"),
    # non-ASCII text as UTF-8 and a lone surrogate escape
    '{"kind": "stage2_failed", "role": "stage2", "message": "no – such ✓", '
    '"s": "\\ud800"}'.encode(),
]


def test_the_encoded_result_decodes_to_the_result_itself():
    request = make_request("reference", "root", ["/bin/true"])
    sup = Supervisor(request)
    sup.emit(
        "run_start",
        engine="reference",
        flow="root",
        backend="real",
        invoker={},
        probes=True,
        hook_timeout=5.0,
        run_dir="/tmp/x",
    )
    for datagram in DATAGRAMS:
        event, ok = decode_checked(datagram)
        sup.record(event, datagram if ok else None)
    sup.emit("exit", code=0, reason="exited")
    result = {
        "exit_code": 0,
        "reason": "exited",
        "leaks": [],
        "timed_out": None,
        "ledger": {"schema_version": 1, "run": request.to_json(), "events": sup.events},
    }
    encoded = sup.encode(result)
    assert json.loads(encoded) == json.loads(json.dumps(result))
    decoded = json.loads(encoded)["ledger"]["events"]
    assert [list(e) for e in decoded] == [list(e) for e in json.loads(json.dumps(sup.events))]
    assert [e["seq"] for e in decoded] == list(range(len(DATAGRAMS) + 2))
    assert decoded[2]["signum"] == 18 and decoded[2]["name"] == "SIGCHLD"
    assert decoded[3]["seq"] == 3 and next(iter(decoded[3])) == "seq"
    assert decoded[4]["kind"] == decoded[5]["kind"] == "starter_error"


def test_a_result_without_a_ledger_is_encoded_as_it_is():
    sup = Supervisor(make_request("reference", "root", ["/bin/true"]))
    result = {
        "exit_code": 255,
        "reason": "supervisor error",
        "leaks": [],
        "timed_out": None,
        "ledger": None,
    }
    assert json.loads(sup.encode(result)) == result


def test_a_fake_backend_prepared_in_the_parent_is_the_childs_own(tmp_path):
    request = make_request("reference", "suid", ["/bin/true"], backend="fake", user=65534)
    prepared = prepare_backend(request)
    assert prepared is not None
    assert prepare_backend(make_request("reference", "root", ["/bin/true"])) is None

    def in_the_child() -> dict:
        with _backend(request, prepared, str(tmp_path)) as fake:
            state = fake.model_state()
            return {
                "registered": sorted(state["procs"]),
                "me": str(os.getpid()),
                "uid": list(fake.getresuid()),
                "current": system.current() is fake,
            }

    result = in_child(in_the_child)
    out = result.get("ok", result)  # an error shows in the assertion message
    assert out == {
        "registered": [out.get("me")],
        "me": out.get("me"),
        "uid": [0, 0, 0],
        "current": True,
    }, out


def test_the_models_pid_of_a_sender_comes_from_the_nspid_read_once(monkeypatch):
    # A sender may be gone by the time its model pid is asked: the NSpid read when its
    # datagram arrived numbers it (in the host sandbox, the sandbox's level of it).
    from kit.run import supervisor as supervisor_module

    sup = Supervisor(make_request("reference", "root", ["/bin/true"], backend="fake"))
    asked: list[int] = []

    class Model:
        def modelled_pids(self, pid: int) -> set[int]:
            asked.append(pid)
            return {1}

    monkeypatch.setattr(supervisor_module, "current", Model)
    gone = 2**22 + 1  # above pid_max: no such process
    assert sup._modelled_pids(gone, [gone]) == {1} and asked == [gone]  # unsandboxed
    sup.sandbox = object()  # type: ignore[assignment]
    sup._level = 1
    asked.clear()
    assert sup._modelled_pids(gone, [gone, 7]) == {1} and asked == [7]
    assert sup._modelled_pids(gone, [gone]) == set()  # not in the sandbox


def test_the_kits_own_files_in_a_fake_run_directory_are_no_leftovers_but_nothing_else(tmp_path):
    from kit.run import rundir
    from kit.system.fake.store import Store

    store = Store.create({}, rundir.kit_own(str(tmp_path)))
    mine = os.path.relpath(os.path.dirname(store.path), tmp_path)
    assert rundir.leftovers(str(tmp_path), store.files()) == []
    # Engine code's files, next to the model, inside its directory (even with the store's
    # own name prefix) or anywhere else, are the run's.
    (tmp_path / rundir.KIT_OWN / "junk").write_text("x")
    (tmp_path / f"{mine}x").mkdir()
    (tmp_path / mine / "hidden").write_text("x")
    (tmp_path / "visible").write_text("x")
    assert rundir.leftovers(str(tmp_path), store.files()) == sorted(
        [f"{rundir.KIT_OWN}/junk", f"{mine}x", f"{mine}/hidden", "visible"]
    )
    # A kit file right in the run directory is spared too.
    assert rundir.leftovers(str(tmp_path), [*store.files(), str(tmp_path / "visible")]) == sorted(
        [f"{rundir.KIT_OWN}/junk", f"{mine}x", f"{mine}/hidden"]
    )
    # A real run keeps nothing there: the directory itself is a leftover.
    assert rundir.leftovers(str(tmp_path)) == [rundir.KIT_OWN, "visible"]
    assert rundir.leftovers(str(tmp_path / "gone"), store.files()) == []
