"""The LM head at the response positions only against every position: the policy's log-prob forward and backward.

The policy and reference passes of a causal model compute the LM head only at the response positions
(``logits_to_keep``, what the RL step does); before, they computed the ``(B, S, V)`` logits over the whole prompt
and sliced the response off. This script times the policy's log-prob forward and backward (with the entropy, as the
step) both ways, on a GPT-2 with GPT-2's real vocabulary (50257), ``B = 8`` rows, a 96-token prompt and a 32-token
response, for the unconditioned (``none``) and full (``all``) policies. The RL step benchmark (``rl_step.py``) uses
the byte-level vocabulary of the ``tiny:`` models (259 tokens), where the LM head costs almost nothing, so it cannot
show this.

The two ways are paired in this one process: each repeat runs the head on the response, then the head everywhere;
the table gives each way's median time and the median of the per-repeat ratios, over ``--steps`` repeats (at least
3) after ``--warmup`` untimed ones. The last column is arithmetic, not a measurement: the float32 prompt logits and
their gradient that the head on the response does not build, ``B (S_prompt - 1) V`` floats each.

Usage (defaults in ``--help``)::

    python benchmarks/lm_head.py                                        # small and 60m GPT-2, CPU
    python benchmarks/lm_head.py --sizes tiny --warmup 0 --steps 1      # a smoke run
    python benchmarks/lm_head.py --device cuda                          # where there is a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator

from common import check_out, conditioning, machine, sync

ROWS, PROMPT, RESPONSE, VOCAB = 8, 96, 32, 50257


@contextlib.contextmanager
def head_everywhere() -> Iterator[None]:
    """Within it, the policy computes the LM head at every position and slices the response off (the old way)."""
    from clp_lightning.conditioning import lm

    keep = lm._accepts_logits_to_keep
    lm._accepts_logits_to_keep = lambda model: False  # as for a model whose forward takes no logits_to_keep
    try:
        yield
    finally:
        lm._accepts_logits_to_keep = keep


def head_step(policy, batch: dict, w, device: str) -> float:
    """Seconds of one fwd+bwd of the policy's log-probs; ``batch`` holds the policy's inputs, ``w`` is ``(B, m)``."""
    sync(device)
    start = time.perf_counter()
    policy(**batch, weights=w, return_entropy=True).log_probs.sum().backward()
    sync(device)
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def head_suite(args: argparse.Namespace) -> str:
    """The markdown table: for each of ``args.sizes`` and mode, the head on the response vs on every position."""
    import torch

    from clp_lightning.conditioning.policy import ConditionalPolicy
    from clp_lightning.models import build_byte_tokenizer, build_tiny_model

    lines = ["| size | mode | head on response (s) | head everywhere (s) | ratio | logits MB saved |",
             "|---|---|---|---|---|---|"]
    for size in args.sizes:
        for mode in ("none", "all"):
            model = build_tiny_model("gpt2", size, seed=0, vocab_size=VOCAB)
            policy = ConditionalPolicy(model, build_byte_tokenizer("causal"), 2, conditioning(mode)).to(args.device)
            g = torch.Generator().manual_seed(0)
            batch = dict(input_ids=torch.randint(3, 259, (ROWS, PROMPT), generator=g),
                         attention_mask=torch.ones(ROWS, PROMPT, dtype=torch.long),
                         response_ids=torch.randint(3, 259, (ROWS, RESPONSE), generator=g),
                         response_mask=torch.ones(ROWS, RESPONSE))
            batch = {k: v.to(args.device) for k, v in batch.items()}
            w = torch.distributions.Dirichlet(torch.ones(2)).sample((ROWS,)).to(args.device)
            pairs = []
            for _ in range(args.warmup + max(args.steps, 3)):
                on_response = head_step(policy, batch, w, args.device)
                with head_everywhere():
                    pairs.append((on_response, head_step(policy, batch, w, args.device)))
            pairs = pairs[args.warmup:]
            on_response, full = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            ratio = statistics.median(a / b for a, b in pairs)
            saved = ROWS * (PROMPT - 1) * VOCAB * 4 * 2 / 2**20  # float logits and their gradient
            lines.append(f"| {size} | {mode} | {on_response:.3f} | {full:.3f} | {ratio:.3f} | {saved:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "60m"],
                        help="GPT-2 sizes (clp_lightning.models.TINY_SIZES['gpt2']), each with the real vocabulary")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats of both ways")
    parser.add_argument("--steps", type=int, default=5, help="timed repeats of both ways (at least 3 are run)")
    parser.add_argument("--out", default=None, help="write the machine and the table to this JSON file")
    args = parser.parse_args(argv)
    if args.warmup < 0:  # pairs[-1:] would keep only the last of fewer repeats than the 3 timed ones promised
        parser.error(f"--warmup {args.warmup}: expected >= 0")
    from clp_lightning.models import TINY_SIZES

    # an unknown size failed in build_tiny_model after the sizes before it had been timed, and the table was lost
    if unknown := [s for s in args.sizes if s not in TINY_SIZES["gpt2"]]:
        parser.error(f"--sizes {' '.join(unknown)}: expected some of {', '.join(TINY_SIZES['gpt2'])}")
    check_out(parser, args.out)
    print(f"machine: {machine()}")
    results = {"machine": machine(), "argv": sys.argv, "head": head_suite(args)}
    print(f"\n### head\n\n{results['head']}\n", flush=True)
    if args.out:
        from clp_lightning.files import write_json

        write_json(args.out, results)


if __name__ == "__main__":
    main()
