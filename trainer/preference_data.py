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


def _field(rec: dict, key: str, *, text: bool = True):
    """rec[key] checked: a non-empty list of messages (or, where `text`, a string); a missing or null field named."""
    if key not in rec:
        raise ValueError(f"missing '{key}'")
    v = rec[key]
    if v is None:
        kinds = "a string or a list of messages" if text else "a list of messages"
        raise ValueError(f"'{key}' is null: it must be {kinds}")
    if text and isinstance(v, str):
        return v
    if isinstance(v, list):
        return _messages(v, key)
    kinds = "a string or a list of messages" if text else "a non-empty list of messages"
    raise ValueError(f"'{key}' must be {kinds}, not {type(v).__name__}")


def _normalize(rec: dict) -> tuple[object, object, object]:
    if "input" in rec or "preferred_output" in rec or "non_preferred_output" in rec:  # OpenAI's DPO format
        inp = rec.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise ValueError("'input' must be an object with 'messages'")
        if inp["messages"] is None:
            raise ValueError("'input.messages' is null: it must be a list of messages")
        prompt = _messages(inp["messages"], "input.messages")
        return prompt, _field(rec, "preferred_output", text=False), _field(rec, "non_preferred_output", text=False)
    chosen, rejected = _field(rec, "chosen"), _field(rec, "rejected")
    if "prompt" in rec:
        p = _field(rec, "prompt")
        if isinstance(p, str) and isinstance(chosen, str) and isinstance(rejected, str):
            return p, chosen, rejected
        as_msgs = lambda v, role: v if isinstance(v, list) else [{"role": role, "content": v}]  # noqa: E731
        return as_msgs(p, "user"), as_msgs(chosen, "assistant"), as_msgs(rejected, "assistant")
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ValueError("without a 'prompt', 'chosen' and 'rejected' must be lists of messages (their shared "
                         "leading turns are the prompt)")
    return _split_implicit(chosen, rejected)


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
