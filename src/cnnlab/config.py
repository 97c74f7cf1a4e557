"""Usage: ``cfg = load_config("configs/lenet.yaml", ["optim.lr=0.1"], {"train.epochs": 5})``.

One typed experiment config. Precedence, lowest first: the defaults below < the file a config
``extends`` < the YAML file itself < ``--set key=value`` overrides < typed values (``--epochs`` and
the other command-line options, a sweep's grid point). Everything is validated before
any training starts; errors name the full key path and, for a misspelt key, the closest valid one.
The defaults reproduce the lab report's baseline (LeNet, sigmoid, SGD lr 0.9, batch 256, 20 epochs)
except that a real validation split is held out and inputs are normalised.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cnnlab.data.spec import DEFAULT, MAX_SIDE
from cnnlab.errors import UserError


class Section(BaseModel):
    # inf and nan are never a sensible learning rate, decay or ratio: rejected everywhere
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(Section):
    """On-device augmentation of training batches; all off by default (the report used none)."""

    crop_padding: int = Field(0, ge=0, le=14)  # random crop: pad by this many pixels, crop back to the image size; 0 = off
    flip: bool = False  # horizontal flip with probability 0.5
    erasing: float = Field(0.0, ge=0, le=1)  # probability of erasing one random rectangle per image
    # TrivialAugment: each image one operation drawn from 13 (shear, translate, rotate, brightness, colour, contrast,
    # sharpness, posterize, solarize, autocontrast, identity) at a random strength; before the crop, flip and erasing
    trivial: bool = False
    # Mixup: each training batch blended with itself in reverse order, images and labels alike, by a weight drawn
    # from Beta(mixup, mixup) per batch (0.2-1 is usual); 0 = off. The loss takes the blended (soft) labels; the
    # training accuracy counts each image's own label
    mixup: float = Field(0.0, ge=0, le=100)
    # CutMix: a rectangle of each image replaced by the same rectangle of the batch's reverse order, the labels
    # weighted by area; its size drawn from Beta(cutmix, cutmix) per batch (1 is usual); 0 = off. With mixup
    # as well, each batch is one or the other, half the time each
    cutmix: float = Field(0.0, ge=0, le=100)


class DataConfig(Section):
    name: str = DEFAULT  # the data set, by its name in cnnlab.data.registry
    # folder with the data set's files; None searches the data set's usual places ($CNNLAB_DATA, cnnlab's cache...)
    root: Path | None = None
    download: bool = False  # fetch through torchvision's mirrors if no local copy is found (never otherwise)
    # training images held out for validation (stratified, fixed by seed): a count (5000) or a fraction below 1 (0.1 =
    # a tenth); 0 = the report's mode: test set every epoch
    val_size: int | float = Field(5000, ge=0)
    # subtract the training split's pixel mean, divide by its std (per channel); false = the report's raw [0, 1] pixels;
    # weights = the mean and std of the data model.weights (a library's named weights) were trained on
    normalize: bool | Literal["weights"] = True
    check_counts: bool = True  # require the data set's own image counts; turn off for other files in its format
    # which labels, for a data set with two kinds (cifar100: 100 fine classes, or 20 coarse superclasses); others have fine only
    labels: Literal["fine", "coarse"] = "fine"
    # data.name: folder without a test/ folder: images held out for testing, stratified and fixed by the file list
    # (never by seed): a fraction below 1 (0.1 = a tenth) or a count (1000)
    test_size: int | float = Field(0.1, gt=0)
    skip_bad: bool = False  # data.name: folder: skip images that cannot be decoded (counted in summary.json), not exit 2
    # resize every image once as it is loaded (antialiased): one side, or [height, width]; null = the set's own size
    image_size: Annotated[int, Field(ge=1, le=MAX_SIDE)] | tuple[Annotated[int, Field(ge=1, le=MAX_SIDE)],
                                                                 Annotated[int, Field(ge=1, le=MAX_SIDE)]] | None = None
    channels: Literal["auto", 1, 3] = "auto"  # 3 repeats a grey set's channel, 1 makes colour grey (BT.601 luma)
    # class names (index = label) for data whose files do not name them (npz); null = "0" to "K-1"
    classes: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(None, min_length=1)
    # where the pixels stay while training: auto (on the device when they fit, else host memory, else the cache file
    # memory-mapped), device, host (pinned on CUDA, batches copied ahead), mapped (data.name: folder's cache file)
    placement: Literal["auto", "device", "host", "mapped"] = "auto"
    augment: AugmentConfig = AugmentConfig()

    @field_validator("val_size", "test_size")
    @classmethod
    def _fraction_or_count(cls, size: int | float) -> int | float:
        if isinstance(size, float) and size >= 1:
            raise ValueError("a fraction is below 1 (0.1 = a tenth of the images); a count is a whole number (1000)")
        return size


class ModelConfig(BaseModel):
    """``name`` picks a builder from the registry; every other key is a keyword argument of it."""

    model_config = ConfigDict(extra="allow", validate_assignment=False)

    name: str = "lenet"
    # pretrained weights: a file (.pt/.pth state dict, .safetensors), or a library model's named weights (DEFAULT,
    # IMAGENET1K_V1, a timm tag) from the local cache; null = the initialisation of `init`
    weights: str | None = Field(None, min_length=1)
    download: bool = False  # fetch named weights that are not in the local cache (--download); never otherwise

    @property
    def kwargs(self) -> dict[str, Any]:
        """The builder's own options: every key but those above."""
        return dict(self.model_extra or {})


FLOAT32_MAX = 3.4e38  # larger numbers cannot enter a float32 optimiser step at all


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"  # the report used plain SGD
    lr: float = Field(0.9, gt=0, le=FLOAT32_MAX)  # peak learning rate (the report's LeNet: 0.9)
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD only; the report used none
    nesterov: bool = False  # SGD only; needs momentum > 0
    weight_decay: float = Field(0.0, ge=0, le=FLOAT32_MAX)  # L2 penalty (decoupled for adamw)
    # the backbone's learning rate as a fraction of lr (the head, the model's last layer, trains at lr); null = all at lr
    backbone_lr: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov: true needs name: sgd and momentum > 0")
        return self


class ScheduleConfig(Section):
    name: Literal["constant", "step", "cosine", "onecycle"] = "constant"  # learning-rate shape over training
    warmup_epochs: float = Field(0.0, ge=0)  # linear ramp from 0 to lr over this many epochs (fractions allowed)
    step_size: int = Field(10, ge=1)  # step: epochs between decays
    gamma: float = Field(0.1, gt=0, le=1)  # step: factor applied at each decay
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine / onecycle: final lr as a fraction of lr
    pct_start: float = Field(0.25, gt=0, lt=1)  # onecycle: fraction of training spent rising (when warmup_epochs is 0)


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class EmaConfig(Section):
    """An exponential moving average of the weights (train.ema), updated after every optimiser step: give one of
    decay and half_life."""

    decay: float | None = Field(None, gt=0, lt=1)  # the average's share kept at each optimiser step (0.999, say)
    half_life: float | None = Field(None, gt=0)  # in epochs: a step's weight in the average halves after this many

    @model_validator(mode="after")
    def _one_rate(self) -> EmaConfig:
        if (self.decay is None) == (self.half_life is None):
            raise ValueError("give one of decay (per optimiser step, e.g. 0.999) and half_life (in epochs, e.g. 0.5)")
        return self

    def decay_per_step(self, steps_per_epoch: int) -> float:
        if self.decay is not None:
            return self.decay
        return 0.5 ** (1 / (self.half_life * steps_per_epoch))


class SwaConfig(Section):
    """An equal average of the weights at the end of each of the last epochs (train.swa, SWA-style), its BatchNorm
    statistics recomputed on the training split once training ends."""

    epochs: int = Field(ge=1)  # how many of the last epochs: the weights at the end of each count once


class TrainConfig(Section):
    epochs: int = Field(20, ge=1)  # passes over the training split
    batch_size: int = Field(256, ge=1)  # images per optimiser step
    # gradient accumulation: each batch's forward and backward passes in this many parts (gradients added up, one
    # optimiser step per batch), so a large batch_size fits a small device; the same step as one pass, except
    # that BatchNorm sees the smaller parts
    accumulate: int = Field(1, ge=1)
    eval_batch_size: int = Field(1024, ge=1)  # images per forward pass when evaluating (no effect on results)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype for forward passes; fp16 adds a gradient scaler
    # torch.compile the model (slow first epoch, faster after; best on GPUs); true: its default mode,
    # or a mode by name (reduce-overhead: CUDA graphs of the compiled forward and backward).
    compile: bool | Literal["reduce-overhead", "max-autotune"] = False
    # NHWC memory layout. auto: on for the CPU (convolutions about 20% faster on a 2-core CPU),
    # off for GPUs (it cost LeNet 26% of its speed on an H200, measured; set true for large convolutions in bf16)
    channels_last: bool | Literal["auto"] = "auto"
    # The training and evaluation steps as one CUDA-graph replay per batch (capture.py). auto: on CUDA when
    # the run allows it; true: also elsewhere, run eagerly; emulate: a CUDA graph's rules on any device
    # (slow: for checking on a CPU that a model and its options can be captured).
    cuda_graphs: bool | Literal["auto", "emulate"] = "auto"
    tf32: bool = True  # on Ampere and newer GPUs: TF32 for fp32 matmuls and convolutions (faster; ~1e-3 relative precision)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing
    grad_clip: float | None = Field(None, gt=0)  # clip the global gradient norm to this value; null = off
    patience: int | None = Field(None, ge=1)  # early stopping: epochs without a better val accuracy; null = off
    # CPU threads for torch. auto: torch's default capped at the CPUs this process may use (affinity, cgroup quota,
    # physical cores), saying when a busy machine would run faster with fewer; fastest: take the faster count then
    # (seeded results depend on the thread count); a number: exactly that many. null means auto.
    threads: Annotated[int, Field(ge=1)] | Literal["auto", "fastest"] | None = "auto"
    sync_bn: bool = True  # under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    # parameters kept as they are: module-name prefixes (layer1, features.0), or backbone = all but the head (the model's
    # last layer); BatchNorm running statistics still follow the data
    freeze: list[Annotated[str, Field(min_length=1)]] = []
    # an exponential moving average of the weights ({half_life: 0.5} epochs, or {decay: 0.999} per step), evaluated
    # every epoch beside the weights themselves and tested beside them, saved in checkpoints as `ema`; null = off
    ema: EmaConfig | None = None
    # SWA-style: the equal average of the weights at the end of each of the last {epochs: N} epochs, BatchNorm's
    # statistics recomputed over the training split, validated and tested beside the weights at the end, saved in
    # the last checkpoint as `swa` (README's config reference: what it gave, measured); null = off
    swa: SwaConfig | None = None
    # which epoch's weights the test pass takes, for the weights and their moving average each: best (each at its own
    # best validation accuracy, checkpointed as best.pt and best_ema.pt), last (the final epoch's), or auto: last when
    # the schedule ends within 1% of zero and nothing stops training early, best otherwise (summary.json's selection
    # says which and why). The average of the last epochs (swa) is always the last epoch's.
    select: Literal["auto", "best", "last"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.accumulate > 1 and 2 * self.accumulate > self.batch_size:
            raise ValueError(f"accumulate: {self.accumulate} parts of a batch of {self.batch_size} leaves parts of "
                             "fewer than two images (BatchNorm cannot train on one); choose accumulate <= batch_size / 2")
        if self.swa is not None and self.swa.epochs > self.epochs:
            raise ValueError(f"swa.epochs: {self.swa.epochs} last epochs to average, but epochs is {self.epochs}; "
                             "choose swa.epochs <= epochs")
        return self

    @field_validator("threads", mode="before")
    @classmethod
    def _thread_count(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if value is None or value in ("auto", "fastest") or (isinstance(value, int) and not isinstance(value, bool)
                                                             and value >= 1):
            return value
        raise PydanticCustomError("threads", "expected a number of threads (1 or more), auto or fastest")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("must be one of auto, cpu, cuda, cuda:N (N a GPU index) or mps")
        return value


class OutputConfig(Section):
    dir: Path = Path("results")  # runs go to <dir>/<name>/<run id>/ ('~' is the home folder)
    checkpoints: bool = True  # write checkpoints/best.pt and last.pt (full training state: resume needs them)
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = []  # also log to TensorBoard (<run>/tb), MLflow, W&B (<run>/wandb)
    # every N training steps, the loggers also record the training loss and accuracy of those steps and the
    # learning rate, at the global step; null: once per epoch only
    log_every_n_steps: int | None = Field(None, ge=1)
    mlflow_uri: str | None = None  # MLflow tracking URI; null: SQLite mlflow.db in output.dir (a sweep's: its results root)

    @field_validator("dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()


TtaName = Literal["flip", "crop"]
TTA_NAMES: tuple[str, ...] = get_args(TtaName)  # the test-time augmentations there are (eval.tta, cnnlab eval --tta)
# The test figures a run can give as its answer (eval.headline): the weights themselves, their moving average
# (train.ema) or the average of the last epochs (train.swa), each plain or with the test-time augmentation (eval.tta).
Headline = Literal["test_acc", "test_acc_tta", "test_acc_ema", "test_acc_ema_tta", "test_acc_swa", "test_acc_swa_tta"]
HEADLINES: tuple[str, ...] = get_args(Headline)


class EvalConfig(Section):
    # test-time augmentation of the final test pass, reported beside the plain figures (summary.json test_acc_tta):
    # flip averages the logits of each image and its mirror image (left-right), only for data whose labels survive
    # a mirror (clothes, objects; not digits or letters); crop averages those of the image and of it shifted by one
    # pixel up-left and down-right (as a random crop would); both: all six
    tta: list[TtaName] = []
    # the run's answer, declared before the test set is seen: printed first and labelled, and the column compare,
    # report, sweep and tune lead with (the other figures stay beside it). auto: the most averaged weights the run
    # has (swa, else ema, else the weights themselves), with eval.tta when it is set.
    headline: Literal["auto"] | Headline = "auto"

    @field_validator("tta")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names an augmentation twice; give each once, e.g. [flip]")
        return value


MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds


class Config(Section):
    """A whole experiment. Saved, resolved, as config.yaml in every run folder."""

    name: str = Field("experiment", min_length=1)  # experiment name; the results sub-folder (sanitised)
    seed: int = Field(0, ge=0, le=MAX_SEED)  # seeds the split, the initial weights and the batch order
    # weight init of Conv2d / Linear (the report: xavier_uniform)
    init: Literal["xavier_uniform", "kaiming", "default"] = "xavier_uniform"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise ValueError("must not contain control characters (newlines, tabs, terminal escapes)")
        return value

    @model_validator(mode="after")
    def _headline_measured(self) -> Config:
        wanted = self.eval.headline
        if wanted == "auto":
            return self
        needs = [("train.ema", self.train.ema is not None) if "_ema" in wanted else None,
                 ("train.swa", self.train.swa is not None) if "_swa" in wanted else None,
                 ("eval.tta", bool(self.eval.tta)) if wanted.endswith("_tta") else None]
        missing = [name for name, present in filter(None, needs) if not present]
        if missing:
            raise ValueError(f"eval.headline: {wanted} is not measured without {' and '.join(missing)}; set "
                             f"{' and '.join(missing)}, or choose a figure the run measures (auto picks one)")
        return self

    def headline(self) -> str:
        """The figure this run gives as its answer: eval.headline, or what auto makes of the config's options."""
        if self.eval.headline != "auto":
            return self.eval.headline
        weights = "_swa" if self.train.swa is not None else "_ema" if self.train.ema is not None else ""
        return f"test_acc{weights}{'_tta' if self.eval.tta else ''}"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe values (paths as strings, tuples as lists)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Loading: YAML, ``extends``, overrides, and errors a person can act on.


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file; syntax errors are reported with their line and column."""
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise UserError(f"config file not found: {path}{hint}. Pass the path of a .yaml file, e.g. configs/lenet.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; a config must be UTF-8 YAML") from None
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: nested too deeply or too large to be a config") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` wins; nested mappings merge key by key, anything else is replaced whole."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``deep_merge``, except that naming a different ``model.name`` starts the model's options afresh
    (a VGG config extending a LeNet one must not inherit LeNet's ``activation``)."""
    merged = deep_merge(base, override)
    new_model, old_model = override.get("model"), base.get("model")
    if isinstance(new_model, dict) and "name" in new_model:
        old_name = old_model.get("name", "lenet") if isinstance(old_model, dict) else "lenet"
        if new_model["name"] != old_name:
            merged["model"] = new_model
    return merged


def resolve_extends(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping merged over the file it ``extends`` (relative to it), recursively."""
    path = path.resolve() if path.exists() else path
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise UserError(f"config inheritance loops: {chain}. Remove one of the 'extends' keys")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: 'extends' must be a path to another YAML file, got {parent!r}")
    base = resolve_extends(path.parent / parent, (*_seen, path))
    base.pop("name", None)  # a run is named after the file that was run, not the base it extends
    return merge_configs(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` -> (["train", "epochs"], 5); the value is read as YAML (5, 0.1, relu, [3, 5])."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
    parts = key.split(".")
    if any(not p for p in parts):
        raise UserError(f"--set {text!r}: {key!r} is not a dotted key path like train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own: take it as a plain string
    return parts, value


def split_values(raw: str) -> list[str]:
    """``"0.05,0.1"`` -> ``["0.05", "0.1"]``: a --set value split at its commas, except those inside brackets,
    braces or quotes (``[3, 5]`` and ``"a,b"`` are one value each)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(raw):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    return [*parts, raw[start:]]


def set_value(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``data`` with the dotted ``key`` (``"train.epochs"``) set to ``value``, nested mappings kept."""
    parts = key.split(".")
    patch: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        patch = {part: patch}
    return merge_configs(data, patch)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        data = set_value(data, ".".join(parts), value)
    return data


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid key names at the config level that ``loc`` points into (for 'did you mean')."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for error in err.errors():
        loc = tuple(error["loc"])
        path = ".".join(str(p) for p in loc)
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1, cutoff=0.6)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            valid = ", ".join(_fields_at(loc[:-1]))
            lines.append(f"unknown key '{path}'{hint}; valid keys here: {valid}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            got = error.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path or 'config'}: {message}{shown}")
    return f"{source}: invalid config:\n  " + "\n  ".join(lines)


def validate(data: dict[str, Any], source: str = "config", trust_code: bool = True) -> Config:
    """``data`` as a ``Config``, in two passes: the values alone first (a mistake there is said without
    importing PyTorch, which the model registry needs), then the names in it against what cnnlab knows
    (``check_names``)."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None
    problems = check_names(cfg, trust_code)
    if problems:
        raise UserError(f"{source}: invalid config:\n  " + "\n  ".join(problems))
    return cfg


def check_names(cfg: Config, trust_code: bool = True) -> list[str]:
    """What is wrong with the names ``cfg`` gives (the data set, the model and its options, its weights), as
    lines; the model's options are put in the types its builder takes. ``trust_code`` False refuses a Python
    model (``module:function``) rather than importing it."""
    from cnnlab.data.registry import DATA_SETS
    from cnnlab.models import registry
    from cnnlab.models.weights import check_reference, is_file

    problems = []
    if cfg.data.name not in DATA_SETS:
        problems.append(f"data.name: unknown data set {cfg.data.name!r}; cnnlab knows {', '.join(sorted(DATA_SETS))}")
    model = cfg.model
    if ":" in model.name and not trust_code:
        problems.append(f"model.name: {model.name!r} is Python code (module {model.name.partition(':')[0]!r}); cnnlab "
                        "does not import code named by a results folder it reads back. If you trust whoever wrote this "
                        "run, pass --trust-code")
    else:
        try:
            checked = registry.validate_model_args(model.name, model.kwargs)
            if model.weights is not None:
                check_reference(model.name, model.weights)
        except UserError as err:
            problems.append(str(err))
        else:
            model.__pydantic_extra__ = checked
    weights = model.weights
    if cfg.data.normalize == "weights" and (weights is None or is_file(weights)):
        given = "sets no model.weights" if weights is None else f"has model.weights: {weights}, a file, which records none"
        problems.append(f"data.normalize: weights takes the mean and std a library records for its named weights "
                        f"(model.weights: DEFAULT, say), and this config {given}; use data.normalize: true")
    return problems


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    *,
    start: dict[str, Any] | None = None,
    trust_code: bool | None = None,
) -> Config:
    """Read, inherit, override and validate one experiment config.

    Typed values stay typed: ``values`` and ``start`` map dotted keys to values (``{"train.epochs": 5}``),
    never formatted into ``--set`` text. Precedence, lowest first: the defaults < ``start`` (what a
    config without a file starts from: ``cnnlab summary MODEL``'s model name) < the file ``path``
    < ``overrides`` (``--set`` strings) < ``values`` (command-line options such as ``--epochs``, a
    sweep's grid point). ``path=None`` starts from the defaults. A config without ``name`` is named
    after its file. ``trust_code=False`` (a config read back from someone's run folder) refuses a
    Python model (``model.name: module:function``) instead of importing it; the default, None,
    trusts a config the user wrote and not the ``config.yaml`` of a run folder.
    """
    if trust_code is None:
        trust_code = path is None or not is_run_folder_config(Path(path))
    data = set_values({}, start)
    source = "defaults"
    if path is not None:
        path = Path(path)
        read = resolve_extends(path)
        read.setdefault("name", path.stem)
        source = str(path)
        if "space" in read and "base" in read:
            raise UserError(f"{path} is a search space file (it has base/space keys); run it with `cnnlab tune {path}`")
        if {"grid", "base"} & set(read):
            raise UserError(f"{path} is a sweep file (it has base/grid keys); run it with `cnnlab sweep {path}`")
        data = merge_configs(data, read)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with --set " + " ".join(overrides)
    return validate(set_values(data, values), source, trust_code)


def set_values(data: dict[str, Any], values: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with each dotted key of ``values`` set; ``model.name`` first, so that the model's
    other options given beside it are kept (a new model name starts its options afresh)."""
    for key, value in sorted((values or {}).items(), key=lambda kv: kv[0] != "model.name"):
        data = set_value(data, key, value)
    return data


def with_values(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """``cfg`` with the dotted keys of ``values`` set, validated like any other config value (a
    launcher's placement of a trial, e.g. ``{"train.device": "cuda:1"}``); ``source`` names the
    config in an error."""
    return validate(set_values(cfg.to_dict(), values), source)


def is_run_folder_config(path: Path) -> bool:
    """Whether ``path`` is the config.yaml of a run folder (someone's results, not a config of one's own)."""
    return path.name == "config.yaml" and (path.parent / "summary.json").exists()


def absolute_paths(cfg: Config, cwd: Path) -> Config:
    """``cfg`` with ``data.root``, ``output.dir`` and a ``model.weights`` file made absolute against ``cwd``.

    In a config, as on the command line, these are relative to the folder the command was run
    in (``output.dir: results`` is the project's results/ folder when run from the project root), not
    to the YAML file. A command that hands configs to other processes (a sweep's trials, Ray Tune's,
    which run in folders of their own) fixes that meaning once, here, before any of them starts."""
    from cnnlab.models.weights import is_file

    root, weights = cfg.data.root, cfg.model.weights
    data = cfg.data if root is None else cfg.data.model_copy(update={"root": Path(cwd, Path(root).expanduser())})
    output = cfg.output.model_copy(update={"dir": Path(cwd, cfg.output.dir)})
    model = cfg.model if weights is None or not is_file(weights) else \
        cfg.model.model_copy(update={"weights": str(Path(cwd, Path(weights).expanduser()))})
    return cfg.model_copy(update={"data": data, "output": output, "model": model})


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, every default filled in: the model builder's options too (for a registered model)."""
    from cnnlab.models.registry import option_defaults

    data = cfg.to_dict()
    data["model"] = {**data["model"], **{k: v for k, v in option_defaults(cfg.model.name).items() if k not in data["model"]}}
    return yaml.safe_dump(data, sort_keys=False)
