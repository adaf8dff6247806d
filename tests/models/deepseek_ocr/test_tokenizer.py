"""Tokenizers and the prompt layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, models, pre_tokenizers

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.tokenizer import (
    DEFAULT_PROMPT,
    SPECIAL_TOKENS,
    TEXT_ID_END,
    BuiltinTokenizer,
    build_input_ids,
    load_tokenizer,
)

OFFICIAL = Path(__file__).resolve().parents[3].parent / "shared" / "official"

PROSE = (
    "The committee reviewed the proposed budget for the upcoming fiscal year and noted that "
    "operating expenses increased by 12.4 percent, driven primarily by higher energy costs and "
    "the expansion of the regional maintenance programme. Revenue from water services remained "
    "stable, while connection fees declined slightly as fewer new developments were approved."
)


# --- built-in stand-in ----------------------------------------------------------------


def test_builtin_special_ids() -> None:
    tok = load_tokenizer(None)
    assert tok.name == "builtin"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.image_id == 128815 == DeepSeekOCRConfig().image_token_id
    for token, token_id in SPECIAL_TOKENS.items():
        assert tok.encode(token) == [token_id]


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="official tokenizer files not available")
def test_special_ids_match_official_tokenizer_config() -> None:
    decoder = json.loads((OFFICIAL / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    official = {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    for token, token_id in SPECIAL_TOKENS.items():
        assert official[token] == token_id


def test_special_tokens_inside_text_are_single_ids() -> None:
    ids = BuiltinTokenizer().encode("Locate <|ref|>the table<|/ref|> in the image.")
    assert ids.count(128816) == 1 and ids.count(128817) == 1


def test_text_ids_avoid_special_range() -> None:
    ids = BuiltinTokenizer().encode(PROSE + "\n| a | b |\n**bold** 1234567")
    special = set(SPECIAL_TOKENS.values())
    assert all(3 <= i < TEXT_ID_END and i not in special for i in ids)


def test_realistic_text_token_count() -> None:
    ids = BuiltinTokenizer().encode(PROSE)
    chars_per_token = len(PROSE) / len(ids)
    assert 3.0 <= chars_per_token <= 5.0


def test_newline_is_its_own_token() -> None:
    tok = BuiltinTokenizer()
    assert tok.encode("a\nb") == tok.encode("a") + tok.encode("\n") + tok.encode("b")
    assert len(tok.encode("\n")) == 1


def test_deterministic_across_instances() -> None:
    assert BuiltinTokenizer().encode(PROSE) == BuiltinTokenizer().encode(PROSE)
    # Pinned, so a change of hash or splitting rules is noticed (Python's hash() is salted).
    assert BuiltinTokenizer().encode("Hello world") == [36963, 116410]
    ids = BuiltinTokenizer().encode(DEFAULT_PROMPT)
    assert BuiltinTokenizer().decode(ids) == BuiltinTokenizer().decode(ids)


def test_decode_shows_special_tokens() -> None:
    assert BuiltinTokenizer().decode([0, 128815, 128820]) == "<｜begin▁of▁sentence｜><image><|grounding|>"


# --- prompt layout --------------------------------------------------------------------


def test_build_input_ids_layout() -> None:
    tok = BuiltinTokenizer()
    ids = build_input_ids(tok, DEFAULT_PROMPT, 903)
    assert ids[0] == 0
    assert ids[1 : 1 + 903] == [128815] * 903
    assert ids.count(128815) == 903
    assert ids[1 + 903 :] == tok.encode("\n<|grounding|>Convert the document to markdown.")
    assert ids[-1] != 1  # no EOS


def test_text_before_image_comes_first_and_prompt_is_stripped() -> None:
    tok = BuiltinTokenizer()
    ids = build_input_ids(tok, "  Page one: <image>\nFree OCR.  \n", 5)
    before = tok.encode("Page one: ")
    assert ids == [0, *before, *[128815] * 5, *tok.encode("\nFree OCR.")]


@pytest.mark.parametrize("prompt", ["Free OCR.", "<image><image>\nFree OCR."])
def test_prompt_needs_exactly_one_image(prompt: str) -> None:
    with pytest.raises(UserError, match="exactly one <image>"):
        build_input_ids(BuiltinTokenizer(), prompt, 273)


def test_image_tokens_must_be_positive() -> None:
    with pytest.raises(UserError):
        build_input_ids(BuiltinTokenizer(), DEFAULT_PROMPT, 0)


# --- checkpoint tokenizer.json --------------------------------------------------------


def write_tokenizer(folder: Path, specials: dict[str, int]) -> None:
    """A tiny word-level tokenizer.json with the given special tokens at the given ids."""
    vocab = {**specials, "[UNK]": 3, "Convert": 4, "the": 5, "document": 6, "to": 7, "markdown.": 8}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(folder / "tokenizer.json"))


def test_checkpoint_tokenizer_loads(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, SPECIAL_TOKENS)
    tok = load_tokenizer(tmp_path)
    assert tok.name == "checkpoint:tokenizer.json"
    ids = build_input_ids(tok, DEFAULT_PROMPT, 3)
    assert ids == [0, 128815, 128815, 128815, 128820, 4, 5, 6, 7, 8]
    assert "<|grounding|>" in tok.decode(ids)


def test_checkpoint_tokenizer_with_wrong_special_ids_is_rejected(tmp_path: Path) -> None:
    wrong = {t: i for t, i in SPECIAL_TOKENS.items() if t != "<image>"} | {"<image>": 9}
    write_tokenizer(tmp_path, wrong)
    with pytest.raises(UserError, match="<image>"):
        load_tokenizer(tmp_path)


def test_broken_tokenizer_json_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_folder_without_tokenizer_json_uses_builtin(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path).name == "builtin"
