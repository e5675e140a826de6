"""Reddit TL;DR (the filtered SFT split of Stiennon et al. 2020) as prompts for RL, SFT and evaluation.

Three schemas are read, each normalised to one prompt format (``TLDR_TEMPLATE``):

- ``trl``: ``trl-lib/tldr``, columns ``prompt`` (already formatted) and ``completion`` (``" " + summary``);
- ``carper``: ``CarperAI/openai_summarize_tldr``, columns ``prompt`` and ``label`` (splits train / valid / test);
- ``raw``: columns ``subreddit``, ``title``, ``post``, ``summary`` (the synthetic data and hand-made files).

Pre-formatted prompts are parsed back into subreddit / title / post so that the post can be truncated and the
prompt re-formatted with the ``TL;DR:`` cue still at its end. A prompt that does not parse is skipped (counted
under ``"unparsed prompt"``) rather than kept: its post could neither be truncated safely nor serve as ``source``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from clp_lightning.checks import is_integer
from clp_lightning.data.base import SummarizationDataModule, clean_text, skip_row, truncate_words
from clp_lightning.models import split_revision

TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"

# Tolerant of the whitespace between markers (CarperAI uses single newlines); the post runs to the LAST "TL;DR:".
_PROMPT_RE = re.compile(
    r"^\s*SUBREDDIT:\s*(?:r/)?(?P<subreddit>[^\n]*?)\s*\n\s*TITLE:\s*(?P<title>.*?)\s*\n\s*POST:\s*(?P<post>.*)"
    r"\s*TL;DR:\s*$",
    re.DOTALL,
)
# The splits of a hub dataset whose names are not the defaults ("validation" is "valid" here): a wrong name failed
# only in setup, after prepare_data had downloaded every split and the model had loaded.
HUB_SPLITS = {"carperai/openai_summarize_tldr": ("train", "valid", "test")}
SCHEMAS = {
    "trl": ("prompt", "completion"),
    "carper": ("prompt", "label"),
    "raw": ("subreddit", "title", "post", "summary"),
}


def format_tldr_prompt(subreddit: str, title: str, post: str) -> str:
    """The standard TL;DR prompt; it ends with ``"TL;DR:"`` (no trailing space: the summary starts with one)."""
    return TLDR_TEMPLATE.format(subreddit=subreddit, title=title, post=post)


def detect_schema(columns: list[str]) -> str | None:
    """The first schema in ``SCHEMAS`` whose columns are all present, else ``None``."""
    return next((name for name, cols in SCHEMAS.items() if set(cols) <= set(columns)), None)


class RedditTLDRDataModule(SummarizationDataModule):
    """Reddit TL;DR prompts, ``source`` = the post, ``reference`` = the human TL;DR.

    Args:
        path: Hub id (``trl-lib/tldr`` or ``CarperAI/openai_summarize_tldr``) or a local directory.
        schema: ``"auto"`` picks the schema from the columns; or force ``"trl"``, ``"carper"`` or ``"raw"``.
        max_post_chars: Truncate longer posts at a word boundary (the prompt keeps its ``TL;DR:`` cue);
            ``None`` keeps whole posts.
        truncation_marker: Appended to a truncated post (counted in ``max_post_chars``); ``""`` for none.
        val_split: Validation split (``"valid"`` for CarperAI, whose split names are checked at construction).
        **kwargs: Loading, split and loader options of ``SummarizationDataModule``.
    """

    def __init__(
        self,
        path: str | None = "trl-lib/tldr",
        schema: Literal["auto", "trl", "carper", "raw"] = "auto",
        max_post_chars: int | None = None,
        truncation_marker: str = "...",
        val_split: str = "validation",
        **kwargs: Any,
    ) -> None:
        super().__init__(path=path, val_split=val_split, **kwargs)
        if schema not in ("auto", *SCHEMAS):
            raise ValueError(f"schema must be 'auto' or one of {list(SCHEMAS)}, got {schema!r}")
        if not isinstance(truncation_marker, str):  # failed as a TypeError, or after loading
            raise ValueError(f"truncation_marker must be a string, got {truncation_marker!r}")
        if max_post_chars is not None and not is_integer(max_post_chars):  # a float failed in the formatting's slice
            raise ValueError(f"max_post_chars must be an integer (or null for whole posts), got {max_post_chars!r}")
        if max_post_chars is not None and max_post_chars <= len(truncation_marker):
            raise ValueError(f"max_post_chars must exceed the marker length, got {max_post_chars}")
        repo = split_revision(self.path)[0].lower() if self.data_files is None and isinstance(self.path, str) else None
        if repo in HUB_SPLITS and not Path(self.path).expanduser().is_dir():
            for role, split in self.splits.items():
                # a split instruction may join splits ("train+valid") and slice them ("valid[:100]")
                names = [re.sub(r"\[.*\]\s*$", "", part).strip() for part in str(split).split("+")]
                unknown = [name for name in names if name not in HUB_SPLITS[repo]]
                if unknown:
                    raise ValueError(f"{role}_split={split!r}: {self.path!r} has no split {unknown[0]!r}; its splits "
                                     f"are {list(HUB_SPLITS[repo])}")
        self.schema = schema
        self.max_post_chars = max_post_chars
        self.truncation_marker = truncation_marker

    def _schema(self, columns: list[str], split: str) -> tuple[list[str], dict[str, Any]]:
        schema = detect_schema(columns) if self.schema == "auto" else self.schema
        if schema is None:
            expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in SCHEMAS.items())
            raise ValueError(f"Cannot detect the TL;DR schema of split {split!r} from columns {columns}; "
                             f"expected the columns of one of ({expected})")
        return list(SCHEMAS[schema]), {
            "schema": schema,
            "max_post_chars": self.max_post_chars,
            "marker": self.truncation_marker,
        }

    @staticmethod
    def convert_row(row: dict[str, Any], schema: str, max_post_chars: int | None, marker: str) -> dict[str, str]:
        if schema == "raw":
            subreddit, title = (clean_text(row[k], k)[0] for k in ("subreddit", "title"))
            # The template writes "r/" itself; a subreddit stored as "r/name" would read "r/r/name" (parsed prompts
            # drop it the same way, so every schema gives one prompt).
            subreddit = subreddit.removeprefix("r/").strip()
            post, reason = clean_text(row["post"], "post")
            # an empty or missing title or subreddit is written empty, as a parsed prompt may have it; a number or a
            # list is not text, and had been dropped from the prompt without a word
            odd = [k for k in ("subreddit", "title") if row[k] is not None and not isinstance(row[k], str)]
            reason = reason or (f"non-string {odd[0]}" if odd else "")
        else:
            prompt, reason = clean_text(row["prompt"], "prompt")
            match = _PROMPT_RE.match(prompt) if not reason else None
            if not reason and not match:
                reason = "unparsed prompt"
            if reason:
                return skip_row(reason)
            subreddit, title, post = (match[k].strip() for k in ("subreddit", "title", "post"))
            reason = "" if post else "empty post"
        reference, ref_reason = clean_text(row["summary" if schema == "raw" else SCHEMAS[schema][1]], "reference")
        if reason or ref_reason:
            return skip_row(reason or ref_reason)
        post = truncate_words(post, max_post_chars, marker)
        return {
            "prompt": format_tldr_prompt(subreddit, title, post),
            "source": post,
            "reference": reference,
            "id": str(row["id"]),
            "skip": "",
        }
