"""ruclip-index build / info / reindex through click's CliRunner, and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import ROOT

from ruclip_search.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_every_command_has_help() -> None:
    assert main.help
    for name, command in main.commands.items():
        assert command.help, name
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "Usage" in result.output
        params = [p for p in command.params if isinstance(p, click.Option)]
        assert all(p.help for p in params), name
    assert invoke("--version").output.strip().endswith(__import__("ruclip_search").__version__)


def test_build_info_reindex(tmp_path: Path, photos: Path, tiny_model_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (photos / "broken.jpg").write_bytes(b"nope")
    result = invoke("build", str(photos), "--model", str(tiny_model_path), "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["added"], report["failed"]) == (12, 1)
    assert report["index"] == os.path.join("indexes", "photos")

    result = invoke("build", str(photos), "--workers", "0", "--quiet")  # the index's model is reused
    assert result.exit_code == 0 and result.output == ""

    info = json.loads(invoke("info", "--json", "--errors").output)
    assert info["images"] == 12 and info["errors"] == 1 and info["index_type"] == "flat"
    assert info["model"] == str(tiny_model_path) and info["recall_at_10"] == 1.0
    assert info["error_files"][0]["path"].endswith("broken.jpg")
    text = invoke("info", "--errors").output
    assert "broken.jpg: not an image" in text and "recall@10:  1.0" in text

    flat_hits = json.loads(invoke("search", "красный круг", "-k", "12", "--json", "--device", "cpu").output)
    result = invoke("reindex", "--type", "hnsw")
    assert result.exit_code == 0 and "hnsw index of 12 vectors" in result.output
    assert json.loads(invoke("info", "--json").output)["index_type"] == "hnsw"
    # the new index is the one searched, and on 12 vectors HNSW finds exactly what flat search found
    hnsw_hits = json.loads(invoke("search", "красный круг", "-k", "12", "--json", "--device", "cpu").output)
    assert [h["id"] for h in hnsw_hits] == [h["id"] for h in flat_hits] and len(flat_hits) == 12


def test_fatal_errors_are_one_line(tmp_path: Path, photos: Path, tiny_model_path: Path) -> None:
    index = str(tmp_path / "idx")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "missing"), "--index", index])
    assert result.exit_code == 1 and "No such folder" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["build", str(photos), "--index", index, "--model", str(tmp_path / "nomodel")])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    result = CliRunner().invoke(main, ["info", "--index", str(tmp_path / "none")])
    assert result.exit_code == 1 and "build one" in result.output


@pytest.mark.parametrize("workers", ["1"])
def test_real_subprocess(tmp_path: Path, photos: Path, tiny_model_path: Path, workers: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    index = tmp_path / "idx"
    cmd = [sys.executable, "-m", "ruclip_search.cli", "build", str(photos), "--index", str(index)]
    proc = subprocess.run(
        [*cmd, "--model", str(tiny_model_path), "--workers", workers, "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "12 added" in proc.stdout and "indexing: 12/12 images" in proc.stderr
    proc = subprocess.run(
        [*cmd, "--model", "ruclip-vit-base-patch32-224"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 1 and "--rebuild" in proc.stderr and "Traceback" not in proc.stderr


def test_commands_on_a_missing_index_create_nothing(tmp_path: Path, monkeypatch) -> None:
    """`reindex --index typo` created typo/.lock before failing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-an-index").mkdir()
    for args in (
        ["reindex", "--index", "typo"],
        ["reindex", "--index", "not-an-index"],
        ["reindex", "--index", "typo/deeper", "--type", "hnsw"],
        ["info", "--index", "typo"],
        ["dupes", "--index", "typo"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "No index at" in result.output and "Traceback" not in result.output, args
    assert os.listdir(tmp_path) == ["not-an-index"] and os.listdir(tmp_path / "not-an-index") == []
