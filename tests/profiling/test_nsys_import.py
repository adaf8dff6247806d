"""Import of `nsys stats` CSV reports into the stage attribution tables.

The fixture (fixtures/nsys/dsocr_*.csv, times in ns) is a small run. Kernels by innermost
range, as instances x duration:

    sam           gemm 20 x 200 µs = 4.0 ms, flash_fwd 8 x 125 µs = 1.0 ms       -> 5.0 ms
    clip          gemm 12 x 125 µs = 1.5 ms, flash_fwd 2 x 250 µs = 0.5 ms       -> 2.0 ms
    projector     gemm 1 x 200 µs = 0.2 ms                                       -> 0.2 ms
    prefill       gemm 1 x 100 µs = 0.1 ms, elementwise 10 x 30 µs = 0.3 ms      -> 0.4 ms own
    prefill/attn  gemm 6 x 150 µs = 0.9 ms, flash_fwd 3 x 200 µs = 0.6 ms       -> 1.5 ms
    prefill/moe   gemm 3 x 100 + 6 x 150 µs = 1.2 ms, topk 3 x 100 µs = 0.3 ms  -> 1.5 ms
    decode (3x)   gemv 12 x 100 µs = 1.2 ms, splitkv 3 x 100 µs = 0.3 ms         -> 1.5 ms
    preprocess    no kernels
    outside       elementwise 2 x 50 µs = 0.1 ms (no range), fill 1 x 200 µs = 0.2 ms
                  (inside ":load_weights", not a stage range)

Total 5.0 + 2.0 + 0.2 + 0.4 + 1.5 + 1.5 + 1.5 + 0.3 = 12.4 ms. nvtx_kern_sum lists every kernel
under each enclosing range: prefill lists 16 gemm (1 + 6 + 9), 3 flash_fwd, 10 elementwise and
3 topk; ":run" encloses all stages. Stage ranges are written "llm_perf_opt:<name>".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS, STAGE_COLUMNS, UNATTRIBUTED
from llm_perf_opt.profiling.nsys_import import (
    PROJECTION_COLUMNS,
    load_gpu_projection,
    load_nsys_attribution,
    range_name,
    read_report,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nsys"
PREFIX = "dsocr"
STAGES = ("preprocess", "sam", "clip", "projector", "prefill", "decode")
GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas"


def kernel(prefix: str) -> str:
    """The fixture's one kernel name that starts with ``prefix``."""
    names = read_report(FIXTURES / f"{PREFIX}_cuda_gpu_kern_sum.csv", "cuda_gpu_kern_sum")["Name"]
    matches = [name for name in names if name.startswith(prefix)]
    assert len(matches) == 1, prefix
    return matches[0]


def copy_fixtures(tmp_path: Path, edit=lambda name, text: text) -> Path:
    """The fixture set copied into tmp_path, each file's text passed through ``edit``."""
    out = tmp_path / "nsys"
    out.mkdir()
    for path in FIXTURES.glob("*.csv"):
        (out / path.name).write_text(edit(path.name, path.read_text()))
    return out


@pytest.fixture(scope="module")
def attribution():
    return load_nsys_attribution(FIXTURES, STAGES)


def by_stage(table) -> dict:
    return {row["stage"]: row for row in table.to_dict("records")}


def test_stage_table_counts_nested_kernels_once(attribution):
    assert attribution.basis == "device"
    assert list(attribution.stages.columns) == list(STAGE_COLUMNS)
    # ":run" and ":load_weights" are not stage ranges; stages in run order, families after their stage.
    assert list(attribution.stages["stage"]) == [
        "preprocess",
        "sam",
        "clip",
        "projector",
        "prefill",
        "prefill/attn",
        "prefill/moe",
        "decode",
    ]
    expected = {
        # stage: (range_calls, range_ms from nvtx_sum, busy_ms inclusive, self_busy_ms)
        "preprocess": (1, 30.0, 0.0, 0.0),
        "sam": (1, 2.0, 5.0, 5.0),
        "clip": (1, 0.8, 2.0, 2.0),
        "projector": (1, 0.1, 0.2, 0.2),
        # inclusive 0.4 own + 1.5 attn + 1.5 moe = 3.4; own = 3.4 - 1.5 - 1.5 = 0.4
        "prefill": (1, 1.5, 3.4, 0.4),
        "prefill/attn": (3, 0.6, 1.5, 1.5),
        "prefill/moe": (3, 0.7, 1.5, 1.5),
        "decode": (3, 1.8, 1.5, 1.5),
    }
    rows = by_stage(attribution.stages)
    for stage, (calls, host, busy, own) in expected.items():
        row = rows[stage]
        assert row["range_calls"] == calls, stage
        assert row["range_ms"] == pytest.approx(host), stage
        assert row["device_ms"] == pytest.approx(busy), stage
        assert row["busy_ms"] == pytest.approx(busy), stage
        assert row["self_busy_ms"] == pytest.approx(own), stage
        assert row["share"] == pytest.approx(busy / 12.4), stage
    # nsys stats have no CPU-op times.
    assert attribution.stages["cpu_self_ms"].isna().all()


def test_totals_and_unattributed_time(attribution):
    assert attribution.total_busy_ms == pytest.approx(12.4)
    # 2 elementwise launches outside every range (0.1 ms) + fill inside the non-stage ":load_weights" (0.2 ms)
    assert attribution.unattributed_ms == pytest.approx(0.3)
    assert attribution.coverage == pytest.approx(12.1 / 12.4)
    # Own times add up to the attributed total: nothing counted twice.
    assert attribution.stages["self_busy_ms"].sum() + attribution.unattributed_ms == pytest.approx(12.4)


def test_kernel_table_credits_each_instance_to_its_innermost_range(attribution):
    kernels = attribution.kernels
    assert list(kernels.columns) == list(KERNEL_COLUMNS)
    flash, elementwise = kernel("void flash::flash_fwd_kernel"), kernel("void at::native::elementwise_kernel")
    topk, gemv = kernel("void at::native::sbtopk"), kernel("void gemv2T")
    splitkv, fill = kernel("void flash::flash_fwd_splitkv"), kernel("void at::native::vectorized_elementwise")
    got = [(r["stage"], r["name"], r["calls"], round(r["total_ms"], 9)) for r in kernels.to_dict("records")]
    assert got == [
        ("sam", GEMM, 20, 4.0),
        ("sam", flash, 8, 1.0),
        ("clip", GEMM, 12, 1.5),
        ("clip", flash, 2, 0.5),
        ("projector", GEMM, 1, 0.2),
        # prefill lists flash_fwd 3x and topk 3x, all inside its families: no own rows for them;
        # gemm: 16 listed - 6 (attn) - 9 (moe) = 1 own instance, 2.2 - 0.9 - 1.2 = 0.1 ms.
        ("prefill", elementwise, 10, 0.3),
        ("prefill", GEMM, 1, 0.1),
        ("prefill/attn", GEMM, 6, 0.9),
        ("prefill/attn", flash, 3, 0.6),
        ("prefill/moe", GEMM, 9, 1.2),
        ("prefill/moe", topk, 3, 0.3),
        ("decode", gemv, 12, 1.2),
        ("decode", splitkv, 3, 0.3),
        # elementwise: 12 in cuda_gpu_kern_sum - 10 in prefill = 2 instances, 0.4 - 0.3 = 0.1 ms
        (UNATTRIBUTED, fill, 1, 0.2),
        (UNATTRIBUTED, elementwise, 2, 0.1),
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("prefill", "prefill"),
        (":prefill", "prefill"),
        ("llm_perf_opt:prefill/attn", "prefill/attn"),
        (":llm_perf_opt:decode", "decode"),
        ("other_domain:prefill", None),
        (":run", None),
        ("prefill/attn/qkv", None),
        ("", None),
    ],
)
def test_range_names_with_or_without_domain(raw, expected):
    assert range_name(raw, STAGES) == expected


@pytest.mark.parametrize("prefix", ["", ":"])
def test_the_same_run_with_other_domain_spellings(tmp_path, attribution, prefix):
    edited = copy_fixtures(tmp_path, lambda _, text: text.replace("llm_perf_opt:", prefix))
    plain = load_nsys_attribution(edited, STAGES)
    assert plain.stages.equals(attribution.stages)
    assert plain.kernels.equals(attribution.kernels)


def test_ranges_of_another_domain_are_ignored(tmp_path):
    moved = copy_fixtures(tmp_path, lambda _, text: text.replace("llm_perf_opt:sam", "cudnn:sam"))
    a = load_nsys_attribution(moved, STAGES)
    assert "sam" not in set(a.stages["stage"])
    # sam's 5.0 ms join the 0.3 ms outside every stage range.
    assert a.unattributed_ms == pytest.approx(5.3)


def test_the_stage_list_is_an_argument():
    a = load_nsys_attribution(FIXTURES / PREFIX, stages=("sam", "clip"))
    assert list(a.stages["stage"]) == ["sam", "clip"]
    # 12.4 total - 5.0 sam - 2.0 clip
    assert a.unattributed_ms == pytest.approx(5.4)


def test_notice_lines_before_the_header_are_skipped(tmp_path, attribution):
    noisy = copy_fixtures(
        tmp_path, lambda _, text: "NOTICE: Existing SQLite export found: report.sqlite\n" + text
    )
    assert load_nsys_attribution(noisy, STAGES).stages.equals(attribution.stages)


def test_time_units_in_the_header(tmp_path):
    csv = tmp_path / "x_cuda_gpu_kern_sum.csv"
    csv.write_text("Time (%),Total Time (us),Instances,Name\n100.0,2500.5,3,k\n")
    table = read_report(csv, "cuda_gpu_kern_sum")
    assert table["Total Time"].tolist() == [pytest.approx(2.5005)]  # 2500.5 µs = 2.5005 ms


def test_gpu_projection():
    projection = load_gpu_projection(FIXTURES, STAGES)
    assert list(projection.columns) == list(PROJECTION_COLUMNS)
    rows = by_stage(projection)
    assert set(rows) == {"sam", "clip", "projector", "prefill", "prefill/attn", "prefill/moe", "decode"}
    assert (rows["decode"]["range_calls"], rows["decode"]["projected_ms"], rows["decode"]["gpu_ops"]) == (
        3,
        1.65,
        15,
    )
    assert rows["sam"]["projected_ms"] == pytest.approx(5.4)


def test_projection_is_optional(tmp_path):
    no_projection = copy_fixtures(tmp_path)
    (no_projection / f"{PREFIX}_nvtx_gpu_proj_sum.csv").unlink()
    assert load_gpu_projection(no_projection, STAGES) is None
    assert load_nsys_attribution(no_projection, STAGES).total_busy_ms == pytest.approx(12.4)


def _replace_in(file: str, old: str, new: str):
    def edit(name: str, text: str) -> str:
        if name != f"{PREFIX}_{file}.csv":
            return text
        assert old in text
        return text.replace(old, new, 1)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_replace_in("nvtx_kern_sum", "Kern Inst,", "Kernels,"), "no header with columns"),
        (
            _replace_in("cuda_gpu_kern_sum", "63.7,7900000,49,", "63.7,7900000,many,"),
            "line 2, column 'Instances': not a number",
        ),
        (
            _replace_in("nvtx_sum", "PushPop,:run", "PushPop,:run,extra"),
            "line 2 has 11 fields, the header 10",
        ),
        # prefill/attn now claims 20 gemm launches, more than the 16 its enclosing prefill lists.
        (
            _replace_in(
                "nvtx_kern_sum",
                "llm_perf_opt:prefill/attn,PushPop,48213,48213,3,6,",
                "llm_perf_opt:prefill/attn,PushPop,48213,48213,3,20,",
            ),
            "expected each kernel under every enclosing range",
        ),
        # The 49 gemm launches of the whole run shrink to 40: fewer than the ranges credit.
        (
            _replace_in("cuda_gpu_kern_sum", "63.7,7900000,49,", "63.7,7900000,40,"),
            "reports of different captures?",
        ),
    ],
)
def test_malformed_reports_are_one_line_user_errors(tmp_path, edit, message):
    broken = copy_fixtures(tmp_path, edit)
    with pytest.raises(UserError, match=message) as err:
        load_nsys_attribution(broken, STAGES)
    assert "\n" not in str(err.value)


def test_missing_or_ambiguous_reports(tmp_path):
    partial = copy_fixtures(tmp_path)
    (partial / f"{PREFIX}_nvtx_kern_sum.csv").unlink()
    with pytest.raises(UserError, match=r"no \*_nvtx_kern_sum.csv"):
        load_nsys_attribution(partial, STAGES)
    shutil.copy(FIXTURES / f"{PREFIX}_nvtx_kern_sum.csv", partial / f"{PREFIX}_nvtx_kern_sum.csv")
    shutil.copy(FIXTURES / f"{PREFIX}_nvtx_sum.csv", partial / "other_nvtx_sum.csv")
    with pytest.raises(UserError, match="several nvtx_sum reports"):
        load_nsys_attribution(partial, STAGES)
    assert load_nsys_attribution(partial / PREFIX, STAGES).total_busy_ms == pytest.approx(12.4)
