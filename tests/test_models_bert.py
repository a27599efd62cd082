"""The BERT encoder family: bidirectional attention, padding, the masked-LM objective, embeddings, wiring."""

from __future__ import annotations

import pytest
import torch

from family_helpers import tiny_tokenizer, token_windows, train_steps
from lmstack.config import apply_overrides, get_preset
from lmstack.engine.embed import embed
from lmstack.models import build_model
from lmstack.models.bert import BertConfig
from lmstack.checkpoint import load_checkpoint, save_checkpoint
from lmstack.train.losses import mlm_mask, objective_for


def tiny_bert(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(vocab_size=400, block_size=64, n_layer=2, n_head=4, n_embd=32, init_std=0.1)
    cfg.update(kw)
    return build_model(BertConfig(**cfg)).eval()


def test_attention_is_bidirectional():
    model = tiny_bert()
    x = torch.randint(0, 400, (1, 10))
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % 400
    with torch.no_grad():
        a, _ = model(x, return_hidden=True)
        b, _ = model(changed, return_hidden=True)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-3  # the first token sees the last one


@pytest.mark.parametrize("how", ["attention_mask", "positions"])
def test_padding_does_not_change_real_tokens(how):
    model = tiny_bert()
    short, long = torch.randint(0, 400, (1, 5)), torch.randint(0, 400, (1, 9))
    batch = torch.cat([torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1), long])  # (2, 9)
    real = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    kw = {"attention_mask": real} if how == "attention_mask" else \
        {"positions": torch.where(real.bool(), torch.arange(9), -1)}
    with torch.no_grad():
        alone, _ = model(short, return_hidden=True)
        batched, _ = model(batch, return_hidden=True, **kw)
        unpadded_long, _ = model(long, return_hidden=True)
    assert torch.allclose(batched[0, :5], alone[0], atol=1e-5)
    assert torch.allclose(batched[1], unpadded_long[0], atol=1e-5)


def test_forward_shapes_loss_and_errors():
    model = tiny_bert()
    x = torch.randint(0, 400, (2, 12))
    targets = torch.full_like(x, -1)
    targets[:, 3] = x[:, 3]
    logits, loss = model(x, targets)
    assert logits.shape == (2, 12, 400) and loss.ndim == 0 and torch.isfinite(loss)
    assert model(x, return_hidden=True)[0].shape == (2, 12, 32)
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()  # tied decoder
    with pytest.raises(ValueError, match="beyond the model's context of 64 tokens"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="no KV cache"):
        model(x, kv_cache=object())
    assert model.num_params(non_embedding=True) < model.num_params()
    assert model.flops_per_token(64) > 6 * model.num_params(non_embedding=True)


def test_mlm_mask_statistics():
    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 500, 3
    special = torch.zeros(vocab, dtype=torch.bool)
    special[:5] = True
    x = torch.randint(5, vocab, (64, 256), generator=g)
    x[:, 0] = 0  # a special token at every row start: never chosen
    inputs, targets = mlm_mask(x, special, mask_id, generator=g)
    chosen = targets >= 0
    assert not chosen[:, 0].any()
    assert torch.equal(targets[chosen], x[chosen])
    assert torch.equal(inputs[~chosen], x[~chosen])  # unchosen tokens are untouched
    assert abs(chosen[:, 1:].float().mean().item() - 0.15) < 0.01
    n = chosen.sum().item()
    masked = (inputs == mask_id) & chosen
    kept = (inputs == x) & chosen
    randomised = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # (a random draw equal to the original counts as kept)
    assert abs(randomised.sum().item() / n - 0.1) < 0.02
    assert not special[inputs[randomised]].any()  # random replacements are never special tokens
    # a batch too small to be masked by chance still gets one target
    tiny_in, tiny_targets = mlm_mask(torch.tensor([[0, 7]]), special, mask_id, mask_prob=0.0)
    assert tiny_targets.tolist() == [[-1, 7]]


def test_masked_lm_trains_a_tiny_bert():
    tok = tiny_tokenizer()
    objective = objective_for(BertConfig(), tok)
    model = tiny_bert(vocab_size=tok.vocab_size, init_std=0.02)
    batch = token_windows(8, 32)
    model.eval()
    first, metrics = objective(model, batch)
    assert torch.equal(first, objective(model, batch)[0])  # validation masks are fixed, so scores compare
    assert 0.1 < metrics["masked_frac"] < 0.2
    losses = train_steps(model, objective, steps=40)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_masked_lm_uses_the_tokenizers_mask_token():
    tok = tiny_tokenizer()
    batch = token_windows(4, 32)
    seen = {}

    class Recording(torch.nn.Module):
        """The real model, remembering what the objective fed it."""

        def __init__(self):
            super().__init__()
            self.inner = tiny_bert(vocab_size=tok.vocab_size)

        def forward(self, inputs, targets):
            seen["inputs"], seen["targets"] = inputs, targets
            return self.inner(inputs, targets)

    objective_for(BertConfig(), tok)(Recording().eval(), batch)
    assert (seen["inputs"] == tok.special_tokens["<|mask|>"]).any()
    with pytest.raises(ValueError, match="needs the tokenizer"):
        objective_for(BertConfig())


def test_bert_family_from_config_overrides_and_checkpoint_round_trip(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), ["model.family=bert", "model.n_layer=2", "model.n_embd=64"])
    assert isinstance(cfg.model, BertConfig) and cfg.model.vocab_size == 4096
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_checkpoint(tmp_path / "ck", model, cfg.to_dict(), tokenizer=tiny_tokenizer())
    loaded = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 4096, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded.model(x)[0])


def test_sentence_embeddings_are_padding_invariant():
    tok = tiny_tokenizer()
    model = tiny_bert(vocab_size=tok.vocab_size)
    texts = ["the quick brown fox", "a stitch in time saves nine, all that glitters is not gold"]
    together = embed(model, tok, texts)
    alone = torch.cat([embed(model, tok, [t]) for t in texts])
    assert together.shape == (2, 32)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(2))
    cls = embed(model, tok, texts, pooling="first", normalize=False)
    with torch.no_grad():
        hidden, _ = model(torch.tensor([tok.encode(texts[0])]), return_hidden=True)
    assert torch.allclose(cls[0], hidden[0, 0], atol=1e-5)
