"""A small real mesh for end-to-end tests (the demo's harness: real processes, real TLS)."""

from demo.localmesh import Mesh, Workload, call, running_mesh, wait_for

__all__ = ["Mesh", "Workload", "call", "running_mesh", "wait_for"]
