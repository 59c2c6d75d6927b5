"""Privilege probes: what the kernel says about the calling process at a hook."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kit.system import linux

SNAPSHOT_KEYS = ("threads", "securebits", "dumpable", "ns", "uid_map", "gid_map", "nspid", "root")
FULL_MAP = [[0, 0, 4294967295]]

#: pids of escalation-probe children (their SIGCHLD is the kit's, not the engine's business).
probe_children: set[int] = set()
#: Held from before a probe starts a child until its pid is in :data:`probe_children`: a
#: SIGCHLD from a pid not (yet) there is told apart under it (:func:`is_probe_child`).
probe_children_lock = threading.Lock()
#: Held while a probe thread lives, and while a snapshot reads the threads: a snapshot in
#: another thread (the master runs hooks concurrently) never sees a probe thread, whose
#: credentials are the probe's, not the process's.
_probe_lock = threading.RLock()
#: How long a probe thread may take to be gone from ``/proc`` after it returned.
PROBE_THREAD_EXIT_TIMEOUT = 5.0


def _new_locks() -> None:
    # A child forked while another thread held a lock would wait for it forever.
    global probe_children_lock, _probe_lock
    probe_children_lock = threading.Lock()
    _probe_lock = threading.RLock()


os.register_at_fork(after_in_child=_new_locks)


def is_probe_child(pid: int) -> bool:
    """Whether ``pid`` is (or was) a probe's child, and forget it: for a SIGCHLD handler,
    which may run before the probe recorded the pid it just started."""
    with probe_children_lock:
        if pid in probe_children:
            probe_children.discard(pid)
            return True
    return False


#: Why the setuid-exec way was not tried.
UNTRIED_NO_BINARY = "no-setuid-binary"  # the kit could not provide one (launched without root)
UNTRIED_UNREACHABLE = "unreachable"  # not at its path from this process's root
SETUID_SOURCE = "/usr/bin/id"  # where the kit has no program of its own (not x86-64)
SETUID_DIR = ".kit-setuid-probe"


@dataclass(frozen=True)
class SetuidBinary:
    """The run's setuid-root binary (a copy of ``id``) and its identity."""

    path: str
    dev: int = 0
    ino: int = 0
    unavailable: str = ""  # why the kit could not provide it (the way is then not tried)


def _own_userns() -> tuple[int, int] | None:
    try:
        return linux.userns_identity()
    except OSError:
        return None


#: (device, inode) of the host user namespace: the one the kit was launched in. Each
#: process of a run inherits it from its supervisor (:func:`configure`, from the
#: RunRequest); a process that uses the probes on its own takes the user namespace it was
#: in when it imported the kit (read here, before anything could leave it).
_host_userns: tuple[int, int] | None = _own_userns()
_setuid_binary: SetuidBinary | None = None


def configure(host: Sequence[int] | None, binary: SetuidBinary | None) -> None:
    """Set this process's (and its future children's) host user namespace (None: keep the
    one read at import) and setuid binary, for a run."""
    global _host_userns, _setuid_binary
    if host is not None:
        _host_userns = (int(host[0]), int(host[1]))
    _setuid_binary = binary


def host_userns() -> tuple[int, int]:
    """(device, inode) of the host user namespace.

    "Host privilege" is relative to the host user namespace, the one the kit was launched in, known
    by its identity, never by the content of a uid map.
    """
    global _host_userns
    if _host_userns is None:
        _host_userns = linux.userns_identity()
    return _host_userns


def setuid_binary() -> SetuidBinary | None:
    return _setuid_binary


def in_host_userns() -> bool:
    """Whether the calling process is in the host user namespace (unknown counts as yes)."""
    try:
        return linux.userns_identity() == host_userns()
    except OSError:
        return True


#: x86-64 machine code of ``id -u``: print the effective uid in decimal and a newline, exit
#: 0. geteuid; the digits are built backwards below the stack pointer (the red zone), then
#: write(1, first digit, count) and exit(0).
_EUID_X86_64 = bytes.fromhex(
    "b86b000000"
    "0f05"  # mov eax, 107 (geteuid); syscall
    "488d7424ff"
    "c6060a"  # lea rsi, [rsp-1]; mov byte [rsi], 10 (newline)
    "b90a000000"  # mov ecx, 10
    "31d2"
    "f7f1"
    "80c230"
    "48ffce"
    "8816"
    "85c0"
    "75f0"  # do { eax, edx = divmod(eax, 10);
    #                                  *--rsi = '0' + edx } while (eax)
    "488d1424"
    "4829f2"  # lea rdx, [rsp]; sub rdx, rsi: the count
    "bf01000000"
    "b801000000"
    "0f05"  # write(1, rsi, rdx)
    "b83c000000"
    "31ff"
    "0f05"
)  # exit(0)


def euid_program() -> bytes | None:
    """A static executable that prints its effective uid as ``id -u`` does: no dynamic
    loader, no libraries, so an exec costs a twentieth of ``id``'s (the probe execs it at
    most hooks). None where the kit has none for the machine (then ``id`` is copied)."""
    if os.uname().machine != "x86_64":
        return None
    base, code_at = 0x400000, 64 + 56  # the ELF header, one program header, then the code
    size = code_at + len(_EUID_X86_64)
    header = (
        b"\x7fELF"
        + bytes([2, 1, 1, 0])
        + bytes(8)
        + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, base + code_at, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    )
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD r-x
    return header + segment + _EUID_X86_64


def provide_setuid_binary(directory: str) -> SetuidBinary:
    """Put a setuid-root ``id -u`` (:func:`euid_program`, else a copy of ``id``) in a
    root-owned directory under ``directory``. When this process cannot (not root) or the
    set-user-ID bit would not count there (a ``nosuid`` mount), the binary says why it is
    unavailable."""
    where = os.path.join(directory, SETUID_DIR)
    if os.geteuid() != 0:
        return SetuidBinary(os.path.join(where, "id"), unavailable="launched-without-root")
    if os.statvfs(directory).f_flag & os.ST_NOSUID:
        return SetuidBinary(os.path.join(where, "id"), unavailable="nosuid")
    os.mkdir(where, 0o755)
    os.chown(where, 0, 0)
    path = os.path.join(where, "id")
    program = euid_program()
    if program is None:
        shutil.copyfile(SETUID_SOURCE, path)
    else:
        with open(path, "wb") as f:
            f.write(program)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)  # after chown: a chown clears the setuid bit
    st = os.stat(path)
    return SetuidBinary(path, st.st_dev, st.st_ino)


def remove_setuid_binary(directory: str) -> None:
    shutil.rmtree(os.path.join(directory, SETUID_DIR), ignore_errors=True)


def _ids(field: str) -> list[int]:
    return [int(x) for x in field.split()]


def _caps(field: str) -> list[str]:
    return linux.mask_to_caps(int(field, 16))


def _mask(field: str) -> int:
    return int(field, 16)


def named_caps(caps: Any) -> Any:
    """A thread's capability sets with every mask (the ledger datagrams' form, see
    :func:`snapshot`) as the list of capability names; anything else is left as it is."""
    if not isinstance(caps, dict):
        return caps
    return {
        k: linux.mask_to_caps(v) if type(v) is int and 0 <= v < 1 << 64 else v
        for k, v in caps.items()
    }


def _read_map(path: str) -> list[list[int]]:
    try:
        text = linux.read_file(path).decode()
    except OSError:
        return []
    return [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]


def thread_state(status: dict[str, str], tid: int, masks: bool = False) -> dict[str, Any]:
    """One thread's credentials from its parsed ``status`` file; ``masks``: each capability
    set as its integer mask instead of a list of names."""
    cap = _mask if masks else _caps
    return {
        "tid": tid,
        "name": status.get("Name", ""),  # comm: lets a violation name the thread
        "uid": _ids(status["Uid"]),  # real, effective, saved, fs
        "gid": _ids(status["Gid"]),
        "groups": _ids(status.get("Groups", "")),
        "caps": {
            "effective": cap(status["CapEff"]),
            "permitted": cap(status["CapPrm"]),
            "inheritable": cap(status["CapInh"]),
            "bounding": cap(status["CapBnd"]),
            "ambient": cap(status.get("CapAmb", "0")),
        },
        "no_new_privs": status.get("NoNewPrivs", "0") == "1",
        "seccomp": int(status.get("Seccomp", "0")),
    }


def _thread_ns(tid: int) -> dict[str, int | None]:
    """The namespaces of one thread (a thread may setns on its own, e.g. into a net ns)."""
    return linux.ns_inodes(f"/proc/self/task/{tid}/ns")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No escalation probe thread runs in this process during the block (a probe's thread
    raises its own credentials, a moment, on purpose): while the supervisor reads every
    thread of a sender from outside (:func:`kit.ledger.record.confirm_send`). Reentrant: a
    signal handler of engine code may call a hook on the thread that waits here."""
    with _probe_lock:
        yield


def snapshot(masks: bool = False) -> dict[str, Any]:
    """Privilege state of the calling process, every thread included (a probe thread of
    :func:`escalation` excepted: it is waited for). ``masks``: capability sets as integer
    masks, the form a ledger datagram carries (a fifth of the JSON: names are most of a
    snapshot); :class:`kit.ledger.record.Ledger` turns them back into names (:func:`named_caps`).

    Read, for every thread, the credentials and capability sets from ``/proc/self/task/TID/status``
    (the kernel's own report), plus the process's namespaces, id maps, securebits and dumpable flag.
    """
    with _probe_lock:
        return _snapshot(masks)


def _snapshot(masks: bool) -> dict[str, Any]:
    threads = []
    nspid: list[int] = []
    leader = linux.proc_self()  # /proc/self/ns is the thread group leader's
    ns: dict[str, int | None] | None = None
    for tid in linux.thread_ids():
        try:
            status = linux.read_status(f"/proc/self/task/{tid}/status")
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile (ESRCH)
            continue
        state = thread_state(status, tid, masks)
        state["ns"] = _thread_ns(tid)
        threads.append(state)
        if tid == leader:
            ns = dict(state["ns"])
        if not nspid:
            nspid = _ids(status.get("NSpid", str(os.getpid())))
    if ns is None:
        ns = linux.ns_inodes()
    # A thread that lacks a namespace the process has ended while it was read (a live one's
    # are readable to its own process): left out, once the kernel says it is exiting.
    threads = [
        t
        for t in threads
        if t["tid"] == leader
        or all(ns.get(k) is None for k, ino in t["ns"].items() if ino is None)
        or not linux.thread_ending(t["tid"])
    ]
    return {
        "threads": threads,
        "securebits": linux.get_securebits(),
        "dumpable": linux.get_dumpable(),
        "ns": ns,
        "uid_map": _read_map("/proc/self/uid_map"),
        "gid_map": _read_map("/proc/self/gid_map"),
        "nspid": nspid,
        "root": linux.path_identity("/"),
    }


def _own_capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread (the probe's): read from
    its ``/proc/thread-self/status``, cheaper than ``capget`` through ctypes; else
    ``capget``."""
    try:
        status = linux.read_file("/proc/thread-self/status")
        masks = []
        for key in (b"\nCapEff:", b"\nCapPrm:", b"\nCapInh:"):
            start = status.index(key) + len(key)
            masks.append(int(status[start : status.index(b"\n", start)], 16))
        return masks[0], masks[1], masks[2]
    except (OSError, ValueError):
        return linux.capget()


def _try_raise_caps() -> list[str]:
    """Raise the permitted capabilities into the effective set with nothing else changed;
    then lower them again, so that the next way is tried on its own."""
    try:
        eff, perm, inh = _own_capabilities()
        extra = perm & ~eff
        if not extra:
            return []
        linux.capset(eff | perm, perm, inh)
    except OSError:
        return []
    linux.capset(eff, perm, inh)  # lowering the effective set is always allowed
    return ["C" + format(extra, "x")]


def _try_setresuid() -> list[str]:
    try:
        # The calling thread's only: glibc's setresuid would change every thread.
        linux.thread_setresuid(0, 0, 0)
    except OSError:
        return []
    return ["U"]


def _spawn_setuid(binary: SetuidBinary | None) -> tuple[int, int] | str:
    """Start the run's setuid-root binary (``id -u``) with the credentials the probe child
    has now; (pid, read end of its output) or the word that says why it was not tried."""
    if binary is None:
        return "X!" + UNTRIED_NO_BINARY
    if binary.unavailable:
        return f"X!{UNTRIED_NO_BINARY}:{binary.unavailable}"
    try:
        st = os.stat(binary.path)
    except OSError as exc:
        return f"X!{UNTRIED_UNREACHABLE}:{_errname(exc)}"
    if (st.st_dev, st.st_ino) != (binary.dev, binary.ino):
        return f"X!{UNTRIED_UNREACHABLE}:other-file"  # another file there (another root)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)  # other threads' children must not hold it open
    try:
        with probe_children_lock:
            pid = os.posix_spawn(
                binary.path,
                [binary.path, "-u"],
                {},
                file_actions=[(os.POSIX_SPAWN_DUP2, wfd, 1), (os.POSIX_SPAWN_DUP2, wfd, 2)],
            )
            probe_children.add(pid)
    except OSError as exc:
        os.close(rfd)
        return "X!exec:" + _errname(exc)
    finally:
        os.close(wfd)
    return pid, rfd


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _collect(pid: int, rfd: int) -> bytes:
    """What child ``pid`` wrote to ``rfd`` until EOF; then the child is reaped."""
    out = b""
    try:
        while chunk := os.read(rfd, 256):
            out += chunk
    finally:
        os.close(rfd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # reaped already: by a SIGCHLD handler or waitpid(-1)
            pass
    return out


def _setuid_outcome(spawned: tuple[int, int] | str) -> str:
    """``X<euid>`` printed by the setuid binary, or ``X!<why>``."""
    if isinstance(spawned, str):
        return spawned
    text = _collect(*spawned).decode(errors="replace").strip()
    return "X" + text if text.isdigit() else "X!output:" + text[:60].replace(" ", "_")


def _try_escalation(binary: SetuidBinary | None) -> list[str]:
    """In the probe child: each way back to privilege, each from the credentials the hooked
    thread has (the setuid binary is exec'd first, before anything else is tried)."""
    spawned = _spawn_setuid(binary)
    words = _try_raise_caps() + _try_setresuid()
    words.append(_setuid_outcome(spawned))
    return words


def escalation() -> dict[str, Any]:
    """Try to regain privilege from a throwaway thread of the calling thread, which starts
    with its credentials, each way on its own (``SPEC.md`` §4): setresuid(0, 0, 0);
    raising the permitted capabilities into the effective set (without regaining uid 0
    first); exec of the run's setuid-root binary (``id -u``: the effective uid it prints).
    Credentials are per thread in the kernel and the probe changes only its own, so the
    calling thread and its siblings are never changed. Returns when the probe thread is
    gone from ``/proc`` too, so that no later snapshot sees it.

    Returns :func:`escalation_result`'s dictionary.

    The hooked thread itself is never changed.
    """
    host = in_host_userns()
    binary = _setuid_binary
    words: list[str] = []
    failure: list[BaseException] = []
    tids: list[int | None] = []

    def probe_thread() -> None:
        try:
            tids.append(_proc_tid())
            words.extend(_try_escalation(binary))
        except BaseException as exc:  # noqa: BLE001 re-raised by the caller, below
            failure.append(exc)

    with _probe_lock:
        thread = threading.Thread(target=probe_thread, name="kit-probe", daemon=True)
        thread.start()
        thread.join()
        if tids and tids[0] is not None:
            _await_thread_gone(tids[0])
    if failure:
        raise RuntimeError(
            f"the escalation probe thread failed: {type(failure[0]).__name__}: {failure[0]}"
        ) from failure[0]
    raised: list[str] = []
    setuid_euid: int | None = None
    untried = "the probe thread reported nothing"
    for w in words:
        if w.startswith("C"):
            raised = linux.mask_to_caps(int(w[1:], 16))
        elif w.startswith("X!"):
            untried = w[2:]
        elif w.startswith("X"):
            setuid_euid = int(w[1:])
    return escalation_result(
        setresuid_root="U" in words,
        raised=raised,
        setuid_euid=setuid_euid,
        untried=untried,
        host_userns=host,
    )


def _proc_tid() -> int | None:
    """The calling thread's id as the mounted ``/proc`` numbers it (None: not there)."""
    try:
        return int(os.readlink("/proc/thread-self").rsplit("/", 1)[1])
    except (OSError, ValueError):
        return None


def _await_thread_gone(tid: int) -> None:
    """Wait until thread ``tid`` (joined: it has returned) has left ``/proc/self/task``: the
    kernel removes it a moment after the thread library reports it finished."""
    deadline = time.monotonic() + PROBE_THREAD_EXIT_TIMEOUT
    path = f"/proc/self/task/{tid}"
    while os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the escalation probe thread {tid} was still in {path} "
                f"{PROBE_THREAD_EXIT_TIMEOUT} s after it returned"
            )
        time.sleep(0.00002)


def escalation_result(
    *,
    setresuid_root: bool,
    raised: list[str],
    setuid_euid: int | None,
    untried: str,
    host_userns: bool,
) -> dict[str, Any]:
    """The escalation verdict of both backends, from what each way did.

    ``setresuid_root``: setresuid(0, 0, 0) worked; ``raise_caps``: the capabilities raised
    into the effective set; ``setuid_exec``: the setuid-root binary ran with effective uid 0
    (None: not tried, ``setuid_exec_untried`` says why; else ``setuid_exec_euid`` is what it
    printed); ``host_userns``: the process is in the host user namespace;
    ``host_escalation``: some way gives uid 0 or a capability there.
    """
    result: dict[str, Any] = {
        "setresuid_root": setresuid_root,
        "raise_caps": raised,
        "setuid_exec": None if setuid_euid is None else setuid_euid == 0,
    }
    if setuid_euid is None:
        result["setuid_exec_untried"] = untried
    else:
        result["setuid_exec_euid"] = setuid_euid
    result["host_userns"] = host_userns
    result["host_escalation"] = host_userns and (
        setresuid_root or bool(raised) or result["setuid_exec"] is True
    )
    return result


def host_privilege(snap: dict[str, Any], host: Sequence[int] | None = None) -> bool:
    """True when any thread has uid 0 (real, effective or saved) or a permitted capability
    while in the host user namespace (``SPEC.md`` §4): the one identified by ``host``
    ((device, inode), default: this run's). Snapshots name namespaces by inode, all on the
    one nsfs device; a snapshot whose user namespace could not be read counts as the host's
    (unknown is never taken for safe)."""
    inode = (host if host is not None else host_userns())[1]
    userns = (snap.get("ns") or {}).get("user")
    if userns is not None and userns != inode:
        return False
    return any(0 in t["uid"][:3] or t["caps"]["permitted"] for t in snap["threads"])
