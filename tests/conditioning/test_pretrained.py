"""Saving a policy in Hugging Face's layout and loading it back (``save_pretrained`` / ``from_pretrained``): the same
greedy tokens and log-probabilities in every mode, peft-loadable LoRA adapters, plain merged models, and a saved
directory treated as untrusted input."""

import json
import sys

import pytest
import torch
from policy_helpers import MODES, PROMPTS, perturb
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.conditioning.pretrained import CLP_CONFIG, CONDITIONING_WEIGHTS

ROUND_TRIP = {
    "none": ConditioningConfig(),
    "prompt": ConditioningConfig(prompt=True),
    **MODES,
    "alpha": ConditioningConfig(prompt=True, condition_on_alpha=True, mode="mixing", options={"targets": "logits"}),
}
W = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])


def trained_like(arch: str, conditioning: ConditioningConfig, seed: int = 0) -> ConditionalPolicy:
    """A tiny policy whose copies / adapters differ and whose shared parameters moved from their initial values."""
    policy = perturb(ConditionalPolicy.from_pretrained(f"tiny:{arch}", 2, conditioning, seed=seed), seed=seed)
    with torch.no_grad():
        shared = [p for n, p in policy.model.named_parameters() if "layer_norm" in n or "ln_" in n or "norm" in n]
        shared[0].add_(0.1)
    return policy


def outputs(policy: ConditionalPolicy) -> tuple[list[str], list[torch.Tensor]]:
    """Greedy texts and their log-probabilities ``(B, T_w)`` at each weighting of ``W``."""
    alpha = torch.full((len(PROMPTS),), 0.1) if policy.conditioning.condition_on_alpha else None
    texts, logps = [], []
    for w in W:
        rows = w.expand(len(PROMPTS), -1)
        enc = policy.encode(PROMPTS, rows, alpha)
        ids, mask = policy.generate(**enc, weights=rows, alpha=alpha, do_sample=False, max_new_tokens=6)
        texts += policy.tokenizer.batch_decode(ids * mask)
        with torch.no_grad():
            logps.append(policy(**enc, response_ids=ids, response_mask=mask, weights=rows, alpha=alpha).log_probs)
    return texts, logps


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", sorted(ROUND_TRIP))
def test_a_saved_policy_generates_exactly_as_before(arch, mode, tmp_path):
    policy = trained_like(arch, ROUND_TRIP[mode])
    written = policy.save_pretrained(str(tmp_path), ["short", "long"], {"note": "kept"})
    assert {"config.json", "model.safetensors", "generation_config.json", CLP_CONFIG, CONDITIONING_WEIGHTS} <= set(
        written)
    loaded = ConditionalPolicy.from_pretrained(str(tmp_path))  # nothing but the directory
    assert loaded.num_objectives == 2 and loaded.objective_names == ["short", "long"]
    assert loaded.conditioning.stored() == policy.conditioning.stored() and loaded.metadata == {"note": "kept"}
    (texts, logps), (texts_back, logps_back) = outputs(policy), outputs(loaded)
    assert texts_back == texts
    assert same(logps_back, logps)


@pytest.mark.parametrize("mode", ["logits", "lora", "prompt+attention"])
def test_llama_round_trip(mode, tmp_path):
    policy = trained_like("llama", ROUND_TRIP[mode])
    policy.save_pretrained(str(tmp_path))
    loaded = ConditionalPolicy.from_pretrained(str(tmp_path))
    (texts, logps), (texts_back, logps_back) = outputs(policy), outputs(loaded)
    assert texts_back == texts and same(logps_back, logps)


def test_settings_come_from_the_directory_and_may_be_overridden(tmp_path):
    policy = ConditionalPolicy.from_pretrained("tiny:t5", 2, MODES["logits"], max_prompt_length=7)
    policy.save_pretrained(str(tmp_path))
    assert ConditionalPolicy.from_pretrained(str(tmp_path)).max_prompt_length == 7
    overridden = ConditionalPolicy.from_pretrained(str(tmp_path), 2, MODES["logits"], max_prompt_length=9)
    assert overridden.max_prompt_length == 9


def test_lora_adapters_load_one_at_a_time_with_peft(arch, tmp_path):
    from peft import PeftModel

    policy = trained_like(arch, MODES["lora"])
    policy.save_pretrained(str(tmp_path))
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    for i in range(2):
        base = auto.from_pretrained(str(tmp_path))
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapters" / f"objective_{i}")).eval()
        w = torch.eye(2)[i]
        expected = policy.generate_text(PROMPTS, w, do_sample=False, max_new_tokens=6)
        enc = policy.encode(PROMPTS)  # no prompt conditioning here: the plain prompts
        out = peft_model.generate(**enc, do_sample=False, max_new_tokens=6)
        got = out[:, enc["input_ids"].shape[1]:] if arch == "gpt2" else out[:, 1:]
        assert policy.tokenizer.batch_decode(got, skip_special_tokens=True) == expected


@pytest.mark.parametrize("mode", ["all", "lora"])
def test_merged_model_saves_as_a_plain_transformers_model(arch, mode, tmp_path):
    """GPT-2's Conv1D layers stay Conv1D and an output layer mixed apart from the input embedding stays apart."""
    policy = trained_like(arch, MODES[mode])
    w = [0.7, 0.3]
    policy.merged_model(w).save_pretrained(str(tmp_path))
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    plain = auto.from_pretrained(str(tmp_path), use_safetensors=True).eval()
    enc = policy.encode(PROMPTS)
    out = plain.generate(**enc, do_sample=False, max_new_tokens=6)
    got = out[:, enc["input_ids"].shape[1]:] if arch == "gpt2" else out[:, 1:]
    assert policy.tokenizer.batch_decode(got, skip_special_tokens=True) == policy.generate_text(
        PROMPTS, w, do_sample=False, max_new_tokens=6)


# ------------------------------------------------------------------------------------------ arguments disagreeing


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    ConditionalPolicy.from_pretrained("tiny:t5", 2, MODES["logits"]).save_pretrained(str(directory))
    return directory


def test_a_registered_mode_named_by_its_dotted_path_loads_back(tmp_path):
    """A mode of one's own selected by its dotted path (which imports and registers it) is saved under its registered
    name, the only name a saved policy may give, and loads back with or without the config that named it."""
    from mode_helpers import RegisteredMixing

    conditioning = ConditioningConfig(mode="mode_helpers.RegisteredMixing", options={"targets": "logits"})
    policy = trained_like("gpt2", conditioning)
    policy.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / CLP_CONFIG).read_text())["conditioning"]["mode"] == "test_registered_mixing"
    for given in (None, conditioning, ConditioningConfig(mode="test_registered_mixing", options={"targets": "logits"})):
        loaded = ConditionalPolicy.from_pretrained(str(tmp_path), conditioning=given)
        assert type(loaded.mode) is RegisteredMixing
        assert same(outputs(policy)[1], outputs(loaded)[1])


def test_num_objectives_or_conditioning_that_disagree_are_refused(saved):
    with pytest.raises(ValueError, match="holds a policy of 2 objectives .* num_objectives=3"):
        ConditionalPolicy.from_pretrained(str(saved), 3)
    with pytest.raises(ValueError, match=r"conditioned with \{'options': \{'targets': 'logits'\}\}.*'attention'"):
        ConditionalPolicy.from_pretrained(str(saved), 2, MODES["attention"])
    assert ConditionalPolicy.from_pretrained(str(saved), 2, MODES["logits"]).num_objectives == 2


def test_a_plain_model_still_needs_num_objectives():
    with pytest.raises(ValueError, match="num_objectives is required for 'tiny:t5'"):
        ConditionalPolicy.from_pretrained("tiny:t5")


# -------------------------------------------------------------------------------------------------- untrusted input


def copy_of(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "copy")
    return tmp_path / "copy"


def edit_config(directory, **changes):
    record = json.loads((directory / CLP_CONFIG).read_text())
    for key, value in changes.items():
        target, _, field = key.rpartition(".")
        (record[target] if target else record)[field] = value
    (directory / CLP_CONFIG).write_text(json.dumps(record))


def test_the_mode_is_chosen_by_registered_name_only(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    edit_config(directory, **{"conditioning.mode": "json.tool.Anything"})
    sys.modules.pop("json.tool", None)
    with pytest.raises(ValueError, match="unknown conditioning mode 'json.tool.Anything'.*registered modes"):
        ConditionalPolicy.from_pretrained(str(directory))
    assert "json.tool" not in sys.modules  # nothing was imported on the file's word


@pytest.mark.parametrize("changes, message", [
    ({"format_version": 99}, "newer clp-lightning"),
    ({"num_objectives": "2"}, "'num_objectives' must be a positive integer"),
    ({"objective_names": ["a"]}, "'objective_names' must be a list of 2 names"),
    ({"conditioning.code": "x"}, "unknown fields ['code']"),
    ({"format": "other"}, "is not a saved CLP policy"),
    ({"conditioning.prompt": "false"}, "conditioning.prompt must be true or false, got 'false'"),  # not a true flag
    ({"conditioning.prompt_precision": "2"}, "conditioning.prompt_precision must be an integer >= 0"),
    ({"conditioning.alpha_scale": float("nan")}, "conditioning.alpha_scale must be a number > 0 or null"),
])
def test_malformed_clp_config_is_named(saved, tmp_path, changes, message):
    directory = copy_of(saved, tmp_path)
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=None) as err:
        ConditionalPolicy.from_pretrained(str(directory))
    assert message in str(err.value)


def test_weights_load_from_safetensors_only(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    state = AutoModelForSeq2SeqLM.from_pretrained(str(directory)).state_dict()
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        ConditionalPolicy.from_pretrained(str(directory))


def test_remote_code_in_the_directory_does_not_run(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    marker = tmp_path / "marker"
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSeq2SeqLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import T5Config as EvilConfig\n"
                                       "from transformers import T5ForConditionalGeneration as EvilModel\n")
    ConditionalPolicy.from_pretrained(str(directory))
    assert not marker.exists()
