"""Loading a state dict into a model, or one line saying what does not fit and how to fix it."""
from __future__ import annotations

from torch import nn

from .errors import CnnlabError


def key_mismatch(expected: dict, found, optional: str | None = None) -> str | None:
    """None when the state dict ``found`` fits ``expected``, else 'missing keys: ...; unexpected
    keys: ...; other shapes: ...'. Keys that start with ``optional`` may be missing."""
    weights = found if isinstance(found, dict) else {}
    have = set(weights)
    want = set(expected)
    missing = sorted(k for k in want - have if not (optional and k.startswith(optional)))
    unexpected = sorted(have - want)
    shapes = [k for k in sorted(have & want)
              if tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    return (f"missing keys: {', '.join(missing[:4]) or 'none'}; unexpected keys: {', '.join(unexpected[:4]) or 'none'}"
            + (f"; other shapes: {', '.join(shapes[:4])}" if shapes else ""))


def load_weights_into(model: nn.Module, state, what: str, target: str, fix: str, optional: str | None = None) -> None:
    """``model.load_state_dict(state)``, or a one-line error: '``what`` does not fit ``target``
    (which keys); ``fix``'. Keys that start with ``optional`` may be missing from ``state``."""
    problem = key_mismatch(model.state_dict(), state, optional)
    if problem is None:
        try:
            model.load_state_dict(state, strict=optional is None)
            return
        except (RuntimeError, TypeError, AttributeError) as exc:
            problem = str(exc).strip().splitlines()[0][:200]
    raise CnnlabError(f"{what} does not fit {target} ({problem}); {fix}")
