"""The checkpoint of a time-capped experiment: named modules and optimisers, the step, the seconds spent and
the loss log, written atomically, so that a run stopped at any moment resumes from its last save and its cap
counts the seconds already spent."""

import os

import torch


def resume(path: str, **states) -> tuple[int, float, list]:
    """Load each named module's or optimiser's state from `path`, where it exists: (step, seconds spent, log)."""
    if not os.path.exists(path):
        return 0, 0.0, []
    saved = torch.load(path, weights_only=False)
    for name, obj in states.items():
        obj.load_state_dict(saved[name])
    return saved["step"], saved["spent"], saved["log"]


def save(path: str, step: int, spent: float, log: list, **states) -> None:
    torch.save({**{name: obj.state_dict() for name, obj in states.items()}, "step": step, "spent": spent,
                "log": log}, path + ".tmp")
    os.replace(path + ".tmp", path)
