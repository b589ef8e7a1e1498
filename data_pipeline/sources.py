"""Read raw documents from local files and Hugging Face datasets, with read-time rejection reasons.

This is the one reader of raw text in indicfm: the tokenizer trainer and ``data prepare`` both use
it, so they see the same documents, normalised the same way (NFC, :func:`indicfm.text.normalize`)
and skip the same broken lines.

Inputs are local paths or ``gs://`` URLs (:mod:`indicfm.storage`); both are read the same way.
Local ``.txt``/``.dev`` (one document per line) and ``.jsonl`` (one JSON object per line) files are
read by our own byte-level reader instead of ``datasets``' ``text``/``json`` builders: those decode
with ``errors="replace"`` or raise on the first bad byte or bad JSON record (a crash hours into a
run, or silently altered text).  Here every line becomes a :class:`Document`; a broken one carries a
``drop_reason`` so it is counted in the report, never lost silently.  Lines are read in bounded
chunks, so a 2 GB line with no newline costs a few MB of memory.

``.parquet`` files and hub dataset names go through ``datasets.load_dataset(..., streaming=True)``.

Read-time reasons, first that applies wins: ``malformed_record`` (JSON lines only), ``invalid_utf8``,
``control_chars``, ``empty``, ``too_long``.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from indicfm.storage import as_path, fresh, open_for_reading
from indicfm.text import is_known_language, language_of_path, normalize

#: Read-time drop reasons, in the order they are checked.
READ_REASONS = ("malformed_record", "invalid_utf8", "control_chars", "empty", "too_long")

UNKNOWN_LANGUAGE = "unknown"

TEXT_SUFFIXES = (".txt", ".dev")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)

#: C0 and C1 control characters, DEL and NUL. Tab, newline and carriage return are allowed (a JSON
#: record's text may hold several lines); a text file's line never contains a newline.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: A line that is empty or all whitespace (re's \s is str.isspace's set).
_BLANK_LINE = re.compile(r"^[^\S\n]*$", re.M)
_NON_SPACE = re.compile(r"\S")
_SURROGATE = re.compile("[\ud800-\udfff]")

#: Characters of a dropped document kept for ``indicfm data inspect``.
PREVIEW_CHARS = 200
#: Bytes read at a time from a line too long to keep in memory.
_CHUNK_BYTES = 1 << 18
_BOM = b"\xef\xbb\xbf"


class InputError(ValueError):
    """An input the user must fix (missing path, unknown language in a file name, ...)."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    #: From the file name for ``.txt``/``.dev``; ``None`` for ``.jsonl``/``.parquet`` (lang per record).
    lang: str | None
    format: str  # "text" | "jsonl" | "parquet"


@dataclass(frozen=True)
class Document:
    lang: str  # FLORES-200 code, or "unknown"
    text: str | None  # NFC-normalised; None when rejected at read time
    source: str  # file path (or hub dataset name)
    line: int  # 1-based line / record number
    drop_reason: str | None  # None or one of READ_REASONS
    #: For rejected documents: the first characters, decoded leniently with controls escaped, so a
    #: user can see what was dropped (``indicfm data inspect``).  Empty for accepted documents.
    preview: str = ""


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


def _input_file(path: Path, allow_unknown: bool) -> InputFile:
    fmt = _format_of(path)
    if fmt is None:
        raise InputError(
            f"{path}: unsupported file type {path.suffix!r}; expected one of "
            f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    if fmt != "text":
        return InputFile(path=path, lang=None, format=fmt)
    lang = language_of_path(path)
    if not is_known_language(lang):
        if not allow_unknown:
            raise InputError(
                f"{path}: the file name must start with a FLORES-200 language code such as "
                f"'hin_Deva.txt' (got {lang!r}); see indicfm.text.LANGUAGES"
            )
        lang = UNKNOWN_LANGUAGE
    return InputFile(path=path, lang=lang, format="text")


def find_input_files(paths: Sequence[str | Path], *, allow_unknown: bool = False) -> list[InputFile]:
    """Expand files and directories (local, or ``gs://`` prefixes) into input files, in a
    deterministic order.

    Directories are scanned recursively for ``.txt``/``.dev``/``.jsonl``/``.parquet`` files (hidden
    files and other types are skipped), sorted by path; files named explicitly keep the order given.
    A file reached twice is read once.  A missing path, or a text file whose name is not a known
    language code (unless ``allow_unknown``, which labels it ``unknown``), is an :class:`InputError`.
    """
    found: list[InputFile] = []
    seen: set[Path] = set()
    for raw in paths:
        path = fresh(as_path(raw))
        if path.is_dir():
            candidates = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and _format_of(p) is not None
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            candidates = [path]
        else:
            raise InputError(f"{path}: no such file or directory")
        for candidate in candidates:
            key = candidate.resolve()
            if key in seen:
                continue
            seen.add(key)
            found.append(_input_file(candidate, allow_unknown))
    return found


def _preview(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = _SURROGATE.sub("\ufffd", text[: PREVIEW_CHARS + 1])
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text[:PREVIEW_CHARS] + ("…" if len(text) > PREVIEW_CHARS else "")


def _classify_text(text: str, max_chars: int) -> str | None:
    """Reason to reject an already decoded document, or None (order: control, empty, too long)."""
    if _CONTROL.search(text):
        return "control_chars"
    if not _NON_SPACE.search(text):
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    return None


def _read_line(stream, limit: int) -> tuple[bytes, bool] | None:
    """Next line without its ``\\n`` if it fits in ``limit`` bytes: (bytes, True).

    A longer line returns its first ``limit`` bytes and False; the caller then streams the rest with
    :func:`_rest_of_line`.  ``None`` at end of file.
    """
    raw = stream.readline(limit + 1)
    if not raw:
        return None
    if raw.endswith(b"\n"):
        return raw[:-1], True
    if len(raw) <= limit:  # last line of a file without a final newline
        return raw, True
    return raw, False


def _rest_of_line(stream) -> Iterator[bytes]:
    while True:
        chunk = stream.readline(_CHUNK_BYTES)
        if not chunk:
            return
        if chunk.endswith(b"\n"):
            yield _strip_cr(chunk[:-1])
            return
        yield chunk


def _classify_long_line(head: bytes, rest: Iterator[bytes]) -> str:
    """Reason for a line too big to hold (so surely ``too_long`` unless an earlier reason applies).

    The line is scanned chunk by chunk keeping only flags, so the drop order is the same as for a
    short line: invalid_utf8, control_chars, empty, too_long.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    invalid = control = non_space = False
    for chunk in itertools.chain([head], rest):
        if invalid:
            continue  # drain the line; the verdict is settled
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError:
            invalid = True
            continue
        control = control or bool(_CONTROL.search(text))
        non_space = non_space or bool(_NON_SPACE.search(text))
    if not invalid:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            invalid = True
    if invalid:
        return "invalid_utf8"
    if control:
        return "control_chars"
    return "too_long" if non_space else "empty"


def _strip_cr(raw: bytes) -> bytes:
    return raw[:-1] if raw.endswith(b"\r") else raw


def _iter_text(f: InputFile, max_chars: int, start: int = 0, first_line: int = 1,
               count: int | None = None) -> Iterator[Document]:
    """One document per line; ``\\r\\n`` endings and a leading BOM are not part of the text.

    ``start``/``first_line``/``count`` read only ``count`` lines from byte ``start`` (a
    :class:`LineRange`); by default the whole file.
    """
    source = str(f.path)
    lang = f.lang or UNKNOWN_LANGUAGE
    # A UTF-8 character takes at most 4 bytes, so a line of more bytes than this is surely too long
    # (and is never held whole); a shorter one is decoded and its characters counted exactly.
    for line_no, raw, rest in _raw_lines(f.path, 4 * max_chars + 1, start, first_line, count):
        if rest is not None:
            reason = _classify_long_line(raw, rest)
            yield Document(lang, None, source, line_no, reason, _preview(raw[:1024]))
            continue
        raw = _strip_cr(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Document(lang, None, source, line_no, "invalid_utf8", _preview(raw))
            continue
        reason = _classify_text(text, max_chars)
        if reason is not None:
            yield Document(lang, None, source, line_no, reason, _preview(text))
        else:
            yield Document(lang, normalize(text), source, line_no, None)


def _raw_lines(path: Path, limit: int, start: int = 0, first_line: int = 1,
               count: int | None = None) -> Iterator[tuple[int, bytes, Iterator[bytes] | None]]:
    """``(line number, bytes, rest)`` for ``count`` lines from byte ``start`` (all by default).

    A line of more than ``limit`` bytes is never held whole: ``bytes`` is its start and ``rest``
    iterates over the remainder in chunks (``rest`` is None for a line that fits); whatever of
    ``rest`` the caller leaves unread is skipped.  A leading BOM is not part of the first line.
    """
    with open_for_reading(path) as stream:
        stream.seek(start)
        line_no = first_line - 1
        while count is None or line_no < first_line - 1 + count:
            got = _read_line(stream, limit)
            if got is None:
                return
            raw, complete = got
            line_no += 1
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            rest = None if complete else _rest_of_line(stream)
            yield line_no, raw, rest
            for _ in rest or ():  # the next line starts after this one's end
                pass


def _record_lang(value: object, fallback: str | None) -> str | None:
    if value is None:
        return fallback
    if isinstance(value, str) and is_known_language(value):
        return value
    return None


def _iter_jsonl(
    f: InputFile, max_chars: int, text_field: str, lang_field: str, start: int = 0, first_line: int = 1,
    count: int | None = None,
) -> Iterator[Document]:
    """One JSON object per line with a string ``text_field`` and a FLORES-200 ``lang_field``.

    A record without ``lang`` takes the file name's language when the name is a language code
    (``hin_Deva.jsonl``).  Records that are not JSON objects, lack a string text or a known language
    are ``malformed_record`` under language ``unknown``.  Bad bytes inside a record's text are
    ``invalid_utf8`` (the record is parsed with the bad bytes escaped, so its language is known).
    """
    source = str(f.path)
    name_lang = language_of_path(f.path)
    fallback = name_lang if is_known_language(name_lang) else None
    # JSON may spell a character as a 12-byte surrogate-pair escape; beyond this a record is surely
    # too long, and it is skipped unparsed (its language can't be known without holding it whole).
    for line_no, raw, rest in _raw_lines(f.path, 12 * max_chars + 65536, start, first_line, count):
        if rest is not None:
            yield Document(UNKNOWN_LANGUAGE, None, source, line_no, "too_long", _preview(raw[:1024]))
            continue
        try:
            record = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except ValueError:
            yield Document(UNKNOWN_LANGUAGE, None, source, line_no, "malformed_record", _preview(raw))
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        lang = _record_lang(record.get(lang_field), fallback) if isinstance(record, dict) else None
        if not isinstance(text, str) or lang is None:
            yield Document(UNKNOWN_LANGUAGE, None, source, line_no, "malformed_record", _preview(raw))
            continue
        yield _document_from_string(text, lang, source, line_no, max_chars)


def _document_from_string(text: str, lang: str, source: str, line_no: int, max_chars: int) -> Document:
    """Classify an already decoded record's text (lone surrogates mean undecodable bytes)."""
    if _SURROGATE.search(text):
        return Document(lang, None, source, line_no, "invalid_utf8", _preview(text))
    reason = _classify_text(text, max_chars)
    if reason is not None:
        return Document(lang, None, source, line_no, reason, _preview(text))
    return Document(lang, normalize(text), source, line_no, None)


def iter_records(
    records: Iterator[dict],
    source: str,
    *,
    text_field: str = "text",
    lang_field: str | None = "lang",
    lang: str | None = None,
    default_lang: str | None = None,
    max_chars: int = 100_000,
) -> Iterator[Document]:
    """Documents from dict records (a parquet file or hub dataset streamed by ``datasets``).

    ``lang`` fixes the language of every record; otherwise it is read from ``lang_field``, and
    ``default_lang`` stands in where a record has none.
    """
    for index, record in enumerate(records, start=1):
        text = record.get(text_field)
        if lang is not None:
            record_lang: str | None = lang
        else:
            record_lang = _record_lang(record.get(lang_field) if lang_field else None, default_lang)
        if not isinstance(text, str) or record_lang is None:
            yield Document(UNKNOWN_LANGUAGE, None, source, index, "malformed_record", _preview(repr(record)))
            continue
        yield _document_from_string(text, record_lang, source, index, max_chars)


def iter_hub_dataset(
    name: str,
    *,
    config_name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    lang_field: str | None = "lang",
    lang: str | None = None,
    max_chars: int = 100_000,
) -> Iterator[Document]:
    """Stream a Hugging Face dataset (hub name, or a builder like ``parquet`` with ``data_files``)."""
    import datasets

    stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
    yield from iter_records(
        iter(stream), name, text_field=text_field, lang_field=lang_field, lang=lang, max_chars=max_chars
    )


def iter_documents(
    f: InputFile,
    *,
    max_chars: int = 100_000,
    text_field: str = "text",
    lang_field: str = "lang",
) -> Iterator[Document]:
    """Every document of one input file, accepted or with its read-time ``drop_reason``."""
    if f.format == "text":
        return _iter_text(f, max_chars)
    if f.format == "jsonl":
        return _iter_jsonl(f, max_chars, text_field, lang_field)
    if f.format == "parquet":
        return _iter_parquet(f, max_chars, text_field, lang_field)
    raise InputError(f"{f.path}: unknown input format {f.format!r}")


def _iter_parquet(f: InputFile, max_chars: int, text_field: str, lang_field: str) -> Iterator[Document]:
    import datasets

    stream = datasets.load_dataset("parquet", data_files=str(f.path), split="train", streaming=True)
    name_lang = language_of_path(f.path)
    yield from iter_records(
        iter(stream),
        str(f.path),
        text_field=text_field,
        lang_field=lang_field,
        default_lang=name_lang if is_known_language(name_lang) else None,
        max_chars=max_chars,
    )


# -- reading a file in ranges of whole lines, so worker processes can read in parallel ----------
#
# ``data prepare`` hands each worker process a :class:`LineRange` instead of already-read text: the
# single process that decides duplicates in order then only scans for newlines (a C-speed pass over
# the bytes), and decoding, checking and normalising run in parallel.  Text and JSON-lines files
# have one document per line, so a range's line count is its document count.

#: Formats whose documents are lines, readable in ranges.
LINE_FORMATS = ("text", "jsonl")
#: A range larger than this is read line by line (streamed) rather than in one piece.
_BULK_BYTES = 1 << 22


@dataclass(frozen=True)
class LineRange:
    """Whole lines ``first_line .. first_line + lines - 1`` (1-based) at bytes ``start .. end``."""

    start: int
    end: int
    first_line: int
    lines: int


def line_ranges(path: str | Path, *, max_lines: int, max_bytes: int) -> Iterator[LineRange]:
    """Cut a file into consecutive ranges of at most ``max_lines`` lines and about ``max_bytes``
    bytes (a single longer line is a range of its own).  The file is scanned in 1 MiB blocks, so
    a huge line is never held whole.  A last line without a final newline counts as a line."""
    import numpy as np

    start, first_line, pending, offset = 0, 1, 0, 0  # pending: whole lines since ``start``
    last_byte = b"\n"
    with open_for_reading(path) as stream:
        while block := stream.read(1 << 20):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + (offset + 1)  # line ends
            i = 0
            while i < len(ends):
                by_lines = i + max_lines - pending - 1
                by_bytes = max(int(np.searchsorted(ends, start + max_bytes)), i)
                j = min(by_lines, by_bytes)
                if j >= len(ends):
                    pending += len(ends) - i
                    break
                pending += j - i + 1
                yield LineRange(start, int(ends[j]), first_line, pending)
                start, first_line, pending, i = int(ends[j]), first_line + pending, 0, j + 1
            offset += len(block)
            last_byte = block[-1:]
    if offset > start:  # whole lines not yet cut, and/or a last line without a final newline
        yield LineRange(start, offset, first_line, pending + (last_byte != b"\n"))


@dataclass
class DocumentColumns:
    """The documents of one range as columns (cheaper to build and ship than a Document each)."""

    langs: list[str]
    texts: list[str | None]  # NFC-normalised; None when rejected at read time
    reasons: list[str | None]  # read-time drop reason or None
    previews: list[str]  # "" for accepted documents (see Document.preview)

    @staticmethod
    def from_documents(docs: Sequence[Document]) -> "DocumentColumns":
        return DocumentColumns(
            [d.lang for d in docs], [d.text for d in docs], [d.drop_reason for d in docs], [d.preview for d in docs]
        )


def read_line_range(
    f: InputFile, r: LineRange, *, max_chars: int = 100_000, text_field: str = "text", lang_field: str = "lang"
) -> DocumentColumns:
    """The documents of lines ``r`` of a text or JSON-lines file: exactly those
    :func:`iter_documents` yields for those lines."""
    if f.format == "jsonl":
        return DocumentColumns.from_documents(
            list(_iter_jsonl(f, max_chars, text_field, lang_field, r.start, r.first_line, r.lines))
        )
    if f.format != "text":
        raise InputError(f"{f.path}: {f.format} files are not read in line ranges")
    if r.end - r.start <= _BULK_BYTES:
        with open_for_reading(f.path) as stream:
            stream.seek(r.start)
            data = stream.read(r.end - r.start)
        columns = _text_columns_fast(data, f.lang or UNKNOWN_LANGUAGE, r, max_chars)
        if columns is not None:
            return columns
    return DocumentColumns.from_documents(list(_iter_text(f, max_chars, r.start, r.first_line, r.lines)))


def _text_columns_fast(data: bytes, lang: str, r: LineRange, max_chars: int) -> DocumentColumns | None:
    """Decode, check and normalise a whole range at once; None when some line needs the careful
    per-line path (undecodable bytes, control characters or a too long line in the range).

    Normalising the joined lines equals normalising each line: NFC never composes across a newline.
    """
    if r.start == 0 and data.startswith(_BOM):
        data = data[len(_BOM) :]
    if data.endswith(b"\n"):
        data = data[:-1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(text):
        return None
    lines = text.split("\n")
    normalized = normalize(text).split("\n") if not text.isascii() else lines
    if len(lines) != r.lines or len(normalized) != r.lines:
        return None
    if "\r" in text:  # CRLF line ends
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        normalized = [line[:-1] if line.endswith("\r") else line for line in normalized]
    if lines and max(map(len, lines)) > max_chars:
        return None  # rare; the careful path previews a line too long to hold as it streams it
    texts: list[str | None] = normalized
    reasons: list[str | None] = [None] * len(lines)
    previews = [""] * len(lines)
    if _BLANK_LINE.search(text):  # rare: only then look at each line
        for i in [i for i, line in enumerate(lines) if not line or line.isspace()]:
            texts[i], reasons[i], previews[i] = None, "empty", _preview(lines[i])
    return DocumentColumns([lang] * len(texts), texts, reasons, previews)
