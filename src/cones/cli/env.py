"""Print versions and devices, for bug reports.

cones env
cones env --format json > env.json
"""

from __future__ import annotations

NAME = "env"
HELP = "print versions of cones and its dependencies, and the available devices"


def add_arguments(p) -> None:
    p.add_argument("--format", choices=("text", "json"), default="text")


def run(args) -> int:
    import json
    import platform

    import diffusers
    import safetensors
    import torch
    import transformers

    import cones

    info = {
        "cones": cones.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "default_model": _default_model_path(),
    }
    if args.format == "json":
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>15}: {value}")
    return 0


def _default_model_path() -> str | None:
    from cones.registry import NoDefaultModel, default_model

    try:
        return default_model().model_path
    except NoDefaultModel:
        return None
