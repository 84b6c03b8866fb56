"""userpipe: USER image-text retrieval as a pipeline (extract -> shard -> train -> eval)."""

from userpipe.schemas.threads import prepare_process

prepare_process()  # before torch loads, in every process that imports userpipe (schemas/threads.py)

__version__ = "0.1.0"
