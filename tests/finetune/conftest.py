"""Fixtures for the fine-tuning tests: a synthetic labelled log, a small data set, a tiny model.

Everything is generated here (``eval.synth``; a randomly initialised 2-layer Llama with a
word-level tokenizer built from the data set's own words): no test needs /work/shared, a
download, or the real model -- except the export check, which uses the packaged SmolLM2 GGUF
and llama.cpp when installed and is skipped (with the reason) otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ft_support import CHATML, SMALL, SmallSet

from eval.hdfs import HDFSData
from finetune.dataset import build_examples, case_pool, synth_log_data, write_dataset


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> HDFSData:
    """A synthetic labelled HDFS-like log (300 blocks, 15% anomalous), shaped like load_hdfs's."""
    return synth_log_data(tmp_path_factory.mktemp("ft_synth"), 300, anomaly_rate=0.15, seed=1001)


@pytest.fixture(scope="session")
def small_set(synth_data: HDFSData, tmp_path_factory: pytest.TempPathFactory) -> SmallSet:
    """~45 examples of every case kind (no knowledge store: fast), written with a manifest."""
    pool = case_pool(synth_data, "synth", SMALL, source="synth.log")
    examples, notes = build_examples(pool, None, SMALL)
    path = tmp_path_factory.mktemp("ft_data") / "ft.jsonl"
    write_dataset(examples, path, {"test": True}, notes)
    return SmallSet(path, examples, pool, synth_data)


@pytest.fixture(scope="session")
def twin_set(small_set: SmallSet, tmp_path_factory: pytest.TempPathFactory) -> SmallSet:
    """The small set built again with every injection case's clean twin (``BuildConfig.twins``)."""
    from dataclasses import replace

    examples, notes = build_examples(small_set.pool, None, replace(SMALL, twins=True))
    path = tmp_path_factory.mktemp("ft_twins") / "ft.jsonl"
    write_dataset(examples, path, {"test": True, "twins": True}, notes)
    return SmallSet(path, examples, small_set.pool, small_set.data)


@pytest.fixture(scope="session")
def tiny_base(small_set: SmallSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama and a ChatML word-level tokenizer over the data set's words."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    folder = tmp_path_factory.mktemp("tiny_llama")
    words: dict[str, int] = {}
    for w in ("<pad>", "<|im_end|>", "[UNK]", "<|im_start|>"):
        words[w] = len(words)
    split = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits
    for ex in small_set.examples:
        for text in [ex.answer, "assistant user system"] + [m["content"] for m in ex.messages]:
            for w in split.findall(text):
                words.setdefault(w, len(words))
    tk = Tokenizer(tok_models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>",
                                                pad_token="<pad>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   eos_token_id=1, pad_token_id=0, bos_token_id=1)
    import torch

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
