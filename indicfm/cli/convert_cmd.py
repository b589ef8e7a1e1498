"""`indicfm import hf` (a Hugging Face model as an indicfm run) and `indicfm upcycle` (dense -> MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from indicfm.cli.common import ConfigOption, SetOption, console, fail, load_config_or_exit, quiet_orbax

import_app = typer.Typer(help="Start a run from a published model.", no_args_is_help=True)

#: files of a Hugging Face model directory that describe its tokenizer and generation defaults
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Run directory to create.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --output.")]


def _source_directory(src: str) -> Path:
    """A local model directory, or a hub id downloaded (weights, config, tokenizer) where the network allows."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or src.count("/") != 1:
        fail(f"{src}: not a model directory (config.json + safetensors) nor a Hugging Face hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as err:  # offline, unknown repo, gated model: say which and why
        fail(f"{src}: not a local directory, and downloading it from the Hugging Face hub failed: {err}")
    raise AssertionError  # fail() exits


def _source_tokenizer(src: Path) -> tuple[Any, Path] | None:
    """The source's tokenizer and its file, if it has one: ``tokenizer.json`` where there is one (what
    transformers loads by default, with the special tokens its tokenizer_config.json names), else a
    SentencePiece ``tokenizer.model``.  A continued run prepares its data with exactly this file."""
    from indicfm.tokenizer.load import load_tokenizer

    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).is_file():
            return load_tokenizer(src / name), src / name
    return None


def import_hf_command(
    src: Annotated[str, typer.Argument(help="Hugging Face model directory (config.json + *.safetensors), or a hub id.")],
    output: OutputOption,
    config: ConfigOption = None,
    sets: SetOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Import a Hugging Face checkpoint as the starting point of an indicfm run.

    Examples:

        indicfm import hf path/to/SmolLM2-135M --output runs/smol --config configs/quickstart.yaml

        indicfm train --workdir runs/smol            # continues pretraining from it

    Architectures: Llama (2, 3.x with llama3 RoPE scaling, SmolLM2, TinyLlama), Mistral, Qwen2, Qwen3,
    Mixtral, Qwen2-MoE, Qwen3-MoE.  The model section comes from the source's config.json; --config/--set
    give the rest of the run (data, trainer, mesh) and model settings that do not change what it computes
    (param_dtype, scan_layers, remat, ...).  Anything the source uses that indicfm cannot compute exactly
    is an error naming it.  Tensors are read one at a time and placed straight into their sharding on
    the run's mesh.  Writes OUTPUT/initial/ (parameters), OUTPUT/tokenizer/ and OUTPUT/config.yaml
    (trainer.init_from: initial).
    """
    import time

    from indicfm.convert.hf_arch import ConversionError, architecture_of
    from indicfm.convert.hf_import import check_tokenizer_fits, imported_model_config, load_hf_model, read_hf_config
    from indicfm.convert.initial_run import check_output, write_initial_run
    from indicfm.model.flops import count_params
    from indicfm.sharding import logical_axis_rules, make_mesh
    from indicfm.tokenizer.load import TokenizerError

    quiet_orbax()
    cfg = load_config_or_exit(config, sets)
    source = _source_directory(src)
    started = time.perf_counter()
    try:
        hf = read_hf_config(source)
        arch = architecture_of(hf, str(source / "config.json"))
        model_cfg = imported_model_config(source, **cfg.model.run_settings())
        tokenizer = _source_tokenizer(source)
        if tokenizer:
            check_tokenizer_fits(model_cfg, tokenizer[0].vocab_size, str(tokenizer[1]))
        check_output(output, overwrite)
        cfg = cfg.model_copy(update={"model": model_cfg})
        mesh = make_mesh(cfg.mesh)
        model = load_hf_model(source, mesh, model_cfg, logical_axis_rules(cfg.mesh.shard_weights_over_data))
        files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
        write_initial_run(output, cfg, model, source={"hf": str(src), "architecture": arch.name},
                          tokenizer_files=files, tokenizer_model_file=tokenizer[1] if tokenizer else None)
    except (ConversionError, TokenizerError) as err:
        fail(str(err))
    if tokenizer:
        console.print(f"tokenizer {tokenizer[0].describe()}", highlight=False, markup=False)
        for warning in tokenizer[0].normalizer_warnings():
            console.print(f"[yellow]warning:[/] tokenizer {tokenizer[1]}: {warning.detail}", highlight=False)
    console.print(
        f"imported {arch.name} ({count_params(model_cfg):,} parameters, "
        f"{'scanned' if model_cfg.scan_layers else 'unrolled'} layout) from {source} into {output} "
        f"in {time.perf_counter() - started:.1f} s\n"
        f"continue pretraining: indicfm train --workdir {output}",
        highlight=False,
    )


def upcycle_command(
    source: Annotated[Path, typer.Option("--from", help="Run directory of the dense parent (trained or imported).")],
    output: OutputOption,
    granularity: Annotated[int, typer.Option("--granularity", "-g", min=1,
                                             help="Cut each copy of the FFN into this many fine-grained experts.")] = 1,
    shared_experts: Annotated[int, typer.Option("--shared-experts", min=0,
                                                help="Always-on shared experts (start at zero output).")] = 0,
    config: ConfigOption = None,
    sets: SetOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Turn a dense model into a Mixture of Experts that computes the same function at step 0.

    Examples:

        indicfm upcycle --from runs/dense --output runs/moe --set model.num_experts=8 --set model.top_k=2

        indicfm upcycle --from runs/dense --output runs/fine -g 4 --set model.num_experts=32 --set model.top_k=8

    Each expert is a copy of its layer's dense FFN (cut into --granularity slices); the router gives a
    copy's slices one random vector (virtual groups) and gates are renormalised over the chosen
    experts, with the down projections scaled by the granularity, so the upcycled model's logits are
    the parent's.  The run's config is the parent's (OUTPUT/config.yaml's trainer.init_from:
    initial), with --config/--set on top; --set model.first_dense_layers=N keeps the first N layers
    dense (default: every layer becomes MoE).
    """
    import tempfile

    from indicfm.convert.hf_arch import ConversionError
    from indicfm.convert.initial_run import check_output, write_initial_run
    from indicfm.convert.upcycle import UpcycleError, upcycle, upcycled_config
    from indicfm.sharding import logical_axis_rules, make_mesh
    from indicfm.train.checkpoint import stored_tokenizer
    from indicfm.train.saved_model import CheckpointNotFound, restore_model

    quiet_orbax()
    parent_config = source / "config.yaml"
    base = load_config_or_exit(config or (parent_config if parent_config.is_file() else None), sets)
    try:
        mesh = make_mesh(base.mesh)
        parent = restore_model(source, mesh)
        set_keys = {s.split("=", 1)[0].strip() for s in sets or []}
        moe_cfg = upcycled_config(
            parent.saved_model_config, num_experts=base.model.num_experts, top_k=base.model.top_k,
            granularity=granularity, shared_experts=shared_experts,
            first_dense_layers=base.model.first_dense_layers if "model.first_dense_layers" in set_keys else 0,
            **{k: v for k, v in base.model.run_settings().items() if k != "dispatch"},  # upcycling needs dropless
        )
        check_output(output, overwrite)
        model = upcycle(parent.model, moe_cfg, mesh, granularity=granularity, seed=base.trainer.seed,
                        rules=logical_axis_rules(base.mesh.shard_weights_over_data))
        cfg = base.model_copy(update={"model": moe_cfg})
        with tempfile.TemporaryDirectory() as tmp:
            files: list[Path] = []
            if parent.tokenizer:  # the parent's own tokenizer (and special tokens), as its checkpoint stored it
                files = [stored_tokenizer(parent.tokenizer).write(Path(tmp))]
                files += [p for p in Path(tmp).iterdir() if p != files[0]]
            write_initial_run(output, cfg, model, source={"upcycled_from": str(source.resolve()), "step": parent.step,
                                                          "granularity": granularity},
                              tokenizer_files=files, tokenizer_model_file=files[0] if files else None)
    except (UpcycleError, ConversionError, CheckpointNotFound, ValueError) as err:
        fail(str(err))
    console.print(
        f"upcycled {source} (step {parent.step}) into {moe_cfg.num_experts} experts, top-{moe_cfg.top_k}, granularity "
        f"{granularity}, in {output}\ntrain it: indicfm train --workdir {output}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    import_app.command("hf")(import_hf_command)
    app.add_typer(import_app, name="import")
    app.command("upcycle")(upcycle_command)
