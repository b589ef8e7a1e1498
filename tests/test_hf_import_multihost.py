"""``import hf`` with several processes: each process reads only the checkpoint bytes its devices
hold, and the placed parameters equal the single-process import.

The fast tests check the reading logic in one process: the slices a "process" (half of the 8 fake
devices) would be asked for read only the experts those devices hold, and a whole import reads each
tensor exactly once however many devices share it.  The slow test runs it for real: two JAX
processes (4 fake CPU devices each, ``jax.distributed``) import onto an fsdp x expert mesh spanning
both, and compare every shard they hold with a single-device import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import cpu_process_env, free_port, wait_for_results
from indicfm.config import MeshConfig
from indicfm.convert.hf_arch import architecture_of, plain_path, tensor_table
from indicfm.convert.hf_import import SliceReader, imported_model_config, load_hf_model, read_hf_config
from indicfm.convert.safetensors_files import SafetensorsCheckpoint
from indicfm.model.transformer import Transformer
from indicfm.sharding import make_mesh, state_shardings

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "tests" / "golden" / "hf" / "qwen2_moe"  # 4 experts, a shared expert, q/k/v biases
FLOAT32 = {"param_dtype": "float32", "compute_dtype": "float32", "attention_impl": "reference"}
#: fsdp=2 x expert=4 with the expert axis across the two halves of the devices (processes 0 and 1 in
#: the two-process test): grid[f][e] = device (e // 2) * 4 + f * 2 + e % 2
ORDER = [0, 1, 4, 5, 2, 3, 6, 7]


def _tensor_bytes() -> dict[str, int]:
    """Bytes of every tensor, read with the safetensors library (independent of indicfm's reader)."""
    from safetensors.numpy import load_file

    return {name: value.nbytes for name, value in load_file(SRC / "model.safetensors").items()}


def _spanning_mesh(devices: list) -> jax.sharding.Mesh:
    return make_mesh(MeshConfig(data=1, fsdp=2, expert=4, tensor=1), [devices[i] for i in ORDER])


def test_a_process_reads_only_the_experts_its_devices_hold():
    from safetensors.numpy import load_file

    cfg = imported_model_config(SRC, **FLOAT32)
    table = tensor_table(architecture_of(read_hf_config(SRC)), cfg)
    mesh = _spanning_mesh(jax.devices())
    path = ("blocks", 1, "mlp", "w_up_ExDxF")
    shape = (cfg.num_experts, cfg.d_model, cfg.d_expert)

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    shardings = jax.tree_util.tree_leaves_with_path(state_shardings(nnx.state(abstract), mesh))
    (sharding,) = [leaf for key, leaf in shardings if plain_path(key) == path]
    everything = sharding.devices_indices_map(shape)
    tensors = load_file(SRC / "model.safetensors")
    reference = np.stack([tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].T for e in range(cfg.num_experts)])
    for process, held in ((0, {0, 1}), (1, {2, 3})):
        devices = set(jax.devices()[4 * process: 4 * process + 4])
        indices = [index for device, index in everything.items() if device in devices]
        assert {e for index in indices for e in range(*index[0].indices(shape[0]))} == held
        read: Counter = Counter()
        with SafetensorsCheckpoint(SRC, on_read=lambda name, n: read.update({name: n})) as checkpoint:
            reader = SliceReader(table[path], checkpoint, shape, path, indices)
            for index in indices:
                np.testing.assert_array_equal(reader(index), reference[index])
        expected = {f"model.layers.1.mlp.experts.{e}.up_proj.weight": tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].nbytes
                    for e in held}
        assert dict(read) == expected  # its two experts, each once (two devices hold each: fsdp halves)


def test_an_import_onto_many_devices_reads_every_tensor_once():
    read: Counter = Counter()
    calls: Counter = Counter()

    def count(name: str, n: int) -> None:
        read[name] += n
        calls[name] += 1

    cfg = imported_model_config(SRC, **FLOAT32)
    load_hf_model(SRC, _spanning_mesh(jax.devices()), cfg, on_read=count)
    assert dict(read) == _tensor_bytes() and set(calls.values()) == {1}


WORKER = textwrap.dedent(
    """
    import json, sys
    from indicfm.launch import distributed
    distributed.initialize()                      # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    import jax, numpy as np
    from collections import Counter
    from flax import nnx
    from indicfm.config import MeshConfig
    from indicfm.convert.hf_import import imported_model_config, load_hf_model
    from indicfm.sharding import make_mesh

    src, order = sys.argv[1], json.loads(sys.argv[2])
    cfg = imported_model_config(src, param_dtype="float32", compute_dtype="float32", attention_impl="reference")
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=4, tensor=1), [jax.devices()[i] for i in order])
    read = Counter()
    model = load_hf_model(src, mesh, cfg, on_read=lambda name, n: read.update({name: n}))
    # the reference: the same checkpoint imported onto this process's first device alone
    alone = make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=1), jax.local_devices()[:1])
    reference = dict(jax.tree_util.tree_leaves_with_path(nnx.state(load_hf_model(src, alone, cfg))))
    mismatched, compared, held = [], 0, set()
    for path, array in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        want = np.asarray(reference[path])
        for shard in array.addressable_shards:
            compared += 1
            if not np.array_equal(np.asarray(shard.data), want[shard.index]):
                mismatched.append(jax.tree_util.keystr(path))
            if "ExDxF" in jax.tree_util.keystr(path):
                held.update(range(*shard.index[0].indices(array.shape[0])))
    print("RESULT " + json.dumps({"process": jax.process_index(), "read": dict(read), "mismatched": mismatched,
                                  "compared": compared, "held_experts": sorted(held)}), flush=True)
    distributed.shutdown()
    """
)


@pytest.mark.slow
def test_two_processes_import_what_one_imports_each_reading_only_its_share(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(SRC), json.dumps(ORDER)], env=cpu_process_env(4, i, port), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = sorted(wait_for_results(procs, timeout=600), key=lambda r: r["process"])
    sizes = _tensor_bytes()
    whole = sum(sizes.values())
    for result, held in zip(results, ([0, 1], [2, 3])):
        assert result["mismatched"] == [] and result["compared"] > 0
        assert result["held_experts"] == held  # the expert axis really spans the two processes
        experts = {name: n for name, n in result["read"].items() if ".experts." in name}
        expected = {name: n for name, n in sizes.items() if ".experts." in name
                    and int(name.split(".experts.")[1].split(".")[0]) in held}
        assert experts == expected  # only its own experts, each once
        dense = {name: n for name, n in result["read"].items() if ".experts." not in name}
        assert dense == {name: n for name, n in sizes.items() if ".experts." not in name}  # read whole, once
        assert sum(result["read"].values()) < whole
