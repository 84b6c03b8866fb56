"""`--regions tsv:GLOB`: bottom-up-attention TSV files (generate_tsv.py's six fields, or LXMERT's with each
box's object and attribute), matched to the dataset's images by id or file name."""

from __future__ import annotations

from userpipe.pipeline.region_kinds.registry import imported_kind, register


def _dataset(options, request):
    from userpipe.pipeline.importers import index_tsv, plan_import

    index = request.load()
    return index, plan_import(f"tsv:{options.source}", index_tsv(options.source), index)


def _read(ref, feature_dim: int, detections: bool):
    from userpipe.pipeline.importers import checked_imported, read_tsv_line

    return checked_imported(read_tsv_line(*ref, detections), feature_dim, detections)


register(imported_kind("tsv", "bottom-up-attention / LXMERT TSV files", "GLOB", _dataset, _read))
