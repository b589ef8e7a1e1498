"""Shared by the downstream-evaluation tests (``tests/test_downstream_*.py``, ``test_eval_cli.py``):
a tiny tokenizer, a tiny model config, local task files, and an independent scoring reference."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np

TINY_MODEL = dict(
    vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
    num_experts=4, top_k=2, d_expert=16, num_shared_experts=1, first_dense_layers=1,
    compute_dtype="float32", param_dtype="float32", tie_embeddings=False, max_seq_len=64,
    attention_impl="reference",
)
BOS, EOS = "<s>", "</s>"


def tiny_tokenizer_json(sample_train_dir: Path) -> bytes:
    """A byte-level BPE ``tokenizer.json`` of 300 entries (+ bos, eos) trained on Hindi lines."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = (sample_train_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines()[:60]
    tok.train_from_iterator([unicodedata.normalize("NFC", l) for l in lines], trainer)
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    return tok.to_str().encode("utf-8")


def tiny_tokenizer(sample_train_dir: Path):
    from indicfm.tokenizer.load import TokenizerFile

    return TokenizerFile(tiny_tokenizer_json(sample_train_dir), "tokenizer.json", {"bos": BOS, "eos": EOS}).load()


def hindi_lines(sample_train_dir: Path, count: int, skip: int = 100) -> list[str]:
    lines = (sample_train_dir / "hin_Deva.txt").read_text(encoding="utf-8").splitlines()
    return [l for l in lines[skip:] if len(l) > 80][:count]


def write_choice_task(directory: Path, name: str, docs: list[dict]) -> Path:
    """A local multiple-choice task ``name`` (fields prompt, choices, gold) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n"
        + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                  for m in ("acc", "acc_norm", "acc_bytes")),
        encoding="utf-8",
    )
    return directory


class ReferenceScorer:
    """log p(continuation | [bos] context) by the model's plain forward pass, one request per row,
    no packing, float64 log-softmax in NumPy; tokenised with ``tokenizers`` directly (the ``hf``
    backend's split: trailing context spaces move to the continuation)."""

    def __init__(self, model, tokenizer_json: bytes, bos_id: int, length: int = 80):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        self.tok.encode_special_tokens = True
        self.bos_id = bos_id
        self.length = length
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, tokens_1xL, segment_1xL):
            L = tokens_1xL.shape[1]
            return nnx.merge(graphdef, state)(tokens_1xL, segment_1xL, jnp.arange(L)[None])[0]

        self._state = state
        self._run = run

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context, continuation = unicodedata.normalize("NFC", context), unicodedata.normalize("NFC", continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context) if context else []
        return [self.bos_id] + ctx, whole[len(ctx):]

    def score_ids(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        sequence = context + continuation
        assert len(sequence) <= self.length, "the reference takes one request per row, untruncated"
        tokens = np.zeros((1, self.length), np.int32)
        tokens[0, : len(sequence)] = sequence
        segment = (np.arange(self.length) < len(sequence)).astype(np.int32)[None]
        logits = np.asarray(self._run(self._state, tokens, segment), np.float64)[0]
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total, greedy = 0.0, True
        for j, token in enumerate(continuation):
            slot = len(context) + j - 1
            total += logp[slot, token]
            greedy &= int(np.argmax(logp[slot])) == token
        return total, greedy

    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        return self.score_ids(*self.split(context, continuation))
