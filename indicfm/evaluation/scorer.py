"""The one jitted scoring program, and how every process of a multi-host run takes part in it.

``score(batch)`` runs the model's forward pass on a ``[R, L]`` batch of packed rows
(:mod:`indicfm.evaluation.packing`) and returns, per slot, the log-probability of its target token
and whether that was the model's top choice (float32 / bool ``[R, L]``).  Rows are split over the mesh's data-like axes like training batches; the
parameters stay where they are (any layout, any sharding).  The log-softmax is taken in float32
over the model's whole vocabulary, as lm-eval's ``hf`` backend does.

Several processes (``jax.distributed``): the model is one program over every process's devices,
so every process must run each call with the same inputs.  Process 0 drives lm-eval; each of its
calls is first broadcast (:func:`jax.experimental.multihost_utils.broadcast_one_to_all`) as a
small fixed-size header (what to do, and the shapes that follow) and then the arrays.  The other
processes sit in :meth:`Scorer.serve`, running whatever the header says, until told to stop.

Shape legend: R rows, L row length, V vocabulary, B prompts, P prompt slots.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# header commands
STOP, SCORE, GENERATE, RESULT = 0, 1, 2, 3
HEADER = 8  # int32 slots
BATCH_FIELDS = ("tokens", "targets", "segment_ids", "positions")


def _score_program(state: Any, tokens_RxL: jax.Array, targets_RxL: jax.Array, segment_RxL: jax.Array,
                   positions_RxL: jax.Array, *, graphdef: Any) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, state)
    logits_RxLxV, _ = model(tokens_RxL, segment_RxL, positions_RxL)
    logits_RxLxV = logits_RxLxV.astype(jnp.float32)
    # log p(target) = logit(target) - logsumexp(logits): no second [R, L, V] array for a log-softmax
    target_RxL = jnp.take_along_axis(logits_RxLxV, targets_RxL[..., None], axis=-1)[..., 0]
    logp_RxL = target_RxL - jax.nn.logsumexp(logits_RxLxV, axis=-1)
    greedy_RxL = jnp.argmax(logits_RxLxV, axis=-1) == targets_RxL
    return logp_RxL, greedy_RxL


@functools.lru_cache(maxsize=16)
def _compiled_program(graphdef: Any, mesh: jax.sharding.Mesh) -> Callable:
    """The jitted scoring program of one model structure on one mesh, shared by every
    :class:`Scorer` of them (an evaluation every N training steps compiles once).  Scores come
    out replicated, so every process (process 0 above all) can read them."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(functools.partial(_score_program, graphdef=graphdef), out_shardings=replicated)


class Scorer:
    """Runs the scoring program (and generation) for one model on one mesh, on every process."""

    def __init__(self, model: Any, mesh: jax.sharding.Mesh, rows: int, row_len: int,
                 generate: Callable[..., list] | None = None):
        from indicfm.sharding import batch_sharding, batch_shards

        self.model = model
        self.mesh = mesh
        self.row_len = row_len
        self.graphdef, self.state = nnx.split(model)
        self.rows_sharding = batch_sharding(mesh)
        shards = batch_shards(dict(mesh.shape))
        self.rows = -(-rows // shards) * shards  # rows split evenly over the data-like axes
        self._program = _compiled_program(self.graphdef, mesh)
        self._generate = generate
        self.multi = jax.process_count() > 1
        self.is_driver = jax.process_index() == 0

    # -- the computations every process runs ---------------------------------------------------

    def _run_score(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        def place(x: np.ndarray) -> jax.Array:
            return jax.make_array_from_callback(x.shape, self.rows_sharding, lambda index: x[index])

        with jax.set_mesh(self.mesh):
            logp, greedy = self._program(self.state, *(place(batch[k]) for k in BATCH_FIELDS))
        return np.asarray(logp), np.asarray(greedy)

    def _run_generate(self, prompts: list[list[int]], options: dict) -> list:
        with jax.set_mesh(self.mesh):
            return self._generate(self.model, prompts, **options)

    # -- the driver's side -------------------------------------------------------------------

    def score(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-slot ``(log p(next token), next token is the argmax)`` of a ``[rows, row_len]`` batch."""
        if self.multi:
            _broadcast_header([SCORE])
            batch = _broadcast({k: batch[k] for k in BATCH_FIELDS})
        return self._run_score(batch)

    def generate(self, prompts: list[list[int]], options: dict) -> list:
        """:func:`indicfm.inference.generate.generate_ids` of ``prompts`` with ``options`` (JSON-able)."""
        if self.multi:
            longest = max(len(p) for p in prompts)
            padded = np.zeros((len(prompts), longest), np.int32)
            for i, p in enumerate(prompts):
                padded[i, : len(p)] = p
            text = np.frombuffer(json.dumps(options).encode("utf-8"), np.uint8)
            _broadcast_header([GENERATE, len(prompts), longest, len(text)])
            _broadcast({"prompts": padded, "lengths": np.array([len(p) for p in prompts], np.int32), "options": text})
        return self._run_generate(prompts, options)

    def finish(self, result: Any) -> Any:
        """Stop the serving processes and hand them ``result`` (JSON-able); returns it on every process."""
        if not self.multi:
            return result
        text = np.frombuffer(json.dumps(result, default=str).encode("utf-8"), np.uint8)
        _broadcast_header([RESULT, len(text)])
        _broadcast({"result": text})
        _broadcast_header([STOP])
        return result

    # -- the other processes -----------------------------------------------------------------

    def serve(self) -> Any:
        """On a process other than 0: run what process 0 broadcasts until it stops; returns the
        result it handed over (:meth:`finish`)."""
        result = None
        while True:
            header = _broadcast_header([])
            command = int(header[0])
            if command == STOP:
                return result
            if command == SCORE:
                shape = (self.rows, self.row_len)
                batch = _broadcast({k: np.zeros(shape, np.int32) for k in BATCH_FIELDS})
                self._run_score(batch)
            elif command == GENERATE:
                count, longest, size = (int(x) for x in header[1:4])
                got = _broadcast({"prompts": np.zeros((count, longest), np.int32),
                                  "lengths": np.zeros((count,), np.int32), "options": np.zeros((size,), np.uint8)})
                prompts = [list(map(int, row[:n])) for row, n in zip(got["prompts"], got["lengths"])]
                self._run_generate(prompts, json.loads(got["options"].tobytes().decode("utf-8")))
            elif command == RESULT:
                got = _broadcast({"result": np.zeros((int(header[1]),), np.uint8)})
                result = json.loads(got["result"].tobytes().decode("utf-8"))
            else:
                raise RuntimeError(f"unknown command {command} from process 0")


def _broadcast_header(values: list[int]) -> np.ndarray:
    header = np.zeros((HEADER,), np.int32)
    header[: len(values)] = values
    return np.asarray(_broadcast({"header": header})["header"])


def _broadcast(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Process 0's arrays on every process (the others pass arrays of the same shapes and dtypes)."""
    from jax.experimental import multihost_utils

    got = multihost_utils.broadcast_one_to_all(arrays)
    return {k: np.asarray(v) for k, v in got.items()}
