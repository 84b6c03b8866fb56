# userpipe tasks. Install `just` with `pip install rust-just`.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv + "/bin"

# list the tasks
default:
    @just --list

# create .venv and install userpipe with its test extras (torch from the local wheel cache, see README)
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp={{venv}}/.userpipe-installed
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then exit 0; fi
    [ -x {{bin}}/python ] || python3 -m venv {{venv}}
    {{bin}}/python -m pip install -q --upgrade pip
    # the exact versions CI tests (constraints.txt); pyproject.toml states the ranges userpipe works with
    {{bin}}/python -m pip install -q -c constraints.txt torch torchvision
    # detectron2 (for --regions butd-vg) is not on PyPI: one built from source into this venv (README,
    # "detectron2, for the Visual Genome detector") is kept; a prebuilt wheel for this Python and platform
    # is taken from $USERPIPE_WHEELS (CI's: ../shared/wheels) when there is one
    {{bin}}/python -m pip install -q -c constraints.txt packaging  # the wheel tags this Python accepts
    wheel=$({{bin}}/python -c 'import glob, os, sys; from packaging.tags import sys_tags; \
        tags = {str(t) for t in sys_tags()}; \
        found = [w for w in sorted(glob.glob(os.path.join(sys.argv[1], "detectron2-*.whl"))) \
                 if "-".join(os.path.basename(w)[:-4].split("-")[-3:]) in tags]; print(found[-1] if found else "")' \
        "${USERPIPE_WHEELS:-../shared/wheels}")
    has_detectron2() { {{bin}}/python -c 'import importlib.util, sys; sys.exit(not importlib.util.find_spec("detectron2"))'; }
    # setuptools reports every editable install of a mapped package-dir layout as a warning ("Editable
    # installation ... Please be careful with folders in your working directory"): information, not a problem
    export PYTHONWARNINGS="ignore:Editable installation"
    if [ -n "$wheel" ]; then
        {{bin}}/python -m pip install -q -c constraints.txt "$wheel" -e '.[test,butd]'
    elif has_detectron2; then
        {{bin}}/python -m pip install -q -c constraints.txt -e '.[test,butd]'
    else
        {{bin}}/python -m pip install -q -c constraints.txt -e '.[test]'
        echo "--regions butd-vg is off: detectron2 is not installed (to build it: README.md, \"detectron2, for the Visual Genome detector\"; its tests skip)"
        if [ -n "${USERPIPE_WHEELS:-}" ]; then echo "  (no detectron2 wheel for this Python in $USERPIPE_WHEELS)"; fi
    fi
    touch "$stamp"

# the embedded offline demo: generate, extract, shard, train, evaluate, index, search, report (finished stages are reused)
demo: setup
    HF_HUB_OFFLINE=1 {{bin}}/userpipe extract --dataset demo
    {{bin}}/userpipe info data/demo.zarr
    {{bin}}/userpipe shard --store data/demo.zarr --split train --max-count 250
    {{bin}}/userpipe verify data/demo-shards/train
    {{just_executable()}} _demo-train runs/demo
    HF_HUB_OFFLINE=1 {{bin}}/userpipe eval --run runs/demo --store data/demo.zarr --split test
    HF_HUB_OFFLINE=1 {{bin}}/userpipe index --run runs/demo --store data/demo.zarr --split test --out runs/demo/index
    HF_HUB_OFFLINE=1 {{bin}}/userpipe search "a red circle to the left of a blue square" --index runs/demo/index \
        --run runs/demo -k 5 --html runs/demo/search.html
    HF_HUB_OFFLINE=1 {{bin}}/userpipe report --run runs/demo --store data/demo.zarr --split test

# the demo's ablation: USER-SGE (the demo run) vs USER-CGE vs a VSE∞-style baseline vs USER-SGE with same-image
# negatives masked, in runs/demo/report.md
demo-ablation: demo
    {{just_executable()}} _demo-train runs/demo-cge --set model.enhancement=cge --set model.clip_dim=1280
    {{just_executable()}} _demo-train runs/demo-vse --set model.enhancement=none --set model.use_queue=false
    {{just_executable()}} _demo-train runs/demo-mask --set model.mask_false_negatives=true
    HF_HUB_OFFLINE=1 {{bin}}/userpipe report --run runs/demo --store data/demo.zarr --split test \
        --compare runs/demo-cge --compare runs/demo-vse --compare runs/demo-mask

# the demo over 5 seeds: its preset, its parts and the released recipe: bench/results/seeds.{md,json,png}
# (about 3 hours on 2 cores after `just demo`; finished seeds are kept)
demo-seeds: demo
    {{bin}}/python -m bench.seeds

# train the demo config into OUT (resumes a run that is there)
_demo-train out *overrides:
    HF_HUB_OFFLINE=1 {{bin}}/userpipe train --shards data/demo-shards/train --val-store data/demo.zarr \
        --config demo --out {{out}} {{overrides}} $([ -d {{out}}/checkpoints/last ] && echo --resume)

# the test suite (offline): everything but the exhaustive crash test
test: setup
    HF_HUB_OFFLINE=1 {{bin}}/python -m pytest

# the inner loop: the tests that are not end-to-end (under a minute)
test-fast: setup
    HF_HUB_OFFLINE=1 {{bin}}/python -m pytest -m "not slow"

# the crash test at 24 kill points per writer (about 30 minutes on 2 cores; `just test` runs 1 per writer but
# training, whose kill and resume it checks with the default math)
test-crash: setup
    HF_HUB_OFFLINE=1 {{bin}}/python -m pytest -m exhaustive tests/test_crash.py tests/test_distributed.py -s

# every benchmark (about 80 minutes here, 13 minutes of it data_order's COCO-sized epoch, 15 bench.ann's 1M-vector indexes (10 GB of RAM); 13 GB of scratch under data/); one table in bench/results/summary.md
bench: setup
    HF_HUB_OFFLINE=1 {{bin}}/python -m bench.extract_throughput
    HF_HUB_OFFLINE=1 {{bin}}/python -m bench.loader_throughput
    {{bin}}/python -m bench.ranking
    {{bin}}/python -m bench.ann
    {{bin}}/python -m bench.store_reads
    HF_HUB_OFFLINE=1 {{bin}}/python -m bench.data_order
    HF_HUB_OFFLINE=1 {{bin}}/python -m bench.train_throughput
    HF_HUB_OFFLINE=1 {{bin}}/python -m bench.ddp_throughput
    {{bin}}/python -m bench.queue_loss
    HF_HUB_OFFLINE=1 {{bin}}/python -m bench.contention
    {{bin}}/python -m bench.report

# the whole pipeline at COCO size on generated features (about 45 minutes here; 55 GB of scratch under data/ at
# its peak): bench/results/scale.{json,md}
bench-scale: setup
    HF_HUB_OFFLINE=1 {{bin}}/python -m bench.scale

# the GPU benchmark (a CUDA GPU; about 4 minutes on an H100/H200): bench/results/gpu.{json,md}
bench-gpu: setup
    TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 {{bin}}/python -m bench.gpu

# style and static checks (as CI and the pre-commit hooks run them)
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
