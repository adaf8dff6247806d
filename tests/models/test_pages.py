"""models.pages: the pages of a batch (`images=` and `batch_size=`)."""

from __future__ import annotations

import pytest
from PIL import Image

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.pages import batch_pages, list_pages


@pytest.fixture
def pages(tmp_path):
    for name in ("b.png", "a.jpg", "c.png"):
        Image.new("RGB", (32, 32), "white").save(tmp_path / name)
    return tmp_path


def test_a_directory_gives_its_images_in_name_order(pages):
    assert [p.name for p in list_pages(str(pages))] == ["a.jpg", "b.png", "c.png"]


def test_a_glob_a_list_and_a_file(pages):
    assert [p.name for p in list_pages(str(pages / "*.png"))] == ["b.png", "c.png"]
    assert [p.name for p in list_pages([str(pages / "c.png"), str(pages / "a.jpg")])] == ["c.png", "a.jpg"]
    assert list_pages(str(pages / "b.png")) == [pages / "b.png"]


def test_a_batch_takes_the_first_pages_and_repeats_them_when_short(pages):
    assert [p.name for p in batch_pages(str(pages), None, 2)] == ["a.jpg", "b.png"]
    assert [p.name for p in batch_pages(str(pages), None, 5)] == ["a.jpg", "b.png", "c.png", "a.jpg", "b.png"]
    assert batch_pages(None, None, 3) == (None, None, None)
    assert batch_pages(None, str(pages / "b.png"), 2) == (pages / "b.png",) * 2


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: str(d / "empty"), "holds no image"),
        (lambda d: str(d / "mixed"), "notes.txt is not an image file"),
        (lambda d: str(d / "*.tiff"), "no file matches"),
        (lambda d: [], "the list is empty"),
    ],
)
def test_bad_pages_are_one_line(tmp_path, make, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "mixed" / "page.png")
    (tmp_path / "mixed" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=fragment) as error:
        list_pages(make(tmp_path))
    assert "\n" not in str(error.value)
