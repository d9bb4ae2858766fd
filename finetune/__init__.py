"""LoRA fine-tuning of the explainer model, from labelled TRAINING data to a llama.cpp adapter.

* :mod:`finetune.dataset` -- explainer prompts (rendered by the explainer itself) and teacher
  answers for the training part of labelled logs; JSON lines + a manifest with its SHA-256.
  ``python -m finetune.dataset --data-dir DIR --out data/ft.jsonl``.
* :mod:`finetune.teacher` -- the deterministic teacher and the mechanical faithfulness check.
* :mod:`finetune.train` -- peft LoRA on transformers, answer-only loss, seeded, checkpointed and
  resumable, atomic final adapter with metadata (``anomaly-agent finetune`` -> :func:`finetune.train.main`).
* :mod:`finetune.export` -- the peft adapter as a GGUF LoRA for llama.cpp (q/k rope permutation).
* :mod:`finetune.evaluate` -- base vs tuned on held-out cases without constrained decoding
  (``anomaly-agent eval finetune`` -> :func:`finetune.evaluate.run`).
* ``finetune/configs/*.yaml`` -- one per model preset, each saying why its numbers are what they are.
"""
