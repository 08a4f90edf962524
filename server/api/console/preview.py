"""Checking a training dataset before any job exists: its first records, the format detected, every invalid line.

The fine-tuning API refuses a bad file only when the job runs (or, for JSONL syntax, at upload, one line at a
time). A person preparing examples wants the whole list at once, with `file:line: reason` for each bad record, so
they can fix the file in one go. The checks are the trainer's own: records are read, their format detected
(`trainer.data.detect_format`) and each one turned into what the training method consumes (tokenized with the
server's base tokenizer and chat template, the same calls the job will make), so a file the preview accepts does
not fail the job on its data, and every reason shown is the one the job would report.

Files: JSONL (line numbers), JSON (an array of objects, or JSONL saved as .json), CSV (a header row; cells of
message-list columns holding JSON are decoded; line numbers as the file shows them) and Parquet (row numbers).
"""
from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass, field

MAX_ERRORS = 100  # invalid records listed in full; the rest are counted
SAMPLE = 5  # first records shown
METHODS = ("sft", "dpo", "reward", "grpo")
# columns whose CSV cells may hold JSON message lists (chat, sharegpt, preference, prompt/completion data)
_JSON_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "input",
                 "preferred_output", "non_preferred_output")


class PreviewError(ValueError):
    """A file that cannot be read at all (not its records): unknown type, not UTF-8, not tabular."""


@dataclass
class Row:
    at: int  # line number (jsonl, csv, json lines) or 1-based row number (parquet, json array)
    record: dict | None
    error: str | None = None


@dataclass
class Preview:
    filename: str
    file_type: str
    position: str  # "line" or "row": what the number after the file name counts
    rows: list[Row] = field(default_factory=list)


def file_type_of(filename: str) -> str:
    low = filename.lower()
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                      (".parquet", "parquet"), (".pq", "parquet")):
        if low.endswith(ext):
            return kind
    raise PreviewError(f"{filename}: unknown file type; use .jsonl, .json, .csv or .parquet")


def read_rows(filename: str, data: bytes) -> Preview:
    kind = file_type_of(filename)
    if kind == "parquet":
        return Preview(filename, kind, "row", _parquet_rows(filename, data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PreviewError(f"{filename}: not UTF-8 text (byte {e.start})") from None
    if kind == "csv":
        return Preview(filename, kind, "line", _csv_rows(text))
    if kind == "json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreviewError(f"{filename}:{e.lineno}: not valid JSON ({e.msg})") from None
        return Preview(filename, kind, "row",
                       [Row(i, x) if isinstance(x, dict) else Row(i, None, "each item must be a JSON object")
                        for i, x in enumerate(items, 1)])
    return Preview(filename, kind, "line", _jsonl_rows(text))


def _jsonl_rows(text: str) -> list[Row]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(Row(i, None, f"not valid JSON ({e.msg})"))
            continue
        rows.append(Row(i, rec) if isinstance(rec, dict) else Row(i, None, "each line must be a JSON object"))
    return rows


def _csv_rows(text: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        return [Row(1, None, f"not valid CSV ({e})")]
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append(Row(start, None, f"not valid CSV ({e})"))
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            rows.append(Row(start, None, f"{len(cells)} cells where the header has {len(header)} columns"))
            continue
        rec = {}
        for k, v in zip(header, cells):
            if k in _JSON_COLUMNS and v.lstrip().startswith(("[", "{")):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass  # a plain string that happens to start with a bracket
            rec[k] = v
        rows.append(Row(start, rec))
    return rows


def _parquet_rows(filename: str, data: bytes) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise PreviewError(f"{filename}: not a Parquet file ({e})") from None
    return [Row(i, rec) for i, rec in enumerate(table.to_pylist(), 1)]


_TOKENIZERS: dict[str, object] = {}
_TOKENIZER_LOCK = threading.Lock()


def private_tokenizer(path) -> object:
    """A tokenizer of our own for `path`: the serving one is used by the request path concurrently, and a Rust
    tokenizer that two threads configure at once raises 'Already borrowed'."""
    from transformers import AutoTokenizer

    key = str(path)
    with _TOKENIZER_LOCK:
        tok = _TOKENIZERS.get(key)
        if tok is None:
            tok = _TOKENIZERS[key] = AutoTokenizer.from_pretrained(key)
        return tok


def suggested_method(fmt: str | None) -> str:
    return {"preference": "dpo", "prompts": "grpo"}.get(fmt or "", "sft")


def check(p: Preview, method: str | None, tokenizer, sequence_len: int) -> dict:
    """Every record checked for `method` (None: the one the first record's format suggests) -> the preview body."""
    from loraplex.trainer.data import Tokenizing, detect_format

    if not p.rows:
        raise PreviewError(f"{p.filename}: no records")
    good = [r for r in p.rows if r.record is not None]
    fmt = None
    if good:
        first = good[0].record
        try:
            fmt = detect_format(first)
        except ValueError as e:
            fmt = "prompts" if "prompt" in first else None
            if fmt is None:
                good[0].error = str(e)
    method = method or suggested_method(fmt)
    if method not in METHODS:
        raise PreviewError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    tk = Tokenizing(tokenizer, sequence_len)
    for r in p.rows:
        if r.record is None or r.error:
            continue
        try:
            _check_record(r.record, method, fmt, tk)
        except ValueError as e:
            r.error = str(e)
        except Exception as e:  # noqa: BLE001 - the trainer's code choked on this record: still the record's fault
            r.error = f"cannot be used ({type(e).__name__}: {e})"
    bad = [r for r in p.rows if r.error]

    def where(r: Row) -> str:
        return f"{p.filename}:{r.at}" if p.position == "line" else f"{p.filename}: row {r.at}"

    return {
        "object": "dataset.preview",
        "filename": p.filename,
        "file_type": p.file_type,
        "format": fmt,
        "method": method,
        "suggested_method": suggested_method(fmt),
        "records": len(p.rows),
        "valid_records": len(p.rows) - len(bad),
        "columns": sorted({k for r in good[:SAMPLE] for k in r.record}),
        "sample": [{p.position: r.at, "record": r.record} for r in good[:SAMPLE]],
        "errors": [{p.position: r.at, "reason": r.error, "message": f"{where(r)}: {r.error}"}
                   for r in bad[:MAX_ERRORS]],
        "errors_total": len(bad),
    }


def _check_record(rec: dict, method: str, fmt: str | None, tk) -> None:
    """Raises ValueError with the trainer's reason when `rec` cannot be trained on with `method`."""
    if method == "sft":
        if fmt is None or fmt in ("preference", "prompts"):
            raise ValueError(f"a {fmt or 'record of unknown format'} cannot be used for supervised fine-tuning "
                             "(records need 'messages', 'prompt'+'completion', 'text', 'instruction'+'output' or "
                             "'conversations')")
        tk.record(rec, fmt)
    elif method in ("dpo", "reward"):
        from loraplex.trainer.preference_data import _encode, _normalize

        prompt, chosen, rejected = _normalize(rec)
        _encode(tk, prompt, chosen)
        _encode(tk, prompt, rejected)
    else:  # grpo: prompts only; completions come from rollouts
        from loraplex.trainer.rl import record_prompt

        record_prompt(rec)
