"""Seccomp filters of a run: fake-backend containment and host-global refusals."""

from __future__ import annotations

import errno
import functools
import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kit.system import linux

SYSTEM_INTERFACE = "system-interface"
HOST_GLOBAL_CATEGORY = "host-global"
HOST_WATCH_CATEGORY = "host-watch"

#: x86-64 system call numbers (asm/unistd_64.h) of every call a rule names.
SYSCALLS_X86_64: dict[str, int] = {
    "mount": 165,
    "umount2": 166,
    "ioctl": 16,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "clone": 56,
    "clone3": 435,
    "sethostname": 170,
    "setdomainname": 171,
    "setuid": 105,
    "setgid": 106,
    "setreuid": 113,
    "setregid": 114,
    "setresuid": 117,
    "setresgid": 119,
    "setfsuid": 122,
    "setfsgid": 123,
    "setgroups": 116,
    "capset": 126,
    "ptrace": 101,
    "process_vm_writev": 311,
    "pidfd_getfd": 438,
    "mknod": 133,
    "mknodat": 259,
    "settimeofday": 164,
    "clock_settime": 227,
    "clock_adjtime": 305,
    "adjtimex": 159,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "reboot": 169,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "swapon": 167,
    "swapoff": 168,
    "acct": 163,
    "iopl": 172,
    "ioperm": 173,
    "quotactl": 179,
    "quotactl_fd": 443,
    "open_by_handle_at": 304,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "bpf": 321,
    "vhangup": 153,
    "syslog": 103,
    "kill": 62,
    "tkill": 200,
    "tgkill": 234,
    "rt_sigqueueinfo": 129,
    "rt_tgsigqueueinfo": 297,
    "pidfd_send_signal": 424,
}
_X32_SYSCALL_BIT = 0x40000000
_NAMESPACE_FLAGS = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWCGROUP
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWUSER
    | linux.CLONE_NEWPID
    | linux.CLONE_NEWNET
)
_S_IFMT, _S_IFCHR, _S_IFBLK = 0o170000, 0o020000, 0o060000
#: The socket ioctls that configure a network interface or route (linux/sockios.h: set
#: flags, addresses, netmask, metric, MTU, name, hardware address, queue length; add and
#: delete routes, bridges): kit.system's link_up does the one a run needs.
_NET_SET_IOCTLS = (
    0x890B,  # SIOCADDRT
    0x890C,  # SIOCDELRT
    0x8914,  # SIOCSIFFLAGS
    0x8916,  # SIOCSIFADDR
    0x8918,  # SIOCSIFDSTADDR
    0x891A,  # SIOCSIFBRDADDR
    0x891C,  # SIOCSIFNETMASK
    0x891E,  # SIOCSIFMETRIC
    0x8922,  # SIOCSIFMTU
    0x8923,  # SIOCSIFNAME
    0x8924,  # SIOCSIFHWADDR
    0x8936,  # SIOCDIFADDR
    0x8943,  # SIOCSIFTXQLEN
    0x89A0,  # SIOCBRADDBR
    0x89A1,  # SIOCBRDELBR
)


@dataclass(frozen=True)
class Rule:
    """Refuse ``syscall``: always, or only when argument ``arg`` (its low 32 bits) matches:
    any bit of ``mask`` set (no ``values``), or ``arg & mask`` (``arg`` when ``mask`` is 0)
    equal to one of ``values``."""

    syscall: str
    category: str
    arg: int | None = None
    mask: int = 0
    values: tuple[int, ...] = ()


def _rules(category: str, names: str) -> tuple[Rule, ...]:
    return tuple(Rule(name, category) for name in names.split())


#: Why each call of the fake backend's list, by group:
#: - the mount family, pivot_root, chroot: the model keeps the mount tables and roots;
#: - unshare, setns, clone with a namespace flag: the model creates and joins namespaces
#:   (a plain fork, a thread and clone(CLONE_FS) stay allowed: the kit needs them);
#: - sethostname, setdomainname: a real call outside a uts namespace renames the host;
#: - the set*id family, setgroups, capset: the model holds every credential (the kit's fake
#:   starter changes none for real, kit/system/fake/system.py); a real change would make the
#:   ledger lie, and as root would give away or regain real privilege;
#: - mknod(at) of a character or block device: device nodes on the real file system;
#: - ioctl that sets an interface's flags, addresses or name, or adds a route or bridge: the
#:   model keeps the links (link_up); as root the real call would change the host's network
#:   (a netlink message, in memory, is out of a filter's reach);
#: - ptrace, process_vm_writev, pidfd_getfd: they reach a process outside the filter (the
#:   supervisor, the launcher) and could make it act, or take its listener, for the engine.
#: Left allowed: prctl (dropping a capability from the bounding set changes nothing outside
#: the process), seccomp (an engine's own filter only narrows), kill (the run's pid
#: containment is the sandbox's and the supervisor's business), and file writes (the host
#: diff's: a file system path cannot be judged from a system call's registers).
CONTAINMENT: tuple[Rule, ...] = (
    *_rules(
        SYSTEM_INTERFACE,
        "mount umount2 open_tree move_mount fsopen fsconfig fsmount "
        "fspick mount_setattr pivot_root chroot unshare setns "
        "sethostname setdomainname setuid setgid setreuid setregid "
        "setresuid setresgid setfsuid setfsgid setgroups capset ptrace "
        "process_vm_writev pidfd_getfd",
    ),
    Rule("clone", SYSTEM_INTERFACE, arg=0, mask=_NAMESPACE_FLAGS),
    Rule("mknod", SYSTEM_INTERFACE, arg=1, mask=_S_IFMT, values=(_S_IFCHR, _S_IFBLK)),
    Rule("mknodat", SYSTEM_INTERFACE, arg=2, mask=_S_IFMT, values=(_S_IFCHR, _S_IFBLK)),
    Rule("ioctl", SYSTEM_INTERFACE, arg=1, values=_NET_SET_IOCTLS),
)

#: Why each call of the host-global list: no namespace confines its effect, and neither the
#: kit nor an engine's lifecycle needs it.
#: - settimeofday, clock_settime, clock_adjtime, adjtimex: the clock (adjtimex's modes live
#:   in memory, so a read-only adjtimex is refused too: nothing here reads the NTP state);
#: - init_module, finit_module, delete_module: kernel modules;
#: - reboot, kexec_load, kexec_file_load: the machine itself;
#: - swapon, swapoff, acct, quotactl(_fd): swap areas, process accounting, disk quotas;
#: - iopl, ioperm: raw I/O ports; vhangup: hangs up the launcher's terminal;
#: - open_by_handle_at: opens a file by handle, past the sandbox's mount namespace;
#: - add_key, request_key, keyctl: kernel keyrings are not namespaced (root's user keyring
#:   is the host's and outlives the run);
#: - bpf: programs attached to host-wide hooks and maps pinned in /sys/fs/bpf outlive it;
#: - syslog only for the actions that change the host's log (read-clear 4, clear 5,
#:   console off/on/level 6-8); reading the kernel log stays allowed.
HOST_GLOBAL: tuple[Rule, ...] = (
    *_rules(
        HOST_GLOBAL_CATEGORY,
        "settimeofday clock_settime clock_adjtime adjtimex "
        "init_module finit_module delete_module reboot kexec_load "
        "kexec_file_load swapon swapoff acct quotactl quotactl_fd "
        "iopl ioperm vhangup open_by_handle_at add_key request_key "
        "keyctl bpf",
    ),
    Rule("syslog", HOST_GLOBAL_CATEGORY, arg=0, values=(4, 5, 6, 7, 8)),
)

#: Calls the real backend lets run, after the supervisor has looked at them (answered with
#: SECCOMP_USER_NOTIF_FLAG_CONTINUE): what the host diff cannot see between two of its looks.
#: - sethostname, setdomainname: a name set and put back between two looks leaves no trace
#:   (SPEC §11: the host's names do not change "not even while it runs"); the supervisor
#:   records those that reach the host sandbox's uts namespace;
#: - a signal to pid 1 (kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo) or through
#:   a pidfd: from the sandbox's pid namespace, pid 1 is the sandbox's init, the host's
#:   stand-in, whose reaction (none: it ignores what the run sends) is not the real host's.
HOST_WATCH: tuple[Rule, ...] = (
    *_rules(HOST_WATCH_CATEGORY, "sethostname setdomainname pidfd_send_signal"),
    *(
        Rule(name, HOST_WATCH_CATEGORY, arg=0, values=(1,))
        for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
    ),
)

#: The fake backend's filter: both lists (as root, a direct host-global call would reach the
#: real host too).
FAKE_RULES: tuple[Rule, ...] = CONTAINMENT + HOST_GLOBAL
#: The real backend's filter (launched as root): host-global calls refused, the watched ones
#: looked at.
REAL_RULES: tuple[Rule, ...] = HOST_GLOBAL + HOST_WATCH

# --- classic BPF --------------------------------------------------------------------------------

_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_ALU_AND = 0x54  # BPF_ALU | BPF_AND | BPF_K
_JEQ, _JGE, _JSET = 0x15, 0x35, 0x45  # BPF_JMP | BPF_J* | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
RET_ALLOW = 0x7FFF0000
RET_USER_NOTIF = 0x7FC00000
RET_ERRNO = 0x00050000
RET_KILL_PROCESS = 0x80000000
_OFF_NR, _OFF_ARCH = 0, 4


def _off_arg(index: int) -> int:
    return 16 + 8 * index  # the low 32 bits (little-endian) of seccomp_data.args[index]


class _Assembler:
    """Instructions with symbolic forward jump targets, resolved to 8-bit offsets."""

    def __init__(self) -> None:
        self.code: list[tuple[int, Any, Any, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def program(self) -> list[tuple[int, int, int, int]]:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            offs = [self.labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)]
            if not all(0 <= o <= 255 for o in offs):
                raise ValueError(f"BPF jump out of range at instruction {i}: {offs}")
            out.append((code, offs[0], offs[1], k))
        return out


def build_program(
    rules: Iterable[Rule], table: dict[str, int] = SYSCALLS_X86_64, notify: bool = True
) -> list[tuple[int, int, int, int]]:
    """The filter for ``rules``: x86-64 only (another architecture, e.g. a 32-bit
    ``int 0x80``, kills the process: its numbers mean other calls), x32 numbers notified,
    each rule's call notified (when its argument test matches), clone3 ENOSYS, the rest
    allowed. Without ``notify``, refused calls fail with EPERM at once, unrecorded.

    The filter is classic BPF: check the architecture (x86-64 only), refuse x32 system call numbers,
    then compare the call number with each entry (a few entries also test an argument, e.g. clone's
    namespace flags).
    """
    rules = list(rules)
    asm = _Assembler()
    asm.op(_LD_ABS, _OFF_ARCH)
    asm.op(_JEQ, linux.AUDIT_ARCH_X86_64, 0, "kill")
    asm.op(_LD_ABS, _OFF_NR)
    asm.op(_JGE, _X32_SYSCALL_BIT, "notify", 0)
    # clone3 passes its flags in memory, which a filter cannot read: answer ENOSYS, as a
    # kernel without clone3 would, and glibc falls back to clone, whose flags are checked.
    asm.op(_JEQ, table["clone3"], "enosys", 0)
    for i, rule in enumerate(rules):
        asm.op(_JEQ, table[rule.syscall], "notify" if rule.arg is None else f"test{i}", 0)
    asm.op(_RET, RET_ALLOW)
    for i, rule in enumerate(rules):
        if rule.arg is None:
            continue
        asm.label(f"test{i}")
        asm.op(_LD_ABS, _off_arg(rule.arg))
        if not rule.values:
            asm.op(_JSET, rule.mask, "notify", 0)
        else:
            if rule.mask:
                asm.op(_ALU_AND, rule.mask)
            for value in rule.values:
                asm.op(_JEQ, value, "notify", 0)
        asm.op(_RET, RET_ALLOW)
    asm.label("notify")
    asm.op(_RET, RET_USER_NOTIF if notify else RET_ERRNO | errno.EPERM)
    asm.label("enosys")
    asm.op(_RET, RET_ERRNO | errno.ENOSYS)
    asm.label("kill")
    asm.op(_RET, RET_KILL_PROCESS)
    return asm.program()


@functools.cache
def program(rules: tuple[Rule, ...], notify: bool = True) -> tuple[tuple[int, int, int, int], ...]:
    """:func:`build_program`, once per process (see :func:`warm`)."""
    return tuple(build_program(rules, notify=notify))


@functools.cache
def _compiled(rules: tuple[Rule, ...], notify: bool) -> linux.SockFprog:
    """:func:`program` as seccomp(2) takes it, once per process (see :func:`warm`)."""
    return linux.SockFprog(program(rules, notify))


def warm() -> None:
    """Build the filters now (the zygote, before it forks the runs): a starter, and the init
    of each host sandbox (its own, without a listener), then find them built instead of
    building one in every run."""
    if os.uname().machine == "x86_64":
        for rules, notify in ((FAKE_RULES, True), (REAL_RULES, True), (HOST_GLOBAL, False)):
            _compiled(rules, notify)  # as install() asks: the cache keys by position


# --- installing (in the starter) ------------------------------------------------------------


class Unavailable(Exception):
    """The filter cannot be installed here (architecture, kernel): the reason."""


def rules_for(backend: str, privileged: bool) -> tuple[str, tuple[Rule, ...]] | None:
    """(filter name, rules) a run's starter installs, None for none. The fake backend: both
    lists, as root or not. The real backend: the host-global list, only when launched with
    CAP_SYS_ADMIN (an unprivileged launcher cannot make these calls anyway, and installing
    a filter without CAP_SYS_ADMIN needs no_new_privs, which would change every flow)."""
    if backend == "fake":
        return "fake-containment", FAKE_RULES
    if privileged:
        return "host-global", REAL_RULES
    return None


def _has_sys_admin() -> bool:
    return bool(linux.capget()[0] >> linux.CAP_NUMBERS["CAP_SYS_ADMIN"] & 1)


def install(
    rules: tuple[Rule, ...], privileged: bool | None = None, notify: bool = True
) -> int | None:
    """Install a filter for ``rules`` on the calling thread (and so on everything it starts
    later); its listener fd (None without ``notify``: refused calls then fail at once).
    Without CAP_SYS_ADMIN, no_new_privs is set first (the kernel requires it): only the fake
    backend does that, and its ledger's no_new_privs is the model's, read once before the
    starter exists, never the process's."""
    machine = os.uname().machine  # platform.machine(), without importing platform
    if machine != "x86_64":
        raise Unavailable(f"seccomp filters are written for x86-64, not {machine}")
    prog = _compiled(rules, notify)
    if not (_has_sys_admin() if privileged is None else privileged):
        linux.set_no_new_privs()
    return linux.seccomp_install_filter(prog, listener=notify)


def _install_recorded_or_not(
    rules: tuple[Rule, ...], privileged: bool
) -> tuple[int | None, str | None]:
    """(listener, None), or (None, why the refusals go unrecorded) when a filter above
    already has a listener (the kernel allows one per chain, EBUSY: the kit run inside a
    kit run): the calls are still refused, with EPERM at once."""
    try:
        return install(rules, privileged), None
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    install(rules, privileged, notify=False)
    return None, (
        "refused but not recorded: a seccomp filter with a listener is already "
        "installed above this run (the kit run inside a kit run?)"
    )


def install_for_run(backend: str, channel: socket.socket) -> str | None:
    """In the starter, before anything else: install the run's filter and hand its listener
    to the supervisor over ``channel`` (SCM_RIGHTS, with a JSON description), keeping no
    copy (an engine holding the listener could answer its own calls). A filter that cannot
    be installed is described instead (the supervisor records why); the result is then why
    the run must not go on: the fake backend as root without its containment would let an
    engine's direct calls change the real host. None: go on.

    SPEC §9, §11. Two lists of system calls, each refused through seccomp user notification: the
    thread that makes one stops in the kernel, the supervisor (which holds the filter's listener and
    is not under the filter) reads the call, records it in the ledger with the process role and the
    hook open in it, and answers EPERM. Nothing in the list ever runs.

    - :data:`CONTAINMENT` (category ``system-interface``): the privileged calls an engine could make
      around :mod:`kit.system`. In the fake backend the model stands for the kernel, so the same
      call made directly would change the real host (as root) or be invisible to the model.
    - :data:`HOST_GLOBAL` (category ``host-global``): calls whose effect no namespace confines (the
      clock, kernel modules, reboot, kexec, swap, process accounting…). The real backend's starter
      runs under them when launched as root, in the host sandbox or not (the sandbox's init too,
      without a listener: :mod:`kit.run.sandbox`); the fake backend under both lists.

    This is the one place a run's filter is installed: the starter, first thing (from
    ``kit.starter.stage1.Starter.main``). Filters are inherited by every child and kept across exec,
    so one filter installed early in the starter covers stage 1, the master, the container side, the
    RPC server, stage 2 and the payload.
    """
    privileged = _has_sys_admin()
    choice = rules_for(backend, privileged)
    try:
        if choice is None:
            info: dict[str, Any] = {
                "filter": None,
                "reason": (
                    "real backend launched without CAP_SYS_ADMIN: the kernel refuses every "
                    "host-global call to it (they need capabilities of the initial user "
                    "namespace)"
                ),
            }
            channel.sendall(json.dumps(info).encode())
            return None
        name, rules = choice
        try:
            fd, unrecorded = _install_recorded_or_not(rules, privileged)
        except (Unavailable, OSError) as exc:
            channel.sendall(json.dumps({"filter": name, "error": str(exc)}).encode())
            if backend == "fake" and privileged:
                return f"the fake backend's containment could not be installed: {exc}"
            return None
        info = {"filter": name, "syscalls": sorted({r.syscall for r in rules})}
        if fd is None:
            channel.sendall(json.dumps({**info, "error": unrecorded}).encode())
            return None
        try:
            socket.send_fds(channel, [json.dumps(info).encode()], [fd])
        finally:
            os.close(fd)
        return None
    finally:
        channel.close()


# --- the supervisor's side ------------------------------------------------------------------


def receive_listener(channel: socket.socket, timeout: float) -> tuple[int | None, dict[str, Any]]:
    """(listener fd or None, the starter's description of its filter), waiting at most
    ``timeout`` seconds for the starter (which sends it first thing)."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    while not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        if time.monotonic() >= deadline:
            return None, {"filter": None, "error": "the starter sent no filter in time"}
    try:
        data, fds, _, _ = socket.recv_fds(channel, 65536, 1)
        info = (
            json.loads(data)
            if data
            else {"filter": None, "error": "the starter died before its filter"}
        )
    except (OSError, ValueError) as exc:
        return None, {"filter": None, "error": f"filter hand-over failed: {exc}"}
    if not isinstance(info, dict):
        info = {"filter": None, "error": "bad filter description"}
    fd = fds[0] if fds else None
    for extra in fds[1:]:
        os.close(extra)
    return fd, info


#: Arguments that point to a string, by call: index, or (index, index of its length) for a
#: name that is not NUL-terminated. Recorded for the reader (the path, the host name).
STRING_ARGS: dict[str, tuple[int | tuple[int, int], ...]] = {
    "sethostname": ((0, 1),),
    "setdomainname": ((0, 1),),
    "chroot": (0,),
    "pivot_root": (0, 1),
    "mount": (0, 1, 2),
    "umount2": (0,),
    "swapon": (0,),
    "swapoff": (0,),
    "acct": (0,),
    "delete_module": (0,),
    "mknod": (0,),
    "mknodat": (1,),
}
_MAX_STRING = 256
#: Refusals the supervisor records per run; the rest are answered and counted (an engine
#: that retries a refused call in a loop must not grow the ledger without bound).
MAX_RECORDED = 1000
_NAMES = {nr: name for name, nr in SYSCALLS_X86_64.items()}
_CATEGORY = {rule.syscall: rule.category for rule in CONTAINMENT + HOST_GLOBAL}
_WATCHED_NAMES = frozenset(rule.syscall for rule in HOST_WATCH)


def _thread_ids(tid: int) -> dict[str, Any] | None:
    """The kernel's view of a notifying thread, read before it is answered: its process
    (Tgid) and both ids as the innermost pid namespace numbers them (what the ledger
    records), and the innermost ids of all its process's threads."""
    try:
        status = linux.read_status(f"/proc/{tid}/status")
        tgid = int(status["Tgid"])
        own = int(status.get("NSpid", str(tid)).split()[-1])
        ptgid = int(status.get("NStgid", str(tgid)).split()[-1])
        parent = _parent_ids(int(status["PPid"]))
        siblings = _ns_threads(tgid)
    except (OSError, ValueError, KeyError):
        return None
    return {
        "tgid": tgid,
        "ns_tid": own,
        "ns_tgid": ptgid,
        "ns_threads": sorted(siblings | {own}),
        "parent": parent,
    }


def _ns_threads(tgid: int) -> set[int]:
    """The innermost ids of a process's threads. A thread that ends between the listing and
    its read (a probe thread of the master, say) is left out: it is not the caller, whose
    process and ids stand without it."""
    ids = set()
    for t in os.listdir(f"/proc/{tgid}/task"):
        try:
            status = linux.read_status(f"/proc/{tgid}/task/{t}/status")
        except (FileNotFoundError, ProcessLookupError):
            continue
        ids.add(int(status.get("NSpid", t).split()[-1]))
    return ids


def _parent_ids(ppid: int) -> dict[str, Any] | None:
    """The innermost ids of a process's parent and its threads (a child the engine forked
    has no ledger events of its own: it is named by its parent's)."""
    try:
        status = linux.read_status(f"/proc/{ppid}/status")
        tgid = int(status.get("NStgid", str(ppid)).split()[-1])
        threads = _ns_threads(ppid) | {tgid}
    except (OSError, ValueError, KeyError):
        return None
    return {
        "tgid": ppid,
        "ns_tid": tgid,
        "ns_tgid": tgid,
        "ns_threads": sorted(threads),
        "parent": None,
    }


@dataclass(frozen=True)
class HostIdentity:
    """The host a run can reach, as the kernel names it: the namespaces of the host sandbox's
    init (``(st_dev, st_ino)`` of each), its pid as the supervisor numbers it, and its real
    and saved uid (as the supervisor's user namespace maps them)."""

    init_pid: int
    uts: tuple[int, int]
    user: tuple[int, int]
    pid: tuple[int, int]
    init_uids: tuple[int, int]

    @classmethod
    def of(cls, init_pid: int) -> HostIdentity | None:
        """The identity of the sandbox whose init is ``init_pid``; None if it is gone."""
        try:
            uids = linux.read_status(f"/proc/{init_pid}/status")["Uid"].split()
            return cls(
                init_pid,
                _ns_id(init_pid, "uts"),
                _ns_id(init_pid, "user"),
                _ns_id(init_pid, "pid"),
                (int(uids[0]), int(uids[2])),
            )
        except (OSError, KeyError, ValueError, IndexError):
            return None


def _ns_id(pid: int, kind: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{kind}")
    return st.st_dev, st.st_ino


#: Argument index of the signal number, by call (the target is argument 0, and for the
#: thread-directed calls argument 1 too).
_SIGNAL_ARG = {
    "kill": 1,
    "tkill": 1,
    "tgkill": 2,
    "rt_sigqueueinfo": 1,
    "rt_tgsigqueueinfo": 2,
    "pidfd_send_signal": 1,
}
_NEW_UTS_LEN = 64
_NSIG = 64


def _has_cap(status: dict[str, str], name: str) -> bool:
    return bool(int(status["CapEff"], 16) >> linux.CAP_NUMBERS[name] & 1)


def _host_effect(
    listener: int, notif: linux.SeccompNotif, name: str, host: HostIdentity
) -> dict[str, Any] | None:
    """What a watched call does to the host if the kernel runs it: ``{"kind": "hostname",
    "value": …}`` (or domainname) for a name set in the sandbox's uts namespace,
    ``{"kind": "signal", "signal": n}`` for a signal that reaches the sandbox's init; None
    for a call that stays in the run's own namespaces, or that the kernel would refuse (no
    privilege over the host's, a bad argument): a call that fails changes nothing. Read
    while the calling thread waits (its namespaces and credentials cannot change then)."""
    tid, args = notif.pid, notif.args
    try:
        status = linux.read_status(f"/proc/{tid}/status")
        if name in ("sethostname", "setdomainname"):
            if _ns_id(tid, "uts") != host.uts or args[1] > _NEW_UTS_LEN:
                return None
            # CAP_SYS_ADMIN over the uts namespace: in the user namespace that owns it.
            if _ns_id(tid, "user") != host.user or not _has_cap(status, "CAP_SYS_ADMIN"):
                return None
            raw = linux.read_memory(tid, args[0], args[1]) if args[1] else b""
            if len(raw) != args[1] or not linux.seccomp_notif_id_valid(listener, notif.id):
                return None
            kind = "hostname" if name == "sethostname" else "domainname"
            return {"kind": kind, "value": raw.decode(errors="backslashreplace")}
        signum = args[_SIGNAL_ARG[name]] & 0xFFFFFFFF
        if not 0 < signum <= _NSIG:
            return None  # signal 0 only asks whether the process exists
        if name == "pidfd_send_signal":
            if _pidfd_target(tid, args[0] & 0xFFFFFFFF) != host.init_pid:
                return None
        elif _ns_id(tid, "pid") != host.pid or (
            name in ("tgkill", "rt_tgsigqueueinfo") and args[1] & 0xFFFFFFFF != 1
        ):
            return None  # pid 1 of another pid namespace: the container's own init
        uid, euid = (int(u) for u in status["Uid"].split()[:2])
        allowed = (uid in host.init_uids or euid in host.init_uids) or (
            _ns_id(tid, "user") == host.user and _has_cap(status, "CAP_KILL")
        )
        return {"kind": "signal", "signal": signum} if allowed else None
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _pidfd_target(tid: int, fd: int) -> int | None:
    """The pid (as the supervisor numbers it) of the process pidfd ``fd`` of thread ``tid``
    refers to; None when ``fd`` is no pidfd."""
    with open(f"/proc/{tid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return None


def handle_notification(
    listener: int, watching: bool = False, host: HostIdentity | None = None
) -> dict[str, Any] | None:
    """Read one notification and answer it; its record (None when the notification was gone
    before it could be read). A refused call is answered EPERM. ``watching``: the filter is
    :data:`REAL_RULES`, whose :data:`HOST_WATCH` calls are let run (CONTINUE), their record
    saying what they do to ``host`` (``effect``, None when nothing). Never raises for a
    stale id or a dying process: the record then says it was not answered."""
    try:
        notif = linux.seccomp_notif_recv(listener)
    except OSError:
        return None
    nr = notif.nr
    name = _NAMES.get(
        nr,
        f"x32 system call {nr & ~_X32_SYSCALL_BIT}"
        if nr & _X32_SYSCALL_BIT
        else f"system call {nr}",
    )
    ids = _thread_ids(notif.pid)
    if watching and name in _WATCHED_NAMES:
        effect = None if host is None else _host_effect(listener, notif, name, host)
        try:
            answered = linux.seccomp_notif_send_continue(listener, notif.id)
        except OSError:
            answered = False
        return {
            "syscall": name,
            "nr": nr,
            "args": [f"{a:#x}" for a in notif.args],
            "category": HOST_WATCH_CATEGORY,
            "answered": answered,
            "target_tid": notif.pid,
            "target": ids,
            "effect": effect,
        }
    strings = _strings(listener, notif, name)
    try:
        answered = linux.seccomp_notif_send_error(listener, notif.id, errno.EPERM)
    except OSError:
        answered = False
    record = {
        "syscall": name,
        "nr": nr,
        "args": [f"{a:#x}" for a in notif.args],
        "category": _CATEGORY.get(name, SYSTEM_INTERFACE),
        "errno": "EPERM",
        "answered": answered,
        "target_tid": notif.pid,
        "target": ids,
    }
    if strings:
        record["strings"] = strings
    return record


def _strings(listener: int, notif: linux.SeccompNotif, name: str) -> list[str | None]:
    """The call's string arguments, read from the calling thread's memory while it waits;
    kept only if the notification is still pending afterwards (else the memory may already
    belong to something else). None for a NULL or unreadable pointer."""
    out: list[str | None] = []
    for spec in STRING_ARGS.get(name, ()):
        index, size = spec if isinstance(spec, tuple) else (spec, None)
        address = notif.args[index]
        length = min(notif.args[size], _MAX_STRING) if size is not None else _MAX_STRING
        try:
            raw = linux.read_memory(notif.pid, address, length) if address else None
        except (OSError, OverflowError, ValueError):
            raw = None
        out.append(
            None if raw is None else raw.split(b"\0", 1)[0].decode(errors="backslashreplace")
        )
    try:
        still = linux.seccomp_notif_id_valid(listener, notif.id)
    except OSError:
        still = False
    return out if still else []


#: Roles one process has in turn (the starter becomes the master, the container stage 2).
_SAME_PROCESS = {
    "starter": ("starter", "master"),
    "master": ("starter", "master"),
    "container": ("container", "stage2"),
    "stage2": ("container", "stage2"),
}


def attribute(
    events: list[dict[str, Any]],
    target: dict[str, Any] | None,
    role_of: Callable[[int], str | None] | None = None,
) -> tuple[str | None, str | None]:
    """(process role, hook) of a notifying thread, from the ledger so far. ``role_of``: the
    kit process a kernel pid is (the supervisor's senders, known by SO_PASSCRED), which
    tells processes apart whose namespace-local tids coincide (the master in the sandbox's
    pid namespace, the container side in its own). Else the role of the latest event of
    that thread (or of its process's threads). The hook: the innermost one open on that
    thread, else the hooks open in its process."""
    if target is None:
        return None, None
    tids = set(target["ns_threads"]) | {target["ns_tid"], target["ns_tgid"]}
    # Only well-formed events: the ledger socket is open to engine code, which could send
    # anything (a list for a tid, a dict for a hook).
    events = [
        e
        for e in events
        if type(e.get("tid")) is int
        and isinstance(e.get("role"), str)
        and isinstance(e.get("hook", ""), str)
    ]
    known = role_of(target["tgid"]) if role_of is not None and "tgid" in target else None
    if known is not None:
        family = _SAME_PROCESS.get(known, (known,))
        events = [e for e in events if e["role"] in family]
    own = [e for e in events if e.get("tid") == target["ns_tid"]]
    process = [e for e in events if e.get("tid") in tids]
    if not process:
        parent = target.get("parent")
        role, hook = attribute(events, parent, role_of) if parent else (None, None)
        return role, f"{hook or 'no hook'} (in a child process)" if role else None
    role = (own or process)[-1].get("role")
    if role == "stage2" and any(e.get("kind") == "stage2_exec" for e in events):
        return "stage2", "the payload (after exec)"
    hook = _open_hook(own) or _open_hook([e for e in process if e.get("role") == role])
    return role, hook


def _open_hook(events: list[dict[str, Any]]) -> str | None:
    """The hooks entered and not yet left in ``events`` (one thread's, or a process's),
    innermost first, joined with " or "."""
    open_hooks: list[tuple[Any, str | None]] = []
    for e in events:
        kind, hook = e.get("kind"), e.get("hook")
        if kind == "hook_enter":
            open_hooks.append((e.get("tid"), hook))
        elif kind in ("hook_return", "hook_raise"):
            for i in range(len(open_hooks) - 1, -1, -1):
                if open_hooks[i] == (e.get("tid"), hook):
                    del open_hooks[i]
                    break
    if not open_hooks:
        return None
    names = list(dict.fromkeys(str(h) for _, h in reversed(open_hooks)))
    return " or ".join(names)


def resolve_rpc_methods(events: list[dict[str, Any]]) -> None:
    """Name the RPC method of each refusal made in the RPC server: its call is recorded
    (``rpc_call``) when it returns, after the refusal."""
    for i, e in enumerate(events):
        if e.get("kind") == "syscall_refused" and e.get("process_role") == "rpc":
            e["hook"] = e.get("hook") or rpc_method(e.get("target"), events[i + 1 :])


def rpc_method(target: Any, later: list[dict[str, Any]]) -> str | None:
    """``RPC method NAME``: the first call in ``later`` (events recorded after a refusal
    made by ``target``) that a thread of the refusal's process returned from; None if none
    did."""
    threads = target.get("ns_threads") if isinstance(target, dict) else None
    tids = {t for t in threads if type(t) is int} if isinstance(threads, list) else set()
    for c in later:
        if (
            c.get("kind") == "rpc_call"
            and type(c.get("tid")) is int
            and (not tids or c["tid"] in tids)
        ):
            return f"RPC method {c.get('method')}"
    return None


def describe_refusal(event: dict[str, Any]) -> str:
    """``sethostname in create_container (master): 'box'``: a refusal as the suite names
    it (with its string arguments, when they could be read)."""
    where = event.get("hook") or "no hook"
    strings = event.get("strings") or []
    shown = f": {', '.join(repr(s) for s in strings)}" if strings else ""
    return (
        f"{event.get('syscall')} in {where} "
        f"({event.get('process_role') or 'unknown process'}){shown}"
    )
