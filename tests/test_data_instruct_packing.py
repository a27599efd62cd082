"""Packed SFT batches (lmstack/data/instruct.py ``pack_len``, the models' ``document_ids``): a packed
conversation's logits equal its logits alone, the packed loss equals the padded loss on the same
conversations (GPT with RoPE and learned positions, MoE), ``document_ids=None`` keeps the mask-free path and
its exact outputs, packing needs fewer rows than padding, and the packed loader resumes exactly."""

import json
import random

import pytest
import torch

from lmstack.data.instruct import Example, InstructLoader, collate, collate_packed, pack_best_fit
from lmstack.engine.kv_cache import KVCache
from lmstack.errors import DataError, UserError
from lmstack.models.gpt import GPT, GPTConfig
from lmstack.models.moe import MoE, MoEConfig

VOCAB = 50


def _examples(n: int, seed: int, longest: int = 30) -> list[Example]:
    """Conversations of 3..longest tokens with a random prompt part (not trained) and trained rest."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(3, longest)
        prompt = rng.randint(1, length - 2)
        examples.append(Example([rng.randrange(1, VOCAB) for _ in range(length)],
                                [0] * prompt + [1] * (length - prompt)))
    return examples


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=32)
    models = {"gpt-rope": GPT(GPTConfig(**small)), "gpt-learned": GPT(GPTConfig(**small, position="learned")),
              "gpt-window": GPT(GPTConfig(**small, attn_window=5)),
              "gpt-gqa": GPT(GPTConfig(**{**small, "n_head": 4}, n_kv_head=2)),
              "moe": MoE(MoEConfig(**small, n_expert=4, top_k=2))}
    return {name: model.eval() for name, model in models.items()}


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed cross-entropy over the trained tokens, their count) of one batch."""
    layout = {key: batch[key] for key in ("positions", "document_ids") if key in batch}
    with torch.no_grad():
        _, loss = model(batch["input_ids"], batch["labels"], **layout)
    n = int((batch["labels"] != -1).sum())
    return float(loss) * n, n


@pytest.mark.parametrize("name", ["gpt-rope", "gpt-learned", "gpt-window", "moe"])
def test_packed_loss_equals_padded_loss(name):
    model = _models()[name]
    examples = _examples(40, seed=1)
    padded_total, padded_tokens = 0.0, 0
    for start in range(0, len(examples), 8):
        total, n = _loss(model, collate(examples[start:start + 8], pad_id=0))
        padded_total, padded_tokens = padded_total + total, padded_tokens + n
    windows = [[examples[i] for i in window] for window in pack_best_fit([len(e.ids) - 1 for e in examples], 48)]
    packed_total, packed_tokens = 0.0, 0
    for start in range(0, len(windows), 4):
        total, n = _loss(model, collate_packed(windows[start:start + 4], pad_id=0))
        packed_total, packed_tokens = packed_total + total, packed_tokens + n
    assert packed_tokens == padded_tokens
    assert abs(packed_total / packed_tokens - padded_total / padded_tokens) < 1e-5


@pytest.mark.parametrize("name", ["gpt-rope", "gpt-learned", "gpt-window", "moe"])
def test_each_packed_conversation_has_its_logits_alone(name):
    model = _models()[name]
    examples = _examples(3, seed=2, longest=15)
    batch = collate_packed([examples], pad_id=0)
    with torch.no_grad():
        packed, _ = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"])
        start = 0
        for e in examples:
            n = len(e.ids) - 1
            alone, _ = model(torch.tensor([e.ids[:-1]]))
            torch.testing.assert_close(packed[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
            start += n
        # without document ids the second conversation would see the first: the logits differ
        leaky, _ = model(batch["input_ids"], positions=batch["positions"])
        assert not torch.allclose(leaky[0, len(examples[0].ids) - 1:], packed[0, len(examples[0].ids) - 1:])


@pytest.mark.parametrize("name", ["gpt-rope", "moe"])
def test_no_document_ids_keeps_the_mask_free_path_and_its_outputs(name):
    model = _models()[name]
    idx = torch.randint(0, VOCAB, (2, 12))
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is None and kwargs.get("is_causal"))
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            plain, _ = model(idx)
            explicit, _ = model(idx, document_ids=None)
            one_document, _ = model(idx, document_ids=torch.zeros_like(idx))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    n_layer = model.config.n_layer
    # the fast path until document ids are given; one document per row is then the same kernel per row
    # (DocumentSpans), one call per row and layer
    assert calls == [True] * (2 * n_layer) + [True] * (2 * n_layer)
    assert torch.equal(plain, explicit)
    torch.testing.assert_close(one_document, plain, rtol=1e-5, atol=1e-5)


def test_document_ids_with_a_kv_cache_or_wrong_shape_is_a_user_error():
    model = _models()["gpt-rope"]
    idx = torch.randint(0, VOCAB, (1, 4))
    cache = KVCache(n_layer=2, batch_size=1, n_kv_head=2, head_dim=16, max_len=8)
    with pytest.raises(UserError, match="KV"):
        model(idx, document_ids=torch.zeros_like(idx), kv_cache=cache)
    with pytest.raises(UserError, match="one document id per token"):
        model(idx, document_ids=torch.zeros(1, 3, dtype=torch.long))


def test_packed_batch_layout():
    examples = [Example([1, 2, 3, 4], [0, 0, 1, 1]), Example([5, 6, 7], [0, 1, 1]), Example([8, 9], [0, 1])]
    windows = pack_best_fit([len(e.ids) - 1 for e in examples], 4)
    assert windows == [[0, 2], [1]]  # 2 does not fit beside 3; 1 goes to the fullest window it fits
    batch = collate_packed([[examples[i] for i in w] for w in windows], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 8], [5, 6, 0, 0]]
    assert batch["labels"].tolist() == [[-1, 3, 4, 9], [6, 7, -1, -1]]  # no label crosses a conversation
    assert batch["positions"].tolist() == [[0, 1, 2, 0], [0, 1, -1, -1]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1], [0, 0, -1, -1]]
    with pytest.raises(DataError, match="does not fit"):
        pack_best_fit([5], 4)


def test_packing_needs_fewer_rows_than_padding():
    examples = _examples(400, seed=3, longest=60)
    windows = pack_best_fit([len(e.ids) - 1 for e in examples], 64)
    assert sorted(i for w in windows for i in w) == list(range(len(examples)))  # every conversation once
    assert all(sum(len(examples[i].ids) - 1 for i in w) <= 64 for w in windows)
    used = sum(len(e.ids) - 1 for e in examples)
    assert len(windows) < len(examples) / 1.8  # 2 to 3 conversations of 2..59 input tokens per window of 64
    assert used / (len(windows) * 64) > 0.95  # best-fit decreasing leaves little room unused
    padded_slots = sum(collate(examples[i:i + 8], pad_id=0)["input_ids"].numel() for i in range(0, 400, 8))
    assert used / padded_slots < 0.7  # padding each batch to its longest wastes a third or more


def test_packed_loader_is_seeded_and_resumes_exactly():
    examples = _examples(200, seed=4)
    loader = InstructLoader(examples, batch_size=4, seed=7, pack_len=48)
    stream = iter(loader)
    first = [next(stream) for _ in range(30)]  # past the end of an epoch (about 20 batches)
    again = iter(InstructLoader(examples, batch_size=4, seed=7, pack_len=48))
    for a, b in zip(first, (next(again) for _ in range(30))):
        assert all(torch.equal(a[k], b[k]) for k in a)
    state = loader.state_dict()
    expected = [next(stream) for _ in range(10)]
    resumed = InstructLoader(examples, batch_size=4, seed=7, pack_len=48)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    stream = iter(resumed)
    for a in expected:
        b = next(stream)
        assert set(a) == {"input_ids", "labels", "positions", "document_ids"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_epoch = iter(InstructLoader(examples, batch_size=4, seed=8, pack_len=48))
    assert not torch.equal(next(other_epoch)["input_ids"], first[0]["input_ids"])


def _mask_path(monkeypatch) -> None:
    """Make both families build the explicit document mask instead of DocumentSpans."""
    import lmstack.models.gpt as gpt_module
    import lmstack.models.moe as moe_module
    monkeypatch.setattr(gpt_module, "document_spans", lambda positions, document_ids: None)
    monkeypatch.setattr(moe_module, "document_spans", lambda positions, document_ids: None)


@pytest.mark.parametrize("name", ["gpt-rope", "gpt-learned", "gpt-gqa", "moe"])
@pytest.mark.parametrize("layout", ["windows", "padding_free"])
def test_span_attention_equals_the_masked_call_in_outputs_and_gradients(name, layout, monkeypatch):
    """The causal kernel per conversation (DocumentSpans) against one masked SDPA call over the row: logits at
    every real token and every parameter's gradient agree; the padding's logits are finite."""
    examples = _examples(24, seed=5)
    if layout == "windows":
        windows = pack_best_fit([len(e.ids) - 1 for e in examples], 48)
        batch = collate_packed([[examples[i] for i in w] for w in windows][:4], pad_id=0)
    else:
        batch = InstructLoader(examples, batch_size=6, seed=0, padding_free=True)._collate([[e] for e in examples[:6]])
    real = batch["document_ids"] >= 0

    def run():
        model = _models()[name].train()  # no dropout in these configs
        logits, loss = model(batch["input_ids"], batch["labels"], positions=batch["positions"],
                             document_ids=batch["document_ids"])
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is None and kwargs.get("is_causal"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    spans_logits, spans_grads = run()
    assert calls and all(calls)  # only the causal kernel, one call per conversation (and padding) per layer
    documents = sum(len(set(row.tolist()) - {-1}) + int((row == -1).any()) for row in batch["document_ids"])
    assert len(calls) == documents * _models()[name].config.n_layer
    _mask_path(monkeypatch)
    calls.clear()
    mask_logits, mask_grads = run()
    assert calls and not any(calls)
    torch.testing.assert_close(spans_logits[real], mask_logits[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(spans_logits).all()
    assert spans_grads.keys() == mask_grads.keys()
    for key in spans_grads:
        torch.testing.assert_close(spans_grads[key], mask_grads[key], rtol=1e-4, atol=1e-6)


def test_document_spans_of_plain_concatenations_and_refusals():
    from lmstack.models.layers import document_spans
    batch = collate_packed([[Example([1, 2, 3, 4], [0, 0, 1, 1]), Example([8, 9], [0, 1])],
                            [Example([5, 6, 7], [0, 1, 1])]], pad_id=0)
    spans = document_spans(batch["positions"], batch["document_ids"])
    assert spans is not None and spans.rows == (((0, 3), (3, 4)), ((0, 2), (2, 4)))  # the padding is a span
    docs, pos = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 1]])
    assert document_spans(pos, docs).rows == (((0, 2), (2, 4)),)
    refused = {
        "positions that do not restart": (docs, torch.tensor([[0, 1, 2, 3]])),
        "left padding": (torch.tensor([[-1, 0, 0, 0]]), torch.tensor([[-1, 0, 1, 2]])),
        "padding between documents": (torch.tensor([[0, -1, 1, 1]]), torch.tensor([[0, -1, 0, 1]])),
        "a document split in two": (torch.tensor([[0, 1, 0, 0]]), torch.tensor([[0, 0, 0, 1]])),
        "a gap in the positions": (torch.tensor([[0, 0, 0]]), torch.tensor([[0, 1, 3]])),
        "padding with a position": (torch.tensor([[0, 0, -1]]), torch.tensor([[0, 1, 2]])),
    }
    for why, (document_ids, positions) in refused.items():
        assert document_spans(positions, document_ids) is None, why


def test_padding_free_batches_are_the_padded_batches_without_padding():
    examples = _examples(60, seed=6)
    padded = iter(InstructLoader(examples, batch_size=5, seed=3))
    flat_loader = InstructLoader(examples, batch_size=5, seed=3, padding_free=True)
    flat = iter(flat_loader)
    model = _models()["gpt-rope"]
    for _ in range(14):  # past the end of the first epoch (12 batches)
        p, f = next(padded), next(flat)
        assert f["input_ids"].shape[0] == 1 and (f["document_ids"] >= 0).all()  # one row, no padding
        # the same conversations in the same order: the padded rows with their padding (id 0, never a
        # token of _examples) taken out, back to back
        assert f["input_ids"][0].tolist() == [t for t in p["input_ids"].flatten().tolist() if t != 0]
        assert int((f["labels"] != -1).sum()) == int((p["labels"] != -1).sum())
        (total_p, n_p), (total_f, n_f) = _loss(model, p), _loss(model, f)
        assert n_p == n_f and abs(total_p / n_p - total_f / n_f) < 1e-5
    state = flat_loader.state_dict()
    expected = next(flat)
    resumed = InstructLoader(examples, batch_size=5, seed=3, padding_free=True)
    resumed.load_state_dict(state)
    assert all(torch.equal(expected[k], v) for k, v in next(iter(resumed)).items())
    with pytest.raises(ValueError, match="two layouts"):
        InstructLoader(examples, batch_size=5, pack_len=48, padding_free=True)


def test_compiled_packed_forward_takes_the_mask_and_matches_eager():
    """Under torch.compile the packed rows take the explicit mask (no per-layout recompiles); same logits."""
    model = _models()["gpt-rope"]
    examples = _examples(12, seed=7)
    windows = pack_best_fit([len(e.ids) - 1 for e in examples], 48)
    batch = collate_packed([[examples[i] for i in w] for w in windows][:2], pad_id=0)
    real = batch["document_ids"] >= 0
    layout = {"positions": batch["positions"], "document_ids": batch["document_ids"]}
    compiled = torch.compile(model, backend="eager")  # dynamo tracing without a C++ toolchain
    with torch.no_grad():
        eager, _ = model(batch["input_ids"], **layout)
        traced, _ = compiled(batch["input_ids"], **layout)
    torch.testing.assert_close(traced[real], eager[real], rtol=1e-5, atol=1e-5)
