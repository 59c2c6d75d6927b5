"""What engine authors import in their own tests: the in-process RPC transport."""
