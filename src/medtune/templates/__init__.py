"""Chat templates: the one place that decides how messages become text (and, later, ids and label masks)."""

from medtune.templates.registry import TEMPLATES, ChatFormat, get_template

__all__ = ["TEMPLATES", "ChatFormat", "get_template"]
