"""Hatchling build hook: compile ``proto/`` into ``control/`` at install time.

``proto/control/v1/control.proto`` compiled with ``-I proto --python_out=<root>`` lands as
``control/v1/control_pb2.py`` whose imports (``from control.v1 import control_pb2``) resolve inside
the project's own ``control`` package. Nothing generated is committed. Runnable as a script
(``python proto/build_hook.py``) to regenerate after editing a ``.proto``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")


def generate(root: Path) -> list[Path]:
    """Run protoc (grpc_tools) with the mypy plugins; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    proto_dir = root / "proto"
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"--python_out={root}",
        f"--grpc_python_out={root}",
        f"--mypy_out={root}",
        f"--mypy_grpc_out={root}",
    ]
    for plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        path = bindir / plugin
        if path.exists():
            args.append(f"--plugin={plugin}={path}")
    if protoc.main([*args, *protos]) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    out: list[Path] = []
    for pattern in GENERATED:
        out.extend((root / "control").rglob(pattern))
    for package in {p.parent for p in out}:
        init = package / "__init__.py"
        if not init.exists():
            init.write_text("")
            out.append(init)
    return sorted(out)


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # running as a script without hatchling installed
    BuildHookInterface = object  # type: ignore[assignment,misc]


class ProtoBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    """Generate the gRPC code for both wheel and editable builds."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        for path in generate(root):
            build_data["artifacts"].append(str(path.relative_to(root)))


if __name__ == "__main__":
    for generated in generate(Path(__file__).resolve().parent.parent):
        print(generated)
