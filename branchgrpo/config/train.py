"""The run config: its sections (branchgrpo.config.sections) plus the selected algorithm's own section, parsed from
flat official flag names (command line over YAML), validated once before anything is loaded.

    cfg = parse_train_config(argv)        # python -m branchgrpo.cli.train ...
    cfg.sampling.sampling_steps, cfg.optim.learning_rate, cfg.algorithm.tree_split_points, ...
    cfg.flags                             # every flag, flat: what config.json and checkpoints record

The flag catalogue is assembled at parse time from the sections and from every registered backbone's and algorithm's
section (`cfg.model.backbone`, `cfg.algorithm`), so a unit registered by a plugin or a test brings its flags with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass

from branchgrpo.core.flags import (
    add_flag,
    check_value_type,
    either,
    field_types,
    flag_fields,
    load_yaml,
    normalise_yaml_value,
    require,
    section_from,
)
from branchgrpo.config.official import OFFICIAL_FLAGS, add_official_flags, apply_official
from branchgrpo.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RunConfig,
    SamplingConfig,
)

log = logging.getLogger(__name__)

# attribute of TrainConfig -> (section class, --help group title)
SECTIONS = {
    "run": (RunConfig, "run"),
    "sampling": (SamplingConfig, "sampling (schedule, SDE kernel, rollout batching)"),
    "loss": (LossConfig, "loss"),
    "reward": (RewardConfig, "rewards"),
    "model": (ModelConfig, "model and LoRA"),
    "data": (DataConfig, "data"),
    "optim": (OptimConfig, "optimisation and EMA"),
    "parallel": (ParallelConfig, "parallelism and precision"),
    "checkpoint": (CheckpointConfig, "checkpoints"),
    "eval": (EvalConfig, "held-out evaluation"),
    "logging": (LoggingConfig, "logging"),
}


@dataclass(frozen=True)
class Flag:
    name: str
    field: dataclasses.Field
    type: type
    section: str | None  # the TrainConfig attribute, or None for a unit's flag
    algorithms: tuple[str, ...] = ()  # the algorithm units whose section holds it
    backbones: tuple[str, ...] = ()  # the backbone specs whose section holds it


def flag_catalogue() -> dict[str, Flag]:
    """Every flag: the sections' first, then each registered backbone's, then each registered algorithm's."""
    from branchgrpo.algorithms import algorithms
    from branchgrpo.models import backbones

    out: dict[str, Flag] = {}
    for attr, (cls, _) in SECTIONS.items():
        types = field_types(cls)
        for f in flag_fields(cls):
            out[f.name] = Flag(f.name, f, types[f.name], attr)
    _add_unit_flags(out, "backbones", {name: spec.Config for name, spec in backbones().items()})
    _add_unit_flags(out, "algorithms", {name: unit.Config for name, unit in algorithms().items()})
    return out


def _add_unit_flags(out: dict[str, Flag], kind: str, sections: dict[str, type]) -> None:
    """The flags of the units' sections (`kind`: "backbones" or "algorithms"). A flag several units of one kind share
    (--num_generations, --h) is one command-line flag, so it must be the same field in each: same default, type and
    help (take it from a shared base section); a unit's flag may not reuse a run section's or another kind's name."""
    for unit, cls in sections.items():
        types = field_types(cls)
        for f in flag_fields(cls):
            known = out.get(f.name)
            if known is None:
                out[f.name] = Flag(f.name, f, types[f.name], None, **{kind: (unit,)})
                continue
            same = (known.field.default, known.type, known.field.metadata) == (f.default, types[f.name], f.metadata)
            if not (getattr(known, kind) and same):
                raise ValueError(f"{kind[:-1]} '{unit}': flag --{f.name} clashes with another definition of it")
            out[f.name] = dataclasses.replace(known, **{kind: getattr(known, kind) + (unit,)})


def backbone_flag_help(entry: Flag) -> str:
    """A backbone flag's help, with each backbone's own value for it where the field's default defers to it."""
    from branchgrpo.models import backbones

    specs = backbones()
    own = [f"{b} {specs[b].Config.DEFAULTS[entry.name]}" for b in entry.backbones
           if entry.name in specs[b].Config.DEFAULTS]
    return entry.field.metadata["help"] + (f" (default: {', '.join(own)})" if own else "")


def add_backbone_flags(group, names=None) -> None:
    """Every backbone's flags (or those of `names`) as `--name`, absent unless given (the evaluation, benchmark and
    preprocessing CLIs: `ModelConfig.for_backbone(model, path, **given_backbone_flags(args))`)."""
    for entry in flag_catalogue().values():
        if entry.backbones and (names is None or entry.name in names):
            add_flag(group, entry.field, entry.type, backbone_flag_help(entry))


def given_backbone_flags(args) -> dict:
    """The backbone flags present in an argparse namespace of `add_backbone_flags`: those given."""
    catalogue = flag_catalogue()
    return {name: value for name, value in vars(args).items() if name in catalogue and catalogue[name].backbones}


@dataclass
class TrainConfig:
    run: RunConfig
    sampling: SamplingConfig
    loss: LossConfig
    reward: RewardConfig
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    parallel: ParallelConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    logging: LoggingConfig
    algorithm: object  # the selected unit's section (its Config dataclass)
    flags: dict  # every flag of the catalogue, flat, as given or defaulted: what config.json records

    @property
    def unit(self):
        from branchgrpo.algorithms import get_algorithm

        return get_algorithm(self.run.algo)

    def build_algorithm(self):
        """The algorithm unit of this run (fresh schedule state)."""
        return self.unit(self.algorithm, self.sampling, seed=self.run.seed, max_train_steps=self.optim.max_train_steps)

    def sections(self) -> dict[str, object]:
        return {attr: getattr(self, attr) for attr in SECTIONS}

    @property
    def resumable(self) -> frozenset[str]:
        """Flags that may change between a run and its resumption (each section's own declaration)."""
        return frozenset().union(*(type(s).RESUMABLE for s in self.sections().values()))

    # --- validation ------------------------------------------------------------------------------------------
    def validate_algorithm(self):
        """The checks `plan` needs: schedule, loss and the algorithm's own section. Returns the built unit."""
        self.sampling.validate(self.run.algo, self.unit.default_kernel)
        require(self.optim.max_train_steps >= 1, f"--max_train_steps: need >= 1, got {self.optim.max_train_steps}")
        self.loss.validate()
        return self.build_algorithm()

    def validate(self) -> None:
        """Every check that needs no model: run before anything is loaded."""
        algorithm = self.validate_algorithm()
        for attr in ("run", "data", "optim", "reward", "model", "parallel", "checkpoint", "eval", "logging"):
            getattr(self, attr).validate()
        spec = self.model.spec
        require(self.sampling.time_shift != "dynamic" or spec.dynamic_shift,
                f"--time_shift dynamic: the {self.model.model} backbone has no resolution-dependent shift")
        if self.loss.kl_coef > 0 and spec.is_large and not self.model.use_lora:
            log.warning("--kl_coef with a full fine-tune keeps a frozen copy of the backbone (twice the weights)")
        if algorithm.counts(0)["trained_edges"] == 0:
            raise ValueError(f"{self.algorithm.selection_summary() or '--algo ' + self.run.algo}: no edge is left to "
                             "train at iteration 0")
        unused = self.inapplicable_flags()
        if unused:
            log.warning("these flags have no effect in this configuration: %s", "; ".join(unused))

    def inapplicable_flags(self) -> list[str]:
        """Flags set to a non-default value that have no effect with the rest of the configuration, with the
        condition under which they would act: warned about at start-up, never silently ignored."""
        catalogue = flag_catalogue()
        conditions = {}
        for section in self.sections().values():
            conditions.update(section.conditions(self))
        conditions.update(self.algorithm.conditions())
        own = {f.name for section in (self.algorithm, self.model.backbone) for f in flag_fields(type(section))}
        for name, entry in catalogue.items():
            if entry.algorithms and name not in own:
                conditions[name] = (False, "--algo " + either(entry.algorithms))
            elif entry.backbones and name not in own:
                conditions[name] = (False, "--model " + either(entry.backbones))
        return [f"--{name} (acts only with {conditions[name][1]})" for name, entry in catalogue.items()
                if name in conditions and not conditions[name][0] and self.flags[name] != entry.field.default]


def config_from_flags(values: dict, validate: str = "all") -> TrainConfig:
    """A TrainConfig from flat flag values (the rest default). `validate`: "all" (training), "algorithm" (what
    `plan` needs) or "none"."""
    from branchgrpo.algorithms import get_algorithm

    catalogue = flag_catalogue()
    unknown = sorted(set(values) - set(catalogue))
    if unknown:
        raise ValueError(f"unknown flag(s) {unknown}")
    flags = {name: entry.field.default for name, entry in catalogue.items()}
    flags.update(values)
    for name, entry in catalogue.items():
        check_value_type(name, flags[name], entry.type)
    unit = get_algorithm(flags["algo"])
    sections = {attr: section_from(cls, flags) for attr, (cls, _) in SECTIONS.items()}
    model = sections["model"]
    model.backbone = section_from(model.spec.Config, flags)
    cfg = TrainConfig(**sections, algorithm=section_from(unit.Config, flags), flags=flags)
    if validate == "all":
        cfg.validate()
    elif validate == "algorithm":
        cfg.validate_algorithm()
    return cfg


def algorithm_from_flags(**values):
    """The algorithm unit of a configuration given as flags, validated (for notebooks and tests)."""
    return config_from_flags(values, validate="algorithm").build_algorithm()


def build_parser(description: str = "Train with BranchGRPO and relatives.", extra_args=None,
                 prog: str = "branchgrpo-train") -> argparse.ArgumentParser:
    from branchgrpo.algorithms import algorithms
    from branchgrpo.models import backbones

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file of flag values (CLI flags override it)")
    if extra_args:
        extra_args(parser)
    catalogue = flag_catalogue()
    groups = {attr: parser.add_argument_group(title) for attr, (_, title) in SECTIONS.items()}
    # a unit's group holds the flags it is the first to take (a shared flag is listed once)
    units = {("model", name): f"--model {name}" for name in backbones()}
    units.update({("algo", name): f"--algo {name}" for name in algorithms()})
    groups.update({unit: parser.add_argument_group(title) for unit, title in units.items()})
    for entry in catalogue.values():
        if entry.backbones:
            add_flag(groups["model", entry.backbones[0]], entry.field, entry.type, backbone_flag_help(entry))
        else:
            add_flag(groups[entry.section or ("algo", entry.algorithms[0])], entry.field, entry.type)
    add_official_flags(parser)
    return parser


def parse_flags(argv=None, description: str = "Train with BranchGRPO and relatives.", extra_args=None,
                prog: str = "branchgrpo-train") -> tuple[dict, argparse.Namespace]:
    """Command line over `--config` YAML -> (flat flag values given, namespace of `extra_args`' arguments)."""
    ns = build_parser(description, extra_args, prog).parse_args(argv)
    values = load_yaml(ns.config) if ns.config is not None else {}
    catalogue = flag_catalogue()
    official = {k: values.pop(k) for k in list(values) if k in OFFICIAL_FLAGS}
    unknown = sorted(set(values) - set(catalogue))
    if unknown:
        raise ValueError(f"{ns.config}: unknown option(s) {unknown}")
    values = {k: normalise_yaml_value(v, catalogue[k].type) for k, v in values.items()}
    given = vars(ns)
    values.update({k: v for k, v in given.items() if k in catalogue})
    official.update({k: v for k, v in given.items() if k in OFFICIAL_FLAGS})
    apply_official(values, official)
    extras = argparse.Namespace(**{k: v for k, v in given.items()
                                   if k not in catalogue and k not in OFFICIAL_FLAGS and k != "config"})
    return values, extras


def parse_train_config(argv=None) -> TrainConfig:
    values, _ = parse_flags(argv)
    return config_from_flags(values)


def changed_flags(saved: dict, cfg: TrainConfig) -> str:
    """The flags of `cfg` that differ from a run's `saved` flags, except the sections' RESUMABLE ones, as
    "--name old -> new, ..." ('' when the runs are the same experiment)."""
    resumable = cfg.resumable
    # a flag added after the run was written (by a section, a unit, or a unit registered since), left at its
    # default, reproduces the old behaviour
    added = {name for name, entry in flag_catalogue().items()
             if name not in saved and cfg.flags.get(name) == entry.field.default}
    changed = {k: (saved.get(k), v) for k, v in cfg.flags.items()
               if k not in resumable and k not in added and saved.get(k) != v}
    return ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))


def check_resume_config(saved: dict, cfg: TrainConfig, path) -> None:
    """Refuse to resume with flags that differ from the checkpoint's run, except the sections' RESUMABLE ones: it
    would silently train a different experiment from the checkpoint's state."""
    detail = changed_flags(saved, cfg)
    if detail:
        raise ValueError(f"--resume_from_checkpoint {path}: flags differ from the checkpoint's run ({detail}); "
                         "resume with the original flags")
