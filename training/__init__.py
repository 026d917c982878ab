"""Training: fine-tune offline pretrained backbones (EfficientNet-Lite, MiniLM) to new tasks."""
