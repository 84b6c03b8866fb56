"""The benchmarks (`just bench`): each runs as a module from the repository root, e.g.
`python -m bench.extract_throughput`, and writes bench/results/NAME.{md,json}."""
