"""The review page's server: a JSON API over one cache's features, and the page itself.

Standard library ``http.server`` (a ``ThreadingHTTPServer``), not FastAPI/Starlette + uvicorn: the
page is for one curator on their own machine, the API is a dozen small JSON answers computed with
NumPy, and no dependency (or its version drift) is worth that.  Everything heavy happens here:
histograms, counts under changed thresholds and the documents they change are computed over the
whole features file, and the page only ever gets one page of documents (``size`` ≤ 100) at a time.

Judgements go to ``CACHE/judgements.jsonl`` (one JSON object a line: document id, source, line,
lang, reason, label, who, when); an export to ``CACHE/review_overrides.yaml``.
"""

from __future__ import annotations

import datetime
import errno
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from indicfm.data.cache import METADATA, STATE_DIR
from indicfm.data.features import FEATURES_FILE, FeaturesError
from indicfm.data.report import DROP_REASONS, REPORT_FILE
from indicfm.data.review.rules import KEPT, FeatureTable, Rule, apply_overrides, export_overrides
from indicfm.data.review.texts import TextReader

JUDGEMENTS_FILE = "judgements.jsonl"
EXPORT_FILE = "review_overrides.yaml"
LABELS = ("wrongly_dropped", "wrongly_kept")
MAX_PAGE = 100
_FRACTION_COLUMNS = ("non_letter_ratio", "duplicate_line_fraction", "script_share", "lid_score")


class ReviewError(ValueError):
    """A cache the page can't be served for, or a port in use (the message says what to do)."""


class BadRequest(ValueError):
    pass


def check_cache(cache_dir: Path) -> None:
    """Raise a ReviewError saying what to run when ``cache_dir`` is not a complete cache with features."""
    if not cache_dir.is_dir():
        raise ReviewError(f"{cache_dir}: no such directory (give the --output directory of `indicfm data prepare`)")
    if not (cache_dir / METADATA).is_file():
        if (cache_dir / STATE_DIR).is_dir():
            raise ReviewError(f"{cache_dir}: an unfinished `indicfm data prepare`; re-run the same command to finish it")
        raise ReviewError(f"{cache_dir}: not a token cache (no {METADATA}); make one with `indicfm data prepare "
                          f"--input ... --tokenizer ... --output {cache_dir}`")
    if not (cache_dir / FEATURES_FILE).is_file():
        raise ReviewError(
            f"{cache_dir}: no {FEATURES_FILE} (the cache was made by an older indicfm, or with data.features=false); "
            f"re-run its `indicfm data prepare` with --overwrite to write the per-document features")


def right_to_left(lang: str) -> bool:
    """Is ``lang`` written right to left (Urdu, Kashmiri and Sindhi in Perso-Arabic script)?"""
    from indicfm.text import is_known_language, script_of_language

    return is_known_language(lang) and script_of_language(lang) == "Arab"


class Review:
    """What the API answers, for one cache (one instance shared by the server's threads)."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        check_cache(self.cache_dir)
        try:
            self.table = FeatureTable.load(self.cache_dir)
        except FeaturesError as err:
            raise ReviewError(str(err)) from None
        self.report = json.loads((self.cache_dir / REPORT_FILE).read_text(encoding="utf-8"))
        config = self.table.config
        from indicfm.data.stages import reader_max_chars

        self.texts = TextReader(reader_max_chars(config), config.text_field, config.lang_field)
        self._write_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------------
    def _config(self, query: dict):
        raw = query.get("o", [""])[0]
        try:
            overrides = json.loads(raw) if raw else {}
            return apply_overrides(self.table.config, overrides) if overrides else self.table.config
        except (ValueError, TypeError, AttributeError) as err:
            raise BadRequest(f"bad threshold overrides: {err}") from None

    def _lang(self, query: dict) -> str:
        lang = query.get("lang", [""])[0]
        if lang not in self.table.lang_rows:
            raise BadRequest(f"unknown language {lang!r}; the cache has: {', '.join(self.table.langs)}")
        return lang

    def _rule(self, query: dict) -> Rule:
        try:
            return self.table.rule(query.get("rule", [""])[0])
        except KeyError as err:
            raise BadRequest(str(err.args[0])) from None

    @staticmethod
    def _page(query: dict, key: str = "page") -> tuple[int, int]:
        try:
            page = max(int(query.get(key, query.get("page", ["0"]))[0]), 0)
            size = min(max(int(query.get("size", ["10"])[0]), 1), MAX_PAGE)
        except ValueError:
            raise BadRequest(f"{key} and size must be integers") from None
        return page, size

    def document(self, doc: int, codes: np.ndarray | None = None) -> dict:
        c = self.table.columns
        lang = c["lang"][doc]
        values = {}
        for rule in self.table.rules:
            value = c[rule.column][doc] if rule.column in c else None
            if value is not None and not (isinstance(value, float) and np.isnan(value)) and value >= 0:
                values[rule.column] = float(value) if rule.column in _FRACTION_COLUMNS or "ngram" in rule.column else int(value)
        out = {
            "id": int(doc),
            "source": c["source"][doc],
            "line": int(c["line"][doc]),
            "lang": lang,
            "reason": c["reason"][doc],
            "rtl": right_to_left(lang),
            "text": self.texts.text(c["source"][doc], int(c["line"][doc])),
            "values": values,
            "lid_lang": c["lid_lang"][doc],
            "duplicate_of": int(c["duplicate_of"][doc]) if c["duplicate_of"][doc] >= 0 else None,
            "similarity": None if np.isnan(c["similarity"][doc]) else round(float(c["similarity"][doc]), 3),
        }
        if codes is not None:
            out["new_reason"] = None if codes[doc] == KEPT else DROP_REASONS[codes[doc]]
        return out

    def _documents(self, rows: np.ndarray, page: int, size: int, codes=None) -> dict:
        chosen = rows[page * size : (page + 1) * size]
        return {"total": int(len(rows)), "page": page, "size": size,
                "documents": [self.document(int(d), codes) for d in chosen]}

    def _counts(self, codes: np.ndarray, rows: np.ndarray) -> dict:
        sub = codes[rows]
        kept = int((sub == KEPT).sum())
        dropped = {DROP_REASONS[k]: int(v) for k, v in zip(*np.unique(sub[sub != KEPT], return_counts=True))}
        return {"docs_in": int(len(rows)), "docs_kept": kept, "dropped": dropped}

    # -- API -----------------------------------------------------------------------------------
    def summary(self, query: dict) -> dict:
        config = self._config(query)
        verdicts = self.table.verdicts(config)
        languages = []
        for lang in self.table.langs:
            rows = self.table.lang_rows[lang]
            cached = self.report["languages"].get(lang, {"docs_in": 0, "docs_kept": 0, "tokens": 0, "dropped": {}})
            from indicfm.data.filters import filters_for

            f = filters_for(config, lang)
            base = filters_for(self.table.config, lang)
            rules = []
            for rule in self.table.rules:
                if rule.column not in self.table.columns or not np.isfinite(self.table.column(rule.column)[rows]).any():
                    continue
                rules.append({"name": rule.name, "label": rule.label, "reason": rule.reason, "drops": rule.drops,
                              "integer": rule.integer, "threshold": rule.threshold(f, config),
                              "original": rule.threshold(base, self.table.config)})
            languages.append({"lang": lang, **cached, "with_thresholds": self._counts(verdicts.codes, rows),
                              "estimated": int(verdicts.estimated[rows].sum()), "rules": rules})
        return {"cache": str(self.cache_dir), "documents": self.table.n, "reasons": list(DROP_REASONS),
                "languages": languages, "judgements": self._judgement_count()}

    def histogram(self, query: dict) -> dict:
        lang, rule, config = self._lang(query), self._rule(query), self._config(query)
        rows = self.table.lang_rows[lang]
        values = self.table.column(rule.column)[rows]
        has = np.isfinite(values)
        try:
            bins = min(max(int(query.get("bins", ["40"])[0]), 2), 200)
        except ValueError:
            raise BadRequest("bins must be an integer") from None
        from indicfm.data.filters import filters_for

        threshold = rule.threshold(filters_for(config, lang), config)
        if rule.column in _FRACTION_COLUMNS or "ngram" in rule.column:
            lo, hi = 0.0, 1.0
        else:
            # up to a little past the bulk of the values, or the threshold if it is near them (a
            # threshold far beyond every value is drawn at the right edge)
            finite = values[has]
            top = float(finite.max()) if len(finite) else 1.0
            bulk = float(np.quantile(finite, 0.995)) if len(finite) else 1.0
            lo, hi = 0.0, float(np.ceil(max(bulk * 1.2, min(threshold * 1.1, top * 1.2), 1.0)))
        edges = np.linspace(lo, hi, bins + 1)
        codes = self.table.verdicts(config).codes[rows][has]
        clipped = np.clip(values[has], lo, hi)
        index = np.clip(np.searchsorted(edges, clipped, side="right") - 1, 0, bins - 1)

        def count(mask):
            return np.bincount(index[mask], minlength=bins).tolist()

        by_rule = codes == DROP_REASONS.index(rule.reason)
        return {"lang": lang, "rule": rule.name, "label": rule.label, "drops": rule.drops, "edges": edges.tolist(),
                "kept": count(codes == KEPT), "dropped_by_rule": count(by_rule),
                "dropped_other": count((codes != KEPT) & ~by_rule), "threshold": threshold,
                "with_value": int(has.sum()), "without_value": int((~has).sum())}

    def effect(self, query: dict) -> dict:
        """Counts of ``lang`` under the overrides next to the cache's, and the documents that change."""
        lang, config = self._lang(query), self._config(query)
        page, size = self._page(query)
        rows = self.table.lang_rows[lang]
        verdicts = self.table.verdicts(config)
        original = self.table.original
        changed = rows[verdicts.codes[rows] != original[rows]]
        kept_now, kept_then = original[changed] == KEPT, verdicts.codes[changed] == KEPT
        newly_dropped = changed[kept_now & ~kept_then]
        newly_kept = changed[~kept_now & kept_then]
        other_reason = changed[~kept_now & ~kept_then]  # dropped either way, by another rule first
        which = query.get("which", ["all"])[0]
        listed = {"dropped": newly_dropped, "kept": newly_kept, "reason": other_reason}.get(which, changed)
        return {"lang": lang, "now": self._counts(original, rows), "then": self._counts(verdicts.codes, rows),
                "newly_dropped": int(len(newly_dropped)), "newly_kept": int(len(newly_kept)),
                "other_reason": int(len(other_reason)),
                "estimated": int(verdicts.estimated[rows].sum()),
                "changes": self._documents(listed, page, size, verdicts.codes)}

    def examples(self, query: dict) -> dict:
        """Documents of ``lang`` dropped for ``reason``, and kept ones nearest that rule's threshold."""
        lang = self._lang(query)
        reason = query.get("reason", [""])[0]
        if reason not in DROP_REASONS:
            raise BadRequest(f"unknown reason {reason!r}; one of: {', '.join(DROP_REASONS)}")
        config = self._config(query)
        page, size = self._page(query)
        near_page, _ = self._page(query, "near_page")
        rows = self.table.lang_rows[lang]
        dropped = rows[self.table.original[rows] == DROP_REASONS.index(reason)]
        out = {"lang": lang, "reason": reason, "dropped": self._documents(dropped, page, size), "near": None}
        rules = [r for r in self.table.rules if r.reason == reason and r.column in self.table.columns]
        if rules:
            from indicfm.data.filters import filters_for

            name = query.get("rule", [rules[0].name])[0]
            rule = next((r for r in rules if r.name == name), rules[0])
            threshold = rule.threshold(filters_for(config, lang), config)
            kept = rows[self.table.original[rows] == KEPT]
            values = self.table.column(rule.column)[kept]
            if rule.column == "lid_score":  # only guesses of another language can cross this threshold
                values = np.where(self.table.columns["lid_lang"][kept] != lang, values, np.nan)
            has = np.isfinite(values)
            kept, values = kept[has], values[has]
            order = np.argsort(np.abs(values - threshold), kind="stable")
            out["near"] = {"rule": rule.name, "label": rule.label, "threshold": threshold,
                           "kept": self._documents(kept[order], near_page, size)}
        return out

    def duplicates(self, query: dict) -> dict:
        """Clusters of ``lang``: a kept first occurrence and the duplicates that name it, largest first."""
        lang = self._lang(query)
        page, size = self._page(query)
        c = self.table.columns
        target = c["duplicate_of"]
        dup_rows = np.flatnonzero(target >= 0)
        in_lang = dup_rows[c["lang"][target[dup_rows]] == lang]
        heads, counts = np.unique(target[in_lang], return_counts=True)
        order = np.lexsort((heads, -counts))
        heads, counts = heads[order], counts[order]
        chosen = range(page * size, min((page + 1) * size, len(heads)))
        clusters = []
        for i in chosen:
            members = in_lang[target[in_lang] == heads[i]][:20]
            clusters.append({"kept": self.document(int(heads[i])), "size": int(counts[i]),
                             "duplicates": [self.document(int(d)) for d in members]})
        return {"lang": lang, "total": int(len(heads)), "page": page, "size": size, "clusters": clusters}

    def judge(self, body: dict) -> dict:
        try:
            doc = int(body["id"])
        except (KeyError, TypeError, ValueError):
            raise BadRequest("a judgement needs the document's id") from None
        label = body.get("label")
        if label not in LABELS:
            raise BadRequest(f"label must be one of {', '.join(LABELS)}")
        if not 0 <= doc < self.table.n:
            raise BadRequest(f"no document {doc} (the cache has {self.table.n})")
        c = self.table.columns
        record = {"id": doc, "source": c["source"][doc], "line": int(c["line"][doc]), "lang": c["lang"][doc],
                  "reason": c["reason"][doc], "label": label, "who": str(body.get("who") or "anonymous")[:100],
                  "note": str(body.get("note") or "")[:2000],
                  "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        with self._write_lock, open(self.cache_dir / JUDGEMENTS_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return {"saved": record, "file": str(self.cache_dir / JUDGEMENTS_FILE), "judgements": self._judgement_count()}

    def _judgement_count(self) -> int:
        path = self.cache_dir / JUDGEMENTS_FILE
        if not path.is_file():
            return 0
        with open(path, "rb") as f:
            return sum(1 for _ in f)

    def judgements(self, query: dict) -> dict:
        page, size = self._page(query)
        path = self.cache_dir / JUDGEMENTS_FILE
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        items = [json.loads(x) for x in lines[::-1][page * size : (page + 1) * size]]
        return {"total": len(lines), "page": page, "size": size, "judgements": items}

    def export(self, body: dict) -> dict:
        import yaml

        try:
            config = apply_overrides(self.table.config, body.get("o") or {})
        except (ValueError, TypeError, AttributeError) as err:
            raise BadRequest(f"bad threshold overrides: {err}") from None
        text = (
            f"# Thresholds chosen with `indicfm data review {self.cache_dir}`.\n"
            "# Use: indicfm data prepare -c THIS_FILE --input ... --tokenizer ... --output NEW_DIR\n"
            "# (if the first prepare used a config file, add `include: [that.yaml]` at the top).\n"
            + yaml.safe_dump(export_overrides(config), sort_keys=False, allow_unicode=True)
        )
        path = self.cache_dir / EXPORT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return {"file": str(path), "yaml": text}


def _handler(review: Review):
    page_html = resources.files("indicfm.data.review").joinpath("page.html").read_bytes()
    routes_get = {"/api/summary": review.summary, "/api/histogram": review.histogram, "/api/effect": review.effect,
                  "/api/examples": review.examples, "/api/duplicates": review.duplicates,
                  "/api/judgements": review.judgements}
    routes_post = {"/api/judgements": review.judge, "/api/export": review.export}

    class Handler(BaseHTTPRequestHandler):
        server_version = "indicfm-review"

        def log_message(self, format, *args):  # noqa: A002 - quiet: the terminal is the curator's
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

        def _answer(self, function, argument) -> None:
            try:
                self._json(200, function(argument))
            except BadRequest as err:
                self._json(400, {"error": str(err)})
            except Exception as err:  # a bug: say so on the page instead of a dropped connection
                self._json(500, {"error": f"{type(err).__name__}: {err}"})

        def do_GET(self):  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                self._send(200, page_html, "text/html; charset=utf-8")
            elif url.path in routes_get:
                self._answer(routes_get[url.path], parse_qs(url.query))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {url.path}"})

        def do_POST(self):  # noqa: N802
            url = urlparse(self.path)
            if url.path not in routes_post:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such action {url.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as err:
                self._json(400, {"error": f"bad request body: {err}"})
                return
            self._answer(routes_post[url.path], body)

    return Handler


def make_server(cache_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server for ``cache_dir`` bound to host:port (port 0: any free one), not yet serving."""
    review = Review(cache_dir)
    try:
        server = ThreadingHTTPServer((host, port), _handler(review))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ReviewError(f"port {port} on {host} is already in use (another `indicfm data review`?); "
                              f"stop it or choose another with --port") from None
        raise ReviewError(f"can't listen on {host}:{port}: {err.strerror or err}") from None
    server.daemon_threads = True
    server.review = review  # type: ignore[attr-defined]
    return server
