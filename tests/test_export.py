"""``clp export`` end to end: a tiny fit -> export -> ``ConditionalPolicy.from_pretrained`` (or plain ``transformers``)
-> the same greedy outputs as the checkpoint's module (the path ``clp steer`` takes); the card and the evaluation;
bad inputs refused before any model loads."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import TINY_CONFIG, clp, write_config

from clp_lightning.cli import main
from clp_lightning.conditioning.config import PolicyConfig
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.steer import load_module

# within the runs' max_prompt_length (32): a plain model is given the whole prompt, the policy its last 32 tokens
PROMPTS = ["my soup is too salty\n\nTL;DR:", "a post about bikes"]
W = [[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]]


def fit(tmp, policy: dict, evaluation: bool) -> tuple[str, str]:
    """A one-step tiny run; with ``evaluation``, a grid evaluation writes ``<tmp>/evaluation/latest.json``."""
    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["init_args"]["policy"].update(policy)
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp / "checkpoints"), "save_last": True}}]
    trainer = {"default_root_dir": str(tmp), "callbacks": callbacks}
    if evaluation:
        callbacks.append({"class_path": "clp_lightning.callbacks.GridEvaluation", "init_args": {
            "grid_step": 0.5, "sample_prompts": 1, "generation": {"do_sample": False, "max_new_tokens": 4}}})
        trainer.update(limit_val_batches=1, val_check_interval=1, check_val_every_n_epoch=None,
                       num_sanity_val_steps=0)
    path = write_config(tmp / "config.yaml", config, **trainer)
    main(["fit", "--config", str(path)])
    return str(path), str(tmp / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """Tiny T5, logits conditioning, with a grid evaluation next to its checkpoint."""
    return fit(tmp_path_factory.mktemp("t5_run"), {}, evaluation=True)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """Tiny GPT-2, prompt + LoRA conditioning, no evaluation."""
    return fit(tmp_path_factory.mktemp("gpt2_run"), {
        "model_name_or_path": "tiny:gpt2",
        "conditioning": {"prompt": True, "mode": "lora", "options": {"r": 2, "target_modules": "all"}}},
        evaluation=False)


def module_texts(module, weights) -> list[str]:
    """Greedy responses of the checkpoint's module at each weighting, through its evaluation path (clp steer's)."""
    from clp_lightning.config import GenerationSettings

    out = module.evaluate_weightings({"prompt": PROMPTS}, torch.tensor(weights),
                                     GenerationSettings(do_sample=False, max_new_tokens=6), score=False)
    return out["texts"]


def loaded_texts(policy: ConditionalPolicy, weights) -> list[str]:
    return [t for w in weights for t in policy.generate_text(PROMPTS, w, do_sample=False, max_new_tokens=6)]


def assert_same_policy(loaded: ConditionalPolicy, module) -> None:
    """The loaded policy holds the checkpoint's weights, each objective's copy or adapter where it was. A one-step
    tiny run answers greedily with the same text at every weighting, so equal texts alone would pass a policy whose
    conditioning was lost or whose objectives were swapped."""
    state, expected = loaded.model.state_dict(), module.policy.model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    conditioned = module.policy.mode.conditioned_state(module.policy.model)
    per_objective = {n: t for n, t in conditioned.items() if "objective_" not in n}  # mixing: (m, ...) copies
    assert all(not torch.equal(t[0], t[1]) for t in per_objective.values())
    lora_b = [(t, conditioned[n.replace("objective_0", "objective_1")]) for n, t in conditioned.items()
              if ".lora_B.objective_0." in n]
    assert per_objective or (lora_b and all(not torch.equal(a, b) for a, b in lora_b))  # the objectives differ


def test_export_and_load_generate_as_the_checkpoint(t5_run, tmp_path, capsys):
    config, ckpt = t5_run
    out = tmp_path / "exported"
    code, err = clp(capsys, "export", "--config", config, "--ckpt_path", ckpt, "--out", str(out))
    assert code == 0, err[-2000:]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "clp_config.json",
            "conditioning.safetensors", "evaluation.json", "front.png", "README.md"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    report = json.loads((out / "evaluation.json").read_text())
    assert report == json.loads((Path(ckpt).parent.parent / "evaluation" / "latest.json").read_text())
    assert report["objectives"] == ["brevity", "length"] and len(report["grid"]) == 3

    policy = ConditionalPolicy.from_pretrained(str(out))
    module = load_module([config], ckpt, [])
    assert loaded_texts(policy, W) == module_texts(module, W)
    assert_same_policy(policy, module)

    card = (out / "README.md").read_text()
    front_matter = card.split("---")[1]
    for line in ("library_name: clp-lightning", "  - clp", "  - multi-objective", "  - steerable",
                 "pipeline_tag: text2text-generation"):
        assert line in front_matter
    assert "SyntheticTLDRDataModule" in card and "clp_lightning.rewards.LengthReward" in card
    assert "![Pareto front](front.png)" in card and "| 1.00,0.00 |" in card
    assert f"Hypervolume: {report['hypervolume']:.4g}" in card and "Vertex gains" in card
    assert "ConditionalPolicy.from_pretrained" in card and "--weights" in card


def test_export_of_a_causal_lora_policy_without_evaluation(gpt2_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, ckpt = gpt2_run
    out = tmp_path / "exported"
    code, err = clp(capsys, "export", "--config", config, "--ckpt_path", ckpt, "--out", str(out))
    assert code == 0, err[-2000:]
    assert not (out / "evaluation.json").exists()
    card = (out / "README.md").read_text()
    assert "No grid evaluation was found" in card and "pipeline_tag: text-generation" in card
    assert "adapters/objective_1/" in card

    policy = ConditionalPolicy.from_pretrained(str(out))
    module = load_module([config], ckpt, [])
    assert loaded_texts(policy, W) == module_texts(module, W)
    assert_same_policy(policy, module)
    # one adapter through peft alone is the policy at that objective's vertex (prompt prefix included)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out)),
                                           str(out / "adapters" / "objective_0")).eval()
    enc = module.policy.encode(PROMPTS, torch.tensor([[1.0, 0.0]] * 2))
    ids = peft_model.generate(**enc, do_sample=False, max_new_tokens=6)[:, enc["input_ids"].shape[1]:]
    assert policy.tokenizer.batch_decode(ids, skip_special_tokens=True) == module_texts(module, [[1.0, 0.0]])


def test_export_at_one_weighting_is_a_plain_model(t5_run, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    config, ckpt = t5_run
    out = tmp_path / "plain"
    code, err = clp(capsys, "export", "--config", config, "--ckpt_path", ckpt, "--weights", "0.3,0.7",
                    "--out", str(out))
    assert code == 0, err[-2000:]
    assert not (out / "clp_config.json").exists() and (out / "README.md").exists()
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    texts = tok.batch_decode(model.generate(**enc, do_sample=False, max_new_tokens=6)[:, 1:], skip_special_tokens=True)
    module = load_module([config], ckpt, [])
    assert texts == module_texts(module, [[0.3, 0.7]])
    # greedy tokens do not see a scale on the logits; sampling does. transformers 5 forces T5's tie_word_embeddings
    # and reads a saved False as "do not scale the decoder output", so the exported logits are compared themselves
    merged, start = module.policy.merged_model([0.3, 0.7]), torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc, decoder_input_ids=start).logits,
                                   merged(**enc, decoder_input_ids=start).logits)


def test_export_at_one_weighting_with_a_prompt_prefix_runs_in_a_pipeline(gpt2_run, tmp_path, capsys):
    from transformers import GenerationConfig, pipeline

    config, ckpt = gpt2_run
    out = tmp_path / "plain"
    code, err = clp(capsys, "export", "--config", config, "--ckpt_path", ckpt, "--weights", "0.25,0.75",
                    "--out", str(out))
    assert code == 0, err[-2000:]
    prefix = GenerationConfig.from_pretrained(str(out)).clp_prompt_prefix
    assert prefix == "<w 0.25,0.75> " and f"```text\n{prefix}\n```" in (out / "README.md").read_text()
    pipe = pipeline("text-generation", model=str(out), tokenizer=str(out))
    texts = []
    for p in PROMPTS:  # token ids: a random byte-level model's text may cut UTF-8 where the prompt ends
        ids = pipe(prefix + p, do_sample=False, max_new_tokens=6, return_tensors=True)[0]["generated_token_ids"]
        texts.append(pipe.tokenizer.decode(ids[len(pipe.tokenizer(prefix + p)["input_ids"]):],
                                           skip_special_tokens=True))
    module = load_module([config], ckpt, [])
    assert texts == module_texts(module, [[0.25, 0.75]])
    # the greedy texts are the same at every weighting after one step: the log-probabilities of a response tell the
    # weighting apart, from the policy's own adapters (not the merge the export does) against the plain model's
    response = pipe.tokenizer(" a short reply", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for p in PROMPTS:
            want, swapped = (module.policy(**module.policy.encode([p], torch.tensor([w])), response_ids=response,
                                           response_mask=torch.ones_like(response), weights=torch.tensor([w])).log_probs
                             for w in ([0.25, 0.75], [0.75, 0.25]))
            ids = torch.cat([module.policy.encode([p], torch.tensor([[0.25, 0.75]]))["input_ids"], response], 1)
            logits = pipe.model(ids).logits[:, -response.shape[1] - 1:-1]
            got = torch.log_softmax(logits.float(), -1).gather(-1, response[..., None])[..., 0]
            torch.testing.assert_close(got, want, rtol=0, atol=3e-6)  # measured 5e-7; objectives swapped: 3e-5
            assert (swapped - want).abs().max() > 1e-4  # the other weighting is told apart at this tolerance


def test_overwrite_replaces_a_previous_export(t5_run, tmp_path, capsys):
    config, ckpt = t5_run
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, err = clp(capsys, "export", "--config", config, "--ckpt_path", ckpt, "--out", str(out), "--overwrite",
                    "--weights", "1,0")
    assert code == 0, err[-2000:]
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    # readable by others as the umask allows, though written in an owner-only temporary directory
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}


# ------------------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def no_model(monkeypatch):
    import clp_lightning.steer as steer

    def refuse(*args, **kwargs):
        raise AssertionError("clp export loaded a model before refusing the input")

    monkeypatch.setattr(steer, "load_module", refuse)
    monkeypatch.setattr(PolicyConfig, "build", refuse)


ALPHA_SET = ["--set=--model.init_args.policy.conditioning={prompt: true, condition_on_alpha: true}",
             "--set=--model.init_args.alpha_range=[0.05, 0.5]"]


def alpha_conditioned(ckpt: str, tmp_path: Path) -> str:
    """A copy of the checkpoint that records prompt + alpha conditioning (the config then needs ``ALPHA_SET``): an
    alpha-conditioned checkpoint for checks that refuse the input before its weights are read."""
    from clp_lightning.conditioning.config import ConditioningConfig

    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["clp"]["conditioning"] = ConditioningConfig(prompt=True, condition_on_alpha=True, mode="mixing",
                                                           options={"targets": "logits"}).stored()
    torch.save(checkpoint, tmp_path / "alpha.ckpt")
    return str(tmp_path / "alpha.ckpt")


@pytest.mark.parametrize("case, message", [
    ("missing_ckpt", "not found"),
    ("other_mode", "was trained with conditioning {'options': {'targets': 'logits'}}, the config has "
                   "{'options': {'targets': 'attention'}}"),
    ("other_objectives", "was trained with objectives ['brevity', 'length'], the config has ['brevity', 'size']"),
    ("existing_out", "exists and is not empty: choose another directory or pass --overwrite"),
    ("out_is_file", "is a file, not a directory"),
    ("out_holds_config", "holds the --config"),
    ("out_is_the_base_model", "holds the base model"),  # a warm start's directory: --overwrite replaced it
    ("out_is_the_base_model_under_home", "holds the base model"),  # named "~/...": compared as "./~/..."
    ("bad_weights", "sums to 1.1, expected 1"),
    ("weights_count", "has 3 entries, expected 2 (one per objective)"),
    ("alpha_unconditioned", "--alpha 0.1 given, but the policy is not conditioned on alpha"),
    ("alpha_without_weights", "--alpha 0.1 applies only with --weights"),
    ("alpha_out_of_range", "--alpha=0.9 is outside alpha_range [0.05, 0.5]"),
    ("missing_evaluation", "--evaluation 'nowhere.json' not found"),
    ("logit_mixture", "the config evaluates with decoding='logit_mixture', which neither export format keeps"),
    # untrusted checkpoint fields: a TypeError from len(7), and a late ValueError after the model had loaded
    ("tampered_objectives", "was trained with objectives 7, the config has ['brevity', 'length']"),
    ("tampered_step", "has global_step 'x'; expected an integer >= 0"),
    # the warm start's config beside the RL checkpoint: an AttributeError traceback once the model had loaded
    ("sft_config", "the config's model is 'clp_lightning.sft.SFTModule', not a CLP run's"),
])
def test_bad_inputs_are_one_line_errors_before_any_model_loads(t5_run, tmp_path, capsys, no_model, case, message,
                                                              monkeypatch):
    config, ckpt = t5_run
    out = tmp_path / "out"
    extra = []
    if case == "missing_ckpt":
        ckpt = str(tmp_path / "missing.ckpt")
    elif case == "other_mode":
        extra = ["--set=--model.init_args.policy.conditioning.options={targets: attention}"]
    elif case == "other_objectives":
        renamed = yaml.safe_load(Path(config).read_text())
        renamed["model"]["init_args"]["rewards"][1]["init_args"]["name"] = "size"
        config = str(tmp_path / "renamed.yaml")
        Path(config).write_text(yaml.safe_dump(renamed))
    elif case == "existing_out":
        out.mkdir()
        (out / "x").write_text("")
    elif case == "out_is_file":
        out.write_text("")
    elif case == "out_holds_config":  # --overwrite would delete the config the export has just read
        out.mkdir()
        config = str(out / "run.yaml")
        Path(config).write_text(Path(t5_run[0]).read_text())
        extra = ["--overwrite"]
    elif case == "out_is_the_base_model":
        out.mkdir()
        (out / "config.json").write_text("{}")
        extra = ["--overwrite", f"--set=--model.init_args.policy.model_name_or_path={out}"]
    elif case == "out_is_the_base_model_under_home":
        monkeypatch.setenv("HOME", str(tmp_path))
        out.mkdir()
        (out / "config.json").write_text("{}")
        extra = ["--overwrite", "--set=--model.init_args.policy.model_name_or_path=~/out"]
    elif case == "bad_weights":
        extra = ["--weights", "0.5,0.6"]
    elif case == "weights_count":
        extra = ["--weights", "0.2,0.3,0.5"]
    elif case == "alpha_unconditioned":
        extra = ["--weights", "1,0", "--alpha", "0.1"]
    elif case == "alpha_without_weights":
        extra = ["--alpha", "0.1"]
    elif case == "alpha_out_of_range":
        ckpt, extra = alpha_conditioned(ckpt, tmp_path), ["--weights", "1,0", "--alpha", "0.9", *ALPHA_SET]
    elif case == "missing_evaluation":
        extra = ["--evaluation", "nowhere.json"]
    elif case == "logit_mixture":  # an evaluation-only baseline: the exported policy would generate otherwise
        extra = ["--set=--model.init_args.decoding=logit_mixture"]
    elif case.startswith("tampered_"):
        checkpoint = torch.load(ckpt, weights_only=True)
        if case == "tampered_objectives":
            checkpoint["clp"]["objective_names"], extra = 7, ["--weights", "1,0"]
        else:
            checkpoint["global_step"] = "x"
        ckpt = str(tmp_path / "tampered.ckpt")
        torch.save(checkpoint, ckpt)
    elif case == "sft_config":
        config = str(tmp_path / "sft.yaml")
        Path(config).write_text(yaml.safe_dump({"model": {"class_path": "clp_lightning.sft.SFTModule", "init_args": {
            "policy": {"model_name_or_path": "tiny:t5"}}}}))
        extra = ["--weights", "1,0"]
    code, err = clp(capsys, "export", "--config", config, "--ckpt_path", ckpt, "--out", str(out), *extra)
    lines = [line for line in err.splitlines() if line.startswith("clp: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert message in lines[0]
    kept = ("existing_out", "out_is_file", "out_holds_config", "out_is_the_base_model",
            "out_is_the_base_model_under_home")
    assert not (out.exists() and case not in kept)
    if case == "out_holds_config":
        assert Path(config).exists()


def test_export_at_one_weighting_drops_the_base_generation_configs_processors(tmp_path):
    """The policy never applies a penalty, n-gram ban or beam search of its base's generation config (Qwen2.5-Instruct
    ships a repetition penalty, summarisation checkpoints beams): the plain model's greedy output is the policy's."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clp_lightning.export import export_weighting

    policy = PolicyConfig("tiny:gpt2").build(2).eval()
    policy.model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1)
    facts = {"base_model": "tiny:gpt2", "data": {"class": None, "source": {}}, "training": {}, "rewards": []}
    export_weighting(SimpleNamespace(policy=policy, objective_names=["a", "b"]), tmp_path, [0.3, 0.7], None, facts)
    model, tok = AutoModelForCausalLM.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    enc = tok(PROMPTS[:1], return_tensors="pt")
    ids = model.generate(**enc, do_sample=False, max_new_tokens=12)[:, enc["input_ids"].shape[1]:]
    want = policy.generate_text(PROMPTS[:1], [0.3, 0.7], do_sample=False, max_new_tokens=12)
    assert tok.batch_decode(ids, skip_special_tokens=True) == want
    generation = (tmp_path / "README.md").read_text().split("## Generation", 1)[1].split("## Training", 1)[0]
    assert "decodes greedily: its outputs are the policy's" in generation
    assert "`repetition_penalty` 5.0, `no_repeat_ngram_size` 1. " in generation


def test_export_at_one_weighting_of_a_beam_search_base_saves_a_valid_generation_config(tmp_path):
    """A summarisation base ships beams with beam-only settings (bart-large-cnn: num_beams 4, early_stopping,
    length_penalty 2): with the beams turned off, transformers refuses to save those settings, so they go too."""
    from types import SimpleNamespace

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from clp_lightning.export import export_weighting

    base = PolicyConfig("tiny:t5").build(2)
    base.model.generation_config.update(num_beams=4, early_stopping=True, length_penalty=2.0, do_sample=True,
                                        temperature=0.7, top_k=20)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    policy = PolicyConfig(str(tmp_path / "base")).build(2).eval()
    facts = {"base_model": "t5", "data": {"class": None, "source": {}}, "training": {}, "rewards": []}
    out = tmp_path / "out"
    export_weighting(SimpleNamespace(policy=policy, objective_names=["a", "b"]), out, [0.3, 0.7], None, facts)
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    assert model.generation_config.num_beams == 1
    enc = tok(PROMPTS[:1], return_tensors="pt")
    ids = model.generate(**enc, do_sample=False, max_new_tokens=12)
    want = policy.generate_text(PROMPTS[:1], [0.3, 0.7], do_sample=False, max_new_tokens=12)
    assert tok.batch_decode(ids, skip_special_tokens=True) == want
    # the card describes the saved artifact: the base's sampling that generate() still does by default, and the
    # beam settings it no longer does (not the base's settings as if they applied)
    card = (out / "README.md").read_text()
    generation = card.split("## Generation", 1)[1].split("## Training", 1)[0]
    assert "samples (temperature 0.7, top_k 20)" in generation and "`do_sample=False`" in generation
    assert "`num_beams` 4, `early_stopping` true, `length_penalty` 2.0. " in generation
    assert "turns them off" in generation and "repetition_penalty" not in generation  # the base never set it


@pytest.mark.parametrize("mode", ["mixing", "prompt"])
def test_export_at_one_weighting_of_a_chat_policy_tells_how_to_prompt_it(tmp_path, mode):
    """An instruct policy only ever saw its prompts as the user turn of the chat template, after its system message:
    the card's own example must prompt the plain model that way, and then gives the policy's greedy outputs. With
    prompt conditioning the example writes ``prefix + prompt`` as one string, which this tokenizer (byte-level BPE)
    tokenizes with the prefix's trailing space merged into the prompt's first word: so must the policy."""
    from types import SimpleNamespace

    from fixtures.gguf_model import write_tiny_llama_gguf

    from clp_lightning.conditioning.config import ConditioningConfig
    from clp_lightning.export import export_weighting

    gguf, _ = write_tiny_llama_gguf(tmp_path / "gguf")
    conditioning = (ConditioningConfig(mode="mixing", options={"targets": "logits"}) if mode == "mixing"
                    else ConditioningConfig(prompt=True))
    policy = ConditionalPolicy.from_pretrained(str(gguf), 2, conditioning,
                                               cache_dir=str(tmp_path / "cache"), chat_template=True,
                                               system_prompt="You summarise news.").eval()
    facts = {"base_model": str(gguf), "data": {"class": None, "source": {}}, "training": {}, "rewards": []}
    out = tmp_path / "out"
    export_weighting(SimpleNamespace(policy=policy, objective_names=["a", "b"]), out, [0.3, 0.7], None, facts)
    card = (out / "README.md").read_text()
    code = card.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "apply_chat_template" in code and "You summarise news." in code
    prompt = "the fox jumps over the dog"
    scope = {}
    exec(code.replace("path/to/this/directory", str(out)).replace("<your prompt>", prompt)
         .replace("max_new_tokens=48", "max_new_tokens=6, do_sample=False"), scope)
    response = scope["out"][:, scope["ids"]["input_ids"].shape[1]:]
    assert scope["tokenizer"].batch_decode(response, skip_special_tokens=True) == policy.generate_text(
        [prompt], [0.3, 0.7], do_sample=False, max_new_tokens=6)
