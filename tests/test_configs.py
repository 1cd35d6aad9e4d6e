"""The shipped configs compose: every setup (configs/setup/) with every method overlay (configs/method/)
and every scale-out overlay (configs/scale/, or none) parses; a sample of the combinations, covering
each method, each setup and each DDP/FSDP overlay at least once, instantiates its classes.

Parsing checks every key and type of the merged config against the classes' signatures (a renamed
option or a typo in any file fails here). Instantiating all ~470 combinations would cost CI minutes
for little: a class that builds for one setup builds for the others, which differ only in values.
"""

import itertools

import pytest
import yaml

from conftest import REPO
from eaft_pl.cli import cli_main
from eaft_pl.loss.gates import Gate

CONFIGS = REPO / "configs"
SETUP, METHOD, SCALE = CONFIGS / "setup", CONFIGS / "method", CONFIGS / "scale"

#: A setup is the files that make a whole run before its method: the paper's recipes share paper.yaml.
SETUPS = {
    "quickstart": [SETUP / "quickstart.yaml"],
    "toy_pretrain": [SETUP / "toy_pretrain.yaml"],
    "toy_finetune": [SETUP / "toy_finetune.yaml"],
    "smollm2_math": [SETUP / "smollm2_math.yaml"],
    **{d: [SETUP / "paper.yaml", SETUP / f"{d}.yaml"] for d in ("qwen3_4b_math", "qwen3_4b_medical", "qwen3_4b_agentic")},
}
METHODS = sorted(p.stem for p in METHOD.glob("*.yaml"))
SCALES = [None, *sorted(p.stem for p in SCALE.glob("*.yaml"))]
#: DeepSpeed's strategy needs the deepspeed package (a GPU extra) to be built: parsed, not instantiated.
INSTANTIABLE_SCALES = [s for s in SCALES if s is None or not s.startswith("deepspeed")]
#: Instantiation runs on this machine: no GPU, no logger, whatever the files say.
CPU = ["--trainer.accelerator=cpu", "--trainer.logger=false"]


def config_args(setup, method, scale):
    files = [*SETUPS[setup], METHOD / f"{method}.yaml", *([SCALE / f"{scale}.yaml"] if scale else [])]
    return [a for f in files for a in ("--config", str(f))]


def test_every_file_belongs_to_a_known_folder():
    # A file outside setup/, method/ and scale/ would escape the cross-product below.
    folders = {p.relative_to(CONFIGS).parts[0] for p in CONFIGS.rglob("*.yaml")}
    assert folders == {"setup", "method", "scale"}
    named = {f for files in SETUPS.values() for f in files}
    assert set(SETUP.glob("*.yaml")) == named, "a setup file that no entry of SETUPS uses"
    assert len(METHODS) >= 13 and len(SCALES) >= 6


@pytest.fixture(scope="module")
def parser():
    # One CLI's parser parses every combination without instantiating anything.
    cli = cli_main(["--config", str(SETUP / "quickstart.yaml"), *CPU], run=False)
    return cli.parser


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_every_method_and_scale_parses_on_each_setup(setup, parser):
    failures = {}
    for method, scale in itertools.product(METHODS, SCALES):
        try:
            config = parser.parse_args(config_args(setup, method, scale))
        except SystemExit as err:  # jsonargparse reports the bad key on stderr and exits
            failures[(method, scale)] = err
            continue
        gate = config["model"]["init_args"]["gate"]
        assert gate["class_path"].startswith("eaft_pl.loss."), (method, scale, gate)
    assert not failures, sorted(failures)


def sample():
    """Each method once, with the setups and the instantiable scale overlays taken in turn."""
    setups, scales = itertools.cycle(sorted(SETUPS)), itertools.cycle(INSTANTIABLE_SCALES)
    return [(next(setups), method, next(scales)) for method in METHODS]


def test_the_sample_covers_every_method_setup_and_scale():
    chosen = sample()
    assert {m for _, m, _ in chosen} == set(METHODS)
    assert {s for s, _, _ in chosen} == set(SETUPS)
    assert {s for _, _, s in chosen} == set(INSTANTIABLE_SCALES)


@pytest.mark.parametrize("setup,method,scale", sample(), ids=lambda v: str(v))
def test_a_sample_of_combinations_instantiates(setup, method, scale, tmp_path, monkeypatch, no_downloads):
    monkeypatch.chdir(tmp_path)
    cli = cli_main([*config_args(setup, method, scale), *CPU], run=False)
    assert isinstance(cli.model.gate, Gate) and cli.datamodule is not None
    named = yaml.safe_load((METHOD / f"{method}.yaml").read_text())["model"]["init_args"]["gate"]["class_path"]
    assert type(cli.model.gate).__name__ == named.rsplit(".", 1)[1]
