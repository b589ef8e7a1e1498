"""A document's text, fetched from its source file by line number when the page shows it.

The features file stores where a document is (source, line), not its text, so it stays small; the
review page shows a few dozen documents at a time, read here exactly as ``data prepare`` read
them (the same reader, NFC-normalised).  A text or JSON-lines file gets an index of its line
starts on first use (one C-speed scan for newlines); a parquet file is read by record.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from indicfm.data.sources import LINE_FORMATS, InputError, LineRange, find_input_files, read_line_range

#: Characters of a document the page gets (longer ones are cut, and say so).
SHOW_CHARS = 3000


def line_starts(path: Path) -> np.ndarray:
    """Byte offset of the start of every line, plus the file size at the end."""
    starts = [np.zeros(1, np.int64)]
    offset = 0
    with open(path, "rb") as stream:
        while block := stream.read(1 << 22):
            starts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + offset + 1)
            offset += len(block)
    out = np.concatenate(starts)
    if out[-1] != offset:
        out = np.append(out, offset)
    return out


class TextReader:
    """``text(source, line)`` for the documents of one cache (thread-safe; a few files' indexes kept)."""

    def __init__(self, max_chars: int, text_field: str = "text", lang_field: str = "lang", keep_files: int = 8):
        self.max_chars, self.text_field, self.lang_field = max_chars, text_field, lang_field
        self._starts: OrderedDict[str, np.ndarray] = OrderedDict()
        self._keep = keep_files
        self._lock = threading.Lock()

    def text(self, source: str, line: int) -> str | None:
        """The document's text (cut to SHOW_CHARS), or None when its source can't be read any more."""
        path = Path(source)
        if not path.is_file():
            return None
        try:
            (f,) = find_input_files([path], allow_unknown=True)
        except (InputError, ValueError):
            return None
        try:
            if f.format in LINE_FORMATS:
                text = self._line_text(f, line)
            elif f.format == "parquet":
                text = self._record_text(path, line)
            else:
                return None
        except (OSError, ValueError, IndexError):
            return None
        if text is not None and len(text) > SHOW_CHARS:
            text = text[:SHOW_CHARS] + " …"
        return text

    def _line_text(self, f, line: int) -> str | None:
        starts = self._index(f.path)
        if not 1 <= line < len(starts):
            return None
        r = LineRange(int(starts[line - 1]), int(starts[line]), line, 1)
        columns = read_line_range(f, r, max_chars=self.max_chars, text_field=self.text_field, lang_field=self.lang_field)
        text = columns.texts[0] if columns.texts else None
        return text if text is not None else (columns.previews[0] if columns.previews else None)

    def _index(self, path: Path) -> np.ndarray:
        key = str(path)
        with self._lock:
            if key in self._starts:
                self._starts.move_to_end(key)
                return self._starts[key]
        starts = line_starts(path)
        with self._lock:
            self._starts[key] = starts
            while len(self._starts) > self._keep:
                self._starts.popitem(last=False)
        return starts

    def _record_text(self, path: Path, record: int) -> str | None:
        import pyarrow.parquet as pq

        from indicfm.text import normalize

        parquet = pq.ParquetFile(path)
        row = record - 1
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if row < size:
                value = parquet.read_row_group(group, columns=[self.text_field]).column(0)[row].as_py()
                return normalize(value) if isinstance(value, str) else None
            row -= size
        return None
