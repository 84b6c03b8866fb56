"""The GPU path measured on one card in one process (issue 17): the fused queue kernel compiled, a COCO-size
training step under bf16, BUTD-style region extraction on CUDA; each section is recorded even if a later
one fails (what each measures: docs/architecture.md, "On a GPU").

Run on a GPU:   TRITON_INTERPRET=0 PYTHONPATH=. python -m bench.gpu --out DIR
Dry run (CPU):  TRITON_INTERPRET=1 PYTHONPATH=. python -m bench.gpu --dry-run   (tiny sizes, every code path)
Results: bench/results/gpu.{json,md} (the dry run writes to a temporary folder instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub on the device machine: fail at once, never retry

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CPU_REFERENCE = RESULTS / "gpu_cpu_reference.json"
MU, GAMMA = 90.0, 0.5  # the coco preset's UTO constants
MB = 1 << 20


# --------------------------------------------------------------------------- run state and output


class Bench:
    """Sizes, the time budget and the results, written after every section."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cuda" if torch.cuda.is_available() and not self.dry else "cpu")
        self.started = time.perf_counter()
        self.results_dir = Path(
            args.results_dir
            or (Path(tempfile.gettempdir()) / "userpipe-gpu-dry-run" if self.dry else RESULTS)
        )
        self.report = {
            "benchmark": "GPU path: queue kernel, COCO training step, region extraction (issue 17)",
            **report.machine(),
            "dry_run": self.dry,
            "sections": {},
            "errors": {},
            "headline": [],
        }
        self.markdown: dict[str, list[str]] = {}

    def time_left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def section(self, name: str, title: str, run) -> None:
        print(f"\n== {title} ({self.time_left():.0f} s of budget left)", flush=True)
        started = time.perf_counter()
        try:
            run(self)
        except Exception as exc:  # a failed section is recorded; the next one still runs
            self.error(name, exc)
        self.report["sections"].setdefault(name, {})["seconds"] = round(time.perf_counter() - started, 1)
        self.report["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.write()
        print("\n".join(self.markdown.get(name, [])), flush=True)

    def error(self, where: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(f"!! {where}: {type(exc).__name__}: {exc}\n{text[-3000:]}", flush=True)
        self.report["errors"][where] = f"{type(exc).__name__}: {exc}"[:2000]
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

    def table(self, name: str, title: str, header: list[str], rows: list[list], notes=()) -> None:
        lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
        self.markdown[name] = [*lines, *([""] + list(notes) if notes else []), ""]

    def write(self) -> None:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        device = self.report["sections"].get("device", {})
        title = f"# GPU path, {device.get('name', self.device.type)}"
        lines = [
            title,
            "",
            f"{self.report['machine']}, {self.report['date']}; torch {torch.__version__}, triton "
            f"{device.get('triton', '-')}; {self.report.get('elapsed_s', 0)} s in all.",
            "",
        ]
        for part in self.markdown.values():
            lines += part
        if self.report["errors"]:
            lines += ["## Errors", ""] + [
                f"- {k}: {v.splitlines()[0][:300]}" for k, v in self.report["errors"].items()
            ]
        paths = [self.results_dir / "gpu.json", self.results_dir / "gpu.md"]
        paths[0].write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        paths[1].write_text("\n".join(lines) + "\n")
        if self.args.out:
            Path(self.args.out).mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copy(path, Path(self.args.out) / path.name)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def median_ms(bench: Bench, fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn(); CUDA: triton's do_bench (events, L2 flushed before each run)."""
    if bench.device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_bytes(bench: Bench, fn):
    """(bytes allocated at the peak of fn() above what was allocated before it, fn's result);
    CPU: (None, result)."""
    if bench.device.type != "cuda":
        return None, fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


def rounded(x, digits=3):
    return None if x is None else float(f"{x:.{digits}g}")


# --------------------------------------------------------------------------- 0. device and ceilings


def device_section(bench: Bench) -> None:
    import triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "device": bench.device.type,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "host_cpus": os.cpu_count(),
    }
    bench.report["sections"]["device"] = info
    if bench.device.type == "cuda":
        props = torch.cuda.get_device_properties(bench.device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / (1 << 30), 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["name"] = f"CPU dry run ({platform.machine()})"
    # copy bandwidth, bytes read + written: the memory-bound limit of section 1 is counted at this rate
    elements = (1 << 29) if bench.device.type == "cuda" else (1 << 22)  # 2 GiB or 16 MiB of fp32
    src = torch.randn(elements, device=bench.device)
    dst = torch.empty_like(src)
    ms = median_ms(bench, lambda src=src, dst=dst: dst.copy_(src))
    info["copy_gb_per_s"] = rounded(2 * src.nbytes / ms / 1e6, 4)
    del src, dst
    # matmul rates on random data (zeros run faster): the compute floors of section 1
    for dtype, n in ((torch.bfloat16, 8192), (torch.float32, 4096)):
        n = n if bench.device.type == "cuda" else 256
        a, b = (
            torch.randn(n, n, device=bench.device, dtype=dtype),
            torch.randn(n, n, device=bench.device, dtype=dtype),
        )
        ms = median_ms(bench, lambda a=a, b=b: a @ b)
        info[f"matmul_tflops_{str(dtype).split('.')[-1]}"] = rounded(2 * n**3 / ms / 1e9)
    bench.table(
        "device", "Device and measured ceilings", ["what", "value"], [[k, v] for k, v in info.items()]
    )


# --------------------------------------------------------------------------- 1. queue kernel


def queue_inputs(b: int, m: int, e: int, device, seed: int = 0):
    """Unit queries, and a queue whose rows each lean towards one query by a random amount (cosines over
    about [0, 0.83]): z = μ(s − γ) reaches +30, so the softmax has mass; pure noise gives s ≈ 0 and every
    exp underflows."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(b, e, device=device, generator=gen), dim=1)
    queue = torch.randn(m, e, device=device, generator=gen)
    lean = torch.rand(m, 1, device=device, generator=gen) * (1.5 * math.sqrt(e))
    for start in range(0, m, 1 << 16):  # in slices: no second M × E temporary
        rows = slice(start, start + (1 << 16))
        owner = torch.arange(start, min(start + (1 << 16), m), device=device) % b
        queue[rows] = F.normalize(queue[rows] + lean[rows] * q[owner], dim=1)
    return q, queue


def forward_backward(backend: str, q, queue):
    """UTO's queue logsumexp term as the model uses it, (lse / μ).mean(), and its gradients."""
    from userpipe.trainer.losses import BACKENDS

    lse = BACKENDS[backend](q, queue, MU, GAMMA, None, None, None)
    loss = (lse / MU).mean()
    grad_q, grad_queue = torch.autograd.grad(loss, (q, queue))
    return loss.detach(), grad_q, grad_queue


def fp64_reference(q, queue):
    from userpipe.trainer.losses import queue_lse_chunked

    q64, k64 = q.detach().double().requires_grad_(), queue.detach().double().requires_grad_()
    loss = (queue_lse_chunked(q64, k64, MU, GAMMA, tile=1 << 16) / MU).mean()
    grads = torch.autograd.grad(loss, (q64, k64))
    return loss.detach(), *grads


def max_relative_error(ours, ref) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-300)).item()


@contextlib.contextmanager
def kernel_settings(**settings):
    """Module settings of trainer/kernels/queue_lse.py (FP32_DOT_PRECISION, BACKWARD_CHUNK_BYTES)
    for one row."""
    import userpipe.trainer.kernels.queue_lse as kernel

    saved = {name: getattr(kernel, name) for name in settings}
    for name, value in settings.items():
        setattr(kernel, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernel, name, value)


def measure_backend(bench: Bench, backend: str, q, queue, ref, limit_ms) -> dict:
    def run():
        return forward_backward(backend, q, queue)

    run()  # compiles and autotunes outside the timing
    ms = median_ms(bench, run)
    peak, (loss, grad_q, grad_queue) = peak_bytes(bench, run)
    grads = grad_q.nbytes + grad_queue.nbytes
    return {
        "ms": ms,
        "peak_mb": None if peak is None else peak / MB,
        "workspace_mb": None if peak is None else (peak - grads) / MB,
        "loss_rel_err": abs(loss.double().item() - ref[0].item()) / abs(ref[0].item()),
        "dq_rel_err": max_relative_error(grad_q, ref[1]),
        "dqueue_rel_err": max_relative_error(grad_queue, ref[2]),
        "limit_ratio": ms / limit_ms if limit_ms else None,
        "loss": loss.item(),
    }


QUEUE_HEADER = [
    "queue",
    "M",
    "backend",
    "fwd+bwd ms",
    "eager ms / this",
    "peak MB",
    "workspace MB",
    "workspace / eager's",
    "loss rel err",
    "dq rel err",
    "dQ rel err",
    "ms / memory-bound limit",
]


def queue_section(bench: Bench) -> None:
    import userpipe.trainer.kernels.queue_lse as kernel

    section = bench.report["sections"].setdefault("queue_kernel", {})
    device_info = bench.report["sections"].get("device", {})
    b, e = (16, 64) if bench.dry else (128, 1024)
    queues = [512, 2048] if bench.dry else [65536, 262144, 1048576]
    if (
        bench.dry
    ):  # several backward chunks, and dq's split product (bf16: chunks of 1,024 rows), at tiny sizes
        kernel.BACKWARD_CHUNK_BYTES = b * 1024 * 2
    section.update(
        B=b,
        E=e,
        M=queues,
        mu=MU,
        gamma=GAMMA,
        copy_gb_per_s=device_info.get("copy_gb_per_s"),
        fp32_dot_precision=kernel.FP32_DOT_PRECISION,
        backward_chunk_bytes=kernel.BACKWARD_CHUNK_BYTES,
        rows=[],
    )
    rows, notes = section["rows"], []
    # (backend, label, kernel settings); the extra triton rows tell whether to change the module's defaults
    variants = {
        torch.bfloat16: [
            ("triton", "", {}),
            ("eager", "", {}),
            ("chunked", "", {}),
            ("triton", "4 MB chunks", {"BACKWARD_CHUNK_BYTES": 4 << 20}),
        ],
        torch.float32: [
            ("triton", "", {}),
            ("eager", "", {}),
            ("chunked", "", {}),
            ("triton", "tf32x3", {"FP32_DOT_PRECISION": "tf32x3"}),
        ],
    }
    for dtype, backends in variants.items():
        for m in queues:
            try:
                _queue_point(bench, dtype, b, m, e, backends, rows, notes)
            except Exception as exc:  # the inputs or the reference: the next size still runs
                bench.error(f"queue_kernel {dtype} M={m}", exc)
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
            _queue_table(bench, rows, notes)
            bench.write()
    section["autotuned"] = {}
    for kernel_name, fn in (("forward", kernel._forward_kernel), ("weights", kernel._weights_kernel)):
        for key, config in getattr(fn, "cache", {}).items():  # (B, M, E, MASK_IDS, FP32_PRECISION, dtypes)
            choice = f"{config.kwargs} warps {config.num_warps} stages {config.num_stages}"
            section["autotuned"][f"{kernel_name} {key}"] = choice
            notes.append(f"autotuned {kernel_name} {key}: {choice}")
    _queue_table(bench, rows, notes)
    _queue_headline(bench, rows)


def _queue_point(
    bench: Bench, dtype, b: int, m: int, e: int, backends, rows: list[dict], notes: list[str]
) -> None:
    """Every backend at one queue size and dtype, against one fp64 reference."""
    device_info = bench.report["sections"].get("device", {})
    dtype_name = str(dtype).split(".")[-1]
    bandwidth, rate = device_info.get("copy_gb_per_s"), device_info.get(f"matmul_tflops_{dtype_name}")
    q32, queue32 = queue_inputs(b, m, e, bench.device)
    q, queue = q32.to(dtype).requires_grad_(), queue32.to(dtype).requires_grad_()
    del q32, queue32
    ref = fp64_reference(q, queue)
    limit_ms = 2 * queue.nbytes / (bandwidth * 1e6) if bandwidth else None  # read once forward, once backward
    floor_ms = 6 * b * m * e / (rate * 1e9) if rate else None  # forward + the two gradient products
    notes.append(
        f"{dtype_name}, M={m:,}: queue {queue.nbytes / MB:,.0f} MB; "
        f"memory-bound limit {rounded(limit_ms)} ms "
        f"(queue read twice at {bandwidth} GB/s); compute floor {rounded(floor_ms)} ms (6·B·M·E flop at "
        f"{rate} TFLOP/s)"
    )
    point = []
    for backend, label, settings in backends:
        name = f"{backend} {label}".strip()
        row = {"queue": dtype_name, "M": m, "backend": name}
        point.append(row)
        rows.append(row)
        if label and bench.time_left() < 120:
            row["skipped"] = "time budget"
            continue
        try:
            with kernel_settings(**settings):
                row.update(measure_backend(bench, backend, q, queue, ref, limit_ms))
        except Exception as exc:
            bench.error(f"queue_kernel {dtype_name} M={m} {name}", exc)
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"   {row}", flush=True)
    eager = next((r for r in point if r["backend"] == "eager" and "ms" in r), None)
    for row in point:
        if eager and "ms" in row:
            row["speedup_vs_eager"] = eager["ms"] / row["ms"]
            if row.get("workspace_mb") is not None and eager.get("workspace_mb"):
                row["workspace_vs_eager"] = row["workspace_mb"] / eager["workspace_mb"]


def _queue_table(bench: Bench, rows: list[dict], notes: list[str]) -> None:
    def cell(row, key, digits=3):
        return rounded(row.get(key), digits)

    table = []
    for r in rows:
        if "ms" not in r:
            table.append(
                [r["queue"], f"{r['M']:,}", r["backend"], r.get("error") or r.get("skipped")]
                + [None] * (len(QUEUE_HEADER) - 4)
            )
            continue
        table.append(
            [
                r["queue"],
                f"{r['M']:,}",
                r["backend"],
                cell(r, "ms"),
                cell(r, "speedup_vs_eager"),
                cell(r, "peak_mb", 4),
                cell(r, "workspace_mb", 4),
                cell(r, "workspace_vs_eager", 2),
                cell(r, "loss_rel_err", 2),
                cell(r, "dq_rel_err", 2),
                cell(r, "dqueue_rel_err", 2),
                cell(r, "limit_ratio"),
            ]
        )
    sizes = bench.report["sections"]["queue_kernel"]
    bench.table(
        "queue_kernel",
        f"Queue logsumexp, forward + backward (B = {sizes['B']}, E = {sizes['E']})",
        QUEUE_HEADER,
        table,
        [
            "Peak MB: allocated above the inputs during one forward + backward (both gradients included); "
            "workspace MB: the peak less the two gradients. Errors: max |ours − fp64| / max |fp64| over the "
            "same (rounded) inputs. Memory-bound limit: the queue's bytes read once forward and once "
            "backward at the measured copy bandwidth.",
            *[f"- {n}" for n in notes],
        ],
    )


def _queue_headline(bench: Bench, rows: list[dict]) -> None:
    name = bench.report["sections"].get("device", {}).get("name", "")
    by = {(r["queue"], r["M"], r["backend"]): r for r in rows if "ms" in r}
    for (dtype, m, backend), r in by.items():
        eager = by.get((dtype, m, "eager"))
        if backend != "triton" or not eager or m < 262144:
            continue
        bench.report["headline"].append(
            [
                f"queue loss fwd+bwd, B=128, M={m:,}, {dtype}, {name}",
                f"triton {r['ms']:.2f} ms vs eager {eager['ms']:.2f} ms; "
                f"workspace {r.get('workspace_mb') or 0:,.0f} vs {eager.get('workspace_mb') or 0:,.0f} MB; "
                f"{r.get('limit_ratio') or 0:.1f}x the memory-bound limit",
            ]
        )


# --------------------------------------------------------------------------- 2. training step


def train_section(bench: Bench) -> None:
    from transformers import BertConfig, BertModel

    from userpipe.trainer.config import load_run_config
    from userpipe.trainer.losses import choose_backend
    from userpipe.trainer.model import build_model
    from userpipe.trainer.step import build_optimizer  # the library's fused AdamW, as training runs it

    section = bench.report["sections"].setdefault("train_step", {})
    config = load_run_config("coco")
    recipe, model_config = config.train, config.model
    if bench.dry:
        model_config = model_config.model_copy(update={"embed_dim": 32, "feature_dim": 64, "queue_size": 64})
        bert_config = BertConfig(
            vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        batch, tokens_long, steps, warmup = 4, 8, 2, 1
    else:
        bert_config = BertConfig()  # bert-base-uncased's shape (the coco preset's text_model), random weights
        batch, tokens_long, steps, warmup = recipe.batch_size, 20, 10, 3
    device = bench.device
    torch.manual_seed(recipe.seed)
    model = build_model(model_config, BertModel(bert_config)).to(device).train()
    inputs = _train_inputs(model_config, bert_config, batch, tokens_long, device)
    section.update(
        batch=batch,
        regions=list(inputs[0].shape[1:]),
        tokens=tokens_long,
        embed_dim=model_config.embed_dim,
        queue_size=model_config.queue_size,
        bert_layers=bert_config.num_hidden_layers,
        bert_hidden=bert_config.hidden_size,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        queue_backend=choose_backend(
            torch.zeros(batch, 8, device=device), torch.zeros(model_config.queue_size, 8, device=device)
        ),
    )

    optimizer = build_optimizer(model, recipe)
    variants = section.setdefault("variants", [])

    def step(bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = model(*inputs)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        return losses["loss"].item()

    wanted = bench.args.train_variants.split(",")
    for key, name, bf16, compiled in (
        ("fp32", "fp32", False, False),
        ("bf16", "bf16 autocast", True, False),
        ("compile", "bf16 autocast + torch.compile", True, True),
    ):
        if key not in wanted:
            continue
        row = {"variant": name}
        variants.append(row)
        if compiled and bench.time_left() < (20 if bench.dry else 100):
            row["skipped"] = "time budget"
        else:
            try:
                row.update(_time_steps(bench, model, step, bf16, compiled, warmup, steps, batch))
            except Exception as exc:
                bench.error(f"train_step {name}", exc)
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"   {row}", flush=True)
        if key == "fp32":
            _record_agreement(bench, section, model, inputs)
        _train_table(bench, section)
        bench.write()  # a compile that outlasts the command's timeout keeps the rows before it
    _train_headline(bench, variants, batch)


def _train_inputs(model_config, bert_config, batch: int, tokens_long: int, device) -> tuple:
    """One synthetic batch of the model's inputs at COCO's shapes, seeded."""
    gen = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(batch, model_config.num_regions, model_config.feature_dim, generator=gen),
        torch.full((batch,), model_config.num_regions),  # BUTD always yields R boxes
        torch.randint(
            min(1000, bert_config.vocab_size // 2),
            bert_config.vocab_size,
            (batch, tokens_long),
            generator=gen,
        ),  # bert-base's word pieces start at 1000 (below: specials, unused)
        torch.randint(tokens_long * 3 // 5, tokens_long + 1, (batch,), generator=gen),  # COCO: 12-20 tokens
        torch.arange(batch),
    )
    return tuple(x.to(device) for x in inputs)


def _train_headline(bench: Bench, variants: list[dict], batch: int) -> None:
    """The fastest variant that ran against fp32, when fp32 and another ran."""
    done = {v["variant"]: v for v in variants if "step_ms" in v}
    if "fp32" in done and len(done) > 1:
        best = min(done.values(), key=lambda v: v["step_ms"])
        name = bench.report["sections"].get("device", {}).get("name", "")
        bench.report["headline"].append(
            [
                f"training step, coco preset, batch {batch}, {name}",
                f"{best['variant']}: {best['pairs_per_s']:,.0f} pairs/s vs fp32 "
                f"{done['fp32']['pairs_per_s']:,.0f}",
            ]
        )


def _record_agreement(bench: Bench, section: dict, model, inputs: tuple) -> None:
    """fp32 against bf16 autocast on the same batch, recorded (or its error) in the section. At
    initialisation every score sits below γ: loss and gradients are ~0 there."""
    try:
        section["agreement"] = _fp32_bf16_agreement(model, inputs, bench.device)
        print(f"   agreement {section['agreement']}", flush=True)
    except Exception as exc:
        bench.error("train_step agreement", exc)


def _time_steps(
    bench: Bench, model, step, bf16: bool, compiled: bool, warmup: int, steps: int, batch: int
) -> dict:
    row = {}
    if compiled:
        started = time.perf_counter()
        model.image.compile(backend=bench.args.compile_backend)
        model.text.compile(backend=bench.args.compile_backend)
        step(bf16)  # traces and compiles forward and backward
        row["compile_s"] = round(time.perf_counter() - started, 1)
    for _ in range(warmup):
        step(bf16)
    bench.sync()
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        row["loss"] = step(bf16)  # .item() waits for the step
        times.append(time.perf_counter() - start)
    row["step_ms"] = 1e3 * statistics.median(times)
    row["pairs_per_s"] = batch / statistics.median(times)
    if cuda:
        row["peak_mb_above_model_and_optimizer"] = (torch.cuda.max_memory_allocated() - before) / MB
    return row


def _fp32_bf16_agreement(model, inputs, device) -> dict:
    """One forward + backward from the same weights, queues and batch in fp32 and under bf16 autocast, in
    training mode with every dropout at 0 (no draws to differ; cuDNN's GRU backward needs training mode);
    the model's state and dropout rates are restored afterwards."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    towers = {
        "image": [id(p) for p in model.image.parameters()],
        "text": [id(p) for p in model.text.parameters()],
    }
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    runs = {}
    try:
        for m in dropouts:
            m.p = 0.0
        model.train()
        for bf16 in (False, True):
            model.load_state_dict(state)
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = model(*inputs)
            losses["loss"].backward()
            grads = {
                id(p): p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None
            }
            runs[bf16] = {k: v.item() for k, v in losses.items()}, grads
    finally:
        for m, rate in zip(dropouts, rates, strict=True):
            m.p = rate
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.train()
    (loss32, grads32), (loss16, grads16) = runs[False], runs[True]
    result = {f"{k}_fp32": loss32[k] for k in loss32} | {f"{k}_bf16": loss16[k] for k in loss16}
    result["loss_abs_diff"] = abs(loss16["loss"] - loss32["loss"])
    result["loss_rel_diff"] = result["loss_abs_diff"] / abs(loss32["loss"]) if loss32["loss"] else None
    for tower, ids in {"all": list(grads32), **towers}.items():
        a = torch.cat([grads32[i] for i in ids if i in grads32])
        b = torch.cat([grads16[i] for i in ids if i in grads16])
        result[f"grad_{tower}_cosine"] = F.cosine_similarity(a, b, dim=0).item()
        result[f"grad_{tower}_norm_rel_diff"] = (
            abs(b.norm().item() - a.norm().item()) / a.norm().item() if a.norm().item() else None
        )
    return result


def _train_table(bench: Bench, section: dict) -> None:
    rows = []
    for v in section.get("variants", []):
        rows.append(
            [
                v["variant"],
                rounded(v.get("step_ms")),
                rounded(v.get("pairs_per_s")),
                rounded(v.get("peak_mb_above_model_and_optimizer"), 4),
                rounded(v.get("loss"), 5),
                v.get("compile_s"),
                v.get("error") or v.get("skipped"),
            ]
        )
    agreement = section.get("agreement", {})
    notes = [
        f"Batch {section.get('batch')}, regions {section.get('regions')}, {section.get('tokens')} tokens, "
        f"E={section.get('embed_dim')}, M={section.get('queue_size')}, BERT {section.get('bert_layers')} x "
        f"{section.get('bert_hidden')} (random weights), queue backend '{section.get('queue_backend')}'; "
        "forward + backward + clip + AdamW, median of timed steps after warm-up.",
        "fp32 vs bf16 autocast, one step from the same state after the fp32 steps "
        "(training mode, dropout 0): " + ", ".join(f"{k} {rounded(v, 4)}" for k, v in agreement.items()),
    ]
    bench.table(
        "train_step",
        "Training step at COCO size",
        ["variant", "step ms", "pairs/s", "peak MB", "loss", "compile s", "note"],
        rows,
        notes,
    )


# --------------------------------------------------------------------------- 3. region extraction


def extraction_setup(dry: bool, folder: Path):
    """The butd extractor's config with random weights written to `folder`, and synthetic images."""
    import numpy as np
    from PIL import Image
    from torchvision.models import resnet50, resnet101
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from userpipe.pipeline.region_kinds import resolve_region_config
    from userpipe.schemas.store import ExtractorConfig, GlobalConfig

    torch.manual_seed(0)
    backbone = "resnet50" if dry else "resnet101"  # BUTD's own backbone is ResNet-101; the dry run is smaller
    torch.save(
        fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), folder / "detector.pth"
    )
    torch.save((resnet50 if dry else resnet101)(weights=None).state_dict(), folder / "backbone.pth")
    regions = resolve_region_config(
        "butd", None, backbone, str(folder / "backbone.pth"), str(folder / "detector.pth")
    )
    num_regions, image_size, (width, height) = (
        (10, 96, (128, 96)) if dry else (36, 600, (640, 480))
    )  # COCO-sized
    config = ExtractorConfig(
        dataset="bench",
        splits=("train",),
        max_captions=None,
        num_regions=num_regions,
        feature_dim=2048,
        image_size=image_size,
        chunk_size=64,
        regions=regions,
        global_encoder=GlobalConfig(kind="none"),
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(8)]
    return (
        config,
        images,
        {
            "backbone": backbone,
            "num_regions": num_regions,
            "image_size": image_size,
            "image": f"{width}x{height}",
            "weights": "random",
        },
    )


def images_per_s(extractor, images, count: int, sync) -> float:
    extractor(images[0])  # warm-up: cuDNN handles, allocator
    sync()
    start = time.perf_counter()
    for i in range(count):
        extractor(images[i % len(images)])
    sync()
    return count / (time.perf_counter() - start)


def extraction_section(bench: Bench) -> None:
    from userpipe.pipeline.region_kinds import region_kind

    section = bench.report["sections"].setdefault("extraction", {})
    gpu_images, cpu_images = (2, 1) if bench.dry else (64, bench.args.device_cpu_images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config, images, setting = extraction_setup(bench.dry, Path(tmp))
        section.update(setting)
        build = region_kind(config.regions.kind).build  # the library's extractor, on the device
        extractor = build(config, bench.device)
        rate = images_per_s(extractor, images, gpu_images, bench.sync)
        section["device_images_per_s"] = rate
        rows.append(
            [
                f"{bench.device.type} ({bench.report['sections'].get('device', {}).get('name', '')})",
                gpu_images,
                rounded(rate),
            ]
        )
        found = extractor(images[0])
        features, boxes = found.features, found.boxes
        del extractor
        if bench.time_left() > 30:
            torch.set_num_threads(os.cpu_count() or 1)
            cpu_extractor = build(config, "cpu")
            cpu_found = cpu_extractor(images[0])  # the library's own result on the same image
            cpu_features, cpu_boxes = cpu_found.features, cpu_found.boxes
            section["boxes_equal_cpu"] = bool((boxes == cpu_boxes).all())
            section["features_rel_diff_vs_cpu"] = float(
                abs(features - cpu_features).max() / abs(cpu_features).max()
            )
            if cpu_images:
                rate = images_per_s(cpu_extractor, images, cpu_images, lambda: None)
                section["host_cpu_images_per_s"] = rate
                rows.append(
                    [
                        f"this machine's CPU ({os.cpu_count()} cores), pipeline.regions as is",
                        cpu_images,
                        rounded(rate),
                    ]
                )
    if CPU_REFERENCE.is_file():
        reference = json.loads(CPU_REFERENCE.read_text())
        section["cpu_reference"] = reference
        rows.append(
            [
                f"development CPU ({reference['machine']}, {reference['date']})",
                reference["images"],
                rounded(reference["images_per_s"]),
            ]
        )
        if not bench.dry:
            section["speedup_vs_cpu_reference"] = section["device_images_per_s"] / reference["images_per_s"]
    bench.table(
        "extraction",
        "Region extraction (butd: Faster R-CNN boxes + backbone features)",
        ["where", "images", "images/s"],
        rows,
        [
            f"{setting['backbone']}, {setting['num_regions']} regions, "
            f"shorter side {setting['image_size']} px, synthetic {setting['image']} images, random weights; "
            f"one image at a time, as `userpipe extract` runs it. "
            f"Same image on both: boxes equal {section.get('boxes_equal_cpu')}, features max rel diff "
            f"{rounded(section.get('features_rel_diff_vs_cpu'), 2)} (cuDNN may use TF32 convolutions)."
        ],
    )
    if "speedup_vs_cpu_reference" in section:
        name = bench.report["sections"].get("device", {}).get("name", "")
        bench.report["headline"].append(
            [
                f"butd region extraction, {setting['backbone']}, 600 px, {name}",
                f"{section['device_images_per_s']:.1f} images/s "
                f"({section['speedup_vs_cpu_reference']:.0f}x the development CPU)",
            ]
        )


def write_cpu_reference(count: int) -> None:
    """--cpu-reference: the same extractor on this machine's CPU at full size, for section 3 to
    compare with."""
    from userpipe.pipeline.region_kinds import region_kind

    with tempfile.TemporaryDirectory() as tmp:
        config, images, setting = extraction_setup(False, Path(tmp))
        rate = images_per_s(
            region_kind(config.regions.kind).build(config, "cpu"), images, count, lambda: None
        )
    result = {
        **report.machine(),
        "images": count,
        "images_per_s": rate,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **setting,
    }
    CPU_REFERENCE.write_text(json.dumps(result, indent=1) + "\n")
    print(result)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="also copy gpu.json and gpu.md here (the device tool's $OUT)")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU; results to a temporary folder"
    )
    parser.add_argument("--results-dir", help="where gpu.json and gpu.md go (default bench/results)")
    parser.add_argument(
        "--budget-s", type=float, help="optional parts are skipped past this (default 330 s; dry run 3600 s)"
    )
    parser.add_argument("--sections", default="device,queue,extraction,train")
    parser.add_argument("--train-variants", default="fp32,bf16,compile", help="section 2's variants")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for section 2")
    parser.add_argument("--device-cpu-images", type=int, default=4, help="section 3 on this machine's CPU")
    parser.add_argument(
        "--cpu-reference",
        type=int,
        metavar="N",
        help="only measure extraction of N images on this CPU (bench/results/gpu_cpu_reference.json)",
    )
    args = parser.parse_args()
    args.budget_s = args.budget_s or (3600 if args.dry_run else 330)
    if args.cpu_reference:
        write_cpu_reference(args.cpu_reference)
        return
    bench = Bench(args)
    if bench.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(
            "TRITON_INTERPRET=1 would interpret the kernels on the GPU machine: run with TRITON_INTERPRET=0"
        )
    wanted = args.sections.split(",")
    # extraction before the training step: torch.compile, last, is the longest and the one the budget may skip
    for key, name, title, run in (
        ("device", "device", "Device", device_section),
        ("queue", "queue_kernel", "Queue kernel", queue_section),
        ("extraction", "extraction", "Region extraction", extraction_section),
        ("train", "train_step", "Training step", train_section),
    ):
        if key in wanted:
            bench.section(name, title, run)
    print("\n" + (bench.results_dir / "gpu.md").read_text(), flush=True)
    print(f"results: {bench.results_dir}/gpu.json, gpu.md ({bench.report['elapsed_s']} s)", flush=True)


if __name__ == "__main__":
    main()
