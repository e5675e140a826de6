"""The warm start: its model directory is replaced only when that is safe, and only with a complete model."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from sft_helpers import first_gradients

from clp_lightning.conditioning.config import PolicyConfig
from clp_lightning.config import OptimizerConfig
from clp_lightning.data import SyntheticTLDRDataModule
from clp_lightning.sft import SFTModule


def fit(output_dir, **optimizer) -> SFTModule:
    module = SFTModule(PolicyConfig("tiny:t5", max_prompt_length=48), output_dir=output_dir, max_response_length=8,
                       optimizer=OptimizerConfig(lr=1e-3, **optimizer))
    data = SyntheticTLDRDataModule(num_train=4, num_val=2, batch_size=2, seed=0)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=data)
    return module


def test_saves_the_model_and_replaces_an_earlier_save(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    trained = fit("~/sft/model")  # ~ is the user's home, not a folder named "~"
    model = tmp_path / "sft" / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    # what was saved is the trained model, not the initial one
    from transformers import AutoModelForSeq2SeqLM

    from clp_lightning.models import build_tiny_model

    saved, initial = AutoModelForSeq2SeqLM.from_pretrained(model).state_dict(), build_tiny_model("t5").state_dict()
    assert saved.keys() == trained.policy.model.state_dict().keys()
    assert all(torch.equal(saved[n], t) for n, t in trained.policy.model.state_dict().items())
    assert not torch.equal(saved["shared.weight"], initial["shared.weight"])
    (model / "from_the_first_save.txt").write_text("x")
    fit(str(model))  # a model saved there before is replaced by the new one, as a whole
    assert (model / "config.json").is_file() and not (model / "from_the_first_save.txt").exists()
    assert sorted(p.name for p in model.parent.iterdir()) == ["model"]  # no temporary or old directory left


@pytest.mark.parametrize("contents", ["run", "file", "checkpoint"])
def test_a_directory_with_other_contents_is_refused_before_training(tmp_path, contents):
    target = tmp_path / "out"
    if contents == "file":
        target.write_text("not a directory")
        match = "is a file"
    else:
        target.mkdir()
        (target / "config.yaml").write_text("trainer: {}")  # a run directory: its config, logs, checkpoints
        (target / ("last.ckpt" if contents == "checkpoint" else "events.out.tfevents.1")).write_text("x")
        match = "holds more than a saved model"
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=match):
        SFTModule(PolicyConfig("tiny:t5"), output_dir=str(target))
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_run_without_an_end_needs_a_constant_schedule(tmp_path):
    module = SFTModule(PolicyConfig("tiny:t5"), optimizer=OptimizerConfig(schedule="cosine"))
    trainer = L.Trainer(accelerator="cpu", max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="schedule='cosine'"):
        trainer.fit(module, datamodule=SyntheticTLDRDataModule(num_train=4, num_val=2, batch_size=2, seed=0))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_targets_are_the_assistant_turn_as_the_template_writes_it():
    """With a chat template the reference is the assistant's text (no space after the header) closed by the
    template's end-of-turn token, which generation stops at, not by the tokenizer's EOS (here a different token)."""
    from clp_lightning.conditioning.policy import ConditionalPolicy

    config = PolicyConfig("tiny:gpt2", tokenizer="synthetic-bpe", max_prompt_length=48)
    module = SFTModule(config, max_response_length=16)
    model, tok = module.policy.model, module.policy.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    tok.chat_template = CHATML
    module.policy = ConditionalPolicy(model, tok, 1, chat_template=True)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tok.eos_token_id
    ids, mask = module._targets(["my bread burns"])
    assert ids[0][mask[0].bool()].tolist() == tok("my bread burns", add_special_tokens=False)["input_ids"] + [
        end_of_turn]
    # without a template the reference follows the prompt's cue after a space and ends in EOS
    plain = SFTModule(config, max_response_length=16)
    ids, mask = plain._targets(["my bread burns"])
    assert ids[0][mask[0].bool()].tolist() == tok(" my bread burns", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


@pytest.mark.parametrize("model,chat", [("tiny:t5", False), ("tiny:gpt2", False), ("tiny:gpt2", True)])
def test_a_special_token_written_in_a_reference_is_text_in_the_target(model, chat):
    """A summary that contains "</s>" (or a chat template's "<|im_end|>") was tokenised as that special token: the
    target held the stop token mid-response, teaching the policy to end there or emit a control token as content.
    It is text, as any other characters; the only special token in a target is the stop token appended last."""
    from clp_lightning.conditioning.policy import ConditionalPolicy

    module = SFTModule(PolicyConfig(model, tokenizer="synthetic-bpe", max_prompt_length=48), max_response_length=64)
    tok = module.policy.tokenizer
    if chat:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        module.policy.model.resize_token_embeddings(len(tok), mean_resizing=False)
        tok.chat_template = CHATML
        module.policy = ConditionalPolicy(module.policy.model, tok, 1, chat_template=True)
    reference = "ends here </s> <|im_end|> <pad> but goes on"
    ids, mask = module._targets([reference, "short"])
    row = ids[0][mask[0].bool()].tolist()
    assert row[-1] == module._stop_id() and not set(row[:-1]) & set(tok.all_special_ids)
    assert tok.decode(row[:-1]) == (reference if chat else " " + reference)


@pytest.mark.parametrize("where", ["root", "parent_of_root", "checkpoints"])
def test_an_output_dir_the_run_writes_into_is_refused_before_training(tmp_path, where):
    """output_dir = the run's own directory passed the construction check (it was empty then), and the final save
    refused it after all the training, for the run's logs and checkpoints there: the model was never written."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    root = tmp_path / "run" / "sft"
    output_dir = {"root": root, "parent_of_root": tmp_path / "run", "checkpoints": tmp_path / "ckpts"}[where]
    module = SFTModule(PolicyConfig("tiny:t5", max_prompt_length=48), output_dir=str(output_dir),
                       max_response_length=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, default_root_dir=root,
                        logger=TensorBoardLogger(root, name="", version=""), enable_progress_bar=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts")], enable_model_summary=False,
                        limit_val_batches=0)
    with pytest.raises(ValueError, match="output_dir .* holds"):
        trainer.fit(module, datamodule=SyntheticTLDRDataModule(num_train=4, num_val=2, batch_size=2, seed=0))
    assert trainer.global_step == 0


def test_accumulated_micro_batches_give_the_gradient_of_one_batch():
    """Every reference token weighs the same in a step: two micro-batches of 2 rows give the gradient of one batch
    of 4, not the mean of the two micro-batches' per-token means (which weighs a short reference's tokens more)."""
    (whole, _), (accumulated, _) = first_gradients(4, 1), first_gradients(2, 2)
    assert whole.keys() == accumulated.keys() and whole
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_fit_stopped_by_a_signal_does_not_publish_the_model(tmp_path, monkeypatch):
    """StopOnSignal saves a checkpoint and stops the fit; the warm start is not finished, so output_dir must not
    receive a model that reads as the finished one (``clp quickstart --skip-sft`` would reuse it). The resumed fit,
    run to its end, publishes it."""
    import signal
    from pathlib import Path

    from clp_lightning.callbacks import StopOnSignal

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "callbacks"))
    from signal_helpers import SignalAt

    def run(callbacks, ckpt_path=None):
        module = SFTModule(PolicyConfig("tiny:t5", max_prompt_length=48), output_dir=str(tmp_path / "model"),
                           max_response_length=8)
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path / "run", callbacks=callbacks)
        trainer.fit(module, datamodule=SyntheticTLDRDataModule(num_train=8, num_val=2, batch_size=2, seed=0),
                    ckpt_path=ckpt_path)
        return trainer

    stop = StopOnSignal(signals=["SIGTERM"])
    stopped = run([stop, SignalAt(batch_idx=0, signum=signal.SIGTERM)])
    assert stopped.global_step == 1 and stop.exit_code == 128 + signal.SIGTERM
    assert not (tmp_path / "model").exists()
    (checkpoint,) = (tmp_path / "run").glob("hpc_ckpt_*.ckpt")
    assert run([], ckpt_path=str(checkpoint)).global_step == 3
    assert (tmp_path / "model" / "config.json").is_file()


@pytest.mark.parametrize("value", [0, 8.0, True])
def test_a_response_length_that_is_not_an_integer_above_zero_is_refused_at_construction(value):
    # 8.0 was accepted and failed at the first training step, after the model and the data had loaded, as a
    # TypeError from the targets' slice
    with pytest.raises(ValueError, match=rf"max_response_length must be an integer >= 1, got {value!r}"):
        SFTModule(PolicyConfig("tiny:t5"), max_response_length=value)


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_an_output_dir_that_links_to_a_directory_replaces_that_directory(tmp_path):
    """publish moved the link aside and put the model in its place: the model landed beside the link, and the
    directory it points to (the one configs name through it; on another file system the rename fails with EXDEV, after
    the training) kept the old model."""
    from types import SimpleNamespace

    from clp_lightning.sft import save_pretrained_atomic

    def saver(name):
        return SimpleNamespace(save_pretrained=lambda d: (Path(d) / name).write_text("new"))

    real = tmp_path / "scratch" / "model"
    real.mkdir(parents=True)
    (real / "config.json").write_text("old")
    (tmp_path / "home").mkdir()
    link = tmp_path / "home" / "model"
    link.symlink_to(real, target_is_directory=True)
    save_pretrained_atomic(SimpleNamespace(model=saver("config.json"), tokenizer=saver("tokenizer.json")), link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "config.json").read_text() == "new" and (real / "tokenizer.json").is_file()
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["model"]  # no temporary or old directory left
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["model"]


def test_a_prompt_and_target_longer_than_a_learned_position_table_are_refused_at_construction():
    """GPT-2's learned positions (512 in tiny:gpt2) hold a truncated prompt and its target in one sequence: a longer
    pair failed as an IndexError inside the model at the first long prompt of the data, after the model and the data
    had loaded (the RL module refuses the same at construction)."""
    with pytest.raises(ValueError, match="500 prompt tokens and up to 64 new tokens need 564 positions.*"
                                         "max_response_length"):
        SFTModule(PolicyConfig("tiny:gpt2", max_prompt_length=500), max_response_length=64)
    SFTModule(PolicyConfig("tiny:gpt2", max_prompt_length=448), max_response_length=64)  # exactly fits
    SFTModule(PolicyConfig("tiny:t5", max_prompt_length=2048), max_response_length=64)  # relative positions: no table
