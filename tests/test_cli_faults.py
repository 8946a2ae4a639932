"""The CLI refuses an output root it cannot write before Hydra creates anything (issue 11), with one
message naming the path and the fix; and stage folders get their figures from the report package."""
from __future__ import annotations

import pytest

from gravprobe import cli


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


def test_output_root_under_a_file_is_refused_up_front(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("GRAVPROBE_HOME", str(blocker / "home"))
    code, err = _cli(capsys, "generate", "data=pretrain", "data.n_systems=8")
    assert code == 2 and "Traceback" not in err
    assert f"cannot write run folders under the output root (home=) at {blocker / 'home'}" in err
    assert "set GRAVPROBE_HOME" in err
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_home_override_is_checked_too(capsys, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    code, err = _cli(capsys, "pretrain", f"home={blocker}/out")
    assert code == 2 and f"at {blocker}/out" in err


def test_writable_missing_root_is_not_created_by_the_check(tmp_path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="gravprobe.conf"):
        cfg = compose("config", overrides=[f"home={tmp_path}/a/b", "stage=generate"])
    assert cli._unwritable_home(cfg) == []
    assert list(tmp_path.iterdir()) == []
