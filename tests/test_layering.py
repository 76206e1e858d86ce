import subprocess
import sys


def test_import_kdprobe_pulls_in_no_cli_trainers_or_typer():
    code = ("import sys, kdprobe, kdprobe.checkpoints.format, kdprobe.data.datasets, kdprobe.probes, kdprobe.stats; "
            "bad = [m for m in ('typer', 'trainers', 'cli') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_trainers_do_not_import_cli_or_typer():
    code = ("import sys, trainers.loop, trainers.recipes; "
            "bad = [m for m in ('typer', 'cli') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- the house: rooms of kdprobe/, which way they import, no circles --------------------------------------
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

KDPROBE = Path(__file__).resolve().parents[1] / "kdprobe"
# lowest first: a room imports only from rooms listed before it (and from itself)
FLOORS = [
    {"errors", "version"},
    {"ranges", "stats", "runtime"},
    {"files"},
    {"models", "data"},
    {"checkpoints"},
    {"pruning", "probes"},
    {"studies"},
    {"writers"},
    {"api"},  # the public functions and their results, on top of every room
    {"kdprobe"},  # kdprobe/__init__.py: re-exports the api
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in KDPROBE.rglob("*.py"):
        parts = p.relative_to(KDPROBE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(path: Path, mods: dict) -> set[str]:
    """kdprobe modules `path` imports, at any depth (function-level imports count too)."""
    def resolve(n: str) -> str:
        while n and n not in mods:
            n = n.rpartition(".")[0]
        return n

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdprobe":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in mods else resolve(node.module))
        elif isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "kdprobe"}
    return found - {""}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kdprobe"


def test_every_room_imports_only_from_rooms_below_it():
    mods = _modules()
    floor = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
    assert {_room(m) for m in mods} <= set(floor), sorted({_room(m) for m in mods} - set(floor))
    wrong = []
    for m, p in mods.items():
        for dep in _imports(p, mods):
            a, b = _room(m), _room(dep)
            # importing a package's own __init__ (kdprobe.models) is importing that room
            if a != b and floor[b] >= floor[a]:
                wrong.append(f"{m} -> {dep}")
    assert not wrong, wrong


def test_no_two_modules_import_each_other_directly_or_around_a_circle():
    mods = _modules()
    graph = {m: {d for d in _imports(p, mods) if d != m and not mods[d].name == "__init__.py"} for m, p in mods.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):  # depth-first search for a back edge
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_module_says_its_job_in_its_first_docstring_line():
    missing = [str(p.relative_to(KDPROBE.parent)) for p in KDPROBE.rglob("*.py")
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not missing, missing
