"""Typed configs: YAML + `key=value` overrides, type conversion and one-line errors."""

from __future__ import annotations

import pytest

from distilkit.config import DistillConfig, FinetuneConfig, TrainConfig, apply_overrides, load_config
from distilkit.losses import LossConfig
from distilkit.masking import MaskingConfig
from distilkit.pipeline import ReproduceConfig, VariantSection
from distilkit.utils import DistilkitError


def test_overrides_convert_types():
    cfg = apply_overrides(DistillConfig(), ["steps=7", "lr=1e-4", "smoothing=0.7", "kl_positions=all", "betas=[0.9,0.99]"])
    assert (cfg.steps, cfg.lr, cfg.smoothing, cfg.kl_positions, cfg.betas) == (7, 1e-4, 0.7, "all", [0.9, 0.99])
    assert apply_overrides(cfg, ["smoothing=null"]).smoothing is None
    assert apply_overrides(FinetuneConfig(), ["seeds=1"]).seeds == [1]
    assert apply_overrides(FinetuneConfig(), ["seeds=3,4"]).seeds == [3, 4]
    assert apply_overrides(FinetuneConfig(), ["seeds=[1, 2, 5]"]).seeds == [1, 2, 5]


def test_nested_sections_and_lists():
    cfg = ReproduceConfig(variants=[VariantSection(name="a")])
    cfg = apply_overrides(cfg, ["distill.steps=5", "finetune.per_task.cola.max_train=100", "variants.0.distill.alpha_ce=0",
                                "student.layers=[0,2,4]", "corpus.max_lines=10"])
    assert cfg.distill.steps == 5 and cfg.distill.alpha_ce == DistillConfig.alpha_ce  # typed, defaulted
    assert cfg.finetune.per_task == {"cola": {"max_train": 100}}
    assert cfg.variants[0].distill == {"alpha_ce": 0}
    assert cfg.student.layers == [0, 2, 4] and cfg.corpus.max_lines == 10


@pytest.mark.parametrize("item, message", [
    ("stepz=3", "unknown key 'stepz'"),
    ("steps=abc", "expected int"),
    ("steps=1.5", "expected int"),
    ("tensorboard=maybe", "expected true/false"),
    ("steps", "expected key=value"),
])
def test_bad_overrides_are_one_line_errors(item, message):
    with pytest.raises(DistilkitError, match=message) as err:
        apply_overrides(DistillConfig(), [item])
    assert "\n" not in str(err.value)


def test_yaml_file_with_section_and_errors(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("distill:\n  steps: 3\n  alpha_ce: 0\nother: 1\n")
    cfg = load_config(DistillConfig, good, ["lr=1e-3"], section="distill")
    assert (cfg.steps, cfg.alpha_ce, cfg.lr) == (3, 0.0, 1e-3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\n  lr: [\n")
    with pytest.raises(DistilkitError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(DistillConfig, bad)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("alpha: 1\n")
    with pytest.raises(DistilkitError, match="unknown key"):
        load_config(DistillConfig, unknown)
    with pytest.raises(DistilkitError, match="no such config file"):
        load_config(DistillConfig, tmp_path / "missing.yaml")


def test_typed_sections_reject_typos_in_overrides():
    """`--set` on a typed section checks the key and the type (distill and adapt_config are dataclasses)."""
    with pytest.raises(DistilkitError, match="unknown key 'alpha_coss' for DistillConfig"):
        apply_overrides(ReproduceConfig(), ["distill.alpha_coss=1"])
    with pytest.raises(DistilkitError, match="expected int"):
        apply_overrides(ReproduceConfig(), ["adapt_config.steps=many"])
    assert apply_overrides(ReproduceConfig(), ["adapt_config.steps=7"]).adapt_config.steps == 7


def test_defaults_are_stated_once():
    """MaskingConfig and LossConfig take their defaults from TrainConfig and DistillConfig."""
    for name in ("mlm_prob", "mask_frac", "random_frac", "smoothing"):
        assert getattr(MaskingConfig(), name) == getattr(TrainConfig(), name)
    for name in ("alpha_ce", "alpha_mlm", "alpha_cos", "temperature", "kl_positions"):
        assert getattr(LossConfig(), name) == getattr(DistillConfig(), name)


def test_named_preset_is_a_config_file():
    """A name that is not a file is looked up among the shipped presets (`--config cpu` reads its section)."""
    cfg = load_config(DistillConfig, "cpu", ["steps=3"], section="distill")
    assert (cfg.steps, cfg.batch_size) == (3, 32)
    with pytest.raises(DistilkitError, match="no such config file.*quick"):
        load_config(DistillConfig, "no-such-preset")


def test_bare_no_is_the_string_no_for_a_string_field():
    """YAML reads `no` as false; for a str field (mixed_precision) it must stay the word the user typed."""
    from distilkit.config import DistillConfig, apply_overrides, from_dict

    assert apply_overrides(DistillConfig(), ["mixed_precision=no"]).mixed_precision == "no"
    assert from_dict(DistillConfig, {"mixed_precision": False}).mixed_precision == "no"
