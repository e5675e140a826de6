"""CNN/DailyMail news summarisation (``abisee/cnn_dailymail``, config ``3.0.0``) as prompts."""

from __future__ import annotations

import string
from typing import Any

from clp_lightning.checks import is_integer
from clp_lightning.data.base import SummarizationDataModule, clean_text, skip_row, truncate_words


class CNNDailyMailDataModule(SummarizationDataModule):
    """CNN/DailyMail articles as prompts, ``source`` = the (truncated) article, ``reference`` = the highlights.

    Args:
        path: Hub id or local directory with columns ``article``, ``highlights``, ``id``.
        name: Hub configuration.
        prompt_template: Format string with an ``{article}`` field, e.g. ``"summarize: {article}"`` for T5.
        max_article_chars: Truncate longer articles at a word boundary before formatting; ``None`` keeps all.
        truncation_marker: Appended to a truncated article (counted in ``max_article_chars``); ``""`` for none.
        join_highlights: Join the newline-separated highlight sentences with spaces; ``False`` keeps the
            newlines (what ``rougeLsum`` splits sentences on).
        **kwargs: Loading, split and loader options of ``SummarizationDataModule``.
    """

    def __init__(
        self,
        path: str | None = "abisee/cnn_dailymail",
        name: str | None = "3.0.0",
        prompt_template: str = "{article}\n\nTL;DR:",
        max_article_chars: int | None = None,
        truncation_marker: str = "...",
        join_highlights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(path=path, name=name, **kwargs)
        if not isinstance(join_highlights, bool):  # the string "false" is true
            raise ValueError(f"join_highlights must be true or false, got {join_highlights!r}")
        for arg, value in [("prompt_template", prompt_template), ("truncation_marker", truncation_marker)]:
            if not isinstance(value, str):  # failed as an AttributeError or TypeError, or after loading
                raise ValueError(f"{arg} must be a string, got {value!r}")
        try:  # fail here, not after loading hundreds of thousands of rows
            prompt_template.format(article="")
            # The fields str.format fills: "{{article}}" is the literal text "{article}", not a field, and a prompt
            # made from it would hold no article at all.
            fields = [field for _, field, _, _ in string.Formatter().parse(prompt_template) if field is not None]
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt_template must have only an {{article}} field, got {prompt_template!r}") from err
        if "article" not in fields:
            raise ValueError(f"prompt_template has no {{article}} field: {prompt_template!r}")
        # a float failed in the formatting's slice
        if max_article_chars is not None and not is_integer(max_article_chars):
            raise ValueError(f"max_article_chars must be an integer (or null for whole articles), got "
                             f"{max_article_chars!r}")
        if max_article_chars is not None and max_article_chars <= len(truncation_marker):
            raise ValueError(f"max_article_chars must exceed the marker length, got {max_article_chars}")
        self.prompt_template = prompt_template
        self.max_article_chars = max_article_chars
        self.truncation_marker = truncation_marker
        self.join_highlights = join_highlights

    def _schema(self, columns: list[str], split: str) -> tuple[list[str], dict[str, Any]]:
        return ["article", "highlights"], {
            "template": self.prompt_template,
            "max_chars": self.max_article_chars,
            "marker": self.truncation_marker,
            "join": self.join_highlights,
        }

    @staticmethod
    def convert_row(
        row: dict[str, Any], template: str, max_chars: int | None, marker: str, join: bool
    ) -> dict[str, str]:
        article, reason = clean_text(row["article"], "article")
        highlights, ref_reason = clean_text(row["highlights"], "reference")
        if reason or ref_reason:
            return skip_row(reason or ref_reason)
        lines = [line.strip() for line in highlights.splitlines() if line.strip()]
        article = truncate_words(article, max_chars, marker)
        return {
            "prompt": template.format(article=article),
            "source": article,
            "reference": (" " if join else "\n").join(lines),
            "id": str(row["id"]),
            "skip": "",
        }
