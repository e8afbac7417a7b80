"""Builds engram-client, generating its gRPC stubs from engram's proto/ on the way.

The stubs are not checked in: `pip install ./clients/python` (or building a wheel) compiles
`proto/engram/v1/memory.proto` of the checkout with grpcio-tools into
`engram_client/_proto/`. An sdist carries a copy of the proto, so it builds the same way
outside the checkout.
"""

import shutil
import tempfile
from importlib import resources
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_IN_CHECKOUT = HERE.parent.parent / "proto" / "engram" / "v1" / "memory.proto"
PROTO_IN_SDIST = HERE / "proto" / "memory.proto"
# Where the stubs live inside the package; the proto is compiled under this path so that the
# generated modules import each other as engram_client._proto.*.
STUBS = Path("engram_client") / "_proto"


def proto() -> Path:
    for path in (PROTO_IN_CHECKOUT, PROTO_IN_SDIST):
        if path.is_file():
            return path
    raise SystemExit(
        f"engram-client: cannot find memory.proto (looked for {PROTO_IN_CHECKOUT} and "
        f"{PROTO_IN_SDIST}); build from an engram checkout or its sdist"
    )


def generate(out: Path) -> None:
    from grpc_tools import protoc

    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / STUBS).mkdir(parents=True)
        shutil.copyfile(proto(), Path(tmp) / STUBS / "memory.proto")
        (out / STUBS).mkdir(parents=True, exist_ok=True)
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(STUBS / "memory.proto"),
            ]
        )
        if code != 0:
            raise SystemExit(f"engram-client: protoc failed ({code}) on {proto()}")
    (out / STUBS / "__init__.py").write_text('"""Generated from engram\'s proto/ at build time."""\n')


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib))


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "proto"
        target.mkdir(exist_ok=True)
        shutil.copyfile(proto(), target / "memory.proto")


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto})
