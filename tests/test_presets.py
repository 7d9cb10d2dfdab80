"""Presets: shipped in the package, typed and checked whole at load, `--show-config`, the `paper` and `cpu` presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distilkit.cli import main
from distilkit.config import preset_names
from distilkit.distill import plan_training
from distilkit.pipeline import load_preset, resolved_config
from distilkit.utils import DistilkitError

SHIPPED = ["ablations", "cpu", "gpu", "paper", "quick"]
GOOD = """
teacher: minilm
distill: {steps: 6, batch_size: 4}
finetune:
  tasks: [cola, mrpc]
  per_task: {mrpc: {max_train: 32, seeds: [1, 2]}}
variants:
  - {name: no_ce, distill: {alpha_ce: 0}, tasks: [cola]}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "DISTILKIT_NO_PROGRESS": "1"}


def test_presets_ship_in_the_package():
    assert preset_names() == SHIPPED
    assert not (REPO / "configs").exists()


@pytest.mark.parametrize("name", SHIPPED)
def test_show_config_is_complete_and_loads_back(name, tmp_path):
    """The resolved preset has every field of every section, and loading it back resolves the same."""
    resolved = resolved_config(load_preset(name))
    assert "alpha_cos" in resolved["distill"] and "freeze_position_embeddings" in resolved["adapt_config"]
    for task in load_preset(name).finetune.tasks:
        assert {"seeds", "lr", "weight_decay", "group_by_length"} <= set(resolved["finetune"]["per_task"][task])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(json.dumps(resolved))
    assert resolved_config(load_preset(str(dumped))) == resolved


@pytest.mark.parametrize("body, names", [
    ("distill: {alpha_coss: 1}", ["distill", "alpha_coss"]),
    ("adapt_config: {stepz: 3}", ["adapt_config", "stepz"]),
    ("finetune: {tasks: [cola], per_task: {sst-2: {max_train: 10}}}", ["finetune.per_task", "sst-2"]),
    ("finetune: {tasks: [cola, colaa]}", ["finetune.tasks", "colaa"]),
    ("finetune: {common: {lrr: 1.0e-4}}", ["finetune.common", "lrr"]),
    ("finetune: {common: {seeds: [1, 2]}}", ["finetune.common.seeds"]),
    ("finetune: {per_task: {cola: 3}}", ["finetune.per_task.cola", "mapping"]),
    ("finetune: {per_task: {cola: {save_models: best}}}", ["finetune.per_task.cola", "save_models"]),
    ("finetune: {baselines: [no_kd, cut]}", ["finetune.baselines", "cut"]),
    ("finetune: {tasks: [cola], baselines: [no_kd], baseline_tasks: [mrpc]}", ["finetune.baseline_tasks", "mrpc"]),
    ("finetune: {baselines: [no_kd], baseline_tasks: []}", ["finetune.baseline_tasks", "at least one"]),
    ("distill: {kl_positions: some}", ["distill", "kl_positions"]),
    ("adapt_config: {lr: -1}", ["adapt_config", "lr"]),
    ("adapt: sometimes", ["adapt", "sometimes"]),
    ("variants: [{name: a, distill: {alpha_coss: 0}}]", ["variants.a.distill", "alpha_coss"]),
    ("variants: [{name: a, distill: {temperature: 0}}]", ["variants.a.distill", "temperature"]),
    ("variants: [{name: a, init: copy}]", ["variants.a.init", "copy"]),
    ("variants: [{name: a}, {name: a}]", ["variants.a", "unique"]),
    ("variants: [{name: a, tasks: [cola, boolq]}]", ["variants.a.tasks", "boolq"]),
    ("bench: {task: sts-b}", ["bench.task", "sts-b"]),
    ("student: {layers: [0, 0]}", ["student.layers"]),
    ("export: {tasks: [mprc]}", ["export.tasks", "mprc"]),
])
def test_whole_preset_checked_at_load(tmp_path, body, names):
    preset = tmp_path / "typo.yaml"
    preset.write_text(body + "\n")
    with pytest.raises(DistilkitError) as err:
        load_preset(str(preset))
    message = str(err.value)
    assert "\n" not in message and str(preset) in message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize("item, names", [
    ("distill.alpha_coss=1", ["alpha_coss"]),
    ("finetune.per_task.sst-2.max_train=100", ["finetune.per_task", "sst-2", "--set"]),
    ("variants.0.distill.alpha_coss=0", ["variants.no_ce.distill", "alpha_coss"]),
    ("finetune.tasks=[cola,stsbb]", ["finetune.tasks", "stsbb"]),
])
def test_overrides_checked_like_the_preset(tmp_path, item, names):
    preset = tmp_path / "good.yaml"
    preset.write_text(GOOD)
    load_preset(str(preset))
    with pytest.raises(DistilkitError) as err:
        load_preset(str(preset), [item])
    for name in names:
        assert name in str(err.value), str(err.value)


def test_cli_typo_exits_2_before_any_stage(tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text(GOOD.replace("distill: {steps: 6", "distill: {alpha_coss: 1, steps: 6"))
    run = tmp_path / "run"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "distilkit.cli", "reproduce", "--preset", str(preset), "--data-dir",
                          str(tmp_path), "--out", str(run)], env=_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "alpha_coss" in lines[0] and "Traceback" not in out.stderr
    assert not run.exists()  # nothing ran, nothing was written
    assert seconds < 60, seconds


def test_cli_show_config(capsys):
    args = ["reproduce", "--preset", "paper", "--set", "distill.seed=3"]
    assert main([*args, "--show-config"]) == 0  # no --data-dir / --out needed
    shown = json.loads(capsys.readouterr().out)
    assert shown == resolved_config(load_preset("paper", ["distill.seed=3"]))
    assert shown["distill"]["seed"] == 3
    assert main(args) == 2  # to run, both are required
    assert "--data-dir and --out required" in capsys.readouterr().err


def test_paper_preset_is_the_reference_recipe():
    cfg = load_preset("paper")
    d = cfg.distill
    assert cfg.teacher == "bert-base-uncased" and cfg.student.layers == [0, 2, 4, 7, 9, 11]
    assert (d.alpha_ce, d.alpha_mlm, d.alpha_cos, d.temperature) == (5.0, 2.0, 1.0, 2.0)
    assert d.kl_positions == "all" and d.smoothing == 0.7 and d.freeze_position_embeddings
    assert (d.mlm_prob, d.mask_frac, d.random_frac) == (0.15, 0.8, 0.1)
    assert (d.lr, d.warmup_ratio, d.weight_decay, d.betas, d.eps, d.grad_clip) == (5e-4, 0.05, 0.0, [0.9, 0.98], 1e-6, 5.0)
    assert d.epochs == 3.0 and d.steps is None and d.effective_batch is None
    # tokens per update: 2,000 reference sequences x the mean measured by benchmarks/reference_batch_tokens.py
    measured = json.loads((REPO / "benchmarks" / "results" / "reference_batch_tokens.json").read_text())
    assert measured["sequences_per_update"] == 2000
    assert d.effective_tokens == measured["tokens_per_update"] == round(2000 * measured["tokens"] / measured["sequences"])
    plan = plan_training(d, n_blocks=10**6, block_size=cfg.corpus.block_size, world_size=8)
    assert plan.accumulation == 17 and plan.tokens_per_step == 278_528
    assert abs(plan.tokens_per_step / d.effective_tokens - 1) < 0.01
    assert cfg.bench.task == "stsb" and len(cfg.finetune.seeds) == 5


def test_cpu_preset_protocol():
    cfg = load_preset("cpu")
    f = cfg.finetune
    assert f.tasks == ["cola", "mrpc", "rte", "stsb", "sst2", "imdb"] and f.seeds == [1, 2, 3]
    assert f.baselines == ["no_kd", "cut_only"] and f.teacher
    resolved = resolved_config(cfg)["finetune"]["per_task"]
    for task in ("cola", "mrpc", "rte", "stsb"):
        assert resolved[task]["max_train"] is None and resolved[task]["max_eval"] is None  # full training sets
    for task in ("sst2", "imdb"):
        assert resolved[task]["max_train"] is not None and resolved[task]["seeds"] == [1, 2, 3]
    assert cfg.bench.task == "stsb"
    for section in (cfg.adapt_config, cfg.distill):
        assert (section.steps, section.batch_size) == (150, 32)
    assert cfg.corpus.block_size == 128


def test_wheel_ships_presets(tmp_path):
    """`pip wheel` of a copy of the project: the wheel lists the presets and `load_preset('quick')` works from it.

    About 17 s on the shared 2-core machine (under the ~20 s mark for `slow`)."""
    src = tmp_path / "project"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = wheels.glob("distilkit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"distilkit/presets/{n}.yaml" for n in SHIPPED} <= names
        zf.extractall(tmp_path / "site")
    probe = ("import distilkit, json; from distilkit.pipeline import load_preset; "
             "c = load_preset('quick'); print(json.dumps([distilkit.__file__, c.distill.steps]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    run = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    where, steps = json.loads(run.stdout.strip().splitlines()[-1])
    assert where.startswith(str(tmp_path / "site")) and steps == yaml.safe_load(
        (REPO / "src" / "distilkit" / "presets" / "quick.yaml").read_text())["distill"]["steps"]
