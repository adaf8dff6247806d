"""Tokenizers: the checkpoint's tokenizer.json, or a deterministic built-in stand-in.

Both expose the same small surface (`Tokenizer`): the special ids, `encode` (no special
tokens added), `decode`, and a `name` for reports. The stand-in keeps the real special-token
ids and realistic text token counts, so sequence lengths and the prompt layout match the
real model when no checkpoint is available.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

from llm_perf_opt.errors import UserError

IMAGE_TOKEN = "<image>"
DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."

# The official tokenizer's special tokens and their ids (tokenizer_config.json).
SPECIAL_TOKENS: dict[str, int] = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜▁pad▁｜>": 2,
    IMAGE_TOKEN: 128815,
    "<|ref|>": 128816,
    "<|/ref|>": 128817,
    "<|det|>": 128818,
    "<|/det|>": 128819,
    "<|grounding|>": 128820,
    "<td>": 128821,
    "</td>": 128822,
    "<tr>": 128823,
    "</tr>": 128824,
    "<|User|>": 128825,
    "<|Assistant|>": 128826,
}
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
IMAGE_ID = SPECIAL_TOKENS[IMAGE_TOKEN]

# Ordinary text tokens of the real vocabulary live in [3, 128000); 128000+ are
# placeholders and the special tokens above.
TEXT_ID_START = 3
TEXT_ID_END = 128000


class Tokenizer(Protocol):
    """What the rest of the project needs from a tokenizer."""

    name: str
    bos_id: int
    eos_id: int
    pad_id: int
    image_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# Longest first, so no special token is matched as a prefix of a longer one.
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))
# Pre-tokenisation roughly like byte-level BPE: a newline alone, words with their leading
# space, digit groups of up to 3, punctuation runs, other whitespace.
_PIECE_RE = re.compile(r"\n| ?[^\W\d_]+| ?\d{1,3}| ?[^\w\s]+|\s+", re.UNICODE)
# Common English words are one BPE token and rarer long ones split into several; keeping
# pieces up to 7 characters whole and cutting longer ones into 5-character chunks gives
# about 4 characters per token on English prose, like the real tokenizer.
_WHOLE_PIECE_MAX = 7
_CHUNK = 5
# Punctuation rarely merges beyond pairs ("**", "##" and the like).
_PUNCT_CHUNK = 2
_PUNCT_RE = re.compile(r" ?[^\w\s]+")


def _split_piece(piece: str) -> list[str]:
    """Cut one pre-tokenised piece into the chunks that count as tokens."""
    if _PUNCT_RE.fullmatch(piece):
        size = _PUNCT_CHUNK
    elif len(piece) <= _WHOLE_PIECE_MAX:
        return [piece]
    else:
        size = _CHUNK
    return [piece[i : i + size] for i in range(0, len(piece), size)]


def _stable_id(piece: str) -> int:
    """Map a text piece to an ordinary-text id with SHA-256 (Python's hash() is salted)."""
    digest = int.from_bytes(hashlib.sha256(piece.encode("utf-8")).digest()[:8], "big")
    return TEXT_ID_START + digest % (TEXT_ID_END - TEXT_ID_START)


class BuiltinTokenizer:
    """Deterministic stand-in: real special ids, BPE-like text splitting, hashed text ids."""

    name = "builtin"
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID
    image_id = IMAGE_ID

    def __init__(self) -> None:
        self._special_by_id = {i: t for t, i in SPECIAL_TOKENS.items()}

    def _encode_text(self, text: str) -> list[int]:
        return [_stable_id(p) for piece in _PIECE_RE.findall(text) for p in _split_piece(piece)]

    def encode(self, text: str) -> list[int]:
        """Special tokens in the text become their single ids; no BOS/EOS is added."""
        ids: list[int] = []
        start = 0
        for match in _SPECIAL_RE.finditer(text):
            ids += self._encode_text(text[start : match.start()])
            ids.append(SPECIAL_TOKENS[match.group()])
            start = match.end()
        ids += self._encode_text(text[start:])
        return ids

    def decode(self, ids: list[int]) -> str:
        """Special ids as their text; other ids as a readable `<t{id}>` placeholder."""
        return "".join(self._special_by_id.get(i, f"<t{i}>") for i in ids)


class HFTokenizer:
    """A checkpoint's tokenizer.json loaded through transformers' fast tokenizer."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID
    image_id = IMAGE_ID

    def __init__(self, tokenizer_file: Path) -> None:
        # Imported here: transformers takes seconds to import and only checkpoints need it.
        from transformers import PreTrainedTokenizerFast

        self.name = f"checkpoint:{tokenizer_file.name}"
        try:
            self._tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
        except Exception as exc:  # tokenizers raises its own (non-OSError) types for bad JSON
            raise UserError(
                f"tokenizer: cannot load {tokenizer_file}: {' '.join(str(exc).split())}"
            ) from None
        self._check_special_ids(tokenizer_file)

    def _check_special_ids(self, tokenizer_file: Path) -> None:
        """Every special token must exist with the official id, or prompts would be built wrong."""
        for token, expected in SPECIAL_TOKENS.items():
            found = self._tok.convert_tokens_to_ids(token)
            if found != expected:
                raise UserError(
                    f"tokenizer: {tokenizer_file} maps {token} to {found}, expected {expected} "
                    "(not a DeepSeek-OCR tokenizer?)"
                )

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(checkpoint_dir: Path | None) -> Tokenizer:
    """The checkpoint's tokenizer.json when the folder has one, else the built-in stand-in."""
    if checkpoint_dir is not None:
        tokenizer_file = Path(checkpoint_dir) / "tokenizer.json"
        if tokenizer_file.is_file():
            return HFTokenizer(tokenizer_file)
    return BuiltinTokenizer()


def build_input_ids(tokenizer: Tokenizer, prompt: str, image_tokens: int) -> list[int]:
    """[BOS] + encode(text before <image>) + [image_id] * image_tokens + encode(text after).

    The prompt is stripped first (the "plain" template); no EOS is appended.
    """
    text = prompt.strip()
    count = text.count(IMAGE_TOKEN)
    if count != 1:
        raise UserError(f"prompt must contain exactly one {IMAGE_TOKEN}, found {count}: {text!r}")
    if image_tokens < 1:
        raise UserError(f"image_tokens must be positive, got {image_tokens}")
    before, after = text.split(IMAGE_TOKEN)
    image = [tokenizer.image_id] * image_tokens
    return [tokenizer.bos_id, *tokenizer.encode(before), *image, *tokenizer.encode(after)]
