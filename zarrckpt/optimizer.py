"""Optimizer: the base of trackables that keep slot variables per model variable."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from zarrckpt.errors import DependencyNameError
from zarrckpt.trackable import AutoTrackable, DeferredRestorer, Trackable
from zarrckpt.variable import Variable

__all__ = ["Optimizer"]


class Optimizer(AutoTrackable):
    """Base class for optimizer-like objects with slot variables (Adam's ``m``, ``v``).

    A slot is recorded against the variable it belongs to (TensorFlow's
    ``.OPTIMIZER_SLOT`` keys), not as a named dependency of the optimizer, so it
    restores onto the matching variable however the model and the optimizer
    are reached, and also when the slot is created after the restore.

    Example:
        >>> class Adam(Optimizer):
        ...     def apply(self, var, grad):
        ...         m = self.add_slot(var, "m")
        ...         m.assign(0.9 * m.numpy() + 0.1 * grad)
    """

    @property
    def _zc_slots(self) -> dict[str, dict[int, tuple[Trackable, Variable]]]:
        slots: dict[str, dict[int, tuple[Trackable, Variable]]]
        slots = self.__dict__.setdefault("_zc_slot_table", {})
        return slots

    @property
    def _zc_deferred_slots(self) -> dict[tuple[str, int], list[tuple[DeferredRestorer, int]]]:
        deferred: dict[tuple[str, int], list[tuple[DeferredRestorer, int]]]
        deferred = self.__dict__.setdefault("_zc_deferred_slot_table", {})
        return deferred

    def add_slot(
        self,
        var: Trackable,
        slot_name: str,
        initial_value: npt.ArrayLike | Callable[[], npt.ArrayLike] | None = None,
    ) -> Variable:
        """Return the slot ``slot_name`` of ``var``, creating it if needed.

        A new slot starts as ``initial_value`` (an array, or a callable returning
        one), or zeros shaped like ``var``. If a restore saved a value for this
        slot, the new slot receives it now.
        """
        if not isinstance(slot_name, str) or not slot_name:
            raise DependencyNameError(f"slot names must be non-empty str, got {slot_name!r}")
        existing = self._zc_slots.get(slot_name, {}).get(id(var))
        if existing is not None:
            return existing[1]
        if initial_value is None:
            if not isinstance(var, Variable):
                raise TypeError("add_slot needs initial_value for a var that is not a Variable")
            value: npt.ArrayLike = np.zeros_like(var.numpy())
        elif callable(initial_value):
            value = initial_value()
        else:
            value = initial_value
        slot = Variable(value)
        # Saved values restore into the slot before it is registered: if that
        # fails (say a shape mismatch), the optimizer is left as it was.
        pending = self._zc_deferred_slots.get((slot_name, id(var)), [])
        for restorer, node_id in pending:
            restorer.restore_deferred(node_id, slot)
        self._zc_deferred_slots.pop((slot_name, id(var)), None)
        self._zc_slots.setdefault(slot_name, {})[id(var)] = (var, slot)
        return slot

    def get_slot(self, var: Trackable, slot_name: str) -> Variable:
        """The slot ``slot_name`` of ``var``; KeyError if it was never added."""
        try:
            return self._zc_slots[slot_name][id(var)][1]
        except KeyError:
            raise KeyError(f"no slot {slot_name!r} for {var!r}") from None

    def get_slot_names(self) -> list[str]:
        """The names of the slots this optimizer has created, sorted."""
        return sorted(self._zc_slots)

    def _slot_variables(self) -> list[tuple[Trackable, str, Variable]]:
        """Every (variable, slot name, slot variable), in a deterministic order."""
        return [
            (var, slot_name, slot)
            for slot_name in sorted(self._zc_slots)
            for var, slot in self._zc_slots[slot_name].values()
        ]

    def __repr__(self) -> str:
        counts = {name: len(slots) for name, slots in sorted(self._zc_slots.items())}
        return f"<{type(self).__qualname__} slots: {counts or 'none yet'}>"

    def _defer_slot_restoration(
        self, var: Trackable, slot_name: str, restorer: DeferredRestorer, node_id: int
    ) -> None:
        """Remember a saved slot value until :meth:`add_slot` creates the slot."""
        self._zc_deferred_slots.setdefault((slot_name, id(var)), []).append((restorer, node_id))
