"""Every command's ``--help`` is complete, and ``fedhealth site audit`` reads at 100 columns."""

from __future__ import annotations

import inspect
import time

import click
import pytest
import typer
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.site.audit import append, audit_path, record_skipped_files

runner = CliRunner()


def commands() -> list[tuple[list[str], click.Command]]:
    """``(path, command)`` for the root, every group and every command."""
    out = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


COMMANDS = commands()


@pytest.mark.parametrize(
    ("path", "cmd"), COMMANDS, ids=[" ".join(p) or "fedhealth" for p, _ in COMMANDS]
)
def test_help_is_complete(path, cmd):
    help_text = inspect.cleandoc(cmd.help or "")
    assert help_text, f"`fedhealth {' '.join(path)}` has no description"
    # typer joins the lines of the first paragraph only: a later one would break mid-sentence
    assert all("\n" not in para for para in help_text.split("\n\n")[1:]), help_text
    for param in cmd.params:
        if param.name != "help":
            assert (param.help or "").strip(), f"`{' '.join(path)}`: {param.name} has no help"
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    rendered = " ".join(result.output.replace("│", " ").split())
    assert "(default: )" not in rendered and "()" not in rendered
    for param in cmd.params:  # every description is shown whole, brackets and all
        if param.name != "help":
            assert " ".join(param.help.replace("\\[", "[").split()) in rendered, param.help


def test_site_start_names_the_deploy_table_it_defaults_to():
    result = runner.invoke(app, ["site", "start", "--help"], env={"COLUMNS": "200"})
    assert result.output.count("(default: the profile's [deploy] table)") == 3


def test_audit_table_is_readable_at_100_columns(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text(
        f'[site]\nname = "st-olav"\nworkspace = "{tmp_path / "ws"}"\n'
        '[datasets.t]\nkind = "tabular"\npath = "t.csv"\n'
    )
    workspace = tmp_path / "ws" / "st-olav"
    base = {"site": "st-olav", "handler": "train", "message_type": "train", "round": 3,
            "experiment": "quickstart-breast-cancer", "mlflow_run": "0123456789abcdef"}  # fmt: skip
    timing = {"process_start_s": 0.46, "handler_s": 1.46, "import_s": 1.35, "load_s": 0.03}
    now = time.time()
    log = audit_path(workspace)
    append(log, {"ts": now, "event": "received", **base})
    sent = {"bytes": 4231, "sha256": "ab" * 32, "records": ["arrays", "metrics", "site"]}
    append(log, {"ts": now, "event": "sent", **base, **sent, "epsilon": 0.4321, "timing": timing})
    refusal = ("site 'st-olav' refuses round 4 of experiment 'quickstart': lifetime ε budget "
               "(`privacy.lifetime_epsilon_budget`) for dataset 'breast-cancer' is 20")  # fmt: skip
    append(log, {"ts": now, "event": "refused", **base, "rule": "lifetime_epsilon_budget",
                 "message": refusal, "timing": timing})  # fmt: skip
    record_skipped_files(workspace, "st-olav", "phantoms", [("img-003.dcm", "truncated")])
    result = runner.invoke(app, ["site", "audit", str(site)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"site st-olav: audit log {log}"  # a path is never broken
    assert max(len(line) for line in lines[1:]) <= 100
    text = "\n".join(lines)
    # Sentences stay sentences: several words per line, not one-word cells.
    for phrase in ("4231 B sha256 abababababababab", "lifetime_epsilon_budget: site",
                   "(arrays, metrics, site) ε=0.4321", "start 0.46, imports 1.35",
                   "img-003.dcm", "→ run 01234567"):  # fmt: skip
        assert phrase in text, phrase
    assert "1.92" in text  # the site time (process start + handler) stays in its column
    assert len(lines) < 30
