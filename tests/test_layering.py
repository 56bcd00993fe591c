"""The layering of the package: lower layers never import the model zoo, the trainer never names DSET.

src/core, src/misc, src/data, src/optim and src/nn sit below src/zoo (the zoo uses them; box ops used by the
data pipeline live in src/nn/box_ops.py). DSET plugs into the training loop through hooks it registers
itself (src/zoo/rtdetr/dset_hooks.py), so src/solver/trainer.py imports nothing from the zoo.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOWER_LAYERS = ("core", "misc", "data", "optim", "nn")


def imported_modules(path: Path):
    """(line, module) of every import statement of a file, at any depth (function-local imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # `from src import zoo`
                yield node.lineno, f"{node.module}.{alias.name}"


def test_imported_modules_sees_function_local_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom src import zoo\n\ndef g():\n    from src.zoo.rtdetr import cass\n")
    assert [m for _, m in imported_modules(f)] == ["os", "src", "src.zoo", "src.zoo.rtdetr", "src.zoo.rtdetr.cass"]


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_never_import_the_zoo(layer):
    files = sorted((REPO / "src" / layer).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(REPO)}:{line}: {m}" for f in files for line, m in imported_modules(f)
           if m == "src.zoo" or m.startswith("src.zoo.")]
    assert not bad, "lower layers import the model zoo:\n" + "\n".join(bad)


def test_trainer_imports_nothing_of_the_zoo_and_names_no_dset():
    path = REPO / "src" / "solver" / "trainer.py"
    zoo = [m for _, m in imported_modules(path) if m.startswith("src.zoo")]
    assert zoo == []
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not [n for n in names if any(w in n.lower() for w in ("dset", "cass", "moe"))]
    assert len(path.read_text().splitlines()) <= 300


def test_dset_registers_its_config_section_and_training_hook():
    from src.core import registry
    from src.core.hooks import build_hooks
    from src.zoo.rtdetr.dset_config import validate_dset
    from src.zoo.rtdetr.dset_hooks import DSETHook

    assert registry.sections()["dset"][0] is validate_dset

    class Cfg:
        dset = validate_dset({"keep_ratio": 0.5})

    hooks = build_hooks(Cfg())
    assert [type(h) for h in hooks] == [DSETHook] and hooks[0].dset.pruner.keep_ratio == 0.5
    Cfg.dset = None
    assert build_hooks(Cfg()) == []


def test_importing_any_module_of_the_package_registers_every_component():
    """No hidden importlib list: `src/__init__.py` imports the registering packages, so a fresh interpreter
    that imports only the registry sees every component, section, hook factory and weight adapter."""
    import subprocess
    import sys

    code = ("import src.core.registry as r, src.core.hooks as h, src.misc.checkpoint as c; "
            "print(sorted(r.registered_names())); print(sorted(r.sections())); "
            "print(len(h._FACTORIES), [a.__name__ for a in c.weight_adapters()])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    names, sections, rest = out.stdout.strip().splitlines()
    for name in ("PResNet", "HybridEncoder", "RTDETRTransformerv2", "RTDETR", "DSETRTDETR", "HungarianMatcher",
                 "RTDETRCriterionv2", "DSETCriterion", "RTDETRPostProcessor", "CocoDetection",
                 "BatchImageCollateFunction", "Resize"):
        assert repr(name) in names, name
    assert sections == "['dset']"
    assert rest == "1 ['copy_single_aifi_to_all_levels', 'expand_dense_ffn_state']"


def test_nothing_in_the_package_imports_modules_by_name_strings():
    """Every edge between the package's modules is an import statement the tests above can see."""
    bad = [f"{f.relative_to(REPO)}" for f in sorted((REPO / "src").rglob("*.py"))
           if "importlib" in f.read_text()]
    assert not bad, bad


@pytest.mark.parametrize("name", ["trainer.py", "checkpointing.py", "train_step.py", "loaders.py", "evaluator.py"])
def test_the_training_loop_imports_nothing_of_the_zoo(name):
    zoo = [m for _, m in imported_modules(REPO / "src" / "solver" / name) if m.startswith("src.zoo")]
    assert zoo == [], zoo


OFFICIAL_MODULES = ("hybrid_encoder", "rtdetrv2_decoder", "rtdetr", "rtdetrv2_criterion", "matcher",
                    "rtdetr_postprocessor", "denoising", "deformable_attention", "position_embedding", "box_ops")
DSET_MODULES = ("patch_level_pruning", "moe", "cass", "cass_targets", "cass_losses", "cass_metrics", "cass_oracle",
                "dset_config",
                "dset_encoder", "dset_decoder", "dset_model", "dset_criterion", "dset_losses", "dset_hooks")


@pytest.mark.parametrize("name", OFFICIAL_MODULES)
def test_the_official_modules_import_nothing_of_dset_and_name_it_nowhere_in_code(name):
    path = REPO / "src" / "zoo" / "rtdetr" / f"{name}.py"
    bad = [m for _, m in imported_modules(path) if m.rsplit(".", 1)[-1] in DSET_MODULES]
    assert bad == []
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
            {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
    assert not [n for n in names if any(w in n.lower() for w in ("dset", "cass", "moe", "prune"))]


DEPLOY_MODULES = ("deploy", "weights", "cuda_graph")  # around a built model: loading, fusion, export, CUDA graphs


def test_every_zoo_module_is_official_or_dset():
    found = {p.stem for p in (REPO / "src" / "zoo" / "rtdetr").glob("*.py")} - {"__init__", *DEPLOY_MODULES}
    assert found == set(OFFICIAL_MODULES) | set(DSET_MODULES)


@pytest.mark.parametrize("folder", ["bench", "tools"])
def test_bench_and_tools_import_only_the_package_never_each_other_or_tests(folder):
    other = {"bench": "tools", "tools": "bench"}[folder]
    bad = [f"{f.relative_to(REPO)}:{line}: {m}" for f in sorted((REPO / folder).glob("*.py"))
           for line, m in imported_modules(f) if m.split(".")[0] in (other, "tests")]
    assert not bad, bad
