"""The conformance tests, one module per hook or concern."""

# Every test is named as the sentence it checks, declares the requirement IDs it decides
# (conformance.requirements) and the scenarios whose runs it reads, and is parametrized with the
# flows it applies to. Test bodies only choose runs and call the generic checks of
# conformance.checks, which take the requirement from the verify fixture (never written again
# in the body); what is expected lives in conformance.expectations.
