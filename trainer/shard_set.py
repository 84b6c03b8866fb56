"""The shards a run reads: a manifest (a local folder, a URL, a `pipe:` command) or a brace pattern naming
some of its shards, resolved into their locations and manifest records, each checked to be there at its
manifest size before training starts (a stat, or a HEAD request). The full check (`check_shard`) runs as
the loader reads each shard."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from userpipe.pipeline.shard_io import check_shard_present
from userpipe.schemas.errors import InputError, ManifestError
from userpipe.schemas.shard import MANIFEST_NAME, ShardError, ShardRecord, parse_manifest, read_manifest
from userpipe.schemas.sources import announced_size, is_remote, read_bytes
from userpipe.schemas.store import ExtractorConfig


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]  # where each shard is read: a local path, a URL or a `pipe:` command
    records: tuple[ShardRecord, ...]  # each one's manifest record, which every reading is checked against
    store_config: ExtractorConfig  # how the features in the shards were extracted
    fields: tuple[str, ...] = ()  # the members every sample has (the manifest's)

    @functools.cached_property
    def samples(self) -> tuple[int, ...]:
        return tuple(record.samples for record in self.records)

    @functools.cached_property
    def captions(self) -> tuple[int, ...]:
        return tuple(record.captions for record in self.records)

    @functools.cached_property
    def sha256(self) -> tuple[str, ...]:
        return tuple(record.sha256 for record in self.records)

    @classmethod
    def from_manifest(cls, location: str | Path) -> ShardSet:
        """All shards of a manifest (a folder written by `userpipe shard`, or its manifest.json)."""
        path, manifest = read_manifest(location)
        urls = tuple(str(path.parent / record.name) for record in manifest.shards)
        for url, record in zip(urls, manifest.shards, strict=True):
            check_shard_present(record, url)  # a stat each: the rest as the shards stream
        return cls(urls, manifest.shards, manifest.params.store_config, manifest.fields)

    @classmethod
    def resolve(cls, spec: str | Path) -> ShardSet:
        """A manifest, or a brace pattern ("shards/train-{000000..000009}.tar") naming some of its shards;
        the manifest beside them supplies the per-shard counts that epochs and resuming rely on. Also
        shards elsewhere (`ShardSet.remote`): an http(s) URL or a `pipe:` command."""
        text = str(spec)
        if is_remote(text):
            return cls.remote(text)
        if "{" not in text:
            return cls.from_manifest(text)
        from braceexpand import braceexpand

        urls = list(braceexpand(text))
        folders = {str(Path(u).parent) for u in urls}
        if len(folders) != 1:
            raise InputError(f"shard pattern {text} spans several folders; one manifest must cover them")
        every = cls.from_manifest(folders.pop())
        index = {Path(u).name: i for i, u in enumerate(every.urls)}
        unknown = [Path(u).name for u in urls if Path(u).name not in index]
        if unknown:
            raise InputError(f"shard pattern {text} names shards the manifest does not list: {unknown[:3]}")
        picked = [index[Path(u).name] for u in urls]
        return cls(
            tuple(every.urls[i] for i in picked),
            tuple(every.records[i] for i in picked),
            every.store_config,
            every.fields,
        )

    @classmethod
    def remote(cls, spec: str) -> ShardSet:
        """Shards read where they are, for nodes without a shared filesystem: a folder URL
        ("https://host/train/"), its manifest's URL, a brace pattern of shard URLs, or a `pipe:` command
        whose word naming the shards is such a pattern ("pipe:aws s3 cp s3://b/train/{000000..000123}.tar -").
        The manifest is read the same way, from the folder of that word; each shard's size and sha256 are
        checked as it streams."""
        from braceexpand import braceexpand

        words = spec.split(" ") if spec.startswith("pipe:") else [spec]
        named = [i for i, w in enumerate(words) if w.endswith((".tar", ".json", "/"))]
        if not named and len(words) > 1:
            raise InputError(f"{spec}: no word of the command names the shards (a .tar brace pattern)")
        at = named[-1] if named else 0
        word = words[at]
        folder = word.rsplit("/", 1)[0] + "/" if word.endswith((".tar", ".json")) else word.rstrip("/") + "/"

        def located(name: str) -> str:
            return " ".join([*words[:at], folder + name, *words[at + 1 :]])

        source = located(MANIFEST_NAME)
        manifest = parse_manifest(read_bytes(source, "the shard manifest", ManifestError), source)
        names = [record.name for record in manifest.shards]
        picked = names
        if word.endswith(".tar"):
            picked = [name.rsplit("/", 1)[-1] for name in braceexpand(word)]
            unknown = [name for name in picked if name not in names]
            if unknown:
                raise InputError(f"shard pattern {spec} names shards {source} does not list: {unknown[:3]}")
        records = {record.name: record for record in manifest.shards}
        chosen = tuple(records[name] for name in picked)
        urls = tuple(located(record.name) for record in chosen)
        _check_announced_sizes(urls, chosen)
        return cls(urls, chosen, manifest.params.store_config, manifest.fields)

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def passes(self) -> int:
        """Passes per epoch: the set's captions per image, rounded (COCO's few images with 6 or 7
        captions use 5 of them per epoch, a different 5 each epoch)."""
        return max(1, round(sum(self.captions) / max(1, sum(self.samples))))


def _check_announced_sizes(urls: tuple[str, ...], records: tuple[ShardRecord, ...]) -> None:
    """Every http(s) shard is there at its manifest size before training starts (a HEAD request each, 16 at
    a time), as local shards are checked by their size: a missing or cut shard is refused before the run
    folder is written, not found hours into an epoch."""
    from concurrent.futures import ThreadPoolExecutor

    def size(url: str) -> int | None:
        return announced_size(url, "a shard", ShardError)

    with ThreadPoolExecutor(16) as pool:
        for url, record, announced in zip(urls, records, pool.map(size, urls), strict=True):
            if announced is not None:
                check_shard_present(record, url, announced)
