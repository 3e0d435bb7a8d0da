"""ruclip-index search / similar / classify / dupes through CliRunner, and search once as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, SEARCH_PER_CLASS
from fixture_images import FIXTURE_CLASSES

from ruclip_search.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def cls_of(path: str) -> str:
    return Path(path).stem.rsplit(" ", 1)[0]


@pytest.fixture
def in_default(tmp_path: Path, search_index, monkeypatch) -> Path:
    """cwd with ./indexes/<one index> (a copy of the session index), so --index can be left out."""
    shutil.copytree(search_index[0], tmp_path / "indexes" / "photos")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_search_every_class_json(search_index) -> None:
    for cls in FIXTURE_CLASSES:
        r = run(
            "search", cls, "--index", str(search_index[0]), "-k", str(SEARCH_PER_CLASS), "--json", "--device", "cpu"
        )
        assert r.exit_code == 0, r.output
        hits = json.loads(r.output)
        assert [cls_of(h["path"]) for h in hits] == [cls] * SEARCH_PER_CLASS
        assert all({"path", "score", "id"} <= set(h) for h in hits)


def test_search_human_output_default_index(in_default: Path) -> None:
    r = run("search", "синий круг", "-k", "12", "--offset", "1")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 12
    ranks = [line.split()[0] for line in lines]
    assert ranks == [str(i) for i in range(2, 14)]
    assert len({line.index("/") for line in lines}) == 1  # paths aligned
    assert all(cls_of(line.split("  ", 2)[-1].strip()) == "синий круг" for line in lines[:3])


def test_search_filters_minus_image(search_index, tmp_path: Path) -> None:
    idx = str(search_index[0])
    r = run("search", "зелёный квадрат", "--index", idx, "--format", "PNG", "--from", "2021-01-01", "--json")
    assert r.exit_code == 0 and json.loads(r.output) == []  # PNGs have no date
    r = run("search", "зелёный квадрат", "--index", idx, "--to", "2021-01-31", "--under",
            str(search_index[0].parent / "photos" / "b"), "--json", "-k", "3")  # fmt: skip
    hits = json.loads(r.output)
    assert len(hits) == 3 and all("/photos/b/" in h["path"] and h["taken_at"] <= "2021-01-31T23" for h in hits)
    # --minus: the whole ranking against the documented formula is in tests/test_promises.py
    from fixture_images import draw

    draw("жёлтый треугольник", 123, 64).save(tmp_path / "q.png")
    r = run("search", "--image", str(tmp_path / "q.png"), "--index", idx, "--json", "-k", "4")
    assert r.exit_code == 0, r.output
    assert [cls_of(h["path"]) for h in json.loads(r.output)] == ["жёлтый треугольник"] * 4
    r = run("search", "кот", "--index", idx, "--from", "вчера")
    assert r.exit_code != 0 and "YYYY-MM-DD" in r.output


def test_similar_classify_dupes(search_index) -> None:
    idx = str(search_index[0])
    photo = search_index[1][5]
    r = run("similar", photo["path"], "--index", idx, "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)
    assert photo["path"] not in {h["path"] for h in hits} and {cls_of(h["path"]) for h in hits} == {photo["cls"]}
    r = run("classify", *FIXTURE_CLASSES, "--index", idx, "--json")
    assert r.exit_code == 0, r.output
    assert all(cls_of(row["path"]) == row["label"] for row in json.loads(r.output))
    r = run("dupes", "--index", idx, "--threshold", "0.9995", "--json")
    assert r.exit_code == 0 and json.loads(r.output) == []
    r = run("dupes", "--index", idx, "--threshold", "-1")
    assert r.exit_code == 0 and r.output.startswith("group 1 (48 photos)")


def test_errors_are_one_line(tmp_path: Path, search_index, monkeypatch) -> None:
    idx = str(search_index[0])
    cases = [
        (["search", "   ", "--index", idx], "empty"),
        (["search", "кот", "--index", str(tmp_path / "none")], "No index at"),
        (["similar", str(tmp_path / "missing.jpg"), "--index", idx], "No such image file"),
    ]
    monkeypatch.chdir(tmp_path)
    cases.append((["search", "кот"], "No index found under ./indexes"))
    for args, text in cases:
        r = run(*args)
        assert r.exit_code != 0, args
        assert text in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_long_query_warns_but_works(search_index) -> None:
    r = CliRunner().invoke(main, ["search", "красный круг " * 60, "--index", str(search_index[0]), "-k", "2"])
    assert r.exit_code == 0
    assert "warning: the query is longer" in r.output
    assert all(cls_of(line.split("  ", 2)[-1].strip()) == "красный круг" for line in r.output.splitlines()[1:])


def test_real_subprocess(search_index) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ruclip_search.cli", "search", "жёлтый квадрат", "--index", str(search_index[0])]
    out = subprocess.run([*cmd, "-k", "4", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [cls_of(h["path"]) for h in json.loads(out.stdout)] == ["жёлтый квадрат"] * 4
    bad = subprocess.run([*cmd[:4], "", "--index", str(search_index[0])], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "empty" in bad.stderr


def test_default_k_and_filter_errors_name_their_option(search_index) -> None:
    from ruclip_search import defaults

    idx = str(search_index[0])
    r = run("search", "синий круг", "--index", idx, "--json")
    assert r.exit_code == 0 and len(json.loads(r.output)) == defaults.K == 20
    for args, option in ((["--to", "2021-13-01"], "--to"), (["--min-score", "2"], "--min-score"),
                         (["--format", "no such"], "--format")):  # fmt: skip
        r = run("search", "кот", "--index", idx, *args)
        assert r.exit_code == 2 and f"'{option}'" in r.output and "Traceback" not in r.output, r.output


def test_similar_min_score(search_index) -> None:
    idx = str(search_index[0])
    photo = search_index[1][5]["path"]
    full = json.loads(run("similar", photo, "--index", idx, "-k", "10", "--json").output)
    cut = full[2]["score"]
    r = run("similar", photo, "--index", idx, "-k", "10", "--json", "--min-score", str(cut))
    assert r.exit_code == 0 and [h["id"] for h in json.loads(r.output)] == [h["id"] for h in full[:3]]
