"""What `splinter pretrain` will train on, read and checked on the driver before Ray starts.

The mined data (`inspect_mined`: complete, its columns, size, longest sequence, the [QUESTION] id and
the largest token id it uses, the tokenizer it was mined with) and the model (`resolve_model`: its
config and tokenizer, no weights) must fit (`check_fit`): the same vocabulary and casing, the same
[QUESTION] id, ids inside the vocabulary, sequences inside the position table. Every mismatch is a
`ConfigError` of one line that says to mine with the model's tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.paths import is_uri
from pipeline.settings import ConfigError
from pipeline.storage.filesystems import filesystem
from pipeline.storage.rundir import JOB_FILE, STATS_FILE, SUCCESS_FILE
from splinter.config import MODEL_SIZES, SplinterConfig

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------- the mined data
@dataclass
class MinedData:
    """What the driver learns from a `splinter mine` output before training on it."""

    files: list[str]
    rows: int
    layout: str
    max_length: int
    question_ids: set[int]
    max_id: int
    tokenizer: str | None  # the mining tokenizer as the mining job recorded it
    columns: list[str]


def inspect_mined(mined: str) -> MinedData:
    """Check that MINED is a complete mining output and read what training needs to know about it."""
    fs, root = filesystem(mined)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ConfigError(f"mined data {mined} is not a directory; pass the output directory of `splinter mine`")
    # The mining job's bookkeeping (see pipeline.engine.commit): completion marker, what wrote it, its stats.
    success, job_file, stats_file = (f"{root}/{name}" for name in (SUCCESS_FILE, JOB_FILE, STATS_FILE))
    if fs.get_file_info(success).type != pafs.FileType.File:
        raise ConfigError(
            f"mined data {mined} has no _SUCCESS: the mining run is incomplete; finish it with `splinter mine ... --resume`"
        )
    job: dict[str, Any] = {}
    if fs.get_file_info(job_file).type == pafs.FileType.File:
        with fs.open_input_stream(job_file) as f:
            job = json.loads(f.read())
    if job.get("job", "mine") != "mine":
        raise ConfigError(f"{mined} was written by `splinter {job.get('job')}`, not `splinter mine`")
    infos = fs.get_file_info(pafs.FileSelector(root))
    files = sorted(i.path for i in infos if i.base_name.startswith("shard-") and i.base_name.endswith(".parquet"))
    if not files:
        raise ConfigError(f"mined data {mined} holds no shard-*.parquet files")
    # The row count from the job's stats.json (one read, whatever the number of shards); the ids are
    # sampled from the first shard that has rows (the workers check every batch again).
    rows = -1
    if fs.get_file_info(stats_file).type == pafs.FileType.File:
        with fs.open_input_stream(stats_file) as f:
            rows = int(json.loads(f.read()).get("rows_out", -1))
    max_length, sample = 0, None
    for path in files:
        meta = pq.read_metadata(path, filesystem=fs)
        if meta.num_rows:
            sample = pq.read_table(path, filesystem=fs, columns=["input_ids", "question_positions"])
            break
    if rows < 0:
        rows = sum(pq.read_metadata(path, filesystem=fs).num_rows for path in files)
    schema = pq.read_schema(files[0], filesystem=fs)
    needed = ["input_ids", "attention_mask", "token_type_ids", "question_positions", "start_positions", "end_positions"]
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise ConfigError(f"{files[0]} lacks columns {missing}: is {mined} a `splinter mine` output?")
    if rows == 0 or sample is None:
        raise ConfigError(f"mined data {mined} has no rows: mine a larger corpus")
    question_ids, max_id = set(), 0
    for ids, positions in zip(sample["input_ids"].to_pylist(), sample["question_positions"].to_pylist(), strict=True):
        question_ids.update(ids[p] for p in positions)
        max_id = max(max_id, max(ids))
        max_length = max(max_length, len(ids))
    config = job.get("settings") or {}
    max_length = max(max_length, int(config.get("max_seq_length", 0)))
    columns = needed + (["position_ids"] if "position_ids" in schema.names else [])
    layout = "original" if "position_ids" in schema.names else "collapsed"
    if is_uri(mined):
        files = [f"{mined.split('://', 1)[0]}://{f}" for f in files]
    return MinedData(files, rows, layout, max_length, question_ids, max_id, config.get("tokenizer"), columns)


# ---------------------------------------------------------------------------------------- the model
@dataclass
class ModelSource:
    """Where the weights come from, the model's config, and the tokenizer saved with checkpoints."""

    kind: str  # model | bert | config
    path: str | None
    config: SplinterConfig
    tokenizer: Any
    label: str = ""  # how the user named it, for messages

    def plain(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(Path(self.path).resolve()) if self.path else None,
            "config": self.config.to_dict(),
            "question_token_id": self.config.question_token_id,
        }


def _mining_tokenizer(data: MinedData) -> Any:
    """The tokenizer the data was mined with, when it can be found here (None: the bundled one)."""
    from pipeline.stages.recurring_spans import load_mining_tokenizer

    if data.tokenizer and not os.path.exists(data.tokenizer):
        return None
    return load_mining_tokenizer(data.tokenizer)


def resolve_model(model: str | None, from_bert: str | None, size: str | None, data: MinedData) -> ModelSource:
    """Read the model's config (no weights) and its tokenizer on the driver.

    Exactly one source is given: `model` (a Splinter checkpoint), `from_bert` (a BERT checkpoint), or
    `size` ("base", "large" or a config.json path) for a fresh model over the mining vocabulary.
    """
    from splinter.bert import bert_config_to_splinter
    from splinter.tokenizer import SplinterTokenizer

    try:
        if model:
            config = SplinterConfig.from_pretrained(model)
            has_tok = any((Path(model) / n).is_file() for n in ("tokenizer.json", "vocab.txt"))
            tokenizer = SplinterTokenizer.from_pretrained(model) if has_tok else _mining_tokenizer(data)
            return ModelSource("model", model, config, tokenizer, f"--model {model}")
        if from_bert:
            tokenizer = SplinterTokenizer.for_bert(from_bert)
            config = bert_config_to_splinter(from_bert)
            config.question_token_id = tokenizer.question_token_id
            return ModelSource("bert", from_bert, config, tokenizer, f"--from-bert {from_bert}")
        assert size is not None
        tokenizer = _mining_tokenizer(data) or SplinterTokenizer.default()
        if size in MODEL_SIZES:
            config = SplinterConfig(
                **MODEL_SIZES[size],
                vocab_size=len(tokenizer.get_vocab()),
                question_token_id=tokenizer.question_token_id,
                max_position_embeddings=max(512, data.max_length),
            )
        else:
            config = SplinterConfig.from_json_file(size)
        return ModelSource("config", None, config, tokenizer, f"--model-config {size}")
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def check_fit(data: MinedData, source: ModelSource, mined: str) -> None:
    """The mined token ids must mean to the model what they meant to the miner; one line when not."""
    config, where = source.config, source.label
    hint = "mine with the model's tokenizer: `splinter mine CORPUS OUT --tokenizer MODEL_DIR`"
    if data.question_ids != {config.question_token_id}:
        found = ", ".join(str(i) for i in sorted(data.question_ids))
        raise ConfigError(
            f"{mined} marks questions with token id {found}, but the model ({where}) has question_token_id "
            f"{config.question_token_id}; {hint}"
        )
    if data.max_id >= config.vocab_size:
        raise ConfigError(
            f"{mined} holds token id {data.max_id}, outside the model's vocabulary ({where}: vocab_size "
            f"{config.vocab_size}); {hint}"
        )
    if data.max_length > config.max_position_embeddings:
        raise ConfigError(
            f"{mined} has sequences of {data.max_length} tokens, more than the model's "
            f"max_position_embeddings {config.max_position_embeddings}; mine with --max-seq-length "
            f"{config.max_position_embeddings} or less"
        )
    miner, model_tok = _mining_tokenizer(data), source.tokenizer
    if miner is None:
        logger.warning(
            "the tokenizer %s that %s was mined with is not here: only the token ids were checked against the model",
            data.tokenizer, mined,
        )
    if miner is not None and model_tok is not None and (
        miner.get_vocab() != model_tok.get_vocab() or miner.do_lower_case != model_tok.do_lower_case
    ):
        raise ConfigError(
            f"{mined} was mined with another vocabulary or casing than the model's tokenizer ({where}): "
            f"the same ids would mean other words; {hint}"
        )
