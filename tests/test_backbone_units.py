"""Backbones are registered units that own their config section: a new text-to-image backbone is defined here, in the
test module, without editing the package; its flag parses (command line and YAML), is checked, is warned about when
another backbone is selected, appears in --help of training and evaluation, and survives resume comparisons. What it
does not implement (the planner's, the benchmark's and the fixtures' protocols) is refused in one line."""

from dataclasses import dataclass

import pytest

from branchgrpo import models
from branchgrpo.config import changed_flags, flag, flag_catalogue, parse_train_config, require
from branchgrpo.config.sections import ModelConfig
from branchgrpo.models import register_backbone
from branchgrpo.models.spec import BackboneSpec, SizeFlags, check_sizes


@dataclass
class SharpConfig(SizeFlags):
    """Image size (shared with the other backbones) and a flag of its own."""

    sharpness: float = flag(1.0, "test_sharp: how much the backbone sharpens its images, in [0, 2]")

    DEFAULTS = {"h": 8, "w": 8}

    def validate(self) -> None:
        check_sizes(self, 8, "test_sharp works on 8x8 patches")
        require(0 <= self.sharpness <= 2, f"--sharpness: need a value in [0, 2], got {self.sharpness}")


class SharpSpec(BackboneSpec):
    name = "test_sharp"
    Config = SharpConfig
    needs_pretrained = False


@pytest.fixture
def registered():
    register_backbone(SharpSpec)
    yield SharpSpec
    del models._REGISTRY[SharpSpec.name]


def parse(tmp_path, *args):
    return parse_train_config([*args, "--data_json_path", str(tmp_path)])


def test_its_flag_parses_from_the_command_line_and_yaml(registered, tmp_path):
    cfg = parse(tmp_path, "--model", "test_sharp", "--sharpness", "0.5", "--h", "16")
    assert (cfg.model.backbone.sharpness, cfg.model.backbone.resolved("h"), cfg.model.backbone.resolved("w")) == \
        (0.5, 16, 8)
    assert cfg.flags["sharpness"] == 0.5 and cfg.inapplicable_flags() == []
    (tmp_path / "run.yaml").write_text("model: test_sharp\nsharpness: 1.5\n")
    assert parse(tmp_path, "--config", str(tmp_path / "run.yaml")).model.backbone.sharpness == 1.5


def test_its_section_checks_its_values(registered, tmp_path):
    with pytest.raises(ValueError, match=r"--sharpness: need a value in \[0, 2\], got 3.0"):
        parse(tmp_path, "--model", "test_sharp", "--sharpness", "3")
    with pytest.raises(ValueError, match=r"--h: 12 is not a positive multiple of 8 \(test_sharp works on 8x8"):
        parse(tmp_path, "--model", "test_sharp", "--h", "12")


def test_its_flag_is_reported_under_another_backbone(registered, tmp_path, caplog):
    cfg = parse(tmp_path, "--model", "toy", "--sharpness", "0.5", "--h", "64")
    assert cfg.inapplicable_flags() == [
        "--h (acts only with --model flux, wan, wan_i2v, wan22, wan22_i2v or test_sharp)",
        "--sharpness (acts only with --model test_sharp)"]
    assert "--sharpness (acts only with --model test_sharp)" in caplog.text
    # the evaluation and benchmark CLIs refuse it instead (they build their model section with `for_backbone`)
    with pytest.raises(ValueError, match=r"--sharpness: does not apply to --model flux \(its flags: --h, --w, "
                                         r"--guidance_scale\)"):
        ModelConfig.for_backbone("flux", sharpness=0.5)


def test_its_flag_appears_in_help(registered):
    from branchgrpo.cli.eval import build_parser as eval_parser
    from branchgrpo.config.train import build_parser

    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    section = text[text.index("--model test_sharp:"):]
    assert "--sharpness SHARPNESS" in section and "how much the backbone sharpens" in section
    # the shared --h: each one's own value
    assert "(default: flux 720, wan 480, wan_i2v 480, wan22 480, wan22_i2v 480, test_sharp 8)" in text
    assert "--sharpness SHARPNESS" in eval_parser().format_help()


def test_a_run_written_before_it_was_registered_still_resumes(registered, tmp_path):
    cfg = parse(tmp_path, "--model", "flux", "--pretrained_model_name_or_path", str(tmp_path))
    saved = {name: value for name, value in cfg.flags.items() if name != "sharpness"}
    assert changed_flags(saved, cfg) == ""
    changed = parse(tmp_path, "--model", "flux", "--pretrained_model_name_or_path", str(tmp_path),
                    "--sharpness", "0.5")
    assert changed_flags(saved, changed) == "--sharpness None -> 0.5"


def test_a_shared_flag_must_be_the_same_field(registered):
    @dataclass
    class OtherSize(SharpConfig):
        h: int | None = flag(64, "height in pixels")

    class Clash(BackboneSpec):
        name = "test_clash"
        Config = OtherSize

    register_backbone(Clash)
    try:
        with pytest.raises(ValueError, match="backbone 'test_clash': flag --h clashes with another definition"):
            flag_catalogue()
    finally:
        del models._REGISTRY[Clash.name]


def test_tools_it_does_not_support_refuse_it_in_one_line(registered, tmp_path, capsys):
    from branchgrpo.bench.backbones import load_backbone
    from branchgrpo.cli import plan
    from branchgrpo.cli.make_tiny import kinds, make_tiny

    assert plan.main(["--model", "test_sharp", "--gpus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --model test_sharp: the memory planner does not know this backbone (its spec implements no "
                   "PlannerSupport, models/support.py)")
    with pytest.raises(ValueError, match="--model test_sharp: the benchmark does not know this backbone"):
        load_backbone(ModelConfig(model="test_sharp"), "cpu")
    assert "test_sharp" not in kinds()
    with pytest.raises(ValueError, match="make_tiny test_sharp: make_tiny does not know this backbone"):
        make_tiny("test_sharp", str(tmp_path))
