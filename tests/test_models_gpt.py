"""The decoder-only model: every architecture option trains, shapes and accounting are right."""

import itertools

import pytest
import torch

from lmstack.models import build_model
from lmstack.models.gpt import GPTConfig


def tiny_cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def pattern_batch(B=8, T=24, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (B, 1), generator=g)
    seq = (start + torch.arange(T + 1) * 3) % vocab  # a learnable rule: next = prev + 3
    return seq[:, :-1], seq[:, 1:]


def train_steps(cfg: GPTConfig, steps=25, lr=3e-3):
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = pattern_batch(vocab=cfg.vocab_size)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


OPTIONS = {
    "norm": ["rmsnorm", "layernorm"],
    "norm_placement": ["pre", "post"],
    "activation": ["gelu", "swiglu", "geglu", "relu2"],
    "position": ["rope", "learned", "sinusoidal", "none"],
}


@pytest.mark.parametrize("option,value", [(k, v) for k, vs in OPTIONS.items() for v in vs])
def test_every_option_trains(option, value):
    losses = train_steps(tiny_cfg(**{option: value}))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
def test_attention_variants_train(n_kv_head):
    losses = train_steps(tiny_cfg(n_kv_head=n_kv_head))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("tie,bias,dropout", list(itertools.product([True, False], [True, False], [0.0, 0.1])))
def test_embedding_bias_dropout_variants(tie, bias, dropout):
    cfg = tiny_cfg(tie_embeddings=tie, bias=bias, dropout=dropout)
    model = build_model(cfg)
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    assert (model.blocks[0].attn.q_proj.bias is not None) == bias
    losses = train_steps(cfg)
    assert losses[-1] < 0.8 * losses[0]


def test_gqa_has_fewer_kv_parameters():
    mha = build_model(tiny_cfg(n_kv_head=4))
    mqa = build_model(tiny_cfg(n_kv_head=1))
    assert mqa.blocks[0].attn.k_proj.weight.shape == (8, 32)
    assert mqa.num_params() < mha.num_params()


def test_param_count_and_flops():
    cfg = tiny_cfg(tie_embeddings=False, position="learned")
    model = build_model(cfg)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    non_emb = model.num_params(non_embedding=True)
    assert non_emb == model.num_params() - 64 * 32 - 32 * 32
    # 6N for the matmul parameters (head included, embeddings excluded) + attention term
    assert model.flops_per_token(16) == 6 * non_emb + 12 * 2 * 4 * 8 * 16


def test_causality_future_tokens_do_not_change_past_logits():
    model = build_model(tiny_cfg()).eval()
    x, _ = pattern_batch(B=2)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 7) % 64
    l1, _ = model(x)
    l2, _ = model(x2)
    torch.testing.assert_close(l1[:, :10], l2[:, :10])
    assert not torch.allclose(l1[:, 10:], l2[:, 10:])


def test_ignore_index_and_logits_to_keep():
    model = build_model(tiny_cfg()).eval()
    x, y = pattern_batch(B=2)
    y_masked = y.clone()
    y_masked[:, :12] = -1
    logits, loss_masked = model(x, y_masked)
    ref = torch.nn.functional.cross_entropy(logits[:, 12:].reshape(-1, 64), y[:, 12:].reshape(-1))
    torch.testing.assert_close(loss_masked, ref)
    last, _ = model(x, logits_to_keep=1)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_context_overflow_is_a_clear_error():
    model = build_model(tiny_cfg(block_size=8))
    with pytest.raises(ValueError, match="beyond the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))
