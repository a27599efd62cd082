"""Batched multi-LoRA serving: decode tokens/s of one mixed batch over k adapters, against the base alone and
against k separately merged models, measured in the same run.

    python bench/bench_multi_lora.py                               # random 4x256 GPT, k = 1, 4, 16 (~1 min on 2 cores)
    python bench/bench_multi_lora.py --model RUN/model --batch 32 --tokens 64 --ks 2,8

For each k, the same B sequences (short prompts, greedy, ``ignore_eos``, ``--tokens`` new tokens each) are
decoded three ways:

* **base**: the base model alone (no adapters), one engine, one batch of B;
* **mixed**: one engine over the base with k adapters (lmstack.engine.multi_lora), sequence i using adapter
  i mod k, all B in one batch;
* **separate**: k engines, one per merged model (merge_lora), each decoding its B / k sequences; on one device
  the engines take turns, so their tokens/s is the total tokens over the summed time.

Decode tokens/s counts the tokens of the steps after the first (the first step prefills every prompt and
samples its first token). Memory is the bytes of weights held: the base plus the stacked adapter factors for
"mixed", k full merged copies for "separate" (KV caches are left out: the mixed engine has one pool of B
slots, the separate engines k pools of B / k). The greedy tokens of every mixed sequence are checked equal
to those of its merged model (the script exits non-zero otherwise), so a speed-up cannot come from
computing something else.

Adapters have random factors of rank --rank on every attention and MLP projection (q, k, v, o, gate, up, down).
Results: a table on stdout, bench/results/multi_lora/results.json and multi_lora.png (tokens/s and memory by k).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from lmstack.engine.engine import Engine
from lmstack.engine.multi_lora import LoRAWeights
from lmstack.engine.sampling import SamplingParams
from lmstack.models.peft import LoRAConfig, apply_lora, load_lora_state_dict, merge_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUT_DIR = Path(__file__).resolve().parent / "results" / "multi_lora"


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model:
        from lmstack.checkpoint import load_checkpoint

        return load_checkpoint(args.model, device="cpu").model.eval()
    from lmstack.config import tiny
    from lmstack.models import build_model

    cfg = tiny().model
    cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head = args.layers, args.width, args.width // 64, args.width // 64
    cfg.vocab_size, cfg.block_size, cfg.activation = 4096, 256, "swiglu"
    torch.manual_seed(0)
    return build_model(cfg).eval()


def random_adapters(model: torch.nn.Module, k: int, rank: int) -> tuple[list[LoRAWeights], list[tuple]]:
    """k adapters with random factors: (LoRAWeights for the engine, (cfg, state) to merge)."""
    cfg = LoRAConfig(r=rank, alpha=2.0 * rank, target_modules=TARGETS)
    probe = copy.deepcopy(model)
    modules = {name: probe.get_submodule(name) for name in apply_lora(probe, cfg)}
    weights, merges = [], []
    for i in range(k):
        g = torch.Generator().manual_seed(100 + i)
        factors, state = {}, {}
        for name, layer in modules.items():
            A = torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5
            B = torch.randn(layer.out_features, rank, generator=g) * 0.05
            factors[name] = (A, B)
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = A, B
        weights.append(LoRAWeights(f"adapter-{i}", factors, cfg.scaling))
        merges.append((cfg, state))
    return weights, merges


def merged(model: torch.nn.Module, cfg: LoRAConfig, state: dict) -> torch.nn.Module:
    copy_ = copy.deepcopy(model)
    apply_lora(copy_, cfg)
    load_lora_state_dict(copy_, state)
    merge_lora(copy_)
    return copy_.eval()


def decode(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[int, float, list]:
    """(decode tokens, decode seconds, token ids per sequence) with the first (prefill) step left out."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = {i: [] for i in ids}
    for out in engine.step():  # every prompt prefills and samples its first token in this step
        tokens[out.request_id] += out.outputs[0].new_token_ids
    counted, start = 0, time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].new_token_ids
            counted += len(out.outputs[0].new_token_ids)
    return counted, time.perf_counter() - start, [tokens[i] for i in ids]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def run_k(model: torch.nn.Module, k: int, args: argparse.Namespace) -> dict:
    weights, merges = random_adapters(model, k, args.rank)
    g = torch.Generator().manual_seed(k)
    prompts = [torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    engine_kw = dict(max_num_seqs=args.batch, max_model_len=args.prompt_len + args.tokens + 1, cuda_graphs=False)

    def params(adapter=None):
        return SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, adapter=adapter)

    def warm(engine: Engine, adapter=None) -> Engine:
        engine.generate([prompts[0]], params(adapter))
        return engine

    base_engine = warm(Engine(copy.deepcopy(model), **engine_kw))
    mixed_engine = warm(Engine(copy.deepcopy(model), adapters=weights, **engine_kw), "adapter-0")
    separate_engines = [warm(Engine(merged(model, cfg, state), **engine_kw)) for cfg, state in merges]

    result = {"k": k}
    for rep in range(args.repeats):  # interleaved repeats: drift of a shared machine hits every side alike
        n, t, _ = decode(base_engine, prompts, [params() for _ in prompts])
        result.setdefault("base", []).append(n / t)
        adapter_of = [i % k for i in range(args.batch)]
        n, t, mixed_tokens = decode(mixed_engine, prompts, [params(f"adapter-{a}") for a in adapter_of])
        result.setdefault("mixed", []).append(n / t)
        total_n, total_t, separate_tokens = 0, 0.0, {}
        for a, engine in enumerate(separate_engines):
            mine = [i for i in range(args.batch) if adapter_of[i] == a]
            n, t, toks = decode(engine, [prompts[i] for i in mine], [params() for _ in mine])
            total_n, total_t = total_n + n, total_t + t
            separate_tokens.update(zip(mine, toks))
        result.setdefault("separate", []).append(total_n / total_t)
        mismatched = [i for i in range(args.batch) if mixed_tokens[i] != separate_tokens[i]]
        if mismatched:
            raise SystemExit(f"k={k}: mixed-batch tokens differ from the merged model's for sequences {mismatched}")
    for side in ("base", "mixed", "separate"):
        result[side] = sorted(result[side])[len(result[side]) // 2]  # median tokens/s
    base_bytes = weight_bytes(model)
    result["mixed_bytes"] = base_bytes + mixed_engine.lora.stack_bytes
    result["separate_bytes"] = k * base_bytes
    result["base_bytes"] = base_bytes
    return result


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for side, marker in (("base", "s"), ("mixed", "o"), ("separate", "^")):
        left.plot(ks, [r[side] for r in results], marker=marker, label=side)
    left.set(xscale="log", xlabel="adapters k", ylabel="decode tokens / s", title="throughput, one batch")
    left.set_xticks(ks, [str(k) for k in ks])
    left.legend()
    for side, marker in (("mixed_bytes", "o"), ("separate_bytes", "^")):
        right.plot(ks, [r[side] / 2 ** 20 for r in results], marker=marker, label=side.replace("_bytes", ""))
    right.set(xscale="log", yscale="log", xlabel="adapters k", ylabel="weights held (MiB)", title="memory")
    right.set_xticks(ks, [str(k) for k in ks])
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint to use as the base; default: a random GPT")
    parser.add_argument("--layers", type=int, default=4, help="random base: layers")
    parser.add_argument("--width", type=int, default=256, help="random base: width (heads of 64)")
    parser.add_argument("--ks", default="1,4,16", help="numbers of adapters, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per sequence")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a busy CPU)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="directory for results.json and the plot")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = base_model(args)
    results = []
    for k in [int(x) for x in args.ks.split(",")]:
        r = run_k(model, k, args)
        results.append(r)
        print(f"k={k:3d}  base {r['base']:8.1f} tok/s   mixed {r['mixed']:8.1f} tok/s ({r['mixed'] / r['base']:.2f}x base)"
              f"   separate {r['separate']:8.1f} tok/s ({r['separate'] / r['base']:.2f}x base)   weights: mixed "
              f"{r['mixed_bytes'] / 2 ** 20:.0f} MiB, separate {r['separate_bytes'] / 2 ** 20:.0f} MiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/bench_multi_lora.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                      for k, v in vars(args).items() if k != "out" and v is not None),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
            "params": sum(p.numel() for p in model.parameters())}
    (args.out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    plot(results, args.out / "multi_lora.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'multi_lora.png'}")


if __name__ == "__main__":
    main()
