"""Run configuration: the model (`ModelConfig`, what `trainer.model.build_model` builds) and the
training recipe (`TrainRecipe`), saved resolved into every run directory and beside every checkpoint.

Presets are data (trainer/configs/*.yaml, sections `model:` and `train:`, loaded by
`trainer.config.load_run_config`); `coco` and `f30k` are the released USER recipe.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from userpipe.schemas.base import Frozen, Seed

# 1.1: sge_hidden, xavier_init, max_tokens (1.0 configs read as what they built); gpo_init came later with a
# default that builds what a 1.1 config without it built
MODEL_SCHEMA_VERSION = "1.1"
RUN_RECORD_VERSION = "1.0"


def _read_1_0_model(data):
    """A 1.0 model config built SGE at the embedding width, PyTorch's default init and captions cut at 64
    tokens: read it as that."""
    if isinstance(data, dict) and data.get("schema_version") == "1.0":
        data = {**data, "schema_version": MODEL_SCHEMA_VERSION}
        data.setdefault("sge_hidden", data.get("embed_dim"))
        data.setdefault("max_tokens", 64)
        data.setdefault("xavier_init", False)
    return data


# every number of a run's configuration is finite, and every field states its range: a value out of range is
# refused where the configuration is read (one line naming the field), never a traceback mid-run
CONFIG = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
MAX_SEED = (
    2**32 - 1
)  # numpy's SeedSequence and torch.manual_seed both take it; the rank offset stays in int64


class ModelConfig(BaseModel):
    model_config = CONFIG

    schema_version: Literal["1.1"] = MODEL_SCHEMA_VERSION
    enhancement: Literal["sge", "cge", "none"] = Field(description="sge, cge (CLIP-guided) or none (VSE∞)")
    embed_dim: int = Field(gt=0, description="E, the joint embedding width")
    feature_dim: int = Field(gt=0, description="D, region feature width (2048 for BUTD ResNet)")
    num_regions: int = Field(gt=0, description="R, the region axis SGE's BatchNorm runs over")
    clip_dim: int | None = Field(default=None, gt=0, description="width of the CLIP global (CGE only)")
    text_model: str = Field(
        min_length=1, description="Hugging Face BERT-family model: hub name or local folder"
    )
    text_layers: int | None = Field(
        default=None,
        gt=0,
        description="keep only the first N transformer layers of the text model (None: all)",
    )
    max_tokens: int | None = Field(
        default=None,
        gt=2,
        description="cut captions to N tokens with [CLS]/[SEP] (None: the text model's own maximum; the "
        "released code never cuts)",
    )
    sge_hidden: int | None = Field(
        default=None, gt=0, description="SGE's hidden width (None: the region width D, as released)"
    )
    xavier_init: bool = Field(
        default=True,
        description="image fc and SGE linears start Xavier-uniform with zero bias, as released "
        "(false: PyTorch's default)",
    )
    gpo_init: Literal["random", "uniform"] = Field(
        default="random",
        description="GPO's score layers start drawn like every linear, as released (random), or at zero "
        "(uniform: both towers pool by the mean at the start, whatever the seed; docs/architecture.md, "
        '"Seeds")',
    )
    dropout: float = Field(default=0.4, ge=0, lt=1)
    gpo_pe_dim: int = Field(
        default=32,
        gt=0,
        multiple_of=2,
        description="GPO's positional encoding width (sines and cosines: even)",
    )
    gpo_hidden: int = Field(default=32, gt=0, description="GPO's GRU hidden width")
    queue_size: int = Field(gt=0, description="M, entries per momentum queue")
    momentum: float = Field(gt=0, lt=1, description="r: key weights <- r key + (1 - r) query")
    mu: float = Field(gt=0, le=1e4, description="UTO inverse temperature (released: 90)")
    gamma: float = Field(ge=-1, le=1, description="UTO margin, on cosine similarities in [-1, 1]")
    batch_weight: float = Field(gt=0, description="lambda: weight of the in-batch part of UTO")
    mask_false_negatives: bool = Field(
        default=False, description="leave same-image entries out of the negatives (False = the released code)"
    )
    keys_in_train_mode: bool = Field(
        default=True, description="key encoders keep dropout/BN in train mode, as the released code does"
    )
    use_queue: bool = Field(
        default=True,
        description="momentum queues and their loss (False: in-batch UTO only, the VSE∞-style ablation)",
    )

    _from_1_0 = model_validator(mode="before")(_read_1_0_model)

    @model_validator(mode="after")
    def _cge_needs_clip(self) -> ModelConfig:
        if (self.enhancement == "cge") != (self.clip_dim is not None):
            raise ValueError("clip_dim is set exactly when enhancement is 'cge'")
        return self


class TrainRecipe(BaseModel):
    model_config = CONFIG

    epochs: int = Field(gt=0)
    batch_size: int = Field(
        ge=2, description="the global batch (at least 2 rows per process: SGE's BatchNorm needs them)"
    )
    lr: float = Field(gt=0, le=1)
    text_lr_scale: float = Field(default=0.1, gt=0, description="text backbone lr = lr x this")
    weight_decay: float = Field(default=1e-4, ge=0)
    grad_clip: float = Field(default=2.0, gt=0)
    lr_decay_epochs: tuple[int, ...] = Field(
        default=(), description="lr x lr_decay from each of these epochs (increasing, 1 to epochs - 1)"
    )
    lr_decay: float = Field(default=0.1, gt=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)
    mu_start: float | None = Field(
        default=None,
        gt=0,
        le=1e4,
        description="μ warm-up: UTO's inverse temperature rises linearly from this to model.mu over "
        "mu_warmup_steps (None: model.mu from the first step, as released; docs/architecture.md, "
        '"Seeds")',
    )
    mu_warmup_steps: int = Field(default=0, ge=0, description="steps of the μ warm-up (with mu_start)")
    align_start: bool = Field(
        default=False,
        description="a new run negates the text tower's output projection before its first step when the "
        "untrained model scores the first batch's matching pairs below zero on average, where the reward has "
        'no gradient (needs model.gpo_init: uniform; docs/architecture.md, "Seeds")',
    )
    seed: Seed = 1
    init_seed: Seed | None = Field(
        default=None,
        description="the untrained model (weights, queues) from this seed, and the data order, augmentation "
        "and dropout from `seed` (None: all from `seed`): what each decides, apart (docs/architecture.md, "
        '"Seeds")',
    )
    workers: int = Field(default=2, ge=0, le=64, description="DataLoader worker processes")
    backend: Literal["auto", "eager", "chunked", "triton"] = "auto"
    deterministic: bool = Field(
        default=False,
        description="bit-exact resume on the same kind of CPU: MKL_CBWR=AUTO,STRICT, at the cost that "
        "bench/results/train_throughput.md measures",
    )
    val_images: int | None = Field(
        default=None,
        gt=0,
        description="validate on the first N images (the reference uses 1,000 of COCO's dev split)",
    )
    val_every: int | None = Field(default=None, gt=0, description="also validate every N steps")
    max_steps: int | None = Field(
        default=None,
        gt=0,
        description="end the run after this many steps, validated and saved there (a smoke test or a "
        "benchmark); the learning-rate schedule stays that of `epochs`",
    )
    stop_if_not_learning: bool = Field(
        default=False,
        description="stop when the first validation's RSUM is within noise of the untrained model's "
        "(a warning either way)",
    )
    global_batchnorm: bool = Field(
        default=True,
        description="with several processes, BatchNorm statistics over the global batch, as the released "
        "single-process code computes them over its one batch (false: each process's own rows)",
    )

    @model_validator(mode="after")
    def _mu_warmup_has_both_ends(self) -> TrainRecipe:
        if (self.mu_start is None) != (self.mu_warmup_steps == 0):
            raise ValueError("the μ warm-up needs both mu_start and mu_warmup_steps > 0 (or neither)")
        return self

    @model_validator(mode="after")
    def _decays_within_the_run(self) -> TrainRecipe:
        epochs = list(self.lr_decay_epochs)
        if epochs != sorted(set(epochs)) or any(not 0 < e < self.epochs for e in epochs):
            raise ValueError(
                f"lr_decay_epochs {epochs} must be increasing epochs from 1 to epochs - 1 ({self.epochs - 1})"
            )
        return self


class RunConfig(BaseModel):
    model_config = CONFIG

    schema_version: Literal["1.1"] = MODEL_SCHEMA_VERSION
    model: ModelConfig
    train: TrainRecipe

    @model_validator(mode="before")
    @classmethod
    def _from_1_0(cls, data):
        if isinstance(data, dict) and data.get("schema_version") == "1.0":
            data = {**data, "schema_version": MODEL_SCHEMA_VERSION}
        return data

    @model_validator(mode="after")
    def _aligns_a_linear_pooling(self) -> RunConfig:
        if self.train.align_start and self.model.gpo_init != "uniform":
            # a drawn GPO weighs sorted values unevenly: a negated projection is not a negated embedding
            raise ValueError("train.align_start needs model.gpo_init: uniform (mean pooling at the start)")
        return self


RUN_RECORD_NAME = "run.json"


class RunData(Frozen):
    """What a run reads: a resume must read the same, or say that it does not (`RunChange`)."""

    shards: str = Field(description="the shard folder or brace pattern, as given")
    shards_sha256: str = Field(
        description="hash of the selected shards' manifest records (name, counts, sha256)"
    )
    val_store: str = Field(description="the validation store, resolved")


class RunChange(Frozen):
    """A difference a resume was allowed to make (`--allow-change`), from the step it applies to."""

    step: int = Field(ge=0)
    fields: dict[str, tuple] = Field(description="field -> (before, after)")


class RunRecord(Frozen):
    schema_version: Literal["1.0"] = RUN_RECORD_VERSION
    data: RunData
    changes: tuple[RunChange, ...] = ()
    id: str | None = Field(
        default=None,
        pattern="^[0-9a-f]{16}$",
        description="the run's id, for trackers that continue it on resume (W&B); runs from before it "
        "get one on their next resume",
    )


class DirectionMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r1: float
    r5: float
    r10: float
    medr: float
    meanr: float


class RetrievalMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    i2t: DirectionMetrics
    t2i: DirectionMetrics
    rsum: float


class _LogLine(BaseModel):
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)


class StepLine(_LogLine):
    """log.jsonl: one training step (more measurements may follow the required ones)."""

    model_config = ConfigDict(extra="allow")
    loss: float
    batch: float
    queue: float
    lr: float


class ValidationLine(_LogLine):
    model_config = ConfigDict(extra="forbid")
    val: RetrievalMetrics


class ChangeLine(_LogLine):
    model_config = ConfigDict(extra="forbid")
    change: dict


class WarningLine(_LogLine):
    """A warning the run gave (a first validation within noise of the untrained start)."""

    model_config = ConfigDict(extra="forbid")
    warning: str = Field(min_length=1)


class StartLine(_LogLine):
    """train.align_start's measurement: the untrained model's mean score of the first batch's matching pairs,
    and whether the text projection was negated for it."""

    model_config = ConfigDict(extra="forbid")
    start_score: float = Field(ge=-1, le=1)
    text_negated: bool


# told apart by this key
LOG_LINES = {
    "loss": StepLine,
    "val": ValidationLine,
    "change": ChangeLine,
    "warning": WarningLine,
    "start_score": StartLine,
}
