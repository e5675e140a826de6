"""A :class:`~clp_lightning.conditioning.policy.ConditionalPolicy` saved in Hugging Face's layout, and loaded back
with no Lightning, no training config and no run directory.

A saved policy is a directory::

    config.json, model.safetensors, generation_config.json,   the base: a plain Hugging Face model
    tokenizer files                                           (``save_pretrained``; the mode's ``unconditioned``)
    clp_config.json                                           how the base is conditioned (below)
    conditioning.safetensors                                  the mode's own parameters (``m`` copies, adapters)
    ...                                                       the mode's extra files (LoRA-CLP: ``adapters/``)

``clp_config.json`` holds the format and its version, the model kind, ``num_objectives`` and the objectives' names,
the :class:`~clp_lightning.conditioning.config.ConditioningConfig` (mode by registered name, options, prompt
template and precision, ``condition_on_alpha``), ``max_prompt_length``, ``chat_template``, ``system_prompt`` and
``truncation_side`` (absent in older files: null), and free-form ``metadata`` (for example the KL strengths an
alpha-conditioned policy was trained on).

The directory is untrusted input: its mode is looked up among registered modes by name only (never imported from a
path), its tensors are read from safetensors files only, and ``trust_remote_code`` is whatever the caller passes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

from clp_lightning.conditioning.config import TRUNCATION_SIDES
from clp_lightning.conditioning.mode import registered_mode
from clp_lightning.files import json_text
from clp_lightning.models import PKG_PREFIX, TINY_PREFIX, load_policy_model, resolve_path, sync_tied_config

if TYPE_CHECKING:
    from clp_lightning.conditioning.config import ConditioningConfig
    from clp_lightning.conditioning.policy import ConditionalPolicy

CLP_CONFIG = "clp_config.json"
CONDITIONING_WEIGHTS = "conditioning.safetensors"
FORMAT = "clp-policy"
# raise when the meaning of clp_config.json or of the saved tensors changes; readers refuse newer versions
FORMAT_VERSION = 1


def is_saved_policy(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a local directory (or ``pkg:`` directory) holding a saved policy."""
    if name_or_path.startswith(TINY_PREFIX):
        return False
    try:
        path = Path(resolve_path(name_or_path)).expanduser()
    except FileNotFoundError:
        return False
    return (path / CLP_CONFIG).is_file() if name_or_path.startswith(PKG_PREFIX) or path.is_dir() else False


def save_policy(
    policy: ConditionalPolicy,
    directory: str | Path,
    objective_names: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> list[str]:
    """Write ``policy`` into ``directory`` (created; existing files of the same names are replaced).

    Args:
        policy: the policy to save.
        directory: where to write.
        objective_names: the ``m`` objectives' names (default: the policy's own, else ``objective_0`` ...).
        metadata: JSON-serialisable facts to keep with the policy, added to its own ``metadata`` (stored, never
            applied when loading).

    Returns:
        The files and directories written, relative to ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    m = policy.num_objectives
    names = list(objective_names or policy.objective_names or [f"objective_{i}" for i in range(m)])
    if len(names) != m:
        raise ValueError(f"got {len(names)} objective names for a policy with {m} objectives")
    base = sync_tied_config(policy.mode.unconditioned(copy.deepcopy(policy.model)))
    base.save_pretrained(str(directory))
    policy.tokenizer.save_pretrained(str(directory))
    state = {n: t.detach().contiguous().cpu() for n, t in policy.mode.conditioned_state(policy.model).items()}
    save_file(state, str(directory / CONDITIONING_WEIGHTS))
    extras = policy.mode.save_extras(policy.model, directory, policy.kind)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_kind": policy.kind,
        "architecture": type(base).__name__,
        "num_objectives": m,
        "objective_names": names,
        "conditioning": _stored(policy.conditioning),
        "conditioning_label": policy.conditioning.name,
        "max_prompt_length": policy.max_prompt_length,
        "chat_template": policy.chat is not None,
        "system_prompt": policy.system_prompt,
        "truncation_side": policy.truncation_side,
        "files": {"conditioning": CONDITIONING_WEIGHTS, "extras": extras},
        "metadata": {**policy.metadata, **(metadata or {})},
    }
    (directory / CLP_CONFIG).write_text(json_text(record, indent=2) + "\n")
    written = [p.name for p in directory.iterdir()]
    return sorted(written)


_CONDITIONING_FIELDS: dict[str, tuple[Any, str]] = {
    "prompt": (lambda v: type(v) is bool, "true or false"),
    "train_shared": (lambda v: type(v) is bool, "true or false"),
    "condition_on_alpha": (lambda v: type(v) is bool, "true or false"),
    "prompt_template": (lambda v: isinstance(v, str), "text"),
    "alpha_template": (lambda v: isinstance(v, str), "text"),
    "prompt_precision": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "alpha_scale": (lambda v: v is None or (type(v) in (int, float) and math.isfinite(v) and v > 0),
                    "a number > 0 or null"),
}


def read_clp_config(directory: str | Path) -> dict[str, Any]:
    """``clp_config.json`` of a saved policy, checked field by field (it is untrusted input).

    Raises:
        ValueError: not a saved policy of a version this code reads, or a field of the wrong type; the message
            names the field.
    """
    path = Path(directory) / CLP_CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved CLP policy (its 'format' is not {FORMAT!r})")
    version = record.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer clp-lightning (format version {version}; this version reads "
                         f"{FORMAT_VERSION}): upgrade")

    def field(name: str, check: Any, expected: str) -> Any:
        value = record.get(name)
        if not check(value):
            raise ValueError(f"{path}: field {name!r} must be {expected}, got {value!r}")
        return value

    m = field("num_objectives", lambda v: type(v) is int and v >= 1, "a positive integer")
    field("objective_names", lambda v: isinstance(v, list) and len(v) == m and all(isinstance(x, str) for x in v),
          f"a list of {m} names")
    field("max_prompt_length", lambda v: type(v) is int and v >= 1, "a positive integer")
    field("chat_template", lambda v: type(v) is bool, "true or false")
    field("system_prompt", lambda v: v is None or isinstance(v, str), "text or null")
    field("truncation_side", lambda v: v in TRUNCATION_SIDES, "'left', 'right' or null")  # absent: null
    field("model_kind", lambda v: v in ("seq2seq", "causal"), "'seq2seq' or 'causal'")
    field("metadata", lambda v: v is None or isinstance(v, dict), "an object")
    conditioning = field("conditioning", lambda v: isinstance(v, dict), "an object")
    known = {f.name for f in dataclasses.fields(_conditioning_class())}
    if set(conditioning) - known:
        raise ValueError(f"{path}: conditioning has unknown fields {sorted(set(conditioning) - known)}")
    registered_mode(conditioning.get("mode", "none"))  # by name only: a file never chooses code to import
    if not isinstance(conditioning.get("options", {}), dict):
        raise ValueError(f"{path}: conditioning.options must be an object")
    for name, (check, expected) in _CONDITIONING_FIELDS.items():  # "false" would be a true flag, "2" no precision
        if name in conditioning and not check(conditioning[name]):
            raise ValueError(f"{path}: conditioning.{name} must be {expected}, got {conditioning[name]!r}")
    record["metadata"] = record.get("metadata") or {}
    return record


def _conditioning_class() -> type[ConditioningConfig]:
    from clp_lightning.conditioning.config import ConditioningConfig

    return ConditioningConfig


def _stored(conditioning: ConditioningConfig) -> dict[str, Any]:
    """``conditioning.stored()`` naming the mode by its registered name: a mode selected by its dotted path (which
    imports and registers it) is loaded back by that name, since a saved policy never names code to import."""
    return {**conditioning.stored(), "mode": conditioning.build_mode().name}


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples as lists, as the file has them


def load_policy(
    cls: type[ConditionalPolicy],
    directory: str | Path,
    num_objectives: int | None = None,
    conditioning: ConditioningConfig | None = None,
    *,
    max_prompt_length: int | None = None,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    truncation_side: str | None = None,
    trust_remote_code: bool = False,
    torch_dtype: str | None = None,
    tokenizer: str | None = None,
) -> ConditionalPolicy:
    """Load a saved policy (see the module's docstring); ``cls.from_pretrained`` calls this for such directories.

    Args:
        cls: the policy class.
        directory: the saved policy.
        num_objectives: when given, must equal the saved one.
        conditioning: when given, must equal the saved one (options resolved); the saved one is used either way.
        max_prompt_length, chat_template, system_prompt, truncation_side: None takes the saved value; a value
            overrides it.
        trust_remote_code: run code shipped with the base model; the file never turns it on.
        torch_dtype: dtype to load the base in (default: as saved).
        tokenizer: a tokenizer to use instead of the saved one.

    Raises:
        ValueError: a malformed ``clp_config.json``, or ``num_objectives`` / ``conditioning`` that disagree with it.
    """
    directory = Path(resolve_path(str(directory))).expanduser()
    record = read_clp_config(directory)
    saved = _conditioning_class()(**record["conditioning"])
    m = record["num_objectives"]
    if num_objectives is not None and num_objectives != m:
        raise ValueError(f"{directory} holds a policy of {m} objectives {record['objective_names']}, but "
                         f"num_objectives={num_objectives} was given")
    if conditioning is not None:
        given, stored = _normalised(_stored(conditioning)), _normalised(_stored(saved))
        if given != stored:
            fields = sorted(k for k in given.keys() | stored.keys() if given.get(k) != stored.get(k))
            raise ValueError(f"{directory} holds a policy conditioned with "
                             f"{ {k: stored.get(k) for k in fields} }, but the given conditioning has "
                             f"{ {k: given.get(k) for k in fields} }: leave conditioning out to use the saved one")
    weights_file = directory / CONDITIONING_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{directory} has no {CONDITIONING_WEIGHTS}: the saved policy is incomplete")
    model, tok = load_policy_model(str(directory), trust_remote_code=trust_remote_code, torch_dtype=torch_dtype,
                                   tokenizer=tokenizer, use_safetensors=True)
    chat = record["chat_template"] if chat_template is None else chat_template
    policy = cls(model, tok, m, saved,
                 record["max_prompt_length"] if max_prompt_length is None else max_prompt_length, chat,
                 (record["system_prompt"] if chat else None) if system_prompt is None else system_prompt,
                 record.get("truncation_side") if truncation_side is None else truncation_side)
    policy.mode.load_conditioned_state(policy.model, load_file(str(weights_file), device=str(policy.device)))
    policy.objective_names = list(record["objective_names"])
    policy.metadata = dict(record["metadata"])
    return policy
