"""The kit's mutation apparatus, run from a checkout: the mutant zoo and its kill matrix."""
