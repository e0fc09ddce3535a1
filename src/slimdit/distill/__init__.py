"""Knowledge distillation: losses, feature maps, the trainer and finetuning protocols."""


def __getattr__(name: str):
    if name == "distill":  # slimdit.distill.distill(config): the `slimdit distill` command
        from slimdit.distill.run import run_distill

        return run_distill
    raise AttributeError(f"module 'slimdit.distill' has no attribute {name!r}")
