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
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
    [ -x {{bin}}/python ] || python3 -m venv {{venv}}
    {{bin}}/python -m pip install -q --upgrade pip
    {{bin}}/python -m pip install -q torch==2.14.1 torchvision==0.29.1
    {{bin}}/python -m pip install -q -e '.[test]'
    touch "$stamp"

# the embedded offline demo: generate the demo dataset, extract, shard, train, evaluate (finished stages are reused)
demo: setup
    HF_HUB_OFFLINE=1 {{bin}}/userpipe extract --dataset demo
    {{bin}}/userpipe info data/demo.zarr
    {{bin}}/userpipe shard --store data/demo.zarr --split train --max-count 250
    {{bin}}/userpipe verify data/demo-shards/train
    HF_HUB_OFFLINE=1 {{bin}}/userpipe train --shards data/demo-shards/train --val-store data/demo.zarr \
        --config demo --out runs/demo $([ -d runs/demo/checkpoints/last ] && echo --resume)
    HF_HUB_OFFLINE=1 {{bin}}/userpipe eval --run runs/demo --store data/demo.zarr --split test

# the test suite (offline)
test: setup
    HF_HUB_OFFLINE=1 {{bin}}/python -m pytest

# throughput benchmarks (about 15 minutes, 20 GB of scratch under data/); results go to bench/results/
bench: setup
    HF_HUB_OFFLINE=1 {{bin}}/python bench/extract_throughput.py
    HF_HUB_OFFLINE=1 {{bin}}/python bench/loader_throughput.py
    {{bin}}/python bench/ranking.py
    HF_HUB_OFFLINE=1 {{bin}}/python bench/train_throughput.py
    {{bin}}/python bench/queue_loss.py

# style and static checks
lint: setup
    {{bin}}/ruff check .
