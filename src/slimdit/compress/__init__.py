"""Pure surgery: remove units, low-rank (SVD) layers, re-compression; plans that record what changed."""


def __getattr__(name: str):
    if name == "compress":  # slimdit.compress.compress(model, plan, out): the `slimdit compress` command
        from slimdit.compress.student import compress_to_dir

        return compress_to_dir
    raise AttributeError(f"module 'slimdit.compress' has no attribute {name!r}")
