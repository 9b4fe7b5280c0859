"""Small models, batches, losses and an exact per-sample gradient reference shared by the tests.

Everything here is built from a config with random weights: nothing is downloaded. Import it from
a test file as ``from models import ...`` (pytest puts ``tests/`` on ``sys.path``; there is no
``tests/__init__.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 0
BERT_VOCAB = 100


# --------------------------------------------------------------------------------------------
# Tiny BERT with peft LoRA
# --------------------------------------------------------------------------------------------


def tiny_bert(
    num_labels: int = 2,
    seed: int = 0,
    *,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A random 2-layer ``BertForSequenceClassification`` (hidden 32), in eval mode, no peft."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=BERT_VOCAB,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=PAD_ID,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model.to(dtype).eval()


def tiny_bert_lora(
    num_labels: int = 2,
    r: int = 4,
    seed: int = 0,
    *,
    lora_alpha: int | None = None,
    target_modules: Sequence[str] = ("query", "value"),
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    lora_b_std: float = 0.1,
) -> nn.Module:
    """:func:`tiny_bert` wrapped by ``peft.get_peft_model`` with LoRA on ``target_modules``.

    peft zero-initialises every ``lora_B``; that would make every ``lora_A`` gradient exactly zero
    (and a comparison against a reference vacuous), so the ``lora_B`` weights are redrawn from
    ``N(0, lora_b_std^2)``. The model is in eval mode (no dropout); the base model is frozen by peft
    and the classifier head is a trainable ``modules_to_save`` copy.
    """
    from peft import LoraConfig, get_peft_model

    base = tiny_bert(num_labels, seed, attn_implementation=attn_implementation)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        task_type="SEQ_CLS",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    nn.init.normal_(param, std=lora_b_std)
    return model.to(dtype).eval()


def random_padded_batch(
    batch_size: int = 4,
    *,
    max_len: int = 10,
    min_len: int = 3,
    lengths: Sequence[int] | None = None,
    pad_to: int | None = None,
    vocab_size: int = BERT_VOCAB,
    num_labels: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A right-padded batch ``{input_ids, attention_mask, labels}`` of examples of varying length.

    Unless ``lengths`` is given, the first example has ``max_len`` tokens, the last ``min_len``,
    the others a random length in between. The tensor is ``pad_to`` (default: the longest example)
    columns wide; padding positions hold ``PAD_ID`` and mask 0. Token ids are in ``[1, vocab_size)``.
    """
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lens = torch.randint(min_len, max_len + 1, (batch_size,), generator=gen)
        lens[0] = max_len
        if batch_size > 1:
            lens[-1] = min_len
        lengths = lens.tolist()
    lengths = [int(n) for n in lengths]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({max(lengths)})")
    input_ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(1, vocab_size, (n,), generator=gen)
        attention_mask[i, :n] = 1
    labels = torch.randint(0, num_labels, (len(lengths),), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_batch(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """``batch`` with ``extra`` more padding columns on the right."""
    out = dict(batch)
    b = batch["input_ids"].shape[0]
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((b, extra), PAD_ID, dtype=torch.long)], dim=1)
    out["attention_mask"] = torch.cat(
        [batch["attention_mask"], torch.zeros((b, extra), dtype=batch["attention_mask"].dtype)], dim=1
    )
    return out


def unpadded_examples(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each example of a padded batch as a batch of one, truncated to its true length (no padding)."""
    examples = []
    for i, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        examples.append(
            {
                "input_ids": batch["input_ids"][i : i + 1, :n],
                "attention_mask": batch["attention_mask"][i : i + 1, :n],
                "labels": batch["labels"][i : i + 1],
            }
        )
    return examples


def bert_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy ``[B]`` of a sequence classifier (labels are not passed to the model)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


def mlp(
    d_in: int = 6,
    hidden: int = 8,
    num_classes: int = 3,
    seed: int = 0,
    *,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """``fc1 -> tanh -> fc2 -> tanh -> out``: three ``nn.Linear`` with distinct in/out sizes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(d_in, hidden, bias=bias),
                act1=nn.Tanh(),
                fc2=nn.Linear(hidden, hidden + 2, bias=bias),
                act2=nn.Tanh(),
                out=nn.Linear(hidden + 2, num_classes, bias=bias),
            )
        )
    return model.to(dtype).eval()


def mlp_batch(
    batch_size: int = 5, d_in: int = 6, num_classes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [B, d_in], y [B])``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, d_in, generator=gen).to(dtype)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    return x, y


def mlp_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy ``[B]`` of a classifier on ``(x, y)``."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def split_examples(batch: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """A tuple batch as a list of batches of one."""
    return [tuple(t[i : i + 1] for t in batch) for i in range(batch[0].shape[0])]


# --------------------------------------------------------------------------------------------
# Exact reference: one backward call per example
# --------------------------------------------------------------------------------------------


def reference_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    examples: Sequence[Any],
    blocks: Sequence[Any],
) -> dict[str, torch.Tensor]:
    """Per-example block gradients ``{name: [n, r, d]}`` from a loop of single-example backward calls.

    Each example is a batch of one; its loss is differentiated with ``torch.autograd.grad`` with
    respect to each block's weight (and bias). The ``r x d`` layout is rebuilt here from
    ``block.side`` / ``block.include_bias`` without calling ``Block.layout``: weight ``[d_out, d_in]``
    (a convolution's weight flattened to ``[C_out, C_in kh kw]``), bias appended as a last column,
    transposed for ``side == "out"``. ``requires_grad`` flags are
    restored afterwards and no ``.grad`` field is written.
    """
    params = []
    for b in blocks:
        params.append(b.module.weight)
        if b.include_bias and b.module.bias is not None:
            params.append(b.module.bias)
    flags = [(p, p.requires_grad) for p in params]
    out: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        for example in examples:
            with torch.enable_grad():
                loss = loss_fn(model, example)
                assert loss.shape == (1,), loss.shape
                wanted = []
                for b in blocks:
                    wanted.append(b.module.weight)
                    if b.include_bias and b.module.bias is not None:
                        wanted.append(b.module.bias)
                grads = torch.autograd.grad(loss.sum(), wanted, allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
            k = 0
            for b in blocks:
                g = grads[k].reshape(grads[k].shape[0], -1)  # a convolution's [C_out, C_in, kh, kw] as C_out rows
                k += 1
                if b.include_bias and b.module.bias is not None:
                    g = torch.cat([g, grads[k].unsqueeze(-1)], dim=-1)
                    k += 1
                out[b.name].append(g if b.side == "in" else g.T)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {name: torch.stack(gs) for name, gs in out.items()}


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max_i ||actual_i - expected_i||_F / ||expected_i||_F`` over the leading (example) dimension."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    a = actual.reshape(actual.shape[0], -1).double()
    e = expected.reshape(expected.shape[0], -1).double()
    num = (a - e).norm(dim=1)
    den = e.norm(dim=1)
    assert (den > 0).all(), "reference gradient is exactly zero: the comparison would be vacuous"
    return float((num / den).max())


# --------------------------------------------------------------------------------------------
# Exact K-FAC / EK-FAC reference: explicit token sums and Kronecker products
# --------------------------------------------------------------------------------------------


def reference_kronecker(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    examples: Sequence[Any],
    blocks: Sequence[Any],
) -> dict[str, dict[str, torch.Tensor]]:
    """Per block, from one forward and backward call per example (each a batch of one, no padding):

    ``inputs`` = sum over tokens of ``a a^T`` (``a`` with a 1 appended when the block includes its
    bias), ``outputs`` = sum of ``delta delta^T`` (``delta = dL/dy``), ``tokens``; the flattened
    empirical Fisher ``fisher = (1/n) sum_k vec(G_k) vec(G_k)^T`` of the laid-out gradients
    ``G_k = sum_t delta_t a_t^T``; ``kfac`` = ``S (x) A`` (``S = outputs / n``, ``A = inputs / tokens``,
    in layout order: ``S`` on the rows for side "in", on the columns for side "out") as an explicit
    ``torch.kron``; and ``ekfac`` = ``Q diag(vec Lambda) Q^T`` with ``Q = Q_r (x) Q_d`` the factors'
    eigenvectors and ``Lambda = (1/n) sum_k (Q_r^T G_k Q_d)^2``.
    """
    sums = {b.name: {"inputs": 0.0, "outputs": 0.0, "tokens": 0, "grads": []} for b in blocks}
    for example in examples:
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [
            b.module.register_forward_hook(lambda m, i, o, name=b.name: seen.__setitem__(name, (i[0].detach(), o)))
            for b in blocks
        ]
        try:
            with torch.enable_grad():
                loss = loss_fn(model, example)
                deltas = torch.autograd.grad(loss.sum(), [seen[b.name][1] for b in blocks])
        finally:
            for handle in handles:
                handle.remove()
        for b, delta in zip(blocks, deltas):
            a = seen[b.name][0].reshape(-1, b.module.in_features)
            if b.include_bias and b.module.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            delta = delta.reshape(-1, b.module.out_features)
            entry = sums[b.name]
            entry["inputs"] = entry["inputs"] + a.T @ a
            entry["outputs"] = entry["outputs"] + delta.T @ delta
            entry["tokens"] += a.shape[0]
            g = delta.T @ a
            entry["grads"].append(g if b.side == "in" else g.T)
    n, out = len(examples), {}
    for b in blocks:
        entry = sums[b.name]
        grads = torch.stack(entry["grads"])
        flat = grads.reshape(n, -1)
        s, a = entry["outputs"] / n, entry["inputs"] / entry["tokens"]
        rows, columns = (s, a) if b.side == "in" else (a, s)
        q_r, q_d = torch.linalg.eigh(rows)[1], torch.linalg.eigh(columns)[1]
        lam = (q_r.T @ grads @ q_d).square().mean(0)
        q = torch.kron(q_r, q_d)
        out[b.name] = {
            "inputs": entry["inputs"],
            "outputs": entry["outputs"],
            "tokens": torch.tensor(entry["tokens"]),
            "grads": grads,
            "fisher": flat.T @ flat / n,
            "kfac": torch.kron(rows, columns),
            "ekfac": q @ torch.diag(lam.reshape(-1)) @ q.T,
            "lambda": lam,
        }
    return out


def fitted_kronecker(pre: Any, name: str) -> torch.Tensor:
    """The flattened curvature ``(Q_r (x) Q_d) diag(vec Lambda) (Q_r (x) Q_d)^T`` of a K-FAC / EK-FAC preconditioner's block."""
    q_r, q_d = pre.bases[name]
    q = torch.kron(q_r, q_d)
    return q @ torch.diag(pre.eigenvalues[name].reshape(-1)) @ q.T
