"""Weight-only quantization (int8 / int4 logits stay close to fp32, kernels match their dequantized
weights, the engine runs quantized) and embeddings (padding-invariant pooling, every pooling mode)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.engine import Engine, SamplingParams
from lmstack.engine.embed import embed, embed_ids
from lmstack.engine.quant import Int4Linear, Int8Linear, quantize_model, weight_bytes

from engine_helpers import tiny_model as _tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    return _tiny(seed, **{"n_embd": 128, "vocab_size": 300, "block_size": 64, **overrides})


def test_quantized_linear_layers_match_their_dequantized_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    x = torch.randn(5, 128)
    int8 = Int8Linear(linear)
    deq8 = int8.qweight.float() * int8.scale[:, None].float()
    assert (deq8 - linear.weight).abs().max() <= int8.scale.max() / 2 + 1e-6  # rounding error bound
    reference = F.linear(x.bfloat16().float(), deq8, linear.bias)
    assert torch.allclose(int8(x), reference, atol=2e-2, rtol=2e-2)
    int4 = Int4Linear(linear, group_size=32)
    deq4 = int4.dequantized(torch.float32)
    step = (linear.weight.view(96, 4, 32).amax(-1) - linear.weight.view(96, 4, 32).amin(-1)) / 15
    assert ((deq4 - linear.weight).abs().view(96, 4, 32) <= step[..., None] / 2 + 2e-3).all()
    assert torch.allclose(int4(x), F.linear(x.bfloat16().float(), deq4, linear.bias), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("mode, max_kl, min_agreement", [("int8", 1e-4, 0.95), ("int4", 2e-3, 0.8)])
def test_quantized_model_logits_stay_close_to_fp32(mode, max_kl, min_agreement):
    model = tiny_model()
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        reference = torch.log_softmax(model(idx)[0], dim=-1)
        size = weight_bytes(model)
        quantize_model(model, mode)
        quantized = torch.log_softmax(model(idx)[0], dim=-1)
    assert weight_bytes(model) < size
    # KL(reference || quantized) per position, averaged: small for int8, larger but bounded for int4
    kl = (reference.exp() * (reference - quantized)).sum(-1).mean()
    assert float(kl) < max_kl
    agree = (reference.argmax(-1) == quantized.argmax(-1)).float().mean()
    assert float(agree) >= min_agreement


def test_engine_runs_a_quantized_model_like_its_plain_loop():
    from lmstack.engine.generate import generate

    model = quantize_model(tiny_model(), "int8")
    params = SamplingParams(max_tokens=10, temperature=0.0)
    [out] = Engine(model).generate([[4, 5, 6]], params)
    assert out.outputs[0].token_ids == generate(model, [4, 5, 6], params)


# ----------------------------------------------------------------------------- embeddings

@pytest.mark.parametrize("pooling", ["mean", "last", "first"])
def test_embeddings_do_not_depend_on_padding_or_batch(pooling):
    model = tiny_model()
    inputs = [[5, 6, 7, 8, 9, 10], [11, 12], [13]]
    batched = embed_ids(model, inputs, pooling=pooling)
    assert batched.shape == (3, 128)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)
    for i, x in enumerate(inputs):
        alone = embed_ids(model, [x], pooling=pooling)[0]
        assert torch.allclose(batched[i], alone, atol=1e-5)
    with torch.no_grad():
        hidden, _ = model(torch.tensor([inputs[0]]), return_hidden=True)
    expected = {"mean": hidden[0].mean(0), "last": hidden[0, -1], "first": hidden[0, 0]}[pooling]
    assert torch.allclose(batched[0], F.normalize(expected, dim=0), atol=1e-5)
    raw = embed_ids(model, inputs, pooling=pooling, normalize=False)
    assert torch.allclose(F.normalize(raw, dim=-1), batched, atol=1e-5)


def test_embed_texts_and_errors():
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["the cat sat on the mat", "dogs bark at night"] * 20, vocab_size=300)
    model = tiny_model()
    vectors = embed(model, tokenizer, ["the cat", "dogs bark loudly", "the cat"])
    assert torch.allclose(vectors[0], vectors[2]) and not torch.allclose(vectors[0], vectors[1])
    with pytest.raises(ValueError, match="empty"):
        embed(model, tokenizer, ["fine", ""])
    with pytest.raises(ValueError, match="pooling"):
        embed_ids(model, [[1]], pooling="max")
    with pytest.raises(TypeError, match="list"):
        embed(model, tokenizer, "one text")
