"""Checkpoints: a run's saved states, written so that a kill or a full disk at any instant leaves a run
that `--resume` continues; the seeded initial model a run starts from; loading a trained model (eval,
index, search, report) and finding the checkpoint a command names. The layout, and how a save switches
`last` and `best`: docs/architecture.md, "What survives a fault".
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch

from userpipe.schemas import threads
from userpipe.schemas.base import read_model
from userpipe.schemas.errors import InputError
from userpipe.schemas.outputs import check_free_space, fsync_path, written_whole
from userpipe.schemas.run import RunConfig
from userpipe.trainer.captions import CaptionTokenizer
from userpipe.trainer.model import USER, build_model
from userpipe.trainer.process import cpu_model
from userpipe.trainer.step import Position

CHECKPOINTS = "checkpoints"
LINKS = ("best", "last")
WEIGHTS, CONFIG, STATE, METRICS = "model.safetensors", "config.json", "state.pt", "metrics.json"
BEST_MARKER = "BEST"
PARTIAL = ".partial"


STATE_NAME = re.compile(r"e\d{3}-s\d{6}(?:\.\d+)?|legacy-(?:best|last)")


def state_name(epoch: int, step: int) -> str:
    return f"e{epoch:03d}-s{step:06d}"


def has_checkpoint(run: Path) -> bool:
    """The run has a committed state to resume from."""
    return (run / CHECKPOINTS / "last" / STATE).is_file()


def has_states(run: Path) -> bool:
    folder = run / CHECKPOINTS
    return folder.is_dir() and any(STATE_NAME.fullmatch(p.name) for p in folder.iterdir())


def recover(run: Path) -> None:
    """Finish or undo what a killed save left (call under the run's writer lock), touching only names a
    save writes: a save killed between switching `last` and `best` gets `best` switched too (its state
    carries the BEST marker); partial states and states no link names are removed. Folders `last` and
    `best` of runs written before the links existed become states."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return
    for link in LINKS:
        path, legacy = folder / link, f"legacy-{link}"
        if path.is_dir() and not path.is_symlink():  # the earlier layout: a folder per name
            os.replace(path, folder / legacy)
        if not path.is_symlink() and (folder / legacy).is_dir():
            _point(folder, link, legacy)
    named = {link: os.readlink(folder / link) for link in LINKS if (folder / link).is_symlink()}
    if (
        "last" in named
        and named.get("best") != named["last"]
        and (folder / named["last"] / BEST_MARKER).is_file()
    ):
        _point(folder, "best", named["last"])
        named["best"] = named["last"]
    for entry in folder.iterdir():
        if entry.name in named.values() or entry.name in LINKS:
            continue
        if STATE_NAME.fullmatch(entry.name) or entry.name.endswith(PARTIAL):
            shutil.rmtree(entry)
        elif entry.name.startswith(".") and entry.name.endswith(".link"):
            entry.unlink()  # a link being switched


def _point(folder: Path, link: str, target: str) -> None:
    """Switch `folder/link` to `target` in one rename: the link is never missing."""
    with written_whole(folder / link, scratch=folder / f".{link}.link") as temporary:
        os.symlink(target, temporary)


class _ErrorKeepingFile:
    """A file for torch.save that keeps the OSError behind a failed write: torch reports it only as
    'unexpected pos', which would hide a full disk."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def checkpoint_bytes(model: USER) -> int:
    """A saved state's size, known before the first step: the weights (key encoders and queues included),
    AdamW's two moments per trainable parameter, and 1 MiB for the rest."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + moments + (1 << 20)


def save(
    run: Path,
    model: USER,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    position: dict,
    metrics: dict,
    best: bool,
    rng: torch.Tensor | list[torch.Tensor] | None = None,
) -> None:
    """Write the state at `position` and make it `last` (and `best`): docs/architecture.md, "What survives a
    fault". `rng`: the RNG state (this process's by default; with several processes, every rank's, in rank
    order: the state records their number as the run's world size)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    folder = run / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    name = base = state_name(position["epoch"], position["step"])
    copies = 0
    while (folder / name).exists():  # a resumed run saving a position again that `best` still names
        copies += 1
        name = f"{base}.{copies}"
    needed = checkpoint_bytes(model)
    check_free_space(folder, needed)
    with written_whole(folder / name, needed, scratch=folder / f".{name}{PARTIAL}") as partial:
        partial.mkdir()
        try:
            save_model(model, str(partial / WEIGHTS))
        except SafetensorError as exc:  # safetensors reports an I/O error as its own type: keep the errno
            raise OSError(*_errno_of(str(exc)), str(partial / WEIGHTS)) from None
        (partial / CONFIG).write_text(config.model_dump_json(indent=1))
        (partial / METRICS).write_text(json.dumps(metrics, indent=1))
        if best:
            (partial / BEST_MARKER).touch()
        with open(partial / STATE, "wb") as file:
            keeping = _ErrorKeepingFile(file)
            try:
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "position": position,
                        "torch_rng": torch.get_rng_state() if rng is None else rng,
                        "threads": torch.get_num_threads(),
                        "cpu": cpu_model(),
                        "world_size": len(rng) if isinstance(rng, list) else 1,
                    },
                    keeping,
                )
            except RuntimeError:
                if keeping.error is None:
                    raise
                raise keeping.error from None
            file.flush()
            os.fsync(file.fileno())
        for entry in (WEIGHTS, CONFIG, METRICS, *((BEST_MARKER,) if best else ())):
            fsync_path(partial / entry)
        fsync_path(partial)
    for link in ("last", "best") if best else ("last",):
        _point(folder, link, name)
    fsync_path(folder)
    recover(run)  # the states no link names any more


def _errno_of(message: str) -> tuple[int, str]:
    """(errno, strerror) from a Rust I/O error text ('... (os error 28)'); EIO when it names none."""
    found = re.search(r"os error (\d+)", message)
    code = int(found.group(1)) if found else errno.EIO
    return code, os.strerror(code)


def run_config_of(run: Path) -> RunConfig:
    """The configuration a run continues with: its last checkpoint's, or (none saved yet) the run's."""
    path = run / CHECKPOINTS / "last" / CONFIG
    if not path.is_file():
        path = run / CONFIG
    if not path.is_file():
        raise InputError(f"--resume: no run in {run}")
    return read_model(RunConfig, path, "run configuration")


def load_state(path: Path) -> dict:
    """A checkpoint's training state (optimizer, position, RNG); a damaged file is one line naming it."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except FileNotFoundError:
        raise InputError(f"{path} is missing: the checkpoint is incomplete") from None
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch all report a damaged file their own way
        raise InputError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(state, dict) or not {"optimizer", "position", "torch_rng"} <= set(state):
        raise InputError(f"{path} is not a userpipe training state")
    return state


def load_model_weights(model: USER, path: Path, device) -> None:
    """A checkpoint's weights into `model`; a damaged or foreign file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), device=str(device))
    except (SafetensorError, RuntimeError) as exc:
        raise InputError(
            f"{path} is damaged or holds another model: {str(exc).splitlines()[0][:200]}"
        ) from None


def load_checkpoint(directory: Path, bert=None) -> tuple[USER, RunConfig]:
    """A model and its config from a checkpoint directory (…/checkpoints/best), on the GPU if any."""
    if not (directory / WEIGHTS).is_file():
        raise InputError(f"no checkpoint at {directory}")
    config = read_model(RunConfig, directory / CONFIG, "checkpoint configuration")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(config.model, bert).to(device)
    load_model_weights(model, directory / WEIGHTS, device)
    return model, config


def load_trained(directory: Path) -> tuple[USER, RunConfig, CaptionTokenizer]:
    """A checkpoint's model and config, and the tokenizer of its text model: what encoding needs."""
    model, config = load_checkpoint(directory)
    return model, config, CaptionTokenizer.for_text_model(config.model.text_model, config.model.max_tokens)


def initial_model(config: RunConfig, bert=None) -> USER:
    """The untrained model a run of `config` starts from (seeded: the same every time)."""
    init_seed = config.train.init_seed
    torch.manual_seed(config.train.seed if init_seed is None else init_seed)
    return build_model(config.model, bert)


def checkpoint_dir(run: Path | None, checkpoint: Path | None, choices: str = "--run or --checkpoint") -> Path:
    """The checkpoint a command uses: the one given, else the run's best."""
    if checkpoint is None and run is None:
        raise InputError(f"pass {choices}")
    directory = checkpoint or run / CHECKPOINTS / "best"
    if not (directory / WEIGHTS).is_file():
        raise InputError(f"no checkpoint at {directory}")
    return directory


def restore(
    state: dict, optimizer: torch.optim.Optimizer, rank: int, console, deterministic: bool = False
) -> Position:
    """A saved state into this process: the optimizer's moments, the RNG (this rank's), a deterministic
    run's CPU thread count, and where the run is. The weights are loaded apart (rank 0's, before DDP copies
    them)."""
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # a state saved by the per-tensor loop resumes fused too
        group["fused"] = True
    rng = state["torch_rng"]
    torch.set_rng_state(rng[rank] if isinstance(rng, list) else rng)
    if deterministic and state.get("cpu", cpu_model()) != cpu_model():
        console.print(
            f"note: this run was saved on another CPU ({state['cpu']}); on {cpu_model()} MKL may take "
            "another code path, so the resumed steps can differ in the last bits from an uninterrupted run "
            "(MKL_CBWR=COMPATIBLE gives the same bits on every x86 CPU)"
        )
    if deterministic and state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        # CPU reductions split work by thread, so the thread count is part of what makes a resumed run
        # compute the bits the uninterrupted one would have
        console.print(
            f"using the run's {state['threads']} CPU threads (this process had {torch.get_num_threads()})"
        )
        threads.fix(state["threads"])
    return Position(**state["position"])
