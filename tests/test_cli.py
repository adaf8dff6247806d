"""What the CLI does before Hydra: quoting paths, expanding sweeps, checking the output folder."""

from pathlib import Path

import pytest

from llm_perf_opt.cli import check_creatable, job_overrides, quote_paths
from llm_perf_opt.errors import UserError


def test_quote_paths_leaves_sweeps_and_quoted_values_alone():
    kept = ["image=a.png,b.png", "image='x y.png'", "mode=base", "image=/plain/page.png"]
    assert quote_paths(kept) == kept
    assert quote_paths(["image=/d/página 1.png"]) == ["image='/d/página 1.png'"]
    assert quote_paths(["image=/d/it's 文档.png"]) == ["image='/d/it\\'s 文档.png'"]


def test_job_overrides_expand_sweeps_only_in_a_multirun():
    assert job_overrides(False, ["mode=tiny,base"]) == [["mode=tiny,base"]]
    assert job_overrides(True, ["mode=tiny,base", "dtype=float32"]) == [
        ["mode=tiny", "dtype=float32"],
        ["mode=base", "dtype=float32"],
    ]
    assert len(job_overrides(True, ["mode=tiny,base", "max_new_tokens=2,4,8"])) == 6


def test_unreadable_overrides_are_one_line():
    with pytest.raises(UserError, match="cannot read the overrides"):
        job_overrides(False, ["mode=(unclosed"])


def test_check_creatable(tmp_path):
    check_creatable(tmp_path / "new" / "deeper")  # nothing in the way
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_creatable(tmp_path / "file" / "run")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_check_creatable_tries_the_nearest_existing_folder():
    # /proc exists and passes os.access even for root, but takes no new folder.
    with pytest.raises(UserError, match="cannot be created in /proc"):
        check_creatable(Path("/proc/nope/run"))


def test_the_probe_leaves_nothing_behind(tmp_path):
    check_creatable(tmp_path / "run")
    check_creatable(tmp_path)
    assert list(tmp_path.iterdir()) == []
