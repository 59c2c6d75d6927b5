"""The starter: runs one engine lifecycle in real processes (``SPEC.md`` §2, §3, §5).

Process tree of one run (the supervisor forks the starter; see :mod:`kit.run.supervisor`)::

    starter (becomes the master)
      ├─ stage 1: config, init_config, prepare_config → Common + StarterConfig as JSON
      └─ container process (clone: new pid [+ user] namespace; pid 1 there)
           ├─ RPC server (clone with CLONE_FS): serves the engine's RPC methods
           └─ stage 2: config, init_config, start_process → exec of the payload

The master runs ``create_container``, the start waiter (→ ``post_start_process``) and
``monitor_container`` in threads, then ``cleanup_container`` once.

The master and the container talk in one-byte control messages
(:class:`kit.starter.control.Control`).
"""
