#!/usr/bin/env python3
"""Prepare the GPU proof kit HERE (a machine with PyPI): wheels + tiny inputs into the ignored folder ``.gpu-kit/``.

    .venv/bin/python benchmarks/gpu/fetch_wheels.py            # downloads, prepares, prints the sizes

- Downloads the Python 3.12 manylinux x86_64 wheels listed in ``benchmarks/gpu/wheels.txt`` (``--no-deps``: the list
  is the closure of what the engine imports that the GPU image lacks or has in an incompatible version) into
  ``.gpu-kit/wheels`` and deletes any other wheel there (two versions of one package stop the install).
- Builds the tiny HF base and the data build of the bundled sample into ``.gpu-kit/inputs`` (CPU work that needs
  libraries the GPU run does not: tokenizer training, language id, MinHash dedup).
- Prints the kit size, the size of the working tree that travels with it (tracked + untracked-not-ignored files)
  and their sum, and fails when the sum is over the 64 MiB the GPU host accepts.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / ".gpu-kit"
LIMIT = 64 * 2**20
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64", "manylinux2010_x86_64"]


def wheel_list(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def download(specs: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    for spec in specs:  # one at a time: a failure names its package
        proc = subprocess.run(cmd + [spec], capture_output=True, text=True)
        if proc.returncode != 0:
            # sdist-only (e.g. antlr4-python3-runtime 4.9.3, what omegaconf 2.3 pins): build it here; only a pure-Python
            # wheel (py3-none-any) is of use on the GPU host
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec],
                                   capture_output=True, text=True)
            name = normalise(spec.split("==")[0])
            pure = [w for w in dest.glob("*.whl") if normalise(w.name.split("-")[0]) == name and
                    w.name.endswith("-py3-none-any.whl")]
            if built.returncode != 0 or not pure:
                sys.exit(f"pip download {spec} failed:\n{proc.stderr[-2000:]}\n{built.stderr[-2000:]}")
    wanted = {normalise(s.split("==")[0]): s.split("==")[1] for s in specs}
    for whl in dest.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        if wanted.get(normalise(name)) != version:
            whl.unlink()  # stale: another version or no longer listed
    for whl in dest.glob("*.whl"):
        prefix = STRIP.get(normalise(whl.name.split("-")[0]))
        if prefix:
            strip_wheel(whl, prefix)
    have = {normalise(w.name.split("-")[0]) for w in dest.glob("*.whl")}
    missing = sorted(set(wanted) - have)
    if missing:
        sys.exit(f"no wheel for: {missing}")


# Files left out of a downloaded wheel (its RECORD rows too), with why. Nothing the kit runs uses them.
STRIP = {
    # nvidia-modelopt (imported by nemo.collections.llm.api) imports pulp; the CBC solver binaries pulp bundles for
    # six platforms (33 MiB unpacked, 15 MiB of the wheel) are never run: no LP is solved here.
    "pulp": "pulp/solverdir/cbc/",
}


def strip_wheel(whl: Path, prefix: str) -> None:
    import zipfile

    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(prefix):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(prefix.encode()))
            dst.writestr(info, data)
    tmp.replace(whl)


def tree_bytes() -> int:
    """Bytes of what travels besides the kit: tracked files + untracked files git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    total = 0
    for f in files:
        p = REPO / f.decode()
        if f and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-download", action="store_true", help="only prepare the inputs and measure")
    ap.add_argument("--no-inputs", action="store_true", help="only the wheels")
    a = ap.parse_args()
    specs = wheel_list(Path(__file__).with_name("wheels.txt"))
    if not a.no_download:
        download(specs, KIT / "wheels")
    if not a.no_inputs:
        sys.path.insert(0, str(REPO))
        sys.path.insert(0, str(Path(__file__).parent))
        from proof import prepare_inputs

        prepare_inputs(KIT / "inputs")
        # only what training reads travels: manifest.json + tokenized/ (the build's work/ and reports are ~100 MB)
        data = KIT / "inputs" / "data"
        for p in data.iterdir():
            if p.name not in ("manifest.json", "tokenized"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for cache in list(data.rglob("cache")):  # megatron's dataset index caches from CPU runs of proof.py
            shutil.rmtree(cache)
    wheels = sorted((KIT / "wheels").glob("*.whl"), key=lambda p: -p.stat().st_size)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    wb, ib, tb = dir_bytes(KIT / "wheels"), dir_bytes(KIT / "inputs"), tree_bytes()
    total = wb + ib + tb
    print(f"wheels {len(wheels)}: {wb / 2**20:.2f} MiB; inputs: {ib / 2**20:.2f} MiB; working tree: {tb / 2**20:.2f} MiB; "
          f"total that travels: {total / 2**20:.2f} MiB of {LIMIT / 2**20:.0f} MiB")
    if total > LIMIT:
        print("OVER the limit: drop wheels or shrink the tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
