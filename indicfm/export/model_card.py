"""README.md model card of an exported model: what it is, what it was trained on, how well it
does per language (held-out bits per byte from the run's own evaluation), and how to load it.

The YAML header is rendered by ``huggingface_hub.ModelCardData`` so the Hub reads it (languages as
ISO 639-3 codes — the first part of a FLORES-200 code such as ``hin_Deva``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from indicfm.text import LANGUAGES


def per_language_bpb(workdir: Path, step: int) -> tuple[int | None, dict[str, float]]:
    """The latest held-out bits per byte logged at or before ``step`` in ``<workdir>/metrics.jsonl``:
    ``(eval step, {lang: bpb})``; ``(None, {})`` when the run logged none."""
    from indicfm.train.metrics import iter_records

    best_step, best = None, {}
    for record in iter_records(Path(workdir) / "metrics.jsonl"):
        values = {k[len("bpb/"):]: v for k, v in record.items() if k.startswith("bpb/") and isinstance(v, (int, float))}
        record_step = int(record.get("step", -1))
        if values and record_step <= step and (best_step is None or record_step >= best_step):
            best_step, best = record_step, values
    return best_step, best


def _training_languages(config: dict, bpb: dict[str, float]) -> list[str]:
    from indicfm.text import language_of_path

    langs = set(k for k in bpb if k in LANGUAGES)
    data = config.get("data", {})
    langs.update((data.get("language_weights") or {}).keys())
    for source in data.get("inputs", []):
        path = Path(source)
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for f in files:
            lang = language_of_path(f)
            if lang in LANGUAGES:
                langs.add(lang)
    return sorted(langs)


def model_card_text(loaded: Any, notes: list[str], workdir: Path) -> str:
    """The README text for a model restored by ``indicfm.inference.load.load_for_inference``."""
    from huggingface_hub import ModelCardData

    from indicfm.model.flops import count_active_params, count_params

    cfg = loaded.train_model_config
    config = loaded.config
    eval_step, bpb = per_language_bpb(workdir, loaded.step)
    langs = _training_languages(config, bpb)
    header = ModelCardData(
        language=sorted({code.split("_")[0] for code in langs}) or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["indicfm", "mixture-of-experts", "qwen2_moe"],
    ).to_yaml()

    trainer, data = config.get("trainer", {}), config.get("data", {})
    tokens = trainer.get("global_batch_size", 0) * data.get("seq_len", 0) * loaded.step
    sources = [str(s) for s in data.get("inputs", [])] + [h.get("name", "?") for h in data.get("hub", [])]
    lines = [
        "---", header, "---", "",
        "# indicfm Mixture-of-Experts language model", "",
        f"Pretrained with indicfm (JAX, Flax NNX) for {loaded.step:,} steps and exported as a "
        f"Hugging Face `Qwen2MoeForCausalLM`. {count_params(cfg):,} parameters, {count_active_params(cfg):,} "
        f"active per token; {cfg.num_layers} layers ({cfg.first_dense_layers} dense, {cfg.num_moe_layers} MoE with "
        f"{cfg.num_experts} experts, top-{cfg.top_k}, {cfg.num_shared_experts} shared), d_model {cfg.d_model}, "
        f"{cfg.num_heads} query / {cfg.num_kv_heads} key-value heads, vocabulary {cfg.vocab_size:,}, "
        f"context {cfg.max_seq_len:,}.", "",
        "## Training data", "",
        f"- Sources: {', '.join(f'`{s}`' for s in sources) or 'not recorded'}",
        f"- Sequence length {data.get('seq_len', '?')}, global batch {trainer.get('global_batch_size', '?')} "
        f"sequences: about {tokens:,} training tokens seen.",
        f"- Language mixing weights: {json.dumps(data.get('language_weights')) if data.get('language_weights') else 'proportional to the tokens available'}.",
        "", "## Languages and held-out bits per byte", "",
    ]
    if bpb:
        lines += [
            f"Bits per UTF-8 byte of NFC text on held-out lines (`{config.get('eval', {}).get('heldout_dir')}`), "
            f"measured by the training run at step {eval_step}; lower is better, comparable across tokenizers.", "",
            "| language | code | bits per byte |", "|---|---|---|",
        ]
        for lang in sorted(k for k in bpb if k != "mean"):
            name = LANGUAGES[lang].name if lang in LANGUAGES else "?"
            lines.append(f"| {name} | `{lang}` | {bpb[lang]:.4f} |")
        if "mean" in bpb:
            lines.append(f"| **mean** | | {bpb['mean']:.4f} |")
    else:
        lines.append("The run logged no held-out evaluation (set `eval.heldout_dir` and `eval.every_steps`).")
        if langs:
            lines += ["", "Languages: " + ", ".join(f"`{code}`" for code in langs)]
    lines += [
        "", "## Use", "",
        _tokenizer_use(loaded.tokenizer()), "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "ids = tok('भारत की राजधानी', return_tensors='pt').input_ids",
        "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))",
        "```", "",
        "## Export notes", "",
        *[f"- {note}" for note in notes],
        "- Exact mapping checked by indicfm's tests against an independent NumPy Qwen2-MoE forward pass.",
    ]
    return "\n".join(lines) + "\n"


def _tokenizer_use(tokenizer: Any) -> str:
    """How to feed the exported tokenizer the text the model was trained on."""
    start = tokenizer.special.bos or tokenizer.special.eos
    framing = (f"Every training document began with `{start.token}` (id {start.id}) and ended with "
               f"`{tokenizer.special.eos.token}` (id {tokenizer.eos_id}).")
    if tokenizer.kind == "sentencepiece":
        return ("`tokenizer.json` applies Unicode NFC itself, adds the BOS and gives the ids indicfm trained on. "
                f"{framing} (`tokenizer.model` is the raw SentencePiece model: NFC-normalise text yourself if you "
                "use it directly.)")
    return ("`tokenizer.json` is the run's own tokenizer, unchanged (its special tokens are named in "
            "`tokenizer_config.json`). indicfm normalised text to Unicode NFC before tokenizing: do the same "
            f"(`unicodedata.normalize('NFC', text)`). {framing} Whether `tokenizer(text)` adds "
            f"`{start.token}` is up to the file's post-processor; if it does not, prepend it.")


def write_model_card(out_dir: Path, loaded: Any, notes: list[str], *, workdir: Path) -> Path:
    path = out_dir / "README.md"
    path.write_text(model_card_text(loaded, notes, workdir), encoding="utf-8")
    return path
