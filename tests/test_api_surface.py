"""The public API as a user meets it: every exported name resolves and says what it does, `import kdprobe`
stays light, and each function's keyword arguments carry its CLI command's option names and defaults."""
import inspect
import pydoc
import subprocess
import sys

import pytest

import kdprobe

# API function -> the CLI command it mirrors
MIRRORS = {"agreement": "agreement", "cka": "cka", "calibration": "calibration", "sharpness": "sharpness",
           "landscape": "landscape", "interpolate": "interpolate", "diversity": "diversity", "surplus": "surplus",
           "evaluate": "eval", "train": "train", "prune": "prune", "pipeline": "pipeline pruning"}
# CLI options that name output files or terminal behaviour: results are saved with .save(path) instead
OUTPUT_OPTIONS = {"csv", "json", "html", "vtk_height", "plot", "quiet", "overwrite", "figures",
                  "print_config"}  # `train --print-config`: kdprobe.train_config_toml(...) returns the text


def test_every_exported_name_resolves_and_has_a_docstring():
    missing = []
    for name in kdprobe.__all__:
        obj = getattr(kdprobe, name)
        if name.startswith("__"):
            continue
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            missing.append(name)
    assert not missing, f"no docstring: {missing}"


def test_help_of_the_package_lists_the_api():
    text = pydoc.render_doc(kdprobe, renderer=pydoc.plaintext)
    for name in ("load", "load_dataset", "agreement", "landscape", "diversity", "train"):
        assert name in text


def test_import_kdprobe_is_light():
    code = ("import sys, kdprobe; heavy = [m for m in sys.modules if m.startswith('kdprobe.api.') or m.split('.')[0] "
            "in ('typer', 'trainers', 'cli', 'plotly', 'pandas')]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'agreemnt'"):
        kdprobe.agreemnt  # noqa: B018


def _cli_options(command: str) -> dict:
    from cli.main import COMMANDS
    from cli.pipeline import pruning

    fn = {**dict(COMMANDS), "pipeline pruning": pruning}[command]
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.default is inspect.Parameter.empty:  # an argument (the checkpoints), not an option
            continue
        out[name] = p.default
    return out


@pytest.mark.parametrize("api_name", sorted(MIRRORS))
def test_keyword_arguments_carry_the_cli_option_names_and_defaults(api_name):
    api = inspect.signature(getattr(kdprobe, api_name)).parameters
    wrong = []
    for name, default in _cli_options(MIRRORS[api_name]).items():
        if name in OUTPUT_OPTIONS:
            continue
        if name not in api:
            wrong.append(f"{name}: missing")
        elif api[name].default != default and not (isinstance(default, list) and api[name].default is None):
            wrong.append(f"{name}: API default {api[name].default!r}, CLI default {default!r}")
    assert not wrong, f"kdprobe.{api_name} vs kdprobe {MIRRORS[api_name]}: {wrong}"


def test_info_gives_the_cli_json_document(tmp_path):
    """kdprobe.info and `kdprobe info --json` agree; the sizes are counted independently here."""
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from kdprobe.checkpoints.format import save_checkpoint

    model = kdprobe.create_model("resnet8b", num_classes=10, in_channels=1)
    path = save_checkpoint(tmp_path / "m.pt", model, {"method": "scratch", "dataset": "digits", "seed": 0,
                                                      "input_shape": [1, 8, 8]})
    r = CliRunner().invoke(app, ["info", str(path), "--json", str(tmp_path / "i.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "i.json").read_text())
    res = kdprobe.info(path)
    assert json.loads(json.dumps(res.to_dict(), default=str)) == doc
    assert res.size["params"] == sum(p.numel() for p in model.parameters())
    out = res.save(tmp_path / "again.json")
    assert json.loads(out.read_text()) == doc
    with pytest.raises(kdprobe.KdprobeError, match="ending in .json"):
        res.save(tmp_path / "x.csv")
