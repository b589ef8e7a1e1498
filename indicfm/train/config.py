"""Config sections ``optimizer``, ``trainer``, ``checkpoint``, ``eval``, ``logging`` (owned by indicfm/train/).

Each key is read by exactly one module of ``indicfm/train``: ``optimizer`` by ``optimizer.py``,
``trainer`` by ``step.py``/``loop.py``, ``checkpoint`` by ``checkpoint.py``, ``eval`` by
``evaluate.py`` (``eval.downstream``: by ``downstream_hook.py`` and ``indicfm.evaluation.in_loop``)
and ``logging`` by ``metrics.py``.
"""

from typing import Literal

from pydantic import Field, model_validator

from indicfm.config_base import Section


class OptimizerConfig(Section):
    """AdamW with a warmup + cosine or warmup-stable-decay (WSD) learning-rate schedule."""

    learning_rate: float = Field(3e-4, gt=0, description="peak learning rate, reached after warmup")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="after warmup: cosine decay, or stay flat then decay (wsd), or constant"
    )
    warmup_steps: int = Field(100, ge=0, description="linear warmup from 0 to learning_rate")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: fraction of all steps spent in the final linear decay"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate ÷ peak learning rate")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="decoupled (AdamW) decay on matrices only")
    decay_embeddings: bool = Field(False, description="also decay the token embedding (and unembedding) tables")
    grad_clip_norm: float = Field(1.0, ge=0, description="clip gradients to this global L2 norm; 0 disables")


class TrainerConfig(Section):
    """How many steps, how big a batch, and what to do when a step goes bad."""

    steps: int = Field(1000, gt=0, description="total optimizer steps")
    seed: int = Field(0, description="seeds parameter init, data order and per-step random numbers")
    global_batch_size: int = Field(8, gt=0, description="sequences per optimizer step, over all hosts")
    micro_batches: int = Field(
        1, gt=0, description="gradient accumulation: split each global batch into this many micro-batches"
    )
    max_consecutive_nonfinite: int = Field(
        5, gt=0, description="stop the run after this many non-finite (NaN/inf) steps in a row; each one is skipped"
    )
    compilation_cache_dir: str | None = Field(
        "",
        description="JAX persistent compilation cache, so a resumed or restarted run skips recompiling; "
        "empty = <workdir>/compile_cache, null = off",
    )
    peak_flops: float | None = Field(
        None, gt=0, description="device peak FLOP/s for MFU; default: looked up (configs/hardware.yaml or built-in table)"
    )
    init_from: str | None = Field(
        None,
        description="start a fresh run from these parameters instead of random ones (fresh optimizer, the "
        "schedule from step 0): a run directory (its newest checkpoint, or the initial parameters `indicfm "
        "import hf`/`upcycle` wrote) or one checkpoint step directory; relative to the workdir. Ignored on resume",
    )

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainerConfig":
        if self.global_batch_size % self.micro_batches:
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} is not divisible by "
                f"trainer.micro_batches={self.micro_batches}"
            )
        return self


class CheckpointConfig(Section):
    """Orbax checkpoints: how often, how many are kept, and whether saves run in the background."""

    every_steps: int = Field(100, gt=0, description="save a checkpoint every N steps (and at the end)")
    keep_last: int = Field(3, gt=0, description="keep the newest N checkpoints")
    keep_every: int | None = Field(
        None, gt=0, description="also keep forever every checkpoint whose step is a multiple of this"
    )
    async_save: bool = Field(True, description="write checkpoints in a background thread while training goes on")
    dir_name: str = Field("checkpoints", description="sub-directory of the workdir that holds the checkpoints")
    replica_parallel: bool = Field(
        False,
        description="spread the writing of replicated arrays over their replicas (Orbax); can speed up "
        "saves of large purely data-parallel runs, slows small ones and CPU runs",
    )


class DownstreamEvalConfig(Section):
    """Downstream tasks (lm-evaluation-harness) run on the live model during training, e.g. the shipped
    offline minimal pairs ``flores_pairs_hin_Deva``; read by ``indicfm.evaluation.in_loop``."""

    tasks: list[str] = Field(
        default_factory=list, description="lm-eval task or group names, e.g. [flores_pairs_hin_Deva]; empty = off"
    )
    suite: str | None = Field(None, description="a shipped suite of tasks instead of tasks, e.g. indic-core")
    every_steps: int = Field(0, ge=0, description="evaluate every N steps; 0 = no periodic evaluation")
    at_start: bool = Field(False, description="also evaluate the freshly initialised model (step 0)")
    at_end: bool = Field(True, description="also evaluate after the last step")
    limit: int | None = Field(None, gt=0, description="at most this many items per task (all when null)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per item (the task's default when null)")
    include_path: str | None = Field(None, description="a folder of the user's own lm-eval task YAML")
    rows: int = Field(8, gt=0, description="packed rows per forward pass")

    @model_validator(mode="after")
    def _tasks_or_suite(self) -> "DownstreamEvalConfig":
        if self.tasks and self.suite:
            raise ValueError(
                f"eval.downstream.tasks={self.tasks} and eval.downstream.suite={self.suite!r}: set one of them, not both"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.suite)


class EvalConfig(Section):
    """Held-out evaluation: bits per byte per language, so tokenizers of different sizes compare fairly."""

    every_steps: int = Field(0, ge=0, description="evaluate every N steps (and at the end); 0 disables")
    heldout_dir: str | None = Field(
        None, description="directory of {lang}.dev (or .txt) files, one text per line; e.g. samples/heldout"
    )
    max_lines_per_language: int = Field(64, gt=0, description="cap on held-out lines read per language")
    batch_size: int = Field(8, gt=0, description="sequences per evaluation forward pass")
    languages: list[str] = Field(default_factory=list, description="restrict to these language codes; empty = all")
    at_start: bool = Field(False, description="also evaluate the freshly initialised model (step 0)")
    downstream: DownstreamEvalConfig = Field(
        default_factory=DownstreamEvalConfig, description="downstream tasks during training (lm-evaluation-harness)"
    )


class LoggingConfig(Section):
    """What the run shows: metrics.jsonl, TensorBoard, and the progress line."""

    every_steps: int = Field(1, gt=0, description="write metrics every N steps")
    tensorboard: bool = Field(True, description="also write TensorBoard event files into the workdir")
    progress: bool = Field(True, description="show a live progress line (step, loss, tokens/s, MFU, ETA)")
    profile_steps: tuple[int, int] | None = Field(
        None,
        description="[A, B]: write a jax.profiler trace of steps A to B (1-based, inclusive) to <workdir>/profile",
    )

    @model_validator(mode="after")
    def _profile_window(self) -> "LoggingConfig":
        if self.profile_steps is not None:
            first, last = self.profile_steps
            if not 1 <= first <= last:
                raise ValueError(f"logging.profile_steps={list(self.profile_steps)}: expected [A, B] with 1 <= A <= B")
        return self
