"""The requirement catalogue: every rule of ``SPEC.md`` §2–§8 and §11 with a stable ID."""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("MUST", "SHOULD", "MAY")  # as in RFC 2119
# Who can break a rule: the engine (its hooks, RPC methods or StarterConfig can) or the kit (only
# its own starter, RPC server or ledger can, whatever the engine does). The engine's verdict
# counts engine requirements only; in an engine's run the kit's are a self-check of the harness
# on that machine (conformance.render).
ENGINE, KIT = "engine", "kit"
SUBJECTS = (ENGINE, KIT)

#: Groups in catalogue order: (key, title).
GROUPS: tuple[tuple[str, str], ...] = (
    ("order", "Lifecycle order and counts (every hook)"),
    ("state", "State crossing from stage 1 (config, init_config, prepare_config)"),
    ("stage1", "Stage 1: config, init_config, prepare_config"),
    (
        "master",
        "Master: create_container, post_start_process, monitor_container, cleanup_container",
    ),
    ("rpc", "RPC server and RPC calls"),
    ("stage2", "Stage 2 (start_process) and the payload"),
    ("namespaces", "Namespaces and StarterConfig"),
    ("signals", "Signals and exit code (monitor_container)"),
    ("errors", "Error paths"),
    ("cleanup", "Cleanup (cleanup_container)"),
    ("join", "Join-only runs"),
    ("ledger", "The ledger"),
    ("host", "The host: nothing a run changes outlives it (the host diff)"),
)


@dataclass(frozen=True)
class Requirement:
    """One rule: a sentence that a check can decide, its level, the section of ``SPEC.md`` it
    comes from and the group (hook or concern) it is listed under.

    Tests declare the IDs they check (``@requirement("ORDER-001")``); the report has one
    result per requirement and flow. ``unchecked`` says why no test of this suite can decide
    the rule (printed in the catalogue and the report), so nothing is silently counted as
    passed."""

    id: str
    level: str
    text: str
    section: str
    group: str
    unchecked: str | None = None
    subject: str = ENGINE

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"{self.id}: unknown level {self.level!r}")
        if self.subject not in SUBJECTS:
            raise ValueError(
                f"{self.id}: unknown subject {self.subject!r} (known: {', '.join(SUBJECTS)})"
            )
        if self.group not in dict(GROUPS):
            raise ValueError(f"{self.id}: unknown group {self.group!r}")

    def headline(self) -> str:
        """``ORDER-001 [MUST] SPEC §2 rule 1: …`` — the first line of a failure message."""
        return f"{self.id} [{self.level}] SPEC {self.section}: {self.text}"


def _r(
    id: str,
    level: str,
    section: str,
    group: str,
    text: str,
    unchecked: str | None = None,
    subject: str = ENGINE,
) -> Requirement:
    return Requirement(id, level, text, section, group, unchecked, subject)


# A rule is the kit's when no engine code can break it: the starter alone orders the processes,
# creates the namespaces, drops privilege in the unprivileged flows (where nothing can regain
# it), frames RPC and writes the ledger. A rule the engine can break through a hook, an RPC
# method, its StarterConfig or a hook it calls itself (the kit records those calls too) is the
# engine's, even when the kit could break it as well.


_ENTRIES = (
    # --- §2 order ----------------------------------------------------------------------------
    _r(
        "ORDER-001",
        "MUST",
        "§2 rule 1",
        "order",
        "Each process (stage 1, master, RPC server, stage 2) calls config then init_config, "
        "each exactly once, before any other hook of that process.",
    ),
    _r(
        "ORDER-002",
        "MUST",
        "§2 rule 1",
        "order",
        "init_config's privileged_stage1 flag is true only in stage 1 of the suid and hybrid "
        "flows.",
        subject=KIT,
    ),
    _r(
        "ORDER-003",
        "MUST",
        "§2 rule 2",
        "order",
        "prepare_config runs exactly once per run, in stage 1.",
    ),
    _r(
        "ORDER-004",
        "MUST",
        "§2 rule 2",
        "order",
        "prepare_config returns before any container namespace exists.",
        subject=KIT,
    ),
    _r(
        "ORDER-005",
        "MUST",
        "§2 rule 4",
        "order",
        "create_container, the start waiter (post_start_process) and monitor_container start "
        "only after the container's namespaces are ready.",
        subject=KIT,
    ),
    _r(
        "ORDER-006",
        "MUST",
        "§2 rule 4",
        "order",
        "create_container, the start waiter (post_start_process) and monitor_container run "
        "concurrently, each in its own thread of the master.",
        subject=KIT,
    ),
    _r(
        "ORDER-007",
        "MUST",
        "§2 rule 5",
        "order",
        "start_process begins only after create_container returned and the RPC connection "
        "closed (the RPC server exited).",
        subject=KIT,
    ),
    _r(
        "ORDER-008",
        "MUST",
        "§2 rule 5",
        "order",
        "A create_container that blocks waiting for the container is reported as a hook "
        "timeout naming create_container.",
        subject=KIT,
    ),
    _r(
        "ORDER-009",
        "MUST",
        "§2 rule 6",
        "order",
        "post_start_process runs at most once, and only after the payload was exec'd.",
    ),
    _r(
        "ORDER-010",
        "MUST",
        "§2 rule 6",
        "order",
        "post_start_process does not run when stage 2 reported a failure.",
    ),
    _r(
        "ORDER-011",
        "MUST",
        "§2 rule 7",
        "order",
        "cleanup_container runs exactly once per master run, after every other master hook "
        "returned.",
    ),
    _r(
        "ORDER-012",
        "MUST",
        "§2 rule 7",
        "order",
        "cleanup_container does not run when stage 1 or the namespace setup failed.",
        subject=KIT,
    ),
    _r(
        "ORDER-013",
        "MUST",
        "§1, §2",
        "order",
        "In a successful run create_container, monitor_container and start_process each run "
        "exactly once.",
    ),
    _r(
        "ORDER-014",
        "MUST",
        "§1",
        "order",
        "Each hook runs in its own process: prepare_config in stage 1; create_container, "
        "post_start_process, monitor_container and cleanup_container in the master; "
        "start_process in stage 2; the RPC server runs no hook but config and init_config.",
    ),
    _r(
        "PID-001",
        "MUST",
        "§2 rule 9",
        "order",
        "The pid given to create_container, post_start_process and monitor_container is the "
        "container's pid as the master sees it.",
        subject=KIT,
    ),
    _r(
        "PID-002",
        "MUST",
        "§2 rule 9",
        "order",
        "With a new pid namespace, stage 2 sees itself as pid 1.",
        subject=KIT,
    ),
    # --- §2 rule 3, §1: state ------------------------------------------------------------------
    _r(
        "STATE-001",
        "MUST",
        "§1",
        "state",
        "config() returns a fresh, empty engine config in every process: the same JSON in "
        "stage 1, the master, the RPC server and stage 2; two calls share no mutable object "
        "at any depth.",
    ),
    _r(
        "STATE-002",
        "MUST",
        "§2 rule 3",
        "state",
        "Stage 1, the master, the RPC server and stage 2 are distinct processes, and stage 1 "
        "has exited before any later process runs a hook, so stage-1 globals cannot leak.",
        subject=KIT,
    ),
    _r(
        "STATE-003",
        "MUST",
        "§2 rule 3, §5",
        "state",
        "Stage 1 hands its result over as JSON: the starter records the StarterConfig it "
        "received before any container namespace exists.",
        subject=KIT,
    ),
    # --- §4 stage 1 --------------------------------------------------------------------------
    _r(
        "PRIV-STAGE1-001",
        "MUST",
        "§4",
        "stage1",
        "Stage 1 hooks run as uid 0 in the root flow and with r=e=s=U in every other flow.",
    ),
    _r(
        "PRIV-STAGE1-002",
        "MUST",
        "§4",
        "stage1",
        "Stage 1 hooks have full capabilities in the root flow and no capabilities at all in "
        "the suid and hybrid flows.",
    ),
    _r(
        "PRIV-STAGE1-003",
        "MUST",
        "§4",
        "stage1",
        "In the suid and hybrid flows, privilege escalation from stage 1 is impossible.",
        subject=KIT,
    ),
    _r(
        "PRIV-STAGE1-004",
        "MUST",
        "§4",
        "stage1",
        "In the userns and fakeroot flows, stage 1 has no host privilege.",
        subject=KIT,
    ),
    # --- §4 master -----------------------------------------------------------------------------
    _r(
        "PRIV-MASTER-001",
        "MUST",
        "§4",
        "master",
        "Master hooks run as uid 0 in the root flow; with r=e=U and saved uid 0 in the suid "
        "and hybrid flows; with a saved uid that maps to U in the userns flow.",
    ),
    _r(
        "PRIV-MASTER-002",
        "MUST",
        "§4",
        "master",
        "In the suid and hybrid flows the effective capabilities of every thread of the "
        "master are empty at every hook entry and again at return.",
    ),
    _r(
        "PRIV-MASTER-003",
        "MUST",
        "§4",
        "master",
        "Privilege escalation from the master is possible in the suid and hybrid flows (saved "
        "uid 0) and impossible in the userns flow.",
    ),
    _r(
        "PRIV-MASTER-004",
        "MUST",
        "§4",
        "master",
        "In the userns and fakeroot flows the master has no host privilege.",
        subject=KIT,
    ),
    # --- §4 RPC server, §6 RPC -------------------------------------------------------------------
    _r(
        "PRIV-RPC-001",
        "MUST",
        "§4",
        "rpc",
        "The RPC server runs as uid 0 in the root flow, with effective uid U in the suid flow, "
        "as the namespace's root in the fakeroot flow, and with an effective uid that maps to "
        "U in the hybrid flow.",
    ),
    _r(
        "PRIV-RPC-002",
        "MUST",
        "§4",
        "rpc",
        "In the suid and hybrid flows the RPC server has only CAP_SYS_ADMIN effective and a "
        "bounding set smaller than the master's.",
    ),
    _r(
        "PRIV-RPC-003",
        "MUST",
        "§4",
        "rpc",
        "In the userns and fakeroot flows the RPC server has no host privilege.",
        subject=KIT,
    ),
    _r(
        "PRIV-RPC-004",
        "MUST",
        "§4",
        "rpc",
        "An RPC method that raises capabilities does so on its own thread and restores them "
        "before it returns: every thread leaves the method with the whole credential it "
        "entered with (uids and gids r/e/s/fs, groups, the five capability sets, securebits, "
        "no_new_privs, seccomp mode).",
    ),
    _r(
        "RPC-001",
        "MUST",
        "§2, §6",
        "rpc",
        "Every RPC call is served by the RPC server while create_container runs, and is "
        "recorded; no copy of the RPC connection stays open once create_container returned "
        "(the RPC server exits when it closes, then stage 2 starts).",
    ),
    _r(
        "RPC-002",
        "MUST",
        "§6",
        "rpc",
        "An RPC request names \"<engine>.<method>\" of the engine under test.",
    ),
    _r(
        "RPC-003",
        "MUST",
        "§2, §6",
        "rpc",
        "The RPC server exits 0 when the client closes the connection.",
    ),
    _r(
        "RPC-004", "MUST", "§6", "rpc", "The RPC server handles one request at a time.", subject=KIT
    ),
    _r(
        "RPC-005",
        "MUST",
        "§6",
        "rpc",
        "RPC frames are length-prefixed JSON with a maximum size; no pickle, no eval.",
        subject=KIT,
    ),
    _r(
        "RPC-006",
        "MUST",
        "§6",
        "rpc",
        "An unknown method, a malformed frame or bad arguments get an error reply (errno and "
        "message survive) and the server keeps serving.",
        subject=KIT,
    ),
    _r(
        "RPC-007",
        "MAY",
        "§6",
        "rpc",
        "File descriptors may ride along with an RPC request (SCM_RIGHTS).",
        unchecked="a property of the kit's RPC transport, checked by the kit's own unit tests "
        "(tests/test_rpc*.py)",
        subject=KIT,
    ),
    # --- §4 stage 2 and payload -----------------------------------------------------------
    _r(
        "PRIV-STAGE2-001",
        "MUST",
        "§4",
        "stage2",
        "Stage 2 runs with r=e=s=the target uid (default 0) in the root flow, r=e=s=U in the "
        "suid flow (a target uid is ignored), ids that map to U in the userns flow, and uid 0 "
        "of the namespace mapping to U in the fakeroot and hybrid flows.",
    ),
    _r(
        "PRIV-STAGE2-002",
        "MUST",
        "§4",
        "stage2",
        "In the root and suid flows stage 2 has exactly the configured capabilities (none "
        "when none are configured).",
    ),
    _r("PRIV-STAGE2-003", "MUST", "§4", "stage2", "In the suid flow stage 2 has no_new_privs set."),
    _r(
        "PRIV-STAGE2-004",
        "MUST",
        "§4",
        "stage2",
        "In the userns, fakeroot and hybrid flows stage 2 has no host privilege.",
    ),
    _r(
        "PRIV-PAYLOAD-001",
        "MUST",
        "§4",
        "stage2",
        "The payload, after exec, has no host privilege in every flow but root.",
    ),
    _r(
        "PRIV-PAYLOAD-002",
        "MUST",
        "§4",
        "stage2",
        "The payload has no capability that stage 2 did not have permitted when start_process "
        "began: what is left in the bounding, inheritable or ambient set does not widen them "
        "at exec.",
    ),
    _r(
        "PRIV-PAYLOAD-003",
        "MUST",
        "§4",
        "stage2",
        "The payload runs with the credential that stage 2 had when start_process began, as "
        "exec derives it: start_process changes no credential before the exec (uids and gids, "
        "groups, no_new_privs, seccomp mode, securebits, and each capability set exactly as "
        "exec gives it: none wider, none narrower).",
    ),
    _r(
        "FD-001",
        "MUST",
        "§1, §5",
        "stage2",
        "The payload inherits no file descriptor but 0, 1, 2 and those the StarterConfig keeps "
        "(keep_file_descriptor).",
    ),
    # --- §4, §5 namespaces ---------------------------------------------------------------------
    _r(
        "NS-001",
        "MUST",
        "§4",
        "namespaces",
        "Stage 2 and the RPC server share all seven namespaces, on every thread of the RPC "
        "server at its hooks and around every method.",
    ),
    _r(
        "NS-002",
        "MUST",
        "§4",
        "namespaces",
        "Stage 2 and the RPC server share their root directory.",
    ),
    _r(
        "NS-003",
        "MUST",
        "§4",
        "namespaces",
        "The master shares none of the pid, net, uts, ipc and cgroup namespaces created for "
        "the container.",
    ),
    _r(
        "NS-004",
        "MUST",
        "§3, §4",
        "namespaces",
        "The master's user namespace is the host's in the root, suid and hybrid flows and the "
        "container's in the userns and fakeroot flows.",
        # The engine's too: a StarterConfig that asks for a user namespace in the root flow
        # puts the master in it (the starter accepts one there, as SPEC §5 rejects only suid).
    ),
    _r(
        "NS-005",
        "MUST",
        "§5",
        "namespaces",
        "Every namespace the StarterConfig asks to create is new for the container, and one "
        "given by path is joined (a path wins over creating).",
        subject=KIT,
    ),
    _r(
        "NS-006",
        "MUST",
        "§3",
        "namespaces",
        "The container's user namespace maps U to U in the userns flow and 0 to U in the "
        "fakeroot and hybrid flows, in its uid map (U's uid) and its gid map (U's gid).",
    ),
    _r(
        "NS-007",
        "MUST",
        "§3",
        "namespaces",
        "The container is in a new user namespace exactly in the userns, fakeroot and hybrid "
        "flows.",
    ),
    _r(
        "NS-008",
        "MUST",
        "§5",
        "namespaces",
        "A new mount namespace gets the configured propagation on / before anything is mounted.",
        subject=KIT,
    ),
    _r(
        "NS-009",
        "MUST",
        "§5",
        "namespaces",
        "Namespaces are entered in the order user, pid (in the starter, before the fork), then "
        "net, uts, ipc, cgroup, mount (on the container side).",
        subject=KIT,
    ),
    _r(
        "NS-010",
        "MUST",
        "§2, §4",
        "namespaces",
        "The run leaves the host's hostname alone: it is the same while the run lasts and "
        "after it as before (the container's is set in its own uts namespace).",
    ),
    _r(
        "NS-011",
        "MUST",
        "§2, §4",
        "namespaces",
        "While the run lasts, the host's mount namespace gets no mount it did not have before "
        "and no mount of it changes its options or propagation (the container's mounts are "
        "made in its own mount namespace).",
    ),
    _r(
        "NS-012",
        "MUST",
        "§3",
        "namespaces",
        "The container's user namespace maps no host id but U's uid and gid, and in the "
        "fakeroot and hybrid flows U's subordinate ids (/etc/subuid, /etc/subgid).",
    ),
    _r(
        "NS-013",
        "MUST",
        "§4, §5",
        "namespaces",
        "The payload runs in the namespaces stage 2 entered start_process with (those it "
        "shares with the RPC server): start_process creates and joins none of its own, the "
        "starter sets them all up, in the order of SPEC §5.",
    ),
    _r(
        "SC-001",
        "MUST",
        "§5",
        "namespaces",
        "An invalid StarterConfig (e.g. effective capabilities not a subset of permitted) is "
        "rejected before any namespace exists, with a message that names the setting.",
        subject=KIT,
    ),
    # --- §7, §2 rule 8 signals and exit ----------------------------------------------------------
    _r(
        "SIG-001",
        "MUST",
        "§7",
        "signals",
        "Every signal the master receives becomes an entry on the signals channel (and in the "
        "ledger).",
        subject=KIT,
    ),
    _r(
        "SIG-002",
        "MUST",
        "§7",
        "signals",
        "monitor_container forwards SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 to the container.",
    ),
    _r(
        "SIG-003", "MUST", "§7", "signals", "monitor_container returns the container's wait status."
    ),
    _r(
        "SIG-004",
        "MUST",
        "§7",
        "signals",
        "monitor_container reaps the container's pid before it returns, and no other child.",
    ),
    _r(
        "SIG-005",
        "MUST",
        "§7, §10",
        "signals",
        "The signals channel does not lose SIGCHLD: the container's exit reaches the master "
        "as a recorded SIGCHLD.",
    ),
    _r(
        "EXIT-001",
        "MUST",
        "§2 rule 8, §7",
        "signals",
        "The run's exit code equals the payload's exit code.",
    ),
    _r(
        "EXIT-002",
        "MUST",
        "§2 rule 8",
        "signals",
        "When the payload is killed by a signal, the run's exit code is 128 + the signal number.",
    ),
    _r(
        "EXIT-003",
        "MUST",
        "§2 rule 8",
        "signals",
        "The run's exit code is 255 when a fatal error occurred.",
        subject=KIT,
    ),
    # --- §2 error table --------------------------------------------------------------------------
    _r(
        "ERR-001",
        "MUST",
        "§2 error table",
        "errors",
        "When prepare_config raises, no further hook runs and the run exits 255.",
        subject=KIT,
    ),
    _r(
        "ERR-002",
        "MUST",
        "§2 error table",
        "errors",
        "When create_container raises, cleanup_container gets \"container creation failed: "
        "…\", stage 2 never starts and the run exits 255.",
        subject=KIT,
    ),
    _r(
        "ERR-003",
        "MUST",
        "§2 error table",
        "errors",
        "When start_process raises, stage 2 reports the failure, post_start_process does not "
        "run, cleanup_container runs with the container's status (exited 255) and the run "
        "exits 255.",
    ),
    _r(
        "ERR-004",
        "MUST",
        "§2 error table",
        "errors",
        "When post_start_process raises, cleanup_container runs with that error and the run "
        "exits 255.",
        subject=KIT,
    ),
    _r(
        "ERR-005",
        "MUST",
        "§2 error table",
        "errors",
        "When monitor_container raises, cleanup_container runs with that error and the run "
        "exits 255.",
        subject=KIT,
    ),
    _r(
        "ERR-006",
        "MUST",
        "§2 error table",
        "errors",
        "When cleanup_container raises, the error is reported and the exit code is unchanged.",
        subject=KIT,
    ),
    _r(
        "ERR-007",
        "MUST",
        "§2 error table",
        "errors",
        "A hook that does not return within its timeout gets the run's whole process tree "
        "killed, and the report names the hook.",
        subject=KIT,
    ),
    _r(
        "ERR-008",
        "MUST",
        "§2 rule 10",
        "errors",
        "A start_process that returns instead of exec'ing is a failure (\"stage 2 returned\").",
        subject=KIT,
    ),
    _r(
        "ERR-009",
        "MUST",
        "§2 rule 5, error table",
        "errors",
        "In a run that nothing asks to fail, no hook hangs: none runs into the hook timeout "
        "(create_container never waits for the container).",
    ),
    _r(
        "ERR-010",
        "MUST",
        "§2 error table",
        "errors",
        "In a run that nothing asks to fail, no hook ends its process: every hook returns or "
        "raises (start_process execs) and the master finishes the run.",
    ),
    _r(
        "ERR-011",
        "MUST",
        "§2 rule 10, error table",
        "errors",
        "In a run that nothing asks to fail, no hook raises and start_process does not "
        "return: the payload is exec'd.",
    ),
    _r(
        "ERR-012",
        "MUST",
        "§1, §2 rule 10",
        "errors",
        "start_process never returns, also when the payload cannot be exec'd (a path that "
        "does not exist): it raises or exits instead.",
    ),
    # --- cleanup ---------------------------------------------------------------------------------
    _r(
        "CLEAN-001",
        "MUST",
        "§1, §2",
        "cleanup",
        "After every run nothing is left behind: no process, no mount in the host mount "
        "namespace, no named network namespace, no file in the run's temporary directory.",
    ),
    _r(
        "CLEAN-002",
        "MUST",
        "§1",
        "cleanup",
        "cleanup_container tolerates partial setup: after a failed hook it returns without "
        "raising.",
    ),
    # --- §5 join-only ----------------------------------------------------------------------------
    _r(
        "JOIN-001",
        "MUST",
        "§5",
        "join",
        "A join-only run calls only config, init_config, prepare_config and start_process.",
    ),
    _r(
        "JOIN-002",
        "MUST",
        "§5",
        "join",
        "In a join-only run stage 2 is in the namespaces given by path.",
    ),
    # --- §8 ledger -------------------------------------------------------------------------------
    _r(
        "LEDGER-001",
        "MUST",
        "§8",
        "ledger",
        "Every run's ledger is valid against the versioned ledger schema.",
        subject=KIT,
    ),
    _r(
        "LEDGER-002",
        "MUST",
        "§8",
        "ledger",
        "Every hook entry is recorded with a privilege snapshot and is followed by its return "
        "or raise (start_process excepted: it execs).",
    ),
    _r(
        "LEDGER-003",
        "MUST",
        "§8, §11",
        "ledger",
        "Engine code never writes to the ledger: every datagram on the ledger socket is a "
        "well-formed event of the schema, sent by the kit process whose role and pid it names "
        "(the kernel names the sender).",
    ),
    # --- §11 the host (HOST-050, HOST-051 are reserved for the seccomp filter) -------------------
    _r(
        "HOST-001",
        "MUST",
        "§11",
        "host",
        "After a run the host's file system is as before: no path created, deleted, or changed "
        "in content, type, mode, owner or extended attributes (ACLs, file capabilities).",
    ),
    _r(
        "HOST-002",
        "MUST",
        "§11",
        "host",
        "After a run the host's mount table is as before: no mount added or removed, none with "
        "other options or another propagation.",
    ),
    _r(
        "HOST-003",
        "MUST",
        "§11",
        "host",
        "After a run the host's hostname and domainname are as before.",
    ),
    _r(
        "HOST-004",
        "MUST",
        "§11",
        "host",
        "After a run every writable sysctl has the value it had before: net.* of the host's "
        "network namespace, those of its ipc namespace (kernel.msg*, kernel.shm*, kernel.sem, "
        "fs.mqueue.*) and the machine's own (vm.*, fs.*, kernel.*…), which no sandbox holds a "
        "copy of.",
    ),
    _r(
        "HOST-005",
        "MUST",
        "§11",
        "host",
        "After a run the host's network links, addresses and routes are as before.",
    ),
    _r(
        "HOST-006",
        "MUST",
        "§11",
        "host",
        "After a run the host has the named network namespaces (/run/netns) it had before.",
    ),
    _r(
        "HOST-007",
        "MUST",
        "§11",
        "host",
        "After a run the host has the SysV IPC objects and POSIX message queues it had before, "
        "with the same owners and permissions.",
    ),
    _r(
        "HOST-008",
        "MUST",
        "§11",
        "host",
        "After a run the host has the processes it had before: none of the run's outlives it, "
        "none of the host's is killed or sent a signal, or changed (its resource limits, "
        "scheduling, OOM score adjustment or cgroups).",
    ),
    _r(
        "HOST-009",
        "MUST",
        "§11, §2, §4",
        "host",
        "While the run lasts the host's hostname, domainname and mount table do not change, not "
        "even for a moment (the suite looks after every batch of ledger events).",
    ),
    # --- §9, §11 the host: system calls refused by the kit's seccomp filter ----------------------
    _r(
        "HOST-050",
        "MUST",
        "§9, §11",
        "host",
        "In the fake backend no process of the run makes a privileged system call around the "
        "kit's system interface (the mount family, pivot_root, chroot, unshare, setns or a "
        "namespace-creating clone, sethostname, setdomainname, the set*id family, setgroups, "
        "capset, an ioctl that configures a network interface or route…): the kit refuses "
        "each with EPERM and records it, and none may be tried.",
    ),
    _r(
        "HOST-051",
        "MUST",
        "§11",
        "host",
        "No process of the run makes a host-global system call (setting the clock, loading or "
        "removing kernel modules, reboot, kexec, swapon/swapoff, acct…): the kit refuses each "
        "with EPERM and records it, and none may be tried.",
    ),
)

#: ID -> requirement. IDs are stable: never renumber; retire an entry instead.
CATALOGUE: dict[str, Requirement] = {}
for _entry in _ENTRIES:
    if _entry.id in CATALOGUE:
        raise ValueError(f"duplicate requirement ID {_entry.id}")
    CATALOGUE[_entry.id] = _entry


class UnknownRequirement(KeyError):
    pass


def get(req_id: str) -> Requirement:
    try:
        return CATALOGUE[req_id]
    except KeyError:
        raise UnknownRequirement(f"unknown requirement ID {req_id!r}") from None


def subject_of(req_id: str) -> str:
    """``engine`` or ``kit``; an ID the catalogue does not know (an old report) is the
    engine's, so that nothing is hidden from its verdict."""
    req = CATALOGUE.get(req_id)
    return req.subject if req is not None else ENGINE


def by_group() -> list[tuple[str, str, list[Requirement]]]:
    """(group key, title, requirements) in catalogue order."""
    return [
        (key, title, [r for r in CATALOGUE.values() if r.group == key]) for key, title in GROUPS
    ]
