"""Knowledge distillation: losses, feature maps, the trainer and finetuning protocols."""
