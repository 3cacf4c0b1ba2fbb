"""Helpers shared by the test suites (the same real-process harness the demo uses)."""

from demo.localmesh import REPO, ControlPlane, cli_env, free_port, running_control_plane

__all__ = ["REPO", "ControlPlane", "cli_env", "free_port", "running_control_plane"]
