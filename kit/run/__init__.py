"""Running one lifecycle: launcher, zygote, supervisor, host sandbox and diff."""
