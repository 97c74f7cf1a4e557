"""Usage: ``report = load_weights(model, "torchvision.resnet18", "DEFAULT", download=False)``; ``report.line()``.

Pretrained weights for a model about to train (``model.weights``): a file, a state dict saved by
``torch.save`` (``.pth``/``.pt``, read with ``weights_only=True``, so that no pickled code runs; a
cnnlab checkpoint or a training script's ``{"state_dict": ...}`` is unwrapped) or ``.safetensors``;
or a library model's named weights (torchvision's ``DEFAULT``/``IMAGENET1K_V1``, timm's pretrained
tags such as ``a1_in1k``) from the libraries' local caches, downloaded only when asked
(``--download``).

Tensors are matched to the model by name (a ``module.`` or ``_orig_mod.`` prefix that every name
carries is dropped). One of the same shape is loaded. The first convolution's, when the channel
count differs, is adapted as timm adapts it: summed over the input channels for one channel,
repeated and scaled for more. The head's (``anatomy.head``), when the class count differs, is left
as initialised: new. Any other tensor that does not fit, or a file that fits nothing, is bad input
naming the file. ``WeightsReport`` says what happened; summary.json keeps it.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from cnnlab.errors import UserError
from cnnlab.models.anatomy import first_conv, head, within
from cnnlab.models.library import source_of

FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
WRAPPERS = ("state_dict", "model_state_dict", "model")  # where checkpoints of training scripts (and cnnlab's) keep the weights
PREFIXES = ("module.", "_orig_mod.")  # what DistributedDataParallel and torch.compile put before every name
SHOWN = 4  # names listed in a message before "and N more"


class WeightsError(UserError):
    """A weights file or name that cannot give this model its weights."""


def is_file(reference: str) -> bool:
    """Whether ``model.weights`` names a file (a path, or a name with a weights file's suffix) rather than a
    library's named weights (``DEFAULT``, ``IMAGENET1K_V1``, ``a1_in1k``)."""
    return "/" in reference or os.sep in reference or reference.lower().endswith(FILE_SUFFIXES)


def check_reference(model_name: str, reference: str) -> None:
    """Bad input before anything is built: named weights for a model no library provides, or that its library
    does not know (nothing is read)."""
    if is_file(reference):
        return
    source, _, short = model_name.partition(".")
    if source_of(model_name) is None:
        raise WeightsError(f"model.weights: {reference!r} names a library's weights, and {model_name!r} is cnnlab's own "
                           "model; give a weights file (.pt, .pth or .safetensors), or a torchvision.NAME or timm.NAME model")
    if source == "torchvision":
        _torchvision_weights(short, reference)
    else:
        _timm_cfg(short, reference)


@dataclass(frozen=True)
class WeightsReport:
    """What loading did: the source, and the model's tensors by what became of them."""

    source: str  # the file, or "torchvision IMAGENET1K_V1 (cache file)"
    loaded: int  # tensors copied as they were
    adapted: list[str] = field(default_factory=list)  # the first convolution's weight, for another channel count
    new: list[str] = field(default_factory=list)  # the model's tensors the weights did not give (left as initialised)
    unused: list[str] = field(default_factory=list)  # the file's tensors the model has no place for
    mean: tuple[float, ...] | None = None  # per channel, of the data the weights were trained on, when the library says
    std: tuple[float, ...] | None = None

    def line(self) -> str:
        parts = [f"{self.loaded} tensors loaded", f"{len(self.adapted)} adapted{_names(self.adapted)}",
                 f"{len(self.new)} new{_names(self.new)}"]
        if self.unused:
            parts.append(f"{len(self.unused)} unused{_names(self.unused)}")
        return f"model.weights: {self.source}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """summary.json's ``weights``."""
        return {"source": self.source, "loaded": self.loaded, "adapted": self.adapted, "new": self.new,
                "unused": self.unused}


def load_weights(model: nn.Module, model_name: str, reference: str, *, download: bool = False) -> WeightsReport:
    """Give ``model`` (built as ``model_name``) the weights ``reference`` names; what happened."""
    if is_file(reference):
        path = Path(reference).expanduser()
        state, source, stats = read_state_dict(path), str(path), (None, None)
    else:
        check_reference(model_name, reference)
        state, source, stats = named_state_dict(model_name, reference, download)
    report = fit_state_dict(model, state, source)
    return replace(report, mean=stats[0], std=stats[1])


def weights_stats(model_name: str, reference: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel of the data the named weights were trained on, as the library records it
    (no file is read): what ``data.normalize: weights`` normalises with."""
    if is_file(reference):
        raise WeightsError(f"data.normalize: weights takes the mean and std a library records for its named weights, and "
                           f"model.weights: {reference} is a file, which records none; use data.normalize: true")
    check_reference(model_name, reference)
    source, _, short = model_name.partition(".")
    if source == "torchvision":
        transform = _torchvision_weights(short, reference).transforms()
        return tuple(map(float, transform.mean)), tuple(map(float, transform.std))
    cfg = _timm_cfg(short, reference)
    return tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))


def stats_for_channels(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> tuple[tuple[float, ...], ...]:
    """RGB statistics for data of ``channels``: averaged for one channel (grey data fed to RGB weights whose first
    convolution was summed), kept for three, repeated for a single value."""
    if len(mean) == channels:
        return mean, std
    if channels == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    if len(mean) == 1:
        return mean * channels, std * channels
    raise WeightsError(f"data.normalize: weights: the weights' statistics are for {len(mean)} channels and the data has "
                       f"{channels}; use data.normalize: true")


# ---------------------------------------------------------------------------------------------
# Reading: files, and the libraries' caches


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (``.safetensors``, or anything ``torch.save`` wrote, read with ``weights_only``),
    unwrapped and with a common ``module.``/``_orig_mod.`` prefix dropped. Bad files are a ``WeightsError``."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise WeightsError(f"model.weights: {path}: {what}; give a weights file (.pt, .pth or .safetensors)")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"model.weights: {path}: not a readable .safetensors file ({err})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch warns about what it meets in odd files; the error below says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types here; none of their texts is fit to show
            unsafe = "weights_only" in str(err) or "Unsupported global" in str(err)
            why = ("it holds pickled Python objects, which cnnlab does not load (only tensors and plain values, so that "
                   "opening a file cannot run code)") if unsafe else "it is truncated, corrupt or not a PyTorch file"
            raise WeightsError(f"model.weights: {path}: not a readable state dict: {why}") from None
    return _plain(state, path)


def _plain(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in WRAPPERS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in state.items()):
        raise WeightsError(f"model.weights: {path}: not a state dict (a mapping of parameter names to tensors, as "
                           "model.state_dict() gives; a checkpoint with one under 'state_dict' or 'model' is read too)")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def named_state_dict(model_name: str, reference: str, download: bool) -> tuple[dict[str, torch.Tensor], str, tuple]:
    """(state dict, source, (mean, std)) of a library model's named weights, from the library's cache; fetched
    (with its checksum checked) only with ``download``."""
    source, _, short = model_name.partition(".")
    stats = weights_stats(model_name, reference)
    if source == "torchvision":
        weights = _torchvision_weights(short, reference)
        state = _from_url(weights.url, f"torchvision's {short} weights {weights.name}", download)
        if short.startswith("densenet"):
            state = _densenet_keys(state)
        return state, f"torchvision {weights.name} ({_cache_file(weights.url)})", stats
    cfg = _timm_cfg(short, reference)
    what = f"timm's {short}.{cfg.tag} weights"
    if cfg.hf_hub_id:
        path = _from_hub(cfg.hf_hub_id, cfg.hf_hub_filename, what, download)
        return read_state_dict(path), f"timm {cfg.tag} ({path})", stats
    if cfg.url:
        return _from_url(cfg.url, what, download), f"timm {cfg.tag} ({_cache_file(cfg.url)})", stats
    raise WeightsError(f"model.weights: {what} come from no file or address cnnlab can read; give a weights file instead")


def _torchvision_weights(short: str, reference: str) -> Any:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(short)
    except (ValueError, KeyError):
        enum = None
    names = list(enum.__members__) if enum is not None else []
    if reference not in names:
        known = f"its weights are {', '.join(names)}" if names else "torchvision has no weights for it"
        raise WeightsError(f"model.weights: torchvision.{short} has no weights {reference!r}; {known}, or give a file")
    return enum[reference]


def _timm_cfg(short: str, reference: str) -> Any:
    import timm

    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{short}.*")]
    tag = tags[0] if reference == "DEFAULT" and tags else reference
    if tag not in tags:
        known = f"its pretrained tags are DEFAULT ({tags[0]}), {', '.join(tags)}" if tags else "timm has no weights for it"
        raise WeightsError(f"model.weights: timm.{short} has no pretrained weights {reference!r}; {known}, or give a file")
    return timm.models.get_pretrained_cfg(f"{short}.{tag}")


def _cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _from_url(url: str, what: str, download: bool) -> dict[str, torch.Tensor]:
    cached = _cache_file(url)
    if not cached.is_file() and not download:
        raise WeightsError(f"model.weights: {what} are not in the local cache ({cached}); put the file there, "
                           "or with internet access add --download")
    if not cached.is_file():
        try:  # torch.hub checks the SHA-256 prefix in the file's name
            torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        except Exception as err:  # network and checksum failures come as many types
            raise WeightsError(f"model.weights: download of {url} failed ({type(err).__name__}: {err}); "
                               f"put the file in {cached.parent} instead") from None
    return read_state_dict(cached)


def _from_hub(repo: str, filename: str | None, what: str, download: bool) -> Path:
    """The cached file of a Hugging Face Hub repository (safetensors first, as timm reads it)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return Path(cached)
    if not download:
        raise WeightsError(f"model.weights: {what} are not in the Hugging Face cache (repository {repo}); "
                           "with internet access add --download")
    try:
        return Path(hf_hub_download(repo, names[0]))
    except Exception as err:  # network failures come as many types
        raise WeightsError(f"model.weights: download of {what} from {repo} failed ({type(err).__name__}: {err})") from None


def _densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet files name layers 'norm.1' where the model now says 'norm1' (what torchvision's own
    loader renames)."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    return {(f"{m.group(1)}{m.group(2)}" if (m := pattern.match(k)) else k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Fitting a state dict to the model


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> WeightsReport:
    """Copy what fits of ``state`` into ``model`` (see the module's rules); nothing is changed when it does not fit."""
    own = model.state_dict()
    conv, classifier = first_conv(model), head(model)
    fitted, adapted, new, misfits = {}, [], [], []
    for name, tensor in own.items():
        given = state.get(name)
        if given is None:
            new.append(name)
        elif given.shape == tensor.shape:
            fitted[name] = given
        elif conv is not None and name == f"{conv}.weight" and _channels_only(given, tensor):
            fitted[name] = adapt_channels(given, tensor.shape[1])
            adapted.append(f"{name} ({given.shape[1]} -> {tensor.shape[1]} channels)")
        elif within(name, classifier):
            new.append(name)
        else:
            misfits.append(f"{name} {_shape(given)} (the model's is {_shape(tensor)})")
    unused = [name for name in state if name not in own]
    if misfits:
        raise WeightsError(f"model.weights: {source}: tensors of other shapes than the model's: "
                           f"{_listed(misfits)}; these weights belong to another model or another configuration of it")
    if not fitted:
        raise WeightsError(f"model.weights: {source}: none of its {len(state)} tensors fits the model (its names: "
                           f"{_listed(list(state))}; the model's: {_listed(list(own))})")
    # A number of another kind would be cast on loading: a complex one's imaginary part dropped (and its nan unseen),
    # an integer or bool made a weight. Only the kind is kept (float16 weights load into a float32 model).
    kinds = [f"{name} ({_dtype(v)}, the model's {_dtype(own[name])})" for name, v in fitted.items()
             if _kind(v) != _kind(own[name])]
    if kinds:
        raise WeightsError(f"model.weights: {source}: tensors of another kind of number than the model's: {_listed(kinds)}; "
                           "weights are floating-point numbers (as model.state_dict() saves them), so these cannot "
                           "be loaded")
    bad = [name for name, v in fitted.items() if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"model.weights: {source}: tensors holding inf or nan: {_listed(bad)}")
    model.load_state_dict(fitted, strict=False)
    return WeightsReport(source=source, loaded=len(fitted) - len(adapted), adapted=adapted, new=new, unused=unused)


def adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A convolution's weight (out, in, kh, kw) for ``channels`` inputs: summed over the inputs for one (a grey
    image through RGB filters), else repeated and scaled by in/channels so that activations keep their size."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    given = weight.shape[1]
    repeated = weight.repeat(1, math.ceil(channels / given), 1, 1)[:, :channels]
    return repeated * (given / channels)


def _channels_only(given: torch.Tensor, own: torch.Tensor) -> bool:
    return given.dim() == 4 and given.shape[0] == own.shape[0] and given.shape[2:] == own.shape[2:]


def _kind(tensor: torch.Tensor) -> str:
    """floating, complex, bool or integer."""
    if tensor.is_floating_point() or tensor.is_complex():
        return "floating" if tensor.is_floating_point() else "complex"
    return "bool" if tensor.dtype == torch.bool else "integer"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _names(names: list[str]) -> str:
    return f" ({_listed(names)})" if names else ""
