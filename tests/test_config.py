from pathlib import Path

import pytest

from cnnlab.config import Config, dump_config, load_config, with_values
from cnnlab.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_reports_baseline():
    cfg = load_config(None)
    assert (cfg.model.name, cfg.optim.name, cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs) == (
        "lenet", "sgd", 0.9, 256, 20
    )
    assert cfg.init == "xavier_uniform" and cfg.optim.momentum == 0
    assert cfg.data.val_size == 5000


def test_extends_deep_merges_and_names_the_run_after_the_file(tmp_path):
    write(tmp_path / "base.yaml", "name: base\ntrain: {epochs: 7, batch_size: 64}\nmodel: {name: lenet, activation: tanh}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(child)
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 64
    assert cfg.model.kwargs == {"activation": "tanh"}
    assert cfg.name == "child"


def test_extends_loop_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(CONFIGS / "lenet.yaml", ["train.epochs=5", "model.activation=relu", "optim.lr=1e-2",
                                               "model.channels=[8, 24]"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.model.kwargs["activation"] == "relu"
    assert tuple(cfg.model.kwargs["channels"]) == (8, 24)


def test_shipped_configs_all_validate():
    files = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("sweeps", "tune"))
    assert len(files) >= 10
    for path in files:
        assert isinstance(load_config(path), Config)
    relu = load_config(CONFIGS / "lenet_relu.yaml")
    assert relu.model.kwargs["activation"] == "relu" and relu.optim.lr == 0.1
    with pytest.raises(UserError, match="is a search space file .* run it with `cnnlab tune"):
        load_config(CONFIGS / "tune" / "lenet_relu.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "lenet_relu.yaml", ["train.epochs=3"])
    saved = write(tmp_path / "config.yaml", dump_config(cfg))
    # the same config, as written (the reloaded one gives the builder's defaults the file spells out)
    assert dump_config(load_config(saved)) == dump_config(cfg)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  epocs: 3\n", "unknown key 'train.epocs' (did you mean 'train.epochs'?)"),
        ("data:\n  augment:\n    flipp: true\n", "unknown key 'data.augment.flipp' (did you mean 'data.augment.flip'?)"),
        ("optimm: {lr: 0.1}\n", "unknown key 'optimm' (did you mean 'optim'?)"),
        ("optim:\n  lr: fast\n", "optim.lr: Input should be a valid number"),
        ("optim:\n  lr: 0\n", "optim.lr: Input should be greater than 0"),
        ("train:\n  epochs: 0\n", "train.epochs: Input should be greater than or equal to 1"),
        ("train:\n  batch_size: 0\n", "train.batch_size: Input should be greater than or equal to 1"),
        ("train:\n  device: gpu\n", "train.device: must be one of auto, cpu"),
        ("model:\n  name: lenett\n", "unknown model 'lenett' (did you mean 'lenet'"),
        ("model:\n  activaton: relu\n",
         "model.activaton: model 'lenet' takes no argument 'activaton' (did you mean 'model.activation'?)"),
        ("model:\n  activation: swishy\n", "model.activation: Input should be 'sigmoid'"),
        ("model:\n  kernel_size: -1\n", "model.kernel_size"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(tmp_path, text, expected):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path / "bad.yaml", text))
    assert expected in str(info.value)


def test_yaml_syntax_error_reports_the_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "name: x\ntrain:\n  epochs: [1, 2\n  batch_size: 3\n")
    with pytest.raises(UserError, match=r"broken.yaml: YAML syntax error at line \d+, column \d+"):
        load_config(path)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


@pytest.mark.parametrize("override, expected", [
    ("train.epochs", "expected KEY=VALUE"),
    ("train.epocs=3", "unknown key 'train.epocs' (did you mean 'train.epochs'?)"),
    ("=3", "expected KEY=VALUE"),
    ("train..epochs=3", "not a dotted key path"),
])
def test_bad_overrides(override, expected):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_typed_values_win_over_set_strings_and_start_lies_beneath_the_file():
    cfg = load_config(CONFIGS / "lenet.yaml", ["train.epochs=3", "seed=1"], {"train.epochs": 5, "output.dir": Path("on")})
    assert cfg.train.epochs == 5 and cfg.seed == 1 and cfg.output.dir == Path("on")
    assert load_config(None, ["model.width=8"], start={"model.name": "resnet9"}).model.kwargs == {"width": 8}
    assert load_config(CONFIGS / "kernels" / "lenet_k7.yaml", start={"model.name": "resnet9"}).model.name == "lenet"


def test_a_value_set_on_a_loaded_config_is_validated():
    cfg = load_config(None)
    assert with_values(cfg, {"train.device": "cuda:1"}, "trial").train.device == "cuda:1"
    with pytest.raises(UserError, match="trial: invalid config:\n  train.device: must be one of"):
        with_values(cfg, {"train.device": "gpu1"}, "trial")


def test_print_config_and_the_run_folder_spell_out_the_model_builders_defaults(tiny_overrides):
    # --print-config promises every default filled in: the builder's options too, but not image_size, which a run
    # takes from its data where the config leaves it out. A run folder written before (without them) is still the
    # same experiment.
    import yaml
    from typer.testing import CliRunner

    from cnnlab.cli import app
    from cnnlab.engine import fit
    from cnnlab.runs import runs_of

    printed = CliRunner().invoke(app, ["run", "configs/lenet.yaml", "--print-config"])
    assert printed.exit_code == 0, printed.output
    model = yaml.safe_load(printed.stdout)["model"]
    assert model["kernel_size"] == 5 and model["channels"] == [6, 16] and model["hidden"] == [120, 84]
    assert "padding" in model and "dropout" in model and "batch_norm" in model and "image_size" not in model

    cfg = load_config(None, [*tiny_overrides, "train.epochs=1"])
    run = Path(fit(cfg, quiet=True)["run_dir"])
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["model"]["kernel_size"] == 5
    for option in ("kernel_size", "channels", "hidden", "padding", "dropout", "batch_norm", "activation", "pool"):
        written["model"].pop(option, None)  # as cnnlab wrote config.yaml before
    (run / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    assert [found for found, _, _ in runs_of(cfg)] == [run]
