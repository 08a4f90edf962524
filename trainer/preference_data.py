"""Preference data for DPO and reward models.

Accepted records (auto-detected):
- {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
- {"chosen": messages, "rejected": messages}   implicit prompt: the shared leading turns
- OpenAI DPO: {"input": {"messages": [...]}, "preferred_output": [messages], "non_preferred_output": [messages]}
Strings are raw text (the prompt gets BOS, each answer gets EOS); message
lists are rendered with the base model's chat template, and only the final
assistant turn (with its end-of-turn token) is scored.
"""
from __future__ import annotations

from dataclasses import dataclass

from .data import IGNORE, DataError, Tokenizing, _messages, read_jsonl


@dataclass
class Pair:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _normalize(rec: dict) -> tuple[object, object, object]:
    if "input" in rec or "preferred_output" in rec:
        inp = rec.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise ValueError("'input' must be an object with 'messages'")
        for k in ("preferred_output", "non_preferred_output"):
            if k not in rec:
                raise ValueError(f"missing '{k}'")
        return _messages(inp["messages"], "input.messages"), _messages(rec["preferred_output"], "preferred_output"), \
            _messages(rec["non_preferred_output"], "non_preferred_output")
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise ValueError(f"missing '{k}'")
    if "prompt" in rec:
        p, c, r = rec["prompt"], rec["chosen"], rec["rejected"]
        if isinstance(p, str) and isinstance(c, str) and isinstance(r, str):
            return p, c, r
        pm = _messages(p, "prompt") if isinstance(p, list) else [{"role": "user", "content": p}]
        cm = _messages(c, "chosen") if isinstance(c, list) else [{"role": "assistant", "content": c}]
        rm = _messages(r, "rejected") if isinstance(r, list) else [{"role": "assistant", "content": r}]
        return pm, cm, rm
    c, r = _messages(rec["chosen"], "chosen"), _messages(rec["rejected"], "rejected")
    return _split_implicit(c, r)


def _encode(tk: Tokenizing, prompt, answer) -> tuple[list[int], list[int]]:
    if isinstance(prompt, str):
        p = tk.tok(prompt, add_special_tokens=True)["input_ids"]
        a = tk.tok(answer, add_special_tokens=False)["input_ids"] + [tk.eos]
        ids, labels = p + a, [IGNORE] * len(p) + a
    else:
        if not answer or answer[-1]["role"] != "assistant":
            raise ValueError("each answer must end with an assistant message")
        ex = tk.chat(prompt + answer)
        # score only the final assistant turn
        before = tk._render(prompt + answer[:-1], add_generation_prompt=True)
        n_before = len(tk.tok(before, add_special_tokens=False)["input_ids"])
        ids, labels = ex.input_ids, [IGNORE] * min(n_before, len(ex.labels)) + ex.labels[n_before:]
    if len(ids) > tk.seq_len:
        ids, labels = ids[: tk.seq_len], labels[: tk.seq_len]
    if all(l == IGNORE for l in labels):
        raise ValueError(f"the answer does not fit in sequence_len={tk.seq_len}")
    return ids, labels


def check_records(path, shown_as: str | None = None) -> int:
    """Checks every record's shape without a tokenizer (fast, for refusing a file up front); -> the number of pairs.

    Errors read `<shown_as or path>:<line>: <reason>`, naming the missing or malformed field."""
    label = shown_as or str(path)
    try:
        records = read_jsonl(path)
    except DataError as e:
        raise DataError(str(e).replace(str(path), label, 1)) from None
    except UnicodeDecodeError:
        raise DataError(f"{label}: not UTF-8 text") from None
    for line, rec in records:
        try:
            _, chosen, rejected = _normalize(rec)
            for answer in (chosen, rejected):
                if isinstance(answer, list) and (not answer or answer[-1]["role"] != "assistant"):
                    raise ValueError("each answer must end with an assistant message")
        except ValueError as e:
            raise DataError(f"{label}:{line}: {e}") from None
    return len(records)


def load_pairs(spec, tk: Tokenizing) -> tuple[list[Pair], str]:
    """The pairs of a dataset (a DatasetSpec: any source data.read_records reads) -> (pairs, content hash)."""
    from .data import read_records

    recs, digest = read_records(spec)
    out = []
    for where, rec in recs:
        try:
            prompt, chosen, rejected = _normalize(rec)
            ci, cl = _encode(tk, prompt, chosen)
            ri, rl = _encode(tk, prompt, rejected)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        out.append(Pair(ci, cl, ri, rl))
    return out, digest
