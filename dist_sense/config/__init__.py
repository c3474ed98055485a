"""Run configuration: one dataclass per stage, loaded from JSON, overridden by `key=value`.

Every field carries a one-line docstring (the string right under it). `RunConfig.load`
reads a JSON file and applies command-line overrides (`kmeans.k=10`, `run_dir=/x`); every
section validates itself when it is constructed (`Section.__post_init__`: directly, from
JSON, by `dataclasses.replace`), so unknown keys and invalid values raise `ConfigError`
naming the key and no invalid config exists. The DeepSpeed JSON files in ds_configs/ hold
engine settings only; batch sizes live here (`DistillConfig.batch_split`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dist_sense.config.fields import (  # noqa: F401 (ConfigError, field_docs: re-exported)
    ConfigError,
    Section,
    TrainingSection,
    apply_override,
    build_dataclass,
    check_choice,
    check_nonnegative,
    check_positive,
    field_docs,
    read_json,
)
from dist_sense.config.tasks import FinetuneConfig, TaskConfig  # noqa: F401 (re-exported)

DTYPES = ("fp32", "bf16", "fp16")
SIMILARITIES = ("dot", "cos", "l2")
MOVED_KEYS = {"kmeans.spill_memory_mb": "memory.spill_mb", "kmeans.held_results_mb": "memory.held_results_mb"}
"""Keys that moved: an old config that sets one is told where it went."""


@dataclass
class ModelConfig(Section):
    _key = "model"
    teacher: str = ""
    """Teacher model: a local HF model directory, a .gguf file (dequantised once, cached), or pkg:PACKAGE shipping either."""
    tokenizer: str = ""
    """Tokenizer directory; empty means the teacher's directory."""
    layer: int = -1
    """Hidden layer to read: -1 is the last (the final-norm output for decoders), 0 the embeddings."""
    dtype: str = "fp32"
    """Teacher compute dtype: fp32, bf16 or fp16."""
    adapters: list = field(default_factory=list)
    """PEFT adapter folders applied to the teacher in order and merged into its weights (once, cached)."""
    bidirectional: bool = False
    """Run a decoder teacher without its causal mask (LLM2Vec); refused for an encoder."""
    trust_remote_code: bool = False
    """Run the Python code a model folder ships (its own architecture); only for folders you trust."""
    instruction: str = ""
    """Text put before every window and encoded text (after the leading specials); its tokens are never sampled,
    labelled, snapped or pooled (LLM2Vec's instruction, left out of its embed mask)."""

    def _check(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPES)
        for i, adapter in enumerate(self.adapters):
            if not isinstance(adapter, str) or not adapter:
                raise ConfigError(f"model.adapters[{i}]={adapter!r}: must be a PEFT adapter folder path")


@dataclass
class CorpusConfig(Section):
    _key = "corpus"
    path: str = ""
    """Text files (.txt, .jsonl/.json, .csv, .parquet), a directory of them, or a `save_to_disk` directory."""
    text_field: str = "text"
    """Column holding the text (ignored for plain .txt, where each non-empty line is a document)."""
    max_length: int = 128
    """Tokens per window; longer documents are cut into several windows, never truncated."""
    stride: int = 0
    """Tokens shared by consecutive windows of one document (0: windows do not overlap)."""
    max_documents: int = 0
    """Read at most this many documents (0: all)."""

    def _check(self) -> None:
        check_positive("corpus.max_length", self.max_length)
        if not 0 <= self.stride < self.max_length:
            raise ConfigError(f"corpus.stride={self.stride}: must be >= 0 and < corpus.max_length={self.max_length}")
        check_nonnegative("corpus.max_documents", self.max_documents)


@dataclass
class ExtractConfig(Section):
    _key = "extract"
    cap: int = 1000
    """Target number of kept hidden states per token over the whole corpus (keep prob min(1, cap/count))."""
    seed: int = 0
    """Seed of the keep/drop draw; the draw depends only on (seed, document, position)."""
    batch_size: int = 8
    """Windows per forward call on each rank."""
    hidden_dtype: str = "fp16"
    """Storage dtype of hidden states in the shards: fp16, bf16 or fp32."""
    shard_samples: int = 1000
    """Sequences per webdataset shard."""
    stop_tokens: list = field(default_factory=list)
    """Token strings never kept (special and padding tokens are never kept anyway)."""
    ds_config: str = "ds_configs/z3_infer.json"
    """DeepSpeed ZeRO-3 inference config for the teacher."""
    partition: str = "auto"
    """Teacher placement: zero3 (parameters partitioned across ranks, gathered layer by layer),
    replicate (a whole copy per rank: no gathers, for teachers that fit on one device) or auto
    (zero3, except on a single rank without offload, where partitioning only adds gather hooks)."""
    offload: str = "none"
    """Teacher parameter offload: none, cpu or nvme (ZeRO-Inference)."""
    nvme_path: str = ""
    """Directory for NVMe parameter offload (offload=nvme)."""

    def _check(self) -> None:
        check_positive("extract.cap", self.cap)
        check_positive("extract.batch_size", self.batch_size)
        check_positive("extract.shard_samples", self.shard_samples)
        check_choice("extract.hidden_dtype", self.hidden_dtype, DTYPES)
        check_choice("extract.offload", self.offload, ("none", "cpu", "nvme"))
        check_choice("extract.partition", self.partition, ("auto", "zero3", "replicate"))
        if self.partition == "replicate" and self.offload != "none":
            raise ConfigError(f"extract.offload={self.offload} needs ZeRO-3: use extract.partition=auto or zero3")
        if self.offload == "nvme" and not self.nvme_path:
            raise ConfigError("extract.offload=nvme needs extract.nvme_path")


@dataclass
class KMeansConfig(Section):
    _key = "kmeans"
    k_policy: str = "fixed"
    """How many senses a token gets: fixed (k) or mcl (Markov clustering rule of the paper)."""
    k: int = 20
    """Senses per token for k_policy=fixed."""
    max_iter: int = 50
    """Most Lloyd iterations per tile."""
    tol: float = 1e-4
    """Stop when the tile's total inertia changes by less than this fraction."""
    tile_tokens: int = 2048
    """Tokens clustered together in one tile (bounds memory; one dictionary shard per tile)."""
    subsample: int = 256
    """Vectors per token all-gathered to every rank to pick k and the k-means++ start."""
    min_count: int = 1
    """Tokens with fewer kept vectors are left out of the dictionary (and counted)."""
    spherical: bool = False
    """Cluster unit-normalised vectors by cosine (spherical k-means)."""
    seed: int = 0
    """Seed of k-means++ seeding and empty-sense re-seeding."""
    mcl_inflation: float = 1.65
    """MCL inflation exponent."""
    mcl_expansion: int = 2
    """MCL expansion power."""
    mcl_iters: int = 100
    """Most MCL iterations (the reference's 100)."""
    mcl_vectors: int = 1000
    """Vectors per token MCL clusters under k_policy=mcl (the reference clusters every sampled one, up to 1000)."""
    examples_per_sense: int = 3
    """Example contexts stored per sense (the occurrences nearest its centre)."""

    def _check(self) -> None:
        check_choice("kmeans.k_policy", self.k_policy, ("fixed", "mcl"))
        for name in ("k", "max_iter", "tile_tokens", "subsample", "min_count", "mcl_expansion", "mcl_iters", "mcl_vectors"):
            check_positive(f"kmeans.{name}", getattr(self, name))
        check_nonnegative("kmeans.examples_per_sense", self.examples_per_sense)
        if self.tol < 0:
            raise ConfigError(f"kmeans.tol={self.tol}: must be >= 0")
        if self.mcl_inflation <= 1:
            raise ConfigError(f"kmeans.mcl_inflation={self.mcl_inflation}: must be > 1")


@dataclass
class MemoryConfig(Section):
    """Memory budgets of the build_dict stage: how it runs, never what it builds, so they are
    not part of the dictionary's settings fingerprint (changing them rebuilds nothing)."""

    _key = "memory"
    spill_mb: int = 512
    """Hidden rows a rank holds in memory while reading, bucketed by tile; past this it appends
    them to per-tile scratch files (RUN/dictionary/.work) and starts over (in batches of at least
    64 MB, so 0 spills everything as it goes). Does not change the dictionary."""
    held_results_mb: int = 256
    """Finished tiles held (their senses, and the rows of their tokens kept as distinct vectors)
    before those tokens' senses are made, the example contexts picked and the shards written,
    all ranks together; a crash loses at most these. 0: each tile as it finishes. Does not
    change the dictionary."""

    def _check(self) -> None:
        check_nonnegative("memory.spill_mb", self.spill_mb)
        check_nonnegative("memory.held_results_mb", self.held_results_mb)


@dataclass
class LabelConfig(Section):
    _key = "label"
    corpus_path: str = ""
    """Distillation corpus; empty means corpus.path (windowing and text_field come from corpus)."""
    similarity: str = "l2"
    """How a hidden state picks its sense: dot, cos or l2 (the nearest centre). The reference uses
    dot, which favours long centres when states are not normalised; l2 measured best in the demo
    (docs/results.md, snapping.* metrics). The student is trained with the same similarity."""
    batch_size: int = 8
    """Windows per teacher forward call on each rank."""
    soft_topk: int = 0
    """Also store the top-k sense ids and probabilities per token (0: hard labels only)."""
    temperature: float = 1.0
    """Softmax temperature of the soft targets."""
    shard_samples: int = 1000
    """Sequences per webdataset shard."""
    store_hidden: bool = False
    """Also store the teacher's hidden states (fp16) per token, for the MSE distillation baseline."""

    def _check(self) -> None:
        check_choice("label.similarity", self.similarity, SIMILARITIES)
        check_positive("label.batch_size", self.batch_size)
        check_positive("label.shard_samples", self.shard_samples)
        check_nonnegative("label.soft_topk", self.soft_topk)
        if self.temperature <= 0:
            raise ConfigError(f"label.temperature={self.temperature}: must be > 0")


@dataclass
class DistillConfig(TrainingSection):
    _key = "distill"
    init: str = "truncate"
    """Student: truncate (the teacher's first `layers` layers) or model (`student_model` + linear map)."""
    layers: int = 4
    """Teacher layers the truncated student keeps."""
    student_model: str = ""
    """Directory (or config.json) of a separate student model for init=model."""
    loss: str = "kd"
    """kd (sense cross-entropy, KL with soft targets) or mse (to the teacher's hidden states)."""
    freeze_embeddings: bool = False
    """Keep the student's input embeddings fixed. In a truncated small model they are most of the
    parameters (a 2-of-6-layer MiniLM: 12M of 15M), so freezing them makes each step's gradient
    reduce and optimizer update several times cheaper."""
    global_batch_size: int = 16
    """Windows per optimizer step over all ranks."""
    micro_batch_size: int = 8
    """Windows per forward on one rank; accumulation = global / (micro * world)."""
    steps: int = 1000
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate (AdamW, cosine decay)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_every: int = 100
    """Evaluate on the held-out split every this many steps (0: only at the end)."""
    save_every: int = 200
    """Save a DeepSpeed checkpoint every this many steps (and always at the end)."""
    eval_fraction: float = 0.05
    """Share of label shards' sequences held out for evaluation."""
    group_by_length: int = 0
    """Length grouping: each run of this many steps' shuffled windows (within a label shard) is sorted by
    length and cut into steps, and the steps shuffled, so batches pad little (0: plain shuffling)."""
    seed: int = 0
    """Seed of data order and initialisation."""
    ds_config: str = "ds_configs/z2.json"
    """DeepSpeed engine config (ZeRO-2)."""

    def _check(self) -> None:
        check_choice("distill.init", self.init, ("truncate", "model"))
        check_choice("distill.loss", self.loss, ("kd", "mse"))
        for name in ("layers", "global_batch_size", "micro_batch_size", "steps"):
            check_positive(f"distill.{name}", getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "group_by_length"):
            check_nonnegative(f"distill.{name}", getattr(self, name))
        if self.lr <= 0:
            raise ConfigError(f"distill.lr={self.lr}: must be > 0")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"distill.eval_fraction={self.eval_fraction}: must be in [0, 1)")
        if self.init == "model" and not self.student_model:
            raise ConfigError("distill.init=model needs distill.student_model")


@dataclass
class EvalConfig(Section):
    _key = "eval"
    corpus_path: str = ""
    """Held-out text for fidelity and agreement; empty means corpus.path."""
    max_documents: int = 200
    """Held-out documents read."""
    batch_size: int = 16
    """Windows per forward call."""
    similarity: str = "l2"
    """Sense snapping rule at evaluation: dot, cos or l2; keep it equal to label.similarity, the
    rule the student was trained for (evaluation warns otherwise)."""
    probe_tasks: list = field(default_factory=list)
    """Sentence classification probes as name=path.jsonl (one {"text", "label"} per line)."""
    mteb_tasks: list = field(default_factory=list)
    """MTEB classification tasks run by the mteb package on local data: folders with train.jsonl and test.jsonl
    (one {"text", "label"} per line); results in RUN/eval/mteb/ and metrics.json as mteb.<task>.<system>."""
    wic_path: str = ""
    """Word-in-context pairs, jsonl of {"text1", "start1", "end1", "text2", "start2", "end2", "same"}."""
    max_probe_examples: int = 2000
    """Examples read per probe task (and WiC pairs)."""
    mse_student: str = ""
    """The MSE-trained baseline student; empty means RUN/student_mse/final when it exists."""
    tuned_student: str = ""
    """The student fine-tuned directly on the task's labels (finetune.backbone=student); empty means
    RUN/student_tuned/final when it exists."""
    own_head_examples: int = 2000
    """Training examples of the task whose pooled states fit each system's own head (logistic regression)."""

    def _check(self) -> None:
        check_positive("eval.max_documents", self.max_documents)
        check_positive("eval.max_probe_examples", self.max_probe_examples)
        check_positive("eval.own_head_examples", self.own_head_examples)
        for task in self.probe_tasks:
            if "=" not in str(task):
                raise ConfigError(f"eval.probe_tasks: {task!r} must be name=path.jsonl")
        check_positive("eval.batch_size", self.batch_size)
        check_choice("eval.similarity", self.similarity, SIMILARITIES)


@dataclass
class RunConfig(Section):
    run_dir: str = "runs/default"
    """Directory of the run: every stage reads and writes only here."""
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def _check(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir: must not be empty")
        hints = typing.get_type_hints(RunConfig)
        for f in dataclasses.fields(self):
            kind, section = hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(kind):
                if not isinstance(section, kind):
                    raise ConfigError(f"{f.name}: must be a {kind.__name__}, got {section!r}")
                section._validate()  # again: a section changed in place since it was built

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        return build_dataclass(cls, data, prefix="", source=source, moved=MOVED_KEYS)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> "RunConfig":
        """Read `path` (JSON; None for defaults), apply `key=value` overrides; built, so validated."""
        data: dict = {}
        if path is not None:
            data = read_json(Path(path))
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, source=str(path or "overrides"))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the resolved config (default RUN/config.json), atomically."""
        target = Path(path) if path else self.run_path / "config.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, target)
        return target


def describe() -> str:
    """Every valid key with its default and docstring, one per line."""
    lines = []
    root = RunConfig()
    for f in dataclasses.fields(RunConfig):
        value = getattr(root, f.name)
        if dataclasses.is_dataclass(value):
            docs = field_docs(type(value))
            for sub in dataclasses.fields(value):
                lines.append(f"{f.name}.{sub.name}={getattr(value, sub.name)!r}  # {docs.get(sub.name, '')}")
        else:
            lines.append(f"{f.name}={value!r}  # {field_docs(RunConfig).get(f.name, '')}")
    return "\n".join(lines)
