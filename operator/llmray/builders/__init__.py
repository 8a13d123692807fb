"""Pure builders: spec -> Kubernetes manifests, and the decisions that converge them.

No I/O anywhere in this package: every function here is unit-tested with plain inputs.
"""
