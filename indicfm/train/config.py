"""Config sections ``optimizer``, ``trainer``, ``checkpoint``, ``eval``, ``logging`` (owned by indicfm/train/)."""

from pydantic import Field

from indicfm.config_base import Section


class OptimizerConfig(Section):
    learning_rate: float = Field(3e-4, gt=0)


class TrainerConfig(Section):
    steps: int = Field(1000, gt=0, description="total optimizer steps")
    seed: int = 0


class CheckpointConfig(Section):
    every_steps: int = Field(100, gt=0, description="save a checkpoint every N steps (and at the end)")


class EvalConfig(Section):
    every_steps: int = Field(0, ge=0, description="0 disables periodic evaluation")


class LoggingConfig(Section):
    every_steps: int = Field(1, gt=0)
