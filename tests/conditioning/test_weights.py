import numpy as np
import pytest
import torch

from clp_lightning.conditioning.prompt import PromptConditioner
from clp_lightning.conditioning.weights import (
    DirichletSampler,
    FixedSampler,
    OneHotSampler,
    parse_weights,
    simplex_grid,
    validate_weights,
)
from clp_lightning.config import SamplerConfig


def test_validate_accepts_vector_batch_and_string():
    assert validate_weights([0.3, 0.7]).tolist() == pytest.approx([0.3, 0.7])
    assert validate_weights("0.25, 0.75", 2).tolist() == [0.25, 0.75]
    batch = validate_weights(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), 2)
    assert batch.shape == (2, 2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([0.2, 0.3, 0.5], "has 3 entries, expected 2"),
        ([1.2, -0.2], "negative"),
        ([float("nan"), 1.0], "NaN"),
        ([0.4, 0.4], "sums to 0.8"),
        ([0.3, 0.69], "sums to 0.99"),  # a rounding slip of 0.01 is no point on the simplex either
        ([[0.5, 0.5], [0.9, 0.3]], "[0.9, 0.3] sums to 1.2"),
        ([[[0.5, 0.5]]], "shape"),
    ],
)
def test_validate_rejects_with_the_value(value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_weights(value, 2)


def test_parse_weights_error_names_text():
    assert parse_weights("0.3,0.7") == [0.3, 0.7]
    with pytest.raises(ValueError, match="'0.3;0.7'"):
        parse_weights("0.3;0.7")


def test_grid_sizes_and_order():
    grid2 = simplex_grid(2, 0.1)
    assert grid2.shape == (11, 2)
    assert torch.allclose(grid2[:, 0], torch.linspace(0, 1, 11))
    grid3 = simplex_grid(3, 0.25)
    assert grid3.shape == (15, 3)
    assert torch.allclose(grid3.sum(-1), torch.ones(15))
    assert len({tuple(r) for r in grid3.tolist()}) == 15
    with pytest.raises(ValueError, match="0.3 does not divide 1"):
        simplex_grid(2, 0.3)


@pytest.mark.parametrize(("m", "step"), [(1, 0.5), (2, 1.0), (3, 0.1), (4, 0.25), (5, 0.5)])
def test_grid_is_every_lattice_point_of_the_simplex_in_lexicographic_order(m, step):
    import itertools
    import math

    n = round(1 / step)
    cube = [c for c in itertools.product(range(n + 1), repeat=m) if sum(c) == n]  # the definition, brute force
    grid = simplex_grid(m, step)
    assert grid.shape == (math.comb(n + m - 1, m - 1), m)
    assert torch.equal(grid, torch.tensor(cube, dtype=torch.float64).div(n).float())


def test_a_grid_of_many_objectives_is_built_from_its_points_alone():
    # 8 objectives at step 0.1: 19448 points out of a cube of 11^8 = 214 million candidates
    grid = simplex_grid(8, 0.1)
    assert grid.shape == (19448, 8) and torch.allclose(grid.sum(-1), torch.ones(19448))


def test_dirichlet_deterministic_on_simplex_and_concentration():
    sampler = DirichletSampler(3, 1.0)
    a = sampler.sample(500, torch.Generator().manual_seed(1))
    b = sampler.sample(500, torch.Generator().manual_seed(1))
    c = sampler.sample(500, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    validate_weights(a, 3)
    assert a.mean(0).tolist() == pytest.approx([1 / 3] * 3, abs=0.04)
    skewed = DirichletSampler(2, [8.0, 2.0]).sample(2000, torch.Generator().manual_seed(0))
    assert skewed[:, 0].mean().item() == pytest.approx(0.8, abs=0.02)  # mean of Dirichlet = a_i / sum(a)
    sharp = DirichletSampler(2, 100.0).sample(200, torch.Generator().manual_seed(0))
    assert sharp.std(0).max() < 0.06
    with pytest.raises(ValueError, match="concentration"):
        DirichletSampler(2, [1.0, -1.0])


def test_one_hot_and_fixed():
    rows = OneHotSampler(3).sample(300, torch.Generator().manual_seed(0))
    assert torch.equal(rows.sum(-1), torch.ones(300)) and set(rows.argmax(-1).tolist()) == {0, 1, 2}
    assert OneHotSampler(3, index=1).sample(2).tolist() == [[0, 1, 0], [0, 1, 0]]
    assert torch.allclose(FixedSampler("0.2,0.8").sample(2), torch.tensor([[0.2, 0.8]] * 2))
    with pytest.raises(ValueError, match=r"fixed weighting \[0.5, 0.5\] has 2 entries, expected 3"):
        SamplerConfig(kind="fixed", weights=[0.5, 0.5]).build(3)
    with pytest.raises(ValueError, match="unknown sampler kind 'uniform'"):
        SamplerConfig(kind="uniform").build(2)
    with pytest.raises(ValueError, match="'fixed' needs weights"):
        SamplerConfig(kind="fixed").build(2)
    assert SamplerConfig(kind="one_hot", index=1).build(3).sample(1).tolist() == [[0, 1, 0]]


@pytest.mark.parametrize(("make", "message"), [
    (lambda: DirichletSampler(2, True), r"concentration True must be a positive number or 2 of them \(not bools"),
    (lambda: DirichletSampler(2, [1.0, False]), r"concentration \[1.0, False\] must be .*not bools"),
    (lambda: SamplerConfig(concentration=True).build(3), r"concentration True must be .* or 3 of them \(not bools"),
    # a string was split into characters: "could not convert string to float: '.'"
    (lambda: DirichletSampler(2, "1.0"), r"concentration '1.0' must be .*not bools or text"),
    (lambda: OneHotSampler(3, index=True), r"one-hot index True must be an int \(the objective's position\) or None"),
    (lambda: OneHotSampler(3, index=1.0), r"one-hot index 1.0 must be an int"),
    (lambda: OneHotSampler(True), r"num_objectives must be an int >= 1, got True"),
])
def test_a_bool_is_not_taken_for_a_number(make, message):
    # concentration=True used to be Dirichlet(1, ..., 1) and index=True objective 1, without a word
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("weights", [[True, False], [[0.5, 0.5], [True, False]], torch.tensor([True, False]),
                                     np.array([False, True]), (1.0, False)])
def test_a_weighting_of_bools_is_refused(weights):
    # [True, False] (a YAML `[true, false]`) used to pass as the weighting (1, 0)
    with pytest.raises(ValueError, match="contains bools"):
        validate_weights(weights, 2)
    with pytest.raises(ValueError, match="contains bools"):
        FixedSampler([True, False])


@pytest.mark.parametrize("config, message", [
    (SamplerConfig(index=1), r"sampler index=1 is only read by kind 'one_hot', and kind is 'dirichlet'"),
    (SamplerConfig(kind="one_hot", weights=[1.0, 0.0]), r"weights=\[1.0, 0.0\] is only read by kind 'fixed'"),
    (SamplerConfig(kind="fixed", weights=[1.0, 0.0], index=0), r"index=0 is only read by kind 'one_hot'"),
])
def test_a_sampler_field_of_another_kind_is_refused_not_ignored(config, message):
    # `--model.init_args.sampler.index=1` over a Dirichlet config would otherwise train a CLP policy, not expert 1
    with pytest.raises(ValueError, match=message):
        config.build(2)


def test_prompt_prefixes_with_and_without_alpha():
    cond = PromptConditioner(precision=3)
    w = torch.tensor([[0.125, 0.875], [1.0, 0.0]])
    assert cond.prefixes(w) == ["<w 0.125,0.875> ", "<w 1.000,0.000> "]
    assert cond.prefixes(w[:1], torch.tensor([0.05])) == ["<w 0.125,0.875 | kl 0.05> "]
    custom = PromptConditioner(template="[objectives {weights}] ", separator=" ")
    assert custom.prefix([0.3, 0.7]) == "[objectives 0.30 0.70] "
    with pytest.raises(ValueError, match="'{weights}' field"):
        PromptConditioner(template="<w> ")
