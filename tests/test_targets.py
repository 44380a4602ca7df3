"""The registries that carry their options (toolkit/core/targets.py): `toolkit export NAME` and `toolkit quantize
NAME` are generated from what exporters/ and quant/ declare; a new exporter is one module; the CLI holds no branch on
a format, runtime or family."""
from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import exporters
import quant
import runtimes
from tests.conftest import ROOT, assert_usage_error, run_cli
from tests.helpers import random_bundle
from toolkit.app.target_commands import add_commands
from toolkit.core.arch import FAMILIES
from toolkit.core.targets import Outcome, Target, beside, fields, option

NPZ_EXPORTER = '''"""A new exporter: the checkpoint's tensors in one NumPy .npz."""
from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.targets import Outcome, Target, beside, option


@dataclass(frozen=True)
class NpzOptions:
    dtype: str = option("float32", "float32 or float16.")


def run(src, dest, opts, ctx):
    import numpy as np
    import torch

    bundle = ctx.load(src)
    arrays = {name: bundle.load(name, torch.float32).numpy().astype(opts.dtype) for name in bundle.tensors}
    with open(dest, "wb") as f:
        np.savez(f, **arrays)
    return Outcome(dest, f"{len(arrays)} tensors as {opts.dtype}")


TARGETS = (Target(command="export", name="npz", summary="The tensors as one NumPy .npz.",
                  help="Every tensor of the checkpoint in one .npz.", options=NpzOptions,
                  module="exporters.npz_weights", default_dest=lambda src, opts: beside(src, f"-{opts.dtype}.npz")),)
'''


@pytest.fixture
def hf_dir(tmp_path):
    from toolkit.checkpoints.hf_writer import save_hf

    save_hf(random_bundle("llama"), tmp_path / "hf")
    return tmp_path / "hf"


def test_a_new_exporter_is_one_module(tmp_path, hf_dir):
    """Copy the product, add exporters/npz_weights.py: `toolkit export npz` exists with its option, runs, and keeps
    the CLI contract (an existing output refused) without a line elsewhere."""
    for pkg in ("toolkit", "exporters", "quant", "runtimes"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "exporters" / "npz_weights.py").write_text(NPZ_EXPORTER)
    env = {"PYTHONPATH": str(tmp_path)}
    listing = run_cli("export", "--help", env=env, cwd=tmp_path)
    assert "npz" in listing.stdout and "NumPy" in listing.stdout, listing.stdout
    assert "--dtype" in run_cli("export", "npz", "--help", env=env, cwd=tmp_path).stdout
    proc = run_cli("export", "npz", hf_dir, "--dtype", "float16", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dest = Path(proc.stdout.strip())
    assert dest == beside(hf_dir, "-float16.npz") and "tensors as float16" in proc.stderr
    from toolkit.checkpoints import load_checkpoint

    bundle = load_checkpoint(hf_dir)
    with np.load(dest) as got:
        assert sorted(got.files) == sorted(bundle.tensors)
        for name in bundle.tensors:
            want = bundle.load(name, torch.float32).numpy().astype(np.float16)
            assert got[name].dtype == np.float16 and np.array_equal(got[name], want), name
    assert "already exists" in assert_usage_error(run_cli("export", "npz", hf_dir, "--dtype", "float16", env=env,
                                                          cwd=tmp_path))
    assert "npz" not in {t.name for t in exporters.registry()}  # the product itself does not have it


def test_every_declared_option_is_on_its_command():
    """Each target's options dataclass is what its --help offers, help text included."""
    declared = exporters.registry() + quant.registry()
    assert {(t.command, t.name) for t in declared} >= {("export", "gguf"), ("export", "onnx"), ("export", "mnn"),
                                                        ("quantize", "int8"), ("quantize", "int4")}
    for target in declared:
        text = " ".join(run_cli(target.command, target.name, "--help").stdout.split())
        for f in fields(target.options):
            flag = (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0].split("/")[0]
            assert flag in text, (target.name, flag)
            assert " ".join(f.metadata["help"].split())[:40] in text, (target.name, f.name)


# --- several formats under one name: a fake pair of targets whose entry records what it was given -------------
RECORDED: list = []


@dataclass(frozen=True)
class HfOptions:
    group_size: int = option(128, "Weights per scale.")
    method: str = option("gptq", "gptq or rtn.")


@dataclass(frozen=True)
class GraphOptions:
    group_size: int = option(32, "Weights per block.")


def record(src, dest, opts, ctx):
    RECORDED.append((dest, opts))
    Path(dest).write_text("x")
    return Outcome(Path(dest), "recorded")


def fake_targets() -> list[Target]:
    common = dict(command="quantize", name="int4", summary="x", help="x", module=__name__, entry="record")
    return [Target(format="graph", options=GraphOptions, handles=lambda src: Path(src).suffix == ".graph",
                   default_dest=lambda src, o: beside(src, f"-graph-g{o.group_size}"), **common),
            Target(format="hf", options=HfOptions, default=True,
                   default_dest=lambda src, o: beside(src, f"-{o.method}-g{o.group_size}"), **common)]


@pytest.mark.parametrize("args, fmt, want", [
    ([], "hf", HfOptions(128, "gptq")),  # auto: not a .graph -> the default format, its own default
    (["--format", "graph"], "graph", GraphOptions(32)),  # the other format's own default
    (["--group-size", "64", "--method", "rtn"], "hf", HfOptions(64, "rtn")),
    (["--format", "graph", "--group-size", "16", "--method", "rtn"], "graph", GraphOptions(16)),  # hf-only ignored
])
def test_formats_sharing_a_name_get_their_own_defaults(tmp_path, args, fmt, want):
    group = typer.Typer(rich_markup_mode=None)
    add_commands(group, fake_targets())
    group.command("unused")(lambda: None)  # two commands: typer keeps the subcommand name
    RECORDED.clear()
    result = CliRunner().invoke(group, ["int4", str(tmp_path / "m"), *args])
    assert result.exit_code == 0, result.output
    (dest, opts), = RECORDED
    assert opts == want and type(opts).__name__ == ("HfOptions" if fmt == "hf" else "GraphOptions")
    assert dest.name == (f"m-graph-g{want.group_size}" if fmt == "graph" else f"m-{want.method}-g{want.group_size}")


def test_auto_format_follows_the_input_and_help_names_both_defaults(tmp_path):
    group = typer.Typer(rich_markup_mode=None)
    add_commands(group, fake_targets())
    group.command("unused")(lambda: None)
    RECORDED.clear()
    assert CliRunner().invoke(group, ["int4", str(tmp_path / "m.graph")]).exit_code == 0
    assert RECORDED[0][1] == GraphOptions(32)
    text = " ".join(CliRunner().invoke(group, ["int4", "--help"]).output.split())
    assert "hf: Weights per scale. Default: 128. graph: Weights per block. Default: 32." in text
    assert "hf: gptq or rtn." in text


# --- the CLI holds no branch on a format, runtime or family ------------------------------------------------------
def branch_names() -> set[str]:
    """Every name a branch on a format, runtime or family would compare against."""
    names = {t.name for t in exporters.registry() + quant.registry()}
    names |= {t.format for t in exporters.registry() + quant.registry() if t.format}
    names |= {spec.name for spec in runtimes.declared()} | {s.with_name for s in runtimes.declared() if s.with_name}
    return names | set(FAMILIES) | {"gguf", "onnx", "mnn", "hf", "torch", "bnb"}


def branches_on_names(source: str, names: set[str]) -> list[str]:
    """Comparisons with, membership tests of and lookups by one of `names`, and branches on a family's
    properties (`cfg.fam.moe`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                for const in ast.walk(operand):
                    if isinstance(const, ast.Constant) and const.value in names:
                        found.append(f"line {node.lineno}: compares with {const.value!r}")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and node.slice.value in names:
            found.append(f"line {node.lineno}: looks up {node.slice.value!r}")
        elif isinstance(node, (ast.If, ast.IfExp, ast.While)):
            if any(isinstance(a, ast.Attribute) and a.attr == "fam" for a in ast.walk(node.test)):
                found.append(f"line {node.lineno}: branches on a family's properties")
    return found


@pytest.mark.parametrize("module", ["cli.py", "target_commands.py"])
def test_the_cli_has_no_format_or_family_branch(module):
    assert branches_on_names((ROOT / "toolkit" / "app" / module).read_text(), branch_names()) == []


@pytest.mark.parametrize("planted", ['if outtype == "q4_k_m" or fmt == "onnx":\n    pass',
                                     'x = RUNTIMES["llama_cpp"]', 'if arch in ("nanochat",):\n    pass',
                                     'if cfg.fam.moe:\n    pass'])
def test_the_branch_check_catches_a_planted_branch(planted):
    names = branch_names() | {"q4_k_m"}
    assert branches_on_names(planted, names), planted
