"""Config section ``model``: architecture of the MoE transformer (owned by indicfm/model/)."""

from pydantic import Field

from indicfm.config_base import Section


class ModelConfig(Section):
    vocab_size: int = Field(64000, gt=0)
    d_model: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
