"""SFT throughput: our trainer against a plain TRL SFTTrainer + PEFT baseline (default settings), in one run.

Same job for both: the embedded SmolLM2-135M-Instruct, a fixed synthetic chat
set with realistic length variation (questions of 4-120 words, answers of
4-240 words), LoRA r=16 alpha=32 on all linear layers, micro-batch 4,
max length 512, one epoch. Each trainer runs in its own process so peak
memory (max RSS) is its own; tokens/s counts real (non-padding) tokens over
the training loop only (model loading excluded).

Usage: python bench/train_sft.py [--examples 96]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu data model server adapter token batch").split()


def make_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120)))
            a = " ".join(rng.choice(WORDS) for _ in range(int(rng.paretovariate(1.2) * 4) % 240 + 4))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def run_ours(data: Path, out: Path) -> dict:
    from loraplex.trainer.config import parse_config
    from loraplex.trainer.sft import train_sft

    cfg = parse_config({"base_model": "default", "adapter": {"name": "bench", "r": 16, "alpha": 32, "target_modules": "all-linear"},
                        "datasets": [str(data)], "sequence_len": 512, "packing": True, "epochs": 1, "micro_batch_size": 4,
                        "learning_rate": 2e-4, "save_steps": 10**6, "seed": 0})
    seen = []
    t = {}

    def on(e):
        if e.get("type") == "data":
            t["start"] = time.perf_counter()
        if e.get("type") == "finished":
            t["end"] = time.perf_counter()
            seen.append(e["tokens_seen_this_run"])

    train_sft(cfg, out, on_event=on)
    return {"tokens": seen[0], "seconds": t["end"] - t["start"]}


def run_trl(data: Path, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from loraplex.adapters_store.base_model import resolve_base_model

    path = resolve_base_model("default")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(data), split="train")
    times = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["end"] = time.perf_counter()

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_length=512, num_train_epochs=1, learning_rate=2e-4,
                     report_to=[], save_strategy="no", logging_steps=1000, seed=0, use_cpu=not torch.cuda.is_available())
    tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"), callbacks=[Clock()])
    tokens = sum(min(512, len(x)) for x in tr.train_dataset["input_ids"])
    tr.train()
    return {"tokens": tokens, "seconds": times["end"] - times["start"]}


def child(which: str, data: str, out: str) -> None:
    r = run_ours(Path(data), Path(out)) if which == "ours" else run_trl(Path(data), Path(out))
    r["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--child", nargs=3, metavar=("WHICH", "DATA", "OUT"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-sft-"))
    data = make_data(tmp / "data.jsonl", args.examples)
    res = {}
    for which in ("ours", "trl"):
        p = subprocess.run([sys.executable, __file__, "--child", which, str(data), str(tmp / which)], capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stdout[-3000:], p.stderr[-3000:])
            raise SystemExit(f"{which} failed")
        res[which] = json.loads(line[0][7:])
    o, t = res["ours"], res["trl"]
    tps = {k: v["tokens"] / v["seconds"] for k, v in res.items()}
    print(f"\nSFT, {args.examples} chat examples (4-240 word answers), SmolLM2-135M, LoRA r=16 all-linear, micro-batch 4, max length 512, 1 epoch, CPU")
    print(f"{'trainer':8s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS MB':>12s}")
    for k in ("ours", "trl"):
        print(f"{k:8s} {res[k]['tokens']:8d} {res[k]['seconds']:8.1f} {tps[k]:9.1f} {res[k]['max_rss_mb']:12.0f}")
    print(f"\nours / TRL tokens/s: {tps['ours'] / tps['trl']:.2f}x (target >= 1.3)   peak memory ours / TRL: {o['max_rss_mb'] / t['max_rss_mb']:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
