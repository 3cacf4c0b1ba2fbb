from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from verity.dataplane.envoy import (
    REDACTED,
    EnvoyOptions,
    LineScrubber,
    die_with_parent,
    envoy_command,
    restart_delay,
    scrub_config,
)
from verity.dataplane.envoybinary import envoy_binary
from verity.dataplane.keys import WorkloadKey

KEY_PEM = WorkloadKey.generate().private_key_pem().decode()
TOKEN = "vrtd_0123456789abcdefghijKLMN"


def options(**overrides: object) -> EnvoyOptions:
    fields: dict[str, object] = {
        "bootstrap": Path("/run/verity/envoy.json"),
        "admin_port": 9901,
        "binary": Path("/opt/envoy"),
    }
    fields.update(overrides)
    return EnvoyOptions(**fields)  # type: ignore[arg-type]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_command_runs_the_real_binary_with_sidecar_flags() -> None:
    command = envoy_command(options(concurrency=2, log_level="info", drain_time_s=7))
    assert command[0] == "/opt/envoy"
    assert flag(command, "-c") == "/run/verity/envoy.json"
    assert flag(command, "--concurrency") == "2"
    assert flag(command, "--log-level") == "info"
    assert flag(command, "--drain-time-s") == "7"
    assert "--disable-hot-restart" in command
    assert "--base-id" not in command


def test_command_with_a_base_id() -> None:
    command = envoy_command(options(base_id=42, extra_args=("--component-log-level", "rbac:debug")))
    assert flag(command, "--base-id") == "42"
    assert "--disable-hot-restart" not in command
    assert command[-2:] == ["--component-log-level", "rbac:debug"]


def test_default_binary_is_the_real_envoy_not_the_python_shim() -> None:
    binary = Path(envoy_command(options(binary=None))[0])
    assert binary == envoy_binary()
    with binary.open("rb") as handle:
        assert handle.read(4) == b"\x7fELF"


@pytest.mark.parametrize(
    ("crashes", "delay"), [(0, 0.1), (1, 0.1), (2, 0.2), (3, 0.4), (8, 12.8), (9, 25.6), (20, 30)]
)
def test_restart_backoff_doubles_and_is_capped(crashes: int, delay: float) -> None:
    assert restart_delay(crashes, 0.1, 30.0) == pytest.approx(delay)


def test_die_with_parent_is_prepared_before_the_fork() -> None:
    # Calling it here would arm PDEATHSIG on the test runner itself; only check its shape.
    assert callable(die_with_parent())


class TestLineScrubber:
    def test_structured_lines(self) -> None:
        scrubber = LineScrubber()
        assert scrubber.feed("warning\tconfig\tgRPC config rejected\n") == (
            logging.WARNING,
            "config",
            "gRPC config rejected",
        )
        assert scrubber.feed("  continued detail\n") == (
            logging.WARNING,
            "config",
            "  continued detail",
        )

    def test_multi_line_key_is_dropped_whole(self) -> None:
        scrubber = LineScrubber()
        lines = ["error\tsecret\tbad secret:", *KEY_PEM.splitlines(), "error\tsecret\tafter"]
        out = [scrubber.feed(line) for line in lines]
        messages = [item[2] for item in out if item is not None]
        joined = "\n".join(messages)
        assert "PRIVATE KEY" not in joined
        assert KEY_PEM.splitlines()[1][:20] not in joined
        assert messages[0] == "bad secret:"
        assert messages[-1] == "after"

    def test_single_line_key_and_token(self) -> None:
        scrubber = LineScrubber()
        escaped = KEY_PEM.replace("\n", "\\n")
        item = scrubber.feed(f"info\tmain\tkey {escaped} authorization: Bearer {TOKEN}")
        assert item is not None
        assert "PRIVATE KEY" not in item[2] and TOKEN not in item[2]


def test_scrub_config_redacts_secrets_and_the_token() -> None:
    dump: dict[str, Any] = {
        "configs": [
            {
                "bootstrap": {
                    "dynamic_resources": {
                        "ads_config": {
                            "grpc_services": [
                                {
                                    "initial_metadata": [
                                        {"key": "authorization", "value": "Bearer opaque"}
                                    ]
                                }
                            ]
                        }
                    }
                }
            },
            {
                "dynamic_active_secrets": [
                    {
                        "secret": {
                            "tls_certificate": {
                                "certificate_chain": {"inline_bytes": "LS0tLS1CRUdJTiBD"},
                                "private_key": {"inline_bytes": "W3JlZGFjdGVkXQ=="},
                            }
                        }
                    }
                ]
            },
            {"note": f"leaked {KEY_PEM}"},
        ]
    }
    scrubbed = scrub_config(dump)
    text = str(scrubbed)
    assert "opaque" not in text and "PRIVATE KEY" not in text
    tls = scrubbed["configs"][1]["dynamic_active_secrets"][0]["secret"]["tls_certificate"]
    assert tls["private_key"] == REDACTED
    assert tls["certificate_chain"] == {"inline_bytes": "LS0tLS1CRUdJTiBD"}
    assert dump["configs"][2]["note"].startswith("leaked -----BEGIN")  # the input is untouched
