"""The ``meta`` item of a checkpoint: one typed record that training writes and that resuming,
``trainer.init_from``, inference, export, ``import hf`` and ``upcycle`` read.

Why a record and not a dict: the metadata is written in one place and read in half a dozen; with a
dict every reader spelled the keys and the fallbacks for old checkpoints again, and a damaged file
surfaced as a ``KeyError`` far from the checkpoint it came from.  Here every key has a type and a
default, :meth:`CheckpointMeta.from_json` is the only parser, and a malformed item is a
:class:`CheckpointMetaError` that names the checkpoint directory and the key.

Checkpoints written before a key existed still load: ``param_layout`` defaults to ``"unrolled"``
(scanning came later), and the other keys a low-level save may leave out (the loader's state, the
tokenizer's hash, the config) are optional; a reader that needs the config asks for it through
:meth:`CheckpointMeta.saved_model_config`, which names the checkpoint when it is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from indicfm.model.config import ModelConfig

PARAM_LAYOUT_KEY = "param_layout"
#: the parameter layout of checkpoints written before layouts were recorded
LAYOUT_BEFORE_THE_KEY = "unrolled"
ParamLayout = Literal["unrolled", "scanned"]


class CheckpointMetaError(ValueError):
    """A checkpoint's ``meta`` item is not what indicfm writes (the message names the checkpoint and key)."""


class CheckpointMeta(BaseModel):
    """What a checkpoint records beside its arrays.

    Unknown keys are ignored when reading (a newer indicfm may add some); the keys below are the
    whole schema that this version writes.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    #: optimizer updates completed when the state was saved (the checkpoint's directory name)
    step: int
    #: the resolved run config (``Config.model_dump(mode="json")``); None only in low-level saves
    config: dict[str, Any] | None = None
    #: sha256 of the tokenizer file the run trained with: a resume with another one is refused
    tokenizer_sha256: str | None = None
    #: how the parameters are stacked (``indicfm.model.transformer.param_layout``)
    param_layout: ParamLayout = LAYOUT_BEFORE_THE_KEY
    #: the data loader's ``state_dict()`` (where its reading stood); empty for parameters-only checkpoints
    loader: dict[str, Any] = {}
    #: ``trainer.seed`` of the run that wrote it
    seed: int | None = None
    #: where initial parameters came from (``import hf``: the Hugging Face source and architecture;
    #: ``upcycle``: the parent run, its step and the granularity); None for training checkpoints
    source: dict[str, Any] | None = None

    _where: str = PrivateAttr(default="")

    @classmethod
    def from_json(cls, data: Any, where: str | Path = "") -> "CheckpointMeta":
        """The record from the JSON object a checkpoint stores; ``where`` (the checkpoint's step
        directory) goes into every error message."""
        label = f"checkpoint {where}" if str(where) else "checkpoint metadata"
        if not isinstance(data, Mapping):
            raise CheckpointMetaError(f"{label}: its meta item is a {type(data).__name__}, not a JSON object")
        try:
            meta = cls.model_validate(dict(data))
        except ValidationError as err:
            problems = "; ".join(
                f"key {'.'.join(map(str, e['loc'])) or '(whole item)'}: {e['msg']} (found {e.get('input')!r})"
                for e in err.errors()
            )
            raise CheckpointMetaError(f"{label}: malformed meta item: {problems}") from None
        meta._where = str(where)
        return meta

    def to_json(self) -> dict[str, Any]:
        """The JSON object the checkpoint stores (what :meth:`from_json` reads back)."""
        return self.model_dump(mode="json")

    def __eq__(self, other: object) -> bool:
        """Equal records hold the same keys and values (where they were read from does not count)."""
        return isinstance(other, CheckpointMeta) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # dict fields: not hashable

    def with_step(self, step: int) -> "CheckpointMeta":
        """The same record for ``step`` (the checkpointer stamps the step it saves)."""
        copy = self.model_copy(update={"step": step})
        copy._where = self._where
        return copy

    def saved_model_config(self) -> ModelConfig:
        """The model section of the saved config, validated; an error naming the checkpoint when the
        metadata has no config (a low-level save) or the section no longer validates."""
        label = f"checkpoint {self._where}" if self._where else "checkpoint metadata"
        model = (self.config or {}).get("model")
        if not isinstance(model, Mapping):
            raise CheckpointMetaError(f"{label}: its metadata has no resolved config (key config.model)")
        try:
            return ModelConfig(**model)
        except (ValidationError, TypeError) as err:
            raise CheckpointMetaError(f"{label}: key config.model does not describe a model: {err}") from None
