"""Sweeps on a SLURM cluster: conf/hydra/launcher/slurm.yaml, Hydra's submitit launcher with one GPU
per job. Composed as the CLI composes it; nothing is submitted."""

from __future__ import annotations

from omegaconf import OmegaConf

from llm_perf_opt.cli import preflight
from llm_perf_opt.config import compose
from llm_perf_opt.report.record import SCHEMA_VERSION, RunRecord
from llm_perf_opt.report.run_dirs import job_identity

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def launcher(*overrides: str):
    return compose(["hydra/launcher=slurm", *overrides], return_hydra_config=True).hydra.launcher


def test_slurm_launcher_gives_each_job_one_gpu():
    cfg = launcher()
    assert cfg._target_ == SLURM_LAUNCHER
    assert (cfg.nodes, cfg.tasks_per_node, cfg.gpus_per_node) == (1, 1, 1)
    assert cfg.timeout_min == 60
    assert cfg.partition is None and cfg.account is None  # the cluster's defaults unless set


def test_partition_time_and_account_are_overridable():
    cfg = launcher(
        "hydra.launcher.partition=gpu-h100",
        "hydra.launcher.timeout_min=180",
        "hydra.launcher.account=perf_team",
        "+hydra.launcher.additional_parameters.mail_type=END",
    )
    assert (cfg.partition, cfg.timeout_min, cfg.account) == ("gpu-h100", 180, "perf_team")
    assert OmegaConf.to_container(cfg.additional_parameters) == {
        "mail_type": "END"
    }  # any other sbatch option
    assert cfg.gpus_per_node == 1


def test_submitit_files_go_into_the_sweep_dir():
    cfg = compose(["hydra/launcher=slurm", "hydra.sweep.dir=/scratch/sweep"], return_hydra_config=True)
    assert cfg.hydra.launcher.submitit_folder == "/scratch/sweep/.submitit/%j"


def test_without_the_option_jobs_run_one_after_another_in_this_process():
    cfg = compose([], return_hydra_config=True).hydra.launcher
    assert cfg._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def test_the_cli_accepts_the_launcher_and_pairs_jobs_across_launchers(tmp_path):
    preflight(
        True,
        [
            "hydra/launcher=slurm",
            "model=deepseek_ocr_tiny",
            "mode=tiny,base",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
    )
    record = RunRecord(
        SCHEMA_VERSION, "ok", config={"model": {"name": "deepseek_ocr_tiny", "mode": {"name": "tiny"}}}
    )
    on_cluster = job_identity(record, ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "mode=tiny"])
    assert on_cluster == job_identity(record, ["mode=tiny"])
