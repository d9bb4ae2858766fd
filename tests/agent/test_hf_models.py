"""The transformers backend on tiny randomly initialised models built here from configs (no download).

* a 1-layer Llama with a byte-level BPE tokenizer (so it can spell JSON),
* Idefics3 (SmolVLM's architecture) and LLaVA with tiny vision towers, each saved with a
  processor built locally: a ``tokenizers`` BPE tokenizer and transformers' PIL image processor
  (no torchvision).

A random model writes garbage; with a schema the backend must still return JSON that validates.
LoRA adapters are trained for one step, saved, reloaded through the backend and compared logit by
logit with the in-memory model. 4-bit loading runs only where ``bitsandbytes`` imports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import prompts
from agent import models
from agent.hf_models import TransformersModel, adapter_fingerprint, model_kind
from agent.models import Message, ModelError, ModelNotInstalled, ModelTimeout

SCHEMA = prompts.verdict_schema(["E1", "E2"], ["P1"], ["R-001"])
MESSAGES = [Message(role="system", content="Answer with JSON only."),
            Message(role="user", content="Evidence [E1]: an IOException while writing block blk_1. "
                                         "Evidence [E2]: one extra 'Receiving block' line. Explain it.")]
PROMPTS = ["Explain the anomaly in block blk_7.",
           "Disk full on datanode 3; evidence E1 and E2.",
           "A spike in latency at 12:00, see passage P1 and rule R-001."]

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:"
                 "{% if m['content'] is string %} {{ m['content'] }}{% else %}{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
                 "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
"""SmolVLM-style: ``Role: <image> text<end_of_utterance>``; string content for text-only models."""

CORPUS = [('{"anomaly_type":"io error","summary":"the block write failed","causal_chain":[{"text":"disk full",'
           '"evidence_ids":["E1"]}],"passage_ids":["P1"],"rule_ids":["R-001"],"label":"anomaly","severity":3,'
           '"confidence":0.8,"actions":["replace the disk"]}'),
          "System: Answer with JSON only. User: the disk is full and the block write failed. Assistant:"] * 4


def _tokenizer(specials: list[str]) -> Any:
    """A byte-level BPE tokenizer (every byte is a token, ~100 merges) ending turns with <end_of_utterance>."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    tk = Tokenizer(tok_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=360, special_tokens=["<pad>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<end_of_utterance>",
        additional_special_tokens=list(dict.fromkeys(["<end_of_utterance>", *specials])))


def _llama_config(tok: Any, layers: int = 1, hidden: int = 16) -> Any:
    return transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_transformers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer Llama, byte-level BPE tokenizer and chat template, saved locally."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = _tokenizer([])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama_config(tok)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolVLM's architecture, tiny: 32 px tiles of 8 px patches, pixel shuffle 2 -> 4 tokens per tile;
    images up to 64 px are split into <= 2x2 tiles plus the global view."""
    folder = tmp_path_factory.mktemp("tiny_idefics3")
    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<global-img>"]
                     + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
    image_processor = transformers.Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                             max_image_size={"longest_edge": 32})
    processor = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                               chat_template=CHAT_TEMPLATE)
    vision = transformers.Idefics3VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.Idefics3Config(text_config=_llama_config(tok, layers=2, hidden=32), vision_config=vision,
                                         scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA, tiny: a 2-layer CLIP vision tower on 32 px images of 8 px patches (16 image tokens)."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    tok = _tokenizer(["<image>"])
    image_processor = transformers.LlavaImageProcessorPil(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=CHAT_TEMPLATE)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    config = transformers.LlavaConfig(text_config=_llama_config(tok, layers=2, hidden=32), vision_config=vision,
                                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      image_seq_length=16)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50x40 noise PNG (not square, so resizing and tiling are exercised)."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "inspection.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(path)
    return path


def _assert_valid(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(text)
    jsonschema.validate(obj, schema)
    assert list(obj) == list(schema["properties"]), "properties are written in schema order"
    return obj


# ------------------------------------------------------------------------------ text-only models

def test_transformers_backend_generates_and_times_out(tiny_transformers: Path) -> None:
    model = TransformersModel(tiny_transformers, timeout=30)
    reply = model.generate(MESSAGES, max_tokens=5)
    assert reply.role == "assistant" and isinstance(reply.content, str) and model.last_usage["completion_tokens"] <= 5
    assert isinstance(model, models.ChatModel) and model.model_id == f"transformers:{tiny_transformers.name}"
    assert model.adapter is None and model.kind == "causal-lm"
    slow = TransformersModel(tiny_transformers, timeout=1e-6)  # past before the first token: deterministic
    slow.load()
    with pytest.raises(ModelTimeout):
        slow.generate(MESSAGES, schema=SCHEMA, max_tokens=3000)
    with pytest.raises(ModelNotInstalled, match="model folder not found"):
        TransformersModel(tiny_transformers / "missing").load()
    with pytest.raises(ValueError, match=r"unknown dtype 'int3'.*float32"):
        TransformersModel(tiny_transformers, dtype="int3")


def test_random_model_writes_garbage_unconstrained(tiny_transformers: Path) -> None:
    # What the constraint is up against: the same model without a schema does not write JSON.
    model = TransformersModel(tiny_transformers, timeout=30)
    reply = model.generate(MESSAGES, max_tokens=60)
    with pytest.raises(ValueError):
        json.loads(reply.content)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_constrained_greedy_output_validates(tiny_transformers: Path, prompt: str) -> None:
    model = TransformersModel(tiny_transformers, timeout=50)
    reply = model.generate([MESSAGES[0], Message(role="user", content=prompt)], schema=SCHEMA, max_tokens=2500)
    obj = _assert_valid(reply.content, SCHEMA)
    assert model.last_finish_reason == "stop" and model.last_usage["constrained"] is True
    assert obj["label"] in ("anomaly", "normal", "uncertain")
    assert all(set(step["evidence_ids"]) <= {"E1", "E2"} for step in obj["causal_chain"])


@pytest.mark.parametrize("seed", [1, 2])
def test_constrained_sampled_output_validates(tiny_transformers: Path, seed: int) -> None:
    model = TransformersModel(tiny_transformers, timeout=50)
    torch.manual_seed(seed)
    first = model.generate(MESSAGES, schema=SCHEMA, max_tokens=2500, temperature=1.0).content
    _assert_valid(first, SCHEMA)
    torch.manual_seed(seed)
    assert model.generate(MESSAGES, schema=SCHEMA, max_tokens=2500, temperature=1.0).content == first


def test_constrained_decoding_covers_every_schema_feature(tiny_transformers: Path) -> None:
    # Integer, number and string enums, bounded strings, arrays of enums and of nested objects.
    schema = {"type": "object", "additionalProperties": False,
              "required": ["code", "ratio", "kind", "tags", "steps", "note"],
              "properties": {
                  "code": {"type": "integer", "enum": [10, 1, 100]},
                  "ratio": {"type": "number", "enum": [0.25, 2.5]},
                  "kind": {"type": "string", "enum": ["disk", "net"]},
                  "tags": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "string", "enum": ["a", "b"]}},
                  "steps": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                      "type": "object", "additionalProperties": False, "required": ["t", "n"],
                      "properties": {"t": {"type": "string", "minLength": 2, "maxLength": 5},
                                     "n": {"type": "integer", "enum": [7]}}}},
                  "note": {"type": "string", "maxLength": 3}}}
    model = TransformersModel(tiny_transformers, timeout=50)
    for seed in (3, 4):
        torch.manual_seed(seed)
        obj = _assert_valid(model.generate(MESSAGES, schema=schema, max_tokens=400, temperature=1.0).content, schema)
        assert all(list(step) == ["t", "n"] for step in obj["steps"])


def test_processor_masks_to_the_grammar_and_catches_off_grammar_tokens(tiny_transformers: Path) -> None:
    model = TransformersModel(tiny_transformers, timeout=30).load()
    tok = model.tokenizer
    vocab = model.model.get_output_embeddings().weight.shape[0]
    proc = model.schema_processor(SCHEMA, prompt_length=2)
    prompt = torch.tensor([[3, 4]])
    masked = proc(prompt, torch.zeros(1, vocab))
    allowed = [i for i in range(vocab) if masked[0, i] > float("-inf")]
    start = '{"anomaly_type":"'
    assert allowed and all(tok.decode([i]) and start.startswith(tok.decode([i])) for i in allowed)
    assert len(allowed) < vocab // 10
    # After '{"' only the first property may follow: a token starting another key is masked.
    opened = torch.tensor([[3, 4] + tok.encode('{"', add_special_tokens=False)])
    after = proc(opened, torch.zeros(1, vocab))
    assert all('anomaly_type":"'.startswith(tok.decode([i])) for i in range(vocab) if after[0, i] > float("-inf"))
    off = tok.encode("x", add_special_tokens=False)
    with pytest.raises(ModelError, match="against the grammar"):
        proc(torch.cat([opened, torch.tensor([off])], dim=1), torch.zeros(1, vocab))


@pytest.mark.parametrize("decoder", [False, True])
def test_tokenizer_that_cannot_spell_json_is_a_model_error(tmp_path: Path, decoder: bool) -> None:
    # A word-level vocabulary has no '{' (and, without a decoder, no known byte mapping at all):
    # the constraint says so instead of emitting garbage; plain generation still works.
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models

    words = ["<pad>", "</s>", "[UNK]", "anomaly", "normal", "block", "error", "disk", "E1", "E2", "the", "is"]
    tk = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if decoder:
        tk.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>",
                                         pad_token="<pad>").save_pretrained(tmp_path)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, eos_token_id=1, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = TransformersModel(tmp_path, timeout=30)
    assert model.generate(MESSAGES, max_tokens=3).content
    # (With the decoder, llguidance's mask lets the unknown-word token through and then rejects it.)
    message = r"constrained decoding: (no token|token \d+ was generated against)" if decoder else \
        "llguidance cannot read this tokenizer"
    with pytest.raises(ModelError, match=message):
        model.generate(MESSAGES, schema=SCHEMA, max_tokens=20)


def test_schema_that_cannot_be_compiled_is_a_model_error(tiny_transformers: Path) -> None:
    model = TransformersModel(tiny_transformers, timeout=30)
    with pytest.raises(ModelError, match="cannot constrain decoding to this schema"):
        model.generate(MESSAGES, schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}})


def test_constrained_answer_cut_by_max_tokens_says_length(tiny_transformers: Path) -> None:
    model = TransformersModel(tiny_transformers, timeout=30)
    reply = model.generate(MESSAGES, schema=SCHEMA, max_tokens=8)
    assert model.last_finish_reason == "length" and model.last_usage["completion_tokens"] == 8
    assert reply.content.startswith('{"')
    with pytest.raises(ValueError):
        json.loads(reply.content)


def test_text_only_model_refuses_images_naming_the_model(tiny_transformers: Path, image_file: Path) -> None:
    model = TransformersModel(tiny_transformers, timeout=30)
    with pytest.raises(ModelError, match=rf"transformers:{tiny_transformers.name} .*text-only.*LlamaForCausalLM"):
        model.generate([Message(role="user", content="what is this?", images=(str(image_file),))])
    assert model._model is None, "refused from the config alone, before loading weights"


def test_model_kind_from_the_config(tiny_transformers: Path, tiny_llava: Path, tmp_path: Path) -> None:
    assert model_kind(tiny_transformers) == "causal-lm"
    assert model_kind(tiny_llava) == "image-text-to-text"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(ModelError, match=r"'vit'.*neither a causal LM nor an image-text-to-text"):
        model_kind(tmp_path)
    with pytest.raises(ModelNotInstalled, match="model folder not found"):
        model_kind(tmp_path / "nope")


# ------------------------------------------------------------------------------ LoRA adapters

ATTENTION = r"(q_proj|k_proj|v_proj|o_proj)"
LORA_TARGETS = {
    "text": rf".*layers\.\d+\.self_attn\.{ATTENTION}",
    "idefics3": rf".*text_model\.layers\.\d+\.self_attn\.{ATTENTION}",
    "llava": rf".*language_model\.layers\.\d+\.self_attn\.{ATTENTION}",
}


def _train_lora(folder: Path, target: str, messages: list[Message], out: Path, steps: int = 1) -> tuple[Any, dict[str, Any]]:
    """A LoRA on the language model's attention projections, ``steps`` SGD steps on the prompt, saved to ``out``.

    Returns the trained in-memory peft model (eval mode) and the inputs it was trained on.
    """
    from peft import LoraConfig, get_peft_model

    holder = TransformersModel(folder, timeout=30)
    inputs = holder.prepare_inputs(messages)
    peft_model = get_peft_model(holder.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=target, task_type="CAUSAL_LM"))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not any("vision" in n for n in trained), "only the language model is adapted"
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = peft_model(**inputs, labels=inputs["input_ids"].clone()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(float(p.detach().abs().max()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(out)
    peft_model.eval()
    return peft_model, inputs


def _logits(model: Any, inputs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**inputs).logits


def _check_adapter_roundtrip(folder: Path, kind: str, messages: list[Message], tmp_path: Path) -> TransformersModel:
    adapter_dir = tmp_path / f"lora_{kind}"
    trained, inputs = _train_lora(folder, LORA_TARGETS[kind], messages, adapter_dir)
    reloaded = TransformersModel(folder, adapter_path=adapter_dir, timeout=50)
    assert reloaded.adapter == f"{adapter_dir.name}@{adapter_fingerprint(adapter_dir)}"
    assert re.fullmatch(r"lora_\w+@[0-9a-f]{12}", reloaded.adapter)
    want = _logits(trained, inputs)
    got = _logits(reloaded.model, reloaded.prepare_inputs(messages))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    base = _logits(TransformersModel(folder).model, inputs)
    assert float((base - want).abs().max()) > 1e-3, "the trained adapter changes the outputs"
    # The reloaded model's greedy tokens are the in-memory model's.
    with torch.no_grad():
        a = trained.generate(**inputs, max_new_tokens=6, do_sample=False)
        b = reloaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    # Retraining changes the adapter id (provenance and the explanation cache follow the weights).
    before = reloaded.adapter
    _train_lora(folder, LORA_TARGETS[kind], messages, adapter_dir, steps=2)
    assert TransformersModel(folder, adapter_path=adapter_dir).adapter != before
    return reloaded


def test_text_lora_adapter_roundtrip(tiny_transformers: Path, tmp_path: Path) -> None:
    reloaded = _check_adapter_roundtrip(tiny_transformers, "text", MESSAGES, tmp_path)
    _assert_valid(reloaded.generate(MESSAGES, schema=SCHEMA, max_tokens=2500).content, SCHEMA)
    with pytest.raises(ModelNotInstalled, match="LoRA adapter not found"):
        TransformersModel(tiny_transformers, adapter_path=tmp_path / "no_adapter").load()
    assert TransformersModel(tiny_transformers, adapter_path=tmp_path / "no_adapter").adapter == "no_adapter@missing"


# ------------------------------------------------------------------------------ vision-language models

@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_vlm_constrained_answer_about_an_image_and_lora(kind: str, request: pytest.FixtureRequest,
                                                         image_file: Path, tmp_path: Path) -> None:
    folder: Path = request.getfixturevalue(f"tiny_{kind}")
    messages = [MESSAGES[0], Message(role="user", content="Is this part defective? Evidence [E1].",
                                     images=(str(image_file),))]
    model = TransformersModel(folder, timeout=50)
    inputs = model.prepare_inputs(messages)
    assert model.kind == "image-text-to-text"
    assert type(model.processor.image_processor).__name__.endswith("Pil"), "no torchvision needed"
    image_id = model.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) >= 4 and "pixel_values" in inputs
    reply = model.generate(messages, schema=SCHEMA, max_tokens=2500)
    _assert_valid(reply.content, SCHEMA)
    assert model.last_usage["images"] == 1 and model.last_finish_reason == "stop"
    # The image reaches the model: another picture, other logits.
    other = tmp_path / "other.png"
    from PIL import Image

    Image.new("RGB", (50, 40), (250, 10, 10)).save(other)
    swapped = [messages[0], messages[1].model_copy(update={"images": (str(other),)})]
    assert not torch.allclose(_logits(model.model, inputs), _logits(model.model, model.prepare_inputs(swapped)))
    # Text-only messages work with a vision-language model too.
    _assert_valid(model.generate(MESSAGES, schema=SCHEMA, max_tokens=2500).content, SCHEMA)
    with pytest.raises(ModelError, match=re.escape(str(tmp_path / "missing.png"))):
        model.generate([Message(role="user", content="x", images=(str(tmp_path / "missing.png"),))])
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ModelError, match=r"cannot read image .*not_an_image\.png"):
        model.generate([Message(role="user", content="x", images=(str(tmp_path / "not_an_image.png"),))])

    reloaded = _check_adapter_roundtrip(folder, kind, messages, tmp_path)
    _assert_valid(reloaded.generate(messages, schema=SCHEMA, max_tokens=2500).content, SCHEMA)


# ------------------------------------------------------------------------------ 4-bit

def test_4bit_loading_generates_constrained_json(tiny_idefics3: Path, image_file: Path) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a native library that fails to load
        pytest.skip(f"bitsandbytes does not import here ({type(exc).__name__}: {exc}); pip install bitsandbytes")
    model = TransformersModel(tiny_idefics3, load_in_4bit=True, timeout=50)
    quantised = [type(m).__name__ for m in model.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantised, "linear layers are bitsandbytes 4-bit"
    messages = [Message(role="user", content="Defective?", images=(str(image_file),))]
    _assert_valid(model.generate(messages, schema=SCHEMA, max_tokens=2500).content, SCHEMA)
