"""The fine-tuning API's hyperparameters with OpenAI's meaning, "auto" resolved from the dataset as OpenAI documents.

OpenAI's definitions, which we keep exactly: `batch_size` is the number of
training examples in one optimizer step and `n_epochs` the number of passes
over the training examples. Packing does not change either (it only lays a
step's examples out in rows; see sft.py), so the planned number of optimizer
steps is known from the number of examples alone:
ceil(examples / batch_size) x n_epochs.

"auto", as OpenAI's guide and cookbook describe it:
- n_epochs: 3, scaled up for small datasets so that a run sees at least 100
  examples in all (at most 25 epochs), and down for large ones so that it
  sees at most 25,000 (at least 1 epoch).
- batch_size: about 0.2% of the training examples, at least 1, at most 256.
- learning_rate_multiplier: OpenAI scales a pretraining rate by 0.05-0.2,
  larger with the batch. A LoRA trains its fresh low-rank matrices from zero,
  which wants a far larger rate than full fine-tuning: ours is
  `LORA_BASE_LR` x multiplier, and "auto" picks the multiplier by batch size
  (`AUTO_LR_MULTIPLIER`): 1 at batch size 1, growing with the batch (fewer,
  less noisy steps take larger ones) by the same factor 4 across the range as
  OpenAI's 0.05-0.2. The batch-1 rate is the one the held-out-rephrasings test
  checks on the embedded SmolLM2-135M-Instruct (tests/test_finetune_lifecycle.py,
  `slow`; README "Training").

DPO keeps the same resolution; `beta` "auto" is 0.1. The reinforcement method
counts prompts as its examples (batch_size prompts per step).
"""

from __future__ import annotations

import math

TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 100, 25_000
MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS = 1, 25
BATCH_FRACTION, MAX_AUTO_BATCH = 0.002, 256
LORA_BASE_LR = 2e-4  # learning_rate = LORA_BASE_LR x learning_rate_multiplier
AUTO_LR_MULTIPLIER = ((1, 1.0), (8, 2.0), (math.inf, 4.0))  # (largest batch size, multiplier), first match wins
AUTO_BETA = 0.1


def auto_epochs(n_examples: int) -> int:
    n = max(1, n_examples)
    if n * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n)
    if n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(MAX_AUTO_BATCH, round(BATCH_FRACTION * n_examples)))


def auto_lr_multiplier(batch_size: int) -> float:
    return next(m for most, m in AUTO_LR_MULTIPLIER if batch_size <= most)


def planned_steps(n_examples: int, batch_size: int, n_epochs: float) -> int:
    """Optimizer steps as OpenAI counts them: ceil(examples / batch_size) per epoch, times the epochs."""
    return max(1, math.ceil(math.ceil(max(1, n_examples) / batch_size) * n_epochs))


def resolve(hp: dict, n_examples: int, *, method: str = "supervised") -> dict:
    """OpenAI hyperparameters as asked ("auto" or absent where not given) -> every value resolved, plus the plan:
    {n_epochs, batch_size, learning_rate_multiplier, [beta], learning_rate, planned_steps, train_examples}."""

    def given(key):
        v = hp.get(key, "auto")
        return None if v == "auto" else v

    epochs = given("n_epochs") or auto_epochs(n_examples)
    batch = given("batch_size") or auto_batch_size(n_examples)
    mult = given("learning_rate_multiplier") or auto_lr_multiplier(batch)
    out = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": float(mult)}
    if method == "dpo":
        out["beta"] = given("beta") or AUTO_BETA
    out.update(
        learning_rate=LORA_BASE_LR * float(mult),
        planned_steps=planned_steps(n_examples, batch, epochs),
        train_examples=n_examples,
    )
    return out
