"""Portable model files: one trained learner in one safetensors file, and :func:`load_model`.

``metalens export RUN FILE`` (:func:`export`) writes the newest checkpoint of a run's learner
into one file that needs neither the run folder nor the data it was trained on:

- the tensors: the learner's ``state_dict`` (parameters and buffers);
- the metadata (strings, in the safetensors header): ``format`` (``metalens-model``),
  ``format_version`` (:data:`FORMAT_VERSION`), ``metalens_version``, ``config`` (the run's
  ``config.json``: family, learner and trainer options), ``spec`` (the
  :class:`~metalens.episode.TaskSpec` the learner was built for), ``inputs`` (how a user's
  inputs are prepared: :class:`Inputs`), ``step`` (the checkpoint's) and ``sha256`` (of the
  tensor bytes, so that a damaged file is refused).

No pickle is involved, reading or writing. The file is written under a temporary name beside
the target, flushed and renamed into place (a reader never sees half of one); an existing file
is never overwritten. Reading checks everything before a tensor is used, and refuses with one
line (:class:`~metalens.errors.CheckpointError`, exit code 2): a file that is not a metalens
model file, a truncated or corrupted one (its checksum), one from a newer format version, one
whose configuration this metalens cannot build, and one whose tensors do not fit that
configuration (names, shapes, dtypes) or hold non-finite numbers.

:func:`load_model` accepts a model file or a run folder and returns a :class:`Model`: the
learner with what ``metalens predict`` and the estimators need to prepare a user's inputs.

>>> import tempfile, pathlib, torch, metalens
>>> family = metalens.make_task("synthetic_tables", max_features=4, max_classes=3)
>>> learner = metalens.make_learner("protonet", family, backbone="mlp", hidden=[8], embedding_dim=4)
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
>>> size = save_model(Model.of(learner, family), path)
>>> back = load_model(path)
>>> back.spec == family.spec, back.inputs.standardize, back.inputs.class_range
(True, 'support', (2, 3))
>>> all(torch.equal(a, b) for a, b in zip(back.learner.state_dict().values(), learner.state_dict().values()))
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metalens import __version__, checkpoint
from metalens.config import ConfigError, from_dict, to_dict
from metalens.episode import TaskSpec
from metalens.errors import CheckpointError, DataError, MetalensError, RunFailed, RunFolderError, excerpt
from metalens.files import TMP_SUFFIX, NotRegular, fsync_dir, read_regular
from metalens.learners.base import Learner
from metalens.registry import LEARNERS
from metalens.rng import seeded_init
from metalens.run import RunConfig, load_run
from metalens.tasks.base import TaskFamily

__all__ = ["Model", "Inputs", "load_model", "save_model", "read_model", "export", "FORMAT", "FORMAT_VERSION"]

FORMAT = "metalens-model"
FORMAT_VERSION = 1
MAX_MODEL_BYTES = 8 << 30  # a larger file is not a model this machine should read at once


# ------------------------------------------------------------------------------------------------
# What a learner expects of a user's inputs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """How a user's inputs are prepared for a learner, as its family prepared them in training.

    ``x_shape``: one input's shape. ``image``: for image learners (``x_shape = (channels, size,
    size)``), the decoding of :func:`metalens.data.load_image` (``size``, ``resample``, ``invert``).
    ``columns``: the feature columns by name (a ``table``-trained learner). ``standardize``:
    ``none``; ``fixed`` (``(x - mean) / std``, the family's meta-training statistics); or
    ``support`` (per task, from the support set: :func:`~metalens.tasks.synthetic_tables.
    standardize_by_support`, values clipped to ``[-clip, clip]``). ``pad_features``: a table of
    another width is zero-padded or truncated (else it is refused). ``class_range``: for a family
    whose tasks have a varying number of classes, the fewest and the most; a support set with up
    to the most is accepted (the outputs of absent classes are dropped).
    """

    x_shape: tuple[int, ...]
    image: dict[str, Any] | None = None
    columns: tuple[str, ...] | None = None
    standardize: Literal["none", "fixed", "support"] = "none"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pad_features: bool = False
    clip: float = 6.0
    class_range: tuple[int, int] | None = None

    @classmethod
    def of(cls, spec: TaskSpec, task_options: dict[str, Any] | None = None,
           extra: dict[str, Any] | None = None, image_options: dict[str, Any] | None = None) -> Inputs:
        """The inputs of a learner built for ``spec``: images when ``x_shape`` is ``(channels, height, width)``,
        decoded as the family decodes an evaluation image (``image_options``: the family's
        ``image_options()``, i.e. the keyword arguments of :func:`metalens.data.load_image`; without them
        grey ``box``-resized images with ink as 1), and what the family adds (its ``user_inputs()``)."""
        opts = task_options or {}
        image = None
        if len(spec.x_shape) == 3:
            image = {"size": int(spec.x_shape[-1]), "resample": str(opts.get("resample", "box")),
                     "invert": bool(opts.get("invert", True))}
            if image_options is not None:  # the family's own decoding: channels, height/width, normalisation
                image = json.loads(json.dumps(image_options))
        return cls.from_json({"x_shape": list(spec.x_shape), "image": image, **(extra or {})})

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: Any) -> Inputs:
        """Inputs from their JSON form; a ``ValueError`` names what is malformed."""
        if not isinstance(data, dict):
            raise ValueError("inputs must be a table")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown inputs field {unknown[0]!r}")
        d = dict(data)
        try:
            d["x_shape"] = tuple(int(v) for v in d["x_shape"])
            for k in ("columns", "mean", "std", "class_range"):
                if d.get(k) is not None:
                    d[k] = tuple(d[k])
            if d.get("mean") is not None:
                d["mean"] = tuple(float(v) for v in d["mean"])
                d["std"] = tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("inputs.x_shape, mean and std must be lists of numbers") from None
        out = cls(**d)
        if out.standardize not in ("none", "fixed", "support"):
            raise ValueError(f"inputs.standardize must be none, fixed or support, got {out.standardize!r}")
        width = out.x_shape[-1] if len(out.x_shape) == 1 else None
        for k in ("columns", "mean", "std"):
            v = getattr(out, k)
            if v is not None and len(v) != width:
                raise ValueError(f"inputs.{k} must hold {width} values, got {len(v)}")
        if out.standardize == "fixed" and (out.mean is None or out.std is None):
            raise ValueError("inputs.standardize = fixed needs mean and std")
        if out.class_range is not None and not (len(out.class_range) == 2 and 2 <= out.class_range[0]
                                                <= out.class_range[1]):
            raise ValueError("inputs.class_range must be [low, high] with 2 <= low <= high")
        return out


# ------------------------------------------------------------------------------------------------
# A loaded model
# ------------------------------------------------------------------------------------------------
@dataclass
class Model:
    """A trained learner and what using it on a user's data needs.

    ``learner`` (in eval mode), ``spec`` (what it was built for), ``inputs`` (:class:`Inputs`),
    ``config`` (the run's :class:`~metalens.run.RunConfig`; None for a bare learner), ``step``
    (the checkpoint's training step) and ``source`` (where it was loaded from).
    """

    learner: Learner
    spec: TaskSpec
    inputs: Inputs
    config: RunConfig | None = None
    step: int = 0
    source: str = "(in memory)"
    _by_classes: dict[int, Learner | None] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, learner: Learner, family: TaskFamily | None = None, *, config: RunConfig | None = None,
           step: int = 0, source: str = "(in memory)") -> Model:
        """A model of ``learner``; its inputs from ``family`` (its options and ``user_inputs()``) when given."""
        learner.eval()
        if family is None:
            return cls(learner, learner.spec, Inputs.of(learner.spec), config, step, source)
        extra = family.user_inputs() if hasattr(family, "user_inputs") else {}
        opts = to_dict(family.config) if dataclasses.is_dataclass(family.config) else {}
        image = family.image_options() if hasattr(family, "image_options") else None
        return cls(learner, family.spec, Inputs.of(family.spec, opts, extra, image), config, step, source)

    @property
    def name(self) -> str:
        """``learner`` trained on ``family`` (what messages call it)."""
        task = f" trained on {self.config.task}" if self.config is not None else ""
        return f"{self.learner.registry_name}{task}"

    def with_options(self, options: dict[str, Any]) -> Model:
        """This model with evaluation-time learner options changed (adaptation steps, fine-tuning, ...); an
        option that would change the parameters' shapes is refused, naming it."""
        if not options:
            return self
        cls = type(self.learner)
        config = from_dict(cls.Config, {**to_dict(self.learner.config), **options}, prefix="learner.",
                           where=f"learner {self.learner.registry_name!r}")
        learner = _build(cls, self.spec, config, self.learner.registry_name)
        problems = checkpoint.mismatches(self.learner.state_dict(), learner.state_dict())
        if problems:
            raise ConfigError(f"the options {', '.join(sorted(options))} change the shapes of the learner's "
                              f"parameters ({'; '.join(problems)[:160]}); they cannot change after training")
        learner.load_state_dict(self.learner.state_dict())
        learner.eval()
        run = self.config.updated(learner=options) if self.config is not None else None
        return Model(learner, self.spec, self.inputs, run, self.step, self.source)

    def for_classes(self, n: int) -> Learner | None:
        """The learner rebuilt for ``n`` classes, when none of its parameters depends on the number of classes
        (``protonet``, ``matching``, ``pretrain`` with global classes); None when they do."""
        if n == self.spec.num_classes:
            return self.learner
        if n not in self._by_classes:
            self._by_classes[n] = self._rebuilt(n)
        return self._by_classes[n]

    def _rebuilt(self, n: int) -> Learner | None:
        try:
            learner = _build(type(self.learner), replace(self.spec, num_classes=n), self.learner.config,
                             self.learner.registry_name)
        except (ConfigError, ValueError):
            return None
        if checkpoint.mismatches(self.learner.state_dict(), learner.state_dict()):
            return None
        learner.load_state_dict(self.learner.state_dict())
        learner.eval()
        return learner


def _build(cls: type, spec: TaskSpec, config: Any, name: str) -> Learner:
    with seeded_init(0):  # the weights are replaced by the trained ones
        try:
            return cls(spec, config)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"learner {name!r}: {e}") from None


def load_model(path: str | os.PathLike, **learner_options: Any) -> Model:
    """A trained learner from a model file (:func:`export`) or a run folder (its newest checkpoint).

    ``learner_options``: evaluation-time options of the learner (e.g. ``eval_inner_steps=5``). A run
    folder is read as ``metalens eval`` reads it (its family is built, which may read its data); a
    model file needs nothing else.
    """
    path = Path(path)
    if path.is_dir():
        run = load_run(path)
        model = Model.of(run.learner, run.family, config=run.config, step=run.step, source=str(path))
    elif path.exists() or path.is_symlink():
        model = read_model(path)
    else:
        raise RunFolderError(f"{path} does not exist; give a run folder or a model file (metalens export)")
    return model.with_options(learner_options)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _spec_json(spec: TaskSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "x_shape": list(spec.x_shape), "y_dim": spec.y_dim, "num_classes": spec.num_classes,
            "x_range": list(spec.x_range) if spec.x_range is not None else None, "train_classes": spec.train_classes}


def _payload(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 + n:]


def model_bytes(model: Model) -> bytes:
    """The bytes of ``model``'s model file (see the module docstring)."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.learner.state_dict().items()}
    config = model.config.to_json() if model.config is not None else {
        "learner": {"name": model.learner.registry_name, **to_dict(model.learner.config)}}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "metalens_version": __version__,
            "config": json.dumps(config, sort_keys=True), "spec": json.dumps(_spec_json(model.spec)),
            "inputs": json.dumps(model.inputs.to_json()), "step": str(int(model.step))}
    first = st_save(tensors, metadata=meta)
    digest = hashlib.sha256(_payload(first)).hexdigest()
    data = st_save(tensors, metadata={**meta, "sha256": digest})
    assert _payload(data) == _payload(first)  # the tensor bytes do not depend on the header
    return data


def save_model(model: Model, path: str | os.PathLike) -> int:
    """Write ``model`` to the model file ``path`` atomically; returns its size in bytes.

    An existing ``path`` is refused (:class:`~metalens.errors.RunFolderError`); so is a folder that does not
    exist. A failed write (a full disk: :class:`~metalens.errors.RunFailed`) leaves nothing behind.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise RunFolderError(f"{path} exists; metalens never overwrites a file: remove it or choose another name")
    if not path.parent.is_dir():
        raise RunFolderError(f"{path.parent} is not a folder; create it first")
    data = model_bytes(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a file that appeared meanwhile (unlike a rename)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: rename, having checked again
            if path.exists() or path.is_symlink():
                raise FileExistsError(str(path)) from None
            os.replace(tmp, path)
    except FileExistsError:
        raise RunFolderError(f"{path} exists; metalens never overwrites a file: remove it or choose another "
                             "name") from None
    except OSError as e:
        raise RunFailed(f"cannot write {path}: {e.strerror or e}; nothing was written") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return len(data)


def export(run: str | os.PathLike, path: str | os.PathLike) -> tuple[Model, int]:
    """``metalens export``: the newest checkpoint of the run folder ``run`` (or a model file) as the model file
    ``path``; returns the model and the file's size."""
    model = load_model(run)
    return model, save_model(model, path)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def read_model(path: str | os.PathLike) -> Model:
    """Read and check a model file written by :func:`save_model` (see the module docstring)."""
    path = Path(path)
    where = str(path)
    try:
        data = read_regular(path, limit=MAX_MODEL_BYTES, follow=True)
    except FileNotFoundError:
        raise RunFolderError(f"{where} does not exist; give a run folder or a model file") from None
    except NotRegular as e:
        raise CheckpointError(f"model file {where} {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read model file {where}: {e.strerror or e}") from None
    not_ours = f"{where} is not a metalens model file (make one with: metalens export RUN FILE)"
    if len(data) < 8:
        raise CheckpointError(f"{not_ours}: it is {len(data)} bytes long")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(f"{where} is truncated or not a metalens model file (its header claims {n} bytes, the "
                              f"file has {len(data) - 8} after the length)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{not_ours}: its header is not JSON (it starts {excerpt(data[8:8 + n], 24)})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(not_ours)
    version = meta.get("format_version", "")
    if not (isinstance(version, str) and version.isdigit()):
        raise CheckpointError(f"{where}: format_version must be a whole number, got {excerpt(repr(version))}")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{where} is a model file of format {int(version)} (written by metalens "
                              f"{excerpt(str(meta.get('metalens_version')), 20)}); this metalens {__version__} reads "
                              f"format {FORMAT_VERSION} and older: upgrade metalens")
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        raise CheckpointError(f"{not_ours}: its header does not describe tensors") from None
    if end > len(data) - 8 - n:
        raise CheckpointError(f"{where} is truncated: it holds {len(data) - 8 - n} of the {end} bytes of tensors its "
                              "header announces (copy or export it again)")
    if hashlib.sha256(data[8 + n:]).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{where} is corrupted: its tensors do not match their checksum (export it again from "
                              "its run folder)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where} is corrupted ({str(e)[:120]}); export it again") from None
    try:
        spec_d = json.loads(meta["spec"])
        spec = TaskSpec(kind=spec_d["kind"], x_shape=tuple(int(v) for v in spec_d["x_shape"]),
                        y_dim=int(spec_d["y_dim"]), num_classes=spec_d["num_classes"],
                        x_range=tuple(spec_d["x_range"]) if spec_d.get("x_range") is not None else None,
                        train_classes=spec_d.get("train_classes"))
        inputs = Inputs.from_json(json.loads(meta["inputs"]))
        config_d = json.loads(meta["config"])
        step = int(meta.get("step", "0"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its metadata is malformed ({excerpt(str(e), 80)})") from None
    config = None
    try:
        if {"task", "train"} <= set(config_d):
            config = RunConfig.from_json(config_d)
            learner_name, learner_options = config.learner, config.learner_options
        else:
            learner_options = dict(config_d["learner"])
            learner_name = learner_options.pop("name")
        cls = LEARNERS[learner_name].cls
        learner = _build(cls, spec, from_dict(cls.Config, learner_options, prefix="learner.",
                                              where=f"learner {learner_name!r}"), learner_name)
    except MetalensError as e:
        if isinstance(e, (ConfigError, DataError)):
            raise CheckpointError(f"{where} holds a configuration this metalens {__version__} cannot build ({e})") \
                from None
        raise
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: its configuration is malformed ({excerpt(str(e), 80)})") from None
    problems = checkpoint.mismatches(tensors, learner.state_dict())
    if problems:
        raise CheckpointError(f"{where}: its tensors do not fit the configuration it carries "
                              f"({'; '.join(problems)[:200]})")
    bad = checkpoint.non_finite(tensors)
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights ({', '.join(bad[:3])}); export a checkpoint from "
                              "before the run diverged")
    learner.load_state_dict(tensors)
    learner.eval()
    return Model(learner, spec, inputs, config, step, where)
