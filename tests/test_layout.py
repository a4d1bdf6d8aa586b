"""The module layout the README promises: imports run one way, bottom to top, and no project module is
imported inside a function (the usual way to hide a cycle)."""

import ast
import os
import subprocess
import sys

import pytest

import config
import decoder
import modeling_actcls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module may import only modules of a lower layer. `prepare` (the converters' package) sits with the
# scripts' inputs: only inference.py (the default prompt, from prepare.records) and the top layer use it.
LAYERS = {"video": 0, "decoder": 0, "chat": 0, "losses": 0,  # no project imports: they can be copied anywhere as they are
          "modeling_actcls": 0.5,  # the export's transformers code: copied into every export with the three above
          "config": 1,  # the schema
          "batch_plan": 1,  # which samples go into which micro-batch, on which rank
          "distributed": 2,  # process group, rank-0 printing, collectives, FSDP2
          "checkpoint": 3,  # the checkpoint on disk, atomic writes
          "run_folder": 3.5,  # output_dir belongs to one run: the lock, what an earlier run left
          "llamafactory": 4,  # LLaMA-Factory / IVCP translation
          "model": 5, "merge": 6,  # merge: export.py's streamed LoRA/DoRA merge
          "data": 6, "loaders": 6.5,  # loaders: DataLoader workers and the training stream
          "evaluation": 7, "metrics": 7, "prepare": 7.5, "inference": 8,
          "train": 9, "predict": 9, "export": 9}  # the scripts, never importing each other


def project_imports(path):
    """(imported project module, line, inside a function?) for every import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            found.extend((n, child.lineno, inner) for n in names if n in LAYERS)
            visit(child, inner)
    visit(tree, False)
    return found


def root_modules():
    return sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))


def test_every_root_module_has_a_layer():
    assert set(root_modules()) <= set(LAYERS), "add the new module to LAYERS (and to the README's map)"


@pytest.mark.parametrize("module", root_modules())
def test_imports_run_one_way(module):
    layer = LAYERS[module]
    for imported, line, in_function in project_imports(os.path.join(ROOT, f"{module}.py")):
        assert LAYERS[imported] < layer, f"{module}.py:{line} imports {imported}, which is not below it"
        assert not in_function, f"{module}.py:{line} imports {imported} inside a function"


def test_config_parses_without_torch():
    """The schema is importable on its own, without torch (a fresh interpreter: this one has torch)."""
    check = "import sys, config; loaded = [m for m in sys.modules if m.split('.')[0] == 'torch']; assert not loaded, loaded"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_config_knows_every_head_type():
    assert config.DECODER_TYPES == decoder.DECODER_TYPES


def parameter_counts(path):
    """(function name, line, parameters not counting self/cls) for every function in the file."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
            yield node.name, node.lineno, len([n for n in names if n not in ("self", "cls")])


@pytest.mark.parametrize("module", root_modules() + ["prepare/" + n[:-3] for n in sorted(os.listdir(os.path.join(ROOT, "prepare")))
                                                    if n.endswith(".py")])
def test_no_function_takes_more_than_7_parameters(module):
    wide = [f"{module}.py:{line} {name} ({n})" for name, line, n in parameter_counts(os.path.join(ROOT, f"{module}.py"))
            if n > 7]
    assert not wide, "group the arguments (a dataclass, a config) instead: " + ", ".join(wide)


def test_the_code_copied_into_an_export_imports_only_itself():
    """export.py copies modeling_actcls.CODE_FILES into every export, which runs without the project:
    they may import one another and nothing else of it."""
    copied = {name[:-3] for name in modeling_actcls.CODE_FILES}
    for module in copied:
        imported = {name for name, _, _ in project_imports(os.path.join(ROOT, f"{module}.py"))}
        assert imported <= copied, f"{module}.py imports {imported - copied}, which an export does not hold"
