"""The machine record (kdprobe.runtime.machine): in every checkpoint and study summary, and what compare decides by."""
import torch

from kdprobe.checkpoints.format import library_versions, load_checkpoint, save_checkpoint
from kdprobe.runtime.machine import describe, machine, machine_of, same_machine


def test_record_names_cpu_capability_and_threads_as_torch_sees_them(monkeypatch):
    rec = machine()
    assert rec["cpu"] and rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rec["threads"] == torch.get_num_threads() and "cuda" not in machine("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)  # another thread count is another machine type: reductions split otherwise
        assert machine()["threads"] == before + 1 and not same_machine(rec, machine())
    finally:
        torch.set_num_threads(before)
    other = "avx2" if rec.get("env", {}).get("ATEN_CPU_CAPABILITY") == "default" else "default"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", other)  # overrides of kernel dispatch are part of the record
    assert machine()["env"]["ATEN_CPU_CAPABILITY"] == other and not same_machine(rec, machine())
    assert same_machine(rec, dict(rec), "2.14.1", "2.14.1") and not same_machine(rec, dict(rec), "2.14.1", "2.15.0")
    assert not same_machine(rec, None) and describe(None) == "not recorded"
    assert describe(rec).startswith(rec["cpu"]) and f"{rec['cpu_capability']}, {rec['threads']} threads" in describe(rec)


def test_checkpoints_and_summaries_record_the_machine(tmp_path, tiny_resnet):
    assert library_versions()["machine"] == machine()
    ck = load_checkpoint(save_checkpoint(tmp_path / "m.pt", tiny_resnet, {"method": "scratch"}))
    assert machine_of(ck.meta["versions"]) == machine()  # plain types: weights_only loading took it

    from trainers.study_probes import _versions

    v = _versions(torch.device("cpu"))
    assert v["machine"] == machine("cpu") and v["torch"] == str(torch.__version__)


def test_report_shows_the_machine_as_text():
    from kdprobe.writers.report import _flat

    assert _flat({"cpu": "X", "threads": 2, "env": {"ATEN_CPU_CAPABILITY": "avx2"}}) == \
        "cpu X, threads 2, env ATEN_CPU_CAPABILITY avx2"
    assert _flat("2.14.1") == "2.14.1"
