"""Public exception types (also available as ``scmlm.InputError`` etc.)."""

from ._errors import DesignError, EstimabilityError, InputError, ScmlmError

__all__ = ["DesignError", "EstimabilityError", "InputError", "ScmlmError"]
