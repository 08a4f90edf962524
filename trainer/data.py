"""Datasets: files and hub datasets in the common fine-tuning formats, tokenized with loss masks, and packed.

Sources (`DatasetSpec`): a local JSONL file is read line by line by us (so a
malformed record is reported as `file:line`); JSON, CSV and Parquet files and
hub dataset ids (`org/name[@revision]`, with `name:` and `split:`) are
loaded with the `datasets` library, a hub id first resolved into the hub
cache (`adapters_store.hub`, honouring `HF_HUB_OFFLINE`). Records then go
through the same formats, with Axolotl-style field mapping for chat data
(`field_messages`, `message_property_mappings`, `roles_to_train`).

Formats (auto-detected per file from its first record, or named):
- text              {"text": "..."}                                   loss on every token
- chat              {"messages": [{"role", "content"}, ...], "tools"?}  loss on assistant turns
- prompt_completion {"prompt": str | messages, "completion": str | messages}   loss on the completion
- alpaca            {"instruction", "input"?, "output"}               rendered as a user/assistant chat
- sharegpt          {"conversations": [{"from", "value"}, ...]}        human/gpt/system -> user/assistant/system
Chat records take OpenAI's chat fine-tuning format whole: `tools` (function
definitions) per record, assistant messages with `tool_calls` (arguments a
JSON string or object), `tool` messages answering them by `tool_call_id`, and
`weight` (0 or 1) on assistant messages (0: not trained). They are rendered by
`loraplex.server.engine.chat_format`, the code the server renders chat
prompts with, so the calls an adapter learns are the ones the server parses.
Chat-like records are rendered with the base model's chat template; the
end-of-turn token after each assistant message is part of its labels, and
plain text gets the EOS token appended, so the model learns to stop.
Any malformed record fails the whole load with `file:line: reason` before a
single step is trained.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters_store.errors import InvalidArgument
from loraplex.server.engine.chat_format import check_tools, render_conversation, template_messages, tool_format

IGNORE = -100
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
            "bot": "assistant", "system": "system", "developer": "system", "tool": "tool"}


class DataError(InvalidArgument, ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def pad_token_id(tok) -> int:
    """The tokenizer's pad id, else its EOS id (most chat models ship without a pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def read_jsonl(path) -> list[tuple[int, dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: each line must be a JSON object")
            out.append((i, rec))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def detect_format(rec: dict) -> str:
    if "messages" in rec:
        return "chat"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "chosen" in rec and "rejected" in rec:
        return "preference"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "text" in rec:
        return "text"
    raise ValueError(f"cannot tell the format from keys {sorted(rec)}")


def _messages(v, where: str, tool_calls: bool = False) -> list[dict]:
    """Checked chat messages {role, content}. With `tool_calls` (SFT chat records) they keep what tool calling
    and `weight` add: an assistant's `tool_calls` (which may stand without content), a tool's `tool_call_id`
    (both checked by `template_messages`)."""
    if not isinstance(v, list) or not v:
        raise ValueError(f"'{where}' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in ROLE_MAP:
            raise ValueError(f"'{where}[{j}]' must be an object with a known 'role' and a string 'content'")
        role = ROLE_MAP[m["role"]]
        content = m.get("content")
        calls_only = tool_calls and content is None and role == "assistant" and m.get("tool_calls")
        if not (isinstance(content, str) or calls_only):
            raise ValueError(f"'{where}[{j}]' must be an object with a known 'role' and a string 'content'")
        d = {"role": role, "content": content}
        if not tool_calls:
            out.append(d)
            continue
        for k in ("tool_calls", "tool_call_id", "name"):
            if m.get(k) is not None:
                d[k] = m[k]
        if "weight" in m:
            if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise ValueError(f"'{where}.{j}.weight' must be 0 or 1, on an assistant message")
            d["weight"] = m["weight"]
        out.append(d)
    return out


def conversation(rec: dict, msgs: list[dict]) -> tuple[list[dict], list[int], list[dict] | None]:
    """A record's checked messages -> (the messages the template reads, the weight of each, the tools shown).

    The record's `tools` are checked, and every assistant call must name one of them."""
    if "functions" in rec or any("function_call" in m for m in msgs):
        raise ValueError("'functions' / 'function_call' (OpenAI's deprecated format) are not supported; "
                         "write 'tools' and assistant 'tool_calls'")
    if "parallel_tool_calls" in rec and not isinstance(rec["parallel_tool_calls"], bool):
        raise ValueError("'parallel_tool_calls' must be true or false")
    try:
        tools = check_tools(rec["tools"]) if rec.get("tools") is not None else None
        rendered = template_messages(msgs, tools, strict=True)
    except InvalidArgument as e:
        raise ValueError(str(e)) from None
    return rendered, [m.get("weight", 1) for m in msgs], tools


class Tokenizing:
    """Turns records into Examples with the tokenizer and chat template of the base model."""

    def __init__(self, tokenizer, sequence_len: int, train_on_prompt: bool = False):
        self.tok = tokenizer
        self.seq_len = sequence_len
        self.train_on_prompt = train_on_prompt
        self.eos = tokenizer.eos_token_id
        self.truncated = 0
        self._tool_format = None  # checked on the first record with tools

    def _render(self, messages, add_generation_prompt=False, tools=None) -> str:
        try:
            return render_conversation(self.tok, messages, tools, add_generation_prompt=add_generation_prompt)
        except InvalidArgument as e:
            raise ValueError(str(e)) from None

    def _check_tool_support(self) -> None:
        if self._tool_format is None:
            try:
                self._tool_format = tool_format(self.tok)
            except InvalidArgument as e:
                raise ValueError(f"the record has tools, but {e}") from None

    def chat(self, messages: list[dict], roles: tuple[str, ...] = ("assistant",), tools: list[dict] | None = None,
             weights: list[int] | None = None) -> Example:
        """`messages` as `template_messages` returns them; `weights[i]` 0 leaves message i untrained."""
        weights = weights or [1] * len(messages)
        trained = [m["role"] in roles and w for m, w in zip(messages, weights)]
        if not any(trained):
            raise ValueError(f"a conversation needs at least one {'/'.join(roles)} message to learn from")
        if tools or any(m.get("tool_calls") for m in messages):
            self._check_tool_support()
        full = self._render(messages, tools=tools)
        spans = []  # character spans of trained turns (content and end-of-turn marker)
        for i, m in enumerate(messages):
            if not trained[i]:
                continue
            # an assistant turn is trained from after its header; another trained role's turn as a whole
            if m["role"] == "assistant":
                before = self._render(messages[:i], add_generation_prompt=True, tools=tools)
            else:
                before = self._render(messages[:i], tools=tools) if i else ""
            upto = self._render(messages[: i + 1], tools=tools)
            if not full.startswith(upto) or not upto.startswith(before):
                raise ValueError("the chat template does not render conversations incrementally; cannot find assistant turns")
            for c in m.get("tool_calls") or ():
                if c["function"]["name"] not in upto[len(before):]:
                    raise ValueError(f"the chat template does not render assistant 'tool_calls' (message {i} "
                                     f"calls {c['function']['name']!r})")
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = []
        for tid, (a, b) in zip(ids, enc["offset_mapping"]):
            inside = any(s <= a < e for s, e in spans) and b > a
            labels.append(tid if (inside or self.train_on_prompt) else IGNORE)
        return self._fit(ids, labels)

    def text(self, text: str) -> Example:
        ids = self.tok(text, add_special_tokens=True)["input_ids"] + [self.eos]
        return self._fit(ids, list(ids))

    def prompt_completion(self, prompt: str, completion: str) -> Example:
        p = self.tok(prompt, add_special_tokens=True)["input_ids"]
        c = self.tok(completion, add_special_tokens=False)["input_ids"] + [self.eos]
        return self._fit(p + c, (list(p) if self.train_on_prompt else [IGNORE] * len(p)) + c)

    def _fit(self, ids, labels) -> Example:
        if len(ids) > self.seq_len:
            self.truncated += 1
            ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        if all(l == IGNORE for l in labels[1:]):
            raise ValueError(f"no trainable tokens left within sequence_len={self.seq_len}")
        return Example(ids, labels)

    def record(self, rec: dict, fmt: str, roles: tuple[str, ...] = ("assistant",)) -> Example:
        if fmt == "text":
            if not isinstance(rec.get("text"), str) or not rec["text"]:
                raise ValueError("'text' must be a non-empty string")
            return self.text(rec["text"])
        if fmt == "chat":
            msgs, weights, tools = conversation(rec, _messages(rec.get("messages"), "messages", True))
            return self.chat(msgs, roles, tools, weights)
        if fmt == "sharegpt":
            conv = rec.get("conversations")
            if not isinstance(conv, list) or not conv:
                raise ValueError("'conversations' must be a non-empty list")
            msgs = []
            for j, t in enumerate(conv):
                if not isinstance(t, dict) or t.get("from") not in ROLE_MAP or not isinstance(t.get("value"), str):
                    raise ValueError(f"'conversations[{j}]' needs 'from' (human/gpt/system) and a string 'value'")
                msgs.append({"role": ROLE_MAP[t["from"]], "content": t["value"]})
            return self.chat(msgs, roles)
        if fmt == "alpaca":
            ins, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
            if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, str):
                raise ValueError("'instruction', 'input' and 'output' must be strings")
            user = ins if not inp else f"{ins}\n\n{inp}"
            return self.chat([{"role": "user", "content": user}, {"role": "assistant", "content": out}])
        if fmt == "prompt_completion":
            p, c = rec.get("prompt"), rec.get("completion")
            if isinstance(p, str) and isinstance(c, str):
                return self.prompt_completion(p, c)
            if isinstance(p, list) and isinstance(c, (list, str)):
                answer = _messages(c, "completion", True) if isinstance(c, list) else \
                    [{"role": "assistant", "content": c}]
                prompt = _messages(p, "prompt", True)
                msgs, weights, tools = conversation(rec, prompt + answer)
                return self.chat(msgs, ("assistant",), tools, [0] * len(prompt) + weights[len(prompt):])
            raise ValueError("'prompt' and 'completion' must be strings or message lists")
        raise ValueError(f"format {fmt!r} cannot be used for supervised fine-tuning")


def load_examples(path, fmt: str, tokenizing: Tokenizing) -> list[Example]:
    """The examples of one local JSONL file (see load_dataset_examples for every source)."""
    from .config import DatasetSpec

    return load_dataset_examples(DatasetSpec(path=str(path), format=fmt), tokenizing)[0]


def read_records(spec) -> tuple[list[tuple[str, dict]], str]:
    """The records of a dataset as (where, record) pairs, `where` naming the file and line (or row) for errors;
    and a content hash for the lineage (sha256 of a local file, `hub:org/name@commit` of a hub snapshot)."""
    from .config import is_hub_dataset

    path = spec.path
    suffix = Path(path).suffix.lower()
    if not is_hub_dataset(path) and suffix not in (".json", ".csv", ".parquet"):
        return [(f"{path}:{i}", rec) for i, rec in read_jsonl(path)], file_sha256(path)
    import datasets

    if is_hub_dataset(path):
        from loraplex.adapters_store.hub import HubError, snapshot

        try:
            local = snapshot(path if spec.revision is None or "@" in path else f"{path}@{spec.revision}",
                             repo_type="dataset")
        except HubError as e:
            raise DataError(str(e)) from None
        source, kw, digest = str(local), {"name": spec.name}, f"hub:{path.split('@')[0]}@{local.name}"
    else:
        source, kw, digest = suffix.lstrip("."), {"data_files": path}, None  # the datasets builder of that name
        if suffix == ".csv":  # every cell is text: "4" stays the completion "4", an empty cell stays ""
            import csv

            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            kw.update(features=datasets.Features({c: datasets.Value("string") for c in header}), keep_default_na=False)
    try:
        ds = datasets.load_dataset(source, split=spec.split, **kw)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the reason is reported, naming the dataset
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        which = (f"config {spec.name!r}, " if spec.name else "") + f"split {spec.split!r}"
        raise DataError(f"{path}: cannot load the dataset ({which}): {type(e).__name__}: {first}") from None
    out = [(f"{path}[row {i}]", dict(rec)) for i, rec in enumerate(ds)]
    if not out:
        raise DataError(f"{path}: no records")
    return out, digest or file_sha256(path)


def map_fields(rec: dict, spec) -> dict:
    """Axolotl-style field mapping: the conversation under `field_messages`, its turns' role / content keys."""
    if spec.field_messages is None and spec.message_property_mappings is None:
        return rec
    key = spec.field_messages or "messages"
    if key not in rec:
        raise ValueError(f"no field {key!r} (field_messages) in the record; it has {sorted(rec)}")
    conv = rec[key]
    m = {"role": "role", "content": "content", **(spec.message_property_mappings or {})}
    if not isinstance(conv, list):
        raise ValueError(f"field {key!r} must be a list of messages")
    msgs = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or m["role"] not in t or m["content"] not in t:
            raise ValueError(f"'{key}[{j}]' needs the keys {m['role']!r} (role) and {m['content']!r} (content)")
        msgs.append({"role": t[m["role"]], "content": t[m["content"]]})
    return {"messages": msgs}


def trained_roles(spec) -> tuple[str, ...]:
    roles = spec.roles_to_train or ["assistant"]
    bad = [r for r in roles if r not in ROLE_MAP]
    if bad:
        raise DataError(f"{spec.path}: roles_to_train {bad} are not roles (known: {sorted(ROLE_MAP)})")
    return tuple(sorted({ROLE_MAP[r] for r in roles}))


def load_dataset_examples(spec, tokenizing: Tokenizing) -> tuple[list[Example], str]:
    """Every record of `spec` as an Example -> (examples, content hash); the first bad record fails the load."""
    recs, digest = read_records(spec)
    roles = trained_roles(spec)
    fmt = "chat" if spec.field_messages or spec.message_property_mappings else spec.format
    out = []
    for where, rec in recs:
        try:
            rec = map_fields(rec, spec)
            if fmt == "auto":
                fmt = detect_format(rec)
            out.append(tokenizing.record(rec, fmt, roles))
        except (ValueError, InvalidArgument) as e:
            raise DataError(f"{where}: {e}") from None
    return out, digest


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """First-fit-decreasing bins of at most seq_len tokens; order within the dataset is kept stable by seed upstream."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        for i, r in enumerate(room):
            if n <= r:
                bins[i].append(ex)
                room[i] -= n
                break
        else:
            bins.append([ex])
            room.append(seq_len - n)
    return bins


def collate(rows: list[list[Example]], pad_id: int) -> dict:
    """Rows of one or more examples -> input_ids, labels, position_ids and a block-diagonal causal mask.

    Each example restarts its positions at 0 and attends only to itself, so a
    packed row computes exactly what the examples would compute alone.
    """
    L = max(sum(len(e.input_ids) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seq = torch.full((B, L), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        o = 0
        for k, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[b, o : o + n] = torch.tensor(ex.input_ids)
            # labels are shifted here: position t predicts token t+1 of the same example
            lab = ex.labels[1:] + [IGNORE]
            labels[b, o : o + n] = torch.tensor(lab)
            pos[b, o : o + n] = torch.arange(n)
            seq[b, o : o + n] = k
            o += n
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
    mask = (same & causal)[:, None]
    # padding rows attend to themselves so softmax stays finite (their labels are ignored)
    eye = torch.eye(L, dtype=torch.bool)[None, None]
    mask = mask | (eye & (seq < 0)[:, None, :, None])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask,
            "num_tokens": int((seq >= 0).sum()), "num_label_tokens": int((labels != IGNORE).sum())}


def batches(examples: list[Example], *, seq_len: int, micro_batch_size: int, packing: bool, seed: int, epoch: int) -> list[list[list[Example]]]:
    """The micro-batches of one epoch, deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1000003 + epoch)
    if packing:
        rows = pack(examples, seq_len)
        rng.shuffle(rows)
    else:
        rows = [[e] for e in examples]
        rng.shuffle(rows)
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
