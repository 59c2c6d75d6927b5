"""The ledger: what the kernel said at every hook, recorded, attributed and checked."""
