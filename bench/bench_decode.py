"""Decode throughput: lmstack's Engine against transformers `generate` on the same weights, same run.

    python bench/bench_decode.py                         # CPU: tiny preset and gpt2-124m shapes, batch 1 and 32
    python bench/bench_decode.py --models gpt2-124m --batch-sizes 1 32 --new-tokens 256   # one GPU

For each model shape (random weights: speed does not depend on what the weights are) the script
builds our model, copies its weights into the matching transformers model (Llama for the tiny
Llama-style preset, GPT-2 for gpt2-124m), checks that both give the same logits, then measures
end-to-end generation (prompt of --prompt-tokens, then --new-tokens greedy tokens per sequence,
EOS ignored) for

* ``engine``      — lmstack.engine.Engine (continuous batching; CUDA graphs on GPU),
* ``engine-int8`` / ``engine-int4`` — the same on weight-only quantized copies (batch 1 only),
* ``plain-loop``  — lmstack.engine.generate.generate, the single-sequence KV-cache reference (batch 1),
* ``hf-generate`` — transformers ``model.generate`` on the same weights and batch.

tokens/s counts generated tokens of all sequences over the wall time of the whole call. "GB/s"
is the memory traffic a decode step cannot avoid (every weight once + the KV cache read so far),
times steps, over the time: the model-bandwidth utilisation (MBU) when divided by the device's
peak bandwidth, which is printed for CUDA devices (H100 SXM: 3.35 TB/s; pass --peak-gbps otherwise).

Results print as a Markdown table (paste into BENCHMARKS.md) and as JSON lines with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import torch

from lmstack.config import get_preset
from lmstack.engine import Engine, SamplingParams
from lmstack.engine.generate import generate
from lmstack.engine.quant import quantize_model, weight_bytes
from lmstack.models import build_model

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


@dataclass
class Result:
    model: str
    system: str
    batch: int
    tokens: int
    seconds: float
    gbps: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


# ----------------------------------------------------------------------------- models

def build(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    cfg = get_preset(name).model
    torch.manual_seed(0)
    return build_model(cfg).to(device=device, dtype=dtype).eval()


def to_transformers(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers model with the same weights (Llama-style or GPT-2-style configs)."""
    import transformers

    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.norm == "layernorm" and cfg.position == "learned":  # GPT-2
        hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.hidden_dim,
                                         activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
        new = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
               "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": sd["norm_f.bias"]}
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            # GPT-2's Conv1D stores (in, out): transpose our (out, in) Linear weights
            new[h + "attn.c_attn.weight"] = torch.cat([sd[p + f"attn.{x}_proj.weight"] for x in "qkv"]).T
            new[h + "attn.c_attn.bias"] = torch.cat([sd[p + f"attn.{x}_proj.bias"] for x in "qkv"])
            new[h + "attn.c_proj.weight"] = sd[p + "attn.o_proj.weight"].T
            new[h + "attn.c_proj.bias"] = sd[p + "attn.o_proj.bias"]
            new[h + "mlp.c_fc.weight"] = sd[p + "mlp.up_proj.weight"].T
            new[h + "mlp.c_fc.bias"] = sd[p + "mlp.up_proj.bias"]
            new[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"].T
            new[h + "mlp.c_proj.bias"] = sd[p + "mlp.down_proj.bias"]
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                new[h + f"{theirs}.weight"] = sd[p + f"{ours}.weight"]
                new[h + f"{theirs}.bias"] = sd[p + f"{ours}.bias"]
    else:  # Llama: pre-RMSNorm, SwiGLU, RoPE in the rotate-half layout
        hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                                          intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layer,
                                          num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                                          head_dim=cfg.dim_per_head, max_position_embeddings=cfg.block_size,
                                          rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                                          tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias,
                                          mlp_bias=cfg.bias)
        hf = transformers.LlamaForCausalLM(hf_cfg)
        new = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"],
               "lm_head.weight": sd["lm_head.weight"]}
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            for x in "qkvo":
                new[h + f"self_attn.{x}_proj.weight"] = sd[p + f"attn.{x}_proj.weight"]
            for x in ("gate", "up", "down"):
                new[h + f"mlp.{x}_proj.weight"] = sd[p + f"mlp.{x}_proj.weight"]
            new[h + "input_layernorm.weight"] = sd[p + "norm1.weight"]
            new[h + "post_attention_layernorm.weight"] = sd[p + "norm2.weight"]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    missing = [m for m in missing if "rotary" not in m and not (m == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight copy into transformers failed: missing {missing[:4]}, unexpected {unexpected[:4]}")
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


# ----------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    cfg = model.config
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.dim_per_head * next(model.parameters()).element_size()


def decode_traffic(model: torch.nn.Module, batch: int, prompt: int, new: int) -> float:
    """Bytes a generation of ``new`` tokens for ``batch`` sequences must read: weights every step + KV so far."""
    kv = kv_bytes_per_token(model) * batch * sum(prompt + i for i in range(new))
    return weight_bytes(model) * new + kv


def time_engine(engine: Engine, prompts: list[list[int]], new: int, repeats: int) -> float:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_tokens=min(new, 8), temperature=0.0, ignore_eos=True))  # warm-up
    best = math.inf
    for _ in range(repeats):
        sync(engine.device)
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        sync(engine.device)
        best = min(best, time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == new for o in outs)
    return best


def time_hf(hf: torch.nn.Module, prompts: torch.Tensor, new: int, repeats: int) -> float:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompts))
    with torch.inference_mode():
        hf.generate(prompts, **{**kw, "max_new_tokens": min(new, 8), "min_new_tokens": min(new, 8)})
        best = math.inf
        for _ in range(repeats):
            sync(prompts.device)
            start = time.perf_counter()
            out = hf.generate(prompts, **kw)
            sync(prompts.device)
            best = min(best, time.perf_counter() - start)
    assert out.shape[1] == prompts.shape[1] + new
    return best


def time_plain(model: torch.nn.Module, prompt: list[int], new: int, repeats: int) -> float:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    generate(model, prompt, SamplingParams(max_tokens=4, temperature=0.0))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompt, params)
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------- main

def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    results: list[Result] = []
    for name in args.models:
        model = build(name, device, dtype)
        hf = to_transformers(model)
        probe = torch.randint(0, model.config.vocab_size, (1, 12), device=device)
        with torch.inference_mode():
            diff = (model(probe)[0].float() - hf(probe).logits.float()).abs().max().item()
        print(f"# {name}: {model.num_params() / 1e6:.1f}M params, {weight_bytes(model) / 1e6:.0f} MB of weights; "
              f"max |logit difference| vs transformers = {diff:.2e}")
        g = torch.Generator().manual_seed(0)
        for batch in args.batch_sizes:
            new = args.new_tokens
            prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens), generator=g)
            lists = prompts.tolist()

            def record(system: str, seconds: float, m: torch.nn.Module = model) -> None:
                r = Result(name, system, batch, batch * new, seconds,
                           decode_traffic(m, batch, args.prompt_tokens, new) / seconds / 1e9)
                results.append(r)
                print(f"{name:>10} {system:>12} batch {batch:>3}: {r.tokens_per_second:10.1f} tokens/s  "
                      f"({r.gbps:7.1f} GB/s)", flush=True)

            engine_kw = dict(max_num_seqs=batch, max_model_len=args.prompt_tokens + new,
                             compile_decode=args.compile)
            record("engine", time_engine(Engine(model, **engine_kw), lists, new, args.repeats))
            record("hf-generate", time_hf(hf, prompts.to(device), new, args.repeats))
            if batch == 1:
                record("plain-loop", time_plain(model, lists[0], new, args.repeats))
                for mode in args.quant:
                    qmodel = quantize_model(build(name, device, dtype), mode)
                    record(f"engine-{mode}", time_engine(Engine(qmodel, **engine_kw), lists, new, args.repeats), qmodel)
        del model, hf
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "gpt2-124m"], help="preset names")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 on CPU, 256 on GPU")
    p.add_argument("--repeats", type=int, default=2, help="best of N timed runs")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile inside the engine's decode graphs")
    p.add_argument("--quant", nargs="*", default=["int8", "int4"], help="quantized engine rows at batch 1")
    p.add_argument("--peak-gbps", type=float, default=None, help="device memory bandwidth for MBU")
    p.add_argument("--json", action="store_true", help="also print JSON lines")
    args = p.parse_args()
    on_gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if args.new_tokens is None:
        args.new_tokens = 256 if on_gpu else 64
    results = run(args)
    peak = args.peak_gbps
    if peak is None and on_gpu:
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_GBPS.items() if k in gpu), None)
    print("\n| model | system | batch | tokens/s | GB/s" + (" | MBU |" if peak else " |"))
    print("|---|---|---:|---:|---:|" + ("---:|" if peak else ""))
    for r in results:
        mbu = f" {100 * r.gbps / peak:.1f}% |" if peak else ""
        print(f"| {r.model} | {r.system} | {r.batch} | {r.tokens_per_second:,.1f} | {r.gbps:.1f} |{mbu}")
    if args.json:
        for r in results:
            print(json.dumps({**r.__dict__, "tokens_per_second": r.tokens_per_second}))


if __name__ == "__main__":
    main()
