"""Bad input of every kind (issue #14): one line ``dynas: error: ...``, exit code 2, nothing lost.

One table of cases across flags, YAML, files, data and damaged run folders. Each case runs the
CLI in this process on a copy of one small real run folder (built once), and asserts: exit code 2,
a single stderr line matching the case's pattern, no traceback, and the run folder byte-identical
afterwards (every command that takes a folder is pointed at the copy: ``search --run-dir``,
``train --out``, ``export``). Then the refusals that are not errors of the input: a missing extra,
a storage outage mid-run, export without ONNX; and the seeded repeatability of training.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dynas.cli import main

TINY = [
    "--dataset", "digits", "--input-size", "16", "--train-subset", "200", "--epochs", "1",
    "--max-steps-per-epoch", "1", "--batch-size", "32", "--quiet", "--num-threads", "1",
]
SEARCH = ["search", *TINY, "--max-macs", "1.5M", "--trials", "2", "--sampler", "random", "--run-dir", "{run}"]
TRAIN = ["train", "--arch", "{arch}", *TINY, "--out", "{run}"]
EXPORT = ["export", "{run}", "--no-latency"]


# ----------------------------------------------------------------------------- files the cases use


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels (a decompression bomb when large)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _npz(path: Path, y_train: np.ndarray | None = None, size: int = 16, **extra: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    y_train = np.arange(60) % 3 if y_train is None else y_train
    arrays = {
        "x_train": rng.integers(0, 256, (len(y_train), size, size), dtype=np.uint8), "y_train": y_train,
        "x_test": rng.integers(0, 256, (9, size, size), dtype=np.uint8), "y_test": np.arange(9) % 3, **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _imagefolder(root: Path, bad_name: str, bad: bytes) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        for i in range(3):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
    _write(root / "a" / bad_name, bad)


@dataclass
class Case:
    """``argv`` with ``{tmp}`` (a case's own folder), ``{run}`` (its copy of the run), ``{arch}`` (its
    first trial's arch string) and ``{arch8}`` (the same at 8x8)."""

    id: str
    category: str
    argv: list[str]
    match: str
    setup: Callable[[Path, Path], None] | None = None  # (tmp, run) -> None, before the snapshot
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    marks: list = field(default_factory=list)


def _file(name: str, data: bytes | str) -> Callable[[Path, Path], None]:
    return lambda tmp, run: _write(tmp / name, data)


YAML = ["search", "--config", "{tmp}/c.yaml", *SEARCH[1:]]  # flags override a key, but every key is checked


def _yaml_case(id: str, body: str | bytes, match: str) -> Case:
    return Case(id, "yaml", YAML, match, _file("c.yaml", body))


def _run_file(name: str, data: bytes | str) -> Callable[[Path, Path], None]:
    return lambda tmp, run: _write(run / name, data)


def _truncate(pattern: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, run: Path) -> None:
        for path in run.glob(pattern):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return setup


def _replace(pattern: str, data: bytes | str) -> Callable[[Path, Path], None]:
    return lambda tmp, run: [_write(path, data) for path in run.glob(pattern)]


def _swap_checkpoints(tmp: Path, run: Path) -> None:
    first, second = run / "checkpoints/trial_00000.pt", run / "checkpoints/trial_00001.pt"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def _enqueue_file(tmp: Path, run: Path) -> None:
    from dynas.spaces import get_space

    _write(tmp / "e.json", json.dumps(dict(get_space("mobile_cifar", input_size=16).sample(seed=0).params)))


def _no_nni(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "nni" or m.startswith("nni.") or m == "dynas.engines.nni_engine"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nni", None)


BINARY = b"\x89\x00\xff\xfe\x80 not text \xc3\x28"
LATIN1 = "max_macs: 5M  # caf\xe9\n".encode("latin-1")
DEEP = "[" * 100_000
MODEL = "{run}/checkpoints/trial_00000.pt"
BOMB = "trials: [&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(  # 9**10 leaves if expanded: a billion laughs
    f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)
) + "]\n"
S = SEARCH

CASES = [
    # --- flags: numbers --------------------------------------------------------------------
    Case("max-macs overflow", "flags", [*S, "--max-macs", "1e400"], r"argument --max-macs: a count must be finite, but got '1e400'"),
    Case("max-macs inf", "flags", [*S, "--max-macs", "inf"], r"argument --max-macs: expected a count such as 5M or 5e6, but got 'inf'"),
    Case("max-macs nan", "flags", [*S, "--max-macs", "nan"], r"argument --max-macs: expected a count such as 5M or 5e6, but got 'nan'"),
    Case("max-macs rounds to 0", "flags", [*S, "--max-macs", "0.4"], r"argument --max-macs: a count must be >= 1, but got '0.4'"),
    Case("max-params overflow", "flags", [*S, "--max-params", "2e308"], r"argument --max-params: a count must be finite, but got '2e308'"),
    Case("max-params rounds to 0", "flags", [*S, "--max-params", "1e-9"], r"argument --max-params: a count must be >= 1, but got '1e-9'"),
    Case("max-latency nan", "flags", [*S, "--max-latency-ms", "nan"], r"argument --max-latency-ms: must be a finite number, but got nan"),
    Case("timeout overflow", "flags", [*S, "--timeout", "1e400"], r"argument --timeout: must be a finite number, but got 1e400"),
    Case("seed 2**32", "flags", [*S, "--seed", "4294967296"], r"argument --seed: must be an integer in 0\.\.4294967295, but got 4294967296"),
    Case("seed 2**64", "flags", [*TRAIN, "--seed", str(2**64)], r"argument --seed: must be an integer in 0\.\.4294967295"),
    Case("seed negative", "flags", [*S, "--seed", "-1"], r"argument --seed: must be an integer in 0\.\.4294967295, but got -1"),
    Case("seed float", "flags", [*S, "--seed", "1.5"], r"argument --seed: must be an integer, but got '1\.5'"),
    Case("port > 65535", "flags", [*S, "--port", "70000"], r"argument --port: must be an integer in 1\.\.65535, but got 70000"),
    Case("port 0", "flags", [*S, "--port", "0"], r"argument --port: must be an integer in 1\.\.65535, but got 0"),
    Case("host with a space", "flags", [*S, "--host", "bad host!"], r"argument --host: must be an IP address or a host name, but got 'bad host!'"),
    Case("host empty", "flags", [*S, "--host", ""], r"argument --host: must be an IP address or a host name, but got ''"),
    Case("host bad IPv4", "flags", [*S, "--host", "999.1.1.1"], r"argument --host: .*'999\.1\.1\.1'"),
    Case("host is a URL", "flags", [*S, "--host", "http://localhost"], r"argument --host: .*'http://localhost'"),
    Case("trials float", "flags", [*S, "--trials", "2.5"], r"argument --trials: must be an integer, but got '2\.5'"),
    Case("lr inf", "flags", [*S, "--lr", "inf"], r"argument --lr: must be a finite number, but got inf"),
    Case("weight decay < 0", "flags", [*S, "--weight-decay", "-1"], r"`weight_decay` must be a finite number >= 0, but got weight_decay=-1\.0"),
    Case("label smoothing 1", "flags", [*S, "--label-smoothing", "1"], r"`label_smoothing` must be a finite number in \[0, 1\)"),
    Case("device cuda:99", "flags", [*S, "--device", "cuda:99"], r"`device` is 'cuda:99', but"),
    Case("device tpu", "flags", [*TRAIN, "--device", "tpu"], r"`device` must be 'auto' or a torch device"),
    # --- flags that make no sense for the space, the data or each other ---------------------
    Case("input too small for the strides", "sense", [*S, "--input-size", "4"], r"`input_size` must be >= 16 for space 'mobile_cifar' \(its strides divide the input by 16\), but got input_size=4"),
    Case("train input too small", "sense", [*TRAIN, "--input-size", "8", "--arch", "{arch8}"], r"`input_size` must be >= 16 for architecture 'r8_in3"),
    Case("input too large for memory", "sense", [*S, "--input-size", "100000"], r"`input_size` 100000 needs .* of memory for the images"),
    Case("subset of 1 (BatchNorm)", "sense", [*S, "--train-subset", "1"], r"training batches must hold >= 2 images \(BatchNorm in train mode\), but got 1 training image"),
    Case("batch size 1 (BatchNorm)", "sense", [*TRAIN, "--batch-size", "1"], r"training batches must hold >= 2 images \(BatchNorm in train mode\), but got batch_size=1"),
    Case("subset fraction to 1 image", "sense", [*S, "--train-subset", "0.001"], r"training batches must hold >= 2 images"),
    Case("grace < heartbeat", "sense", [*S, "--grace-period", "30", "--heartbeat-interval", "60"], r"`grace_period` must be longer than `heartbeat_interval`.*grace_period=30, heartbeat_interval=60"),
    Case("grace = heartbeat", "sense", [*S, "--grace-period", "60", "--heartbeat-interval", "60"], r"`grace_period` must be longer than `heartbeat_interval`"),
    Case("val fraction leaves nothing", "sense", [*S, "--val-fraction", "0.9999", "--train-subset", "0.5"], r"too few to hold out"),
    Case("subset larger than the data", "sense", [*S, "--train-subset", "5000"], r"`train_subset` must not exceed"),
    # --- flags: engines ------------------------------------------------------------------------
    Case("nni not installed", "engines", [*S, "--engine", "nni"], r"^dynas: error: --engine nni needs NNI, which is not installed: pip install 'dynas\[nni\]'$", patch=_no_nni),
    Case("execution typo", "engines", [*S, "--engine", "nni", "--execution", "locl"], r"unknown execution 'locl'.*Did you mean 'local'\?"),
    Case("enqueue with nni", "engines", [*S, "--engine", "nni", "--enqueue", "{tmp}/e.json"], r"`enqueue` is an Optuna feature", _enqueue_file),
    # --- YAML ----------------------------------------------------------------------------------
    _yaml_case("yaml trials 2.5", "trials: 2.5\n", r"key 'trials': must be an integer, but got 2\.5"),
    _yaml_case("yaml epochs 1.5", "epochs: 1.5\n", r"key 'epochs': must be an integer, but got 1\.5"),
    _yaml_case("yaml input_size 16.5", "input_size: 16.5\n", r"key 'input_size': must be an integer, but got 16\.5"),
    _yaml_case("yaml trials list", "trials: [1, 2]\n", r"key 'trials': must be an integer, but got \[1, 2\]"),
    _yaml_case("yaml trials mapping", "trials: {a: 1}\n", r"key 'trials': must be an integer, but got \{'a': 1\}"),
    _yaml_case("yaml trials alias bomb", BOMB, r"key 'trials': must be an integer, but got \[\[1, 1, "),
    _yaml_case("yaml max_macs 1e400", "max_macs: 1e400\n", r"key 'max_macs': a count must be finite, but got '1e400'"),
    _yaml_case("yaml max_macs .nan", "max_macs: .nan\n", r"key 'max_macs': expected a count such as 5M or 5e6, but got nan"),
    _yaml_case("yaml max_macs .inf", "max_macs: .inf\n", r"key 'max_macs': a count must be finite, but got inf"),
    _yaml_case("yaml lr .nan", "lr: .nan\n", r"key 'lr': must be a finite number, but got nan"),
    _yaml_case("yaml seed 2**32", "seed: 4294967296\n", r"key 'seed': must be an integer in 0\.\.4294967295"),
    _yaml_case("yaml port 70000", "port: 70000\n", r"key 'port': must be an integer in 1\.\.65535"),
    _yaml_case("yaml host list", "host: [a]\n", r"key 'host': must be a string, but got \['a'\]"),
    _yaml_case("yaml dataset list", "dataset: [cifar10]\n", r"key 'dataset': must be a string, but got \['cifar10'\]"),
    _yaml_case("yaml space int", "space: 5\n", r"key 'space': must be a string, but got 5"),
    _yaml_case("yaml run_dir int", "run_dir: 5\n", r"key 'run_dir': must be a string, but got 5"),
    _yaml_case("yaml data_root mapping", "data_root: {a: 1}\n", r"key 'data_root': must be a string"),
    _yaml_case("yaml device int", "device: 0\n", r"key 'device': must be a string, but got 0"),
    _yaml_case("yaml quiet string", "quiet: 'yes'\n", r"key 'quiet': expected true or false, but got 'yes'"),
    _yaml_case("yaml trials bool", "trials: true\n", r"key 'trials': expected a value, not a boolean"),
    _yaml_case("yaml grace < heartbeat", "grace_period: 10\nheartbeat_interval: 60\nmax_macs: 1.5M\n", r"`grace_period` must be longer than `heartbeat_interval`"),
    _yaml_case("yaml 100000 nested lists", "trials: " + DEEP + "\n", r"config file '.*c\.yaml' is not valid YAML: too deeply nested"),
    _yaml_case("yaml not UTF-8", LATIN1, r"config file '.*c\.yaml' is not UTF-8 text"),
    _yaml_case("yaml binary", BINARY, r"config file '.*c\.yaml' is not UTF-8 text"),
    Case("yaml is a model file", "yaml", ["search", "--config", MODEL, "--run-dir", "{run}"], r"config file '.*trial_00000\.pt' is not UTF-8 text"),
    Case("yaml is a folder", "yaml", ["search", "--config", "{tmp}", "--run-dir", "{run}"], r"config file '.*' is a folder"),
    _yaml_case("yaml a list", "- trials\n- 3\n", r"must be a mapping of option: value, but got list"),
    # --- files ---------------------------------------------------------------------------------
    Case("enqueue folder", "files", [*S, "--enqueue", "{tmp}"], r"enqueue file '.*' is a folder"),
    Case("enqueue binary", "files", [*S, "--enqueue", "{tmp}/e.json"], r"enqueue file '.*e\.json' is not UTF-8 text", _file("e.json", BINARY)),
    Case("enqueue model file", "files", [*S, "--enqueue", MODEL], r"enqueue file '.*trial_00000\.pt' is not UTF-8 text"),
    Case("enqueue 100000 nested", "files", [*S, "--enqueue", "{tmp}/e.json"], r"enqueue file '.*e\.json' is not valid JSON: too deeply nested", _file("e.json", DEEP)),
    Case("enqueue unknown value", "files", [*S, "--enqueue", "{tmp}/e.json"], r"`width` must be one of", _file("e.json", '{"width": [1]}')),
    Case("arch folder", "files", ["train", "--arch", "{tmp}", *TINY, "--out", "{run}"], r"arch file '.*' is a folder"),
    Case("arch binary", "files", ["train", "--arch", "{tmp}/a.json", *TINY, "--out", "{run}"], r"arch file '.*a\.json' is not UTF-8 text", _file("a.json", BINARY)),
    Case("arch is a model file", "files", ["train", "--arch", MODEL, *TINY, "--out", "{run}"], r"arch file '.*trial_00000\.pt' is a model file \(torch\), not an arch JSON"),
    Case("arch not a spec", "files", ["train", "--arch", "{tmp}/a.json", *TINY, "--out", "{run}"], r"arch file '.*a\.json'", _file("a.json", '{"arch": 5}')),
    Case("arch wrong fields", "files", ["train", "--arch", "{tmp}/a.json", *TINY, "--out", "{run}"], r"arch file '.*a\.json'", _file("a.json", '{"stages": "x"}')),
    Case("arch 100000 nested", "files", ["profile", "{tmp}/a.json"], r"arch file '.*a\.json' is not valid JSON: too deeply nested", _file("a.json", DEEP)),
    Case("npz is a folder", "files", [*S, "--dataset", "npz", "--data-root", "{tmp}"], r"npz file '.*' is a folder"),
    Case("npz binary", "files", [*S, "--dataset", "npz", "--data-root", "{tmp}/d.npz"], r"npz file '.*d\.npz' cannot be read", _file("d.npz", BINARY)),
    Case("npz is text", "files", [*S, "--dataset", "npz", "--data-root", "{tmp}/d.npz"], r"npz file '.*d\.npz' cannot be read", _file("d.npz", "x_train: 1\n")),
    Case("npz is a model file", "files", [*S, "--dataset", "npz", "--data-root", MODEL], r"npz file '.*trial_00000\.pt' lacks"),
    Case("imagefolder is a file", "files", [*S, "--dataset", "imagefolder", "--data-root", "{tmp}/x.png"], r"image folder '.*x\.png' is a file, not a folder", _file("x.png", _png(8, 8))),
    Case("supernet folder", "files", [*S, "--evaluator", "supernet", "--supernet", "{tmp}"], r"supernet file '.*' is a folder"),
    Case("supernet binary", "files", [*S, "--evaluator", "supernet", "--supernet", "{tmp}/s.pt"], r"supernet file '.*s\.pt'", _file("s.pt", BINARY)),
    Case("supernet missing", "files", [*S, "--evaluator", "supernet", "--supernet", "{tmp}/none.pt"], r"supernet file '.*none\.pt' does not exist"),
    Case("second supernet a folder", "files", [*S, "--evaluator", "supernet", "--supernet", "{tmp}/none.pt", "{tmp}"], r"supernet file '.*' is a folder"),
    Case("supernet is a model file", "files", [*S, "--evaluator", "supernet", "--supernet", MODEL], r"supernet file '.*trial_00000\.pt'"),
    Case("storage is a folder", "files", [*S, "--storage", "{tmp}"], r"`storage` must be a URL or the path of a journal file, but got storage='.*', a directory"),
    Case("export dir missing", "files", ["export", "{tmp}/none"], r"is not a dynas run directory"),
    Case("export dir is a file", "files", ["export", "{tmp}/f"], r"is not a dynas run directory", _file("f", "x")),
    # --- data ----------------------------------------------------------------------------------
    Case("npz label 2e9", "data", [*S, "--dataset", "npz", "--data-root", "{tmp}/d.npz"], r"y_train: labels must lie in \[0, 99999\].*2000000000",
         lambda tmp, run: _npz(tmp / "d.npz", np.array([0, 1, 2] * 20 + [2_000_000_000]))),
    Case("npz label 2e9 with names", "data", [*S, "--dataset", "npz", "--data-root", "{tmp}/d.npz"], r"y_train: labels must lie in \[0, 2\]",
         lambda tmp, run: _npz(tmp / "d.npz", np.array([0, 1, 2] * 20 + [2_000_000_000]), class_names=np.array(["a", "b", "c"]))),
    Case("npz negative label", "data", [*S, "--dataset", "npz", "--data-root", "{tmp}/d.npz"], r"labels must lie in \[0, 2\], but got values from -1",
         lambda tmp, run: _npz(tmp / "d.npz", np.array([0, 1, 2] * 20 + [-1]))),
    Case("npz float labels", "data", [*S, "--dataset", "npz", "--data-root", "{tmp}/d.npz"], r"labels must be integers",
         lambda tmp, run: _npz(tmp / "d.npz", np.array([0.5, 1.0, 2.0] * 20))),
    Case("npz 2x2 images", "data", [*S, "--dataset", "npz", "--data-root", "{tmp}/d.npz", "--input-size", "2", "--train-subset", "40"], r"`input_size` must be >= 16",
         lambda tmp, run: _npz(tmp / "d.npz", size=2)),
    Case("image decompression bomb", "data", [*S, "--dataset", "imagefolder", "--data-root", "{tmp}/imgs"], r"image '.*bomb\.png' cannot be read: .*decompression bomb",
         lambda tmp, run: _imagefolder(tmp / "imgs", "bomb.png", _png(100_000, 100_000))),
    Case("image over the pixel limit", "data", [*S, "--dataset", "imagefolder", "--data-root", "{tmp}/imgs"], r"image '.*big\.png' cannot be read: .*pixels",
         lambda tmp, run: _imagefolder(tmp / "imgs", "big.png", _png(10_000, 10_000))),
    Case("image truncated", "data", [*S, "--dataset", "imagefolder", "--data-root", "{tmp}/imgs"], r"image '.*cut\.png' cannot be read",
         lambda tmp, run: _imagefolder(tmp / "imgs", "cut.png", _png(8, 8)[:40])),
    Case("image is text", "data", [*S, "--dataset", "imagefolder", "--data-root", "{tmp}/imgs"], r"image '.*t\.png' cannot be read",
         lambda tmp, run: _imagefolder(tmp / "imgs", "t.png", b"hello")),
    # --- damaged run folders -------------------------------------------------------------------
    Case("checkpoint truncated", "run folder", EXPORT, r"'.*trial_0000\d\.pt' is not a dynas model file", _truncate("checkpoints/*.pt")),
    Case("checkpoint is text", "run folder", EXPORT, r"'.*trial_0000\d\.pt' is not a dynas model file", _replace("checkpoints/*.pt", "weights")),
    Case("checkpoints swapped", "run folder", EXPORT, r"checkpoint '.*trial_0000\d\.pt' holds the weights of .*, not of trial \d's", _swap_checkpoints),
    Case("config.yaml not YAML", "run folder", EXPORT, r"config file '.*config\.yaml' is damaged", _run_file("config.yaml", "a: [b\n")),
    Case("config.yaml binary", "run folder", EXPORT, r"config file '.*config\.yaml' is damaged", _run_file("config.yaml", BINARY)),
    Case("config.yaml a list", "run folder", EXPORT, r"config file '.*config\.yaml' must be a mapping", _run_file("config.yaml", "- a\n")),
    Case("config.yaml dataset list", "run folder", EXPORT, r"config file '.*config\.yaml': key 'dataset' must be a dataset name \(a string\), but got \['digits'\]", _run_file("config.yaml", "dataset: [digits]\n")),
    Case("config.yaml subset text", "run folder", EXPORT, r"config file '.*config\.yaml': `train_subset` must be a count", _run_file("config.yaml", "dataset: digits\ntrain_subset: abc\n")),
    Case("config.yaml seed text", "run folder", EXPORT, r"config file '.*config\.yaml': `seed` must be an integer", _run_file("config.yaml", "dataset: digits\nseed: abc\n")),
    Case("config.yaml 100000 nested", "run folder", EXPORT, r"config file '.*config\.yaml' is damaged: too deeply nested", _run_file("config.yaml", "seed: " + DEEP)),
    Case("train --config damaged run", "run folder", ["train", "--config", "{run}/config.yaml", "--arch", "{arch}", "--out", "{run}"], r"config file '.*config\.yaml' is not UTF-8 text", _run_file("config.yaml", BINARY)),
    Case("results.jsonl damaged", "run folder", EXPORT, r"results\.jsonl", _run_file("results.jsonl", b'{"trial": 0}\n\x00\x01\n{"trial": 1}\n')),
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One small real run folder (two trained trials, kept weights) and its first trial's arch string."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main([*(a.replace("{run}", str(run)) for a in SEARCH)]) == 0
    first = json.loads((run / "results.jsonl").read_text().splitlines()[0])
    return run, first["arch"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Outcome:
    code: int | None
    err: str
    escaped: BaseException | None
    changed: list[str]


def run_case(case: Case, tmp: Path, base: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys) -> Outcome:
    """Copy the run, prepare the case's files, run the CLI, and report what it did (shared with tools)."""
    run = tmp / "run"
    shutil.copytree(base[0], run)
    if case.setup is not None:
        case.setup(tmp, run)
    if case.patch is not None:
        case.patch(monkeypatch)
    before = _snapshot(run)
    arch8 = base[1].replace("r16_", "r8_", 1)
    argv = [a.replace("{tmp}", str(tmp)).replace("{run}", str(run)).replace("{arch8}", arch8).replace("{arch}", base[1])
            for a in case.argv]
    code, escaped = None, None
    try:
        code = main(argv)
    except BaseException as exc:  # noqa: BLE001 - an escaping exception is what the table measures
        escaped = exc
    err = capsys.readouterr().err.strip()
    after = _snapshot(run)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(code, err, escaped, changed)


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.category}: {c.id}", marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(case, base_run, tmp_path, monkeypatch, capsys):
    outcome = run_case(case, tmp_path, base_run, monkeypatch, capsys)
    assert outcome.escaped is None, f"{type(outcome.escaped).__name__}: {outcome.escaped}"
    assert outcome.code == 2, outcome.err
    assert "Traceback" not in outcome.err and len(outcome.err.splitlines()) == 1, outcome.err
    assert outcome.err.startswith("dynas") and re.search(case.match, outcome.err), outcome.err
    assert outcome.changed == [], f"changed: {outcome.changed}"


def test_the_table_is_large_and_covers_every_category():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.category for c in CASES} == {"flags", "sense", "engines", "yaml", "files", "data", "run folder"}


# ----------------------------------------------------------------------------- beyond the table


def test_an_integral_float_in_yaml_is_read_as_an_integer(tmp_path):
    """Decided: `trials: 3.0` is 3 (YAML types a number by how it is written), 2.5 is refused above."""
    from dynas.cli import _parse

    (tmp_path / "c.yaml").write_text("trials: 3.0\nseed: 7.0\n")
    args = _parse(["search", "--config", str(tmp_path / "c.yaml")])
    assert (args.trials, args.seed) == (3, 7) and type(args.trials) is int and type(args.seed) is int


def _metrics(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


def test_the_same_train_command_trains_the_same_model(base_run, tmp_path, capsys):
    """--seed seeds the initial weights too: two identical runs give identical metrics and weights."""
    import torch

    runs = []
    for name in ("a", "b", "c"):
        seed = "1" if name == "c" else "0"
        argv = ["train", "--arch", base_run[1], *TINY, "--max-steps-per-epoch", "3", "--seed", seed, "--out", str(tmp_path / name)]
        assert main(argv) == 0
        runs.append((_metrics(tmp_path / name), torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]))
    (a, weights_a), (b, weights_b), (c, _) = runs
    assert a == b and a["final_loss"] != c["final_loss"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_the_same_search_trains_the_same_trials(base_run, tmp_path, capsys):
    again = tmp_path / "again"
    assert main([a.replace("{run}", str(again)) for a in SEARCH]) == 0
    first, second = ([json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()] for run in (base_run[0], again))
    assert [(r["arch"], r["val_top1"], r["val_top1_history"]) for r in first] == [
        (r["arch"], r["val_top1"], r["val_top1_history"]) for r in second
    ]


def test_a_run_whose_every_trial_fails_exits_1_with_one_line(tmp_path, capsys):
    """A learning rate of 1e30 makes every candidate diverge: the run ends (it used to train forever) and says so."""
    run = tmp_path / "run"
    argv = [*(a.replace("{run}", str(run)) for a in SEARCH), "--max-steps-per-epoch", "3", "--lr", "1e30"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dynas: error: every trial of this run failed (2), none trained; see the `reason` column of {run / 'results.csv'}."
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows] == ["failed", "failed"] and "diverged" in rows[0]["reason"]


def test_a_database_outage_mid_run_is_one_line_and_a_rerun_continues(tmp_path, capsys, monkeypatch):
    """The database goes away when trial 1 is told (its row written): one line, exit 2; the rerun finishes the run."""
    import optuna
    from sqlalchemy.exc import OperationalError

    run = tmp_path / "run"
    argv = [*(a.replace("{run}", str(run)) for a in SEARCH), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
            "--heartbeat-interval", "1", "--grace-period", "2"]
    real = optuna.storages.RDBStorage.set_trial_state_values
    completed = []

    def set_trial_state_values(self, trial_id, state, values=None):
        if state == optuna.trial.TrialState.COMPLETE:
            if completed:
                raise OperationalError("UPDATE trials", {}, Exception("server closed the connection unexpectedly\n\tThis probably means ..."))
            completed.append(trial_id)
        return real(self, trial_id, state, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", set_trial_state_values)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"dynas: error: lost storage 'sqlite:///.*study\.db' mid-run \(\(builtins\.Exception\) server closed "
                        r"the connection unexpectedly\); the results table is up to date: rerun the same command once "
                        r"the database is back to continue\.", err), err
    table = (run / "results.jsonl").read_bytes()
    assert [json.loads(line)["state"] for line in table.splitlines()] == ["complete", "complete"]
    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", real)
    # Trial 1 never reached the database as finished: once its heartbeat is stale it is failed and
    # queued again, and the rerun trains one more trial (a queued one, or trial 1's again, answered
    # from its row) to reach --trials; every row of the first run stays as it was.
    assert main(argv) == 0
    after = (run / "results.jsonl").read_bytes()
    assert after.startswith(table)
    assert [json.loads(line)["state"] for line in after[len(table):].splitlines()] in (["complete"], ["duplicate"])


def test_export_without_onnx_writes_the_rest_and_says_how_to_get_it(base_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(run), "--no-latency"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == "dynas: warning: model.onnx not written: ONNX export needs the onnx package: pip install 'dynas[export]', then export again"
    [folder] = (run / "export").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["arch.json", "card.md", "model.pt", "model.ts"]
    assert "model.onnx was not written" in (folder / "card.md").read_text()
