"""Housekeeping: old `.tmp-*` dirs (killed runs) and `.corrupt-*` quarantine dirs are found with
their sizes and ages and removed; young temp dirs and published artifacts are never touched;
`instructflow gc` lists them and `--remove` deletes them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from instructflow import housekeeping
from instructflow.cli import main
from instructflow.housekeeping import Leftover

HOUR = 3600.0
NOW = time.time()


def make_dir(path: Path, files: dict[str, int], age_s: float) -> Path:
    """A dir holding files of the given sizes, it and everything in it last changed age_s ago."""
    for rel, size in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(b"x" * size)
    path.mkdir(parents=True, exist_ok=True)
    stamp = NOW - age_s
    for p in sorted(path.rglob("*"), reverse=True) + [path]:  # children before their dirs
        os.utime(p, (stamp, stamp))
    return path


@pytest.fixture
def tree(tmp_path) -> dict[str, Path]:
    # Ages are set from the test's own start: the CLI measures them against the real clock,
    # and collection may be many minutes before this test runs.
    global NOW
    NOW = time.time()
    home, cache = tmp_path / "home", tmp_path / "cache"
    art = home / "artifacts"
    return {
        "home": home,
        "cache": cache,
        # Leftovers.
        "old_tmp": make_dir(art / "validate" / ".tmp-old", {"a": 100, "sub/b": 50}, 30 * HOUR),
        "corrupt": make_dir(art / "train" / ".corrupt-abc-123", {"x": 7}, 1 * HOUR),
        "cache_tmp": make_dir(cache / "builtin" / ".tmp-pre", {"w": 1000}, 48 * HOUR),
        "encoder_tmp": make_dir(cache / "encoders" / ".tmp-zip", {"z": 3}, 25 * HOUR),
        # Not leftovers.
        "young_tmp": make_dir(art / "validate" / ".tmp-young", {"a": 10}, 2 * HOUR),
        "artifact": make_dir(art / "validate" / "d1g3st", {"clean.jsonl": 9}, 90 * HOUR),
        "bundle": make_dir(cache / "builtin" / "tiny-key", {"model": 9}, 90 * HOUR),
        "deep_tmp": make_dir(art / "validate" / "d1g3st" / "nested" / ".tmp-deep", {}, 90 * HOUR),
    }


def found_paths(found: list[Leftover]) -> set[Path]:
    return {item.path for item in found}


def test_old_tmp_and_corrupt_dirs_are_listed_with_size_and_age(tree):
    found = housekeeping.leftovers(tree["home"], tree["cache"], now=NOW)
    by_path = {item.path: item for item in found}
    assert set(by_path) == {tree[k] for k in ("old_tmp", "corrupt", "cache_tmp", "encoder_tmp")}
    assert [item.path for item in found] == sorted(by_path)
    assert by_path[tree["old_tmp"]].bytes == 150
    assert by_path[tree["corrupt"]].bytes == 7
    assert by_path[tree["cache_tmp"]].bytes == 1000
    assert by_path[tree["old_tmp"]].age_s == pytest.approx(30 * HOUR, abs=1)
    assert by_path[tree["corrupt"]].age_s == pytest.approx(1 * HOUR, abs=1)
    assert "interrupted run" in by_path[tree["old_tmp"]].reason
    assert "corrupt" in by_path[tree["corrupt"]].reason


def test_a_tmp_dir_with_a_recent_file_inside_is_kept(tree):
    # An old dir whose writer is still adding files belongs to a live run.
    fresh = tree["old_tmp"] / "sub" / "new"
    fresh.write_bytes(b"y")
    os.utime(fresh, (NOW - 60, NOW - 60))
    found = housekeeping.leftovers(tree["home"], tree["cache"], now=NOW)
    assert tree["old_tmp"] not in found_paths(found)


def test_older_than_decides_which_tmp_dirs_count(tree):
    everything = housekeeping.leftovers(tree["home"], tree["cache"], older_than_s=0, now=NOW)
    assert tree["young_tmp"] in found_paths(everything)
    strict = housekeeping.leftovers(tree["home"], tree["cache"], older_than_s=40 * HOUR, now=NOW)
    # The corrupt dir counts at any age.
    assert found_paths(strict) == {tree["corrupt"], tree["cache_tmp"]}


def test_remove_deletes_only_the_leftovers_and_counts_the_bytes(tree):
    found = housekeeping.leftovers(tree["home"], tree["cache"], now=NOW)
    assert housekeeping.remove(found) == 150 + 7 + 1000 + 3
    assert not any(item.path.exists() for item in found)
    for kept in ("young_tmp", "artifact", "bundle", "deep_tmp"):
        assert tree[kept].is_dir(), kept
    assert housekeeping.remove(found) == 0  # already gone: nothing freed, no error


def test_remove_refuses_a_dir_that_is_not_a_leftover(tree):
    with pytest.raises(ValueError, match="not a .tmp-"):
        housekeeping.remove([Leftover(tree["artifact"], 9, 0.0, "no")])
    assert tree["artifact"].is_dir()


def test_the_cache_root_defaults_to_the_per_user_cache(tree, monkeypatch):
    monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tree["cache"]))
    assert tree["cache_tmp"] in found_paths(housekeeping.leftovers(tree["home"], now=NOW))


def test_an_empty_or_missing_workspace_has_no_leftovers(tmp_path):
    assert housekeeping.leftovers(tmp_path / "none", tmp_path / "nocache") == []


@pytest.fixture
def cli_env(tree, monkeypatch) -> dict[str, Path]:
    # main() points INSTRUCTFLOW_HOME at --home; monkeypatch restores both afterwards.
    monkeypatch.setenv("INSTRUCTFLOW_HOME", str(tree["home"]))
    monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tree["cache"]))
    return tree


def test_gc_lists_the_leftovers_and_removes_nothing(cli_env, capsys):
    assert main(["--home", str(cli_env["home"]), "gc"]) == 0
    out = capsys.readouterr().out
    for name in (".tmp-old", ".corrupt-abc-123", ".tmp-pre", ".tmp-zip"):
        assert name in out
    assert ".tmp-young" not in out and "d1g3st" not in out
    assert "4 leftover(s), 1.1 KiB (1160 bytes)" in out
    assert "30.0 h" in out and "unpublished temp dir" in out
    assert cli_env["old_tmp"].is_dir()


def test_gc_remove_deletes_them_and_prints_what_was_freed(cli_env, capsys):
    assert main(["--home", str(cli_env["home"]), "gc", "--remove"]) == 0
    assert "removed 4 leftover(s), freed 1.1 KiB (1160 bytes)" in capsys.readouterr().out
    assert not cli_env["old_tmp"].exists() and not cli_env["corrupt"].exists()
    assert cli_env["young_tmp"].is_dir()
    assert main(["--home", str(cli_env["home"]), "gc"]) == 0
    assert "no leftovers" in capsys.readouterr().out


def test_gc_older_than_counts_young_tmp_dirs_too(cli_env, capsys):
    assert main(["--home", str(cli_env["home"]), "gc", "--older-than", "1"]) == 0
    assert ".tmp-young" in capsys.readouterr().out


@pytest.mark.parametrize("hours", ["-1", "nan", "soon"])
def test_gc_refuses_a_bad_older_than(cli_env, capsys, hours):
    with pytest.raises(SystemExit) as info:
        main(["--home", str(cli_env["home"]), "gc", "--older-than", hours])
    assert info.value.code == 2
    assert "expected hours >= 0" in capsys.readouterr().err


def test_a_run_removes_old_temp_dirs_and_keeps_young_ones_and_quarantines(home):
    import os
    import time

    from flows.run import run_finetune

    stage = home / "artifacts" / "download"
    old, young, corrupt = stage / ".tmp-old", stage / ".tmp-young", stage / ".corrupt-x-1"
    for d in (old, young, corrupt):
        d.mkdir(parents=True)
        (d / "f").write_bytes(b"x" * 10)
    two_days_ago = time.time() - 2 * 86400
    for p in (old / "f", old):
        os.utime(p, (two_days_ago, two_days_ago))
    run_finetune(None, ["data.demo_rows=20"], until="download")
    assert not old.exists() and young.exists() and corrupt.exists()
