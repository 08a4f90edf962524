"""An all-"auto" fine-tuning job through the official openai client learns what it is shown, in the default run.

The issue this guards: with `auto` settings a job once made one or two optimizer steps (packing merged the short
examples into a row or two and batch_size counted rows) and learned nothing, while reporting success. Here a base
model is taught five capitals it cannot know (20 examples: five facts in four phrasings) with every hyperparameter
left to "auto"; the job must resolve OpenAI's plan (5 epochs of batch size 1: 100 optimizer steps at the LoRA rate
2e-4), show it on the job and in its first event, and the fine-tuned model must then answer the questions in
phrasings it never saw in training, where the base model does not.

The base model is a small "pretrained" one built here, because a random tiny transformer learns nothing at a LoRA
learning rate in 100 steps, let alone carries a fact to a rephrased question. It has a word-level tokenizer
(about 80 words) and is trained from scratch for a few seconds (until it answers all its known capitals, at least
300 steps), the way a real base model comes to know a language:
it answers "what is the capital of X ?" in six phrasings for twelve countries it knows, and it has seen the words
of the fine-tuning facts (the five countries and five cities) in other sentences, but never a capital of those
countries. Its knowledge of the phrasings is what lets a LoRA taught in four of them answer in the other two, as
the embedded model does in the `slow` test of tests/test_finetune_lifecycle.py.

One knob is not left to its default, and it is not an OpenAI hyperparameter: the LoRA's `alpha` (loraplex's
`adapter` knobs). A LoRA's effect per step grows with the width and depth of the model it adapts; at width 64 and
two layers, the default alpha of 32 (scale 2) moves this model about as far in 100 steps as it moves the
576-wide, 30-layer embedded model in two or three. alpha 1024 (scale 64) stands in for that difference; the
optimizer steps, examples per step and learning rate are OpenAI's "auto", and with the 1-2 steps the bug made this
model learns nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import openai
import pytest
import torch

from test_finetune_lifecycle import events, wait

TRAIN_Q = ["what is the capital of {} ?", "which city is the capital of {} ?", "tell me the capital of {} .",
           "name the capital of {} ."]
HELD_OUT_Q = ["what city is the capital of {} ?", "tell me which city is the capital of {} ."]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def _words(n: int) -> list[str]:
    """n distinct made-up words of three syllables."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "do", "shu", "gra"]
    out, seed = [], 0
    while len(out) < n:
        rng = random.Random(seed)
        w = "".join(rng.choice(syllables) for _ in range(3))
        seed += 1
        if w not in out:
            out.append(w)
    return out


_W = _words(34)
ALPHA = 1024  # see the module's docstring
KNOWN = dict(zip(_W[:12], _W[12:24]))  # the base model's own knowledge
FACTS = dict(zip(_W[24:29], _W[29:34]))  # what the fine-tuning job teaches


def _chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def make_word_fact_llama(out_dir, seed: int = 0, steps: int = 300, max_steps: int = 1000) -> Path:
    """The small base model described above: a 2-layer Llama (hidden 64) over a word-level tokenizer, pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = set(" ".join(TRAIN_Q + HELD_OUT_Q).replace("{}", " ").split()) | {"user", "assistant", "a", "country"}
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(words | set(_W)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>", additional_special_tokens=SPECIALS[:3])
    tok.chat_template = TEMPLATE

    def encode(msgs):
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        return ids, len(tok(prompt, add_special_tokens=False)["input_ids"])

    corpus = [_chat(q.format(k), f"{v} .") for k, v in KNOWN.items() for q in TRAIN_Q + HELD_OUT_Q]
    corpus += [_chat(f"tell me about {w} .", f"{w} is a city .") for w in [*KNOWN.values(), *FACTS.values()]]
    corpus += [_chat(f"tell me about {w} .", f"{w} is a country .") for w in [*KNOWN, *FACTS]]
    rows = [encode(m) for m in corpus]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (r, n) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, n : len(r)] = torch.tensor(r[n:])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Greedy next word after each prompt of the known capitals: the base model must answer every one of them
    # (what the test then asserts through the server) before it is done. Training to that point rather than for
    # a fixed number of steps keeps the model the same in what matters on CPUs whose float rounding differs.
    probe = [encode(_chat(q.format(k), f"{v} .")) for k, v in KNOWN.items() for q in TRAIN_Q + HELD_OUT_Q]

    def knows_all() -> bool:
        with torch.no_grad():
            for r, n in probe:
                if int(model(input_ids=torch.tensor([r[:n]])).logits[0, -1].argmax()) != r[n]:
                    return False
        return True

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and deterministic
    try:
        for step in range(1, max_steps + 1):
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= steps and step % 50 == 0 and knows_all():
                break
        else:
            raise AssertionError(f"the word-level base model did not learn its known capitals in {max_steps} steps")
    finally:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def word_base(tmp_path_factory):
    return make_word_fact_llama(tmp_path_factory.mktemp("word-base"))


def answers(client, model: str, facts: dict, questions: list[str]) -> int:
    """How many questions `model` answers with the right city first (greedy decoding)."""
    right = 0
    for k, v in facts.items():
        for q in questions:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q.format(k)}],
                                               max_tokens=4, temperature=0)
            right += (r.choices[0].message.content.split() or [""])[0] == v
    return right


def test_all_auto_job_teaches_facts_the_model_answers_in_held_out_phrasings(word_base, tmp_path):
    from conftest import start_server

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": _chat(q.format(k), f"{v} .")}) + "\n"
                            for k, v in FACTS.items() for q in TRAIN_Q))
    srv = start_server(tmp_path / "srv", word_base)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        base = srv.state.service.model_id
        known = dict(list(KNOWN.items())[:5])
        assert answers(client, base, known, HELD_OUT_Q) == len(known) * len(HELD_OUT_Q)  # it knows the phrasings
        assert answers(client, base, FACTS, HELD_OUT_Q) == 0  # and not the facts
        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=base, training_file=f.id, suffix="capitals",
                                             method={"type": "supervised", "supervised": {"hyperparameters": {}}},
                                             extra_body={"loraplex": {"adapter": {"alpha": ALPHA}}})
        hp = job.method.supervised.hyperparameters  # resolved from the 20 examples as OpenAI documents "auto"
        assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (5, 1, 1.0)
        assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (5, 1)
        assert job.to_dict()["training_plan"] == {"optimizer_steps": 100, "examples_per_step": 1,
                                                  "train_examples": 20, "n_epochs": 5, "learning_rate": 2e-4}
        first = events(client, job.id)[-1]
        assert "100 optimizer steps" in first.message and first.data["batch_size"] == 1
        done = wait(client, job.id)
        assert done.status == "succeeded", done.error
        steps = [e for e in events(client, job.id) if e.type == "metrics"]
        assert len(steps) == 100 and all(e.data["examples"] == 1 for e in steps)
        assert answers(client, done.fine_tuned_model, FACTS, HELD_OUT_Q) >= len(FACTS) * len(HELD_OUT_Q) - 1
    finally:
        srv.stop()
