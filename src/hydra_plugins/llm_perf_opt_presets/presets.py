"""Puts a checkout's top-level `conf/` on llm-perf-opt's Hydra search path, when there is one.

The packaged groups (`pkg://llm_perf_opt.conf`) are the defaults every install has; the
project's own experiment presets (nightly sweeps, a throughput sweep, a GPU preset) live in the
repository's `conf/experiment/` and are picked with `+experiment=<name>`. The directory is looked
up relative to the working directory, so the presets appear when running from a checkout and
nothing changes elsewhere (a fixed `hydra.searchpath` entry would warn on every run without it).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

import llm_perf_opt.conf

PRESETS_DIR = Path("conf")


def is_packaged_conf(path: str) -> bool:
    """The packaged groups as the compose API (`pkg://`) or `hydra.main` (a directory) names them."""
    if path == "pkg://llm_perf_opt.conf":
        return True
    return not path.startswith("pkg://") and Path(path.removeprefix("file://")).resolve() == PACKAGED_DIR


PACKAGED_DIR = Path(llm_perf_opt.conf.__file__).parent.resolve()


class ProjectPresets(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Only for llm-perf-opt's own config, never for another Hydra app in the same environment.
        if not any(is_packaged_conf(element.path) for element in search_path.get_path()):
            return
        if PRESETS_DIR.is_dir():
            search_path.append(provider="llm-perf-opt-presets", path=f"file://{PRESETS_DIR.resolve()}")
