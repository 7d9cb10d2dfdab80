"""`distilkit reproduce`: the whole DistilBERT recipe as one resumable pipeline.

Stages, in order (each writes its outputs under RUN_DIR, then a stamp in RUN_DIR/stages/):

    corpus    text -> token blocks (train + held-out)                      RUN_DIR/corpus/
    adapt     masked-LM adaptation of a teacher without an MLM head        RUN_DIR/teacher/
    student   DistilBERT student from one teacher layer out of two         RUN_DIR/student_init/
    distill   triple-loss distillation (resumes from its checkpoints)      RUN_DIR/distill/
    variants  extra students for ablations (each distilled like `distill`) RUN_DIR/variants/<name>/
    finetune  teacher and every student on each task, each seed            RUN_DIR/finetune/<model>/<task>/
    bench     parameters and inference speed                               RUN_DIR/bench/bench.json
    report    report.md, report.json, report.png                           RUN_DIR/

The corpus comes before adaptation because adapting needs text. The preset is typed and checked whole
when it loads (every section, variant and task), so a typo stops before any stage runs. A stage's key
is a hash of its resolved config and of the key before it; its stamp holds the key, and a stage whose
stamp matches is skipped. The resumable stages (adapt, distill, each variant) also record their key in
their folder when they start: a killed run continues from its last checkpoint only when that key is the
current one; a folder made with other settings (or forced by `--from STAGE`, which redoes that stage and
all after it) is moved to RUN_DIR/.trash/ and deleted once the stage completes. Fine-tuning restarts
at the first unfinished (model, task) pair.

Under `torchrun` or `accelerate launch` (WORLD_SIZE > 1), the training stages (adapt, distill,
variants) use every process and the others run on the main process only; the run then stops after
`variants`: start the same command again as one process for fine-tuning, bench and report.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .baselines import BASELINES
from .config import (AdaptConfig, DistillConfig, FinetuneConfig, apply_overrides, from_dict, preset_file, preset_names,
                     read_yaml, to_dict)
from .utils import DistilkitError, atomic_write_json, atomic_write_text, provenance, sha256_file, use_gpu

STAGES = ["corpus", "adapt", "student", "distill", "variants", "finetune", "export", "bench", "report"]
DISTRIBUTED = ("adapt", "distill", "variants")  # stages that use every process under torchrun / accelerate launch


# =========================================================================== config


@dataclass
class CorpusSection:
    train: list[str] = field(default_factory=lambda: ["wikitext/wikitext-2-raw/wiki.train.raw.gz"])
    heldout: list[str] = field(default_factory=lambda: ["wikitext/wikitext-2-raw/wiki.valid.raw.gz"])
    max_lines: int | None = None  # use only the first N lines of each file (small presets)
    block_size: int = 128


@dataclass
class StudentSection:
    layers: list[int] | None = None  # default: one teacher layer out of two from 0
    every: int = 2


@dataclass
class FinetuneSection:
    tasks: list[str] = field(default_factory=lambda: ["cola", "mrpc", "sst2", "imdb"])
    seeds: list[int] = field(default_factory=lambda: FinetuneConfig().seeds)  # FinetuneConfig's default
    common: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields for every task (checked at load)
    per_task: dict[str, Any] = field(default_factory=dict)  # task -> FinetuneConfig fields (checked at load)
    teacher: bool = True  # false: fine-tune the students only (e.g. an ablation run; no retention column)
    baselines: list[str] = field(default_factory=list)  # students without distillation, fine-tuned like the others:
    # "no_kd" (same init, same tokens, masked-LM loss only) and/or "cut_only" (the initial student, not pre-trained)
    baseline_tasks: list[str] | None = None  # the tasks the baselines are fine-tuned on (default: every task)


@dataclass
class BenchSection:
    enabled: bool = True
    task: str = "mrpc"  # sentences for timing (the paper used STS-B dev)
    rounds: int = 3
    max_sentences: int | None = None


@dataclass
class ExportSection:
    enabled: bool = False  # export the fine-tuned student to ONNX (and int8) after fine-tuning
    int8: bool = True
    tasks: list[str] = field(default_factory=list)  # tasks whose fine-tuned student is exported (default: all)


@dataclass
class VariantSection:
    """An extra student for the ablations (paper Table 4)."""

    name: str = ""
    label: str = ""
    paper_key: str | None = None  # key in the paper's table4_ablation_delta_macro
    init: str = "teacher"  # teacher: layers copied from the teacher; random: fresh weights; none: no distillation
    distill: dict[str, Any] = field(default_factory=dict)  # overrides of the main distill config (checked at load)
    tasks: list[str] | None = None  # default: all tasks
    seeds: list[int] | None = None


@dataclass
class ReproduceConfig:
    teacher: str = "minilm"
    adapt: str = "auto"  # auto: only when the teacher has no MLM head; always; never
    adapt_config: AdaptConfig = field(default_factory=AdaptConfig)
    student: StudentSection = field(default_factory=StudentSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    variants: list[VariantSection] = field(default_factory=list)
    bench: BenchSection = field(default_factory=BenchSection)
    export: ExportSection = field(default_factory=ExportSection)


ADAPT_MODES = ("auto", "always", "never")
VARIANT_INITS = ("teacher", "random", "none")


def load_preset(preset: str | Path, overrides: list[str] | None = None) -> ReproduceConfig:
    """A preset is a name shipped in the package (`distilkit/presets/<name>.yaml`) or a YAML file; `overrides`
    are `a.b=value`. The whole preset, every variant and every task's fine-tuning config is checked here,
    before any stage runs (`check_preset`)."""
    path: Any = Path(preset)
    where = str(preset)
    if not path.is_file():
        path = preset_file(str(preset))
        if path is None:
            raise DistilkitError(f"unknown preset '{preset}': expected one of {preset_names()} or a YAML file")
        where = f"preset {preset} (presets/{preset}.yaml)"
    cfg = from_dict(ReproduceConfig, read_yaml(path), where)
    check_preset(cfg, where)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        check_preset(cfg, f"{where} with --set {' '.join(overrides)}")
    return cfg


def variant_distill(cfg: ReproduceConfig, variant: VariantSection, where: str = "config") -> DistillConfig:
    """A variant's distillation config: the main `distill` section with the variant's overrides."""
    return from_dict(DistillConfig, {**to_dict(cfg.distill), **variant.distill}, f"{where}: variants.{variant.name}.distill")


def finetune_config(f: FinetuneSection, task: str, seeds: list[int] | None = None, where: str = "config") -> FinetuneConfig:
    """One task's fine-tuning config: FinetuneConfig defaults < `common` < `per_task[task]`; seeds: `seeds` if
    given (a variant's), else per_task[task].seeds, else finetune.seeds."""
    per = f.per_task.get(task) or {}
    fields = {**f.common, **per, "seeds": seeds or per.get("seeds", f.seeds)}
    return from_dict(FinetuneConfig, fields, f"{where}: finetune.per_task.{task}")


def finetune_tasks(cfg: ReproduceConfig) -> list[str]:
    """Every task some model is fine-tuned on, plus those with a per_task entry, in a stable order."""
    names = [*cfg.finetune.tasks, *cfg.finetune.per_task]
    for v in cfg.variants:
        names += v.tasks or []
    return list(dict.fromkeys(names))


def check_preset(cfg: ReproduceConfig, where: str = "config") -> None:
    """Raise a one-line DistilkitError naming the preset and the key for anything a stage would reject.

    Names, keys and types first (no heavy import: a typo fails within a second), then the stages' own value
    checks (distill.check_config, finetune's), called rather than copied.
    """
    from .tasks import TASKS

    def fail(key: str, message: str) -> DistilkitError:
        return DistilkitError(f"{where}: {key}: {message}")

    def known(key: str, names: list[str] | dict, allowed: Any) -> None:
        bad = [n for n in names if n not in allowed]
        if bad:
            raise fail(key, f"unknown task(s) {bad}; expected among {sorted(allowed)}")

    if cfg.adapt not in ADAPT_MODES:
        raise fail("adapt", f"expected one of {list(ADAPT_MODES)}, got '{cfg.adapt}'")
    s = cfg.student
    if s.layers is not None and (not s.layers or min(s.layers) < 0 or len(set(s.layers)) != len(s.layers)):
        raise fail("student.layers", f"expected distinct teacher layer indices >= 0, got {s.layers}")
    if s.every < 1:
        raise fail("student.every", f"expected a positive integer, got {s.every}")
    c = cfg.corpus
    if not c.train:
        raise fail("corpus.train", "expected at least one file (paths relative to the data dir)")
    if c.block_size < 8:
        raise fail("corpus.block_size", f"expected at least 8 tokens, got {c.block_size}")
    if c.max_lines is not None and c.max_lines < 1:
        raise fail("corpus.max_lines", f"expected a positive number of lines or null, got {c.max_lines}")
    f = cfg.finetune
    if not f.tasks:
        raise fail("finetune.tasks", "expected at least one task")
    known("finetune.tasks", f.tasks, TASKS)
    known("finetune.per_task", f.per_task, TASKS)
    for name in f.baselines:
        if name not in BASELINES:
            raise fail("finetune.baselines", f"unknown baseline '{name}', expected any of {sorted(BASELINES)}")
    for task in f.baseline_tasks or []:
        if task not in f.tasks:
            raise fail("finetune.baseline_tasks", f"'{task}' is not in finetune.tasks {f.tasks}: a baseline is "
                       "compared with the distilled student on the same task")
    if f.baseline_tasks == [] and f.baselines:
        raise fail("finetune.baseline_tasks", "expected at least one task, or null for every task")
    if not f.seeds:
        raise fail("finetune.seeds", "expected at least one seed")
    if "seeds" in f.common:
        raise fail("finetune.common.seeds", "set finetune.seeds (or finetune.per_task.<task>.seeds) instead")
    from_dict(FinetuneConfig, f.common, f"{where}: finetune.common")
    for task, fields in f.per_task.items():
        if not isinstance(fields, dict):
            raise fail(f"finetune.per_task.{task}", f"expected a mapping of FinetuneConfig fields, got {fields!r}")
    names = [v.name for v in cfg.variants]
    for v in cfg.variants:
        key = f"variants.{v.name or '?'}"
        if not v.name or v.name in ("teacher", "student", *BASELINES) or names.count(v.name) > 1:
            raise fail(key, f"each variant needs a unique name other than teacher, student, {', '.join(BASELINES)}")
        if v.init not in VARIANT_INITS:
            raise fail(f"{key}.init", f"expected one of {list(VARIANT_INITS)}, got '{v.init}'")
        known(f"{key}.tasks", v.tasks or [], TASKS)
        if v.seeds is not None and not v.seeds:
            raise fail(f"{key}.seeds", "expected at least one seed, or null for finetune's")
    if cfg.bench.task not in TASKS:
        raise fail("bench.task", f"unknown task '{cfg.bench.task}'; expected among {sorted(TASKS)}")
    if cfg.bench.rounds < 1 or (cfg.bench.max_sentences is not None and cfg.bench.max_sentences < 1):
        raise fail("bench", "rounds and max_sentences must be positive")
    known("export.tasks", cfg.export.tasks, TASKS)
    resolved = {t: finetune_config(f, t, where=where) for t in finetune_tasks(cfg)}  # unknown keys, types
    variants = {v.name: variant_distill(cfg, v, where) for v in cfg.variants}

    from .distill import check_config  # the value checks of the stages themselves (these import torch)
    from .finetune import _check_config

    def value_check(key: str, check: Callable[[Any], None], obj: Any) -> None:
        try:
            check(obj)
        except DistilkitError as exc:
            raise fail(key, str(exc)) from None

    value_check("adapt_config", check_config, cfg.adapt_config)
    value_check("distill", check_config, cfg.distill)
    for name, dcfg in variants.items():
        value_check(f"variants.{name}.distill", check_config, dcfg)
    for task, fcfg in resolved.items():
        value_check(f"finetune.per_task.{task}" if task in f.per_task else f"finetune ({task})", _check_config, fcfg)
    for v in cfg.variants:
        for task in v.tasks or f.tasks:
            value_check(f"variants.{v.name}.seeds", _check_config, finetune_config(f, task, v.seeds, where))


def resolved_config(cfg: ReproduceConfig) -> dict[str, Any]:
    """The preset as `--show-config` prints it: every section typed and defaulted, each task's fine-tuning
    config and each variant's distillation config in full. Loading it back gives the same run."""
    out = to_dict(cfg)
    out["finetune"]["per_task"] = {t: to_dict(finetune_config(cfg.finetune, t)) for t in finetune_tasks(cfg)}
    for v, section in zip(cfg.variants, out["variants"]):
        section["distill"] = to_dict(variant_distill(cfg, v))
    return out


# =========================================================================== stamps


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stamps:
    """RUN_DIR/stages/<name>.json: written last, once a stage's outputs are complete."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "stages"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def read(self, name: str) -> dict | None:
        p = self.path(name)
        return json.loads(p.read_text()) if p.is_file() else None

    def done(self, name: str, key: str) -> bool:
        s = self.read(name)
        return s is not None and s.get("key") == key

    def write(self, name: str, key: str, seconds: float, outputs: dict) -> None:
        atomic_write_json(self.path(name), {"stage": name, "key": key, "seconds": round(seconds, 2), "outputs": outputs})

    def clear_from(self, stage: str) -> None:
        for name in STAGES[STAGES.index(stage):]:
            for p in self.dir.glob(f"{name}*.json"):
                p.unlink()


# =========================================================================== the pipeline


class Pipeline:
    def __init__(self, cfg: ReproduceConfig, data_dir: str | Path, run_dir: str | Path, command: str | None = None,
                 preset: str | None = None, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.data = Path(data_dir)
        self.run = Path(run_dir)
        self.command = command
        self.preset = preset
        self.stamps = Stamps(self.run)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.keys: dict[str, str] = {}
        self._sums: dict[str, dict[str, str]] = {}  # task -> {file: sha256}
        self.force: set[str] = set()  # stages named by --from and after: their folders are moved aside
        self.summary: list[dict] = []
        self.state: Any = None  # accelerate.PartialState when launched with several processes
        if not self.data.is_dir():
            raise DistilkitError(f"{self.data}: data directory not found")
        check_preset(cfg, preset or "config")  # load_preset checked it already; a config built in code too

    # ---- paths
    @property
    def corpus_dir(self) -> Path:
        return self.run / "corpus"

    @property
    def teacher_dir(self) -> str:
        out = self.stamps.read("adapt")
        return out["outputs"]["teacher"] if out else str(self.cfg.teacher)

    def student_dir(self, variant: str = "student") -> str:
        if variant == "student":
            return str(self.run / "distill" / "final")
        return str(self.run / "variants" / variant / "final")

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def _main_first(self):
        return contextlib.nullcontext() if self.state is None else self.state.main_process_first()

    # ---- driver
    def run_all(self, from_stage: str | None = None, until: str | None = None) -> list[dict]:
        for flag, stage in (("--from", from_stage), ("--until", until)):
            if stage is not None and stage not in STAGES:
                raise DistilkitError(f"{flag}: unknown stage '{stage}', expected one of {STAGES}")
        self.run.mkdir(parents=True, exist_ok=True)
        if from_stage is not None:
            self.stamps.clear_from(from_stage)
            self.force = set(STAGES[STAGES.index(from_stage):])
        world = int(os.environ.get("WORLD_SIZE", "1"))
        state = None
        if world > 1:
            from accelerate import PartialState

            state = self.state = PartialState(cpu=not use_gpu())
        if state is None or state.is_main_process:
            self._write_run_json()
        upstream = ""
        for name in STAGES:
            stage_cfg = self._stage_config(name)
            key = _hash({"stage": name, "config": stage_cfg, "upstream": upstream})
            self.keys[name] = key
            if state is not None and name not in DISTRIBUTED:
                if STAGES.index(name) > STAGES.index(DISTRIBUTED[-1]):
                    if state.is_main_process:
                        self.log(f"[reproduce] stopping after '{DISTRIBUTED[-1]}' ({world} processes): run the same "
                                 "command again as a single process for fine-tuning, bench and report")
                    break
                with state.main_process_first():  # main runs the stage; the others then find its stamp
                    self._run_stage(name, key, quiet=not state.is_main_process)
            else:
                self._run_stage(name, key, quiet=state is not None and not state.is_main_process)
            upstream = key
            if name == until:
                break
        return self.summary

    def _run_stage(self, name: str, key: str, quiet: bool = False) -> None:
        t0 = time.perf_counter()
        if self.stamps.done(name, key):
            if not quiet:
                self._note(name, "skipped", 0.0, "up to date")
            return
        outputs = getattr(self, f"stage_{name}")(key)
        seconds = time.perf_counter() - t0
        if not quiet:
            self.stamps.write(name, key, seconds, outputs or {})
            self._empty_trash(name)
            self._note(name, "done", seconds, outputs.get("note", "") if outputs else "")

    def _note(self, name: str, status: str, seconds: float, detail: str) -> None:
        self.summary.append({"stage": name, "status": status, "seconds": round(seconds, 1)})
        self.log(f"[reproduce] {name:<9} {status:<8} {seconds:8.1f}s  {detail}".rstrip())

    def _stage_config(self, name: str) -> Any:
        """What a stage's key hashes (with the key of the stage before it): its resolved, typed config."""
        from .baselines import baseline_variants  # built like the ablation variants: part of their stage's key

        c = self.cfg
        resolved = resolved_config(c)
        return {
            "corpus": {"teacher": c.teacher, **resolved["corpus"], "inputs": self._input_sums},
            "adapt": {"mode": c.adapt, "config": resolved["adapt_config"]},
            "student": resolved["student"],
            "distill": resolved["distill"],
            "variants": resolved["variants"] + [{**to_dict(v), "distill": to_dict(variant_distill(c, v))}
                                                for v in baseline_variants(c)],
            "finetune": {**resolved["finetune"], "common": None,  # per_task holds every task's full config
                         "data": {t: self._task_sums(t) for t in finetune_tasks(c)}},
            "export": to_dict(c.export),
            "bench": {**to_dict(c.bench), "data": self._task_sums(c.bench.task)},
            "report": {},
        }[name]

    @functools.cached_property
    def _input_sums(self) -> dict[str, Any]:
        """sha256 of the teacher's files and the corpus files (read once): part of the corpus stage's key, so a
        changed teacher or corpus redoes every stage; run.json records the corpus ones."""
        from .models import resolve_model

        teacher = Path(resolve_model(self.cfg.teacher))
        files = sorted(p for p in teacher.iterdir() if p.is_file()) if teacher.is_dir() else []
        c = self.cfg.corpus
        rels = [*self._expand(c.train, "train"), *self._expand(c.heldout, "heldout")]
        return {
            "teacher": {p.name: sha256_file(p) for p in files} or {"hub": str(teacher)},
            "corpus": {rel: sha256_file(self.data / rel) for rel in rels if (self.data / rel).is_file()},
        }

    def _task_sums(self, task: str) -> dict[str, str]:
        """sha256 of each file of a task: part of the keys of the stages that read it (finetune, bench)."""
        from .tasks import task_files

        if task not in self._sums:
            self._sums[task] = ({"hub": str(self.data)} if str(self.data).startswith("hf:") else
                                {p.relative_to(self.data).as_posix(): sha256_file(p) for p in task_files(task, self.data)})
        return self._sums[task]

    def _write_run_json(self) -> None:
        checksums = {}
        manifest = self.data / "MANIFEST.sha256"
        if manifest.is_file():
            checksums["MANIFEST.sha256"] = sha256_file(manifest)
        checksums.update(self._input_sums["corpus"])  # hashed once, for this record and the corpus stage's key
        atomic_write_json(self.run / "run.json", {
            "command": self.command,
            "preset": self.preset,
            "data_dir": str(self.data),
            "config": resolved_config(self.cfg),  # as --show-config prints it
            "seeds": self.cfg.finetune.seeds,
            "data_checksums": checksums,
            **provenance(),
        })

    # ---- stage folders: resumed only when made with the same key
    def _claim(self, folder: Path, key: str, stage: str) -> None:
        """Make `folder` this stage's: record `key` in it when the stage starts.

        A folder that carries another key (or none), or any folder of a stage forced by `--from`, is moved
        to RUN_DIR/.trash/<stage>-<time> (deleted once the stage completes), so checkpoints are resumed
        only when they were made with the current settings. Main process only.
        """
        marker = folder / STAGE_KEY_FILE
        if folder.exists():
            try:
                found = json.loads(marker.read_text()).get("key")
            except (OSError, ValueError, AttributeError):
                found = None
            if found == key and stage.split("-")[0] not in self.force:
                return
            trash = self.run / ".trash" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while trash.exists():
                n += 1
                trash = trash.with_name(f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, trash)
            why = "--from" if found == key else "made with other settings" if found else "no stage key"
            self.log(f"[reproduce] {stage}: {folder} set aside ({why}) as {trash}; deleted once {stage} completes")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"stage": stage, "key": key})

    def _empty_trash(self, stage: str) -> None:
        trash = self.run / ".trash"
        for p in trash.glob(f"{stage}-*"):
            shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(OSError):
            trash.rmdir()  # only when empty

    def _claim_all(self, folder: Path, key: str, stage: str) -> None:
        """`_claim` on the main process, the others waiting for it (torchrun / accelerate launch)."""
        with self._main_first():
            if self.is_main:
                self._claim(folder, key, stage)

    # ---- stages
    def stage_corpus(self, key: str) -> dict:
        from .corpus import prepare_corpus

        c = self.cfg.corpus
        train = [self._input(p, "train") for p in self._expand(c.train, "train")]
        heldout = [self._input(p, "heldout") for p in self._expand(c.heldout, "heldout")]
        meta = prepare_corpus(self.cfg.teacher, train, str(self.corpus_dir), block_size=c.block_size,
                              heldout_inputs=heldout or None, overwrite=True)
        shutil.rmtree(self.run / "work", ignore_errors=True)
        return {"corpus": str(self.corpus_dir), "note": _corpus_note(meta)}

    def _expand(self, patterns: list[str], split: str) -> list[str]:
        """Corpus entries are paths relative to the data dir; shell patterns (`pretrain/*.txt`) are expanded."""
        out: list[str] = []
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                found = sorted(str(p.relative_to(self.data)) for p in self.data.glob(pattern) if p.is_file())
                if not found:
                    raise DistilkitError(f"{self.data / pattern}: no corpus file matches (corpus.{split})")
                out += found
            else:
                out.append(pattern)
        return out

    def _input(self, rel: str, split: str) -> str:
        """A corpus input file; with `max_lines`, a slice of it written under RUN_DIR/work/."""
        src = self.data / rel
        if not src.is_file():
            raise DistilkitError(f"{src}: corpus file not found (set corpus.{split} in the preset)")
        n = self.cfg.corpus.max_lines
        if n is None:
            return str(src)
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rt", encoding="utf-8") as fh:
            lines = [line for _, line in zip(range(n), fh)]
        dst = self.run / "work" / f"{split}-{src.name.removesuffix('.gz')}"
        atomic_write_text(dst, "".join(lines))
        return str(dst)

    def stage_adapt(self, key: str) -> dict:
        from .models import has_mlm_head, resolve_model

        mode = self.cfg.adapt
        teacher = resolve_model(self.cfg.teacher)
        if mode == "never" or (mode == "auto" and has_mlm_head(teacher)):
            return {"teacher": teacher, "note": "teacher has an MLM head: not adapted"}
        from .adapt import adapt_teacher

        out = self.run / "teacher"
        self._claim_all(out, key, "adapt")
        with _fresh_start_is_fine():
            result = adapt_teacher(self.cfg.teacher, str(self.corpus_dir), str(out), self.cfg.adapt_config, resume=True)
        return {"teacher": str(out / "final") if (out / "final").is_dir() else str(out), "note": _adapt_note(result)}

    def stage_student(self, key: str) -> dict:
        from .student import init_student

        s = self.cfg.student
        summary = init_student(self.teacher_dir, self.run / "student_init", layers=s.layers, every=s.every, overwrite=True)
        return {"student": str(self.run / "student_init"),
                "note": f"layers {summary.layers}, {summary.student_params_no_head / 1e6:.1f}M vs "
                        f"{summary.teacher_params_no_head / 1e6:.1f}M parameters"}

    def stage_distill(self, key: str) -> dict:
        out = self.run / "distill"
        self._claim_all(out, key, "distill")
        result = self._distill(str(self.run / "student_init"), out, self.cfg.distill)
        return {"student": str(out / "final"), "note": _distill_note(result)}

    def _distill(self, student: str, out: Path, dcfg: DistillConfig) -> dict:
        """Distil into `out`, continuing its checkpoints: callers `_claim` `out` (or a folder above it) first."""
        from .distill import distill

        with _fresh_start_is_fine():
            return distill(self.teacher_dir, student, str(self.corpus_dir), str(out), dcfg, resume=True)

    def stage_variants(self, key: str) -> dict:
        """Ablation students: each distilled (or not) with its own loss settings and initialisation."""
        from .baselines import baseline_variants
        from .student import init_student

        done = []
        variants = self.cfg.variants + baseline_variants(self.cfg)  # ablation students, then the baselines
        for v in variants:
            if not v.name or v.name in ("teacher", "student"):
                raise DistilkitError(f"variants: each needs a unique name other than teacher/student, got '{v.name}'")
            vdir = self.run / "variants" / v.name
            sub_key = _hash({"variant": {**to_dict(v), "distill": to_dict(variant_distill(self.cfg, v))},
                             "upstream": self.keys["distill"]})
            if self.stamps.done(f"variants-{v.name}", sub_key):
                continue
            if v.init not in ("teacher", "random", "none"):
                raise DistilkitError(f"variants.{v.name}.init: expected teacher, random or none, got '{v.init}'")
            t0 = time.perf_counter()
            init = vdir / "init"
            with self._main_first():  # files are written by the main process only
                if self.is_main:
                    self._claim(vdir, sub_key, f"variants-{v.name}")
                    init_student(self.teacher_dir, init, layers=self.cfg.student.layers, every=self.cfg.student.every,
                                 overwrite=True)
                    if v.init == "random":
                        _reinitialise(init)
            if v.init != "none":  # "none": no distillation at all, the cut student is fine-tuned directly
                self._distill(str(init), vdir / "distill", variant_distill(self.cfg, v))
            if self.is_main:
                shutil.rmtree(vdir / "final", ignore_errors=True)
                shutil.copytree(init if v.init == "none" else vdir / "distill" / "final", vdir / "final")
                self.stamps.write(f"variants-{v.name}", sub_key, time.perf_counter() - t0, {"student": str(vdir / "final")})
            done.append(v.name)
        if not self.is_main:
            return {}
        atomic_write_json(self.run / "variants.json", {
            v.name: {"label": v.label or v.name, "paper_key": v.paper_key, "init": v.init, "distill": v.distill}
            for v in variants
        })
        return {"variants": [v.name for v in variants], "note": f"{len(done)} variant(s) built"}

    def stage_finetune(self, key: str) -> dict:
        """Fine-tune each model on each task; each (model, task) pair is stamped so a restart resumes.

        A pair's key is its fine-tuning settings, the key of the stage that made its models and the sha256 of
        the task's files: changing one task's settings (or its data) redoes that task only."""
        from .baselines import baseline_variants
        from .config import FinetuneConfig
        from .finetune import finetune

        f = self.cfg.finetune
        def task_seeds(task: str) -> list[int]:
            return (f.per_task.get(task) or {}).get("seeds", f.seeds)

        jobs: list[tuple[str, str, list[int]]] = [("teacher", t, task_seeds(t)) for t in f.tasks if f.teacher]
        jobs += [("student", t, task_seeds(t)) for t in f.tasks]
        for v in self.cfg.variants:
            jobs += [(v.name, t, v.seeds or task_seeds(t)) for t in (v.tasks or f.tasks)]
        for v in baseline_variants(self.cfg):  # baselines: the student's seeds, on finetune.baseline_tasks
            jobs += [(v.name, t, task_seeds(t)) for t in (f.tasks if f.baseline_tasks is None else f.baseline_tasks)]
        wanted = {(m, t) for m, t, _ in jobs}
        for old in (self.run / "finetune").glob("*/*/results.json"):  # a model or task no longer configured:
            if (old.parent.parent.name, old.parent.name) not in wanted:  # its old scores must not reach the report
                shutil.rmtree(old.parent)
                self.stamps.path(f"finetune-{old.parent.parent.name}-{old.parent.name}").unlink(missing_ok=True)
        for model_name, task, seeds in jobs:
            fields = {**f.common, **(f.per_task.get(task) or {}), "seeds": seeds}
            sub = f"finetune-{model_name}-{task}"
            sub_key = _hash({"config": fields, "models": self.keys["variants"], "data": self._task_sums(task)})
            if self.stamps.done(sub, sub_key):
                continue
            t0 = time.perf_counter()
            model = self.teacher_dir if model_name == "teacher" else self.student_dir(model_name)
            out = self.run / "finetune" / model_name / task
            shutil.rmtree(out, ignore_errors=True)
            result = finetune(model, task, str(self.data), str(out), from_dict(FinetuneConfig, fields, f"finetune.{task}"))
            seconds = time.perf_counter() - t0
            self.stamps.write(sub, sub_key, seconds, {"results": str(out / "results.json")})
            self.log(f"[reproduce]   finetune {model_name}/{task}: {result['score']['median']:.1f} "
                     f"({result.get('score_name', '')}, {len(seeds)} seed(s), {seconds:.0f}s)")
        return {"note": f"{len(jobs)} (model, task) runs"}

    def stage_export(self, key: str) -> dict:
        """ONNX (and int8) export of the fine-tuned student (issue 13; off unless `export.enabled`)."""
        if not self.cfg.export.enabled:
            return {"note": "disabled"}
        from .config import FinetuneConfig
        from .export import export_model

        e, f = self.cfg.export, self.cfg.finetune
        unknown = sorted(set(e.tasks) - set(f.tasks))
        if unknown:
            raise DistilkitError(f"export.tasks: {unknown} not fine-tuned in this run (finetune.tasks: {f.tasks})")
        notes = []
        for task in e.tasks or f.tasks:
            fields = {**f.common, **(f.per_task.get(task) or {})}
            model = self.run / "finetune" / "student" / task / "model"
            if not (model / "config.json").is_file():
                raise DistilkitError(f"{model}: no fine-tuned student to export (finetune.save_models must not be none)")
            out = self.run / "export" / "student" / task
            sub, sub_key = f"export-student-{task}", _hash({"int8": e.int8, "fields": fields, "upstream": key})
            if not self.stamps.done(sub, sub_key):
                t0 = time.perf_counter()
                ft = from_dict(FinetuneConfig, fields, f"finetune.{task}")  # the same evaluation subset as fine-tuning
                r = export_model(str(model), str(out), int8=e.int8, task=task, data_dir=str(self.data),
                                 max_eval=ft.max_eval, subset_seed=ft.subset_seed, overwrite=True)
                if not r["check"]["passed"]:
                    raise DistilkitError(f"{out}: ONNX fp32 outputs differ from PyTorch by {r['check']['max_abs_diff']:.3e} "
                                         f"(> {r['check']['tolerance']:.0e})")
                self.stamps.write(sub, sub_key, time.perf_counter() - t0, {"export": str(out / "export.json")})
            r = json.loads((out / "export.json").read_text())
            notes.append(f"{task} int8 cost {r['int8_cost']:+.2f}" if r.get("int8_cost") is not None else task)
        return {"export": str(self.run / "export"), "note": ", ".join(notes)}

    def stage_bench(self, key: str) -> dict:
        b = self.cfg.bench
        if not b.enabled:
            return {"note": "disabled"}
        from .bench import bench, load_sentences

        sentences, source = load_sentences(task=b.task, data_dir=str(self.data), max_sentences=b.max_sentences)
        result = bench(self.teacher_dir, self.student_dir(), sentences, source, rounds=b.rounds)
        atomic_write_json(self.run / "bench" / "bench.json", result)
        return {"bench": str(self.run / "bench" / "bench.json"),
                "note": f"speedup x{result['speedup_bs1']:.2f} at batch 1 on {source.get('source')}"}

    def stage_report(self, key: str) -> dict:
        from .report import write_report

        write_report(str(self.run))
        return {"report": str(self.run / "report.md")}


# =========================================================================== helpers


STAGE_KEY_FILE = ".stage-key.json"  # in a stage's output folder: the key of the stage run that owns it


@contextlib.contextmanager
def _fresh_start_is_fine():
    """Silence train()'s 'no checkpoint to resume from' warning: a claimed folder without one starts afresh."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no checkpoint to resume from", category=UserWarning)
        yield


def _reinitialise(model_dir: Path) -> None:
    """Replace a saved student's weights by a fresh random initialisation (same config, same seed)."""
    import torch

    from .families import load_model

    model, _ = load_model(str(model_dir), "student", str(model_dir))  # DistilBERT, RoBERTa or GPT-2 student
    torch.manual_seed(0)
    fresh = type(model)(model.config)
    fresh.save_pretrained(model_dir, safe_serialization=True)


def _corpus_note(meta: dict) -> str:
    splits = meta.get("splits", {})
    parts = [f"{k}: {v.get('blocks', '?')} blocks / {v.get('tokens', '?')} tokens" for k, v in splits.items()
             if isinstance(v, dict)]
    return ", ".join(parts)


def _adapt_note(result: dict | None) -> str:
    if not isinstance(result, dict):
        return ""
    before, after = result.get("before", {}), result.get("after", {})
    if "mlm_accuracy" in before and "mlm_accuracy" in after:
        return f"held-out MLM top-1 {before['mlm_accuracy']:.1%} -> {after['mlm_accuracy']:.1%}"
    return ""


def _distill_note(result: dict | None) -> str:
    if not isinstance(result, dict):
        return ""
    keys = [k for k in ("steps", "tokens", "tokens_per_s") if k in result]
    return ", ".join(f"{k} {result[k]:.0f}" if isinstance(result[k], float) else f"{k} {result[k]}" for k in keys)


def reproduce(preset: str, data_dir: str, out: str, overrides: list[str] | None = None,
              from_stage: str | None = None, command: str | None = None, until: str | None = None) -> list[dict]:
    cfg = load_preset(preset, overrides)
    return Pipeline(cfg, data_dir, out, command=command, preset=preset).run_all(from_stage, until)
