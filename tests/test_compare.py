"""``clp compare``, the front figure and the quick-start summary read reports with and without the sampled-evaluation
keys (``rewards_se``, ``kl_se``, ``per_prompt_rewards``, ...): a report of an older version still reads, and its
greedy log-ratio is never shown as a KL."""

import json
import math

import pytest
import torch
from cli_helpers import clp

from clp_lightning.callbacks.grid_evaluation import grid_report
from clp_lightning.compare import compare, comparison_table, overlay_figure
from clp_lightning.evaluation import hypervolume, mean_and_standard_error
from clp_lightning.evaluation.plots import front_figure
from clp_lightning.evaluation.reports import sampled_kl
from clp_lightning.quickstart import print_summary

GRID = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])


def new_report(shift: float = 0.0) -> dict:
    """A report built by grid_report from per-prompt rows (G=3, P=6, m=2), everything moved up by ``shift``."""
    steps = torch.arange(6, dtype=torch.float64)
    per_prompt = torch.stack([torch.stack([0.2 * g + 0.05 * steps, 1.0 - 0.3 * g + 0.1 * (steps % 3)], -1)
                              for g in range(3)]) + shift  # (G, P, m)
    rewards, rewards_se = mean_and_standard_error(per_prompt, dim=1)
    kl = torch.tensor([0.5, 0.2, 0.7], dtype=torch.float64)
    return grid_report(["relevance", "brevity"], GRID.double(), rewards, kl, torch.tensor([0.0, 0.5]),
                       torch.tensor([-1.0, -1.0]), ref_point_from="config", epoch=0, step=10,
                       rewards_se=rewards_se, kl_se=kl / 10, per_prompt_rewards=per_prompt, prompts_sha256="ab" * 32,
                       evaluation={"generation": {"do_sample": False}, "num_samples": 1, "kl_samples": 4})


def old_report() -> dict:
    """A report as versions before sampled evaluation wrote it: ``kl`` was the greedy responses' log-ratio."""
    keys = ("rewards_se", "kl_se", "per_prompt_rewards", "prompts_sha256", "evaluation")
    return {k: v for k, v in new_report().items() if k not in keys}


def test_new_keys_come_in_a_fixed_order_and_are_optional():
    report = new_report()
    assert list(report)[:8] == ["epoch", "step", "objectives", "grid", "rewards", "rewards_se", "kl", "kl_se"]
    assert list(report)[-4:] == ["prompts_sha256", "per_prompt_rewards", "samples", "parameters"]
    assert "rewards_se" not in old_report() and list(old_report())[4:6] == ["rewards", "kl"]
    assert sampled_kl(report) == math.fsum([0.5, 0.2, 0.7]) / 3 and math.isnan(sampled_kl(old_report()))


def test_comparison_table_gives_kl_intervals_and_the_paired_difference():
    table = comparison_table([new_report(), new_report(shift=0.1), old_report()], ["a", "b", "old"], 200)
    head, _, a, b, old = (line.split(" | ") for line in table.splitlines()[:5])  # then the reference point
    assert head[0] == "| run" and head[-3:] == ["KL", "HV 95% CI", "HV - a (95% CI) |"]
    assert a[-3] == "0.467" and a[-2].startswith("[") and a[-1] == "n/a |"  # no difference to itself
    difference = float(b[-1].split(" ")[0])
    low, high = (float(x) for x in b[-1].split("[")[1].split("]")[0].split(","))
    assert difference > 0 and low > 0  # b is a moved up in both objectives, on the same prompts
    assert difference == pytest.approx(float(b[1]) - float(a[1]), abs=2e-4)  # the two hypervolumes' difference
    # paired, prompt by prompt: b's rows are a's plus 0.1, so the prompts' spread, which makes each run's own
    # interval wide, cancels (resampled unpaired, the difference's interval is wider than either run's)
    a_low, a_high = (float(x) for x in a[-2].strip("[]").split(","))
    assert low <= difference <= high and high - low < 0.25 * (a_high - a_low)
    assert old[-3:] == ["n/a", "n/a", "n/a |"]  # an old report: no KL, no interval, no pairing
    assert overlay_figure([new_report(), old_report()], ["new", "old"]) is not None


def test_the_table_names_its_reference_point_and_refuses_to_hide_different_ones(two_reports, tmp_path, capsys):
    # two runs measured from different points (e.g. ref_point null: each run's own reference policy): their
    # hypervolumes side by side would compare areas from different corners without a word
    same = comparison_table([new_report(), new_report(shift=0.1)], ["a", "b"], 20)
    assert same.splitlines()[-1] == "Hypervolumes from (-1, -1) (config)."
    other = {**new_report(shift=0.1), "ref_point": [0.0, 0.0], "ref_point_from": "reference policy"}
    other["hypervolume"] = hypervolume(torch.tensor(other["rewards"]), torch.tensor([0.0, 0.0]))
    differ = comparison_table([new_report(), other], ["a", "b"], 20)
    assert differ.splitlines()[-1].startswith("Hypervolumes from each run's own reference point, and these differ "
                                              "(a (-1, -1); b (0, 0)): hypervolumes from different points are not "
                                              "comparable")
    assert differ.splitlines()[-3].endswith("| n/a |")  # no paired difference across points
    # --ref-point measures both from one point: the same rewards, comparable hypervolumes, paired again
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    out = compare([two_reports[0], str(path), "--labels", "a", "b", "--ref-point", "-2,-2"])
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    for (_, hv, *_), report in zip(rows, (new_report(), other)):
        want = hypervolume(torch.tensor(report["rewards"], dtype=torch.float64), torch.tensor([-2.0, -2.0]))
        assert float(hv) == pytest.approx(want, abs=1e-4)
    assert rows[1][-1] != "n/a |" and "Hypervolumes from (-2, -2) (--ref-point)." in out
    code, err = clp(capsys, "compare", *two_reports, "--ref-point", "0")
    assert code == 2 and "ref_point [0.0] has 1 values; the report has 2 objectives" in err


def test_the_table_says_when_the_runs_were_evaluated_differently():
    # greedy against sampled decoding (or 32 against 48 new tokens) compared side by side without a word
    same = comparison_table([new_report(), new_report(shift=0.1), old_report()], ["a", "b", "old"], 20)
    assert same.splitlines()[-1].startswith("Hypervolumes from")  # the same settings, or none recorded: no line
    sampled = new_report(shift=0.1)
    sampled["evaluation"] = {**sampled["evaluation"], "generation": {"do_sample": True}, "num_samples": 4}
    line = comparison_table([new_report(), sampled, old_report()], ["a", "b", "old"], 20).splitlines()[-1]
    assert line == ("The runs were evaluated differently (generation.do_sample: a False, b True; num_samples: a 1, "
                    "b 4): their numbers are not measured the same way; clp validate with one config measures them "
                    "alike.")


def test_front_figure_and_summary_read_old_and_new_reports(capsys):
    for report in (new_report(), old_report()):
        assert len(front_figure(report).axes) == 1
        print_summary(report)
    out = capsys.readouterr().out
    assert out.count("mean reward per objective") == 2
    assert out.count("KL to the reference") == 1  # only the new report has a sampled KL
    assert "(1, 0) 0.700 ± 0.070" in out  # w = (1, 0) is the grid's last point


def test_overlay_of_more_runs_than_colours_keeps_every_run_distinct():
    reports = [new_report(shift=0.01 * k) for k in range(12)]
    figure = overlay_figure(reports, [f"run{k}" for k in range(12)])
    lines = [line for line in figure.axes[0].get_lines() if line.get_label().startswith("run")]
    styles = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(lines) == 12 and len(styles) == 12  # the 11th and 12th runs are dashed, not the 1st's colour again


@pytest.fixture
def two_reports(tmp_path):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"r{k}.json")
        paths[-1].write_text(json.dumps(new_report(shift=0.1 * k)))
    return [str(p) for p in paths]


@pytest.mark.parametrize("case, message", [
    ("parent_is_a_file", "--output directory"),  # and which flag to change, not a run's config keys
    ("a_directory", "is a directory; name the figure file to write"),
    ("unknown_format", "cannot write a figure as 'pnx'; expected one of the extensions"),
])
def test_a_bad_output_is_refused_before_the_tables_are_computed(two_reports, tmp_path, capsys, monkeypatch, case,
                                                                message):
    import clp_lightning.compare as compare

    def refuse(*args, **kwargs):
        raise AssertionError("the tables were computed before the bad --output was refused")

    monkeypatch.setattr(compare, "comparison_table", refuse)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output = {"parent_is_a_file": blocker / "front.png", "a_directory": tmp_path,
              "unknown_format": tmp_path / "front.pnx"}[case]
    code, err = clp(capsys, "compare", *two_reports, "--output", str(output))
    lines = [line for line in err.splitlines() if line.startswith("clp: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    if case == "parent_is_a_file":
        assert lines[0].endswith("choose another --output")


def test_the_figure_replaces_the_old_one_only_once_complete(two_reports, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    output = tmp_path / "front.png"
    code, err = clp(capsys, "compare", *two_reports, "--output", str(output))
    assert code == 0, err[-2000:]
    old = output.read_bytes()
    assert old.startswith(b"\x89PNG")

    def interrupted(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clp(capsys, "compare", *two_reports, "--output", str(output))
    assert output.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front.png", "r0.json", "r1.json"]  # no temporary file


def test_a_file_that_is_not_a_report_is_named(tmp_path):
    # a results.json or a config given by mistake failed with a bare KeyError 'objectives' and a traceback; a file
    # that is not JSON with a message that did not say which file
    (tmp_path / "results.json").write_text(json.dumps({"summary": {}, "variants": {}}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(new_report()))
    for name, what in (("results.json", "it has no"), ("list.json", "it has no"), ("config.yaml", "it is not JSON")):
        with pytest.raises(ValueError, match=f"{name}' is not a grid-evaluation report: {what}"):
            compare([str(good), str(tmp_path / name)])


@pytest.mark.parametrize("field, value, message", [
    ("steerability", {"relevance": 1.0}, "steerability {'relevance': 1.0} does not give a number for each objective"),
    ("rewards", [[1.0], [2.0], [3.0]], "rewards is not 3 rows (one per grid weighting) of 2 finite numbers"),
    ("grid", [[0.0, 1.0], [1.0, 0.0]], "rewards is not 2 rows"),  # 3 rewards for 2 weightings
    ("hypervolume", "big", "hypervolume 'big' is not a number"),
    ("objectives", "ab", "objectives 'ab' is not a list of distinct names"),
    ("reference_rewards", [0.0], "reference_rewards [0.0] is not 2 finite numbers"),
    ("per_prompt_rewards", [[[1.0, 2.0]], [[1.0, 2.0], [3.0]]], "per_prompt_rewards is not 3 lists"),
    ("kl", "x", "kl is not 3 numbers"),
    ("parameters", [1], "parameters [1] is not a dict"),
    ("ref_point", None, "it has per_prompt_rewards but no ref_point"),  # None: the field left out
    # null (NaN) where a hypervolume needs a number: hypervolume's message named neither the file nor the field
    ("ref_point", [None, 0.0], "ref_point [nan, 0.0] is not 2 finite numbers"),
    ("reference_rewards", [None, 0.0], "reference_rewards [nan, 0.0] is not 2 finite numbers"),
    ("per_prompt_rewards", [[[None, 1.0]] * 6] * 3, "per_prompt_rewards is not 3 lists"),
])
def test_a_malformed_report_is_named_with_its_field(tmp_path, capsys, field, value, message):
    # a report is untrusted input: these failed with a KeyError, IndexError, TypeError or a torch message deep in the
    # table or the figure, naming neither the file nor the field
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(new_report()))
    report = {**new_report(), field: value}
    if value is None:
        del report[field]
    bad.write_text(json.dumps(report))
    code, err = clp(capsys, "compare", str(good), str(bad), "--output", str(tmp_path / "front.png"))
    lines = [line for line in err.splitlines() if line.startswith("clp: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert f"{str(bad)!r} is not a well-formed grid-evaluation report: {message}" in lines[0]
    assert not (tmp_path / "front.png").exists()


def test_the_overlay_shows_each_runs_reference_policy_when_they_differ():
    # runs from different warm starts (or prompts): the first run's reference policy was drawn as "reference policy"
    # for all of them
    other = {**new_report(shift=0.1), "reference_rewards": [0.3, 0.9]}
    labels = [collection.get_label() for collection in overlay_figure([new_report(), other], ["a", "b"]).axes[0]
              .collections]
    assert labels == ["a: reference policy", "b: reference policy"]
    same = overlay_figure([new_report(), new_report(shift=0.1)], ["a", "b"]).axes[0].collections
    assert [c.get_label() for c in same] == ["reference policy"]
    assert same[0].get_offsets().tolist() == [new_report()["reference_rewards"]]


def test_the_table_says_when_the_runs_were_evaluated_on_different_grids():
    # a front through 2 weightings against one through 3: different hypervolumes even from one policy, shown side by
    # side without a word (and unpaired, so with no other sign)
    coarse = {**new_report(shift=0.1), "grid": [[0.0, 1.0], [1.0, 0.0]]}
    coarse["rewards"] = [coarse["rewards"][0], coarse["rewards"][2]]
    del coarse["per_prompt_rewards"]
    lines = comparison_table([new_report(), coarse], ["a", "b"], 20).splitlines()
    assert lines[-1] == ("The runs were evaluated on different grids of weightings (a 3 weightings; b 2 weightings): "
                         "their hypervolumes and steerabilities are not measured the same way; clp validate with one "
                         "config measures them alike.")
    assert lines[-2].startswith("Hypervolumes from")
    assert comparison_table([new_report(), new_report(shift=0.1)], ["a", "b"], 20).splitlines()[-1].startswith(
        "Hypervolumes from")


def test_runs_of_other_objectives_are_named(tmp_path, capsys):
    # the same objectives in another order are other columns; the message named the objective lists, not the runs
    swapped = {**new_report(), "objectives": ["brevity", "relevance"]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, report in zip(paths, (new_report(), swapped)):
        path.write_text(json.dumps(report))
    code, err = clp(capsys, "compare", *map(str, paths), "--labels", "a", "b")
    assert code == 2 and ("the runs have different objectives (a ['relevance', 'brevity']; b ['brevity', "
                          "'relevance']): their columns would not line up") in err


def test_a_figure_of_one_objective_is_refused_before_the_tables(tmp_path, capsys, monkeypatch):
    # a run of one reward has a report but no front to draw: matplotlib's "Number of columns must be a positive
    # integer, not 0" came after the tables' bootstrap
    import clp_lightning.compare as compare_module

    report = grid_report(["only"], torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([0.1]),
                         torch.tensor([0.0]), torch.tensor([-1.0]), ref_point_from="config", epoch=0, step=3)
    path = tmp_path / "one.json"
    path.write_text(json.dumps(report))
    assert compare([str(path), "--labels", "one"]).splitlines()[2].startswith("| one | 1.5000 |")  # the table reads it
    monkeypatch.setattr(compare_module, "comparison_table", lambda *a: pytest.fail("the tables came first"))
    code, err = clp(capsys, "compare", str(path), "--output", str(tmp_path / "front.png"))
    assert code == 2 and "--output: a figure of fronts needs 2 or more objectives; these runs have ['only']" in err
