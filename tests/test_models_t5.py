"""T5 encoder-decoder (models/t5.py) and span corruption (train/losses.py): relative position buckets,
bias shapes, bidirectional encoder / causal decoder, padding, cached generation against the uncached
reference, a copy task it must learn, and a few span-corruption steps on real tokens."""

from __future__ import annotations

import pytest
import torch
from family_helpers import tiny_tokenizer, token_windows, train_steps

from lmstack.config import ConfigError, build_run_config
from lmstack.engine.sampling import SamplingParams
from lmstack.engine.seq2seq import generate_seq2seq
from lmstack.errors import UserError
from lmstack.models import build_model
from lmstack.models.t5 import T5, RelativePositionBias, T5Config, relative_position_bucket
from lmstack.train.losses import SENTINELS, objective_for, random_span_mask, span_layout, split_spans

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_t5(seed: int = 0, **overrides) -> T5:
    cfg = T5Config(vocab_size=400, block_size=64, n_layer=2, n_head=4, n_embd=32, rel_buckets=8, rel_max_distance=20)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return T5(cfg).eval()


# ----------------------------------------------------------------------------- relative positions

def test_bidirectional_buckets():
    rel = torch.arange(-40, 41)  # key - query
    b = relative_position_bucket(rel, bidirectional=True, num_buckets=8, max_distance=20)
    assert b.min() >= 0 and b.max() <= 7
    # keys at or before the query use buckets 0..3, keys after it 4..7
    assert (b[rel <= 0] < 4).all() and (b[rel > 0] >= 4).all()
    # exact buckets for small distances (4 buckets per side, the first 2 exact)
    assert b[rel == 0].item() == 0 and b[rel == -1].item() == 1 and b[rel == 1].item() == 5
    # wider distances share log-spaced buckets, monotone in distance, saturating at max_distance
    before = b[rel <= 0].flip(0)  # distance 0, 1, 2, ...
    assert (before.diff() >= 0).all() and before[20:].eq(3).all() and before[2:20].lt(4).all()


def test_causal_buckets_and_bias_shape():
    rel = torch.arange(-50, 10)
    b = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert (b[rel >= 0] == 0).all()  # the future (masked anyway) shares distance 0's bucket
    assert (b[rel < 0].flip(0).diff() >= 0).all()
    assert b[rel == -15].item() == 15 and b[rel == -16].item() == 16  # 16 exact buckets
    bias = RelativePositionBias(n_head=3, bidirectional=False, num_buckets=32, max_distance=128)
    out = bias(torch.arange(5, 9), torch.arange(9))
    assert out.shape == (1, 3, 4, 9)
    # depends only on the distance: query 6 / key 4 equals query 7 / key 5
    assert torch.equal(out[0, :, 1, 4], out[0, :, 2, 5])


# ----------------------------------------------------------------------------- masks

def test_encoder_is_bidirectional_and_decoder_causal():
    model = tiny_t5()
    src, tgt = torch.randint(0, 400, (1, 10)), torch.randint(0, 400, (1, 8))
    with torch.no_grad():
        enc = model.encode(src)
        other = src.clone()
        other[0, 9] += 1
        assert (model.encode(other) - enc).abs().amax(-1)[0, :9].gt(1e-6).all()  # the last token reaches the first
        logits = model(src, tgt)[0]
        for changed in range(8):
            other = tgt.clone()
            other[0, changed] += 1
            moved = (model(src, other)[0] - logits).abs().amax(-1)[0] > 1e-6
            assert moved.nonzero().flatten().tolist() == list(range(changed, 8))


def test_encoder_padding_is_ignored():
    model = tiny_t5()
    short, tgt = torch.randint(0, 400, (1, 6)), torch.randint(0, 400, (1, 5))
    padded = torch.cat([short, torch.randint(0, 400, (1, 4))], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    with torch.no_grad():
        assert torch.allclose(model(short, tgt)[0], model(padded, tgt, encoder_mask=mask)[0], atol=1e-5)


# ----------------------------------------------------------------------------- generation

def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_cached_generation_matches_uncached():
    model = tiny_t5()
    sources = [[5, 6, 7, 8, 9], [11, 12, 13]]  # ragged: padded and masked inside generate
    cached = generate_seq2seq(model, sources, greedy(12), decoder_start_id=1)
    assert cached == generate_seq2seq(model, sources, greedy(12), decoder_start_id=1, use_cache=False)
    # each row decodes as it would alone
    assert cached[1] == generate_seq2seq(model, [sources[1]], greedy(12), decoder_start_id=1)[0]
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=12, seed=3)
    sampled = generate_seq2seq(model, sources, sampling, decoder_start_id=1)
    assert sampled == generate_seq2seq(model, sources, sampling, decoder_start_id=1, use_cache=False)
    assert all(len(row) == 12 for row in sampled)
    # a seeded row samples the same tokens whatever shares its batch (one generator per row, as in the engine)
    assert sampled[1] == generate_seq2seq(model, [sources[1]], sampling, decoder_start_id=1)[0]
    assert sampled != generate_seq2seq(model, sources, greedy(12), decoder_start_id=1)


def test_generation_uses_the_engine_sampler_and_its_stops():
    """The loop draws through lmstack.engine.sampling: top_k=1 is greedy at any temperature, a stop token
    ends its row (and is not returned), per-row max_tokens bound each row, and what this loop cannot
    honour is refused."""
    model = tiny_t5()
    sources = [[5, 6, 7, 8, 9], [11, 12, 13]]
    reference = generate_seq2seq(model, sources, greedy(10), decoder_start_id=1)
    assert generate_seq2seq(model, sources, SamplingParams(temperature=5.0, top_k=1, max_tokens=10, seed=0),
                            decoder_start_id=1) == reference
    stop = reference[0][3]
    cut = generate_seq2seq(model, sources, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop]),
                           decoder_start_id=1)
    for row, ref in zip(cut, reference):
        assert row == (ref[:ref.index(stop)] if stop in ref else ref)
    assert generate_seq2seq(model, sources, SamplingParams(temperature=0.0, max_tokens=10), decoder_start_id=1,
                            eos_id=stop)[0] == reference[0][:reference[0].index(stop)]
    short = generate_seq2seq(model, sources, [greedy(3), greedy(7)], decoder_start_id=1)
    assert short == [reference[0][:3], reference[1][:7]]
    with pytest.raises(UserError, match="stop_token_ids"):
        generate_seq2seq(model, sources, SamplingParams(stop=["."]), decoder_start_id=1)
    with pytest.raises(UserError, match="n=2"):
        generate_seq2seq(model, sources, SamplingParams(n=2), decoder_start_id=1)
    with pytest.raises(UserError, match="non-empty"):
        generate_seq2seq(model, [[1], []], decoder_start_id=1)
    with pytest.raises(UserError, match="not an encoder-decoder"):
        generate_seq2seq(build_model(build_run_config("tiny").model), sources, decoder_start_id=1)


def test_learns_to_copy():
    """The encoder reads 5 distinct tokens and the decoder must write them back, then stop: this only
    works through cross-attention (distinct tokens let it find "the token after the one I just wrote")."""
    torch.manual_seed(0)
    model = tiny_t5(vocab_size=16, n_layer=2, n_embd=64).train()
    start, eos, length = 0, 1, 5

    def sources(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([torch.randperm(14, generator=generator)[:length] + 2 for _ in range(n)])  # (n, 5)

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(400):
        src = sources(32)
        decoder_input = torch.cat([torch.full((32, 1), start), src], dim=1)
        targets = torch.cat([src, torch.full((32, 1), eos)], dim=1)
        _, loss = model(src, decoder_input, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = sources(16, torch.Generator().manual_seed(1))
    out = generate_seq2seq(model, test, greedy(8), decoder_start_id=start, eos_id=eos)
    exact = sum(row == src_row for row, src_row in zip(out, test.tolist()))
    assert exact >= 12, (exact, out[:3], test[:3].tolist())


# ----------------------------------------------------------------------------- span corruption

def test_span_corruption_is_invertible():
    torch.manual_seed(0)
    B, L = 4, 50
    tokens = torch.randint(0, 300, (B, L))
    n_noise, n_spans = span_layout(L, 0.15, 3.0, 16)
    noise = random_span_mask(B, L, n_noise, n_spans)
    assert (noise.sum(1) == n_noise).all() and not noise[:, 0].any()
    assert ((noise[:, 1:] & ~noise[:, :-1]).sum(1) == n_spans).all()
    sentinels = torch.arange(1000, 1016)
    encoder_input, spans = split_spans(tokens, noise, n_spans, sentinels, sentinels)
    for row in range(B):  # put each span back where its sentinel stands
        pieces, enc, dec = [], encoder_input[row].tolist(), spans[row].tolist()
        fills = {}
        for tok in dec:
            if tok >= 1000:
                current = fills.setdefault(tok, [])
            else:
                current.append(tok)
        for tok in enc:
            pieces.extend(fills[tok] if tok >= 1000 else [tok])
        assert pieces == tokens[row].tolist()


def test_span_layout_caps_spans_at_the_sentinels():
    noise, spans = span_layout(1024, 0.15, 3.0, 16)
    assert noise == 154 and spans == 16
    assert span_layout(20, 0.15, 3.0, 16) == (3, 1)


def test_span_corruption_trains_and_names_missing_tokens():
    tok = tiny_tokenizer()
    cfg = build_run_config("tiny-t5", overrides=["model.vocab_size=400", "model.n_layer=2", "model.n_decoder_layer=2",
                                                 "model.n_embd=32", "model.block_size=64", "train.seq_len=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = objective_for(cfg.model, tok)
    losses = train_steps(model, objective, steps=25, seq_len=64)
    assert losses[-1] < 0.7 * losses[0]
    model.eval()  # validation: a fixed corruption pattern
    batch = token_windows(4, 64, seed=2)
    with torch.no_grad():
        assert float(objective(model, batch)[0]) == float(objective(model, batch)[0])

    class NoSentinels:
        special_tokens = {"<|endoftext|>": 0}
        eot_id = 0

    with pytest.raises(ValueError, match=r"<\|sentinel_0\|>"):
        objective_for(cfg.model, NoSentinels())
    assert len(SENTINELS) == len(tok.sentinel_ids)


def test_t5_config_and_flops():
    with pytest.raises(ConfigError, match="noise_density"):
        T5Config(noise_density=1.5).validate()
    model = tiny_t5()
    assert model.num_params(non_embedding=True) == model.num_params() - 400 * 32
    # compute per window token grows with the window (attention) and stays near 6x the params it touches
    assert model.flops_per_token(64) > model.flops_per_token(32) > 0
    hidden, _ = model(torch.randint(0, 400, (2, 7)), return_hidden=True)
    assert hidden.shape == (2, 7, 32)
