"""Rebuild ``samples/`` from ``../shared/data`` (developers only; users get the committed files).

Training text: Common Voice sentences (CC0) where a corpus file is Common Voice only, otherwise the
first FLORES-200 dev lines (CC-BY-SA 4.0).  Held-out parallel text: the last FLORES-200 dev lines of
every language, never used for training, so tokenizer parity and bits-per-byte are measured on
text the tokenizer and model did not see.  Bytes are copied unchanged (not normalised): indicfm
normalises on read, and the sample should look like real input.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path(__file__).resolve().parent

COMMON_VOICE_ONLY = ["asm_Beng", "npi_Deva", "ory_Orya", "urd_Arab", "eng_Latn"]
FLORES_TRAIN = ["hin_Deva", "ben_Beng", "mar_Deva", "guj_Gujr", "pan_Guru", "tam_Taml", "tel_Telu",
                "kan_Knda", "mal_Mlym", "san_Deva", "snd_Arab"]
CV_LINES = 1500
FLORES_TRAIN_LINES = 400
HELDOUT_LINES = 200  # the last lines of the 997-line dev split


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def main() -> None:
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: this script is for developers with ../shared/data")
    (OUT / "train").mkdir(exist_ok=True)
    (OUT / "heldout").mkdir(exist_ok=True)
    flores = SHARED / "flores200" / "dev"
    for lang in COMMON_VOICE_ONLY:
        rows = [r for r in lines(SHARED / "corpus" / f"{lang}.txt") if r][:CV_LINES]
        (OUT / "train" / f"{lang}.txt").write_bytes(b"\n".join(rows) + b"\n")
    for lang in FLORES_TRAIN:
        rows = [r for r in lines(flores / f"{lang}.dev") if r][:FLORES_TRAIN_LINES]
        (OUT / "train" / f"{lang}.txt").write_bytes(b"\n".join(rows) + b"\n")
    for lang in COMMON_VOICE_ONLY + FLORES_TRAIN:
        rows = [r for r in lines(flores / f"{lang}.dev") if r][-HELDOUT_LINES:]
        (OUT / "heldout" / f"{lang}.dev").write_bytes(b"\n".join(rows) + b"\n")


if __name__ == "__main__":
    main()
