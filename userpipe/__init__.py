"""userpipe: USER image-text retrieval as a pipeline (extract -> shard -> train -> eval).

From Python: `userpipe.open_store(path)`, `userpipe.load_run(path)`, `userpipe.open_index(path)`
(userpipe/api.py; loaded on first use, so `import userpipe` stays light).
"""

from userpipe.schemas.threads import prepare_process

prepare_process()  # before torch loads, in every process that imports userpipe (schemas/threads.py)

__version__ = "0.1.0"
__all__ = ["open_store", "load_run", "open_index"]


def __getattr__(name: str):
    if name in __all__:
        from userpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'userpipe' has no attribute '{name}'")
