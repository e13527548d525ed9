"""The wheels a lent GPU machine needs for benchmarks/gpu_checks.sh, downloaded here into `.whl/` (git-ignored).

The GPU machine (benchmarks/RESULTS.md) runs its own image: CPython 3.12 with torch, Lightning, peft, transformers
and most of the scientific stack, and no network. What the checks import beyond that image travels with the working
tree as wheels, and gpu_checks.sh installs them into a folder of its own (`pip install --no-index --no-deps
--target`): the image's torch and the packages it has stay as they are (its versions, not this project's pins, as
RESULTS.md records). This script takes this project's pinned version of each distribution the checks import
(`CHECKS_IMPORT`, from pyproject.toml: the dependencies and the bench extra), then every requirement of those
wheels that the image lacks, recursively (markers read for CPython 3.12 on x86-64 Linux; the newest version a
requirement allows where no pin names it). A distribution published as a source archive only (DeepSpeed) is built
here into a wheel, which must come out pure Python. It refuses a set larger than what a device call carries.

    python benchmarks/gpu_wheels.py      # then carry .whl to the machine and run: bash benchmarks/gpu_checks.sh

`gpu_image.txt` beside this file lists the image's distributions (as the device library's KINDS.md read them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
# What the checks import (their modules imported here, sys.modules mapped to distributions), beyond the stdlib
# and what the image has; the bench extra (peers.py) is added whole.
CHECKS_IMPORT = ("deepspeed", "diffusers", "omegaconf", "lightning", "peft", "transformers", "safetensors", "tqdm")
# The machine's Python, as gpu_checks.sh's pip sees it.
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]
# What one device call carries is 64 MiB with the working tree (about 3 MiB today).
LIMIT_MIB = 56


def project_requirements() -> tuple[list[Requirement], list[Requirement]]:
    """This project's pinned dependencies and its bench extra, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*map(Requirement, project["dependencies"])], [*map(Requirement, project["optional-dependencies"]["bench"])]


def image_distributions(path: Path) -> set[str]:
    """Canonical names of the image's distributions: `path` lists them, whitespace-separated, `#` comments."""
    words = (line.split("#", 1)[0] for line in path.read_text().splitlines())
    return {canonicalize_name(name) for line in words for name in line.split()}


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The requirements of `wheel` that apply on the target Python, extras excluded."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(archive.read(metadata).decode())
    requirements = [Requirement(line) for line in headers.get_all("Requires-Dist") or []]
    return [req for req in requirements if req.marker is None or req.marker.evaluate(TARGET)]


def fetch(requirement: Requirement, dest: Path) -> Path:
    """Download the target's wheel of `requirement` into `dest`, or build a pure-Python one from its sdist."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory() as scratch:
        binary = [*pip, "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp"]
        binary += ["--python-version", TARGET["python_version"], "-d", scratch, str(requirement)]
        for platform in PLATFORMS:
            binary += ["--platform", platform]
        if subprocess.run(binary, capture_output=True).returncode:
            build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", scratch, str(requirement)]
            subprocess.run(build, capture_output=True, check=True)
        (wheel,) = Path(scratch).glob("*.whl")
        tags = {tag.abi for tag in parse_wheel_filename(wheel.name)[3]}
        if tags != {"none"} and not any(tag.startswith("cp312") or tag == "abi3" for tag in tags):
            raise SystemExit(f"gpu_wheels: {wheel.name} was built for this machine's Python, not the target's 3.12")
        return Path(wheel.replace(dest / wheel.name))


def collect(roots: list[Requirement], image: set[str], pins: dict[str, Requirement], dest: Path) -> list[Path]:
    """Wheels of `roots` and of their requirements, recursively, leaving out what `image` has."""
    wheels: dict[str, Path] = {}
    queue = list(roots)
    while queue:
        requirement = queue.pop(0)
        name = canonicalize_name(requirement.name)
        if name in image or name in wheels:
            continue
        wheels[name] = fetch(pins.get(name, requirement), dest)
        print(f"  {wheels[name].name}", flush=True)
        queue += wheel_requirements(wheels[name])
    return sorted(wheels.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl", help="folder for the wheels (emptied first)")
    parser.add_argument("--image", type=Path, default=Path(__file__).with_name("gpu_image.txt"))
    args = parser.parse_args(argv)
    dependencies, bench = project_requirements()
    pins = {canonicalize_name(req.name): req for req in [*dependencies, *bench]}
    roots = [pins[canonicalize_name(name)] for name in CHECKS_IMPORT] + bench
    image = image_distributions(args.image)
    args.dest.mkdir(exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    print(f"wheels for the GPU machine's CPython {TARGET['python_version']}, into {args.dest}:")
    wheels = collect(roots, image, pins, args.dest)
    mib = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{len(wheels)} wheels, {mib:.1f} MiB (a device call carries {LIMIT_MIB} MiB of them)")
    if mib > LIMIT_MIB:
        raise SystemExit(f"gpu_wheels: {mib:.1f} MiB of wheels is more than a device call carries ({LIMIT_MIB} MiB)")


if __name__ == "__main__":
    main()
