"""Job configurations: one dataclass per job, validated before any work starts.

The CLI, `jobs/*.py` and Python callers all build these; a YAML or TOML file may supply any field
(`MineConfig.from_file`), with explicit flags taking precedence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import yaml

from pipeline.paths import is_uri

if TYPE_CHECKING:
    from splinter.pretrain import PretrainHParams
    from splinter.train import FinetuneConfig

# json: one JSON array of records. Any format may be gzip/bzip2/zstd compressed.
FORMATS = ("auto", "parquet", "jsonl", "json", "text", "textblocks", "wikiextractor", "squad", "mrqa")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the CLI prints it as one line."""


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's mapping: YAML (.yaml/.yml, also the default), TOML (.toml) or JSON (.json)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {p}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of field names to values")
    return data


def build_settings(cls: type, path: str | os.PathLike[str] | None, overrides: dict[str, Any],
                   nested: dict[str, type] | None = None) -> Any:
    """One way to build any job's settings: the config file's fields, then the flags that were given.

    `nested` names a field holding another dataclass (the training jobs' `training`: the library's
    hyper-parameters); its fields are written flat in the file and on the command line, as litgpt lets
    `train.lr` and `lr` mean one thing, so a user never has to know which object owns a knob.
    A key that no dataclass knows is an error naming the key, never silently ignored.
    """
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    own = {f.name for f in fields(cls)}
    inner_names = {name: {f.name for f in fields(inner)} for name, inner in (nested or {}).items()}
    top: dict[str, Any] = {}
    inner_values: dict[str, dict[str, Any]] = {name: {} for name in inner_names}
    for key, value in data.items():
        if key in own and key not in inner_names:
            top[key] = value
            continue
        owner = next((name for name, names in inner_names.items() if key in names), None)
        if owner is None:
            known = sorted(own - set(inner_names) | set().union(*inner_names.values()))
            where = f" in {path}" if path else ""
            raise ConfigError(f"unknown setting {key!r}{where}; known: {', '.join(known)}")
        inner_values[owner][key] = value
    for name, values in inner_values.items():
        top[name] = (nested or {})[name](**values)
    try:
        return cls(**top)
    except TypeError as exc:  # a required field neither in the file nor on the command line
        raise ConfigError(f"{cls.__name__}: {exc}") from None


@dataclass
class RunConfig:
    """Fields shared by both jobs: where data comes from, where it goes, how it is sharded."""

    job: ClassVar[str] = ""  # the command, as OUTPUT's job record names it

    input: list[str] = field(default_factory=list)
    output: str = ""
    input_format: str = "auto"
    # Most rows per shard for Parquet / SQuAD / JSON arrays (files per shard for plain text), most bytes per
    # shard for JSONL. A shard is the unit of work, commit and resume; small inputs get smaller shards
    # (see pipeline.storage.sources.TARGET_SHARDS) so they still spread over workers.
    shard_rows: int = 5_000
    shard_bytes: int = 4 << 20
    resume: bool = False
    overwrite: bool = False
    # "auto": RAY_ADDRESS if set, else an embedded local Ray; "none": a plain local loop without Ray.
    ray_address: str | None = None
    local: bool = False
    num_cpus: int | None = None
    # Minutes without a row or shard moving before a Ray job is stopped (one line, exit 1, --resume):
    # long enough for a model load or a node replacement on a slow cluster, short enough that a job
    # stuck after a node loss is stopped before anyone wonders where the output is.
    stall_timeout: float = 30.0

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("no input given: pass one or more files, directories, globs or URIs")
        if not self.output:
            raise ConfigError("no output given: pass a directory path or URI for the Parquet output")
        if self.input_format not in FORMATS:
            raise ConfigError(f"input_format must be one of {', '.join(FORMATS)}; got {self.input_format!r}")
        if self.shard_rows < 1 or self.shard_bytes < 1024:
            raise ConfigError("shard_rows must be >= 1 and shard_bytes >= 1024")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pick one")
        for path in self.input:
            if not is_uri(path) and not any(ch in path for ch in "*?[") and not os.path.exists(path):
                raise ConfigError(f"input not found: {path}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if not self.stall_timeout > 0:
            raise ConfigError(f"stall_timeout must be > 0 minutes, got {self.stall_timeout}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> Self:
        """Load fields from YAML (.yaml/.yml), TOML (.toml) or JSON; `overrides` that are not None win."""
        data = read_config_file(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        data = dict(data)
        if isinstance(data.get("input"), str):
            data["input"] = [data["input"]]
        return cls(**data)

    # Fields that change how a run is scheduled or where it goes, never the rows it writes.
    SCHEDULING = ("output", "resume", "overwrite", "ray_address", "local", "num_cpus", "stall_timeout")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def required_columns(self) -> dict[str, str]:
        """Columns every Parquet input must have -> the flag that names them (checked when planning)."""
        return {}

    def output_fields(self) -> dict[str, Any]:
        """The fields that decide the output: `--resume` is refused when they change."""
        return {k: v for k, v in self.to_dict().items() if k not in self.SCHEDULING}


@dataclass
class MineConfig(RunConfig):
    """Recurring-span pretraining data generation."""

    job: ClassVar[str] = "mine"

    text_column: str = "text"
    id_column: str = "id"
    tokenizer: str | None = None
    seed: int = 12345
    max_seq_length: int = 512
    max_span_length: int = 10
    max_questions: int = 30
    layout: str = "collapsed"
    # Independent passes over every document (own masking, own chunk boundaries); the authors used 5.
    dupe_factor: int = 1
    num_workers: int | None = None
    batch_size: int = 256  # documents per stage call: bigger batches amortise the vectorised search

    SCHEDULING = (*RunConfig.SCHEDULING, "num_workers", "batch_size")

    def validate(self) -> None:
        super().validate()
        if self.layout not in ("collapsed", "original"):
            raise ConfigError(f"layout must be 'collapsed' or 'original', got {self.layout!r}")
        if not 16 <= self.max_seq_length <= 4096:
            raise ConfigError(f"max_seq_length must be in [16, 4096], got {self.max_seq_length}")
        if not 1 <= self.max_span_length <= 64:
            raise ConfigError(f"max_span_length must be in [1, 64], got {self.max_span_length}")
        if self.max_questions < 1:
            raise ConfigError(f"max_questions must be >= 1, got {self.max_questions}")
        if not 1 <= self.dupe_factor <= 100:
            raise ConfigError(f"dupe_factor must be in [1, 100], got {self.dupe_factor}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tokenizer and not is_uri(self.tokenizer) and not os.path.exists(self.tokenizer):
            raise ConfigError(f"tokenizer not found: {self.tokenizer} (a directory or a vocab.txt)")

    def required_columns(self) -> dict[str, str]:
        return {self.text_column: "--text-column"}


@dataclass
class ExtractConfig(RunConfig):
    """Bulk extractive QA over (context, question) rows."""

    job: ClassVar[str] = "extract"

    model: str = ""
    id_column: str = "id"
    question_column: str = "question"
    context_column: str = "context"
    # Questions (windows' sources) per model call. None: 256 on GPUs, which want big batches; 64 on CPUs,
    # whose speed does not grow past a few thousand tokens per forward, and where every call's rows wait
    # for the whole call (64 rows: the first answers land about a second after the model is up).
    batch_size: int | None = None
    # Model actors: N, or "MIN,MAX" for a pool that grows while work is queued. Default: one per GPU
    # the cluster has (up to what its autoscaler can add) when the model runs on GPUs, else 1.
    num_actors: int | str | None = None
    # GPUs per model actor (fractional shares one GPU between actors); giving it means "use GPUs".
    gpus_per_actor: float | None = None
    # CPUs Ray reserves per model actor; its torch threads = this, rounded up. Default: 1 with a GPU,
    # else an equal share of the cluster (at most one node) leaving half a CPU to tokenizing and writing.
    cpus_per_actor: float | None = None
    # "int8": dynamic int8 encoder Linears on CPU actors (faster; answers differ slightly from fp32).
    quantize: str | None = None
    max_length: int = 384
    stride: int = 128
    max_query_length: int = 64
    max_answer_length: int = 30
    # Paired rows: contexts longer than this are error rows (default 100000). Corpus mode: no limit
    # unless given (a long document gets more windows).
    max_context_chars: int | None = None
    n_best: int = 0
    device: str = "auto"
    dtype: str = "auto"
    # Corpus mode: a questions file asked of every document of INPUT (read as `mine` reads a corpus).
    questions: str | None = None
    text_column: str = "text"
    # Abstention: answer only when score >= min_score and score - null_score > null_margin.
    min_score: float | None = None
    null_margin: float | None = None
    # The N best distinct spans per question (n-best lists), across windows.
    top_k: int = 0

    SCHEDULING = (*RunConfig.SCHEDULING, "num_actors", "gpus_per_actor", "cpus_per_actor", "batch_size",
                  "device", "dtype")

    def actor_pool(self) -> tuple[int, int] | None:
        """`num_actors` as (min, max), or None when not given."""
        if self.num_actors is None:
            return None
        text = str(self.num_actors).strip()
        try:
            parts = [int(p) for p in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
            raise ConfigError(f"--num-actors must be N or MIN,MAX with 1 <= MIN <= MAX, got {self.num_actors!r}")
        return parts[0], parts[1]

    def _validate_resources(self) -> None:
        self.actor_pool()
        if self.gpus_per_actor is not None:
            g = self.gpus_per_actor
            if not (0 < g < 1 or (g >= 1 and float(g).is_integer())):
                raise ConfigError(f"--gpus-per-actor must be a fraction in (0, 1) or a whole number, got {g}")
            if self.device == "cpu":
                raise ConfigError("--gpus-per-actor contradicts --device cpu: drop one of them")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ConfigError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.quantize not in (None, "none", "int8"):
            raise ConfigError(f"--quantize must be int8 (or none), got {self.quantize!r}")
        if self.quantize == "int8":
            if self.device.startswith("cuda") or self.gpus_per_actor:
                raise ConfigError("--quantize int8 is for CPU actors; on GPUs the model runs in bf16: drop one")
            if self.dtype not in ("auto", "float32"):
                raise ConfigError(f"--quantize int8 replaces --dtype {self.dtype}: drop one of them")

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError("no model given: pass --model DIR (a Splinter checkpoint directory)")
        if not is_uri(self.model):
            model = Path(self.model)
            if not model.is_dir():
                raise ConfigError(f"model directory not found: {model}")
            if not (model / "config.json").is_file():
                raise ConfigError(f"{model} has no config.json: is it a Splinter checkpoint directory?")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        self._validate_resources()
        if not 32 <= self.max_length <= 4096:
            raise ConfigError(f"max_length must be in [32, 4096], got {self.max_length}")
        # A window holds the question (up to max_query_length tokens), the template's tokens and the
        # context; the overlap between windows must leave room for new context tokens.
        from splinter.tokenizer import PAIR_SPECIAL_TOKENS  # here: `import pipeline.settings` stays light

        room = self.max_length - self.max_query_length - PAIR_SPECIAL_TOKENS
        if self.max_query_length < 1:
            raise ConfigError(f"max_query_length must be >= 1, got {self.max_query_length}")
        if room < 1:
            raise ConfigError(
                f"--max-length {self.max_length} leaves no room for context: a window holds up to "
                f"{self.max_query_length} question tokens (max_query_length) and {PAIR_SPECIAL_TOKENS} template "
                "tokens; raise --max-length")
        from splinter.windows import stride_error  # here: `import pipeline.settings` stays light

        if error := stride_error(self.max_length, self.stride, self.max_query_length):
            raise ConfigError("--" + error.replace("max_length ", "--max-length "))
        if self.max_answer_length < 1 or self.n_best < 0 or (self.max_context_chars or 1) < 1:
            raise ConfigError("max_answer_length and max_context_chars must be >= 1, n_best >= 0")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if self.questions and not is_uri(self.questions) and not os.path.isfile(self.questions):
            raise ConfigError(f"--questions file not found: {self.questions}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    def required_columns(self) -> dict[str, str]:
        if self.questions:
            return {self.text_column: "--text-column"}
        return {self.question_column: "--question-column", self.context_column: "--context-column"}


# ------------------------------------------------------------------------------------------- training jobs
# The library's training settings (splinter.train, splinter.pretrain) import torch: only when a training
# job is set up, so the corpus jobs' settings stay light.
def _finetune_config() -> FinetuneConfig:
    from splinter.train import FinetuneConfig

    return FinetuneConfig()


SHUFFLES = ("global", "local")
# Fields that decide what is trained: a rerun into the same OUTPUT must not change them.
RUN_FIELDS = (
    "mined", "model", "from_bert", "model_config", "preset", "batch_size", "learning_rate", "warmup_steps",
    "max_steps", "grad_accum", "weight_decay", "max_grad_norm", "seed", "shuffle", "shuffle_buffer",
)  # fmt: skip


@dataclass
class PretrainConfig:
    """`splinter pretrain MINED OUTPUT`; None fields take the preset's value."""

    mined: str = ""
    output: str = ""
    model: str | None = None  # a Splinter checkpoint directory
    from_bert: str | None = None  # a BERT-family checkpoint directory (fresh QASS head)
    model_config: str | None = None  # "base", "large" or a config.json: a freshly initialised model
    preset: str = "laptop"
    batch_size: int | None = None  # sequences per optimizer step, all workers together
    learning_rate: float | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    grad_accum: int = 1
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: the cluster's CPUs less one for data, shared out
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    shuffle: str = "global"
    shuffle_buffer: int = 10_000  # rows per worker, for --shuffle local
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    overwrite: bool = False
    ray_address: str | None = None
    num_cpus: int | None = None

    def hparams(self) -> PretrainHParams:
        from splinter.pretrain import PRESETS, PretrainHParams  # here: torch only when training

        base = PRESETS[self.preset]
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(PretrainHParams) if hasattr(self, f.name)}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})

    def validate(self) -> None:
        if not self.mined or not self.output:
            raise ConfigError("give the mined data (a `splinter mine` output) and an output directory")
        sources = [name for name in ("model", "from_bert", "model_config") if getattr(self, name)]
        if len(sources) != 1:
            raise ConfigError("give exactly one of --model DIR, --from-bert DIR or --model-config base|large|FILE")
        for name in ("model", "from_bert"):
            path = getattr(self, name)
            if path and not (Path(path) / "config.json").is_file():
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {path}: no config.json there; pass a checkpoint directory")
        from splinter.config import MODEL_SIZES
        from splinter.pretrain import PRESETS

        if self.model_config and self.model_config not in MODEL_SIZES and not Path(self.model_config).is_file():
            raise ConfigError(f"--model-config {self.model_config}: neither base, large nor a config.json file")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.shuffle not in SHUFFLES:
            raise ConfigError(f"--shuffle must be global or local, got {self.shuffle!r}")
        if self.num_workers < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.shuffle_buffer < 1:
            raise ConfigError("--num-workers, --checkpoint-every, --keep-checkpoints and --shuffle-buffer must be >= 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be >= 0, got {self.max_failures}")
        try:
            self.hparams().micro_batch(self.num_workers)
        except ValueError as exc:
            raise ConfigError(f"--batch-size: {exc}") from None

    def run_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_FIELDS} | {"hparams": dataclasses.asdict(self.hparams())}


@dataclass
class FinetuneJob:
    """One `splinter finetune` run; `training` holds the library's hyper-parameters (authors' defaults)."""

    train: str
    output: str
    model: str
    examples: int | None = None
    sample_seed: int = 42
    input_format: str = "auto"
    overwrite: bool = False
    num_threads: int | None = None
    training: FinetuneConfig = field(default_factory=_finetune_config)
    # Unanswerable pairs per training question (pipeline.training.negatives), labelled [CLS].
    negatives: int = 0
    # Steps between checkpoints of the training state (0: none, but a stop by signal still writes one).
    checkpoint_every: int = 50

    def validate(self) -> None:
        if not Path(self.model).is_dir() or not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"--model {self.model}: not a checkpoint directory (no config.json)")
        if self.examples is not None and self.examples < 1:
            raise ConfigError(f"--examples must be >= 1, got {self.examples}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.num_threads}")
        if self.negatives < 0:
            raise ConfigError(f"--negatives must be >= 0, got {self.negatives}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 (0: no periodic checkpoints), got {self.checkpoint_every}")
        if Path(self.output).resolve() == Path(self.model).resolve():
            raise ConfigError(f"the output {self.output} is the --model directory itself: name a new directory")
        try:
            self.training.validate()
        except ValueError as exc:
            raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
        from splinter.train import resolve_device

        try:
            resolve_device(self.training.device)
        except ValueError as exc:
            raise ConfigError(f"--device: {exc}") from None


@dataclass
class FewshotJob:
    """The (K, seed) grid and what every run shares."""

    train: str
    dev: str
    output: str
    model: str
    examples: list[int] = field(default_factory=lambda: [16, 128, 1024])
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44, 45, 46])
    training: FinetuneConfig = field(default_factory=_finetune_config)
    train_seed: int | None = None  # None: each run trains with its sampling seed
    eval_examples: int | None = None  # score on a fixed sample of N DEV questions (default: all)
    max_answer_length: int = 30
    input_format: str = "auto"
    dev_format: str = "auto"
    cpus_per_run: int = 1
    overwrite: bool = False
    address: str | None = None
    num_cpus: int | None = None

    def validate(self) -> None:
        for name, path in (("TRAIN", self.train), ("DEV", self.dev)):
            if not os.path.exists(path):
                raise ConfigError(f"{name} not found: {path}")
        if not Path(self.model).is_dir() or not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"--model {self.model}: not a checkpoint directory (no config.json)")
        if not self.examples or any(k < 1 for k in self.examples):
            raise ConfigError(f"--examples needs one or more sizes >= 1, got {self.examples}")
        if not self.seeds:
            raise ConfigError("--seeds needs one or more seeds")
        if len(set(self.examples)) != len(self.examples) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--examples and --seeds must not repeat a value")
        if self.cpus_per_run < 1 or (self.eval_examples is not None and self.eval_examples < 1):
            raise ConfigError("--cpus-per-run and --eval-examples must be >= 1")
        if self.max_answer_length < 1:
            raise ConfigError(f"--max-answer-length must be >= 1, got {self.max_answer_length}")
        try:
            self.training.validate()
        except ValueError as exc:
            raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
