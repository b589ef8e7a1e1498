"""`indicfm import hf` (a Hugging Face model as an indicfm run) and `indicfm upcycle` (dense -> MoE)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from indicfm.cli.common import ConfigOption, SetOption, console, fail, load_config_or_exit, quiet_orbax

import_app = typer.Typer(help="Start a run from a published model.", no_args_is_help=True)

#: files of a Hugging Face model directory that describe its tokenizer and generation defaults
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Run directory to create.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --output.")]
ExtendedTokenizerOption = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="An extended tokenizer (the tokenizer.json, or the folder, indicfm tokenizer extend wrote) whose "
    "first ids are exactly "
    "the model's tokenizer's: the model gets one embedding (and output) row per new piece, the mean of the rows of "
    "the model's own tokens for the piece's text, and the run prepares its data with this tokenizer.")]


def _source_directory(src: str) -> Path:
    """A local model directory, a bucket URL (``gs://bucket/model``: read in place, tensor by tensor),
    or a hub id downloaded (weights, config, tokenizer) where the network allows."""
    from indicfm.storage import StorageError, as_path, is_url

    if is_url(src):
        try:
            return as_path(src)
        except StorageError as err:
            fail(str(err))
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


@dataclass
class _Extension:
    """An extended tokenizer checked against the model's own, and the resize it asks for."""

    file: Any  # indicfm.tokenizer.load.TokenizerFile: what the run stores (special tokens included)
    tokenizer: Any  # file.load()
    plan: Any  # indicfm.convert.vocab_resize.VocabularyPlan
    path: Path  # where it was read from
    record_file: Path | None  # the extension.json beside it (indicfm tokenizer extend), if any
    borrowed_specials: bool  # no tokenizer_config.json beside it: its special tokens are the base's

    def stage(self, directory: Path) -> list[Path]:
        """The files the run's tokenizer/ folder gets: the tokenizer (as ``tokenizer.json``, so the
        special tokens of a ``tokenizer_config.json`` beside it are read back) and extension.json."""
        files = [self.file.write(directory)]
        files += [p for p in directory.iterdir() if p != files[0]]
        if self.record_file is not None:
            files.append(self.record_file)
        return files

    def record(self) -> dict:
        """What the initial checkpoint's ``source`` says about the new vocabulary."""
        import hashlib

        plan = self.plan
        return {"extended_tokenizer": str(self.path), "tokenizer_sha256": hashlib.sha256(self.file.data).hexdigest(),
                "base_vocabulary": plan.base_size, "vocabulary": plan.size, "embedding_rows": plan.rows,
                "previous_embedding_rows": plan.old_rows, "rows_multiple_of": plan.multiple,
                "new_rows": "mean of the base rows of the base tokenizer's encoding of each new piece's text",
                "padded_rows": "mean of all base rows"}


def _plan_extension(base: Any, base_name: str, path: Path, model_rows: int, mesh: Any) -> _Extension:
    """Read ``path``, check that it extends ``base`` (the model's tokenizer) and plan the resize;
    every problem is an error naming the file, raised before anything is written."""
    from indicfm.convert.vocab_resize import VocabularyError, plan_vocabulary, row_multiple
    from indicfm.tokenizer.load import HF, TokenizerError, TokenizerFile, read_tokenizer_file

    path = path / "tokenizer.json" if path.is_dir() else path  # the folder `indicfm tokenizer extend` wrote
    try:
        read = read_tokenizer_file(path)
    except (OSError, ValueError) as err:  # missing, unreadable, or a tokenizer_config.json that is not JSON
        raise VocabularyError(f"--tokenizer {path}: cannot read it: {err}") from None
    name = "tokenizer.json" if read.kind == HF else path.name
    # its own tokenizer_config.json names its special tokens; without one they are the base's (same ids)
    file = TokenizerFile(read.data, name, read.declared if read.declared is not None else base.file.declared)
    try:
        tokenizer = file.load()
    except TokenizerError as err:
        raise VocabularyError(f"--tokenizer {path}: {err}") from None
    plan = plan_vocabulary(base, tokenizer, model_rows, row_multiple(mesh), base_name=base_name,
                           extended_name=str(path))
    record = path.parent / "extension.json"
    return _Extension(file, tokenizer, plan, path, record if record.is_file() else None, read.declared is None)


def import_hf_command(
    src: Annotated[str, typer.Argument(help="Hugging Face model directory (config.json + *.safetensors), local or "
                                            "gs://bucket/dir, or a hub id.")],
    output: OutputOption,
    config: ConfigOption = None,
    sets: SetOption = None,
    overwrite: OverwriteOption = False,
    tokenizer_file: ExtendedTokenizerOption = None,
) -> None:
    """Import a Hugging Face checkpoint as the starting point of an indicfm run.

    Examples:

        indicfm import hf path/to/SmolLM2-135M --output runs/smol --config configs/quickstart.yaml

        indicfm import hf gs://my-bucket/models/Qwen3-0.6B --output runs/qwen3   # read in place, tensor by tensor

        indicfm train --workdir runs/smol            # continues pretraining from it

    Architectures: Llama (2, 3.x with llama3 RoPE scaling, SmolLM2, TinyLlama), Mistral, Qwen2, Qwen3,
    Mixtral, Qwen2-MoE, Qwen3-MoE.  The model section comes from the source's config.json; --config/--set
    give the rest of the run (data, trainer, mesh) and model settings that do not change what it computes
    (param_dtype, scan_layers, remat, ...).  Anything the source uses that indicfm cannot compute exactly
    is an error naming it.  Tensors are read one at a time and placed straight into their sharding on
    the run's mesh.  Writes OUTPUT/initial/ (parameters), OUTPUT/tokenizer/ and OUTPUT/config.yaml
    (trainer.init_from: initial).

    With --tokenizer EXTENDED (e.g. from `indicfm tokenizer extend --base SRC/tokenizer.json ...`)
    the model is imported with a vocabulary extended to EXTENDED's: the source's rows stay
    bit-identical, each new row is the mean of the source rows of the source tokenizer's encoding
    of the new piece's text, and the table is padded to a multiple of 128 (see `indicfm import
    tokenizer --help`).  The run's tokenizer is EXTENDED.
    """
    import tempfile
    import time

    from indicfm.convert.hf_arch import ConversionError, architecture_of
    from indicfm.convert.hf_import import check_tokenizer_fits, imported_model_config, load_hf_model, read_hf_config
    from indicfm.convert.initial_run import check_output, write_initial_run
    from indicfm.convert.vocab_resize import extend_vocabulary
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
        # an MoE source decides its dispatch (dropless: what it computes), as upcycling does, unless
        # --set model.dispatch asks for another (how tokens reach experts, not what the model is)
        settings = {k: v for k, v in cfg.model.run_settings().items() if k != "dispatch"}
        model_cfg = imported_model_config(source, **settings)
        if any(s.split("=", 1)[0].strip() == "model.dispatch" for s in sets or ()):
            model_cfg = model_cfg.model_copy(update={"dispatch": cfg.model.dispatch})
        tokenizer = _source_tokenizer(source)
        if tokenizer:
            check_tokenizer_fits(model_cfg, tokenizer[0].vocab_size, str(tokenizer[1]))
        mesh = make_mesh(cfg.mesh)
        rules = logical_axis_rules(cfg.mesh.shard_weights_over_data)
        extension = None
        if tokenizer_file is not None:
            if not tokenizer:
                raise ConversionError(f"{source} has no tokenizer.json nor tokenizer.model: no base tokenizer that "
                                      f"--tokenizer {tokenizer_file} could extend")
            extension = _plan_extension(tokenizer[0], str(tokenizer[1]), tokenizer_file, model_cfg.vocab_size, mesh)
        check_output(output, overwrite)
        cfg = cfg.model_copy(update={"model": model_cfg})
        model = load_hf_model(source, mesh, model_cfg, rules)
        with tempfile.TemporaryDirectory() as staging:
            if extension is None:
                files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
                tokenizer_path = tokenizer[1] if tokenizer else None
                origin = {"hf": str(src), "architecture": arch.name}
            else:
                model = extend_vocabulary(model, extension.plan, mesh, rules)
                cfg = cfg.model_copy(update={"model": model.cfg})
                companions = [source / name for name in TOKENIZER_FILES[1:3]  # the base's specials (and chat template)
                              if extension.borrowed_specials and (source / name).is_file()]
                files = extension.stage(Path(staging)) + companions
                files += [source / "generation_config.json"] if (source / "generation_config.json").is_file() else []
                tokenizer_path = files[0]
                origin = {"hf": str(src), "architecture": arch.name, **extension.record()}
            write_initial_run(output, cfg, model, source=origin, tokenizer_files=files, tokenizer_model_file=tokenizer_path)
    except (ConversionError, TokenizerError) as err:
        fail(str(err))
    if extension is not None:
        console.print(extension.plan.describe(), highlight=False, markup=False)
        tokenizer = (extension.tokenizer, tokenizer_file)
    if tokenizer:
        console.print(f"tokenizer {tokenizer[0].describe()}", highlight=False, markup=False)
        for warning in tokenizer[0].normalizer_warnings():
            console.print(f"[yellow]warning:[/] tokenizer {tokenizer[1]}: {warning.detail}", highlight=False)
    console.print(
        f"imported {arch.name} ({count_params(cfg.model):,} parameters, "
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


def import_tokenizer_command(
    source: Annotated[Path, typer.Option("--from", help="Run directory whose model gets the new vocabulary "
                                         "(imported or trained).")],
    tokenizer_file: Annotated[Path, typer.Option("--tokenizer", help="The extended tokenizer (the tokenizer.json, or "
                                                 "the folder, indicfm tokenizer extend wrote): its first ids must be the "
                                                 "run's tokenizer's.")],
    output: OutputOption,
    config: ConfigOption = None,
    sets: SetOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Give a run's model an extended vocabulary, as the starting point of a new run.

    Examples:

        indicfm tokenizer extend --base runs/smol/tokenizer/tokenizer.json --add indic.model --output ext

        indicfm import tokenizer --from runs/smol --tokenizer ext --output runs/smol-indic

        indicfm train --workdir runs/smol-indic      # prepares its data with the extended tokenizer

    The model's rows for the run's own tokenizer's ids stay bit-identical, so on text the old tokenizer
    encodes, the new model's logits over those ids are the old ones.  Each new piece's embedding row
    (and output row, when they are not tied) is the mean of the model's rows for the old tokenizer's
    encoding of the piece's text, the simple initialisation two 2024 studies (Mundra et al.; Tejaswi
    et al.) found as good as elaborate ones.  The table is padded to a multiple of 128 (of the mesh's
    tensor x fsdp devices when that does not divide 128); padded rows are the mean of all rows, so no
    padded id is more probable than the average token.  model.vocab_size becomes the padded size.

    The new run's config is the old one's (OUTPUT/config.yaml, trainer.init_from: initial) with the
    extended tokenizer as tokenizer.model_file (its sha256 is in the checkpoint) and data.cache_dir
    unset, so `indicfm train` prepares data.inputs with the new tokenizer (a cache built with another
    tokenizer is refused); --config/--set on top.  `indicfm export hf` ships the extended tokenizer.json.
    """
    import tempfile

    from indicfm.convert.hf_arch import ConversionError
    from indicfm.convert.initial_run import check_output, write_initial_run
    from indicfm.convert.vocab_resize import extend_vocabulary
    from indicfm.sharding import logical_axis_rules, make_mesh
    from indicfm.train.checkpoint import stored_tokenizer
    from indicfm.train.saved_model import CheckpointNotFound, restore_model

    quiet_orbax()
    parent_config = source / "config.yaml"
    base = load_config_or_exit(config or (parent_config if parent_config.is_file() else None), sets)
    set_keys = {s.split("=", 1)[0].strip() for s in sets or []}
    try:
        mesh = make_mesh(base.mesh)
        rules = logical_axis_rules(base.mesh.shard_weights_over_data)
        parent = restore_model(source, mesh, rules=rules,
                               adapt=lambda saved: saved.model_copy(update=base.model.run_settings()))
        if not parent.tokenizer:
            raise ConversionError(f"{parent.directory / str(parent.step)} stores no tokenizer: nothing that "
                                  f"--tokenizer {tokenizer_file} could be checked against")
        base_tokenizer = stored_tokenizer(parent.tokenizer).load()
        extension = _plan_extension(base_tokenizer, f"{source} ({base_tokenizer.file.name})", tokenizer_file,
                                    parent.model.cfg.vocab_size, mesh)
        check_output(output, overwrite)
        model = extend_vocabulary(parent.model, extension.plan, mesh, rules)
        data = base.data if "data.cache_dir" in set_keys else base.data.model_copy(update={"cache_dir": None})
        cfg = base.model_copy(update={"model": model.cfg, "data": data})
        with tempfile.TemporaryDirectory() as staging:
            files = extension.stage(Path(staging))
            write_initial_run(output, cfg, model, source={"extended_from": str(source.resolve()), "step": parent.step,
                                                          **extension.record()},
                              tokenizer_files=files, tokenizer_model_file=files[0])
    except (ConversionError, CheckpointNotFound, ValueError) as err:
        fail(str(err))
    console.print(
        f"{extension.plan.describe()}\nmodel of {source} (step {parent.step}) with tokenizer {tokenizer_file} in {output}\n"
        f"tokenizer {extension.tokenizer.describe()}\n"
        f"continue pretraining (data prepared with the new tokenizer): indicfm train --workdir {output}",
        highlight=False, markup=False,
    )


def register(app: typer.Typer) -> None:
    import_app.command("hf")(import_hf_command)
    import_app.command("tokenizer")(import_tokenizer_command)
    app.add_typer(import_app, name="import")
    app.command("upcycle")(upcycle_command)
