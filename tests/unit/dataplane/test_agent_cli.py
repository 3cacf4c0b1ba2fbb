"""`verity dataplane run`: every input is checked before anything starts, and a bad one is one
clear line naming the flag (and the field), exit status 2, without quoting the token."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from verity.cli.dataplane import UsageError, build_config, dataplane_app
from verity.dataplane.agent import RenewalPolicy

TOKEN = "plain-cli-token-5e2a90c1"
GOOD_YAML = """\
apiVersion: verity.dev/v1alpha1
kind: Dataplane
metadata: {name: web-1, namespace: shop}
spec:
  service: web
  serviceAccount: web
  address: 127.0.0.1
  inbound: [{port: 8080, appPort: 3000}]
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # `run` configures JSON logging on the runner's stderr; put the root logger back.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    from tests.unit.dataplane.test_cpclient import serving_tls

    paths = {
        "dataplane": tmp_path / "dp.yaml",
        "token": tmp_path / "token",
        "ca": tmp_path / "cp-ca.pem",
    }
    paths["dataplane"].write_text(GOOD_YAML)
    paths["token"].write_text(TOKEN + "\n")
    paths["ca"].write_bytes(serving_tls("cp.test").ca_pem)
    return paths


def config_args(files: dict[str, Path], tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "dataplane_file": files["dataplane"],
        "token_file": files["token"],
        "cp_address": "cp.test:5678",
        "ca_cert": files["ca"],
        "cp_server_name": None,
        "admin_port": 9901,
        "ready_port": None,
        "concurrency": 1,
        "work_dir": tmp_path / "work",
        "key_file": None,
        "drain_time": 5,
        "envoy_log_level": "warn",
        "renew_fraction": 1 / 3,
    }
    arguments.update(overrides)
    return arguments


def test_a_good_command_line_builds_the_config(files: dict[str, Path], tmp_path: Path) -> None:
    config, token = build_config(**config_args(files, tmp_path, key_file=tmp_path / "k.pem"))
    assert token == TOKEN
    assert config.node_id == "shop/web-1"
    assert config.dataplane_yaml == GOOD_YAML
    assert config.control_plane.grpc_target == "cp.test:5678"
    assert config.effective_ready_port == 9902
    assert config.renewal == RenewalPolicy()
    assert config.key_file == tmp_path / "k.pem"
    assert config.work_dir == tmp_path / "work" and not config.remove_work_dir
    assert TOKEN not in repr(config)


def test_a_fast_renewal_fraction_is_accepted(files: dict[str, Path], tmp_path: Path) -> None:
    config, _ = build_config(**config_args(files, tmp_path, renew_fraction=0.99))
    assert config.renewal.remaining_fraction == 0.99


def test_default_work_dir_is_temporary(files: dict[str, Path], tmp_path: Path) -> None:
    config, _ = build_config(**config_args(files, tmp_path, work_dir=None))
    try:
        assert config.remove_work_dir and config.work_dir.is_dir()
    finally:
        config.work_dir.rmdir()


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (GOOD_YAML.replace("port: 8080", "port: 70000"), "spec.inbound[0].port"),
        (GOOD_YAML.replace("  service: web\n", ""), "spec.service"),
        ("kind: Dataplane\nspec: [unclosed", "line 2 column 16: invalid YAML"),
        ("apiVersion: verity.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\n", "found Mesh"),
        (GOOD_YAML + "---\n" + GOOD_YAML.replace("web-1", "web-2"), "expected one Dataplane"),
        ("", "found nothing"),
    ],
)
def test_bad_dataplane_files_name_the_problem(
    files: dict[str, Path], tmp_path: Path, yaml_text: str, expected: str
) -> None:
    files["dataplane"].write_text(yaml_text)
    with pytest.raises(UsageError) as caught:
        build_config(**config_args(files, tmp_path))
    message = str(caught.value)
    assert message.startswith(f"--dataplane-file {files['dataplane']}")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"cp_address": "cp.test:http"}, "--cp-address"),
        ({"cp_address": "::1:5678"}, "--cp-address"),
        ({"admin_port": 0}, "--admin-port"),
        ({"ready_port": 9901}, "--ready-port"),
        ({"admin_port": 65535}, "--ready-port"),
        ({"concurrency": 0}, "--concurrency"),
        ({"drain_time": -1}, "--drain-time"),
        ({"renew_fraction": 1.5}, "--renew-fraction"),
        ({"key_file": Path("/nonexistent-dir/key.pem")}, "--key-file"),
        ({"cp_server_name": "two words"}, "--cp-address"),
    ],
)
def test_bad_flags_are_named(
    files: dict[str, Path], tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    with pytest.raises(UsageError, match=expected):
        build_config(**config_args(files, tmp_path, **overrides))


def test_unreadable_or_bad_files(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--token-file .*No such file"):
        build_config(**config_args(files, tmp_path, token_file=tmp_path / "missing"))
    files["ca"].write_text("not a certificate")
    with pytest.raises(UsageError, match=r"--ca-cert .*no PEM certificate"):
        build_config(**config_args(files, tmp_path))


@pytest.mark.parametrize("content", ["", "   \n", TOKEN + " extra", TOKEN + "\nsecond line"])
def test_bad_tokens_are_refused_without_quoting_them(
    files: dict[str, Path], tmp_path: Path, content: str
) -> None:
    files["token"].write_text(content)
    with pytest.raises(UsageError, match="--token-file") as caught:
        build_config(**config_args(files, tmp_path))
    assert TOKEN not in str(caught.value)


def test_work_dir_open_to_others_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "open"
    work.mkdir()
    os.chmod(work, 0o755)  # noqa: S103 - the unsafe mode under test
    with pytest.raises(UsageError, match=r"--work-dir .*0700"):
        build_config(**config_args(files, tmp_path, work_dir=work))


# ---------------------------------------------------------------------------------------------
# Through the command line


def invoke(*args: str) -> Any:
    return CliRunner().invoke(dataplane_app, ["run", *args])


def cli_args(files: dict[str, Path], tmp_path: Path) -> list[str]:
    return [
        "--dataplane-file",
        str(files["dataplane"]),
        "--token-file",
        str(files["token"]),
        "--cp-address",
        "127.0.0.1:5678",
        "--ca-cert",
        str(files["ca"]),
        "--work-dir",
        str(tmp_path / "work"),
    ]


def test_bad_yaml_is_one_clear_line_and_exit_2(files: dict[str, Path], tmp_path: Path) -> None:
    files["dataplane"].write_text(GOOD_YAML.replace("address: 127.0.0.1", "address: 999.1.1.1"))
    result = invoke(*cli_args(files, tmp_path))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "spec.address" in errors[0] and str(files["dataplane"]) in errors[0]
    assert TOKEN not in result.output + result.stderr


def test_bad_log_level(files: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(*cli_args(files, tmp_path), "--log-level", "loud")
    assert result.exit_code == 2 and "--log-level" in result.stderr


def test_missing_required_flag() -> None:
    result = invoke("--token-file", "t")
    assert result.exit_code == 2
    assert "--dataplane-file" in result.stderr


def test_help_lists_the_flags_but_not_the_test_knob() -> None:
    result = CliRunner().invoke(dataplane_app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in (
        "--dataplane-file",
        "--token-file",
        "--cp-address",
        "--ca-cert",
        "--cp-server-name",
        "--admin-port",
        "--ready-port",
        "--concurrency",
        "--work-dir",
        "--key-file",
        "--log-level",
        "--drain-time",
    ):
        assert flag in result.output
    assert "--renew-fraction" not in result.output
