"""Plain builders for test fixtures: a tiny random Llama checkpoint and real PEFT adapters for it."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def default_tokenizer_dir() -> Path:
    from loraplex.adapters_store.base_model import resolve_base_model

    return resolve_base_model("default")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_llama(out_dir, seed: int = 0, init_std: float = 0.08, copy_tokenizer: bool = True, **overrides) -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads) with the embedded model's tokenizer and chat template."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # larger-than-init weights so logits are far from uniform and argmax ties are unlikely
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, init_std)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["pad_token_id"]).save_pretrained(out)
    if copy_tokenizer:
        src = default_tokenizer_dir()
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, out / f)
    return out


def make_peft_adapter(base_dir, out_dir, *, r: int = 8, alpha: float = 16, target_modules=("q_proj", "v_proj"),
                      seed: int = 0, use_rslora: bool = False, init_std: float = 0.05, rank_pattern=None,
                      alpha_pattern=None, init_scale: float | None = None) -> Path:
    """A real PEFT LoRA adapter for `base_dir` with non-zero B (so it changes outputs).

    A ~ N(0, s), B ~ N(0, 4s) with s = `init_scale` (alias of `init_std`)."""
    from peft import LoraConfig, get_peft_model

    std = init_std if init_scale is None else init_scale
    torch.manual_seed(seed)
    model = _load_base(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                     use_rslora=use_rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.normal_(0.0, std * (4.0 if "lora_B" in n else 1.0))
    out = Path(out_dir)
    pm.save_pretrained(out)
    return out


def _load_base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def make_reward_adapter(base_dir, out_dir, *, seed: int = 0, **lora) -> Path:
    """A reward adapter in loraplex's convention: a PEFT LoRA plus `score_head.safetensors`
    (`weight` [1, hidden], `bias` [1]) and `"loraplex_kind": "reward"` in adapter_config.json."""
    import json

    from safetensors.torch import save_file

    out = make_peft_adapter(base_dir, out_dir, seed=seed, **lora)
    hidden = json.loads((Path(base_dir) / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    save_file({"weight": torch.randn(1, hidden, generator=g) / hidden ** 0.5, "bias": torch.tensor([0.25])},
              str(out / "score_head.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["loraplex_kind"] = "reward"
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def base_spec_for(base_dir, *, max_rank: int = 256, model_id: str | None = None):
    """The store's BaseModelSpec of a checkpoint directory (shapes from a meta-device model, real fingerprint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraplex.adapters_store import BaseModelSpec
    from loraplex.adapters_store.base_model import fingerprint

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return BaseModelSpec.from_model(model, model_id or Path(base_dir).name, fingerprint(Path(base_dir)), max_rank=max_rank)


CHARS = "abcdefghijklmnopqrstuvwxyz .,!?'"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_char_tokenizer(out_dir) -> Path:
    """A character-level tokenizer (36 tokens) with ChatML turns: small vocabularies make RL tests learnable."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS) + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=specials[:3])
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def make_tiny_char_llama(out_dir, seed: int = 0) -> Path:
    """A 2-layer Llama over the character tokenizer (vocab 36), for RL tests."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    make_char_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    make_tiny_llama(out, seed=seed, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, copy_tokenizer=False)
    return out


# A Hermes / Qwen2.5-style chat template with tool support (tools in the system turn, calls as
# <tool_call>{json}</tool_call>, results as <tool_response> user turns), for tiny tool-calling test models.
TOOL_CHAT_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}
</tools>
For each call, answer with a JSON object within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' and loop.first %}
{%- elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}
{%- if not loop.first or m.content %}{{ '\n' }}{% endif %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
""".strip()


def make_tiny_tool_llama(out_dir, seed: int = 0) -> Path:
    """`make_tiny_llama` whose chat template supports tools (TOOL_CHAT_TEMPLATE)."""
    out = make_tiny_llama(out_dir, seed=seed)
    (out / "chat_template.jinja").write_text(TOOL_CHAT_TEMPLATE)
    return out


def make_hub_cache(cache_dir, repo_id: str, files: dict, *, repo_type: str = "model", ref: str = "main") -> Path:
    """Lays out `repo_id` in a Hugging Face hub cache (HF_HUB_CACHE) as huggingface_hub writes it: content-addressed
    blobs, a snapshot of symlinks per commit, refs/<ref> naming the commit; `files` maps repo paths to bytes or to
    local files/directories to copy. Returns the snapshot directory. With HF_HUB_OFFLINE=1 huggingface_hub resolves
    `repo_id` (and `repo_id@<commit>`) from here without the network. Content is bytes; a str or Path is copied."""
    import hashlib
    import os

    root = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    items: dict[str, bytes] = {}
    for name, src in files.items():
        if isinstance(src, bytes):
            items[name] = src
        elif Path(src).is_dir():
            for f in sorted(Path(src).rglob("*")):
                if f.is_file():
                    items[f"{name}/{f.relative_to(src)}".lstrip("/")] = f.read_bytes()
        else:
            items[name] = Path(src).read_bytes()
    commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in items.items())).encode()).hexdigest()
    snap = root / "snapshots" / commit
    for name, data in items.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


def make_small_pretrained(out_dir, layers: int = 2) -> Path:
    """The embedded SmolLM2-135M-Instruct cut to its first `layers` decoder layers: tiny and fast like the random
    models, but with pretrained embeddings, so a LoRA learns facts from a few examples at an ordinary learning rate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = default_tokenizer_dir()
    out = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.config.layer_types = (getattr(model.config, "layer_types", None) or [])[:layers] or None
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    if (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", out / "generation_config.json")
    return out


class ServeProcess:
    """`loraplex serve` of `model` in its own process on a free port, on a store and registry other processes may
    share (a replica); its output goes to <tmp>/<name>.log. `extra`: more command-line arguments."""

    def __init__(self, tmp, model, store, registry, name, extra=()):
        import os
        import subprocess
        import sys

        from conftest import free_port

        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"{name}.log", "w")
        env = dict(os.environ, LORAPLEX_REGISTRY="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplex.server.cli", "serve", "--model", str(model), "--store", str(store),
             "--registry", registry, "--port", str(self.port), "--grpc-port", "0", "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout=240):
        import time

        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, open(self.log.name).read()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not become ready: {open(self.log.name).read()[-3000:]}")

    def stop(self):
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def started_pair(cls, tmp, model, registry):
    """A context manager: replicas "a" and "b" (`cls`, a ServeProcess) on one store and `registry`, both ready,
    stopped on exit."""
    import contextlib

    @contextlib.contextmanager
    def pair():
        store = tmp / "shared-store"
        a, b = cls(tmp, model, store, registry, "a"), cls(tmp, model, store, registry, "b")
        try:
            a.wait_ready()
            b.wait_ready()
            yield a, b
        finally:
            a.stop()
            b.stop()

    return pair()
