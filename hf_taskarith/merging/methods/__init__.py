"""Built-in merge methods; importing this package registers them all."""

from . import (  # noqa: F401
    breadcrumbs, dare, della, iso, linear, magnitude_prune, task_arithmetic, ties, tsv,
)
