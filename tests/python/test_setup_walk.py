"""``get_devices`` / ``get_device_ids`` walk random Setups exactly as CGSE's ``Setup.find_devices`` /
``Setup.find_device_ids`` do.

A few hundred Setups are generated from a seed (``PROCMAN_WALK_SEED`` to replay one; the seed is in every
failure message) with nesting, lists of mappings, duplicate names and ids, and device nodes with and without
``device``, ``device_id``, ``device_name`` and ``device_args`` — also device nodes with devices below them.
CGSE walks them in the reference venv (one subprocess for the batch), we walk them with the ``setup_walk``
example (``cargo build --release --examples``), and both replies must be equal, types and order included.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refenv import REPO_ROOT, run_ref

COUNT = 300
MARKER = "@@WALK@@"

NAMES = ["Dummy Device", "PUNA Hexapod", "AEU PSU1", "AEU cRIO", "Camera", 7]
IDS = ["DUMMY_01", "PUNA_01", "AEU_PSU1", "CAM_01", 3, None]
DEVICES = ["class//egse.dummy.DummyProxy", "class//egse.aeu.aeu.PSUProxy", "egse.plain.Device", 42]
KEYS = ["gse", "dummy", "hexapod", "aeu", "psu1", "crio", "sut", "camera", "group", "extra", "ID"]

# Tagged like the example prints: types survive JSON.
REF_SNIPPET = """
import json, sys
from egse.setup import Setup

def tag(v):
    if isinstance(v, dict):
        return {"dict": [[tag(k), tag(x)] for k, x in v.items()]}
    if isinstance(v, tuple):
        return {"tuple": [tag(x) for x in v]}
    if isinstance(v, list):
        return {"list": [tag(x) for x in v]}
    return v

out = []
for path in PATHS:
    try:
        setup = Setup.from_yaml_file(path)
        out.append({
            "devices": tag(Setup.find_devices(setup, devices={})),
            "device_ids": tag(Setup.find_device_ids(setup, device_ids={})),
        })
    except Exception as exc:
        out.append({"error": type(exc).__name__})
print(MARKER + json.dumps(out))
"""


def example_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
    path = target / "release" / "examples" / "setup_walk"
    assert path.is_file(), f"{path} missing: run `cargo build --release --examples`"
    return path


def scalar(rng: random.Random) -> Any:
    return rng.choice(["a", "PUNA_01", 1, 2.5, True, None, "x y"])


def device_node(rng: random.Random, depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    fields: list[tuple[str, Callable[[], Any]]] = [
        ("device", lambda: rng.choice(DEVICES)),
        ("device_name", lambda: rng.choice(NAMES)),
        ("device_id", lambda: rng.choice(IDS)),
        ("device_args", lambda: rng.choice([[], [scalar(rng)], [scalar(rng), scalar(rng)], {"port": 5}, "one"])),
        ("device_kwargs", lambda: {"sim": True}),
        ("ID", lambda: rng.randint(0, 99)),
    ]
    for key, make in fields:
        # Most nodes are complete devices; the rest miss some of the fields.
        if rng.random() < (0.85 if key in ("device", "device_name") else 0.5):
            node[key] = make()
    if depth > 0 and rng.random() < 0.4:
        node[rng.choice(KEYS)] = tree(rng, depth - 1)
    items = list(node.items())
    rng.shuffle(items)
    return dict(items)


def tree(rng: random.Random, depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(rng.randint(0, 4)):
        roll = rng.random()
        key = rng.choice(KEYS) + str(rng.randint(0, 3))
        if roll < 0.35:
            node[key] = device_node(rng, depth)
        elif roll < 0.6 and depth > 0:
            node[key] = tree(rng, depth - 1)
        elif roll < 0.75:
            # Lists of mappings are not searched by CGSE.
            node[key] = [device_node(rng, 0), scalar(rng)]
        else:
            node[key] = scalar(rng)
    return node


def setup_yaml(rng: random.Random) -> str:
    body = tree(rng, 3)
    roll = rng.random()
    if roll < 0.8:
        doc: Any = {"Setup": body}
    elif roll < 0.9:
        doc = {"Setup": body, "Other": tree(rng, 1)}
    else:
        doc = body or {"empty": None}
    # JSON is YAML: keeps the generator free of a YAML writer and the order explicit.
    return json.dumps(doc, indent=1)


def test_walk_matches_cgse(tmp_path: Path) -> None:
    seed = int(os.environ.get("PROCMAN_WALK_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    paths = []
    for i in range(COUNT):
        path = tmp_path / f"SETUP_WALK_{i:05d}_000000_000000.yaml"
        path.write_text(setup_yaml(rng))
        paths.append(str(path))

    code = f"PATHS = {paths!r}\nMARKER = {MARKER!r}\n" + REF_SNIPPET
    rc, out, err = run_ref(code, timeout=300)
    assert rc == 0, f"seed {seed}: reference walk failed\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    assert lines, f"seed {seed}: no reference output\n{out[-2000:]}\n{err[-2000:]}"
    theirs = json.loads(lines[-1][len(MARKER) :])

    ours_run = subprocess.run([str(example_binary()), *paths], capture_output=True, text=True, timeout=300, check=False)
    assert ours_run.returncode == 0, ours_run.stderr
    ours = [json.loads(line) for line in ours_run.stdout.splitlines()]

    assert len(ours) == len(theirs) == COUNT
    with_devices = with_descent = 0
    for name, mine, ref in zip(paths, ours, theirs, strict=True):
        if "error" in ref or "error" in mine:
            assert ("error" in ref) == ("error" in mine), f"seed {seed}, {name}: ours {mine}, CGSE {ref}"
            continue
        assert mine == ref, f"seed {seed} (PROCMAN_WALK_SEED={seed}), {name}:\n{Path(name).read_text()}"
        with_devices += bool(ref["devices"]["dict"])
        with_descent += len(ref["device_ids"]["dict"]) > len(ref["devices"]["dict"])
    # The generator must exercise what the test is about.
    assert with_devices > COUNT // 3, f"seed {seed}: only {with_devices} Setups with devices"
    assert with_descent > 0, f"seed {seed}: no Setup with an id below an id-less device"
