"""One-GPU measurements for an H100 / H200 in under 8 minutes (bench/gpu.sh runs this); ``--dry-run`` runs every
part on CPU with tiny shapes so the script itself is tested without a GPU (tests/test_train_parallel_bench.py).

    python bench/bench_gpu.py --out runs/bench_gpu            # on the GPU machine
    python bench/bench_gpu.py --dry-run --out runs/bench_dry  # anywhere: same code paths, tiny shapes

Parts, each timed after warm-up steps, written to OUT/results.json and OUT/results.md:
1. train: gpt2-124m shapes, B32 x T1024, bf16 autocast, torch.compile: tokens/s and MFU
   (tokens/s x model.flops_per_token / peak bf16 FLOP/s of the device, lmstack.train.loop.PEAK_BF16_FLOPS);
2. fsdp_1b: a ~1B Llama-style model (24 x 2048) through lmstack.train.parallel with FSDP2 on one process group
   of size 1 and full activation checkpointing: tokens/s, MFU, peak memory;
3. decode: the 124M model's greedy decode tokens/s at batch 1 and 32 with a KV cache (lmstack.engine),
   and MBU (bytes of weights + KV read per step x steps/s / peak memory bandwidth);
4. parity: compiled training loss and logits against eager on the same batch (max abs difference).
Caveats: one GPU only; FSDP on one process shows the wrapper's overhead, not sharding's memory savings.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s (SXM)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(n_layer: int, n_embd: int, n_head: int, vocab: int, block: int, gpt2: bool):
    from lmstack.models.gpt import GPT, GPTConfig

    extra = dict(norm="layernorm", activation="gelu", position="learned", bias=True, tie_embeddings=True) if gpt2 else {}
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_kv_head=n_head,
                         n_embd=n_embd, **extra))


def _train_speed(model, B: int, T: int, steps: int, device, dtype, compile_model: bool, warmup: int = 2) -> dict:
    from lmstack.train.loop import peak_flops

    model.to(device)
    run = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            began = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    tokens_per_second = B * T * steps / (time.perf_counter() - began)
    peak = peak_flops(device)
    result = {"tokens_per_second": tokens_per_second, "loss": float(loss)}
    if peak:
        result["mfu"] = tokens_per_second * model.flops_per_token(T) / peak
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def part_train(shapes, device, dtype, compile_model) -> dict:
    torch.manual_seed(0)
    return _train_speed(_model(**shapes["small"], gpt2=True), shapes["B"], shapes["T"], shapes["steps"], device,
                        dtype, compile_model)


def part_fsdp(shapes, device, dtype) -> dict:
    """The ~1B model with lmstack.train.parallel's FSDP2 (a mesh of one process) and full activation checkpointing."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmstack.train.parallel import model_blocks
    from lmstack.train.parallel.ac import apply_activation_checkpointing
    from lmstack.train.parallel.fsdp import apply_fsdp

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = _model(**shapes["large"], gpt2=False)
    model.to(device)
    apply_activation_checkpointing(model_blocks(model), "full")
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))
    apply_fsdp(model, model_blocks(model), mesh, device, dtype)
    result = _train_speed(model, shapes["B_large"], shapes["T"], shapes["steps"], device, dtype, compile_model=False, warmup=1)
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


@torch.no_grad()
def part_decode(shapes, device, dtype) -> dict:
    """Greedy decode with the engine's KV cache: tokens/s and MBU (weight bytes read per step / peak bandwidth)."""
    from lmstack.engine.kv_cache import KVCache

    torch.manual_seed(0)
    model = _model(**shapes["small"], gpt2=True).to(device=device, dtype=dtype if device.type == "cuda" else torch.float32).eval()
    out = {}
    for batch in (1, shapes["decode_batch"]):
        cache = KVCache.for_model(model, batch, shapes["T"])
        idx = torch.randint(0, model.config.vocab_size, (batch, 8), device=device)
        logits, _ = model(idx, kv_cache=cache, logits_to_keep=1)
        steps = shapes["decode_steps"]
        _sync(device)
        began = time.perf_counter()
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits, _ = model(nxt, kv_cache=cache, logits_to_keep=1)
        _sync(device)
        seconds = time.perf_counter() - began
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        row = {"tokens_per_second": batch * steps / seconds}
        peak = next((v for k, v in PEAK_BANDWIDTH.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
        if peak:
            row["mbu"] = weight_bytes * steps / seconds / peak
        out[f"batch_{batch}"] = row
    return out


def part_parity(shapes, device, dtype) -> dict:
    torch.manual_seed(0)
    model = _model(**shapes["small"], gpt2=True).to(device).eval()
    x = torch.randint(0, model.config.vocab_size, (2, shapes["T"] + 1), device=device)
    with torch.no_grad():
        eager_logits, eager_loss = model(x[:, :-1], x[:, 1:])
        compiled_logits, compiled_loss = torch.compile(model)(x[:, :-1], x[:, 1:])
    return {"loss_abs_diff": abs(float(eager_loss) - float(compiled_loss)),
            "logits_max_abs_diff": float((eager_logits - compiled_logits).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_gpu", help="results directory (default: runs/bench_gpu)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, to test the script")
    parser.add_argument("--parts", default="train,fsdp_1b,decode,parity", help="comma-separated parts to run")
    args = parser.parse_args()
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = {"small": dict(n_layer=2, n_embd=64, n_head=4, vocab=256, block=64),
                  "large": dict(n_layer=2, n_embd=64, n_head=4, vocab=256, block=64),
                  "B": 2, "B_large": 2, "T": 32, "steps": 2, "decode_batch": 4, "decode_steps": 4}
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = {"small": dict(n_layer=12, n_embd=768, n_head=12, vocab=50304, block=1024),
                  "large": dict(n_layer=24, n_embd=2048, n_head=16, vocab=32000, block=1024),
                  "B": 32, "B_large": 8, "T": 1024, "steps": 20, "decode_batch": 32, "decode_steps": 128}
    parts = {"train": lambda: part_train(shapes, device, dtype, compile_model=not args.dry_run),
             "fsdp_1b": lambda: part_fsdp(shapes, device, dtype),
             "decode": lambda: part_decode(shapes, device, dtype),
             "parity": lambda: part_parity(shapes, device, dtype)}
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
               "dry_run": args.dry_run, "torch": torch.__version__}
    for name in args.parts.split(","):
        began = time.perf_counter()
        try:
            results[name] = parts[name]()
        except Exception as e:  # one part failing must not lose the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        results[name]["seconds"] = round(time.perf_counter() - began, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| part | result |", "|---|---|"] + [f"| {k} | {json.dumps(v)} |" for k, v in results.items()
                                                  if isinstance(v, dict)]
    (out / "results.md").write_text(f"device: {results['device']}\n\n" + "\n".join(lines) + "\n")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
