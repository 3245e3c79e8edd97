"""Exception types. Every message names the offending key, column, layer or value and says how to fix it."""

from __future__ import annotations


class ScmlmError(Exception):
    """Base class of all errors raised by scmlm on purpose."""


class InputError(ScmlmError, ValueError):
    """The input data (AnnData, obs column, layer, file) cannot be used as given."""


class DesignError(InputError):
    """The model formula or contrast cannot be built from the data."""


class EstimabilityError(DesignError):
    """The design is rank-deficient or the contrast is not estimable."""


def _fmt_list(values, limit: int = 20) -> str:
    values = [str(v) for v in values]
    if len(values) > limit:
        return ", ".join(repr(v) for v in values[:limit]) + f", … ({len(values) - limit} more)"
    return ", ".join(repr(v) for v in values)
