"""``effitrain train``: config, model, loop, metrics, checkpoints, distributed helpers."""
