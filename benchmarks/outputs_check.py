"""Check that DeepSeek-OCR's outputs stay bit-identical across a refactor.

    python benchmarks/outputs_check.py --save before.safetensors   # on the old code
    python benchmarks/outputs_check.py --check before.safetensors  # on the new code: exit 1 on any difference

Tiny model, dummy weights, the bundled page, fp32 and bf16, modes base and gundam: the image
embeddings, the prefill logits and the greedy tokens of 8 new tokens, through the session users
know (`llm_perf_opt.runners.dsocr_session.DeepSeekOCRSession`).
"""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import load_file, save_file

from llm_perf_opt.config import load
from llm_perf_opt.models.interface import SessionOptions
from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

MAX_NEW_TOKENS = 8


def outputs() -> dict[str, torch.Tensor]:
    out = {}
    for mode in ("base", "gundam"):
        cfg = load(["model=deepseek_ocr_tiny", f"mode={mode}"]).model
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{mode}.{str(dtype).removeprefix('torch.')}"
            session = DeepSeekOCRSession(cfg, SessionOptions(torch.device("cpu"), dtype))
            session.load()
            request = session.prepare(None, DEFAULT_PROMPT)
            session.fit_dummy_weights(request)
            with torch.inference_mode():
                embeds = session.encode_images(request)
                cache = session.model.new_cache(request.prompt_tokens + MAX_NEW_TOKENS)
                logits = session.model.prefill(request.input_ids, embeds, cache)
            tokens = session.generate(session.prepare(None, DEFAULT_PROMPT), MAX_NEW_TOKENS).ids
            out[f"{key}.embeddings"] = embeds.float().contiguous()
            out[f"{key}.prefill_logits"] = logits.float().contiguous()
            out[f"{key}.tokens"] = tokens.cpu().contiguous()
            print(
                f"{key}: embeddings {tuple(embeds.shape)}, logits {tuple(logits.shape)}, tokens {tokens.tolist()}"
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="PATH")
    group.add_argument("--check", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same reduction order in both runs
    now = outputs()
    if args.save:
        save_file(now, args.save)
        print(f"saved {len(now)} tensors to {args.save}")
        return 0
    before = load_file(args.check)
    bad = [
        k
        for k in sorted(before.keys() | now.keys())
        if k not in before
        or k not in now
        or before[k].dtype != now[k].dtype
        or not torch.equal(before[k], now[k])
    ]
    for k in bad:
        print(f"DIFFERS: {k}")
    print(f"{'FAIL' if bad else 'PASS'}: {len(before) - len(bad)} of {len(before)} tensors bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
