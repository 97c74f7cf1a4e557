"""Usage: ``spec = data.spec``; ``spec.classes``, ``spec.input_shape``; ``DataSpec.read(value, where)``.

What a data set is, as every consumer needs it: its name, class names, channels, image size and the
per-channel pixel mean and std of the training split (what inputs are normalised with), and the
folder it was read from. Made once by the data layer (``Data.spec``), recorded in summary.json and in
checkpoints, and read back from them: then it is untrusted, and validated (a bad one is a
``UserError`` naming where it came from). Every data set's description is made through ``DataSpec.made``,
naming the file it comes from: what no data set may be (one class, a class named twice, an image of no
pixels) is checked here once, for all of them, and said of that file.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from cnnlab.errors import UserError
from cnnlab.safetext import how_names_differ, look_alike

DEFAULT = "fashion-mnist"  # the data set of a config that names none (data.name)
MAX_SIDE = 8192  # pixels a side: larger is no image a run here trains on (and a model built for it would not fit)
MAX_CLASSES = 100_000
MAX_CHANNELS = 64


class DataSpec(BaseModel):
    """A data set's description. ``mean``/``std``/``source`` are None until the files are read (the
    description of a data set by name, e.g. for ``cnnlab summary``)."""

    # Keys it does not know are passed over, as summary.json's are: a newer cnnlab may record more.
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    # Strict types: a value read back is taken as written, never converted ("3" is no channel count).
    name: StrictStr = Field(min_length=1, max_length=100)  # as data.name says it: fashion-mnist
    title: StrictStr = Field(min_length=1, max_length=100)  # as people write it: Fashion-MNIST
    classes: tuple[StrictStr, ...] = Field(min_length=1, max_length=MAX_CLASSES)  # index = label
    channels: StrictInt = Field(ge=1, le=MAX_CHANNELS)
    image_size: tuple[StrictInt, StrictInt]  # (height, width)
    mean: tuple[StrictFloat, ...] | None = None  # per channel, of the training split's pixels scaled to [0, 1]
    std: tuple[StrictFloat, ...] | None = None
    source: StrictStr | None = None  # the folder the files were read from
    # Light things on a dark background (Fashion-MNIST, MNIST): a picture to classify is inverted when its
    # background is light. None (descriptions recorded before this field): judged from the picture, as then.
    dark_background: StrictBool | None = None

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        if len(classes) == 1:
            raise ValueError(f"only one class ({classes[0]}); a classifier needs two or more classes")
        first: dict[str, int] = {}
        for label, name in enumerate(classes):
            if name in first:  # a table by name would lose one of the two (eval's per-class figures)
                raise ValueError(f"class {name!r} is named twice (labels {first[name]} and {label}); give each class a "
                                 "name of its own")
            first[name] = label
        return classes

    @field_validator("image_size")
    @classmethod
    def _sides(cls, size: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= side <= MAX_SIDE for side in size):
            raise ValueError(f"images of {size[0]}x{size[1]} pixels; each side must be 1 to {MAX_SIDE:,} pixels")
        return size

    @model_validator(mode="after")
    def _per_channel(self) -> DataSpec:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std come together: give both or neither")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) != self.channels:
                raise ValueError(f"{key} has {len(values)} value(s), one per channel expected ({self.channels})")
        if self.std is not None and not all(s > 0 and math.isfinite(s) for s in self.std):
            raise ValueError("std must be above 0 in every channel")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image as a model takes it: (channels, height, width)."""
        return (self.channels, *self.image_size)

    @property
    def shape_text(self) -> str:
        """``1x28x28``: channels x height x width."""
        return "x".join(map(str, self.input_shape))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists for tuples): what summary.json and checkpoints hold."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def made(cls, where: str, **fields: Any) -> DataSpec:
        """A data set's description from its files (``where``: the file or folder its fields come from); one that
        cannot be is a ``UserError`` naming ``where`` and what is wrong."""
        try:
            spec = cls(**fields)
        except ValidationError as err:
            key, message = _problem(err)
            own = err.errors()[0]["type"] == "value_error"  # the validators' words say what they are about
            raise UserError(f"{where}: {message}" if own or not key else f"{where}: {key}: {message}") from None
        # Checked here, of data read from files, and not by the validator: a description made directly (a folder's,
        # whose reader checks its folder names itself) would meet it as a validation error, not as words
        alike = look_alike(spec.classes)
        if alike is not None:  # two rows of eval's table no one could tell apart
            a, b = (spec.classes[i] for i in alike)
            raise UserError(f"{where}: classes {a!r} (label {alike[0]}) and {b!r} (label {alike[1]}) look the same: "
                            f"{how_names_differ(a, b)}; give each class a name of its own")
        return spec

    @classmethod
    def read(cls, value: Any, where: str) -> DataSpec:
        """A description read back from a file, validated; a bad one is a ``UserError`` naming ``where``."""
        try:
            return cls.model_validate(value)
        except ValidationError as err:
            key, message = _problem(err)
            raise UserError(f"{where}: its data description is not valid ({key + ': ' if key else ''}{message})") \
                from None


def _problem(err: ValidationError) -> tuple[str, str]:
    """(the key, what is wrong with it) of a validation error's first problem; the validators' own words as written."""
    first = err.errors()[0]
    return ".".join(map(str, first["loc"])), first["msg"].removeprefix("Value error, ")
