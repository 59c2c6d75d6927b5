"""The reference engines: a minimal host-rootfs engine and a bind-rootfs example."""
