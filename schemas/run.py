"""Model configuration: what `trainer.model.build_model` builds, saved beside every checkpoint.

Presets are data (trainer/configs/*.yaml); `coco` and `f30k` are the released USER recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MODEL_SCHEMA_VERSION = "1.0"


class ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal["1.0"] = MODEL_SCHEMA_VERSION
    enhancement: Literal["sge", "cge", "none"] = Field(description="sge, cge (CLIP-guided) or none (VSE∞)")
    embed_dim: int = Field(gt=0, description="E, the joint embedding width")
    feature_dim: int = Field(gt=0, description="D, region feature width (2048 for BUTD ResNet)")
    num_regions: int = Field(gt=0, description="R, the region axis SGE's BatchNorm runs over")
    clip_dim: int | None = Field(default=None, description="width of the CLIP global (CGE only)")
    text_model: str = Field(description="Hugging Face BERT-family model: hub name or local folder")
    dropout: float = Field(default=0.4, ge=0, lt=1)
    gpo_pe_dim: int = 32
    gpo_hidden: int = 32
    queue_size: int = Field(gt=0, description="M, entries per momentum queue")
    momentum: float = Field(gt=0, lt=1, description="r: key weights <- r key + (1 - r) query")
    mu: float = Field(gt=0, description="UTO inverse temperature")
    gamma: float = Field(description="UTO margin")
    batch_weight: float = Field(gt=0, description="lambda: weight of the in-batch part of UTO")
    mask_false_negatives: bool = Field(default=False, description="leave same-image entries out of the "
                                       "negatives (False = the released code)")
    keys_in_train_mode: bool = Field(default=True, description="key encoders keep dropout/BN in train mode, "
                                     "as the released code does")

    @model_validator(mode="after")
    def _cge_needs_clip(self) -> ModelConfig:
        if (self.enhancement == "cge") != (self.clip_dim is not None):
            raise ValueError("clip_dim is set exactly when enhancement is 'cge'")
        return self


def load_model_config(name_or_path: str, **overrides) -> ModelConfig:
    """A preset name (coco, f30k, demo) or a YAML/JSON file, with keyword overrides."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        from importlib.resources import files

        path = Path(str(files("trainer") / "configs" / f"{name_or_path}.yaml"))
    if not path.is_file():
        from pipeline.errors import InputError

        raise InputError(f"unknown model config '{name_or_path}' (presets: coco, f30k, demo, or a .yaml file)")
    return ModelConfig(**{**yaml.safe_load(path.read_text()), **overrides})
