"""The repo's floors: every import between the core files goes downward (a script at the top, the model and
UserError at the bottom), and dispatch.py, which only decides, imports no weight format or layer."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top; a file may import only files on lower floors.
FLOORS = [
    ("errors",),
    ("model", "writing", "reading", "quants", "kernels.cpu", "kernels.triton_moe"),
    ("names",),
    ("dispatch", "gguf_file"),
    ("formats",),
    ("layers",),
    ("tp", "measuring"),
    ("checkpoint",),
    ("generation", "cli", "calibrate"),
    ("generate", "eval", "quantize", "server"),
]
FLOOR = {module: n for n, modules in enumerate(FLOORS) for module in modules}


def imports(module: str) -> set:
    """The core modules `module` imports, anywhere in the file (a function's own imports included)."""
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found & FLOOR.keys()


def test_every_core_import_goes_down():
    upward = [(module, imported) for module in FLOOR for imported in imports(module)
              if FLOOR[imported] >= FLOOR[module] and imported != module]
    assert not upward, upward


def test_dispatch_decides_and_calls_no_format_or_layer():
    assert not imports("dispatch") & {"formats", "layers", "checkpoint", "tp"}


def test_the_floors_name_every_core_file():
    """A new core file gets a floor here: otherwise its imports go unchecked."""
    core = {p.stem for p in REPO.glob("*.py")} | {f"kernels.{p.stem}" for p in (REPO / "kernels").glob("*.py")}
    assert core - {"kernels.__init__"} == set(FLOOR)
