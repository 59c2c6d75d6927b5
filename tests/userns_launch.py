"""Run a command as root of a new user namespace that root maps ``0 0 COUNT``.

``python tests/userns_launch.py COUNT -- ARGV...``: a forked child unshares a user
namespace, this process (root in its own) writes the child's uid and gid maps
(``0 0 COUNT``, one line each; a multi-range map needs a privileged writer), and the child,
uid 0 there, execs ARGV. Exits with ARGV's exit status. Used to launch the kit inside a
non-initial user namespace (rootless containers, userns-remap, LXC) where the namespace is
"the host" by identity (SPEC §4) whatever its map says.
"""

from __future__ import annotations

import os
import sys

from kit.system import linux


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    count = int(argv[0])
    command = argv[2:]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # single-threaded: unshare(CLONE_NEWUSER) is allowed here
        code = 127
        try:
            os.close(ready_r)
            os.close(go_w)
            linux.unshare(linux.ns_flags(["user"]))
            os.write(ready_w, b"u")
            os.close(ready_w)
            if os.read(go_r, 1) != b"g":
                os._exit(126)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            os.execvp(command[0], command)
        except BaseException as exc:
            print(f"userns_launch: {exc}", file=sys.stderr)
        os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) != b"u":
        os.waitpid(pid, 0)
        return 125
    linux.write_id_maps(pid, [(0, 0, count)], [(0, 0, count)], deny_setgroups=False)
    os.write(go_w, b"g")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
