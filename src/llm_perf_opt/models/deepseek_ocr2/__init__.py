"""DeepSeek-OCR-2 as the harness's second model, run through transformers' own classes
(`transformers.models.deepseek_ocr2`: SAM encoder, Qwen2-style vision encoder with learnt
queries, DeepSeek MoE text model).

    config.py      typed options: architecture (the release's sizes), resolution modes
    stages.py      the stage names, defined once
    build.py       the model on the meta device, seeded dummy weights
    checkpoint.py  a local checkpoint: config.json read as data, safetensors only
    views.py       preprocessing with transformers' image processor, prompt ids
    fast.py        model.impl=fast: blocked SAM attention, in-place SAM GELU, one-token experts
    meta.py        the stand-ins that let transformers' code run on the meta device
    session.py     DeepSeekOCR2Session: stages opened from forward hooks and around each step
    analytic/      counting.py: the generic stage listener (analytic.counted) plus largest tensors;
                   model.py: the analytic model the harness reads (typed stage costs, footprint),
                   counted on a session loaded on the meta device
"""
