import subprocess
import sys


def test_import_kdprobe_pulls_in_no_cli_trainers_or_typer():
    code = ("import sys, kdprobe, kdprobe.checkpoint, kdprobe.data, kdprobe.probes, kdprobe.stats; "
            "bad = [m for m in ('typer', 'trainers', 'cli') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_trainers_do_not_import_cli_or_typer():
    code = ("import sys, trainers.loop, trainers.recipes; "
            "bad = [m for m in ('typer', 'cli') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
