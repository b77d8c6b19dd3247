"""The `fhir-bridge` command: help lists what exists, and every subcommand explains itself."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from fhir_bridge.cli import cli


def _all_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((prefix + name, command))
        if isinstance(command, click.Group):
            found += _all_commands(command, prefix + name + " ")
    return found


def test_every_subcommand_has_help_text() -> None:
    runner = CliRunner()
    for path, command in _all_commands(cli):
        assert command.help, f"`fhir-bridge {path}` has no help text"
        result = runner.invoke(cli, [*path.split(), "--help"])
        assert result.exit_code == 0, (path, result.output)


def test_help_lists_the_subcommands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in cli.commands:
        assert name in result.output


def test_db_upgrade_is_idempotent_and_reports_revision(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"FHIR_BRIDGE_INSTANCE_PATH": str(tmp_path / "inst")}
    first = runner.invoke(cli, ["db", "upgrade"], env=env)
    second = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "database at revision" in second.output
    current = runner.invoke(cli, ["db", "current"], env=env)
    assert "up to date" in current.output


def test_bad_setting_stops_the_command_with_its_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["db", "current"], env={"FHIR_BRIDGE_PORT": "nope"})
    assert result.exit_code != 0
    assert "FHIR_BRIDGE_PORT" in result.output


def test_keys_rotate_and_list(tmp_path: Path, keys_dir: Path) -> None:
    runner = CliRunner()
    env = {"FHIR_BRIDGE_KEYS_DIR": str(keys_dir), "FHIR_BRIDGE_INSTANCE_PATH": str(tmp_path / "i")}
    rotated = runner.invoke(cli, ["keys", "rotate", "--lead", "0", "--grace", "600"], env=env)
    assert rotated.exit_code == 0, rotated.output
    listed = runner.invoke(cli, ["keys", "list"], env=env)
    assert "signing" in listed.output and "retiring" in listed.output
