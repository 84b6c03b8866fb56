"""userpipe: USER image-text retrieval as a pipeline (extract -> shard -> train -> eval)."""

__version__ = "0.1.0"
