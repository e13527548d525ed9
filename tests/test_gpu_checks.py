"""benchmarks/gpu_checks.sh groups its checks so that each group fits one device call, and refuses a name it does not
know; benchmarks/gpu_wheels.py collects what the GPU machine lacks and only that."""

from __future__ import annotations

import os
import runpy
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
GROUPS = ("first", "training", "training14b", "more", "cp", "cp2", "cp4")
# One device call runs 600 s at most; the wheels' install and the machine's line need the rest.
CALL_SECONDS = 500


def listed(checks: str, tmp_path: Path) -> dict[str, int]:
    env = {**os.environ, "LIST": "1", "CHECKS": checks, "LOG_DIR": str(tmp_path / "logs")}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return {name: int(seconds) for name, seconds in (line.split() for line in done.stdout.splitlines())}


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_fits_one_device_call(group, tmp_path):
    checks = listed(group, tmp_path)
    assert checks and sum(checks.values()) <= CALL_SECONDS, checks


def test_every_check_is_in_exactly_one_group_and_all_runs_them_all(tmp_path):
    members = [name for group in GROUPS for name in listed(group, tmp_path)]
    assert len(members) == len(set(members))
    assert sorted(members) == sorted(listed("all", tmp_path))
    assert not (tmp_path / "logs").exists()  # listing runs nothing


def test_the_default_is_the_first_group_and_single_checks_select(tmp_path):
    assert listed("", tmp_path) == listed("first", tmp_path)
    assert set(listed("cp2_wan14b_8 first", tmp_path)) == {"cp2_wan14b_8", *listed("first", tmp_path)}


def test_an_unknown_name_is_one_line_and_exit_2_with_nothing_run(tmp_path):
    env = {**os.environ, "CHECKS": "first peers_wan13b", "LOG_DIR": str(tmp_path / "logs")}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "'peers_wan13b'" in done.stderr
    assert not (tmp_path / "logs").exists()


def test_a_check_that_ignores_its_time_limit_is_killed(tmp_path):
    # The script's `check` alone, on a command that ignores SIGTERM: killed a grace after its limit.
    check = subprocess.run(["sed", "-n", "/^check() {/,/^}/p", str(SCRIPT)], capture_output=True, text=True).stdout
    stubborn = "trap '' TERM; sleep 20"
    setup = f'selected=" stubborn " listing= gpus=1 log={tmp_path} grace=1'
    script = f'{check}\n{setup}\ncheck stubborn 1 bash -c "{stubborn}"'
    start = time.monotonic()
    subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 10
    assert "exit 137 after" in (tmp_path / "stubborn.txt").read_text()


@pytest.fixture(scope="module")
def wheels():
    return runpy.run_path(str(ROOT / "benchmarks" / "gpu_wheels.py"), run_name="gpu_wheels")


def make_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    lines = [f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {req}" for req in requires)]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(["Metadata-Version: 2.1", *lines]) + "\n")
    return path


def test_wheel_requirements_are_read_for_the_machines_python(wheels, tmp_path):
    wheel = make_wheel(
        tmp_path,
        "demo",
        ["alpha>=1", 'beta; python_version < "3.12"', 'gamma; sys_platform == "linux"', 'delta; extra == "dev"'],
    )
    assert [req.name for req in wheels["wheel_requirements"](wheel)] == ["alpha", "gamma"]


def test_collect_follows_requirements_the_image_lacks_and_prefers_the_pins(wheels, tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    graph = {"top": ["Needed_Lib", "torch>=2", "shared"], "needed-lib": ["shared", "deeper"]}
    graph |= {"shared": [], "deeper": []}
    fetched = []

    def fetch(requirement, dest):
        fetched.append(str(requirement))
        name = canonicalize_name(requirement.name)
        source = make_wheel(index, name, graph[name])
        return source.rename(dest / source.name)

    collect = wheels["collect"]
    monkeypatch.setitem(collect.__globals__, "fetch", fetch)
    dest = tmp_path / "whl"
    dest.mkdir()
    pins = {"shared": Requirement("shared==3.0")}
    found = collect([Requirement("top==1.0")], {"torch"}, pins, dest)
    assert sorted(path.name.split("-")[0] for path in found) == ["deeper", "needed_lib", "shared", "top"]
    assert "shared==3.0" in fetched and not any(req.startswith("torch") for req in fetched)


def test_the_image_list_is_read_by_canonical_name(wheels, tmp_path):
    listing = tmp_path / "image.txt"
    listing.write_text("# the image\nTorch pytorch_lightning  # two\nsafetensors\n")
    assert wheels["image_distributions"](listing) == {"torch", "pytorch-lightning", "safetensors"}
    shipped = wheels["image_distributions"](ROOT / "benchmarks" / "gpu_image.txt")
    assert {"torch", "lightning", "peft", "transformers"} <= shipped and "diffusers" not in shipped
