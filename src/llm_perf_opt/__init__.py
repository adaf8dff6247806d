"""llm-perf-opt: per-stage profiling and roofline analysis for DeepSeek-OCR."""

__version__ = "0.1.0"
