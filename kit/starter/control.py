"""The master's and the container's control messages: one byte, some with a message."""

from enum import StrEnum


class Control(StrEnum):
    """A control byte on the master socket. EOF after :attr:`GO` without
    :attr:`STAGE2_FAILED` means the payload was exec'd (the container's end is close-on-exec).
    """

    MAPS_WRITTEN = "M"  # master -> container: uid maps written, go on with namespace setup
    READY = "R"  # container -> master: namespaces ready, RPC server started
    SETUP_FAILED = "E"  # container -> master: setup failed; the message follows up to EOF
    GO = "G"  # master -> container: create_container done, start stage 2
    ABORT = "A"  # master -> container: give up
    STAGE2_FAILED = "F"  # stage 2 -> master: failed; the message follows up to EOF
