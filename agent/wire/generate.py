"""Regenerate the protobuf/gRPC Python modules in this package from ../../proto.

Run: python -m agent.wire.generate   (needs the test extras: grpcio-tools, mypy-protobuf)

protoc emits top-level imports between generated modules (``import model_config_pb2``);
they are rewritten to package-relative ones so the code lives inside ``agent.wire``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
OUT_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
_TOP_LEVEL_IMPORT = re.compile(r"^import (\w+_pb2)( as \w+)?$", re.MULTILINE)


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    from grpc_tools import protoc  # test extra, imported only when regenerating

    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(PROTO_DIR / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = sorted(p for p in out_dir.iterdir() if "_pb2" in p.name)
    for path in written:
        text = path.read_text()
        fixed = _TOP_LEVEL_IMPORT.sub(r"from agent.wire import \1\2", text)
        if fixed != text:
            path.write_text(fixed)
    return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(p)
